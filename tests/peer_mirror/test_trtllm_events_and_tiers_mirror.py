"""More of TensorRT-LLM's own KV-cache-manager tests, mirrored against kvtier: the KV event
stream across tiers, priorities of reused blocks, host blocks under GPU prefixes, the blocks
one step and a whole request need, and extra ids with LoRA task ids.

Each test names the test it mirrors (NVIDIA/TensorRT-LLM,
``cpp/tests/unit_tests/batch_manager/kvCacheManagerTest.cpp``) and asserts kvtier's exact
answer. The mapping is ``test_trtllm_mirror.py``'s: ``getContextCurrentPosition()`` is
``num_reused_tokens``, the primary / secondary pools are the GPU / host tiers, and
``KVCacheStoredData`` / ``KVCacheRemovedData`` / ``KVCacheUpdatedData(cacheLevel)`` are
``BlockStored`` / ``BlockRemoved`` / ``BlockTierChanged``. Two differences by design run
through them: kvtier stores a block when it fills (TensorRT-LLM when its sequence is
released), and stores only full blocks (TensorRT-LLM also a released sequence's partial
last block, less its last token).
"""

from __future__ import annotations

import pytest

from fake_clock import FakeClock
from kvtier import (
    BlockRemoved,
    BlockStored,
    BlockTierChanged,
    Event,
    MultimodalItem,
    OpKind,
    Request,
    Retention,
    RetentionRange,
    Scheduler,
    SchedulerConfig,
    Tier,
)
from kvtier.hashing import get_hash_fn, prompt_block_hashes
from peer_mirror.mirror_helpers import admit, hit, make_manager, release

HASH = get_hash_fn("xxh3_128")


def chain(tokens: list[int], lora_id: int | None = None) -> list[int]:
    """The chained hashes of ``tokens``' full blocks of 4, as kvtier names them."""
    return prompt_block_hashes(HASH, tokens, 4, lora_id=lora_id)


def kinds(events: list[Event]) -> list[tuple[str, int, Tier | None, Tier | None]]:
    """(event type, block hash, old tier, new tier); removals give their tier as new."""
    out: list[tuple[str, int, Tier | None, Tier | None]] = []
    for e in events:
        if isinstance(e, BlockTierChanged):
            out.append(("moved", e.block_hash, e.old_tier, e.new_tier))
        elif isinstance(e, BlockRemoved):
            out.append(("removed", e.block_hash, None, e.tier))
        elif isinstance(e, BlockStored):
            out.append(("stored", e.block_hash, None, e.tier))
    return out


