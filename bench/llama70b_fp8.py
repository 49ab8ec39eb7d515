"""The headline recipe on the GPU: recipes/llama-70b-fp8.yaml against a layer-reduced random checkpoint with
the exact Llama-3.x-70B layer shapes (hidden 8192, FFN 28672, 64 query / 8 KV heads, vocab 128256).

Writes the random checkpoint (bf16, ~5 GB shards like the published ones), runs ``spanda build`` in a child
process and records its peak resident memory against the model's size, one source shard and one decoder
layer; then loads the artifact, generates, measures batch-1 decode and a burst, and serves it with
``spanda serve`` for one OpenAI-style request. Prints a table; writes JSON with --out.

    python bench/llama70b_fp8.py --layers 4 --out bench/results/llama70b-fp8-h100.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

log = logging.getLogger("llama70b_fp8")
REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
             vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
             tie_word_embeddings=False,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192})
SHARD_BYTES = 5 * 1024**3


def make_checkpoint(out: Path, layers: int) -> dict:
    """Random bf16 weights (std 0.02, norms 1) written shard by shard; returns sizes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO))
    from tests.tokenizer_fixture import train_tokenizer

    cfg = LlamaConfig(**SHAPE, num_hidden_layers=layers, bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in LlamaForCausalLM(cfg).named_parameters()}
    out.mkdir(parents=True)
    cfg.save_pretrained(out)
    train_tokenizer(out, vocab_size=512)
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    gen = torch.Generator("cuda").manual_seed(0)
    shards, cur, size = [], {}, 0
    layer_bytes = 0
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02).cpu()
        if name.startswith("model.layers.0."):
            layer_bytes += t.numel() * 2
        if cur and size + t.numel() * 2 > SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += t.numel() * 2
    shards.append(cur)
    weight_map, largest, total = {}, 0, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        b = sum(t.numel() * 2 for t in shard.values())
        largest, total = max(largest, b), total + b
        weight_map |= {n: fname for n in shard}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return {"checkpoint_bytes": total, "largest_shard_bytes": largest, "decoder_layer_bytes": layer_bytes,
            "shards": len(shards)}


def run_build(ckpt: Path, art: Path, log_path: Path) -> dict:
    """``spanda build -v`` in a child process (its log streamed to ``log_path``); its peak RSS from rusage."""
    t = time.perf_counter()
    cmd = [sys.executable, "-c", "from spanda.cli import main; main()", "-v", "build", "--recipe",
           str(REPO / "recipes/llama-70b-fp8.yaml"), "--model", str(ckpt), "--out", str(art)]
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "RssShmem": 0}
    at_peak = ""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        while proc.poll() is None:  # resident memory by kind, and the build's last log line at the peak
            try:
                status = dict(ln.split(":", 1) for ln in open(f"/proc/{proc.pid}/status"))
                now = {k: int(status[k].split()[0]) * 1024 for k in peak}
                if now["VmRSS"] > peak["VmRSS"]:
                    lines = [ln for ln in log_path.read_text().splitlines() if " INFO " in ln]
                    at_peak = lines[-1] if lines else ""
                for k in peak:
                    peak[k] = max(peak[k], now[k])
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(0.05)
    seconds = time.perf_counter() - t
    lines = log_path.read_text().strip().splitlines()
    if proc.returncode:
        print("\n".join(lines[-60:]))
        raise SystemExit("build failed")
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    return {"build_seconds": round(seconds, 1), "build_peak_rss_bytes": peak_rss,
            "build_sampled_peak_bytes": peak, "build_log_at_sampled_peak": at_peak,
            "build_log_tail": [ln for ln in lines if " INFO " in ln or "WARNING" in ln][-12:]}


