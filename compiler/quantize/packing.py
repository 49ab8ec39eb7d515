"""INT4/INT8 weight layouts of the checkpoint formats Spanda reads and writes (no dependency on AutoGPTQ or
AutoAWQ, which are unmaintained).

Notation: a linear layer's weight ``W: [out, in]`` quantized per group of ``group_size`` input channels;
integer codes ``q: [in, out]`` in [0, 2^bits), zero points ``z: [groups, out]``, scales ``s: [groups, out]``,
``W[o, i] = (q[i, o] - z[g(i), o]) * s[g(i), o]`` with ``g(i) = g_idx[i]``.

GPTQ (AutoGPTQ ``QuantLinear``)::

    qweight [in * bits / 32, out] int32   word r packs rows r*pack .. r*pack+pack-1 of q, lowest bits first
    qzeros  [groups, out * bits / 32] int32   packs consecutive output columns of z, lowest bits first
    scales  [groups, out] fp16            g_idx [in] int32 (act-order: any permutation of groups)
    checkpoint_format "gptq" (v1) stores z - 1 in qzeros (the historical off-by-one); "gptq_v2" stores z.

AWQ GEMM (AutoAWQ ``WQLinear_GEMM``), 4-bit only::

    qweight [in, out / 8] int32   word c packs columns c*8 + ORDER[k] in nibble k (ORDER = 0 2 4 6 1 3 5 7)
    qzeros  [groups, out / 8] int32 with the same interleave; scales [groups, out] fp16; no off-by-one.
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
GPTQ_FORMATS = ("gptq", "gptq_v2")


def _pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack ``32 // bits`` consecutive entries along ``dim`` of an int tensor into one int32, lowest first."""
    per = 32 // bits
    if values.shape[dim] % per:
        raise ValueError(f"dimension {dim} of size {values.shape[dim]} is not a multiple of {per}")
    v = values.to(torch.int64).movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], -1, per)
    shifts = torch.arange(per, dtype=torch.int64, device=v.device) * bits
    words = (v << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # as signed int32
    return words.to(torch.int32).movedim(-1, dim)


def _unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    per = 32 // bits
    w = words.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64, device=w.device) * bits
    v = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return v.reshape(*w.shape[:-1], -1).movedim(-1, dim).to(torch.int32)


def pack_gptq(q: torch.Tensor, z: torch.Tensor, bits: int, checkpoint_format: str = "gptq"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [in, out] codes, z: [groups, out] zero points -> (qweight, qzeros) in the given GPTQ format."""
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"checkpoint_format {checkpoint_format!r}: expected one of {GPTQ_FORMATS}")
    stored = z - 1 if checkpoint_format == "gptq" else z
    return _pack(q, bits, dim=0), _pack(stored & ((1 << bits) - 1), bits, dim=1)


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int, checkpoint_format: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight, qzeros) -> (q [in, out], z [groups, out]); the format must be given, never guessed: reading
    v1 as v2 (or back) shifts every zero point by one and silently corrupts the model."""
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"checkpoint_format {checkpoint_format!r}: expected one of {GPTQ_FORMATS}")
    z = _unpack(qzeros, bits, dim=1)
    if checkpoint_format == "gptq":
        z = (z + 1) & ((1 << bits) - 1)
    return _unpack(qweight, bits, dim=0), z


def pack_awq(q: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ GEMM layout (4-bit): q [in, out], z [groups, out] -> (qweight [in, out/8], qzeros [groups, out/8])."""
    order = torch.tensor(AWQ_ORDER)

    def interleave(x: torch.Tensor) -> torch.Tensor:
        cols = x.shape[1]
        if cols % 8:
            raise ValueError(f"AWQ packs 8 output columns per word; {cols} is not a multiple of 8")
        idx = (torch.arange(cols // 8).unsqueeze(1) * 8 + order).reshape(-1)
        return x[:, idx]

    return _pack(interleave(q), 4, dim=1), _pack(interleave(z), 4, dim=1)


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inverse = torch.argsort(torch.tensor(AWQ_ORDER))

    def deinterleave(x: torch.Tensor) -> torch.Tensor:
        cols = x.shape[1]
        idx = (torch.arange(cols // 8).unsqueeze(1) * 8 + inverse).reshape(-1)
        return x[:, idx]

    return deinterleave(_unpack(qweight, 4, dim=1)), deinterleave(_unpack(qzeros, 4, dim=1))


def dequantize(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """W [out, in] float32 = ((q - z[g_idx]) * s[g_idx]).T"""
    return ((q.float() - z[g_idx].float()) * s[g_idx].float()).t()


def default_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """Group of each input channel without act-order (group_size -1: one group, per-channel)."""
    gs = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32) // gs
