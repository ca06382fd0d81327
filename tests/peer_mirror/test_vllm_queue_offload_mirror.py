"""vLLM's own tests of the free-block queue, the block hash's extra keys, lookahead slots,
prompt-logprob requests and the CPU offloading manager, mirrored against kvtier.

Each test names the vLLM test it mirrors (vllm-project/vllm, ``tests/v1/core/...`` or
``tests/v1/kv_offload/...``) and asserts kvtier's exact answer. The id mapping is
``test_vllm_mirror.py``'s. vLLM's CPU offloading manager (``prepare_store`` /
``complete_store`` / ``lookup`` / ``touch``, LRU or ARC) is mirrored onto kvtier's host
tier: a store there is a GPU block that eviction offloads (an OFFLOAD op into a host slot),
``lookup`` counts the host tokens of a prompt's prefix, and a touch is a reuse.

Where kvtier has no counterpart, nothing is mirrored: the sliding-window and chunked-local
attention managers of ``test_single_type_kv_cache_manager.py`` (kvtier keeps every block of a
sequence: full attention only), prompt embeddings as a block's extra key
(``test_generate_block_hash_extra_keys_prompt_embeds``: kvtier keys token ids), the KV-cache
config builders of ``test_kv_cache_utils.py`` (kvtier's pools are sized by the caller),
``CachingMetrics``' window over recent requests (kvtier's counters are cumulative), and the
offloading manager's long-lived load pin (``prepare_load`` ... ``complete_load``: kvtier's
onboard moves a host block into a GPU slot inside the admission, so a host block is never
held by a load in flight).
"""

from __future__ import annotations

from kvtier import (
    BlockRemoved,
    BlockStored,
    KVCacheManager,
    MultimodalItem,
    OpKind,
    Request,
    Scheduler,
    SchedulerConfig,
    SequenceSpec,
    Tier,
)
from kvtier.hashing import encode_key, get_hash_fn, prompt_block_hashes
from peer_mirror.mirror_helpers import admit, cached_slots, hit, make_manager, release


def tiers(mgr: KVCacheManager) -> list[tuple[int, str, int]]:
    """(first token, tier, slot) of every cached block, sorted."""
    return sorted((b.tokens[0], b.tier.name, b.slot) for b in mgr.cached_blocks())


def test_a_reused_block_leaves_the_eviction_order_and_rejoins_it_at_the_tail() -> None:
    """Mirrors vllm tests/v1/core/test_kv_cache_utils.py::test_free_kv_cache_block_queue_
    operations (a block removed from the middle of the free queue and appended back is
    last in line) as vLLM's prefix cache uses it: blocks [1], [2], [3] cached in that order,
    then [2] reused and freed again; the fresh slot goes first, then [1], [3], [2].

        free queue:  slot 3 (never used) | [1] slot 0 | [3] slot 2 | [2] slot 1 (touched)
    """
    mgr = make_manager(num_gpu_blocks=4)
    for v in (1, 2, 3):
        admit(mgr, f"s{v}", [v] * 4)
        release(mgr, f"s{v}")
    again = admit(mgr, "again", [2] * 4 + [0])  # reuses [2]; its partial block is slot 3
    assert (again.num_reused_tokens, again.block_ids) == (4, (1, 3))
    release(mgr, "again")
    gone: list[list[int]] = []
    for i in range(4):
        before = {b.tokens[0] for b in mgr.cached_blocks()}
        admit(mgr, f"x{i}", [100 + i] * 4)
        gone.append(sorted(before - {b.tokens[0] for b in mgr.cached_blocks()}))
    assert gone == [[], [1], [3], [2]]


