"""SGLang's own radix-cache and HiCache tests, mirrored against kvtier.

Each test names the test it mirrors (sgl-project/sglang,
``test/registered/unit/mem_cache/test_radix_cache_unit.py`` and
``test_boundary_hiradix_cache_unit.py``). SGLang's ``insert`` is an admission followed by a
release (kvtier stores what a request computes); ``match_prefix`` is ``lookup`` and the
block table of an admission (one token per block mirrors ``page_size=1``, whose device
indices are the block ids); ``inc_lock_ref`` / ``dec_lock_ref`` are a live request and its
removal; ``evictable_size`` and ``protected_size`` are the unheld and held cached blocks.
SGLang's scheduler, not its cache, keeps the last prompt token out of a match; kvtier's
``lookup`` applies that rule itself, so the queries below carry one token more (``END``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from kvtier import (
    BlockRemoved,
    BlockStored,
    BlockTierChanged,
    KVCacheManager,
    OpKind,
    Tier,
)
from peer_mirror.mirror_helpers import admit, cached_slots, hit, make_manager, release

END = 999  # the prompt token past what SGLang's match would cover


def insert(mgr: KVCacheManager, rid: str, tokens: list[int], **kw: Any) -> Sequence[int]:
    """SGLang's insert: compute ``tokens`` and release them to the cache; returns the block
    ids of their full blocks (those that stay cached)."""
    adm = admit(mgr, rid, tokens, **kw)
    release(mgr, rid)
    return adm.block_ids[:len(tokens) // mgr.config.tokens_per_block]


def sizes(mgr: KVCacheManager) -> tuple[int, int]:
    """(evictable, protected) cached blocks: SGLang's evictable_size and protected_size."""
    held = [b.priority is None for b in mgr.cached_blocks()]
    return held.count(False), held.count(True)


def test_insert_then_match_whole_and_part() -> None:
    """Mirrors test_radix_cache_unit.py TestRadixCache.test_insert_and_match_basic: after
    inserting [1, 2, 3] the whole key matches its 3 slots and [1, 2] its first 2."""
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=16)
    assert insert(mgr, "a", [1, 2, 3]) == (0, 1, 2)
    assert sizes(mgr) == (3, 0)
    b = admit(mgr, "b", [1, 2, 3, 7])
    assert (b.num_reused_tokens, b.block_ids[:3]) == (3, (0, 1, 2))
    c = admit(mgr, "c", [1, 2, 8])
    assert (c.num_reused_tokens, c.block_ids[:2]) == (2, (0, 1))


def test_reuse_disabled_stores_nothing() -> None:
    """Mirrors test_radix_cache_unit.py TestRadixCache.test_insert_and_match_basic with
    disable=True: nothing is inserted and nothing matches."""
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=16, enable_block_reuse=False)
    insert(mgr, "a", [1, 2, 3])
    assert mgr.cached_blocks() == [] and hit(mgr, [1, 2, 3, 4]) == 0


def test_total_size_grows_with_each_insert() -> None:
    """Mirrors test_radix_cache_unit.py TestRadixCache.test_total_size: 0, then 3 after
    [1, 2, 3], then 5 after [4, 5]."""
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=16)
    assert len(mgr.cached_blocks()) == 0
    insert(mgr, "a", [1, 2, 3])
    assert len(mgr.cached_blocks()) == 3
    insert(mgr, "b", [4, 5])
    assert len(mgr.cached_blocks()) == 5


def test_reset_empties_the_tree() -> None:
    """Mirrors test_radix_cache_unit.py TestRadixCache.test_reset: total, evictable and
    protected sizes are 0 after a reset."""
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=16)
    insert(mgr, "a", [1, 2, 3])
    assert mgr.reset_cache()
    mgr.check_invariants()
    assert mgr.cached_blocks() == [] and sizes(mgr) == (0, 0)
    assert mgr.num_free_gpu_blocks == 16


def test_extra_keys_isolate_equal_tokens() -> None:
    """Mirrors test_radix_cache_unit.py TestRadixCache.test_extra_key_isolation: the same
    tokens under extra keys "key1", "key2" and none each match only their own slots; an
    unknown key matches nothing."""
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=16)
    slots = {key: insert(mgr, f"r{key}", [1, 2, 3], salt=key) for key in ("key1", "key2", None)}
    assert slots == {"key1": (0, 1, 2), "key2": (3, 4, 5), None: (6, 7, 8)}
    for key, want in slots.items():
        adm = admit(mgr, f"m{key}", [1, 2, 3, 7], salt=key)
        assert (adm.num_reused_tokens, adm.block_ids[:3]) == (3, want)
    assert hit(mgr, [1, 2, 3, 7], salt="nonexistent") == 0
    assert mgr.num_key_spaces == 3


