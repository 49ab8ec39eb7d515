"""Whole models on the GPU against transformers on the GPU, both in bfloat16 (run with `pytest -m gpu`):
the shipped code model (models/spanda-py-target, built like recipes/spanda-py.yaml but bf16 on CUDA) and a
random-weight model of the Llama-3.2-1B shape (bench/engine.py's SHAPES["1b"]).

Prefill logits: Spanda's (float32 copies of its bf16 logits) against transformers' bf16 forward; the max
absolute difference is printed. What bf16 costs is measured, not guessed: transformers' float32 forward of
the same (bf16-valued) weights is the truth, and Spanda's bf16 error against it may be at most MEAN_FACTOR
times transformers' own bf16 error in mean absolute difference and MAX_FACTOR times in max (the max over
~10^7 logits is a tail statistic). A wrong RoPE, mask or weight layout is off by the logits' own scale, 20x
and more.

Greedy tokens: Spanda generates for all prompts in one batch (batched decode graphs, padded buckets),
transformers one prompt at a time. The tokens must be identical. The one accepted divergence: at the first
step where they differ, the token Spanda chose must score, in transformers' own logits at that step, within
``allowance`` of transformers' choice, where

    allowance = max(MARGIN_ULPS bf16 steps at transformers' top logit, 2 x the max prefill-logit difference
                    between Spanda and transformers measured on the same prompt)

i.e. transformers itself could not separate the two candidates by more than bf16 resolution or the
numerical noise between the two bf16 implementations on that prompt (each logit may move by that noise, in
opposite directions). A broken decode path picks tokens transformers scores whole units lower. Past a
justified divergence the two continue from different texts, so that prompt is not compared further. (The
random 1B-shape model's logits are nearly flat, so its prompts meet near-ties within a few steps; the trained
model's wide margins make it the long comparison.) Each test prints its figures.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from runtime import LLM, SamplingParams
from tests.conftest import REPO

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu on the device)"),
]

NEW_TOKENS = 32
MEAN_FACTOR = 3.0
MAX_FACTOR = 5.0
MARGIN_ULPS = 2


def bf16_step(x: float) -> float:
    """Spacing of bfloat16 numbers (8 significant bits) at |x|."""
    return 2.0 ** (math.frexp(abs(x))[1] - 8) if x else 2.0**-133


@dataclass
class Case:
    artifact: Path
    hf: torch.nn.Module  # bfloat16
    hf32: torch.nn.Module  # the same weights in float32: the reference for what bf16 arithmetic costs
    prompts: list[list[int]]
    full_match_required: int  # prompts that must match every token (the trained model's margins are wide)


def _build(recipe: dict, out: Path) -> Path:
    from compiler.build import build
    from compiler.recipe import recipe_from_dict

    return build(recipe_from_dict(recipe), out).path


@pytest.fixture(scope="module")
def spanda_py(tmp_path_factory) -> Case:
    import yaml
    from transformers import AutoModelForCausalLM

    src = REPO / "models" / "spanda-py-target"
    recipe = yaml.safe_load((REPO / "recipes" / "spanda-py.yaml").read_text())
    recipe["model"].update(source=str(src), dtype="bfloat16")
    recipe["target"]["device"] = "cuda"
    recipe.pop("eval", None)  # the held-out perplexity is the CPU quickstart's figure; not needed here
    art = _build(recipe, tmp_path_factory.mktemp("spanda-py") / "art")
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).cuda().eval()
    hf32 = copy.deepcopy(hf).float()
    from runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(art)
    texts = ["def fibonacci(n):", "import os\nimport sys\n\n", "class Stack:\n    def __init__(self):\n",
             "    for i in range(len(items)):\n", "def read_config(path):\n    \"\"\"Read a config file.",
             "try:\n    import json\nexcept ImportError:\n"]
    return Case(art, hf, hf32, [tok.encode(t) for t in texts], full_match_required=1)


@pytest.fixture(scope="module")
def llama_1b_shape(tmp_path_factory) -> Case:
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.engine import SHAPES
    from tests.tokenizer_fixture import train_tokenizer

    root = tmp_path_factory.mktemp("llama-1b")
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = LlamaForCausalLM(LlamaConfig(**SHAPES["1b"], bos_token_id=1, eos_token_id=2)).to(torch.bfloat16)
    hf.eval().save_pretrained(root / "hf")
    train_tokenizer(root / "hf", vocab_size=512)
    art = _build({
        "name": "llama-1b-shape", "model": {"source": str(root / "hf"), "dtype": "bfloat16"},
        "target": {"device": "cuda", "max_seq_len": 1024, "max_batch": 8, "max_num_batched_tokens": 1024,
                   "batch_buckets": [1, 2, 4, 8], "kv_page_size": 16},
    }, root / "art")
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, 128000, (n,), generator=g).tolist() for n in (4, 15, 16, 47, 130, 300)]
    return Case(art, hf, copy.deepcopy(hf).float(), prompts, full_match_required=0)


@pytest.mark.parametrize("name", ["spanda_py", "llama_1b_shape"])
def test_bf16_logits_and_greedy_tokens_match_transformers(name, request):
    case: Case = request.getfixturevalue(name)
    hf = case.hf
    hf.generation_config.eos_token_id = None
    llm = LLM(case.artifact, device="cuda", kv_cache_blocks=1024)
    assert llm.engine.runner.graphs is not None  # bf16 on CUDA: decode runs through the captured graphs

    pairs, err = [], {"spanda": [0.0, 0.0], "transformers": [0.0, 0.0]}  # vs float32: [max, mean]
    for ids in case.prompts:
        got = llm.engine.compute_logits(ids)
        x = torch.tensor([ids], device="cuda")
        with torch.no_grad():
            ref = hf(x).logits[0].float().cpu()
            truth = case.hf32(x).logits[0].float().cpu()
        pairs.append((got, ref))
        row = []
        for who, logits in (("spanda", got), ("transformers", ref)):
            d = (logits - truth).abs()
            err[who] = [max(err[who][0], d.max().item()), max(err[who][1], d.mean().item())]
            row.append(f"{who} max {d.max().item():.4f} mean {d.mean().item():.5f}")
        print(f"\n  {len(ids)}-token prompt, error vs float32: " + ", ".join(row), end="")
    prompt_noise = [(got - ref).abs().max().item() for got, ref in pairs]
    noise = max(prompt_noise)
    mean = max((got - ref).abs().mean().item() for got, ref in pairs)
    (s_max, s_mean), (t_max, t_mean) = err["spanda"], err["transformers"]
    print(f"\n{name}: prefill logits vs transformers bf16: max |diff| {noise:.4f}, mean {mean:.5f}; vs float32: "
          f"Spanda max {s_max:.4f} mean {s_mean:.5f}, transformers bf16 max {t_max:.4f} mean {t_mean:.5f}")
    assert s_mean <= MEAN_FACTOR * t_mean and s_max <= MAX_FACTOR * t_max, (
        f"{name}: Spanda's bf16 logits are off the float32 forward by max {s_max}, mean {s_mean}; transformers' "
        f"bf16 ones by max {t_max}, mean {t_mean} (allowed: {MAX_FACTOR}x max, {MEAN_FACTOR}x mean)")

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(case.prompts, params)
    compared, full, notes = 0, 0, []
    for ids, out, p_noise in zip(case.prompts, outs, prompt_noise):
        with torch.no_grad():
            r = hf.generate(torch.tensor([ids], device="cuda"), max_new_tokens=NEW_TOKENS, do_sample=False,
                            pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        want = r.sequences[0, len(ids):].tolist()
        have = out.outputs[0].token_ids
        assert len(have) == len(want) == NEW_TOKENS
        step = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), None)
        if step is None:
            compared += NEW_TOKENS
            full += 1
            continue
        logits = r.logits[step][0].float().cpu()
        best = logits.max().item()
        gap = best - logits[have[step]].item()
        allowance = max(MARGIN_ULPS * bf16_step(best), 2 * p_noise)
        assert gap <= allowance, (
            f"{name}: prompt of {len(ids)} tokens diverges at step {step}: transformers picks {want[step]}, "
            f"Spanda {have[step]}, which transformers scores {gap:.4f} lower (allowance {allowance:.4f}); "
            f"first {step} tokens agreed")
        compared += step
        notes.append(f"prompt of {len(ids)} tokens: justified divergence at step {step} (gap {gap:.4f} <= "
                     f"{allowance:.4f})")
    print(f"{name}: greedy: {full}/{len(case.prompts)} prompts match all "
          f"{NEW_TOKENS} tokens, {compared} tokens compared; " + ("; ".join(notes) or "no divergence"))
    assert full >= case.full_match_required