def test_an_exhausted_pool_answers_no_and_changes_nothing() -> None:
    """Mirrors vllm test_kv_cache_utils.py::test_free_kv_cache_block_queue_operations'
    pop from an empty queue ("No free blocks available") as vLLM's ``allocate_slots``
    answers it (None): with every block held, a decode token, a lookahead slot and a new
    request are all refused, and the version, block table and events stay as they were;
    only the refused admission is counted."""
    mgr = make_manager(num_gpu_blocks=2, enable_events=True)
    admit(mgr, "a", [1] * 8)
    mgr.drain_events()
    version = mgr.version
    assert mgr.num_blocks_to_append("a", 1) == 1
    assert mgr.append_tokens("a", [5]) is None
    assert mgr.reserve_lookahead("a", 1) is None
    refused = mgr.add_sequence(SequenceSpec("b", [3]))
    mgr.check_invariants()
    assert (refused.admitted, refused.reason) == (False, "not enough free or evictable GPU "
                                                         "blocks")
    assert (mgr.version, mgr.block_table("a"), mgr.drain_events()) == (version, [0, 1], [])
    assert mgr.stats.num_rejected == 1


def test_a_salt_and_an_image_key_the_first_block_together() -> None:
    """Mirrors vllm test_kv_cache_utils.py::test_generate_block_hash_extra_keys_cache_salt
    (the salt is added to the first block's keys only, beside its image: ``("hash1",
    "salt")``; later blocks carry neither): the 2-block prompt under no key, the salt, the
    image, and both hashes four ways at every block; block 0's event carries the image as
    its extra key and the salt as its key space, block 1 no extra key; each chain is the
    prompt's chain over exactly those keys, and only the same salt and image hit."""
    mgr = make_manager(num_gpu_blocks=16, enable_events=True)
    image = (MultimodalItem(0, 4, "hash1"),)
    prompt = list(range(9))
    fn = get_hash_fn("xxh3_128")
    chains = []
    for i, (salt, items) in enumerate([(None, ()), ("salt", ()), (None, image),
                                       ("salt", image)]):
        admit(mgr, f"r{i}", prompt, salt=salt, mm_items=items)
        stored = [e for e in mgr.drain_events() if isinstance(e, BlockStored)]
        extras = [(("hash1", 0),), None] if items else None
        assert [e.block_hash for e in stored] == prompt_block_hashes(
            fn, prompt, 4, salt=salt, extras=extras)
        key = encode_key((("hash1", 0),)) if items else None
        salt_key = None if salt is None else encode_key(salt)
        assert [(e.extra_key, e.salt_key) for e in stored] == [(key, salt_key),
                                                              (None, salt_key)]
        chains.append([e.block_hash for e in stored])
    assert len({h for chain in chains for h in chain}) == 8
    assert hit(mgr, prompt, salt="salt", mm_items=image) == 8
    assert hit(mgr, prompt, salt="salt", mm_items=(MultimodalItem(0, 4, "hash2"),)) == 0


def test_lookahead_slots_allocate_the_blocks_tokens_plus_lookahead_need() -> None:
    """Mirrors vllm tests/v1/core/test_prefix_caching.py::test_allocate_with_lookahead
    (blocks of 4: 3 tokens with 2 lookahead need ceil(5 / 4) = 2 blocks, with 4 lookahead
    ceil(7 / 4) = 2): the 3-token prompt's one block and one more slot block; 6 lookahead
    slots need a third."""
    for lookahead, want in ((2, [0, 1]), (4, [0, 1])):
        mgr = make_manager(num_gpu_blocks=10)
        admit(mgr, "0", [1, 2, 3])
        assert mgr.reserve_lookahead("0", lookahead) == [1]
        mgr.check_invariants()
        assert (mgr.block_table("0"), mgr.num_free_gpu_blocks) == (want, 8)
    assert mgr.reserve_lookahead("0", 6) == [2]
    mgr.check_invariants()
    assert mgr.block_table("0") == [0, 1, 2]


