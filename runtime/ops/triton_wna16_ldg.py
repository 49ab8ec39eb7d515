"""_wna16_mma_ldg_kernel: the W4A16 tensor-core kernel of runtime/ops/triton_wna16_mma.py with the codes read by
plain 16-byte loads straight into the registers wgmma reads them from (GemmConfig.ldg; off by default: no faster
in the engine, see the kernel's docstring). Launched by triton_wna16_mma.linear_wna16_mma_cuda.
"""

from __future__ import annotations

from runtime.ops.triton_gemm import _gemm_program, _jit, gdc_launch_dependents, gdc_wait, tl
from runtime.ops.triton_wna16_tile import _mma_finish, _mma_nibbles, _word_scale, _word_zz


@_jit
def _mma_dequant_pairs(w32, zr, ASM: tl.constexpr, BF16: tl.constexpr, MAGIC: tl.constexpr, SCALED: tl.constexpr):
    """int32 pairs of pack_wna16_mma's int16 words (h = 0 the low half) and their rows' pack_mma_zeros words ->
    eight tensors of q - z in the model dtype ((q - z) * s rounded once with SCALED), in the order (i1, i0, h)
    of nibble i = 2 i1 + i0 and half h. On the GPU _mma_dequant's instructions per 32-bit word (a shift, one
    LOP3 and one packed subtraction per nibble position; SCALED: and one packed multiplication), each
    bf16x2 / f16x2 result handed out as its two 16-bit halves: the caller joins them back in the operand's
    register order, so the halves stay where they are."""
    if ASM:
        SUB: tl.constexpr = "sub.rn.bf16x2" if BF16 else "sub.rn.f16x2"
        MUL: tl.constexpr = ("mul.rn.bf16x2" if BF16 else "mul.rn.f16x2") if SCALED else "mov.b32"
        ARG: tl.constexpr = ", $10" if SCALED else ""
        ASM_TEXT: tl.constexpr = f"""{{
            .reg .b32 t, u, r0, r1, r2, r3;
            and.b32 u, $9, 0xFF80FF80;
            lop3.b32 t, $8, 0x000F000F, u, 0xEA; {SUB} t, t, $9; {MUL} r0, t{ARG};
            shr.u32 t, $8, 4;  lop3.b32 t, t, 0x000F000F, u, 0xEA; {SUB} t, t, $9; {MUL} r1, t{ARG};
            shr.u32 t, $8, 8;  lop3.b32 t, t, 0x000F000F, u, 0xEA; {SUB} t, t, $9; {MUL} r2, t{ARG};
            shr.u32 t, $8, 12; lop3.b32 t, t, 0x000F000F, u, 0xEA; {SUB} t, t, $9; {MUL} r3, t{ARG};
            mov.b32 {{$0, $1}}, r0; mov.b32 {{$2, $3}}, r1; mov.b32 {{$4, $5}}, r2; mov.b32 {{$6, $7}}, r3;
            }}"""
        OUT: tl.constexpr = (tl.bfloat16,) * 8 if BF16 else (tl.float16,) * 8
        zz2 = ((zr >> 16) & 0xFFFF) | (zr & -65536)  # MAGIC + z in both halves
        if SCALED:  # and the scale in both halves
            o = tl.inline_asm_elementwise(asm=ASM_TEXT, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,r,r",
                                          args=[w32, zz2, (zr & 0xFFFF) | (zr << 16)], dtype=OUT, is_pure=True,
                                          pack=1)
        else:
            o = tl.inline_asm_elementwise(asm=ASM_TEXT, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,r", args=[w32, zz2],
                                          dtype=OUT, is_pure=True, pack=1)
        return o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]
    dt: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
    zz = _word_zz(zr, dt)
    ss = _word_scale(zr, dt).to(tl.float32) if SCALED else 1.0
    h0 = w32 & 0xFFFF
    h1 = (w32 >> 16) & 0xFFFF
    return (_mma_nibbles(h0, zz, 0, MAGIC, ss), _mma_nibbles(h1, zz, 0, MAGIC, ss),
            _mma_nibbles(h0, zz, 1, MAGIC, ss), _mma_nibbles(h1, zz, 1, MAGIC, ss),
            _mma_nibbles(h0, zz, 2, MAGIC, ss), _mma_nibbles(h1, zz, 2, MAGIC, ss),
            _mma_nibbles(h0, zz, 3, MAGIC, ss), _mma_nibbles(h1, zz, 3, MAGIC, ss))


