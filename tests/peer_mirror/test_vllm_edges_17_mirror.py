"""vLLM's KV-cache-manager and scheduler tests at their edges, mirrored against kvtier: an
exactly full pool, the blocks an append predicts against those it takes, draft counts that
shrink, a scheduler run to its end with nothing leaked, equal tokens at another place, and
ARC's adaptive target.

Each test names the vLLM test it mirrors (vllm-project/vllm, ``tests/v1/core/...``) and
asserts kvtier's exact answer. The id mapping is ``test_vllm_mirror.py``'s: vLLM's block
``i`` is kvtier's slot ``i - 1`` and a vLLM pool of ``n`` blocks is a kvtier pool of
``n - 1`` (vLLM's block 0 is its null block).
"""

from __future__ import annotations

import pytest

from kvtier import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVCacheManager,
    Request,
    Scheduler,
    SchedulerConfig,
    SequenceSpec,
)
from kvtier.hashing import get_hash_fn, prompt_block_hashes
from peer_mirror.mirror_helpers import admit, blocks_of, hit, make_manager, release

BS = 16  # vLLM's block size in these tests


@pytest.mark.parametrize("blocks_to_cache", [2, 3, 10])
def test_kv_cache_events_in_a_pool_the_prompt_fills_exactly(blocks_to_cache: int) -> None:
    """Mirrors test_prefix_caching.py::test_kv_cache_events (a pool of ``blocks_to_cache``
    + 1 blocks, one of them vLLM's null block: the prompt fills the pool exactly): storing
    the prompt gives one stored block per block, chained; the same prompt again after a
    free, then a reset. Differs by design: vLLM's second ``allocate_slots`` skips
    ``get_computed_blocks``, so it evicts and stores all ``blocks_to_cache`` blocks; kvtier
    admits through the cache, reuses all but the last block (recomputed for its logits) and
    so evicts and stores that one block again, in its slot. A reset names every block
    removed, prefix first, before ``AllBlocksCleared`` (vLLM sends only the latter)."""
    n = blocks_to_cache
    mgr = make_manager(tokens_per_block=BS, num_gpu_blocks=n, enable_events=True)
    tokens = list(range(n * BS))
    hashes = prompt_block_hashes(get_hash_fn("xxh3_128"), tokens, BS)
    assert admit(mgr, "0", tokens).block_ids == tuple(range(n))
    assert mgr.num_free_gpu_blocks == 0
    stored = mgr.drain_events()
    parents = [None, *hashes[:-1]]
    assert [(type(e), e.block_hash, e.parent_hash) for e in stored if isinstance(
        e, BlockStored)] == [(BlockStored, h, p) for h, p in zip(hashes, parents, strict=True)]
    assert len(stored) == n
    assert [e.token_ids for e in stored if isinstance(e, BlockStored)] == [
        tuple(tokens[i * BS:(i + 1) * BS]) for i in range(n)]
    release(mgr, "0")
    assert mgr.drain_events() == []  # a free stores and removes nothing
    r1 = admit(mgr, "1", tokens)
    assert (r1.num_reused_tokens, r1.block_ids) == ((n - 1) * BS, tuple(range(n)))
    again = mgr.drain_events()
    removed, restored = again
    assert isinstance(removed, BlockRemoved) and isinstance(restored, BlockStored)
    assert (removed.block_hash, restored.block_hash, restored.parent_hash) == (
        hashes[-1], hashes[-1], hashes[-2])
    release(mgr, "1")
    assert mgr.reset_cache()
    cleared = mgr.drain_events()
    assert [type(e) for e in cleared] == [BlockRemoved] * n + [AllBlocksCleared]
    assert [e.block_hash for e in cleared[:-1] if isinstance(e, BlockRemoved)] == hashes
    assert mgr.cached_blocks() == [] and mgr.num_free_gpu_blocks == n


