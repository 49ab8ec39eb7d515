"""Recipe schema: the shipped recipes load; every kind of bad input gets a precise RecipeError."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from compiler.recipe import Recipe, RecipeError, load_recipe, recipe_from_dict

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def error_of(tmp_path: Path, text: str) -> str:
    p = write(tmp_path, text)
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    msg = str(ei.value)
    assert str(p) in msg
    return msg


def test_tiny_recipe_loads() -> None:
    r = load_recipe(RECIPES / "tiny-llama.yaml")
    assert r.name == "tiny-llama" and r.model.dtype == "float32" and r.model.source is None
    assert r.passes.enabled() == ["fuse_qkv", "fuse_gate_up", "fuse_add_rmsnorm", "fuse_act_mul", "fuse_rope_kv_write",
                                  "fuse_act_quant", "wna16_mma"]
    assert r.passes.wna16_mma == "auto"  # resolved by the build's device
    assert r.target.batch_buckets[-1] == r.target.max_batch
    assert r.quantization.method == "none"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path: Path) -> None:
    load_recipe(path)


def test_hash_and_model_override() -> None:
    r = load_recipe(RECIPES / "tiny-llama.yaml")
    assert len(r.sha256()) == 64 and r.sha256() == load_recipe(RECIPES / "tiny-llama.yaml").sha256()
    r2 = r.with_model_source("/models/tiny")
    assert r2.model.source == "/models/tiny" and r.model.source is None
    assert r2.sha256() == r.sha256()  # the checkpoint is identified by content, not by path
    assert r2.sha256(include_source=True) != r.sha256(include_source=True)
    r3 = r.model_copy(update={"target": r.target.model_copy(update={"kv_page_size": 32})})
    assert r3.sha256() != r.sha256()
    assert recipe_from_dict(r.to_dict()) == r
    with pytest.raises(ValidationError, match="frozen"):
        r.name = "x"  # type: ignore[misc]


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "int8"])
def test_quantized_kv_cache_dtypes_load(tmp_path: Path, kv_dtype: str) -> None:
    """fp8_e4m3 / int8 KV caches need no quantization method: their scales calibrate on the calibration data."""
    r = load_recipe(write(tmp_path, f"name: x\ntarget: {{kv_dtype: {kv_dtype}}}\n"
                                    "quantization: {calibration: {data: c.jsonl, num_samples: 4, seq_len: 64}}\n"))
    assert r.target.kv_dtype == kv_dtype and r.quantization.method == "none"
    assert r.quantization.calibration.num_samples == 4 and r.quantization.calibration.seq_len == 64
    assert Recipe(name="x").target.kv_dtype == "auto"


def test_defaults_and_derived_buckets() -> None:
    r = Recipe(name="x")
    assert r.target.batch_buckets == (1, 2, 4, 8, 16, 32)
    r = recipe_from_dict({"name": "x", "target": {"max_batch": 12, "max_num_batched_tokens": 64}})
    assert r.target.batch_buckets == (1, 2, 4, 8, 12)


@pytest.mark.parametrize(
    "text, parts",
    [
        ("name: x\ntypo: 1\n", ["typo", "unknown key", "allowed keys here: name, model, passes"]),
        ("name: x\ntarget:\n  max_batchh: 4\n", ["target.max_batchh", "unknown key", "max_batch"]),
        (
            "name: x\nmodel:\n  options: {sliding: false}\n",
            ["model.options.sliding", "unknown key", "sliding_window, max_position_embeddings"],
        ),
        ("name: x\npasses: {fuse_qkv: true, fuse_rope: true}\n", ["passes.fuse_rope", "fuse_act_mul"]),
        (
            "name: x\nmodel: {family: falcon}\n",
            ["model.family", "'falcon'", "'llama'", "'mistral'", "'qwen2'"],
        ),
        ("name: x\nmodel: {dtype: float64}\n", ["model.dtype", "'float64'", "'bfloat16'", "'float16'"]),
        ("name: x\ntarget: {device: tpu}\n", ["target.device", "'tpu'", "'cpu'", "'cuda'"]),
        (
            "name: x\ntarget: {kv_page_size: 24}\n",
            ["target.kv_page_size", "24", "1, 8, 16, 32, 64, 128 or 256"],
        ),
        ("name: x\ntarget: {max_batch: 0}\n", ["target.max_batch", "0", "greater than or equal to 1"]),
        (
            "name: x\ntarget: {max_batch: 8, batch_buckets: [1, 4, 2, 8]}\n",
            ["target.batch_buckets", "[1, 4, 2, 8]", "sorted ascending"],
        ),
        (
            "name: x\ntarget: {max_batch: 8, batch_buckets: [1, 2, 2, 8]}\n",
            ["target.batch_buckets", "[1, 2, 2, 8]", "no duplicates"],
        ),
        (
            "name: x\ntarget: {max_batch: 8, batch_buckets: [1, 2, 16]}\n",
            ["target.batch_buckets", "[1, 2, 16]", "<= max_batch (8)"],
        ),
        (
            "name: x\ntarget: {max_batch: 8, batch_buckets: [1, 2, 4]}\n",
            ["target.batch_buckets", "[1, 2, 4]", "the last must equal it"],
        ),
        (
            "name: x\ntarget: {max_batch: 4, batch_buckets: [], max_num_batched_tokens: 64}\n",
            ["target.batch_buckets", "[]", "must not be empty"],
        ),
        (
            "name: x\ntarget: {max_num_batched_tokens: 8, max_batch: 1, batch_buckets: [1]}\n",
            ["target.max_num_batched_tokens", "8", ">= kv_page_size (16)"],
        ),
        (
            "name: x\ntarget: {max_num_batched_tokens: 16}\n",
            ["target.max_num_batched_tokens", "16", ">= max_batch (32)"],
        ),
        ("name: x\ntarget: {max_seq_len: 8}\n", ["target.max_seq_len", "8", ">= kv_page_size (16)"]),
        ("name: x\nquantization: {method: fp8, bits: 4}\n",
         ["quantization.bits", "4", "gptq, awq and rtn only", "'fp8'"]),
        ("name: x\nquantization: {method: awq, bits: 8}\n", ["quantization.bits", "8", "awq supports 4 bits only"]),
        ("name: x\nquantization: {method: rtn, act_order: true}\n", ["quantization.act_order", "gptq only"]),
        ("name: x\nquantization: {method: fp8, activations: none}\n",
         ["quantization.activations", "'none'", "dynamic or static"]),
        ("name: x\nquantization: {method: int8, activations: static}\n",
         ["quantization.activations", "'static'", "dynamic (W8A8) or none"]),
        ("name: x\nquantization: {method: gptq, group_size: 100}\n",
         ["quantization.group_size", "100", "-1", "128"]),
        ("name: x\nquantization: {method: gptq}\neval: {max_perplexity_increase: 0.05}\n",
         ["eval.max_perplexity_increase", "0.05", "needs eval.data"]),
        ("name: x\neval: {data: d.jsonl, min_top1_agreement: 0.9}\n",
         ["eval.min_top1_agreement", "0.9", "quantization.method is none"]),
        ("name: x\nquantization: {method: magic}\n", ["quantization.method", "'magic'", "'none'", "'fp8'"]),
        ("name: x\ntarget: {kv_dtype: float8}\n",
         ["target.kv_dtype", "'float8'", "'auto'", "'float32'", "'fp8_e4m3'", "'int8'"]),
        ("name: x\ntarget: {kv_dtype: fp8_e5m2}\n", ["target.kv_dtype", "'fp8_e5m2'", "'fp8_e4m3'"]),
        (
            "name: x\ntarget: {kv_cache_blocks: -1}\n",
            ["target.kv_cache_blocks", "-1", "greater than or equal to 1"],
        ),
        (
            "name: x\ntarget: {enable_prefix_caching: maybe}\n",
            ["target.enable_prefix_caching", "'maybe'", "boolean"],
        ),
        ("name: x\ntarget: 5\n", ["target", "5", "TargetSection"]),
        ("model: {}\n", ["name", "required field is missing"]),
        ("name: 'a b'\n", ["name", "'a b'", "pattern"]),
    ],
)
def test_bad_input(tmp_path: Path, text: str, parts: list[str]) -> None:
    msg = error_of(tmp_path, text)
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_several_problems_one_line_each(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "name: x\nmodel: {family: falcon}\ntarget: {kv_page_size: 3}\nextra: 1\n")
    lines = msg.splitlines()
    assert "3 problems" in lines[0] and len(lines) == 4
    assert any("model.family" in ln for ln in lines) and any("target.kv_page_size" in ln for ln in lines)


def test_yaml_syntax_error(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "name: x\ntarget: [1, 2\n")
    assert "YAML syntax error" in msg and "line" in msg and "column" in msg


def test_duplicate_key(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "name: x\ntarget: {}\ntarget: {}\n")
    assert "duplicate key 'target'" in msg and "line 3" in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not found") as ei:
        load_recipe(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(ei.value)
    assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize(
    "text, kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("", "empty document")]
)
def test_top_level_not_mapping(tmp_path: Path, text: str, kind: str) -> None:
    msg = error_of(tmp_path, text)
    assert "expected a mapping" in msg and kind in msg
