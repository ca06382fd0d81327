"""TensorRT-LLM's own KV-cache-manager tests, mirrored against kvtier.

Each test names the test it mirrors (NVIDIA/TensorRT-LLM,
``cpp/tests/unit_tests/batch_manager/kvCacheManagerTest.cpp`` or ``evictionPolicyTest.cpp``)
and asserts kvtier's exact answer. TensorRT-LLM's ``getContextCurrentPosition()`` after
``addSequence`` is kvtier's ``num_reused_tokens``; its primary / secondary pools are the GPU
and host tiers; ``KvCacheRetentionConfig`` is ``Retention``.

One difference by design runs through these tests: TensorRT-LLM stores a released
sequence's partial last block (all but its last token) and reuses it partially; kvtier
stores only full blocks, and partial reuse reads a full cached block's leading tokens
(in place when nobody else holds it, else by a copy).
"""

from __future__ import annotations

import pytest

from fake_clock import FakeClock
from kvtier import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    BlockTierChanged,
    MultimodalItem,
    OpKind,
    Retention,
    RetentionRange,
    SequenceSpec,
    Tier,
)
from peer_mirror.mirror_helpers import admit, cached_slots, hit, make_manager, release


def test_reuse_of_full_blocks_and_release_counts() -> None:
    """Mirrors kvCacheManagerTest.cpp BlockManagerReuseTest (its first half): the same
    9-token prompt reuses blocks 0 and 1 and gets a new third block, every block comes back
    free after each release, and a shorter prompt reuses block 0 only. Differs by design:
    the decoded partial block [8, 9, 10] is not stored, so the 10-token prompt reuses 8
    tokens where TensorRT-LLM reuses 9 from its stored [8, 9]."""
    mgr = make_manager(num_gpu_blocks=8)
    assert admit(mgr, "0", list(range(9))).block_ids == (0, 1, 2)
    assert mgr.append_tokens("0", [9, 10]) == []
    assert mgr.num_free_gpu_blocks == 5
    release(mgr, "0")
    assert mgr.num_free_gpu_blocks == 8 and cached_slots(mgr) == [0, 1]
    r1 = admit(mgr, "1", list(range(9)))
    assert (r1.num_reused_tokens, r1.block_ids) == (8, (0, 1, 2))
    release(mgr, "1")
    assert hit(mgr, list(range(10))) == 8
    r2 = admit(mgr, "2", list(range(5)))
    assert (r2.num_reused_tokens, len(r2.block_ids)) == (4, 2) and r2.block_ids[0] == 0
    assert mgr.num_free_gpu_blocks == 6
    release(mgr, "2")
    # A prompt of zeros has its own first block ([0, 0, 0, 0] is not [0, 1, 2, 3]).
    r5 = admit(mgr, "5", [0] * (8 * 4 - 1))
    assert r5.num_reused_tokens == 0 and len(r5.block_ids) == 8
    assert mgr.num_free_gpu_blocks == 0


def test_partial_reuse_in_place_then_by_copy_when_the_source_is_held() -> None:
    """Mirrors kvCacheManagerTest.cpp BlockManagerReuseTest's partial reuse ("reuse blocks
    0, 1, 2(p)"): a prompt diverging inside a cached block reuses its leading tokens, in
    place when nobody holds the block (it leaves the cache: it will be overwritten), and
    by a copy into a new block when another request holds it (copyOnPartialReuse)."""
    mgr = make_manager(num_gpu_blocks=8, enable_partial_reuse=True)
    admit(mgr, "f", [*range(12), 50])
    release(mgr, "f")
    assert cached_slots(mgr) == [0, 1, 2]  # [0..3] [4..7] [8..11]
    m = mgr.lookup([*range(10), 12])
    assert (m.num_tokens, m.num_partial_tokens) == (10, 2)
    r3 = admit(mgr, "3", [*range(10), 12])
    assert (r3.num_reused_tokens, r3.block_ids) == (10, (0, 1, 2))
    assert mgr.stats.num_partial_in_place == 1 and mgr.take_plan().ops == ()
    assert cached_slots(mgr) == [0, 1]  # block 2 is the request's own now
    r4 = admit(mgr, "4", [*range(12), 50])  # stores [8..11] again, in block 3
    assert (r4.num_reused_tokens, r4.block_ids) == (8, (0, 1, 3, 4))
    r5 = admit(mgr, "5", [*range(10), 13])  # block 3 is held by "4": copied
    assert (r5.num_reused_tokens, r5.block_ids) == (10, (0, 1, 5))
    (op,) = mgr.take_plan().ops
    assert (op.kind, op.src_slot, op.dst_slot, op.num_tokens) == (OpKind.COPY, 3, 5, 2)
    assert mgr.stats.num_partial_copies == 1
    release(mgr, "3", "4", "5")
    assert mgr.num_free_gpu_blocks == 8 and cached_slots(mgr) == [0, 1, 3]


