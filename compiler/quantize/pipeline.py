"""The build's quantization step: recipe -> per-linear schemes -> the tensors each quantized linear stores.

Weight-only-from-the-weights methods (RTN, FP8 with dynamic activations, INT8 without smoothing) compute
each linear's tensors lazily when the shard writer reaches it (one linear in memory at a time). Calibrated
methods (GPTQ, AWQ, INT8 SmoothQuant, FP8 with static activation scales) run ``calibrate_and_quantize``
layer by layer first and park each linear's result in a scratch safetensors file inside the artifact's
temporary directory; the writer then reads them back one at a time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from compiler.models.config import ModelConfig
from compiler.passes.quantize import LinearScheme, QuantSite, quantize_linears
from compiler.quantize.layout import fp8_weight, int8_weight, rtn_tensors
from compiler.recipe import QuantizationSection
from compiler.weights import Derived, WeightPlan

log = logging.getLogger("spanda.compiler")

NEVER_QUANTIZED = ("model.embed_tokens",)  # an embedding is a lookup, not a GEMM (tied heads included)


def linear_scheme(q: QuantizationSection) -> LinearScheme:
    if q.method == "fp8":
        return LinearScheme("fp8", bits=8, per_channel=q.weight_scale == "per_channel",
                            static_input=q.activations == "static")
    if q.method == "int8":
        if q.activations == "none":
            return LinearScheme("wna16", bits=8, group_size=-1)  # weight-only W8A16, per channel
        return LinearScheme("int8", bits=8)
    return LinearScheme("wna16", bits=q.weight_bits, group_size=q.group_size,
                        act_order=q.method == "gptq" and q.act_order)


class QuantPipeline:
    """Holds the recipe's choices and the state between the graph pass and the weight writer."""

    def __init__(self, q: QuantizationSection, cfg: ModelConfig, device: str = "cpu"):
        self.q = q
        self.cfg = cfg
        self.scheme = linear_scheme(q)
        self.sites: list[QuantSite] = []
        self.scratch: dict[str, Path] = {}  # calibrated results: plan group / tensor name -> scratch file
        self.calibration_sha256: str | None = None
        self.summary: dict[str, Any] = {}
        # where the uncalibrated methods (RTN, FP8, INT8) compute their tensors: the build's device (the same
        # codes on a GPU, much sooner)
        self.device = device

    # ------------------------------------------------------------------ graph pass

    def choose(self, prefix: str) -> LinearScheme | None:
        if prefix in NEVER_QUANTIZED:
            return None
        if prefix == "lm_head" and not self.q.quantize_lm_head:
            return None
        return self.scheme

    def make(self, site: QuantSite) -> Derived:
        if self.q.calibrated:
            name = site.prefix + ".weight"

            def from_scratch(read, name=name):
                if name not in self.scratch:
                    raise RuntimeError(f"calibration produced nothing for {name}")
                return load_file(str(self.scratch[name]))

            return from_scratch
        q, dtype, source = self.q, self.cfg.torch_dtype, site.source

        def lazy(read):
            if self.device != "cpu":
                dev = self.device
                try:
                    return {k: v.cpu() for k, v in compute(lambda name: read(name).to(dev)).items()}
                except torch.cuda.OutOfMemoryError:
                    log.warning("%s: out of GPU memory quantizing it, quantizing on the CPU", site.prefix)
                    torch.cuda.empty_cache()
            return compute(read)

        def compute(read):
            if q.method == "int8" and q.activations == "dynamic" or q.method == "fp8" and q.weight_scale == \
                    "per_channel":
                # Per output channel: each fused part quantizes on its own, in its stored dtype (bounded memory).
                one = int8_weight if q.method == "int8" else fp8_weight
                parts = [one(read(s)) for s in source.sources]
                return {k: torch.cat([p[k] for p in parts]).contiguous() for k in parts[0]}
            w = _read_source(source, read)
            if q.method == "fp8":
                return fp8_weight(w, per_channel=False)
            if q.method == "int8":
                return rtn_tensors(w, 8, -1, True, dtype)
            return rtn_tensors(w, q.weight_bits, q.group_size, q.is_symmetric, dtype)

        return lazy

    def apply(self, gm, plan: WeightPlan) -> int:
        self.sites = quantize_linears(gm, plan, self.choose, self.make)
        log.info("quantization %s: %d linears rewritten", self.q.method, len(self.sites))
        return len(self.sites)

    # ------------------------------------------------------------------ calibration

    def calibrate(self, read, ckpt_dir: Path, plan: WeightPlan, scratch_dir: Path, device: str = "cpu") -> None:
        """Run the calibrated method over the checkpoint (layer by layer), parking results in scratch files;
        norm weights the method rescales replace their plan entries."""
        if not self.q.calibrated:
            return
        from compiler.quantize.calib_data import checkpoint_calibration
        from compiler.quantize.calibrate import calibrate_and_quantize
        from compiler.quantize.spec import QuantSpec, Site

        c = self.q.calibration
        ids, self.calibration_sha256 = checkpoint_calibration(c, ckpt_dir, self.cfg.vocab_size)
        method = {"gptq": "gptq", "awq": "awq", "int8": "int8_smoothquant", "fp8": "fp8_static"}[self.q.method]
        spec = QuantSpec(method=method, bits=self.q.weight_bits, group_size=self.q.group_size,
                         symmetric=self.q.is_symmetric, act_order=self.q.act_order, damp_percent=self.q.damp_percent,
                         smoothquant_alpha=self.q.smoothquant_alpha if self.q.smoothquant_alpha is not None else 0.5,
                         fp8_per_channel=self.q.weight_scale == "per_channel")
        sites = [Site(s.prefix + ".weight", tuple(s.source.sources)) for s in self.sites]
        scratch_dir.mkdir(parents=True, exist_ok=True)
        site_names = {s.name for s in sites}
        extra: dict[str, Path] = {}

        def emit(name: str, tensors: dict[str, torch.Tensor]) -> None:
            path = scratch_dir / f"{len(self.scratch) + len(extra):05d}.safetensors"
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
            (self.scratch if name in site_names else extra)[name] = path

        log.info("calibrating %s on %d x %d tokens of %s (%s)", self.q.method, ids.shape[0], ids.shape[1], c.data,
                 device)
        self.summary = calibrate_and_quantize(self.cfg, read, ids, spec, sites, emit, device=device) or {}
        missing = site_names - set(self.scratch)
        if missing:
            raise RuntimeError(f"calibration did not quantize {sorted(missing)[:4]}...")
        for name, path in extra.items():  # e.g. RMSNorm weights divided by AWQ/SmoothQuant scales
            if name not in plan.entries:
                raise RuntimeError(f"calibration changed {name}, which is not a parameter of the graph")
            dtype = self.cfg.torch_dtype
            plan.derive(name, {name: "weight"}, lambda read, p=path, dt=dtype: {"weight": load_file(str(p))["weight"]
                                                                                .to(dt)})
        plan.restrict(list(plan.entries))

    # ------------------------------------------------------------------ manifest

    def record(self) -> dict[str, Any]:
        q, s = self.q, self.scheme
        rec: dict[str, Any] = {"method": q.method, "op": f"linear_{s.op}", "bits": s.bits,
                               "linears": len(self.sites),
                               "unquantized": ["model.embed_tokens"] + ([] if q.quantize_lm_head else ["lm_head"])}
        if s.op == "wna16":
            rec.update(group_size=s.group_size, symmetric=q.is_symmetric if q.method != "int8" else True,
                       act_order=s.act_order,
                       scales_layout="spanda-wna16 (qweight int32 [K*bits/32, N], scales [G, N], zeros uint8 [G, N], "
                                     "perm [K] for act-order)")
        elif s.op == "fp8":
            rec.update(weight_scale=q.weight_scale, activations=q.activations,
                       scales_layout="float32 weight_scale [N] or [1], input_scale [1] when static")
        else:
            rec.update(weight_scale="per_channel", activations="dynamic", scales_layout="float32 weight_scale [N]",
                       smoothquant_alpha=q.smoothquant_alpha)
        if q.calibrated:
            rec["calibration"] = {"data": q.calibration.data, "num_samples": q.calibration.num_samples,
                                  "seq_len": q.calibration.seq_len, "sha256": self.calibration_sha256}
        return rec


