"""More of vLLM's own prefix-caching tests, mirrored against kvtier: the free queue's
eviction order, the extra keys of each block's hash, salts, and the prefix-cache counters.

Each test names the vLLM test it mirrors (vllm-project/vllm, ``tests/v1/core/...``) and
asserts kvtier's exact answer. The id mapping is ``test_vllm_mirror.py``'s: vLLM's block
``i`` is kvtier's slot ``i - 1`` (vLLM's block 0 is its null block).
"""

from __future__ import annotations

import pytest

from kvtier import BlockRemoved, BlockStored, MultimodalItem, Request, Scheduler, SchedulerConfig
from kvtier.hashing import encode_key, get_hash_fn, prompt_block_hashes
from kvtier.sequence import block_extras
from peer_mirror.mirror_helpers import admit, blocks_of, hit, make_manager, release

BS = 16  # vLLM's block size in these tests
COMMON = blocks_of(0, 1, 2, tokens_per_block=BS)  # three full blocks


def test_the_free_queue_order_after_two_requests_share_a_prefix() -> None:
    """Mirrors vllm tests/v1/core/test_prefix_caching.py::test_prefill's free queue after
    both requests are freed, ``[5, 4, 6, 7, 8, 9, 10, 3, 2, 1]``: the freed partial blocks
    first (the last freed first), then the never-used blocks, then the cached prefix tail
    first. Ten one-block requests take kvtier's slots in exactly that order (slot = vLLM
    id - 1), and the cached blocks leave (a removed event each) only when their turn comes.

        slots   0    1    2  | 3       4      | 5 .. 9
                common prefix | r1's    r0's   | never used
                (cached)      | partial blocks |
    """
    mgr = make_manager(tokens_per_block=BS, num_gpu_blocks=10, enable_events=True)
    assert admit(mgr, "0", [*COMMON, *[3] * 7]).block_ids == (0, 1, 2, 3)
    assert admit(mgr, "1", [*COMMON, *[3] * 5]).block_ids == (0, 1, 2, 4)
    release(mgr, "0", "1")
    slot_of = {b.block_hash: b.slot for b in mgr.cached_blocks()}
    mgr.drain_events()
    taken, dropped = [], []
    for i in range(10):
        (slot,) = admit(mgr, f"x{i}", [100 + i] * BS).block_ids
        taken.append(slot)
        dropped += [slot_of[e.block_hash] for e in mgr.drain_events()
                    if isinstance(e, BlockRemoved)]
    assert taken == [4, 3, 5, 6, 7, 8, 9, 2, 1, 0]
    assert dropped == [2, 1, 0]


def test_each_block_s_extra_key_names_the_items_with_their_offset_in_the_block() -> None:
    """Mirrors vllm test_prefix_caching.py::test_mm_prefix_caching's block hashes: block 0
    is keyed by ``(("aaa", 11),)``, block 1 by ``(("aaa", -5), ("bbb", 14))`` (an item
    that began in the block before has a negative offset), block 2 by ``(("bbb", -2),)``
    and the decoded block 3 by ``(("ccc", 0),)``; the stored events carry exactly those
    keys, and their hashes are the prompt's chain over them.

        tokens  0        11  16   21    30 32    48   55 59 64
                |T...T  P0...|P0..P0 T.. P1|P1......|P2...T  8|
                 block 0      block 1       block 2  block 3
    """
    mgr = make_manager(tokens_per_block=BS, num_gpu_blocks=10, enable_events=True)
    common = list(range(10)) + [0] * 6 + [0] * 4 + list(range(10, 20)) + [0] * 2 + [0] * 16
    items = (MultimodalItem(11, 10, "aaa"), MultimodalItem(30, 18, "bbb"),
             MultimodalItem(48, 7, "ccc"))
    prompt = common + [0] * 7 + [100] * 4
    admit(mgr, "0", prompt, mm_items=items)
    assert mgr.append_tokens("0", [8] * 5) == []  # fills block 3: stored
    stored = [e for e in mgr.drain_events() if isinstance(e, BlockStored)]
    extras = [(("aaa", 11),), (("aaa", -5), ("bbb", 14)), (("bbb", -2),), (("ccc", 0),)]
    assert [e.extra_key for e in stored] == [encode_key(x) for x in extras]
    chain = prompt_block_hashes(get_hash_fn("xxh3_128"), prompt + [8] * 5, BS, extras=extras)
    assert [e.block_hash for e in stored] == chain
    assert [e.parent_hash for e in stored] == [None, *chain[:3]]


