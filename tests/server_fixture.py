"""Live servers for tests, bound to 127.0.0.1 only: in-process (uvicorn in a background thread, on a socket we
bind to a free port) or as a ``spanda serve`` subprocess."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

REPO = Path(__file__).resolve().parents[1]


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def wait_until(predicate, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value (returned); AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def health(url: str) -> int:
    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code
    except httpx.TransportError:
        return 0


def scrape(url: str) -> dict[str, float]:
    """The /metrics samples as {name{labels}: value}, plus {name: value} for label-less lookups."""
    text = httpx.get(f"{url}/metrics", timeout=5.0).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, value = line.rsplit(" ", 1)
        out[key] = float(value)
        out.setdefault(re.sub(r"\{.*\}", "", key), float(value))
    return out


class LiveServer:
    """Serve a FastAPI app with uvicorn in a background thread; ``with LiveServer(app) as s: s.url``."""

    def __init__(self, app, wait_ready: bool = True, timeout: float = 60.0):
        self.app, self.wait_ready, self.timeout = app, wait_ready, timeout
        self.sock = free_socket()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_until(lambda: self.server.started, self.timeout, what="uvicorn to start")
        if self.wait_ready:
            wait_until(lambda: health(self.url) == 200, self.timeout, what="/health 200")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
        assert not self.thread.is_alive(), "the server thread did not stop"


class ServeProcess:
    """``python -m spanda.cli serve ARTIFACT --port P ...`` as a subprocess (for signal tests)."""

    def __init__(self, artifact: Path, *args: str, timeout: float = 90.0):
        sock = free_socket()
        self.port = sock.getsockname()[1]
        sock.close()  # the child binds it right away; a clash would only fail the test, never hang it
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "spanda.cli", "serve", str(artifact), "--host", "127.0.0.1",
               "--port", str(self.port), "--device", "cpu", *args]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty child never blocks on it
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     text=True)
        self.timeout = timeout

    def __enter__(self) -> ServeProcess:
        wait_until(lambda: self.proc.poll() is not None or health(self.url) == 200, self.timeout, 0.1,
                   "spanda serve to be ready")
        assert self.proc.poll() is None, f"spanda serve exited early:\n{self.output()}"
        return self

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()
