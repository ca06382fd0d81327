"""More of TensorRT-LLM's own KV-cache-manager tests, mirrored against kvtier: partial copy
with its exact op, the leaf block of a decoded sequence, rejected draft tokens, incidental
reuse of a first token, chunked context, and a cache filled with guaranteed requests.

Each test names the test it mirrors (NVIDIA/TensorRT-LLM,
``cpp/tests/unit_tests/batch_manager/kvCacheManagerTest.cpp``) and asserts kvtier's exact
answer. The mapping is ``test_trtllm_mirror.py``'s (``getContextCurrentPosition()`` is
``num_reused_tokens``; TensorRT-LLM's block ids are kvtier's slots where both allocate
fresh blocks in order). Where kvtier has no counterpart nothing is mirrored: beam search
(``BlockManagerTest``'s shared context blocks across beams, the allocation tests' beam
offsets: kvtier schedules one sequence per request), the cyclic and variable attention
windows and sink tokens (``KVCacheManagerMaxAttentionWindowWithReuseTest``,
``KVCacheManagerVariableWindowAttentionWithReuseTest``, ``KVCacheManagerSinkTokenLength
Test``: kvtier keeps every block of a sequence) and the per-window event streams
(``KVCacheManagerEventStreamWindowSize``).
"""

from __future__ import annotations

from kvtier import (
    BlockRemoved,
    BlockTierChanged,
    OpKind,
    Request,
    Scheduler,
    SchedulerConfig,
    SequenceSpec,
    Tier,
)
from peer_mirror.mirror_helpers import admit, cached_slots, hit, make_manager, release


def test_a_held_block_is_partially_copied_into_a_new_one() -> None:
    """Mirrors kvCacheManagerTest.cpp runPartialCopyTest (blocks of 8, 4 primary + 4
    secondary: a 17-token prompt on blocks 0, 1, 2; the same prompt again reuses 16 tokens;
    while it is held, a 12-token prompt reuses block 0 and 3 tokens of block 1, copied into
    a new block: position 11, blocks [0, 2]). kvtier's second request takes the freed
    partial block 2 again, so the copy goes into slot 3: one COPY op of 3 tokens, 1 -> 3.
    """
    mgr = make_manager(tokens_per_block=8, num_gpu_blocks=4, num_host_blocks=4,
                       enable_partial_reuse=True)
    assert admit(mgr, "0", list(range(17))).block_ids == (0, 1, 2)
    release(mgr, "0")
    r1 = admit(mgr, "1", list(range(17)))
    assert (r1.num_reused_tokens, r1.block_ids) == (16, (0, 1, 2))
    r2 = admit(mgr, "2", list(range(12)))
    assert (r2.num_reused_tokens, r2.block_ids) == (11, (0, 3))
    assert [(op.kind, op.src_slot, op.dst_slot, op.num_tokens)
            for op in mgr.take_plan().ops] == [(OpKind.COPY, 1, 3, 3)]
    assert (mgr.stats.num_partial_copies, mgr.stats.num_partial_in_place) == (1, 0)


def test_without_copy_on_partial_reuse_a_held_block_is_reused_whole_or_not_at_all() -> None:
    """Mirrors kvCacheManagerTest.cpp's partial-reuse cases under TensorRT-LLM's
    ``KvCacheConfig.copy_on_partial_reuse=False`` (a block another sequence holds is not
    copied for a partial match): while request h holds [8..11], a prompt diverging inside
    it reuses the 2 full blocks only (8 tokens, no op); once h is released, the same prompt
    reuses 10 tokens in place (the block leaves the cache, no copy)."""
    mgr = make_manager(num_gpu_blocks=8, enable_partial_reuse=True,
                       copy_on_partial_reuse=False)
    admit(mgr, "f", [*range(12), 50])
    release(mgr, "f")
    admit(mgr, "h", [*range(12), 50])
    m = mgr.lookup([*range(10), 13])
    assert (m.num_tokens, m.num_partial_tokens) == (8, 0)
    x = admit(mgr, "x", [*range(10), 13])
    assert (x.num_reused_tokens, x.block_ids) == (8, (0, 1, 4))
    assert mgr.take_plan().ops == () and mgr.stats.num_partial_copies == 0
    release(mgr, "h", "x")
    y = admit(mgr, "y", [*range(10), 13])
    assert (y.num_reused_tokens, y.block_ids) == (10, (0, 1, 2))
    assert mgr.take_plan().ops == () and mgr.stats.num_partial_in_place == 1
    assert cached_slots(mgr) == [0, 1]


