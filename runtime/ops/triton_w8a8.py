"""linear_fp8, linear_int8 and linear_w8a8 on CUDA: the launchers of the Triton kernels (which live in
runtime/ops/triton_w8a8_kernels.py) and their configurations, plus cuBLAS through ``torch._scaled_mm`` /
``torch._int_mm``.

linear_fp8 (FP8 W8A8, E4M3)
    x quantized per row (runtime/ops/triton_act_quant.py). Up to FP8_TRITON_MAX_M rows (decode) the codes go to
    the split-K Triton W8A8 GEMM below (float32 accumulation of exact E4M3 products; the row and column scales
    and the bias in the epilogue, or in the split reduction; FP8_DECODE runs it as _w8a8_gemm_kernel with SWAP,
    the weight tile on wgmma's M side and the rows on its N; on whole tiles and sm_90+, _w8a8_swap_tma_kernel,
    its loads by TMA): _scaled_mm streams the weight at a fraction of copy bandwidth there. Above that,
    ``torch._scaled_mm`` with row-wise scales (scale_a [M, 1], scale_b [1, N] float32; a per-tensor weight scale
    is expanded) or tensor-wise scales when both are per tensor, the bias and the output dtype in cuBLAS's
    epilogue. _scaled_mm needs K and N multiples of 16 (M is free); other shapes use the reference. A
    combination that this torch/cuBLAS refuses (checked on the host before any launch) falls back once and is
    remembered: without the fused bias, then float32 output with the scales applied after.

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

import torch

from runtime.ops.pdl import capability, launch_kwargs
from runtime.ops.quant_linear import FP8_MAX, SCALE_FLOOR, linear_fp8_ref, linear_int8_ref, w8a8_codes_ref
from runtime.ops.triton_act_quant import quantize_rows
from runtime.ops.triton_gemm import (
    DEFAULT_SMS,
    FAST_DTYPES,
    LOCK_SLOTS,
    SERIAL_SPLIT,
    GemmConfig,
    TensorDescriptor,
    _choose_split,
    _locks,
    _reduce,
    _sm_count,
    _tma_ready,
    triton,
)
from runtime.ops.triton_w8a8_kernels import (
    _fp8_xq_kernel,
    _w8a8_gemm_kernel,
    _w8a8_gemv_kernel,
    _w8a8_swap_tma_kernel,
)

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
# Where on (sm_90), the FP8 decode GEMM (a swapped config, up to 16 rows, whole tiles of 64 channels) runs
# runtime/ops/fp8_gluon.py's kernel with FP8_GLUON_STAGES stages: under PDL its first stages' weights load before
# its wait for the previous kernel, as the Gluon W4A16 kernel's do (3% at batch 1 there). Off: not yet run on a GPU
# (bench/pdl_auto.py setting fp8-gluon).
FP8_GLUON = False
FP8_GLUON_STAGES = 4


# (An FP8 GEMV of an earlier time, a [BLOCK_M, BLOCK_K, BLOCK_N] product tile since removed, took 143 us per 8B
# layer at M = 1 against 101 for the split-K tensor-core kernel on the H200, bench/results/quant-gemm-decode-h200.json;
# its successor _w8a8_gemv_kernel, GemmConfig(gemv=True), is untimed: not a default.)
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


def _fp8_gluon(xq, w, sx, ws, bias, out, cfg: GemmConfig) -> bool:
    """_w8a8_gemm on E4M3 codes through runtime/ops/fp8_gluon.py's kernel where FP8_GLUON is on and it applies
    (sm_90, a swapped config of 64 channels per tile, 1 to 16 rows, whole K tiles, TMA-ready codes, a serial
    split-K's counters for every tile): True once launched. block_m 8 up to 8 rows, else 16; the split of
    _choose_split, as the Triton kernel's."""
    (m, k), n = xq.shape, w.shape[0]
    if not (capability(xq.device)[0] == 9 and cfg.swap and cfg.block_n == 64 and 0 < m <= 16
            and n % 64 == 0 and k % cfg.block_k == 0 and _tma_ready(xq) and _tma_ready(w)):
        return False
    from runtime.ops import fp8_gluon as fg  # imports Gluon: only when asked for

    tiles_n, k_tiles = n // 64, k // cfg.block_k
    split = _choose_split(cfg, tiles_n, k_tiles, xq.device)
    if not fg.AVAILABLE or (split > 1 and tiles_n > LOCK_SLOTS):
        return False
    fg.linear_fp8_gluon(xq, sx, w, ws, bias, out, block_m=8 if m <= 8 else 16, block_k=cfg.block_k,
                        stages=FP8_GLUON_STAGES, split=split, pdl=launch_kwargs(xq.device).get("PDL", 0))
    return True


def _w8a8_gemm(xq, w, sx, ws, bias, out, cfg: GemmConfig, fp8: bool, upcast: bool = False) -> None:
    """out = (xq @ w.T) * sx * ws [+ bias] on codes: _w8a8_gemm_kernel (split-K per ``cfg`` or the heuristic),
    or _w8a8_gemv_kernel for a ``gemv`` config (one row per program, no tensor cores); FP8 decode through
    _fp8_gluon where FP8_GLUON is on."""
    (m, k), n = xq.shape, w.shape[0]
    if fp8 and FP8_GLUON and not (cfg.gemv or upcast) and _fp8_gluon(xq.contiguous(), w, sx, ws, bias, out, cfg):
        return
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
