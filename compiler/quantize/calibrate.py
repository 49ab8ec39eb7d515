"""Calibration-based quantization: GPTQ, AWQ, SmoothQuant INT8 W8A8 and FP8 with static input scales.

Written from the papers (GPTQ: Frantar et al. 2022; AWQ: Lin et al. 2023; SmoothQuant: Xiao et al. 2022) and
the behaviour of their reference implementations; no dependency on AutoGPTQ or AutoAWQ.

The model is run layer by layer over the calibration tokens in float32: only one decoder layer's weights and
the calibration hidden states ``[N, L, H]`` are held at a time (plus, per linear input, a Gram matrix
``X^T X`` and per-channel statistics), so memory is bounded by one layer whatever the model size. Weights are
read lazily through ``read(hf_name) -> Tensor``.

A *site* is one quantized linear of the artifact: its parameter name and the Hugging Face weights concatenated
along dim 0 to form it (q/k/v fused, gate/up fused, or single projections). The sites sharing one input
(q/k/v; gate/up; o; down) form an *input group*: they see the same activations, get one Hessian, and share
the per-input-channel scales of AWQ and SmoothQuant.

Flows per layer:

- GPTQ, SmoothQuant, FP8 (sequential): the groups are processed in forward order (qkv, o, gate/up, down);
  each group's statistics are gathered from the layer run with the groups before it already quantized (so
  GPTQ corrects for the upstream error, as AutoGPTQ's ``true_sequential``), and the next layer's input comes
  from the fully quantized layer.
- AWQ (as AutoAWQ): one float pass gathers every group's statistics and the next layer's input; then scales are
  searched and folded in the order down (into up_proj rows), gate/up (into post_attention_layernorm),
  o (into v_proj rows, only when v's output matches o's input, i.e. MHA), q/k/v (into input_layernorm), so
  each search sees the weights that will be quantized; then clip search and quantization of every site.

Quantized weights are installed back into the layer as float32 weights *dequantized from the emitted
tensors* (with the activation quantization of W8A8 emulated), so what calibration and ``model_nll`` see is
what the runtime's ops compute (up to their accumulation order).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from compiler.models.config import ModelConfig
from compiler.quantize import layout
from compiler.quantize.awq import awq_clip, awq_search_scales, smoothquant_scales
from compiler.quantize.gptq import gptq_quantize
from compiler.quantize.groups import quantize_groups
from compiler.quantize.layer_forward import (
    _NORM_OF,
    GROUP_ORDER,
    _chunks,
    _cos_sin,
    _embed,
    _Layer,
    _site_layout,
    site_linear,
)
from compiler.quantize.rtn import QuantizedLinear
from compiler.quantize.spec import CalibrationError, Emit, QuantSpec, Reader, Site
from runtime.ops.quant_linear import FP8_MAX, SCALE_FLOOR

log = logging.getLogger("spanda.compiler")


@dataclass
class _Stats:
    """Statistics of one input group over the calibration tokens."""

    gram: torch.Tensor | None = None  # sum x^T x
    abs_sum: torch.Tensor | None = None  # sum |x| per channel
    abs_max: torch.Tensor | None = None  # max |x| per channel
    tokens: int = 0
    sub: list[torch.Tensor] = field(default_factory=list)  # a subsample of rows, for error reporting

    def add(self, x: torch.Tensor, gram: bool, sub_rows: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1])
        if gram:
            g = x2.t() @ x2
            self.gram = g if self.gram is None else self.gram + g
        a = x2.abs()
        s, m = a.sum(0), a.amax(0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.abs_max = m if self.abs_max is None else torch.maximum(self.abs_max, m)
        if sub_rows.numel():
            self.sub.append(x2[sub_rows].clone())
        self.tokens += x2.shape[0]

    @property
    def x_sub(self) -> torch.Tensor:
        return torch.cat(self.sub)


class _Calibrator:
    def __init__(self, cfg: ModelConfig, read: Reader, calib_ids: torch.Tensor, spec: QuantSpec,
                 sites: Sequence[Site], emit: Emit, progress, device: torch.device):
        self.cfg, self.read, self.spec, self.emit, self.device = cfg, read, spec, emit, device
        self.ids = calib_ids
        self.n, self.L = calib_ids.shape
        self.plan = _site_layout(sites, cfg.num_layers)
        self.num_sites = len(sites)
        self.progress = progress
        self.dtype = cfg.torch_dtype
        self.summary: dict[str, Any] = {"method": spec.method, "bits": spec.bits, "group_size": spec.group_size,
                                        "symmetric": spec.sym, "act_order": spec.act_order,
                                        "num_samples": self.n, "seq_len": self.L, "sites": {}, "layers": []}
        total = self.n * self.L
        step = max(1, total // max(1, spec.error_tokens))
        self.sub_idx = torch.arange(0, total, step)[: spec.error_tokens]
        self.cos, self.sin = _cos_sin(cfg, self.L, device)
        self.chunks = _chunks(self.n, self.L, spec.chunk_tokens)
        self.done_sites = 0
        self._bar = None

    # -- helpers

    def _sub_rows(self, a: int, b: int) -> torch.Tensor:
        lo, hi = a * self.L, b * self.L
        m = (self.sub_idx >= lo) & (self.sub_idx < hi)
        return (self.sub_idx[m] - lo).to(self.device)

    def _site_weight(self, layer: _Layer, shorts: list[str]) -> torch.Tensor:
        return torch.cat([layer.w[s + ".weight"] for s in shorts], 0)

    def _group_weight(self, layer: _Layer, group: list[tuple[Site, list[str]]]) -> torch.Tensor:
        return torch.cat([self._site_weight(layer, shorts) for _, shorts in group], 0)

    def _covers(self, layer: _Layer, group_name: str, group: list[tuple[Site, list[str]]]) -> bool:
        """Do the sites cover every projection that reads this input (so an input scale can be folded)?"""
        have = {s for _, shorts in group for s in shorts}
        need = {"attn_in": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"},
                "mlp_in": {"mlp.gate_proj", "mlp.up_proj"}}.get(group_name, set())
        return need <= have

    def _fold_norm(self, layer: _Layer, group_name: str, s: torch.Tensor) -> torch.Tensor:
        """norm_w / s, rounded to the model dtype and emitted; returns the exact effective scale
        norm_w / stored (so the weights are scaled by what the runtime's norm really divides by)."""
        key = _NORM_OF[group_name] + ".weight"
        old = layer.w[key]
        new = (old / s).to(self.dtype)
        self.emit(layer.prefix + key, {"weight": new.cpu()})
        newf = new.to(self.device, torch.float32)
        s_eff = torch.where((old != 0) & (newf != 0), old / newf, s)
        layer.w[key] = newf
        return s_eff

    def _record(self, layer: _Layer, site: Site, w_ref: torch.Tensor, x_sub: torch.Tensor, s: torch.Tensor | None,
                t0: float, extra: dict[str, Any]) -> None:
        """Relative output error of the installed site on the kept calibration rows (original input space)."""
        shorts = [src[len(layer.prefix):-len(".weight")] for src in site.sources]
        w_q = self._site_weight(layer, shorts)
        act = layer.act.get(shorts[0])
        xin = x_sub if s is None else x_sub / s
        y_ref = x_sub @ w_ref.t()
        y_q = (act(xin) if act is not None else xin) @ w_q.t()
        rel = float((y_q - y_ref).norm() / y_ref.norm().clamp_min(1e-30))
        self.summary["sites"][site.name] = {"rel_err": rel, "seconds": round(time.time() - t0, 4), **extra}
        self.done_sites += 1
        if self._bar is not None:
            self._bar.set_postfix_str(f"{site.name.rsplit('.', 2)[-2]} err {rel:.3g}")
            self._bar.update(1)
        if callable(self.progress):
            self.progress(site.name, self.done_sites, self.num_sites)
        log.debug("quantized %s (%s): relative output error %.4g", site.name, self.spec.method, rel)

    def _emit_site(self, layer: _Layer, site: Site, shorts: list[str], tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.cpu() for k, v in tensors.items()}
        self.emit(site.name, tensors)
        w, act = site_linear(tensors, self.spec.bits, self.spec.group_size)
        layer.install(shorts, w.to(self.device), act)

    def _wna16(self, ql: QuantizedLinear) -> dict[str, torch.Tensor]:
        return layout.wna16_tensors(ql, self.dtype)

    # -- statistics passes

    def _observe(self, fn: Callable[[int, int], torch.Tensor | None], stats: _Stats | None, gram: bool) -> None:
        for a, b in self.chunks:
            x = fn(a, b)
            if stats is not None and x is not None:
                stats.add(x, gram, self._sub_rows(a, b))

    # -- per-group quantization (sequential methods)

    def _quantize_group_sequential(self, layer: _Layer, gname: str, group, st: _Stats) -> None:
        spec = self.spec
        s = None
        if spec.method == "int8_smoothquant" and gname in _NORM_OF:
            if self._covers(layer, gname, group):
                s = smoothquant_scales(st.abs_max, self._group_weight(layer, group), spec.smoothquant_alpha)
                s = self._fold_norm(layer, gname, s)
            else:
                log.warning("layer %d %s: not every projection is quantized; no smoothing", layer.idx, gname)
        x_sub = st.x_sub
        for site, shorts in group:
            t0 = time.time()
            w = self._site_weight(layer, shorts)
            extra: dict[str, Any] = {}
            if spec.method == "gptq":
                ql = gptq_quantize(w, st.gram, spec.bits, spec.group_size, spec.sym, spec.act_order,
                                   spec.static_groups, spec.damp_percent, spec.block_size, self.dtype)
                tensors = self._wna16(ql)
            elif spec.method == "int8_smoothquant":
                tensors = layout.int8_weight(w if s is None else w * s)
            else:  # fp8_static
                tensors = layout.fp8_weight(w, spec.fp8_per_channel)
                amax = float(st.abs_max.max())
                tensors["input_scale"] = torch.tensor([max(amax / FP8_MAX, SCALE_FLOOR)], dtype=torch.float32)
                extra["input_amax"] = amax
            self._emit_site(layer, site, shorts, tensors)
            self._record(layer, site, w, x_sub, s, t0, extra)

    def _layer_sequential(self, layer: _Layer, h: torch.Tensor) -> None:
        plan = self.plan.get(layer.idx, {})
        gram = self.spec.method == "gptq"

        def run_group(gname: str, fn: Callable[[int, int], torch.Tensor]) -> None:
            group = plan.get(gname)
            if not group:
                return
            st = _Stats()
            self._observe(fn, st, gram)
            self._quantize_group_sequential(layer, gname, group, st)

        run_group("attn_in", lambda a, b: layer.norm(h[a:b], "input_layernorm"))
        buf = {"attn": torch.empty(self.n, self.L, self.cfg.num_heads * self.cfg.head_dim, device=self.device)}

        def attn_fn(a: int, b: int) -> torch.Tensor:
            buf["attn"][a:b] = layer.attention(layer.norm(h[a:b], "input_layernorm"), self.cos, self.sin)
            return buf["attn"][a:b]

        if plan.get("o_in"):
            run_group("o_in", attn_fn)
        else:
            self._observe(attn_fn, None, False)
        for a, b in self.chunks:
            h[a:b] += layer.lin(buf["attn"][a:b], "self_attn.o_proj")
        buf.clear()
        run_group("mlp_in", lambda a, b: layer.norm(h[a:b], "post_attention_layernorm"))
        run_group("down_in", lambda a, b: layer.mlp_mid(layer.norm(h[a:b], "post_attention_layernorm")))
        for a, b in self.chunks:
            h[a:b] += layer.lin(layer.mlp_mid(layer.norm(h[a:b], "post_attention_layernorm")), "mlp.down_proj")

    # -- AWQ

    def _layer_awq(self, layer: _Layer, h: torch.Tensor) -> None:
        spec, plan = self.spec, self.plan.get(layer.idx, {})
        stats = {g: _Stats() for g in GROUP_ORDER if plan.get(g)}
        for a, b in self.chunks:
            sub = self._sub_rows(a, b)
            x = h[a:b]
            x1 = layer.norm(x, "input_layernorm")
            if "attn_in" in stats:
                stats["attn_in"].add(x1, True, sub)
            at = layer.attention(x1, self.cos, self.sin)
            if "o_in" in stats:
                stats["o_in"].add(at, True, sub)
            x = x + layer.lin(at, "self_attn.o_proj")
            del at, x1
            x2 = layer.norm(x, "post_attention_layernorm")
            if "mlp_in" in stats:
                stats["mlp_in"].add(x2, True, sub)
            mid = layer.mlp_mid(x2)
            if "down_in" in stats:
                stats["down_in"].add(mid, True, sub)
            h[a:b] = x + layer.lin(mid, "mlp.down_proj")  # the next layer's input: the float layer (AutoAWQ)
            del mid, x2, x

        all_shorts = {s for g in plan.values() for _, shorts in g for s in shorts}
        scales: dict[str, torch.Tensor] = {}
        alphas: dict[str, float] = {}

        def search(gname: str) -> torch.Tensor:
            st = stats[gname]
            s, alpha, loss = awq_search_scales(self._group_weight(layer, plan[gname]), st.gram,
                                               st.abs_sum / st.tokens, spec.bits, spec.group_size, spec.sym,
                                               spec.awq_grid, spec.awq_duo_scaling, self.dtype)
            alphas[gname] = alpha
            log.debug("AWQ layer %d %s: alpha %.2f, relative loss %.4g", layer.idx, gname, alpha, loss)
            return s

        def fold_rows(proj: str, s: torch.Tensor) -> None:
            layer.w[proj + ".weight"] = layer.w[proj + ".weight"] / s.unsqueeze(1)
            b = layer.w.get(proj + ".bias")
            if b is not None:
                layer.w[proj + ".bias"] = b / s

        # down: fold into up_proj rows (up is quantized afterwards, in its own site)
        if "down_in" in stats:
            if "mlp.up_proj" in all_shorts:
                scales["down_in"] = s = search("down_in")
                fold_rows("mlp.up_proj", s)
            else:
                log.warning("layer %d: up_proj is not quantized; down_proj gets no AWQ scales", layer.idx)
        if "mlp_in" in stats:
            if self._covers(layer, "mlp_in", plan["mlp_in"]):
                scales["mlp_in"] = self._fold_norm(layer, "mlp_in", search("mlp_in"))
            else:
                log.warning("layer %d: gate/up not both quantized; no AWQ scales for them", layer.idx)
        if "o_in" in stats:
            cfg = self.cfg
            if cfg.num_kv_heads == cfg.num_heads and "self_attn.v_proj" in all_shorts:
                scales["o_in"] = s = search("o_in")
                fold_rows("self_attn.v_proj", s)
        if "attn_in" in stats:
            if self._covers(layer, "attn_in", plan["attn_in"]):
                scales["attn_in"] = self._fold_norm(layer, "attn_in", search("attn_in"))
            else:
                log.warning("layer %d: q/k/v not all quantized; no AWQ scales for them", layer.idx)

        for gname in GROUP_ORDER:
            if gname not in stats:
                continue
            st, s = stats[gname], scales.get(gname)
            gram = st.gram if s is None else st.gram / s.unsqueeze(0) / s.unsqueeze(1)  # of the scaled input
            for site, shorts in plan[gname]:
                t0 = time.time()
                w_ref = self._site_weight(layer, shorts)
                w = w_ref if s is None else w_ref * s
                if spec.awq_clip:
                    rows = torch.cat([torch.full((layer.w[p + ".weight"].shape[0],),
                                                 p not in ("self_attn.q_proj", "self_attn.k_proj"),
                                                 dtype=torch.bool, device=self.device) for p in shorts])
                    w = awq_clip(w, gram, spec.bits, spec.group_size, spec.sym, rows, spec.awq_clip_grid,
                                 spec.awq_max_shrink, self.dtype)
                ql = quantize_groups(w, spec.bits, spec.group_size, spec.sym, self.dtype)
                self._emit_site(layer, site, shorts, self._wna16(ql))
                self._record(layer, site, w_ref, st.x_sub, s, t0, {"alpha": alphas.get(gname)})

    # -- driver

    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        t_start = time.time()
        spec = self.spec
        log.info("calibrating %s (%d-bit, group %d, %s) on %d x %d tokens, %d sites in %d layers", spec.method,
                 spec.bits, spec.group_size, "symmetric" if spec.sym else "asymmetric", self.n, self.L,
                 self.num_sites, len(self.plan))
        h = _embed(self.read, self.ids, self.device)
        last = max(self.plan) if self.plan else -1
        disable = True if self.progress is False else (False if self.progress is True else None)
        with tqdm(total=last + 1, desc=f"calibrate {spec.method}", unit="layer", disable=disable) as bar, \
                tqdm(total=self.num_sites, desc="quantize sites", unit="site", leave=False, disable=disable) as sbar:
            self._bar = sbar
            for i in range(last + 1):
                t0 = time.time()
                layer = _Layer(self.cfg, i, self.read, self.device)
                if i not in self.plan:
                    for a, b in self.chunks:
                        h[a:b] = layer.forward(h[a:b], self.cos, self.sin)
                elif spec.method == "awq":
                    self._layer_awq(layer, h)
                else:
                    self._layer_sequential(layer, h)
                del layer
                dt = time.time() - t0
                self.summary["layers"].append({"layer": i, "seconds": round(dt, 3)})
                log.info("calibration layer %d/%d done in %.1fs", i + 1, last + 1, dt)
                bar.update(1)
            self._bar = None
        errs = [v["rel_err"] for v in self.summary["sites"].values()]
        self.summary["seconds"] = round(time.time() - t_start, 3)
        self.summary["mean_rel_err"] = sum(errs) / len(errs) if errs else 0.0
        self.summary["max_rel_err"] = max(errs) if errs else 0.0
        log.info("%s: %d sites quantized in %.1fs, mean relative output error %.4g (max %.4g)", spec.method,
                 len(errs), self.summary["seconds"], self.summary["mean_rel_err"], self.summary["max_rel_err"])
        return self.summary


@torch.no_grad()
def calibrate_and_quantize(cfg: ModelConfig, read: Reader, calib_ids: torch.Tensor, qcfg: QuantSpec,
                           sites: list[Site], emit: Emit, progress: bool | Callable[[str, int, int], None] | None
                           = None, *, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Quantize ``sites`` with ``qcfg.method`` calibrated on ``calib_ids [N, L]``.

    ``emit(name, tensors)`` is called once per site with the op's internal-layout tensors (wna16 dict in the
    model dtype for gptq/awq; {weight, weight_scale} for int8_smoothquant, dynamic per-token activations;
    {weight, weight_scale, input_scale} for fp8_static), and once per changed norm weight
    (``{"weight": tensor}`` in the model dtype) for AWQ and SmoothQuant. ``progress``: None shows tqdm bars on
    a terminal, False hides them, True forces them; a callable is also called as (site name, done, total)
    after each site. Returns a summary (per-site relative output error on kept calibration rows, seconds)."""
    if calib_ids.dim() != 2 or calib_ids.numel() == 0:
        raise CalibrationError(f"calibration ids must be [num_samples, seq_len], got {tuple(calib_ids.shape)}")
    return _Calibrator(cfg, read, calib_ids, qcfg, sites, emit, progress, torch.device(device)).run()


def default_sites(cfg: ModelConfig, fused: bool = True) -> list[Site]:
    """The quantized linears of a Llama-family model: fused qkv/gate_up (as the compiler's fusion pass makes
    them) or one site per projection."""
    out = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."

        def src(m: str, x, p: str = p) -> tuple[str, ...]:
            return tuple(f"{p}{m}.{n}_proj.weight" for n in x)
        if fused:
            out += [Site(f"{p}self_attn.qkv_proj.weight", src("self_attn", "qkv")),
                    Site(f"{p}self_attn.o_proj.weight", src("self_attn", "o")),
                    Site(f"{p}mlp.gate_up_proj.weight", src("mlp", ("gate", "up"))),
                    Site(f"{p}mlp.down_proj.weight", src("mlp", ("down",)))]
        else:
            out += [Site(f"{p}self_attn.{n}_proj.weight", src("self_attn", n)) for n in "qkvo"]
            out += [Site(f"{p}mlp.{n}_proj.weight", src("mlp", (n,))) for n in ("gate", "up", "down")]
    return out
