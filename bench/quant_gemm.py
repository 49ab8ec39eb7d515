"""Benchmark of the quantized linear ops' CUDA paths (runtime/ops/triton_quant.py's map) at Llama-3.1-8B linear shapes
against bf16 cuBLAS and against the library kernels they build on.

    python bench/quant_gemm.py --out bench/results/quant-gemm-h100.json [--sweep] [--sweep-budget 150]

Shapes (K -> N): qkv 4096 -> 6144, o 4096 -> 4096, gate_up 4096 -> 28672, down 14336 -> 4096; M = 1, 16, 4096
tokens; bf16 activations. Columns, microseconds per call (median over replays of a
CUDA graph holding one call, events around each replay; the L2 is emptied before each replay by reading a
256 MiB buffer, so weights come from HBM as in a decode step; the graph keeps host launch cost out):
    bf16      torch.mm(x, W.t()) (cuBLAS), the baseline of every speedup
    w4a16     spanda linear_wna16, 4-bit, group 128 (ours; heuristic config)   w8a16: 8-bit, group 128
    fp8       spanda linear_fp8, dynamic per-token activation scales, per-channel weight scales (ours: the
              activation-quantization kernel + the split-K Triton GEMM up to FP8_TRITON_MAX_M rows, else
              _scaled_mm);  scaled_mm: torch._scaled_mm alone on pre-quantized inputs with the same row-wise
              scales; fp8_codes: linear_w8a8 on codes made beforehand (what a fuse_act_quant build's qkv,
              gate_up and down run); for M <= 64 also fp8_triton / fp8_triton_upcast / fp8_scaled_mm: each
              path of the op, and a small sweep of configurations of the Triton GEMM
    int8      spanda linear_int8, dynamic per-token (ours: quantization + Triton int8 GEMM);  int8_intmm: ours
              through torch._int_mm (M > 16);  int_mm: torch._int_mm alone (int32 out, no scales)
Weight bytes (what decode must stream): bf16 2KN; wNa16 KN*bits/8 + G*N*3 (scales, zeros); fp8/int8 KN + 4N.
TB/s = weight bytes / time (M = 1); TFLOP/s = 2MNK / time (M = 4096).
--sweep times other wna16 configurations (block sizes, split-K, unpackers, scale placement, dequantize +
cuBLAS) to check the heuristics. Never asserts; inputs are random (never zeros).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

import runtime.ops  # noqa: E402,F401
from compiler.quantize.layout import fp8_weight, int8_weight  # noqa: E402
from runtime.ops import triton_act_quant as taq  # noqa: E402
from runtime.ops import triton_gemm as tgm  # noqa: E402
from runtime.ops import triton_w8a8 as t8  # noqa: E402
from runtime.ops import triton_wna16 as tw  # noqa: E402
from runtime.ops import triton_wna16_mma as tm  # noqa: E402
from runtime.ops.quant_linear import pack_mma_zeros, pack_wna16_mma  # noqa: E402

FP8_SWEEP = [tgm.GemmConfig(16, bn, bk, num_warps=w, num_stages=st) for bn, bk, w, st in (
    (64, 256, 4, 4), (128, 128, 4, 4), (64, 128, 4, 6), (32, 256, 2, 4), (64, 512, 4, 3), (128, 256, 8, 3))]
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
# not part of a layer (per-layer sums leave it out unless --shapes names it): the vocabulary projection, which a
# recipe's quantization.quantize_lm_head quantizes
EXTRA_SHAPES = {"lm_head": (4096, 128256)}
MS = (1, 16, 4096)
DTYPE = torch.bfloat16
GROUP = 128
spanda = torch.ops.spanda


_FLUSH: list[torch.Tensor] = []


def bench_us(fn, reps: int = 40) -> float:
    """Median GPU time of fn (event pairs around each call) with the L2 emptied before each call by *reading* a
    256 MiB buffer: its lines are left clean, so the timed call pays no write-back of someone else's dirty
    lines (do_bench's flush writes its buffer, and a kernel reading tens of MB then also pays for writing the
    flush back: a floor of ~20 us on every GEMV-sized call here)."""
    if not _FLUSH:
        _FLUSH.append(torch.randn(2**26, device="cuda"))
        _FLUSH.append(torch.empty((), device="cuda"))
    buf, sink = _FLUSH
    for _ in range(3):
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in ev:
        torch.sum(buf, dim=0, out=sink)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in ev)[reps // 2] * 1e3


def graph_us(fn) -> float:
    """GPU time of one call, replayed from a CUDA graph (L2 emptied before each replay)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    us = bench_us(graph.replay)
    del graph
    return us


def try_us(fn) -> float | None:
    try:
        return graph_us(fn)
    except Exception as e:  # noqa: BLE001  (a benchmark never aborts on one variant)
        print(f"    failed: {type(e).__name__}: {str(e)[:200]}")
        return None