def test_the_event_stream_of_stores_offloads_drops_and_onboards() -> None:
    """Mirrors kvCacheManagerTest.cpp KVCacheManagerEventStream (8 primary + 2 secondary
    blocks of 4): a LoRA-42 prompt of 10 tokens stores 2 blocks, the first without a parent;
    its decoded block is stored linked to the second; the same tokens again store nothing;
    two 13-token prompts push the 3 blocks to the host, where the first one swapped (the
    tail) is dropped for the third; a LoRA-42 prompt sharing the first block onboards it and
    offloads one GPU block. Differs by design: the offload takes the host slot the onboard
    frees, so nothing is dropped (TensorRT-LLM drops a secondary block), and the decoded
    block is stored when it fills, not at release."""
    mgr = make_manager(num_gpu_blocks=8, num_host_blocks=2, enable_events=True)
    r0 = [*range(10), 0, 0]  # the prompt, then 2 decoded tokens fill block 2
    h0 = chain(r0, lora_id=42)
    admit(mgr, "0", r0[:10], lora_id=42)
    stored = [e for e in mgr.drain_events() if isinstance(e, BlockStored)]
    assert [(e.block_hash, e.parent_hash, e.lora_id, e.tier) for e in stored] == [
        (h0[0], None, 42, Tier.GPU), (h0[1], h0[0], 42, Tier.GPU)]
    assert mgr.append_tokens("0", [0, 0]) == []
    (decoded,) = mgr.drain_events()
    assert isinstance(decoded, BlockStored)
    assert (decoded.block_hash, decoded.parent_hash, decoded.token_ids) == (
        h0[2], h0[1], (8, 9, 0, 0))
    release(mgr, "0")
    admit(mgr, "1", list(range(9)), lora_id=42)
    release(mgr, "1")
    assert mgr.drain_events() == []  # the same tokens: nothing new is stored
    r2 = [1, 1, *range(2, 13)]
    r3 = [2, 1, *range(2, 13)]
    admit(mgr, "2", r2)
    assert kinds(mgr.drain_events()) == [("stored", h, None, Tier.GPU) for h in chain(r2)]
    admit(mgr, "3", r3)
    gpu, host = Tier.GPU, Tier.HOST
    assert kinds(mgr.drain_events()) == [
        ("moved", h0[2], gpu, host), ("removed", h0[2], None, host),  # the first swapped
        ("moved", h0[0], gpu, host), ("moved", h0[1], gpu, host),
        *[("stored", h, None, gpu) for h in chain(r3)]]
    assert [op.kind for op in mgr.take_plan().ops] == [OpKind.OFFLOAD] * 3
    release(mgr, "2", "3")
    assert mgr.drain_events() == []
    r4 = admit(mgr, "4", [0, 1, 2, 3, 1, 1, 1, 1, 0], lora_id=42)
    assert (r4.num_reused_tokens, r4.num_onboarded_tokens) == (4, 4)
    assert kinds(mgr.drain_events()) == [
        ("moved", h0[0], host, gpu),  # onboarded
        ("moved", chain(r2)[2], gpu, host),  # the least recent GPU leaf, into its slot
        ("stored", chain([0, 1, 2, 3, 1, 1, 1, 1], lora_id=42)[1], None, gpu)]
    assert [op.kind for op in mgr.take_plan().ops] == [OpKind.ONBOARD, OpKind.OFFLOAD]
    assert (mgr.stats.host.onboarded_blocks, mgr.stats.gpu.offloaded_blocks) == (1, 4)
    assert (mgr.stats.gpu.evicted_blocks, mgr.stats.host.evicted_blocks) == (0, 1)


def test_a_reused_block_takes_the_priority_of_its_last_release() -> None:
    """Mirrors kvCacheManagerTest.cpp KVCacheManagerEventStreamPriority: blocks stored at
    priority 50 keep it while cached; a request at 10 reusing them sets 10 (TensorRT-LLM
    reports KVCacheUpdatedData(priority 50 -> 10)). Differs by design: kvtier's events
    carry no priority (``cached_blocks`` shows it), and a request without a retention
    config that reuses the blocks releases them at its own priority, the default 35,
    where TensorRT-LLM leaves them at 50: the last holder's settings win, whatever they
    are, so a request that asks for nothing asks for the default."""
    mgr = make_manager(num_gpu_blocks=8, enable_events=True)
    prompt = list(range(8))

    def priorities() -> list[int | None]:
        return [b.priority for b in mgr.cached_blocks()]

    admit(mgr, "0", prompt, retention=Retention((RetentionRange(0, None, 50),)))
    assert priorities() == [None, None]  # held: not evictable
    release(mgr, "0")
    assert priorities() == [50, 50]
    assert len([e for e in mgr.drain_events() if isinstance(e, BlockStored)]) == 2
    admit(mgr, "1", prompt)
    release(mgr, "1")
    assert priorities() == [35, 35] and mgr.drain_events() == []
    admit(mgr, "2", prompt, retention=Retention((RetentionRange(0, None, 10),)))
    release(mgr, "2")
    assert priorities() == [10, 10] and mgr.drain_events() == []