def test_a_decoded_leaf_block_is_freed_first_and_the_pool_refuses_when_full() -> None:
    """Mirrors kvCacheManagerTest.cpp KVCacheManagerLeafBlockTest (4 blocks: request 0's
    prompt [0..3] and one decoded token; request 1 [1, 1, 2, 3] reuses nothing; request 2
    takes the remaining blocks; request 3, request 2's prompt again, reuses 11 tokens and
    leaves 1 free; one decoded token takes it; a fifth request is refused). Differs by
    design: the decoded partial block is not stored (TensorRT-LLM stores it, so request 1
    gets block 2 there), so it is the first freed and request 1 takes it, slot 1; and the
    full pool answers a refusal, not an exception."""
    mgr = make_manager(num_gpu_blocks=4, enable_partial_reuse=True)
    assert admit(mgr, "0", [0, 1, 2, 3]).block_ids == (0,)
    assert mgr.append_tokens("0", [0]) == [1]
    release(mgr, "0")
    assert cached_slots(mgr) == [0] and mgr.num_free_gpu_blocks == 4
    r1 = admit(mgr, "1", [1, 1, 2, 3])
    assert (r1.num_reused_tokens, r1.block_ids) == (0, (1,))
    assert admit(mgr, "2", [2, 1, 2, 3, *range(4, 12)]).block_ids == (0, 2, 3)
    release(mgr, "1", "2")
    r3 = admit(mgr, "3", [2, 1, 2, 3, *range(4, 12)])
    assert (r3.num_reused_tokens, r3.block_ids) == (11, (0, 2, 3))
    assert mgr.take_plan().ops == () and mgr.num_free_gpu_blocks == 1
    assert mgr.append_tokens("3", [0]) == [1]
    assert mgr.num_free_gpu_blocks == 0
    refused = mgr.add_sequence(SequenceSpec("4", [42]))
    mgr.check_invariants()
    assert not refused.admitted and refused.block_ids == ()


def test_rejected_draft_tokens_are_never_stored_or_reused() -> None:
    """Mirrors kvCacheManagerTest.cpp BlockManagerReuseTest's "add request with 11 tokens,
    then discard few tokens from request and release a shorter one" (blocks past the
    released length are freed, and a later request reuses no discarded token): a 10-token
    prompt reserves 4 draft slots (block 3 is new), one draft is accepted; at release
    the reserved block is freed, only the 2 full blocks stay cached, and a prompt carrying
    the rejected drafts reuses those 8 tokens only."""
    mgr = make_manager(num_gpu_blocks=8, enable_partial_reuse=True)
    admit(mgr, "4", list(range(10)))
    assert mgr.reserve_lookahead("4", 4) == [3]
    assert mgr.append_tokens("4", [10]) == []  # the accepted draft, into a reserved slot
    mgr.check_invariants()
    assert mgr.block_table("4") == [0, 1, 2, 3]
    release(mgr, "4")
    assert cached_slots(mgr) == [0, 1] and mgr.num_free_gpu_blocks == 8
    again = admit(mgr, "again", [*range(11), 55, 56, 57, 0])
    assert (again.num_reused_tokens, again.block_ids[:2]) == (8, (0, 1))


def test_a_first_token_is_reused_incidentally_and_a_one_token_prompt_reuses_nothing() -> None:
    """Mirrors kvCacheManagerTest.cpp BlockManagerReuseTest's "add request with max size
    with incidental reuse of first token" (a prompt of zeros filling the pool reuses the
    cached block's first token, 0: position 1) and "add request with min size that
    doesn't reuse blocks" (a one-token prompt: position 0). The cached block has a cached
    child, so its token is copied into a new block (in place would corrupt the child)."""
    mgr = make_manager(num_gpu_blocks=8, enable_partial_reuse=True)
    admit(mgr, "a", list(range(8)))
    release(mgr, "a")
    m = mgr.lookup([0])
    assert m.num_tokens == 0
    r5 = admit(mgr, "5", [0] * 31)
    assert (r5.num_reused_tokens, len(r5.block_ids), mgr.num_free_gpu_blocks) == (1, 8, 0)
    assert [(op.kind, op.src_slot, op.dst_slot, op.num_tokens)
            for op in mgr.take_plan().ops] == [(OpKind.COPY, 0, r5.block_ids[0], 1)]
    release(mgr, "5")
    r6 = admit(mgr, "6", [0])
    assert (r6.num_reused_tokens, len(r6.block_ids)) == (0, 1)