def copy_bandwidth() -> float:
    x = torch.randn(2**28, device="cuda", dtype=DTYPE)
    y = torch.empty_like(x)
    return 2 * x.numel() * 2 / (bench_us(lambda: y.copy_(x)) * 1e-6)


def wna16_weights(k: int, n: int, bits: int):
    g = k // GROUP
    qw = torch.randint(-2**31, 2**31 - 1, (k * bits // 32, n), dtype=torch.int32, device="cuda")
    scales = (torch.rand(g, n, device="cuda") * 0.01 + 0.001).to(DTYPE)
    zeros = torch.randint(0, 2**bits, (g, n), dtype=torch.uint8, device="cuda")
    return qw, scales, zeros, k * n * bits // 8 + g * n * 3


def sweep_configs(m: int) -> list[tgm.GemmConfig]:
    if m <= 16:
        out = [tgm.GemmConfig(16, bn, bk, num_warps=w, num_stages=3) for bn, bk, w in (
            (32, 128, 4), (64, 64, 4), (64, 128, 4), (64, 128, 2), (128, 64, 4), (128, 128, 4), (128, 128, 8))]
        out += [tgm.GemmConfig(16, 64, 128, num_stages=4), tgm.GemmConfig(16, 64, 128, num_stages=3, reshape=False)]
        out += [tgm.GemmConfig(16, bn, bk, num_warps=w, num_stages=st, magic=True) for bn, bk, w, st in (
            (64, 128, 4, 3), (64, 128, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3), (32, 128, 2, 4))]
        return out + [tgm.GemmConfig(16, 64, 128, num_stages=3, split=s) for s in (1, 2, 4, 8, 16)]
    return [tgm.GemmConfig(bm, bn, bk, num_warps=w, num_stages=st, scale_acc=a)
            for bm, bn, bk, w, st in ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4),
                                      (64, 128, 64, 4, 4), (128, 128, 128, 8, 3))
            for a in (False, True)] + [tgm.GemmConfig(128, 128, 64, dequant_mm=True)]


