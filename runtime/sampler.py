"""Batched sampler: logits [B, V] + one `SamplingRow` per row -> next token ids [B] (+ logprobs).

Pipeline (vLLM order), every stage a [B, V] float32 tensor op on the logits' device:

    raw logits --log_softmax--> logprobs reported to the user (unpenalized, temperature 1)
        |
    repetition penalty   (HF: over prompt+output tokens; logit > 0 -> logit / p, else logit * p)
    frequency/presence   (OpenAI: over output tokens; logit -= f * count + p * (count > 0))
    min_tokens           (EOS and stop_token_ids -> -inf while len(output) < min_tokens)
        |---- greedy rows: argmax
    / temperature -> top-k -> top-p -> min-p -> softmax -> argmax(probs / q),  q ~ Exponential(1)

EOS for `min_tokens` comes from `Sampler(eos_token_ids=...)` (one id or several, e.g. Llama 3's two);
rows with `params.ignore_eos` do not get EOS masked (EOS does not stop them anyway).

Randomness: argmax(probs / q) with q ~ Exp(1) is an exact draw from `probs` (Gumbel-max) and needs no
host sync. A seeded row draws q from its own generator: `row.generator` if the caller gives one, else
`make_generator(params.seed, len(row.output_token_ids), device)`. That generator depends only on the
seed and the output position, so a seeded request samples the same tokens whatever shares its batch,
and again when recomputed after a preemption. Unseeded rows share one sampler-wide generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from runtime.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


@dataclass
class SamplingRow:
    """One sequence in the batch.

    generator: noise source for this row; None = derive from params.seed (if any), see module doc.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprobs of one sampled token, from the raw log_softmax of the logits.

    rank: 1 + number of vocab entries with a strictly larger logprob (1 = the most likely token).
    top: the params.logprobs most likely (token id, logprob), most likely first.
    """

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64, CPU (on the logits' device with to_host=False)
    logprobs: list[TokenLogprobs | None]  # per row; None where params.logprobs is None


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def make_generator(
    seed: int, step: int, device: torch.device | str = "cpu", index: int = 0
) -> torch.Generator:
    """Generator for a seeded request's draw at output position `step` (= tokens generated so far).

    The state is a hash of (seed, step, index); `index` separates the n completions of one request.
    The engine calls this every step for each seeded row (or leaves `SamplingRow.generator` None).
    """
    h = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64)) ^ (index & _MASK64))
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(h & ((1 << 63) - 1))
    return gen


class Sampler:
    """Samples one token per row; see the module docstring for the pipeline."""

    def __init__(self, eos_token_ids: int | Sequence[int] | None = None, seed: int | None = None):
        if eos_token_ids is None:
            eos_token_ids = ()
        self.eos_token_ids = (eos_token_ids,) if isinstance(eos_token_ids, int) else tuple(eos_token_ids)
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow], to_host: bool = True) -> SamplerOutput:
        """logits: [B, V] any float dtype/device; rows: B rows. Returns token ids [B] int64 on CPU, or left on
        the logits' device without waiting for them (``to_host=False``; rows must not ask for logprobs)."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"logits must be [B, V] with B = len(rows) = {len(rows)}, got {tuple(logits.shape)}"
            )
        logits = logits.float()
        want_lp = [r.params.logprobs is not None for r in rows]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
        logits = self._apply_penalties(logits, rows)
        logits = self._apply_min_tokens(logits, rows)
        tokens = self._choose(logits, rows)
        lps: list[TokenLogprobs | None] = [None] * len(rows)
        if raw_logprobs is not None:
            if not to_host:
                raise ValueError("logprobs are gathered on the host: sample with to_host=True")
            lps = _gather_logprobs(raw_logprobs, tokens, rows)
        return SamplerOutput(token_ids=tokens.cpu() if to_host else tokens, logprobs=lps)

    # -- penalties ---------------------------------------------------------------------------------
    def _apply_penalties(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Repetition (prompt+output), frequency and presence (output) penalties. [B, V] -> [B, V]."""
        if not any(r.params.has_penalties for r in rows):
            return logits
        dev = logits.device
        rep = torch.tensor([r.params.repetition_penalty for r in rows], device=dev)[:, None]
        freq = torch.tensor([r.params.frequency_penalty for r in rows], device=dev)[:, None]
        pres = torch.tensor([r.params.presence_penalty for r in rows], device=dev)[:, None]
        out_counts = _token_counts(
            [r.output_token_ids if r.params.has_penalties else () for r in rows], logits
        )
        if any(r.params.repetition_penalty != 1.0 for r in rows):
            prompts = [r.prompt_token_ids if r.params.repetition_penalty != 1.0 else () for r in rows]
            seen = (_token_counts(prompts, logits) > 0) | (out_counts > 0)
            penalized = torch.where(logits > 0, logits / rep, logits * rep)
            logits = torch.where(seen, penalized, logits)
        return logits - freq * out_counts - pres * (out_counts > 0).float()

    def _apply_min_tokens(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Mask EOS and stop_token_ids to -inf in rows that have not yet produced min_tokens."""
        row_idx: list[int] = []
        tok_idx: list[int] = []
        for i, r in enumerate(rows):
            p = r.params
            if len(r.output_token_ids) >= p.min_tokens:
                continue
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
            banned = {t for t in banned if t < logits.shape[1]}
            row_idx += [i] * len(banned)
            tok_idx += sorted(banned)
        if not row_idx:
            return logits
        logits = logits.clone()
        index = (torch.tensor(row_idx, device=logits.device), torch.tensor(tok_idx, device=logits.device))
        logits[index] = float("-inf")
        return logits

    # -- choosing the token ------------------------------------------------------------------------
    def _choose(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """[B, V] penalized logits -> [B] int64 token ids (argmax for greedy rows, a draw otherwise)."""
        greedy_ids = logits.argmax(dim=-1)
        is_greedy = [r.params.greedy for r in rows]
        if all(is_greedy):
            return greedy_ids
        dev = logits.device
        temps = torch.tensor(
            [1.0 if g else r.params.temperature for g, r in zip(is_greedy, rows, strict=True)], device=dev
        )
        logits = logits / temps[:, None]
        logits = _top_k_top_p(logits, rows)
        logits = _min_p(logits, rows)
        probs = torch.softmax(logits, dim=-1)
        noise = self._exponential_noise(probs.shape, rows, is_greedy, dev)
        sampled_ids = (probs / noise).argmax(dim=-1)
        greedy_mask = torch.tensor(is_greedy, device=dev)
        return torch.where(greedy_mask, greedy_ids, sampled_ids)

    def _exponential_noise(
        self, shape: torch.Size, rows: Sequence[SamplingRow], is_greedy: list[bool], dev: torch.device
    ) -> torch.Tensor:
        """q ~ Exponential(1), [B, V] float32: per-row generators for seeded rows, one shared otherwise."""
        noise = torch.empty(shape, device=dev).exponential_(generator=self._shared_generator(dev))
        for i, r in enumerate(rows):
            if is_greedy[i]:
                continue
            gen = r.generator
            if gen is None and r.params.seed is not None:
                gen = make_generator(r.params.seed, len(r.output_token_ids), dev)
            if gen is not None:
                noise[i].exponential_(generator=gen)
        # exponential_ may return exactly 0 on some backends; keep probs / q finite.
        return noise.clamp_min_(torch.finfo(torch.float32).tiny)

    def _shared_generator(self, dev: torch.device) -> torch.Generator:
        gen = self._generators.get(dev)
        if gen is None:
            gen = torch.Generator(device=dev)
            if self._seed is None:
                gen.seed()
            else:
                gen.manual_seed(self._seed)
            self._generators[dev] = gen
        return gen


def _token_counts(token_lists: Sequence[Sequence[int]], like: torch.Tensor) -> torch.Tensor:
    """Occurrence counts [B, V] float32 of each row's tokens (one padded scatter_add, pad id = V)."""
    b, v = like.shape
    width = max((len(t) for t in token_lists), default=0)
    counts = torch.zeros(b, v + 1, device=like.device)
    if width == 0:
        return counts[:, :v]
    padded = torch.full((b, width), v, dtype=torch.long)
    for i, toks in enumerate(token_lists):
        if len(toks):
            padded[i, : len(toks)] = torch.as_tensor(list(toks), dtype=torch.long)
    padded = padded.to(like.device, non_blocking=True)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
    return counts[:, :v]


def _top_k_top_p(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Top-k (keeps ties with the k-th value) then top-p on the renormalized survivors; one sort. [B, V]."""
    use_k = any(r.params.top_k_enabled for r in rows)
    use_p = any(r.params.top_p < 1.0 for r in rows)
    if not (use_k or use_p):
        return logits
    b, v = logits.shape
    dev = logits.device
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
    if use_k:
        k = torch.tensor([min(r.params.top_k, v) if r.params.top_k_enabled else v for r in rows], device=dev)
        kth = sorted_logits.gather(1, (v - k).long()[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if use_p:
        p = torch.tensor([r.params.top_p for r in rows], device=dev)[:, None]
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum <= 1.0 - p
        drop[:, -1] = False  # always keep the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def _min_p(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Drop tokens with prob < min_p * max prob (per row). [B, V] -> [B, V]."""
    if not any(r.params.min_p > 0.0 for r in rows):
        return logits
    min_p = torch.tensor([r.params.min_p for r in rows], device=logits.device)[:, None]
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def _gather_logprobs(
    logprobs: torch.Tensor, tokens: torch.Tensor, rows: Sequence[SamplingRow]
) -> list[TokenLogprobs | None]:
    """logprobs [B, V] float32, tokens [B] -> per-row TokenLogprobs (one device->host copy)."""
    idx = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    sel = torch.tensor(idx, device=logprobs.device)
    lp = logprobs.index_select(0, sel)
    chosen_lp = lp.gather(1, tokens.index_select(0, sel)[:, None])
    ranks = (lp > chosen_lp).sum(dim=-1) + 1
    k = max(rows[i].params.logprobs or 0 for i in idx)
    top_lp, top_ids = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
    chosen_lp, ranks, top_lp, top_ids, tok = (
        x.cpu().tolist() for x in (chosen_lp[:, 0], ranks, top_lp, top_ids, tokens.index_select(0, sel))
    )
    out: list[TokenLogprobs | None] = [None] * len(rows)
    for j, i in enumerate(idx):
        n = rows[i].params.logprobs or 0
        top = list(zip(top_ids[j][:n], top_lp[j][:n], strict=True))
        out[i] = TokenLogprobs(token_id=tok[j], logprob=chosen_lp[j], rank=ranks[j], top=top)
    return out
