"""Perplexity and agreement with a reference: what `spanda eval`, the build's eval.json and (later)
quantization and promotion gates use.

Data file: JSON lines, each ``{"token_ids": [...]}`` or ``{"text": "..."}`` (text is encoded with the
artifact's tokenizer, special tokens included). Perplexity = exp(mean next-token negative log-likelihood
over every position 1..L-1 of every sequence), computed in float32 from the engine's logits.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from runtime.engine import LLMEngine
from runtime.jsonl import jsonl_rows

log = logging.getLogger("spanda.runtime")


class EvalDataError(ValueError):
    """The evaluation data file is missing or malformed; the message names the file and line."""


@dataclass(frozen=True)
class EvalResult:
    data: str
    data_sha256: str
    num_sequences: int
    num_tokens: int  # predicted positions
    perplexity: float
    mean_nll: float
    mean_kl: float | None = None  # KL(reference || artifact), mean over positions, nats
    top1_agreement: float | None = None
    reference: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        s = f"perplexity {self.perplexity:.4f} over {self.num_tokens} tokens ({self.num_sequences} sequences)"
        if self.mean_kl is not None:
            s += f"; mean KL {self.mean_kl:.6f} nats, top-1 agreement {self.top1_agreement:.4f} vs {self.reference}"
        return s


def load_eval_data(path: str | Path, encode, max_sequences: int | None = None) -> list[list[int]]:
    """Token id sequences from a JSON-lines file (see module docstring). ``encode``: text -> ids."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: evaluation data file not found")
    seqs: list[list[int]] = []
    for n, row in jsonl_rows(path, EvalDataError):
        if isinstance(row, dict) and isinstance(row.get("token_ids"), list):
            ids = [int(t) for t in row["token_ids"]]
        elif isinstance(row, dict) and isinstance(row.get("text"), str):
            ids = encode(row["text"])
        else:
            raise EvalDataError(f'{path}:{n}: expected {{"token_ids": [...]}} or {{"text": "..."}}')
        if len(ids) < 2:
            raise EvalDataError(f"{path}:{n}: a sequence needs at least 2 tokens to predict one")
        seqs.append(ids)
        if max_sequences is not None and len(seqs) >= max_sequences:
            break
    if not seqs:
        raise EvalDataError(f"{path}: no sequences")
    return seqs


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def evaluate(engine: LLMEngine, seqs: list[list[int]], data: str | Path, reference: LLMEngine | None = None,
             reference_name: str | None = None) -> EvalResult:
    """Perplexity of ``engine`` on ``seqs``; with ``reference``, mean KL(ref || engine) and top-1 agreement."""
    nll = kl = 0.0
    agree = count = 0
    for ids in tqdm(seqs, desc="evaluating", unit="seq", disable=None):
        target = torch.tensor(ids[1:])
        logits = engine.compute_logits(ids)[:-1]
        logp = F.log_softmax(logits, dim=-1)
        nll += float(F.nll_loss(logp, target, reduction="sum"))
        count += len(target)
        if reference is not None:
            ref_logp = F.log_softmax(reference.compute_logits(ids)[:-1], dim=-1)
            kl += float(F.kl_div(logp, ref_logp, log_target=True, reduction="sum"))
            agree += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
    mean = nll / count
    result = EvalResult(
        data=str(data), data_sha256=file_sha256(data), num_sequences=len(seqs), num_tokens=count,
        perplexity=math.exp(mean), mean_nll=mean,
        mean_kl=kl / count if reference is not None else None,
        top1_agreement=agree / count if reference is not None else None,
        reference=reference_name if reference is not None else None,
    )
    log.info("eval: %s", result.summary())
    return result