def decode_candidates(m: int) -> dict[str, list]:
    """--decode: the decode-sized candidates per op, (label, config, fp8 path)."""
    g = tgm.GemmConfig
    w4 = [("default", None, None)]
    if m == 1:
        w4 += [(f"gemv{bm} n{bn} k{bk} w{w} s{st} {'serial' if se else 'reduce'} split{sp or 'auto'}",
                g(bm, bn, bk, num_warps=w, num_stages=st, split=sp, gemv=True, serial=se), None)
               for bm in sorted({1, m}) for bn, bk, w, st, sp, se in (
                   (128, 128, 4, 3, 0, True), (128, 128, 4, 3, 0, False), (64, 128, 4, 3, 0, True),
                   (256, 128, 8, 3, 0, True), (128, 128, 4, 4, 0, True), (64, 128, 2, 3, 0, True),
                   (128, 64, 4, 3, 0, True), (128, 128, 4, 3, 4, True), (256, 128, 4, 3, 0, True),
                   (64, 128, 1, 4, 0, True), (128, 128, 8, 2, 0, True), (128, 128, 4, 3, 2, True))]
        # the GEMV with tile t + 1 loaded while tile t is computed, and grids of `waves` programs per SM
        w4 += [(f"gemv1 {'pf' if pf else 'nopf'} n{bn} k{bk} w{w} x{wv}",
                g(1, bn, bk, num_warps=w, gemv=True, serial=True, prefetch=pf, waves=wv), None)
               for pf, bn, bk, w, wv in (
                   (True, 128, 128, 4, 2), (True, 128, 128, 4, 4), (True, 128, 128, 4, 8), (True, 64, 128, 4, 4),
                   (True, 64, 128, 2, 4), (True, 64, 128, 2, 8), (True, 256, 128, 4, 4), (True, 256, 128, 8, 4),
                   (True, 128, 128, 8, 4), (True, 128, 64, 4, 4), (True, 128, 64, 4, 8), (False, 128, 128, 4, 4),
                   (False, 128, 128, 4, 8), (False, 64, 128, 2, 8))]
        # ... and with the zero point taken off once per tile (no layout conversion in the loop)
        w4 += [(f"gemv1 zsum {'pf' if pf else 'nopf'} n{bn} k{bk} w{w} x{wv}",
                g(1, bn, bk, num_warps=w, gemv=True, serial=True, prefetch=pf, zsum=True, waves=wv), None)
               for pf, bn, bk, w, wv in (
                   (False, 128, 128, 4, 2), (False, 128, 128, 4, 4), (False, 128, 128, 4, 8), (True, 128, 128, 4, 4),
                   (True, 128, 128, 4, 8), (False, 256, 128, 4, 4), (True, 256, 128, 4, 4), (False, 64, 128, 2, 8),
                   (False, 128, 64, 4, 8), (True, 256, 128, 8, 4))]
        # many small programs, each a few K tiles (GemLite's batch-1 GEMV runs thousands of one-shot programs):
        # short K tiles and 8-24 programs per SM, the partials summed by the serial split-K
        w4 += [(f"gemv1 {'zsum' if zs else 'plain'} short n{bn} k{bk} w{w} x{wv}",
                g(1, bn, bk, num_warps=w, gemv=True, serial=True, zsum=zs, waves=wv), None)
               for zs in (False, True) for bn, bk, w, wv in (
                   (256, 32, 2, 16), (128, 32, 2, 16), (256, 64, 4, 16), (256, 32, 2, 8), (512, 32, 4, 16),
                   (128, 64, 2, 24))]
    elif m <= 4:
        w4 += [(f"gemv{bm} n{bn} k{bk} w{w} s{st} serial", g(bm, bn, bk, num_warps=w, num_stages=st, gemv=True,
                                                             serial=True), None)
               for bm, bn, bk, w, st in ((m, 128, 128, 4, 3), (m, 64, 128, 4, 3), (m, 128, 64, 4, 3),
                                         (m, 256, 128, 8, 3), (m, 64, 128, 2, 4))]
    # the tensor-core kernel on pack_wna16_mma's layout (the weight as wgmma's register operand): block_m tokens
    # per program (the wgmma N), split-K to `waves` programs per SM
    # per SM; meta: zero points and scales as one int32 per row and group (pack_mma_zeros: pipelined by cp.async
    # like the codes). (Also timed in bench/results/quant-gemm-mma-sweep-h200.json, slower, since removed:
    # b2/b4, 2-4 tiles loaded before computing them; a1, the scale folded into the weight.)
    w4 += [(f"mma m16 s{st} x{wv}{' meta' if mt else ''}",
            g(16, 64, 128, num_warps=4, num_stages=st, serial=True, waves=wv), "mma-meta" if mt else "mma")
           for st, wv, mt in [(2, 4, False), (3, 2, False)] + [(st, wv, True) for st in (2, 3, 4) for wv in (2, 4)]
           + [(3, 8, True), (4, 8, True), (6, 4, True), (2, 1, True), (3, 1, True), (4, 1, True)]]
    w4 += [(f"mma m16 s{st} split{sp} meta", g(16, 64, 128, num_warps=4, num_stages=st, serial=True, split=sp),
            "mma-meta") for st, sp in ((3, 1), (4, 1), (3, 2))]
    # the loads by TMA (_wna16_mma_tma_kernel: the words only, no act-order, x 16-byte aligned)
    w4 += [(f"mma m16 s{st} x{wv} tma", g(16, 64, 128, num_warps=4, num_stages=st, serial=True, waves=wv, tma=True),
            "mma-meta") for st, wv in ((3, 2), (4, 2), (6, 2), (3, 4), (4, 4), (3, 1))]
    # the codes by plain loads straight into registers, the next tile prefetched (_wna16_mma_ldg_kernel)
    w4 += [(f"mma m16 x{wv} ldg", g(16, 64, 128, num_warps=4, num_stages=1, serial=True, waves=wv, ldg=True),
            "mma-meta") for wv in (1, 2, 4, 8)]
    w4 += [(f"mma m16 x{wv} ldg fold", g(16, 64, 128, num_warps=4, num_stages=1, serial=True, waves=wv, ldg=True,
                                         scale_acc=False), "mma-meta") for wv in (2, 4)]  # the scale in the weight
    w4 += [("mma ldg r128", tm.WNA16_MMA_LDG, "mma-meta")]  # ... as WNA16_MMA_LDG: tile pairs, 128 registers
    if m > 16:  # prefill: _wna16_mma_wide_kernel (row_blocks 64-row blocks per program sharing each x tile; fold:
        # the scale in the weight, chained accumulators; mfast: a weight block's row tiles run together)
        w4 += [(f"mma wide m{bm} r{rb}{' fold' if fold else ''}{' mfast' if mf else ''} s{st}",
                g(bm, 64, 128, num_warps=4, num_stages=st, serial=True, wide=True, row_blocks=rb, scale_acc=not fold,
                  m_fast=mf), "mma-meta")
               for bm, rb, fold, mf, st in (
                   (128, 1, False, False, 2), (128, 1, True, False, 2), (128, 1, True, True, 2),
                   (128, 1, True, True, 3), (128, 2, True, False, 2), (128, 2, True, True, 2), (64, 2, True, True, 3),
                   (64, 2, True, False, 3), (64, 1, True, True, 4), (256, 1, True, True, 2), (32, 4, True, True, 3),
                   (64, 2, False, True, 3))
               if bm <= max(32, 1 << (m - 1).bit_length())]
        w4 += [("mma wide auto tma", dataclasses.replace(tm.wna16_mma_config(m), tma=True), "mma-meta")]
    w4 += [("mma auto", None, "mma-meta")]  # the launcher's own choice (wna16_mma_config(m)), the words as built
    w4 += [("mma auto cp.async", dataclasses.replace(tm.WNA16_MMA, tma=False), "mma-meta")] if m <= 16 else []
    base = tw.wna16_config(16, 4096, 4096, 4)
    w4 += [(f"dot {lab}", dataclasses.replace(base, **kw), None) for lab, kw in (
        ("serial", dict(serial=True)), ("magic", dict(magic=True)), ("magic serial", dict(magic=True, serial=True)),
        ("magic serial n128", dict(magic=True, serial=True, block_n=128)),
        ("magic serial n128 w8", dict(magic=True, serial=True, block_n=128, num_warps=8)),
        ("magic serial n256 w8", dict(magic=True, serial=True, block_n=256, num_warps=8)),
        ("magic serial n128 s4", dict(magic=True, serial=True, block_n=128, num_stages=4)),
        ("magic serial n128 noreshape", dict(magic=True, serial=True, block_n=128, reshape=False)))]
    # more, shorter split-K programs (grids of `waves` programs per SM)
    w4 += [(f"dot magic serial n{bn} k{bk} x{wv}", dataclasses.replace(base, magic=True, serial=True, block_n=bn,
                                                                        block_k=bk, waves=wv), None)
           for bn, bk, wv in ((128, 128, 4), (128, 128, 8), (64, 128, 8), (128, 64, 8), (64, 64, 16))]
    f8 = [("default", None, None),
          ("triton serial", dataclasses.replace(t8.fp8_config(m, 1, 1), serial=True), "triton")]
    f8 += [(f"triton serial n{bn} k{bk} w{w} s{st}", g(16, bn, bk, num_warps=w, num_stages=st, serial=True), "triton")
           for bn, bk, w, st in ((128, 128, 4, 6), (64, 256, 4, 4), (128, 256, 8, 4), (32, 256, 4, 6), (64, 128, 8, 6),
                                 (64, 128, 4, 8))]
    f8 += [(f"triton serial x{wv}", dataclasses.replace(t8.fp8_config(m, 1, 1), serial=True, waves=wv), "triton")
           for wv in (1, 3, 4, 6, 8)]  # grids of `waves` programs per SM
    # the GEMM on codes the fused RMSNorm / SiLU kernel made (fuse_act_quant): no quantization launch
    f8 += [(f"codes x{wv}", dataclasses.replace(t8.fp8_config(m, 1, 1), serial=True, waves=wv), "codes")
           for wv in (1, 2, 4, 8)]
    if m == 1:  # ... through _w8a8_gemv_kernel (one row per program, no tensor cores, K-contiguous tiles)
        f8 += [(f"codes gemv n{bn} k{bk} w{w} x{wv}", g(1, bn, bk, num_warps=w, gemv=True, serial=True, waves=wv),
                "codes") for bn, bk, w, wv in ((32, 128, 4, 4), (64, 128, 4, 4), (32, 256, 4, 4), (64, 128, 4, 8),
                                                (16, 256, 4, 8), (64, 256, 8, 4), (32, 128, 2, 8), (128, 128, 4, 4))]
    # _w8a8_gemm_kernel's SWAP: the weight tile as the wgmma M side (64/128 output channels), the rows as its N (16)
    f8 += [(f"codes swap n{bn} k{bk} w{w} s{st} x{wv}",
            g(16, bn, bk, num_warps=w, num_stages=st, serial=True, waves=wv, swap=True), "codes")
           for bn, bk, w, st in ((64, 128, 4, 4), (64, 128, 4, 6), (64, 128, 4, 8), (128, 128, 4, 4), (128, 128, 4, 6),
                                 (64, 256, 4, 3), (64, 256, 4, 4), (128, 256, 4, 3), (128, 128, 8, 4), (256, 128, 8, 4))
           for wv in (1, 2, 4)]
    # ... its loads by TMA (_w8a8_swap_tma_kernel)
    f8 += [(f"codes tma n{bn} k{bk} w{w} s{st} x{wv}",
            g(16, bn, bk, num_warps=w, num_stages=st, serial=True, waves=wv, swap=True, tma=True), "codes")
           for bn, bk, w, st, wv in ((64, 128, 4, 4, 1), (64, 128, 4, 6, 1), (64, 128, 4, 4, 2), (128, 128, 4, 4, 1),
                                     (64, 256, 4, 3, 1), (64, 128, 4, 8, 1))]
    f8 += [("codes auto", None, "codes")]  # the launcher's own choice (fp8_config(m, n, k))
    if m <= 4:  # the activation-quantization kernel, then _w8a8_gemv_kernel (one row per program)
        f8 += [(f"gemv{m} n{bn} k{bk} w{w} triton", g(m, bn, bk, num_warps=w, gemv=True, serial=True), "triton")
               for bn, bk, w in ((64, 128, 4), (32, 256, 4), (64, 64, 4))]
    # INT8 W8A8 on codes (a fused norm / SiLU made them): the default (INT8_DECODE, unswapped) against
    # _w8a8_gemm_kernel's SWAP, as FP8's decode GEMM runs it (its TMA twin is FP8-only)
    i8 = [("codes auto", None, "codes")]
    i8 += [(f"codes swap n{bn} k{bk} w{w} s{st} x{wv}",
            g(16, bn, bk, num_warps=w, num_stages=st, serial=True, waves=wv, swap=True), "codes")
           for bn, bk, w, st, wv in ((64, 128, 4, 4, 1), (64, 128, 4, 4, 2), (64, 256, 4, 3, 1), (64, 256, 4, 4, 1),
                                     (128, 128, 4, 4, 1), (128, 256, 4, 3, 1))]
    i8 += [(f"codes n64 k256 s4 x{wv}", g(16, 64, 256, num_warps=4, num_stages=4, serial=True, waves=wv), "codes")
           for wv in (1, 4)]
    return dict(w4a16=w4, fp8=f8, int8=i8)


