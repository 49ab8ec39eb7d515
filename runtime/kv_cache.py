"""Paged KV-cache block manager with automatic prefix caching (pure Python, no torch).

The KV cache is a pool of ``num_blocks`` blocks of ``block_size`` token slots. Token position ``p`` of a
request lives in block ``table[p // block_size]``, slot ``p % block_size``::

    block_size = 4, 10 tokens      table = [7, 2, 5]
    positions   0 1 2 3 | 4 5 6 7 | 8 9 . .
    block           7   |    2    |   5      <- last block partial (2 free slots)

Block states (every block is in exactly one):

* in use: ``ref_cnt > 0``; referenced ``ref_cnt`` times across request block tables (prefix caching and
  ``fork`` share blocks), never present in the free queue;
* free: ``ref_cnt == 0``; in the LRU free queue exactly once. A free block may still carry a hash: it is
  *evictable* and a later prompt can revive it through ``match_prefix`` until the allocator reuses it.

A full block whose tokens are computed gets a chained hash ``h_i = sha256(h_{i-1} || int64le(tokens_i))``
(see :func:`hash_block_tokens`), stable across processes. ``_hash_to_block`` maps a hash to one block
carrying it; a second block computed with the same content (two requests missed the cache together)
carries the hash too but is not registered: the first mapping wins.

Block 0 is an ordinary block: there is no reserved null/padding block. An executor that pads block tables
must mask padded entries itself instead of pointing them at a reserved block.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

_ROOT_HASH = hashlib.sha256(b"spanda-kv-prefix-root").digest()


def hash_block_tokens(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """sha256(parent digest (or a fixed root digest) || tokens packed as int64 little-endian): 32 bytes."""
    payload = struct.pack(f"<{len(tokens)}q", *tokens)
    return hashlib.sha256((_ROOT_HASH if parent is None else parent) + payload).digest()


@dataclass(frozen=True)
class PrefixMatch:
    """Opaque result of :meth:`KVCacheManager.match_prefix`; pass it to ``allocate`` in the same step.

    Invariants: ``num_computed_tokens == len(block_ids) * block_size``; ``block_hashes[i]`` is the hash
    block ``block_ids[i]`` carried at lookup time (``allocate`` rejects a match gone stale by eviction).
    """

    block_ids: tuple[int, ...] = ()
    num_computed_tokens: int = 0
    block_hashes: tuple[bytes, ...] = field(default=(), repr=False)


@dataclass
class PrefixCacheStats:
    """Counted in tokens: ``queries`` = prompt tokens looked up, ``hits`` = tokens found cached."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclass
class _Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


@dataclass
class _Request:
    block_ids: list[int] = field(default_factory=list)
    # Hashes of the leading full computed blocks; len(hashes) <= len(block_ids).
    hashes: list[bytes] = field(default_factory=list)


