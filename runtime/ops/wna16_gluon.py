"""W4A16 decode GEMM written in Gluon (triton.experimental.gluon) on quant_linear.pack_wna16_mma's layout and
pack_mma_zeros' words: y = x W^T for up to 16 rows of x, the weight as wgmma's register operand (the same layout and
dequantization as triton_wna16_mma._wna16_mma_tma_kernel). What Gluon lets it do that the Triton kernels could not get
from the compiler:

- TPS K tiles per pipeline stage: one TMA box of TPS x 4 KB codes, one of the tiles' zero-point words and one of x,
  one mbarrier wait and one CTA barrier per stage (the Triton TMA kernel: one barrier per load, four per tile);
- each tile's wgmma issued asynchronously and its group scale applied to the product only after the next tile's
  wgmma is issued (DEFER), so the tensor core works while the next tile is dequantized;
- the next stage's first tile read from shared memory into registers before this stage's last wgmma is waited for
  (PRE): the loop's longest wait, the stage's mbarrier and the first LDS, overlaps the tensor core;
- the codes read from shared memory in the layout the wgmma register operand needs (a DistributedLinearLayout),
  the operand assembled by joins, a reshape and a permute that gl.convert_layout(..., assert_trivial=True) checks
  move nothing (tests/test_wna16_gluon.py also checks the SASS: no STS, 8 HGMMA per tile);
- launched with PDL (the small decode graphs), the first stages' codes and zero points loaded before
  griddepcontrol.wait: only x, the outputs and the split-K counters depend on the previous kernel, so the weight
  stream starts while the norm, RoPE, attention or SiLU-mul before it still runs (EARLY).

The epilogue (runtime/ops/wna16_gluon_epilogue.py: split-K, bias) can also carry the residual add + RMSNorm between
two such GEMMs (ADD / RMS) and the SiLU-and-multiply of a gate | up product (SILU); both are correct on the H100
and no faster at batch 1 (bench/NOTES-wna16.md 9).

On one H100 (bench/results/quant-gemm-gluon-h100.json), per 8B decoder layer with L2 emptied: 68.5 us at one row
(block_m 8, one tile per stage, 4 stages, PRE) against 78.0 for the Triton TMA kernel; at 16 rows 75.2 against
75.5. Selected by triton_wna16_mma.wna16_mma_config up to WNA16_MMA_GLUON_MAX_M rows (8): the 8B W4A16+lm_head engine's
batch-1 decode graph replays in 2.200 ms against 2.494 without it (bf16: 5.964; bench/results/pdl-gluon-*-h100.json).
"""
from __future__ import annotations

import torch

from runtime.ops import triton_gemm as tgm  # the serial split-K's tile counters

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # CPU-only install, or a Triton without Gluon: triton_wna16_mma never selects it
    gluon = None
AVAILABLE = gluon is not None

