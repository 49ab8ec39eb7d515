"""Does prefetching weights into L2 during attention make the next W4A16 GEMMs faster? (runtime/ops/l2_prefetch.py)

One CUDA graph per variant, L2 emptied before each replay (bench/quant_gemm.graph_us), at one row, on 8B shapes:
a spin of ``--spin-us`` standing in for a layer's attention, then the o projection (4096 x 4096) and gate_up
(28672 x 4096) through triton_quant.linear_wna16_mma_cuda (the Gluon kernel on an H100). The prefetch variants
first launch 64 programs of bulk L2 prefetches (the RoPE kernel's prefetch programs,
triton_rope_cache._l2_prefetch_segment) of o's tensors and the first MB of gate_up's codes, then the same.
Also the prefetch alone and the GEMMs alone. Prints a table, writes JSON with --out.

    python bench/l2_prefetch_probe.py --out $OUT/l2pf.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bench.quant_gemm import graph_us  # noqa: E402
from runtime.ops import l2_prefetch  # noqa: E402
from runtime.ops import triton_quant as tq  # noqa: E402
from runtime.ops.quant_linear import pack_mma_zeros  # noqa: E402
from runtime.ops.triton_rope_cache import _l2_prefetch  # noqa: E402


@triton.jit
def _prefetch_kernel(a0, n0, a1, n1, a2, n2, a3, n3, a4, n4, a5, n5, PF: tl.constexpr, PIECE: tl.constexpr,
                     LANES: tl.constexpr):
    _l2_prefetch(a0, n0, a1, n1, a2, n2, a3, n3, a4, n4, a5, n5, tl.program_id(0).to(tl.int64), PF, PIECE, LANES)


def prefetch(segs, programs: int) -> None:
    _prefetch_kernel[(programs,)](**l2_prefetch.kernel_args(segs), PF=programs, PIECE=l2_prefetch.PIECE, LANES=128,
                                  num_warps=4)


def weight(n: int, k: int, dev):
    qmma = torch.randint(-32768, 32767, (n // 64, k // 128, 2048), dtype=torch.int16, device=dev)
    scales = (torch.rand(k // 128, n, device=dev) * 0.01 + 0.001).to(torch.bfloat16)
    zw = pack_mma_zeros(scales, torch.randint(0, 16, (k // 128, n), dtype=torch.uint8, device=dev))
    return qmma, scales, zw


def spin_cycles_per_us() -> float:
    """torch.cuda._sleep's cycles per microsecond on this GPU (timed over a 10 ms spin)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(10**6)
    start.record()
    torch.cuda._sleep(2 * 10**7)
    end.record()
    torch.cuda.synchronize()
    return 2 * 10**7 / (start.elapsed_time(end) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spin-us", type=float, default=10.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    dev = torch.device("cuda")
    o, gu = weight(4096, 4096, dev), weight(28672, 4096, dev)
    x = torch.randn(1, 4096, device=dev, dtype=torch.bfloat16)
    cycles = int(args.spin_us * spin_cycles_per_us())

    def gemms():
        y = tq.linear_wna16_mma_cuda(x, *o, None, None, 128)
        tq.linear_wna16_mma_cuda(y, *gu, None, None, 128)

    want = torch.cat([t.flatten().view(torch.uint8) for t in (*o, gu[0])]).numel()
    res = {"device": torch.cuda.get_device_name(), "spin_us": args.spin_us, "rows": []}

    def row(label, fn):
        us = graph_us(fn)
        res["rows"].append({"label": label, "us": round(us, 2)})
        print(f"{us:8.2f} us  {label}", flush=True)

    row("spin", lambda: torch.cuda._sleep(cycles))
    row("gemms (o, gate_up)", gemms)
    row("spin + gemms", lambda: (torch.cuda._sleep(cycles), gemms()))
    for mb in (8, 16, 24, 40):
        segs = l2_prefetch.segments([*o, gu[0]], mb * 2**20)
        for programs in (32, 64, 132):
            row(f"prefetch {mb} MB alone, {programs} programs", lambda s=segs, p=programs: prefetch(s, p))
            row(f"prefetch {mb} MB + spin + gemms, {programs} programs",
                lambda s=segs, p=programs: (prefetch(s, p), torch.cuda._sleep(cycles), gemms()))
    res["bytes_o_and_gate_up_codes"] = want
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
