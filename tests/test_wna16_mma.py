"""The W4A16 tensor-core kernel on its own weight layout (quant_linear.pack_wna16_mma, triton_wna16_mma's
_wna16_mma_kernel / linear_wna16_mma_cuda) against the float32 reference linear_wna16_ref on the same codes.

CPU: the layout by hand-placed codes (positions worked out from the documented formula) and random round
trips; the kernel under ``TRITON_INTERPRET=1`` (fp16; the interpreter runs the Triton arithmetic that the GPU
replaces with inline PTX); the build's ``wna16_mma`` pass (the rewritten artifact computes the same logits
and exports the same Hugging Face checkpoint as the plain one). GPU (``pytest -m gpu``): bf16 and fp16, M
from 1 to 257, grouped / per-channel, act-order, bias, split-K (serial and reduce), CUDA-graph capture.
Both: the TMA variant (_wna16_mma_tma_kernel) on a 16-byte aligned x with the zero points as words, each
call checked to launch it exactly when the launcher's rules say it applies (the interpreter reads TMA
descriptors as plain block loads with zero fill); likewise the plain-load variant (_wna16_mma_ldg_kernel,
GemmConfig.ldg) on any x, and the Gluon kernel (runtime/ops/wna16_gluon.py, GemmConfig.gluon: sm_90 only, up to
16 rows, aligned x; elsewhere the TMA kernel's configuration runs instead), and the prefill kernel
(_wna16_mma_wide_kernel, GemmConfig.wide: several 64-row blocks per program, the scale folded into the weight).
CPU, compiled for sm_90 (ptxas ships with Triton): the prefill kernel keeps its wgmma asynchronous.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import runtime.ops  # noqa: F401
from compiler.build import build
from compiler.export_hf import export_hf
from runtime.ops.quant_linear import (
    MMA_MAGIC,
    linear_wna16_ref,
    pack_mma_zeros,
    pack_wna16_mma,
    unpack_mma_zeros,
    unpack_rows,
    unpack_wna16_mma,
)
from tests.conftest import KernelLaunches, capture_graph, make_hf_checkpoint, run_under_interpreter
from tests.test_act_quant_fusion import _spanda_ops
from tests.test_quantize_build import _artifact_logits, _recipe
from tests.test_triton_quant import HAS_TRITON, NO_GPU, NO_GPU_REASON, check, gen, wna16_case


def pack_codes(q: torch.Tensor) -> torch.Tensor:
    """codes [K, N] (0..15) -> GPTQ qweight [K/8, N] int32, nibble j of row r = code of k = 8 r + j."""
    qw = torch.zeros(q.shape[0] // 8, q.shape[1], dtype=torch.int32)
    for j in range(8):
        qw |= q[j::8].int() << (4 * j)
    return qw


def test_layout_places_codes_where_the_docstring_says():
    q = torch.zeros(128, 64, dtype=torch.int32)
    # (k, n) = (42, 17): n = 16*1 + 8*0 + 1 -> w 1, v 0, g 1; k = 16*2 + 8*1 + 2*1 + 0 -> (p1, p0, i1) = (0, 1, 0),
    # i0 1, t 1, h 0 -> r = 4*0 + 2*1 + 0 = 2, nibble i = 2*0 + 1 = 1; element 256 + 32 + 8 + 2 = 298
    q[42, 17] = 5
    # (127, 63): n = 48 + 8 + 7 -> w 3, v 1, g 7; k = 16*7 + 8 + 2*3 + 1 -> (1, 1, 1), i0 1, t 3, h 1 -> r 7,
    # nibble 3; element 1024 + 768 + 224 + 24 + 7 = 2047
    q[127, 63] = 9
    # (1, 0): h 1 -> r 1, nibble 0, element 1
    q[1, 0] = 15
    packed = pack_wna16_mma(pack_codes(q))
    assert packed.shape == (1, 1, 2048) and packed.dtype == torch.int16
    nonzero = {int(i): int(packed[0, 0, i]) & 0xFFFF for i in packed[0, 0].nonzero().flatten()}
    assert nonzero == {298: 5 << 4, 2047: 9 << 12, 1: 15}


@pytest.mark.parametrize("k, n", [(128, 64), (384, 192), (1024, 128)])
def test_layout_round_trip(k, n):
    q = torch.randint(0, 16, (k, n), generator=gen("mma-layout", k, n), dtype=torch.int32)
    qw = pack_codes(q)
    assert torch.equal(unpack_rows(qw, 4), q)
    packed = pack_wna16_mma(qw)
    assert packed.shape == (n // 64, k // 128, 2048)
    assert torch.equal(unpack_wna16_mma(packed, k), q)


def test_zero_point_words_hold_the_scale_and_magic_plus_zero():
    # bf16: 128 + 3 = 131 = 0x4303, scale 0.5 = 0x3F00; fp16: 1024 + 15 = 1039 = 0x640F, scale -2 = 0xC000
    s = torch.tensor([[0.5]], dtype=torch.bfloat16)
    words = pack_mma_zeros(s, torch.tensor([[3]], dtype=torch.uint8))
    assert words.dtype == torch.int32 and int(words) == 0x4303_3F00
    words = pack_mma_zeros(torch.tensor([[-2.0]], dtype=torch.float16), torch.tensor([[15]], dtype=torch.uint8))
    assert int(words) & 0xFFFFFFFF == 0x640F_C000
    for dtype in (torch.bfloat16, torch.float16):  # every zero point, random scales: back where they came from
        z = torch.arange(16, dtype=torch.uint8).repeat(4, 1)
        s = torch.randn(4, 16, generator=gen("mma-zeros", str(dtype))).to(dtype)
        words = pack_mma_zeros(s, z)
        assert torch.equal(unpack_mma_zeros(words, dtype), z)
        assert torch.equal((words & 0xFFFF).to(torch.int16).view(dtype), s)


def test_layout_refuses_shapes_it_cannot_hold():
    with pytest.raises(ValueError, match="N % 64 == 0 and K % 128 == 0"):
        pack_wna16_mma(torch.zeros(16, 96, dtype=torch.int32))
    with pytest.raises(ValueError, match="N % 64 == 0 and K % 128 == 0"):
        pack_wna16_mma(torch.zeros(24, 64, dtype=torch.int32))


CASES = [  # k, n, group size, act-order, bias
    (256, 128, 128, False, True), (384, 64, 128, True, False), (512, 192, -1, False, True),
    (256, 64, -1, True, True),
    (128, 64, 128, False, False),  # one group: the zero-point words still hold it (not the per-channel path)
    (256, 256, 128, False, True)]  # four 64-row blocks: the prefill kernel's row_blocks 4


def run_cases(device: str, dtype: torch.dtype, ms, configs, g: torch.Generator, graph: bool = False) -> None:
    from runtime.ops import triton_wna16_mma as tm
    from runtime.ops import wna16_gluon as wg

    with (KernelLaunches(tm, "_wna16_mma_tma_kernel") as tma, KernelLaunches(tm, "_wna16_mma_ldg_kernel") as ldg,
          KernelLaunches(wg, "wna16_gluon_kernel") as glu, KernelLaunches(tm, "_wna16_mma_wide_kernel") as wide):
        _run_cases(tma, ldg, glu, wide, device, dtype, ms, configs, g, graph)


def _run_cases(tma: KernelLaunches, ldg: KernelLaunches, glu: KernelLaunches, wide: KernelLaunches, device: str,
               dtype: torch.dtype, ms, configs, g: torch.Generator, graph: bool) -> None:
    from runtime.ops import triton_gemm as tgm
    from runtime.ops import triton_wna16_mma as tm

    sm90 = device != "cpu" and torch.cuda.get_device_capability()[0] == 9
    for k, n, gs, act, has_bias in CASES:
        qw, s, z, perm = wna16_case(k, n, 4, gs, act, dtype, g)
        packed = pack_wna16_mma(qw)
        qw, s, z, packed = (t.to(device) for t in (qw, s, z, packed))
        perm = perm.to(device) if perm is not None else None
        bias = torch.randn(n, generator=g).to(dtype).to(device) if has_bias else None
        for m in ms:
            x = torch.randn(m, k + 3, generator=g).to(dtype).to(device)[:, 1:1 + k]  # row-strided x
            ref = linear_wna16_ref(x, qw, s, z, perm, bias, 4, gs)
            for cfg in configs:
                # a TMA config (the default up to 16 rows) takes the TMA kernel only for a 16-byte aligned x
                for xx in (x, x.contiguous()) if cfg is None or cfg.tma or cfg.wide else (x,):
                    for zeros in (z, pack_mma_zeros(s, z)) if gs != -1 else (z,):  # zero points and scales as words
                        what = f"wna16_mma k{k} n{n} g{gs} act={act} m{m} {cfg} zeros {zeros.dtype} {xx.stride()}"
                        before, before_ldg, before_glu, before_wide = tma.n, ldg.n, glu.n, wide.n
                        out = tm.linear_wna16_mma_cuda(xx, packed, s, zeros, perm, bias, gs, config=cfg)
                        check(out, ref, what)
                        eff = cfg or tm.wna16_mma_config(m)
                        aligned = xx.data_ptr() % 16 == 0 and xx.stride(0) * xx.element_size() % 16 == 0
                        # the Gluon kernel: sm_90, up to 16 rows, words, aligned x; else the configuration the
                        # launcher would choose without it
                        want_glu = eff.gluon and zeros.dtype == torch.int32 and perm is None and aligned and sm90 \
                            and m <= 16
                        assert glu.n - before_glu == int(want_glu), f"{what}: Gluon launched {glu.n - before_glu}"
                        if eff.gluon and not want_glu:
                            eff = tm._without_gluon(m)
                        words = not eff.dequant_mm and zeros.dtype == torch.int32 and perm is None
                        # the prefill kernel: TMA (aligned x), whole groups of row_blocks 64-row blocks
                        want_wide = words and eff.wide and aligned and not want_glu and n % (64 * eff.row_blocks) == 0
                        want_ldg = words and eff.ldg and not want_glu and not want_wide  # any x: plain loads
                        want = words and not eff.ldg and eff.tma and aligned and not want_glu and not want_wide
                        assert ldg.n - before_ldg == int(want_ldg), f"{what}: ldg kernel launched {ldg.n - before_ldg}"
                        assert wide.n - before_wide == int(want_wide), f"{what}: prefill kernel: {wide.n - before_wide}"
                        assert tma.n - before == int(want), f"{what}: TMA kernel launched {tma.n - before} times"
                        assert not tgm._locks(x.device).any(), f"{what}: serial split-K left its tile counters armed"
            if graph:  # the zero points as words where they can be: up to 16 rows the TMA kernel, descriptors kept
                xs = x.contiguous()
                args = (xs, packed, s, pack_mma_zeros(s, z) if gs != -1 else z, perm, bias, gs)
                graph_, out = capture_graph(lambda a=args: tm.linear_wna16_mma_cuda(*a))
                xs.copy_(torch.randn(xs.shape, device=device).to(dtype))
                graph_.replay()
                torch.cuda.synchronize()
                check(out, linear_wna16_ref(xs, qw, s, z, perm, bias, 4, gs), f"{what} graph replay")


def _interpreter_main() -> None:
    """Runs in a subprocess with TRITON_INTERPRET=1: tiny CPU shapes, fp16."""
    from runtime.ops import triton_gemm as tgm
    from runtime.ops import triton_wna16_mma as tm

    g = torch.Generator().manual_seed(0)
    cfg = tgm.GemmConfig
    configs = [cfg(16, 64, 128, split=1), cfg(16, 64, 128, split=2), cfg(32, 64, 128, split=3, serial=True),
               cfg(16, 64, 128, split=4, serial=True), cfg(128, 64, 128, dequant_mm=True), None,
               cfg(16, 64, 128, split=1, tma=True), cfg(32, 64, 128, split=3, serial=True, tma=True),
               cfg(16, 64, 128, split=1, ldg=True), cfg(16, 64, 128, split=3, serial=True, ldg=True),
               cfg(16, 64, 128, split=2, ldg=True, scale_acc=False), tm.WNA16_MMA_LDG, tm.WNA16_MMA_GLUON,
               cfg(32, 64, 128, split=1, wide=True),
               cfg(16, 64, 128, split=2, wide=True, row_blocks=2, scale_acc=False),
               cfg(16, 64, 128, split=2, serial=True, wide=True, row_blocks=2, m_fast=True),
               cfg(32, 64, 128, split=3, serial=True, wide=True, row_blocks=4, m_fast=True, scale_acc=False)]
    run_cases("cpu", torch.float16, (1, 5, 17), configs, g)
    # the launcher's own choice with a prefill configuration set: the wide kernel from 17 rows, block_m capped
    tm.WNA16_MMA_PREFILL = cfg(128, 64, 128, wide=True, row_blocks=2, scale_acc=False, m_fast=True)
    assert [tm.wna16_mma_config(m).block_m for m in (17, 40, 300)] == [32, 64, 128]
    run_cases("cpu", torch.float16, (5, 40), [None], g)
    print("interpreter ok")


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its interpreter runs on the CPU)")
def test_kernel_under_interpreter():
    run_under_interpreter("tests.test_wna16_mma", timeout=600)


def _wide_ptxas(block_m: int, rb: int, fold: bool, stages: int) -> tuple[str, str]:
    """_wna16_mma_wide_kernel compiled for sm_90 without a GPU (bf16, 32 K tiles): (SASS, ptxas -v's report)."""
    from bench.wna16_gluon import ptxas_report, sass_of, triton_compile_sm90
    from runtime.ops import triton_wna16_prefill as tp

    sig = {"x_desc": f"tensordesc<bf16[{block_m}, 128]>", "w_desc": "tensordesc<i16[8, 256]>",
           "z_desc": "tensordesc<i32[1, 64]>", "b_ptr": "*bf16", "out_ptr": "*bf16", "part_ptr": "*fp32",
           "lock_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32"}
    const = dict(TILES=32, HAS_BIAS=False, SPLIT=1, SERIAL=False, BLOCK_M=block_m, RB=rb, FOLD=fold, M_FAST=True,
                 ASM=True, BF16=True, MAGIC=MMA_MAGIC[torch.bfloat16], PDL=0)
    kern = triton_compile_sm90(tp._wna16_mma_wide_kernel, sig, const, ("out_ptr", "part_ptr", "lock_ptr", "N", "K"),
                               num_warps=4, num_stages=stages)
    return sass_of(kern), ptxas_report(kern)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its sm_90 compiler, ptxas and nvdisasm ship with it)")