def decode_call(op: str, x: torch.Tensor, w: dict, cfg, path):
    if op == "bf16":
        return lambda: torch.mm(x, w["bf16"].t())
    if op == "w4a16" and path in ("mma", "mma-meta"):
        if "w4mma" not in w:
            w["w4mma"] = pack_wna16_mma(w["w4"][0])
            w["w4words"] = pack_mma_zeros(w["w4"][1], w["w4"][2])
        z = w["w4words"] if path == "mma-meta" else w["w4"][2]
        return lambda: tm.linear_wna16_mma_cuda(x, w["w4mma"], w["w4"][1], z, None, None, GROUP, config=cfg)
    if op == "w4a16":
        return lambda: tw.linear_wna16_cuda(x, *w["w4"][:3], None, None, 4, GROUP, config=cfg)
    if op == "int8":  # the GEMM alone, on codes quantized beforehand
        xq, sx = taq.quantize_rows(x, None, torch.int8)
        out = torch.empty(x.shape[0], w["i8"]["weight"].shape[0], dtype=x.dtype, device=x.device)
        return lambda: t8._int8_codes_mm(xq, sx, w["i8"]["weight"], w["i8"]["weight_scale"], None, out, config=cfg,
                                         use_int_mm=False)
    if path == "codes":  # the GEMM alone, on codes quantized beforehand (a fused norm/SiLU made them)
        xq, sx = taq.quantize_rows(x, None, torch.float8_e4m3fn)
        return lambda: t8._fp8_codes_mm(xq, sx, w["f8"]["weight"], w["f8"]["weight_scale"], False, None, x.dtype,
                                        config=cfg, path="triton")
    return lambda: t8.linear_fp8_cuda(x, w["f8"]["weight"], w["f8"]["weight_scale"], None, None, config=cfg, path=path)