def test_the_salt_keys_the_first_block_and_the_chain_carries_it() -> None:
    """Mirrors vllm test_prefix_caching.py::test_cache_key_salting's hashes (block 0 hashed
    with ``("salt1",)``, later blocks with no extra key): every stored event of the salted
    prompt has no extra key of its own, names the salt as its key space, and its hash is
    the salted chain; only the salt differs from the unsalted chain's inputs."""
    mgr = make_manager(tokens_per_block=BS, num_gpu_blocks=10, enable_events=True)
    prompt = [*COMMON, *[3] * 11]
    admit(mgr, "0", prompt, salt="salt1")
    salted = [e for e in mgr.drain_events() if isinstance(e, BlockStored)]
    admit(mgr, "1", prompt)
    plain = [e for e in mgr.drain_events() if isinstance(e, BlockStored)]
    fn = get_hash_fn("xxh3_128")
    assert [e.block_hash for e in salted] == prompt_block_hashes(fn, prompt, BS, salt="salt1")
    assert [e.block_hash for e in plain] == prompt_block_hashes(fn, prompt, BS)
    assert [(e.extra_key, e.salt_key) for e in salted] == [(None, encode_key("salt1"))] * 3
    assert [(e.extra_key, e.salt_key) for e in plain] == [(None, None)] * 3
    assert [e.token_ids for e in salted] == [e.token_ids for e in plain]
    assert not {e.block_hash for e in salted} & {e.block_hash for e in plain}


def test_a_full_prompt_hit_recomputes_the_last_token_s_block_through_the_scheduler() -> None:
    """Mirrors vllm tests/v1/core/test_scheduler.py's prefix-caching scheduling (a request
    whose whole prompt is cached is scheduled from ``num_computed_tokens`` = the hit, and
    the hit stops short of the last token: its logits must be computed): a second request
    with the first one's 3-block prompt is credited 2 blocks and prefills the third; one
    token more is credited all 3 and prefills that token alone."""
    mgr = make_manager(tokens_per_block=BS, num_gpu_blocks=10)
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=256))
    chunks = []
    for rid, prompt in (("a", COMMON), ("b", COMMON), ("c", [*COMMON, 7])):
        sched.add_request(Request(rid, prompt, max_output_tokens=1))
        step = sched.step()
        chunks += [(c.request_id, c.first_token, c.num_tokens, c.num_reused_tokens)
                   for c in step.context_chunks]
        sched.update(step, {c.request_id: 9 for c in step.context_chunks})
        mgr.check_invariants()
    assert chunks == [("a", 0, 48, 0), ("b", 32, 16, 32), ("c", 48, 1, 48)]
    assert mgr.num_sequences == 0 and mgr.stats.num_reused_tokens == 80


def test_a_resumed_request_is_counted_apart_from_the_hit_rate() -> None:
    """Mirrors vllm's PrefixCacheStats.record(preempted=...) (tests/v1/core/
    test_prefix_caching.py's stats and test_scheduler.py's preemption): vLLM counts a
    preempted request's second lookup apart (preempted_requests / _queries / _hits), and
    so does kvtier: the scheduler marks the requeued spec resumed, its recompute (prompt
    and output so far, 9 tokens, 4 found cached) joins num_resumed*, not the queries."""
    mgr = make_manager(num_gpu_blocks=5)
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=64,
                                           capacity_policy="max_utilization"))
    sched.add_request(Request("a", list(range(8)), max_output_tokens=6))
    sched.add_request(Request("b", list(range(100, 108)), max_output_tokens=6))
    preempted: list[str] = []
    for i in range(12):
        step = sched.step()
        preempted += step.preempted_request_ids
        ids = [*step.decode_request_ids, *(c.request_id for c in step.context_chunks)]
        sched.update(step, {rid: 50 + i for rid in ids})
        mgr.check_invariants()
        if not sched.has_unfinished():
            break
    assert preempted == ["b"]
    s = mgr.stats
    # num_admitted counts admissions (three); the queries are the two first ones.
    assert (s.num_admitted, s.num_prompt_tokens, s.num_reused_tokens) == (3, 16, 0)
    assert (s.num_resumed, s.num_resumed_prompt_tokens, s.num_resumed_reused_tokens) == (
        1, 9, 4)
    assert s.token_hit_rate == 0.0


@pytest.mark.parametrize("lora_id", [None, 3])
def test_each_block_of_a_lora_request_is_keyed_by_its_adapter(lora_id: int | None) -> None:
    """Mirrors vllm tests/v1/core/test_kv_cache_utils.py::test_generate_block_hash_extra_
    keys_lora (the LoRA name is an extra key of every block, not only the first): equal
    tokens under another adapter, or none, share no block, at any depth, and a stored
    event of every block names the adapter."""
    mgr = make_manager(num_gpu_blocks=16, enable_events=True)
    prompt = list(range(13))
    admit(mgr, "a", prompt, lora_id=lora_id)
    stored = [e for e in mgr.drain_events() if isinstance(e, BlockStored)]
    assert [e.lora_id for e in stored] == [lora_id] * 3
    release(mgr, "a")
    other = 4 if lora_id is not None else 0
    assert hit(mgr, prompt, lora_id=lora_id) == 12
    assert hit(mgr, prompt, lora_id=other) == 0
    fn = get_hash_fn("xxh3_128")
    mine = prompt_block_hashes(fn, prompt, 4, lora_id=lora_id)
    theirs = prompt_block_hashes(fn, prompt, 4, lora_id=other)
    assert [e.block_hash for e in stored] == mine
    assert all(a != b for a, b in zip(mine, theirs, strict=True))


