"""Prometheus metrics of one server (a per-app CollectorRegistry, so tests can run several apps).

Request-level metrics (HTTP status, tokens in/out, latencies) are recorded by the app as requests pass;
engine-level ones (running/waiting, KV cache usage, prefix cache) are read from the engine thread's latest
``EngineStats`` snapshot at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from runtime.request import RequestOutput

if TYPE_CHECKING:
    from runtime.server.async_engine import AsyncEngine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class _EngineCollector(Collector):
    """Gauges and counters read from the engine's stats snapshot when scraped."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine = engine
        self.labels = {"model_name": model_name}

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=list(self.labels))
        g.add_metric(list(self.labels.values()), value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=list(self.labels))
        c.add_metric(list(self.labels.values()), value)
        return c

    def collect(self) -> Iterator[Metric]:
        yield self._gauge("spanda_engine_ready", "1 once the engine is loaded and accepting requests",
                          float(self.engine.ready))
        yield self._gauge("spanda_requests_in_flight", "Requests admitted and not finished (server side)",
                          self.engine.num_in_flight)
        s = self.engine.stats
        if s is None:
            return
        yield self._gauge("spanda_num_requests_running", "Sequences in the running batch", s.num_running)
        yield self._gauge("spanda_num_requests_waiting", "Sequences waiting to be scheduled", s.num_waiting)
        yield self._gauge("spanda_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0..1)",
                          s.kv_cache_usage)
        yield self._counter("spanda_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                            s.prefix_cache_queries)
        yield self._counter("spanda_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                            s.prefix_cache_hits)
        rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        yield self._gauge("spanda_prefix_cache_hit_rate",
                          "prefix_cache_hits / prefix_cache_queries since load", rate)
        yield self._counter("spanda_num_preemptions", "Sequences preempted (recomputed later)",
                            s.num_preemptions)


class Metrics:
    """All metrics of one app; ``render()`` gives the Prometheus text format."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.registry = CollectorRegistry()
        reg = self.registry
        self.http_requests = Counter("spanda_http_requests", "HTTP requests by path and status code",
                                     ["path", "status"], registry=reg)
        self.finished = Counter("spanda_request_finished", "Completions finished, by finish reason",
                                ["finish_reason"], registry=reg)
        self.prompt_tokens = Counter("spanda_prompt_tokens", "Prompt tokens of admitted requests",
                                     registry=reg)
        self.generation_tokens = Counter("spanda_generation_tokens", "Tokens generated for finished requests",
                                         registry=reg)
        self.ttft = Histogram("spanda_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=TTFT_BUCKETS, registry=reg)
        self.itl = Histogram("spanda_inter_token_latency_seconds",
                             "Time between two consecutive token deliveries of a request",
                             buckets=ITL_BUCKETS, registry=reg)
        self.e2e = Histogram("spanda_e2e_request_latency_seconds", "Time from arrival to the last token",
                             buckets=E2E_BUCKETS, registry=reg)
        reg.register(_EngineCollector(engine, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self, start: float | None = None) -> RequestTimer:
        """A timer for one HTTP request that arrived at ``start`` (time.monotonic(); default now)."""
        return RequestTimer(self, start)


class RequestTimer:
    """Latency bookkeeping of one HTTP request (which may hold several engine requests)."""

    def __init__(self, metrics: Metrics, start: float | None = None):
        self.m = metrics
        self.start = time.monotonic() if start is None else start
        self.last: float | None = None

    def observe(self, out: RequestOutput) -> None:
        """Call on each RequestOutput received."""
        now = time.monotonic()
        if any(c.token_ids for c in out.outputs):
            if self.last is None:
                self.m.ttft.observe(now - self.start)
            else:
                self.m.itl.observe(now - self.last)
            self.last = now
        for c in out.outputs:
            if c.finish_reason is not None:
                self.m.finished.labels(c.finish_reason).inc()
                self.m.generation_tokens.inc(len(c.token_ids))

    def done(self) -> None:
        self.m.e2e.observe(time.monotonic() - self.start)