def run_decode(args, meta: dict) -> None:
    """Per-layer time (sum over the four shapes) of each decode candidate at the --decode-ms sizes."""
    rows = []

    def dump():
        if args.out:
            args.out.write_text(dumps(dict(meta=meta, per_layer_us=per_layer_us(rows), rows=rows)))

    shapes = {name: {**SHAPES, **EXTRA_SHAPES}[name] for name in args.shapes.split(",")}
    wts = {name: weights(*shape) for name, shape in shapes.items()}
    for m in (int(v) for v in args.decode_ms.split(",")):
        cands = decode_candidates(m)
        for name, (k, _) in shapes.items():
            x = torch.randn(m, k, device="cuda").to(DTYPE)
            w = wts[name]
            bf16_us = try_us(decode_call("bf16", x, w, None, None))
            rows.append(dict(m=m, shape=name, op="bf16", label="cublas", us=bf16_us))
            for op, lst in cands.items():
                if op not in args.decode_ops.split(","):
                    continue
                for label, cfg, path in lst:
                    if args.decode_labels and not any(label.startswith(p) for p in args.decode_labels.split(",")):
                        continue
                    us = try_us(decode_call(op, x, w, cfg, path))
                    rows.append(dict(m=m, shape=name, op=op, label=label, config=str(cfg), path=path, us=us))
            print(f"decode M={m} {name} done", flush=True)
            dump()
    print(f"\nper-layer GEMM time (qkv + o + gate_up + down), us, {meta['device']}")
    for mk, ops in per_layer_us(rows).items():
        for op, labels in ops.items():
            for lab, v in labels.items():
                print(f"  {mk:<5} {op:<6} {v if v is None else round(v, 1):>8}  {lab}")


def per_layer_us(rows: list[dict]) -> dict:
    """{"M=1": {op: {label: us per layer}}}: each candidate's sum over the shapes (None if one failed), fastest
    first."""
    sums: dict[tuple, float | None] = {}
    for r in rows:
        key = (r["m"], r["op"], r["label"])
        prev = sums.get(key, 0.0)
        sums[key] = None if prev is None or r["us"] is None else prev + r["us"]
    out: dict = {}
    for (m, op, lab), v in sorted(sums.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[1] is None, kv[1] or 0.0)):
        out.setdefault(f"M={m}", {}).setdefault(op, {})[lab] = None if v is None else round(v, 1)
    return out


