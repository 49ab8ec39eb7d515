"""Engine benchmark on the GPU with random-weight Llama shapes (weights do not change speed).

Builds an artifact from a random Hugging Face checkpoint of the 1B (Llama-3.2-1B) shape, then measures
batch-1 decode tokens/s with and without CUDA graphs, and the peer workload of ../shared/bench (256
requests, prompts 64-512 tokens, 128 new tokens, seed 0) through the engine's continuous batching.
Prints a table; writes JSON with --out. Roofline = weight bytes / measured copy bandwidth.

    python bench/engine.py --out bench/results/engine-1b-h100.json
    python bench/engine.py --shape 8b --skip-eager --maxload 1024 --out bench/results/engine-8b-h100.json
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True,
               rope_theta=500000.0),
}


def copy_bandwidth() -> float:
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 2 * 10 / (time.perf_counter() - t)


def make_checkpoint(shape: str, out: Path) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tokenizer_fixture import train_tokenizer

    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    train_tokenizer(out, vocab_size=512)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return n_bytes


def build(ckpt: Path, out: Path, max_batch: int):
    from compiler.build import build as run_build
    from compiler.recipe import recipe_from_dict

    buckets = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < max_batch] + [max_batch]
    recipe = recipe_from_dict({
        "name": "bench", "model": {"source": str(ckpt), "dtype": "bfloat16"},
        "target": {"device": "cuda", "max_seq_len": 2048, "max_batch": max_batch, "max_num_batched_tokens": 8192,
                   "batch_buckets": buckets, "kv_page_size": 16},
    })
    return run_build(recipe, out).path


def decode_tps(llm, new: int = 256, prompt: int = 128) -> float:
    from runtime import SamplingParams

    ids = torch.randint(100, 1000, (prompt,)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate([ids], params)
    torch.cuda.synchronize()
    return new / (time.perf_counter() - t)


COLD_START = """
import json, sys, time
t0 = float(sys.argv[1])
import torch
t_import = time.time() - t0
from runtime import LLM, SamplingParams
t1 = time.time()
if len(sys.argv) > 3:  # profile the load and the first request (slower: a separate run)
    import cProfile, io, pstats
    prof = cProfile.Profile()
    prof.enable()
llm = LLM(sys.argv[2], gpu_memory_utilization=0.6)
t2 = time.time()
out = llm.generate([list(range(100, 228))], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
t3 = time.time()
if len(sys.argv) > 3:
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(40)
    print("PROFILE", json.dumps(s.getvalue()))
phases = {"python_and_torch_import": t_import, "runtime_import": t1 - t0 - t_import, **llm.engine.load_seconds,
          "first_request": t3 - t2}
print("PHASES", json.dumps({k: round(v, 3) for k, v in phases.items()}))
graphs = llm.engine.runner.graphs
print("CAPTURE", json.dumps({str(k): round(v, 3) for k, v in (graphs.capture_seconds if graphs else {}).items()}))
print("COMPILED", json.dumps(llm.engine.kernels.compiled))
print("FIRST_TOKEN_S", time.time() - t0, "NEW_KERNELS", llm.engine.kernels.new_compilations())
"""


def cold_start(art: Path, profile: bool = False, pycache: str | None = None) -> dict:
    """Process start to first generated token in a fresh interpreter, and its Triton compilations.
    ``profile``: run it under cProfile instead (slower) and return the top functions by cumulative time.
    ``pycache``: give the process a Python bytecode cache there (PYTHONPYCACHEPREFIX, writing allowed);
    None runs it in this environment as it is."""
    import gc
    import os
    import subprocess
    import sys

    gc.collect()
    torch.cuda.empty_cache()  # give the build's cached blocks back so the fresh process sees the whole GPU
    env = dict(os.environ)
    if pycache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = pycache
    argv = [sys.executable, "-c", COLD_START, repr(time.time()), str(art)] + (["profile"] if profile else [])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    lines = r.stdout.splitlines()
    line = next((x for x in lines if x.startswith("FIRST_TOKEN_S")), None)
    if line is None:
        print(r.stderr[-4000:])
        return {"cold_start_error": r.stderr[-2000:]}

    def tagged(tag: str):
        return json.loads(next(x for x in lines if x.startswith(tag + " "))[len(tag) + 1:])

    if profile:
        return {"cold_start_profile_s": round(float(line.split()[1]), 2), "cold_start_profile": tagged("PROFILE")}
    _, secs, _, n = line.split()
    return {"cold_start_to_first_token_s": round(float(secs), 2), "cold_start_new_kernels": int(n),
            "cold_start_compiled_kernels": tagged("COMPILED"), "cold_start_phases_s": tagged("PHASES"),
            "cold_start_capture_per_bucket_s": tagged("CAPTURE")}


def bytecode_cache_state() -> dict:
    """Whether this environment lets Python cache bytecode, and whether torch's modules have any."""
    import importlib.util
    import os

    pyc = importlib.util.cache_from_source(torch.__file__)
    return {"PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"),
            "torch_init_pyc_present": os.path.exists(pyc)}


