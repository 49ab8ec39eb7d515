"""Paged attention over the runtime's KV cache (prefill, chunked prefill with cached prefix, and decode).

``spanda::paged_attention(q, k, v, layer_idx, ...)`` first writes this step's keys and values into the
layer's KV cache at ``slot_mapping``, then attends each query token to its sequence's context (cached
prefix + this step's tokens) causally, with grouped-query heads and an optional sliding window.
The cache and the step metadata come from :mod:`runtime.forward_context`, never from graph inputs.

Reference: a per-sequence loop over gathered blocks with PyTorch SDPA (CPU serving and CI use it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.forward_context import AttentionMetadata, get_forward_context


def write_kv_ref(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """kv_cache: [2, num_blocks, page, Hkv, D]; k, v: [T, Hkv, D]; slot_mapping: [T] int64. In place."""
    flat = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def attend_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """q: [T, Hq, D] -> [T, Hq, D]. Reads keys/values of each sequence from the cache through its block table."""
    page = kv_cache.shape[2]
    out = torch.empty_like(q)
    qsl, lens = meta.query_start_loc_host, meta.seq_lens_host
    for i in range(meta.num_seqs):
        start, end, ctx = qsl[i], qsl[i + 1], lens[i]
        if end == start:
            continue
        nblocks = (ctx + page - 1) // page
        blocks = meta.block_tables[i, :nblocks].long()
        keys = kv_cache[0, blocks].reshape(-1, *kv_cache.shape[-2:])[:ctx]
        vals = kv_cache[1, blocks].reshape(-1, *kv_cache.shape[-2:])[:ctx]
        n_q = end - start
        q_pos = torch.arange(ctx - n_q, ctx, device=q.device).unsqueeze(1)
        k_pos = torch.arange(ctx, device=q.device).unsqueeze(0)
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        qi = q[start:end].transpose(0, 1)  # [Hq, n_q, D]
        ki = keys.transpose(0, 1).to(q.dtype)  # [Hkv, ctx, D]
        vi = vals.transpose(0, 1).to(q.dtype)
        groups = qi.shape[0] // ki.shape[0]
        if groups > 1:
            ki = ki.repeat_interleave(groups, dim=0)
            vi = vi.repeat_interleave(groups, dim=0)
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
        out[start:end] = o.transpose(0, 1)
    return out


@torch.library.custom_op("spanda::paged_attention", mutates_args=())
def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_idx: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """q: [T, Hq*D], k/v: [T, Hkv*D] -> [T, Hq*D]. Side effect: writes k/v into the layer's KV cache."""
    ctx = get_forward_context()
    kv_cache = ctx.kv_caches[layer_idx]
    t = q.shape[0]
    write_kv_ref(kv_cache, k.view(t, num_kv_heads, head_dim), v.view(t, num_kv_heads, head_dim),
                 ctx.attn.slot_mapping)
    out = attend_ref(q.view(t, num_heads, head_dim), kv_cache, ctx.attn, scale, sliding_window)
    return out.view(t, num_heads * head_dim)


@paged_attention.register_fake
def _paged_attention_fake(q, k, v, layer_idx, num_heads, num_kv_heads, head_dim, scale, sliding_window):
    return torch.empty_like(q)
