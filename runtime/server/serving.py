"""The OpenAI endpoints' logic: request -> engine requests -> response body or server-sent events.

A completions request with P prompts and ``n`` becomes P engine requests (``<id>-<p>``) of n completions
each; choice ``p * n + i`` is completion i of prompt p. ``usage`` counts each prompt once and every
generated token of every completion.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from runtime.request import CompletionOutput, RequestOutput
from runtime.sampler import TokenLogprobs
from runtime.sampling_params import SamplingParams
from runtime.server.async_engine import AsyncEngine, EngineError, EngineRequest, RequestStream
from runtime.server.metrics import Metrics
from runtime.server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    SamplingRequest,
    TopLogprob,
    UsageInfo,
    error_body,
    random_id,
)

log = logging.getLogger("spanda.server")


class APIError(Exception):
    """An error answered with an OpenAI-style body (400 unless told)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type, self.headers = (
            message, param, code, status, type_, headers)

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


@dataclass
class Job:
    """One HTTP request turned into engine requests, and what its response needs."""

    id: str
    chat: bool
    n: int
    prompts: list[list[int]]
    texts: list[str]  # prompt texts (for echo)
    params: list[SamplingParams]
    echo: bool = False
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    arrival: float = field(default_factory=time.monotonic)
    finals: dict[int, CompletionOutput] = field(default_factory=dict)  # choice index -> latest output

    def engine_requests(self) -> list[EngineRequest]:
        pairs = zip(self.prompts, self.params)
        return [EngineRequest(f"{self.id}-{i}", p, sp) for i, (p, sp) in enumerate(pairs)]

    def choice_index(self, out: RequestOutput, c: CompletionOutput) -> int:
        return int(out.request_id.rsplit("-", 1)[1]) * self.n + c.index

    def usage(self) -> UsageInfo:
        p = sum(len(ids) for ids in self.prompts)
        g = sum(len(c.token_ids) for c in self.finals.values())
        return UsageInfo(prompt_tokens=p, completion_tokens=g, total_tokens=p + g)


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, model_name: str, metrics: Metrics):
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics
        self._token_text: dict[int, str] = {}

    # -- request -> job ------------------------------------------------------------------------------
    def completion_job(self, req: CompletionRequest) -> Job:
        self._check_common(req)
        if req.suffix:
            raise APIError("suffix is not supported", "suffix")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise APIError("best_of is not supported (only best_of == n)", "best_of")
        if req.echo and req.logprobs is not None:
            raise APIError("echo with logprobs (prompt logprobs) is not supported", "echo")
        tok = self._tokenizer()
        p = req.prompt
        raw: list = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not raw:
            raise APIError("prompt must not be an empty list", "prompt")
        prompts = [tok.encode(x) if isinstance(x, str) else list(x) for x in raw]
        texts = [x if isinstance(x, str) else tok.decode(x, skip_special_tokens=False) if req.echo else ""
                 for x in raw]
        return self._job("cmpl", req, prompts, texts, "prompt", echo=bool(req.echo))

    def chat_job(self, req: ChatCompletionRequest) -> Job:
        self._check_common(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError("top_logprobs requires logprobs to be true", "top_logprobs")
        tok = self._tokenizer()
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in req.messages]
        try:
            text = tok.apply_chat_template(messages,
                                           add_generation_prompt=req.add_generation_prompt is not False)
        except Exception as e:  # noqa: BLE001 - a template error is the conversation's fault
            raise APIError(f"the chat template could not render these messages: {e}", "messages") from e
        return self._job("chatcmpl", req, [tok.encode(text, add_special_tokens=False)], [text], "messages")

    def _check_common(self, req: SamplingRequest) -> None:
        if req.model_extra:
            log.warning("ignoring unsupported request fields: %s", ", ".join(sorted(req.model_extra)))
        if req.model != self.model_name:
            raise APIError(f"The model `{req.model}` does not exist; this server serves `{self.model_name}`",
                           "model", "model_not_found")
        if req.logit_bias:
            raise APIError("logit_bias is not supported", "logit_bias")
        if req.stream_options is not None and not req.stream:
            raise APIError("stream_options is only allowed when stream is true", "stream_options")
        limit = self._engine().config.max_num_seqs
        if req.n is not None and isinstance(req.n, int) and req.n > limit:
            raise APIError(f"n must be <= {limit} (this engine's batch size), got {req.n}", "n")

    def _job(self, prefix: str, req: SamplingRequest, prompts: list[list[int]], texts: list[str],
             prompt_param: str, echo: bool = False) -> Job:
        max_len = self._engine().config.max_model_len
        asked = req.requested_max_tokens()
        chat_max = getattr(req, "max_completion_tokens", None)
        mt_param = "max_completion_tokens" if chat_max is not None else "max_tokens"
        params = []
        for ids in prompts:
            if not ids:
                raise APIError("the prompt is empty: it must hold at least one token", prompt_param)
            if len(ids) >= max_len:
                raise APIError(f"This model's maximum context length is {max_len} tokens. However, your "
                               f"prompt has {len(ids)} tokens (at least one token must be generated).",
                               prompt_param, "context_length_exceeded")
            if asked is not None and asked >= 1 and len(ids) + asked > max_len:
                raise APIError(f"This model's maximum context length is {max_len} tokens. However, you "
                               f"requested {len(ids) + asked} tokens ({len(ids)} in the prompt, {asked} for the "
                               f"completion). Please reduce the prompt or the completion length.",
                               mt_param, "context_length_exceeded")
            try:
                params.append(req.sampling_params(asked if asked is not None else max_len - len(ids)))
            except ValueError as e:
                raise APIError(str(e), _param_of(str(e), req, mt_param)) from e
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        n = params[0].n
        return Job(random_id(prefix), prefix == "chatcmpl", n, prompts, texts, params, echo, include_usage)

    def _engine(self):
        engine = self.engine.engine
        if engine is None or not self.engine.ready:
            raise APIError(self.engine.unavailable_reason(), None, "unavailable", 503, "service_unavailable")
        return engine

    def _tokenizer(self):
        return self._engine().tokenizer

    # -- non-streaming -------------------------------------------------------------------------------
    async def collect(self, job: Job, stream: RequestStream) -> dict:
        """Run to completion; the response body as a dict."""
        timer = self.metrics.timer(job.arrival)
        self.metrics.prompt_tokens.inc(sum(len(ids) for ids in job.prompts))
        try:
            async for out in stream:
                timer.observe(out)
                for c in out.outputs:
                    job.finals[job.choice_index(out, c)] = c
        finally:
            stream.close()
        timer.done()
        finals = sorted(job.finals.items())
        if job.chat:
            return ChatCompletionResponse(
                id=job.id, model=self.model_name, usage=job.usage(),
                choices=[ChatChoice(index=i, message=ChatResponseMessage(content=c.text),
                                    logprobs=self._chat_logprobs(c.logprobs), finish_reason=c.finish_reason)
                         for i, c in finals],
            ).model_dump()
        return CompletionResponse(
            id=job.id, model=self.model_name, usage=job.usage(),
            choices=[self._completion_choice(job, i, c, 0, 0, True) for i, c in finals],
        ).model_dump()

    def _completion_choice(self, job: Job, i: int, c: CompletionOutput, text_from: int, tokens_from: int,
                           first: bool) -> CompletionChoice:
        """Choice i with the text and logprobs after the first text_from chars / tokens_from tokens."""
        prefix = job.texts[i // job.n] if job.echo and first else ""
        lps = None
        if c.logprobs is not None:
            lps = self._completion_logprobs(c.logprobs[tokens_from:], len(prefix) + text_from)
        return CompletionChoice(index=i, text=prefix + c.text[text_from:], logprobs=lps,
                                finish_reason=c.finish_reason)

    # -- streaming -----------------------------------------------------------------------------------
    async def stream(self, job: Job, stream: RequestStream) -> AsyncIterator[str]:
        """Server-sent events: one chunk per choice that advanced, then usage (if asked), then [DONE]."""
        timer = self.metrics.timer(job.arrival)
        self.metrics.prompt_tokens.inc(sum(len(ids) for ids in job.prompts))
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        try:
            async for out in stream:
                timer.observe(out)
                for c in out.outputs:
                    i = job.choice_index(out, c)
                    job.finals[i] = c
                    chunk = self._chunk(job, i, c, sent_text.get(i), sent_tokens.get(i, 0))
                    sent_text[i], sent_tokens[i] = len(c.text), len(c.token_ids)
                    if chunk is not None:
                        yield chunk
        except EngineError as e:
            yield _sse(error_body(str(e), "internal_error", None, "engine_error"))
        finally:
            stream.close()
        timer.done()
        if job.include_usage:
            cls = ChatCompletionChunk if job.chat else CompletionChunk
            yield _sse(cls(id=job.id, created=job.created, model=self.model_name, choices=[],
                           usage=job.usage()).model_dump())
        yield "data: [DONE]\n\n"

    def _chunk(self, job: Job, i: int, c: CompletionOutput, sent: int | None, sent_tok: int) -> str | None:
        first = sent is None
        start = sent or 0
        new_tokens = len(c.token_ids) > sent_tok
        if not first and len(c.text) <= start and c.finish_reason is None and not (
                new_tokens and c.logprobs is not None):
            return None
        if job.chat:
            lps = self._chat_logprobs(c.logprobs[sent_tok:]) if c.logprobs is not None else None
            delta = ChatDelta(role="assistant" if first else None, content=c.text[start:])
            choice = ChatStreamChoice(index=i, delta=delta, logprobs=lps, finish_reason=c.finish_reason)
            body = ChatCompletionChunk(id=job.id, created=job.created, model=self.model_name,
                                       choices=[choice]).model_dump()
            body["choices"][0]["delta"] = {k: v for k, v in body["choices"][0]["delta"].items() if v is not None}
        else:
            choice = self._completion_choice(job, i, c, start, sent_tok, first)
            body = CompletionChunk(id=job.id, created=job.created, model=self.model_name,
                                   choices=[choice]).model_dump()
        if not job.include_usage:
            del body["usage"]
        return _sse(body)

    # -- logprobs ------------------------------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._tokenizer().decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text

    def _completion_logprobs(self, lps: list[TokenLogprobs], offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for lp in lps:
            tok = self.token_text(lp.token_id)
            out.tokens.append(tok)
            out.token_logprobs.append(lp.logprob)
            top = {self.token_text(t): v for t, v in lp.top}
            top.setdefault(tok, lp.logprob)
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(tok)
        return out

    def _chat_logprobs(self, lps: list[TokenLogprobs] | None) -> ChatLogprobs | None:
        if lps is None:
            return None
        content = []
        for lp in lps:
            tok = self.token_text(lp.token_id)
            top = [TopLogprob(token=self.token_text(t), logprob=v, bytes=list(self.token_text(t).encode()))
                   for t, v in lp.top]
            content.append(ChatTokenLogprob(token=tok, logprob=lp.logprob, bytes=list(tok.encode()),
                                            top_logprobs=top))
        return ChatLogprobs(content=content)


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def _param_of(message: str, req: SamplingRequest, max_tokens_param: str) -> str | None:
    """The request field a SamplingParams error names (its message starts with the field)."""
    name = message.split(" ", 1)[0]
    if name == "max_tokens":
        return max_tokens_param
    if name == "logprobs" and isinstance(req, ChatCompletionRequest):
        return "top_logprobs"
    return name if name in type(req).model_fields else None
