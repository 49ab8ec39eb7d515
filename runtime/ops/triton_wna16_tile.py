"""The per-tile arithmetic of the W4A16 tensor-core kernels on quant_linear.pack_wna16_mma's layout
(runtime/ops/triton_wna16_mma.py, its plain-load variant triton_wna16_ldg.py and its prefill kernel
triton_wna16_prefill.py): where a 4 KB tile's words sit (_mma_index), their loads (_mma_load), the codes turned into
q - z or (q - z) * s in the model dtype by the magic-number trick (_mma_dequant, one asm block per pair of int16 on
sm_90), pack_mma_zeros' words read back (_word_zz, _word_scale), the [64, 128] wgmma register operand they form
(_mma_operand), and the end every kernel shares (_mma_finish: split-K, bias, store).
"""

from __future__ import annotations

from runtime.ops.triton_gemm import (
    _jit,
    _split_k,
    _store_out,
    tl,
)


@_jit
def _mma_nibbles(words, zz, i: tl.constexpr, MAGIC: tl.constexpr, ss=1.0):
    """What _mma_dequant's instructions compute for nibble i (the interpreter and pre-Hopper GPUs run this):
    (MAGIC + code) - zz, zz = MAGIC + zero point, exact in the model dtype; times ss (float32) if given, the
    product rounded once."""
    q = ((words.to(tl.int32) >> (4 * i)) & 0xF).to(tl.float32)
    return ((q + MAGIC - zz.to(tl.float32)) * ss).to(zz.dtype)


@_jit
def _mma_dequant(words, zz, ss, ASM: tl.constexpr, BF16: tl.constexpr, MAGIC: tl.constexpr, SCALED: tl.constexpr):
    """int16 words (4 codes each) -> 4 tensors of q - z in the model dtype, nibble i in the i-th; SCALED: times
    the row's group scale ss (the model dtype), (q - z) * s rounded once (_wna16_mma_dequant_kernel's weight;
    ss is not read otherwise). On the GPU one asm block per pair of int16 (one 32-bit register; pack=2): per
    nibble position a shift, one LOP3 (mask the pair's two codes and OR in the exponent bits of MAGIC: the bf16
    / fp16 value MAGIC + q) and one packed subtraction of zz = MAGIC + z (HADD2), about 1.4 instructions per
    weight (SCALED: one packed multiplication more per pair, HMUL2). The exponent bits come from zz itself
    (MAGIC + z, z < 128, shares them), so they sit in a register and the mask and the OR fuse."""
    if ASM:
        SUB: tl.constexpr = "sub.rn.bf16x2" if BF16 else "sub.rn.f16x2"
        MUL: tl.constexpr = ("mul.rn.bf16x2" if BF16 else "mul.rn.f16x2") if SCALED else "mov.b32"
        ARG: tl.constexpr = ", $6" if SCALED else ""
        ASM_TEXT: tl.constexpr = f"""{{
            .reg .b32 t, u;
            and.b32 u, $5, 0xFF80FF80;
            lop3.b32 t, $4, 0x000F000F, u, 0xEA; {SUB} t, t, $5; {MUL} $0, t{ARG};
            shr.u32 t, $4, 4;  lop3.b32 t, t, 0x000F000F, u, 0xEA; {SUB} t, t, $5; {MUL} $1, t{ARG};
            shr.u32 t, $4, 8;  lop3.b32 t, t, 0x000F000F, u, 0xEA; {SUB} t, t, $5; {MUL} $2, t{ARG};
            shr.u32 t, $4, 12; lop3.b32 t, t, 0x000F000F, u, 0xEA; {SUB} t, t, $5; {MUL} $3, t{ARG};
            }}"""
        if SCALED:
            o0, o1, o2, o3 = tl.inline_asm_elementwise(asm=ASM_TEXT, constraints="=r,=r,=r,=r,r,r,r",
                                                       args=[words, zz, ss], dtype=(zz.dtype,) * 4, is_pure=True,
                                                       pack=2)
        else:
            o0, o1, o2, o3 = tl.inline_asm_elementwise(asm=ASM_TEXT, constraints="=r,=r,=r,=r,r,r", args=[words, zz],
                                                       dtype=(zz.dtype,) * 4, is_pure=True, pack=2)
    else:
        sf = ss.to(tl.float32) if SCALED else 1.0
        o0 = _mma_nibbles(words, zz, 0, MAGIC, sf)
        o1 = _mma_nibbles(words, zz, 1, MAGIC, sf)
        o2 = _mma_nibbles(words, zz, 2, MAGIC, sf)
        o3 = _mma_nibbles(words, zz, 3, MAGIC, sf)
    return o0, o1, o2, o3


