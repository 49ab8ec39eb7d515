"""``spanda export-hf``: an artifact's model as a Hugging Face checkpoint other engines load.

Quantized artifacts become compressed-tensors checkpoints (the format vLLM, SGLang and transformers read):

- ``linear_wna16`` (GPTQ, AWQ, RTN int4/int8) -> ``pack-quantized``: ``weight_packed`` int32 [N, K*bits/32]
  (codes + 2^(bits-1) offset, i.e. our unsigned codes, packed along the input dim, lowest bits first: exactly
  the transpose of our ``qweight``), ``weight_scale`` [N, G] in the model dtype, ``weight_shape`` [2] int64,
  and for asymmetric models ``weight_zero_point`` [N*bits/32, G] int32 (signed zero points + offset, packed
  along N). Act-order artifacts (``perm``) are refused: their groups are not contiguous in input order and
  compressed-tensors removed ``actorder: group`` (``weight_g_idx``) in 0.20.
- ``linear_fp8`` -> ``float-quantized``: ``weight`` float8_e4m3fn [N, K], ``weight_scale`` float32 [N, 1]
  (channel) or [1] (tensor), ``input_scale`` [1] when static; activations dynamic per token otherwise.
- ``linear_int8`` -> ``int-quantized``: ``weight`` int8 [N, K], ``weight_scale`` float32 [N, 1], activations
  int8 dynamic per token (or static per tensor with ``input_scale``).

Scales of the W8A8 formats are written in float32 (our internal precision, so the checkpoint dequantizes to
exactly the weights Spanda serves; compressed-tensors itself would store them in the model dtype and every
reader accepts both). Fused projections are split back along N (qkv_proj -> q/k/v, gate_up_proj -> gate/up).
Unquantized artifacts export plain safetensors in the artifact's dtype. Layouts checked against
compressed-tensors 0.20 (compressors/pack_quantized, naive_quantized) and its own decompression in
tests/test_quant_formats.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from compiler.hf_loader import HFCheckpoint
from compiler.quantize.packing import _pack
from compiler.weights import write_safetensors_stream
from runtime.ops.quant_linear import unpack_mma_zeros, unpack_wna16_mma

log = logging.getLogger("spanda.compiler")

# Fused artifact module -> the HF modules it was made of, in order along N.
FUSED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
# HF linear module names (last component): the ones compressed-tensors' "Linear" target reaches, so a float one
# among them goes into ``ignore``.
LINEAR_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
# Artifact tensors that are not checkpoint parameters (runtime buffers).
ARTIFACT_ONLY = ("model.rope_cos_sin",)
# Artifact parameter suffixes per op (the names the build's quantization pass writes); a module whose suffixes
# include the first key of an entry is that op.
OP_SUFFIXES: dict[str, tuple[str, ...]] = {
    "linear_wna16": ("qweight", "qweight_mma", "scales", "zeros", "perm", "bias"),  # qweight_mma: wna16_mma pass
    "linear_w8a8": ("weight", "weight_scale", "input_scale", "bias"),  # fp8 or int8 by the weight's dtype
    "float": ("weight", "bias"),
}
SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size
INDEX_FILE = "model.safetensors.index.json"


def classify(names: list[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Artifact tensor names -> ({module prefix: {suffix: full name}}, names that are not module parameters)."""
    modules: dict[str, dict[str, str]] = defaultdict(dict)
    other = []
    for n in names:
        if n in ARTIFACT_ONLY:
            continue
        prefix, _, suffix = n.rpartition(".")
        if prefix and suffix in {s for v in OP_SUFFIXES.values() for s in v}:
            modules[prefix][suffix] = n
        else:
            other.append(n)
    return dict(modules), other


def _op_of(suffixes: dict[str, str], weight_dtype: torch.dtype | None) -> str:
    if "qweight" in suffixes or "qweight_mma" in suffixes:
        return "linear_wna16"
    if "weight_scale" in suffixes:
        if weight_dtype == torch.float8_e4m3fn:
            return "linear_fp8"
        if weight_dtype == torch.int8:
            return "linear_int8"
        raise ValueError(f"weight_scale next to a {weight_dtype} weight: not an fp8 or int8 linear")
    return "float"


