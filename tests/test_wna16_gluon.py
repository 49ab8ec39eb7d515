"""The Gluon W4A16 decode GEMM (runtime/ops/wna16_gluon.py) on pack_wna16_mma's layout.

CPU: the kernel compiles for sm_90 with the bundled ptxas, every layout conversion it asserts trivial is
trivial (the codes read from shared memory land in exactly the registers wgmma's A operand wants), and the SASS
moves nothing through shared memory on the way (no STS) while issuing 8 HGMMA per K tile; so does the bench's
warp-specialized twin (bench/wna16_gluon.py). GPU (``pytest -m
gpu``): its output against the float32 reference on the same codes (bf16 and fp16, 1 to 16 rows, split-K serial,
the tile-per-stage, deferred-scale and early-load variants), and through triton_wna16_mma.linear_wna16_mma_cuda with
WNA16_MMA_GLUON: launched exactly where it applies (with bias, under PDL, in a CUDA graph), the Triton kernels
otherwise. The residual add + RMSNorm carried by two GEMMs' epilogues (quant_linear.linear_wna16_mma_add_norm /
_rms): compiled for sm_90 on the CPU (the K loop unchanged, the loads it adds after the PDL wait), and on the GPU
against the float32 reference of linear -> add -> RMSNorm -> linear. Likewise the SiLU-and-multiply carried by the
gate_up GEMM's epilogue (quant_linear.linear_wna16_mma_silu) against silu_and_mul of the reference linear.
"""

from __future__ import annotations

import pytest
import torch

from runtime.ops.quant_linear import pack_mma_zeros, pack_wna16_mma
from tests.test_triton_quant import HAS_TRITON, NO_GPU, NO_GPU_REASON, check, gen, wna16_case

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (the Gluon frontend ships with it)")


@pytest.mark.parametrize("block_m,tps,stages,split,defer,pre,extra", [
    (8, 2, 3, 1, True, True, False), (16, 1, 4, 2, True, False, False), (16, 2, 3, 2, False, False, False),
    (8, 1, 4, 2, True, True, True)])
def test_compiles_for_hopper_with_the_operand_in_registers(block_m, tps, stages, split, defer, pre, extra):
    from bench.wna16_gluon import compile_only

    _, sass, counts = compile_only(block_m, tps, stages, split, defer, pre, tiles=8, bias=extra, pdl=extra)
    assert counts["HGMMA"] == 8 * tps, counts  # one K = 128 tile: 8 x HGMMA.64xNx16 per tile, each unrolled tile
    assert counts["STS"] == (1 if split > 1 else 0), counts  # only split-K's atomic result, shared with all threads
    assert f"HGMMA.64x{block_m}x16.F32" in sass


def test_under_pdl_the_weights_are_read_before_the_wait():
    """Launched with PDL, the kernel's first stages of codes and zero points (2 TMA loads a stage) and the L2
    prefetch are issued before griddepcontrol.wait (ACQBULK); x's loads only after it. With EARLY off nothing is."""
    from bench.wna16_gluon import compile_sm90, sass_of

    def before_wait(**flags):
        sass = sass_of(compile_sm90(False, 8, 1, 3, 1, 16, DEFER=True, PRE=True, PDL=True, **flags))
        head = sass[:sass.index("ACQBULK")]
        return head.count("UTMALDG"), head.count("UBLKPF"), sass.count("UTMALDG")

    assert before_wait(L2PF=4)[:2] == (6, 1)
    assert before_wait(EARLY=False)[:2] == (0, 0)
    assert before_wait()[2] == before_wait(EARLY=False)[2]  # the same loads, only moved