def test_a_prompt_logprobs_request_reads_nothing_and_its_blocks_duplicate_the_cached() -> None:
    """Mirrors vllm test_prefix_caching.py::test_prefill_plp (a request that wants prompt
    logprobs skips the cache hit, computes every token, and a later request still hits the
    common prefix): request 1 (``skip_reading_prefix_cache``) gets 4 new blocks though 3
    are cached; its 3 full blocks are duplicates (the first copy stays cached), request 2
    reuses request 0's 3 blocks, and once all are released only those 3 stay cached."""
    mgr = make_manager(num_gpu_blocks=10)
    assert admit(mgr, "0", [*range(12), 99]).block_ids == (0, 1, 2, 3)
    plp = admit(mgr, "1", [*range(12), 98], skip_reading_prefix_cache=True)
    assert (plp.num_reused_tokens, plp.block_ids) == (0, (4, 5, 6, 7))
    assert cached_slots(mgr) == [0, 1, 2] and mgr.stats.num_duplicate_stores == 3
    r2 = admit(mgr, "2", [*range(12), 97])
    assert (r2.num_reused_tokens, r2.block_ids) == (12, (0, 1, 2, 8))
    release(mgr, "0", "1", "2")
    assert cached_slots(mgr) == [0, 1, 2] and mgr.num_free_gpu_blocks == 10


def test_with_caching_disabled_queries_are_counted_and_nothing_hits() -> None:
    """Mirrors vllm test_prefix_caching.py::test_prefix_cache_stats_disabled (vLLM keeps
    no prefix-cache stats with caching off). Differs by design: kvtier counts every
    admitted prompt as it does with caching on, so the hit rate reads 0 (not missing):
    two 9-token prompts, 18 tokens queried, 0 reused, 4 full blocks missed."""
    mgr = make_manager(num_gpu_blocks=10, enable_block_reuse=False)
    admit(mgr, "0", list(range(9)))
    release(mgr, "0")
    admit(mgr, "1", list(range(9)))
    s = mgr.stats
    assert (s.num_prompt_tokens, s.num_reused_tokens, s.token_hit_rate) == (18, 0, 0.0)
    assert (s.gpu.reused_blocks, s.gpu.missed_blocks) == (0, 4)


def test_offloaded_blocks_take_host_slots_in_order_and_lookup_counts_the_prefix() -> None:
    """Mirrors vllm tests/v1/kv_offload/test_cpu_manager.py::test_cpu_manager's first
    steps (store [1, 2] into CPU blocks 0, 1; ``lookup([1])`` = 1, ``lookup([1, 2])`` =
    ``lookup([1, 2, 3])`` = 2): request a's two blocks, evicted by request b, are
    offloaded head first into host slots 0 and 1; a lookup counts host tokens of the
    prompt's contiguous prefix (the last block of a block-aligned prompt aside)."""
    mgr = make_manager(num_gpu_blocks=2, num_host_blocks=4)
    admit(mgr, "a", list(range(8)))
    release(mgr, "a")
    admit(mgr, "b", list(range(100, 108)))
    assert [(op.kind, op.src_slot, op.dst_slot) for op in mgr.take_plan().ops] == [
        (OpKind.OFFLOAD, 0, 0), (OpKind.OFFLOAD, 1, 1)]
    assert tiers(mgr) == [(0, "HOST", 0), (4, "HOST", 1), (100, "GPU", 0), (104, "GPU", 1)]
    lookups = [mgr.lookup(t) for t in ([0, 1, 2, 3, 9], [*range(8), 9], list(range(8)))]
    assert [(m.num_tokens, m.num_gpu_tokens, m.num_host_tokens) for m in lookups] == [
        (4, 0, 4), (8, 0, 8), (4, 0, 4)]