def test_the_blocks_an_append_predicts_are_the_blocks_it_takes() -> None:
    """Mirrors test_single_type_kv_cache_manager.py::test_predictor_matches_allocator_
    blocks_calculation_with_admission_cap (``get_num_blocks_to_allocate`` must return what
    ``allocate_new_blocks`` pulls): for every prompt length around two block boundaries,
    with and without lookahead slots reserved, ``num_blocks_to_append(k)`` is exactly the
    number of ids ``append_tokens`` of ``k`` tokens returns and of free blocks it takes, and
    the table grows by the next slots of an empty pool."""
    tpb = 4
    for num_prompt in range(1, 10):
        for lookahead in (0, 3, 5):
            for k in range(10):
                mgr = make_manager(tokens_per_block=tpb, num_gpu_blocks=16)
                admit(mgr, "a", list(range(100, 100 + num_prompt)))
                if lookahead:
                    mgr.reserve_lookahead("a", lookahead)
                num_table = -(-(num_prompt + lookahead) // tpb)
                assert mgr.block_table("a") == list(range(num_table))
                predicted = mgr.num_blocks_to_append("a", k)
                assert predicted == max(0, -(-(num_prompt + k) // tpb) - num_table)
                free = mgr.num_free_gpu_blocks
                new = mgr.append_tokens("a", [7] * k) if k else []
                assert new == list(range(num_table, num_table + predicted))
                assert free - mgr.num_free_gpu_blocks == predicted
                mgr.check_invariants()


def test_fewer_drafts_after_more_allocate_nothing_and_free_nothing() -> None:
    """Mirrors test_prefix_caching.py::test_hybrid_model_mamba_align_with_dynamic_draft_
    tokens (16 drafts proposed and one accepted, then one draft: the allocation must not
    fail or shrink) and test_single_type_kv_cache_manager.py::test_external_computed_blocks_
    do_not_corrupt_free_pool (asking for fewer slots than the table holds must not hand
    blocks back to the free count): a 55-token prompt (3 full blocks and 7 tokens) takes 4
    blocks, 16 draft slots a fifth; after one accepted token one draft slot needs nothing,
    and the free count and table stay as they were until the request leaves, when its 3
    full prompt blocks stay cached."""
    mgr = make_manager(tokens_per_block=BS, num_gpu_blocks=10)
    prompt = [*blocks_of(0, 1, 2, tokens_per_block=BS), *[3] * 7]
    assert admit(mgr, "0", prompt).block_ids == (0, 1, 2, 3)
    assert mgr.append_tokens("0", [1]) == []  # the prefill's sampled token
    assert mgr.reserve_lookahead("0", 16) == [4]  # 56 + 16 = 72 tokens: 5 blocks
    assert mgr.num_free_gpu_blocks == 5
    assert mgr.append_tokens("0", [4]) == []  # one draft accepted
    assert mgr.reserve_lookahead("0", 1) == []
    assert (mgr.block_table("0"), mgr.num_free_gpu_blocks) == ([0, 1, 2, 3, 4], 5)
    mgr.check_invariants()
    release(mgr, "0")
    assert mgr.num_free_gpu_blocks == 10
    assert sorted(b.slot for b in mgr.cached_blocks()) == [0, 1, 2]
    assert hit(mgr, [*prompt, 1, 4, 9]) == 3 * BS


def test_a_scheduler_run_to_its_end_leaves_no_block_held() -> None:
    """Mirrors test_scheduler.py::test_memory_leak (requests added one per step, run until
    none is running, then ``assert_scheduler_empty``: no request, every block free, every
    ref count 0; the hashes stay, evicted lazily): 5 requests of 10 tokens and 10 outputs
    finish in 14 steps; nothing is live or reserved, all 64 blocks are free, and each
    request's 4 blocks of computed tokens stay cached and unheld (its last output token's
    KV is never computed, so the block it ends is not cached)."""
    mgr = make_manager(num_gpu_blocks=64)
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=64))
    queue = [Request(f"r{i}", [i + 1] * 10, max_output_tokens=10) for i in range(5)]
    outputs: dict[str, list[int]] = {}
    num_steps = 0
    while queue or sched.has_unfinished():
        if queue:
            sched.add_request(queue.pop(0))
        step = sched.step()
        num_steps += 1
        ids = [*step.decode_request_ids, *(c.request_id for c in step.context_chunks)]
        for req in sched.update(step, {rid: 50 + num_steps for rid in ids}):
            outputs[req.request_id] = list(req.output)
        mgr.check_invariants()
    assert num_steps == 14
    assert outputs["r0"] == list(range(51, 61)) and outputs["r4"] == list(range(55, 65))
    assert (mgr.num_sequences, mgr.num_reserved_blocks, mgr.num_free_gpu_blocks) == (0, 0, 64)
    cached = mgr.cached_blocks()
    assert len(cached) == 20 and all(b.priority is not None for b in cached)
    r0 = [1] * 10 + outputs["r0"]
    assert hit(mgr, r0) == 16  # tokens 0..15: the 4 full blocks computed


def test_equal_tokens_at_another_place_are_another_block() -> None:
    """Mirrors test_prefix_caching.py's chained block hash (``hash_block_tokens(parent,
    tokens)``; test_radix_cache_unit.py's repeating tokens likewise): blocks equal in tokens
    but behind another prefix, or at another position of the same prompt, never hit each
    other; only the prompt's own prefix does, and all six cached blocks hash apart."""
    mgr = make_manager(num_gpu_blocks=8)
    admit(mgr, "a", blocks_of(1, 2, 3))
    admit(mgr, "b", blocks_of(2, 1, 2))
    release(mgr, "a", "b")
    assert hit(mgr, [*blocks_of(2, 3), 0]) == 4  # b's block 0 only, not a's [2] at 1
    assert hit(mgr, [*blocks_of(1, 2, 2), 0]) == 8
    assert hit(mgr, [*blocks_of(3), 0]) == 0
    assert hit(mgr, [*blocks_of(2, 1, 2, 3), 0]) == 12
    hashes = [b.block_hash for b in mgr.cached_blocks()]
    assert len(hashes) == 6 and len(set(hashes)) == 6


def test_the_last_evictable_block_goes_to_a_request_whose_prefix_is_held() -> None:
    """Mirrors test_prefix_caching.py::test_prefill_not_enough_free_blocks_with_computed_
    blocks at an exactly full pool: with a live request holding a 2-block prefix and its
    cached third block the only unheld one, a request extending that live prefix by another
    block is refused (its reuse is that third block: nothing is left to allocate), changing
    nothing; one that diverges after the live prefix gets the third block's slot, evicting
    it while the live request keeps its own blocks."""
    mgr = make_manager(num_gpu_blocks=4)
    admit(mgr, "x", blocks_of(1, 2, 3))
    release(mgr, "x")
    admit(mgr, "live", [*blocks_of(1, 2), 9])
    assert (mgr.block_table("live"), mgr.num_free_gpu_blocks) == ([0, 1, 3], 1)
    version = mgr.version
    refused = mgr.add_sequence(SequenceSpec("ext", [*blocks_of(1, 2, 3), 4]))
    assert (refused.admitted, refused.block_ids) == (False, ())
    assert mgr.version == version and hit(mgr, [*blocks_of(1, 2, 3), 0]) == 12
    took = admit(mgr, "div", [*blocks_of(1, 2), 5])
    assert (took.num_reused_tokens, took.block_ids) == (8, (0, 1, 2))
    assert hit(mgr, [*blocks_of(1, 2, 3), 0]) == 8
    assert mgr.num_free_gpu_blocks == 0
    release(mgr, "live", "div")
    assert mgr.num_free_gpu_blocks == 4


def test_arc_ghost_hits_raise_the_recency_target_until_t2_gives_way() -> None:
    """Mirrors tests/v1/kv_offload/test_cpu_manager.py::test_arc_manager_adaptive_target and
    test_arc_manager_touch_ordering (a hit on a B1 ghost raises ``target_t1_size``; the
    victim is T1's least recent while T1 is over its target, else T2's), in 3 blocks: [1]
    is reused (T2), [2] and [3] seen once (T1). [4] evicts [2], T1's oldest (LRU would
    evict [1]); [2] coming back is a B1 ghost hit, the target rises to 1 and [3] goes (T1
    still above it); [3] coming back raises it to 2 and, T1 ([4], [2]) no longer above it,
    the reused [1] goes. Differs by design: kvtier's ARC takes T1 while it holds more than
    the target (Megiddo & Modha's rule for a B1 hit); vLLM's takes T1 while it holds at
    least ``int(target)``, and would evict [4] there, keeping [1]."""
    def cached(mgr: KVCacheManager) -> list[int]:
        return sorted(b.tokens[0] for b in mgr.cached_blocks())

    mgr = make_manager(num_gpu_blocks=3, eviction_policy="arc")
    admit(mgr, "a", [1] * 4)
    release(mgr, "a")
    assert admit(mgr, "a2", [1] * 4 + [0]).num_reused_tokens == 4
    release(mgr, "a2")
    for v in (2, 3):
        admit(mgr, f"s{v}", [v] * 4)
        release(mgr, f"s{v}")
    assert (cached(mgr), mgr.num_free_gpu_blocks) == ([1, 2, 3], 3)
    steps = []
    for rid, v in (("d", 4), ("b2", 2), ("c2", 3)):
        admit(mgr, rid, [v] * 4)
        release(mgr, rid)
        steps.append(cached(mgr))
    assert steps == [[1, 3, 4], [1, 2, 4], [2, 3, 4]]
