"""Round-to-nearest (RTN) group-wise integer quantization: the baseline the real methods must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compiler.quantize.packing import default_g_idx


def div_exact(t: torch.Tensor, value: float) -> torch.Tensor:
    """t / value, correctly rounded on every device. (CUDA divides a tensor by a Python number as a
    multiplication by the float32 reciprocal, the CPU divides: a build on the GPU would store other scales and
    codes than the same build on the CPU. A divisor on t's device is divided by on both.)"""
    return t / torch.tensor(value, dtype=t.dtype, device=t.device)


@dataclass(frozen=True)
class QuantizedLinear:
    """q [in, out] int32 codes in [0, 2^bits), z/s [groups, out], g_idx [in] (see packing.py)."""

    q: torch.Tensor
    z: torch.Tensor
    s: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool


SCALE_FLOOR = 2.0**-24  # smallest positive fp16 value: an all-zero group keeps a usable (non-zero) scale


def quantize_rtn(w: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = True,
                 scale_dtype: torch.dtype = torch.float16) -> QuantizedLinear:
    """w: [out, in] float -> codes per group of input channels. Symmetric (as GPTQ's symmetric mode): zero
    point 2^(bits-1), scale = 2 max|w| / (2^bits - 1); asymmetric: the group's [min, max] (widened to hold 0)
    spread over [0, 2^bits - 1]."""
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    if in_f % gs:
        raise ValueError(f"in_features {in_f} is not a multiple of group_size {gs}")
    maxq = 2**bits - 1
    wg = w.float().t().reshape(in_f // gs, gs, out_f)  # [groups, gs, out]
    if symmetric:
        amax = wg.abs().amax(1)
        s = div_exact(amax * 2, maxq).clamp_min(SCALE_FLOOR)
        z = torch.full_like(s, (maxq + 1) // 2)
    else:
        lo, hi = wg.amin(1).clamp(max=0), wg.amax(1).clamp(min=0)
        s = div_exact(hi - lo, maxq).clamp_min(SCALE_FLOOR)
        z = torch.round(-lo / s)
    s = s.to(scale_dtype).float()  # quantize with the scale as stored, so dequantization sees the same scale
    q = torch.clamp(torch.round(wg / s.unsqueeze(1)) + z.unsqueeze(1), 0, maxq)
    return QuantizedLinear(q.reshape(in_f, out_f).to(torch.int32), z.to(torch.int32), s.to(scale_dtype),
                           default_g_idx(in_f, group_size), bits, group_size, symmetric)
