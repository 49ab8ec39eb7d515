"""The README quickstart: build the shipped reference model with its recipe, check the build's recorded
perplexity against the one transformers computed when the model was trained, and generate from it."""

from __future__ import annotations

import json

import pytest

from compiler.build import build
from compiler.recipe import load_recipe
from runtime import LLM, SamplingParams
from tests.conftest import REPO


@pytest.fixture(scope="module")
def shipped_artifact(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.chdir(REPO)  # the recipe names repo-relative paths, as the README runs it
    recipe = load_recipe(REPO / "recipes" / "spanda-py.yaml")
    return build(recipe, tmp_path_factory.mktemp("quickstart") / "spanda-py").path


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_build_records_the_same_perplexity_as_transformers(shipped_artifact):
    ours = json.loads((shipped_artifact / "eval.json").read_text())
    hf = json.loads((REPO / "models" / "spanda-py-target" / "eval.json").read_text())
    assert ours["num_tokens"] == hf["num_tokens"]
    assert ours["perplexity"] == pytest.approx(hf["perplexity"], rel=0.005)


def test_quickstart_prompt_gives_python(shipped_artifact):
    llm = LLM(shipped_artifact, device="cpu")
    out = llm.generate(["def fibonacci(n):"], SamplingParams(temperature=0.0, max_tokens=32))[0]
    text = out.outputs[0].text
    assert "\n" in text and any(s in text for s in ('"""', "return", "(", ":", "="))
    assert len(out.outputs[0].token_ids) == 32
