"""Building artifacts: reproducibility, what the manifest records, and every failure leaving nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from artifacts.store import ArtifactCorruptError, open_artifact, sha256_file
from compiler import build as build_mod
from compiler.build import build
from compiler.hf_loader import CheckpointError
from compiler.models import UnsupportedModelError
from compiler.recipe import RecipeError, load_recipe
from spanda.cli import main
from tests.conftest import TINY_RECIPE, copy_tree, make_hf_checkpoint


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(TINY_RECIPE)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_two_builds_give_identical_weights(recipe, checkpoints, tmp_path):
    a = build(recipe.with_model_source(checkpoints["llama"]), tmp_path / "a")
    b = build(recipe.with_model_source(checkpoints["llama"]), tmp_path / "b")
    wa, wb = a.manifest["weights"]["files"], b.manifest["weights"]["files"]
    assert wa == wb
    for f in wa:
        assert sha256_file(a.path / f) == sha256_file(b.path / f)
    ma = open_artifact(a.path).manifest
    mb = open_artifact(b.path).manifest
    assert {k: v for k, v in ma.files.items() if k.endswith(".safetensors")} == \
        {k: v for k, v in mb.files.items() if k.endswith(".safetensors")}
    assert ma.provenance.recipe_sha256 == mb.provenance.recipe_sha256


def test_manifest_records_passes_and_fused_weights(artifacts_dir):
    m = open_artifact(artifacts_dir["qwen2"]).manifest
    assert m.passes == ["fuse_qkv", "fuse_gate_up", "fuse_act_mul", "fuse_add_rmsnorm", "fuse_rope_kv_write"]
    from safetensors import safe_open

    with safe_open(str(artifacts_dir["qwen2"] / m.weights.files[0]), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.0.self_attn.qkv_proj.bias" in names  # Qwen2's QKV bias is fused too
    assert "model.layers.0.mlp.gate_up_proj.weight" in names
    assert not any("q_proj" in n or "gate_proj" in n for n in names)
    assert "lm_head.weight" not in names  # tied embeddings: one copy


def test_passes_can_be_switched_off(recipe, checkpoints, tmp_path):
    r = recipe.model_copy(update={"passes": recipe.passes.model_copy(
        update={"fuse_qkv": False, "fuse_add_rmsnorm": False, "fuse_rope_kv_write": False})})
    res = build(r.with_model_source(checkpoints["llama"]), tmp_path / "a")
    assert res.manifest["passes"] == ["fuse_gate_up", "fuse_act_mul"]
    graph = (res.path / "graph.pt2").read_bytes()
    assert b"rope_and_cache" not in graph and b"rotary_embedding" in graph


def test_sharded_checkpoint_builds(recipe, tmp_path):
    ckpt = make_hf_checkpoint("llama", tmp_path / "hf", shards=True)
    assert (ckpt / "model.safetensors.index.json").exists()
    res = build(recipe.with_model_source(ckpt), tmp_path / "out")
    assert len(res.manifest["provenance"]["source_files"]) > 3


def test_missing_shard_is_named(recipe, tmp_path):
    ckpt = make_hf_checkpoint("llama", tmp_path / "hf", shards=True)
    shard = sorted(ckpt.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        build(recipe.with_model_source(ckpt), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_model_type_is_refused_by_name(recipe, checkpoints, tmp_path):
    ckpt = copy_tree(checkpoints["llama"], tmp_path / "hf")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as e:
        build(recipe.with_model_source(ckpt), tmp_path / "out")
    assert "gpt_neox" in str(e.value) and "llama" in str(e.value) and "qwen2" in str(e.value)
    assert _leftovers(tmp_path) == ["hf"]


def test_killed_build_leaves_nothing(recipe, checkpoints, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing weights")

    monkeypatch.setattr(build_mod, "write_weights", boom)
    with pytest.raises(KeyboardInterrupt):
        build(recipe.with_model_source(checkpoints["llama"]), tmp_path / "out")
    assert _leftovers(tmp_path) == []


def test_failed_rebuild_keeps_the_old_artifact(recipe, checkpoints, tmp_path, monkeypatch):
    out = build(recipe.with_model_source(checkpoints["llama"]), tmp_path / "out").path
    before = (out / "manifest.json").read_text()
    monkeypatch.setattr(build_mod, "write_weights", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        build(recipe.with_model_source(checkpoints["llama"]), out, overwrite=True)
    assert (out / "manifest.json").read_text() == before
    assert _leftovers(tmp_path) == ["out"]


def test_corrupted_weight_file_is_refused_at_load(artifacts_dir, tmp_path):
    from runtime import LLM

    art = copy_tree(artifacts_dir["llama"], tmp_path / "art")
    weights = next(art.glob("weights-*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorruptError, match=weights.name):
        LLM(art, device="cpu")


def test_cli_build_inspect_generate(checkpoints, tmp_path):
    runner = CliRunner()
    out = tmp_path / "art"
    r = runner.invoke(main, ["build", "--recipe", str(TINY_RECIPE), "--model", str(checkpoints["llama"]),
                             "--out", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    for word in ("llama", "fuse_qkv", "weights-00001-of-00001.safetensors", "sha256", "torch"):
        assert word in r.output
    r = runner.invoke(main, ["generate", str(out), "hello world", "--max-tokens", "8", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("hello world")


def test_cli_bad_recipe_names_the_field(checkpoints, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_RECIPE.read_text().replace("kv_page_size: 16", "kv_page_size: 17"))
    r = CliRunner().invoke(main, ["build", "--recipe", str(bad), "--model", str(checkpoints["llama"]),
                                  "--out", str(tmp_path / "out")])
    assert r.exit_code != 0
    assert "target.kv_page_size" in r.output and "17" in r.output and "128" in r.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(RecipeError):
        load_recipe(bad)
