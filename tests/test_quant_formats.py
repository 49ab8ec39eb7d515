"""Reading quantized Hugging Face checkpoints (GPTQ v1/v2, AWQ GEMM, FP8, compressed-tensors) into the internal
layouts, and writing compressed-tensors checkpoints (compiler/quantize/hf_formats.py, compiler/export_hf.py).

Every checkpoint here is made by hand from explicit integer codes, zero points and scales; the expected output
is ``x @ W.T`` with ``W`` dequantized from those codes in this file, independently of the readers.
"""

from __future__ import annotations

import pytest
import torch

import runtime.ops  # noqa: F401  (registers torch.ops.spanda.*)
from compiler.quantize import hf_formats as hf
from compiler.quantize.packing import pack_awq, pack_gptq

spanda = torch.ops.spanda
K = 64
OUTS = {"q_proj": 32, "k_proj": 16, "v_proj": 16}
PFX = "model.layers.0.self_attn"


# ---------------------------------------------------------------- hand-made codes and references


def codes(n: int, k: int, bits: int, gs: int, seed: int, sym: bool, g_idx: torch.Tensor | None = None):
    """(q [K, N], z [G, N], s [G, N] float32, g_idx [K]) with explicit random codes."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if gs == -1 else k // gs
    q = torch.randint(0, 2**bits, (k, n), generator=g, dtype=torch.int32)
    z = (torch.full((groups, n), 2 ** (bits - 1), dtype=torch.int32) if sym
         else torch.randint(0, 2**bits, (groups, n), generator=g, dtype=torch.int32))
    s = (torch.rand(groups, n, generator=g) * 0.02 + 0.005).half().float()
    if g_idx is None:
        g_idx = torch.arange(k, dtype=torch.int32) // (k if gs == -1 else gs)
    return q, z, s, g_idx


def dequant(q, z, s, g_idx) -> torch.Tensor:
    """W [N, K] written out element by element from the definition W[n, i] = (q[i, n] - z[g, n]) * s[g, n]."""
    k, n = q.shape
    w = torch.empty(n, k)
    for i in range(k):
        g = int(g_idx[i])
        w[:, i] = (q[i].float() - z[g].float()) * s[g]
    return w


def x_in(t: int = 5, seed: int = 7) -> torch.Tensor:
    return torch.randn(t, K, generator=torch.Generator().manual_seed(seed))


def run_op(op: str, tensors: dict, x: torch.Tensor, bits: int = 4, group_size: int = -1) -> torch.Tensor:
    if op == "linear_wna16":
        return spanda.linear_wna16(x, tensors["qweight"], tensors["scales"], tensors["zeros"], tensors.get("perm"),
                                   None, bits, group_size)
    fn = spanda.linear_fp8 if op == "linear_fp8" else spanda.linear_int8
    return fn(x, tensors["weight"], tensors["weight_scale"], tensors.get("input_scale"), None)


def run_site(ckpt: dict, prefixes: list[str], sq, x: torch.Tensor) -> torch.Tensor:
    op, t = hf.read_site(ckpt.__getitem__, prefixes, sq, torch.float32)
    return run_op(op, t, x, **hf.site_params(prefixes, sq))


def fp8_act(x: torch.Tensor, input_scale: float | None) -> torch.Tensor:
    """x as the FP8 op sees it: per token amax/448 (dynamic) or the static scale, E4M3 round trip."""
    s = (x.abs().amax(-1, keepdim=True) / 448.0).clamp_min(1e-12) if input_scale is None else torch.tensor(input_scale)
    return (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s


def ct_pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' pack_to_int32 along dim 1, written out: element j of row r goes to bits
    [(j*bits) % 32, ...) of word (j*bits) // 32, as value + 2^(bits-1) (values are signed)."""
    rows, cols = values.shape
    per = 32 // bits
    out = torch.zeros(rows, cols // per, dtype=torch.int64)
    for j in range(cols):
        out[:, j // per] |= (values[:, j].to(torch.int64) + (1 << (bits - 1))) << ((j % per) * bits)
    out = torch.where(out >= 2**31, out - 2**32, out)
    return out.to(torch.int32)


# ---------------------------------------------------------------- GPTQ


def gptq_ckpt(fmt: str, sym: bool, bits: int = 4, gs: int = 16, g_idx_of=None, seed: int = 0):
    ckpt, ref = {}, {}
    for i, (name, n) in enumerate(OUTS.items()):
        g_idx = g_idx_of(name) if g_idx_of else None
        q, z, s, g = codes(n, K, bits, gs, seed + i, sym, g_idx)
        qw, qz = pack_gptq(q, z, bits, fmt)
        p = f"{PFX}.{name}"
        ckpt |= {f"{p}.qweight": qw, f"{p}.qzeros": qz, f"{p}.scales": s.half(), f"{p}.g_idx": g}
        ref[p] = dequant(q, z, s, g)
    return ckpt, ref


def gptq_config(fmt: str | None, sym: bool = True, bits: int = 4, gs: int = 16, desc_act: bool = False):
    qc = {"quant_method": "gptq", "bits": bits, "group_size": gs, "desc_act": desc_act, "sym": sym}
    if fmt is not None:
        qc["checkpoint_format"] = fmt
    return {"quantization_config": qc}


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2", None])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits,gs", [(4, 16), (8, -1)])
def test_gptq_reads_exactly(fmt, sym, bits, gs):
    ckpt, ref = gptq_ckpt(fmt or "gptq", sym, bits, gs)
    sq = hf.detect(gptq_config(fmt, sym, bits, gs))
    assert sq.scheme_for(f"{PFX}.q_proj").checkpoint_format == (fmt or "gptq")
    x = x_in()
    for p, w in ref.items():
        torch.testing.assert_close(run_site(ckpt, [p], sq, x), x @ w.t(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hf.float_weight(ckpt.__getitem__, p, sq, torch.float32), w)


def test_gptq_v1_read_as_v2_is_wrong():
    ckpt, ref = gptq_ckpt("gptq", sym=False)
    p = f"{PFX}.q_proj"
    x = x_in()
    good = run_site(ckpt, [p], hf.detect(gptq_config("gptq", sym=False)), x)
    bad = run_site(ckpt, [p], hf.detect(gptq_config("gptq_v2", sym=False)), x)
    torch.testing.assert_close(good, x @ ref[p].t(), rtol=1e-5, atol=1e-5)
    assert (bad - good).abs().max() > 0.1


def permuted_g_idx(seed: int, gs: int = 16):
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(seed))
    return (torch.arange(K, dtype=torch.int32) // gs)[perm].contiguous()


def test_gptq_act_order_fused_equals_separate():
    shared = permuted_g_idx(3)
    ckpt, ref = gptq_ckpt("gptq", sym=True, g_idx_of=lambda name: shared)
    sq = hf.detect(gptq_config("gptq", desc_act=True))
    prefixes = [f"{PFX}.{n}" for n in OUTS]
    x = x_in()
    op, fused = hf.read_site(ckpt.__getitem__, prefixes, sq, torch.float32)
    assert op == "linear_wna16" and "perm" in fused and fused["qweight"].shape == (K // 8, 64)
    y = run_op(op, fused, x, 4, 16)
    expect = torch.cat([x @ ref[p].t() for p in prefixes], dim=1)
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)
    separate = [hf.read_site(ckpt.__getitem__, [p], sq, torch.float32)[1] for p in prefixes]
    for key in ("qweight", "scales", "zeros"):
        assert torch.equal(fused[key], torch.cat([t[key] for t in separate], dim=1))
    assert all(torch.equal(fused["perm"], t["perm"]) for t in separate)


def test_gptq_act_order_different_g_idx_refused():
    ckpt, _ = gptq_ckpt("gptq", sym=True, g_idx_of=lambda name: permuted_g_idx(ord(name[0])))
    sq = hf.detect(gptq_config("gptq", desc_act=True))
    with pytest.raises(hf.QuantFormatError, match="g_idx"):
        hf.read_site(ckpt.__getitem__, [f"{PFX}.{n}" for n in OUTS], sq, torch.float32)


# ---------------------------------------------------------------- AWQ


def test_awq_gemm_reads_exactly_and_fuses():
    ckpt, ref = {}, {}
    for i, (name, n) in enumerate(OUTS.items()):
        q, z, s, g = codes(n, K, 4, 32, 10 + i, sym=False)
        qw, qz = pack_awq(q, z)
        p = f"{PFX}.{name}"
        ckpt |= {f"{p}.qweight": qw, f"{p}.qzeros": qz, f"{p}.scales": s.half()}
        ref[p] = dequant(q, z, s, g)
    sq = hf.detect({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                            "version": "gemm", "modules_to_not_convert": None}})
    x = x_in()
    prefixes = list(ref)
    y = run_site(ckpt, prefixes, sq, x)
    torch.testing.assert_close(y, torch.cat([x @ ref[p].t() for p in prefixes], 1), rtol=1e-5, atol=1e-5)
    assert not hf.is_quantized_module("lm_head", sq) and hf.is_quantized_module(prefixes[0], sq)


# ---------------------------------------------------------------- FP8 (AutoFP8 layout)


def fp8_ckpt(static: bool, per_tensor: bool = True, weight_key: str = "weight"):
    ckpt, ref, inputs = {}, {}, {}
    for i, (name, n) in enumerate(OUTS.items()):
        g = torch.Generator().manual_seed(20 + i)
        w8 = (torch.randn(n, K, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        scale = torch.rand((1,) if per_tensor else (n,), generator=g) * 0.01 + 0.001
        p = f"{PFX}.{name}"
        ckpt[f"{p}.{weight_key}"] = w8
        ckpt[f"{p}.weight_scale"] = scale.reshape(()) if per_tensor else scale.reshape(n, 1)
        if static:
            inputs[p] = 0.01 * (i + 1)
            ckpt[f"{p}.input_scale"] = torch.tensor(inputs[p])
        ref[p] = w8.float() * scale.reshape(-1, 1)
    return ckpt, ref, inputs


@pytest.mark.parametrize("static", [True, False])
def test_fp8_reads_exactly_and_fuses(static):
    ckpt, ref, inputs = fp8_ckpt(static)
    sq = hf.detect({"quantization_config": {"quant_method": "fp8", "activation_scheme":
                                            "static" if static else "dynamic", "ignored_layers": ["lm_head"]}})
    x = x_in() * 2
    for p, w in ref.items():
        y = run_site(ckpt, [p], sq, x)
        torch.testing.assert_close(y, fp8_act(x, inputs.get(p)) @ w.t(), rtol=1e-5, atol=1e-5)
    prefixes = list(ref)
    op, t = hf.read_site(ckpt.__getitem__, prefixes, sq, torch.float32)
    assert op == "linear_fp8" and t["weight_scale"].shape == (64,)  # different per-tensor scales -> per channel
    if static:  # the largest of the parts' scales (see read_site)
        assert t["input_scale"].item() == pytest.approx(max(inputs.values()))
    else:
        assert "input_scale" not in t
    x_s = fp8_act(x, max(inputs.values()) if static else None)
    torch.testing.assert_close(run_op(op, t, x), torch.cat([x_s @ ref[p].t() for p in prefixes], 1),
                               rtol=1e-5, atol=1e-5)


def test_fp8_equal_per_tensor_scales_stay_per_tensor():
    ckpt, _, _ = fp8_ckpt(False)
    for name in OUTS:
        ckpt[f"{PFX}.{name}.weight_scale"] = torch.tensor(0.004)
    sq = hf.detect({"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}})
    _, t = hf.read_site(ckpt.__getitem__, [f"{PFX}.{n}" for n in OUTS], sq, torch.float32)
    assert t["weight_scale"].shape == (1,)


# ---------------------------------------------------------------- compressed-tensors


def ct_config(fmt: str, weights: dict, input_activations: dict | None = None, ignore=("lm_head",)):
    return {"quantization_config": {
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
        "ignore": list(ignore), "config_groups": {"group_0": {
            "targets": ["Linear"], "weights": weights, "input_activations": input_activations}}}}


def ct_packed_ckpt(bits: int, gs: int, sym: bool, g_idx_of=None):
    ckpt, ref = {}, {}
    for i, (name, n) in enumerate(OUTS.items()):
        q, z, s, g = codes(n, K, bits, gs, 30 + i, sym, g_idx_of(name) if g_idx_of else None)
        p = f"{PFX}.{name}"
        off = 1 << (bits - 1)
        ckpt[f"{p}.weight_packed"] = ct_pack(q.t() - off, bits)  # signed codes, packed along K
        ckpt[f"{p}.weight_scale"] = s.t().contiguous()  # [N, G]
        ckpt[f"{p}.weight_shape"] = torch.tensor([n, K])
        if not sym:
            ckpt[f"{p}.weight_zero_point"] = ct_pack_dim0(z.t() - off, bits)  # signed, packed along N
        if g_idx_of:
            ckpt[f"{p}.weight_g_idx"] = g
        ref[p] = dequant(q, z, s, g)
    return ckpt, ref


def ct_pack_dim0(values: torch.Tensor, bits: int) -> torch.Tensor:
    """pack_to_int32(..., packed_dim=0): [N, G] -> [N * bits / 32, G]."""
    return ct_pack(values.t().contiguous(), bits).t().contiguous()


@pytest.mark.parametrize("bits,gs,sym", [(4, 16, True), (4, 16, False), (4, -1, True), (8, 32, False),
                                         (8, -1, True)])
def test_ct_pack_quantized_reads_exactly(bits, gs, sym):
    ckpt, ref = ct_packed_ckpt(bits, gs, sym)
    w = {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group" if gs > 0 else "channel",
         "group_size": gs if gs > 0 else None}
    sq = hf.detect(ct_config("pack-quantized", w))
    x = x_in()
    prefixes = list(ref)
    for p in prefixes:
        torch.testing.assert_close(run_site(ckpt, [p], sq, x), x @ ref[p].t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run_site(ckpt, prefixes, sq, x), torch.cat([x @ ref[p].t() for p in prefixes], 1),
                               rtol=1e-5, atol=1e-5)
    assert not hf.is_quantized_module("lm_head", sq)


def test_ct_pack_quantized_with_g_idx():
    shared = permuted_g_idx(5)
    ckpt, ref = ct_packed_ckpt(4, 16, True, g_idx_of=lambda name: shared)
    w = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 16, "actorder": "group"}
    sq = hf.detect(ct_config("pack-quantized", w))
    x = x_in()
    prefixes = list(ref)
    torch.testing.assert_close(run_site(ckpt, prefixes, sq, x), torch.cat([x @ ref[p].t() for p in prefixes], 1),
                               rtol=1e-5, atol=1e-5)


def test_ct_packing_matches_compressed_tensors():
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(1)
    for bits in (4, 8):
        v = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (6, 64), generator=g, dtype=torch.int8)
        assert torch.equal(ct.pack_to_int32(v, bits), ct_pack(v, bits))
        assert torch.equal(ct.pack_to_int32(v.t().contiguous(), bits, packed_dim=0), ct_pack_dim0(v.t(), bits))


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
@pytest.mark.parametrize("static", [True, False])
def test_ct_float_quantized(strategy, static):
    ckpt, ref, inputs = fp8_ckpt(static, per_tensor=strategy == "tensor")
    for p in ref:  # compressed-tensors stores [N, 1] per channel, [1] per tensor
        ckpt[f"{p}.weight_scale"] = ckpt[f"{p}.weight_scale"].reshape((-1, 1) if strategy == "channel" else (1,))
        if static:
            ckpt[f"{p}.input_scale"] = ckpt[f"{p}.input_scale"].reshape(1)
    w = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy}
    ia = ({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False} if static
          else {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True})
    sq = hf.detect(ct_config("float-quantized", w, ia))
    x = x_in() * 2
    for p, wt in ref.items():
        torch.testing.assert_close(run_site(ckpt, [p], sq, x), fp8_act(x, inputs.get(p)) @ wt.t(),
                                   rtol=1e-5, atol=1e-5)


def test_ct_int_quantized_w8a8():
    ckpt, ref = {}, {}
    for i, (name, n) in enumerate(OUTS.items()):
        g = torch.Generator().manual_seed(40 + i)
        w8 = torch.randint(-127, 128, (n, K), generator=g, dtype=torch.int8)
        s = torch.rand(n, 1, generator=g) * 0.01
        p = f"{PFX}.{name}"
        ckpt |= {f"{p}.weight": w8, f"{p}.weight_scale": s}
        ref[p] = (w8.float(), s.reshape(-1))
    w = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    ia = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    sq = hf.detect(ct_config("int-quantized", w, ia))
    x = x_in()
    sx = x.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(x / sx).clamp(-127, 127)
    prefixes = list(ref)
    y = run_site(ckpt, prefixes, sq, x)
    expect = torch.cat([(xq @ w8.t()) * sx * s for w8, s in ref.values()], 1)
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("qc,field", [
    ({"quant_method": "bitsandbytes"}, "quant_method"),
    ({"quant_method": "awq", "version": "gemv", "bits": 4}, "version"),
    ({"quant_method": "awq", "version": "marlin", "bits": 4}, "version"),
    ({"quant_method": "awq", "version": "exllama", "bits": 4}, "version"),
    ({"quant_method": "gptq", "bits": 3}, "bits"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}, "weight_block_size"),
    ({"quant_method": "fp8", "activation_scheme": "weird"}, "activation_scheme"),
    (ct_config("dense", {"num_bits": 8})["quantization_config"], "format"),
    (ct_config("pack-quantized", {"num_bits": 4, "type": "int", "strategy": "tensor"})["quantization_config"],
     "strategy"),
    (ct_config("float-quantized", {"num_bits": 8, "type": "float", "strategy": "channel"})["quantization_config"],
     "input_activations"),
])
def test_unsupported_configs_name_the_field(qc, field):
    with pytest.raises(hf.QuantFormatError, match=field) as e:
        hf.detect({"quantization_config": qc})
    assert "supported" in str(e.value)


def test_unquantized_config():
    assert hf.detect({"model_type": "llama"}) is None
    assert not hf.is_quantized_module(f"{PFX}.q_proj", None)
