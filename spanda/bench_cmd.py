"""The ``spanda bench`` command (see spanda/bench.py for the workload and metric definitions)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click

log = logging.getLogger("spanda.bench")


def _levels(text: str | None) -> list[float | None]:
    return [float(x) for x in text.split(",")] if text else [None]


@click.command(name="bench")
@click.argument("artifact", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--url", help="Benchmark a running OpenAI-compatible server instead of an artifact.")
@click.option("--model", "model_name", help="Model name to send with --url (default: the server's first).")
@click.option("--api-key", envvar="SPANDA_API_KEY")
@click.option("--workload", type=click.Path(exists=True, dir_okay=False),
              help='JSON lines {"prompt_token_ids" or "prompt", "max_tokens"}; default: synthetic.')
@click.option("--num-requests", default=256, show_default=True)
@click.option("--input-len", default="64:512", show_default=True, help="Synthetic prompt lengths lo:hi.")
@click.option("--output-len", default=128, show_default=True)
@click.option("--token-range", default="100:1000", show_default=True,
              help="Synthetic prompt token ids are drawn from lo:hi (the peer baseline's range).")
@click.option("--seed", default=0, show_default=True)
@click.option("--concurrency", help="Comma-separated max in-flight levels, e.g. 1,8,64 (default: all at once).")
@click.option("--request-rate", help="Comma-separated Poisson arrival rates in req/s (online only).")
@click.option("--device", default=None)
@click.option("--async-scheduling/--no-async-scheduling", default=None,
              help="Launch each decode step before the previous step's tokens reach the host (EngineOptions; "
                   "default: on a GPU).")
@click.option("--out", "out_json", type=click.Path(dir_okay=False), help="Write the results as JSON.")
@click.option("--plot", "plot_png", type=click.Path(dir_okay=False), help="Write a latency-throughput PNG.")
def bench(artifact, url, model_name, api_key, workload, num_requests, input_len, output_len, token_range, seed,
          concurrency, request_rate, device, async_scheduling, out_json, plot_png) -> None:
    """Measure throughput and latency of ARTIFACT (offline) or of the server at --url (online)."""
    from tqdm import tqdm

    from spanda import bench as B

    if bool(artifact) == bool(url):
        raise click.UsageError("give either ARTIFACT (offline) or --url (online)")
    lo, hi = (int(x) for x in input_len.split(":"))
    tok_range = tuple(int(x) for x in token_range.split(":"))
    engine = None
    if artifact:
        from runtime.config import EngineOptions
        from runtime.engine import LLMEngine

        engine = LLMEngine(artifact, EngineOptions(device=device, async_scheduling=async_scheduling))
        encode = engine.tokenizer.encode
    else:
        encode = None
    reqs = B.load_workload(workload, encode) if workload else B.synthetic_workload(num_requests, (lo, hi),
                                                                                   output_len, seed, tok_range)
    if url and not model_name:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        model_name = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=30, headers=headers).json()["data"][0]["id"]
    results = []
    for c in _levels(concurrency):
        for rate in (_levels(request_rate) if url else [None]):
            conc = int(c) if c else None
            with tqdm(total=len(reqs), desc=f"bench c={conc or 'all'} rate={rate or 'inf'}", unit="req") as bar:
                if engine is not None:
                    r = B.run_offline(engine, reqs, conc, bar.update)
                else:
                    r = asyncio.run(B.run_online(url, model_name, reqs, conc, rate, api_key, seed, bar.update))
            results.append(r)
    click.echo(B.format_table(results))
    meta = {"artifact": artifact, "url": url, "model": model_name, "num_requests": len(reqs),
            "workload": workload or f"synthetic seed={seed} input={lo}:{hi} output={output_len}"}
    if engine is not None:
        import torch

        meta["device"] = torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu"
    if out_json:
        Path(out_json).write_text(B.to_json(results, meta) + "\n")
    if plot_png and not B.plot(results, plot_png):
        log.warning("matplotlib is not installed: no plot written (pip install matplotlib)")
    if out_json:
        click.echo(f"wrote {out_json}")
