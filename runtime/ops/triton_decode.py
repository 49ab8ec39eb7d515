"""Flash-decoding over the paged KV cache: one query token per sequence, GQA-aware, split context.

Work split (grid ``(Hkv, B, S)``, S = number of splits)::

    sequence b, KV head h: context positions [lo, seq_len)          lo = max(0, seq_len - window) or 0
        split s covers [lo + s*per, lo + (s+1)*per) ∩ [lo, seq_len),  per = ceil(ceil(span / S) / BLOCK_N) * BLOCK_N
        one program = (h, b, s): the G = Hq/Hkv query heads of h as the rows of a [G_PAD, D] tile,
        so each K/V page of (b, h) is read once for all its query heads.

    a tile of BLOCK_N context positions gathers its pages through the block table:
        pos -> block_tables[b, pos // page] * page + pos % page   (a KV "slot"; page < BLOCK_N reads
        several pages per tile, page > BLOCK_N reads part of one; the page size is a compile-time constant,
        so // and % are shifts and masks)

Each split keeps a running (max m, sum l, unnormalised acc) in float32 with base-2 exponents; with S > 1
it writes them to partial buffers and ``_decode_reduce_kernel`` merges them:
``out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s``. With S == 1 the split writes ``out`` itself.
The split boundaries are computed on the device from ``seq_lens``, so S is the only host decision and a
captured CUDA graph stays correct as contexts grow. S is sized for the longest context the launch allows (a
decode graph's: the model's), so a short context leaves most splits empty and still pays for their merge. With
``DYNAMIC_SPLITS`` a sequence whose context fits one split's minimum work (``span <= BLOCK_N * min_split``)
uses one split: the other programs of (b, h) return at once, the one left writes ``out`` itself and the
reduce (or the serial merge) skips b. At batch 1 and a short context that is one program per KV head and no
merge at all; a longer context keeps all S splits (fewer would lengthen each program's run of tiles).

Launched with PDL (runtime/ops/pdl.py) the kernel waits for the previous one (rope_and_cache, which writes the
step's token into the cache) before it touches memory. With ``EARLY_LOADS`` it first reads what earlier steps
and the step's inputs wrote: the sequence's bounds, its first tile's block-table entries and K / V (the whole
context at a short one) and the new token's slot; after the wait only q and the new token's K / V row, which
replaces that position in the tile. The chain of dependent loads (bounds, block table, K, V) then runs while the
previous kernel does.

An fp8/int8 cache reads half the bytes of a bf16 one: the key scale is folded into ``scale`` by the caller
and the value scale multiplies the output (``v_scale``). Both dots then run in float16 (``WIDE16``): q is
rounded to float16 (clamped to its range), the codes widen to float16 exactly, and p (in [0, 1]) is rounded to
float16 instead of bf16. K's codes widen after Triton moves them into the dot-operand layout (ldmatrix
reads them in pairs along D, then one ``cvt`` per two codes; on an H200 that beats widening them as loaded).
V's cannot: its operand pairs run along the context, bytes a row apart, so that layout change reads V one
byte per element. So on a GPU (sm_89+, ``ASM``) V widens in the layout it was loaded in (each thread's codes
contiguous along D), by an asm block per four codes (``_codes_f16``: two ``cvt.rn.f16x2.e4m3x2`` for E4M3;
for int8 the exponent trick, 1024 + 128 + c in float16's bits minus 1152), and the float16 tile reaches the
dot through shared memory and ldmatrix like a bf16 cache's. The asm block is marked impure only so that
Triton cannot move the layout change ahead of it.
Without it (the interpreter, older GPUs) the codes widen with ``.to(float16)``.
On an H200 (batch 64, context 4096, 8 KV heads of 128) this took an E4M3 cache from 340 us (the kernel before:
bf16 dots, widening after the layout change, a run-time page size; default config) to 190 us with
DEFAULT_8BIT and 184 us tuned; a bf16 cache takes 255 us tuned. 8-bit
caches want two K/V buffers per program (num_stages 5, ``DEFAULT_8BIT``): the loop is short enough that the
bytes in flight, not the instructions, set the rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from runtime.ops.pdl import capability, launch_kwargs
from runtime.ops.triton_gemm import LOCK_SLOTS, _locks, pdl_enter


@dataclass(frozen=True)
class DecodeConfig:
    """block_n: context positions per tile; programs_per_sm: the split count aims at
    ``programs_per_sm * SMs`` programs (capped so each split has >= min_split tiles of work)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 16
    min_split: int = 4