def dumps(obj: dict) -> str:
    """JSON with every list of records written one record per line, so a results file reads as a table."""
    parts = []
    for key, val in obj.items():
        if isinstance(val, list) and val and isinstance(val[0], dict):
            body = "[\n" + ",\n".join("  " + json.dumps(v) for v in val) + "\n ]"
        else:
            body = json.dumps(val, indent=1).replace("\n", "\n ")
        parts.append(f" {json.dumps(key)}: {body}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def int8_sweep_configs(m: int) -> list[tgm.GemmConfig]:
    if m <= 16:
        return [tgm.GemmConfig(16, bn, bk, num_warps=4, num_stages=st) for bn, bk, st in (
            (64, 256, 4), (128, 256, 3), (64, 128, 4), (32, 256, 4), (64, 512, 3))]
    return [tgm.GemmConfig(bm, bn, bk, num_warps=w, num_stages=st) for bm, bn, bk, w, st in (
        (128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (128, 128, 64, 4, 4), (256, 128, 128, 8, 3),
        (128, 128, 128, 4, 4), (64, 128, 128, 4, 4))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--sweep", action="store_true", help="also time other wna16 configurations")
    ap.add_argument("--sweep-budget", type=float, default=150.0, help="seconds the sweep may take")
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help="comma-separated subset of " + ",".join({**SHAPES, **EXTRA_SHAPES}))
    ap.add_argument("--decode", action="store_true",
                    help="only the decode candidates (GEMVs, serial split-K, FP8 on codes), per layer")
    ap.add_argument("--decode-ms", default="1,4,16", help="the M values of --decode")
    ap.add_argument("--decode-ops", default="w4a16,fp8", help="the ops of --decode (w4a16, fp8, int8)")
    ap.add_argument("--decode-labels", default="", help="only candidates whose label starts with one of these")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"{dev}: copy {bw / 1e9:.0f} GB/s (read+write); torch {torch.__version__}, triton {triton.__version__}",
          flush=True)
    meta = dict(device=dev, torch=torch.__version__, triton=triton.__version__, dtype=str(DTYPE), group_size=GROUP,
                copy_gb_s=bw / 1e9, sms=torch.cuda.get_device_properties(0).multi_processor_count,
                timing="median of 40 CUDA-graph replays (events), L2 emptied by a 256 MiB read before each")
    meta["floor_us"] = graph_us(lambda: torch.empty(1, device="cuda").add_(1))  # one tiny kernel, same method
    if args.decode:
        return run_decode(args, meta)
    rows, sweep = [], []

    def dump():
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(dumps(dict(meta=meta, rows=rows, sweep=sweep)))

    sweep_deadline = time.monotonic() + args.sweep_budget
    for name in args.shapes.split(","):
        k, n = {**SHAPES, **EXTRA_SHAPES}[name]
        wts = weights(k, n)
        for m in MS:
            x = torch.randn(m, k, device="cuda").to(DTYPE)
            r = measure(name, x, n, wts)
            rows.append(r)
            print(line(r), flush=True)
            if args.sweep:
                run_sweep(name, x, wts, sweep, sweep_deadline)
            dump()
        wts.clear()
        torch.cuda.empty_cache()
    meta["targets"] = targets(rows)
    meta["fp8_triton_max_m"], meta["fp8_triton_path"] = t8.FP8_TRITON_MAX_M, t8.FP8_TRITON_PATH
    dump()
    if args.out:
        print(args.out.read_text())
    print_table(dev, bw, rows, meta["targets"])


def weights(k: int, n: int) -> dict:
    w = (torch.randn(n, k, device="cuda") * 0.02).to(DTYPE)
    return dict(bf16=w, w4=wna16_weights(k, n, 4), w8=wna16_weights(k, n, 8), f8=fp8_weight(w, per_channel=True),
                i8=int8_weight(w))


def measure(name: str, x: torch.Tensor, n: int, wts: dict) -> dict:
    m, k = x.shape
    w, w4, w8, f8, i8 = wts["bf16"], wts["w4"], wts["w8"], wts["f8"], wts["i8"]
    xq8, sx8 = taq.quantize_rows(x, None, torch.float8_e4m3fn)
    xqi, _ = taq.quantize_rows(x, None, torch.int8)
    sb = f8["weight_scale"].reshape(1, n)
    fp8_b = k * n + 4 * n
    r = dict(shape=name, m=m, k=k, n=n, flop=2 * m * n * k,
             weight_bytes=dict(bf16=2 * k * n, w4a16=w4[3], w8a16=w8[3], fp8=fp8_b, int8=fp8_b))
    r["bf16_us"] = try_us(lambda: torch.mm(x, w.t()))
    if m == 1:
        r["bf16_dobench_us"] = triton.testing.do_bench(lambda: torch.mm(x, w.t()), return_mode="median") * 1e3
        r["w4a16_dobench_us"] = triton.testing.do_bench(
            lambda: tw.linear_wna16_cuda(x, *w4[:3], None, None, 4, GROUP), return_mode="median") * 1e3
    r["w4a16_us"] = try_us(lambda: tw.linear_wna16_cuda(x, *w4[:3], None, None, 4, GROUP))
    r["w4a16_config"] = str(tw.wna16_config(m, n, k, 4))
    if m <= 16:  # the magic-number unpacker (not the default until timed here)
        cfg_magic = dataclasses.replace(tw.wna16_config(m, n, k, 4), magic=True)
        r["w4a16_magic_us"] = try_us(lambda: tw.linear_wna16_cuda(x, *w4[:3], None, None, 4, GROUP, config=cfg_magic))
    r["w8a16_us"] = try_us(lambda: tw.linear_wna16_cuda(x, *w8[:3], None, None, 8, GROUP))
    r["w8a16_config"] = str(tw.wna16_config(m, n, k, 8))
    r["fp8_us"] = try_us(lambda: t8.linear_fp8_cuda(x, f8["weight"], f8["weight_scale"], None, None))
    r["fp8_path"] = "scaled_mm" if t8.FP8_TRITON_MAX_M is None or m > t8.FP8_TRITON_MAX_M else t8.FP8_TRITON_PATH
    if m <= 64:  # the decode-sized Triton paths against the op through _scaled_mm (activation quant included)
        for path in ("triton", "triton_upcast", "scaled_mm"):
            r[f"fp8_{path}_us"] = try_us(lambda path=path: t8.linear_fp8_cuda(
                x, f8["weight"], f8["weight_scale"], None, None, path=path))
        for cfg in FP8_SWEEP:
            r.setdefault("fp8_triton_sweep", {})[str(cfg)] = try_us(lambda cfg=cfg: t8.linear_fp8_cuda(
                x, f8["weight"], f8["weight_scale"], None, None, config=cfg, path="triton"))
    r["fp8_act_quant_us"] = try_us(lambda: taq.quantize_rows(x, None, torch.float8_e4m3fn))
    # linear_w8a8: the op's GEMM on codes a fused norm/SiLU made (fuse_act_quant: qkv, gate_up and down)
    r["fp8_codes_us"] = try_us(lambda: t8.linear_w8a8_cuda(xq8, sx8, f8["weight"], f8["weight_scale"], None, DTYPE))
    r["scaled_mm_us"] = try_us(lambda: torch._scaled_mm(xq8, f8["weight"].t(), scale_a=sx8, scale_b=sb,
                                                        out_dtype=DTYPE))
    r["int8_us"] = try_us(lambda: t8.linear_int8_cuda(x, i8["weight"], i8["weight_scale"], None, None,
                                                      use_int_mm=False))
    r["int8_config"] = str(t8.int8_config(m, n, k))
    if m > 16:
        r["int8_intmm_us"] = try_us(lambda: t8.linear_int8_cuda(x, i8["weight"], i8["weight_scale"], None, None,
                                                                use_int_mm=True))
        r["int_mm_us"] = try_us(lambda: torch._int_mm(xqi, i8["weight"].t()))
    if m >= 1024:
        cfg = tgm.GemmConfig(128, 128, 64, dequant_mm=True)
        for bits, ww in ((4, w4), (8, w8)):
            r[f"w{bits}a16_dequant_mm_us"] = try_us(
                lambda ww=ww, bits=bits: tw.linear_wna16_cuda(x, *ww[:3], None, None, bits, GROUP, config=cfg))
    derive(r)
    return r


def run_sweep(name: str, x: torch.Tensor, wts: dict, sweep: list, deadline: float) -> None:
    m = x.shape[0]
    w4, i8 = wts["w4"], wts["i8"]
    jobs = [("w4a16", cfg, lambda cfg=cfg: tw.linear_wna16_cuda(x, *w4[:3], None, None, 4, GROUP, config=cfg))
            for cfg in sweep_configs(m)]
    jobs += [("int8", cfg, lambda cfg=cfg: t8.linear_int8_cuda(x, i8["weight"], i8["weight_scale"], None, None,
                                                               config=cfg, use_int_mm=False))
             for cfg in int8_sweep_configs(m)]
    for op, cfg, fn in jobs:
        if time.monotonic() > deadline:
            return
        us = try_us(fn)
        sweep.append(dict(shape=name, m=m, op=op, config=str(cfg), us=us))
        short = str(cfg).replace("GemmConfig", "").replace("block_", "").replace("num_", "")
        print(f"    sweep {op} {name} M={m} {short}: {us if us is None else round(us, 2)} us", flush=True)


def derive(r: dict) -> None:
    base = r.get("bf16_us")
    for key in ("bf16", "w4a16", "w8a16", "fp8", "int8"):
        us = r.get(f"{key}_us")
        if us is None:
            continue
        if base:
            r[f"{key}_speedup"] = base / us
        r[f"{key}_tb_s"] = r["weight_bytes"][key] / us / 1e6
        r[f"{key}_tflop_s"] = r["flop"] / us / 1e6
    if r.get("fp8_us") and r.get("scaled_mm_us"):
        r["fp8_vs_scaled_mm"] = r["fp8_us"] / r["scaled_mm_us"]
    if r.get("fp8_codes_us") and r.get("scaled_mm_us"):
        r["fp8_codes_vs_scaled_mm"] = r["fp8_codes_us"] / r["scaled_mm_us"]
    if r.get("int8_us") and r.get("int_mm_us"):
        r["int8_vs_int_mm"] = r["int8_us"] / r["int_mm_us"]


def targets(rows: list[dict]) -> dict:
    """The issue's targets: W4A16 >= 3x bf16 at M=1 and >= 2x at M=16; FP8 within 10% of _scaled_mm at M=4096."""
    out = {}
    for r in rows:
        tag = f"{r['shape']}"
        if r["m"] == 1 and r.get("w4a16_speedup"):
            out[f"w4a16_m1_{tag}"] = dict(speedup=r["w4a16_speedup"], target=3.0, met=r["w4a16_speedup"] >= 3.0)
        if r["m"] == 16 and r.get("w4a16_speedup"):
            out[f"w4a16_m16_{tag}"] = dict(speedup=r["w4a16_speedup"], target=2.0, met=r["w4a16_speedup"] >= 2.0)
        if r["m"] == 1 and r.get("fp8_speedup"):  # the engine's 1.7x bs1 target needs about 1.8-1.9x here
            out[f"fp8_m1_{tag}"] = dict(speedup=r["fp8_speedup"], target=1.7, met=r["fp8_speedup"] >= 1.7)
        if r["m"] == 4096 and r.get("fp8_vs_scaled_mm"):
            out[f"fp8_m4096_{tag}"] = dict(time_ratio=r["fp8_vs_scaled_mm"], target=1.1,
                                           met=r["fp8_vs_scaled_mm"] <= 1.1)
        if r["m"] == 4096 and r.get("fp8_codes_vs_scaled_mm"):  # with the quantization fused upstream
            out[f"fp8_codes_m4096_{tag}"] = dict(time_ratio=r["fp8_codes_vs_scaled_mm"], target=1.1,
                                                 met=r["fp8_codes_vs_scaled_mm"] <= 1.1)
    return out


def _f(v, spec=".1f", width=8) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}{spec}}"


