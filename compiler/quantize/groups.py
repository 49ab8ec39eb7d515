"""Group-wise integer quantization grids, as GPTQ and AWQ use them: a scale and zero point per group of input
channels (symmetric, or the group's range), the codes, fake quantization, quantize_groups (the emitted
QuantizedLinear of a weight on a given grid) and its dequantization.
"""

from __future__ import annotations

import torch

from compiler.quantize.rtn import QuantizedLinear, div_exact
from compiler.quantize.spec import CalibrationError


def round_scale(s: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The scale as the artifact stores it: fp16 (as rtn.py and GPTQ checkpoints), then the model dtype the
    internal layout stores scales in (bf16 rounds further); never 0 (an all-zero group)."""
    r = s.half().float()
    if dtype is not None and dtype not in (torch.float16, torch.float32, torch.float64):
        r = r.to(dtype).float()
    return torch.where(r > 0, r, torch.full_like(r, 2.0**-24))


def group_params(w: torch.Tensor, bits: int, sym: bool, dtype: torch.dtype | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``w [rows, cols]``: (scale, zero) as rtn.quantize_rtn computes them (symmetric: zero
    2^(bits-1), scale 2 max|w| / maxq; asymmetric: [min, max] widened to hold 0), scale rounded as stored."""
    maxq = 2**bits - 1
    if sym:
        s = div_exact(w.abs().amax(1).clamp_min(1e-8) * 2, maxq)
        z = torch.full_like(s, (maxq + 1) // 2)
    else:
        lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
        s = div_exact(hi - lo, maxq).clamp_min(1e-8)
        z = torch.round(-lo / s)
    return round_scale(s, dtype), z


def _codes(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / s) + z, 0, maxq)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool, dtype: torch.dtype | None = None
                  ) -> torch.Tensor:
    """Group-wise RTN quantize-dequantize of ``w [out, in]`` (groups along ``in``), float32."""
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    wg = w.float().reshape(out_f * (in_f // gs), gs)
    s, z = group_params(wg, bits, sym, dtype)
    s, z = s.unsqueeze(1), z.unsqueeze(1)
    return ((_codes(wg, s, z, 2**bits - 1) - z) * s).reshape(out_f, in_f)


def quantize_groups(w: torch.Tensor, bits: int, group_size: int, sym: bool, dtype: torch.dtype | None = None
                    ) -> QuantizedLinear:
    """RTN of ``w [out, in]`` into a QuantizedLinear (identical to rtn.quantize_rtn when dtype is None)."""
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    if in_f % gs:
        raise CalibrationError(f"in_features {in_f} is not a multiple of group_size {gs}")
    wg = w.float().reshape(out_f, in_f // gs, gs)
    s, z = group_params(wg.reshape(-1, gs), bits, sym, dtype)
    s, z = s.reshape(out_f, -1), z.reshape(out_f, -1)
    q = _codes(wg, s.unsqueeze(-1), z.unsqueeze(-1), 2**bits - 1).reshape(out_f, in_f)
    return QuantizedLinear(q.t().contiguous().to(torch.int32).cpu(), z.t().contiguous().to(torch.int32).cpu(),
                           s.t().contiguous().half().cpu(), torch.arange(in_f, dtype=torch.int32) // gs,
                           bits, group_size, sym)


def dequantize(ql: QuantizedLinear) -> torch.Tensor:
    """QuantizedLinear -> float32 ``[out, in]`` in the original input-channel order."""
    g = ql.g_idx.long()
    return ((ql.q.float() - ql.z.float()[g]) * ql.s.float()[g]).t().contiguous()
