"""vLLM's own KV-cache-manager tests, mirrored against kvtier.

Each test names the vLLM test it mirrors (vllm-project/vllm, ``tests/v1/core/...``) and
asserts kvtier's exact answer: block ids, reused tokens, free-block counts, events.

Mapping of the ids: vLLM's pool keeps block 0 as its null block, so vLLM's block ``i`` is
kvtier's slot ``i - 1`` and a vLLM pool of ``n`` blocks is a kvtier pool of ``n - 1``.
vLLM's ``get_computed_blocks`` is ``lookup`` (a pure query here), ``allocate_slots`` is
``add_sequence`` (or ``append_tokens`` for decode), ``free`` is ``remove_sequence``.
"""

from __future__ import annotations

from typing import Any

import pytest

from kvtier import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVCacheManager,
    MultimodalItem,
    OpKind,
    Request,
    Scheduler,
    SchedulerConfig,
    SequenceSpec,
)
from kvtier.hashing import chain_hashes, encode_key, get_hash_fn, root_hash
from peer_mirror.mirror_helpers import admit, blocks_of, cached_slots, hit, make_manager, release

BS = 16  # vLLM's block size in these tests
COMMON = blocks_of(0, 1, 2, tokens_per_block=BS)  # three full blocks


def vllm_manager(num_blocks: int, **kw: Any) -> KVCacheManager:
    """A kvtier pool as large as a vLLM pool of ``num_blocks`` (one is vLLM's null block)."""
    return make_manager(tokens_per_block=BS, num_gpu_blocks=num_blocks - 1, **kw)


def test_prefill_shares_the_common_prefix_with_exact_ids_and_counts() -> None:
    """Mirrors vllm tests/v1/core/test_prefix_caching.py::test_prefill: a common 3-block
    prefix is shared while in use and after it is freed; a partial block is never cached; a
    request taking the whole pool evicts everything."""
    mgr = vllm_manager(11)
    assert hit(mgr, [*COMMON, 3, 3, 3, 3, 3, 3, 3]) == 0
    r0 = admit(mgr, "0", [*COMMON, *[3] * 7])
    assert r0.block_ids == (0, 1, 2, 3)  # vLLM [1, 2, 3, 4]
    assert [b.slot for b in mgr.cached_blocks()] == [0, 1, 2]  # the partial block 3 is not
    # Cache hit while the blocks are still in use.
    assert hit(mgr, [*COMMON, *[3] * 5]) == 3 * BS
    r1 = admit(mgr, "1", [*COMMON, *[3] * 5])
    assert (r1.num_reused_tokens, r1.block_ids) == (48, (0, 1, 2, 4))  # vLLM [5]
    assert mgr.num_free_gpu_blocks == 5
    release(mgr, "0", "1")
    assert mgr.num_free_gpu_blocks == 10
    assert cached_slots(mgr) == [0, 1, 2]
    # Cache hit after the blocks were freed; the new partial block is the one freed last
    # (vLLM: the uncached blocks go to the head of the free queue, most recent first).
    r2 = admit(mgr, "2", [*COMMON, *[3] * 6])
    assert (r2.num_reused_tokens, r2.block_ids) == (48, (0, 1, 2, 4))
    assert mgr.num_free_gpu_blocks == 6
    release(mgr, "2")
    # A miss of the whole pool: every block is taken, the cached prefix is evicted.
    r3 = admit(mgr, "3", [99] * (BS * 10))
    assert r3.num_reused_tokens == 0 and sorted(r3.block_ids) == list(range(10))
    assert mgr.num_free_gpu_blocks == 0
    assert hit(mgr, [*COMMON, 3]) == 0
    assert mgr.stats.num_reused_tokens == 2 * 48


