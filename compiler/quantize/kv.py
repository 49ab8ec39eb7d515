"""KV-cache quantization scales (recipe ``target.kv_dtype``: fp8_e4m3 or int8), calibrated at build time.

Each decoder layer gets a key scale and a value scale (float32): the largest magnitude its keys (after RoPE,
as the cache stores them) and its values reach over the calibration tokens, divided by the largest magnitude
the cache dtype holds (448 for fp8 e4m3, 127 for int8), floored so an all-zero layer does not divide by 0.
The runtime's ops quantize ``x / scale`` on write and dequantize ``x * scale`` on read
(``runtime.ops.attention.quantize_kv``); values beyond the calibrated range saturate.

The model runs in float32 layer by layer (``compiler.quantize.layer_forward``'s decoder layer: one layer's
weights and the calibration hidden states ``[N, L, H]`` at a time), with the source weights unquantized.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from compiler.models.config import ModelConfig
from compiler.quantize.layer_forward import _chunks, _cos_sin, _embed, _Layer, _rope
from runtime.ops.attention import KV_QUANT_MAX, KV_SCALE_FLOOR, kv_cache_dtype

log = logging.getLogger("spanda.compiler")

KV_QUANT_DTYPES = ("fp8_e4m3", "int8")
"""Recipe ``target.kv_dtype`` values that quantize the cache (and so need calibrated scales)."""


def kv_qmax(kv_dtype: str) -> float:
    """Largest magnitude the cache dtype stores: 448 (fp8_e4m3) or 127 (int8)."""
    dt = kv_cache_dtype(kv_dtype)
    if dt not in KV_QUANT_MAX:
        raise ValueError(f"kv_dtype {kv_dtype!r} is not a quantized KV cache dtype ({', '.join(KV_QUANT_DTYPES)})")
    return KV_QUANT_MAX[dt]


@torch.no_grad()
def kv_amax(cfg: ModelConfig, read: Callable[[str], torch.Tensor], ids: torch.Tensor,
            device: str | torch.device = "cpu", chunk_tokens: int = 8192) -> list[tuple[float, float]]:
    """Per layer (max |key after RoPE|, max |value|) over the calibration tokens ``ids [N, L]``."""
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"calibration ids must be a non-empty [N, L] tensor, got shape {tuple(ids.shape)}")
    device = torch.device(device)
    n, L = ids.shape
    cos, sin = _cos_sin(cfg, L, device)
    h = _embed(read, ids, device)
    out = []
    for i in range(cfg.num_layers):
        layer = _Layer(cfg, i, read, device)
        k_max = v_max = 0.0
        for a, b in _chunks(n, L, chunk_tokens):
            x = layer.norm(h[a:b], "input_layernorm")
            k = layer.lin(x, "self_attn.k_proj").view(b - a, L, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
            v = layer.lin(x, "self_attn.v_proj")
            k_max = max(k_max, float(_rope(k, cos, sin).abs().amax()))
            v_max = max(v_max, float(v.abs().amax()))
            h[a:b] = layer.forward(h[a:b], cos, sin)
        out.append((k_max, v_max))
        del layer
    return out


def calibrate_kv_scales(cfg: ModelConfig, read: Callable[[str], torch.Tensor], ids: torch.Tensor,
                        kv_dtype: str = "fp8_e4m3", device: str | torch.device | None = None
                        ) -> list[tuple[float, float]]:
    """Per layer (k_scale, v_scale) = max(amax / qmax, floor), rounded to float32 (what the ops compute with).

    ``read(hf_name)``: the checkpoint's tensors; ``ids [N, L]``: calibration token ids (see
    ``compiler.quantize.calib_data.load_calibration``); ``kv_dtype``: fp8_e4m3 or int8."""
    qmax = kv_qmax(kv_dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    amax = kv_amax(cfg, read, ids, device)
    scales = []
    for k, v in amax:
        s = torch.tensor([k / qmax, v / qmax], dtype=torch.float32).clamp_min(KV_SCALE_FLOOR)
        scales.append((float(s[0]), float(s[1])))
    log.info("KV cache %s scales over %d x %d calibration tokens: keys %.3g..%.3g, values %.3g..%.3g", kv_dtype,
             ids.shape[0], ids.shape[1], min(s[0] for s in scales), max(s[0] for s in scales),
             min(s[1] for s in scales), max(s[1] for s in scales))
    return scales