def test_partial_reuse_of_a_block_aligned_prompt_stops_one_token_short() -> None:
    """Mirrors kvCacheManagerTest.cpp BlockManagerReuseTest's "getContextCurrentPosition()
    == promptLen - 1": with partial reuse a fully cached prompt reuses all but its last
    token (without it, all but its last block)."""
    mgr = make_manager(num_gpu_blocks=8, enable_partial_reuse=True)
    admit(mgr, "0", list(range(8)))
    release(mgr, "0")
    m = mgr.lookup(list(range(8)))
    assert (m.num_tokens, m.num_partial_tokens) == (7, 3)
    assert admit(mgr, "1", list(range(8))).num_reused_tokens == 7
    release(mgr, "1")
    assert hit(mgr, [*range(8), 9]) == 8 and cached_slots(mgr) == [0, 1]
    off = make_manager(num_gpu_blocks=8)
    admit(off, "0", list(range(8)))
    assert hit(off, list(range(8))) == 4


def test_lora_task_ids_never_share_blocks() -> None:
    """Mirrors kvCacheManagerTest.cpp BlockManagerReuseWithLoraTaskIdTest: the same tokens
    under LoRA task 1 reuse nothing of task 0's blocks, each task reuses its own, and
    task 0 is not the same as no LoRA at all."""
    mgr = make_manager(num_gpu_blocks=16)
    assert admit(mgr, "0", list(range(9)), lora_id=0).block_ids == (0, 1, 2)
    release(mgr, "0")
    assert admit(mgr, "1", list(range(9)), lora_id=0).num_reused_tokens == 8
    release(mgr, "1")
    r2 = admit(mgr, "2", list(range(9)), lora_id=1)
    assert r2.num_reused_tokens == 0 and len(set(r2.block_ids) & {0, 1}) == 0
    release(mgr, "2")
    assert admit(mgr, "3", [*range(10), 11], lora_id=1).num_reused_tokens == 8
    release(mgr, "3")
    r4 = admit(mgr, "4", list(range(5)), lora_id=0)
    assert (r4.num_reused_tokens, r4.block_ids[0]) == (4, 0)
    release(mgr, "4")
    assert admit(mgr, "5", list(range(9))).num_reused_tokens == 0  # no LoRA at all
    assert mgr.num_key_spaces == 3


def test_block_priorities_decide_what_is_evicted() -> None:
    """Mirrors kvCacheManagerTest.cpp BlockManagerBlockPriorityTest: request 0 keeps its
    first block at 90 and its second at 10, request 1 takes the default, request 2 runs at
    20; then request 1 keeps one block, request 0 its first, request 2 nothing."""
    mgr = make_manager(num_gpu_blocks=4)
    ret0 = Retention((RetentionRange(0, 4, 90), RetentionRange(4, 8, 10)), decode_priority=20)
    admit(mgr, "0", list(range(8)), retention=ret0)
    admit(mgr, "1", list(range(8, 16)))
    release(mgr, "0", "1")
    assert sorted((b.slot, b.priority) for b in mgr.cached_blocks()) == [
        (0, 90), (1, 10), (2, 35), (3, 35)]
    admit(mgr, "2", list(range(16, 24)), retention=Retention((RetentionRange(0, None, 20),)))
    release(mgr, "2")  # took block 1 (10) and request 1's tail (35, least recent)
    assert admit(mgr, "3", list(range(8, 16))).num_reused_tokens == 4
    release(mgr, "3")
    assert mgr.num_free_gpu_blocks == 4
    assert admit(mgr, "4", list(range(8))).num_reused_tokens == 4
    assert hit(mgr, list(range(16, 24))) == 0