class KVCacheManager:
    """Owns the block pool, per-request block tables, the LRU free queue and the prefix-hash map."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixCacheStats()
        self._blocks = [_Block(i) for i in range(num_blocks)]
        # LRU order: head (first) is reused next; freed blocks are appended at the tail.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._hash_to_block: dict[bytes, int] = {}
        self._reqs: dict[str, _Request] = {}

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0, evictable cached ones included."""
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def block_table(self, request_id: str) -> list[int]:
        return list(self._reqs[request_id].block_ids)

    def num_tokens_capacity(self, request_id: str) -> int:
        return len(self._reqs[request_id].block_ids) * self.block_size

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_cnt

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------ prefix lookup
    def match_prefix(self, token_ids: Sequence[int]) -> PrefixMatch:
        """Longest run of cached blocks equal to the prompt's leading full blocks.

        Only blocks fully inside ``token_ids[:-1]`` are considered, so the last prompt token is always left
        to compute (the model must produce its logits). Side effect: ``stats`` only.
        """
        if not self.enable_prefix_caching:
            return PrefixMatch()
        bs = self.block_size
        ids: list[int] = []
        hashes: list[bytes] = []
        parent: bytes | None = None
        for i in range(max(0, (len(token_ids) - 1) // bs)):
            parent = hash_block_tokens(parent, token_ids[i * bs : (i + 1) * bs])
            block_id = self._hash_to_block.get(parent)
            if block_id is None:
                break
            ids.append(block_id)
            hashes.append(parent)
        self.stats.queries += len(token_ids)
        self.stats.hits += len(ids) * bs
        return PrefixMatch(tuple(ids), len(ids) * bs, tuple(hashes))

    # --------------------------------------------------------------- allocation
    def _check_prefix(self, request_id: str, num_tokens: int, prefix: PrefixMatch | None) -> PrefixMatch:
        if prefix is None or not prefix.block_ids:
            return PrefixMatch()
        if request_id in self._reqs:
            raise ValueError(f"request {request_id!r} already has blocks; a prefix is for its first call")
        if prefix.num_computed_tokens != len(prefix.block_ids) * self.block_size:
            raise ValueError(f"inconsistent PrefixMatch: {prefix}")
        if num_tokens < prefix.num_computed_tokens:
            raise ValueError(f"num_tokens {num_tokens} < prefix tokens {prefix.num_computed_tokens}")
        for block_id, block_hash in zip(prefix.block_ids, prefix.block_hashes, strict=True):
            if self._blocks[block_id].block_hash != block_hash:
                raise ValueError(f"stale PrefixMatch: block {block_id} was evicted since match_prefix")
        return prefix

    def _new_blocks_needed(self, request_id: str, num_tokens: int, prefix: PrefixMatch) -> tuple[int, int]:
        """(new blocks to pop, evictable prefix blocks to revive) for this allocation."""
        req = self._reqs.get(request_id)
        held = len(req.block_ids) if req is not None else len(prefix.block_ids)
        revive = sum(1 for b in prefix.block_ids if self._blocks[b].ref_cnt == 0)
        return max(0, self._blocks_for(num_tokens) - held), revive

    def can_allocate(self, request_id: str, num_tokens: int, prefix: PrefixMatch | None = None) -> bool:
        """Whether ``allocate`` with the same arguments would succeed (no side effects)."""
        prefix = self._check_prefix(request_id, num_tokens, prefix)
        new, revive = self._new_blocks_needed(request_id, num_tokens, prefix)
        return new + revive <= self.num_free_blocks

    def allocate(self, request_id: str, num_tokens: int, prefix: PrefixMatch | None = None) -> bool:
        """Grow the request's table to cover ``num_tokens`` slots; all-or-nothing.

        On the first call the prefix blocks (ref +1, revived out of the free queue if evictable) start the
        table; new blocks come from the free-queue head, losing any hash they carried. Returns False and
        changes nothing when the free pool (minus revived prefix blocks) is too small. ValueError if a
        non-empty prefix is passed for a request that already has a table, or the prefix went stale.
        """
        prefix = self._check_prefix(request_id, num_tokens, prefix)
        new, revive = self._new_blocks_needed(request_id, num_tokens, prefix)
        if new + revive > self.num_free_blocks:
            return False
        req = self._reqs.get(request_id)
        if req is None:
            req = self._reqs[request_id] = _Request()
            for block_id in prefix.block_ids:
                self._take(block_id)
            req.block_ids.extend(prefix.block_ids)
            req.hashes.extend(prefix.block_hashes)
        req.block_ids.extend(self._pop_free() for _ in range(new))
        return True

    def _take(self, block_id: int) -> None:
        """Add a reference to a cached or shared block, reviving it from the free queue if needed."""
        block = self._blocks[block_id]
        if block.ref_cnt == 0:
            del self._free[block_id]
        block.ref_cnt += 1

    def _pop_free(self) -> int:
        """Take the LRU free block, evicting its hash; the caller owns the single reference."""
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.block_hash is not None:
            if self._hash_to_block.get(block.block_hash) == block_id:
                del self._hash_to_block[block.block_hash]
            block.block_hash = None
        block.ref_cnt = 1
        return block_id

    # ------------------------------------------------------------------ caching
    def cache_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Hash every block of the request now full of computed tokens (``token_ids[:num_computed]``)."""
        req = self._reqs[request_id]
        if num_computed_tokens > min(len(token_ids), len(req.block_ids) * self.block_size):
            raise ValueError(f"num_computed_tokens {num_computed_tokens} exceeds tokens or capacity")
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        parent = req.hashes[-1] if req.hashes else None
        for i in range(len(req.hashes), num_computed_tokens // bs):
            block = self._blocks[req.block_ids[i]]
            if block.block_hash is None:  # a sharer (fork) may have hashed it already
                block.block_hash = hash_block_tokens(parent, token_ids[i * bs : (i + 1) * bs])
            self._hash_to_block.setdefault(block.block_hash, block.block_id)
            req.hashes.append(block.block_hash)
            parent = block.block_hash

    def fork(self, parent_id: str, child_id: str, num_tokens: int) -> list[tuple[int, int]] | None:
        """Give ``child_id`` the parent's first ``num_tokens`` slots.

        Full blocks are shared (ref +1); a trailing partial block is copied into a fresh block and the
        ``(src, dst)`` pair is returned for the executor to copy. None (no change) if no block is free.
        """
        parent = self._reqs[parent_id]
        if child_id in self._reqs:
            raise ValueError(f"request {child_id!r} already exists")
        if not 0 <= num_tokens <= len(parent.block_ids) * self.block_size:
            raise ValueError(f"num_tokens {num_tokens} outside parent capacity")
        full, partial = divmod(num_tokens, self.block_size)
        if partial and not self._free:
            return None
        shared = parent.block_ids[:full]
        for block_id in shared:
            self._take(block_id)
        child = self._reqs[child_id] = _Request(list(shared), parent.hashes[:full])
        if not partial:
            return []
        child.block_ids.append(self._pop_free())
        return [(parent.block_ids[full], child.block_ids[-1])]

    def free(self, request_id: str) -> None:
        """Drop the request; blocks reaching ref 0 join the free-queue tail, table tail first."""
        req = self._reqs.pop(request_id)
        for block_id in reversed(req.block_ids):
            block = self._blocks[block_id]
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block_id] = None

    def reset_prefix_cache(self) -> bool:
        """Forget every hash if no block is in use; False (no change) otherwise."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self._blocks:
            block.block_hash = None
        self._hash_to_block.clear()
        return True

    # ---------------------------------------------------------------- integrity
    def check_integrity(self) -> None:
        """Raise AssertionError naming the first broken invariant (see module docstring)."""

        def require(cond: bool, msg: str) -> None:
            if not cond:
                raise AssertionError(f"KVCacheManager integrity: {msg}")

        refs = [0] * self.num_blocks
        for rid, req in self._reqs.items():
            require(len(set(req.block_ids)) == len(req.block_ids), f"{rid!r} table repeats a block")
            require(len(req.hashes) <= len(req.block_ids), f"{rid!r} has more hashes than blocks")
            for block_id, block_hash in zip(req.block_ids, req.hashes):
                require(self._blocks[block_id].block_hash == block_hash, f"{rid!r} hash of {block_id}")
            for block_id in req.block_ids:
                refs[block_id] += 1
        for block in self._blocks:
            bid = block.block_id
            require(block.ref_cnt == refs[bid], f"block {bid} ref {block.ref_cnt} != {refs[bid]} uses")
            require((bid in self._free) == (block.ref_cnt == 0), f"block {bid} free-queue membership")
            require(self.enable_prefix_caching or block.block_hash is None, f"block {bid} hashed")
        for block_hash, bid in self._hash_to_block.items():
            require(self._blocks[bid].block_hash == block_hash, f"hash map entry for block {bid} is stale")
        in_use = sum(1 for r in refs if r)
        require(self.num_free_blocks + in_use == self.num_blocks, "free + in use != num_blocks")
