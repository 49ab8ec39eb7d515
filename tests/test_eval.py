"""Perplexity, KL and top-1 agreement (spanda eval, the build's eval.json) against transformers."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from artifacts.store import open_artifact
from compiler.build import build
from compiler.recipe import load_recipe
from runtime.evaluate import EvalDataError, load_eval_data
from spanda.cli import main
from tests.conftest import TINY_RECIPE, load_hf


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    g = torch.Generator().manual_seed(11)
    path = tmp_path_factory.mktemp("eval") / "heldout.jsonl"
    rows = [{"token_ids": [1] + torch.randint(3, 500, (n,), generator=g).tolist()} for n in (40, 63, 17)]
    rows.append({"text": "def add(a, b):\n    return a + b\n"})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _hf_perplexity(hf_dir, seqs):
    hf = load_hf(hf_dir)
    nll, n = 0.0, 0
    with torch.no_grad():
        for ids in seqs:
            logits = hf(torch.tensor([ids])).logits[0, :-1].float()
            nll += float(F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
            n += len(ids) - 1
    return math.exp(nll / n)


def test_eval_perplexity_matches_transformers_and_reference_agrees(artifacts_dir, checkpoints, data_file):
    r = CliRunner().invoke(main, ["eval", str(artifacts_dir["llama"]), "--data", str(data_file),
                                  "--reference", str(checkpoints["llama"]), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output[r.output.index("{"):])
    from runtime.tokenizer import Tokenizer

    seqs = load_eval_data(data_file, Tokenizer.from_dir(checkpoints["llama"]).encode)
    ref_ppl = _hf_perplexity(checkpoints["llama"], seqs)
    assert result["perplexity"] == pytest.approx(ref_ppl, rel=1e-4)
    assert result["num_tokens"] == sum(len(s) - 1 for s in seqs)
    assert result["mean_kl"] == pytest.approx(0.0, abs=1e-6)  # float32 artifact vs float32 source
    assert result["top1_agreement"] == 1.0


def test_bf16_build_records_eval_and_differs_measurably(checkpoints, data_file, tmp_path):
    recipe = load_recipe(TINY_RECIPE).with_model_source(checkpoints["llama"])
    recipe = recipe.model_copy(update={
        "model": recipe.model.model_copy(update={"dtype": "bfloat16"}),
        "eval": recipe.eval.model_copy(update={"data": str(data_file)}),
    })
    res = build(recipe, tmp_path / "bf16")
    art = open_artifact(res.path)
    assert "eval.json" in art.manifest.files
    recorded = json.loads((res.path / "eval.json").read_text())
    assert recorded == art.manifest.eval
    r = CliRunner().invoke(main, ["eval", str(res.path), "--data", str(data_file), "--device", "cpu",
                                  "--reference", str(checkpoints["llama"])])
    assert r.exit_code == 0, r.output
    again = json.loads(r.output[r.output.index("{"):])
    assert again["perplexity"] == pytest.approx(recorded["perplexity"], rel=1e-6)
    assert 0 < again["mean_kl"] < 0.05 and again["top1_agreement"] > 0.8


def test_bad_eval_data_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"token_ids": [1, 2, 3]}\n{"tokens": 5}\n')
    with pytest.raises(EvalDataError, match="bad.jsonl:2"):
        load_eval_data(bad, lambda t: [])
    with pytest.raises(EvalDataError, match="not found"):
        load_eval_data(tmp_path / "missing.jsonl", lambda t: [])