def test_a_block_s_extra_keys_are_its_items_with_their_offsets() -> None:
    """Mirrors vllm tests/v1/core/test_kv_cache_utils.py::test_generate_block_hash_extra_
    keys and _no_mm_inputs: with images at tokens 0..4 ("hash1") and 10..14 ("hash2"),
    blocks of 5 are keyed ``(("hash1", 0),)``, none, ``(("hash2", 0),)``, none; one block
    of 15 holds both, ``(("hash1", 0), ("hash2", 10))``; an image from token 3 to 6 keys
    block 0 at offset 3 and block 1 at -2; without images no block has a key."""
    items = (MultimodalItem(0, 5, "hash1"), MultimodalItem(10, 5, "hash2"))
    assert block_extras(items, 20, 5) == [(("hash1", 0),), None, (("hash2", 0),), None]
    assert block_extras(items, 20, 15) == [(("hash1", 0), ("hash2", 10)), None]
    assert block_extras((MultimodalItem(3, 4, "x"),), 10, 5) == [(("x", 3),), (("x", -2),)]
    assert block_extras((), 6, 5) is None


def test_another_image_in_the_first_block_changes_every_block_s_hash() -> None:
    """Mirrors vllm test_kv_cache_utils.py::test_hash_tokens_different_mm_input and
    test_request_block_hasher (blocks of 3 there, of 4 here: kvtier's are powers of two):
    two 2-block prompts with images ("hash1", "hash2") and ("hash3", "hash2") share no
    block hash (block 1's differs through its parent), and each hash is the chain over the
    blocks' keys ``((first, 0),)``, ``(("hash2", 0),)``."""
    mgr = make_manager(num_gpu_blocks=8, enable_events=True)
    hashes = []
    for rid, first in (("1", "hash1"), ("2", "hash3")):
        items = (MultimodalItem(0, 4, first), MultimodalItem(4, 4, "hash2"))
        admit(mgr, rid, list(range(8)), mm_items=items)
        stored = [e for e in mgr.drain_events() if isinstance(e, BlockStored)]
        assert [e.block_hash for e in stored] == prompt_block_hashes(
            get_hash_fn("xxh3_128"), list(range(8)), 4,
            extras=[((first, 0),), (("hash2", 0),)])
        hashes.append([e.block_hash for e in stored])
    assert hashes[0][0] != hashes[1][0] and hashes[0][1] != hashes[1][1]
    assert hit(mgr, [*range(8), 9], mm_items=(MultimodalItem(0, 4, "hash3"),
                                                MultimodalItem(4, 4, "hash2"))) == 8


def test_two_requests_with_one_new_prompt_in_one_step_compute_it_once() -> None:
    """Mirrors vllm tests/v1/core/test_async_scheduler.py::test_prefix_caching_for_prefill_
    dedup (blocks of 16, five requests with one 100-token prompt: the later ones each
    schedule ``100 % 16`` = 4 tokens). Differs by design in when, not in what: vLLM dedups
    the first two in one step (the second reads blocks the first writes in the same pass);
    kvtier's reuse is only of what earlier steps computed (a request's blocks are stored at
    the end of the step that schedules them), so the second waits one step for the blocks
    the first computes, then reuses 96 tokens and computes 4, as the three later ones do.
    Before that wait, both computed the prompt (6 duplicate blocks)."""
    mgr = make_manager(tokens_per_block=BS, num_gpu_blocks=64)
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=1000))
    prompt = [7] * 100
    for rid in ("0", "1"):
        sched.add_request(Request(rid, prompt, max_output_tokens=3))
    chunks = []
    for i in range(10):
        if 1 <= i <= 3:
            sched.add_request(Request(str(i + 1), prompt, max_output_tokens=3))
        step = sched.step()
        chunks += [(c.request_id, c.first_token, c.num_tokens, c.num_reused_tokens)
                   for c in step.context_chunks]
        ids = [*step.decode_request_ids, *(c.request_id for c in step.context_chunks)]
        sched.update(step, dict.fromkeys(ids, 5))
        mgr.check_invariants()
        if not sched.has_unfinished():
            break
    assert chunks == [("0", 0, 100, 0), ("1", 96, 4, 96),
                      ("2", 96, 4, 96), ("3", 96, 4, 96), ("4", 96, 4, 96)]
    assert (mgr.stats.num_duplicate_stores, mgr.stats.num_reused_tokens) == (0, 4 * 96)
    assert mgr.num_sequences == 0 and len(mgr.cached_blocks()) == 6