@pytest.mark.parametrize("block_m,rb", [(128, 2), (64, 2), (128, 1)])
def test_prefill_kernel_keeps_wgmma_asynchronous(block_m, rb):
    """With the scale folded in (FOLD), every block's operand is dequantized before the first wgmma of the K tile:
    ptxas then issues the tile's 8 * rb wgmma without waiting between them (one wait, at the tile's end), with
    no serialization warning (C7512 / C7513: an operand register defined while a wgmma is in flight) and no spills."""
    sass, report = _wide_ptxas(block_m, rb, True, 2)
    assert "Potential Performance Loss" not in report, report
    assert "0 bytes spill stores" in report, report
    waits = [ln.split("0x")[-1].strip(" ;") for ln in sass.splitlines() if "WARPGROUP.DEPBAR" in ln]
    assert sass.count("HGMMA.64x") == 8 * rb, sass.count("HGMMA.64x")
    assert waits.count("0") == 1, waits  # only the tile's last wait drains the queue


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_on_gpu(dtype):
    from runtime.ops import triton_gemm as tgm
    from runtime.ops import triton_wna16_mma as tm

    qw = torch.randint(-2**31, 2**31 - 1, (512 // 8, 192), dtype=torch.int32)
    assert torch.equal(pack_wna16_mma(qw.cuda()).cpu(), pack_wna16_mma(qw)), "the layout differs on the GPU"
    cfg = tgm.GemmConfig
    configs = [None, cfg(16, 64, 128, split=1), cfg(16, 64, 128, split=3), cfg(32, 64, 128, waves=4, serial=True),
               cfg(64, 64, 128, serial=True), cfg(128, 64, 128, num_stages=2, serial=True),
               cfg(16, 64, 128, waves=4, serial=True), cfg(128, 64, 128, dequant_mm=True),
               cfg(16, 64, 128, split=3, tma=True), cfg(64, 64, 128, serial=True, num_stages=4, tma=True),
               cfg(16, 64, 128, split=1, ldg=True), cfg(16, 64, 128, waves=4, serial=True, ldg=True),
               cfg(32, 64, 128, split=2, ldg=True), cfg(16, 64, 128, serial=True, ldg=True, scale_acc=False),
               cfg(16, 64, 128, split=3, serial=True, ldg=True, maxnreg=128), tm.WNA16_MMA_GLUON,
               cfg(8, 64, 128, num_stages=3, split=2, serial=True, gluon=True, tps=2, pre=True),
               cfg(128, 64, 128, num_stages=2, wide=True, row_blocks=2, scale_acc=False, m_fast=True),
               cfg(64, 64, 128, num_stages=3, split=3, serial=True, wide=True),
               cfg(32, 64, 128, num_stages=3, wide=True, row_blocks=4, scale_acc=False)]
    run_cases("cuda", dtype, (1, 3, 16, 33, 257), configs, gen("mma-gpu", dtype), graph=True)
    if torch.cuda.get_device_capability()[0] >= 9:  # and launched with programmatic dependent launch
        from runtime.ops import pdl

        pdl.ENABLED = True
        try:
            run_cases("cuda", dtype, (1, 16, 257), [None, cfg(16, 64, 128, serial=True, ldg=True), tm.WNA16_MMA_GLUON],
                      gen("mma-gpu-pdl", dtype), graph=True)
        finally:
            pdl.ENABLED = False


# ------------------------------------------------------------------------------------------------ the pass

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # hidden 128, 4 heads of 32, 2 KV heads: qkv [256, 128], o [128, 128], gate_up [512, 128], down [128, 256]
    return make_hf_checkpoint("llama", tmp_path_factory.mktemp("mma") / "llama", seed=4, hidden_size=128,
                              intermediate_size=256)


def _build(recipe, path, mma: bool, norm_epilogue: bool = False, silu_epilogue: bool = False):
    passes = recipe.passes.model_copy(update={"wna16_mma": mma, "fuse_norm_epilogue": norm_epilogue,
                                              "fuse_silu_epilogue": silu_epilogue})
    return build(recipe.model_copy(update={"passes": passes}), path)


def _assert_same_export(on, off, tmp_path) -> None:
    """export-hf of the two builds writes the same tensors."""
    hf_on, hf_off = export_hf(on.path, tmp_path / "hf-on"), export_hf(off.path, tmp_path / "hf-off")
    a, b = load_file(str(hf_on / "model.safetensors")), load_file(str(hf_off / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "export-hf differs"


def _bf16_asym_recipe(ckpt):
    """RTN int4 g128, asymmetric, in bf16: the zero points as pack_mma_zeros' words (what the Gluon kernel reads)."""
    recipe = _recipe(ckpt, method="rtn", bits=4, group_size=128, symmetric=False)
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"dtype": "bfloat16"})})


