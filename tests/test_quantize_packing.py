"""GPTQ (v1/v2) and AWQ weight layouts: hand-checked words, random round trips, and RTN quantization error."""

from __future__ import annotations

import pytest
import torch

from compiler.quantize.packing import (
    default_g_idx,
    dequantize,
    pack_awq,
    pack_gptq,
    unpack_awq,
    unpack_gptq,
)
from compiler.quantize.rtn import quantize_rtn


def test_hand_checked_words():
    q = torch.arange(8, dtype=torch.int32).reshape(8, 1)  # one output column, input rows 0..7
    z8 = torch.full((1, 8), 8, dtype=torch.int32)  # symmetric 4-bit zero point of 8 output columns
    qweight, qzeros = pack_gptq(q.expand(8, 8).contiguous(), z8, 4, "gptq")
    assert qweight[0, 0].item() == 0x76543210  # row k in bits 4k..4k+3
    assert qzeros[0, 0].item() == 0x77777777  # v1 stores z - 1
    _, qzeros_v2 = pack_gptq(q.expand(8, 8).contiguous(), z8, 4, "gptq_v2")
    assert qzeros_v2[0, 0].item() == 0x88888888 - 2**32  # v2 stores z (as signed int32)
    row = torch.arange(8, dtype=torch.int32).reshape(1, 8)  # one input row, output columns 0..7
    awq_w, _ = pack_awq(row, torch.zeros(1, 8, dtype=torch.int32))
    assert awq_w[0, 0].item() == 0x75316420  # nibble k holds column ORDER[k] = 0 2 4 6 1 3 5 7


@pytest.mark.parametrize("bits,fmt", [(4, "gptq"), (4, "gptq_v2"), (8, "gptq"), (8, "gptq_v2")])
def test_gptq_round_trip_and_format_matters(bits, fmt):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (256, 64), generator=g, dtype=torch.int32)
    z = torch.randint(0, 2**bits, (2, 64), generator=g, dtype=torch.int32)
    qweight, qzeros = pack_gptq(q, z, bits, fmt)
    assert qweight.shape == (256 * bits // 32, 64) and qzeros.shape == (2, 64 * bits // 32)
    q2, z2 = unpack_gptq(qweight, qzeros, bits, fmt)
    assert torch.equal(q2, q) and torch.equal(z2, z)
    other = "gptq_v2" if fmt == "gptq" else "gptq"
    _, z_wrong = unpack_gptq(qweight, qzeros, bits, other)
    assert not torch.equal(z_wrong, z)  # reading one format as the other shifts the zero points
    with pytest.raises(ValueError, match="checkpoint_format"):
        unpack_gptq(qweight, qzeros, bits, "auto")


def test_awq_round_trip():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (128, 48), generator=g, dtype=torch.int32)
    z = torch.randint(0, 16, (1, 48), generator=g, dtype=torch.int32)
    qweight, qzeros = pack_awq(q, z)
    assert qweight.shape == (128, 6) and qzeros.shape == (1, 6)
    q2, z2 = unpack_awq(qweight, qzeros)
    assert torch.equal(q2, q) and torch.equal(z2, z)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, -1), (8, 64)])
def test_rtn_error_is_about_half_a_step(symmetric, bits, group_size):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 256, generator=g)
    ql = quantize_rtn(w, bits, group_size, symmetric)
    assert int(ql.q.min()) >= 0 and int(ql.q.max()) < 2**bits
    if symmetric:
        assert torch.all(ql.z == 2 ** (bits - 1))
    w_hat = dequantize(ql.q, ql.z, ql.s, ql.g_idx)
    step = ql.s[ql.g_idx].float().t()  # [out, in]
    # Half a step, plus the fp16 rounding of the stored scale (relative 2^-11) over at most 2^(bits-1) steps
    # where the extreme value is clamped.
    bound = 0.5 + 2 ** (bits - 1) * 2.0**-11 + 1e-4
    assert float(((w_hat - w).abs() / step).max()) <= bound
    assert torch.equal(ql.g_idx, default_g_idx(256, group_size))


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, True), (4, 32, False), (8, -1, True)])
def test_rtn_tensors_by_row_chunks_equal_the_whole_weight(monkeypatch, bits, group_size, symmetric):
    """The build quantizes a big linear ROW_CHUNK output channels at a time (bounded float32 temporaries); the
    result is the one-piece quantization of the whole weight, including a ragged last chunk."""
    from compiler.quantize import layout
    from compiler.quantize.layout import wna16_tensors

    w = torch.randn(100, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    whole = wna16_tensors(quantize_rtn(w, bits, group_size, symmetric, scale_dtype=torch.bfloat16), torch.bfloat16)
    monkeypatch.setattr(layout, "ROW_CHUNK", 24)
    chunked = layout.rtn_tensors(w, bits, group_size, symmetric, torch.bfloat16)
    assert chunked.keys() == whole.keys()
    for k in whole:
        assert torch.equal(chunked[k], whole[k]), k