def test_decode_blocks_take_the_decode_priority() -> None:
    """Mirrors kvCacheManagerTest.cpp KVCacheManagerDecodeBlockPriorityTest: request 0's
    prompt at 5 goes before request 1's prompt at 90, so request 3 (request 0's prompt)
    reuses 8 tokens once a third request has taken what it needed."""
    mgr = make_manager(num_gpu_blocks=8)
    admit(mgr, "0", list(range(12)),
          retention=Retention((RetentionRange(0, None, 5),), decode_priority=90))
    assert mgr.num_free_gpu_blocks == 5
    assert mgr.append_tokens("0", [0]) == [3]
    assert mgr.num_free_gpu_blocks == 4
    admit(mgr, "1", list(range(12, 24)),
          retention=Retention((RetentionRange(0, None, 90),), decode_priority=5))
    assert mgr.num_free_gpu_blocks == 1
    assert mgr.append_tokens("1", [0]) == [7]
    assert mgr.num_free_gpu_blocks == 0
    release(mgr, "0", "1")
    assert mgr.num_free_gpu_blocks == 8
    admit(mgr, "2", list(range(24, 36)))
    release(mgr, "2")
    assert admit(mgr, "3", list(range(12))).num_reused_tokens == 8
    assert hit(mgr, [*range(12, 24), 0]) == 12


def test_decode_blocks_fill_and_keep_their_priority_for_their_retention() -> None:
    """Mirrors kvCacheManagerTest.cpp KVCacheManagerDecodeTimedEvictionTest (decoded
    blocks at the top priority for a while) with a block decoding fills: while its
    retention lasts it outlives another request's block at 60; once it expires it is at
    the default 35 and goes first. Differs by design: only leaves are evicted (a prefix
    never leaves before its extensions), so the decoded block competes with the other
    request's leaf, never with its own prompt block."""
    def cached_after_a_two_block_request(now: float) -> tuple[int, int]:
        clock = FakeClock()
        mgr = make_manager(num_gpu_blocks=4, clock=clock)
        admit(mgr, "0", list(range(4)), priority=100,
              retention=Retention(decode_priority=100, decode_retention_s=0.02))
        assert mgr.append_tokens("0", [7, 7, 7, 7]) == [1]  # block 1 full: decoded, stored
        admit(mgr, "1", [5, 5, 5, 5, 0], priority=60)
        release(mgr, "0", "1")
        clock.now = now
        decoded = 35 if now > 0.02 else 100
        assert sorted((b.slot, b.priority) for b in mgr.cached_blocks()) == [
            (0, 100), (1, decoded), (2, 60)]
        admit(mgr, "x", [9] * 5)  # 2 blocks: the free one and one eviction
        return hit(mgr, [0, 1, 2, 3, 7, 7, 7, 7, 0]), hit(mgr, [5, 5, 5, 5, 0])

    assert cached_after_a_two_block_request(0.01) == (8, 0)
    assert cached_after_a_two_block_request(0.05) == (4, 4)


