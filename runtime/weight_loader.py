"""An artifact's weight shards onto the device: one read of each file, its sha256 computed on the way.

Each shard (a safetensors file: ``u64 header length | JSON header | data``) is read front to back by its own
thread through :meth:`artifacts.store.Artifact.open_verified`, which hashes the bytes as they pass when the
shard's hash was deferred at open. The data section lands in one device buffer per shard and every tensor is
a view into it (no second copy, no host copy of the model). On CUDA the bytes go through two small pinned
staging buffers per thread and an async host-to-device copy on the thread's own stream, so page-cache reads,
hashing (hashlib and file reads release the GIL) and PCIe copies all overlap, across shards too::

    thread i:  read 32 MiB -> sha256.update -> stage[k] --async H2D on stream i--> buffer[off:off+n]

A shard that fails its size or hash check raises ArtifactCorruptError naming it, before any of its tensors
is handed out.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from artifacts.store import Artifact, ArtifactError, VerifyingReader

log = logging.getLogger("spanda.runtime")

# safetensors dtype names (the format's spec) -> torch
DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
ALIGN = 16  # bytes: cuBLAS' fast paths and Triton's pointer specialization assume 16-byte aligned tensors
STAGE_BYTES = 32 << 20
MAX_HEADER = 100 << 20


def load_weights(artifact: Artifact, device: torch.device, max_workers: int | None = None
                 ) -> dict[str, torch.Tensor]:
    """Every tensor of every weight shard of the artifact, on ``device`` (shards read in parallel)."""
    shards = list(artifact.manifest.weights.files)
    if not shards:
        return {}
    t0 = time.perf_counter()
    workers = max_workers or max(1, min(16, (os.cpu_count() or 2) - 1))
    state: dict[str, torch.Tensor] = {}
    with ThreadPoolExecutor(min(workers, len(shards)), thread_name_prefix="spanda-weights") as pool:
        for shard, tensors in zip(shards, pool.map(lambda s: load_shard(artifact, s, device), shards)):
            dup = sorted(state.keys() & tensors.keys())
            if dup:
                raise ArtifactError(f"artifact {artifact.path}: tensor(s) {dup[:3]} appear in {shard} and an "
                                    "earlier shard")
            state.update(tensors)
    nbytes = sum(artifact.manifest.files[s].size for s in shards)
    secs = time.perf_counter() - t0
    log.info("read %d weight shards (%.2f GB) to %s in %.2f s (%.1f GB/s)", len(shards), nbytes / 1e9, device,
             secs, nbytes / 1e9 / max(secs, 1e-9))
    return state


def load_shard(artifact: Artifact, name: str, device: torch.device) -> dict[str, torch.Tensor]:
    """One safetensors shard's tensors on ``device``, views into one buffer (size and hash checked)."""
    with artifact.open_verified(name) as r:
        header, data_len = _read_header(r, artifact, name)
        buf = torch.empty(data_len, dtype=torch.uint8, device=device)
        if device.type == "cuda":
            with torch.cuda.device(device):
                _stream_to_cuda(r, buf)
        else:
            _read_to_host(r, buf)
    # Leaving the with-block checked the size and (when deferred) the sha256: only now hand out tensors.
    return _views(buf, header, artifact, name)


def _read_header(r: VerifyingReader, artifact: Artifact, name: str) -> tuple[dict, int]:
    size = r.entry.size
    head = r.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    if not 0 <= n <= min(size - 8, MAX_HEADER):
        raise ArtifactError(f"artifact {artifact.path}: {name} is not a safetensors file (header length {n})")
    try:
        header = json.loads(r.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"artifact {artifact.path}: {name}: unreadable safetensors header: {e}") from None
    return header, size - 8 - n


def _read_to_host(r: VerifyingReader, buf: torch.Tensor) -> None:
    arr = buf.numpy()
    off = 0
    while off < arr.size:
        got = r.readinto(arr[off:off + STAGE_BYTES])
        if not got:
            return  # short file: the size check on close names it
        off += got


def _stream_to_cuda(r: VerifyingReader, buf: torch.Tensor) -> None:
    """File -> pinned stage (double-buffered) -> async copy into ``buf`` on this thread's stream."""
    n = buf.numel()
    stream = torch.cuda.Stream()
    stages = [torch.empty(min(STAGE_BYTES, max(n, 1)), dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    arrays = [s.numpy() for s in stages]
    done: list[torch.cuda.Event | None] = [None, None]
    off, k = 0, 0
    with torch.cuda.stream(stream):
        while off < n:
            if done[k] is not None:
                done[k].synchronize()  # the copy out of this stage has finished: refill it
            got = r.readinto(arrays[k][:min(STAGE_BYTES, n - off)])
            if not got:
                break  # short file: the size check on close names it
            buf[off:off + got].copy_(stages[k][:got], non_blocking=True)
            done[k] = torch.cuda.Event()
            done[k].record(stream)
            off += got
            k ^= 1
    stream.synchronize()


def _views(buf: torch.Tensor, header: dict, artifact: Artifact, name: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"artifact {artifact.path}: {name}: bad safetensors entry for {key!r}: {info}"
                                ) from None
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= begin <= end <= buf.numel() or end - begin != numel * dtype.itemsize:
            raise ArtifactError(f"artifact {artifact.path}: {name}: tensor {key!r} has offsets {begin}..{end} "
                                f"that do not fit {info['dtype']}{shape} in a {buf.numel()}-byte data section")
        raw = buf[begin:end]
        if begin % ALIGN:
            raw = raw.clone()  # an own, aligned allocation (the writer did not align this one)
        out[key] = raw.view(dtype).view(shape)
    return out
