"""The FastAPI app: OpenAI routes, auth, error bodies, health and metrics.

    POST /v1/completions, /v1/chat/completions   (JSON or server-sent events with "stream": true)
    GET  /v1/models, /health (200 once the engine is loaded, else 503), /metrics (Prometheus)

Every client mistake is answered with ``{"error": {"message", "type", "param", "code"}}`` and a 4xx
status; a 500 means a server fault. With an API key, /v1/* need ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.server.async_engine import AsyncEngine, EngineError, EngineUnavailable, QueueFull, RequestStream
from runtime.server.metrics import CONTENT_TYPE, Metrics
from runtime.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, error_body
from runtime.server.serving import APIError, Job, OpenAIServing

log = logging.getLogger("spanda.server")
M = TypeVar("M", bound=BaseModel)
COUNTED_PATHS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}


def create_app(async_engine: AsyncEngine, served_model_name: str, api_key: str | None = None, *,
               shutdown_timeout: float = 30.0) -> FastAPI:
    """An app serving ``async_engine`` as model ``served_model_name``. Its lifespan starts the engine thread
    (the engine loads there) and, at exit, drains in-flight requests for up to ``shutdown_timeout`` s."""
    metrics = Metrics(async_engine, served_model_name)
    serving = OpenAIServing(async_engine, served_model_name, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        yield
        await async_engine.shutdown(shutdown_timeout)

    app = FastAPI(title="Spanda", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.serving = async_engine, metrics, serving
    app.add_middleware(_CountRequests, metrics=metrics)
    _add_error_handlers(app)
    guard = [Depends(_auth(api_key))]

    @app.get("/health")
    async def health() -> Response:
        if async_engine.ready:
            return JSONResponse({"status": "ok"})
        return JSONResponse(error_body(async_engine.unavailable_reason(), "service_unavailable"), 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=guard)
    async def models() -> Response:
        engine = async_engine.engine
        card = ModelCard(id=served_model_name, max_model_len=engine.config.max_model_len if engine else None)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.post("/v1/completions", dependencies=guard)
    async def completions(request: Request) -> Response:
        body = _parse(CompletionRequest, await request.body())
        return await _respond(request, serving, serving.completion_job(body), bool(body.stream))

    @app.post("/v1/chat/completions", dependencies=guard)
    async def chat_completions(request: Request) -> Response:
        body = _parse(ChatCompletionRequest, await request.body())
        return await _respond(request, serving, serving.chat_job(body), bool(body.stream))

    return app


async def _respond(request: Request, serving: OpenAIServing, job: Job, stream: bool) -> Response:
    try:
        admitted = await serving.engine.submit(job.engine_requests())
    except QueueFull as e:
        raise APIError(str(e), None, "queue_full", 429, "rate_limit_error",
                       {"Retry-After": str(e.retry_after)}) from e
    except EngineUnavailable as e:
        raise APIError(str(e), None, "unavailable", 503, "service_unavailable") from e
    except ValueError as e:
        raise APIError(str(e), "messages" if job.chat else "prompt") from e
    if stream:
        return _EventStream(serving.stream(job, admitted), media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    body = await _unless_disconnected(request, serving.collect(job, admitted), admitted)
    if body is None:
        return Response(status_code=499)  # the client is gone; nothing will read this
    return JSONResponse(body)


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, dict], admitted: RequestStream
                               ) -> dict | None:
    """Run ``work``; if the client disconnects first, cancel it (which aborts the engine requests): None."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            admitted.close()
    if task.cancelled():
        log.info("client disconnected; request aborted")
        return None
    return task.result()


class _EventStream(StreamingResponse):
    """A StreamingResponse that always closes its generator (so a disconnect aborts the request at once)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


def _parse(model: type[M], raw: bytes) -> M:
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise _validation_error(e.errors(include_url=False)) from e


def _validation_error(errors: list[Any]) -> APIError:
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(f"The request body is not valid JSON: {first['msg']}", None, "invalid_json")
    parts = []
    for err in errors[:3]:
        where = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    param = str(first["loc"][0]) if first["loc"] else None
    code = "invalid_type" if param else "invalid_body"
    return APIError("Invalid request: " + "; ".join(parts), param, code)


def _auth(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError("Incorrect or missing API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key", 401)
    return check


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> Response:
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation(_: Request, e: RequestValidationError) -> Response:
        err = _validation_error(list(e.errors()))
        return JSONResponse(err.body(), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> Response:
        type_ = "invalid_request_error" if e.status_code < 500 else "internal_error"
        return JSONResponse(error_body(str(e.detail), type_), e.status_code, headers=e.headers)

    @app.exception_handler(EngineError)
    async def engine_error(_: Request, e: EngineError) -> Response:
        return JSONResponse(error_body(str(e), "internal_error", None, "engine_error"), 500)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> Response:
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal server error: {type(e).__name__}", "internal_error"), 500)


class _CountRequests:
    """Pure ASGI middleware counting responses by path and status (streaming-safe, unlike
    BaseHTTPMiddleware, which would also get in the way of disconnect detection)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in COUNTED_PATHS else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http_requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
