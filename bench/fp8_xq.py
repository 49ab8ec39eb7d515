"""The FP8 decode linears of one 8B layer with their activation quantization inside the GEMM (triton_w8a8's
_fp8_xq_kernel: linear_fp8 and silu_and_mul_linear_fp8 in one launch) against the launches they replace.

    python bench/fp8_xq.py --out bench/results/fp8-xq-h200.json

o_proj: linear_fp8(x) at M rows, x [M, 4096] bf16 -> 4096: ``xq`` one launch; ``split`` quantize_rows, then
the swapped TMA GEMM on the codes (the engine's path before). down_proj: silu_and_mul_linear_fp8(gu),
gu [M, 2 x 14336] -> 4096: ``xq`` one launch; ``split`` silu_and_mul_quant (two launches at these sizes), then
the GEMM on the codes. ``codes`` is the GEMM alone on codes made beforehand (the floor of the split path).
Each variant is timed as a chain: one CUDA graph of 32 calls (a model's layers) on 32 different weights (so
they stream from HBM, 0.5 / 1.8 GB in all), programmatic dependent launch on every launch (as the engine's
small decode graphs run), replayed 50 times; microseconds per call = replay time / 32. Before timing, each
variant's output is compared with linear_fp8's reference and with the split path (the XQ kernel makes the
same codes and sums in the same order: equal bits expected). XQ variants: warps, the amax pass's chunk.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import runtime.ops  # noqa: E402,F401
from compiler.quantize.layout import fp8_weight  # noqa: E402
from runtime.ops import pdl  # noqa: E402
from runtime.ops import triton_act_quant as taq  # noqa: E402
from runtime.ops import triton_elementwise as te  # noqa: E402
from runtime.ops import triton_w8a8 as t8  # noqa: E402
from runtime.ops.activation import silu_and_mul_ref  # noqa: E402
from runtime.ops.quant_linear import linear_fp8_ref  # noqa: E402

LAYERS = 32
SHAPES = {"o": (4096, 4096), "down": (14336, 4096)}  # K (the GEMM's), N


def chain_us(fn, reps: int = 50) -> float:
    """Per-call GPU time of ``fn(i)`` for i in range(LAYERS) captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(LAYERS):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(LAYERS):
            fn(i)
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) * 1e3 / reps / LAYERS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,2,4")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    res: dict = {"device": torch.cuda.get_device_name(), "layers": LAYERS, "pdl": True, "rows": []}
    pdl.ENABLED = True
    for shape, (k, n) in SHAPES.items():
        silu = shape == "down"
        wts = []
        for _ in range(LAYERS):
            w = fp8_weight(torch.randn(n, k, device=dev) * 0.02, per_channel=True)
            wts.append((w["weight"].contiguous(), w["weight_scale"]))
        cfg = t8.fp8_config(1, n, k, dev)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, 2 * k if silu else k, device=dev).bfloat16()
            w0, s0 = wts[0]
            ref = linear_fp8_ref(silu_and_mul_ref(x) if silu else x, w0, s0, None, None)

            def split(i, x=x, wts=wts, silu=silu, cfg=cfg):
                w, s = wts[i]
                if silu:
                    q, sx = te.silu_and_mul_quant_cuda(x, None, False)
                else:
                    q, sx = taq.quantize_rows(x, None, torch.float8_e4m3fn)
                return t8._fp8_codes_mm(q, sx, w, s, False, None, x.dtype, config=cfg, path="triton")

            q0, sx0 = (te.silu_and_mul_quant_cuda(x, None, False) if silu
                       else taq.quantize_rows(x, None, torch.float8_e4m3fn))

            def codes(i, q0=q0, sx0=sx0, x=x, wts=wts, cfg=cfg):
                w, s = wts[i]
                return t8._fp8_codes_mm(q0, sx0, w, s, False, None, x.dtype, config=cfg, path="triton")

            variants = {"split": (split, None), "codes": (codes, None)}
            for warps in (4, 8):
                for chunk in (2048, 4096, 8192):
                    xcfg = dataclasses.replace(cfg, num_warps=warps)

                    def xq(i, xcfg=xcfg, x=x, wts=wts, silu=silu):
                        w, s = wts[i]
                        return t8.fp8_xq(x, w, s, None, None, silu=silu, config=xcfg)

                    variants[f"xq w{warps} c{chunk}"] = (xq, chunk)
            want = split(0)
            for name, (fn, chunk) in variants.items():
                saved = t8.FP8_XQ_CHUNK
                t8.FP8_XQ_CHUNK = chunk or saved
                try:
                    got = fn(0)
                    torch.cuda.synchronize()
                    row = {"shape": shape, "m": m, "variant": name, "config": str(cfg),
                           "equal_to_split": bool(torch.equal(got, want)),
                           "max_rel_err_vs_ref": round(((got.float() - ref.float()).abs().max()
                                                        / ref.float().abs().max()).item(), 5),
                           "us": round(chain_us(fn), 2)}
                except Exception as e:  # noqa: BLE001  (a benchmark never aborts on one variant)
                    row = {"shape": shape, "m": m, "variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                finally:
                    t8.FP8_XQ_CHUNK = saved
                print(json.dumps(row), flush=True)
                res["rows"].append(row)
                if args.out:
                    Path(args.out).write_text(json.dumps(res, indent=1))
        del wts
        torch.cuda.empty_cache()
    pdl.ENABLED = False
    print(f"{'shape':6} {'m':>2} {'variant':16} {'us':>7}  equal")
    for r in res["rows"]:
        print(f"{r['shape']:6} {r['m']:>2} {r['variant']:16} {r.get('us', float('nan')):7.2f}  "
              f"{r.get('equal_to_split', r.get('error', ''))}")


if __name__ == "__main__":
    main()
