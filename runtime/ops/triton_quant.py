"""CUDA fast paths of the quantized linear ops (runtime/ops/quant_linear.py holds the contract, the float32
references and the fakes): Triton kernels, plus cuBLAS through ``torch._scaled_mm`` / ``torch._int_mm``.

Imported by :mod:`runtime.ops` always; with Triton installed it registers the ``*_cuda`` functions below as
the CUDA kernels of ``spanda::linear_wna16`` (and ``_mma``), ``spanda::linear_fp8``, ``spanda::linear_int8``
and ``spanda::linear_w8a8``; without Triton it is inert. Launch sizes and buffers depend on shapes only and
nothing synchronizes with the host, so every path is CUDA-graph capturable. Configurations come from fixed
heuristics per M range (nothing autotunes while serving); every launcher takes an explicit ``config`` too
(tests, benchmark sweeps).

linear_wna16 (W4A16 / W8A16, GPTQ/AWQ/RTN)
    One Triton GEMM, tile [BLOCK_M, BLOCK_N] of y per program, looping over K in BLOCK_K steps: the x tile
    (columns gathered through ``perm`` when act-order), the packed words of the qweight tile, unpacked with
    shifts, ``q - zero`` (exact in fp16/bf16), then either scaled per output column and multiplied
    (``scale_acc``: the group's partial product ``x_tile @ (q - z)`` is scaled in float32, one group per
    tile) or scaled in the weight tile before the dot; float32 accumulation. Grouped weights keep
    BLOCK_K a divisor of the group size so a tile never straddles two groups; per-channel weights (one
    group) apply the scale once, after the loop.
    Small M (decode) is bandwidth-bound on the packed weights, and cdiv(N, BLOCK_N) programs are too few to
    stream them: split-K spreads K over ``split`` programs per tile, each writes a float32 partial
    [split, M, N] and a second kernel sums them (fixed order: deterministic), adds the bias and rounds; with
    ``serial`` (the default) the last program of each tile to finish does that sum itself (tile counters that
    every launch re-arms; no second launch). Up to WNA16_GEMV_MAX_M rows, _wna16_gemv_kernel replaces the
    tensor-core kernel: one row per program, codes turned into float32 by masking them in place and ORing
    the bits of 2^23 (no int -> float conversion), float32 FMAs. Options (GemmConfig; the defaults from H200
    sweeps): ``prefetch`` (tile t + 1 loaded while tile t is computed), ``zsum`` (zero point off once
    per tile; no layout conversion in the loop), ``waves`` (programs per SM the split-K choice aims for).
    Large M may instead dequantize the weight once into a [K, N] buffer in x's dtype (rows un-permuted)
    and call cuBLAS (``DEQUANT_MM_MIN_M``), at the cost of that transient buffer.

linear_wna16_mma (W4A16, the codes in quant_linear.pack_wna16_mma's layout: Hopper builds by default)
    _wna16_mma_kernel: y^T = W x^T on wgmma with the dequantized weight as the register operand (see its
    docstring), the same kernel from 1 to DEQUANT_MM_MIN_M rows (block_m 16 to 128), split-K as above;
    from DEQUANT_MM_MIN_M rows _wna16_mma_dequant_kernel writes W [N, K] and cuBLAS multiplies. Up to 16
    rows (``GemmConfig.tma``), on sm_90+, with the zero points as words, no act-order and a 16-byte aligned
    x: _wna16_mma_tma_kernel, the same arithmetic with the codes, x and the words brought in by TMA. Up to 8
    rows on sm_90 the Gluon kernel (runtime/ops/wna16_gluon.py). For prefill, where set (WNA16_MMA_PREFILL,
    not yet a default), _wna16_mma_wide_kernel: the TMA kernel with several 64-row blocks per program sharing
    each x tile, the scale folded into the weight.

linear_fp8 (FP8 W8A8, E4M3)
    A Triton kernel per row of x (amax, scale = amax / 448 rounded as torch on CUDA rounds it, clamp,
    round-to-nearest-even cast to E4M3; or the static scale). Up to FP8_TRITON_MAX_M rows (decode) the codes
    go to the split-K Triton W8A8 GEMM below (float32 accumulation of exact E4M3 products; the row and
    column scales and the bias in the epilogue, or in the split reduction; FP8_DECODE runs it as
    _w8a8_gemm_kernel with SWAP, the weight tile on wgmma's M side and the rows on its N; on whole tiles and
    sm_90+, _w8a8_swap_tma_kernel, its loads by TMA): _scaled_mm streams the
    weight at a fraction of copy bandwidth there. Above that, ``torch._scaled_mm`` with row-wise scales
    (scale_a [M, 1], scale_b [1, N] float32; a per-tensor weight scale is expanded) or tensor-wise scales
    when both are per tensor, the bias and the output dtype in cuBLAS's epilogue. _scaled_mm needs K and N
    multiples of 16 (M is free); other shapes use the reference. A combination that this torch/cuBLAS
    refuses (checked on the host before any launch) falls back once and is remembered: without the fused
    bias, then float32 output with the scales applied after.

linear_w8a8 (the GEMM half of linear_fp8 / linear_int8)
    On codes and per-row scales that the activation's producer made (triton_elementwise's rms_norm_quant,
    fused_add_rms_norm_quant, silu_and_mul_quant: the fuse_act_quant pass); the same GEMMs as above.

linear_int8 (INT8 W8A8, symmetric)
    The same row kernel quantizes x to int8 (round half to even, clamp +-127); a Triton int8 GEMM (int32
    accumulation, exact) applies ``acc * s_x * s_w + bias`` in its epilogue (split-K for small M, int32
    partials summed exactly). For larger M, ``torch._int_mm`` (cuBLAS; needs M > 16, K and N multiples of 8)
    may be used instead (``INT_MM_MIN_M``), followed by the same epilogue kernel. The result matches the
    reference's float64 product bit for bit up to the float32 rounding of the epilogue, which is the same.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from runtime.ops.pdl import capability, hopper, launch_kwargs
from runtime.ops.quant_linear import (
    FP8_MAX,
    INT8_MAX,
    MMA_MAGIC,
    SCALE_FLOOR,
    add_norm_outputs,
    linear_fp8_ref,
    linear_int8_ref,
    linear_wna16_mma_ref,
    linear_wna16_ref,
    rms_scaled,
    w8a8_codes_ref,
)

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # CPU-only install: the reference implementations serve every call
    triton = tl = None
AVAILABLE = triton is not None

FAST_DTYPES = (torch.float16, torch.bfloat16)
# activation quantization: a row of up to QUANT_BLOCK columns is read once and held in registers between its |x| max
# and its codes (17.7 against 19.3 us for [4096, 4096] on the H200); wider rows in two passes of QUANT_BLOCK (rows of
# 14,336 held whole by 16 warps took 84.7 us against 66.4 in two passes; bench/results/quant-rows-onepass-h200.json)
QUANT_BLOCK = 4096
DEQUANT_MM_MIN_M = 1024  # M from which linear_wna16 dequantizes + cuBLAS (None: never); from bench data
INT_MM_MIN_M = None  # M from which linear_int8 uses torch._int_mm (None: never; it needs M > 16)
# linear_fp8 runs the split-K Triton GEMM up to this many rows (decode), _scaled_mm above; None: always
# _scaled_mm. Row-wise _scaled_mm streams the weight at a fraction of copy bandwidth at M = 1 (H200,
# bench/results/quant-gemm-h200.json, activation quantization included: qkv 25.0 us vs 17.5 us here,
# down 52.2 vs 32.6, gate_up 57.6 vs 45.5; bf16 cuBLAS 18.6 / 34.8 / 60.6).
FP8_TRITON_MAX_M = 16
# "triton": the activation-quantization kernel, then the GEMM (timed: bench/results/quant-gemm-h200.json).
# Quantizing inside the GEMM instead (every program recomputing its rows' amax over the whole row) was 5x
# slower per layer on an H200 (bench/results/quant-gemm-decode-h200.json) and is gone: the activation's
# producer quantizes it (fuse_act_quant)
FP8_TRITON_PATH = "triton"
# Up to FP8_XQ_MAX_M rows on sm_90+, linear_fp8 could run as one launch: _fp8_xq_kernel quantizes the rows
# inside the swapped TMA GEMM (on the real rows only, each program reading its rows whole for their |max|,
# FP8_XQ_CHUNK elements per load). Off (0): on an H200, in a CUDA graph of 32 such linears with PDL, it took
# 11.0-12.9 us per o_proj at M = 1 against 8.7 for the quantization kernel + GEMM, and 32.8-39.4 against 19.9 for
# down_proj with its SiLU (bench/results/fp8-xq-h200.json): under PDL the separate quantization launch costs
# 0.1-0.6 us, the in-loop quantization much more
FP8_XQ_MAX_M = 0
FP8_XQ_CHUNK = 4096
DEFAULT_SMS = 132  # H100 SXM; the real count is read off the device
# decode: up to WNA16_GEMV_MAX_M rows linear_wna16 runs its GEMV (no tensor cores; None: never). SERIAL_SPLIT:
# split-K launches sum their partials in the tile's last program instead of a second kernel.
# H200 figures (bench/results/quant-gemm-decode-h200.json, us per layer of 8B GEMMs at M = 1): the W4A16 GEMV
# 92.3 against 173.3 for the tensor-core kernel (bf16 cuBLAS 130.1), but 239 against 168 at M = 4 (it
# dequantizes once per row); the FP8 GEMV of the time (a [BLOCK_M, BLOCK_K, BLOCK_N] product tile, since
# removed) 143 against 101 for the split-K tensor-core kernel; its successor _w8a8_gemv_kernel
# (GemmConfig(gemv=True)) is untimed: not a default. Also removed after timing: a split-dot W4A16 kernel (one
# dot per code position, 175-310 us per layer at M = 4/16 against 168-172,
# bench/results/quant-gemm-decode-h200-splitdot.json). Serial split-K: FP8
# 100.6 against 102.8 us, W4A16 GEMV 92.3 against 95.3.
WNA16_GEMV_MAX_M = 1
SERIAL_SPLIT = True


def _jit(fn=None, **kw):
    """triton.jit when Triton is installed; otherwise the plain function (never launched)."""
    if fn is None:
        return lambda f: _jit(f, **kw)
    return triton.jit(fn, **kw) if AVAILABLE else fn


# ---------------------------------------------------------------------------------------------- kernels

@_jit
def pdl_enter(PDL: tl.constexpr = 1):
    """The start of a short kernel launched with PDL (runtime/ops/pdl.py): wait for the previous kernel (nothing
    is touched before this) and let the next one launch, in the order pdl.TRIGGER (the kernel's PDL) asks: after
    the wait (1), or before it (2 and up), so that the next kernel's programs are resident and issue their own
    early loads while this one still waits."""
    if PDL >= 2:
        gdc_launch_dependents()
        gdc_wait()
    else:
        gdc_wait()
        gdc_launch_dependents()


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
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, R)
    n_mask = rn < N
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
def _gemm_program(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A split-K GEMM program on the grid (N tiles, M tiles, K splits): its grid indices (pid_n, pid_m, pid_k),
    its BLOCK_N output channels (rn, n_mask) and its BLOCK_M rows (rm, m_mask)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_n, pid_m, tl.program_id(2), rn, rn < N, rm, rm < M


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
def _wna16_mma_dequant_kernel(qw_ptr, s_ptr, z_ptr, perm_ptr, w_ptr, N, K, GROUPED: tl.constexpr,
                              HAS_PERM: tl.constexpr, ASM: tl.constexpr, BF16: tl.constexpr, MAGIC: tl.constexpr,
                              META: tl.constexpr):
    """w^T[n, perm[k]] = (q[k, n] - z) * s in w's dtype, one [64, 128] tile per program (w^T [N, K]: the
    weight for F.linear, columns back in input-channel order)."""
    pid_n = tl.program_id(0)
    kt = tl.program_id(1)
    tile_off, row5, rn = _mma_index(pid_n)
    dt = w_ptr.dtype.element_ty
    w_base = qw_ptr + pid_n.to(tl.int64) * (K // 128) * 2048
    words, zr, sr = _mma_load(w_base, z_ptr, s_ptr, kt, N, tile_off, row5, row5, GROUPED, META)
    zz = tl.zeros((2, 4, 8, 4, 8), dtype=dt)
    if not GROUPED:  # one group: the row's zero point and scale
        zz = tl.broadcast_to((tl.load(z_ptr + row5).to(tl.float32) + MAGIC).to(dt), (2, 4, 8, 4, 8))
        sr = tl.load(s_ptr + row5)
    a, sr = _mma_operand(words, zr, sr, zz, dt, GROUPED, True, ASM, BF16, MAGIC, META)
    cols = kt * 128 + tl.arange(0, 128)
    if HAS_PERM:
        cols = tl.load(perm_ptr + cols)
    tl.store(w_ptr + rn.to(tl.int64)[:, None] * K + cols[None, :], a)


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


@_jit(do_not_specialize=["M"])
def _wna16_mma_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, b_ptr, out_ptr, part_ptr, lock_ptr, M, N, K, stride_xm,
                      TILES: tl.constexpr, GROUPED: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SPLIT: tl.constexpr, SERIAL: tl.constexpr, BLOCK_M: tl.constexpr, ASM: tl.constexpr,
                      BF16: tl.constexpr, MAGIC: tl.constexpr, PDL: tl.constexpr = False, META: tl.constexpr = False):
    """W4A16 on tensor cores with the weight as the register operand: y^T[64 rows, BLOCK_M] over the program's K
    tiles [pid_k * TILES, +TILES) of 128 (one group each). qw in quant_linear.pack_wna16_mma's layout: one
    4 KB tile per (row block, K tile), loaded as [2, 4, 8, 4, 8] int16 (16 bytes per thread and vector) in the
    layout the coalescing pass gives it, turned into q - z by _mma_dequant, and rearranged (join, reshape,
    permute: register renaming only) into the [64, 128] wgmma A operand: its threads already hold their own
    elements, so nothing goes through shared memory. x^T [128, BLOCK_M] is the B operand (shared memory,
    pipelined). The group's product (exact small integers times x, float32) is scaled per row after the dot.
    Needs N % 64 == 0, K % 128 == 0 and group size 128 or per-channel; 4 warps (one warpgroup).
    The words and x come through Triton's cp.async pipeline (num_stages, shared memory, then LDS); one-byte
    zero points and two-byte scales are too narrow for cp.async and are loaded straight into registers, each
    tile waiting for them from memory. So, META (grouped only): z_ptr is quant_linear.pack_mma_zeros' int32
    [K / 128, N] (MAGIC + z in the model dtype in the high half, the scale in the low half; s_ptr unused):
    four-byte loads, pipelined like the words. Slower on the H200 (README): carrying the next tile's zero
    points in registers (Triton then moves the A operand through shared memory to change its layout), an L2
    prefetch of the next tiles, loading 2-4 tiles before computing them, the scale folded into the weight."""
    if PDL:  # programmatic dependent launch (runtime/ops/pdl.py): nothing is touched before this
        gdc_wait()
    pid_n, pid_m, pid_k, rn, _, rm, m_mask = _gemm_program(M, N, BLOCK_M, 64)  # 64 weight rows
    tile_off, row5, _ = _mma_index(pid_n)
    dt = x_ptr.dtype.element_ty
    w_base = qw_ptr + pid_n.to(tl.int64) * (K // 128) * 2048
    x_rows = x_ptr + rm[None, :].to(tl.int64) * stride_xm
    acc = tl.zeros((64, BLOCK_M), dtype=tl.float32)
    zz = tl.zeros((2, 4, 8, 4, 8), dtype=dt)  # grouped: each tile's, in _mma_operand
    if not GROUPED:
        zz = tl.broadcast_to((tl.load(z_ptr + row5).to(tl.float32) + MAGIC).to(dt), (2, 4, 8, 4, 8))
        s = tl.load(s_ptr + rn).to(tl.float32)
    for t in tl.range(0, TILES):
        kt = pid_k * TILES + t
        words, zr, sr = _mma_load(w_base, z_ptr, s_ptr, kt, N, tile_off, row5, rn[:, None], GROUPED, META)
        a, sr = _mma_operand(words, zr, sr, zz, dt, GROUPED, False, ASM, BF16, MAGIC, META)
        rk = kt * 128 + tl.arange(0, 128)
        if HAS_PERM:
            rk = tl.load(perm_ptr + rk)
        b = tl.load(x_rows + rk[:, None], mask=m_mask[None, :], other=0.0)
        if GROUPED:
            acc += tl.dot(a, b) * sr.to(tl.float32)
        else:
            acc = tl.dot(a, b, acc)
    if PDL:  # the K loop is done: the next kernel may start launching
        gdc_launch_dependents()
    if not GROUPED:
        acc = acc * s[:, None]
    _mma_finish(acc, out_ptr, b_ptr, part_ptr, lock_ptr, rm, rn, m_mask, pid_n * tl.num_programs(1) + pid_m, pid_k,
                M, N, HAS_BIAS, SPLIT, SERIAL)


@_jit(do_not_specialize=["M"])
def _wna16_mma_tma_kernel(x_desc, w_desc, z_desc, b_ptr, out_ptr, part_ptr, lock_ptr, M, N, K, TILES: tl.constexpr,
                          HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SERIAL: tl.constexpr, BLOCK_M: tl.constexpr,
                          ASM: tl.constexpr, BF16: tl.constexpr, MAGIC: tl.constexpr, PDL: tl.constexpr = False):
    """_wna16_mma_kernel (grouped, zero points and scales as pack_mma_zeros' words, no act-order) with its three
    loads made by TMA: w_desc views the codes as rows of 256 int16 (a 4 KB tile = 8 rows, box [8, 256]),
    z_desc the words [K / 128, N] (box [1, 64]: the row block's 64 words of one K tile), x_desc x [M, K] (box
    [BLOCK_M, 128]; rows past M arrive as zeros). Triton's pipeline then waits on one mbarrier per stage
    instead of each thread's cp.async groups, and no thread computes load addresses: per 8B layer 3% faster at
    1 row and 8% at 16 on the H200 (bench/results/quant-gemm-mma-tma-h200.json). The tile in registers, the dot and
    the epilogue are _wna16_mma_kernel's."""
    if PDL:  # programmatic dependent launch (runtime/ops/pdl.py): nothing is touched before this
        gdc_wait()
    pid_n, pid_m, pid_k, rn, _, rm, m_mask = _gemm_program(M, N, BLOCK_M, 64)  # 64 weight rows
    dt: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
    acc = tl.zeros((64, BLOCK_M), dtype=tl.float32)
    zz = tl.zeros((2, 4, 8, 4, 8), dtype=dt)  # each tile's, in _mma_operand
    row0 = pid_n * (K // 128)
    for t in tl.range(0, TILES):
        kt = pid_k * TILES + t
        words = w_desc.load([(row0 + kt) * 8, 0]).reshape(2, 4, 8, 4, 8)  # pack_wna16_mma's v, w, g, t, r
        zw = z_desc.load([kt, pid_n * 64])  # [1, 64]: row 16 w + 8 v + g of the block
        zr = zw.reshape(4, 2, 8).permute(1, 0, 2).reshape(2, 4, 8, 1, 1)  # [v, w, g] as _mma_load's zr
        a, sr = _mma_operand(words, zr, zw.reshape(64, 1), zz, dt, True, False, ASM, BF16, MAGIC, True)
        b = x_desc.load([pid_m * BLOCK_M, kt * 128])  # [BLOCK_M, 128]
        acc += tl.dot(a, tl.trans(b)) * sr.to(tl.float32)
    if PDL:  # the K loop is done: the next kernel may start launching
        gdc_launch_dependents()
    _mma_finish(acc, out_ptr, b_ptr, part_ptr, lock_ptr, rm, rn, m_mask, pid_n * tl.num_programs(1) + pid_m, pid_k,
                M, N, HAS_BIAS, SPLIT, SERIAL)


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
    numerics), one chained accumulator per block, which lets the wgmma of one block run while the next block
    dequantizes; otherwise each tile's product is scaled in float32 as in the decode kernels. M_FAST: the grid's
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
    With 128 registers (GemmConfig.maxnreg; triton_quant.WNA16_MMA_LDG) it is 2-3% faster per 8B layer than the
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


@_jit
def _split_k(acc, part_ptr, lock_ptr, tile, pid_k, offs, mask, M, N, SPLIT: tl.constexpr, SERIAL: tl.constexpr):
    """The split-K step every GEMM here ends with. Returns (finish, acc): whether this program writes the output
    tile, and the sum it writes. Unsplit: (True, acc). Split: the program stores its partial [SPLIT, M, N]; with
    the reduce kernel after it (not SERIAL) it writes nothing; SERIAL: it counts the tile's finished programs
    on lock_ptr[tile] and the last one reads all partials back (fixed order, the same sum as
    _split_reduce_kernel: deterministic), re-arms the counter and finishes. The barrier before the acq_rel
    atomic orders every thread's partial store before the count; the loads bypass L1."""
    finish = True
    if SPLIT > 1:
        tl.store(part_ptr + pid_k.to(tl.int64) * M * N + offs, acc, mask=mask)
        finish = False
        if SERIAL:
            tl.debug_barrier()
            done = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
            finish = done == SPLIT - 1
            if finish:
                acc = tl.load(part_ptr + offs, mask=mask, other=0, cache_modifier=".cg")
                for s in range(1, SPLIT):
                    acc += tl.load(part_ptr + (s * M).to(tl.int64) * N + offs, mask=mask, other=0,
                                   cache_modifier=".cg")
                tl.atomic_xchg(lock_ptr + tile, 0)
    return finish, acc


@_jit
def _store_out(acc, out_ptr, b_ptr, rn, n_mask, offs, mask, HAS_BIAS: tl.constexpr):
    """out[offs] = acc (+ bias[rn]) rounded to out's dtype; acc is [BLOCK_N] or [BLOCK_M, BLOCK_N]."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


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
def silu_mul_rounded(g, u, dt: tl.constexpr):
    """silu(g) * u (float32 inputs holding model-dtype values) rounded as the model computes it: silu to ``dt``,
    then the product to ``dt`` (every silu_and_mul kernel gives these exact values)."""
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    return (act * u).to(dt)


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
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
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


@_jit(do_not_specialize=["M"])
def _split_reduce_kernel(part_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, M, N, SPLIT: tl.constexpr, SCALES: tl.constexpr,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         PDL: tl.constexpr = False):
    """out = (sum_s part[s]) [* xs[row] * ws[col]] [+ bias], rounded to out's dtype. The sum runs in the
    partials' dtype (float32, or int32: exact), in split order."""
    if PDL:  # programmatic dependent launch (runtime/ops/pdl.py): nothing is touched before this
        pdl_enter(PDL)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    mask = m_mask[:, None] & n_mask[None, :]
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    acc = tl.load(part_ptr + offs, mask=mask, other=0)
    for s in range(1, SPLIT):
        acc += tl.load(part_ptr + (s * M).to(tl.int64) * N + offs, mask=mask, other=0)
    y = acc.to(tl.float32)
    if SCALES:
        xs = tl.load(xs_ptr + rm, mask=m_mask, other=0.0)
        ws = tl.load(ws_ptr + rn, mask=n_mask, other=0.0)
        y = y * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@_jit
def act_scale(amax, in_scale_ptr, STATIC: tl.constexpr, QMAX: tl.constexpr, FLOOR: tl.constexpr):
    """Activation scale of rows whose |x| maxima are ``amax``: max(amax * (1 / QMAX), FLOOR), or the static scale
    (same shape). The reference's amax / QMAX runs on CUDA as amax * float32(1 / QMAX) (torch divides by a
    scalar through its reciprocal there). Shared by every kernel that quantizes activations."""
    if STATIC:
        s = tl.zeros_like(amax) + tl.load(in_scale_ptr).to(tl.float32)
    else:
        s = tl.maximum(amax * (1.0 / QMAX), FLOOR)
    return s


@_jit
def act_codes(v, s, INT8: tl.constexpr, QMAX: tl.constexpr):
    """clamp(v / s, -QMAX, QMAX) (an IEEE division, as the reference computes on CUDA; s broadcast against v),
    int8: rounded half to even; the caller casts to the codes' dtype."""
    q = tl.math.div_rn(v, tl.zeros_like(v) + s)
    q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
    if INT8:
        q = (q + 12582912.0) - 12582912.0  # 1.5 * 2^23: rounds |q| < 2^22 to an integer, ties to even
    return q


@_jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, in_scale_ptr, stride_xm, K: tl.constexpr, QMAX: tl.constexpr,
                       FLOOR: tl.constexpr, STATIC: tl.constexpr, INT8: tl.constexpr, BLOCK: tl.constexpr,
                       PDL: tl.constexpr = False):
    """Row r of x -> q[r, :] = act_codes(x, s), s[r] = act_scale(amax(|x[r]|)). A row of up to BLOCK columns
    is loaded once and kept in registers; wider rows are read twice, BLOCK columns at a time (|x| max, then
    the codes)."""
    if PDL:  # programmatic dependent launch (runtime/ops/pdl.py): nothing is touched before this
        pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    cols = tl.arange(0, BLOCK)
    if K <= BLOCK:
        mask = cols < K
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        s = act_scale(tl.max(tl.abs(x), axis=0), in_scale_ptr, STATIC, QMAX, FLOOR)
        tl.store(s_ptr + row, s)
        tl.store(q_ptr + row * K + cols, act_codes(x, s, INT8, QMAX).to(q_ptr.dtype.element_ty), mask=mask)
        return
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    if not STATIC:
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
    s = act_scale(tl.max(amax, axis=0), in_scale_ptr, STATIC, QMAX, FLOOR)
    tl.store(s_ptr + row, s)
    for k0 in range(0, K, BLOCK):
        mask = k0 + cols < K
        x = tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * K + k0 + cols, act_codes(x, s, INT8, QMAX).to(q_ptr.dtype.element_ty), mask=mask)


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


