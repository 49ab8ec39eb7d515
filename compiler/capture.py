"""Graph capture: ``torch.export`` of a model over the flattened token layout, on the meta device.

The model is traced with meta tensors, so capture costs no memory for weights whatever the model size;
the weights are produced separately by the weight plan (``compiler/weights.py``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

log = logging.getLogger("spanda.compiler")

INPUT_NAMES = ("input_ids", "positions", "logits_indices")
OUTPUT_NAMES = ("logits",)


def example_inputs(device: str = "meta") -> tuple[torch.Tensor, ...]:
    # Sizes > 1 and different from each other so export keeps T and B symbolic and independent.
    t, b = 8, 3
    return (
        torch.zeros(t, dtype=torch.long, device=device),
        torch.zeros(t, dtype=torch.long, device=device),
        torch.zeros(b, dtype=torch.long, device=device),
    )


def dynamic_shapes(max_tokens: int, max_batch: int) -> tuple[dict[int, Dim], ...]:
    t = Dim("num_tokens", min=1, max=max(max_tokens, 16))
    b = Dim("num_logits", min=1, max=max(max_batch, max_tokens, 16))
    return ({0: t}, {0: t}, {0: b})


def export_model(model: nn.Module, max_tokens: int, max_batch: int) -> ExportedProgram:
    """Export ``model(input_ids[T], positions[T], logits_indices[B]) -> logits[B, V]`` with T, B dynamic."""
    log.info("capturing graph with torch.export (T <= %d tokens, B <= %d)", max_tokens, max_batch)
    return torch.export.export(
        model, example_inputs(), dynamic_shapes=dynamic_shapes(max_tokens, max_batch), strict=False
    )


def dynamic_dims_record(max_tokens: int, max_batch: int) -> dict[str, dict[str, int]]:
    """What the manifest records about the graph's dynamic dimensions."""
    return {
        "num_tokens": {"min": 1, "max": max(max_tokens, 16)},
        "num_logits": {"min": 1, "max": max(max_batch, max_tokens, 16)},
    }
