"""Activation quantization fused into the op that produces the activation (fuse_act_quant).

The fused kernels must compute exactly what the unfused pair does on the same device: rms_norm (or
fused_add_rms_norm, silu_and_mul) then quantize_rows give the same codes and scales bit for bit, and
linear_w8a8 on those codes gives linear_fp8 / linear_int8's output bit for bit. The build test checks that
the pass rewrites the graph as intended and that a fused artifact's logits equal the unfused artifact's on
CPU (both run the references; the reference of each fused op is the unfused composition, so the test proves
the rewiring: which codes reach which linear, the sum kept for the residual, the static scale passed on).
GPU cases run with ``-m gpu`` on the device; the same kernels run on CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import collections
import importlib.util
import zlib
from pathlib import Path

import pytest
import torch

import runtime.ops  # noqa: F401
from compiler.build import build
from compiler.quantize.layout import fp8_weight, int8_weight
from runtime.ops import triton_act_quant as taq
from runtime.ops import triton_elementwise as te
from runtime.ops import triton_w8a8 as t8
from runtime.ops.activation import silu_and_mul_ref
from runtime.ops.norm import fused_add_rms_norm_ref, rms_norm_ref
from runtime.ops.quant_linear import w8a8_codes_ref
from tests.conftest import capture_graph, cuda_kernel_names, make_hf_checkpoint, run_under_interpreter
from tests.test_quantize_build import _artifact_logits, _quantized_checkpoint, _recipe
from tests.test_triton_quant import check

HAS_TRITON = importlib.util.find_spec("triton") is not None
NO_GPU = not (torch.cuda.is_available() and HAS_TRITON)
NO_GPU_REASON = "needs a CUDA GPU and triton (run with -m gpu on the device)"
spanda = torch.ops.spanda
QDTYPES = {False: torch.float8_e4m3fn, True: torch.int8}  # int8 flag -> codes dtype


def same(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...], what: str) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape and g.dtype == w.dtype, (what, i, g.shape, w.shape, g.dtype, w.dtype)
        gv, wv = (g.view(torch.uint8), w.view(torch.uint8)) if g.dtype == torch.float8_e4m3fn else (g, w)
        diff = (gv != wv).nonzero()
        assert diff.numel() == 0, f"{what}[{i}]: {diff.shape[0]} of {g.numel()} differ, first at {diff[0].tolist()}"


def same_codes(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...], what: str) -> None:
    """A fused producer's (codes, scales[, sum]) against the unfused kernels': the fused kernel is another compiled
    program, whose float32 sum of squares may round differently (reduction order, FMA contraction), so a value on
    a rounding boundary may land one code away (the H200 showed 1 of 1,052,672 int8 codes for float16). Allowed:
    codes one step apart in at most 1e-4 of them, scales within a float16 ulp; everything else bit for bit."""
    (gq, gs, *grest), (wq, ws, *wrest) = got, want
    assert gq.shape == wq.shape and gq.dtype == wq.dtype and gs.shape == ws.shape, (what, gq.shape, wq.shape)
    gi, wi = ((gq.view(torch.uint8), wq.view(torch.uint8)) if gq.dtype == torch.float8_e4m3fn else (gq, wq))
    d = (gi.int() - wi.int()).abs()  # E4M3 bit patterns of one sign are ordered: one step is 1 apart
    assert int(d.max()) <= 1 if d.numel() else True, f"{what}: codes {int(d.max())} steps apart"
    assert int((d > 0).sum()) <= max(1, d.numel() // 10000), f"{what}: {int((d > 0).sum())} of {d.numel()} differ"
    torch.testing.assert_close(gs, ws, rtol=2.0 ** -10, atol=0, msg=lambda e: f"{what} scales: {e}")
    same(tuple(grest), tuple(wrest), what + " (sum)")


def close_to_reference(codes: torch.Tensor, scales: torch.Tensor, ref: torch.Tensor, what: str,
                       check: bool = True) -> None:
    """Dequantized codes within half a quantization step (plus the model dtype's rounding) of ``ref`` clamped to
    the representable range (a static scale saturates large values)."""
    if not check:
        return
    qmax = 127.0 if codes.dtype == torch.int8 else 448.0
    want = torch.maximum(torch.minimum(ref.float(), qmax * scales), -qmax * scales)
    if codes.dtype == torch.int8:
        half_step = scales * 0.5
    else:  # E4M3: 3 mantissa bits (relative half step 2^-4), subnormal step 2^-9
        half_step = want.abs() / 16 + scales * 2.0 ** -10
    bad = (codes.float() * scales - want).abs() > half_step + want.abs() * 2e-2 + 1e-6
    assert not bad.any(), f"{what}: {int(bad.sum())} codes off, first at {bad.nonzero()[0].tolist()}"


def cases(device: str, dtype: torch.dtype, widths, ns, g: torch.Generator):
    for width in widths:
        for n in ns:
            for strided in (False, True):
                if strided:
                    x = torch.randn(n, width + 37, generator=g, device=device).to(dtype)[:, 5:5 + width]
                else:
                    x = torch.randn(n, width, generator=g, device=device).to(dtype)
                yield width, n, strided, x


def check_producers(device: str, dtype: torch.dtype, widths, ns, g: torch.Generator, fp8_vs_ref: bool = True) -> None:
    """Fused producers against the unfused kernels on the same device, bit for bit, and near the references
    (not fp8_vs_ref: E4M3 codes only against the unfused kernels)."""
    for width, n, strided, x in cases(device, dtype, widths, ns, g):
        res = torch.randn(n, width, generator=g, device=device).to(dtype) * 4
        w = (torch.rand(width, generator=g, device=device) + 0.5).to(dtype)
        gu = torch.randn(n, 2 * width, generator=g, device=device).to(dtype) * 3
        for int8 in (False, True):
            qd = QDTYPES[int8]
            vs_ref = int8 or fp8_vs_ref
            for static in (False, True):
                sc = torch.tensor([0.013], device=device) if static else None
                key = f"{dtype} w{width} n{n} {'strided ' if strided else ''}{qd} {'static' if static else 'dynamic'}"
                got = te.rms_norm_quant_cuda(x, w, 1e-5, sc, int8)
                normed = te.rms_norm_cuda(x, w, 1e-5)
                same_codes(got, taq.quantize_rows(normed, sc, qd), f"rms_norm_quant {key}")
                close_to_reference(*got, rms_norm_ref(x, w, 1e-5), f"rms_norm_quant vs reference {key}", vs_ref)
                got = te.fused_add_rms_norm_quant_cuda(x, res, w, 1e-5, sc, int8)
                normed, total = te.fused_add_rms_norm_cuda(x, res, w, 1e-5)
                same_codes(got, (*taq.quantize_rows(normed, sc, qd), total), f"fused_add_rms_norm_quant {key}")
                close_to_reference(got[0], got[1], fused_add_rms_norm_ref(x, res, w, 1e-5)[0],
                                   f"fused_add_rms_norm_quant vs reference {key}", vs_ref)
                unfused = taq.quantize_rows(te.silu_and_mul_cuda(gu), sc, qd)
                # one program per row, and rows split over chunks (two launches; 32 wide: several per row)
                for split_rows, chunk in ((0, te.SILU_BLOCK), (n, 32)):
                    got = te.silu_and_mul_quant_cuda(gu, sc, int8, split_rows=split_rows, chunk=chunk)
                    name = f"silu_and_mul_quant {key} split_rows {split_rows} chunk {chunk}"
                    same_codes(got, unfused, name)
                    close_to_reference(*got, silu_and_mul_ref(gu), f"{name} vs reference", vs_ref)


def check_linears(device: str, dtype: torch.dtype, shapes, g: torch.Generator) -> None:
    """linear_w8a8 on quantize_rows' codes: near the reference product of those codes (w8a8_codes_ref), and
    linear_fp8 / linear_int8 on the activation bit for bit (the same GEMM after the same quantization)."""
    for m, k, n in shapes:
        x = torch.randn(m, k, generator=g, device=device).to(dtype) * 2
        bias = torch.randn(n, generator=g, device=device).to(dtype)
        w = torch.randn(n, k, generator=g, device=device).cpu() * 0.05  # fp8_weight / int8_weight: CPU
        for static in (False, True):
            sc = (x.float().abs().amax() / 448 * 0.8).reshape(1) if static else None
            for per_channel in (True, False):
                wt = {key: t.to(device) for key, t in fp8_weight(w, per_channel=per_channel).items()}
                xq, sx = taq.quantize_rows(x, sc, torch.float8_e4m3fn)
                for b in (bias, None):
                    want = t8.linear_fp8_cuda(x, wt["weight"], wt["weight_scale"], sc, b)
                    got = t8.linear_w8a8_cuda(xq, sx, wt["weight"], wt["weight_scale"], b, dtype)
                    what = f"linear_w8a8 fp8 m{m} k{k} n{n} static={static} pc={per_channel}"
                    check(got, w8a8_codes_ref(xq, sx, wt["weight"], wt["weight_scale"], b, dtype), what)
                    if static and not per_channel and t8.FP8_TRITON_MAX_M is not None and m > t8.FP8_TRITON_MAX_M:
                        # linear_fp8 uses _scaled_mm's tensor-wise scaling there, linear_w8a8 (per-row scales
                        # from its producer) the row-wise one: the same product, rounded by another epilogue
                        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2, msg=lambda e, w=what: f"{w}: {e}")
                    else:
                        same((got,), (want,), what)
            wt = {key: t.to(device) for key, t in int8_weight(w).items()}
            sc8 = (x.float().abs().amax() / 127 * 0.8).reshape(1) if static else None
            xq, sx = taq.quantize_rows(x, sc8, torch.int8)
            want = t8.linear_int8_cuda(x, wt["weight"], wt["weight_scale"], sc8, bias)
            got = t8.linear_w8a8_cuda(xq, sx, wt["weight"], wt["weight_scale"], bias, dtype)
            check(got, w8a8_codes_ref(xq, sx, wt["weight"], wt["weight_scale"], bias, dtype),
                  f"linear_w8a8 int8 m{m} k{k} n{n} static={static} vs reference")
            same((got,), (want,), f"linear_w8a8 int8 m{m} k{k} n{n} static={static}")


def seed(*key) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(zlib.crc32(repr(key).encode()))


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_producers_match_the_unfused_kernels(dtype):
    check_producers("cuda", dtype, (7, 96, 1000, 4096, 14336), (1, 3, 257), seed("producers", dtype))


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_w8a8_matches_linear_fp8_and_int8(dtype):
    # M = 1 and 16: the split-K Triton GEMMs; 64: _scaled_mm / the int8 Triton GEMM's larger tiles
    check_linears("cuda", dtype, ((1, 4096, 6144), (16, 1024, 512), (64, 512, 256)), seed("linears", dtype))


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
def test_fused_ops_dispatch_to_triton_and_capture_in_graphs():
    g = seed("graph")
    t, h, inter = 4, 4096, 14336
    x, res = (torch.randn(t, h, generator=g, device="cuda").bfloat16() for _ in range(2))
    w = torch.rand(h, generator=g, device="cuda").bfloat16()
    gu = torch.randn(t, 2 * inter, generator=g, device="cuda").bfloat16()
    wt = {key: v.cuda() for key, v in fp8_weight(torch.randn(h, inter, generator=torch.Generator().manual_seed(1))
                                                 * 0.02).items()}

    def step():
        a = spanda.rms_norm_quant(x, w, 1e-5, None, False)
        b = spanda.fused_add_rms_norm_quant(x, res, w, 1e-5, None, True)
        c = spanda.silu_and_mul_quant(gu, None, False)
        return (*a, *b, *c, spanda.linear_w8a8(c[0], c[1], wt["weight"], wt["weight_scale"], None, torch.bfloat16))

    names = cuda_kernel_names(step)
    # 4 rows: silu_and_mul_quant splits them (te.SILU_QUANT_SPLIT_ROWS): products + chunk maxima, then codes
    for kernel in ("_rms_norm_kernel", "_silu_mul_amax_kernel", "_quant_chunks_kernel"):
        assert kernel in names, f"{kernel} did not run: {names[:2000]}"
    # the FP8 decode GEMM: the TMA kernel for whole tiles on sm_90+, else the pointer kernel
    assert "_w8a8_swap_tma_kernel" in names or "_w8a8_gemm_kernel" in names, f"no Triton FP8 GEMM ran: {names[:2000]}"
    assert "_quant_rows_kernel" not in names, "a fused op launched the separate quantization kernel"
    graph, static_out = capture_graph(step)
    for src in (x, res, gu):
        src.copy_(torch.randn(src.shape, device="cuda").to(src.dtype))
    graph.replay()
    torch.cuda.synchronize()
    same(static_out, step(), "graph replay")


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
def test_programmatic_dependent_launch_gives_the_same_bits():
    """SPANDA_PDL=1 on sm_90: the fused producers (silu_and_mul_quant split over programs, and whole rows) and
    the W8A8 GEMM (split-K at decode sizes) chained in a CUDA graph give the bits of ordinary launches."""
    from runtime.ops import pdl

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90 or later")
    g = seed("pdl")
    h, inter = 4096, 14336
    w = torch.rand(h, generator=g, device="cuda").bfloat16()
    wts = [{key: v.cuda() for key, v in fp8_weight(torch.randn(n, k, generator=torch.Generator().manual_seed(n))
                                                    * 0.02).items()} for n, k in ((2 * inter, h), (h, inter))]
    for t in (1, 16, 200):
        x, res = (torch.randn(t, h, generator=g, device="cuda").bfloat16() for _ in range(2))

        def step(x=x, res=res):
            a, sa, total = spanda.fused_add_rms_norm_quant(x, res, w, 1e-5, None, False)
            gu = spanda.linear_w8a8(a, sa, wts[0]["weight"], wts[0]["weight_scale"], None, torch.bfloat16)
            c, sc = spanda.silu_and_mul_quant(gu, None, False)
            return total, spanda.linear_w8a8(c, sc, wts[1]["weight"], wts[1]["weight_scale"], None, torch.bfloat16)

        pdl.ENABLED = False  # the reference: ordinary launches
        want = step()
        pdl.ENABLED = True
        try:
            graph, static_out = capture_graph(step)
            graph.replay()
            torch.cuda.synchronize()
        finally:
            pdl.ENABLED = False
        same(static_out, want, f"PDL graph, {t} rows")


def _interpreter_main() -> None:
    """Runs in a subprocess with TRITON_INTERPRET=1: tiny CPU shapes."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.float32):
        # the interpreter's float32 -> E4M3 cast drops the carry when rounding up into the next binade
        # (test_triton_quant): its codes are checked against its own unfused kernels only
        check_producers("cpu", dtype, (7, 96, 130), (1, 5), g, fp8_vs_ref=False)
    check_linears("cpu", torch.float16, ((1, 64, 32), (5, 96, 48)), g)
    print("interpreter ok")


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its interpreter runs on the CPU)")
def test_kernels_under_interpreter():
    run_under_interpreter("tests.test_act_quant_fusion", timeout=600)


