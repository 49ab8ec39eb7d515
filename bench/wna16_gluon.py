"""The Gluon W4A16 decode GEMM (runtime/ops/wna16_gluon.py) against the Triton TMA kernel of
runtime/ops/triton_wna16_mma.py on pack_wna16_mma's layout and pack_mma_zeros' words, per 8B decoder shape: the error
against the float32 product of the dequantized weight, and the GPU time per call in a CUDA graph with L2 emptied
(bench/quant_gemm.graph_us), over its configurations (block_m, TPS tiles per stage, stages, split, DEFER, PRE), and a
warp-specialized twin defined here ("ws": one warp issues the TMA loads, the warpgroup hands stages back through
mbarriers; on one H100 slower, 78.6-79.7 us per 8B layer at one row against 68.0,
bench/results/quant-gemm-gluon-ws-h100.json).

    python bench/wna16_gluon.py --compile            # no GPU: compile for sm_90, print the SASS counts per config
    python bench/wna16_gluon.py --ms 1 --out results.json   # on a Hopper GPU
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier  # noqa: E402

from runtime.ops.wna16_gluon import (  # noqa: E402
    _finish_stage,
    _issue,
    _stage,
    _tile_words,
    descriptors,
    layouts,
    linear_wna16_gluon,
    outputs,
    program_coords,
    stage_buffers,
    wna16_gluon_kernel,
)
from runtime.ops.wna16_gluon_epilogue import epilogue, mma_layout  # noqa: E402


@gluon.jit
def _ws_producer(w_desc, z_desc, x_desc, ready, empty, w_s, z_s, x_s, wrow0, kt0, pid_n, xrow, NST: gl.constexpr,
                 TPS: gl.constexpr, STAGES: gl.constexpr):
    """The warp-specialized kernel's TMA partition (one warp): fills stage s once the consumer has emptied it."""
    for u in range(NST):
        s = u % STAGES
        mbarrier.wait(empty.index(s), ((u // STAGES) & 1) ^ 1)  # a fresh barrier counts as emptied once
        _issue(w_desc, z_desc, x_desc, ready.index(s), w_s.index(s), z_s.index(s), x_s.index(s),
               wrow0 + u * 8 * TPS, kt0 + u * TPS, pid_n, xrow)


@gluon.jit
def _ws_consumer(ready, empty, w_s, z_s, x_s, out_ptr, part_ptr, lock_ptr, M, N, pid_n, pid_m, pid_k,
                 NST: gl.constexpr, TPS: gl.constexpr, STAGES: gl.constexpr, BLOCK_M: gl.constexpr,
                 SPLIT: gl.constexpr, BF16: gl.constexpr):
    """The warp-specialized kernel's compute partition (one warpgroup): wna16_gluon_kernel's loop (DEFER, no PRE)
    with the stage handed back through its "empty" mbarrier instead of a CTA barrier and a TMA issue."""
    ROW_L: gl.constexpr = gl.SliceLayout(1, mma_layout(BLOCK_M))
    acc = gl.zeros([64, BLOCK_M], gl.float32, mma_layout(BLOCK_M))
    for u in range(NST):
        s = u % STAGES
        mbarrier.wait(ready.index(s), (u // STAGES) & 1)
        w0, w1, zw = _tile_words(w_s.index(s), z_s.index(s), 0, ROW_L)
        acc, p, a, sc = _stage(acc, w_s.index(s), z_s.index(s), x_s.index(s), w0, w1, zw, TPS, True, BF16, BLOCK_M)
        acc = _finish_stage(acc, p, a, sc, True)
        fence_async_shared()  # the stage's reads are ordered before the TMA that refills it
        mbarrier.arrive(empty.index(s), count=1)
    epilogue(acc, out_ptr, out_ptr, part_ptr, lock_ptr, M, N, pid_n, pid_m, pid_k, BLOCK_M, SPLIT, False, BF16)


@gluon.jit
def wna16_gluon_ws_kernel(x_desc, w_desc, z_desc, out_ptr, part_ptr, lock_ptr, M, N, K, TILES: gl.constexpr,
                          TPS: gl.constexpr, STAGES: gl.constexpr, BLOCK_M: gl.constexpr, SPLIT: gl.constexpr,
                          BF16: gl.constexpr):
    """runtime/ops/wna16_gluon.py's kernel warp-specialized (bench only): one warp issues every TMA, the warpgroup
    only waits for stages to fill and hands them back."""
    NST: gl.constexpr = TILES // TPS
    pid_n, pid_m, pid_k, kt0, wrow0, xrow = program_coords(K, TILES, BLOCK_M)
    w_s, z_s, x_s = stage_buffers(w_desc, z_desc, x_desc, TPS, STAGES, BLOCK_M, BF16)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    gl.warp_specialize([
        (_ws_consumer, (ready, empty, w_s, z_s, x_s, out_ptr, part_ptr, lock_ptr, M, N, pid_n, pid_m, pid_k, NST, TPS,
                        STAGES, BLOCK_M, SPLIT, BF16)),
        (_ws_producer, (w_desc, z_desc, x_desc, ready, empty, w_s, z_s, x_s, wrow0, kt0, pid_n, xrow, NST, TPS,
                        STAGES)),
    ], [1], [24])


def linear_wna16_gluon_ws(x, qmma, zw, *, tps=2, stages=3, block_m=16, split=1, maxnreg=128):
    """linear_wna16_gluon through the warp-specialized kernel (no bias, no PDL)."""
    m, k = x.shape
    n = qmma.shape[0] * 64
    tiles = k // 128 // split
    assert tiles * split * 128 == k and tiles % tps == 0, (k, split, tps)
    out, part, locks = outputs(x, n, split)
    wna16_gluon_ws_kernel[(n // 64, triton.cdiv(m, block_m), split)](
        *descriptors(x, qmma, zw, block_m, tps), out, part, locks, m, n, k, TILES=tiles, TPS=tps, STAGES=stages,
        BLOCK_M=block_m, SPLIT=split, BF16=x.dtype == torch.bfloat16, num_warps=4, maxnreg=maxnreg)
    return out


def compile_sm90(ws: bool, block_m: int, tps: int, stages: int, split: int, tiles: int = 32, maxnreg: int = 128,
                 **flags):
    """Compile wna16_gluon_kernel (flags: DEFER, PRE, HAS_BIAS, PDL, EARLY, L2PF, ADD, RMS, SILU) or, with ws,
    wna16_gluon_ws_kernel for sm_90 without a GPU (bf16); returns the compiled kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    xl, wl, zl = layouts(block_m, tps)
    sig = {"x_desc": f"tensordesc<bf16[{block_m}, {128 * tps}],{xl!r}>",
           "w_desc": f"tensordesc<i32[{8 * tps}, 128],{wl!r}>", "z_desc": f"tensordesc<i32[{tps}, 64],{zl!r}>",
           **({} if ws else {"w_ptr": "*i16", "b_ptr": "*bf16"}), "out_ptr": "*bf16", "part_ptr": "*fp32",
           "lock_ptr": "*i32",
           "M": "i32", "N": "i32", "K": "i32"}
    attrs_extra: tuple[str, ...] = ()
    if not ws:  # the kernel's defaults (a constexpr not given here would be None)
        flags = {"HAS_BIAS": False, "PDL": False, "EARLY": True, "L2PF": 0, "ADD": False, "RMS": False,
                 "SILU": False, **flags}
        if flags["ADD"]:  # the norm carried by the epilogues: its producer's and its consumer's arguments
            sig.update(res_ptr="*bf16", g_ptr="*bf16", xg_ptr="*bf16", ss_ptr="*fp32")
        if flags["RMS"]:
            sig.update(ss_ptr="*fp32", eps="fp32")
        if flags["SILU"]:  # SiLU-and-multiply carried by the epilogue: the gate | up tiles' exchange buffer
            sig.update(pair_ptr="*bf16")
            attrs_extra = ("pair_ptr",)
    const = dict(TILES=tiles, TPS=tps, STAGES=stages, BLOCK_M=block_m, SPLIT=split, BF16=True, **flags)
    sig.update({k: "constexpr" for k in const})
    fn = wna16_gluon_ws_kernel if ws else wna16_gluon_kernel
    # the launcher's specialization of 16-byte aligned pointers and multiples of 16, keyed by argument position
    # (keyed by name they were silently dropped)
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in ("out_ptr", "part_ptr", "lock_ptr", "N", "K")
             + (() if ws else ("w_ptr",)) + attrs_extra}
    src = GluonASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4, **({"maxnreg": maxnreg} if ws else {})})


def sass_of(kern) -> str:
    """A compiled kernel's SASS (the nvdisasm that ships with Triton)."""
    import subprocess
    import tempfile

    nvdis = Path(triton.__file__).parent / "backends/nvidia/bin/nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kern.asm["cubin"])
        f.flush()
        return subprocess.run([str(nvdis), "-c", f.name], capture_output=True, text=True, check=True).stdout


def triton_compile_sm90(fn, signature: dict, constexprs: dict, aligned: tuple[str, ...] = (), **options):
    """A Triton kernel compiled for sm_90 without a GPU (signature: argument -> type, the constexprs' entries
    added as "constexpr"; aligned: arguments given the launcher's 16-byte / multiple-of-16 specialization)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned}
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs,
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def triton_sass_sm90(fn, signature: dict, constexprs: dict, **options) -> str:
    """triton_compile_sm90's kernel disassembled."""
    return sass_of(triton_compile_sm90(fn, signature, constexprs, **options))


def ptxas_report(kern) -> str:
    """What ptxas -v says of a compiled kernel's PTX for sm_90a: registers, spills, and its performance warnings
    (C7512 / C7513: wgmma serialized)."""
    import subprocess
    import tempfile

    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kern.asm["ptx"])
        f.flush()
        res = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", f.name, "-o", "/dev/null"], capture_output=True,
                             text=True, check=True)
    return res.stdout + res.stderr


def compile_only(block_m: int, tps: int, stages: int, split: int, defer: bool, pre: bool = False, tiles: int = 32,
                 bias: bool = False, pdl: bool = False):
    """wna16_gluon_kernel compiled for sm_90 without a GPU: (kernel, SASS, counts of a few instructions)."""
    kern = compile_sm90(False, block_m, tps, stages, split, tiles, DEFER=defer, PRE=pre, HAS_BIAS=bias, PDL=pdl)
    sass = sass_of(kern)
    counts = {op: len([ln for ln in sass.splitlines() if f" {op}" in ln]) for op in
              ("HGMMA", "BAR.SYNC", "LDS", "STS", "DEPBAR", "UTMALDG", "PRMT", "LOP3", "HADD2", "SHF")}
    return kern, sass, counts


SHAPES = {"gate_up": (28672, 4096), "down": (4096, 14336), "qkv": (6144, 4096), "o": (4096, 4096)}  # N, K


def variants(m: int, k_tiles: int, tiles_n: int) -> list[tuple[str, dict]]:
    """(label, launch kwargs) per candidate: block_m (8 for one row, else 16), TPS tiles per stage, stages, split
    (from programs per SM, as the Triton kernels choose it), the scale deferred or not, the next stage's first tile
    loaded early (pre)."""
    from runtime.ops import triton_gemm as tgm
    from runtime.ops import triton_wna16_mma as tm
    bm = 8 if m <= 8 else 16

    def split(waves: int, tps: int) -> int:  # as the launcher chooses it (triton_wna16_mma.gluon_split)
        return tm.gluon_split(tgm.GemmConfig(bm, 64, 128, waves=waves, tps=tps), tiles_n, k_tiles, torch.device("cuda"))

    out = []
    for tps, stages, waves, defer, pre in ((1, 4, 2, True, False), (1, 4, 2, True, True), (2, 3, 2, True, False),
                                           (2, 3, 2, True, True), (2, 3, 2, False, False), (2, 4, 4, True, True),
                                           (4, 2, 2, True, False), (4, 3, 2, True, True)):
        lab = f"g m{bm} t{tps} s{stages} x{waves}{'' if defer else ' nodefer'}{' pre' if pre else ''}"
        out.append((lab, dict(block_m=bm, tps=tps, stages=stages, split=split(waves, tps), defer=defer, pre=pre)))
    for tps, stages in ((1, 4), (2, 3), (2, 4)):  # warp-specialized (wna16_gluon_ws_kernel)
        out.append((f"ws m{bm} t{tps} s{stages} x2",
                    dict(block_m=bm, tps=tps, stages=stages, split=split(2, tps), ws=True)))
    return out


def split_grid(m: int, k_tiles: int, tiles_n: int) -> list[tuple[str, dict]]:
    """The default configuration (one tile per stage, PRE) over explicit splits (divisors of k_tiles leaving >= 2
    tiles per program) and 3 / 4 stages: which split each shape wants, against the launcher's waves rule."""
    bm = 8 if m <= 8 else 16
    out = []
    for split in (1, 2, 4, 7, 8, 14, 16):
        if k_tiles % split or k_tiles // split < 2:
            continue
        for stages in (3, 4):
            out.append((f"g m{bm} t1 s{stages} split{split} pre",
                        dict(block_m=bm, tps=1, stages=stages, split=split, defer=True, pre=True)))
    return out


def run_variant(x, qmma, zw, kw: dict):
    kw = dict(kw)
    if kw.pop("ws", False):
        return linear_wna16_gluon_ws(x, qmma, zw, **kw)
    return linear_wna16_gluon(x, qmma, zw, **kw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true", help="compile for sm_90 only (no GPU) and print SASS counts")
    ap.add_argument("--sass", type=Path, help="with --compile: write the first config's SASS here")
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--splits", action="store_true", help="time split_grid (explicit splits and stages) instead")
    args = ap.parse_args()
    if args.compile:
        for bm, tps, st, sp, df, pre in ((16, 2, 3, 1, True, True), (16, 2, 3, 1, False, False),
                                         (16, 4, 3, 2, True, False), (8, 1, 4, 1, True, True)):
            kern, sass, counts = compile_only(bm, tps, st, sp, df, pre)
            print(f"block_m {bm} tps {tps} stages {st} split {sp} defer {df}: shared {kern.metadata.shared} "
                  f"lines {len(sass.splitlines())} {counts}")
            if args.sass:
                args.sass.write_text(sass)
                args.sass = None
        return

    from bench.quant_gemm import copy_bandwidth, dumps, graph_us
    from runtime.ops import triton_wna16_mma as tm
    from runtime.ops.quant_linear import pack_mma_zeros
    torch.manual_seed(0)
    dev = torch.device("cuda")
    res = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                    "copy_gb_s": copy_bandwidth() / 1e9,
                    "timing": "median of 40 CUDA-graph replays (events), L2 emptied by a 256 MiB read before each"},
           "per_layer_us": {}, "rows": []}
    errors = {}
    for name, (n, k) in SHAPES.items():
        qmma = torch.randint(-32768, 32767, (n // 64, k // 128, 2048), dtype=torch.int16, device=dev)
        scales = (torch.rand(k // 128, n, device=dev) * 0.01 + 0.001).to(torch.bfloat16)
        zeros = torch.randint(0, 16, (k // 128, n), dtype=torch.uint8, device=dev)
        zw = pack_mma_zeros(scales, zeros)
        w = tm.wna16_mma_dequantize(qmma, scales, zeros, None, torch.bfloat16).float()
        nbytes = qmma.numel() * 2 + zw.numel() * 4
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = x.float() @ w.t()
            scale = ref.abs().max().item()
            base = tm.linear_wna16_mma_cuda(x, qmma, scales, zw, None, None, 128)
            errors[f"{name} m{m} triton"] = (base.float() - ref).abs().max().item() / scale
            us = graph_us(lambda x=x, q=qmma, s=scales, z=zw: tm.linear_wna16_mma_cuda(x, q, s, z, None, None, 128))
            res["rows"].append(dict(shape=name, m=m, label="triton tma (default)", us=us, tb_s=nbytes / us / 1e6))
            for lab, kw in (split_grid if args.splits else variants)(m, k // 128, n // 64):
                try:
                    y = run_variant(x, qmma, zw, kw)
                    err = (y.float() - ref).abs().max().item() / scale
                    us = graph_us(lambda x=x, q=qmma, z=zw, kw=kw: run_variant(x, q, z, kw))
                except Exception as e:  # noqa: BLE001  (a variant that fails is reported, not fatal)
                    print(f"  {name} m{m} {lab}: failed {type(e).__name__}: {str(e)[:300]}")
                    continue
                errors[f"{name} m{m} {lab}"] = err
                res["rows"].append(dict(shape=name, m=m, label=lab, us=us, tb_s=nbytes / us / 1e6, rel_err=err, **kw))
        if args.out:
            args.out.write_text(dumps(res))
    bad = {k: v for k, v in errors.items() if not v < 2e-2}
    print("max relative error", max(errors.values()), "failing:", bad)
    # per layer: each label's sum over the four shapes, per M
    table = {}
    for r in res["rows"]:
        table.setdefault((r["m"], r["label"]), {})[r["shape"]] = r["us"]
    per_layer = {f"M={m} {lab}": round(sum(v.values()), 1) for (m, lab), v in table.items() if len(v) == len(SHAPES)}
    res["per_layer_us"] = per_layer
    if args.out:
        args.out.write_text(dumps(res))
    for m in sorted({r["m"] for r in res["rows"]}):
        best = {}
        for shape in SHAPES:
            rows = [r for r in res["rows"] if r["m"] == m and r["shape"] == shape]
            b = min(rows, key=lambda r: r["us"])
            t = next(r for r in rows if r["label"].startswith("triton"))
            best[shape] = b["us"]
            print(f"M={m} {shape:8s} triton {t['us']:6.1f} us  best gluon {b['us']:6.1f} us ({b['label']}) "
                  f"{b['tb_s']:.2f} TB/s")
        print(f"M={m} per layer: triton {per_layer.get(f'M={m} triton tma (default)')}  best-per-shape gluon "
              f"{sum(best.values()):.1f}")
        for lab, v in sorted(((k, v) for k, v in per_layer.items() if k.startswith(f"M={m} ")), key=lambda t: t[1])[:8]:
            print(f"   {v:7.1f}  {lab}")


if __name__ == "__main__":
    main()