# ------------------------------------------------------------------------------------------ configs

@dataclass(frozen=True)
class GemmConfig:
    """One launch configuration. split 0: chosen from the grid size (split-K when the (M, N) tiles are too few
    to fill the GPU); otherwise that many K splits (rounded down to a divisor of the K tile count)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split: int = 0
    scale_acc: bool = True  # wna16: scale the group's partial product (else the weight tile)
    reshape: bool = True  # wna16: unpack words in registers (else one load per row of the tile)
    dequant_mm: bool = False  # wna16: dequantize to a [K, N] buffer, then cuBLAS
    magic: bool = False  # wna16: codes to floats by the magic-number bit trick (no int -> float conversion)
    gemv: bool = False  # no tensor cores (decode): wna16 through _wna16_gemv_kernel, fp8/int8 elementwise products
    serial: bool = False  # split-K partials summed by the tile's last program (_split_k): no reduce launch
    prefetch: bool = False  # wna16 GEMV: load tile t + 1 before computing tile t (a load always in flight)
    zsum: bool = False  # wna16 GEMV: zero point off once per tile (z * sum x), scales in the words' layout
    waves: float = 2  # split 0: split K until the grid holds this many programs per SM
    swap: bool = False  # fp8/int8: _w8a8_gemm_kernel's SWAP (the weight tile as the MMA's M side, the rows its N)
    tma: bool = False  # loads by TMA where they apply (_wna16_mma_tma_kernel, _w8a8_swap_tma_kernel)
    ldg: bool = False  # W4A16 mma: the codes straight into registers, the next tile prefetched (_wna16_mma_ldg_kernel)
    maxnreg: int = 0  # a register cap passed to the compiler (0: its own choice)
    gluon: bool = False  # W4A16 mma, up to 16 rows: runtime/ops/wna16_gluon.py's kernel (block_m 8 up to 8 rows)
    tps: int = 1  # gluon: K tiles per pipeline stage
    pre: bool = False  # gluon: the next stage's first tile read into registers before this stage's last wait
    early: bool = True  # gluon under PDL: the first stages' weights loaded before the wait for the previous kernel
    l2pf: int = 0  # gluon under PDL: this many more K tiles of weights prefetched into L2 before that wait
    wide: bool = False  # W4A16 mma, prefill: _wna16_mma_wide_kernel (words, no act-order; scale_acc False: FOLD)
    row_blocks: int = 1  # wide: 64-row weight blocks per program (1, 2 or 4), sharing each x tile
    m_fast: bool = False  # wide: the grid's first axis walks M's tiles (a weight block's programs run together)


# decode-sized configurations (H200 sweeps, bench/results/quant-gemm-decode-h200.json)
# 1 row: the GEMV (block_k is capped by the group size at launch): 64-wide tiles, 2 warps, the next tile loaded
# while this one is computed, 4 programs per SM: 88.6 us per 8B layer against 92.7 for 128-wide tiles, 4 warps,
# no prefetch, 2 per SM (faster on each of the four shapes; bench/results/quant-gemm-decode-h200-codes.json)
WNA16_GEMV = GemmConfig(1, 64, 128, num_warps=2, num_stages=3, gemv=True, serial=SERIAL_SPLIT, prefetch=True, waves=4)
# 4-bit, 2-16 rows: magic-number unpacking, 128-wide tiles (168 us per 8B layer at M = 4, 172 at M = 16)
WNA16_DECODE = {4: GemmConfig(16, 128, 128, num_warps=4, num_stages=3, magic=True, serial=SERIAL_SPLIT),
                8: GemmConfig(16, 64, 64, num_warps=4, num_stages=3, serial=SERIAL_SPLIT)}
# the W4A16 tensor-core kernel on pack_wna16_mma's layout (block_m = the wgmma N): 3 stages, 2 programs per SM,
# zero points as words: 79.5 us per 8B layer at M = 1 (GEMV 89.4), 82.0 at M = 16 (172.9; bf16 cuBLAS 130-132);
# its loads by TMA (tma): 75.8 / 73.7 against 78.0 / 79.9 in the same run (bench/results/quant-gemm-mma-tma-h200.json)
WNA16_MMA = GemmConfig(16, 64, 128, num_warps=4, num_stages=3, serial=SERIAL_SPLIT, tma=True)
# ... and up to WNA16_MMA_LDG_MAX_M rows: the codes by plain loads into registers (_wna16_mma_ldg_kernel), capped
# at 128 registers (ptxas then issues each tile's loads earlier). Per 8B layer on the H200 72.6 / 73.3 / 72.8 us at
# 1 / 2 / 4 rows against 74.8 / 73.5 / 74.0 for TMA, slower from 8 rows (bench/results/quant-gemm-mma-ldg-h200.json);
# in the engine no faster at batch 1 (351.3 against 350.8 tok/s, bench/results/quant-engine-8b-h200-w4a16-ldg.json),
# so off (0) by default
WNA16_MMA_LDG = GemmConfig(16, 64, 128, num_warps=4, num_stages=1, serial=SERIAL_SPLIT, ldg=True, maxnreg=128)
WNA16_MMA_LDG_MAX_M = 0
# ... and up to WNA16_MMA_GLUON_MAX_M rows: the Gluon kernel (runtime/ops/wna16_gluon.py: TMA stages with one barrier
# each, asynchronous wgmma, the group scale applied after the next tile's wgmma is issued, the next stage's first
# tile loaded early). One H100, per 8B layer, L2 emptied: 68.5 us at one row (block_m 8, one tile per stage, 4
# stages) against 78.0 for the TMA kernel; 75.2 against 75.5 at 16 rows (bench/results/quant-gemm-gluon-h100.json).
# In the 8B W4A16+lm_head engine on one H100 (bench/results/pdl-gluon-8b-h100.json), GPU time of one decode graph
# replay at batch 1 / 2 / 4 / 8 / 16 without it: 2.494 / 2.528 / 2.547 / 2.705 / 2.838 ms; up to 1 row 2.233; up to
# 8 rows 2.232 / 2.324 / 2.344 / 2.626 / 2.843; up to 16 rows 2.229 / ... / 2.873 at 16: on up to 8 rows. Under PDL
# (decode graphs up to pdl.AUTO_MAX_BATCH) the first stages' weights are loaded before the wait for the previous
# kernel (early): 2.199 against 2.269 ms at batch 1; prefetching 8 / 16 more tiles into L2 (l2pf) or 6 stages
# were slower, 2.33 / 2.41 / 2.31 (bench/results/pdl-gluon-early-8b-h100.json)
WNA16_MMA_GLUON = GemmConfig(8, 64, 128, num_warps=4, num_stages=4, serial=SERIAL_SPLIT, gluon=True, tps=1, pre=True)
WNA16_MMA_GLUON_MAX_M = 8
# The residual add + RMSNorm between two W4A16 linears carried by the Gluon kernel's epilogues where it runs
# (quant_linear.linear_wna16_mma_add_norm / _rms, the epilogue form; norm_in_epilogue); False: the normed form
# (the GEMM, then the fused_add_rms_norm kernel), for A/B. The ops exist only in builds with
# passes.fuse_norm_epilogue, off by default: correct on the H100, and no faster at batch 1 (the GEMMs' early
# weight loads under PDL already hid the norm kernels; bench/results/pdl-epilogues-8b-h100.json).
WNA16_NORM_EPILOGUE = True
# SiLU-and-multiply carried by the gate | up GEMM's epilogue where the Gluon kernel runs (the build's
# passes.fuse_silu_epilogue: quant_linear.linear_wna16_mma_silu); False: the GEMM, then the silu_and_mul kernel.
# Off by default in the recipe for the same reason (and slower at 2-4 rows: the pair exchange).
WNA16_SILU_EPILOGUE = True
# ... and for more rows (wna16_mma_config): the same tiles with block_m 32, 64, 128
WNA16_MMA_WIDE = {32: GemmConfig(32, 64, 128, num_warps=4, num_stages=3, serial=SERIAL_SPLIT),
                  64: GemmConfig(64, 64, 128, num_warps=4, num_stages=3, serial=SERIAL_SPLIT),
                  128: GemmConfig(128, 64, 128, num_warps=4, num_stages=2, serial=SERIAL_SPLIT)}
# ... or, where set, this prefill configuration of _wna16_mma_wide_kernel (GemmConfig.wide; block_m capped at the
# next power of two of M, at least 32). Not yet timed on a GPU, so None: the candidates are quant_gemm.py's
# "mma wide" labels (--decode-ms 64,256,1024) and pdl_auto's "prefill-*" settings. What it aims at: at 256 rows the
# kernels above took 369 us per 8B layer against cuBLAS bf16's 188 (H200, bench/results/quant-gemm-mma-h200.json);
# a 64-row program there moves about 16x more x than codes from L2, which row_blocks divides, and each K tile's
# wgmma waits for its float32 scaling, which FOLD removes
WNA16_MMA_PREFILL: GemmConfig | None = None
# FP8 on codes, up to 16 rows: _w8a8_gemm_kernel with SWAP (the weight tile as wgmma's M side), 4 stages, split-K
# only up to one program per SM: 80.4 us per 8B layer at M = 1 and 82.4 at M = 16 against 83.6 / 87.1 unswapped
# (16 x 64 x 128, 6 stages, 2 programs per SM; figures include a 4.4 us timer floor per GEMM; bf16 cuBLAS 127-130;
# bench/results/quant-gemm-decode-h200-swap.json)
# ... its loads by TMA where the tiles are whole (tma: _w8a8_swap_tma_kernel): 77.9 / 78.8 against 80.2 / 82.0 in
# the same run (bench/results/quant-gemm-fp8-tma-h200.json)
FP8_DECODE = GemmConfig(16, 64, 128, num_warps=4, num_stages=4, serial=SERIAL_SPLIT, waves=1, swap=True, tma=True)
# ... where the weight's 64-row tiles are fewer than the SMs (qkv, o and down of the 8B shape): K tiles of 256 and
# split-K to half a program per SM, fewer programs with twice the bytes in flight each
FP8_DECODE_NARROW = GemmConfig(16, 64, 256, num_warps=4, num_stages=4, serial=SERIAL_SPLIT, waves=0.5, swap=True,
                               tma=True)
# INT8 on codes, up to 16 rows: _w8a8_gemm_kernel with SWAP, K tiles of 256, split-K up to one program per SM:
# 76.0 / 78.2 us per 8B layer at M = 1 / 16 against 87.9 / 90.5 unswapped (bench/results/quant-gemm-int8-swap-h200.json)
INT8_DECODE = GemmConfig(16, 64, 256, num_warps=4, num_stages=4, serial=SERIAL_SPLIT, waves=1, swap=True)
_SMS: dict[int, int] = {}
LOCK_SLOTS = 1 << 14  # split tiles one serial split-K launch may count (more: the reduce kernel instead)
_LOCKS: dict[str, torch.Tensor] = {}


def _locks(device: torch.device) -> torch.Tensor:
    """The device's tile counters for serial split-K: zero between launches (each launch re-arms the counters it
    used). Launches on one device share them, so they must not run concurrently: Spanda runs a device's
    forward passes on one stream at a time."""
    key = str(device)
    t = _LOCKS.get(key)
    if t is None:
        t = _LOCKS[key] = torch.zeros(LOCK_SLOTS, dtype=torch.int32, device=device)
    return t


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_SMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


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


def fp8_config(m: int, n: int, k: int, device: torch.device | None = None) -> GemmConfig:
    """Decode-sized FP8 (M <= FP8_TRITON_MAX_M): the best of a sweep at 8B shapes on an H200
    (bench/results/quant-gemm-decode-h200-swap.json); FP8_DECODE_NARROW where N / FP8_DECODE.block_n is below the
    device's SM count."""
    sms = _sm_count(device) if device is not None else DEFAULT_SMS
    return FP8_DECODE_NARROW if n // FP8_DECODE.block_n < sms else FP8_DECODE


