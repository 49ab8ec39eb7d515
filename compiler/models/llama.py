"""Export-friendly decoder for the Llama family (Llama 1/2/3.x, Mistral, Qwen2), written with runtime.ops.

The forward works on the flattened token layout of one runtime step::

    input_ids: [T] int64   positions: [T] int64   logits_indices: [B] int64  ->  logits: [B, vocab]

It is written *unfused* (separate q/k/v and gate/up projections, add then RMSNorm, silu then multiply) so
the graph passes in ``compiler/passes`` have real work to do and each fusion can be switched off in the
recipe. Parameter names are Hugging Face's, so the weight plan maps them one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import runtime.ops  # noqa: F401  (registers torch.ops.spanda.*)
from compiler.models.config import ModelConfig

spanda = torch.ops.spanda


def _linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=bias)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spanda.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = _linear(h, cfg.num_heads * d, cfg.qkv_bias)
        self.k_proj = _linear(h, cfg.num_kv_heads * d, cfg.qkv_bias)
        self.v_proj = _linear(h, cfg.num_kv_heads * d, cfg.qkv_bias)
        self.o_proj = _linear(cfg.num_heads * d, h, cfg.o_bias)
        self.layer_idx = layer_idx
        self.cfg = cfg
        self.sliding_window = cfg.sliding_windows[layer_idx] if cfg.sliding_windows else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k = spanda.rotary_embedding(positions, q, k, cos_sin, c.head_dim)
        a = spanda.paged_attention(
            q, k, v, self.layer_idx, c.num_heads, c.num_kv_heads, c.head_dim, c.head_dim**-0.5,
            self.sliding_window,
        )
        return self.o_proj(a)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(h, i, cfg.mlp_bias)
        self.up_proj = _linear(h, i, cfg.mlp_bias)
        self.down_proj = _linear(i, h, cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), positions, cos_sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("rope_cos_sin", torch.empty(max_positions, cfg.head_dim, dtype=torch.float32))


class CausalLM(nn.Module):
    """The whole model. ``lm_head`` is absent when embeddings are tied (the graph reads embed_tokens)."""

    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg, max_positions)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, logits_indices: torch.Tensor
    ) -> torch.Tensor:
        m = self.model
        h = m.embed_tokens(input_ids)
        for layer in m.layers:
            h = layer(h, positions, m.rope_cos_sin)
        h = m.norm(h)[logits_indices]
        head = m.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        return F.linear(h, head)


def build_meta_model(cfg: ModelConfig, max_positions: int) -> CausalLM:
    """The model on the meta device in the config's dtype (the rope table stays float32)."""
    with torch.device("meta"):
        model = CausalLM(cfg, max_positions).to(cfg.torch_dtype)
        model.model.rope_cos_sin = model.model.rope_cos_sin.float()
    return model.eval()
