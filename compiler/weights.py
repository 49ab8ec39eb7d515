"""The weight plan: how each tensor of the artifact is produced from the source checkpoint.

Graph passes rewrite the graph on the meta device and record here how new parameters derive from old
ones (``cat`` for fused projections); the writer then materializes tensors one shard at a time, reading
source tensors lazily, so a build never holds the whole model in host memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

log = logging.getLogger("spanda.compiler")

SHARD_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class WeightSource:
    """``copy``: one source tensor; ``cat``: source tensors concatenated along ``dim``; ``computed``."""

    kind: str
    sources: tuple[str, ...] = ()
    dim: int = 0


class WeightPlan:
    def __init__(self) -> None:
        self.entries: dict[str, WeightSource] = {}
        self.computed: dict[str, torch.Tensor] = {}

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

    def restrict(self, names: list[str]) -> None:
        missing = [n for n in names if n not in self.entries]
        if missing:
            raise KeyError(f"graph parameters with no weight source: {missing}")
        self.entries = {n: self.entries[n] for n in names}

    def materialize(self, name: str, read: Callable[[str], torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        e = self.entries[name]
        if e.kind == "computed":
            t = self.computed[name]
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


def write_weights(
    plan: WeightPlan,
    read: Callable[[str], torch.Tensor],
    dtypes: dict[str, torch.dtype],
    sizes: dict[str, int],
    out_dir: Path,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Write ``weights-XXXXX-of-YYYYY.safetensors`` shards (sorted names, fixed metadata: reproducible)."""
    groups = list(_shards(plan, sizes))
    files = []
    for i, names in enumerate(groups):
        fname = f"weights-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in names:
            tensors[n] = plan.materialize(n, read, dtypes[n])
            if progress:
                progress(1)
        # One metadata key only: safetensors orders metadata keys by a hash map, which would make the
        # header (and so the file's sha256) differ between otherwise identical builds.
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        log.info("wrote %s (%d tensors)", fname, len(names))
        files.append(fname)
        del tensors
    return files