def line(r: dict) -> str:
    return (f"{r['shape']:<8}{r['m']:>5}" + _f(r.get("bf16_us")) + _f(r.get("w4a16_us"))
            + _f(r.get("w4a16_speedup"), ".2f", 6) + _f(r.get("w8a16_us")) + _f(r.get("w8a16_speedup"), ".2f", 6)
            + _f(r.get("fp8_us")) + _f(r.get("scaled_mm_us")) + _f(r.get("int8_us")) + _f(r.get("int8_intmm_us"))
            + _f(r.get("int_mm_us")) + _f(r.get("w4a16_dequant_mm_us")))


def print_table(dev: str, bw: float, rows: list[dict], tg: dict) -> None:
    print(f"\n{dev}, bf16 activations, us per call (CUDA graph, cold L2); copy bandwidth {bw / 1e9:.0f} GB/s")
    head = (f"{'shape':<8}{'M':>5}{'bf16':>8}{'w4a16':>8}{'x':>6}{'w8a16':>8}{'x':>6}{'fp8':>8}{'smm':>8}"
            f"{'int8':>8}{'i8_imm':>8}{'int_mm':>8}{'w4_deq':>8}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(line(r))
    print("\nM=1 weight streaming, TB/s:  shape   bf16   w4a16  w8a16  fp8    int8")
    for r in rows:
        if r["m"] == 1:
            print(f"{'':28}{r['shape']:<8}" + "".join(_f(r.get(f"{c}_tb_s"), ".2f", 7)
                                               for c in ("bf16", "w4a16", "w8a16", "fp8", "int8")))
    print("M=4096 TFLOP/s:             shape   bf16   w4a16  w8a16  fp8    int8   smm    int_mm")
    for r in rows:
        if r["m"] == 4096:
            extra = [r["flop"] / r[c] / 1e6 if r.get(c) else None for c in ("scaled_mm_us", "int_mm_us")]
            print(f"{'':28}{r['shape']:<8}" + "".join(_f(r.get(f"{c}_tflop_s"), ".0f", 7)
                                               for c in ("bf16", "w4a16", "w8a16", "fp8", "int8"))
                  + "".join(_f(v, ".0f", 7) for v in extra))
    print("targets:")
    for key, v in tg.items():
        print(f"  {key}: {json.dumps({a: round(b, 3) if isinstance(b, float) else b for a, b in v.items()})}")


if __name__ == "__main__":
    main()