def _read_source(source, read) -> torch.Tensor:
    if source.kind == "copy":
        return read(source.sources[0]).float()
    if source.kind == "cat":
        return torch.cat([read(s).float() for s in source.sources], dim=source.dim)
    raise ValueError(f"cannot quantize a {source.kind} weight")


class PrequantizedPipeline:
    """A checkpoint that is already quantized (GPTQ, AWQ, FP8, compressed-tensors): its linears keep their
    quantization, converted to the internal layouts (compiler/quantize/hf_formats.py); nothing is requantized."""

    def __init__(self, sq, cfg: ModelConfig):
        self.sq = sq
        self.cfg = cfg
        self.sites: list[QuantSite] = []
        self.calibration_sha256 = None
        self.schemes: dict[str, Any] = {}

    @staticmethod
    def _prefixes(site_or_source) -> list[str]:
        source = getattr(site_or_source, "source", site_or_source)
        return [s.removesuffix(".weight") for s in source.sources]

    def choose_site(self, prefix: str, source) -> LinearScheme | None:
        from compiler.quantize.hf_detect import QuantFormatError

        parts = self._prefixes(source)
        schemes = [self.sq.scheme_for(p) for p in parts]
        if all(s is None for s in schemes):
            return None
        if any(s is None for s in schemes) or len(set(schemes)) != 1:
            raise QuantFormatError(f"{prefix}: its parts {parts} are quantized differently ({schemes}); turn the "
                                   "fusion pass for them off in the recipe")
        s = schemes[0]
        self.schemes[prefix] = s
        op = s.op.removeprefix("linear_")
        return LinearScheme(op, bits=s.bits, group_size=s.group_size if op == "wna16" else -1,
                            act_order=op == "wna16" and s.act_order, per_channel=True,
                            static_input=op != "wna16" and s.activations == "static")

    def make(self, site: QuantSite) -> Derived:
        from compiler.quantize.hf_formats import read_site

        prefixes, sq, dtype, scheme = self._prefixes(site), self.sq, self.cfg.torch_dtype, site.scheme

        def convert(read):
            _, t = read_site(read, prefixes, sq, dtype)
            if scheme.op == "wna16" and scheme.act_order and "perm" not in t:
                t["perm"] = torch.arange(site.in_features, dtype=torch.int32)  # desc_act with a trivial g_idx
            if scheme.op != "wna16" and t["weight_scale"].numel() == 1:
                t["weight_scale"] = t["weight_scale"].expand(site.out_features).contiguous()
            return t

        return convert

    def apply(self, gm, plan: WeightPlan) -> int:
        def choose(prefix: str) -> LinearScheme | None:
            return self.choose_site(prefix, plan.entries[prefix + ".weight"])

        self.sites = quantize_linears(gm, plan, choose, self.make)
        log.info("pre-quantized %s checkpoint: %d linears kept quantized", self.sq.method, len(self.sites))
        return len(self.sites)

    def calibrate(self, *args, **kwargs) -> None:
        return None

    def record(self) -> dict[str, Any]:
        s = next(iter(self.schemes.values()), None)
        rec: dict[str, Any] = {"method": self.sq.method, "source_format": self.sq.method, "linears": len(self.sites),
                               "unquantized": ["model.embed_tokens"]}
        if s is not None:
            rec.update(op=s.op, bits=s.bits, symmetric=s.symmetric, act_order=s.act_order,
                       activations=s.activations, weight_scale=s.weight_strategy)
            if s.op == "linear_wna16":
                rec["group_size"] = s.group_size
            if s.checkpoint_format:
                rec["source_format"] = f"{self.sq.method} ({s.checkpoint_format})"
        return rec
