"""Where decode time goes (batch 1, or --batch N): GPU time of one decode-graph replay vs the engine's whole
step, and the replay's GPU time split by kernel kind against the weight-streaming ceiling.

Builds the random-weight artifact of --shape (bench/engine.py) or takes --artifact, then times (a) the
decode graph's replay alone (the bucket of --batch sequences) with CUDA events, (b) full engine steps with that
many sequences decoding, (c) a cProfile of the host side of those steps, and (d) the kernels of that bucket's
forward under torch.profiler, grouped (GEMM, attention,
RoPE + KV write, norms, activation, other), with the GEMMs' achieved bandwidth (their weight bytes over their
time) beside the measured copy bandwidth. Prints a table and the top host functions; writes JSON with --out.

    python bench/profile_decode.py --shape 8b --out bench/results/profile-decode-8b-h100.json
    python bench/profile_decode.py --shape 8b --variant w4a16-mma --out ...  (a quant_engine.py build)
    python bench/profile_decode.py --artifact /tmp/keep/w4a16-mma+lm --variant w4a16-mma+lm --setting trigger3
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.engine import build, copy_bandwidth, make_checkpoint  # noqa: E402

KINDS = [  # (kind, substrings of kernel names), first match wins
    ("gemm", ("gemm", "gemv", "nvjet", "cutlass", "sm90_xmma", "splitk", "cublas", "wna16", "w8a8")),
    ("act_quant", ("quant_rows", "quant_chunks")),
    ("attention", ("_decode", "_reduce", "_prefill", "attn")),
    ("rope_kv_write", ("rope", "_write_kv")),
    ("norm", ("rms", "norm")),
    ("activation", ("silu", "act_mul")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, subs in KINDS if any(s in low for s in subs)), "other")


def profiled(fn, iters: int, sync_each: bool = False):
    """torch.profiler's record (CUDA activity) of ``iters`` calls of ``fn`` after one unrecorded call; with
    ``sync_each`` the device finishes each call before the next starts."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
            if sync_each:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
    return prof