def serve_once(art: Path, port: int = 8013) -> dict:
    cmd = [sys.executable, "-c", "from spanda.cli import main; main()", "serve", str(art), "--port", str(port)]
    log = open(art.parent / "serve.log", "w")  # not a pipe: nobody would drain it and the server would block
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = deadline = time.time()
        deadline += 240
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}): "
                                   + (art.parent / "serve.log").read_text()[-1500:])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        ready_s = time.time() - t0
        models = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10))
        body = json.dumps({"model": models["data"][0]["id"], "prompt": "def main():", "max_tokens": 16,
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            resp = json.load(r)
        return {"served": True, "serve_ready_s": round(ready_s, 1), "usage": resp["usage"],
                "text": resp["choices"][0]["text"]}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def engine_figures(art: Path) -> dict:
    from runtime import LLM, SamplingParams

    t = time.perf_counter()
    llm = LLM(str(art), gpu_memory_utilization=0.85)
    load_s = time.perf_counter() - t
    m = llm.engine.artifact.manifest
    text = llm.generate(["def fibonacci(n):"], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
                        )[0].outputs[0].text
    ids = list(range(100, 228))
    llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True))
    bs1 = 128 / (time.perf_counter() - t)
    prompts = [list(range(100, 100 + 128 + i)) for i in range(128)]
    t = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True))
    burst = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)
    stats = llm.engine.stats()
    return {"engine_load_s": round(load_s, 1), "kv_dtype": m.limits.kv_dtype,
            "quantization": m.quantization.model_dump(exclude_none=True),
            "generated": text, "batch1_decode_tok_s": round(bs1, 1), "burst_128x128_out_tok_s": round(burst, 1),
            "kv_cache": str(getattr(stats, "kv_cache_usage", "")),
            "new_kernel_compilations": llm.engine.kernels.new_compilations()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--workdir", type=Path, default=None, help="where the checkpoint and artifact go (big)")
    ap.add_argument("--skip-serve", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    res: dict = {"device": torch.cuda.get_device_name(), "layers": args.layers, "shape": SHAPE}
    t0 = time.perf_counter()

    def phase(name: str, fn) -> None:
        """Run one phase, log its time and keep what is known so far (a timed-out run still reports)."""
        t = time.perf_counter()
        log.info("phase %s ...", name)
        try:
            res.update(fn())
        except Exception as e:  # report, do not lose the other figures
            res[f"{name}_error"] = repr(e)[:800]
            log.exception("phase %s failed", name)
        res[f"{name}_phase_s"] = round(time.perf_counter() - t, 1)
        log.info("phase %s done in %.1f s (%.1f s total)", name, res[f"{name}_phase_s"], time.perf_counter() - t0)
        for d in filter(None, (out_dir, args.out and args.out.parent)):
            d.mkdir(parents=True, exist_ok=True)
            (d / (args.out.name if args.out and d == args.out.parent else "llama70b-fp8.json")).write_text(
                json.dumps(res, indent=1) + "\n")

    phase("checkpoint", lambda: make_checkpoint(work / "hf", args.layers))
    phase("build", lambda: run_build(work / "hf", work / "art", (out_dir or work) / "build.log"))
    if (work / "art").is_dir():
        res["artifact_bytes"] = sum(f.stat().st_size for f in (work / "art").iterdir())
        phase("engine", lambda: engine_figures(work / "art"))
        gc.collect()
        torch.cuda.empty_cache()
        if not args.skip_serve:
            phase("serve", lambda: serve_once(work / "art"))
    gib = 1024**3
    print(json.dumps({k: v for k, v in res.items() if k != "shape"}, indent=1))
    print(f"\n{res['device']}: Llama-70B shape, {args.layers} layers, FP8 W8A8 + {res.get('kv_dtype')} KV")
    for name, key in [("checkpoint (bf16)", "checkpoint_bytes"), ("largest source shard", "largest_shard_bytes"),
                      ("one decoder layer (bf16)", "decoder_layer_bytes"), ("artifact", "artifact_bytes"),
                      ("build peak RSS", "build_peak_rss_bytes")]:
        if key in res:
            print(f"  {name:28s} {res[key] / gib:8.2f} GiB")
    print(f"  build {res.get('build_seconds')} s; batch-1 decode {res.get('batch1_decode_tok_s')} tok/s; "
          f"burst {res.get('burst_128x128_out_tok_s')} out tok/s; served: {res.get('served')}")


if __name__ == "__main__":
    main()
