"""CUDA fast paths (Triton) of the elementwise ops: rms_norm, fused_add_rms_norm, silu_and_mul, rotary_embedding,
and the first three with a W8A8 linear's activation quantization fused in (rms_norm_quant, ...: the codes and
per-row scales instead of the model-dtype output; no second pass over the row).

Imported by :mod:`runtime.ops` always; when Triton is installed it registers each ``*_cuda`` function below as
its op's CUDA kernel (the references and fakes stay in norm.py, activation.py, rotary.py); without Triton it
is inert. Every kernel loads its inputs once, computes in float32 and rounds where the reference rounds
(so bf16/fp16 results match the reference to the last bit except where a float32 sum order or an
approximate exp/rsqrt differs), and writes fresh contiguous outputs (the ops are functional).

Inputs may be row-strided (e.g. q/k slices of a fused QKV output: ``stride(0) > width``): kernels take the
row stride, so no copy is made unless the last dimension itself is strided. Launch sizes depend on shapes
only; nothing synchronizes with the host, so every launch is CUDA-graph capturable.

    rms_norm / fused_add      grid (ceil(T/ROWS),)   tile [ROWS, next_pow2(H)]  (ROWS > 1 only for narrow H)
    silu_and_mul              grid (T, ceil(I/BLOCK)) one BLOCK-wide chunk of one row
    silu_and_mul_quant        grid (T,)              one whole row (its amax needs every element); few rows:
                              grid (T, ceil(I/BLOCK)) twice: chunk products + maxima, then chunk codes
    rotary_embedding          grid (T,)              all q heads then all k heads of one token
"""

from __future__ import annotations

import torch

from runtime.ops.activation import silu_and_mul_ref
from runtime.ops.norm import fused_add_rms_norm_ref, rms_norm_ref
from runtime.ops.pdl import launch_kwargs
from runtime.ops.quant_linear import FP8_MAX, INT8_MAX, SCALE_FLOOR, quantize_activation_rows
from runtime.ops.rotary import rotary_embedding_ref
from runtime.ops.triton_act_quant import act_codes, act_scale, silu_mul_rounded
from runtime.ops.triton_gemm import pdl_enter

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the reference implementations serve every call
    triton = tl = None
AVAILABLE = triton is not None

FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_NORM_WIDTH = 32768  # one row lives in registers; wider rows (none in supported models) use the reference
SILU_BLOCK = 1024  # elements of the output row per program
# silu_and_mul_quant: up to this many rows, each row split over programs of this many elements (two launches).
# 14336 wide on an H200 (bench/act_quant.py; its figures include a 4.4 us timer floor): 7.5-8.0 against 10.1-10.3
# us for one program per row at 1-16 rows, 9.9 against 10.8 at 64; at 256 rows one program per row is as fast
SILU_QUANT_SPLIT_ROWS = 64
SILU_QUANT_CHUNK = 512


def _jit(fn=None, **kw):
    """triton.jit when Triton is installed; otherwise the plain function (never launched)."""
    if fn is None:
        return lambda f: _jit(f, **kw)
    return triton.jit(fn, **kw) if AVAILABLE else fn


