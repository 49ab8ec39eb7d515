"""Quantized linear fast paths (runtime/ops/triton_quant.py's map) against the float32 references of quant_linear.py.

GPU tests (``pytest -m gpu``): fresh random inputs per case (M in 1, 3, 16, 33, 257 covers split-K decode,
mid and large tiles; K and N odd multiples of the group size or of 16; 4/8 bits; group sizes 32, 128 and -1;
act-order; bias; bf16 and fp16), outputs poisoned-then-checked through fresh buffers, the ops dispatched
through torch.ops.spanda on CUDA, and CUDA-graph capture + replay on new inputs. The FP8/INT8 references
emulate the activation quantization exactly, so differences come only from accumulation order and the
rounding of the output; the activation codes and scales themselves must match exactly.
A CPU test runs the Triton kernels under ``TRITON_INTERPRET=1`` on tiny shapes (fp16 only: the interpreter
rounds bfloat16 by truncation): wna16 with every variant (act-order, split-K, per-channel, both unpackers,
both scale placements, the dequantize kernel), the activation quantizers and the Triton int8 GEMM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import zlib

import pytest
import torch

import runtime.ops  # noqa: F401
from compiler.quantize.layout import fp8_weight, int8_weight, wna16_tensors
from compiler.quantize.rtn import quantize_rtn
from runtime.ops import triton_act_quant as taq
from runtime.ops import triton_gemm as tgm
from runtime.ops import triton_w8a8 as t8
from runtime.ops import triton_wna16 as tw
from runtime.ops.quant_linear import (
    dequantize_wna16,
    linear_fp8_ref,
    linear_int8_ref,
    linear_wna16_ref,
    quantize_activation_fp8,
    quantize_activation_int8,
)
from tests.conftest import KernelLaunches, capture_graph, run_under_interpreter

HAS_TRITON = importlib.util.find_spec("triton") is not None
NO_GPU = not (torch.cuda.is_available() and HAS_TRITON)
NO_GPU_REASON = "needs a CUDA GPU and triton (run with -m gpu on the device)"
REL = {torch.bfloat16: 6e-3, torch.float16: 1.5e-3}  # ||out - ref|| / ||ref||
MAX = {torch.bfloat16: 2.5e-2, torch.float16: 6e-3}  # max |out - ref| / max |ref|
MS = [1, 3, 16, 33, 257]
spanda = torch.ops.spanda


def check(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (what, out.shape, ref.shape, out.dtype, ref.dtype)
    bad = ~torch.isfinite(out)
    assert not bad.any(), f"{what}: {int(bad.sum())} non-finite, first at {bad.nonzero()[0].tolist()}"
    o, r = out.double(), ref.double()
    rel = ((o - r).norm() / r.norm().clamp_min(1e-30)).item()
    mx = ((o - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
    assert rel <= REL[out.dtype] and mx <= MAX[out.dtype], f"{what}: relative error {rel:.2e}, max {mx:.2e}"


def gen(*key, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(zlib.crc32(repr(key).encode()))


def wna16_case(k: int, n: int, bits: int, gs: int, act_order: bool, dtype: torch.dtype, g: torch.Generator):
    """RTN-quantized random weight (asymmetric: varied zero points) in the op's layout; act-order draws a
    random g_idx with group_size channels per group, so the stored rows are a random permutation."""
    ql = quantize_rtn(torch.randn(n, k, generator=g), bits, gs, symmetric=False)
    if act_order:
        ql = dataclasses.replace(ql, g_idx=(torch.randperm(k, generator=g) // (k if gs == -1 else gs)).int())
    t = wna16_tensors(ql, dtype)
    return t["qweight"], t["scales"], t["zeros"], t.get("perm")


def to(device, *ts):
    return [t.to(device) if t is not None else None for t in ts]


def cuda_quant_ref(x: torch.Tensor, input_scale, dtype):
    """quantize_activation_fp8 / _int8 as torch computes them on CUDA, for the CPU interpreter test: torch divides
    a CUDA tensor by a Python scalar through the float32 reciprocal (amax / 448 -> amax * float32(1 / 448)),
    the CPU truly divides; the two scales can differ in the last bit."""
    qmax = 448.0 if dtype == torch.float8_e4m3fn else 127.0
    xf = x.float()
    if input_scale is None:
        s = (xf.abs().amax(-1, keepdim=True) * torch.tensor(1 / qmax, dtype=torch.float32)).clamp_min(1e-12)
    else:
        s = input_scale.float().reshape(1, 1)
    v = (xf / s).clamp(-qmax, qmax)
    return (v.to(dtype) if dtype == torch.float8_e4m3fn else torch.round(v).to(dtype)), s


# ------------------------------------------------------------------------------------------------- GPU

WNA16_CASES = [  # bits, group size, act-order, bias, dtype, K, N
    (4, 128, False, False, torch.bfloat16, 128 * 7, 1000),
    (4, 128, True, True, torch.float16, 128 * 7, 1000),
    (4, 32, True, False, torch.bfloat16, 32 * 13, 328),
    (4, -1, False, True, torch.bfloat16, 8 * 73, 520),
    (8, 128, False, True, torch.bfloat16, 128 * 5, 776),
    (8, 32, True, True, torch.float16, 32 * 13, 200),
    (8, -1, False, False, torch.float16, 1000, 96),
    (4, 128, False, True, torch.bfloat16, 4096, 6144),
]


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
@pytest.mark.parametrize("case", WNA16_CASES, ids=lambda c: f"w{c[0]}g{c[1]}{'a' if c[2] else ''}"
                         f"{'b' if c[3] else ''}-{str(c[4])[6:]}-{c[5]}x{c[6]}")
@pytest.mark.parametrize("m", MS)
def test_wna16(case, m):
    bits, gs, act, has_bias, dtype, k, n = case
    g = gen("wna16", case, m)
    qw, s, z, perm = to("cuda", *wna16_case(k, n, bits, gs, act, dtype, g))
    x = torch.randn(m, k, generator=g).to(dtype).cuda()
    bias = torch.randn(n, generator=g).to(dtype).cuda() if has_bias else None
    ref = linear_wna16_ref(x, qw, s, z, perm, bias, bits, gs)
    check(tw.linear_wna16_cuda(x, qw, s, z, perm, bias, bits, gs), ref, "linear_wna16_cuda")
    out = spanda.linear_wna16(x, qw, s, z, perm, bias, bits, gs)
    check(out, ref, "spanda.linear_wna16")
    cfg = dataclasses.replace(tw.wna16_config(m, n, k, bits), magic=True)  # the magic-number unpacker
    check(tw.linear_wna16_cuda(x, qw, s, z, perm, bias, bits, gs, config=cfg), ref, "linear_wna16_cuda magic")
    for cfg in GEMV_CONFIGS:  # the float32-FMA decode kernel, with and without serial split-K
        check(tw.linear_wna16_cuda(x, qw, s, z, perm, bias, bits, gs, config=cfg), ref, f"wna16 {cfg}")
    assert not tgm._locks(x.device).any(), "serial split-K left its tile counters armed"


GEMV_CONFIGS = [tgm.GemmConfig(1, 128, 128, split=0, gemv=True, serial=True), tgm.GemmConfig(4, 64, 128, gemv=True),
                tgm.GemmConfig(1, 128, 128, gemv=True, serial=True, prefetch=True, waves=4),
                tgm.GemmConfig(1, 256, 128, split=3, gemv=True, prefetch=True),
                tgm.GemmConfig(1, 128, 128, gemv=True, serial=True, prefetch=True, zsum=True, waves=4),
                tgm.GemmConfig(1, 64, 128, num_warps=2, gemv=True, serial=True, zsum=True),
                tgm.GemmConfig(2, 256, 256, num_warps=8, split=4, gemv=True, serial=True)]


VARIANTS = [dict(scale_acc=a, reshape=r, split=sp) for a in (True, False) for r in (True, False) for sp in (1, 4)]
VARIANTS += [dict(magic=True, scale_acc=a, reshape=r, split=4) for a, r in ((True, True), (False, True), (True, False))]
VARIANTS += [dict(serial=True, split=4), dict(serial=True, magic=True, split=0)]


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [5, 64, 300])
def test_wna16_variants(bits, m):
    """Every kernel variant the benchmark sweeps, and the dequantize + cuBLAS path."""
    k, n, gs = 1024, 392, 64
    g = gen("variants", bits, m)
    qw, s, z, perm = to("cuda", *wna16_case(k, n, bits, gs, True, torch.bfloat16, g))
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).cuda()
    bias = torch.randn(n, generator=g).to(torch.bfloat16).cuda()
    ref = linear_wna16_ref(x, qw, s, z, perm, bias, bits, gs)
    for bm, bn, bk, w in ((16, 64, 128, 4), (64, 128, 64, 4), (128, 128, 64, 8)):
        for v in VARIANTS:
            cfg = tgm.GemmConfig(bm, bn, bk, num_warps=w, **v)
            check(tw.linear_wna16_cuda(x, qw, s, z, perm, bias, bits, gs, config=cfg), ref, f"wna16 {cfg}")
    cfg = tgm.GemmConfig(128, 128, 64, dequant_mm=True)
    check(tw.linear_wna16_cuda(x, qw, s, z, perm, bias, bits, gs, config=cfg), ref, "wna16 dequant+mm")
    w_ref = dequantize_wna16(qw, s, z, bits, gs)
    w = tw.wna16_dequantize(qw, s, z, perm, bits, gs, torch.float32)
    torch.testing.assert_close(w[perm.long()], w_ref, rtol=1e-6, atol=1e-6)


FP8_CASES = [  # static input scale, per-channel weight scale, bias, dtype, K, N
    (False, True, False, torch.bfloat16, 16 * 49, 16 * 65),
    (False, True, True, torch.float16, 16 * 49, 16 * 65),
    (True, False, True, torch.bfloat16, 16 * 33, 16 * 21),
    (True, True, False, torch.float16, 16 * 33, 16 * 21),
    (False, False, True, torch.bfloat16, 4096, 1024),
    (True, False, False, torch.float16, 16 * 33, 16 * 21),
]


def fp8_case(case, m, g):
    static, per_channel, has_bias, dtype, k, n = case
    wt = fp8_weight(torch.randn(n, k, generator=g) * 0.05, per_channel=per_channel)
    x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4).to(dtype)
    # a calibrated static scale that clips the largest activations (exercises the clamp)
    in_scale = (x.float().abs().amax() / 448 * 0.7).reshape(1) if static else None
    bias = torch.randn(n, generator=g).to(dtype) if has_bias else None
    return to("cuda", x, wt["weight"], wt["weight_scale"], in_scale, bias)


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
@pytest.mark.parametrize("case", FP8_CASES, ids=lambda c: f"{'static' if c[0] else 'dyn'}-"
                         f"{'ch' if c[1] else 'tensor'}{'-b' if c[2] else ''}-{str(c[3])[6:]}-{c[4]}x{c[5]}")
@pytest.mark.parametrize("m", MS)
def test_fp8(case, m):
    """Activation codes and scales bit-exact; every path (Triton split-K quantizing the activation itself, or
    on E4M3 codes or their float16 copies, _scaled_mm, and the op's own choice) within float32-summation error
    of the reference."""
    x, w, ws, in_scale, bias = fp8_case(case, m, gen("fp8", case, m))
    xq, sx = taq.quantize_rows(x, in_scale, torch.float8_e4m3fn)
    xq_ref, sx_ref = quantize_activation_fp8(x, in_scale)
    assert torch.equal(xq.view(torch.uint8), xq_ref.view(torch.uint8)), "fp8 activation codes differ"
    assert torch.equal(sx, sx_ref.expand(m, 1)), "fp8 activation scales differ"
    ref = linear_fp8_ref(x, w, ws, in_scale, bias)
    check(t8.linear_fp8_cuda(x, w, ws, in_scale, bias), ref, "linear_fp8_cuda")
    check(spanda.linear_fp8(x, w, ws, in_scale, bias), ref, "spanda.linear_fp8")
    for path in ("triton", "triton_upcast", "scaled_mm"):
        check(t8.linear_fp8_cuda(x, w, ws, in_scale, bias, path=path), ref, f"linear_fp8_cuda {path}")
    for path in ("triton",):
        for cfg in (tgm.GemmConfig(16, 64, 128, split=4), tgm.GemmConfig(16, 32, 64, split=1),
                    tgm.GemmConfig(16, 64, 128, split=4, serial=True),
                    tgm.GemmConfig(1, 64, 128, gemv=True, serial=True),
                    tgm.GemmConfig(4, 32, 256, split=2, gemv=True),
                    tgm.GemmConfig(1, 32, 256, num_warps=8, gemv=True, serial=True, waves=8),
                    tgm.GemmConfig(16, 64, 128, split=4, serial=True, swap=True),
                    tgm.GemmConfig(16, 128, 256, num_stages=3, swap=True),
                    tgm.GemmConfig(32, 64, 128, split=2, swap=True),
                    tgm.GemmConfig(16, 64, 128, split=4, serial=True, swap=True, tma=True),
                    tgm.GemmConfig(16, 64, 128, num_stages=4, waves=1, serial=True, swap=True, tma=True),
                    tgm.GemmConfig(32, 128, 128, split=2, swap=True, tma=True), t8.FP8_DECODE_NARROW):
            with KernelLaunches(t8, "_w8a8_swap_tma_kernel") as tma:
                check(t8.linear_fp8_cuda(x, w, ws, in_scale, bias, config=cfg, path=path), ref, f"{path} {cfg}")
            # TMA: the swapped kernel on whole tiles (K and N multiples of the block), else the pointer kernel
            want = cfg.tma and x.shape[1] % cfg.block_k == 0 and w.shape[0] % cfg.block_n == 0
            assert tma.n == int(want), f"{cfg}: the TMA kernel launched {tma.n} times"


INT8_CASES = [  # static input scale, bias, dtype, K, N
    (False, False, torch.bfloat16, 8 * 97, 8 * 65),
    (False, True, torch.float16, 8 * 97, 8 * 65),
    (True, True, torch.bfloat16, 1000, 8 * 21),
    (True, False, torch.float16, 4096, 1024),
    (False, True, torch.bfloat16, 100, 90),  # not multiples of 8: Triton GEMM only (masks)
]


def int8_case(case, m, g):
    static, has_bias, dtype, k, n = case
    wt = int8_weight(torch.randn(n, k, generator=g) * 0.05)
    x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4).to(dtype)
    in_scale = (x.float().abs().amax() / 127 * 0.7).reshape(1) if static else None
    bias = torch.randn(n, generator=g).to(dtype) if has_bias else None
    return to("cuda", x, wt["weight"], wt["weight_scale"], in_scale, bias)


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
@pytest.mark.parametrize("case", INT8_CASES, ids=lambda c: f"{'static' if c[0] else 'dyn'}{'-b' if c[1] else ''}"
                         f"-{str(c[2])[6:]}-{c[3]}x{c[4]}")
@pytest.mark.parametrize("m", MS)
def test_int8(case, m):
    x, w, ws, in_scale, bias = int8_case(case, m, gen("int8", case, m))
    xq, sx = taq.quantize_rows(x, in_scale, torch.int8)
    xq_ref, sx_ref = quantize_activation_int8(x, in_scale)
    assert torch.equal(xq, xq_ref) and torch.equal(sx, sx_ref.expand(m, 1)), "int8 activation quantization differs"
    ref = linear_int8_ref(x, w, ws, in_scale, bias)
    check(t8.linear_int8_cuda(x, w, ws, in_scale, bias, use_int_mm=False), ref, "linear_int8_cuda triton")
    if m > 16:
        check(t8.linear_int8_cuda(x, w, ws, in_scale, bias, use_int_mm=True), ref, "linear_int8_cuda _int_mm")
    check(spanda.linear_int8(x, w, ws, in_scale, bias), ref, "spanda.linear_int8")
    for cfg in (tgm.GemmConfig(16, 64, 128, split=4), tgm.GemmConfig(64, 64, 64, split=1),
                tgm.GemmConfig(16, 64, 128, split=4, serial=True), tgm.GemmConfig(2, 64, 128, gemv=True, serial=True),
                tgm.GemmConfig(1, 16, 256, gemv=True, serial=True, waves=8),
                tgm.GemmConfig(16, 64, 128, split=4, serial=True, swap=True), tgm.GemmConfig(16, 128, 128, swap=True)):
        check(t8.linear_int8_cuda(x, w, ws, in_scale, bias, config=cfg), ref, f"int8 {cfg}")
    assert not tgm._locks(x.device).any(), "serial split-K left its tile counters armed"


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
@pytest.mark.parametrize("k", [taq.QUANT_BLOCK, taq.QUANT_BLOCK + 100, 14336, 28672])
def test_quantize_rows_wide(k):
    """Rows up to and wider than test_fp8's (down_proj's inputs: 14,336 at 8B, 28,672 at 70B): read once up to
    QUANT_BLOCK columns, in two passes beyond; codes and scales bit-exact either way, static or dynamic."""
    g = gen("wide", k)
    x = (torch.randn(5, k, generator=g) * 3).to(torch.bfloat16).cuda()
    x[2, k // 3] = 900.0  # one outlier sets its row's scale
    for in_scale in (None, torch.tensor([0.03], device="cuda")):
        xq, sx = taq.quantize_rows(x, in_scale, torch.float8_e4m3fn)
        xq_ref, sx_ref = quantize_activation_fp8(x, in_scale)
        assert torch.equal(xq.view(torch.uint8), xq_ref.view(torch.uint8)), f"fp8 codes differ at K = {k}"
        assert torch.equal(sx, sx_ref.expand(5, 1)), f"fp8 scales differ at K = {k}"
        xq, sx = taq.quantize_rows(x, None if in_scale is None else in_scale * 0.2, torch.int8)
        xq_ref, sx_ref = quantize_activation_int8(x, None if in_scale is None else in_scale * 0.2)
        assert torch.equal(xq, xq_ref) and torch.equal(sx, sx_ref.expand(5, 1)), f"int8 differs at K = {k}"


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
@pytest.mark.parametrize("m", [1, 16, 40])
def test_cuda_graph_capture(m):
    """Each op captured in a CUDA graph (split-K decode sizes included), replayed on new inputs."""
    g = gen("graph", m)
    k, n = 512, 384
    dtype = torch.bfloat16
    qw, s, z, perm = to("cuda", *wna16_case(k, n, 4, 128, True, dtype, g))
    f8 = {key: v.cuda() for key, v in fp8_weight(torch.randn(n, k, generator=g) * 0.05).items()}
    i8 = {key: v.cuda() for key, v in int8_weight(torch.randn(n, k, generator=g) * 0.05).items()}
    bias = torch.randn(n, generator=g).to(dtype).cuda()
    x = torch.randn(m, k, generator=g).to(dtype).cuda()

    serial = tgm.GemmConfig(min(m, 4), 64, 128, split=4, gemv=m <= 4, serial=True)
    serial_fp8 = tgm.GemmConfig(16, 64, 128, split=4, serial=True)
    tma_fp8 = tgm.GemmConfig(16, 64, 128, split=2, serial=True, swap=True, tma=True)  # descriptors captured

    def step():
        return (spanda.linear_wna16(x, qw, s, z, perm, bias, 4, 128),
                spanda.linear_fp8(x, f8["weight"], f8["weight_scale"], None, bias),
                spanda.linear_int8(x, i8["weight"], i8["weight_scale"], None, bias),
                tw.linear_wna16_cuda(x, qw, s, z, perm, bias, 4, 128, config=serial),
                t8.linear_fp8_cuda(x, f8["weight"], f8["weight_scale"], None, bias, config=serial_fp8),
                t8.linear_fp8_cuda(x, f8["weight"], f8["weight_scale"], None, bias, config=tma_fp8))

    graph, outs = capture_graph(step)
    for _ in range(2):
        x.copy_(torch.randn(m, k, generator=g).to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        refs = (linear_wna16_ref(x, qw, s, z, perm, bias, 4, 128),
                linear_fp8_ref(x, f8["weight"], f8["weight_scale"], None, bias),
                linear_int8_ref(x, i8["weight"], i8["weight_scale"], None, bias))
        refs += refs[:2] + refs[1:2]
        for o, r, what in zip(outs, refs, ("wna16", "fp8", "int8", "wna16 serial", "fp8 serial", "fp8 tma"),
                              strict=True):
            check(o, r, f"graph {what}")
        assert not tgm._locks(x.device).any(), "serial split-K left its tile counters armed"


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
def test_fallbacks():
    """Shapes the fast paths refuse go to the reference (fp8: K % 16; fp32 activations)."""
    g = gen("fallback")
    wt = {key: v.cuda() for key, v in fp8_weight(torch.randn(48, 100, generator=g)).items()}
    x = torch.randn(5, 100, generator=g).to(torch.bfloat16).cuda()
    ref = linear_fp8_ref(x, wt["weight"], wt["weight_scale"], None, None)
    assert torch.equal(spanda.linear_fp8(x, wt["weight"], wt["weight_scale"], None, None), ref)
    qw, s, z, perm = to("cuda", *wna16_case(256, 64, 4, 128, False, torch.float32, g))
    xf = torch.randn(3, 256, generator=g).cuda()
    assert torch.equal(spanda.linear_wna16(xf, qw, s, z, perm, None, 4, 128),
                       linear_wna16_ref(xf, qw, s, z, perm, None, 4, 128))


# --------------------------------------------------------------------------------------- interpreter

@contextlib.contextmanager
def serial_only(cfg):
    """A serial split-K config must not launch the reduce kernel (its last program sums the partials)."""
    if cfg is None or not (cfg.serial and cfg.split > 1):
        yield
        return

    def refuse(*args):
        raise AssertionError(f"serial split-K launched the reduce kernel: {cfg}")

    saved, tgm._reduce = tgm._reduce, refuse
    try:
        yield
    finally:
        tgm._reduce = saved


def _interpreter_main() -> None:
    """Runs in a subprocess with TRITON_INTERPRET=1: tiny CPU shapes, fp16."""
    dtype = torch.float16
    g = torch.Generator().manual_seed(0)
    cfgs = [tgm.GemmConfig(16, 32, 32, split=1), tgm.GemmConfig(16, 32, 64, split=2, scale_acc=False),
            tgm.GemmConfig(32, 16, 32, split=2, reshape=False), tgm.GemmConfig(16, 64, 16, split=3,
                                                                             scale_acc=False, reshape=False),
            tgm.GemmConfig(16, 32, 32, split=2, magic=True), tgm.GemmConfig(16, 32, 32, split=1, magic=True,
                                                                          scale_acc=False),
            tgm.GemmConfig(16, 32, 32, split=3, serial=True), tgm.GemmConfig(1, 32, 32, split=1, gemv=True),
            tgm.GemmConfig(2, 16, 64, split=2, gemv=True), tgm.GemmConfig(4, 32, 32, split=3, gemv=True, serial=True),
            tgm.GemmConfig(1, 32, 32, split=3, gemv=True, serial=True, prefetch=True),  # 1, 2 and 3+ K tiles each
            tgm.GemmConfig(2, 16, 32, split=2, gemv=True, prefetch=True),
            tgm.GemmConfig(1, 16, 16, split=1, gemv=True, prefetch=True),
            tgm.GemmConfig(1, 32, 32, split=3, gemv=True, serial=True, zsum=True),
            tgm.GemmConfig(2, 16, 32, split=1, gemv=True, prefetch=True, zsum=True)]
    g_main = g
    for bits, gs, act, has_bias, k, n, m in ((4, 32, False, True, 96, 40, 3), (4, 32, True, False, 96, 40, 17),
                                             (8, 16, True, True, 64, 24, 5), (4, -1, False, True, 72, 20, 2),
                                             (8, -1, True, False, 60, 33, 18), (4, 128, True, True, 256, 40, 3),
                                             (8, -1, False, True, 128, 24, 17), (4, -1, False, False, 256, 24, 2)):
        # the cases with K >= 128 (full 128-wide 4-bit / 64-wide 8-bit K tiles) draw from their own generator
        g = g_main if k < 128 else torch.Generator().manual_seed(k + n + m)
        qw, s, z, perm = wna16_case(k, n, bits, gs, act, dtype, g)
        x = torch.randn(m, k + 3, generator=g).to(dtype)[:, 1:1 + k]  # row-strided x
        bias = torch.randn(n, generator=g).to(dtype) if has_bias else None
        ref = linear_wna16_ref(x, qw, s, z, perm, bias, bits, gs)
        for cfg in cfgs + [None]:
            with serial_only(cfg):
                out = tw.linear_wna16_cuda(x, qw, s, z, perm, bias, bits, gs, config=cfg)
            check(out, ref, f"wna16 {bits} {gs} {cfg}")
            assert not tgm._locks(x.device).any(), f"serial split-K left its tile counters armed: {cfg}"
        w = tw.wna16_dequantize(qw, s, z, perm, bits, gs, torch.float32)
        w_ref = dequantize_wna16(qw, s, z, bits, gs)
        assert torch.allclose(w if perm is None else w[perm.long()], w_ref, rtol=1e-6, atol=1e-6), "dequantize"
        cfg = tgm.GemmConfig(16, 16, 16, dequant_mm=True)
        check(tw.linear_wna16_cuda(x, qw, s, z, perm, bias, bits, gs, config=cfg), ref, "wna16 dequant+mm")
    g = g_main
    # one pass (the row held in registers) up to QUANT_BLOCK columns, two passes of QUANT_BLOCK beyond
    for m, k in ((1, 48), (4, 130), (2, taq.QUANT_BLOCK), (3, 5000)):
        x = (torch.randn(m, k, generator=g) * 3).to(dtype)
        for static in (False, True):
            sc = torch.tensor([0.02]) if static else None
            q, s = taq.quantize_rows(x, sc, torch.float8_e4m3fn)
            q_ref, s_ref = cuda_quant_ref(x, sc, torch.float8_e4m3fn)
            assert torch.equal(s, s_ref.expand(m, 1)), "fp8 scales"
            # the interpreter's float32 -> e4m3 cast rounds ties away from zero and drops the carry when rounding
            # up into the next binade (124.3 -> 64, not 128); within one e4m3 step here (2^-9 among the
            # subnormals), exact in the GPU test
            qf, rf = q.float(), q_ref.float()
            carry = (qf * 2 == rf) & (torch.frexp(rf)[0].abs() == 0.5)
            step = torch.clamp(rf.abs() / 8, min=2.0 ** -9)
            assert bool(((qf - rf).abs() <= step).logical_or(carry).all()), "fp8 codes"
            assert (qf == rf).float().mean() > 0.9, "fp8 codes"
            q, s = taq.quantize_rows(x, sc, torch.int8)
            q_ref, s_ref = cuda_quant_ref(x, sc, torch.int8)
            assert torch.equal(q, q_ref) and torch.equal(s, s_ref.expand(m, 1)), "int8 quantization"
    ties = (torch.randint(-300, 300, (2, 64), generator=g) * 0.25).to(dtype)  # x / 0.5 hits every .5 tie
    q, _ = taq.quantize_rows(ties, torch.tensor([0.5]), torch.int8)
    assert torch.equal(q, quantize_activation_int8(ties, torch.tensor([0.5]))[0]), "int8 ties"
    for static, has_bias, k, n, m in ((False, True, 96, 40, 3), (True, False, 100, 30, 20)):
        wt = int8_weight(torch.randn(n, k, generator=g))
        x = torch.randn(m, k, generator=g).to(dtype)
        sc = (x.float().abs().amax() / 127 * 0.8).reshape(1) if static else None
        bias = torch.randn(n, generator=g).to(dtype) if has_bias else None
        ref = linear_int8_ref(x, wt["weight"], wt["weight_scale"], sc, bias)
        for cfg in (tgm.GemmConfig(16, 16, 32, split=1), tgm.GemmConfig(16, 32, 32, split=2),
                    tgm.GemmConfig(16, 16, 32, split=3, serial=True), tgm.GemmConfig(2, 16, 32, split=2, gemv=True),
                    tgm.GemmConfig(1, 32, 32, split=3, gemv=True, serial=True),
                    tgm.GemmConfig(16, 16, 32, split=3, serial=True, swap=True), tgm.GemmConfig(16, 32, 32, swap=True),
                    None):
            with serial_only(cfg):
                out = t8.linear_int8_cuda(x, wt["weight"], wt["weight_scale"], sc, bias, config=cfg, use_int_mm=False)
            check(out, ref, f"int8 {cfg}")
            assert not tgm._locks(x.device).any(), f"serial split-K left its tile counters armed: {cfg}"
    for static, per_channel, has_bias, k, n, m in ((False, True, True, 96, 48, 3), (True, False, False, 64, 32, 17)):
        wt = fp8_weight(torch.randn(n, k, generator=g) * 0.05, per_channel=per_channel)
        x = (torch.randn(m, k, generator=g) * 2).to(dtype)
        sc = (x.float().abs().amax() / 448 * 0.8).reshape(1) if static else None
        bias = torch.randn(n, generator=g).to(dtype) if has_bias else None
        # the GEMM against the product of the codes this interpreter made (its E4M3 rounding differs from
        # torch's in rare codes, above)
        xq, sx = taq.quantize_rows(x, sc, torch.float8_e4m3fn)
        w = wt["weight"].float() * wt["weight_scale"].float().reshape(-1, 1)
        ref = ((xq.float() * sx) @ w.t() + (bias.float() if has_bias else 0)).to(dtype)
        for path in ("triton_upcast", "triton"):
            for cfg in (tgm.GemmConfig(16, 16, 32, split=1), tgm.GemmConfig(16, 32, 32, split=2),
                        tgm.GemmConfig(16, 16, 32, split=2, serial=True), tgm.GemmConfig(4, 16, 32, split=1, gemv=True),
                        tgm.GemmConfig(1, 32, 32, split=2, gemv=True, serial=True),
                        tgm.GemmConfig(16, 16, 32, split=2, serial=True, swap=True),
                        tgm.GemmConfig(16, 32, 32, swap=True)):
                with serial_only(cfg):
                    out = t8.linear_fp8_cuda(x, wt["weight"], wt["weight_scale"], sc, bias, config=cfg, path=path)
                check(out, ref, f"fp8 {path} {cfg}")
    # the swapped FP8 kernel through TMA descriptors (whole tiles: K % 128, N % 64), split-K reduce and serial
    for has_bias, k, n, m in ((True, 256, 128, 3), (False, 384, 192, 17)):
        wt = fp8_weight(torch.randn(n, k, generator=g) * 0.05, per_channel=True)
        x = (torch.randn(m, k, generator=g) * 2).to(dtype)
        bias = torch.randn(n, generator=g).to(dtype) if has_bias else None
        xq, sx = taq.quantize_rows(x, None, torch.float8_e4m3fn)
        w = wt["weight"].float() * wt["weight_scale"].float().reshape(-1, 1)
        ref = ((xq.float() * sx) @ w.t() + (bias.float() if has_bias else 0)).to(dtype)
        for cfg in (tgm.GemmConfig(16, 64, 128, split=2, swap=True, tma=True),
                    tgm.GemmConfig(16, 64, 128, split=3, serial=True, swap=True, tma=True)):
            with KernelLaunches(t8, "_w8a8_swap_tma_kernel") as tma, serial_only(cfg):
                out = t8._fp8_codes_mm(xq, sx, wt["weight"], wt["weight_scale"], False, bias, dtype, config=cfg,
                                       path="triton")
            check(out, ref, f"fp8 tma {cfg}")
            assert tma.n == 1, f"fp8 tma {cfg}: the TMA kernel launched {tma.n} times"
            assert not tgm._locks(x.device).any(), f"serial split-K left its tile counters armed: {cfg}"
    # _fp8_xq_kernel (off by default: FP8_XQ_MAX_M): the same codes and sums as quantize_rows / silu_and_mul_quant
    # and the swapped TMA GEMM with the same config, so the same bits
    from runtime.ops import triton_elementwise as te
    for silu, static, m in ((False, False, 1), (False, True, 3), (True, False, 2), (True, True, 4)):
        wt = fp8_weight(torch.randn(128, 256, generator=g) * 0.05, per_channel=True)
        x = (torch.randn(m, 512 if silu else 256, generator=g) * 2).to(dtype)
        bias = torch.randn(128, generator=g).to(dtype)
        sc = torch.tensor([0.01]) if static else None
        for cfg in (tgm.GemmConfig(16, 64, 128, split=1, swap=True, tma=True),
                    tgm.GemmConfig(16, 64, 64, split=2, serial=True, swap=True, tma=True)):
            got = t8.fp8_xq(x, wt["weight"], wt["weight_scale"], sc, bias, silu=silu, config=cfg)
            xq, sx = te.silu_and_mul_quant_cuda(x, sc, False) if silu else taq.quantize_rows(x, sc, torch.float8_e4m3fn)
            want = t8._fp8_codes_mm(xq, sx.expand(m, 1).contiguous(), wt["weight"], wt["weight_scale"], False, bias,
                                    dtype, config=cfg, path="triton")
            assert torch.equal(got, want), f"fp8 xq silu={silu} static={static} m={m} {cfg}"
            assert not tgm._locks(x.device).any(), f"serial split-K left its tile counters armed: {cfg}"
    print("interpreter ok")


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its interpreter runs on the CPU)")
def test_kernels_under_interpreter():
    run_under_interpreter("tests.test_triton_quant", timeout=600)
