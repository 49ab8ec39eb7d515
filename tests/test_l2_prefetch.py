"""runtime/ops/l2_prefetch.py: which weights each layer prefetches into L2 during its attention, how a budget
cuts them into bulk-prefetch segments, and the RoPE + KV write kernel's prefetch programs compiled for sm_90.
The GPU side (the same greedy tokens with it on, under PDL) is tests/test_gpu.py's PDL test."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from runtime.ops import l2_prefetch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def test_each_layer_lists_the_weights_it_reads_after_its_attention(artifacts_dir):
    """In the tiny Llama build (fused qkv and gate_up): o_proj, the post-attention norm, gate_up, down, then the
    next layer's input norm and qkv (the last layer: the final norm and lm_head), the graph module's own tensors;
    and the model runner attaches the table to its KV caches."""
    from artifacts.store import open_artifact
    from runtime import LLM
    from runtime.model_runner import load_graph_module

    gm = load_graph_module(open_artifact(artifacts_dir["llama"]), torch.device("cpu"))
    table = l2_prefetch.weights_after_attention(gm)
    layers = 2
    assert sorted(table) == list(range(layers))
    for i in range(layers):
        after = ([f"model.layers.{i + 1}.input_layernorm.weight", f"model.layers.{i + 1}.self_attn.qkv_proj.weight"]
                 if i + 1 < layers else ["model.norm.weight", "lm_head.weight"])
        names = [f"model.layers.{i}.self_attn.o_proj.weight", f"model.layers.{i}.post_attention_layernorm.weight",
                 f"model.layers.{i}.mlp.gate_up_proj.weight", f"model.layers.{i}.mlp.down_proj.weight", *after]
        want = [gm.get_parameter(n) if n in dict(gm.named_parameters()) else gm.get_buffer(n) for n in names]
        assert len(table[i]) == len(want) and all(a is b for a, b in zip(table[i], want)), i
    runner = LLM(str(artifacts_dir["llama"]), device="cpu").engine.runner
    assert sorted(runner.kv_caches.l2_prefetch) == list(range(layers))


def test_segments_take_the_budget_in_order():
    t = [torch.empty(1000, dtype=torch.uint8), torch.empty(100, dtype=torch.float32),
         torch.empty(64, 4, dtype=torch.uint8)[:, :2], torch.empty(10_000, dtype=torch.uint8)]
    addr = [x.data_ptr() for x in t]
    assert all(a % 16 == 0 for a in addr[:2] + addr[3:])
    # the first tensor rounded down to 16 bytes, the second whole, the strided view skipped, a prefix of the last
    assert l2_prefetch.segments(t, 2000) == [(addr[0], 992), (addr[1], 400), (addr[3], 608)]
    assert l2_prefetch.segments(t, 500) == [(addr[0], 496)]
    assert l2_prefetch.segments(t, 10) == []
    many = [torch.empty(32, dtype=torch.uint8) for _ in range(10)]
    assert len(l2_prefetch.segments(many, 10**6)) == l2_prefetch.MAX_SEGMENTS


def test_off_or_without_a_gpu_nothing_is_prefetched(monkeypatch):
    monkeypatch.setattr(l2_prefetch, "L2_PREFETCH_MB", 16)
    assert l2_prefetch.layer_segments(0, torch.device("cpu")) == []


def _rope_sass(pf: int) -> str:
    from bench.wna16_gluon import triton_sass_sm90
    from runtime.ops import triton_rope_cache as trc

    sig = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "cs_ptr", "qo_ptr", "kc_ptr", "vc_ptr")}
    sig.update(pos_ptr="*i64", slot_ptr="*i64", stride_q="i32", stride_k="i32", stride_v="i32", stride_c="i32",
               k_scale="fp32", v_scale="fp32", T="i32")
    sig.update({f"{c}{i}": "i64" for i in range(6) for c in "an"})
    const = dict(n_q=32, n_k=8, head_dim=128, half=64, BLOCK_HQ=32, BLOCK_HK=8, BLOCK_D=64, BLOCK_KV=1024, QUANT=0,
                 PDL=True, EARLY=False, PF=pf, PIECE=65536, LANES=256)
    return triton_sass_sm90(trc._rope_cache_kernel, sig, const, num_warps=8)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its sm_90 compiler and nvdisasm ship with it)")
def test_the_prefetch_programs_compile_for_hopper():
    """With prefetch programs the kernel issues bulk L2 prefetches (UBLKPF), one per segment in the loop body,
    with none it has no prefetch code; the token programs' wait (ACQBULK) is there either way."""
    with_pf, without = _rope_sass(64), _rope_sass(0)
    assert with_pf.count("UBLKPF") >= 6 and "UBLKPF" not in without
    assert "ACQBULK" in with_pf and "ACQBULK" in without
