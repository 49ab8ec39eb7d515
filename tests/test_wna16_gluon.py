"""The Gluon W4A16 decode GEMM prototype (bench/wna16_gluon.py) on pack_wna16_mma's layout.

CPU: the kernel compiles for sm_90 with the bundled ptxas, every layout conversion it asserts trivial is
trivial (the codes read from shared memory land in exactly the registers wgmma's A operand wants), and the SASS
moves nothing through shared memory on the way (no STS) while issuing 8 HGMMA per K tile. GPU (``pytest -m
gpu``): its output against the float32 reference on the same codes (bf16 and fp16, 1 to 16 rows, split-K serial,
the tile-per-stage, deferred-scale and early-load variants).
"""

from __future__ import annotations

import pytest
import torch

from runtime.ops.quant_linear import pack_mma_zeros, pack_wna16_mma
from tests.test_triton_quant import HAS_TRITON, NO_GPU, NO_GPU_REASON, check, gen, wna16_case

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (the Gluon frontend ships with it)")


@pytest.mark.parametrize("block_m,tps,stages,split,defer,pre", [(8, 2, 3, 1, True, True), (16, 1, 4, 2, True, False),
                                                                  (16, 2, 3, 2, False, False)])
def test_compiles_for_hopper_with_the_operand_in_registers(block_m, tps, stages, split, defer, pre):
    from bench.wna16_gluon import compile_only

    _, sass, counts = compile_only(block_m, tps, stages, split, defer, pre, tiles=8)
    assert counts["HGMMA"] == 8 * tps, counts  # one K = 128 tile: 8 x HGMMA.64xNx16 per tile, each unrolled tile
    assert counts["STS"] == (1 if split > 1 else 0), counts  # only split-K's atomic result, shared with all threads
    assert f"HGMMA.64x{block_m}x16.F32" in sass


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_the_reference_on_gpu(dtype):
    from bench.wna16_gluon import linear_wna16_gluon
    from runtime.ops.quant_linear import linear_wna16_ref

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("wgmma needs sm_90")
    for k, n in ((512, 128), (1024, 384)):
        g = gen("gluon", k, n, str(dtype))
        qw, scales, zeros, _ = wna16_case(k, n, 4, 128, False, dtype, g)
        qmma, zw = pack_wna16_mma(qw).cuda(), pack_mma_zeros(scales, zeros).cuda()
        for m in (1, 5, 16):
            x = (torch.randn(m, k, generator=g) * 0.5).to(dtype).cuda()
            ref = linear_wna16_ref(x, qw.cuda(), scales.cuda(), zeros.cuda(), None, None, 4, 128)
            for kw in (dict(block_m=8 if m <= 8 else 16, tps=2, stages=3, split=1, defer=True, pre=True),
                       dict(block_m=16, tps=1, stages=4, split=2, defer=True, pre=False),
                       dict(block_m=16, tps=2, stages=2, split=2, defer=False, pre=True)):
                check(linear_wna16_gluon(x, qmma, zw, **kw), ref, f"k{k} n{n} m{m} {kw}")
