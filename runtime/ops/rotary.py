"""Rotary position embedding (rotate-half / GPT-NeoX layout, as Hugging Face Llama, Mistral and Qwen2 use).

The cos/sin table is computed at build time (including Llama 3 and linear scaling) and shipped as a
buffer: ``cos_sin_cache: [max_positions, head_dim]`` float32 = cat(cos[:, :D/2], sin[:, :D/2]).
"""

from __future__ import annotations

import torch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos/sin: [T, 1, D/2] in x.dtype. out = x*cos + rotate_half(x)*sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotary_embedding_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [T] int64; q: [T, Hq*D]; k: [T, Hkv*D] -> rotated (q, k), same shapes and dtypes.

    Hugging Face rounds cos/sin to the activation dtype before the products; so do we.
    """
    cs = cos_sin_cache[positions].to(q.dtype)
    cos, sin = cs.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    t = q.shape[0]
    qr = _rotate(q.view(t, -1, head_dim), cos, sin).reshape(q.shape)
    kr = _rotate(k.view(t, -1, head_dim), cos, sin).reshape(k.shape)
    return qr, kr


@torch.library.custom_op("spanda::rotary_embedding", mutates_args=())
def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return rotary_embedding_ref(positions, q, k, cos_sin_cache, head_dim)


@rotary_embedding.register_fake
def _rotary_fake(positions, q, k, cos_sin_cache, head_dim):
    return torch.empty_like(q), torch.empty_like(k)
