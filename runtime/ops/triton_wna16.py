"""linear_wna16 on CUDA (W4A16 / W8A16, GPTQ / AWQ / RTN, the codes in GPTQ's qweight layout): Triton kernels.

One Triton GEMM, tile [BLOCK_M, BLOCK_N] of y per program, looping over K in BLOCK_K steps: the x tile (columns
gathered through ``perm`` when act-order), the packed words of the qweight tile, unpacked with shifts,
``q - zero`` (exact in fp16/bf16), then either scaled per output column and multiplied (``scale_acc``: the
group's partial product ``x_tile @ (q - z)`` is scaled in float32, one group per tile) or scaled in the weight
tile before the dot; float32 accumulation. Grouped weights keep BLOCK_K a divisor of the group size so a tile
never straddles two groups; per-channel weights (one group) apply the scale once, after the loop.
Small M (decode) splits K (runtime/ops/triton_gemm.py). Up to WNA16_GEMV_MAX_M rows, _wna16_gemv_kernel replaces
the tensor-core kernel: one row per program, codes turned into float32 by masking them in place and ORing the
bits of 2^23 (no int -> float conversion), float32 FMAs. Options (GemmConfig; the defaults from H200 sweeps):
``prefetch`` (tile t + 1 loaded while tile t is computed), ``zsum`` (zero point off once per tile; no layout
conversion in the loop), ``waves`` (programs per SM the split-K choice aims for). Large M may instead
dequantize the weight once into a [K, N] buffer in x's dtype (rows un-permuted) and call cuBLAS
(``DEQUANT_MM_MIN_M``), at the cost of that transient buffer. Hopper builds use the tensor-core layout instead
(runtime/ops/triton_wna16_mma.py).
"""

from __future__ import annotations

import torch

from runtime.ops.pdl import launch_kwargs
from runtime.ops.quant_linear import linear_wna16_ref
from runtime.ops.triton_gemm import (
    FAST_DTYPES,
    LOCK_SLOTS,
    SERIAL_SPLIT,
    GemmConfig,
    _choose_split,
    _gemv_program,
    _jit,
    _locks,
    _pow2_divisor,
    _reduce,
    _split_k,
    _store_out,
    gdc_launch_dependents,
    gdc_wait,
    tl,
    triton,
)

DEQUANT_MM_MIN_M = 1024  # M from which linear_wna16 dequantizes + cuBLAS (None: never); from bench data
# decode: up to WNA16_GEMV_MAX_M rows linear_wna16 runs its GEMV (no tensor cores; None: never).
# H200 figures (bench/results/quant-gemm-decode-h200.json, us per layer of 8B GEMMs at M = 1): the W4A16 GEMV
# 92.3 against 173.3 for the tensor-core kernel (bf16 cuBLAS 130.1), but 239 against 168 at M = 4 (it
# dequantizes once per row). Also removed after timing: a split-dot W4A16 kernel (one dot per code position,
# 175-310 us per layer at M = 4/16 against 168-172, bench/results/quant-gemm-decode-h200-splitdot.json).
WNA16_GEMV_MAX_M = 1


