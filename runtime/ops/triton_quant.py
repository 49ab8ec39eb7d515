"""CUDA fast paths of the quantized linear ops (runtime/ops/quant_linear.py holds the contract, the float32
references and the fakes). Imported by :mod:`runtime.ops` always; with Triton installed it registers the
``*_cuda`` launchers as the CUDA kernels of ``spanda::linear_wna16`` (and ``_mma`` with its epilogue forms),
``spanda::linear_fp8``, ``spanda::linear_int8`` and ``spanda::linear_w8a8``; without Triton it is inert.
Configurations come from fixed heuristics per M range (nothing autotunes while serving); every launcher takes an
explicit ``config`` too (tests, benchmark sweeps). The kernels, by module:

- runtime/ops/triton_gemm.py: what they share: GemmConfig, split-K (partials, serial tile counters, the reduce
  kernel), the PDL entry, the optional Triton import.
- runtime/ops/triton_wna16.py: linear_wna16 on GPTQ's qweight layout (W4A16 / W8A16; GEMV and tl.dot kernels).
- runtime/ops/triton_wna16_mma.py: linear_wna16_mma on pack_wna16_mma's layout (W4A16 on wgmma with the weight as
  the register operand; TMA and Gluon (runtime/ops/wna16_gluon.py) variants); its prefill kernel in
  triton_wna16_prefill.py, its plain-load variant in triton_wna16_ldg.py, the per-tile arithmetic they all share in
  triton_wna16_tile.py.
- runtime/ops/triton_act_quant.py: activation quantization per row (FP8 / INT8 codes and scales).
- runtime/ops/triton_w8a8.py: linear_fp8 / linear_int8 / linear_w8a8 (Triton split-K GEMMs on codes for decode,
  cuBLAS's _scaled_mm / _int_mm above); the kernels themselves in triton_w8a8_kernels.py.
"""

from __future__ import annotations

import torch

from runtime.ops.triton_gemm import AVAILABLE
from runtime.ops.triton_w8a8 import linear_fp8_cuda, linear_int8_cuda, linear_w8a8_cuda
from runtime.ops.triton_wna16 import linear_wna16_cuda
from runtime.ops.triton_wna16_mma import (
    linear_wna16_mma_add_norm_cuda,
    linear_wna16_mma_cuda,
    linear_wna16_mma_rms_cuda,
    linear_wna16_mma_silu_cuda,
)


def _wna16_op(x, qweight, scales, zeros, perm, bias, bits, group_size):
    return linear_wna16_cuda(x, qweight, scales, zeros, perm, bias, bits, group_size)


def _wna16_mma_op(x, qmma, scales, zeros, perm, bias, group_size):
    return linear_wna16_mma_cuda(x, qmma, scales, zeros, perm, bias, group_size)


def _fp8_op(x, weight, weight_scale, input_scale, bias):
    return linear_fp8_cuda(x, weight, weight_scale, input_scale, bias)


def _int8_op(x, weight, weight_scale, input_scale, bias):
    return linear_int8_cuda(x, weight, weight_scale, input_scale, bias)


if AVAILABLE:
    torch.library.register_kernel("spanda::linear_wna16", "cuda", _wna16_op)
    torch.library.register_kernel("spanda::linear_wna16_mma", "cuda", _wna16_mma_op)
    torch.library.register_kernel("spanda::linear_wna16_mma_add_norm", "cuda", linear_wna16_mma_add_norm_cuda)
    torch.library.register_kernel("spanda::linear_wna16_mma_rms", "cuda", linear_wna16_mma_rms_cuda)
    torch.library.register_kernel("spanda::linear_wna16_mma_silu", "cuda", linear_wna16_mma_silu_cuda)
    torch.library.register_kernel("spanda::linear_fp8", "cuda", _fp8_op)
    torch.library.register_kernel("spanda::linear_int8", "cuda", _int8_op)
    torch.library.register_kernel("spanda::linear_w8a8", "cuda", linear_w8a8_cuda)
