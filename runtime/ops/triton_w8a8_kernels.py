"""The W8A8 GEMM kernels on codes (the launchers, their configurations and the cuBLAS routes are in
runtime/ops/triton_w8a8.py):

_w8a8_gemm_kernel      split-K tensor-core GEMM on int8 or E4M3 codes (int32 / float32 accumulation, exact
                       products); SWAP puts the weight tile on the MMA's M side for decode rows
_w8a8_swap_tma_kernel  the same with SWAP on E4M3 codes, both loads by TMA (whole tiles, sm_90+)
_w8a8_gemv_kernel      one row per program without tensor cores
_fp8_xq_kernel         FP8 with the rows' activation quantization inside the swapped TMA GEMM (off by default:
                       triton_w8a8.FP8_XQ_MAX_M)

All of them end in _w8a8_finish's order: split-K (runtime/ops/triton_gemm.py's _split_k), then
y = acc * xs[row] * ws[col] (+ bias).
"""

from __future__ import annotations

from runtime.ops.triton_act_quant import act_codes, act_scale, silu_mul_rounded
from runtime.ops.triton_gemm import (
    _gemm_program,
    _gemv_program,
    _jit,
    _split_k,
    _store_out,
    gdc_launch_dependents,
    gdc_wait,
    tl,
)


@_jit
def _sides(rm, rn, m_mask, n_mask, SWAP: tl.constexpr):
    """(rows, cols, row_mask, col_mask) of a W8A8 tile: x's rows by the weight's, or with SWAP the other way."""
    if SWAP:
        rows, cols, row_mask, col_mask = rn, rm, n_mask, m_mask
    else:
        rows, cols, row_mask, col_mask = rm, rn, m_mask, n_mask
    return rows, cols, row_mask, col_mask


