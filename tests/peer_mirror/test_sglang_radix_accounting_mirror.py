"""More of SGLang's ``RadixCache`` unit tests, mirrored against kvtier.

Each test names the test it mirrors (sgl-project/sglang,
``test/registered/unit/mem_cache/test_radix_cache_unit.py``) or the ``RadixCache`` rule it
checks (``python/sglang/srt/mem_cache/radix_cache.py``). The translation is
``test_sglang_mirror.py``'s: ``insert`` is an admission then a release, ``match_prefix`` is
``lookup`` (whose queries carry one token more, ``END``, for the last-token rule),
``inc_lock_ref`` is a live request, and one token per block mirrors ``page_size=1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvtier import BlockStored, KVCacheManager
from peer_mirror.mirror_helpers import admit, cached_slots, hit, make_manager, release

END = 999  # the prompt token past what SGLang's match would cover


def insert(mgr: KVCacheManager, rid: str, tokens: list[int],
           **kw: Any) -> tuple[int, Sequence[int]]:
    """SGLang's insert: (the prefix length already cached, the full blocks' ids)."""
    adm = admit(mgr, rid, tokens, **kw)
    release(mgr, rid)
    return adm.num_reused_tokens, adm.block_ids[:len(tokens) // mgr.config.tokens_per_block]


def sizes(mgr: KVCacheManager) -> tuple[int, int]:
    """(evictable, protected) cached blocks: SGLang's evictable_size and protected_size."""
    held = [b.priority is None for b in mgr.cached_blocks()]
    return held.count(False), held.count(True)


def test_insert_reports_the_prefix_it_found_cached() -> None:
    """Mirrors test_radix_cache_unit.py TestRadixCache.test_insert_with_none_value and
    RadixCache.insert's ``prefix_len``: the first insert of [1, 2, 3] finds 0 cached; an
    insert of [1, 2, 3, 4, 5] then finds the 3 and adds only 2 slots (total 5). kvtier's
    admission keeps the prompt's last token out of a hit (it must compute its logits), so
    re-inserting [1, 2, 3] itself reports 2, not SGLang's 3 (a deliberate difference: the
    last block is recomputed, as in vLLM). The recomputed copy of [3] (slot 5) then
    replaces the unheld cached one (slot 2, freed): kvtier's store adopts a request's copy
    where the cached run is unclaimed (``RadixCache._adopt``, taking no block from the
    pool) where SGLang keeps the first slot and frees the duplicate; the cached tokens and
    the hit are the same (a deliberate difference)."""
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=16)
    assert insert(mgr, "a", [1, 2, 3]) == (0, (0, 1, 2))
    assert insert(mgr, "b", [1, 2, 3, 4, 5]) == (3, (0, 1, 2, 3, 4))
    assert len(mgr.cached_blocks()) == 5
    assert insert(mgr, "c", [1, 2, 3]) == (2, (0, 1, 5))
    assert cached_slots(mgr) == [0, 1, 3, 4, 5] and hit(mgr, [1, 2, 3, END]) == 3
    assert mgr.stats.num_duplicate_stores == 1  # [3], recomputed by "c"


def test_all_cached_values_are_the_inserted_slots() -> None:
    """Mirrors test_radix_cache_unit.py TestRadixCache.test_all_values_flatten: after
    inserting [1, 2] and [3, 4] the cache holds exactly the 4 slots they were given, with
    the tokens of each."""
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=8)
    insert(mgr, "a", [1, 2])
    insert(mgr, "b", [3, 4])
    assert cached_slots(mgr) == [0, 1, 2, 3]
    assert sorted((b.slot, b.tokens) for b in mgr.cached_blocks()) == [
        (0, (1,)), (1, (2,)), (2, (3,)), (3, (4,))]


def test_a_multi_page_insert_stores_one_chained_hash_per_page() -> None:
    """Mirrors test_radix_cache_unit.py TestRadixCache.test_hash_value_storage: inserting
    8 tokens with page_size=4 gives one node of 2 page hashes; kvtier stores 2 blocks, the
    second chained on the first, each with its own 4 tokens."""
    mgr = make_manager(tokens_per_block=4, num_gpu_blocks=8, enable_events=True)
    insert(mgr, "a", [1, 2, 3, 4, 5, 6, 7, 8])
    stored = [e for e in mgr.drain_events() if isinstance(e, BlockStored)]
    assert [(e.token_ids, e.block_hash != 0) for e in stored] == [
        ((1, 2, 3, 4), True), ((5, 6, 7, 8), True)]
    assert stored[0].parent_hash is None and stored[1].parent_hash == stored[0].block_hash
    blocks = mgr.cached_blocks()
    assert [(b.block_hash, b.parent_hash) for b in blocks] == [
        (stored[0].block_hash, None), (stored[1].block_hash, stored[0].block_hash)]


