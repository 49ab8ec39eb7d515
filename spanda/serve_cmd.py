"""``spanda serve ARTIFACT``: the OpenAI-compatible server (FastAPI + uvicorn) over the runtime's engine.

SIGTERM or SIGINT drains: the server stops admitting requests (503), lets in-flight ones finish for up
to ``--shutdown-timeout`` seconds, aborts the rest (their streams end with finish_reason "abort"), then
exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from types import FrameType

import click

log = logging.getLogger("spanda.server")


@click.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--api-key", default=None, envvar="SPANDA_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/* (env SPANDA_API_KEY).")
@click.option("--served-model-name", default=None,
              help="Model name clients send (default: the artifact's recipe name).")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA if available).")
@click.option("--allow-jit", is_flag=True,
              help="On a GPU the artifact's kernels were not compiled for, recompile them instead of refusing.")
@click.option("--async-scheduling/--no-async-scheduling", default=None,
              help="Launch each decode step before the previous step's tokens reach the host (EngineOptions; "
                   "default: on a GPU).")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=0),
              help="Requests that may wait beyond one full batch; more get 429.")
@click.option("--shutdown-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds in-flight requests may run after SIGTERM before they are aborted.")
def serve(artifact: str, host: str, port: int, api_key: str | None, served_model_name: str | None,
          device: str | None, allow_jit: bool, async_scheduling: bool | None, max_queue: int,
          shutdown_timeout: float) -> None:
    """Serve ARTIFACT over an OpenAI-compatible HTTP API."""
    import uvicorn

    from artifacts.store import ArtifactError, open_artifact
    from runtime.config import EngineOptions
    from runtime.engine import LLMEngine
    from runtime.server import AsyncEngine, create_app

    try:
        manifest = open_artifact(artifact, verify=False).manifest  # the engine verifies hashes as it loads
    except ArtifactError as e:
        raise click.ClickException(str(e)) from e
    name = served_model_name or manifest.provenance.recipe.get("name") or Path(artifact).name
    engine = AsyncEngine(lambda: LLMEngine(artifact, EngineOptions(device=device, allow_jit=allow_jit,
                                                                          async_scheduling=async_scheduling)),
                         max_queue=max_queue)
    app = create_app(engine, name, api_key, shutdown_timeout=shutdown_timeout)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    server = _draining_server(config, engine, shutdown_timeout)
    log.info("serving %s as model %r on http://%s:%d", artifact, name, host, port)
    if not asyncio.run(server.run_until_done()):
        sys.exit(1)


def _draining_server(config, engine, shutdown_timeout: float):  # type: ignore[no-untyped-def]
    """A uvicorn.Server whose signal handling drains the engine first and never re-raises the signal (so
    the process exits 0). Built here so that ``spanda --help`` does not import uvicorn."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def __init__(self) -> None:
            super().__init__(config)
            self._loop: asyncio.AbstractEventLoop | None = None
            self._draining = False
            self._tasks: set[asyncio.Task] = set()

        async def run_until_done(self) -> bool:
            """Serve until a signal; False if the engine failed to load."""
            self._loop = asyncio.get_running_loop()
            watch = asyncio.ensure_future(self._watch_load())
            await self.serve()
            watch.cancel()
            return engine.load_error is None

        async def _watch_load(self) -> None:
            if not await engine.wait_ready():
                log.error("the engine failed to load; exiting")
                self.should_exit = True

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self._draining or self._loop is None:
                self.should_exit = True
                self.force_exit = self._draining
                return
            self._draining = True
            log.info("received %s: draining (up to %.1f s)", signal.Signals(sig).name, shutdown_timeout)
            self._loop.call_soon_threadsafe(self._start_drain)

        def _start_drain(self) -> None:
            task = asyncio.ensure_future(self._drain())
            self._tasks.add(task)

        async def _drain(self) -> None:
            try:
                await engine.shutdown(shutdown_timeout)
            finally:
                self.should_exit = True

    return DrainingServer()
