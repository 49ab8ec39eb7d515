"""Paged attention over the runtime's KV cache (prefill, chunked prefill with cached prefix, and decode).

``spanda::paged_attention(q, k, v, layer_idx, ...)`` first writes this step's keys and values into the
layer's KV cache at ``slot_mapping``, then attends each query token to its sequence's context (cached
prefix + this step's tokens) causally, with grouped-query heads and an optional sliding window.
The cache and the step metadata come from :mod:`runtime.forward_context`, never from graph inputs.

Reference: a per-sequence loop over gathered blocks with PyTorch SDPA (CPU serving and CI use it).

Quantized KV cache (``float8_e4m3fn`` or ``int8``; recipe ``target.kv_dtype`` fp8_e4m3 / int8): every layer has
a key scale and a value scale (float32, calibrated at build time, in the manifest's ``limits.kv_scales``; the
ops read them from the forward context). Writing quantizes ``x / scale`` (fp8: saturating to +-448, rounded
to nearest even; int8: rounded half to even, clamped to +-127); reading dequantizes ``x.float() * scale``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.forward_context import AttentionMetadata, get_forward_context

KV_QUANT_MAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
"""Quantized KV cache dtypes and the largest magnitude each stores (a layer's scale = amax / this)."""
KV_SCALE_FLOOR = 1e-8  # an all-zero layer gets this scale instead of 0 (no 0/0)
_KV_DTYPE_NAMES = {"fp8_e4m3": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn, "int8": torch.int8,
                   "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kv_cache_dtype(name: str) -> torch.dtype:
    """The torch dtype of a manifest's ``limits.kv_dtype`` (recipe names: fp8_e4m3, int8, or a float dtype)."""
    try:
        return _KV_DTYPE_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown KV cache dtype {name!r}; known: {', '.join(_KV_DTYPE_NAMES)}") from None


def quantize_kv(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """x in the cache's dtype: quantized (x / scale, saturated, rounded half to even) for fp8/int8 caches,
    else a plain cast (the scale is ignored)."""
    if dtype == torch.float8_e4m3fn:
        return (x.float() / scale).clamp(-448.0, 448.0).to(dtype)
    if dtype == torch.int8:
        return torch.round(x.float() / scale).clamp(-127.0, 127.0).to(dtype)
    return x.to(dtype)


def dequantize_kv(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Cache entries -> ``dtype``: ``x.float() * scale`` for fp8/int8 caches, else a plain cast."""
    if x.dtype in KV_QUANT_MAX:
        return (x.float() * scale).to(dtype)
    return x.to(dtype)


def write_kv_ref(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
                 k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """kv_cache: [2, num_blocks, page, Hkv, D]; k, v: [T, Hkv, D]; slot_mapping: [T] int64. In place.
    k_scale/v_scale: the layer's scales (used by fp8/int8 caches only)."""
    flat = _bytes(kv_cache).view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])
    flat[0].index_copy_(0, slot_mapping, _bytes(quantize_kv(k, kv_cache.dtype, k_scale)))
    flat[1].index_copy_(0, slot_mapping, _bytes(quantize_kv(v, kv_cache.dtype, v_scale)))


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """fp8 tensors as their bytes (index_copy_ has no float8 kernel); others unchanged."""
    return x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x


def attend_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """q: [T, Hq, D] -> [T, Hq, D]. Reads keys/values of each sequence from the cache through its block table
    (dequantized with the layer's k_scale/v_scale when the cache is fp8/int8)."""
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
        ki = dequantize_kv(keys.transpose(0, 1), q.dtype, k_scale)  # [Hkv, ctx, D]
        vi = dequantize_kv(vals.transpose(0, 1), q.dtype, v_scale)
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
    ks, vs = ctx.kv_scale(layer_idx)
    write_kv_ref(kv_cache, k.view(t, num_kv_heads, head_dim), v.view(t, num_kv_heads, head_dim),
                 ctx.attn.slot_mapping, ks, vs)
    out = attend_ref(q.view(t, num_heads, head_dim), kv_cache, ctx.attn, scale, sliding_window, ks, vs)
    return out.view(t, num_heads * head_dim)


@paged_attention.register_fake
def _paged_attention_fake(q, k, v, layer_idx, num_heads, num_kv_heads, head_dim, scale, sliding_window):
    return torch.empty_like(q)