def hf_config(manifest) -> dict[str, Any]:
    """config.json of the source model, rebuilt from the manifest's normalized ModelConfig."""
    c = manifest.model.config
    family = manifest.model.family
    cfg: dict[str, Any] = {
        "architectures": [manifest.model.architecture],
        "model_type": family,
        "vocab_size": c["vocab_size"],
        "hidden_size": c["hidden_size"],
        "intermediate_size": c["intermediate_size"],
        "num_hidden_layers": c["num_layers"],
        "num_attention_heads": c["num_heads"],
        "num_key_value_heads": c["num_kv_heads"],
        "head_dim": c["head_dim"],
        "hidden_act": "silu",
        "rms_norm_eps": c["rms_norm_eps"],
        "rope_theta": c["rope_theta"],
        "rope_scaling": c.get("rope_scaling"),
        "max_position_embeddings": c["max_position_embeddings"],
        "tie_word_embeddings": c["tie_word_embeddings"],
        "torch_dtype": c.get("dtype", manifest.weights.dtype),
        "bos_token_id": manifest.tokenizer.bos_token_id,
        "eos_token_id": (manifest.tokenizer.eos_token_ids[0] if len(manifest.tokenizer.eos_token_ids) == 1
                         else manifest.tokenizer.eos_token_ids or None),
    }
    if manifest.tokenizer.pad_token_id is not None:
        cfg["pad_token_id"] = manifest.tokenizer.pad_token_id
    if family == "llama":
        cfg["attention_bias"] = bool(c.get("qkv_bias", False))
        cfg["mlp_bias"] = bool(c.get("mlp_bias", False))
    windows = list(c.get("sliding_windows") or [])
    used = [w for w in windows if w is not None]
    if family == "mistral":
        cfg["sliding_window"] = used[0] if used else None
    elif family == "qwen2":
        cfg["use_sliding_window"] = bool(used)
        cfg["sliding_window"] = used[0] if used else None
        cfg["max_window_layers"] = next((i for i, w in enumerate(windows) if w is not None), len(windows))
        cfg["layer_types"] = ["sliding_attention" if w is not None else "full_attention" for w in windows]
    return cfg


def _split_sizes(leaf: str, n: int, c: dict[str, Any]) -> tuple[int, ...]:
    if leaf == "qkv_proj":
        sizes = (c["num_heads"] * c["head_dim"], c["num_kv_heads"] * c["head_dim"], c["num_kv_heads"] * c["head_dim"])
    elif leaf == "gate_up_proj":
        sizes = (c["intermediate_size"], c["intermediate_size"])
    else:
        sizes = (n,)
    if sum(sizes) != n:
        raise ValueError(f"{leaf}: {n} output channels, expected {sum(sizes)} from the model config ({sizes})")
    return sizes


def _in_features(leaf: str, c: dict[str, Any]) -> int:
    if leaf == "o_proj":
        return c["num_heads"] * c["head_dim"]
    if leaf == "down_proj":
        return c["intermediate_size"]
    return c["hidden_size"]


