"""EngineOptions.async_scheduling: the next decode step is launched before the current step's tokens reach
the host. The engine must return what the synchronous engine returns, call by call (the same tokens, texts,
finishing steps and reasons; a request added mid-stream joins one step later, so there request by request),
while actually running ahead where it may and never where it may not (penalties, logprobs, n > 1)."""

from __future__ import annotations

import pytest

from runtime import SamplingParams
from runtime.config import EngineOptions
from runtime.engine import LLMEngine

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17], [18, 19]]


def _trace(artifact, async_scheduling: bool, requests, events=None, max_calls: int = 200):
    """Drive the engine: ``requests`` [(id, prompt, params)] queued first, ``events`` {call index: fn(engine)}
    (add or abort mid-stream). Returns (per-call outputs as plain tuples, the engine)."""
    engine = LLMEngine(artifact, EngineOptions(device="cpu", async_scheduling=async_scheduling))
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    trace = []
    for call in range(max_calls):
        if events and call in events:
            events[call](engine)
        if not engine.has_unfinished_requests() and not (events and any(k > call for k in events)):
            break
        outs = engine.step()
        trace.append(sorted((o.request_id, o.finished, tuple((c.index, tuple(c.token_ids), c.text, c.finish_reason,
                                                             c.stop_reason) for c in o.outputs)) for o in outs))
    return trace, engine


def _per_request(trace) -> dict[str, list]:
    out: dict[str, list] = {}
    for call in trace:
        for rid, done, outs in call:
            out.setdefault(rid, []).append((done, outs))
    return out


def _same(artifact, requests, events=None, ahead: bool = True):
    """Call by call the same outputs; with ``events`` (a request added while a step is in flight joins one
    step later than in the synchronous engine) request by request the same sequence of outputs."""
    sync, _ = _trace(artifact, False, requests, events)
    got, engine = _trace(artifact, True, requests, events)
    if events:
        assert _per_request(got) == _per_request(sync)
    else:
        assert got == sync
    if ahead:
        assert engine.num_steps_ahead > 0, "the engine never ran ahead"
    else:
        assert engine.num_steps_ahead == 0, "the engine ran ahead where it may not"
    return sync


def test_greedy_requests_finishing_at_different_steps(artifacts_dir):
    reqs = [(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=5 + 4 * i, ignore_eos=True))
            for i, p in enumerate(PROMPTS)]
    trace = _same(artifacts_dir["llama"], reqs)
    finished = [rid for call in trace for rid, done, _ in call if done]
    assert finished == ["r0", "r1", "r2", "r3"]


def test_seeded_sampling_stop_tokens_strings_and_min_tokens(artifacts_dir):
    art = artifacts_dir["llama"]
    greedy, _ = _trace(art, False, [("g", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=12,
                                                                         ignore_eos=True))])
    final = greedy[-1][0][2][0]
    stop_tok, text = final[1][5], final[2]
    reqs = [
        ("seeded", PROMPTS[1], SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=16)),
        ("stop-id", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_tok])),
        ("stop-str", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=12, stop=[text[len(text) // 2:][:3]])),
        ("min", PROMPTS[2], SamplingParams(temperature=0.8, seed=3, min_tokens=6, max_tokens=10,
                                           stop_token_ids=[stop_tok])),
    ]
    trace = _same(art, reqs)
    reasons = {rid: outs[0][3] for call in trace for rid, done, outs in call if done}
    assert reasons["stop-id"] == "stop" and reasons["stop-str"] == "stop"


def test_requests_added_and_aborted_mid_stream(artifacts_dir):
    reqs = [(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True))
            for i, p in enumerate(PROMPTS[:2])]
    events = {
        3: lambda e: e.add_request("late", PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=6,
                                                                      ignore_eos=True)),
        6: lambda e: e.abort_request("r1"),
    }
    trace = _same(artifacts_dir["llama"], reqs, events)
    assert not any(rid == "r1" for call in trace[6:] for rid, _, _ in call), "an aborted request produced output"
    assert not _per_request(trace)["r1"][-1][0], "r1 was aborted before it finished"
    assert any(rid == "late" and done for call in trace for rid, done, _ in call)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=8, repetition_penalty=1.3, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=8, logprobs=2, ignore_eos=True),
    SamplingParams(temperature=0.7, seed=1, n=2, max_tokens=8, ignore_eos=True),
], ids=["penalty", "logprobs", "n2"])
def test_no_running_ahead_where_the_host_must_see_the_tokens(artifacts_dir, params):
    _same(artifacts_dir["llama"], [("a", PROMPTS[0], params)], ahead=False)


def test_default_runs_ahead_on_a_gpu_only(artifacts_dir):
    """EngineOptions.async_scheduling None (the default): on for CUDA devices (tests/test_gpu.py), off on the CPU,
    where nothing overlaps; an explicit value wins."""
    assert EngineOptions().async_scheduling is None
    assert LLMEngine(artifacts_dir["llama"], EngineOptions(device="cpu")).async_scheduling is False
    assert LLMEngine(artifacts_dir["llama"], EngineOptions(device="cpu", async_scheduling=True)).async_scheduling


def test_aborting_everything_in_flight_leaves_a_clean_engine(artifacts_dir):
    engine = LLMEngine(artifacts_dir["llama"], EngineOptions(device="cpu", async_scheduling=True))
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    engine.add_request("a", PROMPTS[0], params)
    for _ in range(3):
        engine.step()
    assert engine.num_steps_ahead > 0
    engine.abort_request("a")
    assert not engine.has_unfinished_requests()
    engine.add_request("b", PROMPTS[1], params)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    fresh, _ = _trace(artifacts_dir["llama"], False, [("b", PROMPTS[1], params)])
    assert outs and outs[-1].outputs[0].token_ids == list(fresh[-1][0][2][0][1])
