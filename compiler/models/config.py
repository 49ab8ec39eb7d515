"""Normalized model configuration, parsed from a Hugging Face ``config.json`` per family.

Never inferred from file or folder names: only the config's ``model_type`` and fields decide.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint's model type or one of its features is not supported by this Spanda."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model definition and the runtime need; recorded in the manifest as ``model.config``."""

    family: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    rope_scaling: dict[str, Any] | None = None
    sliding_windows: tuple[int | None, ...] = field(default=())  # per layer; None = full attention
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sliding_windows"] = list(self.sliding_windows)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["sliding_windows"] = tuple(d.get("sliding_windows", ()))
        return cls(**d)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def _rope_params(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either the classic fields or transformers 5's ``rope_parameters``."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", "default") != "default":
            scaling = params
    if scaling is not None:
        rtype = scaling.get("rope_type", scaling.get("type", "default"))
        if rtype not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope scaling type {rtype!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        scaling = {**scaling, "rope_type": rtype}
        if rtype == "default":
            scaling = None
    return float(theta if theta is not None else 10000.0), scaling


def _sliding_windows(cfg: dict[str, Any], family: str, n_layers: int, enforce: bool) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if not enforce or window is None:
        return (None,) * n_layers
    if family == "mistral":
        return (int(window),) * n_layers
    if family == "qwen2":
        layer_types = cfg.get("layer_types")
        if layer_types is None:
            use = cfg.get("use_sliding_window", False)
            first = cfg.get("max_window_layers", n_layers)
            layer_types = ["sliding_attention" if use and i >= first else "full_attention" for i in range(n_layers)]
        return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    return (None,) * n_layers


def parse_hf_config(cfg: dict[str, Any], dtype: str, options: dict[str, Any] | None = None) -> ModelConfig:
    """Normalize a Hugging Face config dict. Raises UnsupportedModelError naming what is not supported."""
    options = options or {}
    family = cfg.get("model_type")
    if family not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {family!r} is not supported; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or hidden // heads
    n_layers = int(cfg["num_hidden_layers"])
    theta, scaling = _rope_params(cfg)
    archs = cfg.get("architectures") or [f"{family.capitalize()}ForCausalLM"]
    if family == "llama":
        qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
    else:
        qkv_bias, o_bias = family == "qwen2", False
    return ModelConfig(
        family=family,
        architecture=archs[0],
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(options.get("max_position_embeddings") or cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)) if family == "llama" else False,
        rope_scaling=scaling,
        sliding_windows=_sliding_windows(cfg, family, n_layers, bool(options.get("sliding_window", True))),
        dtype=dtype,
    )


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[head_dim/2] float32 inverse frequencies, with the config's scaling applied (as transformers does)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s["rope_type"] == "linear":
        return inv / float(s["factor"])
    # llama3: scale low frequencies, keep high ones, interpolate between.
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin_cache(cfg: ModelConfig, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim] float32 = cat(cos, sin) over the half dimension."""
    inv = rope_inv_freq(cfg)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)
