"""linear_wna16_mma on CUDA (W4A16, the codes in quant_linear.pack_wna16_mma's layout: Hopper builds by default).

_wna16_mma_kernel: y^T = W x^T on wgmma with the dequantized weight as the register operand (see its docstring),
the same kernel from 1 to DEQUANT_MM_MIN_M rows (block_m 16 to 128), split-K as runtime/ops/triton_gemm.py does
it; from DEQUANT_MM_MIN_M rows _wna16_mma_dequant_kernel writes W [N, K] and cuBLAS multiplies. Up to 16 rows
(``GemmConfig.tma``), on sm_90+, with the zero points as words, no act-order and a 16-byte aligned x:
_wna16_mma_tma_kernel, the same arithmetic with the codes, x and the words brought in by TMA. Up to 8 rows on
sm_90 the Gluon kernel (runtime/ops/wna16_gluon.py), which can also carry the residual add + RMSNorm and
SiLU-and-multiply in its epilogues (the ``linear_wna16_mma_add_norm`` / ``_rms`` / ``_silu`` ops). For prefill,
where set (WNA16_MMA_PREFILL, not yet a default), _wna16_mma_wide_kernel (runtime/ops/triton_wna16_prefill.py):
the TMA kernel with several 64-row blocks per program sharing each x tile, the scale folded into the weight. The
plain-load variant (GemmConfig.ldg, off by default) is runtime/ops/triton_wna16_ldg.py; the per-tile arithmetic
all of them share (the layout's loads, dequantization, operand and end) runtime/ops/triton_wna16_tile.py.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from runtime.ops import triton_wna16
from runtime.ops.pdl import capability, hopper, launch_kwargs
from runtime.ops.quant_linear import MMA_MAGIC, add_norm_outputs, linear_wna16_mma_ref, rms_scaled
from runtime.ops.triton_gemm import (
    FAST_DTYPES,
    LOCK_SLOTS,
    SERIAL_SPLIT,
    GemmConfig,
    TensorDescriptor,
    _choose_split,
    _gemm_program,
    _jit,
    _locks,
    _reduce,
    _tma_ready,
    gdc_launch_dependents,
    gdc_wait,
    tl,
    triton,
)
from runtime.ops.triton_wna16_ldg import _wna16_mma_ldg_kernel
from runtime.ops.triton_wna16_prefill import _wna16_mma_wide_kernel
from runtime.ops.triton_wna16_tile import _mma_finish, _mma_index, _mma_load, _mma_operand


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
    min_m = triton_wna16.DEQUANT_MM_MIN_M  # linear_wna16's (read there: a setting of that module)
    if min_m is not None and m >= min_m:  # (H200: 2355 us per 8B layer at M = 2048 in the kernel, 1402 dequantized)
        return GemmConfig(128, 64, 128, dequant_mm=True)
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
