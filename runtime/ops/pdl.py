"""Programmatic dependent launch (PDL, Hopper and later) of the Triton kernels. ``SPANDA_PDL`` in the environment
of the process that loads the engine (its CUDA graphs capture the launches): ``auto`` (unset) for the decode
graphs of up to ``AUTO_MAX_BATCH`` sequences of a model whose linears are Spanda's quantized ones (Triton GEMMs,
``graph_max_batch``), ``1`` for every launch, ``0`` for none.

A decode step is a chain of short kernels (norm, GEMM, RoPE + KV write, attention, ...), and each one pays a
launch and a ramp-up after the previous one has fully drained. With PDL the next kernel of the chain is
launched while the current one finishes: its programs start, then wait in ``griddepcontrol.wait`` (Triton's
``gdc_wait``), which returns once every program of the previous kernel has exited and its memory operations
are visible. Every kernel launched this way waits first thing, before it reads or writes any memory, so
the results are those of ordinary launches; what overlaps is launch latency and setup. Each kernel also
signals ``gdc_launch_dependents`` (elementwise kernels right after their wait, GEMMs once their K loop is done;
earlier at higher ``TRIGGER`` levels) so that the next launch need not wait for its exit. Kernels that are not
Triton's (cuBLAS, torch) launch as before and order the chain as before.

Why ``auto`` stops at small batches and leaves bf16 models alone (H200, 8B shape): async tok/s without / with
PDL on every launch (bench/results/quant-engine-8b-h200-pdl-ab-*.json), batch 1 bf16 210.9 / 214.4, FP8
290.4 / 306.3, W4A16 337.2 / 350.9; batch 16 bf16 3,089 / 3,002, FP8 4,027 / 4,131, W4A16 4,703 / 4,658. With
``auto`` (bench/results/pdl-auto-8b-h200.json), GPU time of one batch-1 decode graph without / with it: FP8
3.058 / 2.865 ms, W4A16 2.698 / 2.533 ms, bf16 4.554 / 4.639 ms (its GEMMs are cuBLAS's, which neither wait
nor signal: no chain of Triton kernels to overlap, only the waits to pay).
"""

from __future__ import annotations

import contextlib
import os

import torch

MODE = os.environ.get("SPANDA_PDL", "auto")
if MODE not in ("auto", "0", "1"):
    raise ValueError(f"SPANDA_PDL={MODE!r}: expected auto, 0 or 1")
ENABLED = MODE == "1"  # every Triton launch (benches and tests set it)
AUTO_MAX_BATCH = 4 if MODE == "auto" else 0  # decode graphs of up to this many sequences (0: none)
# Where a kernel lets the next one launch (the value of the kernels' PDL constexpr): 1, the short kernels after
# their wait and the GEMMs once their K loop is done; 2, the short kernels before their wait (the next kernel's
# programs become resident and issue their own early loads while the previous GEMM still finishes); 3, also the
# Gluon W4A16 GEMM before its wait, after issuing its first stages (bench/pdl_auto.py's trigger2 / trigger3).
TRIGGER = 1
_GRAPH = [False]  # inside decode_graph() of a small enough batch
_CAPABILITY: dict[torch.device, tuple[int, int]] = {}


def capability(device: torch.device) -> tuple[int, int]:
    """The device's CUDA compute capability, (0, 0) off CUDA (cached: asked on every launch)."""
    if device not in _CAPABILITY:
        _CAPABILITY[device] = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    return _CAPABILITY[device]


def hopper(device: torch.device) -> bool:
    """A CUDA device of compute capability 9 or later."""
    return capability(device) >= (9, 0)


TRITON_GEMMS = frozenset({"linear_wna16", "linear_wna16_mma", "linear_wna16_mma_add_norm", "linear_wna16_mma_rms",
                          "linear_wna16_mma_silu", "linear_fp8", "linear_int8", "linear_w8a8"})


def graph_max_batch(gm: torch.nn.Module) -> int:
    """The largest decode graph of ``gm`` (the exported graph module, ``ExportedProgram.module()``) whose Triton
    kernels launch with PDL: AUTO_MAX_BATCH if one of its ops is a quantized linear of TRITON_GEMMS, else 0."""
    ops = {str(n.target).split(".")[1] for n in gm.graph.nodes
           if n.op == "call_function" and str(n.target).startswith("spanda.")}
    return AUTO_MAX_BATCH if ops & TRITON_GEMMS else 0


@contextlib.contextmanager
def decode_graph(batch: int, max_batch: int):
    """Around the warm-up and capture of the decode graph of ``batch`` sequences: its Triton kernels launch with
    PDL when ``batch <= max_batch`` (graph_max_batch of the model)."""
    prev = _GRAPH[0]
    _GRAPH[0] = batch <= max_batch
    try:
        yield
    finally:
        _GRAPH[0] = prev


def launch_kwargs(device: torch.device) -> dict:
    """Extra launch arguments of a Triton kernel that has a ``PDL`` constexpr: PDL on (sm_90+; ENABLED, or a small
    decode graph), the constexpr being TRIGGER, or {}."""
    return {"PDL": TRIGGER, "launch_pdl": True} if (ENABLED or _GRAPH[0]) and hopper(device) else {}