def test_a_chunked_context_holds_the_blocks_its_whole_prompt_needs_from_the_start() -> None:
    """Mirrors kvCacheManagerTest.cpp testNeededBlocksOneStep's context step (a request in
    its context phase needs ``ceil(promptLen / tokensPerBlock)`` blocks at once,
    allocated at ``addSequence``) with chunked context: a 21-token prompt reusing 8 tokens,
    scheduled in chunks of 5, 5 and 3, holds 6 blocks from its admission on (allocated
    as each chunk reaches them, the rest reserved), so the free count never moves."""
    mgr = make_manager(num_gpu_blocks=16)
    admit(mgr, "p", [*range(8), 0])
    release(mgr, "p")
    adm = mgr.add_sequence(SequenceSpec("c", [*range(8), *range(100, 113)], num_new_tokens=5))
    mgr.check_invariants()
    assert (adm.num_reused_tokens, adm.block_ids) == (8, (0, 1, 2, 3))
    seen = [(len(mgr.block_table("c")), mgr.num_reserved_blocks, mgr.num_free_gpu_blocks)]
    for n in (5, 3):
        mgr.schedule_prefill("c", n)
        mgr.check_invariants()
        seen.append((len(mgr.block_table("c")), mgr.num_reserved_blocks,
                     mgr.num_free_gpu_blocks))
    assert seen == [(4, 2, 10), (5, 1, 10), (6, 0, 10)]
    assert mgr.num_unscheduled_tokens("c") == 0


def test_a_cache_filled_with_guaranteed_requests_completes_them_all() -> None:
    """Mirrors kvCacheManagerTest.cpp FillKvCacheAndCompleteRequestsTest.FillKvCacheWith
    RequestsAndCompleteOneByOne (as many requests as the blocks to completion allow are
    added, each decodes its whole output, and every block is free at the end): 64 blocks
    of 4, 20 requests of 8 prompt and 8 output tokens (4 blocks each to completion); the
    first step admits exactly 16, none is preempted, and all 64 blocks are free at the
    end."""
    mgr = make_manager(num_gpu_blocks=64)
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=4096,
                                           capacity_policy="guaranteed_no_evict"))
    for i in range(20):
        sched.add_request(Request(f"r{i}", [i + 1] * 8, max_output_tokens=8))
    first = sched.step()
    assert [c.request_id for c in first.context_chunks] == [f"r{i}" for i in range(16)]
    assert (mgr.num_free_gpu_blocks, mgr.num_reserved_blocks) == (0, 32)
    step, finished, preempted = first, 0, 0
    for _ in range(40):
        ids = [*step.decode_request_ids, *(c.request_id for c in step.context_chunks)]
        finished += len(sched.update(step, dict.fromkeys(ids, 0)))
        mgr.check_invariants()
        if not sched.has_unfinished():
            break
        step = sched.step()
        preempted += len(step.preempted_request_ids)
    assert (finished, preempted, mgr.num_sequences) == (20, 0, 0)
    assert mgr.num_free_gpu_blocks == 64 and hit(mgr, [1] * 8 + [0]) == 8


def test_a_full_host_keeps_the_highest_priorities_across_both_tiers() -> None:
    """Mirrors kvCacheManagerTest.cpp's secondary-pool offload (a primary victim is moved
    into a secondary block that the secondary pool frees by its own eviction order) with
    evictionPolicyTest.cpp LRUPolicyTest.PriorityTest (lower priority is evicted first):
    1 GPU block, a 2-block host holding priorities 90 and 40. A GPU victim at 50 replaces
    the 40 on the host (a removed event on the host, then the move); a GPU victim at 35,
    below every host block, is dropped rather than offloaded. Differs by design:
    TensorRT-LLM frees the secondary pool's own lowest block for any offload (the 40 would
    give way to the 35 too); kvtier keeps the highest priorities of both tiers cached."""
    def after_one_more(victim_priority: int) -> tuple[list[tuple[str, int]], list[OpKind],
                                                      list[int]]:
        mgr = make_manager(num_gpu_blocks=1, num_host_blocks=2, enable_events=True)
        for rid, value, priority in (("hi", 1, 90), ("lo", 2, 40), ("v", 3, victim_priority)):
            admit(mgr, rid, [value] * 4, priority=priority)
            release(mgr, rid)
        mgr.take_plan()
        first = {b.block_hash: b.tokens[0] for b in mgr.cached_blocks()}
        mgr.drain_events()
        admit(mgr, "new", [4] * 4)  # the GPU block's victim: v
        ops = [op.kind for op in mgr.take_plan().ops]
        moved = [(type(e).__name__, first[e.block_hash]) for e in mgr.drain_events()
                 if isinstance(e, (BlockRemoved, BlockTierChanged))]
        host = sorted(b.tokens[0] for b in mgr.cached_blocks() if b.tier is Tier.HOST)
        return moved, ops, host

    assert after_one_more(50) == ([("BlockRemoved", 2), ("BlockTierChanged", 3)],
                                  [OpKind.OFFLOAD], [1, 3])
    assert after_one_more(35) == ([("BlockRemoved", 3)], [], [1, 2])
