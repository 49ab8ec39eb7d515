"""GPU path (run on a CUDA machine with `python -m pytest -m gpu`): the same artifacts on the GPU give
transformers' tokens and logits on the GPU."""

from __future__ import annotations

import pytest
import torch

from runtime import LLM, SamplingParams
from tests.conftest import FAMILIES, load_hf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu on the device)"),
]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gpu_greedy_and_logits_match_transformers(family, artifacts_dir, checkpoints):
    hf = load_hf(checkpoints[family]).cuda()
    hf.generation_config.eos_token_id = None
    llm = LLM(artifacts_dir[family], device="cuda")
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, 500, (n,), generator=g).tolist() for n in (9, 47, 30)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids], device="cuda"), max_new_tokens=32, do_sample=False,
                              pad_token_id=0)
            ref_logits = hf(torch.tensor([ids], device="cuda")).logits[0].float().cpu()
        assert out.outputs[0].token_ids == ref[0, len(ids):].tolist()
        torch.testing.assert_close(llm.engine.compute_logits(ids), ref_logits, atol=1e-3, rtol=1e-3)
    assert llm.engine.runner.kv_caches[0].is_cuda


def test_gpu_batch_with_preemption_matches_alone(artifacts_dir):
    path = artifacts_dir["qwen2"]
    g = torch.Generator().manual_seed(1)
    prompts = [[1] + torch.randint(3, 500, (n,), generator=g).tolist() for n in range(10, 90, 8)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    alone = LLM(path, device="cuda")
    expected = [alone.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    tight = LLM(path, device="cuda", kv_cache_blocks=14, max_num_batched_tokens=32)
    assert [o.outputs[0].token_ids for o in tight.generate(prompts, params)] == expected
    assert tight.engine.scheduler.num_preemptions > 0


def _tiny_bf16_build(checkpoints, out, quant_method: str | None = None):
    """The tiny llama recipe in bfloat16 (quantized by ``quant_method`` if given), built to ``out``."""
    from compiler.build import build
    from compiler.recipe import load_recipe
    from tests.conftest import TINY_RECIPE

    recipe = load_recipe(TINY_RECIPE).with_model_source(checkpoints["llama"])
    update = {"model": recipe.model.model_copy(update={"dtype": "bfloat16"})}
    if quant_method:
        update["quantization"] = recipe.quantization.model_copy(update={"method": quant_method})
    return build(recipe.model_copy(update=update), out).path


@pytest.fixture(scope="module")
def bf16_artifact(checkpoints, tmp_path_factory):
    return _tiny_bf16_build(checkpoints, tmp_path_factory.mktemp("bf16") / "art")


def test_cuda_graph_replay_gives_the_eager_tokens(bf16_artifact):
    g = torch.Generator().manual_seed(2)
    prompts = [[1] + torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 17, 33, 64, 90)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    eager = LLM(bf16_artifact, device="cuda", cuda_graphs=False)
    graphed = LLM(bf16_artifact, device="cuda")
    assert graphed.engine.runner.graphs is not None
    for batch in (prompts[:1], prompts[:3], prompts):  # buckets 1, 4 (padded) and 8 (padded)
        want = [o.outputs[0].token_ids for o in eager.generate(batch, params)]
        got = [o.outputs[0].token_ids for o in graphed.generate(batch, params)]
        assert got == want
    assert graphed.engine.runner.graphs.num_replays > 0


def test_async_scheduling_gives_the_same_tokens(bf16_artifact):
    """EngineOptions.async_scheduling on the GPU (CUDA graphs, the pinned copy and its event): the tokens of
    the synchronous engine, sequences finishing at different steps, greedy and seeded sampling."""
    g = torch.Generator().manual_seed(3)
    prompts = [[1] + torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 17, 33, 64, 90)]
    sync = LLM(bf16_artifact, device="cuda", async_scheduling=False)  # the default on a GPU is async
    ahead = LLM(bf16_artifact, device="cuda", async_scheduling=True)
    for params in ([SamplingParams(temperature=0.0, max_tokens=8 + 5 * i, ignore_eos=True) for i in range(5)],
                   [SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=20, ignore_eos=True)
                    for i in range(5)]):
        want = [o.outputs[0].token_ids for o in sync.generate(prompts, params)]
        assert [o.outputs[0].token_ids for o in ahead.generate(prompts, params)] == want
    assert ahead.engine.num_steps_ahead > 0 and ahead.engine.runner.graphs.num_replays > 0
    assert LLM(bf16_artifact, device="cuda").engine.async_scheduling  # the default on a GPU


@pytest.fixture(scope="module")
def fp8_artifact(checkpoints, tmp_path_factory):
    return _tiny_bf16_build(checkpoints, tmp_path_factory.mktemp("fp8") / "art", "fp8")


