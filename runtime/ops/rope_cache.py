"""RoPE fused with the KV-cache write, and attention over an already written cache.

``spanda::rope_and_cache(positions, q, k, v, cos_sin_cache, layer_idx, head_dim, num_kv_heads) -> q_rot``
rotates q and k, writes the rotated k and v into the layer's KV cache at the step's slots (from the
forward context; a slot < 0 writes nothing), and returns rotated q. The ``fuse_rope_kv_write`` pass puts it
in place of ``rotary_embedding`` + ``paged_attention`` (which wrote the cache itself), followed by
``spanda::paged_attention_cached``: one kernel instead of two and no round trip of the rotated keys.
"""

from __future__ import annotations

import torch

from runtime.forward_context import get_forward_context
from runtime.ops.attention import attend_ref, write_kv_ref
from runtime.ops.rotary import rotary_embedding_ref


def rope_and_cache_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                       head_dim: int, num_kv_heads: int, k_scale: float = 1.0, v_scale: float = 1.0
                       ) -> torch.Tensor:
    """q: [T, Hq*D], k/v: [T, Hkv*D]; kv_cache: [2, NB, page, Hkv, D] (written in place) -> q rotated.
    The rotated keys (in the activation dtype) and the values are quantized with k_scale/v_scale when the
    cache is fp8/int8."""
    qr, kr = rotary_embedding_ref(positions, q, k, cos_sin_cache, head_dim)
    t = q.shape[0]
    keep = slot_mapping >= 0
    write_kv_ref(kv_cache, kr.view(t, num_kv_heads, head_dim)[keep], v.reshape(t, num_kv_heads, head_dim)[keep],
                 slot_mapping[keep], k_scale, v_scale)
    return qr


@torch.library.custom_op("spanda::rope_and_cache", mutates_args=())
def rope_and_cache(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   cos_sin_cache: torch.Tensor, layer_idx: int, head_dim: int, num_kv_heads: int) -> torch.Tensor:
    ctx = get_forward_context()
    return rope_and_cache_ref(positions, q, k, v, cos_sin_cache, ctx.kv_caches[layer_idx], ctx.attn.slot_mapping,
                              head_dim, num_kv_heads, *ctx.kv_scale(layer_idx))


@rope_and_cache.register_fake
def _rope_and_cache_fake(positions, q, k, v, cos_sin_cache, layer_idx, head_dim, num_kv_heads):
    return torch.empty_like(q)


@torch.library.custom_op("spanda::paged_attention_cached", mutates_args=())
def paged_attention_cached(q: torch.Tensor, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
                           scale: float, sliding_window: int | None) -> torch.Tensor:
    """Like spanda::paged_attention, but this step's keys/values are already in the cache. q: [T, Hq*D]."""
    ctx = get_forward_context()
    t = q.shape[0]
    out = attend_ref(q.view(t, num_heads, head_dim), ctx.kv_caches[layer_idx], ctx.attn, scale, sliding_window,
                     *ctx.kv_scale(layer_idx))
    return out.view(t, num_heads * head_dim)


@paged_attention_cached.register_fake
def _paged_attention_cached_fake(q, layer_idx, num_heads, num_kv_heads, head_dim, scale, sliding_window):
    return torch.empty_like(q)
