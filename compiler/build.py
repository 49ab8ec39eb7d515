"""``spanda build``: recipe + Hugging Face checkpoint -> engine artifact (written atomically).

load -> capture graph (meta device) -> passes (graph + weight plan) -> re-export -> write weights
(streamed, sharded) -> tokenizer files -> manifest with hashes and provenance -> atomic rename.
"""

from __future__ import annotations

import json
import logging
import platform
import socket
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from artifacts.manifest import SCHEMA_VERSION, parse_manifest
from artifacts.store import Artifact, ArtifactWriter, hash_tree, sha256_file
from compiler import capture
from compiler.hf_loader import HFCheckpoint
from compiler.kernels import compile_kernels
from compiler.models import build_meta_model, parse_hf_config, rope_cos_sin_cache
from compiler.models.config import ModelConfig, UnsupportedModelError
from compiler.passes import PASSES, POST_QUANT_PASSES
from compiler.quantize.pipeline import PrequantizedPipeline, QuantPipeline
from compiler.recipe import Recipe
from compiler.weights import WeightPlan, write_weights

log = logging.getLogger("spanda.compiler")

GRAPH_FILE = "graph.pt2"
SPANDA_VERSION = "0.1.0"


@dataclass(frozen=True)
class BuildResult:
    path: Path
    manifest: dict[str, Any]
    seconds: float


def _model_config(recipe: Recipe, ckpt: HFCheckpoint) -> ModelConfig:
    cfg = parse_hf_config(ckpt.config, recipe.model.dtype, recipe.model.options.model_dump())
    if recipe.model.family not in ("auto", cfg.family):
        raise UnsupportedModelError(
            f"recipe model.family is {recipe.model.family!r} but the checkpoint's model_type is {cfg.family!r}"
        )
    if recipe.target.max_seq_len > cfg.max_position_embeddings:
        raise ValueError(
            f"recipe target.max_seq_len ({recipe.target.max_seq_len}) exceeds the model's "
            f"max_position_embeddings ({cfg.max_position_embeddings}); lower it or set "
            "model.options.max_position_embeddings"
        )
    return cfg


def _hopper_build(device: str) -> bool:
    """The build runs on a compute-capability 9.0 GPU (H100, H200): the W4A16 mma kernel's target."""
    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(dev) == (9, 0)


def plan_and_capture(recipe: Recipe, cfg: ModelConfig, quant: QuantPipeline | None = None, device: str = "cpu"
                     ) -> tuple[torch.export.ExportedProgram, WeightPlan, list[str]]:
    """Export the unfused model, run the enabled passes (then quantization), re-export; ``device``: the build's
    (resolves the passes set to ``auto``). Returns (program, plan, passes run)."""
    t = recipe.target
    model = build_meta_model(cfg, t.max_seq_len)
    ep = capture.export_model(model, t.max_num_batched_tokens, t.max_batch)
    gm = ep.module()
    plan = WeightPlan()
    for name, _ in [*gm.named_parameters(), *gm.named_buffers()]:
        if name == "model.rope_cos_sin":
            plan.set_computed(name, rope_cos_sin_cache(cfg, t.max_seq_len))
        else:
            plan.copy(name, name)
    applied = []
    enabled = set(recipe.passes.enabled())
    if recipe.passes.wna16_mma == "auto" and not _hopper_build(device):
        enabled.discard("wna16_mma")
    for name, run in PASSES:
        if name in enabled:
            n = run(gm, plan)
            log.info("pass %s: %d rewrites", name, n)
            if n:
                applied.append(name)
    if quant is not None and quant.apply(gm, plan):
        applied.append("quantize")
        for name, run in POST_QUANT_PASSES:
            if name in enabled:
                n = run(gm, plan, cfg.torch_dtype)
                log.info("pass %s: %d rewrites", name, n)
                if n:
                    applied.append(name)
    ep = capture.export_model(gm, t.max_num_batched_tokens, t.max_batch)
    names = list(ep.state_dict)
    plan.restrict(names)
    return ep, plan, applied