def test_a_block_aligned_prompt_recomputes_its_last_block() -> None:
    """Mirrors vllm test_prefix_caching.py's full-prompt-hit rule (the final block is
    recomputed to obtain logits, e.g. test_hybrid_local_kv_retention_latest_only...): an
    identical 3-block prompt hits 2 blocks, one more token hits all 3."""
    mgr = vllm_manager(11)
    admit(mgr, "0", COMMON)
    release(mgr, "0")
    assert hit(mgr, COMMON) == 2 * BS
    assert hit(mgr, [*COMMON, 7]) == 3 * BS
    assert hit(mgr, COMMON[:-1]) == 2 * BS


def test_decode_fills_the_partial_block_then_allocates_and_caches_it() -> None:
    """Mirrors vllm test_prefix_caching.py::test_decode: appending into the partial block
    allocates nothing; the token that overflows it allocates one block, and the block it
    filled is cached while the new one is not."""
    mgr = vllm_manager(11)
    assert admit(mgr, "0", [*COMMON, *[3] * 7]).block_ids == (0, 1, 2, 3)
    assert mgr.append_tokens("0", [8] * 4) == []  # 55 -> 59 tokens: block 3 not full
    mgr.check_invariants()
    assert cached_slots(mgr) == [0, 1, 2]
    assert mgr.append_tokens("0", [7] * 5) == []  # 64 tokens: block 3 full, cached now
    assert mgr.append_tokens("0", [7] * 10) == [4]  # into a fifth block
    mgr.check_invariants()
    assert cached_slots(mgr) == [0, 1, 2, 3]
    assert mgr.block_table("0") == [0, 1, 2, 3, 4]
    assert hit(mgr, [*COMMON, *[3] * 7, *[8] * 4, *[7] * 5, 0]) == 64


def test_evict_takes_the_freed_partial_block_before_cached_ones() -> None:
    """Mirrors vllm test_prefix_caching.py::test_evict: after both requests are freed, a
    request touching the first 2 blocks reuses them and takes the freed partial block, so
    7 blocks stay free."""
    mgr = vllm_manager(11)
    assert len(admit(mgr, "0", list(range(5 * BS + 7))).block_ids) == 6
    assert admit(mgr, "1", list(range(87, 87 + 3 * BS))).block_ids == (6, 7, 8)
    assert mgr.num_free_gpu_blocks == 1
    release(mgr, "0")
    assert mgr.num_free_gpu_blocks == 7
    release(mgr, "1")
    assert mgr.num_free_gpu_blocks == 10
    r2 = admit(mgr, "2", list(range(2 * BS + 3)))
    assert (r2.num_reused_tokens, r2.block_ids) == (32, (0, 1, 5))  # vLLM [1, 2] + [6]
    assert mgr.num_free_gpu_blocks == 7
    # LRU among the cached: request 0's tail (slots 4, 3) goes before request 1's blocks.
    r3 = admit(mgr, "3", [500] * (2 * BS + 1))
    assert sorted(r3.block_ids) == [3, 4, 9]
    assert hit(mgr, list(range(87, 87 + 3 * BS)) + [0]) == 3 * BS
    assert hit(mgr, list(range(5 * BS))) == 3 * BS


def test_a_recycled_block_loses_its_old_hash() -> None:
    """Mirrors vllm test_prefix_caching.py::test_hash_block_correct_reuse: a cached block
    taken by a request whose block never fills is no longer found by its old tokens."""
    mgr = vllm_manager(2)
    admit(mgr, "0", list(range(BS)))
    release(mgr, "0")
    assert cached_slots(mgr) == [0]
    admit(mgr, "1", list(range(BS - 1)))
    assert mgr.cached_blocks() == []
    assert hit(mgr, [*range(BS), 0]) == 0


def test_a_prefix_hit_evicts_the_other_cached_block_not_itself() -> None:
    """Mirrors vllm test_prefix_caching.py::test_computed_blocks_not_evicted: with the pool
    full of cached blocks, a request hitting block 0 gets block 1 as its new block."""
    mgr = vllm_manager(3)
    assert admit(mgr, "0", list(range(BS))).block_ids == (0,)
    assert admit(mgr, "1", list(range(BS, 2 * BS))).block_ids == (1,)
    release(mgr, "0", "1")
    r2 = admit(mgr, "2", list(range(2 * BS)))
    assert (r2.num_reused_tokens, r2.block_ids) == (BS, (0, 1))


