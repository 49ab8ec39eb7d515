"""The Triton RoPE + KV-cache write kernel against the reference op, on fresh random inputs: on the GPU
(`pytest -m gpu`), and on the CPU under ``TRITON_INTERPRET=1`` (float16, tiny shapes)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import runtime.ops  # noqa: F401
from runtime.forward_context import AttentionMetadata, ForwardContext, set_forward_context
from runtime.ops.rope_cache import rope_and_cache_ref
from tests.conftest import run_under_interpreter

gpu = [pytest.mark.gpu,
       pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu on the device)")]


@gpu[0]
@gpu[1]
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (8, 2, 64), (6, 1, 96), (4, 4, 32)])
@pytest.mark.parametrize("t", [1, 7, 300])
def test_rope_and_cache_matches_reference(dtype, heads, kv_heads, head_dim, t):
    from compiler.models import parse_hf_config, rope_cos_sin_cache

    g = torch.Generator(device="cuda").manual_seed(t + heads)
    cfg = parse_hf_config({"model_type": "llama", "hidden_size": heads * head_dim, "num_attention_heads": heads,
                           "num_key_value_heads": kv_heads, "num_hidden_layers": 1, "intermediate_size": 8,
                           "vocab_size": 8, "rope_theta": 500000.0,
                           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 256}},
                          "float32")
    cs = rope_cos_sin_cache(cfg, 4096).cuda()
    page, blocks = 16, 64
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, device="cuda", generator=g).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)  # strided slices
    pos = torch.randint(0, 4096, (t,), device="cuda", generator=g)
    slots = torch.randperm(blocks * page, device="cuda", generator=g)[:t]
    if t > 1:
        slots[t // 2] = -1  # a padding token
    meta = AttentionMetadata(slots, torch.tensor([0, t], dtype=torch.int32, device="cuda"),
                             torch.tensor([t], dtype=torch.int32, device="cuda"),
                             torch.zeros(1, 1, dtype=torch.int32, device="cuda"), [0, t], [t])
    cache = torch.full((2, blocks, page, kv_heads, head_dim), float("nan"), dtype=dtype, device="cuda")
    ref_cache = cache.clone()
    want = rope_and_cache_ref(pos, q, k, v, cs, ref_cache, slots, head_dim, kv_heads)
    with set_forward_context(ForwardContext([cache], meta)):
        got = torch.ops.spanda.rope_and_cache(pos, q, k, v, cs, 0, head_dim, kv_heads)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    written = ~torch.isnan(ref_cache)
    assert torch.equal(written, ~torch.isnan(cache)), "the kernel wrote a different set of cache slots"
    torch.testing.assert_close(cache[written], ref_cache[written], atol=2e-2, rtol=2e-2)


def _interpreter_main() -> None:
    """Runs in a subprocess with TRITON_INTERPRET=1 (CPU tensors), float16, strided q/k/v, a padding slot."""
    from runtime.ops.triton_rope_cache import rope_and_cache_cuda

    g = torch.Generator().manual_seed(0)
    for heads, kv_heads, head_dim, t in ((4, 2, 16, 5), (3, 1, 8, 2)):
        ang = torch.rand(64, head_dim // 2, generator=g)
        cs = torch.cat((ang.cos(), ang.sin()), -1)
        qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=g).half()
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        pos = torch.randint(0, 64, (t,), generator=g)
        slots = torch.randperm(4 * 8, generator=g)[:t]
        slots[0] = -1
        meta = AttentionMetadata(slots, torch.tensor([0, t], dtype=torch.int32), torch.tensor([t], dtype=torch.int32),
                                 torch.zeros(1, 1, dtype=torch.int32), [0, t], [t])
        cache = torch.full((2, 4, 8, kv_heads, head_dim), float("nan")).half()
        ref_cache = cache.clone()
        want = rope_and_cache_ref(pos, q, k, v, cs, ref_cache, slots, head_dim, kv_heads)
        with set_forward_context(ForwardContext([cache], meta)):
            got = rope_and_cache_cuda(pos, q, k, v, cs, 0, head_dim, kv_heads)
        assert torch.allclose(got.float(), want.float(), atol=1e-2), (got - want).abs().max()
        written = ~torch.isnan(ref_cache)
        assert torch.equal(written, ~torch.isnan(cache))
        assert torch.allclose(cache[written].float(), ref_cache[written].float(), atol=1e-2)
    print("interpreter ok")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton is not installed (pip install triton) so the interpreter is absent")
def test_rope_and_cache_kernel_under_interpreter():
    run_under_interpreter("tests.test_triton_rope_cache", timeout=300)
