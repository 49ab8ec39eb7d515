"""The engine loop in its own thread, driven from asyncio.

    asyncio (server)                          engine thread (owns the LLMEngine; the only caller of it)
    submit() ──► command queue ──────────►  drain commands (add / abort) between steps
    RequestStream ◄── call_soon_threadsafe ◄─ step() outputs, one hand-over per step

The engine is not thread-safe: every call to it happens on the engine thread, which also builds it (so the
server can answer /health while a large model loads). The thread survives a failing request: an error in
``add_request`` fails that request only; an error in ``step`` is logged and fails the requests in flight.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from runtime.engine import EngineStats, LLMEngine
from runtime.request import CompletionOutput, RequestOutput
from runtime.sampling_params import SamplingParams

log = logging.getLogger("spanda.server")

Prompt = str | list[int]


class QueueFull(Exception):
    """Too many requests in flight; the client should retry after ``retry_after`` seconds (HTTP 429)."""

    def __init__(self, limit: int, retry_after: int = 1):
        super().__init__(f"the server is at capacity ({limit} requests in flight); retry later")
        self.retry_after = retry_after


class EngineUnavailable(Exception):
    """The engine is loading, failed to load or is shutting down (HTTP 503)."""


class EngineError(Exception):
    """The engine failed while running a request (a server fault, HTTP 500)."""


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt: Prompt
    params: SamplingParams


class RequestStream:
    """Outputs of a group of admitted engine requests. Iterate it with ``async for``; ``close()`` aborts
    whatever has not finished (call it in a ``finally``).

    Outputs are cumulative, so a consumer that falls behind gets one merged output per request (the newest
    state of every completion) instead of a backlog: memory stays bounded whatever the client's speed.
    """

    def __init__(self, owner: AsyncEngine, requests: Sequence[EngineRequest]):
        self._owner = owner
        self._pending: dict[str, RequestOutput] = {}  # request id -> merged output not yet consumed
        self._error: BaseException | None = None
        self._wake = asyncio.Event()
        self._n = {r.request_id: r.params.n for r in requests}
        self._latest: dict[str, dict[int, CompletionOutput]] = {r.request_id: {} for r in requests}
        self.unfinished: set[str] = set(self._n)

    def _put(self, out: RequestOutput) -> None:
        rid = out.request_id
        self._latest[rid].update({c.index: c for c in out.outputs})
        if out.finished:
            self.unfinished.discard(rid)
        prev = self._pending.get(rid)
        if prev is not None:
            merged = {c.index: c for c in prev.outputs} | {c.index: c for c in out.outputs}
            out = replace(out, outputs=[merged[i] for i in sorted(merged)])
        self._pending[rid] = out
        self._wake.set()

    def _fail(self, request_id: str, error: BaseException) -> None:
        self.unfinished.discard(request_id)
        self._error = self._error or error
        self._wake.set()

    def _abort(self, request_id: str) -> None:
        """Finish a request as aborted for the consumer: every unfinished completion gets "abort"."""
        latest = self._latest[request_id]
        outs = [replace(latest.get(i) or CompletionOutput(i, "", []), finish_reason="abort")
                for i in range(self._n[request_id]) if i not in latest or latest[i].finish_reason is None]
        self._put(RequestOutput(request_id, None, [], outs, finished=True))

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            if self._pending:
                return self._pending.pop(next(iter(self._pending)))
            if self._error is not None:
                raise self._error
            if not self.unfinished:
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()

    def close(self) -> None:
        """Abort the unfinished requests (frees their KV blocks at the engine's next command drain)."""
        for rid in list(self.unfinished):
            self._owner._release(rid)
            self._owner._send(("abort", rid))
        self.unfinished.clear()


class AsyncEngine:
    """Runs an LLMEngine in a dedicated thread; admission control and cancellation for an asyncio server.

    load: builds the engine (called on the engine thread).
    max_queue: requests allowed to wait beyond one full batch: at most ``max_num_seqs + max_queue`` engine
      requests are in flight (a prompt of a batch counts as one); more raise QueueFull.
    """

    def __init__(self, load: Callable[[], LLMEngine], max_queue: int = 64):
        self._load = load
        self.max_queue = max_queue
        self.engine: LLMEngine | None = None
        self.load_error: BaseException | None = None
        self.stats: EngineStats | None = None
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()  # to the engine thread
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._accepting = True
        self._idle = asyncio.Event()
        self._idle.set()
        self._engine_rids: set[str] = set()  # requests inside the engine (engine thread only)

    @property
    def ready(self) -> bool:
        """True once the engine is loaded and the server accepts requests."""
        return self._ready.is_set() and self.engine is not None and self._accepting

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def start(self) -> None:
        """Start the engine thread (which loads the engine). Call from the event loop that will consume."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="spanda-engine", daemon=True)
        self._thread.start()

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait (polling, so no thread is left blocked) for the load to end: True once the engine is ready,
        False if it failed to load or the timeout passed."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._ready.is_set() and (deadline is None or loop.time() < deadline):
            await asyncio.sleep(0.05)
        return self.engine is not None

    # -- requests (event-loop thread) ----------------------------------------------------------------
    async def submit(self, requests: Sequence[EngineRequest]) -> RequestStream:
        """Admit all of ``requests`` or none. Raises QueueFull, EngineUnavailable, or the engine's ValueError
        for a bad prompt (then no request of the group stays in the engine)."""
        if not self.ready:
            raise EngineUnavailable(self.unavailable_reason())
        assert self.engine is not None
        limit = self.engine.config.max_num_seqs + self.max_queue
        if len(requests) > limit:
            raise ValueError(f"too many prompts in one request: {len(requests)} > {limit}")
        if len(self._streams) + len(requests) > limit:
            raise QueueFull(limit)
        stream = RequestStream(self, requests)
        assert self._loop is not None
        futures = []
        for r in requests:
            self._streams[r.request_id] = stream
            fut = self._loop.create_future()
            self._send(("add", r, fut))
            futures.append(fut)
        self._idle.clear()
        results = await asyncio.gather(*futures, return_exceptions=True)
        errors = [e for e in results if isinstance(e, BaseException)]
        if errors:
            stream.close()
            raise errors[0]
        return stream

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come; the request is aborted if the consumer stops early."""
        stream = await self.submit([EngineRequest(request_id, prompt, params)])
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def unavailable_reason(self) -> str:
        """Why the engine does not accept requests now (for 503 bodies)."""
        if not self._accepting:
            return "the server is shutting down"
        if self.load_error is not None:
            return f"the engine failed to load: {self.load_error}"
        return "the engine is still loading"

    def _release(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        if not self._streams:
            self._idle.set()

    def _send(self, command: tuple[Any, ...]) -> None:
        self._commands.put(command)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # closed by its consumer; the abort is on its way
            stream._put(out)
            if out.finished:
                self._release(out.request_id)

    def _fail(self, request_ids: list[str], error: BaseException) -> None:
        for rid in request_ids:
            stream = self._streams.get(rid)
            if stream is not None:
                stream._fail(rid, error)
                self._release(rid)

    def _settle(self, fut: asyncio.Future, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)

    # -- shutdown ------------------------------------------------------------------------------------
    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting; let in-flight requests finish for up to ``timeout`` s; abort the rest; stop the
        thread. Idempotent."""
        self._accepting = False
        if self._thread is None:
            return
        if self._streams:
            log.info("draining %d request(s), up to %.1f s", len(self._streams), timeout)
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("aborting %d request(s) still running after %.1f s", len(self._streams), timeout)
        for rid, stream in list(self._streams.items()):
            if rid in stream.unfinished:
                stream._abort(rid)
            self._release(rid)
            self._send(("abort", rid))
        self._send(("stop",))
        thread, self._thread = self._thread, None
        await asyncio.get_running_loop().run_in_executor(None, thread.join, 10.0)

    # -- the engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self._load()
            self.stats = self.engine.stats()
        except BaseException as e:  # noqa: BLE001 - reported through load_error and /health
            log.exception("failed to load the engine")
            self.load_error = e
            self._ready.set()
            return
        self._ready.set()
        log.info("engine ready")
        engine = self.engine
        while True:
            try:
                if not self._drain(block=not engine.has_unfinished_requests()):
                    return
                if engine.has_unfinished_requests():
                    self._step(engine)
                self.stats = engine.stats()
            except Exception:  # noqa: BLE001 - never let the loop die
                log.exception("engine loop error")

    def _drain(self, block: bool) -> bool:
        """Apply queued commands (waiting for one if ``block``). False once asked to stop."""
        try:
            cmd = self._commands.get(timeout=1.0) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if cmd[0] == "stop":
                return False
            self._apply(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, cmd: tuple[Any, ...]) -> None:
        assert self.engine is not None and self._loop is not None
        if cmd[0] == "add":
            req, fut = cmd[1], cmd[2]
            error: BaseException | None = None
            try:
                self.engine.add_request(req.request_id, req.prompt, req.params)
                self._engine_rids.add(req.request_id)
            except ValueError as e:
                error = e
            except Exception as e:  # noqa: BLE001 - the loop must survive any request
                log.exception("add_request(%s) failed", req.request_id)
                error = EngineError(f"the engine could not add the request: {e}")
            self._loop.call_soon_threadsafe(self._settle, fut, error)
        elif cmd[0] == "abort":
            self._engine_rids.discard(cmd[1])
            try:
                self.engine.abort_request(cmd[1])
            except Exception:  # noqa: BLE001
                log.exception("abort_request(%s) failed", cmd[1])

    def _step(self, engine: LLMEngine) -> None:
        assert self._loop is not None
        try:
            outputs = engine.step()
        except Exception as e:  # noqa: BLE001 - fail what was in flight, keep serving
            log.exception("engine step failed; failing the requests in flight")
            rids = sorted(self._engine_rids)
            self._engine_rids.clear()
            for rid in rids:
                try:
                    engine.abort_request(rid)
                except Exception:  # noqa: BLE001
                    log.exception("abort_request(%s) failed after a failed step", rid)
            self._loop.call_soon_threadsafe(self._fail, rids, EngineError(f"the engine failed: {e}"))
            return
        for out in outputs:
            if out.finished:
                self._engine_rids.discard(out.request_id)
        if outputs:
            self._loop.call_soon_threadsafe(self._dispatch, outputs)
