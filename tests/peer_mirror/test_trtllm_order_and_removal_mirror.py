"""TensorRT-LLM ``kvCacheManagerTest.cpp`` cases not mirrored yet, against kvtier: the
eviction order among blocks of equal priority, ``removeSequence`` with and without
storing for reuse, and the stored event of a request that extends a cached prefix.

Each test names the TensorRT-LLM test or rule it mirrors (NVIDIA/TensorRT-LLM,
``cpp/tests/unit_tests/batch_manager/kvCacheManagerTest.cpp`` and
``cpp/tensorrt_llm/batch_manager/kvCacheManager.cpp``) and asserts kvtier's exact answer.
"""

from __future__ import annotations

import pytest

from kvtier import BlockRemoved, BlockStored, KVCacheManager, SequenceSpec
from peer_mirror.mirror_helpers import admit, cached_slots, hit, make_manager, release


def drain_stored(mgr: KVCacheManager) -> list[BlockStored]:
    """The events since the last drain, asserted to be stored events only."""
    events = mgr.drain_events()
    stored = [e for e in events if isinstance(e, BlockStored)]
    assert len(stored) == len(events), events
    return stored


def test_equal_priorities_evict_the_least_recent_release_tail_first() -> None:
    """Mirrors kvCacheManagerTest.cpp BlockManagerBlockPriorityTest's ordering under one
    priority (and LRUPolicyTest.LRUTest: releaseBlocks frees a sequence's blocks last to
    first, each to the back of its priority's queue): request 0 holds slots (0, 1) and
    request 1 (2, 3), both at the default 35, released 0 then 1. Four one-block requests then
    evict 1, 0, 3, 2 (request 0's tail, its head, request 1's tail, its head), one removed
    event each, before the new block's stored event."""
    mgr = make_manager(num_gpu_blocks=4, enable_events=True)
    admit(mgr, "0", list(range(8)))
    admit(mgr, "1", list(range(8, 16)))
    release(mgr, "0", "1")
    assert sorted((b.slot, b.priority) for b in mgr.cached_blocks()) == [
        (0, 35), (1, 35), (2, 35), (3, 35)]
    hash_of = {b.slot: b.block_hash for b in mgr.cached_blocks()}
    mgr.drain_events()
    for i, slot in enumerate((1, 0, 3, 2)):
        assert admit(mgr, f"x{i}", [100 + i] * 4).block_ids == (slot,)
        removed, stored = mgr.drain_events()
        assert isinstance(removed, BlockRemoved) and isinstance(stored, BlockStored)
        assert removed.block_hash == hash_of[slot]
        assert stored.token_ids == (100 + i,) * 4
    assert hit(mgr, [*range(16), 0]) == 0


@pytest.mark.parametrize("store_for_reuse", [True, False])
def test_removal_keeps_every_block_computed_before_it_either_way(
        store_for_reuse: bool) -> None:
    """Mirrors kvCacheManagerTest.cpp's removeSequence with and without storing for reuse
    (as we read kvCacheManager.cpp: context blocks are stored once the context is done, a
    request's decoded blocks when it is released, and not when the removal is told not to
    store). A 10-token prompt (blocks of 4) runs a step, decodes 3 tokens
    in a second (filling block 2), and in a third appends 4 more (filling block 3) and is
    removed before that step ends. With or without storing, kvtier keeps blocks 0 to 2 (12
    tokens hit) and frees block 3 and the partial one: kvtier stores a block as soon as its
    KV is computed (at the end of the step that computed it), so a removal cannot un-store
    it, and what the removal's own step scheduled is not computed. TensorRT-LLM without
    storing would not keep the decoded block 2 (a hit of 8): a deliberate difference, the
    block's KV is as valid as the prompt's (``store_for_reuse=False`` only skips blocks not
    stored yet)."""
    mgr = make_manager(num_gpu_blocks=8, enable_events=True)
    mgr.begin_step()
    assert mgr.add_sequence(SequenceSpec("0", list(range(10)))).block_ids == (0, 1, 2)
    mgr.end_step()
    assert [e.token_ids for e in drain_stored(mgr)] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    mgr.begin_step()
    assert mgr.append_tokens("0", [10, 11, 12]) == [3]
    mgr.end_step()
    assert [e.token_ids for e in drain_stored(mgr)] == [(8, 9, 10, 11)]
    mgr.begin_step()
    assert mgr.append_tokens("0", [13, 14, 15, 16]) == [4]
    mgr.remove_sequence("0", store_for_reuse=store_for_reuse)
    mgr.end_step()
    mgr.check_invariants()
    assert mgr.drain_events() == []
    assert cached_slots(mgr) == [0, 1, 2] and mgr.num_free_gpu_blocks == 8
    assert hit(mgr, [*range(17), 0]) == 12


def test_a_request_extending_a_cached_prefix_stores_only_its_new_blocks() -> None:
    """Mirrors kvCacheManagerTest.cpp KVCacheManagerEventStream's second request (a prompt
    that reuses a stored prefix emits a stored event for its new blocks only, the first
    parented on the last reused block): after [0..7] is cached, [0..16] reuses 8 tokens
    and stores blocks [8..11] (parent: block 1) and [12..15] (parent: the new block)."""
    mgr = make_manager(num_gpu_blocks=8, enable_events=True)
    insert = admit(mgr, "0", list(range(8)))
    release(mgr, "0")
    h0, h1 = (b.block_hash for b in mgr.cached_blocks())
    mgr.drain_events()
    adm = admit(mgr, "1", [*range(16), 0])
    assert (insert.block_ids, adm.block_ids, adm.num_reused_tokens) == (
        (0, 1), (0, 1, 2, 3, 4), 8)
    events = drain_stored(mgr)
    assert [e.token_ids for e in events] == [(8, 9, 10, 11), (12, 13, 14, 15)]
    assert events[0].parent_hash == h1 and events[1].parent_hash == events[0].block_hash
    assert h0 not in {e.block_hash for e in events}