@_jit
def _mma_operand_ldg(w0, w1, z0, z1, ASM: tl.constexpr, BF16: tl.constexpr, MAGIC: tl.constexpr,
                     SCALED: tl.constexpr = False):
    """One tile's words as loaded by _wna16_mma_ldg_kernel: int32 [128, 4] per row half v (thread q = 32 w + 4 g
    + t, pair c = 2 p1 + p0 of its 16 bytes) and the rows' zero-point words [128, 1] -> the [64, 128] A operand.
    Each tl.join puts its new axis first in a thread's registers, so joining the halves in the order i1, i0, v,
    h leaves each thread's registers in the order wgmma reads them (h, v, i0, i1, then p0, p1 from the load):
    the reshape and permute that follow rename axes only, and nothing goes through shared memory."""
    a00, a01, a10, a11, a20, a21, a30, a31 = _mma_dequant_pairs(w0, z0, ASM, BF16, MAGIC, SCALED)
    b00, b01, b10, b11, b20, b21, b30, b31 = _mma_dequant_pairs(w1, z1, ASM, BF16, MAGIC, SCALED)
    v0h0 = tl.join(tl.join(a00, a20), tl.join(a10, a30))  # [128, 4, i1, i0]
    v0h1 = tl.join(tl.join(a01, a21), tl.join(a11, a31))
    v1h0 = tl.join(tl.join(b00, b20), tl.join(b10, b30))
    v1h1 = tl.join(tl.join(b01, b21), tl.join(b11, b31))
    a = tl.join(tl.join(v0h0, v1h0), tl.join(v0h1, v1h1))  # [128, 4, i1, i0, v, h]
    a = a.reshape(4, 8, 4, 2, 2, 2, 2, 2, 2)  # w, g, t, p1, p0, i1, i0, v, h
    return a.permute(0, 7, 1, 3, 4, 5, 6, 2, 8).reshape(64, 128)  # rows (w, v, g), cols (p1, p0, i1, i0, t, h)


@_jit
def _mma_load_words_ldg(qw32, z_ptr, srows, kt, N, woff, zoff):
    """Tile kt's weight loads for _wna16_mma_ldg_kernel: its two row halves of words (int32 [128, 4] each), their
    zero-point words ([128, 1] each) and the block's scale words ([64, 1])."""
    w0 = tl.load(qw32 + kt * 1024 + woff)
    w1 = tl.load(qw32 + kt * 1024 + 512 + woff)
    z0 = tl.load(z_ptr + kt * N + zoff)
    z1 = tl.load(z_ptr + kt * N + 8 + zoff)
    sr = tl.load(srows + kt * N)
    return w0, w1, z0, z1, sr


@_jit
def _mma_load_ldg(qw32, z_ptr, srows, xcols, kt, N, woff, zoff, m_mask):
    """Tile kt's loads for _wna16_mma_ldg_kernel: _mma_load_words_ldg's and x^T ([128, BLOCK_M])."""
    w0, w1, z0, z1, sr = _mma_load_words_ldg(qw32, z_ptr, srows, kt, N, woff, zoff)
    b = tl.load(xcols + kt * 128, mask=m_mask[None, :], other=0.0)
    return w0, w1, z0, z1, sr, b


@_jit
def _mma_tile_ldg(acc, w0, w1, z0, z1, sr, b, ASM: tl.constexpr, BF16: tl.constexpr, MAGIC: tl.constexpr,
                  SCALE_ACC: tl.constexpr):
    """One K tile of _wna16_mma_ldg_kernel: acc + its dot, the group scale applied to the product (SCALE_ACC) or
    to the weight ((q - z) * s rounded to the model dtype; the dot accumulates in place)."""
    if SCALE_ACC:
        dt: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
        a = _mma_operand_ldg(w0, w1, z0, z1, ASM, BF16, MAGIC)
        return acc + tl.dot(a, b) * _word_scale(sr, dt).to(tl.float32)
    return tl.dot(_mma_operand_ldg(w0, w1, z0, z1, ASM, BF16, MAGIC, True), b, acc)