def test_where_it_lets_the_next_kernel_launch():
    """griddepcontrol.launch_dependents (PREEXIT) once the K loop's last wgmma is issued (pdl.TRIGGER 1, 2), or
    at pdl.TRIGGER 3 before the wait (ACQBULK), after the first stages' loads; never twice."""
    from bench.wna16_gluon import compile_sm90, sass_of

    for level in (1, 2, 3):
        sass = sass_of(compile_sm90(False, 8, 1, 3, 1, 16, DEFER=True, PRE=True, PDL=level))
        assert sass.count("PREEXIT") == 1, level
        at, wait = sass.index("PREEXIT"), sass.index("ACQBULK")
        if level < 3:
            assert at > sass.rindex("HGMMA"), level
        else:
            assert sass[:at].count("UTMALDG") == 6 and at < wait and "HGMMA" not in sass[:at]


def test_short_kernels_let_the_next_one_launch_before_their_wait_at_trigger_2():
    """pdl_enter, the start of the short kernels under PDL: launch_dependents (PREEXIT) after the wait (ACQBULK)
    at pdl.TRIGGER 1, before it from 2; nothing read before either (sm_90 compiles of the SiLU-and-multiply
    kernel)."""
    from bench.wna16_gluon import triton_sass_sm90
    from runtime.ops import triton_elementwise as te

    sig = {"x_ptr": "*bf16", "out_ptr": "*bf16", "stride_x": "i32"}
    for level in (1, 2):
        sass = triton_sass_sm90(te._silu_and_mul_kernel, sig, {"inter": 1024, "BLOCK": 1024, "PDL": level})
        at, wait = sass.index("PREEXIT"), sass.index("ACQBULK")
        assert (at < wait) == (level >= 2), level
        assert "LDG" not in sass[:max(at, wait)], level


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
        qw, scales, zeros = qw.cuda(), scales.cuda(), zeros.cuda()
        for m in (1, 5, 16):
            x = (torch.randn(m, k, generator=g) * 0.5).to(dtype).cuda()
            ref = linear_wna16_ref(x, qw, scales, zeros, None, None, 4, 128)
            for kw in (dict(block_m=8 if m <= 8 else 16, tps=2, stages=3, split=1, defer=True, pre=True),
                       dict(block_m=16, tps=1, stages=4, split=2, defer=True, pre=False),
                       dict(block_m=16, tps=2, stages=2, split=2, defer=False, pre=True),
                       # launched with PDL: weights loaded before the wait, and up to 4 more tiles prefetched
                       dict(block_m=8 if m <= 8 else 16, tps=1, stages=2, split=1, pre=True, pdl=True, l2pf=4),
                       # ... letting the next kernel launch before its wait (pdl.TRIGGER 3), split-K
                       dict(block_m=8 if m <= 8 else 16, tps=1, stages=2, split=2, pre=True, pdl=3),
                       # ... with as many stages as the program has K tiles or more (all loaded before the wait)
                       dict(block_m=8 if m <= 8 else 16, tps=1, stages=8, split=1, pre=True, pdl=3)):
                check(linear_wna16_gluon(x, qmma, zw, **kw), ref, f"k{k} n{n} m{m} {kw}")


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
def test_launcher_selects_it_where_it_applies(monkeypatch):
    from runtime.ops import pdl
    from runtime.ops import triton_wna16_mma as tm
    from runtime.ops import wna16_gluon as wg
    from runtime.ops.quant_linear import linear_wna16_ref
    from tests.conftest import KernelLaunches, capture_graph

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is sm_90 only (wgmma)")
    dtype, k, n = torch.bfloat16, 1024, 384
    g = gen("gluon-launcher", k, n)
    qw, scales, zeros, _ = wna16_case(k, n, 4, 128, False, dtype, g)
    qmma, zw = pack_wna16_mma(qw).cuda(), pack_mma_zeros(scales, zeros).cuda()
    bias = torch.randn(n, generator=g).to(dtype).cuda()
    qw, scales, zeros = qw.cuda(), scales.cuda(), zeros.cuda()
    monkeypatch.setattr(tm, "WNA16_MMA_GLUON_MAX_M", 16)
    with KernelLaunches(wg, "wna16_gluon_kernel") as launched:
        for m, b, use_pdl in ((1, None, False), (5, bias, True), (16, bias, False)):
            monkeypatch.setattr(pdl, "ENABLED", use_pdl)
            x = torch.randn(m, k, generator=g).to(dtype).cuda()
            before = launched.n
            out = tm.linear_wna16_mma_cuda(x, qmma, scales, zw, None, b, 128)
            assert launched.n == before + 1, f"m={m}: the Gluon kernel did not run"
            check(out, linear_wna16_ref(x, qw, scales, zeros, None, b, 4, 128), f"m={m}")
        # rows not 16-byte aligned: TMA cannot read x, so the Triton kernels run instead (same result)
        xs = torch.randn(3, k + 1, generator=g).to(dtype).cuda()[:, 1:]
        before = launched.n
        out = tm.linear_wna16_mma_cuda(xs, qmma, scales, zw, None, None, 128)
        assert launched.n == before
        check(out, linear_wna16_ref(xs, qw, scales, zeros, None, None, 4, 128), "unaligned")
        # and inside a CUDA graph, replayed on new inputs
        x = torch.randn(1, k, generator=g).to(dtype).cuda()
        graph, out = capture_graph(lambda: tm.linear_wna16_mma_cuda(x, qmma, scales, zw, None, None, 128))
        x.copy_(torch.randn(1, k, generator=g).to(dtype))
        graph.replay()
        check(out, linear_wna16_ref(x, qw, scales, zeros, None, None, 4, 128), "graph")


