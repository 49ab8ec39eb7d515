"""Every op against a reference nobody here wrote (Hugging Face modules, PyTorch SDPA), over many shapes,
plus torch.library.opcheck for the fake (export) implementations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import runtime.ops  # noqa: F401
from runtime.forward_context import AttentionMetadata, ForwardContext, set_forward_context

spanda = torch.ops.spanda
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 8), (7, 64), (33, 96), (128, 40)])
def test_rms_norm_matches_hf(dtype, shape):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(shape[0])
    x = torch.randn(*shape, dtype=dtype) * 3
    ref = LlamaRMSNorm(shape[1], eps=1e-6).to(dtype)
    torch.nn.init.normal_(ref.weight)
    out = spanda.rms_norm(x, ref.weight.detach(), 1e-6)
    torch.testing.assert_close(out, ref(x).detach(), atol=TOL[dtype], rtol=TOL[dtype])
    r = torch.randn_like(x)
    normed, total = spanda.fused_add_rms_norm(x, r, ref.weight.detach(), 1e-6)
    torch.testing.assert_close(total, x + r)
    torch.testing.assert_close(normed, ref(x + r).detach(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("t,i", [(1, 8), (5, 96), (64, 173)])
def test_silu_and_mul(t, i):
    x = torch.randn(t, 2 * i)
    torch.testing.assert_close(spanda.silu_and_mul(x), F.silu(x[:, :i]) * x[:, i:])


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (8, 8, 64), (6, 1, 32)])
@pytest.mark.parametrize("scaling", [None, "llama3"])
def test_rotary_matches_hf(heads, kv_heads, head_dim, scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from compiler.models import parse_hf_config, rope_cos_sin_cache

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32} if scaling else None
    hc = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                     max_position_embeddings=256, rope_theta=50000.0, rope_scaling=rope)
    cfg = parse_hf_config(hc.to_dict(), "float32")
    cache = rope_cos_sin_cache(cfg, 256)
    t = 37
    pos = torch.randint(0, 256, (t,))
    q, k = torch.randn(t, heads * head_dim), torch.randn(t, kv_heads * head_dim)
    qr, kr = spanda.rotary_embedding(pos, q, k, cache, head_dim)
    cos, sin = LlamaRotaryEmbedding(hc)(q, pos[None])
    q_ref, k_ref = apply_rotary_pos_emb(q.view(1, t, heads, head_dim).transpose(1, 2),
                                        k.view(1, t, kv_heads, head_dim).transpose(1, 2), cos, sin)
    torch.testing.assert_close(qr, q_ref.transpose(1, 2).reshape(t, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kr, k_ref.transpose(1, 2).reshape(t, -1), atol=1e-5, rtol=1e-5)


def _paged_case(seq_lens, query_lens, heads, kv_heads, head_dim, page, dtype, seed):
    """Random KV for several sequences scattered over a shuffled block pool; returns what SDPA needs."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = sum(-(-s // page) for s in seq_lens) + 3
    perm = torch.randperm(n_blocks, generator=g).tolist()
    cache = torch.zeros(2, n_blocks, page, kv_heads, head_dim, dtype=dtype)
    tables, full_k, full_v = [], [], []
    for s in seq_lens:
        nb = -(-s // page)
        tables.append([perm.pop() for _ in range(nb)])
        full_k.append(torch.randn(s, kv_heads, head_dim, generator=g).to(dtype))
        full_v.append(torch.randn(s, kv_heads, head_dim, generator=g).to(dtype))
    # Pre-fill the cache with the context that is already "cached" (all but the last query_len tokens).
    for tbl, s, ql, kk, vv in zip(tables, seq_lens, query_lens, full_k, full_v):
        for p in range(s - ql):
            cache[0, tbl[p // page], p % page] = kk[p]
            cache[1, tbl[p // page], p % page] = vv[p]
    q = [torch.randn(ql, heads, head_dim, generator=g).to(dtype) for ql in query_lens]
    qsl = [0]
    slots = []
    for tbl, s, ql in zip(tables, seq_lens, query_lens):
        qsl.append(qsl[-1] + ql)
        slots += [tbl[p // page] * page + p % page for p in range(s - ql, s)]
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    meta = AttentionMetadata(torch.tensor(slots), torch.tensor(qsl, dtype=torch.int32),
                             torch.tensor(seq_lens, dtype=torch.int32), bt, qsl, list(seq_lens))
    return cache, q, full_k, full_v, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page", [1, 8, 16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_matches_sdpa(dtype, page, heads, kv_heads, window):
    head_dim = 16
    seq_lens = [1, 17, 33, 9]
    query_lens = [1, 17, 5, 1]  # decode, full prefill, extend over a cached prefix, decode
    cache, q, ks, vs, meta = _paged_case(seq_lens, query_lens, heads, kv_heads, head_dim, page, dtype, page)
    qf = torch.cat(q)
    kf = torch.cat([k[-ql:] for k, ql in zip(ks, query_lens)])
    vf = torch.cat([v[-ql:] for v, ql in zip(vs, query_lens)])
    with set_forward_context(ForwardContext([cache], meta)):
        out = spanda.paged_attention(qf.flatten(1), kf.flatten(1), vf.flatten(1), 0, heads, kv_heads, head_dim,
                                     head_dim**-0.5, window)
    out = out.view(-1, heads, head_dim)
    for i, (s, ql) in enumerate(zip(seq_lens, query_lens)):
        qi = q[i].float().transpose(0, 1)
        ki = ks[i].float().transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        vi = vs[i].float().transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        qp = torch.arange(s - ql, s)[:, None]
        kp = torch.arange(s)[None]
        mask = (kp <= qp) & ((kp > qp - window) if window else True)
        ref = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask).transpose(0, 1)
        got = out[meta.query_start_loc_host[i]:meta.query_start_loc_host[i + 1]].float()
        torch.testing.assert_close(got, ref, atol=TOL[dtype] * 2, rtol=TOL[dtype] * 2)
    # The new tokens' keys were written in place at their slots.
    flat = cache.view(2, -1, kv_heads, head_dim)
    torch.testing.assert_close(flat[0, meta.slot_mapping], kf)


def test_paged_attention_outside_context_is_a_clear_error():
    q = torch.randn(2, 16)
    with pytest.raises(RuntimeError, match="forward context"):
        spanda.paged_attention(q, q, q, 0, 1, 1, 16, 0.25, None)


def test_opcheck_fake_implementations():
    """torch.library.opcheck validates schemas and fake (meta) kernels used by torch.export."""
    x = torch.randn(5, 32)
    w = torch.randn(32)
    torch.library.opcheck(spanda.rms_norm, (x, w, 1e-6))
    torch.library.opcheck(spanda.fused_add_rms_norm, (x, x.clone(), w, 1e-6))
    torch.library.opcheck(spanda.silu_and_mul, (x,))
    cache = torch.randn(64, 16)
    torch.library.opcheck(spanda.rotary_embedding, (torch.arange(5), x, x[:, :16].clone(), cache, 16))
    assert math.isfinite(float(spanda.rms_norm(x, w, 1e-6).sum()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_cache_equals_rotary_then_attention_write(dtype):
    """The fused op rotates q, writes rotated k and v at the slots (skipping slot -1), and attention over the
    written cache equals the unfused paged_attention."""
    from compiler.models import parse_hf_config, rope_cos_sin_cache

    heads, kv_heads, head_dim, page = 8, 2, 16, 8
    cfg = parse_hf_config({"model_type": "llama", "hidden_size": 128, "num_attention_heads": heads,
                           "num_key_value_heads": kv_heads, "num_hidden_layers": 1, "intermediate_size": 8,
                           "vocab_size": 8}, "float32")
    cs = rope_cos_sin_cache(cfg, 128)
    seq_lens, query_lens = [9, 30, 1], [9, 4, 1]
    cache, q, ks, vs, meta = _paged_case(seq_lens, query_lens, heads, kv_heads, head_dim, page, dtype, 3)
    qf = torch.cat(q).flatten(1)
    kf = torch.cat([k[-ql:] for k, ql in zip(ks, query_lens)]).flatten(1)
    vf = torch.cat([v[-ql:] for v, ql in zip(vs, query_lens)]).flatten(1)
    pos = torch.cat([torch.arange(s - ql, s) for s, ql in zip(seq_lens, query_lens)])
    unfused_cache = cache.clone()
    with set_forward_context(ForwardContext([unfused_cache], meta)):
        qr, kr = spanda.rotary_embedding(pos, qf, kf, cs, head_dim)
        want = spanda.paged_attention(qr, kr, vf, 0, heads, kv_heads, head_dim, head_dim**-0.5, None)
    with set_forward_context(ForwardContext([cache], meta)):
        q_rot = spanda.rope_and_cache(pos, qf, kf, vf, cs, 0, head_dim, kv_heads)
        got = spanda.paged_attention_cached(q_rot, 0, heads, kv_heads, head_dim, head_dim**-0.5, None)
    torch.testing.assert_close(q_rot, qr)
    torch.testing.assert_close(cache, unfused_cache)
    torch.testing.assert_close(got, want)
    meta.slot_mapping[0] = -1  # a padding token writes nothing
    before = cache.clone()
    with set_forward_context(ForwardContext([cache], meta)):
        spanda.rope_and_cache(pos, qf, kf * 2, vf, cs, 0, head_dim, kv_heads)
    flat_before, flat = before.view(2, -1, kv_heads, head_dim), cache.view(2, -1, kv_heads, head_dim)
    assert not torch.equal(flat, flat_before)
    first_slot = int(_paged_case(seq_lens, query_lens, heads, kv_heads, head_dim, page, dtype, 3)[4].slot_mapping[0])
    torch.testing.assert_close(flat[:, first_slot], flat_before[:, first_slot])
