"""``spanda export-hf``: an artifact's model as a Hugging Face checkpoint other engines load (compressed-tensors
when quantized, plain safetensors otherwise; the layouts and the per-module conversion are in
compiler/export_hf_convert.py).

The artifact's weight files are read like a checkpoint, one file open at a time. A first pass over it, one module
at a time, plans every output tensor (name, dtype, shape), the per-group choices and the ``quantization_config``
(:class:`_Plan`); a second pass streams the converted tensors into shards of at most SHARD_BYTES (with
``model.safetensors.index.json`` when there are several), so export memory stays near one module. Everything
goes to a temp dir beside ``out_dir`` that is renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from compiler.export_hf_convert import (
    FUSED_MODULES,
    LINEAR_LEAVES,
    _module_tensors,
    _op_of,
    _pack_along_n,
    _weights_args,
    classify,
    hf_config,
)
from compiler.hf_loader import HFCheckpoint
from compiler.weights import write_safetensors_stream

log = logging.getLogger("spanda.compiler")

SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size
INDEX_FILE = "model.safetensors.index.json"


def _artifact_reader(art) -> HFCheckpoint:
    """The artifact's weight files read like a checkpoint: tensors by name, one file open at a time (an open
    safetensors handle keeps every page read through it resident), so export memory stays near one module."""
    where = {}
    for f in art.manifest.weights.files:
        with safe_open(str(art.file(f)), framework="pt") as h:
            where.update({k: f for k in h.keys()})
    return HFCheckpoint(art.path, art.manifest.model.config, where)


class _Plan:
    """What export writes, decided in a first pass over the artifact one module at a time: the scheme key of
    each quantized module, the per-group choices (symmetric zero points, per-channel scales), the
    quantization_config, and every output tensor (name, dtype, shape, in write order)."""

    def __init__(self, ckpt: HFCheckpoint, q: dict[str, Any]) -> None:
        self.read, self.c, self.q = ckpt.read, ckpt.config, q
        self.modules, self.other = classify(sorted(ckpt.weight_map))
        self.keys: dict[str, tuple] = {}
        metas: dict[str, dict[str, torch.Tensor]] = {}  # each module's raw tensors, shapes only
        for name, tensors, key in self._raw():
            metas[name] = {local: t.to("meta") for local, t in tensors.items() if local != "_sym"}
            if key is not None:
                self.keys[name] = key
                if key[0] == "linear_wna16":
                    metas[name]["_sym"] = tensors["_sym"]  # a bool: the group's symmetry needs its value
        by_key: dict[tuple, list[str]] = defaultdict(list)
        for name, key in self.keys.items():
            by_key[key].append(name)
        self.sym = {key: all(bool(metas[n].get("_sym", True)) for n in names) for key, names in by_key.items()}
        self.per_channel = {key: key[0] == "linear_wna16" or any(metas[n]["weight_scale"].numel() > 1 for n in names)
                            for key, names in by_key.items()}
        self.qconfig = self._qconfig(by_key) if self.keys else None
        # the final shapes come from the same conversion the writer applies, run on the meta tensors
        self.entries = [(n, t.dtype, tuple(t.shape)) for name, meta in metas.items()
                        for n, t in self._finalize(name, meta, self.keys.get(name))]

    def _raw(self) -> Iterator[tuple[str, dict[str, torch.Tensor], tuple | None]]:
        for prefix in sorted(self.modules):
            suffixes = self.modules[prefix]
            wd = self.read(suffixes["weight"]).dtype if "weight" in suffixes else None
            yield from _module_tensors(self.read, prefix, suffixes, _op_of(suffixes, wd), self.c, self.q)
        for n in self.other:
            yield n, {"": self.read(n)}, None

    def _finalize(self, name: str, t: dict[str, torch.Tensor], key: tuple | None
                  ) -> Iterator[tuple[str, torch.Tensor]]:
        """A module's checkpoint tensors with their final names: zero points packed when the group is
        asymmetric (dropped when symmetric), a tensor scale expanded when the group's scales are per channel."""
        t = dict(t)
        if key is not None and key[0] == "linear_wna16":
            z = t.pop("_zeros")
            t.pop("_sym", None)
            if not self.sym[key]:
                t["weight_zero_point"] = _pack_along_n(z, key[1])
        elif key is not None and self.per_channel[key] and t["weight_scale"].numel() == 1:
            t["weight_scale"] = t["weight_scale"].expand(t["weight"].shape[0]).reshape(-1, 1).contiguous()
        for local, tensor in t.items():
            yield (f"{name}.{local}" if local else name), tensor

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Second pass: the final tensors in ``entries`` order, one module in memory at a time."""
        for name, t, key in self._raw():
            if name in self.other:
                log.warning("export-hf: tensor %s is not a module parameter; copied as is", name)
            for n, tensor in self._finalize(name, t, key):
                yield n, tensor.contiguous()

    def _qconfig(self, by_key: dict[tuple, list[str]]) -> dict[str, Any]:
        # One scheme per (op, bits, group size, activations); symmetry and per-channel scales per group.
        groups = {}
        for i, (key, names) in enumerate(sorted(by_key.items(), key=lambda kv: str(kv[0]))):
            scheme = _weights_args(key, self.sym[key], self.per_channel[key])
            scheme["targets"] = sorted(names)
            groups[f"group_{i}"] = scheme
        formats = {g["format"] for g in groups.values()}
        if len(groups) == 1:
            next(iter(groups.values()))["targets"] = ["Linear"]
        names = [n for n, _ in self.modules_out()]
        ignore = sorted(n for n in names if n.rpartition(".")[2] in LINEAR_LEAVES and n not in self.keys)
        qconfig = {
            "quant_method": "compressed-tensors",
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": ignore,
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
        }
        if len(groups) == 1:
            next(iter(groups.values())).pop("format")  # the top-level format says it
        return qconfig

    def modules_out(self) -> Iterator[tuple[str, str]]:
        """(HF module name, artifact prefix) of every module export writes."""
        for prefix in sorted(self.modules):
            parent, _, leaf = prefix.rpartition(".")
            for part in FUSED_MODULES.get(leaf, (leaf,)):
                yield (f"{parent}.{part}" if parent else part), prefix
        for n in self.other:
            yield n, n


def _write_shards(tmp: Path, plan: _Plan) -> None:
    """Shards of at most SHARD_BYTES in write order, each streamed (one module's tensors in memory)."""
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for e in plan.entries:
        b = math.prod(e[2]) * e[1].itemsize
        if shards[-1] and size + b > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += b
    tensors = plan.tensors()

    def take(n: int) -> Iterator[tuple[str, torch.Tensor]]:
        for _ in range(n):
            yield next(tensors)

    if len(shards) == 1:
        write_safetensors_stream(tmp / "model.safetensors", shards[0], take(len(shards[0])))
        return
    weight_map = {}
    for i, entries in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_stream(tmp / fname, entries, take(len(entries)))
        weight_map.update({e[0]: fname for e in entries})
        log.info("export-hf: wrote %s (%d tensors)", fname, len(entries))
    total = sum(math.prod(e[2]) * e[1].itemsize for e in plan.entries)
    (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                             indent=2, sort_keys=True) + "\n")


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    aside = None
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        aside = out.parent / f".{out.name}.old-{secrets.token_hex(6)}"
        os.replace(out, aside)
    try:
        os.replace(tmp, out)
    except BaseException:
        if aside is not None:
            os.replace(aside, out)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def export_hf(artifact_dir: str | Path, out_dir: str | Path, overwrite: bool = False, verify: bool = True) -> Path:
    """Write the artifact's model as a Hugging Face checkpoint (compressed-tensors when quantized) to ``out_dir``,
    atomically: everything goes to a temp dir beside it that is renamed into place at the end."""
    from artifacts.store import open_artifact

    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    art = open_artifact(artifact_dir, verify=verify)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()
    try:
        plan = _Plan(_artifact_reader(art), art.manifest.quantization.model_dump())
        qconfig = plan.qconfig
        cfg = hf_config(art.manifest)
        if qconfig is not None:
            cfg["quantization_config"] = qconfig
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        _write_shards(tmp, plan)
        for f in art.manifest.tokenizer.files:
            shutil.copyfile(art.file(f), tmp / f)
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s to %s (%s)", artifact_dir, out, "compressed-tensors " + qconfig["format"] if qconfig
             else "unquantized")
    return out