def test_a_full_host_drops_its_least_recent_leaf_and_reuses_that_slot() -> None:
    """Mirrors vllm test_cpu_manager.py::test_cpu_manager's ``prepare_store([2, 3, 4, 5])``
    on a full CPU tier (the least recently stored block is evicted, a removed event names
    it, and the new block takes its slot): host slots 2, 3 take request b's blocks; then
    one more offload finds the host full and drops request a's tail (the least recent
    host leaf, slot 1), whose slot takes request c's tail.

        host:  a[0..3] 0 -> a[4..7] 1 | b[100..] 2 -> b[104..] 3
        then:  a[0..3] 0              | b 2 -> 3              | c[204..] 1
    """
    mgr = make_manager(num_gpu_blocks=2, num_host_blocks=4, enable_events=True)
    for rid, base in (("a", 0), ("b", 100), ("c", 200)):
        admit(mgr, rid, list(range(base, base + 8)))
        release(mgr, rid)
    assert [(op.src_slot, op.dst_slot) for op in mgr.take_plan().ops] == [(0, 0), (1, 1),
                                                                          (0, 2), (1, 3)]
    tokens = {b.block_hash: b.tokens[0] for b in mgr.cached_blocks()}
    mgr.drain_events()
    admit(mgr, "d", list(range(300, 304)))  # one GPU block: c's tail leaves the GPU
    events = mgr.drain_events()
    removed = [(tokens[e.block_hash], e.tier) for e in events if isinstance(e, BlockRemoved)]
    assert removed == [(4, Tier.HOST)]
    assert [(op.kind, op.src_slot, op.dst_slot) for op in mgr.take_plan().ops] == [
        (OpKind.OFFLOAD, 1, 1)]
    assert tiers(mgr) == [(0, "HOST", 0), (100, "HOST", 2), (104, "HOST", 3),
                          (200, "GPU", 0), (204, "HOST", 1), (300, "GPU", 1)]
    assert hit(mgr, [*range(8), 9]) == 4


def test_a_failed_offload_forgets_its_block_and_only_that_block() -> None:
    """Mirrors vllm test_cpu_manager.py::test_cpu_manager's ``complete_store([7, 9],
    success=False)`` (a store that failed is not found; blocks stored before stay): of
    request a's two offloads the second fails, so its tail leaves the cache (a removed
    event on the host) and its head still hits on the host; no request is aborted (no
    live request reads a host block), and the failure is counted. A failed first offload
    takes the tail with it (a block's extensions are keyed by it)."""
    for failed, left in ((1, [(0, "HOST", 0)]), (0, [])):
        mgr = make_manager(num_gpu_blocks=2, num_host_blocks=4, enable_events=True)
        admit(mgr, "a", list(range(8)))
        release(mgr, "a")
        admit(mgr, "b", list(range(100, 108)))
        plan = mgr.take_plan()
        mgr.drain_events()
        assert mgr.transfer_failed(plan, [failed]) == []
        mgr.check_invariants()
        removed = [e.tier for e in mgr.drain_events() if isinstance(e, BlockRemoved)]
        assert removed == [Tier.HOST] * (2 - len(left))
        assert tiers(mgr) == [*left, (100, "GPU", 0), (104, "GPU", 1)]
        assert mgr.lookup([*range(8), 9]).num_host_tokens == 4 * len(left)
        assert mgr.stats.num_failed_transfers == 1


def test_a_reused_host_block_outlives_an_older_untouched_one() -> None:
    """Mirrors vllm test_cpu_manager.py::test_cpu_manager's ``touch([5, 6, 7])`` (a touched
    block moves to the end of the LRU order, so ``prepare_store([9])`` evicts [8]): with
    [1] and then [2] offloaded to a 2-slot host, one more offload drops [1], the older;
    after a request reuses [1] (onboarded: kvtier's touch), the host drops [2] instead."""
    def dropped(touch_first: bool) -> list[int]:
        mgr = make_manager(num_gpu_blocks=2, num_host_blocks=2)
        for v in (1, 2):
            admit(mgr, f"s{v}", [v] * 4)
            release(mgr, f"s{v}")
        admit(mgr, "x", [9] * 8)  # [1] then [2] to the host
        release(mgr, "x")
        assert tiers(mgr) == [(1, "HOST", 0), (2, "HOST", 1), (9, "GPU", 0), (9, "GPU", 1)]
        if touch_first:
            again = admit(mgr, "again", [1] * 4 + [0])
            assert (again.num_reused_tokens, again.num_onboarded_tokens) == (4, 4)
        else:
            admit(mgr, "other", [7] * 4)
        mgr.check_invariants()
        return [v for v in (1, 2) if hit(mgr, [v] * 4 + [0]) == 0]

    assert dropped(touch_first=False) == [1]
    assert dropped(touch_first=True) == [2]


