"""The W4A16 prefill kernel on the tensor-core layout (GemmConfig.wide; launched by
triton_wna16_mma.linear_wna16_mma_cuda where triton_wna16_mma.WNA16_MMA_PREFILL or an explicit config asks for it):
several 64-row weight blocks per program sharing each x tile, the scale folded into the weight. Not yet timed on a
GPU (bench/NOTES-wna16.md items 12-13).
"""

from __future__ import annotations

from runtime.ops.triton_gemm import _jit, gdc_launch_dependents, gdc_wait, tl
from runtime.ops.triton_wna16_tile import _mma_finish, _mma_operand


@_jit
def _wide_operand(w_desc, z_desc, bj, kt, KT, zz, dt: tl.constexpr, FOLD: tl.constexpr, ASM: tl.constexpr,
                  BF16: tl.constexpr, MAGIC: tl.constexpr):
    """The 64-row block bj's K tile kt in _wna16_mma_wide_kernel: its codes and words by TMA, dequantized into
    the wgmma register operand [64, 128]; FOLD: times the group scale, rounded once. Returns it and the scales."""
    words = w_desc.load([(bj * KT + kt) * 8, 0]).reshape(2, 4, 8, 4, 8)  # pack_wna16_mma's v, w, g, t, r
    zw = z_desc.load([kt, bj * 64])  # [1, 64]: row 16 w + 8 v + g of the block
    zr = zw.reshape(4, 2, 8).permute(1, 0, 2).reshape(2, 4, 8, 1, 1)  # [v, w, g] as _mma_load's zr
    if FOLD:
        a, sr = _mma_operand(words, zr, zr, zz, dt, True, True, ASM, BF16, MAGIC, True)
    else:
        a, sr = _mma_operand(words, zr, zw.reshape(64, 1), zz, dt, True, False, ASM, BF16, MAGIC, True)
    return a, sr


@_jit
def _wide_product(acc, a, b, sr, FOLD: tl.constexpr):
    """acc + a @ b^T: FOLD, into the chained accumulator (the scale is in a); else scaled per row in float32."""
    if FOLD:
        acc = tl.dot(a, tl.trans(b), acc)
    else:
        acc += tl.dot(a, tl.trans(b)) * sr.to(tl.float32)
    return acc


@_jit
def _wide_finish(acc, out_ptr, b_ptr, part_ptr, lock_ptr, rm, m_mask, bj, pid_m, tiles_m, pid_k, M, N,
                 HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SERIAL: tl.constexpr):
    """_mma_finish for the 64-row block bj of _wna16_mma_wide_kernel (its split-K counter: bj, pid_m)."""
    _mma_finish(acc, out_ptr, b_ptr, part_ptr, lock_ptr, rm, bj * 64 + tl.arange(0, 64), m_mask,
                bj * tiles_m + pid_m, pid_k, M, N, HAS_BIAS, SPLIT, SERIAL)


@_jit(do_not_specialize=["M"])
def _wna16_mma_wide_kernel(x_desc, w_desc, z_desc, b_ptr, out_ptr, part_ptr, lock_ptr, M, N, K, TILES: tl.constexpr,
                           HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SERIAL: tl.constexpr, BLOCK_M: tl.constexpr,
                           RB: tl.constexpr, FOLD: tl.constexpr, M_FAST: tl.constexpr, ASM: tl.constexpr,
                           BF16: tl.constexpr, MAGIC: tl.constexpr, PDL: tl.constexpr = False):
    """_wna16_mma_tma_kernel for prefill-sized M (GemmConfig.wide): each program multiplies RB (1, 2 or 4)
    adjacent 64-row weight blocks by one x tile [BLOCK_M, 128] per K tile, so x (the large operand from 32 rows
    on: 32 KB a tile at BLOCK_M 128 against a block's 4 KB of codes) crosses from L2 once for RB blocks: at
    M = 256 on an 8B layer a 64-row program moves about 16x more x than codes. FOLD: the group scale in the
    weight ((q - z) * s rounded once, _wna16_mma_dequant_kernel's and so cuBLAS-after-dequantization's
    numerics), one chained accumulator per block: the K tile's 8 RB wgmma issue back to back with one wait at
    the tile's end (sm_90 compile), where scaling each product in float32, as the decode kernels do (and this
    one without FOLD), waits for every block's product before its FMAs. M_FAST: the grid's
    first axis walks the row tiles, so the programs reading one weight block run together and its codes come
    from HBM once (else once per row tile when the weight is larger than L2). Grid (N / (64 RB), tiles of M,
    split), or its first two axes swapped with M_FAST; 4 warps (one warpgroup, RB accumulators [64, BLOCK_M])."""
    if PDL:  # programmatic dependent launch (runtime/ops/pdl.py): nothing is touched before this
        gdc_wait()
    if M_FAST:
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
    else:
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < M
    dt: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
    KT = K // 128
    acc0 = tl.zeros((64, BLOCK_M), dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    zz = tl.zeros((2, 4, 8, 4, 8), dtype=dt)  # each tile's, in _mma_operand
    for t in tl.range(0, TILES):
        kt = pid_k * TILES + t
        b = x_desc.load([pid_m * BLOCK_M, kt * 128])  # [BLOCK_M, 128]; rows past M arrive as zeros
        # every block's operand before the first product: ptxas serializes wgmma (C7513) when a register operand
        # is defined while an earlier wgmma is in flight
        a0, s0 = _wide_operand(w_desc, z_desc, pid_n * RB, kt, KT, zz, dt, FOLD, ASM, BF16, MAGIC)
        if RB > 1:
            a1, s1 = _wide_operand(w_desc, z_desc, pid_n * RB + 1, kt, KT, zz, dt, FOLD, ASM, BF16, MAGIC)
        if RB > 2:
            a2, s2 = _wide_operand(w_desc, z_desc, pid_n * RB + 2, kt, KT, zz, dt, FOLD, ASM, BF16, MAGIC)
            a3, s3 = _wide_operand(w_desc, z_desc, pid_n * RB + 3, kt, KT, zz, dt, FOLD, ASM, BF16, MAGIC)
        acc0 = _wide_product(acc0, a0, b, s0, FOLD)
        if RB > 1:
            acc1 = _wide_product(acc1, a1, b, s1, FOLD)
        if RB > 2:
            acc2 = _wide_product(acc2, a2, b, s2, FOLD)
            acc3 = _wide_product(acc3, a3, b, s3, FOLD)
    if PDL:  # the K loop is done: the next kernel may start launching
        gdc_launch_dependents()
    tiles_m = tl.cdiv(M, BLOCK_M)
    _wide_finish(acc0, out_ptr, b_ptr, part_ptr, lock_ptr, rm, m_mask, pid_n * RB, pid_m, tiles_m, pid_k, M, N,
                 HAS_BIAS, SPLIT, SERIAL)
    if RB > 1:
        _wide_finish(acc1, out_ptr, b_ptr, part_ptr, lock_ptr, rm, m_mask, pid_n * RB + 1, pid_m, tiles_m, pid_k, M,
                     N, HAS_BIAS, SPLIT, SERIAL)
    if RB > 2:
        _wide_finish(acc2, out_ptr, b_ptr, part_ptr, lock_ptr, rm, m_mask, pid_n * RB + 2, pid_m, tiles_m, pid_k, M,
                     N, HAS_BIAS, SPLIT, SERIAL)
        _wide_finish(acc3, out_ptr, b_ptr, part_ptr, lock_ptr, rm, m_mask, pid_n * RB + 3, pid_m, tiles_m, pid_k, M,
                     N, HAS_BIAS, SPLIT, SERIAL)