def test_a_request_decoding_into_a_host_block_under_a_gpu_prefix_reuses_it_all_on_gpu() -> None:
    """Mirrors kvCacheManagerTest.cpp KVCacheManagerSecondaryBlockPrimaryChildTest (a block
    in secondary memory may have a primary child): request 0's last two blocks go to the
    host, request 2 reuses 3 tokens of its first block (a partial copy: the block has
    cached children) and decodes the second block's tokens and a new one; request 3 then
    reuses both full blocks, on the GPU. Differs by design: kvtier keeps every path
    fastest-first (a GPU block is never under a host block), so the decoded copy replaces
    the host one, and request 3 reuses 8 tokens, not 9 (no partial block [0] is stored).

        after request 1:  GPU [0 1 2 3] -> host [4 5 6 7] -> host [8 9 10 11]
        after request 2:  GPU [0 1 2 3] -> GPU  [4 5 6 7] -> host [8 9 10 11]
    """
    mgr = make_manager(num_gpu_blocks=4, num_host_blocks=4, enable_partial_reuse=True)
    admit(mgr, "0", list(range(12)), priority=50)
    release(mgr, "0")
    admit(mgr, "1", [1, 1, *range(2, 12)], priority=50)  # request 0's last two to the host
    release(mgr, "1")

    mine = set(chain(list(range(12))))

    def path_tiers() -> list[tuple[tuple[int, ...], str]]:
        return [(b.tokens, b.tier.name) for b in mgr.cached_blocks() if b.block_hash in mine]

    assert path_tiers() == [((0, 1, 2, 3), "GPU"), ((4, 5, 6, 7), "HOST"),
                            ((8, 9, 10, 11), "HOST")]
    r2 = admit(mgr, "2", [0, 1, 2, 3])
    assert (r2.num_reused_tokens, r2.num_onboarded_tokens) == (3, 0)
    assert mgr.stats.num_partial_copies == 1
    assert mgr.append_tokens("2", [4, 5, 6, 7]) == [0] and mgr.append_tokens("2", [0]) == [2]
    mgr.check_invariants()
    assert path_tiers() == [((0, 1, 2, 3), "GPU"), ((4, 5, 6, 7), "GPU"),
                            ((8, 9, 10, 11), "HOST")]
    release(mgr, "2")
    m = mgr.lookup([*range(8), 0, 0])
    assert (m.num_tokens, m.num_gpu_tokens, m.num_host_tokens) == (8, 8, 0)
    assert admit(mgr, "3", [*range(8), 0, 0]).num_reused_tokens == 8


