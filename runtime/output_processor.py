"""Per-request output state: n completions (sequences) of one user request, their text and stop checks.

The scheduler only sees :class:`Request` objects (one per completion). A request with ``n > 1`` starts as
one sequence; when its prompt is prefilled, the engine forks n - 1 more that share the prompt's KV blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.detokenizer import IncrementalDetokenizer, StopChecker
from runtime.request import CompletionOutput, Request, RequestOutput, RequestStatus
from runtime.tokenizer import Tokenizer


@dataclass
class SequenceState:
    """One completion: the scheduler's Request plus detokenization and stop-string state."""

    request: Request
    index: int
    detok: IncrementalDetokenizer
    stop: StopChecker
    text: str = ""  # output text so far, truncated at a stop string once one matched

    def completion(self) -> CompletionOutput:
        req = self.request
        finished = req.status.finished
        lps = req.logprobs if req.params.logprobs is not None else None
        return CompletionOutput(
            index=self.index,
            text=self.stop.streamable_text(self.text, finished),
            token_ids=list(req.output_token_ids),
            finish_reason=req.status.value if finished else None,
            stop_reason=req.stop_reason,
            logprobs=list(lps) if lps is not None else None,
            cumulative_logprob=sum(lp.logprob for lp in lps) if lps else None,
        )


@dataclass
class SequenceGroup:
    """All completions of one user request (``request_id`` is the user's id)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    n: int
    seqs: list[SequenceState] = field(default_factory=list)

    @property
    def forked(self) -> bool:
        return len(self.seqs) == self.n

    @property
    def finished(self) -> bool:
        return self.forked and all(s.request.status.finished for s in self.seqs)

    def new_sequence(self, tokenizer: Tokenizer, request: Request, index: int) -> SequenceState:
        p = request.params
        seq = SequenceState(request, index, IncrementalDetokenizer(tokenizer, self.prompt_token_ids,
                                                             p.skip_special_tokens),
                       StopChecker(p.stop, p.include_stop_str_in_output))
        self.seqs.append(seq)
        return seq

    def output(self, advanced: list[SequenceState]) -> RequestOutput:
        first = self.seqs[0].request
        return RequestOutput(
            self.request_id, self.prompt, self.prompt_token_ids, [s.completion() for s in advanced],
            finished=self.finished, num_cached_tokens=first.num_cached_tokens,
        )


def check_stop(seq: SequenceState, tok: int, eos_token_ids: set[int], max_model_len: int) -> RequestStatus | None:
    """Detokenize the new token; return the finishing status if it hit EOS, a stop id/string or a limit."""
    req = seq.request
    p = req.params
    delta = seq.detok.add_tokens([tok])
    seq.text = seq.detok.output_text
    status = None
    if len(req.output_token_ids) >= p.min_tokens:
        if tok in eos_token_ids and not p.ignore_eos:
            status = RequestStatus.FINISHED_STOPPED
        elif tok in p.stop_token_ids:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, tok
        elif (hit := seq.stop.check(seq.text, len(delta))) is not None:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, hit.stop_string
            seq.text = hit.text
    if status is None and (len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= max_model_len):
        status = RequestStatus.FINISHED_LENGTH
    if status is not None and not isinstance(req.stop_reason, str):
        seq.text += seq.detok.flush()  # an incomplete character left at the very end
    return status