def test_timed_priority_falls_back_to_the_default_when_it_expires() -> None:
    """Mirrors kvCacheManagerTest.cpp KVCacheManagerTimedEvictionTest: request 0's blocks
    at 80 for 10 ms fall to the default after 50 ms, below request 1's 50, so a third
    request evicts request 0's tail and request 1's prompt reuses 11 of 12 tokens (with
    partial reuse of its last block)."""
    clock = FakeClock()
    mgr = make_manager(num_gpu_blocks=8, clock=clock, enable_partial_reuse=True)
    admit(mgr, "0", list(range(12)),
          retention=Retention((RetentionRange(0, None, 80, 0.01),), decode_priority=80))
    release(mgr, "0")
    admit(mgr, "1", list(range(12, 24)),
          retention=Retention((RetentionRange(0, None, 50),), decode_priority=80))
    release(mgr, "1")
    clock.now = 0.05
    assert sorted(b.priority or 0 for b in mgr.cached_blocks()) == [35] * 3 + [50] * 3
    admit(mgr, "2", [1] * 12)
    release(mgr, "2")
    assert admit(mgr, "3", list(range(12, 24))).num_reused_tokens == 11
    assert hit(mgr, [*range(12), 0]) == 8  # request 0 lost its tail


@pytest.mark.parametrize(("ranges", "tokens_per_block", "num_tokens", "expected"), [
    ([(0, 64, 80), (64, 128, 50)], 64, 256, [80, 50, None, None]),
    ([(0, 63, 80), (63, 127, 30)], 32, 127, [80, 80, 30, 30]),
    ([(0, 1, 80), (1, 2, 5)], 32, 128, [80, None, None, None]),
    ([(0, 128, 80)], 256, 192, [80]),
    ([(0, 65, 80), (65, 129, 30)], 64, 192, [80, 80, 30]),
    ([(0, 64, 80), (129, None, 50)], 64, 256, [80, None, None, 50]),
    ([(0, 64, 80), (66, 67, 50)], 64, 256, [80, None, None, None]),
    ([(127, 193, 80)], 64, 256, [None, None, 80, 80]),
    ([(127, 193, 80)], 64, 32, [None]),
    ([(1, None, 80)], 64, 128, [None, 80]),
])
def test_each_block_takes_the_range_its_first_token_lies_in(
        ranges: list[tuple[int, int | None, int]], tokens_per_block: int, num_tokens: int,
        expected: list[int | None]) -> None:
    """Mirrors evictionPolicyTest.cpp KvCacheRetentionConfigTest.BlockConfigTest, row by
    row: the per-block priorities of a retention (None: the request's own)."""
    own = 35
    retention = Retention(tuple(RetentionRange(*r) for r in ranges))
    per_block = retention.for_request(num_tokens, own, None)
    num_blocks = -(-num_tokens // tokens_per_block)
    got = [per_block.at(b, tokens_per_block)[0] for b in range(num_blocks)]
    assert got == [own if p is None else p for p in expected]


@pytest.mark.parametrize(("ranges", "message"), [
    ([(0, None, 80), (64, 128, 80)], "overlap"),  # open-ended range not last
    ([(0, 64, 80), (30, 128, 80)], "overlap"),
])
def test_bad_retention_configs_are_refused(ranges: list[tuple[int, int | None, int]],
                                           message: str) -> None:
    """Mirrors evictionPolicyTest.cpp KvCacheRetentionConfigTest.InitializeTest: an
    open-ended range that is not the last, or overlapping ranges, are refused."""
    with pytest.raises(ValueError, match=message):
        Retention(tuple(RetentionRange(*r) for r in ranges))


def test_a_range_of_negative_length_is_refused() -> None:
    """Mirrors evictionPolicyTest.cpp KvCacheRetentionConfigTest.InitializeTest's
    "Range must not have negative length" (64, 32)."""
    with pytest.raises(ValueError, match="end of the retention range starting at 64"):
        RetentionRange(64, 32, 80)


def test_lru_order_follows_the_release_order() -> None:
    """Mirrors evictionPolicyTest.cpp LRUPolicyTest.LRUTest: of two blocks released in the
    order 2 then 1, block 2 is evicted first, then block 1."""
    mgr = make_manager(num_gpu_blocks=8)
    admit(mgr, "b1", [1] * 4 + [0])
    admit(mgr, "b2", [2] * 4 + [0])
    release(mgr, "b2", "b1")
    admit(mgr, "fill", [9] * (4 * 6))  # the 6 free blocks (the two partial ones freed)
    admit(mgr, "one", [8] * 4)  # one eviction
    assert hit(mgr, [2] * 4 + [0]) == 0 and hit(mgr, [1] * 4 + [0]) == 4
    admit(mgr, "two", [7] * 4)
    assert hit(mgr, [1] * 4 + [0]) == 0


def test_low_priority_blocks_are_dropped_not_offloaded() -> None:
    """Mirrors evictionPolicyTest.cpp LRUPolicyTest.PriorityTest (a block claimed at
    priority 5 is not offloaded) and its eviction order (5 before 80): with a host tier,
    the priority-10 run is dropped and the priority-50 one moves to the host."""
    mgr = make_manager(num_gpu_blocks=4, num_host_blocks=4, enable_events=True)
    admit(mgr, "hi", list(range(4)) + [0], priority=50)
    admit(mgr, "lo", list(range(100, 104)) + [0], priority=10)
    release(mgr, "hi", "lo")
    mgr.drain_events()
    admit(mgr, "big", list(range(200, 212)))  # 3 blocks: 2 free + 1 evicted: the 10
    events = mgr.drain_events()
    assert [type(e) for e in events[:1]] == [BlockRemoved]
    assert mgr.take_plan().ops == ()
    assert hit(mgr, list(range(100, 104)) + [0]) == 0
    admit(mgr, "more", list(range(300, 304)))  # evicts the 50: offloaded
    (op,) = mgr.take_plan().ops
    assert (op.kind, op.src_tier, op.dst_tier) == (OpKind.OFFLOAD, Tier.GPU, Tier.HOST)
    assert any(isinstance(e, BlockTierChanged) and e.new_tier is Tier.HOST
               for e in mgr.drain_events())
    m = mgr.lookup(list(range(4)) + [0])
    assert (m.num_tokens, m.num_host_tokens) == (4, 4)
    assert [b.tier for b in mgr.cached_blocks()].count(Tier.HOST) == 1


def test_offloaded_blocks_are_onboarded_and_reused() -> None:
    """Mirrors kvCacheManagerTest.cpp's secondary-pool reuse (blocks evicted from the
    primary pool are offloaded to the secondary one and onboarded when reused): exact ops,
    events and counts."""
    mgr = make_manager(num_gpu_blocks=4, num_host_blocks=4, enable_events=True)
    admit(mgr, "a", list(range(9)), priority=50)
    release(mgr, "a")
    admit(mgr, "big", list(range(200, 216)))  # all 4 GPU blocks: a's 2 go to the host
    release(mgr, "big")
    mgr.take_plan()
    mgr.drain_events()
    m = mgr.lookup(list(range(9)))
    assert (m.num_tokens, m.num_gpu_tokens, m.num_host_tokens) == (8, 0, 8)
    r = admit(mgr, "a2", list(range(9)))
    assert (r.num_reused_tokens, r.num_onboarded_tokens) == (8, 8)
    kinds = [op.kind for op in mgr.take_plan().ops]
    assert kinds.count(OpKind.ONBOARD) == 2 and kinds.count(OpKind.OFFLOAD) == 3
    moves = [(e.old_tier, e.new_tier) for e in mgr.drain_events()
             if isinstance(e, BlockTierChanged)]
    assert moves.count((Tier.HOST, Tier.GPU)) == 2 and moves.count((Tier.GPU, Tier.HOST)) == 3
    assert mgr.stats.host.onboarded_blocks == 2 and mgr.stats.host.reused_blocks == 2
    release(mgr, "a2")
    assert hit(mgr, list(range(9))) == 8 and mgr.num_free_gpu_blocks == 4


def test_stored_events_chain_their_hashes_in_order() -> None:
    """Mirrors kvCacheManagerTest.cpp's KV-event tests (a stored event per new block with
    its parent's hash, removed events on eviction): each stored block names the block
    before it as its parent, and an evicted run reports a removal per block."""
    mgr = make_manager(num_gpu_blocks=3, enable_events=True)
    admit(mgr, "0", list(range(12)))
    stored = [e for e in mgr.drain_events() if isinstance(e, BlockStored)]
    assert [e.parent_hash for e in stored] == [None, stored[0].block_hash,
                                               stored[1].block_hash]
    assert [e.token_ids for e in stored] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11)]
    release(mgr, "0")
    admit(mgr, "1", list(range(100, 112)))
    removed = [e.block_hash for e in mgr.drain_events() if isinstance(e, BlockRemoved)]
    assert sorted(removed) == sorted(e.block_hash for e in stored)