def test_prefix_caching_disabled_caches_and_reuses_nothing() -> None:
    """Mirrors vllm test_prefix_caching.py::test_basic_prefix_caching_disabled: with reuse
    off nothing is cached or hit, and a request that finds no free block is refused."""
    mgr = make_manager(num_gpu_blocks=4, enable_block_reuse=False)
    assert len(admit(mgr, "1", list(range(10))).block_ids) == 3
    release(mgr, "1")
    assert mgr.cached_blocks() == [] and hit(mgr, list(range(16))) == 0
    assert len(admit(mgr, "2", list(range(16))).block_ids) == 4
    r3 = mgr.add_sequence(SequenceSpec("3", list(range(4))))
    mgr.check_invariants()
    assert not r3.admitted and r3.block_ids == ()


def test_multimodal_items_key_the_blocks_they_overlap() -> None:
    """Mirrors vllm test_prefix_caching.py::test_mm_prefix_caching: blocks holding image
    placeholders hit only with the same images at the same offsets; a prompt with another
    unique tail still hits the 3 common blocks."""
    mgr = vllm_manager(11)
    common = list(range(10)) + [0] * 6 + [0] * 4 + list(range(10, 20)) + [0] * 2 + [0] * 16
    items = (MultimodalItem(11, 10, "aaa"), MultimodalItem(30, 18, "bbb"),
             MultimodalItem(48, 7, "ccc"))
    admit(mgr, "0", common + [0] * 7 + [100] * 4, mm_items=items)
    assert mgr.append_tokens("0", [8] * 5) == []  # fills block 3 (image ccc in it): cached
    assert cached_slots(mgr) == [0, 1, 2, 3]
    req1 = common + [0] * 7 + [200] * 5
    assert hit(mgr, req1, mm_items=items) == 3 * BS
    # Another image in block 1 ("bbb" -> "zzz"): only block 0 matches.
    other = (items[0], MultimodalItem(30, 18, "zzz"), items[2])
    assert hit(mgr, req1, mm_items=other) == BS
    # The same image at another offset inside block 0 is another block.
    assert hit(mgr, req1, mm_items=(MultimodalItem(10, 11, "aaa"), *items[1:])) == 0
    assert hit(mgr, req1) == 0


def test_multimodal_items_listed_in_another_order_still_hit() -> None:
    """Mirrors vllm test_prefix_caching.py::test_mm_prefix_caching's hashing (per block the
    items' hashes with their offsets, in position order): two images in one block, listed
    in the other order, are the same prompt and hit."""
    mgr = make_manager(num_gpu_blocks=8)
    items = (MultimodalItem(0, 2, b"A"), MultimodalItem(2, 2, b"B"))
    admit(mgr, "0", [5] * 8 + [1], mm_items=items)
    release(mgr, "0")
    assert hit(mgr, [5] * 8 + [1], mm_items=items) == 8
    assert hit(mgr, [5] * 8 + [1], mm_items=items[::-1]) == 8


def test_cache_salt_separates_every_block() -> None:
    """Mirrors vllm test_prefix_caching.py::test_cache_key_salting: the same salt hits the
    3 common blocks, another salt hits nothing, and the salted chain's hashes all differ
    from the unsalted chain's (the salt seeds the first block, the chain carries it)."""
    mgr = vllm_manager(11)
    admit(mgr, "0", [*COMMON, *[3] * 11], salt="salt1")
    assert mgr.append_tokens("0", [8] * 5) == []
    assert hit(mgr, [*COMMON, *[4] * 11], salt="salt1") == 3 * BS
    assert hit(mgr, [*COMMON, *[4] * 11], salt="salt2") == 0
    assert hit(mgr, [*COMMON, *[4] * 11]) == 0
    fn = get_hash_fn("xxh3_128")
    salted = chain_hashes(fn, root_hash(fn, None, "salt1"), COMMON, BS, None)
    plain = chain_hashes(fn, root_hash(fn, None, None), COMMON, BS, None)
    stored = [b.block_hash for b in mgr.cached_blocks()]
    assert stored[:3] == salted and not set(salted) & set(plain)