# ------------------------------------------------------------------------------------------------ the pass

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint("llama", tmp_path_factory.mktemp("aqf") / "llama", seed=3, hidden_size=128,
                              intermediate_size=256)


def _spanda_ops(path: Path) -> collections.Counter:
    ep = torch.export.load(str(path / "graph.pt2"))
    return collections.Counter(str(n.target).split(".")[1] for n in ep.graph.nodes
                               if n.op == "call_function" and str(n.target).startswith("spanda."))


def _build_both(recipe, tmp_path: Path):
    out = {}
    for fuse in (True, False):
        r = recipe.model_copy(update={"passes": recipe.passes.model_copy(update={"fuse_act_quant": fuse})})
        out[fuse] = build(r, tmp_path / f"fuse{fuse}")
    return out[True], out[False]


@pytest.mark.parametrize("quant", [dict(method="fp8"), dict(method="int8", smoothquant_alpha=0.5)],
                         ids=["fp8", "int8-smoothquant"])
def test_fused_artifact_matches_the_unfused_one(ckpt, tmp_path, quant):
    fused, unfused = _build_both(_recipe(ckpt, **quant), tmp_path)
    assert fused.manifest["passes"][-1] == "fuse_act_quant" and "fuse_act_quant" not in unfused.manifest["passes"]
    ops, plain = _spanda_ops(fused.path), _spanda_ops(unfused.path)
    layers = 2
    linear = "linear_fp8" if quant["method"] == "fp8" else "linear_int8"
    # per layer: qkv (after a norm), gate_up (after the residual add + norm) and down (after silu_and_mul) take
    # codes; o_proj's input comes from attention and keeps its own quantization; the final norm feeds lm_head
    assert plain[linear] == 4 * layers and ops[linear] == layers and ops["linear_w8a8"] == 3 * layers
    assert ops["silu_and_mul_quant"] == layers and "silu_and_mul" not in ops
    assert ops["rms_norm_quant"] + ops["fused_add_rms_norm_quant"] == 2 * layers
    assert ops["fused_add_rms_norm"] == 1  # the final norm
    assert torch.equal(_artifact_logits(fused.path), _artifact_logits(unfused.path))


