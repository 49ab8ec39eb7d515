"""The executor: loads an artifact's graph and weights onto a device, owns the KV cache, runs steps.

Flat inputs of one step (see runtime.forward_context for the layout)::

    input_ids[T], positions[T], logits_indices[B]  -> graph ->  logits[B, vocab]

``logits_indices`` holds the flat index of the last token of every scheduled chunk (the executor returns
logits for each chunk; the engine samples only where ``chunk.samples``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

import runtime.ops  # noqa: F401  (registers torch.ops.spanda.* before the graph loads)
from artifacts.store import Artifact
from runtime.forward_context import AttentionMetadata, ForwardContext, KVCaches, set_forward_context
from runtime.ops.attention import KV_QUANT_MAX
from runtime.scheduler import SchedulerOutput
from runtime.weight_loader import load_weights

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


def load_graph_module(artifact: Artifact, device: torch.device, timings: dict[str, float] | None = None
                      ) -> torch.nn.Module:
    """The exported graph with the artifact's weights bound (assign: no second copy of any tensor).

    The weight shards stream to the device (and are hashed, when deferred at open) on worker threads while
    this thread deserializes the graph, which is pure Python work. ``timings`` receives the seconds of
    each ("graph_export_load" on this thread, "weights_read" on the workers) and of the wait between."""
    m = artifact.manifest
    t0 = time.perf_counter()
    # The workers need the GIL for a moment per chunk; the graph's deserialization holds it otherwise. A short
    # switch interval (default 5 ms) keeps them from waiting on it while this section runs.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, 0.0005))
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="spanda-load") as ex:
            def timed_weights() -> tuple[dict[str, torch.Tensor], float]:
                t = time.perf_counter()
                return load_weights(artifact, device), time.perf_counter() - t

            weights = ex.submit(timed_weights)
            # torch 2.11 warns once per 0-element constant ("Cannot call torch.frombuffer() on empty bytes.
            # Creating a tensor with zeros as workaround"): an empty tensor is what it creates, so say nothing
            export_log = logging.getLogger("torch.export.pt2_archive._package")
            level = export_log.level
            export_log.setLevel(max(level, logging.ERROR))
            try:
                ep = torch.export.load(str(artifact.file(m.graph.file)))
            finally:
                export_log.setLevel(level)
            gm = ep.module()
            t_graph = time.perf_counter() - t0
            state, t_weights = weights.result()
    finally:
        sys.setswitchinterval(interval)
    gm.load_state_dict(state, strict=True, assign=True)
    total = time.perf_counter() - t0
    if timings is not None:
        timings.update(graph_export_load=t_graph, weights_read=t_weights, graph_and_weights=total)
    log.info("graph (%.2f s) and %d tensors (%.2f s, in parallel) loaded to %s in %.2f s", t_graph, len(state),
             t_weights, device, total)
    return gm


def _kv_scales(artifact: Artifact, dtype: torch.dtype) -> list[list[float]] | None:
    """The manifest's per-layer KV scales for an fp8/int8 cache (None for a float cache)."""
    if dtype not in KV_QUANT_MAX:
        return None
    scales = artifact.manifest.limits.kv_scales
    if scales is None:
        log.warning("%s KV cache without limits.kv_scales in the manifest: every scale is 1", dtype)
    return scales


