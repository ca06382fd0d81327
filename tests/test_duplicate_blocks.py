"""A request that computes blocks another request cached first keeps caching after them.

Each case failed before the fix: the duplicate stored nothing and turned the request's
storing off, so none of its later prompt or decode blocks were ever cached.
"""

from __future__ import annotations

from kvtier import BlockTierChanged, CacheConfig, KVCacheManager, SequenceSpec, Tier


def make_manager(num_gpu_blocks: int = 8, num_host_blocks: int = 0, partial: bool = False,
                 events: bool = False) -> KVCacheManager:
    return KVCacheManager(CacheConfig(
        tokens_per_block=4, num_gpu_blocks=num_gpu_blocks, num_host_blocks=num_host_blocks,
        enable_partial_reuse=partial, enable_events=events))


def test_two_requests_of_one_batch_sharing_a_new_prefix_both_keep_caching() -> None:
    """The second of a batch stores its blocks below the first's copy of their prefix."""
    # a = [1..4][5..8][10]    b = [1..4][5..8][20]: both new; a stores [1..4][5..8] first,
    # b's copies (slots 3, 4) stay private, b's path follows a's run:
    #   root ─ [1..4 | 0] ─ [5..8 | 1] ─┬─ (a's [10] is private, slot 2)
    #                                    └─ [20 21 22 23 | 5]   after b decodes 21 22 23
    mgr = make_manager()
    a, b = mgr.add_sequence_batch([SequenceSpec("a", [1, 2, 3, 4, 5, 6, 7, 8, 10]),
                                   SequenceSpec("b", [1, 2, 3, 4, 5, 6, 7, 8, 20])])
    assert (a.block_ids, b.block_ids) == ((0, 1, 2), (3, 4, 5))
    assert mgr.append_tokens("b", [21, 22, 23]) == []
    mgr.check_invariants()
    assert mgr.lookup([1, 2, 3, 4, 5, 6, 7, 8, 20, 21, 22, 23, 0]).num_gpu_tokens == 12
    assert mgr.lookup([1, 2, 3, 4, 5, 6, 7, 8, 20]).num_tokens == 8
    assert mgr.block_table("b") == [3, 4, 5]  # b keeps reading its own copies
    mgr.remove_sequence("a")
    mgr.check_invariants()
    mgr.remove_sequence("b")
    mgr.check_invariants()
    # b's private copies are free again; three blocks stay cached, all evictable.
    assert mgr.num_free_gpu_blocks == 8
    assert mgr.lookup([1, 2, 3, 4, 5, 6, 7, 8, 20, 21, 22, 23, 0]).num_tokens == 12
    assert mgr.stats.num_duplicate_stores == 2


def test_fully_cached_block_aligned_prompt_caches_its_decode_blocks() -> None:
    """The recomputed last prompt block takes over the cached copy; decode blocks follow."""
    # x = [1..4][5..8][9] cached: slots 0, 1. q = [1..8] reuses only [1..4] (its last token
    # must be computed), recomputes [5..8] into slot 2, which the cached run takes over
    # (slot 1 is free again, and q's first decode block gets it):
    #   root ─ [1..4 | 0] ─ [5..8 | 2] ─ [9..12 | 1]
    mgr = make_manager()
    mgr.add_sequence(SequenceSpec("x", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    mgr.remove_sequence("x")
    q = mgr.add_sequence(SequenceSpec("q", [1, 2, 3, 4, 5, 6, 7, 8]))
    assert (q.num_reused_tokens, q.block_ids) == (4, (0, 2))
    assert mgr.append_tokens("q", [9, 10, 11, 12]) == [1]
    mgr.check_invariants()
    assert mgr.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0]).num_tokens == 12
    mgr.remove_sequence("q")
    mgr.check_invariants()
    assert mgr.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0]).num_tokens == 12


def test_partial_copy_then_decode_equal_to_cached_children_keeps_caching() -> None:
    """A partial copy grown into cached children adopts them, then stores past them."""
    # x = [1..4][5..8][9..12][13] cached: slots 0, 1, 2. r = [1..6] reuses [1..4] and, by a
    # copy into slot 3, token 5 of the non-leaf [5..8]. Decoding 7 8 completes [5..8]: the
    # cached run takes slot 3 (slot 1 is free); 9..12 go to slot 1 and the cached [9..12]
    # takes it (slot 2 free); 13..16 go to slot 2 and are stored as a new run:
    #   root ─ [1..4 | 0] ─ [5..8 | 3] ─ [9..12 | 1] ─ [13..16 | 2]
    mgr = make_manager(partial=True)
    mgr.add_sequence(SequenceSpec("x", list(range(1, 14))))
    mgr.remove_sequence("x")
    r = mgr.add_sequence(SequenceSpec("r", [1, 2, 3, 4, 5, 6]))
    assert (r.num_reused_tokens, r.block_ids) == (5, (0, 3))
    for token in range(7, 18):
        assert mgr.append_tokens("r", [token]) is not None
        mgr.check_invariants()
    assert mgr.block_table("r") == [0, 3, 1, 2, 4]
    assert mgr.lookup(list(range(1, 18)) + [0]).num_tokens == 16
    mgr.remove_sequence("r")
    mgr.check_invariants()
    assert mgr.lookup(list(range(1, 18)) + [0]).num_tokens == 16


def test_duplicate_cached_on_host_moves_to_the_gpu_without_a_copy() -> None:
    """A recomputed block whose twin waits on the host takes the GPU copy's slot."""
    # x = [1..4][5..8][9] and f = [50..53][54..57][58] push x's run to host slots 0, 1.
    # q = [1..8] onboards [1..4] into GPU slot 2 and recomputes [5..8] into GPU slot 1: the
    # host [5..8] becomes a GPU run on slot 1 (an event, no copy) and host slot is free.
    mgr = make_manager(num_gpu_blocks=3, num_host_blocks=4, events=True)
    for rid, first in (("x", 1), ("f", 50)):
        mgr.add_sequence(SequenceSpec(rid, list(range(first, first + 9))))
        mgr.remove_sequence(rid)
    assert mgr.lookup(list(range(1, 10))).num_host_tokens == 8
    mgr.drain_events()
    q = mgr.add_sequence(SequenceSpec("q", list(range(1, 9))))
    assert (q.num_reused_tokens, q.num_onboarded_tokens, q.block_ids) == (4, 4, (2, 1))
    moves = [(e.old_tier, e.new_tier) for e in mgr.drain_events()
             if isinstance(e, BlockTierChanged)]
    assert moves == [(Tier.HOST, Tier.GPU), (Tier.GPU, Tier.HOST), (Tier.HOST, Tier.GPU)]
    assert mgr.append_tokens("q", [9, 10, 11, 12]) == [0]
    mgr.check_invariants()
    found = mgr.lookup(list(range(1, 13)) + [0])
    assert (found.num_gpu_tokens, found.num_host_tokens) == (12, 0)
