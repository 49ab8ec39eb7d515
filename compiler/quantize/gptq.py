"""GPTQ (Frantar et al. 2022), written from the paper and the behaviour of its reference implementation (no
dependency on AutoGPTQ): each column quantized in turn and its rounding error spread over the columns not yet
quantized through the upper Cholesky factor of the dampened inverse Hessian, in blocks, with optional activation
order and static groups; output rows processed in chunks to bound the float32 working copy.
"""

from __future__ import annotations

import logging

import torch

from compiler.quantize.groups import _codes, group_params
from compiler.quantize.rtn import QuantizedLinear
from compiler.quantize.spec import CalibrationError

log = logging.getLogger("spanda.compiler")


def _inverse_hessian_chol(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of the inverse of the dampened Hessian (retrying with more damping)."""
    diag = torch.arange(h.shape[0], device=h.device)
    damp = damp_percent * torch.mean(torch.diag(h))
    for attempt in range(6):
        hd = h.clone()
        hd[diag, diag] += damp if damp > 0 else 1e-8
        lower, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper
        damp = damp * 10 if damp > 0 else torch.mean(torch.diag(h)) * 1e-3
        log.warning("GPTQ: Hessian not positive definite; retrying with damping %.3g (attempt %d)",
                    float(damp), attempt + 2)
    raise CalibrationError("GPTQ: the Hessian stays singular even with heavy damping")


# float32 working copy of the rows gptq_quantize processes at once. On the CPU the column loop's cost is
# arithmetic (chunks cost nothing extra); on a GPU it is one launch per column and step, paid again by every
# chunk, and memory is plentiful: chunks there only for very large projections.
GPTQ_CHUNK_BYTES = 256 << 20
GPTQ_CHUNK_BYTES_GPU = 8 << 30


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 128,
                  sym: bool = True, act_order: bool = False, static_groups: bool = False,
                  damp_percent: float = 0.01, block_size: int = 128, dtype: torch.dtype | None = None,
                  chunk_bytes: int | None = None) -> QuantizedLinear:
    """GPTQ of ``w [out, in]`` given ``hessian [in, in]`` (any positive multiple of X^T X).

    Columns are quantized one at a time in blocks of ``block_size``; each column's rounding error is spread
    over the not-yet-quantized columns through the Cholesky factor of the inverse Hessian (lazy batch
    updates between blocks). Group parameters are computed from the current (error-updated) weights when
    quantization enters each group, as in the GPTQ paper and AutoGPTQ. Rows (output channels) never mix: given
    the shared inverse Hessian each row's codes depend on that row alone, so the rows are processed in chunks
    of at most ``chunk_bytes`` (GPTQ_CHUNK_BYTES on the CPU, GPTQ_CHUNK_BYTES_GPU elsewhere) of float32 working
    copy, with identical results: the temporaries of a large projection stay a fixed size (a 2048 x 16384
    linear: 157 MB of peak growth in 32 MB chunks, 314 MB unchunked, 469 MB before chunking existed)."""
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    if in_f % gs:
        raise CalibrationError(f"in_features {in_f} is not a multiple of group_size {gs}")
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        H = H[perm][:, perm]
    else:
        perm = torch.arange(in_f, device=H.device)
    hinv = _inverse_hessian_chol(H, damp_percent)
    del H
    inv = torch.argsort(perm)
    n_groups = in_f // gs
    codes = torch.empty(in_f, out_f, dtype=torch.int32)
    scales = torch.empty(n_groups, out_f)
    zeros = torch.empty(n_groups, out_f)
    chunk_bytes = chunk_bytes or (GPTQ_CHUNK_BYTES if w.device.type == "cpu" else GPTQ_CHUNK_BYTES_GPU)
    rows = max(1, chunk_bytes // (4 * in_f))
    col_group = None
    for r0 in range(0, out_f, rows):
        r1 = min(r0 + rows, out_f)
        c, sc, zc, col_group = _gptq_rows(w[r0:r1], dead, perm if act_order else None, hinv, bits, gs, sym,
                                          static_groups or group_size == -1, block_size, dtype)
        codes[:, r0:r1] = c[:, inv].t().to(torch.int32).cpu()
        scales[:, r0:r1] = sc.cpu()
        zeros[:, r0:r1] = zc.cpu()
    g_idx = col_group[inv]
    return QuantizedLinear(codes, zeros.to(torch.int32), scales.half(), g_idx.to(torch.int32).cpu(), bits, group_size,
                           sym)


def _gptq_rows(w: torch.Tensor, dead: torch.Tensor, perm: torch.Tensor | None, hinv: torch.Tensor, bits: int,
               gs: int, sym: bool, static_groups: bool, block_size: int, dtype: torch.dtype | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """gptq_quantize's column loop over some rows ``w [rows, in]``: (codes [rows, in] in the permuted column
    order (perm None: the identity), scales and zeros [groups, rows], the group of each permuted column)."""
    maxq = 2**bits - 1
    out_f, in_f = w.shape
    W = w.float().clone()
    W[:, dead] = 0
    n_groups = in_f // gs
    static: list[tuple[torch.Tensor, torch.Tensor]] = []
    if static_groups:
        static = [group_params(W[:, g * gs:(g + 1) * gs], bits, sym, dtype) for g in range(n_groups)]
    if perm is not None:
        W = W[:, perm]
    codes = torch.zeros_like(W)
    scales = torch.zeros(n_groups, out_f, device=W.device)
    zeros = torch.zeros(n_groups, out_f, device=W.device)
    col_group = torch.empty(in_f, dtype=torch.long, device=W.device)  # group of each permuted column
    s = z = None
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if static:
                g = (int(perm[j]) if perm is not None else j) // gs
                s, z = static[g]
            elif j % gs == 0:
                g = j // gs
                cols = torch.cat((W1[:, i:], W[:, i2:j + gs]), 1)[:, :gs] if j + gs > i2 else W1[:, i:i + gs]
                s, z = group_params(cols, bits, sym, dtype)
            else:
                g = j // gs
            scales[g], zeros[g] = s, z
            col_group[j] = g
            wcol = W1[:, i]
            q = _codes(wcol, s, z, maxq)
            codes[:, j] = q
            e = (wcol - (q - z) * s) / h1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes, scales, zeros, col_group
