"""The float32 forward that calibration and the accuracy gates run, one decoder layer at a time (its weights read
lazily by Hugging Face name, so memory is bounded by one layer): _Layer, the quantized sites installed as the
weights dequantized from the emitted tensors with W8A8's activation quantization emulated (site_linear), and
model_nll / perplexity over token chunks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from compiler.models.config import ModelConfig, rope_cos_sin_cache
from compiler.quantize.spec import CalibrationError, Reader, Site
from runtime.ops.quant_linear import FP8_MAX, INT8_MAX, SCALE_FLOOR, dequantize_wna16


def _int8_act(x: torch.Tensor) -> torch.Tensor:
    s = (x.abs().amax(-1, keepdim=True) / INT8_MAX).clamp_min(SCALE_FLOOR)
    return torch.round(x / s).clamp(-INT8_MAX, INT8_MAX) * s


def _fp8_act(scale: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    sc = float(scale.reshape(-1)[0])

    def act(x: torch.Tensor) -> torch.Tensor:
        return (x / sc).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * sc

    return act


def _fp8_act_dynamic(x: torch.Tensor) -> torch.Tensor:
    s = (x.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(SCALE_FLOOR)
    return (x / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s


def site_linear(tensors: dict[str, torch.Tensor], bits: int | None = None, group_size: int | None = None
                ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor] | None]:
    """What a quantized op computes, from its internal-layout tensors: (float32 weight ``[N, K]`` in the
    input's channel order, activation quantize-dequantize or None). wna16 needs ``bits``/``group_size``."""
    if "qweight" in tensors:
        if bits is None or group_size is None:
            raise CalibrationError("wna16 tensors need bits and group_size")
        w = dequantize_wna16(tensors["qweight"], tensors["scales"], tensors["zeros"], bits, group_size)
        perm = tensors.get("perm")
        if perm is not None:
            full = torch.empty_like(w)
            full[perm.long()] = w
            w = full
        return w.t().contiguous(), None
    weight, wscale = tensors["weight"], tensors["weight_scale"]
    w = weight.float() * wscale.float().reshape(-1, 1)
    if weight.dtype == torch.int8:
        if tensors.get("input_scale") is not None:
            sc = float(tensors["input_scale"].reshape(-1)[0])
            return w, lambda x: torch.round(x / sc).clamp(-INT8_MAX, INT8_MAX) * sc
        return w, _int8_act
    if tensors.get("input_scale") is not None:
        return w, _fp8_act(tensors["input_scale"])
    return w, _fp8_act_dynamic


_SOURCE_RE = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight$")
_GROUP_OF = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in", "gate": "mlp_in", "up": "mlp_in",
             "down": "down_in"}
