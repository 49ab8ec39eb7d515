"""Per-input-channel scales: AWQ's activation-aware scale search and its per-group clipping search (Lin et al.
2023, as AutoAWQ runs them; no dependency on it), and SmoothQuant's migration scales (Xiao et al. 2022) for INT8
W8A8.
"""

from __future__ import annotations

import math

import torch

from compiler.quantize.groups import fake_quantize


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
