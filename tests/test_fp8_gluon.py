"""The Gluon FP8 decode GEMM (runtime/ops/fp8_gluon.py; off by default: triton_w8a8.FP8_GLUON).

CPU: it compiles for sm_90 to E4M3 wgmma (QGMMA, one per 32 of K, one stage's left in flight), with no spills;
launched with PDL it issues its first stages' weight loads, and only those, before griddepcontrol.wait (ACQBULK),
and lets the next kernel launch after its last wgmma (pdl.TRIGGER 1, 2) or right after those loads (3). GPU
(``pytest -m gpu``): its output against the float32 product of the same codes and scales (bf16 and fp16, 1 to 16
rows, K tiles of 128 and 256, serial split-K, bias, PDL levels), and through triton_w8a8's launcher with FP8_GLUON
on: launched exactly where it applies, also inside a CUDA graph.
"""

from __future__ import annotations

import re

import pytest
import torch

from compiler.quantize.layout import fp8_weight
from tests.conftest import KernelLaunches
from tests.test_triton_quant import HAS_TRITON, NO_GPU, NO_GPU_REASON, check, gen

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (the Gluon frontend ships with it)")


def _sass(block_m=16, block_k=128, stages=4, split=1, tiles=8, **flags) -> tuple[str, str]:
    """fp8_gluon_kernel compiled for sm_90 without a GPU (bf16 output), with the launcher's alignment
    specialization: (SASS, ptxas -v's report)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from bench.wna16_gluon import ptxas_report, sass_of
    from runtime.ops import fp8_gluon as fg

    xl, wl = fg.layouts(block_m, block_k)
    sig = {"x_desc": f"tensordesc<fp8e4nv[{block_m}, {block_k}],{xl!r}>",
           "w_desc": f"tensordesc<fp8e4nv[64, {block_k}],{wl!r}>", "xs_ptr": "*fp32", "ws_ptr": "*fp32",
           "b_ptr": "*bf16", "out_ptr": "*bf16", "part_ptr": "*fp32", "lock_ptr": "*i32", "M": "i32", "N": "i32",
           "K": "i32"}
    const = dict(TILES=tiles, STAGES=stages, BLOCK_M=block_m, BLOCK_K=block_k, SPLIT=split, BF16=True,
                 **{"HAS_BIAS": False, "PDL": False, "EARLY": True, **flags})
    sig.update({k: "constexpr" for k in const})
    fn = fg.fp8_gluon_kernel
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]]
             for k in ("xs_ptr", "ws_ptr", "out_ptr", "part_ptr", "lock_ptr", "N", "K")}
    kern = triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    return sass_of(kern), ptxas_report(kern)


@pytest.mark.parametrize("block_m,block_k,stages,split", [(16, 128, 4, 1), (8, 256, 4, 2), (16, 256, 2, 1)])
def test_compiles_to_fp8_wgmma_with_one_in_flight(block_m, block_k, stages, split):
    sass, report = _sass(block_m, block_k, stages, split, HAS_BIAS=split > 1)
    mma = f"QGMMA.64x{block_m}x32.F32.E4M3.E4M3"
    assert sass.count(mma) == block_k // 32, sorted(set(re.findall(r"[A-Z]GMMA\.\S+", sass)))
    assert "0 bytes spill stores" in report, report
    waits = re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", sass)
    assert waits == ["0x1", "0x0"], waits  # in the loop one wgmma stays in flight; drained once after it


def test_under_pdl_only_the_weights_are_read_before_the_wait():
    """The first STAGES weight boxes are issued before griddepcontrol.wait, x's boxes and every plain load after
    it; with EARLY off nothing is read before it. The trigger: after the last wgmma, or at level 3 before the wait
    (after the weight loads)."""
    for level in (1, 2, 3):
        sass, _ = _sass(stages=3, PDL=level)
        wait, trigger = sass.index("ACQBULK"), sass.index("PREEXIT")
        head = sass[:wait]
        assert head.count("UTMALDG") == 3 and not re.search(r"\sLDG", head), level
        if level < 3:
            assert trigger > sass.rindex("GMMA"), level
        else:
            assert trigger < wait and sass[:trigger].count("UTMALDG") == 3, level
    sass, _ = _sass(stages=3, PDL=1, EARLY=False)
    assert "UTMALDG" not in sass[:sass.index("ACQBULK")]


def test_the_launcher_routes_only_decode_shapes_on_sm90_to_it(monkeypatch):
    """triton_w8a8._fp8_gluon's rules (asked by _w8a8_gemm where FP8_GLUON is on), on the CPU with the kernel
    replaced by a recorder and sm_90 pretended: a swapped 64-channel config, 1 to 16 rows (block_m 8 up to 8), whole
    K tiles, 16-byte aligned codes; the config's K tile, FP8_GLUON_STAGES and _choose_split's split (as the Triton
    kernel's) passed on."""
    from runtime.ops import fp8_gluon as fg
    from runtime.ops import triton_gemm as tgm
    from runtime.ops import triton_w8a8 as t8

    calls = []
    monkeypatch.setattr(fg, "linear_fp8_gluon", lambda *args, **kw: calls.append(kw))
    monkeypatch.setattr(t8, "capability", lambda device: (9, 0))
    monkeypatch.setattr(t8, "FP8_GLUON_STAGES", 5)
    e4m3 = torch.float8_e4m3fn

    def routed(m, n, k, cfg=t8.FP8_DECODE_NARROW, offset=0):
        calls.clear()
        xq = torch.zeros(m * k + offset, dtype=torch.uint8)[offset:].view(e4m3).view(m, k)
        w = torch.zeros(n, k, dtype=e4m3)
        done = t8._fp8_gluon(xq, w, torch.ones(m, 1), torch.ones(n), None, torch.empty(m, n), cfg)
        assert done == bool(calls)
        return calls[0] if calls else None

    kw = routed(1, 1024, 4096)  # o_proj-like: 16 tiles of 64 channels, K tiles of 256
    split = tgm._choose_split(t8.FP8_DECODE_NARROW, 16, 16, torch.device("cpu"))
    assert kw == dict(block_m=8, block_k=256, stages=5, split=split, pdl=0) and split > 1
    assert routed(16, 6144, 4096, t8.FP8_DECODE)["block_m"] == 16
    assert routed(9, 128, 256, t8.FP8_DECODE)["block_m"] == 16
    assert routed(17, 1024, 4096) is None  # more rows than one wgmma N
    assert routed(2, 96, 4096) is None  # not whole 64-channel tiles
    assert routed(2, 1024, 4000) is None  # not whole K tiles
    assert routed(2, 1024, 4096, offset=8) is None  # codes not 16-byte aligned for TMA
    assert routed(2, 1024, 4096, tgm.GemmConfig(16, 64, 128)) is None  # not the swapped layout
    monkeypatch.setattr(t8, "capability", lambda device: (10, 0))
    assert routed(1, 1024, 4096) is None  # wgmma is sm_90's


def _case(k: int, n: int, m: int, dtype: torch.dtype, g: torch.Generator, bias: bool):
    """(codes [m, k], row scales [m, 1], weight, column scales [n], bias, the float32 reference in dtype) on CUDA."""
    from runtime.ops import triton_act_quant as taq

    wt = fp8_weight(torch.randn(n, k, generator=g) * 0.05, per_channel=True)
    x = (torch.randn(m, k, generator=g) * 2).to(dtype).cuda()
    b = torch.randn(n, generator=g).to(dtype).cuda() if bias else None
    xq, sx = taq.quantize_rows(x, None, torch.float8_e4m3fn)
    w, ws = wt["weight"].cuda(), wt["weight_scale"].float().reshape(n).cuda()
    ref = ((xq.float() * sx) @ (w.float() * ws[:, None]).t() + (b.float() if bias else 0)).to(dtype)
    return xq, sx, w, ws, b, ref


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_the_reference_on_gpu(dtype):
    from runtime.ops import fp8_gluon as fg
    from runtime.ops import triton_gemm as tgm

    if torch.cuda.get_device_capability()[0] != 9 or not fg.AVAILABLE:
        pytest.skip("the kernel is sm_90 wgmma (Gluon)")
    g = gen("fp8-gluon", str(dtype))
    for k, n in ((512, 128), (1024, 384)):
        for m in (1, 5, 8, 16):
            xq, sx, w, ws, b, ref = _case(k, n, m, dtype, g, bias=m % 2 == 1)
            for block_k, stages, split, pdl in ((128, 4, 1, 0), (128, 2, 2, 1), (256, 3, 1, 3), (128, 3, 4, 1),
                                                (256, 4, 2, 2)):
                out = torch.empty_like(ref)
                fg.linear_fp8_gluon(xq, sx, w, ws, b, out, block_m=8 if m <= 8 else 16, block_k=block_k,
                                    stages=stages, split=split, pdl=pdl)
                check(out, ref, f"fp8 gluon m={m} k={k} n={n} block_k={block_k} split={split} pdl={pdl}")
                assert not tgm._locks(xq.device).any(), "serial split-K left its tile counters armed"


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
def test_the_launcher_runs_it_where_it_applies_on_gpu(monkeypatch):
    from runtime.ops import fp8_gluon as fg
    from runtime.ops import triton_w8a8 as t8

    if torch.cuda.get_device_capability()[0] != 9 or not fg.AVAILABLE:
        pytest.skip("the kernel is sm_90 wgmma (Gluon)")
    monkeypatch.setattr(t8, "FP8_GLUON", True)
    g = gen("fp8-gluon-launcher")
    dtype = torch.bfloat16
    # (k, n, m, launched): whole tiles up to 16 rows; 17 rows and N = 96 (not whole 64-channel tiles) are not its
    for k, n, m, launched in ((4096, 1024, 1, True), (1024, 6144, 16, True), (1024, 512, 17, False),
                              (512, 96, 2, False)):
        xq, sx, w, ws, b, ref = _case(k, n, m, dtype, g, bias=True)
        with KernelLaunches(fg, "fp8_gluon_kernel") as gl_launches:
            out = t8._fp8_codes_mm(xq, sx, w, ws, False, b, dtype, path="triton" if m <= 16 else None)
        check(out, ref, f"launcher k={k} n={n} m={m}")
        assert gl_launches.n == int(launched), (k, n, m, gl_launches.n)
    # captured in a CUDA graph with PDL, as the decode graphs run it
    from runtime.ops import pdl

    xq, sx, w, ws, b, ref = _case(4096, 1024, 3, dtype, g, bias=False)
    monkeypatch.setattr(pdl, "ENABLED", True)
    t8._fp8_codes_mm(xq, sx, w, ws, False, b, dtype, path="triton")  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = t8._fp8_codes_mm(xq, sx, w, ws, False, b, dtype, path="triton")
    graph.replay()
    torch.cuda.synchronize()
    check(out, ref, "launcher in a CUDA graph")