GROUP_ORDER = ("attn_in", "o_in", "mlp_in", "down_in")
_NORM_OF = {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"}


def _parse_source(name: str) -> tuple[int, str, str]:
    m = _SOURCE_RE.match(name)
    if not m:
        raise CalibrationError(f"site source {name!r} is not a decoder-layer projection weight "
                               "(model.layers.N.self_attn|mlp.X_proj.weight)")
    return int(m.group(1)), f"{m.group(2)}.{m.group(3)}_proj", _GROUP_OF[m.group(3)]


class _Layer:
    """One decoder layer in float32: weights by short name ('self_attn.q_proj.weight', ...), and per
    projection an optional activation quantize-dequantize (W8A8 emulation)."""

    def __init__(self, cfg: ModelConfig, idx: int, read: Reader, device: torch.device):
        self.cfg, self.idx, self.device = cfg, idx, device
        self.prefix = f"model.layers.{idx}."
        names = ["input_layernorm.weight", "post_attention_layernorm.weight"]
        names += [f"self_attn.{p}_proj.weight" for p in "qkvo"]
        names += [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        if cfg.qkv_bias:
            names += [f"self_attn.{p}_proj.bias" for p in "qkv"]
        if cfg.o_bias:
            names.append("self_attn.o_proj.bias")
        if cfg.mlp_bias:
            names += [f"mlp.{p}_proj.bias" for p in ("gate", "up", "down")]
        self.w = {n: read(self.prefix + n).to(device=device, dtype=torch.float32) for n in names}
        self.act: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        self.window = cfg.sliding_windows[idx] if cfg.sliding_windows else None

    def lin(self, x: torch.Tensor, proj: str) -> torch.Tensor:
        a = self.act.get(proj)
        y = (a(x) if a is not None else x) @ self.w[proj + ".weight"].t()
        b = self.w.get(proj + ".bias")
        return y if b is None else y + b

    def norm(self, x: torch.Tensor, which: str) -> torch.Tensor:
        w = self.w[which + ".weight"]
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps))

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        n, L, _ = x.shape
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        q = self.lin(x, "self_attn.q_proj").view(n, L, nh, hd).transpose(1, 2)
        k = self.lin(x, "self_attn.k_proj").view(n, L, nkv, hd).transpose(1, 2)
        v = self.lin(x, "self_attn.v_proj").view(n, L, nkv, hd).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if nkv != nh:
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        if self.window is not None and self.window < L:
            pos = torch.arange(L, device=x.device)
            d = pos.view(-1, 1) - pos.view(1, -1)
            mask = (d >= 0) & (d < self.window)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd**-0.5)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=hd**-0.5)
        return o.transpose(1, 2).reshape(n, L, nh * hd)

    def mlp_mid(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.lin(x, "mlp.gate_proj")) * self.lin(x, "mlp.up_proj")

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.lin(self.attention(self.norm(h, "input_layernorm"), cos, sin), "self_attn.o_proj")
        return h + self.lin(self.mlp_mid(self.norm(h, "post_attention_layernorm")), "mlp.down_proj")

    def install(self, short_sources: Sequence[str], weight: torch.Tensor,
                act: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """Replace the float weights of the site's projections by the site's (dequantized) weight rows."""
        start = 0
        for proj in short_sources:
            rows = self.w[proj + ".weight"].shape[0]
            self.w[proj + ".weight"] = weight[start:start + rows].to(self.device)
            start += rows
            if act is None:
                self.act.pop(proj, None)
            else:
                self.act[proj] = act
        if start != weight.shape[0]:
            raise CalibrationError(f"layer {self.idx}: site weight has {weight.shape[0]} rows, sources {start}")


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _cos_sin(cfg: ModelConfig, L: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    cs = rope_cos_sin_cache(cfg, L).to(device)
    cos, sin = cs.chunk(2, dim=-1)
    return cos, sin


def _embed(read: Reader, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    emb = read("model.embed_tokens.weight")
    return emb[ids.long().cpu()].to(device=device, dtype=torch.float32)


def _head(cfg: ModelConfig, read: Reader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    norm = read("model.norm.weight").to(device=device, dtype=torch.float32)
    head = read("model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight")
    return norm, head.to(device=device, dtype=torch.float32)


def _chunks(n: int, L: int, chunk_tokens: int) -> list[tuple[int, int]]:
    step = max(1, chunk_tokens // max(L, 1))
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def _site_layout(sites: Sequence[Site], num_layers: int) -> dict[int, dict[str, list[tuple[Site, list[str]]]]]:
    """layer -> group -> [(site, short source names)]."""
    out: dict[int, dict[str, list[tuple[Site, list[str]]]]] = {}
    seen: dict[str, str] = {}
    for site in sites:
        parsed = [_parse_source(s) for s in site.sources]
        layers = {p[0] for p in parsed}
        groups = {p[2] for p in parsed}
        if len(layers) != 1 or len(groups) != 1:
            raise CalibrationError(f"site {site.name}: sources {site.sources} do not share one layer and input")
        (layer,), (group,) = layers, groups
        if layer >= num_layers:
            raise CalibrationError(f"site {site.name}: layer {layer} >= num_layers {num_layers}")
        for s in site.sources:
            if s in seen:
                raise CalibrationError(f"{s} is a source of both {seen[s]} and {site.name}")
            seen[s] = site.name
        out.setdefault(layer, {}).setdefault(group, []).append((site, [p[1] for p in parsed]))
    return out


def _apply_overrides(layer: _Layer, emitted: dict[str, dict[str, torch.Tensor]],
                     plan: dict[str, list[tuple[Site, list[str]]]], bits: int | None, group_size: int | None) -> None:
    for name, tensors in emitted.items():
        if not name.startswith(layer.prefix):
            continue
        short = name[len(layer.prefix):]
        if short in layer.w and set(tensors) == {"weight"}:  # a float tensor a method changed (norm weights)
            layer.w[short] = tensors["weight"].to(layer.device, torch.float32)
    for group in plan.values():
        for site, shorts in group:
            if site.name in emitted:
                w, act = site_linear(emitted[site.name], bits, group_size)
                layer.install(shorts, w, act)


@torch.no_grad()
def model_nll(cfg: ModelConfig, read: Reader, ids: torch.Tensor, *, emitted: dict[str, dict[str, torch.Tensor]]
              | None = None, sites: Sequence[Site] = (), bits: int | None = None, group_size: int | None = None,
              device: str | torch.device = "cpu", chunk_tokens: int = 4096, return_logits: bool = False):
    """Layer-by-layer float32 forward of ``ids [N, L]`` (whole rows, causal, positions 0..L-1).

    With ``emitted`` (site name -> internal-layout tensors, and replaced norm weights by name) the
    quantized model is evaluated as the runtime computes it. Returns (sum of next-token NLL, number of
    predicted tokens), or the logits ``[N, L, V]`` with ``return_logits``."""
    device = torch.device(device)
    emitted = emitted or {}
    n, L = ids.shape
    plan = _site_layout(sites, cfg.num_layers)
    cos, sin = _cos_sin(cfg, L, device)
    h = _embed(read, ids, device)
    for i in range(cfg.num_layers):
        layer = _Layer(cfg, i, read, device)
        _apply_overrides(layer, emitted, plan.get(i, {}), bits, group_size)
        for a, b in _chunks(n, L, chunk_tokens):
            h[a:b] = layer.forward(h[a:b], cos, sin)
        del layer
    norm_w, head = _head(cfg, read, device)
    logits_all, nll, count = [], 0.0, 0
    tgt = ids.to(device).long()
    for a, b in _chunks(n, L, chunk_tokens):
        hn = norm_w * (h[a:b] * torch.rsqrt(h[a:b].pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))
        logits = hn @ head.t()
        if return_logits:
            logits_all.append(logits.cpu())
            continue
        lp = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt[a:b, 1:].reshape(-1),
                             reduction="sum")
        nll += float(lp.double())
        count += (b - a) * (L - 1)
    if return_logits:
        return torch.cat(logits_all)
    return nll, count


def perplexity(cfg: ModelConfig, read: Reader, ids: torch.Tensor, **kw) -> float:
    """exp(mean next-token NLL) over all rows of ``ids`` (see model_nll for the keyword arguments)."""
    nll, count = model_nll(cfg, read, ids, **kw)
    return math.exp(nll / count)
