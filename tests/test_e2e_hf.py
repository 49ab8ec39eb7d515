"""End to end against Hugging Face transformers on tiny random checkpoints of every family:
prefill logits, greedy continuations, batching with chunked prefill + preemption, prefix caching."""

from __future__ import annotations

import pytest
import torch

from runtime import LLM, SamplingParams
from tests.conftest import FAMILIES, load_hf


def _prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 60) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [[1] + torch.randint(3, 500, (n_ - 1,), generator=g).tolist() for n_ in lens]


@pytest.fixture(scope="module")
def llms(artifacts_dir):
    return {name: LLM(path, device="cpu") for name, path in artifacts_dir.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prefill_logits_match_transformers(family, llms, checkpoints):
    hf = load_hf(checkpoints[family])
    for ids in _prompts(3, seed=1, lo=20, hi=70):
        ours = llms[family].engine.compute_logits(ids)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_continuation_matches_generate(family, llms, checkpoints):
    hf = load_hf(checkpoints[family])
    hf.generation_config.eos_token_id = None
    prompts = _prompts(2, seed=2, lo=5, hi=40)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    outs = llms[family].generate(prompts, params)
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, len(ids):].tolist()
        assert out.outputs[0].finish_reason == "length"


def test_batch_with_chunked_prefill_and_preemption_matches_alone(artifacts_dir):
    """10 prompts at once through a KV pool and a token budget small enough to force chunked prefill and
    preemption by recompute: each gives exactly the tokens it gives alone."""
    path = artifacts_dir["llama"]
    prompts = _prompts(10, seed=3, lo=10, hi=90)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = LLM(path, device="cpu")
    expected = [alone.generate([p], params)[0].outputs[0].token_ids for p in prompts]

    tight = LLM(path, device="cpu", kv_cache_blocks=14, max_num_batched_tokens=32, max_num_seqs=8)
    outs = tight.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == expected
    sched = tight.engine.scheduler
    assert sched.num_preemptions > 0, "the pool was meant to be small enough to force preemption"
    assert max(len(p) for p in prompts) > 32, "some prompt must be longer than the token budget (chunked)"
    tight.engine.kv.check_integrity()
    assert tight.engine.kv.num_free_blocks == 14


def test_prefix_cache_prefills_only_the_suffix(artifacts_dir):
    path = artifacts_dir["qwen2"]
    shared = _prompts(1, seed=4, lo=70, hi=71)[0]  # 70 tokens: 4 full blocks of 16
    a, b = shared + [7, 8, 9], shared + [10, 11, 12, 13]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    cold = LLM(path, device="cpu", enable_prefix_caching=False)
    expected = cold.generate([b], params)[0].outputs[0].token_ids

    llm = LLM(path, device="cpu")
    llm.generate([a], params)
    before = llm.engine.runner.num_tokens_computed
    out = llm.generate([b], params)[0]
    computed = llm.engine.runner.num_tokens_computed - before
    assert out.num_cached_tokens == 64
    # Prefill computed only the suffix (74 - 64 tokens); each of the 15 later decode steps computes one.
    assert computed == (len(b) - 64) + 15
    assert out.outputs[0].token_ids == expected
    assert llm.engine.kv.stats.hits >= 64


def test_decode_step_does_not_copy_the_kv_cache(artifacts_dir):
    """The KV cache is not a graph input: a decode step allocates far less than one layer's cache."""
    llm = LLM(artifacts_dir["llama"], device="cpu", kv_cache_blocks=4096)
    eng = llm.engine
    eng.add_request("r", [1, 5, 6, 7], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    eng.step()  # prefill
    layer_bytes = eng.runner.kv_caches[0].numel() * eng.runner.kv_caches[0].element_size()
    ptrs = [c.data_ptr() for c in eng.runner.kv_caches]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        eng.step()  # one decode step
    allocated = sum(max(e.cpu_memory_usage, 0) for e in prof.events())
    assert allocated < layer_bytes / 8, f"decode allocated {allocated} bytes; one layer's cache is {layer_bytes}"
    assert [c.data_ptr() for c in eng.runner.kv_caches] == ptrs


def test_seeded_sampling_is_reproducible_across_batches(artifacts_dir):
    llm = LLM(artifacts_dir["llama"], device="cpu")
    p = _prompts(4, seed=5)
    params = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=12, seed=1234, ignore_eos=True)
    alone = llm.generate([p[0]], params)[0].outputs[0].token_ids
    batched = llm.generate(p, params)[0].outputs[0].token_ids
    assert alone == batched
    other = llm.generate([p[0]], SamplingParams(temperature=0.9, max_tokens=12, seed=99, ignore_eos=True))
    assert other[0].outputs[0].token_ids != alone


def test_parallel_sampling_shares_the_prompt(artifacts_dir):
    """n=3: three completions from one prefill (the prompt's KV blocks are forked, not recomputed)."""
    llm = LLM(artifacts_dir["llama"], device="cpu")
    prompt = _prompts(1, seed=6, lo=40, hi=41)[0]  # 40 tokens: 2 full blocks + a partial one
    params = SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=7, ignore_eos=True)
    before = llm.engine.runner.num_tokens_computed
    out = llm.generate([prompt], params)[0]
    computed = llm.engine.runner.num_tokens_computed - before
    assert [c.index for c in out.outputs] == [0, 1, 2]
    seqs = [tuple(c.token_ids) for c in out.outputs]
    assert len(set(seqs)) == 3 and all(len(s) == 10 for s in seqs)
    # One prefill of 40 tokens, then 9 decode steps for each of the 3 sequences.
    assert computed == 40 + 3 * 9
    again = llm.generate([prompt], params)[0]
    assert [tuple(c.token_ids) for c in again.outputs] == seqs  # seeded: reproducible
    llm.engine.kv.check_integrity()
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_stop_strings_and_stop_tokens(artifacts_dir):
    llm = LLM(artifacts_dir["llama"], device="cpu")
    prompt = _prompts(1, seed=8)[0]
    free = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    stop = free.text[len(free.text) // 2:][:3]
    assert stop.strip(), "the reference completion should have some text to stop on"
    cut = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop]))
    c = cut[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == free.text[: free.text.index(stop)]
    kept = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop],
                                                 include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == free.text[: free.text.index(stop) + len(stop)]
    tok = free.token_ids[5]
    by_id = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                                                  stop_token_ids=[tok]))[0].outputs[0]
    assert by_id.token_ids == free.token_ids[: free.token_ids.index(tok) + 1]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == tok


def test_chat_applies_the_checkpoint_template(artifacts_dir, checkpoints):
    from transformers import AutoTokenizer

    llm = LLM(artifacts_dir["llama"], device="cpu")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    out = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=5))[0]
    ref = AutoTokenizer.from_pretrained(checkpoints["llama"]).apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    assert out.prompt_token_ids == list(ref)
