"""Quantized linear layers: the op triplets every quantization method lowers to.

Three ops cover FP8, INT8 (SmoothQuant W8A8 and weight-only) and INT4 (GPTQ, AWQ, RTN). The artifact stores
the tensors in the layouts below (the *internal* layouts; checkpoint formats such as GPTQ, AWQ or
compressed-tensors are converted to them at build time by ``compiler/quantize``). ``x`` is ``[T, K]`` in the
model dtype, the output ``[T, N]`` in the same dtype; ``bias`` is ``[N]`` in the model dtype or None.

``spanda::linear_wna16(x, qweight, scales, zeros, perm, bias, bits, group_size)``  (W4A16 / W8A16)
    qweight  int32 [K * bits / 32, N]  word r of column n packs rows r*P .. r*P+P-1 (P = 32 / bits) of the
             integer codes q[k, n] in [0, 2^bits), lowest bits first (AutoGPTQ's qweight layout)
    scales   [G, N] model dtype,  zeros uint8 [G, N] (true zero points, no off-by-one),
             G = K / group_size (group_size -1: one group, per output channel)
    perm     int32 [K] or None: act-order. Rows of q are stored in the order ``perm`` (groups contiguous in
             the stored order), so ``y = x[:, perm] @ W_stored``; None: identity.
    W_stored[k, n] = (q[k, n] - zeros[k // gs, n]) * scales[k // gs, n];   y = x[:, perm] @ W_stored + bias

``spanda::linear_wna16_mma(x, qmma, scales, zeros, perm, bias, group_size)``  (W4A16, tensor-core layout)
    linear_wna16 at 4 bits with the codes stored for the Hopper tensor-core kernel (``pack_wna16_mma``:
    int16 [N / 64, K / 128, 2048], the same bytes as qweight); scales, zeros, perm, bias and the product as
    above, group_size 128 or -1. The build's ``wna16_mma`` pass rewrites linear_wna16 to it where the shapes
    allow (N % 64 == 0, K % 128 == 0). With group size 128 and a bf16/fp16 model it also stores ``zeros`` as
    int32 [G, N] words (``pack_mma_zeros``: the bits of MAGIC + z in the model dtype above the bits of the
    scale), which the kernel loads through its cp.async pipeline (one-byte zero points are too narrow for it).

``spanda::linear_wna16_mma_add_norm(x, qmma, scales, zeros, perm, bias, group_size, residual, norm_weight, eps)``
``spanda::linear_wna16_mma_rms(h, qmma, scales, zeros, perm, bias, group_size, ss, eps)``
    A residual add and RMSNorm between two linear_wna16_mma carried by the two GEMMs (the build's
    ``fuse_norm_epilogue`` pass, in place of linear_wna16_mma -> fused_add_rms_norm -> linear_wna16_mma). The first
    returns (y + residual, h, ss), the second takes h and ss, in one of two forms that both ops choose by the
    same rule (``triton_wna16_mma.norm_in_epilogue(M, device)``), so the pair always computes the norm:
    *normed*: h = fused_add_rms_norm's normed output, ss unused; the second is a plain linear_wna16_mma.
    *epilogue* (the Hopper decode GEMM, runtime/ops/wna16_gluon.py): the first GEMM's epilogue writes
    h = (y + residual) * norm_weight and ss [N / 64, M] float32, the sums of the squares of y + residual over
    each 64 columns; the second GEMM multiplies its product by rsqrt(sum(ss) / K + eps), then adds its bias.
    That is the norm with its weight moved into x and 1 / RMS applied after the product: equal but for rounding
    (h is rounded once, where the norm rounds x / RMS and then its product with the weight).

``spanda::linear_wna16_mma_silu(x, qmma, scales, zeros, perm, bias, group_size, ss, eps)``
    silu_and_mul of a gate | up linear_wna16_mma (N = 2 I, I % 64 == 0): [T, I] = silu(gate) * up, each rounded
    as silu_and_mul rounds it (the build's ``fuse_silu_epilogue`` pass). With ss (not None) it is
    linear_wna16_mma_rms's product instead, in the same two forms. On the Hopper decode GEMM the epilogue
    computes it: the programs of gate tile j and up tile j exchange their tiles and the second writes the
    result; elsewhere the GEMM, then the silu_and_mul kernel. The weights are stored as for linear_wna16_mma.

``spanda::linear_fp8(x, weight, weight_scale, input_scale, bias)``  (FP8 W8A8, E4M3)
    weight        float8_e4m3fn [N, K];  weight_scale float32 [N] (per channel) or [1] (per tensor)
    input_scale   float32 [1] (static, from calibration) or None (dynamic: one scale per token)
    x is quantized to E4M3 with its scale (amax / 448 per token when dynamic; values clamped to +-448),
    y = (x_q * s_x) @ (weight * weight_scale[:, None]).T + bias

``spanda::linear_int8(x, weight, weight_scale, input_scale, bias)``  (INT8 W8A8, symmetric)
    weight int8 [N, K] in [-127, 127]; weight_scale float32 [N];  input_scale float32 [1] or None (dynamic
    per token: amax / 127).  x_q = clamp(round(x / s_x), -127, 127),  y = (x_q @ weight.T) * s_x * weight_scale
    + bias.  SmoothQuant's smoothing is folded into the preceding RMSNorm weights at build time.

``spanda::linear_w8a8(xq, x_scale, weight, weight_scale, bias, out_dtype)`` is linear_fp8 / linear_int8 on
activations already quantized by their producer (``spanda::rms_norm_quant``, ``fused_add_rms_norm_quant``,
``silu_and_mul_quant``: the producer's output as codes [T, K] and float32 scales [T, 1]); the build's
``fuse_act_quant`` pass puts them in place of the unfused pair.

The references below compute in float32 and emulate the activation quantization exactly (so CPU builds
measure the accuracy the GPU kernels deliver); the CUDA fast paths live in ``runtime/ops/triton_quant.py``.
"""

