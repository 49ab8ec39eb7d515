"""A W4A16 decode GEMM written in Gluon (triton.experimental.gluon), against the Triton kernels of
runtime/ops/triton_quant.py, on pack_wna16_mma's layout and pack_mma_zeros' words (bench/NOTES-wna16.md, "Next" 3).

What Gluon lets this kernel do that the Triton kernels could not get from the compiler:
- TPS K tiles per pipeline stage: one TMA box of TPS x 4 KB codes, one of the TPS tiles' zero-point words and one of
  x, one mbarrier wait and one CTA barrier per stage (the Triton TMA kernel: one barrier per load, four per tile);
- each tile's wgmma issued asynchronously and its group scale applied to the product only after the next tile's
  wgmma is issued (DEFER), so the tensor core works while the next tile is dequantized;
- the codes read from shared memory in the layout the wgmma register operand needs (a DistributedLinearLayout), the
  operand assembled by joins, a reshape and a permute that gl.convert_layout(..., assert_trivial=True) checks move
  nothing.

    python bench/wna16_gluon.py --compile            # no GPU: compile for sm_90, print the SASS counts per config
    python bench/wna16_gluon.py --out results.json   # on a Hopper GPU: check against the reference, time per layer
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
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait  # noqa: E402

ASM_BF16_TEXT = """{
    .reg .b32 t, u, r0, r1, r2, r3;
    and.b32 u, $9, 0xFF80FF80;
    lop3.b32 t, $8, 0x000F000F, u, 0xEA; sub.rn.bf16x2 r0, t, $9;
    shr.u32 t, $8, 4;  lop3.b32 t, t, 0x000F000F, u, 0xEA; sub.rn.bf16x2 r1, t, $9;
    shr.u32 t, $8, 8;  lop3.b32 t, t, 0x000F000F, u, 0xEA; sub.rn.bf16x2 r2, t, $9;
    shr.u32 t, $8, 12; lop3.b32 t, t, 0x000F000F, u, 0xEA; sub.rn.bf16x2 r3, t, $9;
    mov.b32 {$0, $1}, r0; mov.b32 {$2, $3}, r1; mov.b32 {$4, $5}, r2; mov.b32 {$6, $7}, r3;
}"""
ASM_BF16 = gl.constexpr(ASM_BF16_TEXT)
ASM_F16 = gl.constexpr(ASM_BF16_TEXT.replace("bf16x2", "f16x2"))


@gluon.jit
def _dequant(w, zz2, BF16: gl.constexpr):
    """int32 words (pairs of pack_wna16_mma's int16, h = 0 low) and MAGIC + z in both halves -> 8 tensors q - z,
    nibble i and half h at index 2 i + h."""
    if BF16:
        o = gl.inline_asm_elementwise(ASM_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [w, zz2], dtype=(gl.bfloat16,) * 8,
                                      is_pure=True, pack=1)
    else:
        o = gl.inline_asm_elementwise(ASM_F16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [w, zz2], dtype=(gl.float16,) * 8,
                                      is_pure=True, pack=1)
    return o



@gluon.jit
def _join_v(o, h: gl.constexpr):
    """One row half's eight dequantized tensors, half h -> [4, 8, 16, i1, i0], registers (i0, i1, p0, p1)."""
    return gl.join(gl.join(o[h], o[4 + h]), gl.join(o[2 + h], o[6 + h]))


@gluon.jit
def _tile_words(ws, zs, j: gl.constexpr, W2_L: gl.constexpr, W3_L: gl.constexpr, Z2_L: gl.constexpr,
                ROW_L: gl.constexpr):
    """Tile j of a stage from shared memory: its two row halves of codes (ws: [8 TPS, 128] int32, rows
    8 j + 4 v + w; [4, 8, 16] each: w, g, 4 t + 2 p1 + p0) and its rows' zero-point words (zs: [TPS, 64]; [64]
    in the accumulator's row layout)."""
    w0 = gl.convert_layout(gl.reshape(ws.slice(8 * j, 4).load(W2_L), [4, 8, 16]), W3_L, assert_trivial=True)
    w1 = gl.convert_layout(gl.reshape(ws.slice(8 * j + 4, 4).load(W2_L), [4, 8, 16]), W3_L, assert_trivial=True)
    zw = gl.convert_layout(gl.reshape(zs.slice(j, 1).load(Z2_L), [64]), ROW_L, assert_trivial=True)
    return w0, w1, zw


@gluon.jit
def _tile_operand(w0, w1, zw, BF16: gl.constexpr, ZZ_L: gl.constexpr, A_L: gl.constexpr):
    """A tile's words (_tile_words) -> the [64, 128] wgmma register operand, q - z."""
    zz = ((zw >> 16) & 0xFFFF) | (zw & -65536)  # MAGIC + z in both halves
    zz = gl.permute(gl.reshape(zz, [4, 2, 8]), [0, 2, 1])  # rows 16 w + 8 v + g -> [w, g, v]
    z0, z1 = gl.split(zz)
    z0 = gl.expand_dims(gl.convert_layout(z0, ZZ_L, assert_trivial=True), 2)
    z1 = gl.expand_dims(gl.convert_layout(z1, ZZ_L, assert_trivial=True), 2)
    o0 = _dequant(w0, z0, BF16)
    o1 = _dequant(w1, z1, BF16)
    a = gl.join(gl.join(_join_v(o0, 0), _join_v(o1, 0)), gl.join(_join_v(o0, 1), _join_v(o1, 1)))
    a = gl.reshape(a, [4, 8, 4, 2, 2, 2, 2, 2, 2])  # w, g, t, p1, p0, i1, i0, v, h
    a = gl.reshape(gl.permute(a, [0, 7, 1, 3, 4, 5, 6, 2, 8]), [64, 128])  # rows (w, v, g), cols (p1 p0 i1 i0 t h)
    return gl.convert_layout(a, A_L, assert_trivial=True)


@gluon.jit
def _scale(zw, dt: gl.constexpr):
    """The group scales (low halves of the words) as float32 [64, 1]."""
    return gl.expand_dims((zw & 0xFFFF).to(gl.int16).to(dt, bitcast=True).to(gl.float32), 1)


@gluon.jit
def _issue(w_desc, z_desc, x_desc, bar, w_dst, z_dst, x_dst, wrow, kt, pid_n, xrow, TPS: gl.constexpr):
    mbarrier.expect(bar, w_desc.block_type.nbytes + z_desc.block_type.nbytes + x_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(w_desc, [wrow, 0], bar, w_dst)
    tma.async_copy_global_to_shared(z_desc, [kt, pid_n * 64], bar, z_dst)
    tma.async_copy_global_to_shared(x_desc, [xrow, kt * 128], bar, x_dst)


@gluon.jit
def wna16_gluon_kernel(x_desc, w_desc, z_desc, out_ptr, part_ptr, lock_ptr, M, N, K, TILES: gl.constexpr,
                       TPS: gl.constexpr, STAGES: gl.constexpr, BLOCK_M: gl.constexpr, SPLIT: gl.constexpr,
                       BF16: gl.constexpr, DEFER: gl.constexpr, PRE: gl.constexpr):
    """y^T [64 rows, BLOCK_M] over the program's TILES K tiles, TPS tiles per pipeline stage, STAGES stages."""
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
    Z2_L: gl.constexpr = gl.DistributedLinearLayout(  # [1, 64]: thread (w, 4 g + t) holds rows 16 w + g (+ 8)
        reg_bases=[[0, 8]], lane_bases=[[0, 0], [0, 0], [0, 1], [0, 2], [0, 4]], warp_bases=[[0, 16], [0, 32]],
        block_bases=[], shape=[1, 64])
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
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    for i in gl.static_range(STAGES):
        if i < NST:
            _issue(w_desc, z_desc, x_desc, bars.index(i), w_s.index(i), z_s.index(i), x_s.index(i),
                   wrow0 + i * 8 * TPS, kt0 + i * TPS, pid_n, xrow, TPS)

    acc = gl.zeros([64, BLOCK_M], gl.float32, MMA)
    zero = gl.zeros([64, BLOCK_M], gl.float32, MMA)
    if PRE:  # the first tile's words in registers before the loop; each stage then loads the next one's
        mbarrier.wait(bars.index(0), 0)
        cw0, cw1, czw = _tile_words(w_s.index(0), z_s.index(0), 0, W2_L, W3_L, Z2_L, ROW_L)
    for u in range(NST):
        s = u % STAGES
        ws = w_s.index(s)
        zs = z_s.index(s)
        xs = x_s.index(s)
        if PRE:
            w0, w1, zw = cw0, cw1, czw
        else:
            mbarrier.wait(bars.index(s), (u // STAGES) & 1)
            w0, w1, zw = _tile_words(ws, zs, 0, W2_L, W3_L, Z2_L, ROW_L)
        a = _tile_operand(w0, w1, zw, BF16, ZZ_L, A_L)
        p = warpgroup_mma(a, xs.slice(0, 128, dim=1).permute((1, 0)), zero, use_acc=False, is_async=True)
        sc = _scale(zw, dt)
        if not DEFER:
            p, a = warpgroup_mma_wait(num_outstanding=0, deps=[p, a])
            acc += p * sc
        for j in gl.static_range(1, TPS):
            w0, w1, zw = _tile_words(ws, zs, j, W2_L, W3_L, Z2_L, ROW_L)
            a2 = _tile_operand(w0, w1, zw, BF16, ZZ_L, A_L)
            if DEFER:
                q = warpgroup_mma(a2, xs.slice(128 * j, 128, dim=1).permute((1, 0)), zero, use_acc=False,
                                  is_async=True)
                r, a = warpgroup_mma_wait(num_outstanding=1, deps=[p, a])
                acc += r * sc
                p = q
                a = a2
            else:
                p = warpgroup_mma(a2, xs.slice(128 * j, 128, dim=1).permute((1, 0)), zero, use_acc=False,
                                  is_async=True)
                p, a2 = warpgroup_mma_wait(num_outstanding=0, deps=[p, a2])
                acc += p * _scale(zw, dt)
            sc = _scale(zw, dt)
        if PRE:
            if u + 1 < NST:  # the next stage's first tile, loaded while this stage's last wgmma runs
                s1 = (u + 1) % STAGES
                mbarrier.wait(bars.index(s1), ((u + 1) // STAGES) & 1)
                cw0, cw1, czw = _tile_words(w_s.index(s1), z_s.index(s1), 0, W2_L, W3_L, Z2_L, ROW_L)
        if DEFER:
            r, a = warpgroup_mma_wait(num_outstanding=0, deps=[p, a])
            acc += r * sc
        gl.thread_barrier()  # every warp is done with stage s: refill it
        nxt = u + STAGES
        if nxt < NST:
            _issue(w_desc, z_desc, x_desc, bars.index(s), w_s.index(s), z_s.index(s), x_s.index(s),
                   wrow0 + nxt * 8 * TPS, kt0 + nxt * TPS, pid_n, xrow, TPS)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))

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


def layouts(block_m: int, tps: int, dtype=torch.bfloat16):
    gdt = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return (gl.NVMMASharedLayout.get_default_for([block_m, 128 * tps], gdt),
            gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2),
            gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2))


def linear_wna16_gluon(x, qmma, zw, *, tps=2, stages=3, block_m=16, split=1, defer=True, pre=False):
    """x [M, K] bf16/fp16, qmma int16 [N/64, K/128, 2048] (pack_wna16_mma), zw int32 [K/128, N] (pack_mma_zeros)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from runtime.ops import triton_quant as tq
    m, k = x.shape
    n = qmma.shape[0] * 64
    tiles = k // 128 // split
    assert tiles * split * 128 == k and tiles % tps == 0, (k, split, tps)
    xl, wl, zl = layouts(block_m, tps, x.dtype)
    x_desc = TensorDescriptor.from_tensor(x, [block_m, 128 * tps], xl)
    w_desc = TensorDescriptor.from_tensor(qmma.view(torch.int32).view(-1, 128), [8 * tps, 128], wl)
    z_desc = TensorDescriptor.from_tensor(zw, [tps, 64], zl)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else out
    locks = tq._locks(x.device) if split > 1 else out
    wna16_gluon_kernel[(n // 64, triton.cdiv(m, block_m), split)](
        x_desc, w_desc, z_desc, out, part, locks, m, n, k, TILES=tiles, TPS=tps, STAGES=stages, BLOCK_M=block_m,
        SPLIT=split, BF16=x.dtype == torch.bfloat16, DEFER=defer, PRE=pre, num_warps=4)
    return out


def compile_only(block_m: int, tps: int, stages: int, split: int, defer: bool, pre: bool = False, tiles: int = 32):
    """Compile for sm_90 without a GPU; returns the SASS and a few counts."""
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    xl, wl, zl = layouts(block_m, tps)
    sig = {"x_desc": f"tensordesc<bf16[{block_m}, {128 * tps}],{xl!r}>",
           "w_desc": f"tensordesc<i32[{8 * tps}, 128],{wl!r}>", "z_desc": f"tensordesc<i32[{tps}, 64],{zl!r}>",
           "out_ptr": "*bf16", "part_ptr": "*fp32", "lock_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32"}
    const = dict(TILES=tiles, TPS=tps, STAGES=stages, BLOCK_M=block_m, SPLIT=split, BF16=True, DEFER=defer, PRE=pre)
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


SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # N, K


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
    return out


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
        w = tq.wna16_mma_dequantize(qmma, scales, zeros, None, torch.float32)
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
                    y = linear_wna16_gluon(x, qmma, zw, **kw)
                    err = (y.float() - ref).abs().max().item() / scale
                    us = graph_us(lambda x=x, q=qmma, z=zw, kw=kw: linear_wna16_gluon(x, q, z, **kw))
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
