"""The weight plan: how each tensor of the artifact is produced from the source checkpoint.

Graph passes rewrite the graph on the meta device and record here how new parameters derive from old
ones (``cat`` for fused projections); the writer then materializes tensors one shard at a time, reading
source tensors lazily, so a build never holds the whole model in host memory.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.weight_loader import DTYPES

log = logging.getLogger("spanda.compiler")

SHARD_BYTES = 2 * 1024**3


Derived = Callable[[Callable[[str], torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class WeightSource:
    """``copy``: one source tensor; ``cat``: source tensors concatenated along ``dim``; ``computed``;
    ``derived``: one of the tensors a function of the checkpoint returns (``sources[0]`` names the function's
    group, ``sources[1]`` the key in its result), e.g. the qweight/scales/zeros of one quantized linear."""

    kind: str
    sources: tuple[str, ...] = ()
    dim: int = 0


class WeightPlan:
    def __init__(self) -> None:
        self.entries: dict[str, WeightSource] = {}
        self.computed: dict[str, torch.Tensor] = {}
        self.derived: dict[str, Derived] = {}
        self._results: dict[str, dict[str, torch.Tensor]] = {}
        self._pending: dict[str, set[str]] = {}

    def copy(self, name: str, source: str) -> None:
        self.entries[name] = WeightSource("copy", (source,))

    def set_computed(self, name: str, tensor: torch.Tensor) -> None:
        self.entries[name] = WeightSource("computed")
        self.computed[name] = tensor

    def fuse(self, name: str, parts: list[str], dim: int = 0) -> None:
        """New tensor ``name`` = cat of the (already planned) tensors ``parts``; the parts leave the plan."""
        sources: list[str] = []
        for p in parts:
            e = self.entries.pop(p)
            if e.kind != "copy":
                raise ValueError(f"cannot fuse {p}: it is {e.kind}, not a plain copy")
            sources.extend(e.sources)
        self.entries[name] = WeightSource("cat", tuple(sources), dim)

    def derive(self, group: str, names: dict[str, str], fn: Derived) -> None:
        """Tensors ``names`` (plan name -> key of fn's result) all come from one call ``fn(read)``; the call
        runs once, when the first of them is written, and its result is dropped after the last one."""
        self.derived[group] = fn
        for name, key in names.items():
            self.entries[name] = WeightSource("derived", (group, key))

    def read_float(self, name: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The source tensor a plain (copy/cat) entry stands for, in float32."""
        e = self.entries[name]
        if e.kind == "copy":
            return read(e.sources[0]).float()
        if e.kind == "cat":
            return torch.cat([read(s).float() for s in e.sources], dim=e.dim)
        if e.kind == "computed":
            return self.computed[name].float()
        raise ValueError(f"{name} is {e.kind}, not a plain source tensor")

    def restrict(self, names: list[str]) -> None:
        missing = [n for n in names if n not in self.entries]
        if missing:
            raise KeyError(f"graph parameters with no weight source: {missing}")
        self.entries = {n: self.entries[n] for n in names}
        self._pending = {}
        for n, e in self.entries.items():
            if e.kind == "derived":
                self._pending.setdefault(e.sources[0], set()).add(n)

    def materialize(self, name: str, read: Callable[[str], torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        e = self.entries[name]
        if e.kind == "computed":
            t = self.computed[name]
        elif e.kind == "derived":
            group, key = e.sources
            if group not in self._results:
                self._results[group] = self.derived[group](read)
            t = self._results[group][key]
            self._pending[group].discard(name)
            if not self._pending[group]:
                del self._results[group]
            if t.dtype != dtype:
                raise ValueError(f"{name}: derived tensor is {t.dtype}, the graph expects {dtype}")
        elif e.kind == "copy":
            t = read(e.sources[0]).to(dtype)
        else:
            t = torch.cat([read(s).to(dtype) for s in e.sources], dim=e.dim)
        return t.contiguous()


def _shards(plan: WeightPlan, sizes: dict[str, int]) -> Iterator[list[str]]:
    shard: list[str] = []
    total = 0
    for name in sorted(plan.entries):
        if shard and total + sizes[name] > SHARD_BYTES:
            yield shard
            shard, total = [], 0
        shard.append(name)
        total += sizes[name]
    if shard:
        yield shard


ST_DTYPES = {t: name for name, t in DTYPES.items()}  # torch dtype -> safetensors dtype name


def write_weights(
    plan: WeightPlan,
    read: Callable[[str], torch.Tensor],
    meta: dict[str, torch.Tensor],
    out_dir: Path,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Write ``weights-XXXXX-of-YYYYY.safetensors`` shards (sorted names, fixed metadata: reproducible).

    ``meta`` holds each tensor's expected dtype and shape (meta tensors of the captured graph). A shard is
    streamed: its header is known before any tensor is made, and every tensor goes to the file as soon as it
    is materialized and is dropped, so host memory holds one tensor (or one derived group, e.g. a quantized
    layer) at a time, never a shard. Data follow in name order, contiguous, as the safetensors spec requires
    (the runtime copies any tensor a previous odd-sized one left unaligned)."""
    sizes = {n: t.numel() * t.element_size() for n, t in meta.items()}
    groups = list(_shards(plan, sizes))
    files = []
    for i, names in enumerate(groups):
        fname = f"weights-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        _write_shard(out_dir / fname, names, plan, read, meta, sizes, progress)
        log.info("wrote %s (%d tensors, %.2f GB)", fname, len(names), sum(sizes[n] for n in names) / 1e9)
        files.append(fname)
    return files


def _write_shard(path: Path, names: list[str], plan: WeightPlan, read: Callable[[str], torch.Tensor],
                 meta: dict[str, torch.Tensor], sizes: dict[str, int],
                 progress: Callable[[int], None] | None) -> None:
    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for n in names:
            yield n, plan.materialize(n, read, meta[n].dtype)
            if progress:
                progress(1)

    write_safetensors_stream(path, [(n, meta[n].dtype, tuple(meta[n].shape)) for n in names], tensors())


def write_safetensors_stream(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                             tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """A safetensors file whose tensors are produced one at a time: the header comes from ``entries`` (name,
    dtype, shape, in data order), then each tensor of ``tensors`` (the same names, in the same order, checked)
    is written and dropped. Metadata is ``{"format": "pt"}`` only (reproducible bytes)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the spec allows trailing spaces; 8-aligns the data section
    expected = iter(entries)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name, t in tensors:
            want = next(expected, None)
            if want is None or want[0] != name:
                raise ValueError(f"{path.name}: got tensor {name!r}, expected {want and want[0]!r}")
            if t.dtype != want[1] or tuple(t.shape) != tuple(want[2]):
                raise ValueError(f"{name}: materialized {t.dtype}{list(t.shape)}, expected {want[1]}{list(want[2])}")
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t
    missing = [e[0] for e in expected]
    if missing:
        raise ValueError(f"{path.name}: tensors never produced: {missing[:3]}")
