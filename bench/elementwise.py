"""Benchmark of the elementwise ops' CUDA path (Triton, runtime/ops/triton_elementwise.py) against their
plain-PyTorch references, at Llama-3.1-8B shapes (hidden 4096, intermediate 14336, 32/8 heads, d 128), bf16,
T = 1, 64 and 4096 tokens.

    python bench/elementwise.py --out bench/results/elementwise-h100.json [--no-sweep]

Bytes moved (each input read once, each output written once):
    rms_norm            2*T*H*2 + H*2
    fused_add_rms_norm  4*T*H*2 + H*2                  (reads x, residual; writes normed, sum)
    silu_and_mul        3*T*I*2                        (reads gate|up [T, 2I]; writes [T, I])
    rotary_embedding    2*T*(Hq+Hkv)*D*2 + T*D*4 + T*8 (q, k in and out; cos|sin fp32 row; position)
q and k are column slices of a fused QKV output [T, (32+2*8)*128], as the graph passes them.
Three times per op, microseconds per call:
    cold   GPU time: median of triton.testing.do_bench over replays of a CUDA graph holding one call (do_bench
           flushes the L2 before each replay; the graph keeps host launch cost out). GB/s = bytes / cold,
           against the device-to-device copy bandwidth measured here (1 GiB, bytes read + written).
    warm   one call's share of a CUDA graph of 20 back-to-back calls (small inputs then stay in the L2, as
           between the layers of a decode step).
    eager  wall time per call of 200 plain calls in a loop, then a sync: max(host cost, GPU time). At small
           T this is the host cost of dispatch + launch, which CUDA graphs remove from decode steps.
The fast path is the op (torch.ops.spanda.*, dispatching to Triton on CUDA); "direct" is the Triton launcher
called without the dispatcher (into preallocated outputs); the reference is the *_ref function.
Sweep: num_warps / block variants of each kernel at T = 4096 (cold), to check the defaults. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

import runtime.ops  # noqa: E402,F401
from runtime.ops import triton_elementwise as te  # noqa: E402
from runtime.ops.activation import silu_and_mul_ref  # noqa: E402
from runtime.ops.norm import fused_add_rms_norm_ref, rms_norm_ref  # noqa: E402
from runtime.ops.rotary import rotary_embedding_ref  # noqa: E402

H, INTER, HQ, HKV, D, DTYPE, EPS = 4096, 14336, 32, 8, 128, torch.bfloat16, 1e-5
TOKENS = (1, 64, 4096)
GRAPH_CALLS = 20
spanda = torch.ops.spanda


def bench_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def graph_us(fn, calls: int) -> float:
    """One call's share of a CUDA graph replaying `calls` calls back to back (L2 flushed before each replay)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return bench_us(graph.replay) / calls