def test_a_live_request_moves_its_blocks_from_evictable_to_protected() -> None:
    """Mirrors test_radix_cache_unit.py TestRadixCache.test_lock_ref_operations: locking
    the node of [1, 2, 3] moves 3 tokens from evictable to protected; unlocking moves them
    back."""
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=16)
    insert(mgr, "a", [1, 2, 3])
    assert sizes(mgr) == (3, 0) and mgr.num_free_gpu_blocks == 16
    admit(mgr, "lock", [1, 2, 3, 7])  # holds the 3 cached blocks and its own [7]
    assert sizes(mgr) == (0, 4) and mgr.num_free_gpu_blocks == 12
    release(mgr, "lock")
    assert sizes(mgr) == (4, 0) and mgr.num_free_gpu_blocks == 16


def test_eviction_frees_the_least_recent_insert_first() -> None:
    """Mirrors test_radix_cache_unit.py TestRadixCache.test_evict_functionality: with
    [1, 2] and [3, 4] inserted and no free block, freeing 2 tokens evicts [1, 2] (the older)
    and the total size drops."""
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=6)
    insert(mgr, "a", [1, 2])
    insert(mgr, "b", [3, 4])
    admit(mgr, "fill", [50, 51])  # the two free blocks (the END tokens freed them)
    assert mgr.num_free_gpu_blocks == 4 and len(mgr.cached_blocks()) == 6
    admit(mgr, "two", [60, 61])  # evicts 2 tokens
    assert hit(mgr, [1, 2, 0]) == 0 and hit(mgr, [3, 4, 0]) == 2


@pytest.mark.parametrize(("page_size", "length"), [(1, 5), (2, 5), (4, 6)])
def test_matches_are_page_aligned(page_size: int, length: int) -> None:
    """Mirrors test_radix_cache_unit.py TestRadixCache.test_page_alignment_boundary: a
    match of a stored sequence is a whole number of pages."""
    mgr = make_manager(tokens_per_block=page_size, num_gpu_blocks=16)
    tokens = list(range(length))
    insert(mgr, "a", tokens)
    matched = hit(mgr, [*tokens, END])
    assert matched == length // page_size * page_size and matched > 0


