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
import json
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


def run_build(ckpt: Path, art: Path) -> dict:
    t = time.perf_counter()
    cmd = [sys.executable, "-c", "from spanda.cli import main; main()", "build", "--recipe",
           str(REPO / "recipes/llama-70b-fp8.yaml"), "--model", str(ckpt), "--out", str(art)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - t
    if r.returncode:
        print(r.stdout[-3000:], r.stderr[-6000:])
        raise SystemExit("build failed")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    return {"build_seconds": round(seconds, 1), "build_peak_rss_bytes": peak,
            "build_log_tail": r.stderr.strip().splitlines()[-6:]}


def serve_once(art: Path, port: int = 8013) -> dict:
    cmd = [sys.executable, "-c", "from spanda.cli import main; main()", "serve", str(art), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        body = json.dumps({"model": "llama-70b-fp8", "prompt": "def main():", "max_tokens": 16,
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
        models = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10))
        body = json.dumps({"model": models["data"][0]["id"], "prompt": "def main():", "max_tokens": 16,
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            resp = json.load(r)
        return {"served": True, "usage": resp["usage"], "text": resp["choices"][0]["text"]}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def engine_figures(art: Path) -> dict:
    from runtime import LLM, SamplingParams

    llm = LLM(str(art), gpu_memory_utilization=0.85)
    m = llm.engine.artifact.manifest
    text = llm.generate(["def fibonacci(n):"], SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0].text
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
    return {"kv_dtype": m.limits.kv_dtype, "quantization": m.quantization.model_dump(exclude_none=True),
            "generated": text, "batch1_decode_tok_s": round(bs1, 1), "burst_128x128_out_tok_s": round(burst, 1),
            "kv_cache": str(getattr(stats, "kv_cache_usage", "")),
            "new_kernel_compilations": llm.engine.kernels.new_compilations()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--workdir", type=Path, default=None, help="where the checkpoint and artifact go (big)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    res: dict = {"device": torch.cuda.get_device_name(), "layers": args.layers, "shape": SHAPE}
    t = time.perf_counter()
    res |= make_checkpoint(work / "hf", args.layers)
    res["checkpoint_seconds"] = round(time.perf_counter() - t, 1)
    res |= run_build(work / "hf", work / "art")
    res["artifact_bytes"] = sum(f.stat().st_size for f in (work / "art").iterdir())
    res |= engine_figures(work / "art")
    torch.cuda.empty_cache()
    try:
        res |= serve_once(work / "art")
    except Exception as e:  # report, do not lose the other figures
        res["served"] = f"failed: {e!r}"
    gib = 1024**3
    rows = [("checkpoint (bf16)", res["checkpoint_bytes"] / gib),
            ("largest source shard", res["largest_shard_bytes"] / gib),
            ("one decoder layer (bf16)", res["decoder_layer_bytes"] / gib),
            ("artifact", res["artifact_bytes"] / gib), ("build peak RSS", res["build_peak_rss_bytes"] / gib)]
    print(json.dumps({k: v for k, v in res.items() if k != "shape"}, indent=1))
    print(f"\n{res['device']}: Llama-70B shape, {args.layers} layers, FP8 W8A8 + {res['kv_dtype']} KV")
    for name, v in rows:
        print(f"  {name:28s} {v:8.2f} GiB")
    print(f"  build {res['build_seconds']} s; batch-1 decode {res['batch1_decode_tok_s']} tok/s; "
          f"burst {res['burst_128x128_out_tok_s']} out tok/s; served: {res.get('served')}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "llama70b-fp8.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