@_jit(do_not_specialize=["M"])
def _w8a8_gemm_kernel(a_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, lock_ptr, M, N, K,
                      TILES: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SERIAL: tl.constexpr,
                      FP8: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, SWAP: tl.constexpr = False, EVEN: tl.constexpr = False,
                      PDL: tl.constexpr = False):
    """acc = a[rm, k] @ w[rn, k].T over the program's K tiles; y = (acc * xs[rm]) * ws[rn] + bias (or the
    partial when split). w [N, K] and a [M, K] contiguous codes: int8 (int32 acc, exact) or E4M3 (float32 acc:
    E4M3 products are exact in float32; UPCAST converts the codes to float16 first, also exact; E4M3 codes
    arrive as uint8 and are reinterpreted here). SERIAL: split partials summed by the tile's last program
    (_split_k). EVEN: K and N are whole tiles (no masks but the rows').
    SWAP (decode: a few rows): the operands swapped, acc^T [BLOCK_N, BLOCK_M] = w[rn, k] @ a[rm, k]^T, so the
    weight tile (BLOCK_N >= 64 output channels, K-contiguous as stored) is the tensor-core instruction's M side
    (wgmma's A operand from shared memory) and the rows its N (16): no MMA rows spent on padding, both
    operands K-major as FP8 wgmma wants them (not with UPCAST)."""
    if PDL:  # programmatic dependent launch (runtime/ops/pdl.py): nothing is touched before this
        gdc_wait()
    pid_n, pid_m, pid_k, rn, n_mask, rm, m_mask = _gemm_program(M, N, BLOCK_M, BLOCK_N)
    rows, cols, row_mask, col_mask = _sides(rm, rn, m_mask, n_mask, SWAP)
    if SWAP:  # tiles [BLOCK_N, BLOCK_K] of w and [BLOCK_K, BLOCK_M] of a^T
        lhs_ptr = w_ptr
        rhs_ptr = a_ptr
    else:  # tiles [BLOCK_M, BLOCK_K] of a and [BLOCK_K, BLOCK_N] of w^T
        lhs_ptr = a_ptr
        rhs_ptr = w_ptr
    lhs_rows = lhs_ptr + rows.to(tl.int64)[:, None] * K
    rhs_cols = rhs_ptr + cols.to(tl.int64)[None, :] * K
    if FP8:
        acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    else:
        acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.int32)
    kt0 = pid_k * TILES
    for t in range(0, TILES):
        offs_k = (kt0 + t) * BLOCK_K + tl.arange(0, BLOCK_K)
        if EVEN and SWAP:  # the weight needs no mask, the rows of a do
            x = tl.load(lhs_rows + offs_k[None, :])
            y = tl.load(rhs_cols + offs_k[:, None], mask=col_mask[None, :], other=0)
        elif EVEN:
            x = tl.load(lhs_rows + offs_k[None, :], mask=row_mask[:, None], other=0)
            y = tl.load(rhs_cols + offs_k[:, None])
        else:
            k_mask = offs_k < K
            x = tl.load(lhs_rows + offs_k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0)
            y = tl.load(rhs_cols + offs_k[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0)
        if FP8:
            x = x.to(tl.float8e4nv, bitcast=True)
            y = y.to(tl.float8e4nv, bitcast=True)
            if UPCAST:
                acc = tl.dot(x.to(tl.float16), y.to(tl.float16), acc)
            else:
                acc = tl.dot(x, y, acc)
        else:
            acc = tl.dot(x, y, acc, out_dtype=tl.int32)
    if PDL:  # the K loop is done: the next kernel may start launching
        gdc_launch_dependents()
    _w8a8_finish(acc, xs_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, lock_ptr, rm, rn, m_mask, n_mask, pid_n, pid_m, pid_k,
                 M, N, HAS_BIAS, SPLIT, SERIAL, BLOCK_M, SWAP)


@_jit
def _w8a8_finish(acc, xs_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, lock_ptr, rm, rn, m_mask, n_mask, pid_n, pid_m, pid_k,
                 M, N, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SERIAL: tl.constexpr, BLOCK_M: tl.constexpr,
                 SWAP: tl.constexpr):
    """The W8A8 GEMMs' end: acc (acc^T with SWAP) through split-K, then y = acc * xs[rm] * ws[rn] (+ bias)."""
    rows, cols, row_mask, col_mask = _sides(rm, rn, m_mask, n_mask, SWAP)
    if SWAP:
        offs = rm.to(tl.int64)[None, :] * N + rn[:, None]
        rn_out = rn[:, None]
        n_out = n_mask[:, None]
    else:
        offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
        rn_out = rn
        n_out = n_mask
    out_mask = row_mask[:, None] & col_mask[None, :]
    finish, acc = _split_k(acc, part_ptr, lock_ptr, pid_n * tl.cdiv(M, BLOCK_M) + pid_m, pid_k, offs, out_mask, M, N,
                           SPLIT, SERIAL)
    if finish:
        rs = tl.load((ws_ptr if SWAP else xs_ptr) + rows, mask=row_mask, other=0.0)
        cs = tl.load((xs_ptr if SWAP else ws_ptr) + cols, mask=col_mask, other=0.0)
        _store_out(acc.to(tl.float32) * rs[:, None] * cs[None, :], out_ptr, b_ptr, rn_out, n_out, offs, out_mask,
                   HAS_BIAS)


@_jit(do_not_specialize=["M"])
def _w8a8_swap_tma_kernel(a_desc, w_desc, xs_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, lock_ptr, M, N, K,
                          TILES: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SERIAL: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PDL: tl.constexpr = False):
    """_w8a8_gemm_kernel with SWAP and EVEN on E4M3 codes, its two loads made by TMA: w_desc the weight [N, K]
    (box [BLOCK_N, BLOCK_K]), a_desc the rows' codes [M, K] (box [BLOCK_M, BLOCK_K]; rows past M arrive as
    zeros). Both tiles stay in shared memory, K-major, as wgmma's A and (transposed view) B."""
    if PDL:  # programmatic dependent launch (runtime/ops/pdl.py): nothing is touched before this
        gdc_wait()
    pid_n, pid_m, pid_k, rn, n_mask, rm, m_mask = _gemm_program(M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for t in tl.range(0, TILES):
        k0 = (pid_k * TILES + t) * BLOCK_K
        w = w_desc.load([pid_n * BLOCK_N, k0])
        a = a_desc.load([pid_m * BLOCK_M, k0])
        acc = tl.dot(w, tl.trans(a), acc)
    if PDL:  # the K loop is done: the next kernel may start launching
        gdc_launch_dependents()
    _w8a8_finish(acc, xs_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, lock_ptr, rm, rn, m_mask, n_mask, pid_n, pid_m, pid_k,
                 M, N, HAS_BIAS, SPLIT, SERIAL, BLOCK_M, True)


@_jit
def _xq_values(x_ptr, rows, cols, stride_xm, K: tl.constexpr, mask, SILU: tl.constexpr):
    """[R, C] float32 values (model-dtype values; 0 where masked) of the XQ GEMM's input at rows x cols: x, or
    with SILU silu_mul_rounded(x[:, :K], x[:, K:])."""
    ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :]
    if SILU:
        g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(ptrs + K, mask=mask, other=0.0).to(tl.float32)
        v = silu_mul_rounded(g, u, x_ptr.dtype.element_ty).to(tl.float32)
    else:
        v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return v


@_jit(do_not_specialize=["M"])
def _fp8_xq_kernel(x_ptr, w_desc, in_scale_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, lock_ptr, M, N, stride_xm,
                   K: tl.constexpr, TILES: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                   SERIAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   ROWS: tl.constexpr, CHUNK: tl.constexpr, SILU: tl.constexpr, STATIC: tl.constexpr,
                   QMAX: tl.constexpr, FLOOR: tl.constexpr, PDL: tl.constexpr = False):
    """linear_fp8 of up to ROWS rows (<= BLOCK_M) in one launch, quantizing x itself: _w8a8_swap_tma_kernel's
    product (the weight tile by TMA as wgmma's A, the rows' E4M3 codes as its B) with the codes made here from
    the model-dtype rows, the arithmetic of _quant_rows_kernel (act_scale, act_codes), so the codes are the
    same bits. Dynamic scales: every program first reads its rows whole (from L2, CHUNK columns at a time) for
    their |max|. SILU: x [M, 2K] holds gate and up, and the rows are silu(gate) * up as silu_and_mul rounds
    them (spanda::silu_and_mul_linear_fp8). The values and codes are computed on the ROWS real rows only and
    then placed on the MMA's BLOCK_M (16) rows."""
    if PDL:  # programmatic dependent launch (runtime/ops/pdl.py): nothing is touched before this
        gdc_wait()
    pid_n, pid_m, pid_k, rn, n_mask, rm, m_mask = _gemm_program(M, N, BLOCK_M, BLOCK_N)
    r = tl.arange(0, ROWS)
    r_mask = r < M
    if STATIC:
        s_rows = act_scale(tl.zeros((ROWS,), dtype=tl.float32), in_scale_ptr, True, QMAX, FLOOR)
    else:
        amax = tl.zeros((ROWS,), dtype=tl.float32)
        for c in tl.static_range(0, K, CHUNK):
            cols = c + tl.arange(0, CHUNK)
            vc = _xq_values(x_ptr, r, cols, stride_xm, K, r_mask[:, None] & (cols < K)[None, :], SILU)
            amax = tl.maximum(amax, tl.max(tl.abs(vc), axis=1))
        s_rows = act_scale(amax, in_scale_ptr, False, QMAX, FLOOR)
    pick = rm[:, None] == r[None, :]  # [BLOCK_M, ROWS]: tile row i is row r (one term, exact sums below)
    s = tl.sum(tl.where(pick, s_rows[None, :], 0.0), axis=1)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for t in tl.range(0, TILES):
        k0 = (pid_k * TILES + t) * BLOCK_K
        w = w_desc.load([pid_n * BLOCK_N, k0])
        v = _xq_values(x_ptr, r, k0 + tl.arange(0, BLOCK_K), stride_xm, K, r_mask[:, None], SILU)
        q = act_codes(v, s_rows[:, None], False, QMAX)  # [ROWS, BLOCK_K]
        if ROWS == 1:
            a = tl.where(m_mask[:, None], q, 0.0)
        else:
            a = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for i in tl.static_range(ROWS):
                row = tl.sum(tl.where(r[:, None] == i, q, 0.0), axis=0)
                a = tl.where(rm[:, None] == i, row[None, :], a)
        acc = tl.dot(w, tl.trans(a.to(tl.float8e4nv)), acc)
    if PDL:  # the K loop is done: the next kernel may start launching
        gdc_launch_dependents()
    offs = rm.to(tl.int64)[None, :] * N + rn[:, None]
    out_mask = n_mask[:, None] & m_mask[None, :]
    finish, acc = _split_k(acc, part_ptr, lock_ptr, pid_n * tl.cdiv(M, BLOCK_M) + pid_m, pid_k, offs, out_mask, M,
                           N, SPLIT, SERIAL)
    if finish:  # _w8a8_finish's product order: acc * ws[col] * xs[row]
        ws = tl.load(ws_ptr + rn, mask=n_mask, other=0.0)
        _store_out(acc.to(tl.float32) * ws[:, None] * s[None, :], out_ptr, b_ptr, rn[:, None], n_mask[:, None],
                   offs, out_mask, HAS_BIAS)


@_jit(do_not_specialize=["M"])
def _w8a8_gemv_kernel(a_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, lock_ptr, M, N, K,
                      TILES: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SERIAL: tl.constexpr,
                      FP8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr = False,
                      PDL: tl.constexpr = False):
    """One row of quantized activations (a [M, K] codes, contiguous) against w [N, K] per program, without
    tensor cores: the [BLOCK_N, BLOCK_K] weight tile is read K-contiguous (16 codes per thread), the row's codes
    are read as the same [BLOCK_N, BLOCK_K] shape with a zero stride along N, so both arrive in one layout (no
    conversion) and the products accumulate elementwise: E4M3 x E4M3 in float32 (exact products), int8 x int8
    in int32 (exact). Summed over K once at the end; split-K and the epilogue as _w8a8_gemm_kernel's."""
    if PDL:  # programmatic dependent launch (runtime/ops/pdl.py): nothing is touched before this
        gdc_wait()
    pid_n, row, pid_k, rn, n_mask = _gemv_program(N, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_row = a_ptr + row.to(tl.int64) * K
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * K
    zero_n = (rn * 0)[:, None]
    if FP8:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    kt0 = pid_k * TILES
    for t in range(0, TILES):
        offs_k = (kt0 + t) * BLOCK_K + rk
        if EVEN:
            w = tl.load(w_rows + offs_k[None, :])
            a = tl.load(a_row + offs_k[None, :] + zero_n)
        else:
            k_mask = (offs_k < K)[None, :]
            w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask, other=0)
            a = tl.load(a_row + offs_k[None, :] + zero_n, mask=k_mask & (zero_n == 0), other=0)
        if FP8:
            acc += (w.to(tl.float8e4nv, bitcast=True).to(tl.float32)
                    * a.to(tl.float8e4nv, bitcast=True).to(tl.float32))
        else:
            acc += w.to(tl.int32) * a.to(tl.int32)
    if PDL:  # the K loop is done: the next kernel may start launching
        gdc_launch_dependents()
    y = tl.sum(acc, axis=1)
    offs = row.to(tl.int64) * N + rn
    finish, y = _split_k(y, part_ptr, lock_ptr, pid_n * M + row, pid_k, offs, n_mask, M, N, SPLIT, SERIAL)
    if finish:
        xs = tl.load(xs_ptr + row)
        ws = tl.load(ws_ptr + rn, mask=n_mask, other=0.0)
        _store_out(y.to(tl.float32) * xs * ws, out_ptr, b_ptr, rn, n_mask, offs, n_mask, HAS_BIAS)
