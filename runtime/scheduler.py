"""Continuous-batching scheduler: token budget, chunked prefill, prefix-cache reuse, preemption by recompute.

Each step: running requests first (decodes and unfinished prefill chunks, oldest first), then waiting
requests in arrival order while the token budget and the batch size allow. When the KV pool runs out, the
newest running request is preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed (prompt + tokens generated so far) later; sampling resumes where it stopped.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from runtime.kv_cache import KVCacheManager
from runtime.request import Request, RequestStatus

log = logging.getLogger("spanda.runtime")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int             # most sequences in one step
    max_num_batched_tokens: int   # token budget of one step (prefill chunks + decodes)
    max_model_len: int            # prompt + output tokens per sequence
    enable_chunked_prefill: bool = True


@dataclass(frozen=True)
class ScheduledChunk:
    """``request`` computes tokens [start, start + num_tokens) of its all_token_ids this step."""

    request: Request
    start: int
    num_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the last known token: the step then yields the next token."""
        return self.end == self.request.num_tokens


@dataclass
class SchedulerOutput:
    """What the executor runs this step (the one object scheduler and executor share)."""

    chunks: list[ScheduledChunk]       # running requests first, then newly admitted ones
    num_batched_tokens: int            # sum of chunk sizes (T of the flat layout)
    preempted: list[str] = field(default_factory=list)      # request ids preempted during scheduling
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) KV blocks to copy first

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # -- queue management -------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def add_running(self, request: Request, num_computed_tokens: int) -> None:
        """A forked sequence whose KV blocks are already allocated (shared with its parent)."""
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = num_computed_tokens
        self.running.append(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Mark finished and release its KV blocks (cached full blocks stay reusable)."""
        if request in self.running:
            self.running.remove(request)
            self.kv.free(request.request_id)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ---------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._chunk_size(req, req.num_computed_tokens, budget)
            if n == 0:
                break
            while not self.kv.allocate(req.request_id, req.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
                budget -= n
                i += 1
        if not preempted:
            budget = self._admit(chunks, budget)
        total = self.config.max_num_batched_tokens - budget
        return SchedulerOutput(chunks, total, preempted)

    def _chunk_size(self, req: Request, computed: int, budget: int) -> int:
        remaining = req.num_tokens - computed
        if remaining <= budget:
            return remaining
        return budget if self.config.enable_chunked_prefill else 0

    def _admit(self, chunks: list[ScheduledChunk], budget: int) -> int:
        while self.waiting and budget > 0:
            req = self.waiting[0]
            if len(self.running) + req.reserved_seats > self.config.max_num_seqs:
                break
            prefix = self.kv.match_prefix(req.all_token_ids)
            computed = prefix.num_computed_tokens
            n = self._chunk_size(req, computed, budget)
            if n == 0 or not self.kv.allocate(req.request_id, computed + n, prefix):
                break
            self.waiting.popleft()
            req.num_computed_tokens = computed
            req.num_cached_tokens = computed
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            chunks.append(ScheduledChunk(req, computed, n))
            budget -= n
        return budget

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        log.debug("preempted %s (recompute %d tokens later)", req.request_id, req.num_tokens)

    def advance(self, output: SchedulerOutput) -> None:
        """After the step ran: the chunks' KV is in the cache; register newly full blocks for reuse."""
        page = self.kv.block_size
        for c in output.chunks:
            c.request.num_computed_tokens = c.end
            if c.end // page > c.start // page:  # a block filled up: hash it (and any not hashed yet)
                self.kv.cache_blocks(c.request.request_id, c.request.all_token_ids, c.end)