@pytest.mark.parametrize("flags", [{"ADD": True}, {"RMS": True}, {"RMS": True, "HAS_BIAS": True}, {"SILU": True},
                                   {"SILU": True, "RMS": True}])
def test_norm_epilogue_variants_compile_for_hopper(flags):
    """The norm carried by the epilogues (ADD: the producer's residual add, weighted output and sums of squares;
    RMS: the consumer's 1 / RMS from those sums) and the SiLU-and-multiply (SILU: the gate and up tiles' exchange)
    add nothing to the K loop (8 HGMMA, as without), and under PDL every global load they add (the residual and
    norm weight, the sums of squares, the other tile: the previous kernel's or this one's outputs) comes after
    griddepcontrol.wait (ACQBULK); the kernel without them has no plain global load."""
    import re

    from bench.wna16_gluon import compile_sm90, sass_of

    for split in (1, 4):
        sass = sass_of(compile_sm90(False, 8, 1, 3, split, 16, DEFER=True, PRE=True, PDL=True, **flags))
        wait = sass.index("ACQBULK")
        assert sass.count(" HGMMA") == 8
        assert not re.findall(r" LDG", sass[:wait]) and re.findall(r" LDG", sass[wait:]), flags
    plain = sass_of(compile_sm90(False, 8, 1, 3, 1, 16, DEFER=True, PRE=True, PDL=True))
    assert not re.findall(r" LDG", plain)


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_carried_by_the_epilogues_matches_the_unfused_path_on_gpu(dtype, monkeypatch):
    """linear_wna16_mma_add_norm -> linear_wna16_mma_rms (quant_linear) against the float32 reference of
    linear -> residual add -> RMSNorm -> linear, up to 8 rows through the Gluon kernel's epilogues (the norm
    kernel never runs; split-K and a CUDA graph included) and above that in the normed form."""
    from runtime.ops import triton_elementwise as te
    from runtime.ops import triton_wna16_mma as tm
    from runtime.ops import wna16_gluon as wg
    from runtime.ops.norm import rms_norm_ref
    from runtime.ops.quant_linear import linear_wna16_ref
    from tests.conftest import KernelLaunches, capture_graph

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is sm_90 only (wgmma)")
    k1, hidden, n2 = 1024, 512, 384  # x [M, k1] -> hidden (the residual stream) -> n2; split-K in both GEMMs
    g = gen("norm-epilogue", str(dtype))
    qw1, s1, z1, _ = wna16_case(k1, hidden, 4, 128, False, dtype, g)
    qw2, s2, z2, _ = wna16_case(hidden, n2, 4, 128, False, dtype, g)
    a = (pack_wna16_mma(qw1).cuda(), s1.cuda(), pack_mma_zeros(s1, z1).cuda())
    b = (pack_wna16_mma(qw2).cuda(), s2.cuda(), pack_mma_zeros(s2, z2).cuda())
    nw = (1 + 0.3 * torch.randn(hidden, generator=g)).to(dtype).cuda()
    bias = torch.randn(n2, generator=g).to(dtype).cuda()
    eps = 1e-5

    def pair(x, res):
        total, h, ss = torch.ops.spanda.linear_wna16_mma_add_norm(x, a[0], a[1], a[2], None, None, 128, res, nw, eps)
        return total, torch.ops.spanda.linear_wna16_mma_rms(h, b[0], b[1], b[2], None, bias, 128, ss, eps)

    def reference(x, res):
        y = linear_wna16_ref(x.cpu(), qw1, s1, z1, None, None, 4, 128).cuda()
        total = y + res
        normed = rms_norm_ref(total.float(), nw.float(), eps)
        return total, linear_wna16_ref(normed.cpu(), qw2, s2.float(), z2, None, bias.float().cpu(), 4,
                                       128).to(dtype).cuda()

    with KernelLaunches(wg, "wna16_gluon_kernel") as gluon, KernelLaunches(te, "_rms_norm_kernel") as norms:
        for m in (1, 3, 8, 12):
            x = torch.randn(m, k1, generator=g).to(dtype).cuda()
            res = torch.randn(m, hidden, generator=g).to(dtype).cuda()
            before, norms_before = gluon.n, norms.n
            total, out = pair(x, res)
            ref_total, ref_out = reference(x, res)
            fused = m <= tm.WNA16_MMA_GLUON_MAX_M
            assert tm.norm_in_epilogue(m, x.device) == fused
            assert (gluon.n - before, norms.n - norms_before) == ((2, 0) if fused else (0, 1)), m
            check(total, ref_total, f"residual sum m={m}")
            check(out, ref_out, f"output m={m}")
        x = torch.randn(1, k1, generator=g).to(dtype).cuda()
        res = torch.randn(1, hidden, generator=g).to(dtype).cuda()
        graph, (total, out) = capture_graph(lambda: pair(x, res))
        x.copy_(torch.randn(1, k1, generator=g).to(dtype))
        res.copy_(torch.randn(1, hidden, generator=g).to(dtype))
        graph.replay()
        ref_total, ref_out = reference(x, res)
        check(total, ref_total, "graph residual sum")
        check(out, ref_out, "graph output")
    # switched off: the normed form (the GEMM, then the norm kernel), the same function
    monkeypatch.setattr(tm, "WNA16_NORM_EPILOGUE", False)
    assert not tm.norm_in_epilogue(1, x.device)
    with KernelLaunches(te, "_rms_norm_kernel") as norms:
        total, out = pair(x, res)
    assert norms.n == 1
    check(out, ref_out, "normed form")


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_carried_by_the_epilogue_matches_the_unfused_path_on_gpu(dtype, monkeypatch):
    """linear_wna16_mma_silu (quant_linear) against silu_and_mul of the float32 reference linear: up to 8 rows
    the Gluon kernel's epilogue pairs each gate tile with its up tile (the silu_and_mul kernel never runs), with
    split-K (a small N) and without (a wide one), after linear_wna16_mma_add_norm (the norm's epilogue form) and
    in a CUDA graph replayed twice (the pair counters re-armed); above 8 rows, or switched off, the GEMM and the
    silu_and_mul kernel."""
    from runtime.ops import triton_elementwise as te
    from runtime.ops import triton_wna16_mma as tm
    from runtime.ops import wna16_gluon as wg
    from runtime.ops.activation import silu_and_mul_ref
    from runtime.ops.norm import rms_norm_ref
    from runtime.ops.quant_linear import linear_wna16_ref
    from tests.conftest import KernelLaunches, capture_graph

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is sm_90 only (wgmma)")
    g = gen("silu-epilogue", str(dtype))
    silu = torch.ops.spanda.linear_wna16_mma_silu

    def case(k, n):
        qw, s, z, _ = wna16_case(k, n, 4, 128, False, dtype, g)
        return qw, s, z, (pack_wna16_mma(qw).cuda(), s.cuda(), pack_mma_zeros(s, z).cuda())

    def reference(x, qw, s, z):
        return silu_and_mul_ref(linear_wna16_ref(x.cpu(), qw, s, z, None, None, 4, 128)).cuda()

    with KernelLaunches(wg, "wna16_gluon_kernel") as gluon, KernelLaunches(te, "_silu_and_mul_kernel") as acts:
        for k, n in ((1024, 256), (256, 17408)):  # split-K over 4 tiles; no split over 272
            qw, s, z, w = case(k, n)
            for m in (1, 3, 8, 12):
                x = torch.randn(m, k, generator=g).to(dtype).cuda()
                before = (gluon.n, acts.n)
                out = silu(x, *w, None, None, 128, None, 0.0)
                fused = m <= tm.WNA16_MMA_GLUON_MAX_M
                assert (gluon.n - before[0], acts.n - before[1]) == ((1, 0) if fused else (0, 1)), (k, n, m)
                check(out, reference(x, qw, s, z), f"k{k} n{n} m={m}")
        # after the norm's producer: the product scaled by 1 / RMS, then the SiLU-and-multiply
        k1, hidden, eps = 512, 1024, 1e-5
        qw1, s1, z1, a = case(k1, hidden)
        qw2, s2, z2, b = case(hidden, 512)
        nw = (1 + 0.3 * torch.randn(hidden, generator=g)).to(dtype).cuda()
        x = torch.randn(2, k1, generator=g).to(dtype).cuda()
        res = torch.randn(2, hidden, generator=g).to(dtype).cuda()

        def pair():
            total, h, ss = torch.ops.spanda.linear_wna16_mma_add_norm(x, *a, None, None, 128, res, nw, eps)
            return silu(h, *b, None, None, 128, ss, eps)

        def pair_reference():
            total = linear_wna16_ref(x.cpu(), qw1, s1, z1, None, None, 4, 128).cuda() + res
            normed = rms_norm_ref(total.float(), nw.float(), eps).cpu()
            y = linear_wna16_ref(normed, qw2, s2.float(), z2, None, None, 4, 128).to(dtype)
            return silu_and_mul_ref(y).cuda()

        before = (gluon.n, acts.n)
        check(pair(), pair_reference(), "after the norm's epilogue")
        assert (gluon.n - before[0], acts.n - before[1]) == (2, 0)
        graph, out = capture_graph(pair)
        for _ in range(2):
            x.copy_(torch.randn(2, k1, generator=g).to(dtype))
            graph.replay()
            check(out, pair_reference(), "graph")
    monkeypatch.setattr(tm, "WNA16_SILU_EPILOGUE", False)
    with KernelLaunches(te, "_silu_and_mul_kernel") as acts:
        out = pair()
    assert acts.n == 1
    check(out, pair_reference(), "switched off")


def test_warp_specialized_twin_compiles_for_hopper():
    """bench/wna16_gluon.py's warp-specialized variant (timed next to the kernel): one TMA warp, one warpgroup."""
    from bench.wna16_gluon import compile_sm90, sass_of

    kern = compile_sm90(True, 8, 2, 3, 2, tiles=8)
    assert sum(" HGMMA" in ln for ln in sass_of(kern).splitlines()) == 16, "8 HGMMA per K tile, 2 tiles per stage"
    assert kern.metadata.num_warps == 8  # the warpgroup and the TMA warp, rounded to whole warpgroups
