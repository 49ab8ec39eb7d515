"""Artifact writer/reader: atomic commit, hash verification, schema version, envelope checks."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from artifacts.manifest import SCHEMA_VERSION, Manifest
from artifacts.store import (
    ArtifactCorruptError,
    ArtifactError,
    ArtifactExistsError,
    ArtifactIncompatibleError,
    ArtifactWriter,
    check_envelope,
    current_envelope,
    open_artifact,
    sha256_file,
)

WEIGHTS = bytes(range(256)) * 64  # 16 KiB, deterministic


def manifest_dict(
    device: str = "cpu", gpu_arch: str | None = None, torch: str = "2.13.0+cpu"
) -> dict[str, Any]:
    """A complete manifest without `files`, for a tiny artifact with graph, one shard, tokenizer."""
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {
            "family": "llama",
            "architecture": "LlamaForCausalLM",
            "config": {
                "hidden_size": 64,
                "num_layers": 2,
                "num_heads": 4,
                "num_kv_heads": 2,
                "head_dim": 16,
                "vocab_size": 256,
                "dtype": "float32",
            },
        },
        "tokenizer": {
            "files": ["tokenizer.json"],
            "chat_template": None,
            "bos_token_id": 1,
            "eos_token_ids": [2],
            "pad_token_id": None,
        },
        "passes": ["fuse_qkv", "fuse_gate_up"],
        "graph": {
            "file": "graph.pt2",
            "input_names": ["input_ids", "positions"],
            "output_names": ["logits"],
            "dynamic_dims": {"input_ids": {"0": "T"}},
        },
        "weights": {"files": ["weights-00001.safetensors"], "dtype": "float32"},
        "envelope": {
            "device": device,
            "gpu_arch": gpu_arch,
            "torch": torch,
            "triton": None,
            "cuda": None,
            "python": "3.12.3",
        },
        "limits": {
            "max_seq_len": 256,
            "max_batch": 8,
            "max_num_batched_tokens": 256,
            "batch_buckets": [1, 2, 4, 8],
            "kv_page_size": 16,
            "kv_dtype": "float32",
            "kv_cache_blocks": 256,
            "enable_prefix_caching": True,
        },
        "provenance": {
            "recipe_sha256": "0" * 64,
            "recipe": {"name": "tiny-llama"},
            "source_files": {"model.safetensors": "1" * 64},
            "calibration_sha256": None,
            "spanda_version": "0.1.0",
            "build_host": "test",
            "build_time": "2026-01-01T00:00:00Z",
            "build_seconds": 1.5,
        },
        "eval": {"max_abs_logit_diff": 0.0},
    }


def build(out: Path, overwrite: bool = False, **kw: Any) -> Manifest:
    with ArtifactWriter(out, overwrite=overwrite) as w:
        w.write_bytes("graph.pt2", b"graph-bytes")
        w.write_bytes("weights-00001.safetensors", WEIGHTS)
        w.write_json("tokenizer.json", {"model": {"vocab": {"a": 0}}, "added_tokens": []})
        w.write_text("sub/notes.txt", "nested files are listed with posix paths\n")
        return w.commit(manifest_dict(**kw))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_round_trip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "art"
    written = build(out)
    assert sorted(written.files) == [
        "graph.pt2",
        "sub/notes.txt",
        "tokenizer.json",
        "weights-00001.safetensors",
    ]
    assert written.files["weights-00001.safetensors"].sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    with caplog.at_level(logging.INFO, logger="spanda.artifacts"):
        art = open_artifact(out)
    assert art.manifest == written
    assert art.file("graph.pt2").read_bytes() == b"graph-bytes"
    assert "verified weights-00001.safetensors" in caplog.text
    with pytest.raises(ArtifactError, match="not listed"):
        art.file("nope.bin")
    raw = (out / "manifest.json").read_text()
    assert raw == json.dumps(json.loads(raw), sort_keys=True, indent=2) + "\n"
    assert leftovers(tmp_path) == []
    lines = "\n".join(art.manifest.summary_lines())
    for part in (
        "llama",
        "hidden_size=64",
        "fuse_qkv",
        "weights-00001.safetensors",
        "16.0 KiB",
        "torch 2.13",
    ):
        assert part in lines


def test_hashes_deterministic(tmp_path: Path) -> None:
    a, b = build(tmp_path / "a"), build(tmp_path / "b")
    assert a.files == b.files
    p = tmp_path / "a" / "weights-00001.safetensors"
    assert sha256_file(p) == sha256_file(p, chunk=7) == hashlib.sha256(WEIGHTS).hexdigest()


def test_callable_manifest_gets_files(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def make(files: dict[str, Any]) -> dict[str, Any]:
        seen.update(files)
        return manifest_dict()

    with ArtifactWriter(tmp_path / "art") as w:
        w.write_bytes("graph.pt2", b"g")
        w.write_bytes("weights-00001.safetensors", b"w")
        w.write_text("tokenizer.json", "{}")
        w.commit(make)
    assert set(seen) == {"graph.pt2", "weights-00001.safetensors", "tokenizer.json"}


def test_corrupt_byte_named(tmp_path: Path) -> None:
    out = tmp_path / "art"
    build(out)
    p = out / "weights-00001.safetensors"
    data = bytearray(p.read_bytes())
    data[1000] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorruptError, match="weights-00001.safetensors") as ei:
        open_artifact(out)
    assert ei.value.check == "sha256" and hashlib.sha256(WEIGHTS).hexdigest() in str(ei.value)
    open_artifact(out, verify=False)  # sizes still match: only the hash catches it


def test_deferred_hash_is_checked_by_the_read_that_loads_the_file(tmp_path: Path) -> None:
    """The runtime hashes weight shards while it reads them for loading: open_artifact only checks their
    size, and the read refuses a corrupted shard by name once it has seen every byte."""
    out = tmp_path / "art"
    build(out)
    p = out / "weights-00001.safetensors"
    data = bytearray(WEIGHTS)
    data[-5] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorruptError, match="weights-00001.safetensors"):
        open_artifact(out)  # not deferred: refused at open
    art = open_artifact(out, defer_hashes=lambda m: m.weights.files)
    assert art.unverified == {"weights-00001.safetensors"}
    with pytest.raises(ArtifactCorruptError, match="weights-00001.safetensors") as ei:
        with art.open_verified("weights-00001.safetensors") as r:
            assert r.read(100) == WEIGHTS[:100]  # stops early: closing still hashes the rest
    assert ei.value.check == "sha256" and ei.value.expected == hashlib.sha256(WEIGHTS).hexdigest()
    assert art.unverified == {"weights-00001.safetensors"}
    p.write_bytes(WEIGHTS)
    with art.open_verified("weights-00001.safetensors") as r:
        buf = bytearray(len(WEIGHTS))
        assert r.readinto(buf) == len(WEIGHTS) and bytes(buf) == WEIGHTS
    assert art.unverified == frozenset()
    with pytest.raises(ArtifactError, match="unlisted.*nope.bin"):
        open_artifact(out, defer_hashes=["nope.bin"])


def test_deferred_file_that_shrinks_before_the_read_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "art"
    build(out)
    art = open_artifact(out, defer_hashes=["weights-00001.safetensors"], verify=False)
    assert art.unverified == frozenset()  # verify=False: nothing is hashed, the size is still checked
    (out / "weights-00001.safetensors").write_bytes(WEIGHTS[:-1])
    with pytest.raises(ArtifactCorruptError, match=r"weights-00001.safetensors.*size"):
        with art.open_verified("weights-00001.safetensors") as r:
            r.read(len(WEIGHTS))


def test_truncated_file(tmp_path: Path) -> None:
    out = tmp_path / "art"
    build(out)
    p = out / "weights-00001.safetensors"
    p.write_bytes(WEIGHTS[:-10])
    for verify in (True, False):
        with pytest.raises(
            ArtifactCorruptError, match=r"weights-00001.safetensors.*size.*16384 bytes.*16374"
        ):
            open_artifact(out, verify=verify)


def test_missing_file_and_manifest(tmp_path: Path) -> None:
    out = tmp_path / "art"
    build(out)
    (out / "tokenizer.json").unlink()
    with pytest.raises(ArtifactCorruptError, match="tokenizer.json"):
        open_artifact(out)
    (out / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        open_artifact(out)
    with pytest.raises(ArtifactError, match="not a directory"):
        open_artifact(tmp_path / "nothing-here")


def test_extra_file_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "art"
    build(out)
    (out / "stray.bin").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="spanda.artifacts"):
        open_artifact(out)
    assert "stray.bin" in caplog.text


def test_wrong_schema_version(tmp_path: Path) -> None:
    out = tmp_path / "art"
    build(out)
    m = json.loads((out / "manifest.json").read_text())
    m["schema_version"] = SCHEMA_VERSION + 1
    m["some_future_field"] = 1
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactIncompatibleError, match="schema_version") as ei:
        open_artifact(out)
    assert ei.value.artifact_value == SCHEMA_VERSION + 1 and ei.value.runtime_value == SCHEMA_VERSION


def test_invalid_manifest(tmp_path: Path) -> None:
    out = tmp_path / "art"
    build(out)
    m = json.loads((out / "manifest.json").read_text())
    m["limits"]["kv_page_sise"] = 16
    del m["graph"]
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"limits\.kv_page_sise.*|graph") as ei:
        open_artifact(out)
    assert "limits.kv_page_sise" in str(ei.value) and "graph" in str(ei.value)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        open_artifact(out)


def test_commit_refuses_unlisted_reference(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="graph.pt2"):
        with ArtifactWriter(tmp_path / "art") as w:
            w.write_bytes("weights-00001.safetensors", b"w")
            w.write_text("tokenizer.json", "{}")
            w.commit(manifest_dict())
    assert not (tmp_path / "art").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_exception_midway_leaves_nothing(tmp_path: Path, exc: type[BaseException]) -> None:
    out = tmp_path / "art"
    with pytest.raises(exc):
        with ArtifactWriter(out) as w:
            w.write_bytes("weights-00001.safetensors", WEIGHTS)
            assert w.path.parent == tmp_path and w.path.name.startswith(".art.tmp-")
            raise exc("midway")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_no_commit_leaves_nothing(tmp_path: Path) -> None:
    with ArtifactWriter(tmp_path / "art") as w:
        w.write_text("a.txt", "a")
    assert list(tmp_path.iterdir()) == []


def test_existing_refused_then_replaced(tmp_path: Path) -> None:
    out = tmp_path / "art"
    build(out)
    before = (out / "manifest.json").read_text()
    with pytest.raises(ArtifactExistsError):
        with ArtifactWriter(out) as w:  # refused on enter, before any work
            raise AssertionError("not reached")
    assert (out / "manifest.json").read_text() == before
    # A failed overwrite keeps the old artifact.
    with pytest.raises(RuntimeError):
        with ArtifactWriter(out, overwrite=True) as w:
            w.write_text("x", "x")
            raise RuntimeError("boom")
    assert open_artifact(out).manifest.provenance.build_host == "test"
    # A successful one replaces it whole.
    with ArtifactWriter(out, overwrite=True) as w:
        w.write_bytes("graph.pt2", b"new")
        w.write_bytes("weights-00001.safetensors", b"w")
        w.write_text("tokenizer.json", "{}")
        w.commit(manifest_dict())
    art = open_artifact(out)
    assert art.file("graph.pt2").read_bytes() == b"new" and not (out / "sub").exists()
    assert leftovers(tmp_path) == []


def test_writer_refuses_manifest_name_and_escape(tmp_path: Path) -> None:
    with ArtifactWriter(tmp_path / "art") as w:
        with pytest.raises(ArtifactError):
            w.write_text("manifest.json", "{}")
        with pytest.raises(ArtifactError, match="escapes"):
            w.write_text("../evil.txt", "x")
    assert list(tmp_path.iterdir()) == []


def test_envelope(tmp_path: Path) -> None:
    cuda = Manifest.model_validate(
        {**manifest_dict("cuda", "sm_90", "2.13.0"), "files": build(tmp_path / "a").model_dump()["files"]}
    )
    assert check_envelope(cuda, device="cuda", gpu_arch="sm_90", torch_version="2.13.1+cu128") is True
    with pytest.raises(ArtifactIncompatibleError, match="envelope.gpu_arch.*sm_90.*sm_80") as ei:
        check_envelope(cuda, device="cuda", gpu_arch="sm_80", torch_version="2.13.0")
    assert ei.value.field == "envelope.gpu_arch"
    with pytest.raises(ArtifactIncompatibleError, match="envelope.torch.*2.13.0.*2.12.1"):
        check_envelope(cuda, device="cuda", gpu_arch="sm_90", torch_version="2.12.1")
    # Cross-device: allowed on the pure-PyTorch path only.
    assert check_envelope(cuda, device="cpu", gpu_arch=None, torch_version="2.13.0+cpu") is False
    with pytest.raises(ArtifactIncompatibleError, match="envelope.device"):
        check_envelope(cuda, device="cpu", gpu_arch=None, torch_version="2.13.0", require_native=True)
    # allow_mismatch warns instead.
    assert (
        check_envelope(cuda, device="cuda", gpu_arch="sm_80", torch_version="2.12.0", allow_mismatch=True)
        is False
    )
    env = current_envelope("cpu")
    assert env.device == "cpu" and env.gpu_arch is None and env.torch