def _mma_linears(ops) -> int:
    """Linears in the tensor-core layout, whether or not the norm or the SiLU is in their epilogues."""
    return (ops["linear_wna16_mma"] + ops["linear_wna16_mma_add_norm"] + ops["linear_wna16_mma_rms"]
            + ops["linear_wna16_mma_silu"])


@pytest.mark.parametrize("quant,dtype", [(dict(method="rtn", bits=4, group_size=128), "float32"),
                                         (dict(method="rtn", bits=4, group_size=-1, symmetric=False), "float32"),
                                         (dict(method="rtn", bits=4, group_size=128, symmetric=False), "bfloat16")],
                         ids=["g128-sym", "channel-asym", "g128-asym-bf16"])
def test_mma_artifact_matches_the_plain_one(ckpt, tmp_path, quant, dtype):
    recipe = _recipe(ckpt, **quant)
    recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"dtype": dtype})})
    on, off = _build(recipe, tmp_path / "on", True), _build(recipe, tmp_path / "off", False)
    zeros = {k: v for f in on.path.glob("weights-*.safetensors") for k, v in load_file(str(f)).items()
             if k.endswith(".zeros")}
    # group 128 in bf16: the zero points as pack_mma_zeros' words (the scale in their low half)
    assert zeros and {v.dtype for v in zeros.values()} == {torch.int32 if dtype == "bfloat16" else torch.uint8}
    assert "wna16_mma" in on.manifest["passes"] and "wna16_mma" not in off.manifest["passes"]
    ops_on, ops_off = _spanda_ops(on.path), _spanda_ops(off.path)
    assert ops_off["linear_wna16"] == 8 and _mma_linears(ops_on) == 8 and "linear_wna16" not in ops_on
    assert torch.equal(_artifact_logits(on.path), _artifact_logits(off.path))
    _assert_same_export(on, off, tmp_path)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)])])
