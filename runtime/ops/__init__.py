"""Spanda's op library. Importing this package registers every ``torch.ops.spanda.*`` op.

Each op is a triplet (DESIGN.md): a plain-PyTorch reference (used on CPU), a fast GPU implementation
registered for CUDA where one exists, and a fake implementation for ``torch.export``.
"""

from runtime.ops import activation, attention, norm, quant_linear, rope_cache, rotary  # noqa: F401  (registration side effects)

OPS = (
    "spanda::rms_norm",
    "spanda::fused_add_rms_norm",
    "spanda::silu_and_mul",
    "spanda::rotary_embedding",
    "spanda::paged_attention",
    "spanda::rope_and_cache",
    "spanda::paged_attention_cached",
    "spanda::linear_wna16",
    "spanda::linear_wna16_mma",
    "spanda::linear_wna16_mma_add_norm",
    "spanda::linear_wna16_mma_rms",
    "spanda::linear_wna16_mma_silu",
    "spanda::linear_fp8",
    "spanda::linear_int8",
    "spanda::rms_norm_quant",
    "spanda::fused_add_rms_norm_quant",
    "spanda::silu_and_mul_quant",
    "spanda::linear_w8a8",
)
from runtime.ops import triton_attention  # noqa: E402,F401,I001  (CUDA paged attention; inert without triton)
from runtime.ops import triton_elementwise  # noqa: E402,F401  (CUDA fast paths of the elementwise ops; inert without triton)
from runtime.ops import triton_rope_cache  # noqa: E402,F401  (CUDA RoPE + KV write; inert without triton)
from runtime.ops import triton_quant  # noqa: E402,F401  (CUDA quantized linear ops; inert without triton)