@_jit
def _word_zz(words, dt: tl.constexpr):
    """MAGIC + z from pack_mma_zeros' words (high half: its bits in the model dtype dt)."""
    return (words >> 16).to(tl.int16).to(dt, bitcast=True)


@_jit
def _word_scale(words, dt: tl.constexpr):
    """The group scale from pack_mma_zeros' words (low half: its bits in the model dtype dt)."""
    return (words & 0xFFFF).to(tl.int16).to(dt, bitcast=True)


@_jit
def _mma_index(pid_n):
    """Row block pid_n's indices: each word's offset in a 4 KB tile ([2, 4, 8, 4, 8]: pack_wna16_mma's
    v, w, g, t, r), the weight row of each word ([2, 4, 8, 1, 1]) and the block's 64 rows."""
    ov = tl.arange(0, 2)[:, None, None, None, None]
    ow = tl.arange(0, 4)[None, :, None, None, None]
    og = tl.arange(0, 8)[None, None, :, None, None]
    ot = tl.arange(0, 4)[None, None, None, :, None]
    orr = tl.arange(0, 8)[None, None, None, None, :]
    tile_off = ov * 1024 + ow * 256 + og * 32 + ot * 8 + orr
    row5 = pid_n * 64 + 16 * ow + 8 * ov + og
    return tile_off, row5, pid_n * 64 + tl.arange(0, 64)


@_jit
def _mma_load(w_base, z_ptr, s_ptr, kt, N, tile_off, row5, srows, GROUPED: tl.constexpr, META: tl.constexpr):
    """Tile kt's words and (grouped) its zero points ([2, 4, 8, 1, 1]) and scales (offsets ``srows``), loads
    issued, nothing waited for; META: both in pack_mma_zeros' words."""
    words = tl.load(w_base + kt * 2048 + tile_off)
    zr = words
    sr = words
    if GROUPED:
        zr = tl.load(z_ptr + kt * N + row5)
        sr = tl.load((z_ptr if META else s_ptr) + kt * N + srows)
    return words, zr, sr


@_jit
def _mma_operand(words, zr, sr, zz, dt: tl.constexpr, GROUPED: tl.constexpr, SCALED: tl.constexpr,
                 ASM: tl.constexpr, BF16: tl.constexpr, MAGIC: tl.constexpr, META: tl.constexpr):
    """A tile's words -> the [64, 128] weight tile (rows: output channels, columns: K) in the model dtype,
    q - z, or (q - z) * s with SCALED (sr then in the words' row layout); also returns the tile's scales."""
    if GROUPED and META:
        zz = tl.broadcast_to(_word_zz(zr, dt), (2, 4, 8, 4, 8))
        sr = _word_scale(sr, dt)
    elif GROUPED:
        zz = tl.broadcast_to((zr.to(tl.float32) + MAGIC).to(dt), (2, 4, 8, 4, 8))
    ss = zz
    if SCALED:
        ss = tl.broadcast_to(sr.to(dt), (2, 4, 8, 4, 8))
    o0, o1, o2, o3 = _mma_dequant(words, zz, ss, ASM, BF16, MAGIC, SCALED)
    a = tl.join(tl.join(o0, o1), tl.join(o2, o3))  # [v, w, g, t, r, i0, i1]: join appends its axis
    a = a.reshape(2, 4, 8, 4, 2, 2, 2, 2, 2)  # v, w, g, t, p1, p0, h, i0, i1
    a = a.permute(1, 0, 2, 4, 5, 8, 7, 3, 6).reshape(64, 128)  # rows (w, v, g), columns (p1, p0, i1, i0, t, h)
    return a, sr


@_jit
def _mma_finish(acc, out_ptr, b_ptr, part_ptr, lock_ptr, rm, rn, m_mask, tile, pid_k, M, N,
                HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SERIAL: tl.constexpr):
    """The W4A16 mma kernels' end: y^T [64 rows rn, BLOCK_M rows rm of x] through split-K to out (+ bias);
    tile: the output tile's index among the launch's (its split-K counter)."""
    offs = rm[None, :].to(tl.int64) * N + rn[:, None]
    mask = m_mask[None, :] & (rn < N)[:, None]
    finish, acc = _split_k(acc, part_ptr, lock_ptr, tile, pid_k, offs, mask, M, N, SPLIT, SERIAL)
    if finish:
        _store_out(acc, out_ptr, b_ptr, rn[:, None], (rn < N)[:, None], offs, mask, HAS_BIAS)
