"""TensorRT-LLM ``kvCacheManagerTest.cpp`` cases not mirrored yet, against kvtier: a cache
filled with guaranteed requests at every block boundary of its parameter table, a live id
added again and a pool without room, per-request reuse counts, rewound draft tokens, and
hashes with reuse off.

Each test names the TensorRT-LLM test it mirrors (NVIDIA/TensorRT-LLM,
``cpp/tests/unit_tests/batch_manager/kvCacheManagerTest.cpp``) and asserts kvtier's exact
answer. The mapping is ``test_trtllm_mirror.py``'s: ``getContextCurrentPosition()`` is
``num_reused_tokens``; TensorRT-LLM's block ids are kvtier's slots where both allocate fresh
blocks in order; its GUARANTEED_NO_EVICT is the scheduler's capacity policy of that name.
"""

from __future__ import annotations

import pytest

from kvtier import Request, Scheduler, SchedulerConfig, SequenceSpec
from peer_mirror.mirror_helpers import admit, hit, make_manager, release

# FillKvCacheAndCompleteRequestsTest's table: (prompt, max output, tokens per block); its
# (2048 | 2047 | 2049, 2048) and (5000, 500) rows meet the same boundaries as the 1024 ones
# here at twice the cost, and are left out.
FILL_CASES = [(128, 128, 1), (256, 128, 64), (500, 100, 64), (1024, 1024, 64),
              (1025, 1023, 64), (1023, 1025, 64), (2047, 32, 64), (2049, 32, 64),
              (1988, 32, 64)]


@pytest.mark.parametrize(("num_prompt", "num_output", "tokens_per_block"), FILL_CASES)
@pytest.mark.parametrize("spare", [0, -1])
def test_a_cache_filled_at_block_boundaries_completes_every_request(
        num_prompt: int, num_output: int, tokens_per_block: int, spare: int) -> None:
    """Mirrors kvCacheManagerTest.cpp FillKvCacheAndCompleteRequestsTest (FillKvCacheWith
    RequestsAndCompleteOneByOne and FillKvCacheAndCompleteInParallel, over its parameter
    table: prompts and outputs one block short of, at and one past block boundaries): each
    request needs ceil((prompt + output) / block) blocks to completion; a pool of exactly
    two such admits two of three requests in the first step, one block less admits one,
    and either way all three finish with no preemption and every block free."""
    need = -(-(num_prompt + num_output) // tokens_per_block)
    pool = 2 * need + spare
    mgr = make_manager(tokens_per_block=tokens_per_block, num_gpu_blocks=pool)
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=8192,
                                           capacity_policy="guaranteed_no_evict"))
    for i in range(3):
        sched.add_request(Request(f"r{i}", [i + 1] * num_prompt, max_output_tokens=num_output))
    step = sched.step()
    admitted = [c.request_id for c in step.context_chunks]
    assert admitted == (["r0", "r1"] if spare == 0 else ["r0"])
    assert mgr.num_free_gpu_blocks == pool - need * len(admitted)
    finished: list[str] = []
    preempted = 0
    while True:
        ids = [*step.decode_request_ids, *(c.request_id for c in step.context_chunks)]
        finished += [r.request_id for r in sched.update(step, dict.fromkeys(ids, 0))]
        if not sched.has_unfinished():
            break
        step = sched.step()
        preempted += len(step.preempted_request_ids)
    mgr.check_invariants()
    assert (sorted(finished), preempted) == (["r0", "r1", "r2"], 0)
    assert (mgr.num_sequences, mgr.num_free_gpu_blocks) == (0, pool)


def test_a_live_id_again_is_refused_and_a_pool_without_room_refuses() -> None:
    """Mirrors kvCacheManagerTest.cpp BlockManagerTest's end ("same requestId not allowed",
    "no more blocks": addSequence throws both times): with 2 requests of 3 blocks in a pool
    of 8, adding a live id again raises ValueError naming it and changes nothing; a request
    needing 3 blocks when 2 are free is refused (kvtier answers a shortage with a refused
    admission, not an exception: the scheduler asks before it adds) and changes nothing; once
    a request leaves, the same request is admitted, evicting exactly one of its blocks."""
    mgr = make_manager(num_gpu_blocks=8)
    admit(mgr, "42", list(range(12)))
    admit(mgr, "43", list(range(100, 112)))
    state = (mgr.version, mgr.num_free_gpu_blocks, mgr.block_table("42"))
    with pytest.raises(ValueError, match=r"'42'.*already live"):
        mgr.add_sequence(SequenceSpec("42", list(range(200, 212))))
    assert (mgr.version, mgr.num_free_gpu_blocks, mgr.block_table("42")) == state
    assert state[1:] == (2, [0, 1, 2])
    refused = mgr.add_sequence(SequenceSpec("44", list(range(200, 212))))
    assert (refused.admitted, refused.block_ids, refused.num_reused_tokens) == (False, (), 0)
    assert (mgr.version, mgr.num_free_gpu_blocks, mgr.has_sequence("44")) == (
        state[0], 2, False)
    release(mgr, "43")
    # 2 free slots and one eviction: "43"'s last block (slot 5, released first), which
    # kvtier hands out before the free slots 6 and 7.
    assert admit(mgr, "44", list(range(200, 212))).block_ids == (5, 6, 7)
    assert hit(mgr, [*range(100, 112), 0]) == 8