def kernel_breakdown(fn, iters: int = 20) -> dict:
    """GPU microseconds per call of ``fn`` by kernel kind, and the top kernels, from torch.profiler."""
    from torch.autograd import DeviceType

    prof = profiled(fn, iters)
    kernels = []
    for e in prof.key_averages():
        if e.device_type != DeviceType.CUDA:
            continue
        us = getattr(e, "self_device_time_total", None)
        us = e.self_cuda_time_total if us is None else us
        kernels.append((e.key, e.count / iters, us / iters))
    kinds: dict[str, float] = {}
    for name, _, us in kernels:
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + us
    kernels.sort(key=lambda k: -k[2])
    return {"us_per_call_by_kind": {k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "us_per_call_total": round(sum(kinds.values()), 1),
            "top_kernels": [{"name": n[:120], "launches_per_call": round(c, 2), "us_per_call": round(u, 1)}
                            for n, c, u in kernels[:15]]}


def launch_positions(fn, layers: int, iters: int = 20) -> dict:
    """Mean GPU microseconds of each kernel by its place in the layer: a kernel launched k times per layer per call
    (k x ``layers`` launches) reports k figures, launch j of a call counted at place j mod k (the W8A8 decode GEMM:
    qkv, o, gate_up, down). Also the span of a call from its first kernel's start to its last one's end against the
    sum of its kernels' times (the difference is time the GPU ran no kernel of the call)."""
    from torch.autograd import DeviceType

    prof = profiled(fn, iters, sync_each=True)
    evs = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA and "Memcpy" not in e.name),
                 key=lambda e: e.time_range.start)
    per_call = len(evs) // iters
    calls = [evs[i * per_call:(i + 1) * per_call] for i in range(iters)]
    spans = [c[-1].time_range.end - c[0].time_range.start for c in calls]
    busy = [sum(e.time_range.end - e.time_range.start for e in c) for c in calls]
    out: dict = {"kernels_per_call": per_call, "span_us": round(sum(spans) / iters, 1),
                 "busy_us": round(sum(busy) / iters, 1), "places": {}, "marginal_places": {}, "marginal_by_kind": {}}
    # a kernel's marginal time: how much later than the kernel before it (in launch order) it ends, so a call's
    # marginals sum to its span; under PDL a kernel starts before its predecessor ends and its own duration
    # counts that wait, its marginal does not
    marg = [[c[0].time_range.end - c[0].time_range.start]
            + [c[i].time_range.end - max(c[i - 1].time_range.end, c[i].time_range.start) for i in range(1, len(c))]
            for c in calls]
    by_kind: dict[str, float] = {}
    for c, mc in zip(calls, marg):
        for e, m in zip(c, mc):
            by_kind[kind_of(e.name)] = by_kind.get(kind_of(e.name), 0.0) + m / iters
    out["marginal_by_kind"] = {k: round(v, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}
    for name in dict.fromkeys(e.name for e in calls[0]):
        durs = [[e.time_range.end - e.time_range.start for e in c if e.name == name] for c in calls]
        n = len(durs[0])
        if n % layers or any(len(d) != n for d in durs):
            continue
        k = n // layers
        out["places"][name[:80]] = [round(sum(d[j] for d in durs for j in range(p, n, k)) / (iters * layers), 2)
                                    for p in range(k)]
        ms = [[m for e, m in zip(c, mc) if e.name == name] for c, mc in zip(calls, marg)]
        out["marginal_places"][name[:80]] = [round(sum(d[j] for d in ms for j in range(p, n, k)) / (iters * layers), 2)
                                             for p in range(k)]
    out["layer_timeline"] = layer_timeline(calls, marg, layers)
    return out


def layer_timeline(calls, marg, layers: int) -> list[dict]:
    """The kernels of the middle decoder layer in launch order (from its first norm to the next layer's), each
    one's start, end and marginal time in microseconds after the layer's first kernel starts, averaged over the
    calls: where the layer's time goes between its GEMMs (the gaps no per-kernel total shows). Empty where the
    norms are not two kernels per layer plus the final one (a build with passes.fuse_norm_epilogue)."""
    rows: list[list[tuple]] = []
    for c, mc in zip(calls, marg):
        norms = [i for i, e in enumerate(c) if kind_of(e.name) == "norm"]
        if len(norms) != 2 * layers + 1:
            return []
        lo, hi = norms[2 * (layers // 2)], norms[2 * (layers // 2) + 2]
        t0 = c[lo].time_range.start
        rows.append([(c[i].name, c[i].time_range.start - t0, c[i].time_range.end - t0, mc[i]) for i in range(lo, hi)])
    if len({tuple(r[0] for r in row) for row in rows}) != 1:
        return []
    n = len(rows)
    return [{"name": rows[0][j][0][:60], **{k: round(sum(r[j][f] for r in rows) / n, 2)
                                            for f, k in ((1, "start"), (2, "end"), (3, "marginal"))}}
            for j in range(len(rows[0]))]


def gemm_weight_bytes(gm: torch.nn.Module) -> int:
    """Bytes the step's GEMMs must stream: every weight of 2 or more dimensions except an embedding table only gathered
    (with tied embeddings the table is the LM head too, so it counts)."""
    named = dict(gm.named_parameters()) | dict(gm.named_buffers())
    mats = {n: t for n, t in named.items() if t.dim() >= 2}  # 3-D: pack_wna16_mma's codes
    has_head = any("lm_head" in n for n in mats)
    return sum(t.numel() * t.element_size() for n, t in mats.items() if not (has_head and "embed" in n))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--artifact", default=None, help="profile this artifact instead of building --shape's")
    ap.add_argument("--variant", default="bf16",
                    help="a build of bench/quant_engine.py's VARIANTS (quantization, passes) for the built artifact; "
                         "its kernel overrides apply while the engine loads and runs (also with --artifact)")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoding together (the graph bucket timed)")
    ap.add_argument("--setting", default="auto",
                    help="a setting of bench/pdl_auto.py (PDL on which graphs, pdl.TRIGGER, kernel A/B flags), applied "
                         "with the variant's kernel overrides while the engine loads and runs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from bench.pdl_auto import SETTINGS, applied

    if args.setting not in SETTINGS:  # checked before minutes of building
        ap.error(f"--setting {args.setting!r}: one of {', '.join(SETTINGS)}")
    from runtime import LLM, SamplingParams
    from runtime.forward_context import ForwardContext, set_forward_context

    what = args.shape if args.artifact is None else f"artifact {args.artifact}"  # --shape only sizes a new build
    res: dict = {"device": torch.cuda.get_device_name(), "shape": what, "variant": args.variant,
                 "setting": args.setting, "batch": args.batch}
    res["copy_bw_TBps"] = round(copy_bandwidth() / 1e12, 3)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        art = args.artifact
        if art is None:
            make_checkpoint(args.shape, tmp / "hf")
            if args.variant == "bf16":
                art = build(tmp / "hf", tmp / "art", max(8, args.batch))
            else:
                from bench.quant_engine import build as build_variant

                art = build_variant(tmp / "hf", tmp / "art", args.variant, max(8, args.batch))
        # the graphs are captured at load: the variant's kernel overrides, then the setting's, hold until the end
        stack.enter_context(applied(args.variant, args.setting))
        llm = LLM(art, gpu_memory_utilization=0.5)
        eng = llm.engine
        graphs = eng.runner.graphs
        bucket = graphs.bucket_for(args.batch)
        for i in range(args.batch):
            eng.add_request(f"p{i}", list(range(100 + i, 228 + i)),
                            SamplingParams(temperature=0.0, max_tokens=900, ignore_eos=True))
        for _ in range(20):
            eng.step()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(200):
            bucket.graph.replay()
        end.record()
        torch.cuda.synchronize()
        res["graph_replay_ms"] = round(start.elapsed_time(end) / 200, 4)
        t = time.perf_counter()
        for _ in range(200):
            eng.step()
        res["engine_step_ms"] = round((time.perf_counter() - t) / 200 * 1000, 4)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            eng.step()
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
        res["host_profile_top"] = s.getvalue()

        def eager_bucket():
            ctx = ForwardContext(graphs.kv_caches, bucket.meta(graphs.max_seq_len))
            with torch.inference_mode(), set_forward_context(ctx):
                graphs.gm(bucket.input_ids, bucket.positions, bucket.logits_indices)

        res["kernels_eager_bucket"] = kernel_breakdown(eager_bucket)
        res["kernels_graph_replay"] = kernel_breakdown(bucket.graph.replay)
        res["graph_replay_places"] = launch_positions(bucket.graph.replay, eng.runner.kv_spec.num_layers)
        gb = gemm_weight_bytes(eng.runner.graph)
        res["gemm_weight_GB"] = round(gb / 1e9, 3)
        res["gemm_roofline_us"] = round(gb / (res["copy_bw_TBps"] * 1e12) * 1e6, 1)
        kinds = (res["kernels_graph_replay"]["us_per_call_by_kind"]
                 or res["kernels_eager_bucket"]["us_per_call_by_kind"])
        if kinds.get("gemm"):
            res["gemm_achieved_TBps"] = round(gb / (kinds["gemm"] * 1e-6) / 1e12, 3)
    res["host_ms_per_step"] = round(res["engine_step_ms"] - res["graph_replay_ms"], 4)
    print(res["host_profile_top"])
    for which in ("kernels_eager_bucket", "kernels_graph_replay"):
        print(which, json.dumps(res[which]["us_per_call_by_kind"]), "total us", res[which]["us_per_call_total"])
        for k in res[which]["top_kernels"][:8]:
            print(f"    {k['us_per_call']:>8} us  x{k['launches_per_call']:<6} {k['name']}")
    print(f"{res['device']}, {what} {args.variant} ({args.setting}), batch {args.batch} decode")
    places = res["graph_replay_places"]
    print(f"graph replay: {places['kernels_per_call']} kernels, span {places['span_us']} us, "
          f"busy {places['busy_us']} us; us per launch by place in the layer:")
    for name, us in places["places"].items():
        print(f"    {us}  marginal {places['marginal_places'][name]}  {name}")
    print("marginal us by kind:", json.dumps(places["marginal_by_kind"]))
    print("the middle layer's kernels (us after its first one starts): start, end, marginal")
    for row in places["layer_timeline"]:
        print(f"    {row['start']:>7} {row['end']:>7} {row['marginal']:>6}  {row['name']}")
    for k in ("copy_bw_TBps", "graph_replay_ms", "engine_step_ms", "host_ms_per_step", "gemm_weight_GB",
              "gemm_roofline_us", "gemm_achieved_TBps"):
        print(f"{k:>20}  {res.get(k)}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
