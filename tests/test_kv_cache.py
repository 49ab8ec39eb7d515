"""Tests for runtime.kv_cache: exact block ids (vLLM test_prefix_caching style) and a hypothesis model."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from runtime.kv_cache import KVCacheManager, PrefixMatch, hash_block_tokens

BS = 4


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def run_prompt(mgr: KVCacheManager, rid: str, prompt: list[int]) -> PrefixMatch:
    """Admit a request: match, allocate the whole prompt, compute it, cache its full blocks."""
    match = mgr.match_prefix(prompt)
    assert mgr.allocate(rid, len(prompt), match)
    mgr.cache_blocks(rid, prompt, len(prompt))
    return match


# ------------------------------------------------------------------ deterministic, exact block ids
def test_fresh_pool_allocation_order():
    mgr = KVCacheManager(num_blocks=10, block_size=BS)
    assert mgr.allocate("a", 10)
    assert mgr.block_table("a") == [0, 1, 2]
    assert mgr.allocate("b", 4)
    assert mgr.block_table("b") == [3]
    assert mgr.allocate("a", 12)  # still fits in 3 blocks
    assert mgr.block_table("a") == [0, 1, 2]
    assert mgr.allocate("a", 13)
    assert mgr.block_table("a") == [0, 1, 2, 4]
    assert mgr.num_tokens_capacity("a") == 16
    assert mgr.num_free_blocks == 5 and mgr.usage == pytest.approx(0.5)
    mgr.check_integrity()


def test_prefix_hit_after_finished_request_reuses_block_ids():
    mgr = KVCacheManager(num_blocks=10, block_size=BS)
    prompt = toks(0, 10)
    run_prompt(mgr, "a", prompt)
    assert mgr.block_table("a") == [0, 1, 2]
    mgr.free("a")  # free queue: 3..9, then 2, 1, 0 (tail first)
    assert mgr.num_free_blocks == 10
    match = mgr.match_prefix(prompt)
    assert match.block_ids == (0, 1) and match.num_computed_tokens == 8
    assert mgr.allocate("b", 10, match)
    assert mgr.block_table("b") == [0, 1, 3]
    assert [mgr.ref_count(b) for b in (0, 1, 2, 3)] == [1, 1, 0, 1]
    mgr.check_integrity()


def test_partial_prefix_hit_shares_two_of_three_blocks():
    mgr = KVCacheManager(num_blocks=10, block_size=BS)
    run_prompt(mgr, "a", toks(0, 12))  # [0, 1, 2], still running
    prompt_b = toks(0, 8) + [99, 98, 97, 96, 95]
    match = run_prompt(mgr, "b", prompt_b)
    assert match.block_ids == (0, 1) and match.num_computed_tokens == 8
    assert mgr.block_table("b") == [0, 1, 3, 4]
    assert [mgr.ref_count(b) for b in range(5)] == [2, 2, 1, 1, 1]
    mgr.free("a")
    assert [mgr.ref_count(b) for b in range(5)] == [1, 1, 0, 1, 1]
    mgr.check_integrity()


def test_never_matches_whole_prompt():
    mgr = KVCacheManager(num_blocks=10, block_size=BS)
    run_prompt(mgr, "a", toks(0, 12))
    mgr.free("a")
    exact = mgr.match_prefix(toks(0, 8))  # both blocks cached, but the last token must be computed
    assert exact.block_ids == (0,) and exact.num_computed_tokens == 4
    assert mgr.match_prefix(toks(0, 12)).block_ids == (0, 1)
    assert mgr.match_prefix(toks(0, 9)).block_ids == (0, 1)
    assert mgr.match_prefix(toks(0, 4)).block_ids == ()
    assert mgr.match_prefix([]).block_ids == ()


def test_lru_eviction_tail_blocks_first():
    mgr = KVCacheManager(num_blocks=4, block_size=BS)
    a, b = toks(0, 8), toks(100, 8)
    run_prompt(mgr, "a", a)
    mgr.free("a")  # queue [2, 3, 1, 0]
    run_prompt(mgr, "b", b)
    assert mgr.block_table("b") == [2, 3]
    mgr.free("b")  # queue [1, 0, 3, 2]
    run_prompt(mgr, "c", toks(200, 12))
    assert mgr.block_table("c") == [1, 0, 3]  # evicts a's blocks, then b's tail
    assert mgr.match_prefix(a + [7]).block_ids == ()
    assert mgr.match_prefix(b + [7]).block_ids == (2,)  # b's head block survived
    mgr.check_integrity()


def test_allocation_failure_changes_nothing():
    mgr = KVCacheManager(num_blocks=4, block_size=BS)
    a = toks(0, 8)
    run_prompt(mgr, "a", a)
    mgr.free("a")  # queue [2, 3, 1, 0]; blocks 0, 1 cached and evictable
    run_prompt(mgr, "c", toks(50, 8))
    assert mgr.block_table("c") == [2, 3]
    match = mgr.match_prefix(a + toks(8, 4))
    assert match.block_ids == (0, 1)
    # 1 new block + 2 revived prefix blocks > 2 free blocks, although 1 <= 2 naively.
    assert not mgr.can_allocate("b", 12, match)
    assert not mgr.allocate("b", 12, match)
    with pytest.raises(KeyError):
        mgr.block_table("b")
    assert mgr.num_free_blocks == 2 and [mgr.ref_count(b) for b in (0, 1)] == [0, 0]
    assert not mgr.allocate("c", 20)  # a running request that cannot grow keeps its table
    assert mgr.block_table("c") == [2, 3]
    assert mgr.match_prefix(a + toks(8, 4)) == match
    assert mgr.allocate("b", 8, mgr.match_prefix(a))  # fits: revive 0, pop 1 (evicts its hash)
    assert mgr.block_table("b") == [0, 1]
    mgr.check_integrity()


def test_fork_shares_full_blocks_and_copies_partial():
    mgr = KVCacheManager(num_blocks=6, block_size=BS)
    run_prompt(mgr, "p", toks(0, 10))  # [0, 1, 2]
    assert mgr.fork("p", "c1", 10) == [(2, 3)]
    assert mgr.block_table("c1") == [0, 1, 3]
    assert mgr.fork("p", "c2", 8) == []
    assert mgr.block_table("c2") == [0, 1]
    assert [mgr.ref_count(b) for b in range(4)] == [3, 3, 1, 1]
    mgr.check_integrity()
    mgr.free("p")
    assert [mgr.ref_count(b) for b in range(4)] == [2, 2, 0, 1]
    mgr.free("c1")
    mgr.free("c2")
    assert mgr.num_free_blocks == 6
    mgr.check_integrity()


def test_fork_without_free_block():
    mgr = KVCacheManager(num_blocks=3, block_size=BS)
    assert mgr.allocate("p", 10)
    assert mgr.fork("p", "c", 9) is None
    with pytest.raises(KeyError):
        mgr.block_table("c")
    assert mgr.fork("p", "c", 8) == []  # full blocks only: needs no free block
    assert mgr.block_table("c") == [0, 1]
    mgr.check_integrity()


def test_free_unknown_and_double_free_raise():
    mgr = KVCacheManager(num_blocks=4, block_size=BS)
    with pytest.raises(KeyError):
        mgr.free("nope")
    assert mgr.allocate("a", 5)
    mgr.free("a")
    with pytest.raises(KeyError):
        mgr.free("a")
    assert mgr.num_free_blocks == 4


def test_caching_disabled_gives_no_hits():
    mgr = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    run_prompt(mgr, "a", toks(0, 12))
    mgr.free("a")
    match = mgr.match_prefix(toks(0, 12))
    assert match == PrefixMatch() and match.num_computed_tokens == 0
    assert mgr.stats.hits == 0
    mgr.check_integrity()


def test_stats_count_tokens():
    mgr = KVCacheManager(num_blocks=8, block_size=BS)
    run_prompt(mgr, "a", toks(0, 10))  # 10 queried, 0 hit
    run_prompt(mgr, "b", toks(0, 10))  # 10 queried, 8 hit
    assert (mgr.stats.queries, mgr.stats.hits) == (20, 8)
    assert mgr.stats.hit_rate == pytest.approx(0.4)


def test_reset_prefix_cache():
    mgr = KVCacheManager(num_blocks=8, block_size=BS)
    run_prompt(mgr, "a", toks(0, 12))
    assert not mgr.reset_prefix_cache()
    mgr.free("a")
    assert mgr.reset_prefix_cache()
    assert mgr.match_prefix(toks(0, 12)).block_ids == ()
    mgr.check_integrity()


def test_duplicate_content_keeps_first_mapping():
    mgr = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = toks(0, 9)
    for rid in ("a", "b"):  # both miss: nothing is cached until a step has computed
        assert mgr.allocate(rid, 9, mgr.match_prefix(prompt))
    for rid in ("a", "b"):
        mgr.cache_blocks(rid, prompt, 9)
    assert mgr.block_table("a") == [0, 1, 2] and mgr.block_table("b") == [3, 4, 5]
    mgr.free("b")
    mgr.free("a")
    assert mgr.match_prefix(prompt).block_ids == (0, 1)
    mgr.check_integrity()


def test_stale_prefix_match_rejected():
    mgr = KVCacheManager(num_blocks=2, block_size=BS)
    run_prompt(mgr, "a", toks(0, 5))
    mgr.free("a")  # queue [1, 0]
    match = mgr.match_prefix(toks(0, 5))
    assert match.block_ids == (0,)
    assert mgr.allocate("x", 8)  # evicts both blocks
    with pytest.raises(ValueError, match="stale"):
        mgr.allocate("b", 5, match)


def test_chunked_cache_blocks_and_hash_encoding():
    mgr = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = toks(0, 10)
    assert mgr.allocate("a", 10)
    mgr.cache_blocks("a", prompt, 3)  # no full block computed yet
    mgr.cache_blocks("a", prompt, 6)
    mgr.cache_blocks("a", prompt, 10)
    h0 = hashlib.sha256(hashlib.sha256(b"spanda-kv-prefix-root").digest()
                        + struct.pack("<4q", 0, 1, 2, 3)).digest()
    h1 = hashlib.sha256(h0 + struct.pack("<4q", 4, 5, 6, 7)).digest()
    assert hash_block_tokens(None, prompt[:4]) == h0
    assert hash_block_tokens(h0, prompt[4:8]) == h1
    assert mgr.match_prefix(prompt).block_hashes == (h0, h1)


def test_check_integrity_detects_corruption():
    mgr = KVCacheManager(num_blocks=4, block_size=BS)
    assert mgr.allocate("a", 4)
    mgr._blocks[0].ref_cnt = 2
    with pytest.raises(AssertionError, match="block 0 ref"):
        mgr.check_integrity()


# --------------------------------------------------------------------------- property test
VOCAB = st.integers(0, 3)
# Prompts grow from a few shared stems so that full blocks (up to 8 tokens) collide often.
STEMS = ([0, 1, 2, 3] * 6, [1] * 24, [2, 2, 3, 0, 1, 3] * 4)
PROMPTS = st.builds(lambda stem, k, tail: stem[:k] + tail,
                    st.sampled_from(STEMS), st.integers(0, 24), st.lists(VOCAB, min_size=1, max_size=4))


def upto(lo: int, hi: int) -> st.SearchStrategy[int]:
    """How far a step computes: usually everything scheduled, sometimes a chunk."""
    return st.one_of(st.just(hi), st.integers(lo, hi))


class KVCacheMachine(RuleBasedStateMachine):
    """Random admit / extend / fork / free against an independent model of tables and block contents.

    ``shadow[block][slot]`` stands for the KV a slot holds: the KV of position p depends on every token up
    to p, so a written slot holds ``tuple(tokens[: p + 1])``; None means garbage.
    """

    @initialize(num_blocks=st.integers(4, 24), block_size=st.integers(1, 8), caching=st.booleans())
    def setup(self, num_blocks, block_size, caching):
        self.mgr = KVCacheManager(num_blocks, block_size, caching)
        self.bs = block_size
        self.reqs: dict[str, dict] = {}  # rid -> {"tokens", "computed", "table"}
        self.shadow: dict[int, list[tuple[int, ...] | None]] = {}
        self.next_id = 0

    def in_use(self) -> dict[int, int]:
        refs: dict[int, int] = {}
        for r in self.reqs.values():
            for b in r["table"]:
                refs[b] = refs.get(b, 0) + 1
        return refs

    def n_free(self) -> int:
        return self.mgr.num_blocks - len(self.in_use())

    def grow(self, rid: str, table: list[int], old_len: int) -> None:
        """New blocks must have been unused; their contents are garbage."""
        refs = self.in_use()
        for b in table[old_len:]:
            assert b not in refs, f"block {b} handed out while in use"
            self.shadow[b] = [None] * self.bs
        self.reqs[rid]["table"] = table

    def compute(self, rid: str, upto: int) -> None:
        r = self.reqs[rid]
        for p in range(r["computed"], upto):
            self.shadow[r["table"][p // self.bs]][p % self.bs] = tuple(r["tokens"][: p + 1])
        r["computed"] = upto
        self.mgr.cache_blocks(rid, r["tokens"], upto)

    @rule(prompt=PROMPTS, data=st.data())
    def admit(self, prompt, data):
        match = self.mgr.match_prefix(prompt)
        bs = self.bs
        assert match.num_computed_tokens == len(match.block_ids) * bs < len(prompt)
        for i, b in enumerate(match.block_ids):
            want = [tuple(prompt[: p + 1]) for p in range(i * bs, (i + 1) * bs)]
            assert self.shadow[b] == want, f"matched block {b} holds other KV"
        refs = self.in_use()
        need = -(-len(prompt) // bs) - len(match.block_ids)
        expect = need + sum(b not in refs for b in match.block_ids) <= self.n_free()
        rid, self.next_id = f"r{self.next_id}", self.next_id + 1
        assert self.mgr.can_allocate(rid, len(prompt), match) == expect
        assert self.mgr.allocate(rid, len(prompt), match) == expect
        if not expect:
            return
        table = self.mgr.block_table(rid)
        assert tuple(table[: len(match.block_ids)]) == match.block_ids
        self.reqs[rid] = {"tokens": list(prompt), "computed": match.num_computed_tokens, "table": []}
        self.grow(rid, table, len(match.block_ids))
        self.compute(rid, data.draw(upto(match.num_computed_tokens, len(prompt))))

    @rule(data=st.data(), new=st.lists(VOCAB, max_size=6))
    def extend(self, data, new):
        if not self.reqs:
            return
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        r = self.reqs[rid]
        total = len(r["tokens"]) + len(new)
        expect = max(0, -(-total // self.bs) - len(r["table"])) <= self.n_free()
        assert self.mgr.allocate(rid, total) == expect
        if not expect:
            assert self.mgr.block_table(rid) == r["table"]
            return
        r["tokens"] = r["tokens"] + new
        self.grow(rid, self.mgr.block_table(rid), len(r["table"]))
        self.compute(rid, data.draw(upto(r["computed"], total)))

    @rule(data=st.data())
    def fork(self, data):
        if not self.reqs:
            return
        pid = data.draw(st.sampled_from(sorted(self.reqs)))
        p = self.reqs[pid]
        n = data.draw(st.integers(0, p["computed"]))
        cid, self.next_id = f"r{self.next_id}", self.next_id + 1
        full, partial = divmod(n, self.bs)
        free_before = self.n_free()
        copies = self.mgr.fork(pid, cid, n)
        if partial and free_before == 0:
            assert copies is None
            return
        table = self.mgr.block_table(cid)
        assert table[:full] == p["table"][:full] and len(table) == full + (1 if partial else 0)
        self.reqs[cid] = {"tokens": p["tokens"][:n], "computed": n, "table": table[:full]}
        self.grow(cid, table, full)
        if partial:
            assert copies == [(p["table"][full], table[full])]
            self.shadow[table[full]] = list(self.shadow[p["table"][full]])
        else:
            assert copies == []

    @rule(data=st.data())
    def free(self, data):
        if not self.reqs:
            return
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        self.mgr.free(rid)
        del self.reqs[rid]
        with pytest.raises(KeyError):
            self.mgr.free(rid)

    @invariant()
    def consistent(self):
        if not hasattr(self, "mgr"):
            return
        self.mgr.check_integrity()
        refs = self.in_use()
        assert self.mgr.num_free_blocks == self.mgr.num_blocks - len(refs)
        for b in range(self.mgr.num_blocks):
            assert self.mgr.ref_count(b) == refs.get(b, 0)
        for rid, r in self.reqs.items():
            assert self.mgr.block_table(rid) == r["table"]
            for p in range(r["computed"]):  # a shared block holds every sharer's KV
                assert self.shadow[r["table"][p // self.bs]][p % self.bs] == tuple(r["tokens"][: p + 1])

    def teardown(self):
        if not hasattr(self, "mgr"):
            return
        for rid in list(self.reqs):
            self.mgr.free(rid)
        self.mgr.check_integrity()
        assert self.mgr.num_free_blocks == self.mgr.num_blocks


KVCacheMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_kv_cache_state_machine = KVCacheMachine.TestCase
