"""CUDA graphs for decode steps, one per batch bucket of the artifact (captured at load, replayed per step).

A decode-only step of B sequences replays the graph of the smallest bucket b >= B. The graph reads static
buffers that each step fills in place::

    input_ids[b] positions[b] logits_indices[b]=arange(b)    slot_mapping[b]   (padding rows: slot -1 = no write)
    query_start_loc[b+1]=arange(b+1)   seq_lens[b] (padding: 1)   block_tables[b, W] (W = max blocks per sequence)

Capture sizes the attention kernels' launch for the longest context (seq_lens_host = max_seq_len), so one
graph serves every context length. Only possible when every op in the graph has a capturable CUDA path
(the Triton attention kernels in bf16/fp16); otherwise the runner stays eager.
"""

from __future__ import annotations

import logging
import time

import torch

from runtime.forward_context import AttentionMetadata, ForwardContext, set_forward_context
from runtime.ops import pdl

log = logging.getLogger("spanda.runtime")


class _Bucket:
    def __init__(self, size: int, width: int, device: torch.device):
        self.size = size
        z = dict(device=device)
        self.input_ids = torch.zeros(size, dtype=torch.long, **z)
        self.positions = torch.zeros(size, dtype=torch.long, **z)
        self.logits_indices = torch.arange(size, dtype=torch.long, **z)
        self.slot_mapping = torch.full((size,), -1, dtype=torch.long, **z)
        self.query_start_loc = torch.arange(size + 1, dtype=torch.int32, **z)
        self.seq_lens = torch.ones(size, dtype=torch.int32, **z)
        self.block_tables = torch.zeros(size, width, dtype=torch.int32, **z)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def meta(self, max_seq_len: int) -> AttentionMetadata:
        return AttentionMetadata(self.slot_mapping, self.query_start_loc, self.seq_lens, self.block_tables,
                                 list(range(self.size + 1)), [max_seq_len] * self.size)


class DecodeGraphs:
    """Captured decode graphs of one model runner, keyed by bucket size (ascending)."""

    def __init__(self, graph_module, kv_caches: list[torch.Tensor], buckets: list[int], max_seq_len: int,
                 page_size: int, device: torch.device):
        self.gm, self.kv_caches, self.max_seq_len = graph_module, kv_caches, max_seq_len
        width = -(-max_seq_len // page_size)
        self.buckets = [_Bucket(b, width, device) for b in sorted(buckets)]
        self.pool = torch.cuda.graph_pool_handle()
        self.num_replays = 0
        self.capture_seconds: dict[int, float] = {}  # bucket size -> seconds of its warm-up and capture
        self.pdl_max_batch = pdl.graph_max_batch(graph_module)  # buckets up to this size launch with PDL

    @torch.inference_mode()
    def capture(self, warmup: int = 1) -> None:
        """Capture every bucket, largest first, into one shared memory pool (each later, smaller graph reuses
        the pool's blocks). ``warmup`` eager runs per bucket before its capture load that bucket's kernels
        (Triton, cuBLAS) outside the capture. Per-bucket seconds land in ``capture_seconds``."""
        t0 = time.perf_counter()
        stream = torch.cuda.Stream()  # warm-ups off the default stream, as torch.cuda.graph's capture is
        for b in reversed(self.buckets):
            t = time.perf_counter()
            ctx = ForwardContext(self.kv_caches, b.meta(self.max_seq_len))
            args = (b.input_ids, b.positions, b.logits_indices)
            with set_forward_context(ctx), pdl.decode_graph(b.size, self.pdl_max_batch):
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(warmup):
                        self.gm(*args)
                torch.cuda.current_stream().wait_stream(stream)
                b.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(b.graph, pool=self.pool):
                    b.logits = self.gm(*args)
            self.capture_seconds[b.size] = time.perf_counter() - t
        torch.cuda.synchronize()
        log.info("captured %d decode CUDA graphs (batch buckets %s) in %.2f s (per bucket: %s; programmatic "
                 "dependent launch up to batch %d)", len(self.buckets), [b.size for b in self.buckets],
                 time.perf_counter() - t0, {k: round(v, 3) for k, v in self.capture_seconds.items()},
                 self.pdl_max_batch)

    def bucket_for(self, batch: int) -> _Bucket | None:
        return next((b for b in self.buckets if b.size >= batch), None)

    @torch.inference_mode()
    def replay(self, bucket: _Bucket, ids: list[int] | torch.Tensor, pos: list[int], slots: list[int],
               lens: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Fill the bucket's buffers for B <= bucket.size decodes, replay, return logits [B, vocab]. ``ids``: host
        token ids, or a device tensor of them (copied on the device, nothing waits for it)."""
        n = len(ids)
        b = bucket
        b.input_ids[:n].copy_(ids if isinstance(ids, torch.Tensor) else torch.tensor(ids, dtype=torch.long),
                              non_blocking=True)
        b.positions[:n].copy_(torch.tensor(pos, dtype=torch.long), non_blocking=True)
        b.slot_mapping[:n].copy_(torch.tensor(slots, dtype=torch.long), non_blocking=True)
        b.seq_lens[:n].copy_(torch.tensor(lens, dtype=torch.int32), non_blocking=True)
        width = max(len(t) for t in tables)
        b.block_tables[:n, :width].copy_(
            torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32), non_blocking=True)
        if n < b.size:
            b.slot_mapping[n:].fill_(-1)
            b.seq_lens[n:].fill_(1)
        b.graph.replay()
        self.num_replays += 1
        return b.logits[:n]