def int8_config(m: int, n: int, k: int) -> GemmConfig:
    if m <= 16:
        return INT8_DECODE
    if m <= 64:
        return GemmConfig(32 if m <= 32 else 64, 64, 128, num_warps=4, num_stages=4)
    if m <= 256:
        return GemmConfig(64, 128, 128, num_warps=4, num_stages=4)
    return GemmConfig(128, 128, 128, num_warps=8, num_stages=3)


def _choose_split(cfg: GemmConfig, tiles_mn: int, k_tiles: int, device: torch.device) -> int:
    """Largest useful divisor of k_tiles: split until the grid holds ``cfg.waves`` programs per SM, keeping >= 2
    K tiles each."""
    if cfg.split:
        want = cfg.split
    else:
        target = cfg.waves * _sm_count(device)
        want = 1
        while tiles_mn * want < target and k_tiles // (want * 2) >= 2:
            want *= 2
    want = max(1, min(want, k_tiles))
    while k_tiles % want:
        want -= 1
    return want


def _pow2_divisor(v: int, cap: int) -> int:
    """Largest power of two <= cap dividing v."""
    d = 1
    while d * 2 <= cap and v % (d * 2) == 0:
        d *= 2
    return d


# -------------------------------------------------------------------------------------------- wna16

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


def wna16_mma_config(m: int) -> GemmConfig:
    """block_m (the wgmma N) grows with M: every program dequantizes its weight tiles once for block_m rows of x;
    from DEQUANT_MM_MIN_M rows the weight is dequantized once and multiplied by cuBLAS (bench --decode 'mma',
    bench/results/quant-gemm-mma-h200.json)."""
    if m <= WNA16_MMA_GLUON_MAX_M:
        return WNA16_MMA_GLUON
    if m <= WNA16_MMA_LDG_MAX_M:
        return WNA16_MMA_LDG
    if m <= 16:
        return WNA16_MMA
    if DEQUANT_MM_MIN_M is not None and m >= DEQUANT_MM_MIN_M:  # as linear_wna16 (H200: 2355 us per 8B layer
        return GemmConfig(128, 64, 128, dequant_mm=True)       # at M = 2048 in the kernel, 1402 dequantized)
    if WNA16_MMA_PREFILL is not None:
        return replace(WNA16_MMA_PREFILL, block_m=min(WNA16_MMA_PREFILL.block_m, max(32, triton.next_power_of_2(m))))
    return WNA16_MMA_WIDE[32 if m <= 32 else 64 if m <= 64 else 128]


