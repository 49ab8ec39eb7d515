"""Reading a Hugging Face checkpoint directory: config, (sharded) safetensors, tokenizer, generation config.

Tensors are read lazily, one at a time, through ``safetensors.safe_open``; nothing loads the whole model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

log = logging.getLogger("spanda.compiler")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """The checkpoint directory is missing something or is malformed; the message names the file."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


@dataclass
class HFCheckpoint:
    """A checkpoint directory. ``weight_map``: tensor name -> shard file name."""

    path: Path
    config: dict[str, Any]
    weight_map: dict[str, str]
    generation_config: dict[str, Any] = field(default_factory=dict)
    _handles: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> HFCheckpoint:
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a directory (expected a Hugging Face checkpoint folder)")
        config = _read_json(path / "config.json")
        if (path / INDEX_FILE).exists():
            index = _read_json(path / INDEX_FILE)
            if "weight_map" not in index:
                raise CheckpointError(f"{path / INDEX_FILE}: no 'weight_map' entry")
            weight_map = dict(index["weight_map"])
            for shard in sorted(set(weight_map.values())):
                if not (path / shard).exists():
                    raise CheckpointError(
                        f"{path / shard}: shard listed in {INDEX_FILE} is missing "
                        f"({sum(1 for s in weight_map.values() if s == shard)} tensors live there)"
                    )
        elif (path / SINGLE_FILE).exists():
            with safe_open(str(path / SINGLE_FILE), framework="pt") as f:
                weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors are read)")
        gen = path / "generation_config.json"
        generation_config = _read_json(gen) if gen.exists() else {}
        log.info("checkpoint %s: %d tensors in %d file(s)", path, len(weight_map), len(set(weight_map.values())))
        return cls(path, config, weight_map, generation_config)

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def read(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in the checkpoint")
        shard = self.weight_map[name]
        if shard not in self._handles:
            # One shard open at a time: safetensors hands out tensors backed by the file's memory map, and an
            # open handle keeps every page read so far resident, so holding all shards open would grow the
            # build's memory to the whole checkpoint. A closed shard's pages go once its tensors are freed.
            self._handles.clear()
            try:
                self._handles[shard] = safe_open(str(self.path / shard), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{self.path / shard}: cannot read safetensors file ({e})") from e
        try:
            return self._handles[shard].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self.path / shard}: cannot read tensor {name!r} ({e})") from e

    def close(self) -> None:
        self._handles.clear()

    def source_files(self) -> list[Path]:
        """Files whose hashes go into the artifact's provenance."""
        names = {"config.json", *self.weight_map.values()}
        if (self.path / INDEX_FILE).exists():
            names.add(INDEX_FILE)
        names.update(n for n in TOKENIZER_FILES if (self.path / n).exists())
        return [self.path / n for n in sorted(names)]

    def tokenizer_files(self) -> list[Path]:
        files = [self.path / n for n in TOKENIZER_FILES if (self.path / n).exists()]
        if not (self.path / "tokenizer.json").exists():
            raise CheckpointError(
                f"{self.path / 'tokenizer.json'}: not found (Spanda needs a fast tokenizer file; "
                "convert a slow tokenizer with transformers' AutoTokenizer(...).save_pretrained first)"
            )
        return files

    def eos_token_ids(self) -> list[int]:
        eos = self.generation_config.get("eos_token_id", self.config.get("eos_token_id"))
        if eos is None:
            return []
        return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
