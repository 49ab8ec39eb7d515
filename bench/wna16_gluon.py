"""The Gluon W4A16 decode GEMM (runtime/ops/wna16_gluon.py) against the Triton TMA kernel of runtime/ops/triton_quant.py
on pack_wna16_mma's layout and pack_mma_zeros' words, per 8B decoder shape: the error against the float32 product of
the dequantized weight, and the GPU time per call in a CUDA graph with L2 emptied (bench/quant_gemm.graph_us), over
its configurations (block_m, TPS tiles per stage, stages, split, DEFER, PRE), and a warp-specialized twin defined
here ("ws": one warp issues the TMA loads, the warpgroup hands stages back through mbarriers; compiled for sm_90 on
CPU, not yet run on a GPU).

    python bench/wna16_gluon.py --compile            # no GPU: compile for sm_90, print the SASS counts per config
    python bench/wna16_gluon.py --ms 1 --out results.json   # on a Hopper GPU
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from runtime.ops.wna16_gluon import (  # noqa: E402  # noqa: E402
    _issue,
    _scale,
    _tile_operand,
    _tile_words,
    layouts,
    linear_wna16_gluon,
    wna16_gluon_kernel,
)


@gluon.jit
def _ws_producer(w_desc, z_desc, x_desc, ready, empty, w_s, z_s, x_s, wrow0, kt0, pid_n, xrow, NST: gl.constexpr,
                 TPS: gl.constexpr, STAGES: gl.constexpr):
    """The warp-specialized kernel's TMA partition (one warp): fills stage s once the consumer has emptied it."""
    for u in range(NST):
        s = u % STAGES
        mbarrier.wait(empty.index(s), ((u // STAGES) & 1) ^ 1)  # a fresh barrier counts as emptied once
        _issue(w_desc, z_desc, x_desc, ready.index(s), w_s.index(s), z_s.index(s), x_s.index(s),
               wrow0 + u * 8 * TPS, kt0 + u * TPS, pid_n, xrow, TPS)


@gluon.jit
def _ws_consumer(ready, empty, w_s, z_s, x_s, out_ptr, part_ptr, lock_ptr, M, N, pid_n, pid_m, pid_k,
                 NST: gl.constexpr, TPS: gl.constexpr, STAGES: gl.constexpr, BLOCK_M: gl.constexpr,
                 SPLIT: gl.constexpr, BF16: gl.constexpr):
    """The warp-specialized kernel's compute partition (one warpgroup): wgmma_gluon_kernel's loop (DEFER, no PRE)
    with the stage handed back through its "empty" mbarrier instead of a CTA barrier and a TMA issue."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16])
    A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    W2_L: gl.constexpr = gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 2]],
                                                     lane_bases=[[0, 4], [0, 8], [0, 16], [0, 32], [0, 64]],
                                                     warp_bases=[[1, 0], [2, 0]], block_bases=[], shape=[4, 128])
    W3_L: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2]], lane_bases=[[0, 0, 4], [0, 0, 8], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
        warp_bases=[[1, 0, 0], [2, 0, 0]], block_bases=[], shape=[4, 8, 16])
    ZZ_L: gl.constexpr = gl.SliceLayout(2, W3_L)
    ROW_L: gl.constexpr = gl.SliceLayout(1, MMA)
    Z2_L: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[0, 8]], lane_bases=[[0, 0], [0, 0], [0, 1], [0, 2], [0, 4]], warp_bases=[[0, 16], [0, 32]],
        block_bases=[], shape=[1, 64])
    dt: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
    acc = gl.zeros([64, BLOCK_M], gl.float32, MMA)
    zero = gl.zeros([64, BLOCK_M], gl.float32, MMA)
    for u in range(NST):
        s = u % STAGES
        ws = w_s.index(s)
        zs = z_s.index(s)
        xs = x_s.index(s)
        mbarrier.wait(ready.index(s), (u // STAGES) & 1)
        w0, w1, zw = _tile_words(ws, zs, 0, W2_L, W3_L, Z2_L, ROW_L)
        a = _tile_operand(w0, w1, zw, BF16, ZZ_L, A_L)
        p = warpgroup_mma(a, xs.slice(0, 128, dim=1).permute((1, 0)), zero, use_acc=False, is_async=True)
        sc = _scale(zw, dt)
        for j in gl.static_range(1, TPS):
            w0, w1, zw = _tile_words(ws, zs, j, W2_L, W3_L, Z2_L, ROW_L)
            a2 = _tile_operand(w0, w1, zw, BF16, ZZ_L, A_L)
            q = warpgroup_mma(a2, xs.slice(128 * j, 128, dim=1).permute((1, 0)), zero, use_acc=False, is_async=True)
            r, a = warpgroup_mma_wait(num_outstanding=1, deps=[p, a])
            acc += r * sc
            p = q
            a = a2
            sc = _scale(zw, dt)
        r, a = warpgroup_mma_wait(num_outstanding=0, deps=[p, a])
        acc += r * sc
        fence_async_shared()  # the stage's reads are ordered before the TMA that refills it
        mbarrier.arrive(empty.index(s), count=1)
    rn = pid_n * 64 + gl.arange(0, 64, layout=ROW_L)
    rm = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
    offs = gl.expand_dims(rm, 0).to(gl.int64) * N + gl.expand_dims(rn, 1)
    mask = gl.expand_dims(rm < M, 0) & gl.expand_dims(rn < N, 1)
    if SPLIT > 1:
        gl.store(part_ptr + pid_k.to(gl.int64) * M * N + offs, acc, mask=mask)
        gl.thread_barrier()
        done = gl.atomic_add(lock_ptr + pid_n * gl.num_programs(1) + pid_m, 1, sem="acq_rel")
        if done == SPLIT - 1:
            tot = gl.load(part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
            for k in gl.static_range(1, SPLIT):
                tot += gl.load(part_ptr + k * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
            gl.atomic_xchg(lock_ptr + pid_n * gl.num_programs(1) + pid_m, 0)
            gl.store(out_ptr + offs, tot.to(dt), mask=mask)
    else:
        gl.store(out_ptr + offs, acc.to(dt), mask=mask)


@gluon.jit
def wna16_gluon_ws_kernel(x_desc, w_desc, z_desc, out_ptr, part_ptr, lock_ptr, M, N, K, TILES: gl.constexpr,
                          TPS: gl.constexpr, STAGES: gl.constexpr, BLOCK_M: gl.constexpr, SPLIT: gl.constexpr,
                          BF16: gl.constexpr):
    """runtime/ops/wna16_gluon.py's kernel warp-specialized (bench only): one warp issues every TMA, the warpgroup
    only waits for stages to fill and hands them back."""
    dt: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    pid_k = gl.program_id(2)
    NST: gl.constexpr = TILES // TPS
    kt0 = pid_k * TILES
    wrow0 = (pid_n * (K // 128) + kt0) * 8
    xrow = pid_m * BLOCK_M
    w_s = gl.allocate_shared_memory(gl.int32, [STAGES, 8 * TPS, 128], w_desc.layout)
    z_s = gl.allocate_shared_memory(gl.int32, [STAGES, TPS, 64], z_desc.layout)
    x_s = gl.allocate_shared_memory(dt, [STAGES, BLOCK_M, 128 * TPS], x_desc.layout)
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
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from runtime.ops import triton_quant as tq
    m, k = x.shape
    n = qmma.shape[0] * 64
    tiles = k // 128 // split
    assert tiles * split * 128 == k and tiles % tps == 0, (k, split, tps)
    xl, wl, zl = layouts(block_m, tps, x.dtype)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else out
    wna16_gluon_ws_kernel[(n // 64, triton.cdiv(m, block_m), split)](
        TensorDescriptor.from_tensor(x, [block_m, 128 * tps], xl),
        TensorDescriptor.from_tensor(qmma.view(torch.int32).view(-1, 128), [8 * tps, 128], wl),
        TensorDescriptor.from_tensor(zw, [tps, 64], zl), out, part, tq._locks(x.device) if split > 1 else out, m, n,
        k, TILES=tiles, TPS=tps, STAGES=stages, BLOCK_M=block_m, SPLIT=split, BF16=x.dtype == torch.bfloat16,
        num_warps=4, maxnreg=maxnreg)
    return out


def compile_ws(block_m: int, tps: int, stages: int, split: int, tiles: int = 32, maxnreg: int = 128):
    """Compile the warp-specialized kernel for sm_90 without a GPU; returns it."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    xl, wl, zl = layouts(block_m, tps)
    sig = {"x_desc": f"tensordesc<bf16[{block_m}, {128 * tps}],{xl!r}>",
           "w_desc": f"tensordesc<i32[{8 * tps}, 128],{wl!r}>", "z_desc": f"tensordesc<i32[{tps}, 64],{zl!r}>",
           "out_ptr": "*bf16", "part_ptr": "*fp32", "lock_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32"}
    const = dict(TILES=tiles, TPS=tps, STAGES=stages, BLOCK_M=block_m, SPLIT=split, BF16=True)
    sig.update({k: "constexpr" for k in const})
    attrs = {(k,): [["tt.divisibility", 16]] for k in ("out_ptr", "part_ptr", "lock_ptr", "N", "K")}
    src = GluonASTSource(fn=wna16_gluon_ws_kernel, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": maxnreg})


def compile_only(block_m: int, tps: int, stages: int, split: int, defer: bool, pre: bool = False, tiles: int = 32,
                 bias: bool = False, pdl: bool = False):
    """Compile for sm_90 without a GPU; returns the SASS and a few counts."""
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    xl, wl, zl = layouts(block_m, tps)
    sig = {"x_desc": f"tensordesc<bf16[{block_m}, {128 * tps}],{xl!r}>",
           "w_desc": f"tensordesc<i32[{8 * tps}, 128],{wl!r}>", "z_desc": f"tensordesc<i32[{tps}, 64],{zl!r}>",
           "b_ptr": "*bf16", "out_ptr": "*bf16", "part_ptr": "*fp32", "lock_ptr": "*i32", "M": "i32", "N": "i32",
           "K": "i32"}
    const = dict(TILES=tiles, TPS=tps, STAGES=stages, BLOCK_M=block_m, SPLIT=split, BF16=True, DEFER=defer, PRE=pre,
                 HAS_BIAS=bias, PDL=pdl)
    sig.update({k: "constexpr" for k in const})
    attrs = {(k,): [["tt.divisibility", 16]] for k in ("out_ptr", "part_ptr", "lock_ptr", "N", "K")}
    src = GluonASTSource(fn=wna16_gluon_kernel, signature=sig, constexprs=const, attrs=attrs)
    kern = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    nvdis = Path(triton.__file__).parent / "backends/nvidia/bin/nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kern.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(nvdis), "-c", f.name], capture_output=True, text=True).stdout
    counts = {op: len([ln for ln in sass.splitlines() if f" {op}" in ln]) for op in
              ("HGMMA", "BAR.SYNC", "LDS", "STS", "DEPBAR", "UTMALDG", "PRMT", "LOP3", "HADD2", "SHF")}
    return kern, sass, counts


SHAPES = {"gate_up": (28672, 4096), "down": (4096, 14336), "qkv": (6144, 4096), "o": (4096, 4096)}  # N, K


def variants(m: int, k_tiles: int, tiles_n: int) -> list[tuple[str, dict]]:
    """(label, launch kwargs) per candidate: block_m (8 for one row, else 16), TPS tiles per stage, stages, split
    (from programs per SM, as the Triton kernels choose it), the scale deferred or not, the next stage's first tile
    loaded early (pre)."""
    from runtime.ops import triton_quant as tq
    bm = 8 if m <= 8 else 16
    out = []
    for tps, stages, waves, defer, pre in ((1, 4, 2, True, False), (1, 4, 2, True, True), (2, 3, 2, True, False),
                                           (2, 3, 2, True, True), (2, 3, 2, False, False), (2, 4, 4, True, True),
                                           (4, 2, 2, True, False), (4, 3, 2, True, True)):
        split = tq._choose_split(tq.GemmConfig(bm, 64, 128, waves=waves), tiles_n, k_tiles, torch.device("cuda"))
        while (k_tiles // split) % tps:  # a split whose tile count TPS divides
            split //= 2
        lab = f"g m{bm} t{tps} s{stages} x{waves}{'' if defer else ' nodefer'}{' pre' if pre else ''}"
        out.append((lab, dict(block_m=bm, tps=tps, stages=stages, split=split, defer=defer, pre=pre)))
    for tps, stages in ((1, 4), (2, 3), (2, 4)):  # warp-specialized (wna16_gluon_ws_kernel)
        split = tq._choose_split(tq.GemmConfig(bm, 64, 128, waves=2), tiles_n, k_tiles, torch.device("cuda"))
        while (k_tiles // split) % tps:
            split //= 2
        out.append((f"ws m{bm} t{tps} s{stages} x2", dict(block_m=bm, tps=tps, stages=stages, split=split, ws=True)))
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

    from bench.quant_gemm import copy_bandwidth, graph_us
    from runtime.ops import triton_quant as tq
    from runtime.ops.quant_linear import pack_mma_zeros
    torch.manual_seed(0)
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "copy_gb_s": copy_bandwidth() / 1e9, "rows": []}
    errors = {}
    for name, (n, k) in SHAPES.items():
        qmma = torch.randint(-32768, 32767, (n // 64, k // 128, 2048), dtype=torch.int16, device=dev)
        scales = (torch.rand(k // 128, n, device=dev) * 0.01 + 0.001).to(torch.bfloat16)
        zeros = torch.randint(0, 16, (k // 128, n), dtype=torch.uint8, device=dev)
        zw = pack_mma_zeros(scales, zeros)
        w = tq.wna16_mma_dequantize(qmma, scales, zeros, None, torch.bfloat16).float()
        nbytes = qmma.numel() * 2 + zw.numel() * 4
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = x.float() @ w.t()
            scale = ref.abs().max().item()
            base = tq.linear_wna16_mma_cuda(x, qmma, scales, zw, None, None, 128)
            errors[f"{name} m{m} triton"] = (base.float() - ref).abs().max().item() / scale
            us = graph_us(lambda x=x, q=qmma, s=scales, z=zw: tq.linear_wna16_mma_cuda(x, q, s, z, None, None, 128))
            res["rows"].append(dict(shape=name, m=m, label="triton tma (default)", us=us, tb_s=nbytes / us / 1e6))
            for lab, kw in variants(m, k // 128, n // 64):
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
            args.out.write_text(json.dumps(res, indent=1) + "\n")
    bad = {k: v for k, v in errors.items() if not v < 2e-2}
    print("max relative error", max(errors.values()), "failing:", bad)
    # per layer: each label's sum over the four shapes, per M
    table = {}
    for r in res["rows"]:
        table.setdefault((r["m"], r["label"]), {})[r["shape"]] = r["us"]
    per_layer = {f"M={m} {lab}": round(sum(v.values()), 1) for (m, lab), v in table.items() if len(v) == len(SHAPES)}
    res["per_layer_us"] = per_layer
    res["by_shape"] = {f"M={m} {lab}": {s: round(u, 1) for s, u in v.items()} for (m, lab), v in table.items()}
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
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
