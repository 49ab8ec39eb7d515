"""The engine: requests in, tokens out, one continuous-batching step at a time.

step(): scheduler.schedule() -> model_runner.execute() -> sampler -> append tokens, detokenize, stop checks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from artifacts.store import check_envelope, open_artifact
from runtime.config import EngineOptions, resolve_device, size_kv_cache
from runtime.detokenizer import IncrementalDetokenizer, StopChecker
from runtime.forward_context import AttentionMetadata
from runtime.kv_cache import KVCacheManager
from runtime.model_runner import KVCacheSpec, ModelRunner
from runtime.request import CompletionOutput, Request, RequestOutput, RequestStatus
from runtime.sampler import Sampler, SamplingRow
from runtime.sampling_params import SamplingParams
from runtime.scheduler import Scheduler, SchedulerConfig
from runtime.tokenizer import Tokenizer

log = logging.getLogger("spanda.runtime")


@dataclass
class _Tracked:
    """Engine-side state of one request besides what the scheduler needs."""

    request: Request
    detok: IncrementalDetokenizer
    stop: StopChecker
    text: str = ""


class LLMEngine:
    def __init__(self, artifact_path: str | Path, options: EngineOptions | None = None):
        opts = options or EngineOptions()
        self.device = resolve_device(opts.device)
        self.artifact = open_artifact(artifact_path, verify=opts.verify)
        m = self.artifact.manifest
        check_envelope(
            m, device=self.device.type, gpu_arch=_gpu_arch(self.device),
            torch_version=torch.__version__.split("+")[0], allow_mismatch=opts.allow_envelope_mismatch,
        )
        self.tokenizer = Tokenizer.from_dir(self.artifact.path)
        self.eos_token_ids = set(m.tokenizer.eos_token_ids)
        lim = m.limits
        spec = KVCacheSpec.from_manifest(m, getattr(torch, lim.kv_dtype))
        page = lim.kv_page_size
        num_blocks = opts.kv_cache_blocks or lim.kv_cache_blocks
        if num_blocks is None:
            max_blocks = -(-lim.max_seq_len // page) * lim.max_batch
            num_blocks = size_kv_cache(spec.bytes_per_block, self.device, opts.gpu_memory_utilization, max_blocks)
        self.runner = ModelRunner(self.artifact, self.device, spec, num_blocks)
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
        self._tracked: dict[str, _Tracked] = {}
        self.num_steps = 0

    # -- requests ----------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams | None = None
                    ) -> Request:
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError(f"n={params.n}: parallel sampling is not supported by this engine yet (n must be 1)")
        if request_id in self._tracked:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
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
        req = Request(request_id, ids, params, prompt=text)
        self._tracked[request_id] = _Tracked(
            req, IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens),
            StopChecker(params.stop, params.include_stop_str_in_output),
        )
        self.scheduler.add(req)
        return req

    def abort_request(self, request_id: str) -> bool:
        tr = self._tracked.pop(request_id, None)
        if tr is None:
            return False
        self.scheduler.finish(tr.request, RequestStatus.FINISHED_ABORTED)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        tables = [self.kv.block_table(c.request.request_id) for c in out.chunks]
        logits = self.runner.execute(out, tables)
        self.scheduler.advance(out)
        self.num_steps += 1
        sampled = [i for i, c in enumerate(out.chunks) if c.samples]
        if not sampled:
            return []
        reqs = [out.chunks[i].request for i in sampled]
        rows = [SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids) for r in reqs]
        result = self.sampler(logits[sampled], rows)
        tokens = result.token_ids.tolist()
        outputs = []
        now = time.monotonic()
        for req, tok, lp in zip(reqs, tokens, result.logprobs):
            req.output_token_ids.append(tok)
            if lp is not None:
                req.logprobs.append(lp)
            if req.first_token_time is None:
                req.first_token_time = now
            self._check_stop(req, tok)
            outputs.append(self._output(req))
        return outputs

    def _check_stop(self, req: Request, tok: int) -> None:
        """Detokenize the new token and finish the request if it hit EOS, a stop id/string or a limit."""
        tr = self._tracked[req.request_id]
        p = req.params
        delta = tr.detok.add_tokens([tok])
        tr.text = tr.detok.output_text
        status = None
        if len(req.output_token_ids) >= p.min_tokens:
            if tok in self.eos_token_ids and not p.ignore_eos:
                status = RequestStatus.FINISHED_STOPPED
            elif tok in p.stop_token_ids:
                status, req.stop_reason = RequestStatus.FINISHED_STOPPED, tok
            elif (hit := tr.stop.check(tr.text, len(delta))) is not None:
                status, req.stop_reason = RequestStatus.FINISHED_STOPPED, hit.stop_string
                tr.text = hit.text
        if status is None and (len(req.output_token_ids) >= p.max_tokens
                               or req.num_tokens >= self.config.max_model_len):
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            if not isinstance(req.stop_reason, str):
                tr.text += tr.detok.flush()  # an incomplete character left at the very end
            self.scheduler.finish(req, status)

    def _output(self, req: Request) -> RequestOutput:
        tr = self._tracked[req.request_id]
        finished = req.status.finished
        if finished:
            del self._tracked[req.request_id]
        comp = CompletionOutput(
            index=0, text=tr.text, token_ids=list(req.output_token_ids),
            finish_reason=req.status.value if finished else None, stop_reason=req.stop_reason,
            logprobs=list(req.logprobs) if req.params.logprobs is not None else None,
        )
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, [comp], finished,
                             num_cached_tokens=req.num_cached_tokens)

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
            page = self.kv.block_size
            ids = torch.as_tensor(list(token_ids), dtype=torch.long)
            chunks = []
            step = self.config.max_num_batched_tokens
            for s in range(0, n, step):
                e = min(n, s + step)
                pos = torch.arange(s, e)
                slots = torch.tensor(table)[pos // page] * page + pos % page
                dev = self.device
                meta = AttentionMetadata(
                    slot_mapping=slots.to(dev), query_start_loc=torch.tensor([0, e - s], device=dev),
                    seq_lens=torch.tensor([e], device=dev), block_tables=torch.tensor([table], device=dev),
                    query_start_loc_host=[0, e - s], seq_lens_host=[e],
                )
                inputs = (ids[s:e].to(dev), pos.to(dev), torch.arange(e - s, device=dev))
                chunks.append(self.runner.run_tokens(inputs, meta).float().cpu())
            return torch.cat(chunks)
        finally:
            self.kv.free(rid)


def _gpu_arch(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"

