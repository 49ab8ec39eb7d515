"""spanda bench: the peer workload definition, offline runs through the engine, online runs against a server."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn) is not installed here")

import json

import torch
from click.testing import CliRunner

from runtime.config import EngineOptions
from runtime.engine import LLMEngine
from runtime.server import AsyncEngine, create_app
from spanda import bench as B
from spanda.cli import main
from tests.server_fixture import LiveServer


def test_synthetic_workload_is_the_peer_baseline_workload():
    # The exact expression of ../shared/bench/hf_baseline.py (the Hugging Face continuous-batching figure).
    g = torch.Generator().manual_seed(0)
    ref = [torch.randint(100, 1000, (int(torch.randint(64, 512, (1,), generator=g)),), generator=g).tolist()
           for _ in range(256)]
    ours = B.synthetic_workload()
    assert [r.prompt_token_ids for r in ours] == ref
    assert all(r.max_tokens == 128 for r in ours)


@pytest.mark.parametrize("extra", [[], ["--async-scheduling"]], ids=["sync", "async"])
def test_offline_bench_counts_every_token(artifacts_dir, tmp_path, extra):
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(main, ["bench", str(artifacts_dir["llama"]), "--num-requests", "12", "--input-len",
                                  "8:40", "--output-len", "6", "--seed", "3", "--token-range", "3:500",
                                  "--concurrency", "4,12", "--device", "cpu", "--out", str(out), *extra])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert [x["max_concurrency"] for x in data["results"]] == [4, 12]
    for res in data["results"]:
        assert res["num_requests"] == 12 and res["output_tokens"] == 12 * 6
        assert res["ttft_s"]["p50"] <= res["e2e_s"]["p50"] and res["tpot_s"]["mean"] > 0
    assert "out tok/s" in r.output


def test_offline_timings_are_per_token(artifacts_dir):
    engine = LLMEngine(artifacts_dir["llama"], EngineOptions(device="cpu"))
    reqs = B.synthetic_workload(5, (5, 20), 7, seed=1, token_range=(3, 500))
    res = B.run_offline(engine, reqs, max_concurrency=2)
    assert res["output_tokens"] == 35 and res["input_tokens"] == sum(len(r.prompt_token_ids) for r in reqs)
    assert res["itl_s"]["p50"] > 0


def test_online_bench_against_a_live_server(artifacts_dir):
    engine = AsyncEngine(lambda: LLMEngine(artifacts_dir["llama"], EngineOptions(device="cpu")), max_queue=64)
    with LiveServer(create_app(engine, "tiny")) as live:
        r = CliRunner().invoke(main, ["bench", "--url", live.url, "--num-requests", "8", "--input-len", "8:30",
                                      "--output-len", "5", "--concurrency", "4", "--request-rate", "50",
                                      "--token-range", "3:500"])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert any(line.split()[:2] == ["4", "8"] for line in lines), r.output
