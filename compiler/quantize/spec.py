"""What a calibration-based quantization is asked to do (compiler/quantize/calibrate.py does it): the methods
(METHODS), a quantized linear of the artifact (Site: its parameter name and the Hugging Face weights fused along
dim 0 to form it), the recipe's settings (QuantSpec), the error every step raises (CalibrationError), and the
signatures of the lazy weight reader and of the emitter of quantized tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

METHODS = ("gptq", "awq", "int8_smoothquant", "fp8_static")

Reader = Callable[[str], torch.Tensor]
Emit = Callable[[str, dict[str, torch.Tensor]], None]


class CalibrationError(ValueError):
    """The calibration data or the quantization request is unusable; the message says why."""


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
