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
from collections.abc import Iterator
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


@dataclass
class ForwardContext:
    """kv_caches[layer]: [2, num_blocks, page_size, num_kv_heads, head_dim] (0 = keys, 1 = values)."""

    kv_caches: list[torch.Tensor]
    attn: AttentionMetadata


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