def test_a_request_whose_prompt_can_never_fit_is_refused_with_numbers() -> None:
    """Mirrors kvCacheManagerTest.cpp's addSequence throwing for a sequence the pool can
    never hold (EXPECT_THROW ... std::runtime_error): kvtier raises ValueError naming the
    blocks needed and the pool, and changes nothing."""
    mgr = make_manager(num_gpu_blocks=4)
    with pytest.raises(ValueError, match=r"needs 5 blocks .* num_gpu_blocks is 4"):
        mgr.add_sequence(SequenceSpec("big", list(range(17))))
    mgr.check_invariants()
    assert mgr.num_sequences == 0 and mgr.num_free_gpu_blocks == 4


def test_a_reservation_that_can_never_fit_is_refused_with_numbers() -> None:
    """Mirrors kvCacheManagerTest.cpp's addSequence throwing for a sequence the pool can
    never hold, with TensorRT-LLM's GUARANTEED_NO_EVICT reservation (the blocks to
    completion count): 5 prompt blocks + 4 reserved on an 8-block pool can never fit."""
    mgr = make_manager(num_gpu_blocks=8)
    with pytest.raises(ValueError, match=r"'r' needs 5 blocks \(20 tokens / 4\) \+ 4 reserved "
                       "but num_gpu_blocks is 8"):
        mgr.add_sequence(SequenceSpec("r", list(range(20)), num_reserved_blocks=4))
    assert mgr.add_sequence(SequenceSpec("r", list(range(20)), num_reserved_blocks=3)).admitted
    mgr.check_invariants()
    assert mgr.stats.num_rejected == 0