DEFAULT = DecodeConfig()
# an fp8/int8 cache (module docstring; bench/results/attention-kv-8bit-sweep-h200.json)
DEFAULT_8BIT = DecodeConfig(64, 4, 5, programs_per_sm=2)
# The grid a build-time tuner sweeps (see triton_attention.tune); the winners are pinned per key.
# num_stages: the block-table load takes a pipeline stage of its own before the K/V loads; triton 3.6 for
# sm_90 gave one K/V buffer at num_stages 3 and 4 and two at 5 (39 KB vs 72 KB shared at block_n 64).
CONFIGS = [DecodeConfig(bn, w, st) for bn in (32, 64, 128) for w in (4, 8) for st in (3, 5)] + [
    DecodeConfig(programs_per_sm=pps) for pps in (2, 4, 8, 32)] + [DecodeConfig(min_split=ms) for ms in (2, 8)] + [
    DecodeConfig(64, 4, 5, programs_per_sm=pps) for pps in (2, 4)] + [DecodeConfig(128, 4, 5, programs_per_sm=2)]
PINNED: dict[tuple, DecodeConfig] = {}
WIDEN_ASM = True  # an 8-bit cache on sm_89+: _codes_f16 (False: .to(), for A/B timing only)
MAX_SPLITS = 128  # the reduction loads all splits of a head at once: [S_PAD, D_PAD] float32
# Up to SERIAL_MAX_SPLITS splits, the last split program of a (sequence, KV head) to finish merges the partials
# itself (_serial_merge, counted on triton_gemm's serial split-K counters) instead of a _decode_reduce_kernel
# launch after the split kernel: one kernel fewer per layer and decode step. Off: slower where it was meant to help.
# 8B W4A16+lm_head engine on one H100 (bench/results/pdl-decode-fusions-8b-h100.json, with that run's GEMM fusions
# on), GPU time of one decode-graph replay: batch 1 2.640 ms against 2.449 / 2.443 with the reduce launch, batch 2
# 2.715 against 2.545; batch 4 2.631 against 2.696, batch 16 2.830 against 2.844. The merge (an acq_rel atomic,
# then up to 16 partials read back) lands on the critical path of the last split, where the reduce launch under
# PDL overlapped the split kernel's tail.
SERIAL_REDUCE = False
SERIAL_MAX_SPLITS = 16
# One split for a sequence whose context fits one split's minimum work, decided on the device (module docstring).
# Off: correct on the H100 (tests/test_triton_attention.py's GPU test), but the 8B engines were no faster with
# it (bf16 5.971 against 5.968 ms, W4A16 2.246 against 2.214 per batch-1 step: the reduce launch was already
# overlapped under PDL; bench/results/pdl-epilogues-8b-h100.json, bench/pdl_auto.py's dyn-attn setting).
DYNAMIC_SPLITS = False
# Under PDL, each split's first K / V tile read before the wait for the previous kernel (module docstring). Off:
# correct on the H100, and no faster there with triton_rope_cache.EARLY_LOADS (8B W4A16+lm_head engine, GPU time
# of one batch-1 decode-graph replay 2.210 ms against 2.209 / 2.184 without; bench/results/pdl-l2pf-early-8b-h100
# .json). Kept for the A/B with pdl.TRIGGER 3 (bench/pdl_auto.py's trigger3-early), where the attention kernels
# are resident earlier.
EARLY_LOADS = False