# Sizes fixed by the model (widths, head counts, eps) are constexpr: fewer launch arguments to bind on the
# host, and one compiled variant per model shape. Row counts vary per step and are not specialized.
@_jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, q_ptr, qs_ptr, in_scale_ptr, n_rows, stride_x, stride_r,
                     width: tl.constexpr, eps: tl.constexpr, HAS_RES: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK: tl.constexpr, QUANT: tl.constexpr = False, STATIC: tl.constexpr = False,
                     INT8: tl.constexpr = False, QMAX: tl.constexpr = 448.0, FLOOR: tl.constexpr = 1e-12,
                     PDL: tl.constexpr = False):
    """Rows [pid*ROWS, +ROWS) of out = w * (s * rsqrt(mean(s^2) + eps)).to(dtype), s = x (+ r, rounded to
    dtype and also written to sum_ptr). x/r rows strided; out/sum contiguous [n_rows, width]. QUANT: out (in
    the model dtype, never stored) is quantized as _quant_codes does and written as codes to q_ptr, scales to
    qs_ptr [n_rows]."""
    if PDL:  # programmatic dependent launch (runtime/ops/pdl.py): nothing is touched before this
        pdl_enter(PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    cmask = cols < width
    rmask = rows < n_rows
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    dt = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(r_ptr + r64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(dt)
        tl.store(sum_ptr + r64 * width + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    var = tl.sum(x * x, axis=1) / width
    y = (x * tl.rsqrt(var + eps)[:, None]).to(dt).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    out = (w[None, :] * y).to(dt)
    if QUANT:
        _quant_codes(out.to(tl.float32), q_ptr + r64 * width + cols[None, :], mask, qs_ptr + rows, rmask,
                     in_scale_ptr, STATIC, INT8, QMAX, FLOOR)
    else:
        tl.store(out_ptr + r64 * width + cols[None, :], out, mask=mask)


@_jit
def _quant_codes(v, q_ptrs, mask, s_ptrs, rmask, in_scale_ptr, STATIC: tl.constexpr, INT8: tl.constexpr,
                 QMAX: tl.constexpr, FLOOR: tl.constexpr):
    """Rows of v [R, C] (float32 holding model-dtype values; masked entries 0) -> codes and per-row scales by
    triton_act_quant's act_scale / act_codes (the arithmetic of its quantize-rows kernel and of the references)."""
    if STATIC:  # only the rows' count matters
        amax = tl.zeros((v.shape[0],), dtype=tl.float32)
    else:
        amax = tl.max(tl.abs(v), axis=1)
    s = act_scale(amax, in_scale_ptr, STATIC, QMAX, FLOOR)
    tl.store(s_ptrs, s, mask=rmask)
    tl.store(q_ptrs, act_codes(v, s[:, None], INT8, QMAX).to(q_ptrs.dtype.element_ty), mask=mask)


@_jit
def _silu_mul(x_ptr, t, stride_x, inter: tl.constexpr, cols, mask, dt: tl.constexpr):
    """silu(gate) * up for columns ``cols`` of row t of x [T, 2 * inter], rounded as the model computes it:
    silu to ``dt``, then the product to ``dt`` (every silu_and_mul kernel gives these exact values)."""
    g = tl.load(x_ptr + t * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + t * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    return silu_mul_rounded(g, u, dt)


@_jit
def _silu_mul_quant_kernel(x_ptr, q_ptr, qs_ptr, in_scale_ptr, stride_x, inter: tl.constexpr, STATIC: tl.constexpr,
                           INT8: tl.constexpr, QMAX: tl.constexpr, FLOOR: tl.constexpr, BLOCK: tl.constexpr,
                           PDL: tl.constexpr = False):
    """Row t of silu(gate) * up (as _silu_and_mul_kernel rounds it), whole (BLOCK >= inter), quantized by
    _quant_codes."""
    if PDL:  # programmatic dependent launch (runtime/ops/pdl.py): nothing is touched before this
        pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < inter
    v = _silu_mul(x_ptr, t, stride_x, inter, cols, mask, x_ptr.dtype.element_ty).to(tl.float32)
    _quant_codes(v[None, :], (q_ptr + t * inter + cols)[None, :], mask[None, :], qs_ptr + t + tl.arange(0, 1),
                 tl.full((1,), True, tl.int1), in_scale_ptr, STATIC, INT8, QMAX, FLOOR)


@_jit
def _silu_mul_amax_kernel(x_ptr, h_ptr, amax_ptr, stride_x, inter: tl.constexpr, CHUNKS: tl.constexpr,
                          BLOCK: tl.constexpr, STATIC: tl.constexpr, PDL: tl.constexpr = False):
    """silu_and_mul_quant's first half for few rows: chunk c of row t of silu(gate) * up (as
    _silu_and_mul_kernel rounds it) to h [T, inter] and (dynamic) its |max| to amax [T, CHUNKS]."""
    if PDL:  # programmatic dependent launch (runtime/ops/pdl.py): nothing is touched before this
        pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = c * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    v = _silu_mul(x_ptr, t, stride_x, inter, cols, mask, h_ptr.dtype.element_ty)
    tl.store(h_ptr + t * inter + cols, v, mask=mask)
    if not STATIC:
        tl.store(amax_ptr + t * CHUNKS + c, tl.max(tl.abs(v.to(tl.float32)), axis=0))


@_jit
def _quant_chunks_kernel(h_ptr, amax_ptr, q_ptr, qs_ptr, in_scale_ptr, inter: tl.constexpr, CHUNKS: tl.constexpr,
                         C_PAD: tl.constexpr, BLOCK: tl.constexpr, STATIC: tl.constexpr, INT8: tl.constexpr,
                         QMAX: tl.constexpr, FLOOR: tl.constexpr, PDL: tl.constexpr = False):
    """silu_and_mul_quant's second half: chunk c of row t of h quantized with the row's scale (act_scale of the
    largest of its chunks' maxima: the row's |max|), so every chunk quantizes in parallel; chunk 0 writes it."""
    if PDL:
        pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    if STATIC:
        amax = tl.zeros((1,), dtype=tl.float32)
    else:
        ch = tl.arange(0, C_PAD)
        amax = tl.max(tl.load(amax_ptr + t * CHUNKS + ch[None, :], mask=ch[None, :] < CHUNKS, other=0.0), axis=1)
    s = act_scale(amax, in_scale_ptr, STATIC, QMAX, FLOOR)
    tl.store(qs_ptr + t + tl.arange(0, 1), s, mask=(tl.arange(0, 1) + c) == 0)
    cols = c * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    v = tl.load(h_ptr + t * inter + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(q_ptr + t * inter + cols, act_codes(v, s, INT8, QMAX).to(q_ptr.dtype.element_ty), mask=mask)


@_jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, inter: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """out[t, c] = (silu(x[t, c]).to(dtype) * x[t, inter + c]).to(dtype) for one BLOCK chunk of row t."""
    if PDL:  # programmatic dependent launch (runtime/ops/pdl.py): nothing is touched before this
        pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    tl.store(out_ptr + t * inter + cols, _silu_mul(x_ptr, t, stride_x, inter, cols, mask, out_ptr.dtype.element_ty),
             mask=mask)


@_jit
def _rotate_heads(src, dst, cos, sin, d, dmask, n_heads: tl.constexpr, head_dim: tl.constexpr,
                  half: tl.constexpr, BLOCK_H: tl.constexpr):
    """dst[h, :] = rotate-half rope of src[h, :] for the n_heads heads of one token (each product and sum
    rounded to dst's dtype, as the reference computes in that dtype)."""
    h = tl.arange(0, BLOCK_H)
    mask = (h < n_heads)[:, None] & dmask[None, :]
    off = h[:, None] * head_dim + d[None, :]
    dt = dst.dtype.element_ty
    x1 = tl.load(src + off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + off + half, mask=mask, other=0.0).to(tl.float32)
    c, s = cos[None, :], sin[None, :]
    o1 = (x1 * c).to(dt).to(tl.float32) - (x2 * s).to(dt).to(tl.float32)
    o2 = (x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)
    tl.store(dst + off, o1.to(dt), mask=mask)
    tl.store(dst + off + half, o2.to(dt), mask=mask)


@_jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cache_ptr, qo_ptr, ko_ptr, stride_q, stride_k, stride_c,
                   n_q: tl.constexpr, n_k: tl.constexpr, head_dim: tl.constexpr, half: tl.constexpr,
                   BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
    """Token t: cos/sin = cache[positions[t]] rounded to q's dtype, then every q head and every k head."""
    if PDL:  # programmatic dependent launch (runtime/ops/pdl.py): nothing is touched before this
        pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < half
    dt = qo_ptr.dtype.element_ty
    cos = tl.load(cache_ptr + pos * stride_c + d, mask=dmask, other=0.0).to(dt).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_c + half + d, mask=dmask, other=0.0).to(dt).to(tl.float32)
    _rotate_heads(q_ptr + t * stride_q, qo_ptr + t * (n_q * head_dim), cos, sin, d, dmask, n_q, head_dim, half,
                  BLOCK_HQ)
    _rotate_heads(k_ptr + t * stride_k, ko_ptr + t * (n_k * head_dim), cos, sin, d, dmask, n_k, head_dim, half,
                  BLOCK_HK)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., W] -> [N, W] with unit last stride; copies only when that cannot be a view."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _warps(tile: int) -> int:
    """About 16 elements per thread, 1..16 warps."""
    return min(16, max(1, tile // 512))


def _norm_launch(x, residual, weight, eps, num_warps, out=None, s=None, quant=None):
    """quant: None, or (codes [N, W], scales [N, 1], static scale or None): the output is quantized into them
    instead of written (``out`` is then unused)."""
    x2 = _rows(x)
    n, width = x2.shape
    if quant is None:
        out = torch.empty((n, width), dtype=x.dtype, device=x.device) if out is None else out
    else:
        out = quant[0]
    s = (torch.empty((n, width), dtype=x.dtype, device=x.device) if s is None else s) if residual is not None else out
    if n:
        r2 = _rows(residual) if residual is not None else x2
        block = triton.next_power_of_2(width)
        rows = max(1, min(16, 1024 // block))
        q, qs, static = quant if quant is not None else (out, out, None)
        _rms_norm_kernel[(triton.cdiv(n, rows),)](
            x2, r2, weight.contiguous(), out, s, q, qs, static if static is not None else qs, n, x2.stride(0),
            r2.stride(0), width=width, eps=float(eps), HAS_RES=residual is not None, ROWS=rows, BLOCK=block,
            QUANT=quant is not None, STATIC=static is not None, INT8=q.dtype == torch.int8,
            QMAX=INT8_MAX if q.dtype == torch.int8 else FP8_MAX, FLOOR=SCALE_FLOOR,
            # quantizing: twice the warps (16 at 4096 wide: 6.6 us against 6.9 with a 4.4 us floor, H200)
            num_warps=num_warps or _warps(rows * block * (2 if quant is not None else 1)), **launch_kwargs(x.device))
    return out.view(x.shape), s.view(x.shape)


def _norm_fast(x: torch.Tensor) -> bool:
    return x.dtype in FAST_DTYPES and x.dim() >= 1 and 0 < x.shape[-1] <= MAX_NORM_WIDTH


def rms_norm_cuda(x: torch.Tensor, weight: torch.Tensor, eps: float, num_warps: int | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., H] (rows may be strided), weight: [H] -> new contiguous [..., H] in x.dtype.
    ``out`` (contiguous, x's shape and dtype) receives the result instead of a new tensor (tests, benchmarks)."""
    if not _norm_fast(x):
        return rms_norm_ref(x, weight, eps)
    return _norm_launch(x, None, weight, eps, num_warps, out)[0]


def fused_add_rms_norm_cuda(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                            num_warps: int | None = None, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [..., H] -> (rms_norm(x + residual), x + residual), both new (or ``out``), in x.dtype."""
    if not _norm_fast(x) or residual.dtype != x.dtype or residual.shape != x.shape:
        return fused_add_rms_norm_ref(x, residual, weight, eps)
    return _norm_launch(x, residual, weight, eps, num_warps, *(out or (None, None)))


def silu_and_mul_cuda(x: torch.Tensor, block: int = SILU_BLOCK, num_warps: int = 4,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., 2I] (gate | up; rows may be strided) -> new (or ``out``) [..., I] = silu(gate) * up in x.dtype."""
    if x.dtype not in FAST_DTYPES or x.dim() < 1 or x.shape[-1] % 2:
        return silu_and_mul_ref(x)
    x2 = _rows(x)
    n, inter = x2.shape[0], x2.shape[1] // 2
    out = torch.empty((n, inter), dtype=x.dtype, device=x.device) if out is None else out
    if n and inter:
        block = min(block, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(n, triton.cdiv(inter, block))](x2, out, x2.stride(0), inter=inter, BLOCK=block,
                                                              num_warps=num_warps, **launch_kwargs(x.device))
    return out.view(*x.shape[:-1], inter)


def _quant_out(x2: torch.Tensor, width: int, input_scale: torch.Tensor | None, int8: bool):
    n = x2.shape[0]
    return (torch.empty((n, width), dtype=torch.int8 if int8 else torch.float8_e4m3fn, device=x2.device),
            torch.empty((n, 1), dtype=torch.float32, device=x2.device),
            input_scale.float().reshape(1) if input_scale is not None else None)


def rms_norm_quant_cuda(x: torch.Tensor, weight: torch.Tensor, eps: float, input_scale: torch.Tensor | None,
                        int8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """rms_norm(x) quantized for a W8A8 linear (quant_linear.rms_norm_quant) in one kernel: (codes, scales)."""
    if not _norm_fast(x) or x.dim() != 2:
        return quantize_activation_rows(rms_norm_ref(x, weight, eps), input_scale, int8)
    quant = _quant_out(x, x.shape[1], input_scale, int8)
    _norm_launch(x, None, weight, eps, None, quant=quant)
    return quant[0], quant[1]


def fused_add_rms_norm_quant_cuda(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                                  input_scale: torch.Tensor | None, int8: bool
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scales, x + residual) in one kernel (quant_linear.fused_add_rms_norm_quant)."""
    if not _norm_fast(x) or x.dim() != 2 or residual.dtype != x.dtype or residual.shape != x.shape:
        normed, total = fused_add_rms_norm_ref(x, residual, weight, eps)
        return *quantize_activation_rows(normed, input_scale, int8), total
    quant = _quant_out(x, x.shape[1], input_scale, int8)
    _, total = _norm_launch(x, residual, weight, eps, None, quant=quant)
    return quant[0], quant[1], total


def silu_and_mul_quant_cuda(x: torch.Tensor, input_scale: torch.Tensor | None, int8: bool,
                            num_warps: int | None = None, split_rows: int | None = None,
                            chunk: int = SILU_QUANT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """silu_and_mul(x) quantized (quant_linear.silu_and_mul_quant). Up to ``split_rows`` rows
    (SILU_QUANT_SPLIT_ROWS): two launches, each over (row, ``chunk``-wide chunk): the products and their chunk
    maxima, then the codes; more rows: one program per row holds the whole row. The same codes and scales."""
    if x.dtype not in FAST_DTYPES or x.dim() != 2 or x.shape[-1] % 2 or x.shape[-1] // 2 > MAX_NORM_WIDTH:
        return quantize_activation_rows(silu_and_mul_ref(x), input_scale, int8)
    x2 = _rows(x)
    n, inter = x2.shape[0], x2.shape[1] // 2
    q, qs, static = _quant_out(x2, inter, input_scale, int8)
    split_rows = SILU_QUANT_SPLIT_ROWS if split_rows is None else split_rows
    if n and inter and n <= split_rows:
        block = min(chunk, triton.next_power_of_2(inter))
        chunks = triton.cdiv(inter, block)
        h = torch.empty((n, inter), dtype=x.dtype, device=x.device)
        amax = torch.empty((n, chunks), dtype=torch.float32, device=x.device)
        consts = dict(inter=inter, CHUNKS=chunks, BLOCK=block, STATIC=static is not None)
        _silu_mul_amax_kernel[(n, chunks)](x2, h, amax, x2.stride(0), num_warps=num_warps or _warps(block),
                                           **consts, **launch_kwargs(x2.device))
        _quant_chunks_kernel[(n, chunks)](h, amax, q, qs, static if static is not None else qs,
                                          C_PAD=triton.next_power_of_2(chunks), INT8=int8,
                                          QMAX=INT8_MAX if int8 else FP8_MAX, FLOOR=SCALE_FLOOR,
                                          num_warps=num_warps or _warps(block), **consts, **launch_kwargs(x2.device))
    elif n and inter:
        block = triton.next_power_of_2(inter)
        _silu_mul_quant_kernel[(n,)](x2, q, qs, static if static is not None else qs, x2.stride(0), inter=inter,
                                     STATIC=static is not None, INT8=int8, QMAX=INT8_MAX if int8 else FP8_MAX,
                                     FLOOR=SCALE_FLOOR, BLOCK=block, num_warps=num_warps or _warps(block),
                                     **launch_kwargs(x2.device))
    return q, qs


def rotary_embedding_cuda(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                          head_dim: int, num_warps: int | None = None,
                          out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [T] int; q: [T, Hq*D], k: [T, Hkv*D] (rows may be strided); cos_sin_cache: [P, D] float32
    -> new contiguous (or ``out``) (q, k) rotated, in q's dtype."""
    if (q.dtype not in FAST_DTYPES or k.dtype != q.dtype or q.dim() != 2 or k.dim() != 2 or head_dim % 2
            or q.shape[1] % head_dim or k.shape[1] % head_dim):
        return rotary_embedding_ref(positions, q, k, cos_sin_cache, head_dim)
    q2, k2 = _rows(q), _rows(k)
    cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    if out is None:
        out = (torch.empty(q.shape, dtype=q.dtype, device=q.device),
               torch.empty(k.shape, dtype=k.dtype, device=k.device))
    qo, ko = out
    t = q.shape[0]
    if t:
        n_q, n_k, half = q.shape[1] // head_dim, k.shape[1] // head_dim, head_dim // 2
        bq, bk, bd = (triton.next_power_of_2(v) for v in (n_q, n_k, half))
        _rotary_kernel[(t,)](positions.contiguous(), q2, k2, cache, qo, ko, q2.stride(0), k2.stride(0),
                             cache.stride(0), n_q=n_q, n_k=n_k, head_dim=head_dim, half=half, BLOCK_HQ=bq,
                             BLOCK_HK=bk, BLOCK_D=bd,
                             num_warps=num_warps or min(8, _warps(2 * bq * bd)), **launch_kwargs(q.device))
    return qo, ko


def _rms_norm_op(x, weight, eps):
    return rms_norm_cuda(x, weight, eps)


def _fused_add_rms_norm_op(x, residual, weight, eps):
    return fused_add_rms_norm_cuda(x, residual, weight, eps)


def _silu_and_mul_op(x):
    return silu_and_mul_cuda(x)


def _rms_norm_quant_op(x, weight, eps, input_scale, int8):
    return rms_norm_quant_cuda(x, weight, eps, input_scale, int8)


def _fused_add_rms_norm_quant_op(x, residual, weight, eps, input_scale, int8):
    return fused_add_rms_norm_quant_cuda(x, residual, weight, eps, input_scale, int8)


def _silu_and_mul_quant_op(x, input_scale, int8):
    return silu_and_mul_quant_cuda(x, input_scale, int8)


def _rotary_embedding_op(positions, q, k, cos_sin_cache, head_dim):
    return rotary_embedding_cuda(positions, q, k, cos_sin_cache, head_dim)


if AVAILABLE:
    torch.library.register_kernel("spanda::rms_norm", "cuda", _rms_norm_op)
    torch.library.register_kernel("spanda::fused_add_rms_norm", "cuda", _fused_add_rms_norm_op)
    torch.library.register_kernel("spanda::silu_and_mul", "cuda", _silu_and_mul_op)
    torch.library.register_kernel("spanda::rotary_embedding", "cuda", _rotary_embedding_op)
    torch.library.register_kernel("spanda::rms_norm_quant", "cuda", _rms_norm_quant_op)
    torch.library.register_kernel("spanda::fused_add_rms_norm_quant", "cuda", _fused_add_rms_norm_quant_op)
    torch.library.register_kernel("spanda::silu_and_mul_quant", "cuda", _silu_and_mul_quant_op)