def test_arc_evicts_the_blocks_seen_once_before_the_blocks_reused() -> None:
    """Mirrors vllm test_cpu_manager.py::test_arc_manager_t1_to_t2_promotion and
    test_arc_manager_t1_t2_eviction_policy (a touched block moves from T1 to T2; with T1
    above its target the victim is T1's least recent): [1] and [2] are cached and reused
    (T2), [3] and [4] cached after them (T1); ARC evicts [3], [4], then [1], where LRU
    evicts [1], [2], [3]."""
    def evicted(policy: str) -> list[int]:
        mgr = make_manager(num_gpu_blocks=6, eviction_policy=policy)
        for v in (1, 2):
            admit(mgr, f"s{v}", [v] * 4)
            release(mgr, f"s{v}")
        for v in (1, 2):
            assert admit(mgr, f"t{v}", [v] * 4 + [0]).num_reused_tokens == 4
            release(mgr, f"t{v}")
        for v in (3, 4):
            admit(mgr, f"s{v}", [v] * 4)
            release(mgr, f"s{v}")
        admit(mgr, "fill", [7] * 8)  # the 2 free blocks
        gone: list[int] = []
        for i in range(3):
            before = {b.tokens[0] for b in mgr.cached_blocks()}
            admit(mgr, f"n{i}", [50 + i] * 4)
            gone += sorted(before - {b.tokens[0] for b in mgr.cached_blocks()})
        return gone

    assert evicted("arc") == [3, 4, 1]
    assert evicted("lru") == evicted("priority-lru") == [1, 2, 3]


def test_a_duplicate_of_a_held_block_stays_private_and_pins_both_copies() -> None:
    """Mirrors vllm test_prefix_caching.py::test_block_lookup_cache_multi_blocks_per_key
    and test_maybe_evict_cached_block (vLLM's lookup cache keeps several blocks under one
    hash; evicting one leaves the others found): two requests of one batch compute the
    same 2 new blocks; a's are cached, b's are duplicates kept private to b. Differs by
    design: b's path follows the cached run (its later blocks are stored below it), so
    while b lives the cached run is held too: after a is released only 3 blocks are free
    or evictable (vLLM: 5, a's cached blocks being evictable); b's copies are freed with
    it, and the cached run is the one that stays."""
    mgr = make_manager(num_gpu_blocks=8, enable_events=True)
    a, b = mgr.add_sequence_batch([SequenceSpec("a", [*range(8), 0]),
                                   SequenceSpec("b", [*range(8), 1])])
    mgr.check_invariants()
    assert (a.block_ids, b.block_ids) == ((0, 1, 2), (3, 4, 5))
    assert cached_slots(mgr) == [0, 1] and mgr.stats.num_duplicate_stores == 2
    assert len([e for e in mgr.drain_events() if isinstance(e, BlockStored)]) == 2
    release(mgr, "a")
    assert mgr.num_free_gpu_blocks == 3
    assert admit(mgr, "big", [9] * 12).block_ids == (2, 6, 7)  # no cached block evicted
    mgr.drain_events()
    release(mgr, "b")
    assert mgr.drain_events() == []  # the private copies were never cached
    assert cached_slots(mgr) == [0, 1, 2, 6, 7] and mgr.num_free_gpu_blocks == 5
    assert hit(mgr, [*range(8), 5]) == 8