def _pack_along_n(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned zero points [n, G] -> compressed-tensors' pack_to_int32(z - 2^(bits-1), packed_dim=0)."""
    per = 32 // bits
    pad = (-z.shape[0]) % per
    if pad:  # compressed-tensors pads with zeros (signed), i.e. the offset, and truncates on unpack
        z = torch.cat([z, torch.full((pad, z.shape[1]), 1 << (bits - 1), dtype=z.dtype, device=z.device)])
    return _pack(z, bits, dim=0).contiguous()


def _artifact_reader(art) -> HFCheckpoint:
    """The artifact's weight files read like a checkpoint: tensors by name, one file open at a time (an open
    safetensors handle keeps every page read through it resident), so export memory stays near one module."""
    where = {}
    for f in art.manifest.weights.files:
        with safe_open(str(art.file(f)), framework="pt") as h:
            where.update({k: f for k in h.keys()})
    return HFCheckpoint(art.path, art.manifest.model.config, where)


def _module_tensors(read: Callable[[str], torch.Tensor], prefix: str, suffixes: dict[str, str], op: str,
                    c: dict[str, Any], q: dict[str, Any]
                    ) -> Iterator[tuple[str, dict[str, torch.Tensor], tuple | None]]:
    """(HF module name, its checkpoint tensors by local name, scheme key or None for float) per HF module."""
    parent, _, leaf = prefix.rpartition(".")
    parts = FUSED_MODULES.get(leaf, (leaf,))
    t = {s: read(n) for s, n in suffixes.items()}
    if "qweight_mma" in t:  # the tensor-core layout of the same 4-bit codes: back to the GPTQ words
        t["qweight"] = _pack(unpack_wna16_mma(t.pop("qweight_mma"), _in_features(leaf, c)), 4, 0)
        if t["zeros"].dtype == torch.int32:  # and its zero points, stored as pack_mma_zeros' words
            t["zeros"] = unpack_mma_zeros(t["zeros"], t["scales"].dtype)
    bias = t.get("bias")
    if op == "float":
        n_out = t["weight"].shape[0]
    elif op == "linear_wna16":
        n_out = t["qweight"].shape[1]
    else:
        n_out = t["weight"].shape[0]
    sizes = _split_sizes(leaf, n_out, c) if leaf in FUSED_MODULES else (n_out,)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    key = None
    if op == "linear_wna16":
        if "perm" in t:
            raise ValueError(
                f"{prefix}: act-order (perm) cannot be exported to compressed-tensors: its groups are not contiguous "
                "in input order, and compressed-tensors removed actorder='group' (weight_g_idx) in 0.20; rebuild "
                "without quantization.act_order to export")
        k = _in_features(leaf, c)
        bits = t["qweight"].shape[0] * 32 // k
        if q.get("bits") and q["bits"] != bits:
            raise ValueError(f"{prefix}.qweight holds {bits}-bit codes, the manifest says bits={q['bits']}")
        g = t["scales"].shape[0]
        gs = -1 if g == 1 else k // g
        sym = bool((t["zeros"] == (1 << (bits - 1))).all())
        key = ("linear_wna16", bits, gs)
    elif op in ("linear_fp8", "linear_int8"):
        per_tensor = t["weight_scale"].numel() == 1
        key = (op, per_tensor, "input_scale" in t)
    for part, a, n in zip(parts, starts, sizes):
        name = f"{parent}.{part}" if parent else part
        sl = slice(a, a + n)
        out: dict[str, torch.Tensor] = {}
        if op == "float":
            out["weight"] = t["weight"][sl].contiguous()
        elif op == "linear_wna16":
            out["weight_packed"] = t["qweight"][:, sl].t().contiguous()
            out["weight_scale"] = t["scales"][:, sl].t().contiguous()
            out["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
            out["_zeros"] = t["zeros"][:, sl].t().to(torch.int32).contiguous()  # packed once symmetry is known
            out["_sym"] = torch.tensor(sym)
        else:
            out["weight"] = t["weight"][sl].contiguous()
            ws = t["weight_scale"].float().reshape(-1)
            out["weight_scale"] = ws.clone() if ws.numel() == 1 else ws[sl].reshape(n, 1).contiguous()
            if "input_scale" in t:
                out["input_scale"] = t["input_scale"].float().reshape(1).clone()
        if bias is not None:
            out["bias"] = bias[sl].contiguous()
        yield name, out, key


def _weights_args(key: tuple, sym: bool, per_channel: bool) -> dict[str, Any]:
    op = key[0]
    if op == "linear_wna16":
        _, bits, gs = key
        return {"weights": {"num_bits": bits, "type": "int", "symmetric": sym,
                            "strategy": "channel" if gs == -1 else "group", "group_size": None if gs == -1 else gs,
                            "dynamic": False},
                "input_activations": None, "output_activations": None, "format": "pack-quantized"}
    _, _, static = key
    typ = "float" if op == "linear_fp8" else "int"
    acts = ({"num_bits": 8, "type": typ, "symmetric": True, "strategy": "tensor", "dynamic": False,
             "group_size": None} if static else
            {"num_bits": 8, "type": typ, "symmetric": True, "strategy": "token", "dynamic": True, "group_size": None})
    return {"weights": {"num_bits": 8, "type": typ, "symmetric": True,
                        "strategy": "channel" if per_channel else "tensor", "group_size": None, "dynamic": False},
            "input_activations": acts, "output_activations": None,
            "format": "float-quantized" if op == "linear_fp8" else "int-quantized"}


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