def cold_starts(art: Path, runs: int, profile: bool, tmp: Path) -> dict:
    """Cold starts as a deployment sees them (the installed packages' bytecode cached: pip writes .pyc at
    install), after one run that writes that cache; plus one run in this environment as it is, which on an
    image without .pyc files and with PYTHONDONTWRITEBYTECODE set recompiles every imported module."""
    res: dict = {"cold_start_bytecode_env": bytecode_cache_state()}
    plain = cold_start(art)
    res["cold_start_without_bytecode_cache"] = {k: plain.get(k) for k in (
        "cold_start_to_first_token_s", "cold_start_phases_s", "cold_start_new_kernels")}
    pycache = str(tmp / "pycache")
    priming = cold_start(art, pycache=pycache)
    res["cold_start_priming_run_s"] = priming.get("cold_start_to_first_token_s")
    measured = [cold_start(art, pycache=pycache) for _ in range(runs)]
    res.update(measured[0])
    res["cold_start_runs_s"] = [r.get("cold_start_to_first_token_s") for r in measured]
    if runs > 1:
        res["cold_start_phases_runs_s"] = [r.get("cold_start_phases_s") for r in measured]
    if profile:
        res.update(cold_start(art, profile=True, pycache=pycache))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1b", choices=list(SHAPES))
    ap.add_argument("--out", default=None)
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--skip-eager", action="store_true", help="skip the (slow) no-graph batch-1 figure")
    ap.add_argument("--maxload", type=int, default=0,
                    help="also run N requests of 128 in / 128 out all at once (TensorRT-LLM's max-load shape)")
    ap.add_argument("--cold-starts", type=int, default=1,
                    help="fresh-process cold starts with a warm bytecode cache (all reported; see cold_starts)")
    ap.add_argument("--cold-start-profile", action="store_true",
                    help="one more cold start under cProfile (top functions by cumulative time in the JSON)")
    ap.add_argument("--keep-artifact", default=None, help="copy the built artifact here (e.g. for profile_decode)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from runtime import LLM
    from spanda import bench as B

    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": args.shape}
    res["copy_bw_TBps"] = round(copy_bandwidth() / 1e12, 3)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        n_bytes = make_checkpoint(args.shape, tmp / "hf")
        res["weight_GB"] = round(n_bytes / 1e9, 3)
        res["roofline_bs1_tok_s"] = round(res["copy_bw_TBps"] * 1e12 / n_bytes, 1)
        art = build(tmp / "hf", tmp / "art", args.max_batch)
        res["checkpoint_and_build_s"] = round(time.perf_counter() - t, 1)
        res.update(cold_starts(art, args.cold_starts, args.cold_start_profile, tmp))
        if args.keep_artifact:  # hard links where the filesystem allows (a 16 GB artifact copies slowly)
            import os
            import shutil

            def link(src: str, dst: str) -> None:
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)

            shutil.copytree(art, args.keep_artifact, dirs_exist_ok=True, copy_function=link)
        if not args.skip_eager:
            eager = LLM(art, cuda_graphs=False, gpu_memory_utilization=0.3)
            res["bs1_eager_tok_s"] = round(decode_tps(eager), 1)
            del eager
            torch.cuda.empty_cache()
        t = time.perf_counter()
        llm = LLM(art, gpu_memory_utilization=0.6)
        res["load_with_graph_capture_s"] = round(time.perf_counter() - t, 1)
        res["bs1_graphs_tok_s"] = round(decode_tps(llm), 1)
        res["bs1_graphs_pct_roofline"] = round(100 * res["bs1_graphs_tok_s"] / res["roofline_bs1_tok_s"], 1)
        reqs = B.synthetic_workload()
        B.run_offline(llm.engine, reqs[:16])  # warm up prefill shapes
        r = B.run_offline(llm.engine, reqs)
        res["workload_256req"] = r
        res["workload_out_tok_s"] = round(r["output_tokens_per_s"], 1)
        if args.maxload:
            ml = B.run_offline(llm.engine, B.synthetic_workload(args.maxload, (128, 129), 128))
            res["maxload_128_128"] = ml
            res["maxload_out_tok_s"] = round(ml["output_tokens_per_s"], 1)
    rows = [("copy bandwidth TB/s", res["copy_bw_TBps"]), ("roofline bs1 tok/s", res["roofline_bs1_tok_s"]),
            ("bs1 eager tok/s", res.get("bs1_eager_tok_s")), ("bs1 CUDA graphs tok/s", res["bs1_graphs_tok_s"]),
            ("cold start to 1st token s", res.get("cold_start_to_first_token_s")),
            ("cold start JIT compilations", res.get("cold_start_new_kernels")),
            ("cold start, no bytecode cache", (res.get("cold_start_without_bytecode_cache") or {}).get(
                "cold_start_to_first_token_s")),
            ("max-load 128/128 out tok/s", res.get("maxload_out_tok_s")),
            ("bs1 % of roofline", res["bs1_graphs_pct_roofline"]),
            ("256-req workload out tok/s", res["workload_out_tok_s"]),
            ("TTFT p50 s", round(r["ttft_s"]["p50"], 3)), ("TPOT p50 ms", round(1000 * r["tpot_s"]["p50"], 2))]
    print(f"\n{res['device']}, {args.shape} shape, bf16; cold-start phases: {res.get('cold_start_phases_s')}; "
          f"capture per bucket: {res.get('cold_start_capture_per_bucket_s')}; runs {res.get('cold_start_runs_s')}")
    for k, v in rows:
        print(f"{k:>28}  {v}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
