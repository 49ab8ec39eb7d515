"""Where batch-1 decode time goes: GPU time of one decode-graph replay vs the engine's whole step.

Builds the random-weight 1B-shape artifact (bench/engine.py), then times (a) the bucket-1 decode graph's
replay alone with CUDA events, (b) full engine steps, and (c) a cProfile of the host side of those steps.
Prints a table and the top host functions; writes JSON with --out.
"""

from __future__ import annotations

import argparse
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

from bench.engine import build, make_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from runtime import LLM, SamplingParams

    res: dict = {"device": torch.cuda.get_device_name(), "shape": args.shape}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_checkpoint(args.shape, tmp / "hf")
        art = build(tmp / "hf", tmp / "art", 8)
        llm = LLM(art, gpu_memory_utilization=0.5)
        eng = llm.engine
        graphs = eng.runner.graphs
        b1 = graphs.bucket_for(1)
        for _ in range(10):
            b1.graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(200):
            b1.graph.replay()
        end.record()
        torch.cuda.synchronize()
        res["graph_replay_ms"] = round(start.elapsed_time(end) / 200, 4)
        eng.add_request("p", list(range(100, 228)), SamplingParams(temperature=0.0, max_tokens=600, ignore_eos=True))
        for _ in range(20):
            eng.step()
        torch.cuda.synchronize()
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
    res["host_ms_per_step"] = round(res["engine_step_ms"] - res["graph_replay_ms"], 4)
    print(res["host_profile_top"])
    print(f"{res['device']}, {args.shape}, batch 1 decode")
    for k in ("graph_replay_ms", "engine_step_ms", "host_ms_per_step"):
        print(f"{k:>20}  {res[k]}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
