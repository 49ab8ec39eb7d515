"""Reading already-quantized Hugging Face checkpoints into the internal layouts (runtime/ops/quant_linear.py).

Which format a checkpoint is and how each module is stored (:class:`Scheme`) comes from
compiler/quantize/hf_detect.py; this module reads the tensors. ``read_site`` turns the HF modules making up one
artifact linear (a fused q/k/v or gate/up, or a single one) into one op's internal tensors: linear_wna16
{qweight, scales, zeros[, perm]}, linear_fp8 / linear_int8 {weight, weight_scale[, input_scale]}.
``dequantize_site`` and ``float_weight`` turn them back into float weights [N, K].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from compiler.quantize.hf_detect import QuantFormatError, Scheme, SourceQuant, is_quantized_module
from compiler.quantize.layout import wna16_tensors
from compiler.quantize.packing import _unpack, default_g_idx, unpack_awq, unpack_gptq
from compiler.quantize.rtn import QuantizedLinear
from runtime.ops.quant_linear import dequantize_wna16

Read = Callable[[str], torch.Tensor]


def _scheme(prefixes: Sequence[str], sq: SourceQuant) -> Scheme:
    schemes = {sq.scheme_for(p) for p in prefixes}
    if None in schemes:
        floats = [p for p in prefixes if sq.scheme_for(p) is None]
        raise QuantFormatError(f"modules {floats} are not quantized in this checkpoint (ignored or untargeted); "
                               "read them as float weights")
    if len(schemes) != 1:
        raise QuantFormatError(f"modules {list(prefixes)} use different quantization schemes and cannot be fused")
    return schemes.pop()


def _read_wna16_part(read: Read, p: str, s: Scheme) -> tuple[QuantizedLinear, torch.Tensor | None]:
    """One module -> (QuantizedLinear with codes [K, N], zero points and scales [G, N], g_idx [K]; its g_idx
    tensor as stored or None)."""
    bits, gs = s.bits, s.group_size
    g_idx = None
    if s.storage == "gptq":
        q, z = unpack_gptq(read(f"{p}.qweight"), read(f"{p}.qzeros"), bits, s.checkpoint_format)
        scales = read(f"{p}.scales")
        try:
            g_idx = read(f"{p}.g_idx")
        except (KeyError, ValueError):  # some exporters drop the trivial g_idx
            g_idx = None
    elif s.storage == "awq":
        q, z = unpack_awq(read(f"{p}.qweight"), read(f"{p}.qzeros"))
        scales = read(f"{p}.scales")
    elif s.storage == "ct_packed":
        shape = [int(v) for v in read(f"{p}.weight_shape").tolist()]
        q = _unpack(read(f"{p}.weight_packed"), bits, dim=1)[:, : shape[1]].t().contiguous()
        scales = read(f"{p}.weight_scale").t()
        if s.symmetric:
            z = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.int32)
        else:  # signed zero points packed along N with the same +2^(bits-1) offset as the codes
            z = _unpack(read(f"{p}.weight_zero_point"), bits, dim=0)[: shape[0]].t().contiguous()
        if s.act_order:
            g_idx = read(f"{p}.weight_g_idx")
    elif s.storage == "ct_int":  # naive int8 weight-only: signed codes, symmetric
        w = read(f"{p}.weight")
        q = (w.to(torch.int32) + 128).t().contiguous()
        scales = read(f"{p}.weight_scale").reshape(w.shape[0], -1).t()
        z = torch.full(scales.shape, 128, dtype=torch.int32)
    else:
        raise QuantFormatError(f"{p}: storage {s.storage!r} is not an integer weight-only layout")
    k = q.shape[0]
    gi = default_g_idx(k, gs) if g_idx is None else g_idx.to(torch.int32)
    if gs != -1 and k % gs:
        raise QuantFormatError(f"{p}: in_features {k} is not a multiple of group_size {gs}")
    return QuantizedLinear(q, z.to(torch.int32), scales.float(), gi, bits, gs, s.symmetric), g_idx


def _read_wna16(read: Read, prefixes: Sequence[str], s: Scheme, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    parts = [_read_wna16_part(read, p, s) for p in prefixes]
    g0 = parts[0][0].g_idx
    for p, (ql, _) in zip(prefixes[1:], parts[1:]):
        if not torch.equal(ql.g_idx, g0):
            raise QuantFormatError(
                f"act-order: {p}.g_idx differs from {prefixes[0]}.g_idx; modules fused into one GEMM must share "
                "g_idx (quantize them with the same input order: desc_act with static_groups, or fuse nothing)")
    tensors = [wna16_tensors(ql, dtype) for ql, _ in parts]
    out = {k: torch.cat([t[k] for t in tensors], dim=1).contiguous() for k in ("qweight", "scales", "zeros")}
    if "perm" in tensors[0]:
        out["perm"] = tensors[0]["perm"]
    return out


def _scale_vector(scale: torch.Tensor, n: int) -> torch.Tensor:
    s = scale.float().reshape(-1)
    if s.numel() == 1:
        return s
    if s.numel() != n:
        raise QuantFormatError(f"weight_scale of {s.numel()} values for {n} output channels")
    return s


def _read_w8a8(read: Read, prefixes: Sequence[str], s: Scheme, sq: SourceQuant) -> dict[str, torch.Tensor]:
    ws, scales, inputs = [], [], []
    for p in prefixes:
        w = read(f"{p}.weight")
        want = torch.float8_e4m3fn if s.op == "linear_fp8" else torch.int8
        if w.dtype != want:
            raise QuantFormatError(f"{p}.weight is {w.dtype}, expected {want} for {sq.method} {s.storage}")
        ws.append(w)
        scales.append(_scale_vector(read(f"{p}.weight_scale"), w.shape[0]))
        if s.activations == "static":
            inputs.append(read(f"{p}.input_scale").float().reshape(-1))
    weight = torch.cat(ws, dim=0).contiguous()
    if all(x.numel() == 1 for x in scales) and all(torch.equal(x, scales[0]) for x in scales) \
            and s.op == "linear_fp8":
        scale = scales[0].clone()
    else:  # per-tensor scales that differ between the fused parts become per-channel (int8 needs [N] anyway)
        scale = torch.cat([x.expand(w.shape[0]) for x, w in zip(scales, ws)]).contiguous()
    out = {"weight": weight, "weight_scale": scale}
    if s.activations == "static":
        if any(x.numel() != 1 for x in inputs):
            raise QuantFormatError(f"{prefixes}: static input_scale must be one value per tensor")
        # The fused GEMM quantizes its one input once. Each part calibrated its own scale on that same input,
        # so the largest of them is the one under which none of the parts' activation ranges clips (vLLM's
        # choice too); parts with a smaller scale lose a little resolution.
        out["input_scale"] = torch.stack([x[0] for x in inputs]).max().reshape(1).contiguous()
    return out


def read_site(read: Read, prefixes: list[str], sq: SourceQuant, dtype: torch.dtype
              ) -> tuple[str, dict[str, torch.Tensor]]:
    """The op and its internal-layout tensors for one artifact linear made of HF modules ``prefixes``,
    concatenated along the output dim N in the order given. Bias is not included (it stays ``<prefix>.bias``,
    read as a float tensor). wna16: {qweight, scales (dtype), zeros[, perm]} with the scheme's bits and
    group_size (``sq.scheme_for(prefixes[0])``); fp8/int8: {weight, weight_scale[, input_scale]} (no
    input_scale: dynamic per-token activations)."""
    if not prefixes:
        raise ValueError("read_site needs at least one module prefix")
    s = _scheme(prefixes, sq)
    if s.op == "linear_wna16":
        return s.op, _read_wna16(read, prefixes, s, dtype)
    return s.op, _read_w8a8(read, prefixes, s, sq)


def site_params(prefixes: list[str], sq: SourceQuant) -> dict[str, Any]:
    """The op's non-tensor arguments: bits and group_size for linear_wna16, nothing for the W8A8 ops."""
    s = _scheme(prefixes, sq)
    return {"bits": s.bits, "group_size": s.group_size} if s.op == "linear_wna16" else {}


def dequantize_site(op: str, tensors: dict[str, torch.Tensor], bits: int = 4, group_size: int = -1
                    ) -> torch.Tensor:
    """Internal-layout tensors -> float32 weight [N, K] in the original input order."""
    if op == "linear_wna16":
        ws = dequantize_wna16(tensors["qweight"], tensors["scales"], tensors["zeros"], bits, group_size)
        perm = tensors.get("perm")
        if perm is None:
            return ws.t().contiguous()
        w = torch.empty_like(ws.t())
        w[:, perm.long()] = ws.t()
        return w
    return tensors["weight"].float() * tensors["weight_scale"].float().reshape(-1, 1)


def float_weight(read: Read, prefix: str, sq: SourceQuant | None, dtype: torch.dtype) -> torch.Tensor:
    """Module ``prefix``'s weight [N, K] dequantized to ``dtype`` (float modules read as they are)."""
    if not is_quantized_module(prefix, sq):
        return read(f"{prefix}.weight").to(dtype)
    op, tensors = read_site(read, [prefix], sq, torch.float32)
    return dequantize_site(op, tensors, **site_params([prefix], sq)).to(dtype)
