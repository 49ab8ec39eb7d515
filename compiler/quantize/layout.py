"""Conversion of quantized weights into the internal layouts the runtime's ops read (runtime/ops/quant_linear.py).

Every quantizer (RTN, GPTQ, AWQ, FP8, INT8, and the readers of pre-quantized checkpoints) ends here, so
the artifact's layout has one definition. Each function returns the op's tensors by name.
"""

from __future__ import annotations

import torch

from compiler.quantize.packing import _pack
from compiler.quantize.rtn import QuantizedLinear, div_exact, quantize_rtn
from runtime.ops.quant_linear import FP8_MAX, INT8_MAX

WNA16_KEYS = ("qweight", "scales", "zeros", "perm")
FP8_KEYS = ("weight", "weight_scale", "input_scale")
INT8_KEYS = ("weight", "weight_scale", "input_scale")


def wna16_tensors(ql: QuantizedLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """QuantizedLinear (codes [K, N], zeros/scales [G, N], g_idx [K]) -> {qweight, scales, zeros[, perm]}.

    With act-order (g_idx not the identity grouping) the rows are stored sorted by group, and ``perm`` holds
    the input channel of each stored row; each group must then hold exactly group_size rows."""
    q, g_idx = ql.q, ql.g_idx.long()
    k = q.shape[0]
    gs = k if ql.group_size == -1 else ql.group_size
    tensors: dict[str, torch.Tensor] = {}
    if not torch.equal(g_idx, torch.arange(k) // gs):
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], torch.arange(k) // gs):
            raise ValueError("act-order g_idx must put exactly group_size input channels in each group")
        q = q[perm]
        tensors["perm"] = perm.to(torch.int32)
    tensors["qweight"] = _pack(q, ql.bits, dim=0)
    tensors["scales"] = ql.s.to(dtype).contiguous()
    tensors["zeros"] = ql.z.to(torch.uint8).contiguous()
    return tensors


def rtn_tensors(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, dtype: torch.dtype
                ) -> dict[str, torch.Tensor]:
    """RTN of w [N, K] in the op's layout, ROW_CHUNK output channels at a time (each channel's groups are its
    own: the chunks' columns are concatenated), so the float32 temporaries stay a chunk's size."""
    parts = [wna16_tensors(quantize_rtn(w[i:i + ROW_CHUNK], bits, group_size, symmetric, scale_dtype=dtype), dtype)
             for i in range(0, w.shape[0], ROW_CHUNK)]
    if len(parts) == 1:
        return parts[0]
    return {k: torch.cat([p[k] for p in parts], dim=1).contiguous() for k in parts[0]}


ROW_CHUNK = 2048  # rows converted to float32 at a time: a 70B FFN weight never exists in float32 whole


def _row_amax(w: torch.Tensor) -> torch.Tensor:
    return torch.cat([w[i:i + ROW_CHUNK].float().abs().amax(1) for i in range(0, w.shape[0], ROW_CHUNK)])


def _rows(w: torch.Tensor, scale: torch.Tensor, convert) -> torch.Tensor:
    """convert(w_chunk_float32 / scale_chunk) chunk by chunk into one contiguous tensor."""
    s = scale.reshape(-1, 1).expand(w.shape[0], 1)
    return torch.cat([convert(w[i:i + ROW_CHUNK].float() / s[i:i + ROW_CHUNK])
                      for i in range(0, w.shape[0], ROW_CHUNK)])


def fp8_weight(w: torch.Tensor, per_channel: bool = True) -> dict[str, torch.Tensor]:
    """w [N, K] (any float dtype) -> {weight: E4M3 [N, K], weight_scale: float32 [N] or [1]} (amax / 448)."""
    amax = _row_amax(w)
    if not per_channel:
        amax = amax.amax().reshape(1)
    scale = div_exact(amax, FP8_MAX).clamp_min(1e-12)
    q = _rows(w, scale, lambda x: x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn))
    return {"weight": q.contiguous(), "weight_scale": scale.contiguous()}


def int8_weight(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """w [N, K] (any float dtype) -> {weight: int8 [N, K] in [-127, 127], weight_scale: float32 [N]}."""
    scale = div_exact(_row_amax(w), INT8_MAX).clamp_min(1e-12)
    q = _rows(w, scale, lambda x: torch.round(x).clamp(-INT8_MAX, INT8_MAX).to(torch.int8))
    return {"weight": q.contiguous(), "weight_scale": scale.contiguous()}
