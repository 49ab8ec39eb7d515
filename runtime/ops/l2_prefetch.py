"""Weights pulled into L2 while a decode step's attention runs (off by default: ``L2_PREFETCH_MB`` 0).

At batch 1 the weight GEMMs stream from HBM and everything between them barely touches it: from the qkv
projection's end to the o projection's start (RoPE + KV write, the attention splits and their merge, about 11 us
per layer of an 8B model on an H100, bench/results/profile-decode-8b-h100-w4a16-lm.json) HBM idles, while a
layer's weights take about 36 us to stream at 3 TB/s. With ``L2_PREFETCH_MB`` > 0, in launches under PDL (the
small decode batches' graphs, runtime/ops/pdl.py), the RoPE + KV write kernel (runtime/ops/triton_rope_cache.py)
gets ``PROGRAMS`` extra programs that issue bulk L2 prefetches (``cp.async.bulk.prefetch.L2``, sm_90) of the
first ``L2_PREFETCH_MB`` MB of the weights its layer reads after attention, in the order it reads them (o_proj's
tensors, then gate_up's, ...), and exit: they read nothing a kernel writes, so they run ahead of the PDL wait,
and the kernel's other programs still order the chain. The GEMMs then find that part of their weights in L2.

``weights_after_attention`` finds those tensors from the graph (every tensor attribute an op reads between one
layer's rope_and_cache and the next one's), so it needs no module names. The model runner attaches the table to
its KV caches (``KVCaches.l2_prefetch``), where the op finds it through the forward context.
"""

from __future__ import annotations

from operator import attrgetter

import torch

# Megabytes of each layer's post-attention weights prefetched into L2 during its attention (0: off). Off until
# measured (bench/pdl_auto.py's l2pf settings; not yet run on a GPU).
L2_PREFETCH_MB = 0
PROGRAMS = 64  # extra programs of the RoPE + KV write kernel that issue the prefetches
PIECE = 65536  # bytes per bulk prefetch instruction (one per warp of a program, per segment and round)
MAX_SEGMENTS = 6  # contiguous tensors (or a prefix of the last one) per layer


def weights_after_attention(gm: torch.fx.GraphModule) -> dict[int, list[torch.Tensor]]:
    """Layer index -> the tensors the graph reads (get_attr arguments of its ops) after that layer's
    spanda::rope_and_cache and before the next one's, in the order the ops read them, each once."""
    table: dict[int, list[torch.Tensor]] = {}
    layer = None
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.spanda.rope_and_cache.default:
            layer = int(node.args[5])
            table[layer] = []
            continue
        if layer is None:
            continue
        for arg in node.args:
            if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
                t = attrgetter(arg.target)(gm)
                if isinstance(t, torch.Tensor) and not any(t is u for u in table[layer]):
                    table[layer].append(t)
    return table


def segments(tensors: list[torch.Tensor], budget_bytes: int) -> list[tuple[int, int]]:
    """(address, bytes) of the first ``budget_bytes`` of ``tensors`` in order (the last one possibly a prefix),
    at most MAX_SEGMENTS, each 16-byte aligned and a multiple of 16 bytes (the bulk prefetch's rule): a tensor
    that is not contiguous or not aligned is skipped."""
    out: list[tuple[int, int]] = []
    left = budget_bytes
    for t in tensors:
        if left < 16 or len(out) == MAX_SEGMENTS:
            break
        if not t.is_contiguous() or t.data_ptr() % 16:
            continue
        n = min(t.numel() * t.element_size(), left) // 16 * 16
        if n:
            out.append((t.data_ptr(), n))
            left -= n
    return out


def kernel_args(segs: list[tuple[int, int]]) -> dict[str, int]:
    """The prefetch kernels' arguments a0, n0, ... a5, n5 (address, bytes) of ``segs``, padded with empty ones."""
    segs = segs + [(0, 0)] * (MAX_SEGMENTS - len(segs))
    return {f"{c}{i}": v for i, seg in enumerate(segs) for c, v in zip("an", seg)}


def layer_segments(layer_idx: int, device: torch.device) -> list[tuple[int, int]]:
    """The segments to prefetch during layer ``layer_idx``'s attention in the current forward context (none when
    off, off sm_90+, or without a table)."""
    from runtime.forward_context import get_forward_context
    from runtime.ops.pdl import hopper

    if L2_PREFETCH_MB <= 0 or device.type != "cuda" or not hopper(device):
        return []
    table = getattr(get_forward_context().kv_caches, "l2_prefetch", None)
    if not table or layer_idx not in table:
        return []
    return segments(table[layer_idx], int(L2_PREFETCH_MB * 2**20))
