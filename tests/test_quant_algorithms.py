"""Calibration-based quantization (compiler/quantize/calibrate.py and the modules it uses): the layer-by-layer
forward against transformers, GPTQ / AWQ / SmoothQuant against their baselines on synthetic layers, the per-site
emission on tiny models, calibration data loading, and perplexity on the shipped target model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from compiler.hf_loader import HFCheckpoint
from compiler.models.config import parse_hf_config
from compiler.quantize import layout
from compiler.quantize.awq import awq_clip, awq_search_scales, smoothquant_scales
from compiler.quantize.calib_data import load_calibration
from compiler.quantize.calibrate import calibrate_and_quantize, default_sites
from compiler.quantize.gptq import gptq_quantize
from compiler.quantize.groups import dequantize, quantize_groups
from compiler.quantize.layer_forward import model_nll, perplexity, site_linear
from compiler.quantize.rtn import quantize_rtn
from compiler.quantize.spec import CalibrationError, QuantSpec, Site
from tests.conftest import FAMILIES, load_hf, make_hf_checkpoint

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "models" / "spanda-py-target"


def _open(path: Path, dtype: str = "float32"):
    ck = HFCheckpoint.open(path)
    return parse_hf_config(ck.config, dtype), ck.read


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


# ------------------------------------------------------------------------------------------ the forward


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layerwise_forward_matches_transformers(checkpoints, family):
    cfg, read = _open(checkpoints[family])
    torch.manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (3, 40))  # 40 > mistral's sliding window of 24
    with torch.no_grad():
        ref = load_hf(checkpoints[family])(ids).logits
    got = model_nll(cfg, read, ids, return_logits=True, chunk_tokens=80)  # 2 rows per chunk
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    nll, count = model_nll(cfg, read, ids)
    ref_nll = torch.nn.functional.cross_entropy(ref[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1),
                                                reduction="sum")
    assert count == 3 * 39 and nll == pytest.approx(float(ref_nll), rel=1e-5)


# ------------------------------------------------------------------------------------------ the algorithms


def _correlated(t: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 2 * torch.randn(k, k, generator=g) / k**0.5
    return (torch.randn(t, k, generator=g) @ mix) * (torch.rand(k, generator=g) * 3 + 0.2)


def _outliers(t: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    x[:, torch.randperm(k, generator=g)[: k // 32]] *= 40.0
    return x


def test_quantize_groups_is_rtn():
    w = torch.randn(48, 96)
    for sym in (True, False):
        for gs in (32, -1):
            a, b = quantize_groups(w, 4, gs, sym), quantize_rtn(w, 4, gs, sym)
            for x, y in ((a.q, b.q), (a.z, b.z), (a.s, b.s), (a.g_idx, b.g_idx)):
                assert torch.equal(x, y)
            torch.testing.assert_close(dequantize(a), (b.q.float() - b.z.float()[b.g_idx.long()]).t()
                                       * b.s.float()[b.g_idx.long()].t())


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_beats_rtn(sym):
    k, n = 256, 96
    x = _correlated(2048, k)
    w = torch.randn(n, k) * 0.05
    h = x.t() @ x
    ref = x @ w.t()
    rtn = _rel(x @ dequantize(quantize_rtn(w, 4, 64, sym)).t(), ref)
    errs = {}
    for act_order in (False, True):
        for static in (False, True):
            ql = gptq_quantize(w, h, 4, 64, sym, act_order=act_order, static_groups=static, block_size=32)
            assert ql.q.shape == (k, n) and ql.s.shape == ql.z.shape == (k // 64, n)
            assert int(ql.q.min()) >= 0 and int(ql.q.max()) <= 15
            if sym:
                assert bool((ql.z == 8).all())
            g = ql.g_idx.long()
            assert torch.equal(torch.bincount(g, minlength=k // 64), torch.full((k // 64,), 64))
            if not act_order or static:
                assert torch.equal(g, torch.arange(k) // 64)
            else:
                assert not torch.equal(g, torch.arange(k) // 64)
            # the internal layout (perm for act-order) computes the same weight
            tensors = layout.wna16_tensors(ql, torch.float32)
            assert ("perm" in tensors) == (act_order and not static)
            w_layout, act = site_linear(tensors, 4, 64)
            assert act is None
            torch.testing.assert_close(w_layout, dequantize(ql))
            errs[(act_order, static)] = _rel(x @ dequantize(ql).t(), ref)
    assert all(e < 0.85 * rtn for e in errs.values()), (rtn, errs)
    assert min(errs[(True, False)], errs[(True, True)]) < errs[(False, False)], errs  # act-order helps here
    # per channel (group_size -1) too
    pc = gptq_quantize(w, h, 4, -1, sym)
    assert _rel(x @ dequantize(pc).t(), ref) < _rel(x @ dequantize(quantize_rtn(w, 4, -1, sym)).t(), ref)


def test_gptq_row_chunks_change_nothing():
    """Rows are independent given the inverse Hessian: quantizing them a few at a time (bounded temporaries)
    gives the same codes, scales, zeros and groups as all at once."""
    k, n = 128, 40
    x = _correlated(512, k, seed=3)
    w = torch.randn(n, k) * 0.05
    w[:, 5] = 0
    x[:, 7] = 0  # a dead input channel
    h = x.t() @ x
    for sym, act_order, static, gs in ((True, False, False, 32), (False, True, False, 32), (True, True, True, 64),
                                       (False, False, False, -1)):
        whole = gptq_quantize(w, h, 4, gs, sym, act_order=act_order, static_groups=static, block_size=16)
        parts = gptq_quantize(w, h, 4, gs, sym, act_order=act_order, static_groups=static, block_size=16,
                              chunk_bytes=7 * 4 * k)  # 7 rows at a time, the last chunk shorter
        for a, b in ((whole.q, parts.q), (whole.z, parts.z), (whole.s, parts.s), (whole.g_idx, parts.g_idx)):
            assert a.dtype == b.dtype and torch.equal(a, b), (sym, act_order, static, gs)


def test_awq_beats_rtn_on_outlier_channels():
    k, n = 256, 128
    x = _outliers(2048, k)
    w = torch.randn(n, k) * 0.05
    gram, mean = x.t() @ x, x.abs().mean(0)
    ref = x @ w.t()
    for sym in (False, True):
        rtn = _rel(x @ dequantize(quantize_rtn(w, 4, 64, sym)).t(), ref)
        s, alpha, _ = awq_search_scales(w, gram, mean, 4, 64, sym, grid=20)
        assert 0 < alpha < 1
        ws = w * s
        scaled_only = _rel((x / s) @ dequantize(quantize_groups(ws, 4, 64, sym)).t(), ref)
        clipped = awq_clip(ws, gram / s.unsqueeze(0) / s.unsqueeze(1), 4, 64, sym)
        full = _rel((x / s) @ dequantize(quantize_groups(clipped, 4, 64, sym)).t(), ref)
        assert scaled_only < 0.8 * rtn and full <= scaled_only * 1.001, (rtn, scaled_only, full)
    # the duo-scaling variant and a row mask for the clip
    s2, _, _ = awq_search_scales(w, gram, mean, 4, 64, False, grid=10, duo_scaling=True)
    rows = torch.arange(n) >= n // 2
    c = awq_clip(w * s2, gram, 4, 64, False, rows)
    assert torch.equal(c[: n // 2], (w * s2)[: n // 2]) and not torch.equal(c[n // 2:], (w * s2)[n // 2:])


def test_smoothquant_reduces_w8a8_error():
    k, n = 256, 128
    x = _outliers(1024, k, seed=3)
    w = torch.randn(n, k) * 0.05
    ref = x @ w.t()

    def w8a8(xin, wt):
        wq, act = site_linear(layout.int8_weight(wt))
        return act(xin) @ wq.t()

    plain = _rel(w8a8(x, w), ref)
    s = smoothquant_scales(x.abs().amax(0), w, 0.5)
    smooth = _rel(w8a8(x / s, w * s), ref)
    assert smooth < 0.5 * plain, (plain, smooth)


# ------------------------------------------------------------------------------------------ calibrate_and_quantize


def _run(cfg, read, ids, spec, sites):
    out: dict[str, dict[str, torch.Tensor]] = {}
    calls: list[str] = []

    def emit(name, tensors):
        calls.append(name)
        out[name] = tensors

    summary = calibrate_and_quantize(cfg, read, ids, spec, sites, emit, progress=False)
    return out, calls, summary


@pytest.mark.parametrize("method,family,fused", [
    ("gptq", "llama", True), ("gptq", "mistral", False), ("awq", "llama", True), ("awq", "qwen2", False),
    ("int8_smoothquant", "llama", True), ("fp8_static", "qwen2", True)])
def test_calibrate_emits_every_site(checkpoints, method, family, fused):
    cfg, read = _open(checkpoints[family])
    ids = torch.randint(3, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(method, group_size=32, act_order=method == "gptq" and not fused)
    sites = default_sites(cfg, fused=fused)
    out, calls, summary = _run(cfg, read, ids, spec, sites)
    site_names = [s.name for s in sites]
    assert sorted(c for c in calls if c in site_names) == sorted(site_names)  # each site exactly once
    norms = [c for c in calls if c not in site_names]
    assert len(norms) == len(set(norms))
    if method in ("awq", "int8_smoothquant"):
        assert sorted(norms) == sorted(f"model.layers.{i}.{n}.weight" for i in range(cfg.num_layers)
                                       for n in ("input_layernorm", "post_attention_layernorm"))
        for n in norms:
            assert out[n]["weight"].dtype == cfg.torch_dtype and out[n]["weight"].shape == (cfg.hidden_size,)
    else:
        assert norms == []
    for site in sites:
        t = out[site.name]
        n_out = sum(read(s).shape[0] for s in site.sources)
        k = read(site.sources[0]).shape[1]
        if method in ("gptq", "awq"):
            assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (k * 4 // 32, n_out)
            assert t["scales"].dtype == cfg.torch_dtype and t["scales"].shape == (k // 32, n_out)
            assert t["zeros"].dtype == torch.uint8 and t["zeros"].shape == (k // 32, n_out)
            assert ("perm" in t) == spec.act_order and (t["perm"].dtype == torch.int32 if "perm" in t else True)
        elif method == "int8_smoothquant":
            assert set(t) == {"weight", "weight_scale"}
            assert t["weight"].dtype == torch.int8 and t["weight"].shape == (n_out, k)
            assert t["weight_scale"].dtype == torch.float32 and t["weight_scale"].shape == (n_out,)
        else:
            assert set(t) == {"weight", "weight_scale", "input_scale"}
            assert t["weight"].dtype == torch.float8_e4m3fn and t["weight"].shape == (n_out, k)
            assert t["input_scale"].dtype == torch.float32 and t["input_scale"].shape == (1,)
            assert float(t["input_scale"]) > 0
        assert summary["sites"][site.name]["rel_err"] < 0.5
    # deterministic
    out2, calls2, _ = _run(cfg, read, ids, spec, sites)
    assert calls2 == calls
    for name in calls:
        for key, v in out[name].items():
            assert torch.equal(v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v,
                               out2[name][key].view(torch.uint8) if v.dtype == torch.float8_e4m3fn
                               else out2[name][key]), (name, key)


def test_awq_folds_o_into_v_for_mha(tmp_path):
    d = make_hf_checkpoint("llama", tmp_path / "mha", num_key_value_heads=4)
    cfg, read = _open(d)
    ids = torch.randint(3, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    sites = default_sites(cfg)
    out, _, summary = _run(cfg, read, ids, QuantSpec("awq", bits=8, group_size=32), sites)
    o_sites = [n for n in summary["sites"] if n.endswith("o_proj.weight")]
    assert o_sites and all(summary["sites"][n]["alpha"] is not None for n in o_sites)
    # the folds keep the function: at 8 bits the emitted model's logits stay close to the float ones
    ref = model_nll(cfg, read, ids, return_logits=True)
    got = model_nll(cfg, read, ids, return_logits=True, emitted=out, sites=sites, bits=8, group_size=32)
    assert _rel(got, ref) < 0.05


def test_calibrate_rejects_bad_sites(checkpoints):
    cfg, read = _open(checkpoints["llama"])
    ids = torch.zeros(1, 8, dtype=torch.long)
    bad = [Site("x", ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"))]
    with pytest.raises(CalibrationError, match="share one layer and input"):
        calibrate_and_quantize(cfg, read, ids, QuantSpec("gptq", group_size=32), bad, lambda *a: None, False)
    with pytest.raises(CalibrationError, match="method"):
        QuantSpec("nf4")


# ------------------------------------------------------------------------------------------ calibration data


def _enc(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_load_calibration_jsonl_txt_folder(tmp_path):
    rows = [{"token_ids": list(range(i * 10, i * 10 + 10))} for i in range(6)]  # 60 tokens
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    ids, sha = load_calibration(p, None, 3, 10, seed=0)
    assert ids.shape == (3, 10) and ids.dtype == torch.int64
    assert all(int(r[0]) % 10 == 0 and torch.equal(r, torch.arange(int(r[0]), int(r[0]) + 10)) for r in ids)
    again, sha2 = load_calibration(p, None, 3, 10, seed=0)
    assert torch.equal(ids, again) and sha == sha2 and len(sha) == 64
    other, sha3 = load_calibration(p, None, 3, 10, seed=1)
    assert sha3 != sha or torch.equal(other, ids)
    assert len({tuple(r.tolist()) for r in load_calibration(p, None, 6, 10)[0]}) == 6  # without replacement

    t = tmp_path / "c2.jsonl"
    t.write_text(json.dumps({"text": "abcdefgh"}) + "\n" + json.dumps({"token_ids": [1, 2, 3, 4]}) + "\n")
    ids, _ = load_calibration(t, _enc, 3, 4)
    assert ids.tolist() == [_enc("abcd"), _enc("efgh"), [1, 2, 3, 4]]

    txt = tmp_path / "a.txt"
    txt.write_text("x" * 50)
    ids, _ = load_calibration(txt, _enc, 5, 10)
    assert ids.shape == (5, 10) and bool((ids == ord("x")).all())

    d = tmp_path / "folder"
    (d / "sub").mkdir(parents=True)
    (d / "b.py").write_text("bbbb")
    (d / "a.md").write_text("aaaa")
    (d / "sub" / "c.txt").write_text("cccc")
    (d / "skip.bin").write_bytes(b"zzzz")
    ids, _ = load_calibration(d, _enc, 3, 4)
    assert ids.tolist() == [_enc("aaaa"), _enc("bbbb"), _enc("cccc")]  # sorted paths, .bin ignored


def test_load_calibration_errors(tmp_path):
    p = tmp_path / "small.jsonl"
    p.write_text(json.dumps({"token_ids": list(range(25))}) + "\n")
    with pytest.raises(CalibrationError, match="too little calibration data: 25 tokens make 2 windows"):
        load_calibration(p, None, 3, 10)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ids": [1]}\n')
    with pytest.raises(CalibrationError, match="bad.jsonl:1"):
        load_calibration(bad, None, 1, 1)
    with pytest.raises(CalibrationError, match="needs a tokenizer"):
        load_calibration(_write(tmp_path / "t.txt", "abc"), None, 1, 1)
    with pytest.raises(CalibrationError, match="not found"):
        load_calibration(tmp_path / "missing.jsonl", None, 1, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no text files"):
        load_calibration(tmp_path / "empty", _enc, 1, 1)


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def test_default_calibration_set():
    path = REPO / "models" / "calibration.jsonl"
    assert path.stat().st_size < 1_000_000
    rows = [json.loads(line)["token_ids"] for line in path.read_text().splitlines()]
    assert len(rows) == 128 and all(len(r) == 512 and r[0] == 1 for r in rows)
    held_lines = (REPO / "models" / "heldout.jsonl").read_text().splitlines()
    held = {tuple(json.loads(line)["token_ids"]) for line in held_lines}
    assert not held & {tuple(r) for r in rows}
    ids, _ = load_calibration(path, None, 16, 512)
    assert ids.shape == (16, 512) and bool((ids[:, 0] == 1).all())  # whole rows


def test_default_calibration_set_follows_the_checkpoint_tokenizer(tmp_path, tokenizer_dir):
    """The shipped set's ids belong to the shipped models' tokenizer: a build of that model uses them as they
    are (same ids, same provenance hash); a checkpoint with another tokenizer gets the rows' text tokenized
    by its own tokenizer (a 70B Llama would otherwise calibrate on the ids of another vocabulary)."""
    from artifacts.store import sha256_file
    from compiler.quantize.calib_data import checkpoint_calibration
    from compiler.quantize.spec import CalibrationError
    from compiler.recipe import load_recipe
    from runtime.tokenizer import Tokenizer

    c = load_recipe(REPO / "recipes" / "llama-70b-fp8.yaml").quantization.calibration
    c = c.model_copy(update={"data": str(REPO / c.data), "num_samples": 8, "seq_len": 512})
    plain, sha_plain = load_calibration(c.data, None, 8, 512)
    own, sha_own = checkpoint_calibration(c, REPO / "models" / "spanda-py-target", 8192)
    assert torch.equal(own, plain) and sha_own == sha_plain
    other, _ = checkpoint_calibration(c, tokenizer_dir, 512)  # the tests' 512-token tokenizer
    assert int(other.max()) < 512 and not torch.equal(other, plain)
    # a row of another tokenizer's ids is read from its text, tokenized by this checkpoint's tokenizer
    enc = Tokenizer.from_dir(tokenizer_dir).encode
    texts = [json.loads(line)["text"] for line in Path(c.data).read_text().splitlines()[:2]]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"tokenizer_sha256": "0" * 64, "text": t, "token_ids": [1, 9999]}) + "\n"
                             for t in texts))
    stream = [i for t in texts for i in enc(t)]
    got, _ = load_calibration(mixed, enc, len(stream) // 64, 64,
                              tokenizer_sha256=sha256_file(tokenizer_dir / "tokenizer.json"), vocab_size=512)
    assert got.reshape(-1).tolist() == stream[:got.numel()]
    # a foreign row without text, and ids beyond the vocabulary, are refused with the reason
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(json.dumps({"tokenizer_sha256": "0" * 64, "token_ids": [1, 2, 3] * 10}) + "\n")
    with pytest.raises(CalibrationError, match="made by the tokenizer with sha256 0000"):
        load_calibration(foreign, None, 1, 8, tokenizer_sha256=sha256_file(tokenizer_dir / "tokenizer.json"))
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"token_ids": [1, 700, 3] * 10}) + "\n")
    with pytest.raises(CalibrationError, match="token id 700 is outside the model's vocabulary \\(512 tokens\\)"):
        load_calibration(big, None, 1, 8, vocab_size=512)


# ------------------------------------------------------------------------------------------ the shipped model


def test_shipped_model_perplexity_gptq_awq_beat_rtn():
    """int4 g128 on spanda-py-target (bf16 weights, float32 compute), 16 x 512 calibration tokens from
    models/calibration.jsonl (fewer than a build would use, to stay fast on CPU), perplexity on the first 16
    rows of models/heldout.jsonl. RTN is what layout.rtn_tensors stores."""
    cfg, raw_read = _open(TARGET, "bfloat16")
    cache: dict[str, torch.Tensor] = {}

    def read(name):
        if name not in cache:
            cache[name] = raw_read(name)
        return cache[name]

    held = torch.tensor([json.loads(line)["token_ids"]
                         for line in (REPO / "models" / "heldout.jsonl").read_text().splitlines()[:16]])
    calib, _ = load_calibration(REPO / "models" / "calibration.jsonl", None, 16, 512)
    sites = default_sites(cfg)
    t0 = time.time()

    def ppl(emitted=None):
        return perplexity(cfg, read, held, emitted=emitted, sites=sites, bits=4, group_size=128)

    base = ppl()
    assert base == pytest.approx(9.3173, rel=5e-3)  # models/README.md: held-out perplexity, first 16 rows
    weights = {s.name: torch.cat([read(x) for x in s.sources]) for s in sites}
    rtn = {sym: ppl({n: layout.rtn_tensors(w, 4, 128, sym, cfg.torch_dtype) for n, w in weights.items()})
           for sym in (True, False)}
    res = {}
    for method in ("gptq", "awq"):
        out, _, _ = _run(cfg, read, calib, QuantSpec(method, bits=4, group_size=128), sites)
        res[method] = ppl(out)
    print(f"\nspanda-py-target perplexity (16 held-out rows): float {base:.4f}, RTN int4 g128 sym "
          f"{rtn[True]:.4f} / asym {rtn[False]:.4f}, GPTQ int4 g128 (sym) {res['gptq']:.4f}, AWQ int4 g128 "
          f"(asym) {res['awq']:.4f} ({time.time() - t0:.1f}s)")
    # each strictly better than RTN at the same bits, group size and symmetry, and within 5% of float
    assert res["gptq"] < rtn[True] and res["awq"] < rtn[False]
    assert res["gptq"] < 1.05 * base and res["awq"] < 1.05 * base
