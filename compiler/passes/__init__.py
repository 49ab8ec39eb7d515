"""Graph and weight passes, in the order the build applies them (each one switchable in the recipe)."""

from compiler.passes.fusion import (
    fuse_act_mul,
    fuse_act_quant,
    fuse_add_rmsnorm,
    fuse_gate_up,
    fuse_norm_epilogue,
    fuse_qkv,
    fuse_rope_kv_write,
    fuse_silu_epilogue,
)
from compiler.passes.quantize import pack_wna16_mma

# (recipe switch name, pass). Order matters: act-mul needs the fused gate/up projection.
PASSES = (
    ("fuse_qkv", fuse_qkv),
    ("fuse_gate_up", fuse_gate_up),
    ("fuse_act_mul", fuse_act_mul),
    ("fuse_add_rmsnorm", fuse_add_rmsnorm),
    ("fuse_rope_kv_write", fuse_rope_kv_write),
)
# after quantization (its W8A8 linears), run by the build when the recipe enables it
POST_QUANT_PASSES = (("fuse_act_quant", fuse_act_quant), ("wna16_mma", pack_wna16_mma),
                     ("fuse_norm_epilogue", fuse_norm_epilogue), ("fuse_silu_epilogue", fuse_silu_epilogue))

__all__ = ["PASSES", "POST_QUANT_PASSES", "fuse_act_mul", "fuse_act_quant", "fuse_add_rmsnorm", "fuse_gate_up",
           "fuse_norm_epilogue", "fuse_qkv", "fuse_rope_kv_write", "fuse_silu_epilogue", "pack_wna16_mma"]
