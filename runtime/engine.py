"""The engine: requests in, tokens out, one continuous-batching step at a time.

step(): scheduler.schedule() -> model_runner.execute() -> sampler -> append tokens, detokenize, stop checks.

With ``EngineOptions.async_scheduling`` a step whose every running sequence just sampled (plain decoding: no
request waiting, one completion per request, no penalties or logprobs) launches the next decode step before
its own tokens reach the host: the new tokens feed that step on the device, and the host appends them,
detokenizes and checks stops while the GPU computes. A sequence that stopped has computed one token too
many, which is dropped. Each call still returns one step's outputs (the step before the one launched), so
the tokens, their order and the finishing steps are those of the synchronous engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from artifacts.store import Artifact, check_envelope, open_artifact
from runtime.config import EngineOptions, resolve_device, size_kv_cache
from runtime.kernel_cache import KernelCache
from runtime.kv_cache import KVCacheManager
from runtime.model_runner import KVCacheSpec, ModelRunner
from runtime.ops.attention import kv_cache_dtype
from runtime.output_processor import SequenceGroup, SequenceState, check_stop
from runtime.request import Request, RequestOutput, RequestStatus
from runtime.sampler import Sampler, SamplingRow, make_generator
from runtime.sampling_params import SamplingParams
from runtime.scheduler import ScheduledChunk, Scheduler, SchedulerConfig, SchedulerOutput
from runtime.tokenizer import Tokenizer

log = logging.getLogger("spanda.runtime")


class _PlusOne(Sequence[int]):
    """A sequence's output tokens plus the one still on the device (for the sampler of the step launched
    ahead: min_tokens and seeded draws depend on the count only; penalties, which read the tokens, never run
    ahead)."""

    def __init__(self, tokens: list[int]):
        self._tokens = tokens

    def __len__(self) -> int:
        return len(self._tokens) + 1

    def __getitem__(self, i):
        raise TypeError("the last token is still on the device")


@dataclass
class _InFlight:
    """A decode step launched before the previous step's tokens reached the host."""

    out: SchedulerOutput
    seqs: list[tuple[SequenceGroup, SequenceState]]
    tokens: torch.Tensor  # [B] int64 on the device


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics. Token counts are cumulative since load."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens_computed: int
    generation_tokens: int