@pytest.mark.parametrize("page_size", [1, 2])
def test_matches_split_runs_without_changing_the_total(page_size: int) -> None:
    """Mirrors test_radix_cache_unit.py TestRadixCache.test_advanced_prefix_match_with_
    node_splits: [1..8] and the branch [1, 2, 9, 10] hold 10 tokens; matches diverging
    after 4 and 6 tokens return those prefixes' slots, and the total never changes."""
    mgr = make_manager(tokens_per_block=page_size, num_gpu_blocks=16)
    seq1 = [1, 2, 3, 4, 5, 6, 7, 8]
    seq2 = [1, 2, 9, 10]
    val1 = insert(mgr, "s1", seq1)
    val2 = insert(mgr, "s2", seq2)
    assert len(mgr.cached_blocks()) * page_size == 10
    per = page_size
    for rid, query, want in (("q1", [1, 2, 3, 4, 999, 1000], val1[:4 // per]),
                             ("q2", [*seq1, END], val1),
                             ("q3", [1, 2, 3, 4, 5, 6, 777, 888], val1[:6 // per]),
                             ("q4", [*seq2, END], val2)):
        adm = admit(mgr, rid, query)
        assert adm.block_ids[:len(want)] == want and adm.num_reused_tokens == len(want) * per
        release(mgr, rid)
        assert len(mgr.cached_blocks()) * page_size >= 10
    assert hit(mgr, [*seq1, END]) == 8 and hit(mgr, [*seq2, END]) == 4


@pytest.mark.parametrize(("page_size", "enable_events"), [(1, True), (2, True), (1, False)])
def test_inserts_report_stored_blocks_of_at_most_a_page(page_size: int,
                                                        enable_events: bool) -> None:
    """Mirrors test_radix_cache_unit.py TestRadixCache.test_kv_cache_events: inserting
    [1..5] reports one stored event per full page, each with at most a page of tokens; with
    events off there are none."""
    mgr = make_manager(tokens_per_block=page_size, num_gpu_blocks=16,
                       enable_events=enable_events)
    insert(mgr, "a", [1, 2, 3, 4, 5])
    events = mgr.drain_events()
    if not enable_events:
        assert events == []
        return
    stored = [e for e in events if isinstance(e, BlockStored)]
    assert len(stored) == 5 // page_size
    assert all(len(e.token_ids or ()) == page_size for e in stored)


def test_eviction_reports_removed_blocks() -> None:
    """Mirrors test_radix_cache_unit.py TestRadixCache.test_kv_cache_events_with_eviction:
    inserting then evicting 3 tokens reports stored, then removed events for them."""
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=4, enable_events=True)
    insert(mgr, "a", [1, 2, 3])
    admit(mgr, "evict", [7, 7, 7, 7])  # all 4 blocks: the 3 cached are evicted
    events = mgr.drain_events()
    stored = [e.block_hash for e in events if isinstance(e, BlockStored)]
    removed = [e.block_hash for e in events if isinstance(e, BlockRemoved)]
    assert sorted(removed) == sorted(stored[:3])
    assert [type(e) for e in events[:3]] == [BlockStored] * 3


def test_repeating_tokens_get_chained_hashes() -> None:
    """Mirrors test_radix_cache_unit.py TestRadixCache.test_hash_value_repeating_tokens:
    [1, 2, 3, 4, 1, 2, 3, 4] with pages of 4 gives two stored blocks with different hashes,
    the first without a parent, the second's parent the first."""
    mgr = make_manager(tokens_per_block=4, num_gpu_blocks=8, enable_events=True)
    insert(mgr, "a", [1, 2, 3, 4, 1, 2, 3, 4])
    first, second = [e for e in mgr.drain_events() if isinstance(e, BlockStored)]
    assert first.block_hash != second.block_hash
    assert first.parent_hash is None and second.parent_hash == first.block_hash
    assert first.token_ids == second.token_ids == (1, 2, 3, 4)


def test_a_split_keeps_the_prefix_hash() -> None:
    """Mirrors test_radix_cache_unit.py TestRadixCache.test_hash_value_split: after [1, 2,
    3, 4] and [1, 2, 5, 6] (pages of 2) the shared page [1, 2] keeps its one hash, and the
    new page [5, 6] names it as parent."""
    mgr = make_manager(tokens_per_block=2, num_gpu_blocks=8, enable_events=True)
    insert(mgr, "a", [1, 2, 3, 4])
    first = [e for e in mgr.drain_events() if isinstance(e, BlockStored)]
    insert(mgr, "b", [1, 2, 5, 6])
    second = [e for e in mgr.drain_events() if isinstance(e, BlockStored)]
    assert [e.token_ids for e in second] == [(5, 6)]
    assert second[0].parent_hash == first[0].block_hash
    by_tokens = {b.tokens: b.block_hash for b in mgr.cached_blocks()}
    assert by_tokens[(1, 2)] == first[0].block_hash


def test_block_hashes_differ_across_extra_keys() -> None:
    """Mirrors test_radix_cache_unit.py TestRadixCache.test_block_hashes_are_isolated_by_
    extra_key: [1, 2, 3, 4] under "key1" does not match under "key2", and their stored
    events carry different hashes."""
    mgr = make_manager(tokens_per_block=4, num_gpu_blocks=8, enable_events=True)
    insert(mgr, "a", [1, 2, 3, 4], salt="key1")
    (e1,) = [e for e in mgr.drain_events() if isinstance(e, BlockStored)]
    assert hit(mgr, [1, 2, 3, 4, END], salt="key2") == 0
    insert(mgr, "b", [1, 2, 3, 4], salt="key2")
    (e2,) = [e for e in mgr.drain_events() if isinstance(e, BlockStored)]
    assert e1.block_hash != e2.block_hash


def test_device_eviction_backs_a_leaf_up_to_the_host() -> None:
    """Mirrors test_boundary_hiradix_cache_unit.py test_l1_evicts_d_leaf_under_d_parent_...
    and test_l1_evicts_dh_leaf_to_h_...: a device leaf evicted under memory pressure keeps
    its KV on the host (an offload op, a tier-change event), its parent stays on the
    device, and a match sees both tiers."""
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=4, num_host_blocks=4,
                       enable_events=True)
    insert(mgr, "a", [1, 2])
    mgr.drain_events()
    admit(mgr, "b", [5, 6, 7])  # one eviction: the leaf [2] (END freed a block)
    (op,) = mgr.take_plan().ops
    assert (op.kind, op.src_tier, op.dst_tier) == (OpKind.OFFLOAD, Tier.GPU, Tier.HOST)
    moved = [e for e in mgr.drain_events() if isinstance(e, BlockTierChanged)]
    assert [(e.old_tier, e.new_tier) for e in moved] == [(Tier.GPU, Tier.HOST)]
    m = mgr.lookup([1, 2, END])
    assert (m.num_tokens, m.num_gpu_tokens, m.num_host_tokens) == (2, 1, 1)


def test_host_eviction_drops_the_least_recent_host_leaf() -> None:
    """Mirrors test_boundary_hiradix_cache_unit.py test_l2_deletes_h_leaves_...: when the
    host is full, offloading one more block drops the least recently released host leaf
    (a removed event on the host tier)."""
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=2, num_host_blocks=2,
                       enable_events=True)
    insert(mgr, "a", [1])
    insert(mgr, "b", [2])
    admit(mgr, "c", [3, 3])  # a's [1] and b's [2] to the host (both freed their END)
    release(mgr, "c")
    assert [b.tier for b in mgr.cached_blocks()].count(Tier.HOST) == 2
    mgr.drain_events()
    admit(mgr, "d", [4, 4])  # c's two blocks to the host: a's and b's host blocks go
    removed = [e for e in mgr.drain_events() if isinstance(e, BlockRemoved)]
    assert [e.tier for e in removed] == [Tier.HOST, Tier.HOST]
    assert hit(mgr, [1, END]) == 0 and hit(mgr, [2, END]) == 0
    assert hit(mgr, [3, 3, END]) == 2


def test_host_blocks_a_request_onboards_are_not_evicted_for_its_own_offloads() -> None:
    """Mirrors test_boundary_hiradix_cache_unit.py test_l2_respects_host_ref_counter (a
    host block being loaded is protected): a request onboarding a host prefix while the
    device evicts into a full host keeps its whole promised reuse."""
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=3, num_host_blocks=2)
    insert(mgr, "p", [1, 2])
    admit(mgr, "f", [8, 8, 8])  # [1, 2] to the host: the host is full
    release(mgr, "f")
    mgr.take_plan()
    m = mgr.lookup([1, 2, 9])
    assert (m.num_tokens, m.num_host_tokens) == (2, 2)
    r = admit(mgr, "q", [1, 2, 9])  # needs all 3 GPU blocks: evicts f's 3 into the host
    assert (r.num_reused_tokens, r.num_onboarded_tokens) == (2, 2)
    ops = mgr.take_plan().ops
    assert [op.kind for op in ops].count(OpKind.ONBOARD) == 2
    assert sorted(r.block_ids) == cached_slots(mgr) == [0, 1, 2]
    assert hit(mgr, [1, 2, 9, END]) == 3


def test_onboarding_into_a_full_host_keeps_every_victim_block_the_freed_slots_can_hold() -> None:
    """Mirrors test_boundary_hiradix_cache_unit.py test_l1_evicts_... / load-back under a
    full host: onboarding 2 host blocks frees 2 host slots, so of the 3 GPU blocks evicted
    only one need be dropped (the first, before any slot is free); the other two go to the
    host and [8, 8] still hits there.

        before q:  host [1][2] (full, claimed by q)     GPU [8][8][8] (one run, unheld)
        q = [1, 2, 9]: drop the leaf [8]; [1] in (host slot 0 free); middle [8] -> host 0;
                       [2] in (host slot 1 free); head [8] -> host 1 for q's new block
    """
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=3, num_host_blocks=2)
    insert(mgr, "p", [1, 2])
    admit(mgr, "f", [8, 8, 8])
    release(mgr, "f")
    admit(mgr, "q", [1, 2, 9])
    assert [b.tier for b in mgr.cached_blocks()].count(Tier.HOST) == 2
    assert hit(mgr, [8, 8, 8, END]) == 2
