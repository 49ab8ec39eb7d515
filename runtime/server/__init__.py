"""The OpenAI-compatible HTTP server: ``create_app(AsyncEngine(...), name)`` or ``spanda serve``.

async_engine  the engine loop in its own thread, admission (429) and cancellation
protocol      OpenAI request/response/chunk/error bodies (pydantic)
serving       the completions and chat logic: prompts -> engine requests -> bodies / server-sent events
app           FastAPI routes, auth, error handlers, /health, /metrics
metrics       Prometheus metrics (a registry per app)
"""

from runtime.server.app import create_app
from runtime.server.async_engine import AsyncEngine, EngineRequest, QueueFull

__all__ = ["AsyncEngine", "EngineRequest", "QueueFull", "create_app"]