@_jit(do_not_specialize=["M"])
def _wna16_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, b_ptr, out_ptr, part_ptr, lock_ptr, M, N, K, stride_xm,
                  group_size, TILES: tl.constexpr, BITS: tl.constexpr, GROUPED: tl.constexpr, HAS_PERM: tl.constexpr,
                  HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SERIAL: tl.constexpr, SCALE_ACC: tl.constexpr,
                  RESHAPE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MAGIC: tl.constexpr = False,
                  MAGIC_BITS: tl.constexpr = 0, MAGIC_VAL: tl.constexpr = 0, PDL: tl.constexpr = False):
    """y[rm, rn] (or its K-split partial) = x[rm, perm[k]] @ ((q[k, rn] - z[g(k), rn]) * s[g(k), rn]) over the
    program's K tiles [pid_k * TILES, +TILES). Grouped: BLOCK_K divides group_size."""
    if PDL:  # programmatic dependent launch (runtime/ops/pdl.py): nothing is touched before this
        gdc_wait()
    PER: tl.constexpr = 32 // BITS
    QMASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if not GROUPED:
        z0 = tl.load(z_ptr + rn, mask=n_mask, other=0).to(tl.int32)
        s0 = tl.load(s_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    kt0 = pid_k * TILES
    for t in range(0, TILES):
        k0 = (kt0 + t) * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        if HAS_PERM:
            cols = tl.load(perm_ptr + offs_k, mask=k_mask, other=0)
        else:
            cols = offs_k
        a = tl.load(x_rows + cols[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if RESHAPE:  # each word loaded once, expanded to its PER rows in registers
            offs_w = k0 // PER + tl.arange(0, BLOCK_K // PER)
            w_mask = (offs_w < K // PER)[:, None] & n_mask[None, :]
            words = tl.load(qw_ptr + offs_w.to(tl.int64)[:, None] * N + rn[None, :], mask=w_mask, other=0)
            shifts = tl.arange(0, PER) * BITS
            q = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & QMASK, (BLOCK_K, BLOCK_N))
        else:  # row k reads word k // PER (each word PER times, from the L1)
            w_mask = k_mask[:, None] & n_mask[None, :]
            words = tl.load(qw_ptr + (offs_k // PER).to(tl.int64)[:, None] * N + rn[None, :], mask=w_mask, other=0)
            q = (words >> ((offs_k % PER) * BITS)[:, None]) & QMASK
        if GROUPED:
            g = k0 // group_size
            z = tl.load(z_ptr + g * N + rn, mask=n_mask, other=0).to(tl.int32)
            s = tl.load(s_ptr + g * N + rn, mask=n_mask, other=0.0).to(tl.float32)
        else:
            z = z0
        if MAGIC:
            # (q | bits of 2^E) read as a float of x's dtype is 2^E + q exactly (q fits the mantissa below
            # 2^E: E = 7 for bf16 4-bit codes, 10 for fp16); minus (2^E + z) leaves q - z, exact, with integer
            # ops and one subtraction per weight instead of an int -> float conversion
            wq = ((q | MAGIC_BITS).to(tl.int16).to(dt, bitcast=True)
                  - (z + MAGIC_VAL).to(tl.float32).to(dt)[None, :])
        else:
            wq = (q - z[None, :]).to(dt)
        if GROUPED:
            if SCALE_ACC:
                acc += tl.dot(a, wq) * s[None, :]
            else:
                acc = tl.dot(a, (wq.to(tl.float32) * s[None, :]).to(dt), acc)
        else:
            acc = tl.dot(a, wq, acc)
    if PDL:  # the K loop is done: the next kernel may start launching
        gdc_launch_dependents()
    if not GROUPED:
        acc = acc * s0[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    finish, acc = _split_k(acc, part_ptr, lock_ptr, pid_n * tl.cdiv(M, BLOCK_M) + pid_m, pid_k, offs, out_mask, M, N,
                           SPLIT, SERIAL)
    if finish:
        _store_out(acc, out_ptr, b_ptr, rn, n_mask, offs, out_mask, HAS_BIAS)


@_jit
def _gemv_words(qw_ptr, k0, rr, rn, n_mask, N, K, PER: tl.constexpr, EVEN: tl.constexpr):
    """_wna16_gemv_kernel's packed words [R, BLOCK_N] of the tile at input row k0."""
    offs_w = k0 // PER + rr
    w_ptrs = qw_ptr + offs_w.to(tl.int64)[:, None] * N + rn[None, :]
    if EVEN:
        words = tl.load(w_ptrs)
    else:
        words = tl.load(w_ptrs, mask=(offs_w < K // PER)[:, None] & n_mask[None, :], other=0)
    return words


@_jit
def _gemv_cols(ptr, rr, rn, n_mask, WIDE: tl.constexpr):
    """ptr[rn] as float32, broadcastable against the [R, BLOCK_N] words. WIDE: loaded as R identical rows in the
    words' own layout (columns in runs of 4, what each thread's 16-byte word loads hold), so that no layout
    conversion (a shared-memory round trip behind barriers) stands between them and the words; else [1,
    BLOCK_N] (Triton converts it to the words' layout)."""
    if WIDE:
        cols = (rn // 4) * 4 + rn % 4
        v = tl.load(ptr + cols[None, :] + (rr * 0)[:, None], mask=n_mask[None, :] & (rr >= 0)[:, None],
                    other=0).to(tl.float32)
    else:
        v = tl.load(ptr + rn, mask=n_mask, other=0).to(tl.float32)[None, :]
    return v


@_jit(do_not_specialize=["M"])
def _wna16_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, b_ptr, out_ptr, part_ptr, lock_ptr, M, N, K, stride_xm,
                       group_size, magic, TILES: tl.constexpr, BITS: tl.constexpr, GROUPED: tl.constexpr,
                       HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SERIAL: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       EVEN: tl.constexpr = False, PREFETCH: tl.constexpr = False, ZSUM: tl.constexpr = False,
                       PDL: tl.constexpr = False):
    """The same product as _wna16_kernel for one row of x per program (decode; BLOCK_M is 1, a few rows re-read
    the tile from L2), without tensor cores: float32 FMAs on codes turned into floats by bit tricks. A tile of
    R = BLOCK_K / PER packed rows x BLOCK_N columns is read once; for each of its PER codes per word, code j of
    every word is masked in place (the low half of the word, or the high half shifted down once per word), ORed
    into the mantissa of 2^23 and read as a float32 (= 2^23 + q * 2^sh exactly), then one FMA gives q - z
    exactly (f * 2^-sh - (2^(23-sh) + z)) and one FMA accumulates (q - z) * x[k] into an [R, BLOCK_N] float32
    partial in the words' own register layout: no int -> float conversion, no layout shuffle, no reduction
    inside the loop. Each group's partial is scaled once; the R axis is summed at the end. Split-K as in
    _wna16_kernel; SERIAL: the last program of a tile to finish sums the partials itself (_split_k), no
    second launch. ``magic`` is 0x4B000000 (the bits of 2^23), passed at run time so that it sits in a register
    and the mask and the OR are one LOP3 per code. EVEN: K and N are multiples of the tile (no masks).
    PREFETCH: the words (without ZSUM also the group's scales and zero points) of tile t + 1 are loaded before
    tile t is computed, so a program keeps a load in flight while it computes (Triton pipelines only loads that
    feed a dot; the loop otherwise waits a full memory latency per tile); the last iteration re-reads its own
    tile (no mask). ZSUM: the first FMA gives q (a compile-time constant subtracted) and the zero point comes
    off once per tile as z * sum(x) over each packed row's inputs; the scales and zero points are loaded in the
    words' layout (_gemv_cols WIDE) at the top of each tile (they are needed only after its codes): no layout
    conversion in the loop, and no [R, BLOCK_N] constant per code position."""
    if PDL:  # programmatic dependent launch (runtime/ops/pdl.py): nothing is touched before this
        gdc_wait()
    PER: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = PER // 2
    R: tl.constexpr = BLOCK_K // PER
    QMASK: tl.constexpr = (1 << BITS) - 1
    pid_n, row, pid_k, rn, n_mask = _gemv_program(N, BLOCK_N)
    rr = tl.arange(0, R)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    acc = tl.zeros((R, BLOCK_N), dtype=tl.float32)
    if not GROUPED:
        zf = _gemv_cols(z_ptr, rr, rn, n_mask, ZSUM)
        s0 = tl.load(s_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    kt0 = pid_k * TILES
    if PREFETCH:
        words_nx = _gemv_words(qw_ptr, kt0 * BLOCK_K, rr, rn, n_mask, N, K, PER, EVEN)
        if GROUPED and not ZSUM:
            g_nx = (kt0 * BLOCK_K) // group_size
            zf_nx = _gemv_cols(z_ptr + g_nx * N, rr, rn, n_mask, False)
            s_nx = _gemv_cols(s_ptr + g_nx * N, rr, rn, n_mask, False)
    for t in range(0, TILES):
        k0 = (kt0 + t) * BLOCK_K
        g = k0 // group_size
        if PREFETCH:
            words = words_nx
            k_nx = (kt0 + tl.minimum(t + 1, TILES - 1)) * BLOCK_K
            words_nx = _gemv_words(qw_ptr, k_nx, rr, rn, n_mask, N, K, PER, EVEN)
            if GROUPED and not ZSUM:
                zf = zf_nx
                s = s_nx
                zf_nx = _gemv_cols(z_ptr + (k_nx // group_size) * N, rr, rn, n_mask, False)
                s_nx = _gemv_cols(s_ptr + (k_nx // group_size) * N, rr, rn, n_mask, False)
        else:
            words = _gemv_words(qw_ptr, k0, rr, rn, n_mask, N, K, PER, EVEN)
            if GROUPED and not ZSUM:
                zf = _gemv_cols(z_ptr + g * N, rr, rn, n_mask, False)
                s = _gemv_cols(s_ptr + g * N, rr, rn, n_mask, False)
        if GROUPED and ZSUM:
            zf = _gemv_cols(z_ptr + g * N, rr, rn, n_mask, True)
            s = _gemv_cols(s_ptr + g * N, rr, rn, n_mask, True)
        high = words >> 16
        part = tl.zeros((R, BLOCK_N), dtype=tl.float32)
        if ZSUM:
            xs = tl.zeros((R,), dtype=tl.float32)
        for j in tl.static_range(PER):
            if j < HALF:
                bits = (words & (QMASK << (BITS * (j % HALF)))) | magic
            else:
                bits = (high & (QMASK << (BITS * (j % HALF)))) | magic
            f = bits.to(tl.float32, bitcast=True) * (1.0 / (1 << (BITS * (j % HALF))))
            if ZSUM:
                wq = f - (1 << (23 - BITS * (j % HALF)))
            else:
                wq = f - ((1 << (23 - BITS * (j % HALF))) + zf)
            kk = k0 + rr * PER + j
            if HAS_PERM:
                cols = tl.load(perm_ptr + kk, mask=kk < K, other=0)
            else:
                cols = kk
            if EVEN:
                xj = tl.load(x_row + cols).to(tl.float32)
            else:
                xj = tl.load(x_row + cols, mask=kk < K, other=0.0).to(tl.float32)
            part += wq * xj[:, None]
            if ZSUM:
                xs += xj
        if ZSUM:
            part -= zf * xs[:, None]
        if GROUPED:
            acc += part * s
        else:
            acc += part
    if PDL:  # the K loop is done: the next kernel may start launching
        gdc_launch_dependents()
    y = tl.sum(acc, axis=0)
    if not GROUPED:
        y = y * s0
    offs = row.to(tl.int64) * N + rn
    finish, y = _split_k(y, part_ptr, lock_ptr, pid_n * M + row, pid_k, offs, n_mask, M, N, SPLIT, SERIAL)
    if finish:
        _store_out(y, out_ptr, b_ptr, rn, n_mask, offs, n_mask, HAS_BIAS)


@_jit
def _dequant_kernel(qw_ptr, s_ptr, z_ptr, perm_ptr, w_ptr, N, K, group_size, BITS: tl.constexpr,
                    HAS_PERM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """w[perm[k], n] = (q[k, n] - z[g(k), n]) * s[g(k), n] in w's dtype (rows back in input-channel order)."""
    PER: tl.constexpr = 32 // BITS
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_k < K)[:, None] & (rn < N)[None, :]
    words = tl.load(qw_ptr + (offs_k // PER).to(tl.int64)[:, None] * N + rn[None, :], mask=mask, other=0)
    q = (words >> ((offs_k % PER) * BITS)[:, None]) & ((1 << BITS) - 1)
    g = (offs_k // group_size).to(tl.int64)[:, None] * N + rn[None, :]
    z = tl.load(z_ptr + g, mask=mask, other=0).to(tl.int32)
    s = tl.load(s_ptr + g, mask=mask, other=0.0).to(tl.float32)
    if HAS_PERM:
        rows = tl.load(perm_ptr + offs_k, mask=offs_k < K, other=0)
    else:
        rows = offs_k
    tl.store(w_ptr + rows.to(tl.int64)[:, None] * N + rn[None, :],
             ((q - z).to(tl.float32) * s).to(w_ptr.dtype.element_ty), mask=mask)


# decode-sized configurations (H200 sweeps, bench/results/quant-gemm-decode-h200.json)
# 1 row: the GEMV (block_k is capped by the group size at launch): 64-wide tiles, 2 warps, the next tile loaded
# while this one is computed, 4 programs per SM: 88.6 us per 8B layer against 92.7 for 128-wide tiles, 4 warps,
# no prefetch, 2 per SM (faster on each of the four shapes; bench/results/quant-gemm-decode-h200-codes.json)
WNA16_GEMV = GemmConfig(1, 64, 128, num_warps=2, num_stages=3, gemv=True, serial=SERIAL_SPLIT, prefetch=True, waves=4)
# 4-bit, 2-16 rows: magic-number unpacking, 128-wide tiles (168 us per 8B layer at M = 4, 172 at M = 16)
WNA16_DECODE = {4: GemmConfig(16, 128, 128, num_warps=4, num_stages=3, magic=True, serial=SERIAL_SPLIT),
                8: GemmConfig(16, 64, 64, num_warps=4, num_stages=3, serial=SERIAL_SPLIT)}


def wna16_config(m: int, n: int, k: int, bits: int) -> GemmConfig:
    """Fixed heuristics per M range (H100 measurements in bench/results/quant-gemm-h100.json)."""
    if DEQUANT_MM_MIN_M is not None and m >= DEQUANT_MM_MIN_M:
        return GemmConfig(128, 128, 64, dequant_mm=True)
    if WNA16_GEMV_MAX_M is not None and m <= WNA16_GEMV_MAX_M:
        return WNA16_GEMV
    if m <= 16:
        return WNA16_DECODE[bits]
    if m <= 64:
        return GemmConfig(32 if m <= 32 else 64, 64, 64, num_warps=4, num_stages=4)
    if m <= 256:
        return GemmConfig(64, 128, 64, num_warps=4, num_stages=4, scale_acc=False)
    return GemmConfig(128, 128, 64, num_warps=8, num_stages=3, scale_acc=False)


def wna16_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, perm: torch.Tensor | None,
                     bits: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight as [K, N] in ``dtype`` with rows in input-channel order: y = x @ W (no gather of x)."""
    k, n = qweight.shape[0] * (32 // bits), qweight.shape[1]
    gs = k if group_size == -1 else group_size
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    w = torch.empty((k, n), dtype=dtype, device=qweight.device)
    bk, bn = 32, 128
    _dequant_kernel[(triton.cdiv(k, bk), triton.cdiv(n, bn))](
        qweight, scales, zeros, perm.contiguous() if perm is not None else qweight, w, n, k, gs, BITS=bits,
        HAS_PERM=perm is not None, BLOCK_K=bk, BLOCK_N=bn, num_warps=4)
    return w


def linear_wna16_cuda(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      perm: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int,
                      config: GemmConfig | None = None) -> torch.Tensor:
    """x [M, K] fp16/bf16 -> y [M, N] (module docstring); other dtypes/shapes use the reference."""
    per = 32 // bits if bits in (4, 8) else 0
    if (not per or x.dtype not in FAST_DTYPES or x.dim() != 2 or qweight.dim() != 2 or scales.dtype != x.dtype
            or (bias is not None and bias.dtype != x.dtype)):
        return linear_wna16_ref(x, qweight, scales, zeros, perm, bias, bits, group_size)
    m, k = x.shape
    n = qweight.shape[1]
    if k != qweight.shape[0] * per:
        return linear_wna16_ref(x, qweight, scales, zeros, perm, bias, bits, group_size)
    gs = k if group_size == -1 else group_size
    grouped = scales.shape[0] > 1
    cfg = config or wna16_config(m, n, k, bits)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    # the kernels index the weights as contiguous (artifact tensors are; anything else is copied per call)
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    bias = bias.contiguous() if bias is not None else None
    perm_c = perm.contiguous() if perm is not None else None
    if cfg.dequant_mm:
        w = wna16_dequantize(qweight, scales, zeros, perm_c, bits, gs, x.dtype)
        return torch.addmm(bias, x, w) if bias is not None else torch.mm(x, w)
    bk = cfg.block_k
    if grouped:
        bk = _pow2_divisor(gs, bk)  # a tile within one group
        if bk < 16 or gs % per:
            return linear_wna16_ref(x, qweight, scales, zeros, perm, bias, bits, group_size)
    if x.stride(1) != 1:
        x = x.contiguous()
    block_m = 1 if cfg.gemv else cfg.block_m  # the GEMV runs one row of x per program
    tiles_n, tiles_m = triton.cdiv(n, cfg.block_n), triton.cdiv(m, block_m)
    k_tiles = triton.cdiv(k, bk)
    split = _choose_split(cfg, tiles_n * tiles_m, k_tiles, x.device)
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else out
    serial = cfg.serial and split > 1 and tiles_n * tiles_m <= LOCK_SLOTS
    locks = _locks(x.device) if serial else part
    common = (x, qweight, scales, zeros, perm_c if perm_c is not None else qweight,
              bias if bias is not None else scales, out, part, locks, m, n, k, x.stride(0), gs)
    flags = dict(TILES=k_tiles // split, BITS=bits, GROUPED=grouped, HAS_PERM=perm is not None,
                 HAS_BIAS=bias is not None, SPLIT=split, SERIAL=serial, BLOCK_M=block_m,
                 BLOCK_N=cfg.block_n, BLOCK_K=bk, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # magic-number conversion: bf16 holds 2^7 + q exactly for 4-bit codes only, fp16 2^10 + q for 4 and 8 bits
    magic_ok = bits == 4 or x.dtype == torch.float16
    magic_bits, magic_val = (0x6400, 1024) if x.dtype == torch.float16 else (0x4300, 128)
    if cfg.gemv:
        even = k % (k_tiles * bk) == 0 and n % cfg.block_n == 0
        _wna16_gemv_kernel[(tiles_n, tiles_m, split)](*common, 0x4B000000, EVEN=even, PREFETCH=cfg.prefetch,
                                                      ZSUM=cfg.zsum, **flags, **launch_kwargs(x.device))
    else:
        _wna16_kernel[(tiles_n, tiles_m, split)](*common, SCALE_ACC=cfg.scale_acc, RESHAPE=cfg.reshape,
                                                 MAGIC=cfg.magic and magic_ok, MAGIC_BITS=magic_bits,
                                                 MAGIC_VAL=magic_val, **flags, **launch_kwargs(x.device))
    if split > 1 and not serial:
        _reduce(part, None, None, bias, out)
    return out
