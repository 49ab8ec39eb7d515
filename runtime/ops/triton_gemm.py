"""What the quantized GEMMs' Triton kernels share (runtime/ops/triton_quant.py has the map of the modules): the
optional Triton import (without Triton every name here is inert and the references serve every call), ``_jit``,
``pdl_enter`` (programmatic dependent launch, runtime/ops/pdl.py), the launch configuration ``GemmConfig``, and
split-K.

Split-K: small M (decode) is bandwidth-bound on the weights, and the (M, N) tiles are too few programs to stream
them, so ``_choose_split`` spreads K over ``split`` programs per tile (until the grid holds ``GemmConfig.waves``
programs per SM). Each program stores a float32 (int32 for INT8) partial [split, M, N]; ``_split_reduce_kernel``
sums them in a fixed order (deterministic), applies the scales and bias and rounds; with ``serial`` the tile's
last program to finish does that sum itself (``_split_k``: tile counters in ``_locks``, which every launch
re-arms; no second launch). Launch sizes and buffers depend on shapes only and nothing synchronizes with the
host, so every path is CUDA-graph capturable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.ops.pdl import hopper, launch_kwargs

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # CPU-only install: the reference implementations serve every call
    triton = tl = gdc_launch_dependents = gdc_wait = TensorDescriptor = None
AVAILABLE = triton is not None

FAST_DTYPES = (torch.float16, torch.bfloat16)
DEFAULT_SMS = 132  # H100 SXM; the real count is read off the device
# split-K launches sum their partials in the tile's last program instead of a second kernel (the default of the
# decode configurations; H200, us per layer of 8B GEMMs at M = 1: FP8 100.6 against 102.8, W4A16 GEMV 92.3
# against 95.3)
SERIAL_SPLIT = True


def _jit(fn=None, **kw):
    """triton.jit when Triton is installed; otherwise the plain function (never launched)."""
    if fn is None:
        return lambda f: _jit(f, **kw)
    return triton.jit(fn, **kw) if AVAILABLE else fn


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
def _gemv_program(N, BLOCK_N: tl.constexpr):
    """A split-K GEMV program on the grid (N tiles, rows, K splits): its grid indices (pid_n, row, pid_k) and its
    BLOCK_N output channels (rn, n_mask)."""
    pid_n = tl.program_id(0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_n, tl.program_id(1), tl.program_id(2), rn, rn < N


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