def _without_gluon(m: int) -> GemmConfig:
    """wna16_mma_config(m) as it would be without the Gluon kernel (WNA16_MMA in its place)."""
    cfg = wna16_mma_config(m)
    return WNA16_MMA if cfg.gluon else cfg


def _grouped(scales: torch.Tensor, zeros: torch.Tensor) -> bool:
    """The mma kernels' GROUPED: a zero point and scale per K tile, read per tile. Also for a single group
    (K = 128) held as pack_mma_zeros' words: only the per-tile path reads the words (the per-channel path
    would take each int32 word for a zero point)."""
    return scales.shape[0] > 1 or zeros.dtype == torch.int32


def wna16_mma_dequantize(qmma: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, perm: torch.Tensor | None,
                         dtype: torch.dtype) -> torch.Tensor:
    """pack_wna16_mma's codes (group size 128 or per channel) -> the weight as [N, K] in ``dtype``, columns in
    input-channel order: y = F.linear(x, W)."""
    n, k = qmma.shape[0] * 64, qmma.shape[1] * 128
    w = torch.empty((n, k), dtype=dtype, device=qmma.device)
    bf16 = dtype == torch.bfloat16
    _wna16_mma_dequant_kernel[(n // 64, k // 128)](
        qmma, scales.contiguous(), zeros.contiguous(), perm.contiguous() if perm is not None else qmma, w, n, k,
        GROUPED=_grouped(scales, zeros), HAS_PERM=perm is not None, ASM=hopper(qmma.device), BF16=bf16,
        MAGIC=MMA_MAGIC[dtype], META=zeros.dtype == torch.int32, num_warps=4)
    return w


def linear_wna16_mma_cuda(x: torch.Tensor, qmma: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          perm: torch.Tensor | None, bias: torch.Tensor | None, group_size: int,
                          config: GemmConfig | None = None) -> torch.Tensor:
    """quant_linear.linear_wna16_mma (4-bit codes in pack_wna16_mma's layout, qmma int16 [N/64, K/128, 2048]):
    x [M, K] fp16/bf16 -> y [M, N] through _wna16_mma_kernel; group size 128 or -1 (per channel); anything
    else goes to the reference. config:
    block_m (16, 32, 64 or 128: the wgmma N), split / waves / serial as for the other GEMMs, num_stages,
    dequant_mm (block_n, block_k and num_warps are fixed by the layout: 64, 128, 4), tma. zeros: uint8 zero
    points, or (group size 128) quant_linear.pack_mma_zeros' int32 words, read instead of scales and zeros."""
    if (x.dtype not in FAST_DTYPES or x.dim() != 2 or qmma.dim() != 3 or qmma.shape[1] * 128 != x.shape[1]
            or group_size not in (128, -1) or scales.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype)
            or (zeros.dtype == torch.int32 and group_size != 128)):
        return linear_wna16_mma_ref(x, qmma, scales, zeros, perm, bias, group_size)
    m, k = x.shape
    n = qmma.shape[0] * 64
    cfg = config or wna16_mma_config(m)
    if cfg.gluon:
        out = _wna16_gluon(x, qmma, zeros, perm, bias, cfg)
        if out is not None:
            return out
        cfg = _without_gluon(m)  # the Gluon kernel does not apply: the Triton kernels' own configuration
    if cfg.dequant_mm:  # prefill-sized: the weight dequantized once, then cuBLAS
        return torch.nn.functional.linear(x, wna16_mma_dequantize(qmma, scales, zeros, perm, x.dtype), bias)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    words = zeros.dtype == torch.int32 and perm is None
    wide = cfg.wide and words and _tma_ready(x) and n % (64 * cfg.row_blocks) == 0
    rb = cfg.row_blocks if wide else 1  # 64-row weight blocks per program
    tiles_n, tiles_m = n // 64, triton.cdiv(m, cfg.block_m)
    k_tiles = k // 128
    split = _choose_split(cfg, tiles_n // rb * tiles_m, k_tiles, x.device)
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else out
    serial = cfg.serial and split > 1 and tiles_n * tiles_m <= LOCK_SLOTS
    bf16 = x.dtype == torch.bfloat16
    # the packed bf16x2 subtraction needs sm_90; the interpreter and older GPUs run the same arithmetic in Triton
    asm = hopper(x.device)
    tma = not cfg.ldg and cfg.tma and words and _tma_ready(x)
    if wide or tma:
        descs = (TensorDescriptor.from_tensor(x, [cfg.block_m, 128]),
                 TensorDescriptor.from_tensor(qmma.view(-1, 256), [8, 256]),  # a 4 KB tile: 8 rows of 256
                 TensorDescriptor.from_tensor(zeros.contiguous(), [1, 64]))
        common = (bias.contiguous() if bias is not None else out, out, part, _locks(x.device) if serial else part,
                  m, n, k)
    if wide:
        grid = (tiles_m, tiles_n // rb, split) if cfg.m_fast else (tiles_n // rb, tiles_m, split)
        _wna16_mma_wide_kernel[grid](
            *descs, *common, TILES=k_tiles // split, HAS_BIAS=bias is not None, SPLIT=split, SERIAL=serial,
            BLOCK_M=cfg.block_m, RB=rb, FOLD=not cfg.scale_acc, M_FAST=cfg.m_fast, ASM=asm, BF16=bf16,
            MAGIC=MMA_MAGIC[x.dtype], num_warps=4, num_stages=cfg.num_stages, **launch_kwargs(x.device))
    elif cfg.ldg and words:
        _wna16_mma_ldg_kernel[(tiles_n, tiles_m, split)](
            x, qmma, zeros.contiguous(), bias.contiguous() if bias is not None else out, out, part,
            _locks(x.device) if serial else part, m, n, k, x.stride(0), TILES=k_tiles // split,
            HAS_BIAS=bias is not None, SPLIT=split, SERIAL=serial, BLOCK_M=cfg.block_m, ASM=asm, BF16=bf16,
            MAGIC=MMA_MAGIC[x.dtype], SCALE_ACC=cfg.scale_acc, num_warps=4, num_stages=1, **launch_kwargs(x.device),
            **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}))
    elif tma:
        _wna16_mma_tma_kernel[(tiles_n, tiles_m, split)](
            *descs, *common, TILES=k_tiles // split, HAS_BIAS=bias is not None, SPLIT=split, SERIAL=serial,
            BLOCK_M=cfg.block_m, ASM=asm, BF16=bf16, MAGIC=MMA_MAGIC[x.dtype], num_warps=4,
            num_stages=cfg.num_stages, **launch_kwargs(x.device))
    else:
        _wna16_mma_kernel[(tiles_n, tiles_m, split)](
            x, qmma, scales.contiguous(), zeros.contiguous(), perm.contiguous() if perm is not None else qmma,
            bias.contiguous() if bias is not None else scales, out, part, _locks(x.device) if serial else part, m, n, k,
            x.stride(0), TILES=k_tiles // split, GROUPED=_grouped(scales, zeros), HAS_PERM=perm is not None,
            HAS_BIAS=bias is not None, SPLIT=split, SERIAL=serial, BLOCK_M=cfg.block_m, ASM=asm, BF16=bf16,
            MAGIC=MMA_MAGIC[x.dtype], META=zeros.dtype == torch.int32, num_warps=4, num_stages=cfg.num_stages,
            **launch_kwargs(x.device))
    if split > 1 and not serial:
        _reduce(part, None, None, bias, out)
    return out


