"""``spanda bench``: offline (an artifact, through the engine loop) or online (any OpenAI-compatible server).

Workload: a JSON-lines file of ``{"prompt_token_ids" | "prompt": ..., "max_tokens": N}`` or synthetic
lengths. ``synthetic_workload`` reproduces the peer baseline in ../shared/bench/hf_baseline.py exactly:
a torch.Generator seeded with 0 draws, for each request, a prompt length in [64, 512) and then that many
token ids in [100, 1000); 128 new tokens each, EOS ignored.

Metrics: output and total token throughput; time to first token (TTFT), time per output token after the
first (TPOT, per request), inter-token latency (ITL), end-to-end latency; mean and p50/p90/p99.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from runtime.jsonl import jsonl_rows


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass
class RequestTiming:
    """Times are seconds since the request was sent; ``token_times`` one per output token."""

    num_prompt_tokens: int
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.token_times[0]

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None

    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def synthetic_workload(num_requests: int = 256, input_len: tuple[int, int] = (64, 512), output_len: int = 128,
                       seed: int = 0, token_range: tuple[int, int] = (100, 1000)) -> list[BenchRequest]:
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _ in range(num_requests):
        n = int(torch.randint(input_len[0], input_len[1], (1,), generator=g))
        ids = torch.randint(token_range[0], token_range[1], (n,), generator=g).tolist()
        reqs.append(BenchRequest(ids, output_len))
    return reqs


def load_workload(path: str | Path, encode) -> list[BenchRequest]:
    reqs = []
    for n, row in jsonl_rows(path):
        ids = row.get("prompt_token_ids") or encode(row["prompt"])
        if "max_tokens" not in row:
            raise ValueError(f"{path}:{n}: every request needs max_tokens")
        reqs.append(BenchRequest(list(ids), int(row["max_tokens"])))
    return reqs


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    xs = sorted(values)

    def pct(p: float) -> float:
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

    return {"mean": statistics.fmean(xs), "p50": pct(50), "p90": pct(90), "p99": pct(99)}


def summarize(timings: list[RequestTiming], wall: float, extra: dict | None = None) -> dict:
    out_tokens = sum(len(t.token_times) for t in timings)
    in_tokens = sum(t.num_prompt_tokens for t in timings)
    return {
        **(extra or {}),
        "num_requests": len(timings),
        "wall_seconds": wall,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / wall,
        "total_tokens_per_s": (in_tokens + out_tokens) / wall,
        "requests_per_s": len(timings) / wall,
        "ttft_s": _stats([t.ttft for t in timings if t.token_times]),
        "tpot_s": _stats([x for t in timings if (x := t.tpot) is not None]),
        "itl_s": _stats([x for t in timings for x in t.itls()]),
        "e2e_s": _stats([t.token_times[-1] for t in timings if t.token_times]),
    }


def run_offline(engine, requests: list[BenchRequest], max_concurrency: int | None = None,
                progress=None) -> dict:
    """All requests through one engine's step loop; at most ``max_concurrency`` in flight (None = all)."""
    from runtime.sampling_params import SamplingParams

    timings: dict[str, RequestTiming] = {}
    sent: dict[str, float] = {}
    pending = list(enumerate(requests))[::-1]
    limit = max_concurrency or len(requests)
    in_flight = 0
    t0 = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        while pending and in_flight < limit:
            i, r = pending.pop()
            rid = f"bench-{i}"
            engine.add_request(rid, r.prompt_token_ids,
                               SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True))
            timings[rid] = RequestTiming(len(r.prompt_token_ids))
            sent[rid] = time.perf_counter()
            in_flight += 1
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            t = timings[o.request_id]
            for _ in range(len(o.outputs[0].token_ids) - len(t.token_times)):
                t.token_times.append(now - sent[o.request_id])
            if o.finished:
                in_flight -= 1
                if progress:
                    progress(1)
    wall = time.perf_counter() - t0
    return summarize(list(timings.values()), wall, {"mode": "offline", "max_concurrency": max_concurrency})


def format_table(results: list[dict]) -> str:
    head = f"{'concurrency':>11} {'req':>5} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} " \
           f"{'TPOT p99':>9} {'ITL p50':>8}"
    rows = [head]
    for r in results:
        def ms(key: str, pct: str, r: dict = r) -> float:
            return 1000 * r[key].get(pct, float("nan"))

        rows.append(f"{str(r.get('max_concurrency') or r.get('request_rate') or 'all'):>11} {r['num_requests']:>5} "
                    f"{r['output_tokens_per_s']:>10.1f} {ms('ttft_s', 'p50'):>8.1f}m {ms('ttft_s', 'p99'):>8.1f}m "
                    f"{ms('tpot_s', 'p50'):>8.2f}m {ms('tpot_s', 'p99'):>8.2f}m {ms('itl_s', 'p50'):>7.2f}m")
    return "\n".join(rows)


def plot(results: list[dict], path: str | Path) -> bool:
    """Latency-throughput plot (output tok/s vs TPOT p50, one point per load level). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["output_tokens_per_s"] for r in results]
    ys = [1000 * r["tpot_s"].get("p50", float("nan")) for r in results]
    ax.plot(xs, ys, marker="o")
    for r, x, y in zip(results, xs, ys):
        ax.annotate(str(r.get("max_concurrency") or r.get("request_rate") or "all"), (x, y))
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel("TPOT p50 (ms)")
    ax.set_title("latency vs throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def to_json(results: list[dict], meta: dict) -> str:
    return json.dumps({"meta": meta, "results": results}, indent=2, default=lambda o: asdict(o))


async def _one_online(client, url: str, model: str, req: BenchRequest, headers: dict) -> RequestTiming:
    body = {"model": model, "prompt": req.prompt_token_ids, "max_tokens": req.max_tokens, "temperature": 0.0,
            "stream": True, "ignore_eos": True}
    timing = RequestTiming(len(req.prompt_token_ids))
    t0 = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"server answered {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                timing.token_times.append(time.perf_counter() - t0)
    return timing


async def run_online(url: str, model: str, requests: list[BenchRequest], max_concurrency: int | None = None,
                     request_rate: float | None = None, api_key: str | None = None, seed: int = 0,
                     progress=None) -> dict:
    """Stream every request from an OpenAI-compatible server. Arrivals: Poisson at ``request_rate`` req/s
    (None = all at once), at most ``max_concurrency`` in flight. Token times are counted per text chunk."""
    import asyncio
    import random

    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(max_concurrency or len(requests))
    rng = random.Random(seed)

    async def guarded(client, r):
        async with sem:
            t = await _one_online(client, url.rstrip("/"), model, r, headers)
            if progress:
                progress(1)
            return t

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        tasks = []
        for r in requests:
            tasks.append(asyncio.create_task(guarded(client, r)))
            if request_rate:
                await asyncio.sleep(rng.expovariate(request_rate))
        timings = await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    return summarize(timings, wall, {"mode": "online", "url": url, "max_concurrency": max_concurrency,
                                     "request_rate": request_rate})
