"""Quantized engines against the bf16 engine on the GPU, random-weight Llama shapes (weights do not change speed).

One checkpoint, several builds (bf16, RTN W4A16 g128 (same kernel and bytes as GPTQ/AWQ), W8A16, FP8 W8A8
dynamic, FP8 W8A8 + FP8 KV cache); for each: batch-1 decode tok/s, batch-16 decode tok/s (16 sequences
decoding together, output tokens/s) and, with --workload, the 256-request peer workload of bench/engine.py.
Prints a table with speedups over bf16; writes JSON with --out.

    python bench/quant_engine.py --shape 8b --out bench/results/quant-engine-8b-h100.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.engine import copy_bandwidth, make_checkpoint

GPTQ_LAYOUT = {"wna16_mma": False}  # the W4A16 GEMV / tensor-core GEMM (a Hopper build's default is the mma layout)

VARIANTS = {
    "bf16": {},
    "w4a16": {"quantization": {"method": "rtn", "bits": 4, "group_size": 128}, "passes": GPTQ_LAYOUT},
    "w8a16": {"quantization": {"method": "int8", "activations": "none"}},
    "fp8": {"quantization": {"method": "fp8"}},
    # INT8 W8A8 (SmoothQuant 0.5, dynamic per-token activations); a short calibration: speed does not depend on it
    "int8": {"quantization": {"method": "int8", "calibration": {"num_samples": 8, "seq_len": 128}}},
    "fp8+fp8kv": {"quantization": {"method": "fp8"}, "kv_dtype": "fp8_e4m3"},
    # A/B variants: the FP8 build without the activation quantization fused into the norms (passes), the W4A16
    # engine with another batch-1 GEMV configuration (kernels: fields of triton_wna16.WNA16_GEMV replaced while
    # the engine loads and captures its graphs, restored after)
    "fp8-unfused": {"quantization": {"method": "fp8"}, "passes": {"fuse_act_quant": False}},
    "w4a16-gemv-old": {"quantization": {"method": "rtn", "bits": 4, "group_size": 128},  # the GEMV default before
                       "passes": GPTQ_LAYOUT,
                       "kernels": {"WNA16_GEMV": {"block_n": 128, "num_warps": 4, "prefetch": False, "waves": 2}}},
    "w4a16-zsum": {"quantization": {"method": "rtn", "bits": 4, "group_size": 128}, "passes": GPTQ_LAYOUT,
                   "kernels": {"WNA16_GEMV": {"zsum": True, "waves": 4}}},
    # the 4-bit codes in the tensor-core kernel's layout (passes.wna16_mma: spanda::linear_wna16_mma, wgmma)
    "w4a16-mma": {"quantization": {"method": "rtn", "bits": 4, "group_size": 128}, "passes": {"wna16_mma": True}},
    # ... its pre-TMA decode kernel (triton_wna16_mma.WNA16_MMA.tma off: the codes, x and words through cp.async)
    "w4a16-mma-cpasync": {"quantization": {"method": "rtn", "bits": 4, "group_size": 128},
                          "passes": {"wna16_mma": True}, "kernels": {"WNA16_MMA": {"tma": False}}},
    # ... with its codes by plain loads straight into registers up to 16 rows (triton_wna16_mma.WNA16_MMA.ldg:
    # _wna16_mma_ldg_kernel)
    "w4a16-mma-ldg": {"quantization": {"method": "rtn", "bits": 4, "group_size": 128},
                      "passes": {"wna16_mma": True}, "kernels": {"WNA16_MMA": {"ldg": True, "maxnreg": 128}}},
    # ... with its codes by plain loads (triton_wna16_mma.WNA16_MMA_LDG, 128 registers) up to 4 rows, TMA above
    "w4a16-mma-ldg4": {"quantization": {"method": "rtn", "bits": 4, "group_size": 128}, "passes": {"wna16_mma": True},
                       "kernels": {"WNA16_MMA_LDG_MAX_M": 4}},
    "w4a16-mma+lm": {"quantization": {"method": "rtn", "bits": 4, "group_size": 128, "quantize_lm_head": True},
                     "passes": {"wna16_mma": True}},
    # ... with the residual add + RMSNorm between its linears carried by the GEMM epilogues (passes.fuse_norm_epilogue;
    # pdl_auto's no-norm-epilogue setting runs the same build's ops as the GEMM, then the norm kernel)
    "w4a16-mma+lm+ne": {"quantization": {"method": "rtn", "bits": 4, "group_size": 128, "quantize_lm_head": True},
                        "passes": {"wna16_mma": True, "fuse_norm_epilogue": True}},
    # ... and the SiLU-and-multiply carried by the gate_up GEMM's epilogue (passes.fuse_silu_epilogue; pdl_auto's
    # no-silu-epilogue setting runs the GEMM, then the silu_and_mul kernel)
    "w4a16-mma+lm+ne+se": {"quantization": {"method": "rtn", "bits": 4, "group_size": 128, "quantize_lm_head": True},
                           "passes": {"wna16_mma": True, "fuse_norm_epilogue": True, "fuse_silu_epilogue": True}},
    # programmatic dependent launch of the Triton kernels (runtime/ops/pdl.py): "pdl" True on every launch
    # (SPANDA_PDL=1 outside the bench), False on none (SPANDA_PDL=0); unset: the default, small decode graphs only
    "bf16-pdl": {"pdl": True},
    "fp8-pdl": {"quantization": {"method": "fp8"}, "pdl": True},
    "w4a16-mma-pdl": {"quantization": {"method": "rtn", "bits": 4, "group_size": 128}, "passes": {"wna16_mma": True},
                      "pdl": True},
    # lm_head quantized too (quantization.quantize_lm_head: the recipe's choice; 1.05 GB of bf16 at the 8B shape)
    "w4a16+lm": {"quantization": {"method": "rtn", "bits": 4, "group_size": 128, "quantize_lm_head": True},
                 "passes": GPTQ_LAYOUT},
    "fp8+lm": {"quantization": {"method": "fp8", "quantize_lm_head": True}},
    "bf16-nopdl": {"pdl": False},
    "fp8-nopdl": {"quantization": {"method": "fp8"}, "pdl": False},
    "w4a16-mma-nopdl": {"quantization": {"method": "rtn", "bits": 4, "group_size": 128},
                        "passes": {"wna16_mma": True}, "pdl": False},
    # FP8_DECODE (K tiles of 128, one program per SM) on every shape, as before FP8_DECODE_NARROW
    "fp8-nopdl-wide": {"quantization": {"method": "fp8"}, "pdl": False,
                       "kernels": {"FP8_DECODE_NARROW": {"block_k": 128, "waves": 1}}},
    # the FP8 decode GEMM before the operands were swapped (GemmConfig.swap): 6 stages, 2 programs per SM
    # the FP8 decode GEMM before its loads went through TMA (FP8_DECODE.tma off)
    "fp8-notma": {"quantization": {"method": "fp8"}, "kernels": {"FP8_DECODE": {"tma": False}}},
    "fp8-gemm-old": {"quantization": {"method": "fp8"},
                     "kernels": {"FP8_DECODE": {"swap": False, "num_stages": 6, "waves": 2}}},
}


GEMM_MODULES = ("triton_wna16_mma", "triton_wna16", "triton_w8a8", "triton_act_quant", "triton_gemm")


@contextlib.contextmanager
def kernel_overrides(overrides: dict):
    """Replace fields of the quantized GEMMs' module-level GemmConfigs (a dict of fields) or other module-level
    settings (a value) for the duration (bench A/B only). A bare NAME is a setting of the first of GEMM_MODULES
    that has it (each setting the benches name is assigned there, and read there by its launchers); "module.NAME"
    names a setting of another runtime.ops module (for example "triton_decode.SERIAL_REDUCE")."""
    import importlib

    def owner(name: str):
        module, _, attr = name.rpartition(".")
        if not module:
            module = next(m for m in GEMM_MODULES if hasattr(importlib.import_module(f"runtime.ops.{m}"), attr))
        return importlib.import_module(f"runtime.ops.{module}"), attr

    saved = {name: getattr(*owner(name)) for name in overrides}
    try:
        for name, fields in overrides.items():
            mod, attr = owner(name)
            new = dataclasses.replace(getattr(mod, attr), **fields) if isinstance(fields, dict) else fields
            setattr(mod, attr, new)
        yield
    finally:
        for name, cfg in saved.items():
            setattr(*owner(name), cfg)


def build(ckpt: Path, out: Path, variant: str, max_batch: int):
    from compiler.build import build as run_build
    from compiler.recipe import recipe_from_dict

    v = VARIANTS[variant]
    buckets = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < max_batch] + [max_batch]
    recipe = recipe_from_dict({
        "name": "bench-" + variant.replace("+", "-"), "model": {"source": str(ckpt), "dtype": "bfloat16"},
        "target": {"device": "cuda", "max_seq_len": 2048, "max_batch": max_batch, "max_num_batched_tokens": 8192,
                   "batch_buckets": buckets, "kv_page_size": 16, "kv_dtype": v.get("kv_dtype", "auto")},
        **({"quantization": v["quantization"]} if "quantization" in v else {}),
        **({"passes": v["passes"]} if "passes" in v else {}),
    })
    return run_build(recipe, out).path


def _warm_prompts(llm, batch: int, prompt: int) -> list[list[int]]:
    """``batch`` random prompts of ``prompt`` tokens, generated from once (graphs and kernels warm)."""
    from runtime import SamplingParams

    prompts = [torch.randint(100, 1000, (prompt,)).tolist() for _ in range(batch)]
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    return prompts


def _generate_s(llm, prompts, new: int) -> float:
    """Seconds of one greedy generation of ``new`` tokens per prompt, GPU work included."""
    from runtime import SamplingParams

    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True))
    torch.cuda.synchronize()
    return time.perf_counter() - t


def decode_rate(llm, batch: int, new: int = 128, prompt: int = 128) -> float:
    """Output tokens/s of ``batch`` sequences decoding together (after their prefill)."""
    # subtract nothing: prefill of 128 tokens x batch is a small share of 128 decode steps (reported as is)
    return batch * new / _generate_s(llm, _warm_prompts(llm, batch, prompt), new)


def decode_only_rate(llm, batch: int, new: int = 256, prompt: int = 128, reps: int = 3) -> float:
    """Output tokens/s of ``batch`` sequences decoding together, prefill excluded: (new - 1) tokens per sequence
    over the time of a ``new``-token generation minus that of a one-token generation (prefill and first token)
    of the same prompts, the faster of ``reps`` each (the rate vLLM's benchmarks report as 1 / TPOT)."""
    prompts = _warm_prompts(llm, batch, prompt)
    first = min(_generate_s(llm, prompts, 1) for _ in range(reps))
    return batch * (new - 1) / (min(_generate_s(llm, prompts, new) for _ in range(reps)) - first)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8b", choices=["1b", "8b"])
    ap.add_argument("--variants", default="bf16,w4a16,w8a16,fp8,fp8+fp8kv",
                    help=f"comma-separated, of {', '.join(VARIANTS)} (one given twice runs twice: name#2)")
    ap.add_argument("--workload", action="store_true",
                    help="also the 256-request workload, for every variant (with the engine's default scheduling)")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--async-scheduling", action="store_true",
                    help="also batch 1 and 16 with EngineOptions.async_scheduling (the next decode step launched "
                         "before the tokens reach the host)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from runtime import LLM
    from spanda import bench as B

    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": args.shape,
                 "copy_bw_TBps": round(copy_bandwidth() / 1e12, 3), "variants": {}}
    t0 = time.perf_counter()

    def save(res: dict) -> None:  # after every variant: a run cut short still reports what it measured
        for path in filter(None, (args.out, os.environ.get("OUT") and Path(os.environ["OUT"], Path(
                args.out or "quant-engine.json").name))):
            Path(path).write_text(json.dumps(res, indent=1) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        res["bf16_weight_GB"] = round(make_checkpoint(args.shape, tmp / "hf") / 1e9, 3)
        print(f"[{time.perf_counter() - t0:.0f} s] checkpoint written", flush=True)
        from runtime.ops import pdl

        auto = pdl.AUTO_MAX_BATCH
        last: tuple[str, Path, str] | None = None  # (build key, artifact, variant): consecutive variants share it
        for name in args.variants.split(","):
            r: dict = {}
            t = time.perf_counter()
            v = VARIANTS[name]
            key = json.dumps({k: v.get(k) for k in ("quantization", "passes", "kv_dtype")}, sort_keys=True)
            # read at every launch: the build's kernel warm-up and the graphs
            pdl.ENABLED, pdl.AUTO_MAX_BATCH = v.get("pdl") is True, 0 if v.get("pdl") is False else auto
            if last is not None and last[0] == key:
                art, r["same_build_as"] = last[1], last[2]
            else:
                if last is not None:
                    shutil.rmtree(last[1], ignore_errors=True)
                    last = None
                try:
                    art = build(tmp / "hf", tmp / name, name, args.max_batch)
                except Exception as e:  # keep the other variants' figures
                    res["variants"][name] = {"error": repr(e)[:500]}
                    continue
                last = (key, art, name)
                r["build_s"] = round(time.perf_counter() - t, 1)
                print(f"[{time.perf_counter() - t0:.0f} s] {name} built in {r['build_s']} s", flush=True)
            r["weights_GB"] = round(sum(f.stat().st_size for f in art.glob("weights-*.safetensors")) / 1e9, 3)
            with kernel_overrides(VARIANTS[name].get("kernels", {})):
                llm = LLM(art, gpu_memory_utilization=0.6)
                default_async = llm.engine.async_scheduling
                llm.engine.async_scheduling = False  # the synchronous engine first (the engine reads it every step)
                r["bs1_tok_s"] = round(decode_rate(llm, 1, new=256), 1)
                r["bs16_out_tok_s"] = round(decode_rate(llm, 16), 1)
                if args.async_scheduling:  # the default on a GPU
                    llm.engine.async_scheduling = True
                    r["bs1_async_tok_s"] = round(decode_rate(llm, 1, new=256), 1)
                    r["bs16_async_out_tok_s"] = round(decode_rate(llm, 16), 1)
                    r["steps_run_ahead"] = llm.engine.num_steps_ahead
                    llm.engine.async_scheduling = False
                if args.workload:
                    llm.engine.async_scheduling = default_async
                    r["workload_async"] = default_async
                    reqs = B.synthetic_workload()
                    B.run_offline(llm.engine, reqs[:16])
                    r["workload_out_tok_s"] = round(B.run_offline(llm.engine, reqs)["output_tokens_per_s"], 1)
                r["new_kernel_compilations"] = llm.engine.kernels.new_compilations()
            runs = sum(1 for k in res["variants"] if k.split("#")[0] == name)  # a repeated variant: name#2, ...
            res["variants"][name if not runs else f"{name}#{runs + 1}"] = r
            pdl.ENABLED, pdl.AUTO_MAX_BATCH = False, auto
            del llm
            gc.collect()
            torch.cuda.empty_cache()
            print(f"[{time.perf_counter() - t0:.0f} s]", name, json.dumps(r), flush=True)
            save(res)
    base = res["variants"].get("bf16", {})
    print(f"\n{res['device']}, {args.shape} shape; bf16 weights {res['bf16_weight_GB']} GB; "
          f"copy bw {res['copy_bw_TBps']} TB/s")
    print(f"{'variant':12s} {'weights GB':>10s} {'bs1 tok/s':>10s} {'x bf16':>7s} {'bs16 tok/s':>11s} {'x bf16':>7s} "
          f"{'256-req tok/s':>13s}")
    for name, r in res["variants"].items():
        if "error" in r:
            print(f"{name:12s} error: {r['error'][:100]}")
            continue
        s1 = r["bs1_tok_s"] / base["bs1_tok_s"] if base.get("bs1_tok_s") else float("nan")
        s16 = r["bs16_out_tok_s"] / base["bs16_out_tok_s"] if base.get("bs16_out_tok_s") else float("nan")
        if base.get("bs1_tok_s"):  # no bf16 in this run: no ratios (NaN is not JSON)
            r["bs1_speedup_vs_bf16"], r["bs16_speedup_vs_bf16"] = round(s1, 2), round(s16, 2)
        print(f"{name:12s} {r['weights_GB']:10.2f} {r['bs1_tok_s']:10.1f} {s1:7.2f} {r['bs16_out_tok_s']:11.1f} "
              f"{s16:7.2f} {r.get('workload_out_tok_s', float('nan')):13.1f}")
    save(res)


if __name__ == "__main__":
    main()