def _wna16_gluon(x: torch.Tensor, qmma: torch.Tensor, zeros: torch.Tensor, perm: torch.Tensor | None,
                 bias: torch.Tensor | None, cfg: GemmConfig, add=None, rms=None, silu=False):
    """linear_wna16_mma_cuda through runtime/ops/wna16_gluon.py's kernel where it applies (sm_90: wgmma; Gluon,
    1 to 16 rows, zero points as pack_mma_zeros' words, no act-order, x's rows 16-byte aligned); None otherwise.
    block_m 8 up to 8 rows, else 16; the split of gluon_split. add / rms: wna16_gluon.linear_wna16_gluon's (the
    norm carried by the epilogues), silu (SiLU-and-multiply carried by the epilogue: twice the tile counters)."""
    from runtime.ops import wna16_gluon as wg  # imports Gluon: only when a Gluon config is asked for

    m, k = x.shape
    if not (wg.AVAILABLE and capability(x.device)[0] == 9 and 0 < m <= 16 and zeros.dtype == torch.int32
            and perm is None and _tma_ready(x)):
        return None
    block_m = 8 if m <= 8 else 16
    tiles_mn, k_tiles = qmma.shape[0] * triton.cdiv(m, block_m), k // 128
    if wg.counter_slots(tiles_mn, silu) > LOCK_SLOTS or k_tiles % cfg.tps or (silu and qmma.shape[0] % 2):
        return None
    split = gluon_split(cfg, tiles_mn, k_tiles, x.device)
    return wg.linear_wna16_gluon(x, qmma, zeros.contiguous(), bias, tps=cfg.tps, stages=cfg.num_stages,
                                 block_m=block_m, split=split, pre=cfg.pre, pdl=launch_kwargs(x.device).get("PDL", 0),
                                 early=cfg.early, l2pf=cfg.l2pf, add=add, rms=rms, silu=silu)