@pytest.mark.parametrize("enable_block_reuse", [True, False])
@pytest.mark.parametrize("num_drafts", [0, 5])
def test_the_blocks_one_step_needs_are_the_blocks_it_gets(enable_block_reuse: bool,
                                                          num_drafts: int) -> None:
    """Mirrors kvCacheManagerTest.cpp neededBlocksOneStep / neededBlocksOneStepKvCache-
    BlockReuse(DraftTokens) (8 tokens a block, prompts of 1..64 tokens, 20 new tokens):
    before every decode step, ``num_blocks_to_append`` for the step's tokens (the token and
    its draft slots) is exactly how many blocks the step then allocates."""
    for prompt_len in range(1, 65):
        mgr = make_manager(tokens_per_block=8, num_gpu_blocks=80,
                           enable_block_reuse=enable_block_reuse)
        admit(mgr, "r", [0] * prompt_len)
        got_total = len(mgr.block_table("r"))
        for _ in range(20 // (num_drafts + 1)):
            need = mgr.num_blocks_to_append("r", num_drafts + 1)
            if num_drafts:
                got = mgr.reserve_lookahead("r", num_drafts + 1)
                appended = mgr.append_tokens("r", [1] * (num_drafts + 1))
                assert got is not None and appended == []  # the slots were reserved
            else:
                got = mgr.append_tokens("r", [1])
            assert got is not None and len(got) == need, (prompt_len, need, got)
            got_total += len(got)
            mgr.check_invariants()
        assert got_total == -(-(prompt_len + 20 // (num_drafts + 1) * (num_drafts + 1)) // 8)


@pytest.mark.parametrize(("tokens_per_block", "expected"), [(1, 1024 + 128), (64, 18)])
def test_a_guaranteed_request_reserves_its_blocks_to_completion(tokens_per_block: int,
                                                               expected: int) -> None:
    """Mirrors kvCacheManagerTest.cpp RemainingBlocksToCompletionCorrectlyEstimated (a
    1,024-token prompt with 128 output tokens needs 1,152 blocks of 1 token, or 18 of 64):
    admitted under GUARANTEED_NO_EVICT, the request holds its prompt blocks and reserves
    the rest, exactly that many in all."""
    mgr = make_manager(tokens_per_block=tokens_per_block, num_gpu_blocks=4096)
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=4096,
                                           capacity_policy="guaranteed_no_evict"))
    sched.add_request(Request("r", [0] * 1024, max_output_tokens=128))
    step = sched.step()
    assert [c.num_tokens for c in step.context_chunks] == [1024]
    assert len(mgr.block_table("r")) + mgr.num_reserved_blocks == expected
    assert mgr.num_free_gpu_blocks == 4096 - expected
    mgr.check_invariants()


def test_extra_ids_and_lora_task_ids_key_blocks_together() -> None:
    """Mirrors kvCacheManagerTest.cpp BlockManagerReuseWithExtraIdAndLoraTaskIdTest: the
    same tokens with the same extra ids under LoRA task 1 and task 2 share no block; each
    task reuses its own blocks (2 full blocks of the 9-token prompt), and under task 1
    other extra ids reuse only the blocks before the first that differs."""
    mgr = make_manager(num_gpu_blocks=16)
    tokens = [100, 101, 102, 103, 104, 105, 0, 1, 2]
    images = (MultimodalItem(0, 2, 1), MultimodalItem(2, 2, 2), MultimodalItem(4, 2, 3))
    assert admit(mgr, "0", tokens, lora_id=1, mm_items=images).block_ids == (0, 1, 2)
    release(mgr, "0")
    r1 = admit(mgr, "1", tokens, lora_id=2, mm_items=images)  # slot 2 was freed: uncached
    assert (r1.num_reused_tokens, r1.block_ids) == (0, (2, 3, 4))
    release(mgr, "1")
    for lora, first in ((1, 0), (2, 2)):
        again = admit(mgr, f"again{lora}", tokens, lora_id=lora, mm_items=images)
        assert (again.num_reused_tokens, again.block_ids[:2]) == (8, (first, first + 1))
        release(mgr, f"again{lora}")
    other = (MultimodalItem(0, 2, 1), MultimodalItem(2, 2, 2), MultimodalItem(4, 2, 4))
    assert hit(mgr, tokens, lora_id=1, mm_items=other) == 4
    assert hit(mgr, tokens, lora_id=1) == 0 and hit(mgr, tokens, mm_items=images) == 0
    assert mgr.num_key_spaces == 2


def test_blocks_are_found_by_hash_while_cached_and_a_longer_prompt_reuses_them() -> None:
    """Mirrors kvCacheManagerTest.cpp KVCacheManagerHashKeyWithReuseTest: a 16-token prompt
    of tokens 1000.. caches 4 blocks whose hashes are the prompt's chain; a 20-token prompt
    with the same start reuses them and its new block is the fifth. Differs by design: it
    reuses 16 tokens where TensorRT-LLM reuses 15 (it never stores a sequence's last token;
    kvtier stores every full block its prefill computed)."""
    mgr = make_manager(num_gpu_blocks=8, enable_partial_reuse=True)
    first = list(range(1000, 1016))
    assert admit(mgr, "0", first).block_ids == (0, 1, 2, 3)
    release(mgr, "0")
    by_hash = {b.block_hash: b.slot for b in mgr.cached_blocks()}
    assert [by_hash[h] for h in chain(first)] == [0, 1, 2, 3]
    r1 = admit(mgr, "1", list(range(1000, 1020)))
    assert (r1.num_reused_tokens, r1.block_ids) == (16, (0, 1, 2, 3, 4))
    assert {b.block_hash for b in mgr.cached_blocks()} == set(chain(list(range(1000, 1020))))


def test_a_timed_priority_runs_from_the_release() -> None:
    """Mirrors evictionPolicyTest.cpp LRUPolicyTest.TimedBlockTest: a block at 80 for 1 ms
    released at 0 is still at 80 then and at the default 35 at 2 ms; of a block at 80 for
    3 ms and one at 50 for 8 ms, both released at 5 ms, the 50 goes first at 5 ms, and at
    9 ms (the 80 expired at 8 ms, now 35) the other one does."""
    clock = FakeClock()
    mgr = make_manager(num_gpu_blocks=2, clock=clock)
    admit(mgr, "b0", [0] * 4, priority=80, retention_s=0.001)
    release(mgr, "b0")
    assert [b.priority for b in mgr.cached_blocks()] == [80]
    clock.now = 0.002
    assert [b.priority for b in mgr.cached_blocks()] == [35]

    def survivor(now: float) -> list[int]:
        clock = FakeClock()
        mgr = make_manager(num_gpu_blocks=2, clock=clock)
        clock.now = 0.005
        admit(mgr, "b1", [1] * 4, priority=80, retention_s=0.003)
        admit(mgr, "b2", [2] * 4, priority=50, retention_s=0.008)
        release(mgr, "b1", "b2")
        clock.now = now
        admit(mgr, "x", [9] * 4)  # one eviction
        return [b.tokens[0] for b in mgr.cached_blocks() if b.tokens[0] != 9]

    assert survivor(0.005) == [1]
    assert survivor(0.009) == [2]


def test_a_block_too_low_to_offload_is_dropped_with_its_host_child() -> None:
    """Mirrors kvCacheManagerTest.cpp KVCacheManagerLeafBlockWithDependentTest (4 primary
    blocks, 1 secondary): request 0's middle block is at priority 0, below what is
    offloaded; request 1 decodes. Its first new block takes request 0's leaf [8..11],
    offloaded to the host; its second takes the middle block, which is dropped, not
    offloaded, and its host child goes with it (TensorRT-LLM frees and detaches it).

        released:   [0..3] 35 -> [4..7] 0 -> [8..11] 35        GPU, request 1 holds 1 block
        1st block:  [0..3] -> [4..7] -> host [8..11]
        2nd block:  [0..3]                                     [4..7] and [8..11] removed
    """
    mgr = make_manager(num_gpu_blocks=4, num_host_blocks=1, enable_events=True)
    ranges = (RetentionRange(0, 4, 35), RetentionRange(4, 8, 0), RetentionRange(8, None, 35))
    admit(mgr, "0", list(range(12)), retention=Retention(ranges))
    admit(mgr, "1", [100, 101, 102, 103])
    release(mgr, "0")
    tokens = {b.block_hash: b.tokens for b in mgr.cached_blocks()}
    assert sorted((b.tokens[0], b.priority) for b in mgr.cached_blocks()) == [
        (0, 35), (4, 0), (8, 35), (100, None)]
    mgr.drain_events()
    assert mgr.append_tokens("1", [104]) == [2]
    (moved,) = mgr.drain_events()
    assert isinstance(moved, BlockTierChanged) and tokens[moved.block_hash] == (8, 9, 10, 11)
    (op,) = mgr.take_plan().ops
    assert (op.kind, op.src_slot, op.dst_tier) == (OpKind.OFFLOAD, 2, Tier.HOST)
    assert mgr.append_tokens("1", [105, 106, 107]) == []  # fills block [104..107]
    mgr.drain_events()
    assert mgr.append_tokens("1", [108]) == [1]
    assert [(tokens[e.block_hash], e.tier) for e in mgr.drain_events()
            if isinstance(e, BlockRemoved)] == [((4, 5, 6, 7), Tier.GPU),
                                               ((8, 9, 10, 11), Tier.HOST)]
    assert mgr.take_plan().ops == ()
    assert [b.tokens[0] for b in mgr.cached_blocks()] == [0, 100, 104]
    assert hit(mgr, [*range(12), 0]) == 4
