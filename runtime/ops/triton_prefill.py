"""Prefill / extend attention over the paged KV cache: variable query lengths, causal, GQA packed in rows.

Grid ``(Hkv, n_tiles, B)``, n_tiles = ceil(max_query_len / BLOCK_Q), BLOCK_Q = BLOCK_M // G: one program
takes BLOCK_Q query tokens of sequence b times the G query heads of KV head h as the BLOCK_M rows of its
tile (row r = token r // G, head h*G + r % G), so each K/V tile is loaded once for the whole group::

    sequence b: context [0, seq_len); this step's queries sit at positions seq_len - q_len .. seq_len - 1
                (the cached prefix 0 .. seq_len - q_len - 1 was written by earlier steps)
    tile t (tokens t*BLOCK_Q ..): q positions [q_lo, q_hi), keys needed: [lo, q_hi)
        [lo, full_hi)  every row sees every key      -> no mask (skipped when a window is set)
        [full_hi, q_hi) diagonal                     -> mask key_pos <= q_pos (and > q_pos - window)
    key position pos -> slot block_tables[b, pos // page] * page + pos % page, gathered per row of a tile

An fp8/int8 cache: K/V tiles are widened to q's dtype after the load, the key scale is folded into ``scale``
by the caller and the value scale multiplies the output (``v_scale``).

Tiles are issued longest first (tile index reversed) so the causal tail does not straggle. Programs whose
tile lies past their sequence's query length exit at once (the grid is sized from the host's longest
query, so no host synchronization is needed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 2


DEFAULT = PrefillConfig()
# (block_m, block_n, num_warps, num_stages). sm_90, triton 3.6: 128x64x8 warps 188 registers, 98 KB shared;
# 128x128x8 warps 255 registers (no spills), 164 KB. Default: the H100 winner at 8k causal, 32/8 heads, d 128.
CONFIGS = [PrefillConfig(*c) for c in ((128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (128, 128, 8, 2),
                                       (128, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3))]
PINNED: dict[tuple, PrefillConfig] = {}


def prefill_key(num_heads: int, num_kv_heads: int, head_dim: int, page: int, dtype: torch.dtype) -> tuple:
    return ("prefill", num_heads, num_kv_heads, head_dim, page, str(dtype).removeprefix("torch."))


def select_config(key: tuple) -> PrefillConfig:
    return PINNED.get(key, DEFAULT)


@triton.jit
def _attend_tile(acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, bt_row, kv_col, d_mask, q_pos, start, kv_hi,
                 page, window, stride_cslot, scale_log2,
                 BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """One online-softmax step over keys [start, start + BLOCK_N). Unmasked: all keys < kv_hi and visible
    to every row. Masked: keys >= kv_hi are not read (their slots may hold garbage), causal/window mask."""
    pos = start + tl.arange(0, BLOCK_N)
    if MASKED:
        in_ctx = pos < kv_hi
        blk = tl.load(bt_row + pos // page, mask=in_ctx, other=0)
        kv_mask = in_ctx[:, None] & d_mask[None, :]
    else:
        blk = tl.load(bt_row + pos // page)
        kv_mask = d_mask[None, :]
    slot = blk.to(tl.int64) * page + pos % page
    offs = slot[:, None] * stride_cslot + kv_col[None, :]
    k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0).to(q.dtype)  # fp8/int8 cache: widened (exact)
    qk = tl.dot(q, tl.trans(k)) * scale_log2
    if MASKED:
        keep = pos[None, :] <= q_pos[:, None]
        if HAS_WINDOW:
            keep = keep & (pos[None, :] > q_pos[:, None] - window)
        qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_sub = m_new
    if MASKED:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet: p = 0, not NaN
    p = tl.math.exp2(qk - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, qsl_ptr, out_ptr,
    stride_qt, stride_qh, stride_cslot, stride_bt, stride_ot, stride_oh,
    page, group, head_dim, window, scale_log2, v_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    h = tl.program_id(0)
    tile = tl.num_programs(1) - 1 - tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    block_q = BLOCK_M // group
    if tile * block_q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx_off = seq_len - q_len

    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, D_PAD)
    d_mask = d < head_dim
    qi = tile * block_q + r // group
    row_ok = (r < block_q * group) & (qi < q_len)
    q_pos = ctx_off + qi
    head = h * group + r % group
    tok = (q_start + qi).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_mask[None, :], other=0.0)

    q_lo = ctx_off + tile * block_q
    q_hi = tl.minimum(q_lo + block_q, seq_len)
    lo = 0
    full_hi = (q_lo + 1) // BLOCK_N * BLOCK_N  # keys [0, full_hi) are visible to every row
    if HAS_WINDOW:
        lo = tl.maximum(q_lo - window + 1, 0) // BLOCK_N * BLOCK_N
        full_hi = lo

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    kv_col = h * head_dim + d
    for start in range(lo, full_hi, BLOCK_N):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, bt_row, kv_col, d_mask, q_pos,
                                     start, q_hi, page, window, stride_cslot, scale_log2, BLOCK_N, False, HAS_WINDOW)
    for start in range(full_hi, q_hi, BLOCK_N):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, bt_row, kv_col, d_mask, q_pos,
                                     start, q_hi, page, window, stride_cslot, scale_log2, BLOCK_N, True, HAS_WINDOW)
    o = acc * v_scale / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])


def prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                      query_start_loc: torch.Tensor, max_query_len: int, scale: float, sliding_window: int | None,
                      out: torch.Tensor, cfg: PrefillConfig | None = None, v_scale: float = 1.0) -> torch.Tensor:
    """q: [T, Hq, D] (last dim contiguous), kv_cache: [2, NB, page, Hkv, D] contiguous (already holding this
    step's keys/values), block_tables: [B, W] int32, seq_lens: [B] int32, query_start_loc: [B+1] int32;
    max_query_len: host bound on the query lengths (sizes the grid only). Writes out: [T, Hq, D].
    An fp8/int8 cache: the key scale folded into ``scale``, the value scale in ``v_scale``."""
    _, num_heads, head_dim = q.shape
    _, _, page, num_kv_heads, _ = kv_cache.shape
    num_seqs = seq_lens.shape[0]
    group = num_heads // num_kv_heads
    if cfg is None:
        cfg = select_config(prefill_key(num_heads, num_kv_heads, head_dim, page, kv_cache.dtype))
    block_m = max(cfg.block_m, triton.next_power_of_2(group), 16)
    block_q = block_m // group
    if num_seqs == 0 or max_query_len == 0:
        return out
    grid = (num_kv_heads, triton.cdiv(max_query_len, block_q), num_seqs)
    _prefill_kernel[grid](
        q, kv_cache[0], kv_cache[1], block_tables, seq_lens, query_start_loc, out,
        q.stride(0), q.stride(1), kv_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1),
        page, group, head_dim, sliding_window or 0, scale * 1.4426950408889634, float(v_scale),
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, D_PAD=max(16, triton.next_power_of_2(head_dim)),
        HAS_WINDOW=bool(sliding_window),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
