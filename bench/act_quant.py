"""The W8A8 activation-quantization producers (runtime/ops/triton_elementwise.py) at Llama-3.1-8B widths against
their bf16 counterparts, at decode and prefill row counts, on the GPU.

    python bench/act_quant.py --out bench/results/act-quant-producers-h200.json

Rows (microseconds per call: bench/quant_gemm.py's graph_us, a CUDA graph of one call with the L2 emptied before
each replay; about 4.4 us of each figure is that timer's floor):
    silu_mul        bf16 silu_and_mul of a [M, 2 x 14336] gate | up
    silu_mul_quant  silu_and_mul_quant to FP8 codes: one program per whole row (``split_rows=0``; num_warps
                    default / 32), the row split over programs of 512 / 1024 / 2048 / 4096 elements (two
                    launches; checked bit-equal to the whole-row codes), and silu_and_mul + quantize_rows
    add_norm        bf16 fused_add_rms_norm, 4096 wide;  add_norm_quant: the same quantized, 8 / 16 / 32 warps
    quant_rows      quantize_rows of a [M, 4096] activation (o_proj's input)
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtime.ops  # noqa: E402,F401
from bench.quant_gemm import graph_us  # noqa: E402
from runtime.ops import triton_act_quant as taq  # noqa: E402
from runtime.ops import triton_elementwise as te  # noqa: E402

FP8 = torch.float8_e4m3fn


def one_m(m: int, rec) -> None:
    gu = torch.randn(m, 2 * 14336, device="cuda", dtype=torch.bfloat16) * 3
    x, r = (torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5
    whole = te.silu_and_mul_quant_cuda(gu, None, False, split_rows=0)
    rec(m, "silu_mul", "bf16 silu_and_mul", graph_us(lambda: te.silu_and_mul_cuda(gu)))
    for nw in (None, 32):
        rec(m, "silu_mul_quant", f"whole row nw{nw}",
            graph_us(lambda nw=nw: te.silu_and_mul_quant_cuda(gu, None, False, num_warps=nw, split_rows=0)))
    for chunk in (512, 1024, 2048, 4096):
        got = te.silu_and_mul_quant_cuda(gu, None, False, split_rows=m, chunk=chunk)
        assert torch.equal(got[0].view(torch.uint8), whole[0].view(torch.uint8)) and torch.equal(got[1], whole[1])
        rec(m, "silu_mul_quant", f"split chunk{chunk}",
            graph_us(lambda chunk=chunk: te.silu_and_mul_quant_cuda(gu, None, False, split_rows=m, chunk=chunk)))
    rec(m, "silu_mul_quant", "unfused (silu + quant_rows)",
        graph_us(lambda: taq.quantize_rows(te.silu_and_mul_cuda(gu), None, FP8)))
    rec(m, "add_norm", "bf16 fused_add_rms_norm", graph_us(lambda: te.fused_add_rms_norm_cuda(x, r, w, 1e-5)))
    for nw in (8, 16, 32):
        rec(m, "add_norm_quant", f"nw{nw}",
            graph_us(lambda nw=nw: te._norm_launch(x, r, w, 1e-5, nw, quant=te._quant_out(x, 4096, None, False))))
    rec(m, "quant_rows", "K4096", graph_us(lambda: taq.quantize_rows(x, None, FP8)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []

    def rec(m, op, label, us):
        rows.append({"m": m, "op": op, "label": label, "us": round(us, 2)})
        print(f"M={m:<4} {op:<18} {label:<28} {us:7.2f} us", flush=True)

    for m in (1, 4, 16, 64, 256):
        one_m(m, rec)

    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
