"""Shared fixtures: tiny random-weight Hugging Face checkpoints of each family, and artifacts built from them.

Checkpoints are made with ``transformers`` (the reference; a test dependency only) and a byte-level BPE
tokenizer trained in-process, so no test touches the network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tokenizer_fixture import train_tokenizer

VOCAB = 512
REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "tiny-llama.yaml"

COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
)

# name -> (transformers config class name, model class name, extra config)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama3-scaled-tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    # head_dim != hidden/heads, and a sliding window shorter than the longer test prompts.
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=24,
                                                            head_dim=32)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
}


def make_hf_checkpoint(family: str, out: Path, seed: int = 0, shards: bool | str = False, **overrides) -> Path:
    """Write a tiny random-weight checkpoint of ``family`` (a FAMILIES key) with a trained tokenizer;
    ``shards``: True for 100KB shards, or a size such as "64MB"."""
    import transformers

    cfg_name, model_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=shards if isinstance(shards, str) else "100KB" if shards else "2GB")
    train_tokenizer(out, vocab_size=VOCAB)
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(d, vocab_size=VOCAB)
    return d


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: make_hf_checkpoint(name, root / name) for name in FAMILIES}


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory, checkpoints) -> dict[str, Path]:
    """One artifact per family, built with the tiny recipe (all passes on)."""
    from compiler.build import build
    from compiler.recipe import load_recipe

    root = tmp_path_factory.mktemp("artifacts")
    recipe = load_recipe(TINY_RECIPE)
    return {name: build(recipe.with_model_source(ckpt), root / name).path for name, ckpt in checkpoints.items()}


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def run_under_interpreter(module: str, timeout: int = 600) -> None:
    """Run ``module._interpreter_main()`` in a subprocess with TRITON_INTERPRET=1 (Triton kernels on the CPU);
    it must print "interpreter ok"."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = f"from {module} import _interpreter_main as m; m()"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0 and "interpreter ok" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]


class KernelLaunches:
    """Counts the launches of a Triton kernel while it stands in for the module attribute a launcher reads:
    ``with KernelLaunches(module, "name") as k: ...; k.n``. Works on the GPU and under the interpreter."""

    def __init__(self, module, name: str):
        self.module, self.name, self.n = module, name, 0

    def __enter__(self):
        self.kernel = getattr(self.module, self.name)
        setattr(self.module, self.name, self)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.kernel)

    def __getitem__(self, grid):
        self.n += 1
        return self.kernel[grid]


def cuda_kernel_names(step) -> str:
    """The names of the CUDA kernels one call of ``step()`` launches, space-separated (torch profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return " ".join(e.name for e in prof.events())


def capture_graph(step):
    """Run ``step()`` once on a side stream (Triton compiles, ops pick their modes: nothing of that may happen
    inside a capture), then capture it in a CUDA graph. Returns (graph, the captured call's outputs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    return graph, outs
