"""CUDA fast path of ``spanda::paged_attention``: KV write kernel, decode/prefill dispatch, tuning hooks.

Imported by :mod:`runtime.ops` always; when Triton is installed it registers :func:`paged_attention_cuda` as
the op's CUDA kernel (the CPU reference and the fake stay in attention.py); without Triton it is inert.

One call::

    k, v: [T, Hkv*D] --_write_kv_kernel--> kv_cache[0/1].view(-1, Hkv, D)[slot_mapping[t]]   (slot < 0: skip)
    max_query_len == 1 -> triton_decode.decode_attention   (flash-decoding, split context + reduce)
    otherwise          -> triton_prefill.prefill_attention (flash attention over pages, causal, GQA rows)

Quantized caches (float8_e4m3fn, int8): the write kernels quantize ``x / scale`` in-kernel (fp8 saturating,
int8 rounded half to even and clamped, as ``attention.quantize_kv``); the attention kernels load the 1-byte
entries, widen them to the query dtype (exact: every e4m3 and int8 value is a bf16/fp16 value) and fold the
layer's key scale into the softmax scale and its value scale into the output, so the scales are two launch
arguments (host floats; CUDA-graph capture bakes them in).

Launch sizes come from the metadata's host lists; nothing here synchronizes with the device.

Tuning: each kernel module declares ``CONFIGS`` (the grid), ``DEFAULT`` and ``PINNED`` (key -> config).
:func:`tune` times every config of the grid on random inputs of the given shapes and pins the fastest;
:func:`pin`/:func:`pinned` load and dump the table (a build step stores it in the artifact's tuning.json).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import torch

from runtime.forward_context import AttentionMetadata, get_forward_context
from runtime.ops.attention import KV_QUANT_MAX, attend_ref, quantize_kv, write_kv_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the reference implementation serves every call
    triton = tl = None
AVAILABLE = triton is not None
if AVAILABLE:
    from triton.language.extra import libdevice

    from runtime.ops import triton_decode, triton_prefill

    # int8 rounding: libdevice's rint (cvt.rni, half to even) on the GPU; the interpreter has no libdevice, so
    # there the 1.5 * 2^23 trick (exact in numpy's IEEE arithmetic) stands in for it.
    _USE_RINT = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


def _jit(fn):
    """triton.jit when Triton is installed; otherwise the plain function (never launched)."""
    return triton.jit(fn) if AVAILABLE else fn

FAST_DTYPES = (torch.float16, torch.bfloat16)
KV_QUANT_DTYPES = tuple(KV_QUANT_MAX)  # caches the kernels read and write quantized (with per-layer scales)
_QUANT_MODE = {torch.float8_e4m3fn: 1, torch.int8: 2}


def kv_quant_mode(dtype: torch.dtype) -> int:
    """The kernels' QUANT constexpr of a cache dtype: 0 plain cast, 1 fp8 e4m3, 2 int8."""
    return _QUANT_MODE.get(dtype, 0)


@_jit
def _quantize_kv(x, scale, QUANT: tl.constexpr, dt: tl.constexpr):
    """x -> cache dtype dt. QUANT 0: a cast; 1: fp8 e4m3 of x/scale saturated to +-448 (rounded to nearest even
    by the conversion); 2: int8 of x/scale clamped to +-127 and rounded half to even (rint; under the
    interpreter, adding and subtracting 1.5 * 2^23, which rounds an fp32 of magnitude < 2^22 to an integer, to
    nearest even). x / scale is an IEEE division (div_rn), as torch's, so the cache matches the reference."""
    if QUANT == 1:
        y = tl.clamp(tl.math.div_rn(x.to(tl.float32), scale), -448.0, 448.0).to(dt)
    elif QUANT == 2:
        r = tl.clamp(tl.math.div_rn(x.to(tl.float32), scale), -127.0, 127.0)
        if _USE_RINT:
            r = libdevice.rint(r)
        else:
            r = (r + 12582912.0) - 12582912.0
        y = r.to(dt)
    else:
        y = x.to(dt)
    return y


