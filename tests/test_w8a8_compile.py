"""The W8A8 decode GEMMs (runtime/ops/triton_w8a8_kernels.py) compiled for sm_90 on the CPU, with the launcher's
alignment specialization: each runs its K loop on Hopper's tensor cores (wgmma: QGMMA on E4M3, IGMMA on int8),
with no spills, and under PDL touches nothing before griddepcontrol.wait (ACQBULK) and lets the next kernel
launch (PREEXIT) only once its last wgmma is issued (pdl.TRIGGER 1). Their numerics are tests/test_triton_quant.py's
(interpreter) and its GPU tests."""

from __future__ import annotations

import re

import pytest

from tests.test_triton_quant import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its sm_90 compiler, ptxas and nvdisasm ship "
                                                        "with it)")

_OUT = {"xs_ptr": "*fp32", "ws_ptr": "*fp32", "b_ptr": "*bf16", "out_ptr": "*bf16", "part_ptr": "*fp32",
        "lock_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32"}
_ALIGNED = ("out_ptr", "part_ptr", "lock_ptr", "N", "K")


def _compiled(kernel: str, block_k: int, **const):
    from bench.wna16_gluon import ptxas_report, sass_of, triton_compile_sm90
    from runtime.ops import triton_w8a8_kernels as k8

    fn = getattr(k8, kernel)
    if kernel == "_w8a8_swap_tma_kernel":
        sig = {"a_desc": f"tensordesc<fp8e4nv[16, {block_k}]>", "w_desc": f"tensordesc<fp8e4nv[64, {block_k}]>"}
    else:
        sig = {"a_ptr": "*i8", "w_ptr": "*i8"}
    const = dict(TILES=8, HAS_BIAS=False, SPLIT=1, SERIAL=False, BLOCK_M=16, BLOCK_N=64, BLOCK_K=block_k, PDL=True,
                 **const)
    kern = triton_compile_sm90(fn, {**sig, **_OUT}, const, _ALIGNED + (("a_ptr", "w_ptr") if "a_ptr" in sig else ()),
                               num_warps=4, num_stages=4)
    return sass_of(kern), ptxas_report(kern)


@pytest.mark.parametrize("kernel,block_k,mma,const", [
    ("_w8a8_swap_tma_kernel", 128, "QGMMA.64x16x32.F32.E4M3.E4M3", {}),  # FP8_DECODE
    ("_w8a8_swap_tma_kernel", 256, "QGMMA.64x16x32.F32.E4M3.E4M3", {}),  # FP8_DECODE_NARROW
    ("_w8a8_gemm_kernel", 256, "IGMMA.64x16x32.S8.S8", dict(FP8=False, UPCAST=False, SWAP=True, EVEN=True)),  # INT8
])
def test_decode_gemms_use_wgmma_and_wait_before_touching_memory(kernel, block_k, mma, const):
    sass, report = _compiled(kernel, block_k, **const)
    assert mma in sass, sorted(set(re.findall(r"[A-Z]GMMA\.\S+", sass)))
    assert "0 bytes spill stores" in report, report
    wait, trigger = sass.index("ACQBULK"), sass.index("PREEXIT")
    head = sass[:wait]
    assert "LDG" not in head, head  # nothing read before the wait (LDG, LDGSTS or UTMALDG)
    assert trigger > sass.rindex("GMMA"), "launch_dependents before the K loop's last wgmma"
