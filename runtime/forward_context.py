"""Runtime-owned forward context: how the attention op reaches the KV cache and the step's metadata.

The exported graph never takes the KV cache as an input (DESIGN.md pitfall: export would functionalize the
in-place cache write and eager execution could clone the whole cache each call). Instead the executor sets a
:class:`ForwardContext` around each graph call, and ``spanda::paged_attention`` reads it by layer index.

Token layout of one step (all scheduled sequences concatenated)::

    tokens:          | seq0 chunk (q0 tokens) | seq1 chunk (q1 tokens) | ... |      T = sum(q_i)
    query_start_loc: [0, q0, q0+q1, ...]                                           B + 1 entries
    seq_lens:        context length of seq i *after* this step (cached + new tokens)
    slot_mapping[t]: block_table[i][pos // page] * page + pos % page   for token t at position pos
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Per-step attention metadata (device tensors plus host copies of the small index arrays).

    slot_mapping:    [T] int64, flat KV slot of each new token (see module docstring).
    query_start_loc: [B+1] int32, offsets of each sequence's tokens in the flat layout.
    seq_lens:        [B] int32, context length of each sequence including this step's tokens.
    block_tables:    [B, max_blocks] int32, KV block ids per sequence (rows padded with 0; padding is
                     never read because seq_lens bounds every access).
    query_start_loc_host / seq_lens_host: the same as Python lists, for host-side loops and launch sizes.
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc_host: list[int]
    seq_lens_host: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def max_query_len(self) -> int:
        q = self.query_start_loc_host
        return max((q[i + 1] - q[i] for i in range(len(q) - 1)), default=0)


class KVCaches(list):
    """The per-layer cache tensors of a runner, with ``scales``: each layer's (k_scale, v_scale) when the cache
    is quantized (fp8/int8), else None. The scales travel with the tensors, so every ForwardContext built over
    them (eager steps, CUDA-graph capture) sees them."""

    def __init__(self, caches: Iterable[torch.Tensor], scales: Sequence[tuple[float, float]] | None = None):
        super().__init__(caches)
        self.scales = None if scales is None else [(float(k), float(v)) for k, v in scales]
        if self.scales is not None and len(self.scales) != len(self):
            raise ValueError(f"{len(self.scales)} KV scale pairs for {len(self)} layers")


@dataclass
class ForwardContext:
    """kv_caches[layer]: [2, num_blocks, page_size, num_kv_heads, head_dim] (0 = keys, 1 = values).

    kv_scales[layer]: (k_scale, v_scale) Python floats of a quantized (fp8/int8) cache, passed to the kernels
    as launch arguments (constant per layer, so CUDA-graph capture bakes them in; no device reads, no syncs).
    None: taken from ``kv_caches.scales`` when it is a :class:`KVCaches`, else every scale is 1."""

    kv_caches: list[torch.Tensor]
    attn: AttentionMetadata
    kv_scales: Sequence[tuple[float, float]] | None = None

    def __post_init__(self) -> None:
        if self.kv_scales is None:
            self.kv_scales = getattr(self.kv_caches, "scales", None)

    def kv_scale(self, layer_idx: int) -> tuple[float, float]:
        """(k_scale, v_scale) of a layer's cache (1.0, 1.0 when the context carries none)."""
        return (1.0, 1.0) if self.kv_scales is None else self.kv_scales[layer_idx]


_CURRENT: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    if _CURRENT is None:
        raise RuntimeError(
            "spanda::paged_attention called outside a forward context: the runtime executor must wrap "
            "each graph call in runtime.forward_context.set_forward_context(...)"
        )
    return _CURRENT


@contextlib.contextmanager
def set_forward_context(ctx: ForwardContext) -> Iterator[None]:
    global _CURRENT
    prev, _CURRENT = _CURRENT, ctx
    try:
        yield
    finally:
        _CURRENT = prev
