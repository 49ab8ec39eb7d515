"""Two ways to start the FP8 decode GEMMs' weight traffic earlier under programmatic dependent launch
(runtime/ops/pdl.py), on chains of the 8B layer's linears with the short kernel the engine runs before each.

    python bench/pdl_early.py --out bench/results/pdl-early-h200.json

A chain: one CUDA graph of 32 (short kernel, FP8 GEMM on its codes) pairs (a model's layers), each GEMM on its
own random E4M3 weight (streamed from HBM), replayed 50 times; microseconds per pair = replay time / 32. The
short kernel: quantize_rows of the GEMM's input (silu_and_mul_quant for down: two launches), as before o_proj.
Settings: ``nopdl`` ordinary launches; ``pdl`` PDL as the engine's small graphs run it (a short kernel waits,
then lets the next launch); ``early`` the short kernels let the next kernel launch before they wait
(pdl.EARLY: the GEMM's programs become resident while the GEMM before finishes); ``+pfN`` each GEMM program
first asks the L2 for the first N bytes of its weight rows' K range (GemmConfig.l2_prefetch; ``all``: the whole
range), before its PDL wait. Every setting's output is compared with ordinary launches (equal bits expected).
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
from bench.fp8_xq import LAYERS, chain_us  # noqa: E402
from compiler.quantize.layout import fp8_weight  # noqa: E402
from runtime.ops import pdl  # noqa: E402
from runtime.ops import triton_elementwise as te  # noqa: E402
from runtime.ops import triton_quant as tq  # noqa: E402

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}  # K, N
SETTINGS = {"nopdl": (False, False, 0), "pdl": (True, False, 0), "early": (True, True, 0),
            "pdl+pfall": (True, False, 1 << 20), "early+pf1k": (True, True, 1024), "early+pf4k": (True, True, 4096),
            "early+pfall": (True, True, 1 << 20)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,4")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    res: dict = {"device": torch.cuda.get_device_name(), "layers": LAYERS, "rows": []}
    for shape, (k, n) in SHAPES.items():
        silu = shape == "down"
        wts = []
        for _ in range(LAYERS):
            w = fp8_weight(torch.randn(n, k, device=dev) * 0.02, per_channel=True)
            wts.append((w["weight"].contiguous(), w["weight_scale"]))
        base = tq.fp8_config(1, n, k, dev)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, 2 * k if silu else k, device=dev).bfloat16()
            want = None
            for name in args.settings.split(","):
                on, early, pf = SETTINGS[name]
                cfg = dataclasses.replace(base, l2_prefetch=pf)

                def pair(i, x=x, wts=wts, silu=silu, cfg=cfg):
                    w, s = wts[i]
                    if silu:
                        q, sx = te.silu_and_mul_quant_cuda(x, None, False)
                    else:
                        q, sx = tq.quantize_rows(x, None, torch.float8_e4m3fn)
                    return tq._fp8_codes_mm(q, sx, w, s, False, None, x.dtype, config=cfg, path="triton")

                pdl.ENABLED, pdl.EARLY = on, early
                try:
                    got = pair(0)
                    torch.cuda.synchronize()
                    want = got if want is None else want
                    row = {"shape": shape, "m": m, "setting": name, "config": str(cfg),
                           "equal_to_first": bool(torch.equal(got, want)), "us": round(chain_us(pair), 2)}
                except Exception as e:  # noqa: BLE001  (a benchmark never aborts on one variant)
                    row = {"shape": shape, "m": m, "setting": name, "error": f"{type(e).__name__}: {str(e)[-600:]}"}
                finally:
                    pdl.ENABLED, pdl.EARLY = False, False
                print(json.dumps(row), flush=True)
                res["rows"].append(row)
                if args.out:
                    Path(args.out).write_text(json.dumps(res, indent=1))
        del wts
        torch.cuda.empty_cache()
    print(f"{'shape':8} {'m':>2} {'setting':12} {'us':>7}  equal")
    for r in res["rows"]:
        print(f"{r['shape']:8} {r['m']:>2} {r['setting']:12} {r.get('us', float('nan')):7.2f}  "
              f"{r.get('equal_to_first', r.get('error', ''))}")


if __name__ == "__main__":
    main()