def norm_in_epilogue(m: int, device: torch.device) -> bool:
    """Whether linear_wna16_mma_add_norm and linear_wna16_mma_rms take the epilogue form for m rows (both ask,
    with the same m): the Gluon decode GEMM's rows on an sm_90 GPU, WNA16_NORM_EPILOGUE on."""
    if not (WNA16_NORM_EPILOGUE and 0 < m <= WNA16_MMA_GLUON_MAX_M and device.type == "cuda"
            and capability(device)[0] == 9):
        return False
    from runtime.ops import wna16_gluon as wg
    return wg.AVAILABLE


def linear_wna16_mma_add_norm_cuda(x, qmma, scales, zeros, perm, bias, group_size, residual, norm_weight, eps):
    """quant_linear.linear_wna16_mma_add_norm: the epilogue form in the Gluon kernel (or, where that declines,
    the GEMM and the same arithmetic in torch); the normed form as the GEMM and the fused_add_rms_norm kernel."""
    epilogue = norm_in_epilogue(x.shape[0], x.device)
    if epilogue and (residual.dtype == x.dtype and norm_weight.dtype == x.dtype and residual.is_contiguous()
                     and residual.shape == (x.shape[0], qmma.shape[0] * 64)):
        out = _wna16_gluon(x, qmma, zeros, perm, bias, WNA16_MMA_GLUON, add=(residual, norm_weight))
        if out is not None:
            return out
    y = linear_wna16_mma_cuda(x, qmma, scales, zeros, perm, bias, group_size)
    if epilogue:
        return add_norm_outputs(y, residual, norm_weight, eps, epilogue=True)
    from runtime.ops.triton_elementwise import fused_add_rms_norm_cuda
    normed, total = fused_add_rms_norm_cuda(y, residual, norm_weight, eps)
    return total, normed, y.new_empty((y.shape[1] // 64, y.shape[0]), dtype=torch.float32)


def _ss_ready(ss: torch.Tensor, h: torch.Tensor) -> bool:
    """Whether the producer's sums of squares can be read by the Gluon kernel for the rows of h: [K / 64, M]
    float32, contiguous."""
    return ss.dtype == torch.float32 and ss.is_contiguous() and ss.shape == (h.shape[1] // 64, h.shape[0])


def linear_wna16_mma_rms_cuda(h, qmma, scales, zeros, perm, bias, group_size, ss, eps):
    """quant_linear.linear_wna16_mma_rms: the epilogue form in the Gluon kernel (or the GEMM, then the scaling in
    torch); the normed form is linear_wna16_mma."""
    if not norm_in_epilogue(h.shape[0], h.device):
        return linear_wna16_mma_cuda(h, qmma, scales, zeros, perm, bias, group_size)
    if _ss_ready(ss, h):
        out = _wna16_gluon(h, qmma, zeros, perm, bias, WNA16_MMA_GLUON, rms=(ss, eps))
        if out is not None:
            return out
    return rms_scaled(linear_wna16_mma_cuda(h, qmma, scales, zeros, perm, None, group_size), ss, eps, bias, h.dtype)


def linear_wna16_mma_silu_cuda(x, qmma, scales, zeros, perm, bias, group_size, ss, eps):
    """quant_linear.linear_wna16_mma_silu: up to WNA16_MMA_GLUON_MAX_M rows on sm_90 (WNA16_SILU_EPILOGUE) the
    Gluon kernel's epilogue computes silu(gate) * up (with ss, in the norm's epilogue form where the producer took
    it: norm_in_epilogue); otherwise the GEMM (linear_wna16_mma_rms_cuda with ss, else linear_wna16_mma_cuda),
    then the silu_and_mul kernel."""
    rms = ss is not None and norm_in_epilogue(x.shape[0], x.device)  # else x is already normed (or there is no norm)
    if WNA16_SILU_EPILOGUE and x.shape[0] <= WNA16_MMA_GLUON_MAX_M and (not rms or _ss_ready(ss, x)):
        out = _wna16_gluon(x, qmma, zeros, perm, bias, WNA16_MMA_GLUON, rms=(ss, eps) if rms else None, silu=True)
        if out is not None:
            return out
    if ss is None:
        y = linear_wna16_mma_cuda(x, qmma, scales, zeros, perm, bias, group_size)
    else:
        y = linear_wna16_mma_rms_cuda(x, qmma, scales, zeros, perm, bias, group_size, ss, eps)
    from runtime.ops.triton_elementwise import silu_and_mul_cuda
    return silu_and_mul_cuda(y)


def gluon_split(cfg: GemmConfig, tiles_mn: int, k_tiles: int, device: torch.device) -> int:
    """The Gluon kernel's split-K: _choose_split's, lowered until cfg.tps divides each program's K tiles (needs
    k_tiles % cfg.tps == 0)."""
    split = _choose_split(cfg, tiles_mn, k_tiles, device)
    while k_tiles % split or (k_tiles // split) % cfg.tps:
        split -= 1
    return split


def _tma_ready(x: torch.Tensor) -> bool:
    """Whether a 2-D x can be read through a TMA descriptor: sm_90+ (or the interpreter's CPU tensors), rows
    16-byte aligned (TMA's rule for the base address and the row stride)."""
    return ((hopper(x.device) or x.device.type == "cpu") and x.stride(1) == 1 and x.data_ptr() % 16 == 0
            and x.stride(0) * x.element_size() % 16 == 0)


def _reduce(part, xs, ws, bias, out):
    split, m, n = part.shape
    bm, bn = min(16, max(2, triton.next_power_of_2(m))), 256
    _split_reduce_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm))](
        part, xs if xs is not None else part, ws if ws is not None else part, bias if bias is not None else part,
        out, m, n, SPLIT=split, SCALES=xs is not None, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=4,
        **launch_kwargs(part.device))


# --------------------------------------------------------------------------------------- activations

def quantize_rows(x: torch.Tensor, input_scale: torch.Tensor | None, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes [M, K] in ``dtype`` (float8_e4m3fn or int8), float32 scales [M, 1]), as
    quant_linear.quantize_activation_fp8 / _int8 (a static scale is repeated per row)."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=dtype, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        static = input_scale is not None
        block = min(QUANT_BLOCK, triton.next_power_of_2(k))
        _quant_rows_kernel[(m,)](
            x, q, s, input_scale.float() if static else s, x.stride(0), K=k,
            QMAX=INT8_MAX if dtype == torch.int8 else FP8_MAX, FLOOR=SCALE_FLOOR, STATIC=static,
            INT8=dtype == torch.int8, BLOCK=block, num_warps=max(1, min(8, block // 256)), **launch_kwargs(x.device))
    return q, s


# ---------------------------------------------------------------------------------------------- fp8

_FP8_MODES = ("fused", "bias_after", "f32_out")
_fp8_mode: dict[tuple, int] = {}  # (dtype, row-wise, has bias) -> index into _FP8_MODES that this torch accepts


def _scaled_mm(xq, w, sa, sb, bias, dtype, mode: str):
    if mode == "fused":
        return torch._scaled_mm(xq, w.t(), scale_a=sa, scale_b=sb, bias=bias, out_dtype=dtype)
    if mode == "bias_after":
        y = torch._scaled_mm(xq, w.t(), scale_a=sa, scale_b=sb, out_dtype=dtype)
        return y if bias is None else y + bias
    one = torch.ones((), dtype=torch.float32, device=xq.device)
    y = torch._scaled_mm(xq, w.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    y = y * sa.reshape(-1, 1) * sb.reshape(1, -1)
    return (y if bias is None else y + bias.float()).to(dtype)


def linear_fp8_cuda(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    input_scale: torch.Tensor | None, bias: torch.Tensor | None, config: GemmConfig | None = None,
                    path: str | None = None) -> torch.Tensor:
    """``path``: "triton" (the activation quantization kernel, then the split-K GEMM on the E4M3 codes),
    "triton_upcast" (the same on float16 copies of the codes), "scaled_mm"; None picks FP8_TRITON_PATH up to
    FP8_TRITON_MAX_M rows, _scaled_mm above."""
    m, k = x.shape if x.dim() == 2 else (0, 0)
    n = weight.shape[0]
    if not _fp8_fast(x.dtype, x.dim(), k, weight, bias):
        return linear_fp8_ref(x, weight, weight_scale, input_scale, bias)
    if m == 0:
        return x.new_empty((0, n))
    if path == "xq" or (path is None and FP8_TRITON_MAX_M is not None and m <= min(FP8_XQ_MAX_M, FP8_TRITON_MAX_M)):
        y = fp8_xq(x, weight, weight_scale, input_scale, bias, config=config)
        if y is not None:
            return y
        if path == "xq":
            raise ValueError(f"linear_fp8: the XQ kernel does not apply to M={m}, K={k}, N={n} on {x.device}")
    xq, sx = quantize_rows(x, input_scale, torch.float8_e4m3fn)
    return _fp8_codes_mm(xq, sx, weight, weight_scale, input_scale is not None, bias, x.dtype, config, path)


def fp8_xq(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None,
           bias: torch.Tensor | None, silu: bool = False, config: GemmConfig | None = None) -> torch.Tensor | None:
    """linear_fp8(x) (``silu``: linear_fp8(silu_and_mul(x)), x [M, 2K]) in one launch of _fp8_xq_kernel, or None
    where it does not apply: more rows than the config's block_m, a config that is not
    swapped + TMA, partial tiles, not sm_90+, an x whose last dimension is strided, split-K that would need the
    reduce launch. The caller's x is in the model dtype (bf16 / fp16) and the weight E4M3 [N, K]."""
    m, width = x.shape
    k, n = (width // 2 if silu else width), weight.shape[0]
    cfg = config or fp8_config(m, n, k, x.device)
    if (not 0 < m <= cfg.block_m or not (cfg.swap and cfg.tma) or cfg.gemv or k % cfg.block_k
            or n % cfg.block_n or x.stride(1) != 1 or x.dtype not in FAST_DTYPES or weight.dtype != torch.float8_e4m3fn
            or not weight.is_contiguous() or not _tma_ready(weight) or (bias is not None and bias.dtype != x.dtype)):
        return None
    tiles_n, k_tiles = n // cfg.block_n, k // cfg.block_k
    split = _choose_split(cfg, tiles_n, k_tiles, x.device)
    serial = split > 1 and cfg.serial and tiles_n <= LOCK_SLOTS
    if split > 1 and not serial:
        return None
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else out
    ws = _per_column(weight_scale, n)
    rows = triton.next_power_of_2(m)
    static = input_scale is not None
    _fp8_xq_kernel[(tiles_n, 1, split)](
        x, TensorDescriptor.from_tensor(weight, [cfg.block_n, cfg.block_k]),
        input_scale.float().reshape(1) if static else ws, ws, bias if bias is not None else ws, out, part,
        _locks(x.device) if serial else part, m, n, x.stride(0), K=k, TILES=k_tiles // split,
        HAS_BIAS=bias is not None, SPLIT=split, SERIAL=serial, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, ROWS=rows, CHUNK=min(triton.next_power_of_2(k), max(16, FP8_XQ_CHUNK // rows)),
        SILU=silu, STATIC=static, QMAX=FP8_MAX, FLOOR=SCALE_FLOOR, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **launch_kwargs(x.device))
    return out


def _fp8_fast(dtype: torch.dtype, dim: int, k: int, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """_scaled_mm wants K and N multiples of 16 (cuBLASLt FP8 alignment); other shapes (none in supported
    models) and non-half dtypes take the reference."""
    return (dim == 2 and dtype in FAST_DTYPES and k % 16 == 0 and weight.shape[0] % 16 == 0
            and weight.dtype == torch.float8_e4m3fn and (bias is None or bias.dtype == dtype))


def _fp8_path(m: int, path: str | None) -> str:
    if path is None:
        path = "scaled_mm" if FP8_TRITON_MAX_M is None or m > FP8_TRITON_MAX_M else FP8_TRITON_PATH
    return path


def _per_column(weight_scale: torch.Tensor, n: int) -> torch.Tensor:
    ws = weight_scale.float()
    return (ws.reshape(n) if ws.numel() == n else ws.reshape(1).expand(n)).contiguous()


def _fp8_codes_mm(xq: torch.Tensor, sx: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                  static: bool, bias: torch.Tensor | None, dtype: torch.dtype, config: GemmConfig | None = None,
                  path: str | None = None) -> torch.Tensor:
    """(E4M3 codes [M, K], float32 scales [M, 1]) @ weight.T in ``dtype``: the split-K Triton GEMM (paths
    "triton", "triton_upcast") or _scaled_mm. ``static``: the
    rows share one (calibrated) scale, so a per-tensor weight scale can use cuBLAS's tensor-wise scaling."""
    (m, k), n = xq.shape, weight.shape[0]
    path = _fp8_path(m, path)
    if path != "scaled_mm":
        out = torch.empty((m, n), dtype=dtype, device=xq.device)
        _w8a8_gemm(xq, weight.contiguous(), sx, _per_column(weight_scale, n), bias, out,
                   config or fp8_config(m, n, k, xq.device), fp8=True, upcast=path == "triton_upcast")
        return out
    ws = weight_scale.float()
    rowwise = not (static and ws.numel() == 1)
    if rowwise:
        sa = sx
        sb = ws.reshape(1, n) if ws.numel() == n else ws.reshape(1, 1).expand(1, n).contiguous()
    else:  # both per tensor: cuBLAS's tensor-wise scaling
        sa, sb = sx[:1].reshape(()), ws.reshape(())
    key = (dtype, rowwise, bias is not None)
    i = _fp8_mode.get(key, 0)
    while True:
        try:
            y = _scaled_mm(xq, weight.contiguous(), sa, sb, bias, dtype, _FP8_MODES[i])
            _fp8_mode[key] = i
            return y
        except (RuntimeError, ValueError, NotImplementedError):  # refused on the host, before any launch
            if i + 1 == len(_FP8_MODES):
                raise
            i += 1


# --------------------------------------------------------------------------------------------- int8

def linear_int8_cuda(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     input_scale: torch.Tensor | None, bias: torch.Tensor | None, config: GemmConfig | None = None,
                     use_int_mm: bool | None = None) -> torch.Tensor:
    if (x.dim() != 2 or x.dtype not in FAST_DTYPES or weight.dtype != torch.int8 or weight.dim() != 2
            or weight_scale.numel() != weight.shape[0] or (bias is not None and bias.dtype != x.dtype)):
        return linear_int8_ref(x, weight, weight_scale, input_scale, bias)
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    xq, sx = quantize_rows(x, input_scale, torch.int8)
    return _int8_codes_mm(xq, sx, weight, weight_scale, bias, out, config, use_int_mm)


def _int8_codes_mm(xq: torch.Tensor, sx: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None, out: torch.Tensor, config: GemmConfig | None = None,
                   use_int_mm: bool | None = None) -> torch.Tensor:
    """out = (int8 codes [M, K] @ weight.T) * sx * weight_scale [+ bias] (int32 accumulation: exact)."""
    (m, k), n = xq.shape, weight.shape[0]
    ws = weight_scale.float().contiguous()
    w = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if use_int_mm is None:
        use_int_mm = INT_MM_MIN_M is not None and m >= INT_MM_MIN_M
    if use_int_mm and m > 16 and k % 8 == 0 and n % 8 == 0:  # _int_mm's limits (cuBLASLt int8)
        acc = torch._int_mm(xq, w.t())
        _reduce(acc.view(1, m, n), sx, ws, bias, out)
        return out
    cfg = config or int8_config(m, n, k)
    _w8a8_gemm(xq, w, sx, ws, bias, out, cfg, fp8=False)
    return out


def _w8a8_gemm(xq, w, sx, ws, bias, out, cfg: GemmConfig, fp8: bool, upcast: bool = False) -> None:
    """out = (xq @ w.T) * sx * ws [+ bias] on codes: _w8a8_gemm_kernel (split-K per ``cfg`` or the heuristic),
    or _w8a8_gemv_kernel for a ``gemv`` config (one row per program, no tensor cores)."""
    (m, k), n = xq.shape, w.shape[0]
    gemv = cfg.gemv and not upcast
    tiles_n, tiles_m = triton.cdiv(n, cfg.block_n), m if gemv else triton.cdiv(m, cfg.block_m)
    k_tiles = triton.cdiv(k, cfg.block_k)
    split = _choose_split(cfg, tiles_n * tiles_m, k_tiles, xq.device)
    part = (torch.empty((split, m, n), dtype=torch.float32 if fp8 else torch.int32, device=xq.device)
            if split > 1 else out)
    xq = xq.contiguous()
    if fp8:
        w, xq = w.view(torch.uint8), xq.view(torch.uint8)
    serial = cfg.serial and split > 1 and tiles_n * tiles_m <= LOCK_SLOTS
    args = (xq, w, sx, ws, bias if bias is not None else ws, out, part, _locks(xq.device) if serial else part, m, n, k)
    flags = dict(TILES=k_tiles // split, HAS_BIAS=bias is not None, SPLIT=split, SERIAL=serial, FP8=fp8,
                 BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    even = k % (k_tiles * cfg.block_k) == 0 and n % cfg.block_n == 0
    if cfg.tma and fp8 and cfg.swap and even and not (gemv or upcast) and _tma_ready(xq) and _tma_ready(w):
        e4m3 = torch.float8_e4m3fn
        _w8a8_swap_tma_kernel[(tiles_n, tiles_m, split)](
            TensorDescriptor.from_tensor(xq.view(e4m3), [cfg.block_m, cfg.block_k]),
            TensorDescriptor.from_tensor(w.view(e4m3), [cfg.block_n, cfg.block_k]), *args[2:],
            BLOCK_M=cfg.block_m, **{f: v for f, v in flags.items() if f != "FP8"}, **launch_kwargs(xq.device))
    elif gemv:
        _w8a8_gemv_kernel[(tiles_n, m, split)](*args, EVEN=even, **flags, **launch_kwargs(xq.device))
    else:
        _w8a8_gemm_kernel[(tiles_n, tiles_m, split)](*args, UPCAST=upcast, BLOCK_M=cfg.block_m,
                                                     SWAP=cfg.swap and not upcast, EVEN=even, **flags,
                                                     **launch_kwargs(xq.device))
    if split > 1 and not serial:
        _reduce(part, sx, ws, bias, out)


def linear_w8a8_cuda(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """quant_linear.linear_w8a8: linear_fp8 / linear_int8 after their activation quantization (done by the
    producer of x: rms_norm_quant and friends)."""
    m, k = xq.shape if xq.dim() == 2 else (0, 0)
    n = weight.shape[0]
    fp8 = xq.dtype == torch.float8_e4m3fn
    if (out_dtype not in FAST_DTYPES or xq.dim() != 2 or weight.dtype != xq.dtype
            or (bias is not None and bias.dtype != out_dtype)
            or (fp8 and not _fp8_fast(out_dtype, 2, k, weight, bias))
            or (not fp8 and weight_scale.numel() != n)):
        return w8a8_codes_ref(xq, x_scale, weight, weight_scale, bias, out_dtype)
    if m == 0 or n == 0:
        return torch.empty((m, n), dtype=out_dtype, device=xq.device)
    xq = xq.contiguous()
    sx = x_scale.float().expand(m, 1).contiguous()
    if fp8:  # the producers write one scale per row (a static one repeated): _scaled_mm's row-wise scaling
        return _fp8_codes_mm(xq, sx, weight, weight_scale, False, bias, out_dtype)
    return _int8_codes_mm(xq, sx, weight, weight_scale, bias, torch.empty((m, n), dtype=out_dtype,
                                                                          device=xq.device))


# --------------------------------------------------------------------------------------- registration

def _wna16_op(x, qweight, scales, zeros, perm, bias, bits, group_size):
    return linear_wna16_cuda(x, qweight, scales, zeros, perm, bias, bits, group_size)


def _wna16_mma_op(x, qmma, scales, zeros, perm, bias, group_size):
    return linear_wna16_mma_cuda(x, qmma, scales, zeros, perm, bias, group_size)


def _fp8_op(x, weight, weight_scale, input_scale, bias):
    return linear_fp8_cuda(x, weight, weight_scale, input_scale, bias)


def _int8_op(x, weight, weight_scale, input_scale, bias):
    return linear_int8_cuda(x, weight, weight_scale, input_scale, bias)


if AVAILABLE:
    torch.library.register_kernel("spanda::linear_wna16", "cuda", _wna16_op)
    torch.library.register_kernel("spanda::linear_wna16_mma", "cuda", _wna16_mma_op)
    torch.library.register_kernel("spanda::linear_wna16_mma_add_norm", "cuda", linear_wna16_mma_add_norm_cuda)
    torch.library.register_kernel("spanda::linear_wna16_mma_rms", "cuda", linear_wna16_mma_rms_cuda)
    torch.library.register_kernel("spanda::linear_wna16_mma_silu", "cuda", linear_wna16_mma_silu_cuda)
    torch.library.register_kernel("spanda::linear_fp8", "cuda", _fp8_op)
    torch.library.register_kernel("spanda::linear_int8", "cuda", _int8_op)
    torch.library.register_kernel("spanda::linear_w8a8", "cuda", linear_w8a8_cuda)
