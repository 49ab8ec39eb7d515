"""The executor: loads an artifact's graph and weights onto a device, owns the KV cache, runs steps.

Flat inputs of one step (see runtime.forward_context for the layout)::

    input_ids[T], positions[T], logits_indices[B]  -> graph ->  logits[B, vocab]

``logits_indices`` holds the flat index of the last token of every scheduled chunk (the executor returns
logits for each chunk; the engine samples only where ``chunk.samples``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from safetensors import safe_open

import runtime.ops  # noqa: F401  (registers torch.ops.spanda.* before the graph loads)
from artifacts.store import Artifact
from runtime.forward_context import AttentionMetadata, ForwardContext, set_forward_context
from runtime.scheduler import SchedulerOutput

log = logging.getLogger("spanda.runtime")


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype

    @classmethod
    def from_manifest(cls, manifest, dtype: torch.dtype) -> KVCacheSpec:
        cfg = manifest.model.config
        return cls(cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"], manifest.limits.kv_page_size, dtype)

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * elem


def load_graph_module(artifact: Artifact, device: torch.device) -> torch.nn.Module:
    """The exported graph with the artifact's weights bound (assign: no second copy of any tensor)."""
    m = artifact.manifest
    t0 = time.perf_counter()
    ep = torch.export.load(str(artifact.file(m.graph.file)))
    gm = ep.module()
    state: dict[str, torch.Tensor] = {}
    for shard in m.weights.files:
        with safe_open(str(artifact.file(shard)), framework="pt", device=str(device)) as f:
            for name in f.keys():
                state[name] = f.get_tensor(name)
        log.info("loaded %s", shard)
    gm.load_state_dict(state, strict=True, assign=True)
    log.info("graph and %d tensors loaded to %s in %.2f s", len(state), device, time.perf_counter() - t0)
    return gm


class ModelRunner:
    def __init__(self, artifact: Artifact, device: torch.device, kv_spec: KVCacheSpec, num_kv_blocks: int):
        self.device = device
        self.graph = load_graph_module(artifact, device)
        self.kv_spec = s = kv_spec
        self.num_tokens_computed = 0  # tokens run through the model since load (metrics, tests)
        self.kv_caches = [
            torch.zeros(2, num_kv_blocks, s.page_size, s.num_kv_heads, s.head_dim, dtype=s.dtype, device=device)
            for _ in range(s.num_layers)
        ]
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_kv_blocks, s.page_size,
                 num_kv_blocks * s.bytes_per_block / 2**20)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        for cache in self.kv_caches:
            cache[:, dst] = cache[:, src]

    def prepare(self, out: SchedulerOutput, block_tables: list[list[int]]) -> tuple[tuple[torch.Tensor, ...],
                                                                                 AttentionMetadata]:
        page = self.kv_spec.page_size
        ids, pos, slots, qsl, lens, last = [], [], [], [0], [], []
        for c, table in zip(out.chunks, block_tables):
            p = torch.arange(c.start, c.end)
            ids.append(torch.tensor(c.request.all_token_ids[c.start:c.end]))
            pos.append(p)
            slots.append(torch.tensor(table)[p // page] * page + p % page)
            qsl.append(qsl[-1] + c.num_tokens)
            lens.append(c.end)
            last.append(qsl[-1] - 1)
        width = max(len(t) for t in block_tables)
        tables = torch.zeros(len(block_tables), width, dtype=torch.int32)
        for i, t in enumerate(block_tables):
            tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slots).to(dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            block_tables=tables.to(dev),
            query_start_loc_host=qsl,
            seq_lens_host=lens,
        )
        inputs = (torch.cat(ids).to(dev), torch.cat(pos).to(dev), torch.tensor(last, device=dev))
        return inputs, meta

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, block_tables: list[list[int]]) -> torch.Tensor:
        """Run one step; returns logits [num_chunks, vocab] (last token of each chunk)."""
        self.copy_blocks(out.block_copies)
        inputs, meta = self.prepare(out, block_tables)
        return self.run_tokens(inputs, meta)

    @torch.inference_mode()
    def run_tokens(self, inputs: tuple[torch.Tensor, ...], meta: AttentionMetadata) -> torch.Tensor:
        """Run the graph on prepared flat inputs (input_ids, positions, logits_indices)."""
        self.num_tokens_computed += inputs[0].shape[0]
        with set_forward_context(ForwardContext(self.kv_caches, meta)):
            return self.graph(*inputs)