class ModelRunner:
    def __init__(self, artifact: Artifact, device: torch.device, kv_spec: KVCacheSpec,
                 num_kv_blocks: int | Callable[[], int]):
        """``num_kv_blocks``: a count, or a function called once the weights are on the device (so the cache
        can be sized from the memory they leave free)."""
        self.device = device
        self.load_seconds: dict[str, float] = {}
        self.graph = load_graph_module(artifact, device, self.load_seconds)
        self.kv_spec = s = kv_spec
        self.num_tokens_computed = 0  # tokens run through the model since load (metrics, tests)
        self.graphs = None  # runtime.cuda_graphs.DecodeGraphs once captured
        t = time.perf_counter()
        self.num_kv_blocks = num_kv_blocks() if callable(num_kv_blocks) else num_kv_blocks
        # torch.empty, not zeros: no kernel reads a slot before this step or an earlier one wrote it (the
        # attention kernels mask every position >= seq_len; CUDA-graph padding rows write nothing and their
        # outputs are dropped), so zero-filling tens of GB would buy nothing.
        self.kv_caches = KVCaches([  # fp8/int8: each layer's (k_scale, v_scale) from the manifest travel with it
            torch.empty(2, self.num_kv_blocks, s.page_size, s.num_kv_heads, s.head_dim, dtype=s.dtype,
                        device=device)
            for _ in range(s.num_layers)
        ], _kv_scales(artifact, s.dtype))
        self.act_dtype = getattr(torch, artifact.manifest.model.config.get("dtype", "float32"))
        self.load_seconds["kv_alloc"] = time.perf_counter() - t
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB)", self.num_kv_blocks, s.page_size,
                 self.num_kv_blocks * s.bytes_per_block / 2**20)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        for cache in self.kv_caches:
            cache[:, dst] = cache[:, src]

    def prepare(self, out: SchedulerOutput, block_tables: list[list[int]], all_logits: bool = False,
                ids: torch.Tensor | None = None) -> tuple[tuple[torch.Tensor, ...], AttentionMetadata]:
        """Flat inputs and attention metadata of a step, built host-side as lists, then one copy each.
        ``all_logits``: logits for every token (scoring) instead of each chunk's last one. ``ids``: the input
        token ids already on the device (a decode step launched before its tokens reached the host)."""
        page = self.kv_spec.page_size
        pos: list[int] = []
        slots: list[int] = []
        qsl, lens, last = [0], [], []
        host_ids: list[int] = []
        for c, table in zip(out.chunks, block_tables):
            if ids is None:
                host_ids += c.request.token_slice(c.start, c.end)
            span = range(c.start, c.end)
            pos += span
            slots += [table[p // page] * page + p % page for p in span]
            qsl.append(qsl[-1] + c.num_tokens)
            lens.append(c.end)
            last.append(qsl[-1] - 1)
        if all_logits:
            last = list(range(qsl[-1]))
        width = max(len(t) for t in block_tables)
        tables = [t + [0] * (width - len(t)) for t in block_tables]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(dev, non_blocking=True),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32).to(dev, non_blocking=True),
            seq_lens=torch.tensor(lens, dtype=torch.int32).to(dev, non_blocking=True),
            block_tables=torch.tensor(tables, dtype=torch.int32).to(dev, non_blocking=True),
            query_start_loc_host=qsl,
            seq_lens_host=lens,
        )
        inputs = (ids if ids is not None else torch.tensor(host_ids, dtype=torch.long).to(dev, non_blocking=True),
                  torch.tensor(pos, dtype=torch.long).to(dev, non_blocking=True),
                  torch.tensor(last, dtype=torch.long).to(dev, non_blocking=True))
        return inputs, meta

    def enable_cuda_graphs(self, buckets: list[int], max_seq_len: int) -> bool:
        """Capture decode graphs per batch bucket if every op has a capturable CUDA path; else stay eager."""
        from runtime.ops import triton_attention

        if self.device.type != "cuda" or not triton_attention.AVAILABLE:
            log.info("CUDA graphs off: %s", "not a CUDA device" if self.device.type != "cuda" else "no Triton")
            return False
        if not (self.kv_spec.dtype in triton_attention.FAST_DTYPES or (
                self.kv_spec.dtype in KV_QUANT_MAX and self.act_dtype in triton_attention.FAST_DTYPES)):
            log.info("CUDA graphs off: the %s attention path is the host-driven reference", self.kv_spec.dtype)
            return False
        from runtime.cuda_graphs import DecodeGraphs

        self.graphs = DecodeGraphs(self.graph, self.kv_caches, buckets, max_seq_len, self.kv_spec.page_size,
                                   self.device)
        self.graphs.capture()
        return True

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, block_tables: list[list[int]], ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Run one step; returns logits [num_chunks, vocab] (last token of each chunk). ``ids``: the flat input
        token ids on the device instead of the requests' host tokens."""
        self.copy_blocks(out.block_copies)
        if self.graphs is not None and all(c.num_tokens == 1 for c in out.chunks):
            bucket = self.graphs.bucket_for(len(out.chunks))
            if bucket is not None:
                return self._replay(bucket, out, block_tables, ids)
        inputs, meta = self.prepare(out, block_tables, ids=ids)
        return self.run_tokens(inputs, meta)

    def _replay(self, bucket, out: SchedulerOutput, block_tables: list[list[int]], ids: torch.Tensor | None
                ) -> torch.Tensor:
        page = self.kv_spec.page_size
        pos = [c.start for c in out.chunks]
        if ids is None:
            ids = [c.request.token_slice(c.start, c.end)[0] for c in out.chunks]
        slots = [t[p // page] * page + p % page for t, p in zip(block_tables, pos)]
        self.num_tokens_computed += len(ids)
        return self.graphs.replay(bucket, ids, pos, slots, [p + 1 for p in pos], block_tables)

    @torch.inference_mode()
    def run_tokens(self, inputs: tuple[torch.Tensor, ...], meta: AttentionMetadata) -> torch.Tensor:
        """Run the graph on prepared flat inputs (input_ids, positions, logits_indices)."""
        self.num_tokens_computed += inputs[0].shape[0]
        with set_forward_context(ForwardContext(self.kv_caches, meta)):
            return self.graph(*inputs)

