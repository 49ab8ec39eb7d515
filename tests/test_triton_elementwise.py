"""Triton elementwise ops (runtime/ops/triton_elementwise.py) against their references.

GPU tests (``pytest -m gpu``): fresh random inputs over odd and model widths, many rows, row-strided inputs
(slices of a wider tensor, as q/k are slices of a fused QKV output), bf16/fp16/fp32; the reference is the
plain-PyTorch function on the same device. The kernels write into NaN-filled buffers, so an output element
they never write fails; the ops (torch.ops.spanda.*, dispatching to the kernels on CUDA) are checked too.
A CPU test runs the same kernels under ``TRITON_INTERPRET=1`` (float16/float32 only: the interpreter
rounds bfloat16 by truncation).
"""

from __future__ import annotations

import importlib.util
import zlib

import pytest
import torch

import runtime.ops  # noqa: F401
from runtime.ops import triton_elementwise as te
from runtime.ops.activation import silu_and_mul_ref
from runtime.ops.norm import fused_add_rms_norm_ref, rms_norm_ref
from runtime.ops.rotary import rotary_embedding_ref
from tests.conftest import capture_graph, cuda_kernel_names, run_under_interpreter

HAS_TRITON = importlib.util.find_spec("triton") is not None
NO_GPU = not (torch.cuda.is_available() and HAS_TRITON)
NO_GPU_REASON = "needs a CUDA GPU and triton (run with -m gpu on the device)"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TOL = {torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 1e-3), torch.float32: (1e-5, 1e-5)}  # rtol, atol
REL = {torch.bfloat16: 4e-3, torch.float16: 1e-3, torch.float32: 5e-6}  # ||out - ref|| / ||ref||
WIDTHS = [1, 7, 96, 1000, 4096, 5120]
spanda = torch.ops.spanda


def check(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Every element written (finite: inputs are), same shape/dtype, within the dtype's tolerances."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (what, out.shape, ref.shape, out.dtype, ref.dtype)
    bad = ~torch.isfinite(out)
    assert not bad.any(), f"{what}: {int(bad.sum())} unwritten/non-finite, first at {bad.nonzero()[0].tolist()}"
    o, r = out.double(), ref.double()
    rel = ((o - r).norm() / r.norm().clamp_min(1e-30)).item()
    assert rel <= REL[out.dtype], f"{what}: relative error {rel:.2e}"
    rtol, atol = TOL[out.dtype]
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def nan_like(t: torch.Tensor) -> torch.Tensor:
    """A contiguous output buffer poisoned with NaN: an element the kernel never writes fails check()."""
    return torch.full(t.shape, float("nan"), dtype=t.dtype, device=t.device)


def seed(*key) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(zlib.crc32(repr(key).encode()))


def rows(n: int, width: int, dtype, strided: bool, g: torch.Generator) -> torch.Tensor:
    """[n, width] random on the GPU; strided: a column slice of a wider tensor (row stride > width)."""
    if not strided:
        return torch.randn(n, width, generator=g, device="cuda").to(dtype)
    wide = torch.randn(n, width + 37, generator=g, device="cuda").to(dtype)
    return wide[:, 5:5 + width]


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("n", [1, 3, 257])
@pytest.mark.parametrize("strided", [False, True])
def test_rms_norm(dtype, width, n, strided):
    g = seed(width, n, strided, dtype)
    x, res = rows(n, width, dtype, strided, g), rows(n, width, dtype, not strided, g) * 4
    w = (torch.rand(width, generator=g, device="cuda") + 0.5).to(dtype)
    eps = 1e-5
    ref = rms_norm_ref(x, w, eps)
    check(te.rms_norm_cuda(x, w, eps, out=nan_like(ref)), ref, "rms_norm")
    check(spanda.rms_norm(x, w, eps), ref, "rms_norm op")
    ref_n, ref_s = fused_add_rms_norm_ref(x, res, w, eps)
    out_n, out_s = te.fused_add_rms_norm_cuda(x, res, w, eps, out=(nan_like(ref_n), nan_like(ref_s)))
    check(out_s, ref_s, "fused_add_rms_norm sum")
    check(out_n, ref_n, "fused_add_rms_norm norm")
    for got, want in zip(spanda.fused_add_rms_norm(x, res, w, eps), (ref_n, ref_s)):
        check(got, want, "fused_add_rms_norm op")


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [1, 7, 96, 1000, 1025, 4096, 14336])
@pytest.mark.parametrize("n", [1, 5, 300])
@pytest.mark.parametrize("strided", [False, True])
def test_silu_and_mul(dtype, inter, n, strided):
    x = rows(n, 2 * inter, dtype, strided, seed(inter, n, strided, dtype)) * 3
    ref = silu_and_mul_ref(x)
    check(te.silu_and_mul_cuda(x, out=nan_like(ref)), ref, "silu_and_mul")
    check(spanda.silu_and_mul(x), ref, "silu_and_mul op")