def test_a_salted_first_block_s_event_names_its_salt() -> None:
    """Mirrors vllm test_prefix_caching.py::test_cache_key_salting (the salt is block 0's
    extra key) with test_eagle_kv_events_publish_successor_hashes (a consumer rebuilds the
    hashes from an event's tokens and extra keys): equal first blocks under two salts must
    differ in what their stored events carry, not only in the hash."""
    mgr = make_manager(num_gpu_blocks=8, enable_events=True)
    contents = []
    for salt in ("salt1", "salt2"):
        admit(mgr, salt, [1, 2, 3, 4, 5], salt=salt)
        (first,) = [e for e in mgr.drain_events() if isinstance(e, BlockStored)]
        contents.append((first.parent_hash, first.token_ids, first.extra_key, first.lora_id,
                         first.salt_key))
    assert contents[0] != contents[1]
    assert [c[-1] for c in contents] == [encode_key("salt1"), encode_key("salt2")]


def test_a_refused_request_leaves_the_computed_blocks_untouched() -> None:
    """Mirrors vllm test_prefix_caching.py::test_prefill_not_enough_free_blocks_with_
    computed_blocks: a request hitting 6 blocks that cannot get 3 more is refused and the
    hit blocks keep their holders (3 held, 3 evictable), lookups and counters unchanged."""
    mgr = vllm_manager(11)
    admit(mgr, "0", COMMON)
    r1 = admit(mgr, "1", COMMON * 2)
    assert (r1.num_reused_tokens, r1.block_ids) == (48, (0, 1, 2, 3, 4, 5))
    release(mgr, "1")
    admit(mgr, "2", [7] * (2 * BS))
    assert mgr.num_free_gpu_blocks == 5
    assert hit(mgr, COMMON * 3) == 6 * BS
    before = (mgr.version, [(b.slot, b.priority) for b in mgr.cached_blocks()])
    r3 = mgr.add_sequence(SequenceSpec("3", COMMON * 3))
    mgr.check_invariants()
    assert not r3.admitted and mgr.stats.num_rejected == 1
    assert (mgr.version, [(b.slot, b.priority) for b in mgr.cached_blocks()]) == before
    held = [b.slot for b in mgr.cached_blocks() if b.priority is None]
    assert held[:3] == [0, 1, 2] and 3 not in held  # 3..5 evictable (priority 35)
    assert mgr.num_free_gpu_blocks == 5 and hit(mgr, COMMON * 3) == 6 * BS


def test_reset_is_refused_while_a_request_is_live_then_drops_everything() -> None:
    """Mirrors vllm test_prefix_caching.py::test_reset_prefix_cache: reset fails while
    blocks are in use, and afterwards no block is cached."""
    mgr = vllm_manager(11)
    assert admit(mgr, "0", [*COMMON, *[3] * 7]).block_ids == (0, 1, 2, 3)
    assert admit(mgr, "1", [*COMMON, *[4] * 7]).block_ids == (0, 1, 2, 4)
    assert not mgr.reset_cache()
    assert cached_slots(mgr) == [0, 1, 2]
    release(mgr, "0", "1")
    assert mgr.reset_cache()
    mgr.check_invariants()
    assert mgr.cached_blocks() == [] and mgr.num_free_gpu_blocks == 10
    assert hit(mgr, [*COMMON, 3]) == 0


