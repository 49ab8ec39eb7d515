"""Quantized builds on the GPU (``python -m pytest -m gpu``): the shipped model's GPTQ, AWQ, FP8 and INT8
SmoothQuant recipes calibrate on CUDA in bfloat16, pass the issue's perplexity gates against the unquantized
bfloat16 model measured on the GPU, and the artifacts serve on the GPU with their quantized kernels."""

from __future__ import annotations

import json

import pytest
import torch

from compiler.build import build
from compiler.recipe import load_recipe
from runtime import LLM, SamplingParams
from tests.conftest import REPO

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu on the device)"),
]

LIMITS = {"fp8": 0.01, "int8": 0.02, "gptq": 0.05, "awq": 0.05}


@pytest.fixture(scope="module")
def gpu_builds(tmp_path_factory):
    """method -> (artifact, eval.json, manifest), each built on first use (``-k fp8`` builds only that one)."""
    root = tmp_path_factory.mktemp("gpu-quant")
    out: dict = {}

    def get(method: str):
        if method not in out:
            r = load_recipe(REPO / f"recipes/spanda-py-{method}.yaml")
            r = r.model_copy(update={
                "model": r.model.model_copy(update={"source": str(REPO / r.model.source), "dtype": "bfloat16"}),
                "target": r.target.model_copy(update={"device": "cuda"}),
                "eval": r.eval.model_copy(update={"data": str(REPO / r.eval.data)}),
            })
            res = build(r, root / method)
            out[method] = (res.path, json.loads((res.path / "eval.json").read_text()), res.manifest)
        return out[method]

    return get


@pytest.mark.parametrize("method", list(LIMITS))
def test_gpu_calibrated_build_meets_its_gate_and_serves(gpu_builds, method):
    path, ev, manifest = gpu_builds(method)
    assert manifest["quantization"]["method"] == method
    assert ev["perplexity_increase"] <= LIMITS[method], (method, ev["perplexity"], ev["reference_perplexity"])
    assert ev["top1_agreement"] > 0.9
    llm = LLM(path, device="cuda")
    out = llm.generate(["def fibonacci(n):"], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 24
    # the served greedy continuation is the eval's model: its first token is the quantized logits' argmax
    ids = llm.engine.tokenizer.encode("def fibonacci(n):")
    assert out[0].outputs[0].token_ids[0] == int(llm.engine.compute_logits(ids)[-1].argmax())


@pytest.mark.parametrize("quant", [dict(method="rtn", bits=4, group_size=128),
                                   dict(method="rtn", bits=4, group_size=64, symmetric=False),
                                   dict(method="int8", activations="none"), dict(method="fp8"),
                                   dict(method="fp8", weight_scale="per_tensor")],
                         ids=["rtn4", "rtn4-asym-g64", "int8-weight-only", "fp8", "fp8-tensor"])
def test_gpu_build_quantizes_the_tensors_the_cpu_build_does(tmp_path_factory, quant):
    """RTN / FP8 / INT8 computed on the build's GPU: the same artifact tensors, bit for bit, as on the CPU. The
    4-bit group-128 build packs for the mma kernel on both (passes.wna16_mma would choose it on a Hopper GPU
    only), so its packing is compared too."""
    from safetensors.torch import load_file

    from tests.conftest import make_hf_checkpoint
    from tests.test_quantize_build import _recipe

    root = tmp_path_factory.mktemp("quant-device")
    ckpt = make_hf_checkpoint("llama", root / "hf", seed=6, hidden_size=128, intermediate_size=256)
    tensors = {}
    for device in ("cpu", "cuda"):
        r = _recipe(ckpt, **quant)
        mma = quant.get("bits") == 4 and quant.get("group_size") == 128
        r = r.model_copy(update={"target": r.target.model_copy(update={"device": device}),
                                 "passes": r.passes.model_copy(update={"wna16_mma": mma})})
        res = build(r, root / device)
        tensors[device] = {k: v for f in sorted(res.path.glob("weights-*.safetensors")) for k, v in
                           load_file(str(f)).items()}
    cpu, gpu = tensors["cpu"], tensors["cuda"]
    assert cpu.keys() == gpu.keys()

    def bits(t: torch.Tensor) -> torch.Tensor:  # E4M3 compared by its bytes
        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t

    differ = [k for k in cpu if not torch.equal(bits(cpu[k]), bits(gpu[k]))]
    assert not differ, f"tensors quantized differently on the GPU: {differ[:5]}"