@_jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_kt, stride_vt, width,
                     k_scale, v_scale, BLOCK: tl.constexpr, QUANT: tl.constexpr):
    """Grid (T,): copies token t's [Hkv*D] keys and values to row slot_mapping[t] of the cache (quantized
    with the layer's scales when QUANT)."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:  # padding token (e.g. a CUDA-graph bucket's filler): nothing to write
        return
    offs = tl.arange(0, BLOCK)
    mask = offs < width
    dst = slot.to(tl.int64) * width + offs
    k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + offs, mask=mask)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + offs, mask=mask)
    tl.store(k_cache_ptr + dst, _quantize_kv(k, k_scale, QUANT, k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, _quantize_kv(v, v_scale, QUANT, v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """kv_cache: [2, NB, page, Hkv, D] contiguous; k, v: [T, Hkv*D] (rows may be strided, e.g. slices of a
    fused QKV output); slot_mapping: [T] int64 flat slot = block * page + offset. In place.
    k_scale/v_scale: the layer's scales of an fp8/int8 cache (ignored otherwise)."""
    t = k.shape[0]
    if t == 0:
        return
    width = kv_cache.shape[-2] * kv_cache.shape[-1]
    _write_kv_kernel[(t,)](k, v, kv_cache[0], kv_cache[1], slot_mapping, k.stride(0), v.stride(0), width,
                           float(k_scale), float(v_scale), BLOCK=triton.next_power_of_2(width),
                           QUANT=kv_quant_mode(kv_cache.dtype), num_warps=4)