@pytest.mark.parametrize("blocks_to_cache", [2, 3, 10])
def test_kv_cache_events_store_remove_and_clear(blocks_to_cache: int) -> None:
    """Mirrors vllm test_prefix_caching.py::test_kv_cache_events: storing a prompt gives a
    stored event per block (vLLM: one event carrying them all), a second prompt taking the
    whole pool removes each and stores its own, and a reset ends with AllBlocksCleared
    (kvtier also reports each block it drops before it). Differs by design: the run
    leaves in one piece, so its removals come head first in one batch, where vLLM's free
    queue reports them tail first; a partial eviction still takes the tail
    (test_evict_takes_the_freed_partial_block_before_cached_ones)."""
    mgr = make_manager(tokens_per_block=BS, num_gpu_blocks=blocks_to_cache,
                       enable_events=True)
    n = BS * blocks_to_cache
    admit(mgr, "0", list(range(n)))
    stored = [e for e in mgr.drain_events() if isinstance(e, BlockStored)]
    assert len(stored) == blocks_to_cache
    assert [e.block_hash for e in stored] == [b.block_hash for b in mgr.cached_blocks()]
    assert all(e.num_tokens == BS and len(e.token_ids or ()) == BS for e in stored)
    assert mgr.drain_events() == []  # draining empties the queue
    release(mgr, "0")
    admit(mgr, "1", list(range(n, 2 * n)))
    events = mgr.drain_events()
    removed = [e for e in events[:blocks_to_cache] if isinstance(e, BlockRemoved)]
    assert [e.block_hash for e in removed] == [e.block_hash for e in stored]
    assert [type(e) for e in events[blocks_to_cache:]] == [BlockStored] * blocks_to_cache
    assert [e.seq for e in events] == list(range(blocks_to_cache, 3 * blocks_to_cache))
    release(mgr, "1")
    assert mgr.reset_cache()
    cleared = mgr.drain_events()
    assert isinstance(cleared[-1], AllBlocksCleared)
    assert len(cleared) == blocks_to_cache + 1 and mgr.cached_blocks() == []


@pytest.mark.parametrize("blocks_to_cache", [2, 3, 10])
def test_stored_events_carry_the_lora_id(blocks_to_cache: int) -> None:
    """Mirrors vllm test_prefix_caching.py::test_kv_cache_events_with_lora: stored events
    of a LoRA request carry its id, those of a base-model request None."""
    mgr = make_manager(tokens_per_block=BS, num_gpu_blocks=blocks_to_cache,
                       enable_events=True)
    n = BS * blocks_to_cache
    admit(mgr, "lora", list(range(n)), lora_id=42)
    events = mgr.drain_events()
    assert len(events) == blocks_to_cache
    assert all(isinstance(e, BlockStored) and e.lora_id == 42 for e in events)
    release(mgr, "lora")
    admit(mgr, "base", list(range(n)))
    events = mgr.drain_events()
    stored = [e for e in events if isinstance(e, BlockStored)]
    assert len(stored) == blocks_to_cache and all(e.lora_id is None for e in stored)


def test_prefix_cache_stats_count_queries_and_hits() -> None:
    """Mirrors vllm test_prefix_caching.py's PrefixCacheStats (queries and hits in tokens,
    test_prefix_cache_stats_disabled's counterpart): kvtier counts the prompt and reused
    tokens of admitted requests; a lookup alone counts nothing, nor does a refused one."""
    mgr = vllm_manager(5)
    for _ in range(3):
        hit(mgr, [*COMMON, 3])
    assert mgr.stats.num_prompt_tokens == 0
    admit(mgr, "0", [*COMMON, 3])
    release(mgr, "0")
    admit(mgr, "1", [*COMMON, 4])
    assert mgr.stats.num_prompt_tokens == 2 * 49 and mgr.stats.num_reused_tokens == 48
    assert (mgr.stats.gpu.reused_blocks, mgr.stats.gpu.missed_blocks) == (3, 3)
    refused = mgr.add_sequence(SequenceSpec("2", [9] * (2 * BS)))
    assert not refused.admitted and mgr.stats.num_prompt_tokens == 98
    assert mgr.stats.token_hit_rate == pytest.approx(48 / 98)


