"""Quantized builds end to end on CPU: recipe -> quantization pass -> artifact -> engine logits, compared with
transformers running the same checkpoint with its linear layers quantized by the test itself (weights
dequantized into the HF model; activation quantization emulated with forward pre-hooks)."""

from __future__ import annotations

import json

import pytest
import torch

from compiler.build import AccuracyGateError, build
from compiler.quantize.packing import dequantize
from compiler.quantize.rtn import quantize_rtn
from compiler.recipe import load_recipe
from runtime.config import EngineOptions
from runtime.engine import LLMEngine
from tests.conftest import TINY_RECIPE, make_hf_checkpoint

PROMPT = [1, 17, 300, 42, 99, 7, 250, 11, 64, 128, 5, 400, 33, 2, 90, 91, 92]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # hidden 128 / FFN 256 so that group size 128 divides every linear's input
    return make_hf_checkpoint("llama", tmp_path_factory.mktemp("qhf") / "llama", seed=3, hidden_size=128,
                              intermediate_size=256)


def _recipe(ckpt, **quant):
    r = load_recipe(TINY_RECIPE).with_model_source(ckpt)
    return r.model_copy(update={"quantization": r.quantization.model_copy(update=quant)})


def _hf(ckpt):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def _linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]


def _fake_quant_fp8_rows(x):
    s = (x.abs().amax(-1, keepdim=True) / 448.0).clamp_min(1e-12)
    return (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s


def _fake_quant_int8_rows(x):
    s = (x.abs().amax(-1, keepdim=True) / 127.0).clamp_min(1e-12)
    return torch.round(x / s).clamp(-127, 127) * s


def _reference_logits(ckpt, method):
    model = _hf(ckpt)
    with torch.no_grad():
        for _, m in _linears(model):
            w = m.weight.float()
            if method == "rtn":
                q = quantize_rtn(w, 4, 128, True, scale_dtype=torch.float32)  # a float32 model stores float32 scales
                m.weight.copy_(dequantize(q.q, q.z, q.s, q.g_idx))
            elif method == "rtn8-asym-g64":
                q = quantize_rtn(w, 8, 64, False, scale_dtype=torch.float32)
                m.weight.copy_(dequantize(q.q, q.z, q.s, q.g_idx))
            elif method == "fp8":
                m.weight.copy_(_fake_quant_fp8_rows(w))  # per output channel = per row of W
                m.register_forward_pre_hook(lambda mod, args: (_fake_quant_fp8_rows(args[0]),))
            elif method == "int8":
                m.weight.copy_(_fake_quant_int8_rows(w))
                m.register_forward_pre_hook(lambda mod, args: (_fake_quant_int8_rows(args[0]),))
        return model(torch.tensor([PROMPT])).logits[0]


def _artifact_logits(path):
    engine = LLMEngine(path, EngineOptions(device="cpu"))
    return engine.compute_logits(PROMPT)


@pytest.mark.parametrize("method,quant", [
    ("rtn", dict(method="rtn", bits=4, group_size=128)),
    ("rtn8-asym-g64", dict(method="rtn", bits=8, group_size=64, symmetric=False)),
    ("fp8", dict(method="fp8")),
    ("int8", dict(method="int8", smoothquant_alpha=None)),
])
def test_quantized_build_matches_transformers_with_the_same_quantization(ckpt, tmp_path, method, quant):
    res = build(_recipe(ckpt, **quant), tmp_path / method)
    ours = _artifact_logits(res.path)
    ref = _reference_logits(ckpt, method)
    with torch.no_grad():
        unquantized = _hf(ckpt)(torch.tensor([PROMPT])).logits[0]
    err = (ours - ref).abs().max().item()
    damage = (unquantized - ref).abs().max().item()
    # Same arithmetic up to float32 summation order: orders of magnitude below what quantization changes.
    assert err < 1e-3, (method, err)
    assert damage > 50 * err, (method, damage, err)
    q = res.manifest["quantization"]
    assert q["method"] == quant["method"] and q["linears"] == 2 * 4  # qkv, o, gate_up, down per layer
    assert "lm_head" in q["unquantized"]


def test_weight_only_int8_and_act_order_free_defaults_record_the_scheme(ckpt, tmp_path):
    res = build(_recipe(ckpt, method="int8", activations="none"), tmp_path / "w8a16")
    q = res.manifest["quantization"]
    assert (q["op"], q["bits"], q["group_size"]) == ("linear_wna16", 8, -1)
    from safetensors import safe_open

    names = set()
    for f in res.manifest["weights"]["files"]:
        with safe_open(str(res.path / f), "pt") as sf:
            names |= set(sf.keys())
    assert "model.layers.0.self_attn.qkv_proj.qweight" in names
    assert not any(n.endswith("qkv_proj.weight") for n in names)
    assert "lm_head.weight" in names  # left in the model dtype


def test_accuracy_gate_fails_the_build_with_figures_and_leaves_no_artifact(ckpt, tmp_path):
    data = tmp_path / "eval.jsonl"
    g = torch.Generator().manual_seed(0)
    data.write_text("".join(json.dumps({"token_ids": torch.randint(3, 512, (40,), generator=g).tolist()}) + "\n"
                            for _ in range(3)))
    r = _recipe(ckpt, method="rtn", bits=4, group_size=128)
    ok = r.model_copy(update={"eval": r.eval.model_copy(update={"data": str(data), "max_perplexity_increase": 10.0})})
    res = build(ok, tmp_path / "ok")
    ev = json.loads((res.path / "eval.json").read_text())
    assert ev["reference"] == "unquantized source" and 0 < ev["top1_agreement"] <= 1 and ev["mean_kl"] > 0
    assert ev["perplexity_increase"] == pytest.approx(ev["perplexity"] / ev["reference_perplexity"] - 1)

    strict = ok.model_copy(update={"eval": ok.eval.model_copy(update={"max_perplexity_increase": None,
                                                                      "min_top1_agreement": 1.0,
                                                                      "max_mean_kl": 0.0})})
    with pytest.raises(AccuracyGateError, match=r"top-1 agreement .* below eval.min_top1_agreement 1.0") as e:
        build(strict, tmp_path / "strict")
    assert "eval.max_mean_kl" in str(e.value) and "perplexity" in str(e.value)
    assert not (tmp_path / "strict").exists()
    assert not list(tmp_path.glob(".spanda-*"))  # scratch and reference temp dirs are gone


# ---------------------------------------------------------------- pre-quantized Hugging Face checkpoints


def _quantized_checkpoint(src, out, fmt):
    """Copy ``src`` with every decoder-layer linear stored as ``fmt`` (gptq v1 with desc_act, awq, fp8 static);
    returns the float weights the stored codes stand for (computed here, from the codes)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from compiler.quantize.packing import pack_awq, pack_gptq

    shutil.copytree(src, out)
    state = load_file(str(out / "model.safetensors"))
    stands_for, perms = {}, {}
    g = torch.Generator().manual_seed(5)
    for name in [n for n in state if ".layers." in n and n.endswith("_proj.weight")]:
        p, w = name[: -len(".weight")], state.pop(name).float()
        n, k = w.shape
        if fmt == "gptq":  # act-order: group of input channel perm[j] is j // 64; one order per shared input
            shared = p.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
            perm = perms.setdefault(shared, torch.randperm(k, generator=g))
            g_idx = torch.empty(k, dtype=torch.int32)
            g_idx[perm] = (torch.arange(k) // 64).int()
            ql = quantize_rtn(w[:, perm], 4, 64, True)
            q = torch.empty_like(ql.q)
            q[perm] = ql.q
            qw, qz = pack_gptq(q, ql.z, 4, "gptq")
            state |= {f"{p}.qweight": qw, f"{p}.qzeros": qz, f"{p}.scales": ql.s, f"{p}.g_idx": g_idx}
            stands_for[name] = dequantize(q, ql.z, ql.s, g_idx)
        elif fmt == "awq":
            ql = quantize_rtn(w, 4, 64, False)
            qw, qz = pack_awq(ql.q, ql.z)
            state |= {f"{p}.qweight": qw, f"{p}.qzeros": qz, f"{p}.scales": ql.s}
            stands_for[name] = dequantize(ql.q, ql.z, ql.s, ql.g_idx)
        else:  # fp8, per-tensor weight scale, static input scale
            scale = w.abs().max() / 448
            w8 = (w / scale).to(torch.float8_e4m3fn)
            state |= {name: w8, f"{p}.weight_scale": scale.reshape(()), f"{p}.input_scale": torch.tensor(0.02)}
            stands_for[name] = w8.float() * scale
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True, "sym": True},
        "awq": {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 64, "zero_point": True},
        "fp8": {"quant_method": "fp8", "activation_scheme": "static"},
    }[fmt]
    (out / "config.json").write_text(json.dumps(cfg))
    return stands_for


@pytest.mark.parametrize("fmt", ["gptq", "awq", "fp8"])
def test_build_from_a_prequantized_checkpoint_matches_its_dequantized_weights(ckpt, tmp_path, fmt):
    stands_for = _quantized_checkpoint(ckpt, tmp_path / "src", fmt)
    res = build(_recipe(tmp_path / "src", method="none"), tmp_path / "art")
    q = res.manifest["quantization"]
    assert q["source_format"].startswith(fmt) and q["linears"] == 8
    model = _hf(ckpt)  # the float model with the stored codes' weights put in
    with torch.no_grad():
        for name, w in stands_for.items():
            model.get_parameter(name).copy_(w)
        if fmt == "fp8":  # static activation scale 0.02, as the checkpoint says
            for _, m in _linears(model):
                m.register_forward_pre_hook(lambda mod, a: ((a[0] / 0.02).clamp(-448, 448)
                                                            .to(torch.float8_e4m3fn).float() * 0.02,))
        ref = model(torch.tensor([PROMPT])).logits[0]
    err = (_artifact_logits(res.path) - ref).abs().max().item()
    assert err < 1e-3, err


def test_requantizing_a_quantized_checkpoint_is_refused(ckpt, tmp_path):
    _quantized_checkpoint(ckpt, tmp_path / "src", "awq")
    with pytest.raises(ValueError, match=r"already quantized \(awq\).*quantization.method is 'rtn'"):
        build(_recipe(tmp_path / "src", method="rtn"), tmp_path / "art")
    assert not (tmp_path / "art").exists()
