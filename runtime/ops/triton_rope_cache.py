"""CUDA (Triton) fast paths of spanda::rope_and_cache and spanda::paged_attention_cached.

One program per token: cos/sin of its position (rounded to the activation dtype, as the reference),
every q head rotated to the output, every k head rotated straight into the cache row
``slot_mapping[t]`` and v copied beside it (slot < 0: a padding token, nothing written). An fp8/int8 cache
gets the rotated keys (rounded to the activation dtype, as the reference) and the values quantized with the
layer's scales (``triton_attention._quantize_kv``). Launched with PDL the kernel waits for the previous
one first; with ``EARLY_LOADS`` after reading the position, slot and cos / sin (the step's inputs and a table).
"""

from __future__ import annotations

import torch

from runtime.forward_context import get_forward_context
from runtime.ops.attention import attend_ref
from runtime.ops.pdl import launch_kwargs
from runtime.ops.rope_cache import rope_and_cache_ref
from runtime.ops.triton_elementwise import AVAILABLE, FAST_DTYPES, _jit, _rows, _warps

if AVAILABLE:
    import triton
    import triton.language as tl

    from runtime.ops.triton_attention import KV_QUANT_DTYPES, _fast_ok, _quantize_kv, attend, kv_quant_mode
    from runtime.ops.triton_elementwise import _rotate_heads
    from runtime.ops.triton_gemm import pdl_enter
else:  # CPU-only install: nothing here is launched
    tl = None


# Under PDL, the token's position, slot and cos / sin read before the wait for the previous kernel (the qkv
# projection, whose output is all this kernel waits for). Off: no faster on the H100 (triton_decode.EARLY_LOADS).
EARLY_LOADS = False


@_jit
def _rotate_heads_quant(src, dst, cos, sin, d, dmask, n_heads: tl.constexpr, head_dim: tl.constexpr,
                        half: tl.constexpr, BLOCK_H: tl.constexpr, scale, QUANT: tl.constexpr):
    """As triton_elementwise._rotate_heads (products and sums rounded to src's dtype), the result then
    quantized into dst (an fp8/int8 cache row) with ``scale``."""
    h = tl.arange(0, BLOCK_H)
    mask = (h < n_heads)[:, None] & dmask[None, :]
    off = h[:, None] * head_dim + d[None, :]
    dt = src.dtype.element_ty
    x1 = tl.load(src + off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + off + half, mask=mask, other=0.0).to(tl.float32)
    c, s = cos[None, :], sin[None, :]
    o1 = ((x1 * c).to(dt).to(tl.float32) - (x2 * s).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)).to(dt)
    qt = dst.dtype.element_ty
    tl.store(dst + off, _quantize_kv(o1, scale, QUANT, qt), mask=mask)
    tl.store(dst + off + half, _quantize_kv(o2, scale, QUANT, qt), mask=mask)


@_jit
def _rope_cache_kernel(pos_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, cs_ptr, qo_ptr, kc_ptr, vc_ptr,
                       stride_q, stride_k, stride_v, stride_c, k_scale, v_scale,
                       n_q: tl.constexpr, n_k: tl.constexpr, head_dim: tl.constexpr, half: tl.constexpr,
                       BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_KV: tl.constexpr, QUANT: tl.constexpr, PDL: tl.constexpr = False,
                       EARLY: tl.constexpr = False):
    if PDL and not EARLY:  # programmatic dependent launch (runtime/ops/pdl.py): nothing is touched before this
        pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < half
    dt = qo_ptr.dtype.element_ty
    cos = tl.load(cs_ptr + pos * stride_c + d, mask=dmask, other=0.0).to(dt).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_c + half + d, mask=dmask, other=0.0).to(dt).to(tl.float32)
    if PDL and EARLY:  # the step's inputs and the table read, now q, k, v of the previous kernel
        pdl_enter(PDL)
    _rotate_heads(q_ptr + t * stride_q, qo_ptr + t * (n_q * head_dim), cos, sin, d, dmask, n_q, head_dim, half,
                  BLOCK_HQ)
    if slot >= 0:
        row = slot * (n_k * head_dim)
        if QUANT == 0:
            _rotate_heads(k_ptr + t * stride_k, kc_ptr + row, cos, sin, d, dmask, n_k, head_dim, half, BLOCK_HK)
        else:
            _rotate_heads_quant(k_ptr + t * stride_k, kc_ptr + row, cos, sin, d, dmask, n_k, head_dim, half,
                                BLOCK_HK, k_scale, QUANT)
        offs = tl.arange(0, BLOCK_KV)
        m = offs < n_k * head_dim
        vals = tl.load(v_ptr + t * stride_v + offs, mask=m)
        tl.store(vc_ptr + row + offs, _quantize_kv(vals, v_scale, QUANT, vc_ptr.dtype.element_ty), mask=m)


def rope_and_cache_cuda(positions, q, k, v, cos_sin_cache, layer_idx: int, head_dim: int, num_kv_heads: int):
    ctx = get_forward_context()
    kv_cache = ctx.kv_caches[layer_idx]
    slots = ctx.attn.slot_mapping
    ks, vs = ctx.kv_scale(layer_idx)
    if (q.dtype not in FAST_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype
            or (kv_cache.dtype != q.dtype and kv_cache.dtype not in KV_QUANT_DTYPES)
            or not kv_cache.is_contiguous() or head_dim % 2):
        return rope_and_cache_ref(positions, q, k, v, cos_sin_cache, kv_cache, slots, head_dim, num_kv_heads,
                                  ks, vs)
    q2, k2, v2 = _rows(q), _rows(k), _rows(v)
    cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    t = q.shape[0]
    if t:
        n_q, half = q.shape[1] // head_dim, head_dim // 2
        bq, bk, bd = (triton.next_power_of_2(x) for x in (n_q, num_kv_heads, half))
        _rope_cache_kernel[(t,)](
            positions.contiguous(), slots, q2, k2, v2, cache, qo, kv_cache[0], kv_cache[1],
            q2.stride(0), k2.stride(0), v2.stride(0), cache.stride(0), float(ks), float(vs),
            n_q=n_q, n_k=num_kv_heads, head_dim=head_dim, half=half, BLOCK_HQ=bq, BLOCK_HK=bk, BLOCK_D=bd,
            BLOCK_KV=triton.next_power_of_2(num_kv_heads * head_dim), QUANT=kv_quant_mode(kv_cache.dtype),
            EARLY=EARLY_LOADS, num_warps=min(8, _warps(2 * bq * bd)), **launch_kwargs(q.device))
    return qo


def paged_attention_cached_cuda(q, layer_idx, num_heads, num_kv_heads, head_dim, scale, sliding_window):
    ctx = get_forward_context()
    kv_cache = ctx.kv_caches[layer_idx]
    t = q.shape[0]
    q3 = q.view(t, num_heads, head_dim)
    ks, vs = ctx.kv_scale(layer_idx)
    if not _fast_ok(q, kv_cache, head_dim):
        return attend_ref(q3, kv_cache, ctx.attn, scale, sliding_window, ks, vs).view(t, num_heads * head_dim)
    out = q.new_empty(t, num_heads, head_dim)
    attend(q3, kv_cache, ctx.attn, scale, sliding_window, out, k_scale=ks, v_scale=vs)
    return out.view(t, num_heads * head_dim)


if AVAILABLE:
    torch.library.register_kernel("spanda::rope_and_cache", "cuda", rope_and_cache_cuda)
    torch.library.register_kernel("spanda::paged_attention_cached", "cuda", paged_attention_cached_cuda)