class LLMEngine:
    def __init__(self, artifact: str | Path | Artifact, options: EngineOptions | None = None):
        """``artifact``: a directory (opened and verified here) or an already opened Artifact."""
        opts = options or EngineOptions()
        self.device = resolve_device(opts.device)
        self.load_seconds: dict[str, float] = {}  # phase -> seconds, for cold-start profiles
        t = time.perf_counter()
        if not isinstance(artifact, Artifact):
            # Weight shards are hashed while they are read for loading (one pass over their bytes); the
            # loader refuses a shard that fails its hash, by name, before the engine exists.
            artifact = open_artifact(artifact, verify=opts.verify, defer_hashes=lambda m: m.weights.files)
        self.artifact = artifact
        self.load_seconds["open_and_verify"] = time.perf_counter() - t
        m = self.artifact.manifest
        check_envelope(
            m, device=self.device.type, gpu_arch=_gpu_arch(self.device),
            torch_version=torch.__version__.split("+")[0], allow_mismatch=opts.allow_envelope_mismatch,
        )
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            t = time.perf_counter()
            torch.cuda.init()
            torch.empty(1, device=self.device)  # the context, here rather than inside a later phase
            self.load_seconds["cuda_init"] = time.perf_counter() - t
        self.tokenizer = Tokenizer.from_dir(self.artifact.path)
        self.eos_token_ids = set(m.tokenizer.eos_token_ids)
        lim = m.limits
        spec = KVCacheSpec.from_manifest(m, kv_cache_dtype(lim.kv_dtype))  # fp8_e4m3 -> float8_e4m3fn
        page = lim.kv_page_size

        def kv_blocks() -> int:  # called once the weights are on the device
            if opts.kv_cache_blocks or lim.kv_cache_blocks:
                return opts.kv_cache_blocks or lim.kv_cache_blocks
            max_blocks = -(-lim.max_seq_len // page) * lim.max_batch
            return size_kv_cache(spec.bytes_per_block, self.device, opts.gpu_memory_utilization, max_blocks)

        t = time.perf_counter()
        self.kernels = KernelCache(self.artifact, _gpu_arch(self.device), opts.allow_jit) if on_gpu else None
        self.load_seconds["kernel_cache"] = time.perf_counter() - t
        t = time.perf_counter()
        self.runner = ModelRunner(self.artifact, self.device, spec, kv_blocks)
        self.load_seconds["graph_weights_kv"] = time.perf_counter() - t
        self.load_seconds.update({f"graph_weights_kv.{k}": v for k, v in self.runner.load_seconds.items()})
        num_blocks = self.runner.num_kv_blocks
        t = time.perf_counter()
        if opts.cuda_graphs and on_gpu:
            self.runner.enable_cuda_graphs(list(lim.batch_buckets), lim.max_seq_len)
        self.load_seconds["cuda_graphs"] = time.perf_counter() - t
        prefix = lim.enable_prefix_caching if opts.enable_prefix_caching is None else opts.enable_prefix_caching
        self.kv = KVCacheManager(num_blocks, page, enable_prefix_caching=prefix)
        max_len = lim.max_seq_len
        if num_blocks * page < max_len:
            log.warning("KV cache holds %d tokens < max_seq_len %d: capping sequence length", num_blocks * page,
                        max_len)
            max_len = num_blocks * page
        self.config = SchedulerConfig(
            max_num_seqs=opts.max_num_seqs or lim.max_batch,
            max_num_batched_tokens=min(opts.max_num_batched_tokens or lim.max_num_batched_tokens,
                                       lim.max_num_batched_tokens),
            max_model_len=max_len,
        )
        self.scheduler = Scheduler(self.config, self.kv)
        self.sampler = Sampler(eos_token_ids=sorted(self.eos_token_ids))
        self._groups: dict[str, SequenceGroup] = {}
        self._seq_of: dict[str, tuple[SequenceGroup, SequenceState]] = {}  # scheduler request id -> its group
        self.async_scheduling = (opts.async_scheduling if opts.async_scheduling is not None
                                 else self.device.type == "cuda")
        self._inflight: _InFlight | None = None
        self._pinned: torch.Tensor | None = None  # host staging of a step's tokens while the next one runs
        self._copied: torch.cuda.Event | None = None  # recorded after the copy into _pinned
        self.num_steps = 0
        self.num_steps_ahead = 0  # decode steps launched before the previous step's tokens were on the host
        self.num_generated = 0
        self.num_prompt_tokens_computed = 0  # prompt tokens run through the model (prefix-cache hits excluded)

    # -- requests ----------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams | None = None
                    ) -> Request:
        """Queue a request (``params.n`` completions). Raises ValueError for a bad prompt or a reused id."""
        params = params or SamplingParams()
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        self._check_prompt(ids)
        group = SequenceGroup(request_id, text, ids, params.n)
        req = Request(f"{request_id}#0", ids, params, prompt=text, reserved_seats=params.n)
        self._seq_of[req.request_id] = (group, group.new_sequence(self.tokenizer, req, 0))
        self._groups[request_id] = group
        self.scheduler.add(req)
        return req

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("the prompt is empty: it must hold at least one token")
        if len(ids) >= self.config.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; this engine's maximum sequence length is "
                f"{self.config.max_model_len} (prompt + at least one generated token)"
            )
        vocab = self.artifact.manifest.model.config["vocab_size"]
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")

    def abort_request(self, request_id: str) -> bool:
        """Finish every completion of the request now and free its KV blocks. False if unknown."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return False
        for seq in group.seqs:
            self._seq_of.pop(seq.request.request_id, None)
            if not seq.request.status.finished:
                self.scheduler.finish(seq.request, RequestStatus.FINISHED_ABORTED)
        if self._inflight is not None and all(s.request.status.finished for _, s in self._inflight.seqs):
            self._inflight = None  # nothing of the step run ahead is wanted any more
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        s = self.kv.stats
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.kv.usage, prefix_cache_queries=s.queries, prefix_cache_hits=s.hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_computed=self.num_prompt_tokens_computed,
            generation_tokens=self.num_generated,
        )

    # -- the step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; return an output for every request with a new token (or finished)."""
        if self._inflight is not None:
            return self._step_in_flight()
        out = self.scheduler.schedule()
        if out.is_empty:
            if self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError(
                    f"the scheduler cannot admit request {self.scheduler.waiting[0].request_id!r} with every KV "
                    f"block free ({self.kv.num_blocks} blocks of {self.kv.block_size}): this is a bug"
                )
            return []
        tables = [self.kv.block_table(c.request.request_id) for c in out.chunks]
        logits = self.runner.execute(out, tables)
        self.scheduler.advance(out)
        self.num_steps += 1
        self.num_prompt_tokens_computed += sum(
            max(0, min(c.end, c.request.num_prompt_tokens) - c.start) for c in out.chunks
        )
        rows_idx: list[int] = []
        seqs: list[tuple[SequenceGroup, SequenceState]] = []
        for i, c in enumerate(out.chunks):
            if not c.samples:
                continue
            group, seq = self._seq_of[c.request.request_id]
            for s in [seq, *self._fork(group, seq)]:
                rows_idx.append(i)
                seqs.append((group, s))
        if not seqs:
            return []
        rows = [SamplingRow(s.request.params, s.request.prompt_token_ids, s.request.output_token_ids,
                            self._generator(s)) for _, s in seqs]
        if self._can_run_ahead(seqs):
            return self._commit_running_ahead(seqs, self.sampler(logits[rows_idx], rows, to_host=False).token_ids)
        result = self.sampler(logits[rows_idx], rows)
        return self._commit(seqs, result.token_ids.tolist(), result.logprobs)

    def _commit(self, seqs: list[tuple[SequenceGroup, SequenceState]], tokens: list[int],
                logprobs: Sequence) -> list[RequestOutput]:
        """Append the sampled tokens, detokenize, check stops; the outputs of the requests that advanced."""
        self.num_generated += len(seqs)
        advanced: dict[str, list[SequenceState]] = {}
        now = time.monotonic()
        for (group, seq), tok, lp in zip(seqs, tokens, logprobs):
            req = seq.request
            req.output_token_ids.append(tok)
            if lp is not None:
                req.logprobs.append(lp)
            req.first_token_time = req.first_token_time or now
            status = check_stop(seq, tok, self.eos_token_ids, self.config.max_model_len)
            if status is not None:
                self.scheduler.finish(req, status)
            advanced.setdefault(group.request_id, []).append(seq)
        return [self._emit(self._groups[rid], seqs_) for rid, seqs_ in advanced.items()]

    # -- running one decode step ahead (EngineOptions.async_scheduling) -----------------------------
    def _can_run_ahead(self, seqs: list[tuple[SequenceGroup, SequenceState]]) -> bool:
        """Whether the next step is the decode of exactly these sequences, schedulable without their tokens."""
        if not self.async_scheduling or self.scheduler.waiting or len(self.scheduler.running) != len(seqs):
            return False
        running = {id(r) for r in self.scheduler.running}
        for group, seq in seqs:
            req, p = seq.request, seq.request.params
            if (group.n != 1 or p.logprobs is not None or p.has_penalties or id(req) not in running
                    or req.num_computed_tokens != req.num_tokens or req.num_tokens >= self.config.max_model_len):
                return False
        return True

    def _run_ahead(self, seqs: list[tuple[SequenceGroup, SequenceState]], tokens: torch.Tensor) -> _InFlight | None:
        """Launch the decode step after the one whose sampled ``tokens`` (device) are not on the host yet."""
        chunks = []
        for _, seq in seqs:
            req = seq.request
            if not self.kv.allocate(req.request_id, req.num_tokens + 1):
                return None  # the pool is short: the next schedule() decides (and may preempt)
            chunks.append(ScheduledChunk(req, req.num_tokens, 1))
        out = SchedulerOutput(chunks, len(chunks))
        logits = self.runner.execute(out, [self.kv.block_table(c.request.request_id) for c in chunks], ids=tokens)
        rows = [SamplingRow(s.request.params, s.request.prompt_token_ids, _PlusOne(s.request.output_token_ids))
                for _, s in seqs]
        self.num_steps += 1
        self.num_steps_ahead += 1
        return _InFlight(out, list(seqs), self.sampler(logits, rows, to_host=False).token_ids)

    def _commit_running_ahead(self, seqs: list[tuple[SequenceGroup, SequenceState]], tokens: torch.Tensor
                              ) -> list[RequestOutput]:
        """Launch the next step, then bring these tokens to the host and commit them while it runs."""
        fetch = self._tokens_to_host(tokens)  # queued before the next step: it does not wait for that one
        nxt = self._run_ahead(seqs, tokens)
        outputs = self._commit(seqs, fetch(), [None] * len(seqs))
        if nxt is not None:
            live = [c for c, (_, s) in zip(nxt.out.chunks, nxt.seqs) if not s.request.status.finished]
            if live:  # their input token is on the host now: the KV blocks it filled can be hashed
                self.scheduler.advance(SchedulerOutput(live, len(live)))
                self._inflight = nxt
        return outputs

    def _tokens_to_host(self, tokens: torch.Tensor):
        """Start copying ``tokens`` to the host; returns the function that waits for them (a list). On CUDA a
        copy into pinned memory and an event, so that waiting does not also wait for work queued later."""
        if tokens.device.type != "cuda":
            return tokens.tolist
        n = tokens.shape[0]
        if self._pinned is None or self._pinned.shape[0] < n:
            self._pinned = torch.empty(max(n, self.config.max_num_seqs), dtype=torch.long, pin_memory=True)
            self._copied = torch.cuda.Event()
        buf, done = self._pinned[:n], self._copied  # one copy at a time: each is waited for before the next
        buf.copy_(tokens, non_blocking=True)
        done.record()

        def wait() -> list[int]:
            done.synchronize()
            return buf.tolist()

        return wait

    def _step_in_flight(self) -> list[RequestOutput]:
        cur, self._inflight = self._inflight, None
        keep = [i for i, (_, s) in enumerate(cur.seqs) if not s.request.status.finished]  # stopped or aborted
        if not keep:
            return []
        seqs = [cur.seqs[i] for i in keep]
        tokens = cur.tokens if len(keep) == len(cur.seqs) else cur.tokens[torch.tensor(keep, device=cur.tokens.device)]
        if self._can_run_ahead(seqs):
            return self._commit_running_ahead(seqs, tokens)
        return self._commit(seqs, tokens.tolist(), [None] * len(seqs))

    def _fork(self, group: SequenceGroup, parent: SequenceState) -> list[SequenceState]:
        """On a group's first sample: n - 1 more sequences sharing the prompt's KV blocks (copy-on-fork of
        the partial last block). If the pool cannot give the copies, the rest queue and reuse the prefix cache."""
        if group.forked:
            return []
        preq = parent.request
        preq.reserved_seats = 1
        children = []
        for i in range(1, group.n):
            req = Request(f"{group.request_id}#{i}", preq.prompt_token_ids, preq.params, prompt=preq.prompt)
            seq = group.new_sequence(self.tokenizer, req, i)
            self._seq_of[req.request_id] = (group, seq)
            copies = self.kv.fork(preq.request_id, req.request_id, preq.num_computed_tokens)
            if copies is None:
                self.scheduler.add(req)
                continue
            self.runner.copy_blocks(copies)
            self.scheduler.add_running(req, preq.num_computed_tokens)
            children.append(seq)
        return children

    def _generator(self, seq: SequenceState) -> torch.Generator | None:
        seed = seq.request.params.seed
        if seed is None or seq.index == 0:
            return None  # the sampler derives index 0's generator from the seed itself
        return make_generator(seed, len(seq.request.output_token_ids), self.device, index=seq.index)

    def _emit(self, group: SequenceGroup, advanced: list[SequenceState]) -> RequestOutput:
        out = group.output(advanced)
        if out.finished:
            del self._groups[group.request_id]
            for s in group.seqs:
                self._seq_of.pop(s.request.request_id, None)
        return out

    # -- scoring (perplexity, tests) ---------------------------------------------------------------
    def compute_logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits [T, vocab] of every position of one sequence (run in budget-sized chunks), as float32."""
        rid = "__score__"
        n = len(token_ids)
        if n > self.config.max_model_len:
            raise ValueError(f"sequence of {n} tokens exceeds the maximum sequence length {self.config.max_model_len}")
        if not self.kv.allocate(rid, n):
            raise RuntimeError(f"not enough free KV blocks to score {n} tokens")
        try:
            table = self.kv.block_table(rid)
            req = Request(rid, [int(t) for t in token_ids], SamplingParams())
            step = self.config.max_num_batched_tokens
            chunks = []
            for start in range(0, n, step):
                chunk = ScheduledChunk(req, start, min(step, n - start))
                inputs, meta = self.runner.prepare(SchedulerOutput([chunk], chunk.num_tokens), [table],
                                                   all_logits=True)
                chunks.append(self.runner.run_tokens(inputs, meta).float().cpu())
            return torch.cat(chunks)
        finally:
            self.kv.free(rid)


def _gpu_arch(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"