def attend(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
           sliding_window: int | None, out: torch.Tensor | None = None, decode_cfg=None, prefill_cfg=None,
           k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """q: [T, Hq, D] -> out [T, Hq, D] over the cache (which already holds this step's keys/values).
    k_scale/v_scale: the layer's scales of an fp8/int8 cache (the key scale folds into the softmax scale)."""
    if out is None:
        out = torch.empty_like(q)
    if kv_cache.dtype not in KV_QUANT_DTYPES:
        k_scale = v_scale = 1.0
    if meta.max_query_len <= 1:
        triton_decode.decode_attention(q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                       max(meta.seq_lens_host, default=1), scale * k_scale, sliding_window, out,
                                       cfg=decode_cfg, v_scale=v_scale)
    else:
        triton_prefill.prefill_attention(q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                         meta.max_query_len, scale * k_scale, sliding_window, out, cfg=prefill_cfg,
                                         v_scale=v_scale)
    return out


def _fast_ok(q: torch.Tensor, kv_cache: torch.Tensor, head_dim: int) -> bool:
    return (q.dtype in FAST_DTYPES and (kv_cache.dtype == q.dtype or kv_cache.dtype in KV_QUANT_DTYPES)
            and kv_cache.is_contiguous() and head_dim <= 256)


def paged_attention_cuda(q, k, v, layer_idx, num_heads, num_kv_heads, head_dim, scale, sliding_window):
    """CUDA kernel of spanda::paged_attention. q: [T, Hq*D], k/v: [T, Hkv*D] -> [T, Hq*D]."""
    ctx = get_forward_context()
    kv_cache = ctx.kv_caches[layer_idx]
    t = q.shape[0]
    q3 = q.view(t, num_heads, head_dim)
    ks, vs = ctx.kv_scale(layer_idx)
    if not _fast_ok(q, kv_cache, head_dim):  # float32 and other dtypes: the reference
        write_kv_ref(kv_cache, k.view(t, num_kv_heads, head_dim), v.view(t, num_kv_heads, head_dim),
                     ctx.attn.slot_mapping, ks, vs)
        return attend_ref(q3, kv_cache, ctx.attn, scale, sliding_window, ks, vs).view(t, num_heads * head_dim)
    write_kv(kv_cache, k, v, ctx.attn.slot_mapping, ks, vs)
    out = q.new_empty(t, num_heads, head_dim)
    attend(q3, kv_cache, ctx.attn, scale, sliding_window, out, k_scale=ks, v_scale=vs)
    return out.view(t, num_heads * head_dim)


if AVAILABLE:
    torch.library.register_kernel("spanda::paged_attention", "cuda", paged_attention_cuda)


# ----------------------------------------------------------------------------------------------- tuning

def pin(table: dict) -> None:
    """Pin configs: ``{key_tuple: config}`` or the JSON form from :func:`pinned` (``[[key, fields], ...]``)."""
    items = table.items() if isinstance(table, dict) else table
    for key, cfg in items:
        key = tuple(key)
        if key[0] == "decode":
            triton_decode.PINNED[key] = cfg if isinstance(cfg, triton_decode.DecodeConfig) else \
                triton_decode.DecodeConfig(**cfg)
        else:
            triton_prefill.PINNED[key] = cfg if isinstance(cfg, triton_prefill.PrefillConfig) else \
                triton_prefill.PrefillConfig(**cfg)


def pinned() -> list:
    """The pinned table as JSON-able ``[[key, config fields], ...]``."""
    both = {**triton_decode.PINNED, **triton_prefill.PINNED}
    return [[list(k), dataclasses.asdict(c)] for k, c in both.items()]


def random_case(num_seqs: int, ctx: int, q_len: int, num_heads: int, num_kv_heads: int, head_dim: int, page: int,
                dtype: torch.dtype, device: str = "cuda", seed: int = 0, kv_dtype: torch.dtype | None = None):
    """Random (q [T,Hq,D], kv_cache, meta) with every sequence at context ``ctx`` and ``q_len`` new tokens,
    blocks drawn from a shuffled pool (as a long-running server's would be). Drawn on ``device``.
    ``kv_dtype``: the cache's dtype when it differs from q's (fp8/int8: quantized with scale 1/16)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    nb_seq = triton.cdiv(ctx, page)
    perm = torch.randperm(num_seqs * nb_seq + 1, generator=g)
    tables = perm[: num_seqs * nb_seq].view(num_seqs, nb_seq).to(torch.int32)
    gd = torch.Generator(device=device).manual_seed(seed)
    kv = torch.randn(2, num_seqs * nb_seq + 1, page, num_kv_heads, head_dim, generator=gd, device=device, dtype=dtype)
    if kv_dtype is not None and kv_dtype != dtype:
        kv = quantize_kv(kv, kv_dtype, 1 / 16)
    q = torch.randn(num_seqs * q_len, num_heads, head_dim, generator=gd, device=device, dtype=dtype)
    pos = torch.arange(ctx - q_len, ctx)
    slots = (tables[:, pos // page].long() * page + pos % page).flatten()
    qsl = [i * q_len for i in range(num_seqs + 1)]
    meta = AttentionMetadata(slots.to(device), torch.tensor(qsl, dtype=torch.int32, device=device),
                             torch.full((num_seqs,), ctx, dtype=torch.int32, device=device), tables.to(device),
                             qsl, [ctx] * num_seqs)
    return q, kv, meta


def time_attend(sets: list, window: int | None, rep_ms: int = 50, **cfg) -> float:
    """Median ms of one ``attend`` call: a CUDA graph of one call per input set (rotating over sets larger
    than the L2 keeps small shapes honest; the graph removes Python launch overhead), replayed."""
    outs = [torch.empty_like(q) for q, _, _ in sets]

    def run_all():
        for (q, kv, meta), out in zip(sets, outs):
            attend(q, kv, meta, 0.1, window, out, **cfg)
    run_all()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_all()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=rep_ms, return_mode="median") / len(sets)


def tune(shapes: Iterable[dict], rep_ms: int = 50, verbose: bool = False, l2_bytes: int = 50 * 2**20) -> dict:
    """Times each config of the grid on random inputs per shape and pins the fastest.

    shapes: dicts with num_seqs, ctx, q_len (1 = decode), num_heads, num_kv_heads, head_dim, page, dtype
    and optional sliding_window and kv_dtype (the cache's, when not dtype). Returns {key: (config, median ms)}.
    """
    results = {}
    for sh in shapes:
        sh = dict(sh)
        window = sh.pop("sliding_window", None)
        kv_dtype = sh.setdefault("kv_dtype", None) or sh["dtype"]
        kv_bytes = 2 * sh["num_seqs"] * sh["ctx"] * sh["num_kv_heads"] * sh["head_dim"] * kv_dtype.itemsize
        sets = [random_case(**sh, seed=i) for i in range(min(32, max(1, -(-3 * l2_bytes // kv_bytes))))]
        decode = sh["q_len"] == 1
        if decode:
            key = triton_decode.decode_key(sh["num_seqs"], sh["ctx"], sh["num_heads"], sh["num_kv_heads"],
                                           sh["head_dim"], sh["page"], kv_dtype)
            grid = triton_decode.CONFIGS
        else:
            key = triton_prefill.prefill_key(sh["num_heads"], sh["num_kv_heads"], sh["head_dim"], sh["page"],
                                             kv_dtype)
            grid = triton_prefill.CONFIGS
        best = None
        for cfg in grid:
            try:
                ms = time_attend(sets, window, rep_ms, **{"decode_cfg" if decode else "prefill_cfg": cfg})
            except Exception as e:  # e.g. out of shared memory for this tile: not a candidate
                if verbose:
                    print(f"  {cfg}: {type(e).__name__}")
                continue
            if verbose:
                print(f"  {key} {cfg}: {ms * 1e3:.1f} us")
            if best is None or ms < best[1]:
                best = (cfg, ms)
        if best is not None:
            pin({key: best[0]})
            results[key] = best
    return results