def eager_us(fn, calls: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / calls


def copy_bandwidth() -> float:
    x = torch.randn(2**29, device="cuda", dtype=DTYPE)
    y = torch.empty_like(x)
    return 2 * x.numel() * 2 / (bench_us(lambda: y.copy_(x)) * 1e-6)


def cases(t: int):
    """(op, bytes, fast fn, direct fn, reference fn, {variant name: fast fn}) for T = t tokens."""
    r = lambda *s: torch.randn(*s, device="cuda").to(DTYPE)  # noqa: E731
    x, res, w = r(t, H), r(t, H), r(H)
    gu = r(t, 2 * INTER)
    qkv = r(t, (HQ + 2 * HKV) * D)
    q, k = qkv[:, :HQ * D], qkv[:, HQ * D:(HQ + HKV) * D]
    pos = torch.randint(0, 8192, (t,), device="cuda")
    ang = torch.rand(8192, D // 2, device="cuda")
    cache = torch.cat((ang.cos(), ang.sin()), -1)
    out_n, out_s, out_a, out_q, out_k = (r(*s) for s in ((t, H), (t, H), (t, INTER), (t, HQ * D), (t, HKV * D)))
    norm_v = {f"warps={nw}": (lambda nw=nw: te.rms_norm_cuda(x, w, EPS, nw, out=out_n)) for nw in (2, 4, 8, 16)}
    fadd_v = {f"warps={nw}": (lambda nw=nw: te.fused_add_rms_norm_cuda(x, res, w, EPS, nw, out=(out_n, out_s)))
              for nw in (2, 4, 8, 16)}
    silu_v = {f"block={b},warps={nw}": (lambda b=b, nw=nw: te.silu_and_mul_cuda(gu, b, nw, out=out_a))
              for b, nw in ((512, 2), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8))}
    rope_v = {f"warps={nw}": (lambda nw=nw: te.rotary_embedding_cuda(pos, q, k, cache, D, nw, out=(out_q, out_k)))
              for nw in (1, 2, 4, 8)}
    return [
        ("rms_norm", 2 * t * H * 2 + H * 2, lambda: spanda.rms_norm(x, w, EPS),
         lambda: te.rms_norm_cuda(x, w, EPS, out=out_n), lambda: rms_norm_ref(x, w, EPS), norm_v),
        ("fused_add_rms_norm", 4 * t * H * 2 + H * 2, lambda: spanda.fused_add_rms_norm(x, res, w, EPS),
         lambda: te.fused_add_rms_norm_cuda(x, res, w, EPS, out=(out_n, out_s)),
         lambda: fused_add_rms_norm_ref(x, res, w, EPS), fadd_v),
        ("silu_and_mul", 3 * t * INTER * 2, lambda: spanda.silu_and_mul(gu),
         lambda: te.silu_and_mul_cuda(gu, out=out_a), lambda: silu_and_mul_ref(gu), silu_v),
        ("rotary_embedding", 2 * t * (HQ + HKV) * D * 2 + t * D * 4 + t * 8,
         lambda: spanda.rotary_embedding(pos, q, k, cache, D),
         lambda: te.rotary_embedding_cuda(pos, q, k, cache, D, out=(out_q, out_k)),
         lambda: rotary_embedding_ref(pos, q, k, cache, D), rope_v),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--no-sweep", action="store_true", help="skip the kernel-variant sweep at T=4096")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"{dev}: copy {bw / 1e9:.0f} GB/s (read+write); torch {torch.__version__}, triton {triton.__version__}")
    rows, sweep = [], []
    for t in TOKENS:
        for op, nbytes, fast, direct, ref, variants in cases(t):
            f_us, r_us = graph_us(fast, 1), graph_us(ref, 1)
            row = dict(op=op, tokens=t, bytes=nbytes, fast_us=f_us, ref_us=r_us, fast_gb_s=nbytes / f_us / 1e3,
                       ref_gb_s=nbytes / r_us / 1e3, fast_frac_copy_bw=nbytes / f_us / 1e3 / (bw / 1e9),
                       speedup=r_us / f_us, fast_warm_us=graph_us(fast, GRAPH_CALLS),
                       ref_warm_us=graph_us(ref, GRAPH_CALLS), fast_eager_us=eager_us(fast),
                       direct_eager_us=eager_us(direct), ref_eager_us=eager_us(ref))
            rows.append(row)
            if t == TOKENS[-1] and not args.no_sweep:
                for name, fn in variants.items():
                    us = graph_us(fn, 1)
                    sweep.append(dict(op=op, tokens=t, variant=name, us=us, gb_s=nbytes / us / 1e3))
                    print(f"  sweep {op} T={t} {name}: {us:.1f} us, {nbytes / us / 1e3:.0f} GB/s")
            torch.cuda.empty_cache()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(device=dev, torch=torch.__version__, triton=triton.__version__, dtype=str(DTYPE),
                    shapes=dict(hidden=H, intermediate=INTER, heads=HQ, kv_heads=HKV, head_dim=D),
                    copy_gb_s=bw / 1e9, graph_calls=GRAPH_CALLS)
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows, sweep=sweep), indent=1) + "\n")
    print(f"\n{dev}, bf16, Llama-8B shapes, us per call; GB/s = bytes / cold; copy bandwidth {bw / 1e9:.0f} GB/s")
    head = (f"{'op':<19}{'T':>5}{'MB':>8}{'cold':>7}{'GB/s':>6}{'%copy':>6}{'ref':>7}{'GB/s':>6}{'x':>6}"
            f"{'warm':>7}{'ref':>7}{'eager':>7}{'direct':>7}{'ref':>7}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['op']:<19}{r['tokens']:>5}{r['bytes'] / 1e6:>8.3f}{r['fast_us']:>7.1f}{r['fast_gb_s']:>6.0f}"
              f"{100 * r['fast_frac_copy_bw']:>5.0f}%{r['ref_us']:>7.1f}{r['ref_gb_s']:>6.0f}{r['speedup']:>6.1f}"
              f"{r['fast_warm_us']:>7.2f}{r['ref_warm_us']:>7.2f}{r['fast_eager_us']:>7.1f}"
              f"{r['direct_eager_us']:>7.1f}{r['ref_eager_us']:>7.1f}")


if __name__ == "__main__":
    main()