def _quant_pipeline(recipe: Recipe, cfg: ModelConfig, ckpt: HFCheckpoint, device: str):
    """What quantizes the linears: the recipe's method (computed on ``device``), the checkpoint's own
    quantization, or nothing."""
    from compiler.quantize.hf_detect import detect

    sq = detect(ckpt.config)
    if sq is not None:
        if recipe.quantization.method != "none":
            raise ValueError(
                f"{ckpt.path} is already quantized ({sq.method}); recipe quantization.method is "
                f"{recipe.quantization.method!r}: set it to 'none' to build the checkpoint's own quantization "
                "(requantizing a quantized checkpoint would compound the error)")
        return PrequantizedPipeline(sq, cfg)
    return QuantPipeline(recipe.quantization, cfg, device) if recipe.quantization.method != "none" else None


def _meta_state(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Every parameter/buffer of the captured graph as a meta tensor (its dtype and shape)."""
    return {n: t.to("meta") for n, t in ep.state_dict.items()}


def _envelope(device: str) -> dict[str, Any]:
    import importlib.util

    triton = None
    if importlib.util.find_spec("triton") is not None:
        import triton as _t

        triton = _t.__version__
    arch = None
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        arch = f"sm_{major}{minor}"
    return {
        "device": device,
        "gpu_arch": arch,
        "torch": torch.__version__.split("+")[0],
        "triton": triton,
        "cuda": torch.version.cuda if device == "cuda" else None,
        "python": platform.python_version(),
    }


def _tokenizer_record(ckpt: HFCheckpoint, files: list[Path]) -> dict[str, Any]:
    tcfg: dict[str, Any] = {}
    if (ckpt.path / "tokenizer_config.json").exists():
        tcfg = json.loads((ckpt.path / "tokenizer_config.json").read_text())
    template = tcfg.get("chat_template")
    if (ckpt.path / "chat_template.jinja").exists():
        template = (ckpt.path / "chat_template.jinja").read_text()
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return {
        "files": [f.name for f in files],
        "chat_template": template,
        "bos_token_id": ckpt.generation_config.get("bos_token_id", ckpt.config.get("bos_token_id")),
        "eos_token_ids": ckpt.eos_token_ids(),
        "pad_token_id": ckpt.generation_config.get("pad_token_id", ckpt.config.get("pad_token_id")),
    }


def _provisional_engine(writer: ArtifactWriter, manifest: dict[str, Any], device: str):
    """An engine over the artifact being written (not yet published), for evaluation and kernel warm-up."""
    from runtime.config import EngineOptions
    from runtime.engine import LLMEngine

    provisional = parse_manifest({**manifest, "files": hash_tree(writer.path)})
    return LLMEngine(Artifact(writer.path, provisional),
                     EngineOptions(device=device, verify=False, gpu_memory_utilization=0.5, allow_jit=True))


def _gpu_kernels_available(device: str, kv_dtype: str, dtype: str | None = None) -> bool:
    """Triton kernels (and so tuning and a kernel cache) exist for CUDA in bf16/fp16 (fp8/int8 KV caches with
    a bf16/fp16 model included)."""
    if device != "cuda" or kv_dtype not in ("bfloat16", "float16", "fp8_e4m3", "int8"):
        return False
    if kv_dtype in ("fp8_e4m3", "int8") and dtype not in ("bfloat16", "float16"):
        return False
    from runtime.ops import triton_attention

    return triton_attention.AVAILABLE


def _kv_scales(recipe: Recipe, cfg: ModelConfig, ckpt: HFCheckpoint, device: str
               ) -> tuple[list[list[float]] | None, str | None]:
    """Per-layer [k_scale, v_scale] of an fp8/int8 KV cache, calibrated on the recipe's
    quantization.calibration data (and the sha256 of its token ids); (None, None) for a float cache."""
    from compiler.quantize.kv import KV_QUANT_DTYPES, calibrate_kv_scales

    if recipe.target.kv_dtype not in KV_QUANT_DTYPES:
        return None, None
    from compiler.quantize.calib_data import checkpoint_calibration

    ids, sha = checkpoint_calibration(recipe.quantization.calibration, ckpt.path, cfg.vocab_size)
    scales = calibrate_kv_scales(cfg, ckpt.read, ids, recipe.target.kv_dtype, device)
    return [[k, v] for k, v in scales], sha


class AccuracyGateError(ValueError):
    """A quantized build fell outside the recipe's accuracy limits; the message carries the figures."""


def _reference_build(recipe: Recipe, tmp: Path) -> Path:
    """The same recipe unquantized (same dtype, no eval): the source the quantized artifact is compared to."""
    ref = recipe.model_copy(update={
        "name": recipe.name + "-reference",
        "quantization": recipe.quantization.model_copy(update={"method": "none"}),
        "eval": recipe.eval.model_copy(update={"data": None, "max_perplexity_increase": None, "max_mean_kl": None,
                                               "min_top1_agreement": None}),
    })
    log.info("building the unquantized reference for the accuracy comparison")
    return build(ref, tmp / "reference").path


def _evaluate(writer: ArtifactWriter, manifest: dict[str, Any], recipe: Recipe, device: str) -> dict[str, Any]:
    """Run the artifact being written over the recipe's eval data; write eval.json. A quantized build is also
    compared with its unquantized source (perplexity increase, mean KL, top-1 agreement) and gated."""
    import tempfile

    from runtime.config import EngineOptions
    from runtime.engine import LLMEngine
    from runtime.evaluate import evaluate, load_eval_data

    engine = _provisional_engine(writer, manifest, device)
    seqs = load_eval_data(recipe.eval.data, engine.tokenizer.encode, recipe.eval.max_sequences)
    if recipe.quantization.method == "none":
        result = evaluate(engine, seqs, recipe.eval.data).to_dict()
    else:
        with tempfile.TemporaryDirectory(prefix=".spanda-ref-", dir=writer.path.parent) as tmp:
            ref = LLMEngine(_reference_build(recipe, Path(tmp)), EngineOptions(device=device, verify=False,
                                                                               gpu_memory_utilization=0.3))
            ref_ppl = evaluate(ref, seqs, recipe.eval.data).perplexity
            result = evaluate(engine, seqs, recipe.eval.data, ref, "unquantized source").to_dict()
            del ref
        result["reference_perplexity"] = ref_ppl
        result["perplexity_increase"] = result["perplexity"] / ref_ppl - 1.0
        _check_gates(recipe, result)
    writer.write_json("eval.json", result)
    return result


def _check_gates(recipe: Recipe, r: dict[str, Any]) -> None:
    e = recipe.eval
    failed = []
    if e.max_perplexity_increase is not None and r["perplexity_increase"] > e.max_perplexity_increase:
        failed.append(f"perplexity {r['perplexity']:.4f} vs {r['reference_perplexity']:.4f} unquantized is "
                      f"+{100 * r['perplexity_increase']:.2f}%, above eval.max_perplexity_increase "
                      f"{100 * e.max_perplexity_increase:.2f}%")
    if e.max_mean_kl is not None and r["mean_kl"] > e.max_mean_kl:
        failed.append(f"mean KL {r['mean_kl']:.5f} nats is above eval.max_mean_kl {e.max_mean_kl}")
    if e.min_top1_agreement is not None and r["top1_agreement"] < e.min_top1_agreement:
        failed.append(f"top-1 agreement {r['top1_agreement']:.4f} is below eval.min_top1_agreement "
                      f"{e.min_top1_agreement}")
    summary = (f"perplexity {r['perplexity']:.4f} (unquantized {r['reference_perplexity']:.4f}, "
               f"{100 * r['perplexity_increase']:+.2f}%), mean KL {r['mean_kl']:.5f}, top-1 agreement "
               f"{r['top1_agreement']:.4f}")
    log.info("quantization %s accuracy: %s", recipe.quantization.method, summary)
    if failed:
        raise AccuracyGateError(f"quantized build {recipe.name!r} fails its accuracy gates ({summary}): "
                                + "; ".join(failed))


def build(recipe: Recipe, out_dir: str | Path, overwrite: bool = False) -> BuildResult:
    """Build an artifact into ``out_dir``. On any error nothing is left at ``out_dir`` (or the old one stays)."""
    t0 = time.perf_counter()
    if recipe.model.source is None:
        raise ValueError("no checkpoint: set model.source in the recipe or pass --model DIR")
    out_dir = Path(out_dir)
    ckpt = HFCheckpoint.open(recipe.model.source)
    cfg = _model_config(recipe, ckpt)
    tok_files = ckpt.tokenizer_files()
    device = recipe.target.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    quant = _quant_pipeline(recipe, cfg, ckpt, device)
    with ArtifactWriter(out_dir, overwrite=overwrite) as writer, \
            tempfile.TemporaryDirectory(prefix=".spanda-scratch-", dir=writer.path.parent) as scratch:
        ep, plan, applied = plan_and_capture(recipe, cfg, quant, device)
        torch.export.save(ep, str(writer.path / GRAPH_FILE))
        meta = _meta_state(ep)
        if quant is not None and recipe.quantization.calibrated:
            quant.calibrate(ckpt.read, ckpt.path, plan, Path(scratch), device)
        kv_scales, kv_calib_sha = _kv_scales(recipe, cfg, ckpt, device)
        with tqdm(total=len(plan.entries), desc="writing weights", unit="tensor", disable=None) as bar:
            shards = write_weights(plan, ckpt.read, meta, writer.path, bar.update)
        for f in tok_files:
            writer.copy_file(f, f.name)
        log.info("hashing source checkpoint files for provenance")
        sources = {p.name: sha256_file(p) for p in ckpt.source_files()}
        t = recipe.target
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "model": {"family": cfg.family, "architecture": cfg.architecture, "config": cfg.to_dict()},
            "tokenizer": _tokenizer_record(ckpt, tok_files),
            "quantization": quant.record() if quant is not None else {"method": "none"},
            "passes": applied,
            "graph": {
                "file": GRAPH_FILE,
                "input_names": list(capture.INPUT_NAMES),
                "output_names": list(capture.OUTPUT_NAMES),
                "dynamic_dims": capture.dynamic_dims_record(t.max_num_batched_tokens, t.max_batch),
            },
            "weights": {"files": shards, "dtype": cfg.dtype},
            "envelope": _envelope(device),
            "limits": {
                "max_seq_len": t.max_seq_len,
                "max_batch": t.max_batch,
                "max_num_batched_tokens": t.max_num_batched_tokens,
                "batch_buckets": list(t.batch_buckets),
                "kv_page_size": t.kv_page_size,
                "kv_dtype": cfg.dtype if t.kv_dtype == "auto" else t.kv_dtype,
                "kv_scales": kv_scales,
                "kv_cache_blocks": t.kv_cache_blocks,
                "enable_prefix_caching": t.enable_prefix_caching,
            },
            "parallel": {"tensor_parallel": 1, "pipeline_parallel": 1},
            "provenance": {
                "recipe_sha256": recipe.sha256(),
                "recipe": recipe.to_dict(),
                "source_files": sources,
                "calibration_sha256": quant.calibration_sha256 if quant is not None else kv_calib_sha,
                "spanda_version": SPANDA_VERSION,
                "build_host": socket.gethostname(),
                "build_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "build_seconds": round(time.perf_counter() - t0, 3),
            },
            "eval": None,
        }
        if _gpu_kernels_available(device, manifest["limits"]["kv_dtype"], cfg.dtype):
            manifest["kernels"] = compile_kernels(writer.path, lambda: _provisional_engine(writer, manifest, device),
                                                  cfg.to_dict(), manifest["limits"])
        if recipe.eval.data:
            manifest["eval"] = _evaluate(writer, manifest, recipe, device)
        manifest["provenance"]["build_seconds"] = round(time.perf_counter() - t0, 3)  # kernels + eval included
        writer.commit(manifest)
    ckpt.close()
    seconds = time.perf_counter() - t0
    log.info("artifact written to %s in %.1f s", out_dir, seconds)
    return BuildResult(out_dir, manifest, seconds)
