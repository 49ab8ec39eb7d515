"""Programmatic dependent launch (PDL, Hopper and later), opt-in: ``SPANDA_PDL=1`` in the environment of the
process that loads the engine (its CUDA graphs capture the launches).

A decode step is a chain of short kernels (norm, GEMM, RoPE + KV write, attention, ...), and each one pays a
launch and a ramp-up after the previous one has fully drained. With PDL the next kernel of the chain is
launched while the current one finishes: its programs start, then wait in ``griddepcontrol.wait`` (Triton's
``gdc_wait``), which returns once every program of the previous kernel has exited and its memory operations
are visible. Every kernel launched this way waits first thing, before it reads or writes any memory, so
the results are those of ordinary launches; what overlaps is launch latency and setup. Each kernel also
signals ``gdc_launch_dependents`` (elementwise kernels at once, GEMMs once their K loop is done) so that the
next launch need not wait for its exit. Kernels that are not Triton's (cuBLAS, torch) launch as before and
order the chain as before.
"""

from __future__ import annotations

import os

import torch

ENABLED = os.environ.get("SPANDA_PDL", "0") == "1"
_CAPABILITY: dict[torch.device, tuple[int, int]] = {}


def capability(device: torch.device) -> tuple[int, int]:
    """The device's CUDA compute capability, (0, 0) off CUDA (cached: asked on every launch)."""
    if device not in _CAPABILITY:
        _CAPABILITY[device] = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    return _CAPABILITY[device]


def hopper(device: torch.device) -> bool:
    """A CUDA device of compute capability 9 or later."""
    return capability(device) >= (9, 0)


def launch_kwargs(device: torch.device) -> dict:
    """Extra launch arguments of a Triton kernel that has a ``PDL`` constexpr: PDL on (sm_90+, opt-in) or {}."""
    return {"PDL": True, "launch_pdl": True} if ENABLED and hopper(device) else {}