def test_a_preempted_request_resumes_from_its_cached_prompt_and_output() -> None:
    """Mirrors vllm tests/v1/core/test_scheduler.py's preemption tests (the newest running
    request is preempted when decode finds no block, its blocks freed and cached, and it
    resumes later with its output as part of what it prefills): exact steps and reuse."""
    mgr = make_manager(num_gpu_blocks=5)
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=64,
                                           capacity_policy="max_utilization"))
    sched.add_request(Request("a", list(range(8)), max_output_tokens=6))
    sched.add_request(Request("b", list(range(100, 108)), max_output_tokens=6))
    log: list[tuple[object, ...]] = []
    finished: dict[str, list[int]] = {}
    for i in range(12):
        step = sched.step()
        mgr.check_invariants()
        log.append(([(c.request_id, c.first_token, c.num_tokens, c.num_reused_tokens)
                     for c in step.context_chunks], step.decode_request_ids,
                    step.preempted_request_ids))
        ids = [*step.decode_request_ids, *(c.request_id for c in step.context_chunks)]
        for req in sched.update(step, {rid: 50 + i for rid in ids}):
            finished[req.request_id] = req.output
        mgr.check_invariants()
        if not sched.has_unfinished():
            break
    # Step 0 prefills both (4 of 5 blocks); step 1: "a" takes the last block, "b" finds
    # none and is preempted (its 2 prompt blocks stay cached).
    assert log[0] == ([("a", 0, 8, 0), ("b", 0, 8, 0)], (), ())
    assert log[1] == ([], ("a",), ("b",))
    # "a" decodes alone; its 4th block (step 5) evicts "b"'s cached tail block, so "b"
    # resumes with 4 tokens reused and recomputes its second block and first output.
    assert log[2:6] == [([], ("a",), ())] * 4
    assert log[6] == ([("b", 4, 5, 4)], (), ())
    assert finished == {"a": [50, 51, 52, 53, 54, 55], "b": [50, 56, 57, 58, 59, 60]}
    assert mgr.num_sequences == 0 and mgr.num_free_gpu_blocks == 5


def test_chunked_prefill_caches_each_chunk_s_full_blocks_as_it_is_scheduled() -> None:
    """Mirrors vllm tests/v1/core/test_scheduler.py's chunked-prefill + prefix-caching
    tests: each chunk's full blocks become hits once scheduled (after the step), the rest
    of the prompt stays reserved, and a second request reuses exactly what was computed."""
    mgr = make_manager(num_gpu_blocks=8)
    adm = mgr.add_sequence(SequenceSpec("a", list(range(20)), num_new_tokens=6))
    mgr.check_invariants()
    assert adm.block_ids == (0, 1) and mgr.num_reserved_blocks == 3
    assert mgr.num_free_gpu_blocks == 3  # 8 - 2 held - 3 reserved
    assert hit(mgr, list(range(20))) == 4  # block 0 full; block 1 half computed
    mgr.schedule_prefill("a", 10)  # tokens 6..15: blocks 1..3 full
    mgr.check_invariants()
    assert mgr.block_table("a") == [0, 1, 2, 3] and mgr.num_reserved_blocks == 1
    assert hit(mgr, list(range(20))) == 16
    mgr.schedule_prefill("a", 4)
    mgr.check_invariants()
    assert mgr.num_unscheduled_tokens("a") == 0 and mgr.num_reserved_blocks == 0
    assert hit(mgr, [*range(20), 0]) == 20
    with pytest.raises(ValueError, match="0 unscheduled prompt tokens, asked 1"):
        mgr.schedule_prefill("a", 1)
    mgr.check_invariants()


