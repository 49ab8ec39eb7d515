"""CUDA fast paths (Triton) of the elementwise ops: rms_norm, fused_add_rms_norm, silu_and_mul, rotary_embedding.

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
    rotary_embedding          grid (T,)              all q heads then all k heads of one token
"""

from __future__ import annotations

import torch

from runtime.ops.activation import silu_and_mul_ref
from runtime.ops.norm import fused_add_rms_norm_ref, rms_norm_ref
from runtime.ops.rotary import rotary_embedding_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the reference implementations serve every call
    triton = tl = None
AVAILABLE = triton is not None

FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_NORM_WIDTH = 32768  # one row lives in registers; wider rows (none in supported models) use the reference
SILU_BLOCK = 1024  # elements of the output row per program


def _jit(fn=None, **kw):
    """triton.jit when Triton is installed; otherwise the plain function (never launched)."""
    if fn is None:
        return lambda f: _jit(f, **kw)
    return triton.jit(fn, **kw) if AVAILABLE else fn


# Sizes fixed by the model (widths, head counts, eps) are constexpr: fewer launch arguments to bind on the
# host, and one compiled variant per model shape. Row counts vary per step and are not specialized.
@_jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, n_rows, stride_x, stride_r, width: tl.constexpr,
                     eps: tl.constexpr, HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Rows [pid*ROWS, +ROWS) of out = w * (s * rsqrt(mean(s^2) + eps)).to(dtype), s = x (+ r, rounded to
    dtype and also written to sum_ptr). x/r rows strided; out/sum contiguous [n_rows, width]."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    cmask = cols < width
    mask = (rows < n_rows)[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    dt = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(r_ptr + r64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(dt)
        tl.store(sum_ptr + r64 * width + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    var = tl.sum(x * x, axis=1) / width
    y = (x * tl.rsqrt(var + eps)[:, None]).to(dt).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + r64 * width + cols[None, :], (w[None, :] * y).to(dt), mask=mask)


@_jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, inter: tl.constexpr, BLOCK: tl.constexpr):
    """out[t, c] = (silu(x[t, c]).to(dtype) * x[t, inter + c]).to(dtype) for one BLOCK chunk of row t."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    dt = out_ptr.dtype.element_ty
    g = tl.load(x_ptr + t * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + t * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(out_ptr + t * inter + cols, (act * u).to(dt), mask=mask)


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
                   BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Token t: cos/sin = cache[positions[t]] rounded to q's dtype, then every q head and every k head."""
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


def _norm_launch(x, residual, weight, eps, num_warps, out=None, s=None):
    x2 = _rows(x)
    n, width = x2.shape
    out = torch.empty((n, width), dtype=x.dtype, device=x.device) if out is None else out
    s = (torch.empty_like(out) if s is None else s) if residual is not None else out
    if n:
        r2 = _rows(residual) if residual is not None else x2
        block = triton.next_power_of_2(width)
        rows = max(1, min(16, 1024 // block))
        _rms_norm_kernel[(triton.cdiv(n, rows),)](
            x2, r2, weight.contiguous(), out, s, n, x2.stride(0), r2.stride(0), width=width, eps=float(eps),
            HAS_RES=residual is not None, ROWS=rows, BLOCK=block, num_warps=num_warps or _warps(rows * block))
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
                                                              num_warps=num_warps)
    return out.view(*x.shape[:-1], inter)


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
                             num_warps=num_warps or min(8, _warps(2 * bq * bd)))
    return qo, ko


def _rms_norm_op(x, weight, eps):
    return rms_norm_cuda(x, weight, eps)


def _fused_add_rms_norm_op(x, residual, weight, eps):
    return fused_add_rms_norm_cuda(x, residual, weight, eps)


def _silu_and_mul_op(x):
    return silu_and_mul_cuda(x)


def _rotary_embedding_op(positions, q, k, cos_sin_cache, head_dim):
    return rotary_embedding_cuda(positions, q, k, cos_sin_cache, head_dim)


if AVAILABLE:
    torch.library.register_kernel("spanda::rms_norm", "cuda", _rms_norm_op)
    torch.library.register_kernel("spanda::fused_add_rms_norm", "cuda", _fused_add_rms_norm_op)
    torch.library.register_kernel("spanda::silu_and_mul", "cuda", _silu_and_mul_op)
    torch.library.register_kernel("spanda::rotary_embedding", "cuda", _rotary_embedding_op)