def test_auto_packs_on_hopper_builds_only(ckpt, tmp_path, device):
    """passes.wna16_mma: auto (the default) runs the pass when the build's device is a compute-capability 9.0
    GPU, the kernel's target, and leaves the codes in the GPTQ layout elsewhere."""
    recipe = _recipe(ckpt, method="rtn", bits=4, group_size=128)
    recipe = recipe.model_copy(update={"target": recipe.target.model_copy(update={"device": device})})
    assert recipe.passes.wna16_mma == "auto"
    res = build(recipe, tmp_path / device)
    hopper = device == "cuda" and torch.cuda.get_device_capability() == (9, 0)
    assert ("wna16_mma" in res.manifest["passes"]) == hopper
    ops = _spanda_ops(res.path)
    assert (_mma_linears(ops) if hopper else ops["linear_wna16"]) == 8


def test_pass_leaves_linears_it_cannot_hold(ckpt, tmp_path):
    res = _build(_recipe(ckpt, method="rtn", bits=4, group_size=64), tmp_path / "g64", True)
    assert "wna16_mma" not in res.manifest["passes"]
    assert _spanda_ops(res.path)["linear_wna16"] == 8


def test_prequantized_gptq_checkpoint_packs_at_build(ckpt, tmp_path):
    """A GPTQ checkpoint (group 128): its qweight reaches the artifact through the pass too."""
    import json
    import shutil

    from safetensors.torch import save_file

    from compiler.quantize.packing import pack_gptq
    from compiler.quantize.rtn import quantize_rtn

    src = tmp_path / "gptq"
    shutil.copytree(ckpt, src)
    state = load_file(str(src / "model.safetensors"))
    for name in [n for n in state if ".layers." in n and n.endswith("_proj.weight")]:
        p, w = name[: -len(".weight")], state.pop(name).float()
        ql = quantize_rtn(w, 4, 128, True)
        qw, qz = pack_gptq(ql.q, ql.z, 4, "gptq")
        state |= {f"{p}.qweight": qw, f"{p}.qzeros": qz, f"{p}.scales": ql.s}
    save_file({k: v.contiguous() for k, v in state.items()}, str(src / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
                                  "sym": True}
    (src / "config.json").write_text(json.dumps(cfg))
    recipe = _recipe(src, method="none")
    on, off = _build(recipe, tmp_path / "on", True), _build(recipe, tmp_path / "off", False)
    assert _mma_linears(_spanda_ops(on.path)) == 8 and _spanda_ops(off.path)["linear_wna16"] == 8
    assert torch.equal(_artifact_logits(on.path), _artifact_logits(off.path))


def test_norm_epilogue_pass_pairs_the_linears_around_each_norm(ckpt, tmp_path):
    """passes.fuse_norm_epilogue: o_proj -> norm -> gate_up and down -> the next layer's norm -> qkv become
    linear_wna16_mma_add_norm -> linear_wna16_mma_rms (2 layers: 3 pairs); the first qkv (its norm reads the
    embedding) and the last down (the final norm feeds the bf16 lm_head) stay. On the CPU both ops take the
    normed form: the same logits and export-hf as without the pass."""
    recipe = _bf16_asym_recipe(ckpt)
    on, off = _build(recipe, tmp_path / "on", True, norm_epilogue=True), _build(recipe, tmp_path / "off", True)
    assert on.manifest["passes"][-1] == "fuse_norm_epilogue" and "fuse_norm_epilogue" not in off.manifest["passes"]
    assert not recipe.passes.fuse_norm_epilogue  # the recipe's default: off
    ops_on, ops_off = _spanda_ops(on.path), _spanda_ops(off.path)
    pair = ("linear_wna16_mma", "linear_wna16_mma_add_norm", "linear_wna16_mma_rms")
    assert tuple(ops_on[op] for op in pair) == (2, 3, 3)
    assert ops_on["fused_add_rms_norm"] == ops_off["fused_add_rms_norm"] - 3 and ops_off["linear_wna16_mma"] == 8
    assert torch.equal(_artifact_logits(on.path), _artifact_logits(off.path))
    _assert_same_export(on, off, tmp_path)


@pytest.mark.parametrize("norm_epilogue", [False, True], ids=["alone", "with-norm-epilogue"])
def test_silu_epilogue_pass_takes_each_gate_up_and_its_activation(ckpt, tmp_path, norm_epilogue):
    """passes.fuse_silu_epilogue: each layer's gate_up linear and its silu_and_mul become one
    linear_wna16_mma_silu (2 layers: 2), reading the norm's sums of squares where fuse_norm_epilogue made the
    gate_up a linear_wna16_mma_rms. On the CPU it computes the GEMM, then silu_and_mul: the same logits and
    export-hf as without the pass."""
    recipe = _bf16_asym_recipe(ckpt)
    assert not recipe.passes.fuse_silu_epilogue  # the recipe's default: off
    on = _build(recipe, tmp_path / "on", True, norm_epilogue=norm_epilogue, silu_epilogue=True)
    off = _build(recipe, tmp_path / "off", True, norm_epilogue=norm_epilogue)
    assert on.manifest["passes"][-1] == "fuse_silu_epilogue" and "fuse_silu_epilogue" not in off.manifest["passes"]
    ops_on, ops_off = _spanda_ops(on.path), _spanda_ops(off.path)
    assert ops_on["linear_wna16_mma_silu"] == 2 and ops_off["silu_and_mul"] == 2 and "silu_and_mul" not in ops_on
    assert _mma_linears(ops_on) == 8
    rms = "linear_wna16_mma_rms" if norm_epilogue else "linear_wna16_mma"
    assert ops_on[rms] == ops_off[rms] - 2
    assert torch.equal(_artifact_logits(on.path), _artifact_logits(off.path))
    _assert_same_export(on, off, tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_epilogue_form_computes_the_norm(dtype):
    """linear_wna16_mma_add_norm -> linear_wna16_mma_rms in the epilogue form (h = (y + residual) * weight, the
    sums of squares per 64 columns, 1 / RMS applied after the second product, then its bias) against the normed
    form (the residual add and RMSNorm as fused_add_rms_norm computes them): the same residual sum, outputs
    equal up to rounding, with act-order on the second linear too."""
    from runtime.ops.quant_linear import linear_wna16_mma_add_norm_ref, linear_wna16_mma_rms_ref

    g = gen("epilogue-form", str(dtype))
    k1, hidden, n2, eps = 128, 256, 192, 1e-6
    qw1, s1, z1, _ = wna16_case(k1, hidden, 4, 128, False, dtype, g)
    qw2, s2, z2, perm = wna16_case(hidden, n2, 4, -1, True, dtype, g)
    a = (pack_wna16_mma(qw1), s1, z1, None, None, 128)
    b = (pack_wna16_mma(qw2), s2, z2, perm, torch.randn(n2, generator=g).to(dtype), -1)
    nw = (1 + 0.3 * torch.randn(hidden, generator=g)).to(dtype)
    for m in (1, 5):
        x = torch.randn(m, k1, generator=g).to(dtype)
        res = (torch.randn(m, hidden, generator=g) * 4).to(dtype)
        outs = {}
        for epilogue in (False, True):
            total, h, ss = linear_wna16_mma_add_norm_ref(x, *a, res, nw, eps, epilogue=epilogue)
            outs[epilogue] = total, linear_wna16_mma_rms_ref(h, *b, ss, eps, epilogue=epilogue)
        assert torch.equal(outs[True][0], outs[False][0])
        tf = outs[True][0].float()
        assert torch.allclose(ss.sum(0), tf.pow(2).sum(1), rtol=1e-5)
        check(outs[True][1], outs[False][1], f"m={m} {dtype}")


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
def test_norm_epilogue_build_decodes_like_the_unfused_one_on_gpu(ckpt, tmp_path, monkeypatch):
    """Served on a Hopper GPU, the fuse_norm_epilogue build decodes (batch 1, CUDA graphs: the Gluon GEMMs'
    epilogue form) the greedy tokens of the build without the pass, with the same log-probabilities up to
    rounding; the prompt's prefill (more rows than the Gluon kernel takes) runs the normed form. Likewise with
    fuse_silu_epilogue on top (the SiLU-and-multiply in the gate_up GEMM's epilogue)."""
    from runtime import LLM, SamplingParams
    from runtime.ops import triton_wna16_mma as tm

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the epilogue form runs on sm_90 only (the Gluon wgmma kernel)")
    recipe = _bf16_asym_recipe(ckpt)
    builds = {"norm": _build(recipe, tmp_path / "on", True, norm_epilogue=True),
              "off": _build(recipe, tmp_path / "off", True),
              "norm+silu": _build(recipe, tmp_path / "silu", True, norm_epilogue=True, silu_epilogue=True)}
    forms = []
    orig = tm.norm_in_epilogue
    monkeypatch.setattr(tm, "norm_in_epilogue", lambda m, device: forms.append(orig(m, device)) or forms[-1])
    runs = {}
    for fused, res in builds.items():
        llm = LLM(res.path, device="cuda")
        out = llm.generate([list(range(3, 40))], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                                                 logprobs=0))[0].outputs[0]
        runs[fused] = out.token_ids, torch.tensor([lp.logprob for lp in out.logprobs])
        del llm
    assert True in forms and False in forms, "the decode steps took the epilogue form, the prefill the normed one"
    for fused in ("norm", "norm+silu"):  # the norm in the epilogues; and the SiLU-and-multiply in gate_up's too
        assert runs[fused][0] == runs["off"][0], fused
        assert (runs[fused][1] - runs["off"][1]).abs().max() < 0.05, (fused, runs[fused][1], runs["off"][1])