def _pow2_bucket(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def decode_key(num_seqs: int, max_ctx: int, num_heads: int, num_kv_heads: int, head_dim: int, page: int,
               dtype: torch.dtype) -> tuple:
    """Tuning key: the static shape plus power-of-two buckets of batch and longest context."""
    return ("decode", num_heads, num_kv_heads, head_dim, page, str(dtype).removeprefix("torch."),
            _pow2_bucket(num_seqs), _pow2_bucket(max_ctx))


def select_config(key: tuple) -> DecodeConfig:
    """The pinned config for ``key``, else the nearest pinned one of the same static shape, else DEFAULT (or
    DEFAULT_8BIT for an fp8/int8 cache)."""
    if key in PINNED:
        return PINNED[key]
    same = [k for k in PINNED if k[:6] == key[:6]]
    if same:
        best = min(same, key=lambda k: abs(k[6].bit_length() - key[6].bit_length())
                   + abs(k[7].bit_length() - key[7].bit_length()))
        return PINNED[best]
    return DEFAULT_8BIT if key[5] in ("float8_e4m3fn", "int8") else DEFAULT


def num_splits(cfg: DecodeConfig, num_seqs: int, num_kv_heads: int, max_ctx: int, num_sms: int) -> int:
    """Splits per (sequence, KV head): enough programs to fill the chip, each with >= min_split tiles."""
    want = triton.cdiv(cfg.programs_per_sm * num_sms, max(1, num_seqs * num_kv_heads))
    cap = max(1, triton.cdiv(max_ctx, cfg.block_n * cfg.min_split))
    return int(max(1, min(want, cap, MAX_SPLITS)))


@triton.jit
def _codes_f16(x, INT8: tl.constexpr):
    """uint8 codes (E4M3, or int8 with INT8) -> float16, exact; four codes per asm block (one 32-bit register).
    Not pure on purpose (see the module docstring)."""
    if INT8:
        asm: tl.constexpr = """{
        .reg .b32 t, lo, hi, m;
        xor.b32 t, $2, 0x80808080;
        prmt.b32 lo, t, 0x64646464, 0x4140;
        prmt.b32 hi, t, 0x64646464, 0x4342;
        mov.b32 m, 0x64806480;
        sub.rn.f16x2 $0, lo, m;
        sub.rn.f16x2 $1, hi, m;
        }"""
    else:
        asm: tl.constexpr = """{
        .reg .b16 lo, hi;
        mov.b32 {lo, hi}, $2;
        cvt.rn.f16x2.e4m3x2 $0, lo;
        cvt.rn.f16x2.e4m3x2 $1, hi;
        }"""
    return tl.inline_asm_elementwise(asm=asm, constraints="=r,=r,r", args=[x], dtype=tl.float16, is_pure=False,
                                     pack=4)


@triton.jit
def _kv_at(k_cache_ptr, v_cache_ptr, offs, mask, ASM: tl.constexpr, INT8: tl.constexpr, QDT: tl.constexpr):
    """K and V at the cache offsets offs (any shape), in QDT."""
    k = tl.load(k_cache_ptr + offs, mask=mask, other=0.0).to(QDT)  # q's dtype (float16): exact
    if ASM:  # V's bytes, widened by _codes_f16 in the layout they were loaded in (module docstring)
        v = _codes_f16(tl.load(v_cache_ptr.to(tl.pointer_type(tl.uint8)) + offs, mask=mask, other=0), INT8)
    else:
        v = tl.load(v_cache_ptr + offs, mask=mask, other=0.0).to(QDT)
    return k, v


@triton.jit
def _load_kv(k_cache_ptr, v_cache_ptr, bt_row, start, s_hi, stride_cslot, kv_col, d_mask, PAGE: tl.constexpr,
             BLOCK_N: tl.constexpr, ASM: tl.constexpr, INT8: tl.constexpr, QDT: tl.constexpr):
    """The K / V tile of context positions [start, start + BLOCK_N) ∩ [.., s_hi) through the block table, in QDT;
    and the mask of the positions in range."""
    pos = start + tl.arange(0, BLOCK_N)
    valid = pos < s_hi
    blk = tl.load(bt_row + pos // PAGE, mask=valid, other=0)
    slot = blk.to(tl.int64) * PAGE + pos % PAGE
    offs = slot[:, None] * stride_cslot + kv_col[None, :]
    k, v = _kv_at(k_cache_ptr, v_cache_ptr, offs, valid[:, None] & d_mask[None, :], ASM, INT8, QDT)
    return k, v, valid


@triton.jit
def _attend_tile(q, k, v, valid, m_i, l_i, acc, scale_log2):
    """One K / V tile into the running (m, l, acc) of the split (base-2 online softmax)."""
    qk = tl.dot(q, tl.trans(k)) * scale_log2
    qk = tl.where(valid[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, qsl_ptr,
    out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, lock_ptr,
    stride_qt, stride_qh, stride_cslot, stride_bt, stride_ot, stride_oh,
    PAGE: tl.constexpr, group, head_dim, window, n_splits, scale_log2, v_scale,
    G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, SPLIT: tl.constexpr,
    PDL: tl.constexpr = False, WIDE16: tl.constexpr = False, ASM: tl.constexpr = False,
    INT8: tl.constexpr = False, SERIAL: tl.constexpr = False, S_PAD: tl.constexpr = 1,
    SPLIT_SPAN: tl.constexpr = 0, EARLY: tl.constexpr = False,
):
    if PDL and not EARLY:  # programmatic dependent launch (runtime/ops/pdl.py): nothing is touched before this
        pdl_enter(PDL)
    h = tl.program_id(0)
    b = tl.program_id(1)
    s = tl.program_id(2)
    tok = tl.load(qsl_ptr + b)
    if tl.load(qsl_ptr + b + 1) == tok:  # no query token for this sequence this step
        return
    seq_len = tl.load(seq_lens_ptr + b)
    lo = _context_lo(seq_len, window, HAS_WINDOW)
    n_eff = _splits_used(seq_len - lo, n_splits, SPLIT_SPAN)
    if s >= n_eff:  # this sequence uses one split (DYNAMIC_SPLITS)
        return
    per = tl.cdiv(tl.cdiv(seq_len - lo, n_eff), BLOCK_N) * BLOCK_N
    s_lo = lo + s * per
    s_hi = tl.minimum(s_lo + per, seq_len)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    g_mask = g < group
    d_mask = d < head_dim
    head = h * group + g
    QDT: tl.constexpr = tl.float16 if WIDE16 else q_ptr.dtype.element_ty
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    kv_col = h * head_dim + d
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    first = s_lo
    if EARLY:
        # EARLY (module docstring): the split's first tile and the new token's slot are read before the wait for
        # the previous kernel (they come from earlier steps and the step's inputs), then the new token's K / V
        # row, which that kernel (rope_and_cache) wrote, after it
        k0, v0, valid0 = _load_kv(k_cache_ptr, v_cache_ptr, bt_row, s_lo, s_hi, stride_cslot, kv_col, d_mask, PAGE,
                                  BLOCK_N, ASM, INT8, QDT)
        last = seq_len - 1
        new_slot = tl.load(bt_row + last // PAGE).to(tl.int64) * PAGE + last % PAGE
        if PDL:
            pdl_enter(PDL)
        mine = (last >= s_lo) & (last < s_lo + BLOCK_N)  # the new token is in this first tile
        k_new, v_new = _kv_at(k_cache_ptr, v_cache_ptr, new_slot * stride_cslot + kv_col, d_mask & mine, ASM, INT8,
                              QDT)
        is_new = (s_lo + tl.arange(0, BLOCK_N)) == last
        k0 = tl.where(is_new[:, None], k_new[None, :], k0)
        v0 = tl.where(is_new[:, None], v_new[None, :], v0)
        first = s_lo + BLOCK_N
    q = tl.load(q_ptr + tok.to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if WIDE16:  # an 8-bit cache: both dots in float16
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    if EARLY:
        if s_lo < s_hi:
            m_i, l_i, acc = _attend_tile(q, k0, v0, valid0, m_i, l_i, acc, scale_log2)
    for start in range(first, s_hi, BLOCK_N):
        k, v, valid = _load_kv(k_cache_ptr, v_cache_ptr, bt_row, start, s_hi, stride_cslot, kv_col, d_mask, PAGE,
                               BLOCK_N, ASM, INT8, QDT)
        m_i, l_i, acc = _attend_tile(q, k, v, valid, m_i, l_i, acc, scale_log2)

    out_offs = tok.to(tl.int64) * stride_ot + head[:, None] * stride_oh + d[None, :]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        if n_eff > 1:
            row = (b * n_splits + s) * (tl.num_programs(0) * G_PAD) + h * G_PAD + g  # [B, S, Hkv*G_PAD]
            tl.store(part_m_ptr + row, m_i)
            tl.store(part_l_ptr + row, l_i)
            tl.store(part_acc_ptr + row[:, None].to(tl.int64) * D_PAD + d[None, :], acc * v_scale)
            if SERIAL:  # the (sequence, KV head)'s last split to finish merges all of them (no reduce launch)
                _serial_merge(part_m_ptr, part_l_ptr, part_acc_ptr, lock_ptr + b * tl.num_programs(0) + h, out_ptr,
                              row - s * (tl.num_programs(0) * G_PAD), tl.num_programs(0) * G_PAD, out_offs, out_mask,
                              n_eff, G_PAD, D_PAD, S_PAD)
        else:  # this sequence uses one split: the output itself
            _write_out(out_ptr + out_offs, acc, l_i, v_scale, out_mask)
    else:
        _write_out(out_ptr + out_offs, acc, l_i, v_scale, out_mask)


@triton.jit
def _write_out(ptrs, acc, l_i, v_scale, mask):
    """A split that covered the whole context: its normalised output."""
    o = acc * v_scale / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(ptrs, o.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _context_lo(seq_len, window, HAS_WINDOW: tl.constexpr):
    """The first context position a query attends to: seq_len - window with a sliding window, else 0."""
    if HAS_WINDOW:
        return tl.maximum(seq_len - window, 0)
    return 0


@triton.jit
def _splits_used(span, n_splits, SPLIT_SPAN: tl.constexpr):
    """The splits a context of ``span`` positions uses: all n_splits, or with SPLIT_SPAN (DYNAMIC_SPLITS:
    BLOCK_N * min_split) one where span <= SPLIT_SPAN."""
    if SPLIT_SPAN > 0:
        return tl.where(span <= SPLIT_SPAN, 1, n_splits)
    return n_splits


@triton.jit
def _serial_merge(part_m_ptr, part_l_ptr, part_acc_ptr, lock, out_ptr, row0, split_stride, out_offs, out_mask,
                  n_used, G_PAD: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr):
    """After a split's partials are stored: count the finished splits of its (sequence, KV head) on ``lock``;
    the last one reads every split's (m, l, acc) back (rows row0 + s * split_stride, bypassing L1), merges them
    as _decode_reduce_kernel does, writes ``out`` and re-arms the counter. The barrier before the acq_rel atomic
    orders every thread's partial stores before the count (triton_gemm._split_k's serial split-K)."""
    tl.debug_barrier()
    done = tl.atomic_add(lock, 1, sem="acq_rel")
    if done == n_used - 1:
        d = tl.arange(0, D_PAD)
        m_max = tl.load(part_m_ptr + row0, cache_modifier=".cg")
        for s in tl.static_range(1, S_PAD):  # unrolled: the loads of every split are independent
            if s < n_used:
                m_max = tl.maximum(m_max, tl.load(part_m_ptr + row0 + s * split_stride, cache_modifier=".cg"))
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty: weights 0, output 0
        denom = tl.zeros_like(m_max)
        o = tl.zeros([G_PAD, D_PAD], tl.float32)
        for s in tl.static_range(S_PAD):
            if s < n_used:
                r = row0 + s * split_stride
                w = tl.math.exp2(tl.load(part_m_ptr + r, cache_modifier=".cg") - m_max)  # empty split: 0
                denom += w * tl.load(part_l_ptr + r, cache_modifier=".cg")
                o += w[:, None] * tl.load(part_acc_ptr + r[:, None].to(tl.int64) * D_PAD + d[None, :],
                                          mask=out_mask, other=0.0, cache_modifier=".cg")  # no padding rows
        o = o / tl.where(denom > 0, denom, 1.0)[:, None]
        tl.store(out_ptr + out_offs, o.to(out_ptr.dtype.element_ty), mask=out_mask)
        tl.atomic_xchg(lock, 0)


@triton.jit
def _decode_reduce_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, qsl_ptr, seq_lens_ptr, out_ptr,
    stride_ot, stride_oh, group, head_dim, n_splits, num_kv_heads, window,
    G_PAD: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr,
    PDL: tl.constexpr = False, SPLIT_SPAN: tl.constexpr = 0,
):
    """Grid (Hq, B): merges the partial (m, l, acc) of the splits one query head used (_splits_used), all
    loaded at once; a sequence that used one split has its output already."""
    if PDL:  # programmatic dependent launch (runtime/ops/pdl.py): nothing is touched before this
        pdl_enter(PDL)
    hq = tl.program_id(0)
    b = tl.program_id(1)
    tok = tl.load(qsl_ptr + b)
    if tl.load(qsl_ptr + b + 1) == tok:
        return
    n_eff = n_splits
    if SPLIT_SPAN > 0:
        seq_len = tl.load(seq_lens_ptr + b)
        n_eff = _splits_used(seq_len - _context_lo(seq_len, window, HAS_WINDOW), n_splits, SPLIT_SPAN)
        if n_eff == 1:  # the split kernel wrote this sequence's output
            return
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    s_mask = s < n_eff
    row = (b * n_splits + s) * (num_kv_heads * G_PAD) + (hq // group) * G_PAD + hq % group  # [S_PAD]
    m = tl.load(part_m_ptr + row, mask=s_mask, other=float("-inf"))
    l_s = tl.load(part_l_ptr + row, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty: weights 0, output 0
    w = tl.math.exp2(m - m_max)  # an empty split has m = -inf: weight 0
    denom = tl.sum(w * l_s, 0)
    acc = tl.load(part_acc_ptr + row[:, None].to(tl.int64) * D_PAD + d[None, :], mask=s_mask[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + tok.to(tl.int64) * stride_ot + hq * stride_oh + d, o.to(out_ptr.dtype.element_ty),
             mask=d < head_dim)


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     query_start_loc: torch.Tensor, max_ctx: int, scale: float, sliding_window: int | None,
                     out: torch.Tensor, cfg: DecodeConfig | None = None, num_sms: int | None = None,
                     v_scale: float = 1.0, serial: bool | None = None) -> torch.Tensor:
    """q: [T, Hq, D] (last dim contiguous), kv_cache: [2, NB, page, Hkv, D] contiguous (q's dtype, or fp8/int8
    with the key scale folded into ``scale`` and the value scale in ``v_scale``),
    block_tables: [B, W] int32, seq_lens: [B] int32, query_start_loc: [B+1] int32 with every query length
    in {0, 1}; max_ctx: host bound on seq_lens (sizes the split count only); serial: the splits merged by the
    last one to finish (None: SERIAL_REDUCE; applies up to SERIAL_MAX_SPLITS splits and LOCK_SLOTS (sequence, KV
    head) pairs, else the reduce kernel). Writes out: [T, Hq, D]."""
    _, num_heads, head_dim = q.shape
    _, _, page, num_kv_heads, _ = kv_cache.shape
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    if cfg is None:
        cfg = select_config(decode_key(num_seqs, max_ctx, num_heads, num_kv_heads, head_dim, page, kv_cache.dtype))
    if num_sms is None:
        num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    eff_ctx = min(max_ctx, sliding_window) if sliding_window else max_ctx
    n_splits = num_splits(cfg, num_seqs, num_kv_heads, max(1, eff_ctx), num_sms)
    g_pad = max(16, triton.next_power_of_2(group))
    d_pad = max(16, triton.next_power_of_2(head_dim))
    split = n_splits > 1
    serial = (SERIAL_REDUCE if serial is None else serial) and split and n_splits <= SERIAL_MAX_SPLITS and (
        num_seqs * num_kv_heads <= LOCK_SLOTS)
    if split:
        rows = num_seqs * n_splits * num_kv_heads * g_pad
        part_m = torch.empty(rows, dtype=torch.float32, device=q.device)
        part_l = torch.empty(rows, dtype=torch.float32, device=q.device)
        part_acc = torch.empty(rows, d_pad, dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # unused
    log2e = 1.4426950408889634
    span = cfg.block_n * cfg.min_split if split and DYNAMIC_SPLITS else 0
    wide16 = kv_cache.element_size() == 1
    asm = (wide16 and WIDEN_ASM and kv_cache.dtype in (torch.float8_e4m3fn, torch.int8) and q.is_cuda
           and capability(q.device) >= (8, 9))
    _decode_split_kernel[(num_kv_heads, num_seqs, n_splits)](
        q, kv_cache[0], kv_cache[1], block_tables, seq_lens, query_start_loc,
        out, part_m, part_l, part_acc, _locks(q.device) if serial else out,
        q.stride(0), q.stride(1), kv_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1),
        page, group, head_dim, sliding_window or 0, n_splits, scale * log2e, float(v_scale),
        G_PAD=g_pad, D_PAD=d_pad, BLOCK_N=cfg.block_n, HAS_WINDOW=bool(sliding_window), SPLIT=split,
        WIDE16=wide16, ASM=asm, INT8=kv_cache.dtype == torch.int8, SERIAL=serial,
        S_PAD=triton.next_power_of_2(n_splits) if serial else 1, SPLIT_SPAN=span, EARLY=EARLY_LOADS,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **launch_kwargs(q.device),
    )
    if split and not serial:
        s_pad = max(2, triton.next_power_of_2(n_splits))
        _decode_reduce_kernel[(num_heads, num_seqs)](
            part_m, part_l, part_acc, query_start_loc, seq_lens, out,
            out.stride(0), out.stride(1), group, head_dim, n_splits, num_kv_heads, sliding_window or 0,
            G_PAD=g_pad, D_PAD=d_pad, S_PAD=s_pad, HAS_WINDOW=bool(sliding_window), SPLIT_SPAN=span,
            num_warps=8 if s_pad * d_pad >= 8192 else 4,
            **launch_kwargs(q.device),
        )
    return out