def test_cached_blocks_nobody_holds_count_against_the_free_pool() -> None:
    """Mirrors vllm tests/v1/core/test_single_type_kv_cache_manager.py::test_get_num_blocks_
    to_allocate: hit blocks that no request holds sit in the free queue, so reusing them
    takes them from it; blocks another request holds cost nothing."""
    mgr = make_manager(num_gpu_blocks=10)
    admit(mgr, "other", [50] * 8)  # 2 blocks held by another request
    admit(mgr, "0", [*range(16), 99])
    release(mgr, "0")  # 4 cached, unheld: 8 free or evictable
    assert mgr.num_free_gpu_blocks == 8
    too_big = mgr.add_sequence(SequenceSpec("a", [*range(16), *range(100, 117)]))
    assert not too_big.admitted  # 4 hits + 5 new > 8
    mgr.check_invariants()
    fits = admit(mgr, "b", [*range(16), *range(100, 116)])  # 4 hits + 4 new == 8
    assert fits.num_reused_tokens == 16 and mgr.num_free_gpu_blocks == 0
    release(mgr, "b")
    admit(mgr, "holder", [*range(16), 7])  # holds the 4 (and 1 new): 3 free
    assert mgr.num_free_gpu_blocks == 3
    shared = admit(mgr, "c", [*range(16), *range(200, 211)])  # 4 held hits + 3 new
    assert shared.num_reused_tokens == 16 and mgr.num_free_gpu_blocks == 0


def test_an_aborted_request_keeps_only_what_its_applied_steps_computed() -> None:
    """Mirrors vllm tests/v1/core/test_scheduler.py's finish/abort tests (a request
    finished as aborted frees its blocks; the full blocks computed stay cached): aborted
    after 2 of its 4 chunks, a request leaves its 3 computed full blocks cached and its
    reservation and other blocks free."""
    mgr = make_manager(num_gpu_blocks=8)
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=6))
    sched.add_request(Request("a", list(range(20)), max_output_tokens=4))
    for _ in range(2):
        step = sched.step()
        assert sched.update(step, {}) == []
        mgr.check_invariants()
    assert mgr.num_free_gpu_blocks == 2 and mgr.num_reserved_blocks == 3
    aborted = sched.abort("a")
    mgr.check_invariants()
    assert aborted is not None and aborted.num_computed_tokens == 12
    assert mgr.num_free_gpu_blocks == 8 and mgr.num_reserved_blocks == 0
    assert cached_slots(mgr) == [0, 1, 2] and hit(mgr, list(range(20))) == 12
    assert sched.abort("a") is None and not sched.has_unfinished()


def test_a_failed_load_recomputes_from_the_first_bad_block_only() -> None:
    """Mirrors vllm tests/v1/kv_connector/unit/test_kv_load_failure_recovery.py (a KV load
    that fails for some blocks sends the request back to recompute from the first invalid
    block; the valid prefix stays usable): the second of two onboards fails, the request
    is aborted, the first block stays cached on the GPU and the retry reuses it alone."""
    mgr = make_manager(num_gpu_blocks=4, num_host_blocks=4)
    admit(mgr, "a", list(range(9)), priority=50)
    release(mgr, "a")
    admit(mgr, "big", list(range(200, 216)))  # pushes a's 2 blocks to the host
    release(mgr, "big")
    mgr.take_plan()
    assert mgr.lookup(list(range(9))).num_host_tokens == 8
    admit(mgr, "q", list(range(9)))
    plan = mgr.take_plan()
    onboards = [i for i, op in enumerate(plan.ops) if op.kind is OpKind.ONBOARD]
    assert len(onboards) == 2
    assert mgr.transfer_failed(plan, [onboards[1]]) == ["q"]
    mgr.check_invariants()
    assert not mgr.has_sequence("q") and mgr.num_free_gpu_blocks == 4
    m = mgr.lookup(list(range(9)))
    assert (m.num_tokens, m.num_gpu_tokens) == (4, 4)
    retry = admit(mgr, "q", list(range(9)))
    assert (retry.num_reused_tokens, retry.num_onboarded_tokens) == (4, 0)
    assert mgr.take_plan().ops == () and mgr.stats.num_failed_transfers >= 1