if AVAILABLE:
    from runtime.ops.wna16_gluon_epilogue import _row_rscale, epilogue, mma_layout

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
    # a tile's row half of codes as loaded from shared memory ([4, 128] int32: warp w, lane 4 g + t, registers p0 p1)
    W2_L = gl.constexpr(gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2]], lane_bases=[[0, 4], [0, 8], [0, 16], [0, 32], [0, 64]],
        warp_bases=[[1, 0], [2, 0]], block_bases=[], shape=[4, 128]))
    # ... the same registers viewed as [w, g, 4 t + 2 p1 + p0]
    W3_L = gl.constexpr(gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2]], lane_bases=[[0, 0, 4], [0, 0, 8], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
        warp_bases=[[1, 0, 0], [2, 0, 0]], block_bases=[], shape=[4, 8, 16]))
    ZZ_L = gl.constexpr(gl.SliceLayout(2, W3_L.value))  # a row half's zero points, broadcast over its words
    # [1, 64] zero-point words: thread (w, 4 g + t) holds rows 16 w + g (+ 8), the accumulator's rows
    Z2_L = gl.constexpr(gl.DistributedLinearLayout(
        reg_bases=[[0, 8]], lane_bases=[[0, 0], [0, 0], [0, 1], [0, 2], [0, 4]], warp_bases=[[0, 16], [0, 32]],
        block_bases=[], shape=[1, 64]))

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
    def _tile_words(ws, zs, j: gl.constexpr, ROW_L: gl.constexpr):
        """Tile j of a stage from shared memory: its two row halves of codes (ws: [8 TPS, 128] int32, rows
        8 j + 4 v + w; [4, 8, 16] each: w, g, 4 t + 2 p1 + p0) and its rows' zero-point words (zs: [TPS, 64]; [64]
        in the accumulator's row layout)."""
        w0 = gl.convert_layout(gl.reshape(ws.slice(8 * j, 4).load(W2_L), [4, 8, 16]), W3_L, assert_trivial=True)
        w1 = gl.convert_layout(gl.reshape(ws.slice(8 * j + 4, 4).load(W2_L), [4, 8, 16]), W3_L, assert_trivial=True)
        zw = gl.convert_layout(gl.reshape(zs.slice(j, 1).load(Z2_L), [64]), ROW_L, assert_trivial=True)
        return w0, w1, zw

    @gluon.jit
    def _tile_operand(w0, w1, zw, BF16: gl.constexpr, A_L: gl.constexpr):
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
    def _issue_weights(w_desc, z_desc, x_desc, bar, w_dst, z_dst, wrow, kt, pid_n):
        """A stage's codes and zero-point words; bar expects them and the stage's x (_issue_x)."""
        mbarrier.expect(bar, w_desc.block_type.nbytes + z_desc.block_type.nbytes + x_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(w_desc, [wrow, 0], bar, w_dst)
        tma.async_copy_global_to_shared(z_desc, [kt, pid_n * 64], bar, z_dst)

    @gluon.jit
    def _issue_x(x_desc, bar, x_dst, kt, xrow):
        tma.async_copy_global_to_shared(x_desc, [xrow, kt * 128], bar, x_dst)

    @gluon.jit
    def _issue(w_desc, z_desc, x_desc, bar, w_dst, z_dst, x_dst, wrow, kt, pid_n, xrow):
        _issue_weights(w_desc, z_desc, x_desc, bar, w_dst, z_dst, wrow, kt, pid_n)
        _issue_x(x_desc, bar, x_dst, kt, xrow)

    @gluon.jit
    def _stage(acc, ws, zs, xs, w0, w1, zw, TPS: gl.constexpr, DEFER: gl.constexpr, BF16: gl.constexpr,
               BLOCK_M: gl.constexpr):
        """One pipeline stage's TPS tiles (tile 0's words w0, w1, zw already in registers) into acc. DEFER: tile j's
        scale is applied after tile j + 1's wgmma is issued, and the last tile's wgmma is left in flight: returns
        (acc, its product, its operand, its scale) for the caller's warpgroup_mma_wait(0) (_finish_stage).
        Otherwise every product is added at once and the last three values are only passed through."""
        MMA: gl.constexpr = mma_layout(BLOCK_M)
        A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        ROW_L: gl.constexpr = gl.SliceLayout(1, MMA)
        dt: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
        zero = gl.zeros([64, BLOCK_M], gl.float32, MMA)
        a = _tile_operand(w0, w1, zw, BF16, A_L)
        p = warpgroup_mma(a, xs.slice(0, 128, dim=1).permute((1, 0)), zero, use_acc=False, is_async=True)
        sc = _scale(zw, dt)
        if not DEFER:
            p, a = warpgroup_mma_wait(num_outstanding=0, deps=[p, a])
            acc += p * sc
        for j in gl.static_range(1, TPS):
            w0, w1, zw = _tile_words(ws, zs, j, ROW_L)
            a2 = _tile_operand(w0, w1, zw, BF16, A_L)
            q = warpgroup_mma(a2, xs.slice(128 * j, 128, dim=1).permute((1, 0)), zero, use_acc=False, is_async=True)
            if DEFER:
                r, a = warpgroup_mma_wait(num_outstanding=1, deps=[p, a])
                acc += r * sc
            else:
                q, a2 = warpgroup_mma_wait(num_outstanding=0, deps=[q, a2])
                acc += q * _scale(zw, dt)
            p = q
            a = a2
            sc = _scale(zw, dt)
        return acc, p, a, sc

    @gluon.jit
    def _finish_stage(acc, p, a, sc, DEFER: gl.constexpr):
        """_stage's last product, waited for and added (DEFER)."""
        if DEFER:
            r, a = warpgroup_mma_wait(num_outstanding=0, deps=[p, a])
            acc += r * sc
        return acc

    @gluon.jit
    def program_coords(K, TILES: gl.constexpr, BLOCK_M: gl.constexpr):
        """(pid_n, pid_m, pid_k, its first K tile, its first row of codes, its first row of x)."""
        pid_n = gl.program_id(0)
        pid_m = gl.program_id(1)
        pid_k = gl.program_id(2)
        kt0 = pid_k * TILES
        return pid_n, pid_m, pid_k, kt0, (pid_n * (K // 128) + kt0) * 8, pid_m * BLOCK_M

    @gluon.jit
    def stage_buffers(w_desc, z_desc, x_desc, TPS: gl.constexpr, STAGES: gl.constexpr, BLOCK_M: gl.constexpr,
                      BF16: gl.constexpr):
        """The pipeline's shared memory: STAGES stages of TPS tiles of codes, zero-point words and x."""
        w_s = gl.allocate_shared_memory(gl.int32, [STAGES, 8 * TPS, 128], w_desc.layout)
        z_s = gl.allocate_shared_memory(gl.int32, [STAGES, TPS, 64], z_desc.layout)
        x_s = gl.allocate_shared_memory(gl.bfloat16 if BF16 else gl.float16, [STAGES, BLOCK_M, 128 * TPS],
                                        x_desc.layout)
        return w_s, z_s, x_s

    @gluon.constexpr_function
    def _prefetch_asm(nbytes):
        return ("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], "
                f"{nbytes}; }} mov.b32 $0, 0;")

    @gluon.jit
    def _prefetch_l2(w_ptr, wrow, TILES: gl.constexpr):
        """TILES code tiles (4 KB each, contiguous) from row wrow of the codes into L2: one bulk prefetch of
        1 KB TILES per warp, by its first lane."""
        t = gl.arange(0, 128, layout=gl.BlockedLayout([1], [32], [4], [0]))
        addr = w_ptr + wrow.to(gl.int64) * 256 + (t // 32) * (512 * TILES)
        gl.inline_asm_elementwise(_prefetch_asm(1024 * TILES), "=r,l,r", [addr, (t % 32 == 0).to(gl.int32)],
                                  dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _pdl_wait():
        """griddepcontrol.wait: until the previous kernel has exited and its writes are visible (runtime/ops/pdl.py)."""
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _pdl_launch_dependents():
        """griddepcontrol.launch_dependents: the next kernel may start launching (runtime/ops/pdl.py)."""
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def pdl_after_weights(PDL: gl.constexpr, EARLY: gl.constexpr):
        """Under PDL, once a GEMM's first stages of weights are issued: at pdl.TRIGGER 3 the next kernel may start
        launching now, not after the K loop; with EARLY the wait for the previous kernel is here (without, it came
        before the weight loads)."""
        if PDL >= 3:
            _pdl_launch_dependents()
        if PDL and EARLY:
            _pdl_wait()

    @gluon.jit
    def wna16_gluon_kernel(x_desc, w_desc, z_desc, w_ptr, b_ptr, out_ptr, part_ptr, lock_ptr, M, N, K,
                           TILES: gl.constexpr, TPS: gl.constexpr, STAGES: gl.constexpr, BLOCK_M: gl.constexpr,
                           SPLIT: gl.constexpr, BF16: gl.constexpr, DEFER: gl.constexpr, PRE: gl.constexpr,
                           HAS_BIAS: gl.constexpr = False, PDL: gl.constexpr = False, EARLY: gl.constexpr = True,
                           L2PF: gl.constexpr = 0, res_ptr=None, g_ptr=None, xg_ptr=None, ss_ptr=None, eps=0.0,
                           ADD: gl.constexpr = False, RMS: gl.constexpr = False, pair_ptr=None,
                           SILU: gl.constexpr = False):
        """y^T [64 rows, BLOCK_M] over the program's TILES K tiles, TPS tiles per pipeline stage, STAGES stages.
        Under PDL: with EARLY the first stages' codes and zero points are loaded before the wait for the previous
        kernel, and the L2PF tiles after them prefetched into L2; the next kernel may launch once the K loop is done
        (PDL 1, 2) or once the first stages are issued (3: pdl.TRIGGER). ADD / RMS: the producer and the consumer of an
        RMSNorm carried by the epilogues (_write_final, _row_rscale; triton_wna16_mma.linear_wna16_mma_add_norm_cuda).
        SILU: out is silu(gate) * up of the gate | up product (_silu_pair; triton_wna16_mma's
        linear_wna16_mma_silu_cuda)."""
        ROW_L: gl.constexpr = gl.SliceLayout(1, mma_layout(BLOCK_M))
        NST: gl.constexpr = TILES // TPS
        pid_n, pid_m, pid_k, kt0, wrow0, xrow = program_coords(K, TILES, BLOCK_M)
        w_s, z_s, x_s = stage_buffers(w_desc, z_desc, x_desc, TPS, STAGES, BLOCK_M, BF16)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        if PDL and not EARLY:  # programmatic dependent launch (runtime/ops/pdl.py): nothing is touched before this
            _pdl_wait()
        for i in gl.static_range(STAGES):
            if i < NST:
                _issue_weights(w_desc, z_desc, x_desc, bars.index(i), w_s.index(i), z_s.index(i),
                               wrow0 + i * 8 * TPS, kt0 + i * TPS, pid_n)
        PF: gl.constexpr = min(L2PF, TILES - STAGES * TPS)
        if PF > 0:
            _prefetch_l2(w_ptr, wrow0 + STAGES * TPS * 8, PF)
        # EARLY: the first stages' weights (and L2PF more tiles into L2) are read before the wait for the previous
        # kernel; only x, the outputs and the split-K counters depend on it, so the weight stream starts while that
        # kernel still runs
        pdl_after_weights(PDL, EARLY)
        for i in gl.static_range(STAGES):
            if i < NST:
                _issue_x(x_desc, bars.index(i), x_s.index(i), kt0 + i * TPS, xrow)
        r = None
        if RMS:  # read while the first stages land; ss is the previous kernel's output
            r = _row_rscale(ss_ptr, M, K, eps, pid_m, BLOCK_M)

        acc = gl.zeros([64, BLOCK_M], gl.float32, mma_layout(BLOCK_M))
        if PRE:  # the first tile's words in registers before the loop; each stage then loads the next one's
            mbarrier.wait(bars.index(0), 0)
            cw0, cw1, czw = _tile_words(w_s.index(0), z_s.index(0), 0, ROW_L)
        for u in range(NST):
            s = u % STAGES
            ws = w_s.index(s)
            zs = z_s.index(s)
            if PRE:
                w0, w1, zw = cw0, cw1, czw
            else:
                mbarrier.wait(bars.index(s), (u // STAGES) & 1)
                w0, w1, zw = _tile_words(ws, zs, 0, ROW_L)
            acc, p, a, sc = _stage(acc, ws, zs, x_s.index(s), w0, w1, zw, TPS, DEFER, BF16, BLOCK_M)
            if PRE:
                if u + 1 < NST:  # the next stage's first tile, loaded while this stage's last wgmma runs
                    s1 = (u + 1) % STAGES
                    mbarrier.wait(bars.index(s1), ((u + 1) // STAGES) & 1)
                    cw0, cw1, czw = _tile_words(w_s.index(s1), z_s.index(s1), 0, ROW_L)
            acc = _finish_stage(acc, p, a, sc, DEFER)
            gl.thread_barrier()  # every warp is done with stage s: refill it
            nxt = u + STAGES
            if nxt < NST:
                _issue(w_desc, z_desc, x_desc, bars.index(s), w_s.index(s), z_s.index(s), x_s.index(s),
                       wrow0 + nxt * 8 * TPS, kt0 + nxt * TPS, pid_n, xrow)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))
        if PDL and PDL < 3:  # the K loop is done: the next kernel may start launching
            _pdl_launch_dependents()
        epilogue(acc, b_ptr, out_ptr, part_ptr, lock_ptr, M, N, pid_n, pid_m, pid_k, BLOCK_M, SPLIT, HAS_BIAS, BF16,
                 res_ptr, g_ptr, xg_ptr, ss_ptr, r, ADD, RMS, pair_ptr, SILU)

    def layouts(block_m: int, tps: int, dtype=torch.bfloat16):
        gdt = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
        return (gl.NVMMASharedLayout.get_default_for([block_m, 128 * tps], gdt),
                gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2),
                gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2))

    def descriptors(x, qmma, zw, block_m: int, tps: int) -> tuple:
        """The kernel's three TMA descriptors: x [M, K] in boxes [block_m, 128 tps], the codes as rows of 128 int32
        (a 4 KB tile = 8 rows; boxes of tps tiles), the zero-point words [K / 128, N] in boxes [tps, 64]."""
        xl, wl, zl = layouts(block_m, tps, x.dtype)
        return (TensorDescriptor.from_tensor(x, [block_m, 128 * tps], xl),
                TensorDescriptor.from_tensor(qmma.view(torch.int32).view(-1, 128), [8 * tps, 128], wl),
                TensorDescriptor.from_tensor(zw, [tps, 64], zl))

    def counter_slots(tiles_mn: int, silu: bool) -> int:
        """The tile counters one launch of tiles_mn output tiles uses: one per tile (serial split-K), and with silu
        one more per gate | up pair after them (_silu_pair)."""
        return tiles_mn * 3 // 2 if silu else tiles_mn

    def outputs(x, n: int, split: int) -> tuple:
        """(out [M, N], the split-K partials or out, the tile counters or out)."""
        m = x.shape[0]
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        if split == 1:
            return out, out, out
        return out, torch.empty((split, m, n), dtype=torch.float32, device=x.device), tgm._locks(x.device)

    def linear_wna16_gluon(x, qmma, zw, bias=None, *, tps=2, stages=3, block_m=16, split=1, defer=True, pre=False,
                           pdl=False, early=True, l2pf=0, add=None, rms=None, silu=False):
        """x [M, K] bf16/fp16 (rows 16-byte aligned), qmma int16 [N/64, K/128, 2048] (pack_wna16_mma), zw int32
        [K/128, N] (pack_mma_zeros: group size 128), bias [N] or None -> y [M, N] in x's dtype. The K tiles per
        program (K / 128 / split) must be a multiple of tps.
        add = (residual [M, N], norm weight [N]): returns (y + residual, (y + residual) * weight, the sums of the
        squares of y + residual per 64 columns [N / 64, M] float32). rms = (those sums [K / 64, M], eps): y is
        x W^T times each row's rsqrt(sum / K + eps), then the bias. silu: y is gate | up (N / 2 % 64 == 0); returns
        silu(gate) * up [M, N / 2] (with rms: of the scaled product). pdl: launched with PDL, the level being
        pdl.TRIGGER (False / 0: without)."""
        m, k = x.shape
        n = qmma.shape[0] * 64
        tiles = k // 128 // split
        assert tiles * split * 128 == k and tiles % tps == 0, (k, split, tps)
        out, part, locks = outputs(x, n, split)
        extra = {"PDL": int(pdl), "launch_pdl": True} if pdl else {}
        if silu:
            slots = counter_slots(n // 64 * triton.cdiv(m, block_m), True)
            assert n % 128 == 0 and add is None and slots <= tgm.LOCK_SLOTS, (n, slots)
            pair, out, locks = out, torch.empty((m, n // 2), dtype=x.dtype, device=x.device), tgm._locks(x.device)
            extra.update(pair_ptr=pair, SILU=True)
        if add is not None:
            res, g = add
            xg = torch.empty_like(out)
            ss = torch.empty((n // 64, m), dtype=torch.float32, device=x.device)
            extra.update(res_ptr=res, g_ptr=g, xg_ptr=xg, ss_ptr=ss, ADD=True)
        if rms is not None:
            extra.update(ss_ptr=rms[0], eps=float(rms[1]), RMS=True)
        wna16_gluon_kernel[(n // 64, triton.cdiv(m, block_m), split)](
            *descriptors(x, qmma, zw, block_m, tps), qmma, bias if bias is not None else out, out, part, locks, m, n,
            k, TILES=tiles, TPS=tps, STAGES=stages, BLOCK_M=block_m, SPLIT=split, BF16=x.dtype == torch.bfloat16,
            DEFER=defer, PRE=pre, HAS_BIAS=bias is not None, EARLY=early, L2PF=l2pf, num_warps=4, **extra)
        return (out, xg, ss) if add is not None else out
