"""Activation quantization for the W8A8 GEMMs (runtime/ops/triton_w8a8.py): a Triton kernel per row of x (amax,
scale = amax / 448 (FP8 E4M3) or / 127 (INT8) rounded as torch on CUDA rounds it, clamp, round-to-nearest-even
cast; or a static per-tensor scale), and the row helpers (act_scale, act_codes, silu_mul_rounded) that the fused
norm / SiLU producers of runtime/ops/triton_elementwise.py share with it.
"""

from __future__ import annotations

import torch

from runtime.ops.pdl import launch_kwargs
from runtime.ops.quant_linear import FP8_MAX, INT8_MAX, SCALE_FLOOR
from runtime.ops.triton_gemm import _jit, pdl_enter, tl, triton

# activation quantization: a row of up to QUANT_BLOCK columns is read once and held in registers between its |x| max
# and its codes (17.7 against 19.3 us for [4096, 4096] on the H200); wider rows in two passes of QUANT_BLOCK (rows of
# 14,336 held whole by 16 warps took 84.7 us against 66.4 in two passes; bench/results/quant-rows-onepass-h200.json)
QUANT_BLOCK = 4096


@_jit
def silu_mul_rounded(g, u, dt: tl.constexpr):
    """silu(g) * u (float32 inputs holding model-dtype values) rounded as the model computes it: silu to ``dt``,
    then the product to ``dt`` (every silu_and_mul kernel gives these exact values)."""
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    return (act * u).to(dt)


@_jit
def act_scale(amax, in_scale_ptr, STATIC: tl.constexpr, QMAX: tl.constexpr, FLOOR: tl.constexpr):
    """Activation scale of rows whose |x| maxima are ``amax``: max(amax * (1 / QMAX), FLOOR), or the static scale
    (same shape). The reference's amax / QMAX runs on CUDA as amax * float32(1 / QMAX) (torch divides by a
    scalar through its reciprocal there). Shared by every kernel that quantizes activations."""
    if STATIC:
        s = tl.zeros_like(amax) + tl.load(in_scale_ptr).to(tl.float32)
    else:
        s = tl.maximum(amax * (1.0 / QMAX), FLOOR)
    return s


@_jit
def act_codes(v, s, INT8: tl.constexpr, QMAX: tl.constexpr):
    """clamp(v / s, -QMAX, QMAX) (an IEEE division, as the reference computes on CUDA; s broadcast against v),
    int8: rounded half to even; the caller casts to the codes' dtype."""
    q = tl.math.div_rn(v, tl.zeros_like(v) + s)
    q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
    if INT8:
        q = (q + 12582912.0) - 12582912.0  # 1.5 * 2^23: rounds |q| < 2^22 to an integer, ties to even
    return q


@_jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, in_scale_ptr, stride_xm, K: tl.constexpr, QMAX: tl.constexpr,
                       FLOOR: tl.constexpr, STATIC: tl.constexpr, INT8: tl.constexpr, BLOCK: tl.constexpr,
                       PDL: tl.constexpr = False):
    """Row r of x -> q[r, :] = act_codes(x, s), s[r] = act_scale(amax(|x[r]|)). A row of up to BLOCK columns
    is loaded once and kept in registers; wider rows are read twice, BLOCK columns at a time (|x| max, then
    the codes)."""
    if PDL:  # programmatic dependent launch (runtime/ops/pdl.py): nothing is touched before this
        pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    cols = tl.arange(0, BLOCK)
    if K <= BLOCK:
        mask = cols < K
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        s = act_scale(tl.max(tl.abs(x), axis=0), in_scale_ptr, STATIC, QMAX, FLOOR)
        tl.store(s_ptr + row, s)
        tl.store(q_ptr + row * K + cols, act_codes(x, s, INT8, QMAX).to(q_ptr.dtype.element_ty), mask=mask)
        return
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    if not STATIC:
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
    s = act_scale(tl.max(amax, axis=0), in_scale_ptr, STATIC, QMAX, FLOOR)
    tl.store(s_ptr + row, s)
    for k0 in range(0, K, BLOCK):
        mask = k0 + cols < K
        x = tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * K + k0 + cols, act_codes(x, s, INT8, QMAX).to(q_ptr.dtype.element_ty), mask=mask)


def quantize_rows(x: torch.Tensor, input_scale: torch.Tensor | None, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes [M, K] in ``dtype`` (float8_e4m3fn or int8), float32 scales [M, 1]), as
    quant_linear.quantize_activation_fp8 / _int8 (a static scale is repeated per row)."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=dtype, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        static = input_scale is not None
        block = min(QUANT_BLOCK, triton.next_power_of_2(k))
        _quant_rows_kernel[(m,)](
            x, q, s, input_scale.float() if static else s, x.stride(0), K=k,
            QMAX=INT8_MAX if dtype == torch.int8 else FP8_MAX, FLOOR=SCALE_FLOOR, STATIC=static,
            INT8=dtype == torch.int8, BLOCK=block, num_warps=max(1, min(8, block // 256)), **launch_kwargs(x.device))
    return q, s
