"""The runtime's weight loader: one read of each shard, hashed on the way, tensors identical to safetensors'."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from artifacts.store import ArtifactCorruptError, ArtifactWriter, open_artifact
from runtime.weight_loader import ALIGN, load_weights
from tests.test_artifacts import manifest_dict

SHARDS = ["weights-00001-of-00002.safetensors", "weights-00002-of-00002.safetensors"]


def _artifact(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = [
        {  # bf16 [3] puts the next bf16 tensor at byte 6: the loader must give it its own aligned storage
            "a.odd": torch.randn(3, generator=g).to(torch.bfloat16),
            "b.after_odd": torch.randn(5, 7, generator=g).to(torch.bfloat16),
            "c.f32": torch.randn(4, 16, generator=g),
            "d.i64": torch.arange(-5, 6),
            "e.scalar": torch.tensor(2.5),
            "f.empty": torch.empty(0, 4),
        },
        {"g.f16": torch.randn(33, 9, generator=g).half(), "h.i8": torch.randint(-128, 127, (17,), dtype=torch.int8)},
    ]
    m = manifest_dict()
    m["weights"]["files"] = SHARDS
    out = tmp_path / "art"
    with ArtifactWriter(out) as w:
        w.write_bytes("graph.pt2", b"graph-bytes")
        w.write_json("tokenizer.json", {"model": {"vocab": {"a": 0}}, "added_tokens": []})
        for name, t in zip(SHARDS, tensors):
            save_file(t, str(w.path / name))
        w.commit(m)
    return out


def test_loaded_tensors_equal_safetensors(tmp_path: Path) -> None:
    out = _artifact(tmp_path)
    art = open_artifact(out, defer_hashes=SHARDS)
    state = load_weights(art, torch.device("cpu"), max_workers=2)
    assert art.unverified == frozenset()  # both shards were hashed while read
    want = {}
    for name in SHARDS:
        with safe_open(str(out / name), "pt") as f:
            want.update({k: f.get_tensor(k) for k in f.keys()})
    assert state.keys() == want.keys()
    for k, t in want.items():
        got = state[k]
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), k
        assert got.data_ptr() % ALIGN == 0 or got.numel() == 0, k


def test_corrupted_shard_is_refused_by_name(tmp_path: Path) -> None:
    out = _artifact(tmp_path)
    p = out / SHARDS[1]
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's bytes: the header still parses, only the hash can tell
    p.write_bytes(bytes(data))
    art = open_artifact(out, defer_hashes=SHARDS)
    with pytest.raises(ArtifactCorruptError, match=SHARDS[1]) as ei:
        load_weights(art, torch.device("cpu"))
    assert ei.value.check == "sha256"
    assert load_weights(open_artifact(out, verify=False), torch.device("cpu"))["h.i8"].numel() == 17