@_jit(do_not_specialize=["M"])
def _wna16_mma_ldg_kernel(x_ptr, qw_ptr, z_ptr, b_ptr, out_ptr, part_ptr, lock_ptr, M, N, K, stride_xm,
                          TILES: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SERIAL: tl.constexpr,
                          BLOCK_M: tl.constexpr, ASM: tl.constexpr, BF16: tl.constexpr, MAGIC: tl.constexpr,
                          PDL: tl.constexpr = False, SCALE_ACC: tl.constexpr = True):
    """_wna16_mma_kernel (grouped, zero points and scales as pack_mma_zeros' words, no act-order) with the codes
    loaded by plain 16-byte loads straight into the registers wgmma reads them from (_mma_operand_ldg), the
    next K tile's codes, words and x loaded while this one is computed (launched with num_stages=1: no cp.async
    or TMA pipeline; shared memory holds x only, as wgmma's B operand). Tile pairs are unrolled by hand into two
    register sets: with one set ptxas reused its registers for the next tile's loads and issued them only after
    the current tile's dequantization (the warps then waited on them: ncu, bench/results/ncu-wna16-mma-h200.json).
    With 128 registers (GemmConfig.maxnreg; triton_wna16_mma.WNA16_MMA_LDG) it is 2-3% faster per 8B layer than the
    TMA kernel up to 4 rows and slower from 8, and no faster in the engine at batch 1
    (bench/results/quant-gemm-mma-ldg-h200.json, quant-engine-8b-h200-w4a16-ldg.json): off by default."""
    if PDL:  # programmatic dependent launch (runtime/ops/pdl.py): nothing is touched before this
        gdc_wait()
    pid_n, pid_m, pid_k, rn, _, rm, m_mask = _gemm_program(M, N, BLOCK_M, 64)  # 64 weight rows
    qw32 = qw_ptr.to(tl.pointer_type(tl.int32)) + pid_n.to(tl.int64) * (K // 128) * 1024
    oq = tl.arange(0, 128)[:, None]  # thread q = 32 w + 4 g + t
    woff = oq * 4 + tl.arange(0, 4)[None, :]  # its 16 bytes of a row half
    zoff = pid_n * 64 + 16 * (oq // 32) + (oq % 32) // 4  # row 16 w + g (+ 8: the second half)
    srows = z_ptr + rn[:, None]
    xcols = x_ptr + rm[None, :].to(tl.int64) * stride_xm + tl.arange(0, 128)[:, None]  # x^T [128, BLOCK_M]
    acc = tl.zeros((64, BLOCK_M), dtype=tl.float32)
    kt0 = pid_k * TILES
    # two register sets, tile pairs unrolled by hand: a set is loaded while the other set's tile is computed,
    # and no register is copied at the loop's end (a copy of a value still in flight would wait for it)
    a0, a1, az0, az1, asr, ab = _mma_load_ldg(qw32, z_ptr, srows, xcols, kt0, N, woff, zoff, m_mask)
    for t in range(0, TILES // 2):
        b0, b1, bz0, bz1, bsr, bb = _mma_load_ldg(qw32, z_ptr, srows, xcols, kt0 + 2 * t + 1, N, woff, zoff,
                                                  m_mask)
        acc = _mma_tile_ldg(acc, a0, a1, az0, az1, asr, ab, ASM, BF16, MAGIC, SCALE_ACC)
        # (the last pair loads its own second tile again: no branch)
        a0, a1, az0, az1, asr, ab = _mma_load_ldg(qw32, z_ptr, srows, xcols, kt0 + tl.minimum(2 * t + 2, TILES - 1),
                                                  N, woff, zoff, m_mask)
        acc = _mma_tile_ldg(acc, b0, b1, bz0, bz1, bsr, bb, ASM, BF16, MAGIC, SCALE_ACC)
    if TILES % 2 == 1:
        acc = _mma_tile_ldg(acc, a0, a1, az0, az1, asr, ab, ASM, BF16, MAGIC, SCALE_ACC)
    if PDL:  # the K loop is done: the next kernel may start launching
        gdc_launch_dependents()
    _mma_finish(acc, out_ptr, b_ptr, part_ptr, lock_ptr, rm, rn, m_mask, pid_n * tl.num_programs(1) + pid_m, pid_k,
                M, N, HAS_BIAS, SPLIT, SERIAL)