def test_static_input_scales_reach_the_fused_producer(ckpt, tmp_path):
    """A prequantized FP8 checkpoint with static activation scales, a different one per linear: the producer
    quantizes with the scale of the linear it feeds (a dynamic scale or another linear's would change the
    logits)."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "fp8-static"
    _quantized_checkpoint(ckpt, src, "fp8")
    state = load_file(str(src / "model.safetensors"))
    for i, name in enumerate(sorted(n for n in state if n.endswith("input_scale"))):
        # q, k and v share an input (and, fused, one scale: the build takes their maximum); so do gate and up
        state[name] = torch.tensor(0.01 * (1 + i / 7))
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    fused, unfused = _build_both(_recipe(src, method="none"), tmp_path)
    ops = _spanda_ops(fused.path)
    assert ops["linear_w8a8"] == 6 and ops["linear_fp8"] == 2
    assert torch.equal(_artifact_logits(fused.path), _artifact_logits(unfused.path))


@pytest.mark.parametrize("quant", [dict(method="none"), dict(method="fp8"), dict(method="rtn", bits=4, group_size=32)],
                         ids=["bf16", "fp8", "w4a16"])
def test_programmatic_dependent_launch_by_default_for_quantized_linears_only(ckpt, tmp_path, quant):
    """SPANDA_PDL unset: the decode graphs of up to AUTO_MAX_BATCH sequences launch their Triton kernels with PDL
    when the model's linears are Spanda's quantized ones (Triton GEMMs chained with the norms, RoPE and
    attention), never for an unquantized model, whose GEMMs are cuBLAS's."""
    from artifacts.store import open_artifact
    from runtime.model_runner import load_graph_module
    from runtime.ops import pdl

    res = build(_recipe(ckpt, **quant), tmp_path / quant["method"])
    gm = load_graph_module(open_artifact(res.path), torch.device("cpu"))
    want = 0 if quant["method"] == "none" else pdl.AUTO_MAX_BATCH
    assert pdl.graph_max_batch(gm) == want
    for batch, on in ((1, want > 0), (want or 1, want > 0), (want + 1, False)):
        with pdl.decode_graph(batch, pdl.graph_max_batch(gm)):
            assert pdl._GRAPH[0] is on
    assert not pdl._GRAPH[0]  # only inside a capture
