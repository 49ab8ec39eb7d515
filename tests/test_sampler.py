"""Sampler and SamplingParams: exact reference checks (HF logits processors, hand formulas) and
statistical checks of the drawn distribution. CPU only, a few seconds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from runtime.sampler import Sampler, SamplingRow, _min_p, _top_k_top_p, make_generator
from runtime.sampling_params import SamplingParams

V = 50


def rows_for(params: SamplingParams | list[SamplingParams], b: int | None = None, prompt=(), output=()):
    plist = params if isinstance(params, list) else [params] * (b or 1)
    return [SamplingRow(p, list(prompt), list(output), None) for p in plist]


def random_logits(b: int, v: int = V, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, v, generator=g) * scale


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson statistic over cells with expected count >= 5 (the rest pooled)."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())


# -- greedy ------------------------------------------------------------------------------------------
def test_greedy_equals_argmax():
    logits = random_logits(16)
    out = Sampler()(logits, rows_for(SamplingParams(temperature=0.0), 16))
    assert out.token_ids.dtype == torch.int64 and out.token_ids.device.type == "cpu"
    assert torch.equal(out.token_ids, logits.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_greedy_any_float_dtype(dtype):
    logits = random_logits(8).to(dtype)
    out = Sampler()(logits, rows_for(SamplingParams(temperature=0.0), 8))
    assert torch.equal(out.token_ids, logits.float().argmax(-1))


def test_temperature_below_eps_is_greedy():
    assert SamplingParams(temperature=1e-6).greedy and not SamplingParams(temperature=1e-3).greedy
    logits = random_logits(32)
    out = Sampler(seed=1)(logits, rows_for(SamplingParams(temperature=1e-6), 32))
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_temperature_to_zero_limit_samples_argmax():
    logits = random_logits(64, seed=3)
    logits[torch.arange(64), logits.argmax(-1)] += 0.05  # top gap >= 0.05 -> / 1e-4 = 500 nats
    out = Sampler(seed=2)(logits, rows_for(SamplingParams(temperature=1e-4), 64))
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_top_k_1_equals_greedy():
    logits = random_logits(64, seed=4)
    out = Sampler(seed=5)(logits, rows_for(SamplingParams(temperature=1.5, top_k=1), 64))
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_mixed_greedy_and_sampled_rows():
    logits = random_logits(8, seed=6)
    params = [
        SamplingParams(temperature=0.0 if i % 2 else 1.0, top_k=1 if i % 2 == 0 else 0) for i in range(8)
    ]
    out = Sampler(seed=0)(logits, rows_for(params))
    assert torch.equal(out.token_ids, logits.argmax(-1))


# -- truncation: top-k / top-p / min-p against HF warpers and an independent numpy reference ---------
def allowed_set_numpy(
    logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float
) -> set[int]:
    """Independent reference: keep top-k (ties kept), then the smallest prefix of the sorted renormalized
    distribution whose cumulative prob >= top_p, then tokens with prob >= min_p * max prob."""
    x = logits.astype(np.float64) / temperature
    keep = np.ones_like(x, dtype=bool)
    if top_k > 0:
        keep &= x >= np.sort(x)[-top_k]
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order])
    n_keep = int(np.searchsorted(cum, top_p - 1e-9) + 1)
    nucleus = np.zeros_like(keep)
    nucleus[order[:n_keep]] = True
    keep &= nucleus
    if min_p > 0:
        keep &= p >= min_p * p.max()
    return set(np.flatnonzero(keep).tolist())


CASES = [
    (1.0, 5, 1.0, 0.0),
    (0.7, 0, 0.8, 0.0),
    (1.3, 0, 1.0, 0.2),
    (1.0, 10, 0.5, 0.05),
    (2.0, -1, 0.95, 0.1),
    (0.5, 3, 0.3, 0.5),
]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", CASES)
def test_samples_stay_in_allowed_set(temperature, top_k, top_p, min_p):
    logits = random_logits(1, seed=11)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    allowed = allowed_set_numpy(logits[0].numpy(), temperature, top_k, top_p, min_p)
    out = Sampler(seed=0)(logits.expand(4000, V), rows_for(params, 4000))
    drawn = set(out.token_ids.tolist())
    assert drawn <= allowed
    assert len(drawn) == len(allowed) or len(allowed) > 15  # small allowed sets get fully covered


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", CASES)
def test_masks_equal_hf_warpers(temperature, top_k, top_p, min_p):
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = random_logits(6, seed=12)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    for warper in (
        ([TopKLogitsWarper(top_k)] if top_k > 0 else [])
        + [TopPLogitsWarper(top_p)]
        + ([MinPLogitsWarper(min_p)] if min_p > 0 else [])
    ):
        ref = warper(None, ref)
    rows = rows_for(params, 6)
    ours = _min_p(_top_k_top_p(logits / temperature, rows), rows)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    for i in range(6):
        allowed = allowed_set_numpy(logits[i].numpy(), temperature, top_k, top_p, min_p)
        assert set(torch.isfinite(ours[i]).nonzero().flatten().tolist()) == allowed


def test_top_p_keeps_at_least_one_token():
    logits = torch.zeros(1, V)
    logits[0, 7] = 20.0
    rows = rows_for(SamplingParams(top_p=1e-6))
    assert torch.isfinite(_top_k_top_p(logits, rows)).sum() == 1
    assert Sampler(seed=0)(logits, rows).token_ids.item() == 7


# -- penalties ---------------------------------------------------------------------------------------
def penalties_reference(logits, prompt, output, rep, freq, pres):
    """Hand-written: HF repetition penalty over prompt+output, then OpenAI frequency/presence on output."""
    x = logits.clone()
    for t in set(prompt) | set(output):
        x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
    for t in set(output):
        x[t] -= freq * output.count(t) + pres
    return x


@pytest.mark.parametrize(
    "rep,freq,pres", [(1.3, 0.0, 0.0), (0.8, 0.0, 0.0), (1.0, 0.5, 0.0), (1.0, 0.0, -1.5), (1.7, 1.2, 0.7)]
)
def test_penalties_match_reference(rep, freq, pres):
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = random_logits(3, seed=21)
    prompts = [[1, 2, 3, 3], [], [5, 40]]
    outputs = [[3, 4, 4, 4, 9], [7, 7], []]
    params = SamplingParams(repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres)
    rows = [SamplingRow(params, p, o, None) for p, o in zip(prompts, outputs, strict=True)]
    ours = Sampler()._apply_penalties(logits.clone(), rows)
    for i in range(3):
        ref = penalties_reference(logits[i], prompts[i], outputs[i], rep, freq, pres)
        torch.testing.assert_close(ours[i], ref, rtol=1e-6, atol=1e-6)
        if freq == pres == 0.0 and prompts[i] + outputs[i]:
            ids = torch.tensor([prompts[i] + outputs[i]])
            hf = RepetitionPenaltyLogitsProcessor(rep)(ids, logits[i : i + 1].clone())[0]
            torch.testing.assert_close(ours[i], hf)
    greedy = Sampler()(
        logits, [dataclasses.replace(r, params=dataclasses.replace(params, temperature=0.0)) for r in rows]
    )
    assert torch.equal(greedy.token_ids, ours.argmax(-1))


def test_penalties_only_on_rows_that_ask():
    logits = random_logits(2, seed=22)
    rows = [
        SamplingRow(SamplingParams(repetition_penalty=2.0), [1, 2], [3], None),
        SamplingRow(SamplingParams(), [1, 2], [3], None),
    ]
    ours = Sampler()._apply_penalties(logits.clone(), rows)
    assert torch.equal(ours[1], logits[1]) and not torch.equal(ours[0], logits[0])


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.zeros(4, V)
    logits[:, 2] = 50.0  # EOS
    logits[:, 9] = 40.0  # a stop token id
    p = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[9])
    rows = [
        SamplingRow(p, [1], [5, 5], None),  # 2 < 3 generated: EOS and 9 masked
        SamplingRow(p, [1], [5, 5, 5], None),  # reached min_tokens
        SamplingRow(dataclasses.replace(p, ignore_eos=True), [1], [], None),  # EOS not masked
        SamplingRow(SamplingParams(temperature=0.0), [1], [], None),
    ]
    out = Sampler(eos_token_ids=[2])(logits, rows).token_ids.tolist()
    assert out[0] not in (2, 9) and out[1] == 2 and out[2] == 2 and out[3] == 2


# -- randomness --------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 4, 0.9)])
def test_empirical_distribution_matches_softmax(temperature, top_k, top_p):
    v = 8
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, 2.0, 1.5, -1.0, 0.2]])
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    n = 20_000
    out = Sampler(seed=123)(logits.expand(n, v), rows_for(params, n))
    counts = np.bincount(out.token_ids.numpy(), minlength=v)
    ref = torch.softmax(_top_k_top_p(logits / temperature, rows_for(params)), -1)[0].double().numpy()
    allowed = allowed_set_numpy(logits[0].numpy(), temperature, top_k, top_p, 0.0)
    assert set(np.flatnonzero(ref > 0).tolist()) == allowed
    assert chi_square(counts, ref) < 30.0  # df <= 7: p ~ 1e-4


def test_seeded_draws_follow_the_distribution():
    v = 6
    logits = torch.tensor([[0.3, -0.2, 1.1, 0.0, 0.7, -1.0]])
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(3000)]
    out = Sampler()(logits.expand(3000, v), rows_for(params))
    counts = np.bincount(out.token_ids.numpy(), minlength=v)
    assert chi_square(counts, torch.softmax(logits[0].double(), -1).numpy()) < 30.0


def test_same_seed_same_tokens_whatever_the_batch():
    sampler = Sampler()
    target = random_logits(1, seed=31)[0]
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=777)
    ref = []
    for step in range(25):
        ref.append(sampler(target[None], [SamplingRow(p, [1], list(range(step)), None)]).token_ids.item())
    for b, pos, other_seed in [(5, 0, None), (7, 6, 3), (3, 1, 777)]:
        got = []
        for step in range(25):
            logits = random_logits(b, seed=100 + step)
            logits[pos] = target
            rows = [
                SamplingRow(SamplingParams(temperature=0.8, seed=other_seed), [2], [4] * (step + i), None)
                for i in range(b)
            ]
            rows[pos] = SamplingRow(p, [1], list(range(step)), None)
            got.append(sampler(logits, rows).token_ids[pos].item())
        assert got == ref
    explicit = [
        sampler(target[None], [SamplingRow(p, [1], [0] * s, make_generator(777, s, "cpu"))]).token_ids.item()
        for s in range(25)
    ]
    assert explicit == ref


def test_different_seeds_differ():
    logits = torch.zeros(1, V)  # uniform: 30 draws collide with prob 50**-30
    draws = {}
    for seed in (1, 2):
        p = SamplingParams(seed=seed)
        draws[seed] = [
            Sampler()(logits, [SamplingRow(p, [], [0] * s, None)]).token_ids.item() for s in range(30)
        ]
    assert draws[1] != draws[2]
    assert len(set(draws[1])) > 5  # the position enters the generator too


def test_make_generator_is_deterministic():
    a = torch.rand(5, generator=make_generator(9, 3, "cpu"))
    assert torch.equal(a, torch.rand(5, generator=make_generator(9, 3, "cpu")))
    assert not torch.equal(a, torch.rand(5, generator=make_generator(9, 4, "cpu")))
    assert not torch.equal(a, torch.rand(5, generator=make_generator(9, 3, "cpu", index=1)))


# -- logprobs ----------------------------------------------------------------------------------------
def test_logprobs_are_raw_log_softmax():
    logits = random_logits(3, seed=41)
    params = [
        SamplingParams(logprobs=5, repetition_penalty=1.5, temperature=0.5),
        SamplingParams(),
        SamplingParams(logprobs=0, temperature=0.0),
    ]
    rows = [SamplingRow(p, [1, 2, 3], [4], None) for p in params]
    out = Sampler(seed=0)(logits, rows)
    raw = torch.log_softmax(logits, -1)
    assert out.logprobs[1] is None
    for i in (0, 2):
        lp = out.logprobs[i]
        tok = out.token_ids[i].item()
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(raw[i, tok].item(), abs=1e-6)
        assert lp.rank == int((raw[i] > raw[i, tok]).sum()) + 1
        k = params[i].logprobs
        top = raw[i].topk(k) if k else None
        assert [t for t, _ in lp.top] == ([] if top is None else top.indices.tolist())
        assert all(a >= b for (_, a), (_, b) in zip(lp.top, lp.top[1:], strict=False))
    assert out.logprobs[2].rank == 1


# -- validation --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value",
    [
        ("n", 0),
        ("max_tokens", 0),
        ("temperature", -1.0),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("logprobs", 21),
        ("logprobs", -1),
        ("min_tokens", -1),
        ("seed", 1.5),
        ("stop", [""]),
        ("stop", ["ok", 3]),
        ("stop_token_ids", [-1]),
        ("ignore_eos", "yes"),
        ("n", True),
    ],
)
def test_validation_errors_name_the_field(field, value):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    msg = str(err.value)
    assert msg.startswith(field + " must be") and repr(value) in msg


def test_min_tokens_cannot_exceed_max_tokens():
    with pytest.raises(ValueError, match=r"min_tokens must be <= max_tokens \(4\), got 5"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_normalization_and_defaults():
    p = SamplingParams(stop="###", stop_token_ids=[7, 8])
    assert p.stop == ("###",) and p.stop_token_ids == (7, 8)
    assert SamplingParams(stop=None).stop == () and SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    d = SamplingParams()
    assert (d.n, d.max_tokens, d.temperature, d.top_p, d.top_k, d.min_p, d.logprobs) == (
        1,
        16,
        1.0,
        1.0,
        0,
        0.0,
        None,
    )
    assert not d.greedy and SamplingParams(temperature=0).greedy
    with pytest.raises(ValueError, match="temperature must be"):
        dataclasses.replace(d, temperature=-0.5)