@pytest.mark.parametrize("extra", ["none", "early", "trigger"])
@pytest.mark.parametrize("which", ["bf16", "fp8"])
def test_programmatic_dependent_launch_gives_the_same_tokens(which, extra, request, monkeypatch):
    """Programmatic dependent launch (runtime/ops/pdl.py): by default the Triton kernels of the decode graphs of
    up to AUTO_MAX_BATCH sequences of a quantized model (its linears Triton GEMMs; none of a bf16 one), with
    SPANDA_PDL=1 every Triton kernel, launch with PDL, each waiting for the previous kernel first thing (with
    ``early``: RoPE + KV write and decode attention read the step's inputs, tables and earlier steps' KV before
    that wait, their EARLY_LOADS; with ``trigger``: every kernel lets the next one launch before its wait,
    pdl.TRIGGER 3); the tokens of ordinary launches (SPANDA_PDL=0) either way."""
    from runtime.ops import pdl

    for mod in ("triton_decode", "triton_rope_cache"):
        monkeypatch.setattr(f"runtime.ops.{mod}.EARLY_LOADS", extra == "early")
    monkeypatch.setattr(pdl, "TRIGGER", 3 if extra == "trigger" else 1)

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90 or later")
    artifact = request.getfixturevalue(f"{which}_artifact")
    g = torch.Generator().manual_seed(4)
    prompts = [[1] + torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 17, 33, 64, 90)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    launches = {"pdl": 0, "plain": 0}
    real = pdl.launch_kwargs

    def counted(device):
        kw = real(device)
        launches["pdl" if kw else "plain"] += 1
        return kw

    for mod in ("triton_gemm", "triton_wna16", "triton_wna16_mma", "triton_act_quant", "triton_w8a8",
                "triton_elementwise", "triton_decode", "triton_rope_cache"):
        monkeypatch.setattr(f"runtime.ops.{mod}.launch_kwargs", counted)
    auto = pdl.AUTO_MAX_BATCH
    if auto < 1 or pdl.ENABLED:
        pytest.skip("SPANDA_PDL is set: the default is under test")
    pdl.AUTO_MAX_BATCH = 0  # SPANDA_PDL=0
    try:
        want = [o.outputs[0].token_ids for o in LLM(artifact, device="cuda").generate(prompts, params)]
        assert launches["pdl"] == 0 and launches["plain"] > 0
        for enabled, max_batch in ((False, auto), (True, 0)):  # the default, then SPANDA_PDL=1
            pdl.ENABLED, pdl.AUTO_MAX_BATCH = enabled, max_batch
            launches.update(pdl=0, plain=0)
            llm = LLM(artifact, device="cuda")
            default_pdl = which != "bf16"
            assert llm.engine.runner.graphs.pdl_max_batch == (auto if default_pdl and not enabled else 0)
            assert (launches["pdl"] > 0) == (enabled or default_pdl)
            assert launches["plain"] > 0 or enabled  # the default leaves prefill and the larger buckets plain
            assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want
            assert llm.engine.runner.graphs.num_replays > 0
    finally:
        pdl.ENABLED, pdl.AUTO_MAX_BATCH = False, auto


def test_a_second_build_in_one_process_ships_every_kernel_too(bf16_artifact, checkpoints, tmp_path):
    """Kernels the process compiled before a build (an earlier build here; a GPU calibration, other tests) are
    compiled again into the new artifact's cache (compiler.kernels.forget_compiled_kernels), not launched from
    memory and left out of it."""
    from artifacts.store import open_artifact
    from compiler.build import build
    from compiler.recipe import load_recipe
    from runtime.kernel_cache import count_kernels
    from tests.conftest import TINY_RECIPE

    recipe = load_recipe(TINY_RECIPE).with_model_source(checkpoints["llama"])
    recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"dtype": "bfloat16"})})
    again = build(recipe, tmp_path / "again").path
    first, second = open_artifact(bf16_artifact).manifest.kernels, open_artifact(again).manifest.kernels
    assert first.num_kernels > 0 and second.num_kernels == first.num_kernels
    assert count_kernels(again / "kernels") == second.num_kernels


def test_cold_start_compiles_no_kernel(bf16_artifact):
    """The build tuned and compiled every kernel for this GPU: a fresh process loads, captures its graphs,
    prefills and decodes without a single Triton compilation."""
    import json
    import subprocess
    import sys

    from artifacts.store import open_artifact

    m = open_artifact(bf16_artifact).manifest
    assert m.kernels is not None and m.kernels.num_kernels > 0 and "tuning.json" in m.files
    script = f"""
import json, torch
from runtime import LLM, SamplingParams
llm = LLM({str(bf16_artifact)!r}, device="cuda")
g = torch.Generator().manual_seed(5)
prompts = [[1] + torch.randint(3, 500, (n,), generator=g).tolist() for n in (3, 20, 50, 130)]
llm.generate(prompts, SamplingParams(temperature=0.7, max_tokens=12, ignore_eos=True, seed=1))
llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
print(json.dumps({{"new": llm.engine.kernels.new_compilations(), "at_load": llm.engine.kernels.at_load,
                  "replays": llm.engine.runner.graphs.num_replays}}))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["at_load"] == m.kernels.num_kernels and res["replays"] > 0
    assert res["new"] == 0, f"{res['new']} kernels were compiled at run time"
