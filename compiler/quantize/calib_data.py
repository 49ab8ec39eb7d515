"""Calibration data: token windows drawn from a ``.jsonl`` of token ids or text rows, a text file, or a folder of
text files (the recipe names it; the shipped held-in corpus by default), and the sha256 of the ids drawn, which
the artifact's provenance records.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from compiler.quantize.spec import CalibrationError
from runtime.jsonl import jsonl_rows

log = logging.getLogger("spanda.compiler")


TEXT_SUFFIXES = frozenset({
    ".py", ".pyi", ".txt", ".md", ".rst", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".js",
    ".ts", ".sh", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".html", ".css", ".tex",
})


def _read_docs(path: Path, encode: Callable[[str], Sequence[int]] | None, tokenizer_sha256: str | None = None,
               used: dict[str, int] | None = None) -> list[list[int]]:
    """Documents as token ids. A jsonl row's ``token_ids`` are used as they are unless the row names the
    tokenizer that made them (``tokenizer_sha256``, the sha256 of its tokenizer.json) and that is not this
    checkpoint's: then the row's ``text`` is tokenized instead (ids of another vocabulary would be other
    tokens, or out of range). ``used`` counts rows by source ("token_ids" / "text")."""
    used = used if used is not None else {}
    def enc(text: str, where: str) -> list[int]:
        if encode is None:
            raise CalibrationError(f"{where}: text needs a tokenizer (encode is None)")
        return list(encode(text))

    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise CalibrationError(f"{path}: no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
        return [enc(p.read_text(encoding="utf-8", errors="replace"), str(p)) for p in files]
    if not path.is_file():
        raise CalibrationError(f"{path}: calibration data not found")
    if path.suffix.lower() == ".jsonl":
        docs = []
        for n, row in jsonl_rows(path, CalibrationError):
            if not isinstance(row, dict):
                raise CalibrationError(f'{path}:{n}: expected {{"token_ids": [...]}} or {{"text": "..."}}')
            made_by = row.get("tokenizer_sha256")
            foreign = made_by is not None and tokenizer_sha256 is not None and made_by != tokenizer_sha256
            if foreign and not isinstance(row.get("text"), str):
                raise CalibrationError(
                    f"{path}:{n}: token_ids were made by the tokenizer with sha256 {made_by[:16]}..., this "
                    f"checkpoint's tokenizer.json is {tokenizer_sha256[:16]}...; give the row's text, or ids "
                    "from this tokenizer")
            if "token_ids" in row and not foreign:
                used["token_ids"] = used.get("token_ids", 0) + 1
                ids = row["token_ids"]
                if not isinstance(ids, list) or not all(isinstance(t, int) and t >= 0 for t in ids):
                    raise CalibrationError(f"{path}:{n}: token_ids must be a list of non-negative integers")
                docs.append(ids)
            elif isinstance(row.get("text"), str):
                used["text"] = used.get("text", 0) + 1
                docs.append(enc(row["text"], f"{path}:{n}"))
            else:
                raise CalibrationError(f'{path}:{n}: expected {{"token_ids": [...]}} or {{"text": "..."}}')
        return docs
    return [enc(path.read_text(encoding="utf-8", errors="replace"), str(path))]


def load_calibration(path: str | Path, encode: Callable[[str], Sequence[int]] | None, num_samples: int,
                     seq_len: int, seed: int = 0, tokenizer_sha256: str | None = None,
                     vocab_size: int | None = None) -> tuple[torch.Tensor, str]:
    """Calibration token ids ``[num_samples, seq_len]`` int64 and the sha256 of those ids (int64 LE bytes).

    ``path``: a ``.jsonl`` of ``{"token_ids": [...]}`` or ``{"text": "..."}`` rows, a text file, or a folder of
    text files (read recursively in sorted relative-path order). The documents are concatenated in order, cut
    into consecutive non-overlapping windows of ``seq_len`` tokens (so rows of a jsonl of ``seq_len`` ids stay
    whole), and ``num_samples`` windows are drawn without replacement by a generator seeded with ``seed``,
    kept in stream order. ``tokenizer_sha256``: this checkpoint's tokenizer.json (rows whose ids another
    tokenizer made are re-tokenized from their text); ``vocab_size``: ids at or above it are refused."""
    if num_samples < 1 or seq_len < 1:
        raise CalibrationError(f"num_samples ({num_samples}) and seq_len ({seq_len}) must be positive")
    path = Path(path)
    used: dict[str, int] = {}
    docs = _read_docs(path, encode, tokenizer_sha256, used)
    stream = torch.tensor([t for d in docs for t in d], dtype=torch.int64)
    if vocab_size is not None and stream.numel() and int(stream.max()) >= vocab_size:
        raise CalibrationError(
            f"{path}: token id {int(stream.max())} is outside the model's vocabulary ({vocab_size} tokens): these "
            "ids were made by another tokenizer; give text rows (or a text file) to tokenize with the checkpoint's")
    n_windows = stream.numel() // seq_len
    if n_windows < num_samples:
        raise CalibrationError(
            f"{path}: too little calibration data: {stream.numel()} tokens make {n_windows} windows of "
            f"{seq_len}, but {num_samples} samples were asked for (need {num_samples * seq_len} tokens)")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_windows, generator=g)[:num_samples].sort().values
    ids = stream[pick.unsqueeze(1) * seq_len + torch.arange(seq_len)].contiguous()
    sha = hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest()
    how = ", ".join(f"{v} rows from {k}" for k, v in sorted(used.items()))
    log.info("calibration data %s: %d documents%s, %d tokens; %d samples x %d (seed %d), sha256 %s",
             path, len(docs), f" ({how})" if how else "", stream.numel(), num_samples, seq_len, seed, sha[:16])
    return ids, sha


def checkpoint_calibration(c, ckpt_dir: str | Path, vocab_size: int) -> tuple[torch.Tensor, str]:
    """The recipe's ``quantization.calibration`` (``c``) as token ids of the checkpoint in ``ckpt_dir``: its
    tokenizer encodes text, and ids made by another tokenizer are not taken as they are."""
    from artifacts.store import sha256_file
    from runtime.tokenizer import Tokenizer

    tok = Path(ckpt_dir) / "tokenizer.json"
    return load_calibration(c.data, Tokenizer.from_dir(ckpt_dir).encode, c.num_samples, c.seq_len,
                            tokenizer_sha256=sha256_file(tok) if tok.exists() else None, vocab_size=vocab_size)
