"""The committed reference models (models/spanda-py-target, models/spanda-py-draft) load with
transformers on the CPU, have the advertised sizes, write Python-looking code, and reproduce the
held-out perplexity recorded in their eval.json (made by tools/train_reference_models.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
HELDOUT = MODELS / "heldout.jsonl"
N_ROWS = 16  # CPU budget: the first 16 rows; eval.json records perplexity_first16 for the same rows

PARAM_RANGES = {
    "spanda-py-target": (20_000_000, 22_000_000),
    "spanda-py-draft": (2_500_000, 3_500_000),
}
PYTHONISH = ("return", "if", "=", "(", ":", '"""', "def", "import", "self", "for")


@pytest.fixture(scope="module", params=sorted(PARAM_RANGES))
def loaded(request):
    torch.manual_seed(0)
    d = MODELS / request.param
    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    model.eval()
    return request.param, d, tok, model


def test_folder_layout_and_config(loaded):
    name, d, tok, model = loaded
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "generation_config.json", "eval.json", "training.json"):
        assert (d / f).is_file(), f
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    assert cfg["vocab_size"] == 8192 and cfg["max_position_embeddings"] == 1024
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 1 and gen["eos_token_id"] == 2
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    assert tcfg["add_bos_token"] is True and tcfg["model_max_length"] == 1024 and tcfg["chat_template"]
    # the stored weights are bf16, upcast on load
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        k = next(iter(f.keys()))
        assert f.get_tensor(k).dtype == torch.bfloat16


def test_parameter_count(loaded):
    name, _, _, model = loaded
    n = sum(p.numel() for p in model.parameters())
    lo, hi = PARAM_RANGES[name]
    assert lo <= n <= hi, (name, n)
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()


def test_tokenizer_adds_bos_once(loaded):
    _, d, tok, _ = loaded
    from tokenizers import Tokenizer

    text = "def fibonacci(n):\n    return n"
    ids = tok(text)["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 1
    assert Tokenizer.from_file(str(d / "tokenizer.json")).encode(text).ids == ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2


def test_greedy_completion_looks_like_python(loaded):
    name, _, tok, model = loaded
    enc = tok("def fibonacci(n):", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=2)
    new = out[0, enc["input_ids"].shape[1]:]
    assert new.numel() >= 8
    text = tok.decode(new, skip_special_tokens=True)
    print(f"{name}: def fibonacci(n):{text!r}")
    assert "\n" in text, text
    assert any(s in text for s in PYTHONISH), text


def test_heldout_perplexity_matches_eval_json(loaded):
    _, d, _, model = loaded
    rows = [json.loads(line)["token_ids"] for line in HELDOUT.read_text().splitlines() if line.strip()]
    assert len(rows) == 32 and all(len(r) == 512 and r[0] == 1 for r in rows)
    x = torch.tensor(rows[:N_ROWS], dtype=torch.long)
    nll_sum, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, x.shape[0], 8):
            b = x[i : i + 8]
            logits = model(input_ids=b, use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum")
            nll_sum += nll.double().item()
            n += b[:, 1:].numel()
    ppl = math.exp(nll_sum / n)
    ev = json.loads((d / "eval.json").read_text())
    assert ev["heldout_file"] == "models/heldout.jsonl" and ev["dtype"] == "float32"
    assert ev["num_tokens"] == 32 * 511 and ev["num_tokens_first16"] == n
    assert abs(ppl - ev["perplexity_first16"]) / ev["perplexity_first16"] < 0.005, (ppl, ev)
