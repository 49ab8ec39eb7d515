"""Compile-time GPU work of a build: autotune the Triton kernels for the artifact's shapes on this GPU
(``tuning.json``) and compile every kernel the engine will launch into the artifact (``kernels/``).

The warm-up runs the artifact being built through the real engine: CUDA-graph capture of every decode
bucket, then prefill, chunked-prefill and prefix-cached extend steps over a spread of lengths (one in every
64-row band where a quantized GEMM's launch configuration changes: ``warm_up_lengths``), so the
kernel specializations a server meets are all in the cache.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("spanda.compiler")

TUNING_FILE = "tuning.json"
CACHE_DIR = "kernels"


def _tuning_shapes(cfg: dict[str, Any], limits: dict[str, Any], dtype: torch.dtype,
                   kv_dtype: torch.dtype | None = None) -> list[dict]:
    common = dict(num_heads=cfg["num_heads"], num_kv_heads=cfg["num_kv_heads"], head_dim=cfg["head_dim"],
                  page=limits["kv_page_size"], dtype=dtype, kv_dtype=kv_dtype)
    ctxs = sorted({min(1024, limits["max_seq_len"]), limits["max_seq_len"]})
    shapes = [dict(num_seqs=b, ctx=c, q_len=1, **common) for b in limits["batch_buckets"] for c in ctxs]
    prefill = min(limits["max_num_batched_tokens"], limits["max_seq_len"])
    shapes.append(dict(num_seqs=1, ctx=prefill, q_len=prefill, **common))
    return shapes


# Prompt lengths of the warm-up, besides 1, 2, 7, 16, 33, 100, 257 and the longest: one per band of 64 rows
# below the quantized GEMMs' cuBLAS threshold (triton_wna16.DEQUANT_MM_MIN_M rows). Their launch configuration
# changes with M in 64-row steps there (block_m 32 / 64 / 128, then the split-K count that follows the number of
# row tiles, a compile-time constant of the kernel): a server's extend steps (16 requests x 16 uncached tokens
# = 256 rows) otherwise met kernels the build never compiled.
GEMM_BAND = 64


def warm_up_lengths(limits: dict[str, Any]) -> list[int]:
    """The warm-up's prompt lengths (each prefilled alone, then all together, then extended by one token)."""
    from runtime.ops.triton_wna16 import DEQUANT_MM_MIN_M

    top = min(limits["max_seq_len"] - 8, limits["max_num_batched_tokens"] * 2)
    up_to = DEQUANT_MM_MIN_M or top  # None: the GEMMs never hand over to cuBLAS
    bands = range(GEMM_BAND - 24, up_to, GEMM_BAND)  # 40, 104, ..., 1000: one M in each band
    return sorted({n for n in (1, 2, 7, 16, 20, 33, 100, 257, top, *bands) if n <= top})


def _warm_up(engine, limits: dict[str, Any]) -> None:
    from runtime.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(0)
    vocab = engine.artifact.manifest.model.config["vocab_size"]
    lengths = warm_up_lengths(limits)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    for i, p in enumerate(prompts):  # one at a time, then all together (mixed batches), then prefix hits
        engine.add_request(f"warm-{i}", p, params)
        while engine.has_unfinished_requests():
            engine.step()
    for round_ in ("batch", "prefix"):
        for i, p in enumerate(prompts):
            engine.add_request(f"warm-{round_}-{i}", p + [1] if round_ == "prefix" else p, params)
        while engine.has_unfinished_requests():
            engine.step()


def forget_compiled_kernels() -> int:
    """Drop the kernels this process already compiled from every Triton kernel of Spanda's modules (their
    in-memory caches), so the warm-up compiles each one into the artifact's cache instead of launching it from
    memory: a kernel an earlier build, a GPU calibration or anything else in the process ran would otherwise be
    missing from the artifact, and a fresh server would compile it at load. Returns the kernels reset. (Triton
    never unloads a compiled module, so graphs captured before keep working.)"""
    import sys

    from triton.runtime.jit import JITFunction

    n = 0
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("runtime.ops."):  # where every Spanda kernel lives
            continue
        for fn in list(vars(module).values()):
            if isinstance(fn, JITFunction) and fn.device_caches:
                fn.device_caches.clear()
                n += 1
    return n


def compile_kernels(out: Path, make_engine, cfg: dict[str, Any], limits: dict[str, Any]) -> dict[str, Any]:
    """Tune, then warm up an engine made by ``make_engine()`` with Triton's cache pointed into ``out``.
    Writes out/tuning.json and out/kernels/; returns the manifest's ``kernels`` record."""
    import triton

    from runtime.kernel_cache import count_kernels
    from runtime.ops import triton_attention
    from runtime.ops.attention import kv_cache_dtype

    cache = out / CACHE_DIR
    cache.mkdir()
    previous = triton.knobs.cache.dir
    triton.knobs.cache.dir = str(cache)
    reset = forget_compiled_kernels()
    if reset:
        log.info("compiling kernels: %d kernels this process had compiled before are compiled again", reset)
    try:
        t0 = time.perf_counter()
        shapes = _tuning_shapes(cfg, limits, getattr(torch, cfg["dtype"]), kv_cache_dtype(limits["kv_dtype"]))
        log.info("autotuning attention kernels over %d shapes", len(shapes))
        triton_attention.tune(shapes)
        (out / TUNING_FILE).write_text(json.dumps({"attention": triton_attention.pinned()}, indent=1) + "\n")
        t1 = time.perf_counter()
        log.info("compiling kernels: engine warm-up (graph capture, prefill, extend)")
        _warm_up(make_engine(), limits)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
    finally:
        triton.knobs.cache.dir = previous
    n = count_kernels(cache)
    log.info("kernel cache: %d compiled kernels (tuning %.1f s, warm-up %.1f s)", n, t1 - t0, t2 - t1)
    return {"tuning_file": TUNING_FILE, "cache_dir": CACHE_DIR, "num_kernels": n,
            "tuning_seconds": round(t1 - t0, 2), "warmup_seconds": round(t2 - t1, 2)}
