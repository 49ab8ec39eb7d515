"""Engine configuration: the artifact's limits, with the overrides a deployment may set (typed, frozen)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger("spanda.runtime")

DEFAULT_CPU_KV_BYTES = 512 * 2**20


@dataclass(frozen=True)
class EngineOptions:
    """What a user may override at load time. ``None`` keeps the artifact's value.

    device: "cpu", "cuda", "cuda:N" or None (CUDA if available, else CPU; env SPANDA_DEVICE).
    kv_cache_blocks: number of KV blocks; None = the artifact's, else sized from memory.
    gpu_memory_utilization: fraction of the GPU memory left free once the weights are loaded that the KV
        cache may take when sizing it.
    verify: check every artifact file's sha256 at load (size is always checked).
    allow_envelope_mismatch: run on a torch/GPU the artifact was not built for (with a warning).
    cuda_graphs: capture decode steps per batch bucket on CUDA (False = always eager, for debugging).
    allow_jit: on a GPU other than the one the artifact's kernels were compiled for, recompile them
        (with a warning) instead of refusing to load.
    async_scheduling: launch the next decode step before the current step's tokens reach the host, when
        every running sequence is plainly decoding (runtime/engine.py); the same tokens, the host work hidden
        behind the GPU's. None (default): on for CUDA devices (on the CPU there is nothing to overlap).
    """

    device: str | None = None
    kv_cache_blocks: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool | None = None
    gpu_memory_utilization: float = 0.85
    verify: bool = True
    allow_envelope_mismatch: bool = False
    cuda_graphs: bool = True
    allow_jit: bool = False
    async_scheduling: bool | None = None


def resolve_device(requested: str | None) -> torch.device:
    name = requested or os.environ.get("SPANDA_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available on this machine")
    return dev


def size_kv_cache(bytes_per_block: int, device: torch.device, utilization: float, max_blocks: int) -> int:
    """Blocks that fit: a fraction of free GPU memory, or a fixed host budget on CPU; at most max_blocks."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * utilization)
    else:
        budget = DEFAULT_CPU_KV_BYTES
    return max(1, min(max_blocks, budget // bytes_per_block))