from __future__ import annotations

import torch

from runtime.ops.activation import silu_and_mul_ref
from runtime.ops.norm import fused_add_rms_norm_ref, rms_norm_ref

FP8_MAX = 448.0
INT8_MAX = 127.0
SCALE_FLOOR = 1e-12  # a token of zeros gets this scale instead of 0 (no 0/0)
# Scales are amax times the float32 reciprocal (not amax / 448): that is what CUDA computes for a division by
# a scalar and what the Triton kernels do, so CPU references and GPU kernels agree to the last bit.
FP8_RECIP = 1.0 / FP8_MAX
INT8_RECIP = 1.0 / INT8_MAX


def _recip(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def unpack_rows(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [K * bits / 32, N] -> int32 codes [K, N] (see the module docstring)."""
    per = 32 // bits
    shifts = torch.arange(per, device=qweight.device, dtype=torch.int32) * bits
    codes = (qweight.unsqueeze(1) >> shifts.view(1, per, 1)) & ((1 << bits) - 1)
    return codes.reshape(qweight.shape[0] * per, qweight.shape[1])


MMA_ROWS, MMA_K = 64, 128  # one tile of the W4A16 tensor-core layout: 64 weight rows (output channels) x 128 K


def _mma_axes(n: int, k: int) -> tuple[int, ...]:
    # n = 64 nb + 16 w + 8 v + g;  k = 128 kb + 16 (4 p1 + 2 p0 + i1) + 8 i0 + 2 t + h
    return n // MMA_ROWS, 4, 2, 8, k // MMA_K, 2, 2, 2, 2, 4, 2


# codes [N, K] viewed on _mma_axes -> the stored order (nb, kb, v, w, g, t, p1, p0, h, i1, i0)
_MMA_PERM = (0, 4, 2, 1, 3, 9, 5, 6, 10, 7, 8)


def pack_wna16_mma(qweight: torch.Tensor) -> torch.Tensor:
    """4-bit qweight [K/8, N] int32 (GPTQ order) -> the layout of triton_wna16_mma's W4A16 tensor-core kernel:
    int16 [N/64, K/128, 2048], the same bytes. Each 64 x 128 tile of W (rows = output channels) is stored so
    that a plain 16-byte load per thread gives every thread of a warpgroup exactly the weights that the Hopper
    wgmma instruction wants in its registers (the A operand: the kernel computes y^T = W x^T), with no
    exchange between threads: element (v, w, g, t, r) (2 x 4 x 8 x 4 x 8 int16, thread = (w, g, t), one
    16-byte vector per v) holds in its nibble i = 2 i1 + i0 the code of row 16 w + 8 v + g, column
    16 (4 p1 + 2 p0 + i1) + 8 i0 + 2 t + h, with r = 4 p1 + 2 p0 + h: adjacent int16 (h = 0, 1) hold adjacent
    columns, so one bf16x2 register per nibble position comes out of a 32-bit word. Needs N % 64 == 0 and
    K % 128 == 0."""
    kw, n = qweight.shape
    k = kw * 8
    if n % MMA_ROWS or k % MMA_K:
        raise ValueError(f"the W4A16 tensor-core layout needs N % {MMA_ROWS} == 0 and K % {MMA_K} == 0, got "
                         f"N={n}, K={k}")
    q = unpack_rows(qweight, 4).t().reshape(_mma_axes(n, k)).permute(_MMA_PERM)
    q = q.reshape(n // MMA_ROWS, k // MMA_K, 2048, 4)
    word = q[..., 0] | (q[..., 1] << 4) | (q[..., 2] << 8) | (q[..., 3] << 12)
    return torch.where(word >= 1 << 15, word - (1 << 16), word).to(torch.int16).contiguous()


MMA_MAGIC = {torch.bfloat16: 128.0, torch.float16: 1024.0}  # MAGIC + q is exact for q < 128, and has MAGIC's exponent


def pack_mma_zeros(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """scales [G, N] bf16/fp16, zeros uint8 [G, N] -> int32 [G, N]: bits of (MAGIC + zero) in the scales' dtype
    (exact: zeros < 128) in the high half, bits of the scale in the low half."""
    zz = (zeros.float() + MMA_MAGIC[scales.dtype]).to(scales.dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    return ((zz << 16) | (scales.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF)).contiguous()


def unpack_mma_zeros(words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """pack_mma_zeros' words -> the uint8 zero points (dtype: the scales' dtype)."""
    zz = (words >> 16).to(torch.int16).view(dtype).float() - MMA_MAGIC[dtype]
    return zz.to(torch.uint8)


def unpack_wna16_mma(packed: torch.Tensor, k: int) -> torch.Tensor:
    """pack_wna16_mma's int16 [N/64, K/128, 2048] -> codes int32 [K, N]."""
    n = packed.shape[0] * MMA_ROWS
    w = packed.to(torch.int32) & 0xFFFF
    q = torch.stack([(w >> (4 * i)) & 0xF for i in range(4)], dim=-1)
    shape = _mma_axes(n, k)
    stored = [shape[d] for d in _MMA_PERM]
    inv = [_MMA_PERM.index(d) for d in range(len(_MMA_PERM))]
    return q.reshape(stored).permute(inv).reshape(n, k).t().contiguous()


def dequantize_codes(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Codes [K, N] -> the stored weight as float32 [K, N] (rows in stored order)."""
    k = q.shape[0]
    gs = k if group_size == -1 else group_size
    g = torch.arange(k, device=q.device) // gs
    return (q.float() - zeros.float()[g]) * scales.float()[g]


def dequantize_wna16(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                     group_size: int) -> torch.Tensor:
    """The stored weight as float32 [K, N] (rows in stored order)."""
    return dequantize_codes(unpack_rows(qweight, bits), scales, zeros, group_size)


def linear_wna16_ref(x, qweight, scales, zeros, perm, bias, bits: int, group_size: int):
    return _wna16_product(x, dequantize_wna16(qweight, scales, zeros, bits, group_size), perm, bias)


def linear_wna16_mma_ref(x, qmma, scales, zeros, perm, bias, group_size: int):
    return _wna16_product(x, _mma_weight(qmma, scales, zeros, group_size, x.shape[-1]), perm, bias)


def _mma_weight(qmma, scales, zeros, group_size: int, k: int) -> torch.Tensor:
    """pack_wna16_mma's codes (zero points as bytes or pack_mma_zeros' words) -> the weight [K, N]."""
    if zeros.dtype == torch.int32:  # pack_mma_zeros' words
        zeros = unpack_mma_zeros(zeros, scales.dtype)
    return dequantize_codes(unpack_wna16_mma(qmma, k), scales, zeros, group_size)


def add_norm_outputs(y: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, epilogue: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """linear_wna16_mma_add_norm's outputs from y, its linear's output in the model dtype (module docstring)."""
    m, n = y.shape
    if not epilogue:
        normed, total = fused_add_rms_norm_ref(y, residual, weight, eps)
        return total, normed, y.new_zeros((n // 64, m), dtype=torch.float32)
    total = y + residual
    tf = total.float()
    return total, (tf * weight.float()).to(y.dtype), tf.pow(2).view(m, n // 64, 64).sum(-1).t().contiguous()


def rms_scaled(y: torch.Tensor, ss: torch.Tensor, eps: float, bias: torch.Tensor | None, dtype: torch.dtype):
    """linear_wna16_mma_rms's epilogue form from y, the product without bias (float32 or the model dtype)."""
    k = ss.shape[0] * 64
    out = y.float() * torch.rsqrt(ss.float().sum(0) / k + eps)[:, None]
    return (out if bias is None else out + bias.float()).to(dtype)


def linear_wna16_mma_add_norm_ref(x, qmma, scales, zeros, perm, bias, group_size: int, residual, norm_weight,
                                  eps: float, epilogue: bool = False):
    y = linear_wna16_mma_ref(x, qmma, scales, zeros, perm, bias, group_size)
    return add_norm_outputs(y, residual, norm_weight, eps, epilogue)


def linear_wna16_mma_rms_ref(h, qmma, scales, zeros, perm, bias, group_size: int, ss, eps: float,
                             epilogue: bool = False):
    if not epilogue:
        return linear_wna16_mma_ref(h, qmma, scales, zeros, perm, bias, group_size)
    return rms_scaled(_wna16_f32(h, _mma_weight(qmma, scales, zeros, group_size, h.shape[-1]), perm), ss, eps, bias,
                      h.dtype)


def linear_wna16_mma_silu_ref(x, qmma, scales, zeros, perm, bias, group_size: int, ss, eps: float,
                              epilogue: bool = False):
    if ss is None:
        y = linear_wna16_mma_ref(x, qmma, scales, zeros, perm, bias, group_size)
    else:
        y = linear_wna16_mma_rms_ref(x, qmma, scales, zeros, perm, bias, group_size, ss, eps, epilogue)
    return silu_and_mul_ref(y)


def _wna16_f32(x: torch.Tensor, w: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """x[:, perm] @ w in float32."""
    xf = x.float() if perm is None else x.float()[:, perm.long()]
    return xf @ w.float()


def _wna16_product(x: torch.Tensor, w: torch.Tensor, perm: torch.Tensor | None, bias: torch.Tensor | None):
    y = _wna16_f32(x, w, perm)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def quantize_activation_fp8(x: torch.Tensor, input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (E4M3 codes [T, K], float32 scale [T, 1] or [1, 1])."""
    xf = x.float()
    if input_scale is None:
        s = (xf.abs().amax(-1, keepdim=True) * _recip(FP8_RECIP, xf)).clamp_min(SCALE_FLOOR)
    else:
        s = input_scale.float().reshape(1, 1)
    return (xf / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s


def linear_fp8_ref(x, weight, weight_scale, input_scale, bias):
    return w8a8_codes_ref(*quantize_activation_fp8(x, input_scale), weight, weight_scale, bias, x.dtype)


def w8a8_codes_ref(xq, sx, weight, weight_scale, bias, dtype: torch.dtype) -> torch.Tensor:
    """The product of quantized activations (E4M3 or int8 codes [T, K], float32 scales [T, 1] or [1, 1]) with
    a W8A8 weight of the same kind, in ``dtype``."""
    if xq.dtype == torch.int8:
        # float64 keeps the integer dot products exact for any K a model has (|sum| < 2^53)
        acc = (xq.double() @ weight.double().t()).float()
        y = acc * sx * weight_scale.float().reshape(1, -1)
    else:
        w = weight.float() * weight_scale.float().reshape(-1, 1)
        y = (xq.float() * sx) @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def quantize_activation_int8(x: torch.Tensor, input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (int8 codes [T, K], float32 scale [T, 1] or [1, 1]); symmetric, round half to even."""
    xf = x.float()
    if input_scale is None:
        s = (xf.abs().amax(-1, keepdim=True) * _recip(INT8_RECIP, xf)).clamp_min(SCALE_FLOOR)
    else:
        s = input_scale.float().reshape(1, 1)
    return torch.round(xf / s).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), s


def linear_int8_ref(x, weight, weight_scale, input_scale, bias):
    return w8a8_codes_ref(*quantize_activation_int8(x, input_scale), weight, weight_scale, bias, x.dtype)


def quantize_activation_rows(x: torch.Tensor, input_scale: torch.Tensor | None, int8: bool
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (codes, float32 scales [T, 1]): quantize_activation_int8 or _fp8 with a static scale
    repeated per row (the form the fused producers return)."""
    xq, s = (quantize_activation_int8 if int8 else quantize_activation_fp8)(x, input_scale)
    return xq, s.expand(x.shape[0], 1).contiguous()


def _out(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)


@torch.library.custom_op("spanda::linear_wna16", mutates_args=())
def linear_wna16(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 perm: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    return linear_wna16_ref(x, qweight, scales, zeros, perm, bias, bits, group_size)


@linear_wna16.register_fake
def _linear_wna16_fake(x, qweight, scales, zeros, perm, bias, bits, group_size):
    return _out(x, qweight.shape[1])


@torch.library.custom_op("spanda::linear_wna16_mma", mutates_args=())
def linear_wna16_mma(x: torch.Tensor, qmma: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     perm: torch.Tensor | None, bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    return linear_wna16_mma_ref(x, qmma, scales, zeros, perm, bias, group_size)


@linear_wna16_mma.register_fake
def _linear_wna16_mma_fake(x, qmma, scales, zeros, perm, bias, group_size):
    return _out(x, qmma.shape[0] * MMA_ROWS)


@torch.library.custom_op("spanda::linear_wna16_mma_add_norm", mutates_args=())
def linear_wna16_mma_add_norm(x: torch.Tensor, qmma: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                              perm: torch.Tensor | None, bias: torch.Tensor | None, group_size: int,
                              residual: torch.Tensor, norm_weight: torch.Tensor, eps: float
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return linear_wna16_mma_add_norm_ref(x, qmma, scales, zeros, perm, bias, group_size, residual, norm_weight, eps)


@linear_wna16_mma_add_norm.register_fake
def _linear_wna16_mma_add_norm_fake(x, qmma, scales, zeros, perm, bias, group_size, residual, norm_weight, eps):
    n = qmma.shape[0] * MMA_ROWS
    return _out(x, n), _out(x, n), x.new_empty((n // 64, x.shape[0]), dtype=torch.float32)


@torch.library.custom_op("spanda::linear_wna16_mma_rms", mutates_args=())
def linear_wna16_mma_rms(h: torch.Tensor, qmma: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                         perm: torch.Tensor | None, bias: torch.Tensor | None, group_size: int, ss: torch.Tensor,
                         eps: float) -> torch.Tensor:
    return linear_wna16_mma_rms_ref(h, qmma, scales, zeros, perm, bias, group_size, ss, eps)


@linear_wna16_mma_rms.register_fake
def _linear_wna16_mma_rms_fake(h, qmma, scales, zeros, perm, bias, group_size, ss, eps):
    return _out(h, qmma.shape[0] * MMA_ROWS)


@torch.library.custom_op("spanda::linear_wna16_mma_silu", mutates_args=())
def linear_wna16_mma_silu(x: torch.Tensor, qmma: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          perm: torch.Tensor | None, bias: torch.Tensor | None, group_size: int,
                          ss: torch.Tensor | None, eps: float) -> torch.Tensor:
    return linear_wna16_mma_silu_ref(x, qmma, scales, zeros, perm, bias, group_size, ss, eps)


@linear_wna16_mma_silu.register_fake
def _linear_wna16_mma_silu_fake(x, qmma, scales, zeros, perm, bias, group_size, ss, eps):
    return _out(x, qmma.shape[0] * MMA_ROWS // 2)


@torch.library.custom_op("spanda::linear_fp8", mutates_args=())
def linear_fp8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None,
               bias: torch.Tensor | None) -> torch.Tensor:
    return linear_fp8_ref(x, weight, weight_scale, input_scale, bias)


@linear_fp8.register_fake
def _linear_fp8_fake(x, weight, weight_scale, input_scale, bias):
    return _out(x, weight.shape[0])


@torch.library.custom_op("spanda::linear_int8", mutates_args=())
def linear_int8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None,
                bias: torch.Tensor | None) -> torch.Tensor:
    return linear_int8_ref(x, weight, weight_scale, input_scale, bias)


@linear_int8.register_fake
def _linear_int8_fake(x, weight, weight_scale, input_scale, bias):
    return _out(x, weight.shape[0])


# ----------------------------------------------------------------------------------------------------------
# Activation quantization fused into the op that produces the activation (compiler/passes/fusion.py,
# fuse_act_quant): the RMSNorm before a QKV or gate/up projection, the SiLU-and-multiply before the down
# projection. Each returns (codes, float32 scales [T, 1]) exactly as quantize_activation_fp8 / _int8 of the
# unfused op's output (rounded to the model dtype first), and linear_w8a8 finishes the linear from them, so a
# fused graph computes what the unfused one does, bit for bit on CPU.

def _quant_dtype(x: torch.Tensor, int8: bool) -> torch.dtype:
    return torch.int8 if int8 else torch.float8_e4m3fn


def _quant_fake(x: torch.Tensor, int8: bool, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = x.shape[0]
    return x.new_empty((t, width), dtype=_quant_dtype(x, int8)), x.new_empty((t, 1), dtype=torch.float32)


@torch.library.custom_op("spanda::rms_norm_quant", mutates_args=())
def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, input_scale: torch.Tensor | None,
                   int8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_activation_rows(rms_norm_ref(x, weight, eps), input_scale, int8)


@rms_norm_quant.register_fake
def _rms_norm_quant_fake(x, weight, eps, input_scale, int8):
    return _quant_fake(x, int8, x.shape[-1])


@torch.library.custom_op("spanda::fused_add_rms_norm_quant", mutates_args=())
def fused_add_rms_norm_quant(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                             input_scale: torch.Tensor | None, int8: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scales, x + residual)."""
    normed, total = fused_add_rms_norm_ref(x, residual, weight, eps)
    return *quantize_activation_rows(normed, input_scale, int8), total


@fused_add_rms_norm_quant.register_fake
def _fused_add_rms_norm_quant_fake(x, residual, weight, eps, input_scale, int8):
    return *_quant_fake(x, int8, x.shape[-1]), torch.empty_like(x)


@torch.library.custom_op("spanda::silu_and_mul_quant", mutates_args=())
def silu_and_mul_quant(x: torch.Tensor, input_scale: torch.Tensor | None, int8: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_activation_rows(silu_and_mul_ref(x), input_scale, int8)


@silu_and_mul_quant.register_fake
def _silu_and_mul_quant_fake(x, input_scale, int8):
    return _quant_fake(x, int8, x.shape[-1] // 2)


@torch.library.custom_op("spanda::linear_w8a8", mutates_args=())
def linear_w8a8(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """linear_fp8 / linear_int8 after the activation quantization: xq [T, K] codes of weight's kind."""
    return w8a8_codes_ref(xq, x_scale, weight, weight_scale, bias, out_dtype)


@linear_w8a8.register_fake
def _linear_w8a8_fake(xq, x_scale, weight, weight_scale, bias, out_dtype):
    return xq.new_empty((xq.shape[0], weight.shape[0]), dtype=out_dtype)