def test_a_preempted_request_resumes_in_chunks_from_what_survived_of_its_blocks() -> None:
    """Mirrors vllm tests/v1/core/test_scheduler.py's preemption with prefix caching and
    chunked prefill (a preempted request frees its blocks tail first, keeps them cached,
    and on resumption is scheduled from its cache hit in chunks of the token budget): 6
    blocks of 4, a budget of 6 tokens. b's 16-token prompt is prefilled in chunks 2, 5, 5,
    4 beside a's decodes; b's first decode finds no block and b (the newest) is preempted,
    its 4 blocks cached. a's decodes take 2 of them, b's tail first; once a finishes, b
    resumes with 8 tokens reused and recomputes 9 (its 8 lost prompt tokens and its first
    output) in chunks of 6 and 3.

        step 0:  a 0..3 | b 0..1          steps 1-3: a decodes, b 2..6, 7..11, 12..15
        step 4:  a decodes, b preempted   steps 5-11: a decodes (evicts b's 2 tail blocks)
        step 12: b 8..13 (8 reused)       step 13: b 14..16, then it samples its last
    """
    mgr = make_manager(num_gpu_blocks=6)
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=6,
                                           capacity_policy="max_utilization"))
    sched.add_request(Request("a", list(range(4)), max_output_tokens=12))
    sched.add_request(Request("b", list(range(100, 116)), max_output_tokens=2))
    log: list[tuple[object, ...]] = []
    for _ in range(30):
        step = sched.step()
        mgr.check_invariants()
        log.append(([(c.request_id, c.first_token, c.num_tokens, c.num_reused_tokens)
                     for c in step.context_chunks], step.decode_request_ids,
                    step.preempted_request_ids))
        ids = [*step.decode_request_ids, *(c.request_id for c in step.context_chunks)]
        sched.update(step, dict.fromkeys(ids, 7))
        mgr.check_invariants()
        if not sched.has_unfinished():
            break
    assert log[:5] == [([("a", 0, 4, 0), ("b", 0, 2, 0)], (), ()),
                       ([("b", 2, 5, 0)], ("a",), ()),
                       ([("b", 7, 5, 0)], ("a",), ()),
                       ([("b", 12, 4, 0)], ("a",), ()),
                       ([], ("a",), ("b",))]
    assert log[5:12] == [([], ("a",), ())] * 7
    assert log[12:] == [([("b", 8, 6, 8)], (), ()), ([("b", 14, 3, 0)], (), ())]
    assert mgr.num_sequences == 0 and mgr.num_free_gpu_blocks == 6


def test_a_request_that_skips_reading_is_no_query_of_the_prefix_cache_stats() -> None:
    """Mirrors vllm test_prefix_caching.py::test_prefill_plp with vLLM's prefix-cache
    counters (``KVCacheManager.record_prefix_cache_stats``: "Don't count a request that
    skipped the cache lookup"): request 0 misses its 13 tokens; request 1 wants prompt
    logprobs (``skip_reading_prefix_cache``) and looks nothing up, so it is admitted but
    neither queried nor missed, though its 3 blocks were cached; request 2 hits 12. The
    counters read 26 tokens queried, 12 hit, 3 blocks reused and 3 missed (before: 39
    queried and 6 missed, the blocks request 1 never looked for counted as misses)."""
    mgr = make_manager(num_gpu_blocks=16)
    admit(mgr, "0", [*range(12), 99])
    release(mgr, "0")
    admit(mgr, "1", [*range(12), 98], skip_reading_prefix_cache=True)
    s = mgr.stats
    assert (s.num_admitted, s.num_prompt_tokens, s.num_reused_tokens) == (2, 13, 0)
    assert (s.gpu.reused_blocks, s.gpu.missed_blocks, s.host.missed_blocks) == (0, 3, 3)
    assert admit(mgr, "2", [*range(12), 97]).num_reused_tokens == 12
    s = mgr.stats
    assert (s.num_admitted, s.num_prompt_tokens, s.num_reused_tokens) == (3, 26, 12)
    assert (s.gpu.reused_blocks, s.gpu.missed_blocks) == (3, 3)
    assert s.token_hit_rate == 12 / 26