def _llama3_cache(head_dim: int, max_pos: int) -> torch.Tensor:
    from compiler.models import parse_hf_config, rope_cos_sin_cache

    cfg = parse_hf_config({
        "model_type": "llama", "hidden_size": 32 * head_dim, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 64, "rope_theta": 500000.0,
        "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}}, "float32")
    return rope_cos_sin_cache(cfg, max_pos)


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (4, 2, 16), (6, 1, 96), (5, 5, 10), (1, 1, 2)])
@pytest.mark.parametrize("n", [1, 7, 513])
@pytest.mark.parametrize("layout", ["fused_qkv", "contiguous", "llama3"])
def test_rotary_embedding(dtype, heads, kv_heads, head_dim, n, layout):
    g = seed(heads, kv_heads, head_dim, n, layout, dtype)
    max_pos = 20000 if layout == "llama3" else 300
    if layout == "llama3":
        if head_dim != 128:
            pytest.skip("the llama3 cache is built for the Llama head dim")
        cache = _llama3_cache(head_dim, max_pos).cuda()
    else:
        ang = torch.rand(max_pos, head_dim // 2, generator=g, device="cuda") * 6.3
        cache = torch.cat((ang.cos(), ang.sin()), dim=-1)
    positions = torch.randint(0, max_pos, (n,), generator=g, device="cuda")
    if layout == "contiguous":
        q, k = rows(n, heads * head_dim, dtype, False, g), rows(n, kv_heads * head_dim, dtype, False, g)
    else:  # q and k as column slices of a fused QKV projection output
        qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=g, device="cuda").to(dtype)
        q, k = qkv[:, :heads * head_dim], qkv[:, heads * head_dim:(heads + kv_heads) * head_dim]
    q_ref, k_ref = rotary_embedding_ref(positions, q, k, cache, head_dim)
    q_in, k_in = q.clone(), k.clone()
    q_out, k_out = te.rotary_embedding_cuda(positions, q, k, cache, head_dim, out=(nan_like(q_ref), nan_like(k_ref)))
    check(q_out, q_ref, "rope q")
    check(k_out, k_ref, "rope k")
    for got, want in zip(spanda.rotary_embedding(positions, q, k, cache, head_dim), (q_ref, k_ref)):
        check(got, want, "rope op")
    assert torch.equal(q, q_in) and torch.equal(k, k_in), "inputs were modified"


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
def test_ops_dispatch_to_triton_and_capture_in_graphs():
    """The ops on CUDA tensors run the Triton kernels (profiler names them), and a CUDA graph replay of all
    four, with new inputs copied into the static buffers, matches eager."""
    g = torch.Generator(device="cuda").manual_seed(7)
    t, h, inter, hq, hkv, d = 8, 4096, 14336, 32, 8, 128
    x, res = torch.randn(t, h, generator=g, device="cuda").bfloat16(), torch.randn(t, h, device="cuda").bfloat16()
    w = torch.rand(h, generator=g, device="cuda").bfloat16()
    gu = torch.randn(t, 2 * inter, generator=g, device="cuda").bfloat16()
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g, device="cuda").bfloat16()
    pos = torch.randint(0, 4096, (t,), generator=g, device="cuda")
    ang = torch.rand(4096, d // 2, generator=g, device="cuda")
    cache = torch.cat((ang.cos(), ang.sin()), -1)

    def step():
        n1 = spanda.rms_norm(x, w, 1e-5)
        n2, s = spanda.fused_add_rms_norm(x, res, w, 1e-5)
        q, k = spanda.rotary_embedding(pos, qkv[:, :hq * d], qkv[:, hq * d:(hq + hkv) * d], cache, d)
        return n1, n2, s, spanda.silu_and_mul(gu), q, k

    names = cuda_kernel_names(step)
    for kernel in ("_rms_norm_kernel", "_silu_and_mul_kernel", "_rotary_kernel"):
        assert kernel in names, f"{kernel} did not run: {names[:2000]}"

    graph, static_out = capture_graph(step)
    for src in (x, res, gu, qkv):
        src.copy_(torch.randn(src.shape, device="cuda").to(src.dtype))
    pos.copy_(torch.randint(0, 4096, (t,), device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(static_out, step()):
        assert torch.equal(got, want)


def _interpreter_main() -> None:
    """Runs in a subprocess with TRITON_INTERPRET=1: tiny CPU shapes, float16/float32, strided inputs."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.float32):
        for width in (1, 7, 96, 130):
            x = torch.randn(5, width + 9, generator=g).to(dtype)[:, 2:2 + width]
            r, w = torch.randn(5, width, generator=g).to(dtype), torch.randn(width, generator=g).to(dtype)
            check(te.rms_norm_cuda(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), "rms_norm")
            for o, ref in zip(te.fused_add_rms_norm_cuda(x, r, w, 1e-6), fused_add_rms_norm_ref(x, r, w, 1e-6)):
                check(o, ref, "fused_add_rms_norm")
            gu = torch.randn(4, 2 * width + 6, generator=g).to(dtype)[:, 3:3 + 2 * width]
            check(te.silu_and_mul_cuda(gu, block=32), silu_and_mul_ref(gu), "silu_and_mul")
        for hq, hkv, d in ((4, 2, 16), (3, 1, 10)):
            qkv = torch.randn(6, (hq + 2 * hkv) * d, generator=g).to(dtype)
            q, k = qkv[:, :hq * d], qkv[:, hq * d:(hq + hkv) * d]
            cache, pos = torch.randn(40, d, generator=g), torch.randint(0, 40, (6,), generator=g)
            for o, ref in zip(te.rotary_embedding_cuda(pos, q, k, cache, d), rotary_embedding_ref(pos, q, k, cache, d)):
                check(o, ref, "rotary_embedding")
    print("interpreter ok")


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its interpreter runs on the CPU)")
def test_kernels_under_interpreter():
    run_under_interpreter("tests.test_triton_elementwise", timeout=300)
