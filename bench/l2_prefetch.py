"""Does prefetching the next GEMM's weights into L2, while the latency-bound kernels between two GEMMs run,
shorten a batch-1 FP8 decode layer? (A negative result: no. Kept to be re-run on other GPUs.)

A CUDA graph of 4 layers, each with its own random E4M3 weights at the 8B shapes: qkv, o, gate_up and down
(spanda's FP8 decode GEMM on codes, M = 1), each GEMM preceded by the small kernels a real layer runs in that
place (stand-ins: 4 before o for RoPE, attention split and merge, o's input quantization; 1 before gate_up and
qkv, a norm; 2 before down, SiLU and its quantization). Modes: plain; inline, a prefetch kernel in the stream
right after each GEMM issuing ``cp.async.bulk.prefetch.L2`` over the whole next weight (or its first 16 MB);
side, the same kernel on a second stream forked after each GEMM and joined before the next. Reports the time
per layer (graph replays, L2 emptied before each) and each GEMM's own time by place (torch.profiler), and each
GEMM twice in a graph replayed back to back without emptying L2 (its weights in L2 where they fit).

    python bench/l2_prefetch.py --out bench/results/l2-prefetch-fp8-h200.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import runtime.ops  # noqa: E402,F401
from bench.quant_gemm import dumps  # noqa: E402
from runtime.ops import triton_act_quant as taq  # noqa: E402
from runtime.ops import triton_w8a8 as t8  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # (N, K)
ORDER = list(SHAPES)
WINDOW = {"o": 4, "gate_up": 1, "down": 2, "qkv": 1}  # small kernels before each GEMM
LAYERS = 4


@triton.jit
def _l2_prefetch_kernel(base, nbytes, CHUNK: tl.constexpr, LANES: tl.constexpr):
    """Each lane asks the L2 for CHUNK bytes from ``base`` (an address) on: fire and forget."""
    pid = tl.program_id(0).to(tl.int64)
    offs = (pid * LANES + tl.arange(0, LANES).to(tl.int64)) * CHUNK
    size = tl.minimum(nbytes - offs, CHUNK).to(tl.int32)
    tl.inline_asm_elementwise(
        asm="{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        constraints="=r,l,r", args=[base + offs, size], dtype=tl.int32, is_pure=False, pack=1)


def prefetch(w: torch.Tensor, nbytes: int | None = None, chunk: int = 16384, lanes: int = 32) -> None:
    total = w.numel() * w.element_size()
    nb = total if nbytes is None else min(nbytes, total)
    _l2_prefetch_kernel[(triton.cdiv(nb, chunk * lanes),)](w.data_ptr(), nb, CHUNK=chunk, LANES=lanes,
                                                           num_warps=max(1, lanes // 32))


class Layers:
    def __init__(self):
        dev = "cuda"
        self.w = [{name: (torch.randint(-100, 100, (n, k), device=dev, dtype=torch.int8).view(torch.float8_e4m3fn),
                          torch.rand(n, 1, device=dev) * 0.01 + 0.001) for name, (n, k) in SHAPES.items()}
                  for _ in range(LAYERS)]
        self.x = {k: taq.quantize_rows(torch.randn(1, k, device=dev, dtype=torch.bfloat16), None, torch.float8_e4m3fn)
                  for k in (4096, 14336)}
        self.small = torch.randn(1, 4096, device=dev, dtype=torch.bfloat16)
        self.side = torch.cuda.Stream()

    def gemm(self, layer: int, name: str):
        w, ws = self.w[layer][name]
        xq, sx = self.x[w.shape[1]]
        return t8._fp8_codes_mm(xq, sx, w, ws, False, None, torch.bfloat16, path="triton")

    def smalls(self, n: int) -> None:
        for _ in range(n):
            self.small.mul_(1.0001)

    def layer(self, li: int, mode: str, cap: int | None, chunk: int) -> None:
        for i, name in enumerate(ORDER):
            after = ORDER[(i + 1) % 4]
            nxt = self.w[(li + (i == 3)) % LAYERS][after][0]
            self.gemm(li, name)
            if mode == "inline":
                prefetch(nxt, cap, chunk=chunk)
            elif mode == "side":
                self.side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self.side):
                    prefetch(nxt, cap, chunk=chunk)
            self.smalls(WINDOW[after])
            if mode == "side":
                torch.cuda.current_stream().wait_stream(self.side)


def graph_of(fn) -> torch.cuda.CUDAGraph:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def replay_us(g: torch.cuda.CUDAGraph, flush: torch.Tensor, sink: torch.Tensor, reps: int = 40) -> float:
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        torch.sum(flush, dim=0, out=sink)
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    return sorted(a.elapsed_time(b) for a, b in ev)[reps // 2] * 1e3


def gemm_us(g: torch.cuda.CUDAGraph, iters: int = 10) -> list[float]:
    """Mean us of each W8A8 GEMM launch of one replay, in launch order (torch.profiler)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            g.replay()
            torch.cuda.synchronize()
    ev = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA and "w8a8" in e.name),
                key=lambda e: e.time_range.start)
    per = len(ev) // iters
    return [round(sum(ev[i * per + j].time_range.elapsed_us() for i in range(iters)) / iters, 2) for j in range(per)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    L = Layers()
    flush, sink = torch.randn(2**26, device="cuda"), torch.empty((), device="cuda")
    res: dict = {"device": torch.cuda.get_device_name(), "rows": []}
    for label, mode, cap, chunk in [("plain", "plain", None, 16384), ("inline", "inline", None, 16384),
                                    ("side", "side", None, 16384), ("side-64k", "side", None, 65536),
                                    ("side-4k", "side", None, 4096), ("side-cap16MB", "side", 16 << 20, 16384),
                                    ("inline-cap16MB", "inline", 16 << 20, 16384), ("plain#2", "plain", None, 16384)]:
        g = graph_of(lambda m=mode, c=cap, ch=chunk: [L.layer(li, m, c, ch) for li in range(LAYERS)])
        us = replay_us(g, flush, sink)
        ks = gemm_us(g)
        row = dict(label=label, us_per_layer=round(us / LAYERS, 2),
                   gemm_us_by_place=[round(sum(ks[j::4]) / LAYERS, 2) for j in range(4)])
        print(row, flush=True)
        res["rows"].append(row)
    for name in ORDER:  # replays back to back: the weights stay in L2 where they fit
        g = graph_of(lambda n=name: (L.gemm(0, n), L.gemm(0, n)))
        res["rows"].append(dict(label=f"{name} twice", gemm_us=gemm_us(g)))
        print(res["rows"][-1], flush=True)
    if args.out:
        Path(args.out).write_text(dumps(res))


if __name__ == "__main__":
    main()
