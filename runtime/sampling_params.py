"""User-facing sampling parameters, with vLLM's names, defaults and (OpenAI-style) value ranges.

`SamplingParams` is frozen: derive variants with `dataclasses.replace`, which re-runs validation.
Every invalid value raises `ValueError("<field> must be <allowed>, got <value>")`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Below this temperature a request is treated as greedy (vLLM's _SAMPLING_EPS).
GREEDY_TEMPERATURE_EPS = 1e-5
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's completion(s).

    n: completions per prompt (>= 1).
    max_tokens: most tokens to generate (>= 1); the engine also stops at its sequence-length limit.
    temperature: >= 0; below 1e-5 the request is greedy (argmax), see `greedy`.
    top_p: nucleus sampling, 0 < top_p <= 1 (1 = off).
    top_k: keep the k most likely tokens; 0 or -1 = off.
    min_p: drop tokens whose probability is < min_p * (max probability); 0 <= min_p <= 1 (0 = off).
    repetition_penalty: > 0, HF semantics over prompt + output tokens (1 = off).
    presence_penalty, frequency_penalty: in [-2, 2], OpenAI semantics over output tokens (0 = off).
    seed: per-request seed; a seeded request samples the same tokens whatever shares its batch.
    stop: stop strings (str or list) -> normalized to a tuple of non-empty str.
    stop_token_ids: token ids that end generation (besides EOS) -> tuple of int.
    ignore_eos: keep generating after EOS.
    include_stop_str_in_output: keep the matched stop string at the end of the text.
    min_tokens: EOS and stop_token_ids are masked until this many tokens were generated (<= max_tokens).
    logprobs: None = no logprobs; k in 0..20 = the chosen token's logprob plus the top-k.
    skip_special_tokens: drop special tokens from the output text.
    """

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | tuple[str, ...] | None = ()
    stop_token_ids: list[int] | tuple[int, ...] | None = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _normalize_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _normalize_ids(self.stop_token_ids))
        self._check_ints()
        self._check_floats()
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                _bad(name, "a bool", getattr(self, name))

    def _check_ints(self) -> None:
        _int_at_least("n", self.n, 1)
        _int_at_least("max_tokens", self.max_tokens, 1)
        _int_at_least("min_tokens", self.min_tokens, 0)
        if self.min_tokens > self.max_tokens:
            _bad("min_tokens", f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        if not _is_int(self.top_k) or self.top_k < -1:
            _bad("top_k", "-1 or 0 (off), or a positive int", self.top_k)
        if self.seed is not None and not _is_int(self.seed):
            _bad("seed", "an int or None", self.seed)
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            _bad("logprobs", f"None or an int in [0, {MAX_LOGPROBS}]", self.logprobs)

    def _check_floats(self) -> None:
        _float_in("temperature", self.temperature, 0.0, math.inf, "a finite float >= 0")
        _float_in("top_p", self.top_p, 0.0, 1.0, "in (0, 1]")
        if self.top_p <= 0.0:
            _bad("top_p", "in (0, 1]", self.top_p)
        _float_in("min_p", self.min_p, 0.0, 1.0, "in [0, 1]")
        _float_in("repetition_penalty", self.repetition_penalty, 0.0, math.inf, "a finite float > 0")
        if self.repetition_penalty <= 0.0:
            _bad("repetition_penalty", "a finite float > 0", self.repetition_penalty)
        _float_in("presence_penalty", self.presence_penalty, -2.0, 2.0, "in [-2, 2]")
        _float_in("frequency_penalty", self.frequency_penalty, -2.0, 2.0, "in [-2, 2]")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature < 1e-5, as vLLM)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _bad(name: str, allowed: str, value: Any) -> None:
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_at_least(name: str, value: Any, low: int) -> None:
    if not _is_int(value) or value < low:
        _bad(name, f"an int >= {low}", value)


def _float_in(name: str, value: Any, low: float, high: float, allowed: str) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not low <= value <= high:
        _bad(name, allowed, value)


def _normalize_stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = (stop,) if isinstance(stop, str) else tuple(stop)
    for s in items:
        if not isinstance(s, str) or not s:
            _bad("stop", "a non-empty str or a list of non-empty str", stop)
    return items


def _normalize_ids(ids: Any) -> tuple[int, ...]:
    if ids is None:
        return ()
    items = tuple(ids)
    for t in items:
        if not _is_int(t) or t < 0:
            _bad("stop_token_ids", "a list of non-negative int", ids)
    return items
