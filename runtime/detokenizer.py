"""Incremental detokenization and stop-string checking for streaming output.

Incremental decoding keeps two offsets into the token window (prefix_offset <= read_offset):

    ids:   [ ... prompt tail ... | out0 out1 | out2 out3 ... ]
           ^prefix_offset        ^read_offset
    prefix_text = decode(ids[prefix:read])      already emitted (or prompt context)
    new_text    = decode(ids[prefix:])          emit new_text[len(prefix_text):]

Decoding a short window (not just the new token) gets the spacing right for tokenizers whose decoder
strips or adds a leading space (sentencepiece-style "▁"), and byte-level tokens that carry part of a
UTF-8 character decode to U+FFFD until the character is complete, so a window ending in U+FFFD is
held back until more tokens arrive (`flush()` releases it when the sequence ends).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from runtime.tokenizer import Tokenizer

# Prompt tokens decoded as context before the first output token (vLLM uses 5 as well).
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas.

    Invariant: "".join(all deltas, flush()) == the output text; with an empty prompt (or a byte-level
    tokenizer and a prompt that ends on a character boundary) that equals
    tokenizer.decode(output_ids, skip_special_tokens). With a prompt, a sentencepiece leading space of
    the first output token is kept (as vLLM), where decode(output_ids) alone would strip it.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = prompt_token_ids[max(0, len(prompt_token_ids) - PROMPT_CONTEXT_TOKENS) :]
        self._ids: list[int] = [int(t) for t in context]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._text_parts: list[str] = []

    @property
    def output_text(self) -> str:
        """All text emitted so far (the concatenation of the returned deltas)."""
        if len(self._text_parts) > 1:
            self._text_parts = ["".join(self._text_parts)]
        return self._text_parts[0] if self._text_parts else ""

    def add_tokens(self, token_ids: Sequence[int]) -> str:
        """Append output tokens; return the new text delta ("" while a character is incomplete)."""
        self._ids.extend(int(t) for t in token_ids)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        if new_text.endswith(REPLACEMENT_CHAR) or len(new_text) <= len(prefix_text):
            return ""
        return self._emit(prefix_text, new_text)

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete character at the end of a finished sequence)."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        return self._emit(prefix_text, new_text) if new_text != prefix_text else ""

    def _emit(self, prefix_text: str, new_text: str) -> str:
        start = len(prefix_text)
        if not new_text.startswith(prefix_text):  # e.g. a prompt that ended inside a character
            start = next(
                (i for i, (a, b) in enumerate(zip(prefix_text, new_text, strict=False)) if a != b),
                min(len(prefix_text), len(new_text)),
            )
        delta = new_text[start:]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if self._prefix_offset > 64:  # keep the window short: drop ids before it
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        self._text_parts.append(delta)
        return delta

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self.tokenizer.decode_raw(self._ids[start:end], skip_special_tokens=self.skip_special_tokens)


@dataclass(frozen=True)
class StopMatch:
    """A stop string was found. text: the output truncated at truncate_at (= len(text))."""

    stop_string: str
    text: str
    truncate_at: int


class StopChecker:
    """Stop strings of one request (vLLM semantics).

    check(): called after each delta; finds a stop string that ends inside the newest characters and
    says where to cut (before it, or after it with include_stop_str_in_output).
    holdback()/streamable_text(): while streaming, the tail that could be the start of a stop string is
    held back, so streamed text never contains (part of) a stop string that is later removed.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False):
        self.stop = tuple(s for s in stop if s)
        self.include_stop_str_in_output = include_stop_str_in_output

    def check(self, text: str, new_char_count: int) -> StopMatch | None:
        """text: the whole output so far; new_char_count: length of the latest delta at its end."""
        best: tuple[int, int, str] | None = None  # (start, -len, stop string): earliest, then longest
        for s in self.stop:
            start = text.find(s, max(0, len(text) - new_char_count - len(s) + 1))
            if start != -1 and (best is None or (start, -len(s)) < best[:2]):
                best = (start, -len(s), s)
        if best is None:
            return None
        start, _, s = best
        cut = start + len(s) if self.include_stop_str_in_output else start
        return StopMatch(stop_string=s, text=text[:cut], truncate_at=cut)

    def holdback(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        if self.include_stop_str_in_output:
            return 0  # the stop string is kept in the output, so any prefix of it may be streamed
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def streamable_text(self, text: str, finished: bool = False) -> str:
        """The part of `text` that may be sent to a streaming client now."""
        return text if finished else text[: len(text) - self.holdback(text)]