def test_a_match_refreshes_its_path_so_eviction_takes_the_untouched_insert() -> None:
    """Mirrors RadixCache's eviction by ``last_access_time`` (match_prefix touches every node
    of the matched path; evict pops the least recently accessed leaf; TreeNode.__lt__ of
    test_radix_cache_unit.py TestTreeNode.test_lt_comparison): [1, 2] is inserted before
    [3, 4], then a request reuses [1, 2]; an eviction of 2 tokens takes [3, 4], not the
    older insert."""
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=6)
    insert(mgr, "a", [1, 2])
    insert(mgr, "b", [3, 4])
    reuse = admit(mgr, "reuse", [1, 2, 70])
    assert (reuse.num_reused_tokens, reuse.block_ids) == (2, (0, 1, 4))
    release(mgr, "reuse")  # [1, 2, 70] now the most recent path
    admit(mgr, "fill", [50])  # the last free block
    admit(mgr, "two", [60, 61])  # evicts 2 tokens
    assert hit(mgr, [3, 4, END]) == 0 and hit(mgr, [1, 2, 70, END]) == 3


def test_a_lock_on_a_branch_protects_the_shared_prefix_after_a_split() -> None:
    """Mirrors test_radix_cache_unit.py TestRadixCache.test_advanced_prefix_match_with_node_
    splits with test_lock_ref_operations: [1..8] and [1, 2, 9, 10] total 10 (8 + 2); locking
    the branch [1, 2, 9, 10] (inc_lock_ref walks to the root) protects its 4 tokens, the
    shared [1, 2] among them, leaving 6 evictable; a pool pressed for space then evicts the
    other branch's 6 and never [1, 2]."""
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=12)
    insert(mgr, "a", [1, 2, 3, 4, 5, 6, 7, 8])
    assert insert(mgr, "b", [1, 2, 9, 10]) == (2, (0, 1, 8, 9))
    assert len(mgr.cached_blocks()) == 10 and sizes(mgr) == (10, 0)
    lock = admit(mgr, "lock", [1, 2, 9, 10, END])
    assert (lock.num_reused_tokens, lock.block_ids) == (4, (0, 1, 8, 9, 10))
    assert sizes(mgr) == (6, 5)
    big = admit(mgr, "big", list(range(100, 107)))  # 1 free + 6 evicted
    assert big.block_ids == (2, 3, 4, 5, 6, 7, 11)
    assert sizes(mgr) == (0, 12) and hit(mgr, [1, 2, 3, END]) == 2
    release(mgr, "lock")
    assert hit(mgr, [1, 2, 9, 10, END, END]) == 5


def test_a_lock_inside_a_node_protects_only_the_prefix_it_covers() -> None:
    """Mirrors test_radix_cache_unit.py TestRadixCache.test_lock_ref_operations on a prefix
    that ends inside a node (match_prefix splits the node [1..6] at 2, and inc_lock_ref
    walks from the new node up): locking [1, 2] protects 2 tokens and leaves 4 evictable;
    the total stays 6 (7 with the lock's own [70]); an eviction of everything evictable
    then keeps [1, 2] and hands out [3..6]'s slots 2 to 5, then the free slot 7."""
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=8)
    insert(mgr, "a", [1, 2, 3, 4, 5, 6])
    lock = admit(mgr, "lock", [1, 2, 70])
    assert (lock.num_reused_tokens, lock.block_ids) == (2, (0, 1, 6))
    assert sizes(mgr) == (4, 3) and len(mgr.cached_blocks()) == 7
    assert admit(mgr, "big", list(range(100, 105))).block_ids == (2, 3, 4, 5, 7)
    assert sizes(mgr) == (0, 8)  # the lock's 3 and "big"'s own 5
    assert hit(mgr, [1, 2, 3, END]) == 2