def test_each_request_counts_its_reused_new_and_missed_blocks() -> None:
    """Mirrors kvCacheManagerTest.cpp KVCacheManagerPerRequestStatsTest (a 9-token prompt
    in blocks of 4: the first request reuses 0 blocks and allocates and misses 3; the same
    prompt again reuses 2, allocates and misses 1, a hit rate of 2/3): kvtier's admission
    gives the reused tokens and the block table, from which the same counts follow, and the
    manager's token hit rate over both is 8 of 18 tokens."""
    mgr = make_manager(num_gpu_blocks=16)
    tokens = list(range(9))
    counts = []
    for rid in ("0", "1"):
        adm = admit(mgr, rid, tokens)
        num_reused = adm.num_reused_tokens // 4
        counts.append((num_reused, len(adm.block_ids) - num_reused, adm.block_ids))
        release(mgr, rid)
    # The second request's new block is the partial block the first freed (vLLM's rule:
    # a block that holds no cached block is reused first); TensorRT-LLM takes block 3.
    assert counts == [(0, 3, (0, 1, 2)), (2, 1, (0, 1, 2))]
    assert counts[1][0] / len(counts[1][2]) == 2 / 3
    assert (mgr.stats.num_reused_tokens, mgr.stats.token_hit_rate) == (8, 8 / 18)


def test_rejected_draft_slots_are_not_handed_back_before_the_request_leaves() -> None:
    """Mirrors kvCacheManagerTest.cpp KVCacheManagerRewindTokensTest (a 575-token prompt in
    blocks of 64 holds 9 blocks; 5 more tokens take a tenth; ``rewindKVCache(4)`` hands it
    back). Differs by design: kvtier never appends a token it may have to take back; drafts
    get slots from ``reserve_lookahead`` and only accepted tokens are appended. With all 4
    drafts rejected the tenth block stays the request's (vLLM keeps its lookahead slots
    likewise) and is freed with it, never cached; the 9 prompt blocks are."""
    mgr = make_manager(tokens_per_block=64, num_gpu_blocks=80)
    prompt = [i % 500 for i in range(575)]
    assert len(admit(mgr, "7", prompt).block_ids) == 9
    assert mgr.num_free_gpu_blocks == 71
    assert mgr.append_tokens("7", [1]) == []  # 576 tokens: block 8 full
    assert mgr.reserve_lookahead("7", 4) == [9]  # 4 drafts at 576..579
    assert mgr.num_free_gpu_blocks == 70
    assert mgr.append_tokens("7", [2]) == []  # the bonus token only: drafts rejected
    assert (len(mgr.block_table("7")), mgr.num_free_gpu_blocks) == (10, 70)
    assert mgr.reserve_lookahead("7", 3) == []
    release(mgr, "7")
    assert mgr.num_free_gpu_blocks == 80
    assert sorted(b.slot for b in mgr.cached_blocks()) == list(range(9))
    assert hit(mgr, [*prompt, 1, 2]) == 576


def test_without_reuse_no_block_is_cached_or_reported() -> None:
    """Mirrors kvCacheManagerTest.cpp KVCacheManagerHashKeyTest (reuse off: a 16-token
    request's blocks are found by hash while it runs, and gone once it is removed) and
    KVCacheManagerEventStreamBlocking (no event manager: no events). Differs by design:
    kvtier's hash index is the reuse index, so with reuse off a running request's blocks
    are neither listed nor found nor reported, and with events off nothing is buffered even
    with reuse on; every block is free once the request leaves."""
    mgr = make_manager(num_gpu_blocks=16, enable_block_reuse=False, enable_events=True)
    tokens = list(range(1000, 1016))
    assert admit(mgr, "0", tokens).block_ids == (0, 1, 2, 3)
    assert (mgr.cached_blocks(), mgr.drain_events(), hit(mgr, [*tokens, 0])) == ([], [], 0)
    release(mgr, "0")
    assert (mgr.cached_blocks(), mgr.num_free_gpu_blocks) == ([], 16)
    quiet = make_manager(num_gpu_blocks=16)
    admit(quiet, "0", tokens)
    assert len(quiet.cached_blocks()) == 4 and quiet.drain_events() == []


def test_a_block_whose_retention_ran_out_is_ranked_by_its_release() -> None:
    """Against evictionPolicy.cpp's ``LRUEvictionPolicy::refresh`` (the rule behind
    evictionPolicyTest.cpp TimedBlockTest and kvCacheManagerTest.cpp KVCacheManagerTimed
    EvictionTest, neither of which orders an expired block against other default blocks),
    a difference by design: TensorRT-LLM appends a block whose priority ran out to the
    default queue at that instant, behind every block released before, as if it had been
    used then; kvtier ranks it by its release, its real last use. A retention says how long
    a block is worth more than the rest; once it has run out, the block is one more default
    block, and LRU's order is its recency (TensorRT-LLM's order would give every expired
    block a second term of protection, as long as the time the default queue takes to reach
    it). X is released at 80 for 1 s at t=0, Y at the default at t=0.5; at t=2 one of them
    must go: kvtier evicts X, released first (TensorRT-LLM would evict Y)."""
    now = [0.0]
    mgr = make_manager(num_gpu_blocks=3, clock=lambda: now[0])
    admit(mgr, "x", [1, 1, 1, 1, 0], priority=80, retention_s=1.0)
    release(mgr, "x")
    now[0] = 0.5
    admit(mgr, "y", [2, 2, 2, 2, 0])
    release(mgr, "y")
    now[0] = 2.0
    admit(mgr, "z", [3, 3, 3, 3, 3])  # 2 blocks: the free one and one eviction
    assert sorted(b.tokens[0] for b in mgr.cached_blocks() if b.tokens[0] != 3) == [2]
