"""Calibration-based quantization: GPTQ, AWQ, SmoothQuant INT8 W8A8 and FP8 with static input scales.

Written from the papers (GPTQ: Frantar et al. 2022; AWQ: Lin et al. 2023; SmoothQuant: Xiao et al. 2022) and
the behaviour of their reference implementations; no dependency on AutoGPTQ or AutoAWQ.

The model is run layer by layer over the calibration tokens in float32: only one decoder layer's weights and
the calibration hidden states ``[N, L, H]`` are held at a time (plus, per linear input, a Gram matrix
``X^T X`` and per-channel statistics), so memory is bounded by one layer whatever the model size. Weights are
read lazily through ``read(hf_name) -> Tensor``.

A *site* is one quantized linear of the artifact: its parameter name and the Hugging Face weights concatenated
along dim 0 to form it (q/k/v fused, gate/up fused, or single projections). The sites sharing one input
(q/k/v; gate/up; o; down) form an *input group*: they see the same activations, get one Hessian, and share
the per-input-channel scales of AWQ and SmoothQuant.

Flows per layer:

- GPTQ, SmoothQuant, FP8 (sequential): the groups are processed in forward order (qkv, o, gate/up, down);
  each group's statistics are gathered from the layer run with the groups before it already quantized (so
  GPTQ corrects for the upstream error, as AutoGPTQ's ``true_sequential``), and the next layer's input comes
  from the fully quantized layer.
- AWQ (as AutoAWQ): one float pass gathers every group's statistics and the next layer's input; then scales are
  searched and folded in the order down (into up_proj rows), gate/up (into post_attention_layernorm),
  o (into v_proj rows, only when v's output matches o's input, i.e. MHA), q/k/v (into input_layernorm), so
  each search sees the weights that will be quantized; then clip search and quantization of every site.

Quantized weights are installed back into the layer as float32 weights *dequantized from the emitted
tensors* (with the activation quantization of W8A8 emulated), so what calibration and ``model_nll`` see is
what the runtime's ops compute (up to their accumulation order).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from compiler.models.config import ModelConfig, rope_cos_sin_cache
from compiler.quantize import layout
from compiler.quantize.rtn import QuantizedLinear, div_exact
from runtime.ops.quant_linear import FP8_MAX, INT8_MAX, SCALE_FLOOR, dequantize_wna16

log = logging.getLogger("spanda.compiler")

METHODS = ("gptq", "awq", "int8_smoothquant", "fp8_static")
TEXT_SUFFIXES = frozenset({
    ".py", ".pyi", ".txt", ".md", ".rst", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".js",
    ".ts", ".sh", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".html", ".css", ".tex",
})

Reader = Callable[[str], torch.Tensor]
Emit = Callable[[str, dict[str, torch.Tensor]], None]


class CalibrationError(ValueError):
    """The calibration data or the quantization request is unusable; the message says why."""


# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Site:
    """``name``: the artifact parameter the quantized op replaces; ``sources``: the HF weights concatenated
    along dim 0 to form it (all reading the same input)."""

    name: str
    sources: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources))
        if not self.sources:
            raise CalibrationError(f"site {self.name!r} has no sources")


@dataclass(frozen=True)
class QuantSpec:
    """What to do. ``symmetric`` None means the method's usual choice (GPTQ symmetric, AWQ asymmetric).

    GPTQ: ``act_order`` quantizes columns in decreasing Hessian diagonal; with ``static_groups`` False the
    groups are formed in that order (g_idx[c] = rank(c) // group_size, stored permuted, as AutoGPTQ's
    desc_act), with True they stay the contiguous groups of the original order (identity g_idx, parameters
    computed up front). ``damp_percent``: fraction of the mean Hessian diagonal added to it.
    AWQ: ``awq_grid`` exponents alpha = i / grid; ``awq_duo_scaling`` divides by mean|w|^(1-alpha) as
    AutoAWQ's default does; ``awq_clip`` the per-group range shrink search (not on q/k rows).
    SmoothQuant: ``smoothquant_alpha`` the migration strength. FP8: ``fp8_per_channel`` weight scales.
    ``chunk_tokens``: tokens per forward chunk (bounds the attention and MLP temporaries).
    ``error_tokens``: calibration tokens kept per input to report each site's output error."""

    method: str
    bits: int = 4
    group_size: int = 128
    symmetric: bool | None = None
    act_order: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    block_size: int = 128
    smoothquant_alpha: float = 0.5
    awq_grid: int = 20
    awq_clip: bool = True
    awq_duo_scaling: bool = False
    awq_clip_grid: int = 20
    awq_max_shrink: float = 0.5
    fp8_per_channel: bool = True
    chunk_tokens: int = 4096
    error_tokens: int = 512

    def __post_init__(self):
        if self.method not in METHODS:
            raise CalibrationError(f"quantization method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.method in ("gptq", "awq") and self.bits not in (4, 8):
            raise CalibrationError(f"{self.method}: bits must be 4 or 8, not {self.bits}")
        if self.method == "int8_smoothquant" and self.bits != 8:
            object.__setattr__(self, "bits", 8)
        if self.group_size != -1 and self.group_size <= 0:
            raise CalibrationError(f"group_size must be positive or -1, not {self.group_size}")
        if not 0 <= self.damp_percent < 1:
            raise CalibrationError(f"damp_percent {self.damp_percent} outside [0, 1)")
        if not 0 <= self.smoothquant_alpha <= 1:
            raise CalibrationError(f"smoothquant_alpha {self.smoothquant_alpha} outside [0, 1]")

    @property
    def sym(self) -> bool:
        return self.method != "awq" if self.symmetric is None else self.symmetric

    @property
    def weight_only(self) -> bool:
        return self.method in ("gptq", "awq")


# ----------------------------------------------------------------------------------------------- data


def _read_docs(path: Path, encode: Callable[[str], Sequence[int]] | None, tokenizer_sha256: str | None = None,
               used: dict[str, int] | None = None) -> list[list[int]]:
    """Documents as token ids. A jsonl row's ``token_ids`` are used as they are unless the row names the
    tokenizer that made them (``tokenizer_sha256``, the sha256 of its tokenizer.json) and that is not this
    checkpoint's: then the row's ``text`` is tokenized instead (ids of another vocabulary would be other
    tokens, or out of range). ``used`` counts rows by source ("token_ids" / "text")."""
    used = used if used is not None else {}
    def enc(text: str, where: str) -> list[int]:
        if encode is None:
            raise CalibrationError(f"{where}: text needs a tokenizer (encode is None)")
        return list(encode(text))

    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise CalibrationError(f"{path}: no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
        return [enc(p.read_text(encoding="utf-8", errors="replace"), str(p)) for p in files]
    if not path.is_file():
        raise CalibrationError(f"{path}: calibration data not found")
    if path.suffix.lower() == ".jsonl":
        docs = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CalibrationError(f"{path}:{n}: not valid JSON ({e})") from None
                if not isinstance(row, dict):
                    raise CalibrationError(f'{path}:{n}: expected {{"token_ids": [...]}} or {{"text": "..."}}')
                made_by = row.get("tokenizer_sha256")
                foreign = made_by is not None and tokenizer_sha256 is not None and made_by != tokenizer_sha256
                if foreign and not isinstance(row.get("text"), str):
                    raise CalibrationError(
                        f"{path}:{n}: token_ids were made by the tokenizer with sha256 {made_by[:16]}..., this "
                        f"checkpoint's tokenizer.json is {tokenizer_sha256[:16]}...; give the row's text, or ids "
                        "from this tokenizer")
                if "token_ids" in row and not foreign:
                    used["token_ids"] = used.get("token_ids", 0) + 1
                    ids = row["token_ids"]
                    if not isinstance(ids, list) or not all(isinstance(t, int) and t >= 0 for t in ids):
                        raise CalibrationError(f"{path}:{n}: token_ids must be a list of non-negative integers")
                    docs.append(ids)
                elif isinstance(row.get("text"), str):
                    used["text"] = used.get("text", 0) + 1
                    docs.append(enc(row["text"], f"{path}:{n}"))
                else:
                    raise CalibrationError(f'{path}:{n}: expected {{"token_ids": [...]}} or {{"text": "..."}}')
        return docs
    return [enc(path.read_text(encoding="utf-8", errors="replace"), str(path))]


def load_calibration(path: str | Path, encode: Callable[[str], Sequence[int]] | None, num_samples: int,
                     seq_len: int, seed: int = 0, tokenizer_sha256: str | None = None,
                     vocab_size: int | None = None) -> tuple[torch.Tensor, str]:
    """Calibration token ids ``[num_samples, seq_len]`` int64 and the sha256 of those ids (int64 LE bytes).

    ``path``: a ``.jsonl`` of ``{"token_ids": [...]}`` or ``{"text": "..."}`` rows, a text file, or a folder of
    text files (read recursively in sorted relative-path order). The documents are concatenated in order, cut
    into consecutive non-overlapping windows of ``seq_len`` tokens (so rows of a jsonl of ``seq_len`` ids stay
    whole), and ``num_samples`` windows are drawn without replacement by a generator seeded with ``seed``,
    kept in stream order. ``tokenizer_sha256``: this checkpoint's tokenizer.json (rows whose ids another
    tokenizer made are re-tokenized from their text); ``vocab_size``: ids at or above it are refused."""
    if num_samples < 1 or seq_len < 1:
        raise CalibrationError(f"num_samples ({num_samples}) and seq_len ({seq_len}) must be positive")
    path = Path(path)
    used: dict[str, int] = {}
    docs = _read_docs(path, encode, tokenizer_sha256, used)
    stream = torch.tensor([t for d in docs for t in d], dtype=torch.int64)
    if vocab_size is not None and stream.numel() and int(stream.max()) >= vocab_size:
        raise CalibrationError(
            f"{path}: token id {int(stream.max())} is outside the model's vocabulary ({vocab_size} tokens): these "
            "ids were made by another tokenizer; give text rows (or a text file) to tokenize with the checkpoint's")
    n_windows = stream.numel() // seq_len
    if n_windows < num_samples:
        raise CalibrationError(
            f"{path}: too little calibration data: {stream.numel()} tokens make {n_windows} windows of "
            f"{seq_len}, but {num_samples} samples were asked for (need {num_samples * seq_len} tokens)")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_windows, generator=g)[:num_samples].sort().values
    ids = stream[pick.unsqueeze(1) * seq_len + torch.arange(seq_len)].contiguous()
    sha = hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest()
    how = ", ".join(f"{v} rows from {k}" for k, v in sorted(used.items()))
    log.info("calibration data %s: %d documents%s, %d tokens; %d samples x %d (seed %d), sha256 %s",
             path, len(docs), f" ({how})" if how else "", stream.numel(), num_samples, seq_len, seed, sha[:16])
    return ids, sha


# ----------------------------------------------------------------------------------------------- quantizers


def round_scale(s: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The scale as the artifact stores it: fp16 (as rtn.py and GPTQ checkpoints), then the model dtype the
    internal layout stores scales in (bf16 rounds further); never 0 (an all-zero group)."""
    r = s.half().float()
    if dtype is not None and dtype not in (torch.float16, torch.float32, torch.float64):
        r = r.to(dtype).float()
    return torch.where(r > 0, r, torch.full_like(r, 2.0**-24))


def group_params(w: torch.Tensor, bits: int, sym: bool, dtype: torch.dtype | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``w [rows, cols]``: (scale, zero) as rtn.quantize_rtn computes them (symmetric: zero
    2^(bits-1), scale 2 max|w| / maxq; asymmetric: [min, max] widened to hold 0), scale rounded as stored."""
    maxq = 2**bits - 1
    if sym:
        s = div_exact(w.abs().amax(1).clamp_min(1e-8) * 2, maxq)
        z = torch.full_like(s, (maxq + 1) // 2)
    else:
        lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
        s = div_exact(hi - lo, maxq).clamp_min(1e-8)
        z = torch.round(-lo / s)
    return round_scale(s, dtype), z


def _codes(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / s) + z, 0, maxq)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool, dtype: torch.dtype | None = None
                  ) -> torch.Tensor:
    """Group-wise RTN quantize-dequantize of ``w [out, in]`` (groups along ``in``), float32."""
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    wg = w.float().reshape(out_f * (in_f // gs), gs)
    s, z = group_params(wg, bits, sym, dtype)
    s, z = s.unsqueeze(1), z.unsqueeze(1)
    return ((_codes(wg, s, z, 2**bits - 1) - z) * s).reshape(out_f, in_f)


def quantize_groups(w: torch.Tensor, bits: int, group_size: int, sym: bool, dtype: torch.dtype | None = None
                    ) -> QuantizedLinear:
    """RTN of ``w [out, in]`` into a QuantizedLinear (identical to rtn.quantize_rtn when dtype is None)."""
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    if in_f % gs:
        raise CalibrationError(f"in_features {in_f} is not a multiple of group_size {gs}")
    wg = w.float().reshape(out_f, in_f // gs, gs)
    s, z = group_params(wg.reshape(-1, gs), bits, sym, dtype)
    s, z = s.reshape(out_f, -1), z.reshape(out_f, -1)
    q = _codes(wg, s.unsqueeze(-1), z.unsqueeze(-1), 2**bits - 1).reshape(out_f, in_f)
    return QuantizedLinear(q.t().contiguous().to(torch.int32).cpu(), z.t().contiguous().to(torch.int32).cpu(),
                           s.t().contiguous().half().cpu(), torch.arange(in_f, dtype=torch.int32) // gs,
                           bits, group_size, sym)


def dequantize(ql: QuantizedLinear) -> torch.Tensor:
    """QuantizedLinear -> float32 ``[out, in]`` in the original input-channel order."""
    g = ql.g_idx.long()
    return ((ql.q.float() - ql.z.float()[g]) * ql.s.float()[g]).t().contiguous()


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


def awq_search_scales(w: torch.Tensor, gram: torch.Tensor, x_absmean: torch.Tensor, bits: int, group_size: int,
                      sym: bool, grid: int = 20, duo_scaling: bool = False, dtype: torch.dtype | None = None
                      ) -> tuple[torch.Tensor, float, float]:
    """AWQ scale search for the weights ``w [out, in]`` (all linears sharing the input) given the input's
    Gram matrix ``X^T X`` and mean |x| per channel: s = mean|x|^alpha (/ mean|w~|^(1-alpha) with duo
    scaling), normalised by sqrt(max s * min s), alpha = i / grid, minimising ||X W^T - (X/s) Q(W s)^T||^2
    (computed exactly from the Gram matrix). Returns (s [in], best alpha, relative loss); alpha 0 is plain RTN,
    so the result is never worse than RTN on the calibration data."""
    W = w.float()
    G = gram.float()
    ref = torch.sum((W @ G) * W).clamp_min(1e-30)
    x_mean = x_absmean.float()
    w_mean = None
    if duo_scaling:
        gs = W.shape[1] if group_size == -1 else group_size
        wg = W.abs().reshape(-1, gs)
        w_mean = (wg / wg.amax(1, keepdim=True).clamp_min(1e-12)).reshape(W.shape).mean(0)
    best = (math.inf, 0.0, torch.ones_like(x_mean))
    for i in range(grid):
        alpha = i / grid
        if w_mean is not None:
            s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
        else:
            s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
        d = W - fake_quantize(W * s, bits, group_size, sym, dtype) / s
        loss = float(torch.sum((d @ G) * d) / ref)
        if loss < best[0]:
            best = (loss, alpha, s)
    return best[2], best[1], best[0]


def awq_clip(w: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int, sym: bool, rows: torch.Tensor | None
             = None, grid: int = 20, max_shrink: float = 0.5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """AWQ clip search: per output row and group, the max |w| shrunk by the factor (1 - i / grid), i < grid *
    max_shrink, minimising the group's partial output error x_g (w_g - Q(clip(w_g)))^T over the calibration
    inputs (exactly, from the diagonal blocks of ``gram``). ``rows``: bool [out] of the rows to clip (AutoAWQ
    leaves q/k alone). Returns the clipped ``w`` (float32)."""
    W = w.float()
    out_f, in_f = W.shape
    gs = in_f if group_size == -1 else group_size
    ng = in_f // gs
    if rows is not None and not bool(rows.any()):
        return W.clone()
    sel = W if rows is None else W[rows]
    wg = sel.reshape(-1, ng, gs)  # [r, ng, gs]
    gb = torch.stack([gram[g * gs:(g + 1) * gs, g * gs:(g + 1) * gs] for g in range(ng)]).float()  # [ng, gs, gs]
    amax = wg.abs().amax(-1, keepdim=True)
    best_err = torch.full(wg.shape[:2], math.inf, device=W.device)
    best_max = amax.clone()
    for i in range(max(1, int(max_shrink * grid))):
        mx = amax * (1 - i / grid)
        cur = torch.clamp(wg, -mx, mx)
        d = wg - fake_quantize(cur.reshape(sel.shape), bits, group_size, sym, dtype).reshape(wg.shape)
        err = torch.einsum("rgi,gij,rgj->rg", d, gb, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better.unsqueeze(-1), mx, best_max)
    clipped = torch.clamp(wg, -best_max, best_max).reshape(sel.shape)
    outw = W.clone()
    if rows is None:
        return clipped
    outw[rows] = clipped
    return outw


def smoothquant_scales(x_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha) (as the SmoothQuant reference, floors 1e-5)."""
    w_max = w.float().abs().amax(0).clamp(min=1e-5)
    return (x_absmax.float().clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


# ----------------------------------------------------------------------------------------------- site tensors


def _int8_act(x: torch.Tensor) -> torch.Tensor:
    s = (x.abs().amax(-1, keepdim=True) / INT8_MAX).clamp_min(SCALE_FLOOR)
    return torch.round(x / s).clamp(-INT8_MAX, INT8_MAX) * s


def _fp8_act(scale: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    sc = float(scale.reshape(-1)[0])

    def act(x: torch.Tensor) -> torch.Tensor:
        return (x / sc).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * sc

    return act


def _fp8_act_dynamic(x: torch.Tensor) -> torch.Tensor:
    s = (x.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(SCALE_FLOOR)
    return (x / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s


def site_linear(tensors: dict[str, torch.Tensor], bits: int | None = None, group_size: int | None = None
                ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor] | None]:
    """What a quantized op computes, from its internal-layout tensors: (float32 weight ``[N, K]`` in the
    input's channel order, activation quantize-dequantize or None). wna16 needs ``bits``/``group_size``."""
    if "qweight" in tensors:
        if bits is None or group_size is None:
            raise CalibrationError("wna16 tensors need bits and group_size")
        w = dequantize_wna16(tensors["qweight"], tensors["scales"], tensors["zeros"], bits, group_size)
        perm = tensors.get("perm")
        if perm is not None:
            full = torch.empty_like(w)
            full[perm.long()] = w
            w = full
        return w.t().contiguous(), None
    weight, wscale = tensors["weight"], tensors["weight_scale"]
    w = weight.float() * wscale.float().reshape(-1, 1)
    if weight.dtype == torch.int8:
        if tensors.get("input_scale") is not None:
            sc = float(tensors["input_scale"].reshape(-1)[0])
            return w, lambda x: torch.round(x / sc).clamp(-INT8_MAX, INT8_MAX) * sc
        return w, _int8_act
    if tensors.get("input_scale") is not None:
        return w, _fp8_act(tensors["input_scale"])
    return w, _fp8_act_dynamic


# ----------------------------------------------------------------------------------------------- the forward

_SOURCE_RE = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight$")
_GROUP_OF = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in", "gate": "mlp_in", "up": "mlp_in",
             "down": "down_in"}
GROUP_ORDER = ("attn_in", "o_in", "mlp_in", "down_in")
_NORM_OF = {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"}


def _parse_source(name: str) -> tuple[int, str, str]:
    m = _SOURCE_RE.match(name)
    if not m:
        raise CalibrationError(f"site source {name!r} is not a decoder-layer projection weight "
                               "(model.layers.N.self_attn|mlp.X_proj.weight)")
    return int(m.group(1)), f"{m.group(2)}.{m.group(3)}_proj", _GROUP_OF[m.group(3)]


class _Layer:
    """One decoder layer in float32: weights by short name ('self_attn.q_proj.weight', ...), and per
    projection an optional activation quantize-dequantize (W8A8 emulation)."""

    def __init__(self, cfg: ModelConfig, idx: int, read: Reader, device: torch.device):
        self.cfg, self.idx, self.device = cfg, idx, device
        self.prefix = f"model.layers.{idx}."
        names = ["input_layernorm.weight", "post_attention_layernorm.weight"]
        names += [f"self_attn.{p}_proj.weight" for p in "qkvo"]
        names += [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        if cfg.qkv_bias:
            names += [f"self_attn.{p}_proj.bias" for p in "qkv"]
        if cfg.o_bias:
            names.append("self_attn.o_proj.bias")
        if cfg.mlp_bias:
            names += [f"mlp.{p}_proj.bias" for p in ("gate", "up", "down")]
        self.w = {n: read(self.prefix + n).to(device=device, dtype=torch.float32) for n in names}
        self.act: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        self.window = cfg.sliding_windows[idx] if cfg.sliding_windows else None

    def lin(self, x: torch.Tensor, proj: str) -> torch.Tensor:
        a = self.act.get(proj)
        y = (a(x) if a is not None else x) @ self.w[proj + ".weight"].t()
        b = self.w.get(proj + ".bias")
        return y if b is None else y + b

    def norm(self, x: torch.Tensor, which: str) -> torch.Tensor:
        w = self.w[which + ".weight"]
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps))

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        n, L, _ = x.shape
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        q = self.lin(x, "self_attn.q_proj").view(n, L, nh, hd).transpose(1, 2)
        k = self.lin(x, "self_attn.k_proj").view(n, L, nkv, hd).transpose(1, 2)
        v = self.lin(x, "self_attn.v_proj").view(n, L, nkv, hd).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if nkv != nh:
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        if self.window is not None and self.window < L:
            pos = torch.arange(L, device=x.device)
            d = pos.view(-1, 1) - pos.view(1, -1)
            mask = (d >= 0) & (d < self.window)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd**-0.5)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=hd**-0.5)
        return o.transpose(1, 2).reshape(n, L, nh * hd)

    def mlp_mid(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.lin(x, "mlp.gate_proj")) * self.lin(x, "mlp.up_proj")

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.lin(self.attention(self.norm(h, "input_layernorm"), cos, sin), "self_attn.o_proj")
        return h + self.lin(self.mlp_mid(self.norm(h, "post_attention_layernorm")), "mlp.down_proj")

    def install(self, short_sources: Sequence[str], weight: torch.Tensor,
                act: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """Replace the float weights of the site's projections by the site's (dequantized) weight rows."""
        start = 0
        for proj in short_sources:
            rows = self.w[proj + ".weight"].shape[0]
            self.w[proj + ".weight"] = weight[start:start + rows].to(self.device)
            start += rows
            if act is None:
                self.act.pop(proj, None)
            else:
                self.act[proj] = act
        if start != weight.shape[0]:
            raise CalibrationError(f"layer {self.idx}: site weight has {weight.shape[0]} rows, sources {start}")


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _cos_sin(cfg: ModelConfig, L: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    cs = rope_cos_sin_cache(cfg, L).to(device)
    cos, sin = cs.chunk(2, dim=-1)
    return cos, sin


def _embed(read: Reader, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    emb = read("model.embed_tokens.weight")
    return emb[ids.long().cpu()].to(device=device, dtype=torch.float32)


def _head(cfg: ModelConfig, read: Reader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    norm = read("model.norm.weight").to(device=device, dtype=torch.float32)
    head = read("model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight")
    return norm, head.to(device=device, dtype=torch.float32)


def _chunks(n: int, L: int, chunk_tokens: int) -> list[tuple[int, int]]:
    step = max(1, chunk_tokens // max(L, 1))
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def _site_layout(sites: Sequence[Site], num_layers: int) -> dict[int, dict[str, list[tuple[Site, list[str]]]]]:
    """layer -> group -> [(site, short source names)]."""
    out: dict[int, dict[str, list[tuple[Site, list[str]]]]] = {}
    seen: dict[str, str] = {}
    for site in sites:
        parsed = [_parse_source(s) for s in site.sources]
        layers = {p[0] for p in parsed}
        groups = {p[2] for p in parsed}
        if len(layers) != 1 or len(groups) != 1:
            raise CalibrationError(f"site {site.name}: sources {site.sources} do not share one layer and input")
        (layer,), (group,) = layers, groups
        if layer >= num_layers:
            raise CalibrationError(f"site {site.name}: layer {layer} >= num_layers {num_layers}")
        for s in site.sources:
            if s in seen:
                raise CalibrationError(f"{s} is a source of both {seen[s]} and {site.name}")
            seen[s] = site.name
        out.setdefault(layer, {}).setdefault(group, []).append((site, [p[1] for p in parsed]))
    return out


def _apply_overrides(layer: _Layer, emitted: dict[str, dict[str, torch.Tensor]],
                     plan: dict[str, list[tuple[Site, list[str]]]], bits: int | None, group_size: int | None) -> None:
    for name, tensors in emitted.items():
        if not name.startswith(layer.prefix):
            continue
        short = name[len(layer.prefix):]
        if short in layer.w and set(tensors) == {"weight"}:  # a float tensor a method changed (norm weights)
            layer.w[short] = tensors["weight"].to(layer.device, torch.float32)
    for group in plan.values():
        for site, shorts in group:
            if site.name in emitted:
                w, act = site_linear(emitted[site.name], bits, group_size)
                layer.install(shorts, w, act)


@torch.no_grad()
def model_nll(cfg: ModelConfig, read: Reader, ids: torch.Tensor, *, emitted: dict[str, dict[str, torch.Tensor]]
              | None = None, sites: Sequence[Site] = (), bits: int | None = None, group_size: int | None = None,
              device: str | torch.device = "cpu", chunk_tokens: int = 4096, return_logits: bool = False):
    """Layer-by-layer float32 forward of ``ids [N, L]`` (whole rows, causal, positions 0..L-1).

    With ``emitted`` (site name -> internal-layout tensors, and replaced norm weights by name) the
    quantized model is evaluated as the runtime computes it. Returns (sum of next-token NLL, number of
    predicted tokens), or the logits ``[N, L, V]`` with ``return_logits``."""
    device = torch.device(device)
    emitted = emitted or {}
    n, L = ids.shape
    plan = _site_layout(sites, cfg.num_layers)
    cos, sin = _cos_sin(cfg, L, device)
    h = _embed(read, ids, device)
    for i in range(cfg.num_layers):
        layer = _Layer(cfg, i, read, device)
        _apply_overrides(layer, emitted, plan.get(i, {}), bits, group_size)
        for a, b in _chunks(n, L, chunk_tokens):
            h[a:b] = layer.forward(h[a:b], cos, sin)
        del layer
    norm_w, head = _head(cfg, read, device)
    logits_all, nll, count = [], 0.0, 0
    tgt = ids.to(device).long()
    for a, b in _chunks(n, L, chunk_tokens):
        hn = norm_w * (h[a:b] * torch.rsqrt(h[a:b].pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))
        logits = hn @ head.t()
        if return_logits:
            logits_all.append(logits.cpu())
            continue
        lp = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt[a:b, 1:].reshape(-1),
                             reduction="sum")
        nll += float(lp.double())
        count += (b - a) * (L - 1)
    if return_logits:
        return torch.cat(logits_all)
    return nll, count


def perplexity(cfg: ModelConfig, read: Reader, ids: torch.Tensor, **kw) -> float:
    """exp(mean next-token NLL) over all rows of ``ids`` (see model_nll for the keyword arguments)."""
    nll, count = model_nll(cfg, read, ids, **kw)
    return math.exp(nll / count)


# ----------------------------------------------------------------------------------------------- calibration


@dataclass
class _Stats:
    """Statistics of one input group over the calibration tokens."""

    gram: torch.Tensor | None = None  # sum x^T x
    abs_sum: torch.Tensor | None = None  # sum |x| per channel
    abs_max: torch.Tensor | None = None  # max |x| per channel
    tokens: int = 0
    sub: list[torch.Tensor] = field(default_factory=list)  # a subsample of rows, for error reporting

    def add(self, x: torch.Tensor, gram: bool, sub_rows: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1])
        if gram:
            g = x2.t() @ x2
            self.gram = g if self.gram is None else self.gram + g
        a = x2.abs()
        s, m = a.sum(0), a.amax(0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.abs_max = m if self.abs_max is None else torch.maximum(self.abs_max, m)
        if sub_rows.numel():
            self.sub.append(x2[sub_rows].clone())
        self.tokens += x2.shape[0]

    @property
    def x_sub(self) -> torch.Tensor:
        return torch.cat(self.sub)


class _Calibrator:
    def __init__(self, cfg: ModelConfig, read: Reader, calib_ids: torch.Tensor, spec: QuantSpec,
                 sites: Sequence[Site], emit: Emit, progress, device: torch.device):
        self.cfg, self.read, self.spec, self.emit, self.device = cfg, read, spec, emit, device
        self.ids = calib_ids
        self.n, self.L = calib_ids.shape
        self.plan = _site_layout(sites, cfg.num_layers)
        self.num_sites = len(sites)
        self.progress = progress
        self.dtype = cfg.torch_dtype
        self.summary: dict[str, Any] = {"method": spec.method, "bits": spec.bits, "group_size": spec.group_size,
                                        "symmetric": spec.sym, "act_order": spec.act_order,
                                        "num_samples": self.n, "seq_len": self.L, "sites": {}, "layers": []}
        total = self.n * self.L
        step = max(1, total // max(1, spec.error_tokens))
        self.sub_idx = torch.arange(0, total, step)[: spec.error_tokens]
        self.cos, self.sin = _cos_sin(cfg, self.L, device)
        self.chunks = _chunks(self.n, self.L, spec.chunk_tokens)
        self.done_sites = 0
        self._bar = None

    # -- helpers

    def _sub_rows(self, a: int, b: int) -> torch.Tensor:
        lo, hi = a * self.L, b * self.L
        m = (self.sub_idx >= lo) & (self.sub_idx < hi)
        return (self.sub_idx[m] - lo).to(self.device)

    def _site_weight(self, layer: _Layer, shorts: list[str]) -> torch.Tensor:
        return torch.cat([layer.w[s + ".weight"] for s in shorts], 0)

    def _group_weight(self, layer: _Layer, group: list[tuple[Site, list[str]]]) -> torch.Tensor:
        return torch.cat([self._site_weight(layer, shorts) for _, shorts in group], 0)

    def _covers(self, layer: _Layer, group_name: str, group: list[tuple[Site, list[str]]]) -> bool:
        """Do the sites cover every projection that reads this input (so an input scale can be folded)?"""
        have = {s for _, shorts in group for s in shorts}
        need = {"attn_in": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"},
                "mlp_in": {"mlp.gate_proj", "mlp.up_proj"}}.get(group_name, set())
        return need <= have

    def _fold_norm(self, layer: _Layer, group_name: str, s: torch.Tensor) -> torch.Tensor:
        """norm_w / s, rounded to the model dtype and emitted; returns the exact effective scale
        norm_w / stored (so the weights are scaled by what the runtime's norm really divides by)."""
        key = _NORM_OF[group_name] + ".weight"
        old = layer.w[key]
        new = (old / s).to(self.dtype)
        self.emit(layer.prefix + key, {"weight": new.cpu()})
        newf = new.to(self.device, torch.float32)
        s_eff = torch.where((old != 0) & (newf != 0), old / newf, s)
        layer.w[key] = newf
        return s_eff

    def _record(self, layer: _Layer, site: Site, w_ref: torch.Tensor, x_sub: torch.Tensor, s: torch.Tensor | None,
                t0: float, extra: dict[str, Any]) -> None:
        """Relative output error of the installed site on the kept calibration rows (original input space)."""
        shorts = [src[len(layer.prefix):-len(".weight")] for src in site.sources]
        w_q = self._site_weight(layer, shorts)
        act = layer.act.get(shorts[0])
        xin = x_sub if s is None else x_sub / s
        y_ref = x_sub @ w_ref.t()
        y_q = (act(xin) if act is not None else xin) @ w_q.t()
        rel = float((y_q - y_ref).norm() / y_ref.norm().clamp_min(1e-30))
        self.summary["sites"][site.name] = {"rel_err": rel, "seconds": round(time.time() - t0, 4), **extra}
        self.done_sites += 1
        if self._bar is not None:
            self._bar.set_postfix_str(f"{site.name.rsplit('.', 2)[-2]} err {rel:.3g}")
            self._bar.update(1)
        if callable(self.progress):
            self.progress(site.name, self.done_sites, self.num_sites)
        log.debug("quantized %s (%s): relative output error %.4g", site.name, self.spec.method, rel)

    def _emit_site(self, layer: _Layer, site: Site, shorts: list[str], tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.cpu() for k, v in tensors.items()}
        self.emit(site.name, tensors)
        w, act = site_linear(tensors, self.spec.bits, self.spec.group_size)
        layer.install(shorts, w.to(self.device), act)

    def _wna16(self, ql: QuantizedLinear) -> dict[str, torch.Tensor]:
        return layout.wna16_tensors(ql, self.dtype)

    # -- statistics passes

    def _observe(self, fn: Callable[[int, int], torch.Tensor | None], stats: _Stats | None, gram: bool) -> None:
        for a, b in self.chunks:
            x = fn(a, b)
            if stats is not None and x is not None:
                stats.add(x, gram, self._sub_rows(a, b))

    # -- per-group quantization (sequential methods)

    def _quantize_group_sequential(self, layer: _Layer, gname: str, group, st: _Stats) -> None:
        spec = self.spec
        s = None
        if spec.method == "int8_smoothquant" and gname in _NORM_OF:
            if self._covers(layer, gname, group):
                s = smoothquant_scales(st.abs_max, self._group_weight(layer, group), spec.smoothquant_alpha)
                s = self._fold_norm(layer, gname, s)
            else:
                log.warning("layer %d %s: not every projection is quantized; no smoothing", layer.idx, gname)
        x_sub = st.x_sub
        for site, shorts in group:
            t0 = time.time()
            w = self._site_weight(layer, shorts)
            extra: dict[str, Any] = {}
            if spec.method == "gptq":
                ql = gptq_quantize(w, st.gram, spec.bits, spec.group_size, spec.sym, spec.act_order,
                                   spec.static_groups, spec.damp_percent, spec.block_size, self.dtype)
                tensors = self._wna16(ql)
            elif spec.method == "int8_smoothquant":
                tensors = layout.int8_weight(w if s is None else w * s)
            else:  # fp8_static
                tensors = layout.fp8_weight(w, spec.fp8_per_channel)
                amax = float(st.abs_max.max())
                tensors["input_scale"] = torch.tensor([max(amax / FP8_MAX, SCALE_FLOOR)], dtype=torch.float32)
                extra["input_amax"] = amax
            self._emit_site(layer, site, shorts, tensors)
            self._record(layer, site, w, x_sub, s, t0, extra)

    def _layer_sequential(self, layer: _Layer, h: torch.Tensor) -> None:
        plan = self.plan.get(layer.idx, {})
        gram = self.spec.method == "gptq"

        def run_group(gname: str, fn: Callable[[int, int], torch.Tensor]) -> None:
            group = plan.get(gname)
            if not group:
                return
            st = _Stats()
            self._observe(fn, st, gram)
            self._quantize_group_sequential(layer, gname, group, st)

        run_group("attn_in", lambda a, b: layer.norm(h[a:b], "input_layernorm"))
        buf = {"attn": torch.empty(self.n, self.L, self.cfg.num_heads * self.cfg.head_dim, device=self.device)}

        def attn_fn(a: int, b: int) -> torch.Tensor:
            buf["attn"][a:b] = layer.attention(layer.norm(h[a:b], "input_layernorm"), self.cos, self.sin)
            return buf["attn"][a:b]

        if plan.get("o_in"):
            run_group("o_in", attn_fn)
        else:
            self._observe(attn_fn, None, False)
        for a, b in self.chunks:
            h[a:b] += layer.lin(buf["attn"][a:b], "self_attn.o_proj")
        buf.clear()
        run_group("mlp_in", lambda a, b: layer.norm(h[a:b], "post_attention_layernorm"))
        run_group("down_in", lambda a, b: layer.mlp_mid(layer.norm(h[a:b], "post_attention_layernorm")))
        for a, b in self.chunks:
            h[a:b] += layer.lin(layer.mlp_mid(layer.norm(h[a:b], "post_attention_layernorm")), "mlp.down_proj")

    # -- AWQ

    def _layer_awq(self, layer: _Layer, h: torch.Tensor) -> None:
        spec, plan = self.spec, self.plan.get(layer.idx, {})
        stats = {g: _Stats() for g in GROUP_ORDER if plan.get(g)}
        for a, b in self.chunks:
            sub = self._sub_rows(a, b)
            x = h[a:b]
            x1 = layer.norm(x, "input_layernorm")
            if "attn_in" in stats:
                stats["attn_in"].add(x1, True, sub)
            at = layer.attention(x1, self.cos, self.sin)
            if "o_in" in stats:
                stats["o_in"].add(at, True, sub)
            x = x + layer.lin(at, "self_attn.o_proj")
            del at, x1
            x2 = layer.norm(x, "post_attention_layernorm")
            if "mlp_in" in stats:
                stats["mlp_in"].add(x2, True, sub)
            mid = layer.mlp_mid(x2)
            if "down_in" in stats:
                stats["down_in"].add(mid, True, sub)
            h[a:b] = x + layer.lin(mid, "mlp.down_proj")  # the next layer's input: the float layer (AutoAWQ)
            del mid, x2, x

        all_shorts = {s for g in plan.values() for _, shorts in g for s in shorts}
        scales: dict[str, torch.Tensor] = {}
        alphas: dict[str, float] = {}

        def search(gname: str) -> torch.Tensor:
            st = stats[gname]
            s, alpha, loss = awq_search_scales(self._group_weight(layer, plan[gname]), st.gram,
                                               st.abs_sum / st.tokens, spec.bits, spec.group_size, spec.sym,
                                               spec.awq_grid, spec.awq_duo_scaling, self.dtype)
            alphas[gname] = alpha
            log.debug("AWQ layer %d %s: alpha %.2f, relative loss %.4g", layer.idx, gname, alpha, loss)
            return s

        def fold_rows(proj: str, s: torch.Tensor) -> None:
            layer.w[proj + ".weight"] = layer.w[proj + ".weight"] / s.unsqueeze(1)
            b = layer.w.get(proj + ".bias")
            if b is not None:
                layer.w[proj + ".bias"] = b / s

        # down: fold into up_proj rows (up is quantized afterwards, in its own site)
        if "down_in" in stats:
            if "mlp.up_proj" in all_shorts:
                scales["down_in"] = s = search("down_in")
                fold_rows("mlp.up_proj", s)
            else:
                log.warning("layer %d: up_proj is not quantized; down_proj gets no AWQ scales", layer.idx)
        if "mlp_in" in stats:
            if self._covers(layer, "mlp_in", plan["mlp_in"]):
                scales["mlp_in"] = self._fold_norm(layer, "mlp_in", search("mlp_in"))
            else:
                log.warning("layer %d: gate/up not both quantized; no AWQ scales for them", layer.idx)
        if "o_in" in stats:
            cfg = self.cfg
            if cfg.num_kv_heads == cfg.num_heads and "self_attn.v_proj" in all_shorts:
                scales["o_in"] = s = search("o_in")
                fold_rows("self_attn.v_proj", s)
        if "attn_in" in stats:
            if self._covers(layer, "attn_in", plan["attn_in"]):
                scales["attn_in"] = self._fold_norm(layer, "attn_in", search("attn_in"))
            else:
                log.warning("layer %d: q/k/v not all quantized; no AWQ scales for them", layer.idx)

        for gname in GROUP_ORDER:
            if gname not in stats:
                continue
            st, s = stats[gname], scales.get(gname)
            gram = st.gram if s is None else st.gram / s.unsqueeze(0) / s.unsqueeze(1)  # of the scaled input
            for site, shorts in plan[gname]:
                t0 = time.time()
                w_ref = self._site_weight(layer, shorts)
                w = w_ref if s is None else w_ref * s
                if spec.awq_clip:
                    rows = torch.cat([torch.full((layer.w[p + ".weight"].shape[0],),
                                                 p not in ("self_attn.q_proj", "self_attn.k_proj"),
                                                 dtype=torch.bool, device=self.device) for p in shorts])
                    w = awq_clip(w, gram, spec.bits, spec.group_size, spec.sym, rows, spec.awq_clip_grid,
                                 spec.awq_max_shrink, self.dtype)
                ql = quantize_groups(w, spec.bits, spec.group_size, spec.sym, self.dtype)
                self._emit_site(layer, site, shorts, self._wna16(ql))
                self._record(layer, site, w_ref, st.x_sub, s, t0, {"alpha": alphas.get(gname)})

    # -- driver

    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        t_start = time.time()
        spec = self.spec
        log.info("calibrating %s (%d-bit, group %d, %s) on %d x %d tokens, %d sites in %d layers", spec.method,
                 spec.bits, spec.group_size, "symmetric" if spec.sym else "asymmetric", self.n, self.L,
                 self.num_sites, len(self.plan))
        h = _embed(self.read, self.ids, self.device)
        last = max(self.plan) if self.plan else -1
        disable = True if self.progress is False else (False if self.progress is True else None)
        with tqdm(total=last + 1, desc=f"calibrate {spec.method}", unit="layer", disable=disable) as bar, \
                tqdm(total=self.num_sites, desc="quantize sites", unit="site", leave=False, disable=disable) as sbar:
            self._bar = sbar
            for i in range(last + 1):
                t0 = time.time()
                layer = _Layer(self.cfg, i, self.read, self.device)
                if i not in self.plan:
                    for a, b in self.chunks:
                        h[a:b] = layer.forward(h[a:b], self.cos, self.sin)
                elif spec.method == "awq":
                    self._layer_awq(layer, h)
                else:
                    self._layer_sequential(layer, h)
                del layer
                dt = time.time() - t0
                self.summary["layers"].append({"layer": i, "seconds": round(dt, 3)})
                log.info("calibration layer %d/%d done in %.1fs", i + 1, last + 1, dt)
                bar.update(1)
            self._bar = None
        errs = [v["rel_err"] for v in self.summary["sites"].values()]
        self.summary["seconds"] = round(time.time() - t_start, 3)
        self.summary["mean_rel_err"] = sum(errs) / len(errs) if errs else 0.0
        self.summary["max_rel_err"] = max(errs) if errs else 0.0
        log.info("%s: %d sites quantized in %.1fs, mean relative output error %.4g (max %.4g)", spec.method,
                 len(errs), self.summary["seconds"], self.summary["mean_rel_err"], self.summary["max_rel_err"])
        return self.summary


@torch.no_grad()
def calibrate_and_quantize(cfg: ModelConfig, read: Reader, calib_ids: torch.Tensor, qcfg: QuantSpec,
                           sites: list[Site], emit: Emit, progress: bool | Callable[[str, int, int], None] | None
                           = None, *, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Quantize ``sites`` with ``qcfg.method`` calibrated on ``calib_ids [N, L]``.

    ``emit(name, tensors)`` is called once per site with the op's internal-layout tensors (wna16 dict in the
    model dtype for gptq/awq; {weight, weight_scale} for int8_smoothquant, dynamic per-token activations;
    {weight, weight_scale, input_scale} for fp8_static), and once per changed norm weight
    (``{"weight": tensor}`` in the model dtype) for AWQ and SmoothQuant. ``progress``: None shows tqdm bars on
    a terminal, False hides them, True forces them; a callable is also called as (site name, done, total)
    after each site. Returns a summary (per-site relative output error on kept calibration rows, seconds)."""
    if calib_ids.dim() != 2 or calib_ids.numel() == 0:
        raise CalibrationError(f"calibration ids must be [num_samples, seq_len], got {tuple(calib_ids.shape)}")
    return _Calibrator(cfg, read, calib_ids, qcfg, sites, emit, progress, torch.device(device)).run()


def default_sites(cfg: ModelConfig, fused: bool = True) -> list[Site]:
    """The quantized linears of a Llama-family model: fused qkv/gate_up (as the compiler's fusion pass makes
    them) or one site per projection."""
    out = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."

        def src(m: str, x, p: str = p) -> tuple[str, ...]:
            return tuple(f"{p}{m}.{n}_proj.weight" for n in x)
        if fused:
            out += [Site(f"{p}self_attn.qkv_proj.weight", src("self_attn", "qkv")),
                    Site(f"{p}self_attn.o_proj.weight", src("self_attn", "o")),
                    Site(f"{p}mlp.gate_up_proj.weight", src("mlp", ("gate", "up"))),
                    Site(f"{p}mlp.down_proj.weight", src("mlp", ("down",)))]
        else:
            out += [Site(f"{p}self_attn.{n}_proj.weight", src("self_attn", n)) for n in "qkvo"]
            out += [Site(f"{p}mlp.{n}_proj.weight", src("mlp", (n,))) for n in ("gate", "up", "down")]
    return out


def checkpoint_calibration(c, ckpt_dir: str | Path, vocab_size: int) -> tuple[torch.Tensor, str]:
    """The recipe's ``quantization.calibration`` (``c``) as token ids of the checkpoint in ``ckpt_dir``: its
    tokenizer encodes text, and ids made by another tokenizer are not taken as they are."""
    from artifacts.store import sha256_file
    from runtime.tokenizer import Tokenizer

    tok = Path(ckpt_dir) / "tokenizer.json"
    return load_calibration(c.data, Tokenizer.from_dir(ckpt_dir).encode, c.num_samples, c.seq_len,
                            tokenizer_sha256=sha256_file(tok) if tok.exists() else None, vocab_size=vocab_size)