def test_extra_ids_key_the_blocks_they_cover() -> None:
    """Mirrors kvCacheManagerTest.cpp BlockManagerReuseWithExtraIdTest (multimodal tokens
    carry an extra id): equal tokens with the same extra ids reuse the blocks, with other
    extra ids only the blocks before the first differing one."""
    mgr = make_manager(num_gpu_blocks=16)
    image = (MultimodalItem(4, 4, 1),)  # tokens 4..7 (block 1) belong to image 1
    assert admit(mgr, "0", list(range(9)), mm_items=image).block_ids == (0, 1, 2)
    release(mgr, "0")
    assert admit(mgr, "1", list(range(9)), mm_items=image).num_reused_tokens == 8
    release(mgr, "1")
    assert hit(mgr, list(range(9)), mm_items=(MultimodalItem(4, 4, 2),)) == 4
    assert hit(mgr, list(range(9)), mm_items=(MultimodalItem(0, 4, 1),)) == 0
    assert hit(mgr, list(range(9))) == 4


def test_an_event_buffer_that_overflows_drops_the_oldest_and_leaves_a_gap() -> None:
    """Mirrors TensorRT-LLM's bounded KV event buffer (KvCacheConfig
    event_buffer_max_size, tests/unittest/llmapi/test_llm_kv_cache_events.py): past its
    size the oldest events are dropped, and the sequence numbers show the hole so a
    consumer knows to resync; the newest events, a clear last, are kept."""
    mgr = make_manager(num_gpu_blocks=8, enable_events=True, max_events=2)
    admit(mgr, "0", list(range(16)))  # 4 stored events: the first 2 are dropped
    events = mgr.drain_events()
    assert [e.seq for e in events] == [2, 3]
    assert all(isinstance(e, BlockStored) for e in events)
    release(mgr, "0")
    assert mgr.reset_cache()
    events = mgr.drain_events()
    assert [e.seq for e in events] == [7, 8] and isinstance(events[-1], AllBlocksCleared)
