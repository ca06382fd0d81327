"""Behaviour of KVCacheManager on small hand-built cases: bad input, growth, release,
priorities, partial reuse, isolation, events and hashing."""

from __future__ import annotations

import random
from array import array
from collections.abc import Callable
from typing import Any

import pytest

from fake_clock import FakeClock
from kvtier import (
    BlockRemoved,
    BlockStored,
    BlockTierChanged,
    CacheConfig,
    KVCacheManager,
    MultimodalItem,
    PrefixMatch,
    SequenceSpec,
    Tier,
)
from kvtier.hashing import chain_hashes, encode_key, get_hash_fn, root_hash


def make_manager(*, clock: Callable[[], float] | None = None, **kw: Any) -> KVCacheManager:
    """A manager with 4-token blocks and 8 GPU blocks unless told otherwise."""
    # Any: the options are CacheConfig's own fields, which it checks itself.
    cfg: dict[str, Any] = {"tokens_per_block": 4, "num_gpu_blocks": 8, **kw}
    if clock is not None:
        return KVCacheManager(CacheConfig(**cfg), clock=clock)
    return KVCacheManager(CacheConfig(**cfg))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("tokens_per_block", 3, "tokens_per_block must be a power of two"),
        ("tokens_per_block", 0, "tokens_per_block must be a power of two"),
        ("num_gpu_blocks", 0, "num_gpu_blocks must be an integer in 1..4294967296, got 0"),
        ("num_host_blocks", -1, "num_host_blocks must be an integer in 0..4294967296, got -1"),
        ("hash_algo", "md5", "hash_algo must be one of"),
        ("offload_min_priority", 101, "offload_min_priority must be an integer in 0..100"),
        ("eviction_policy", "fifo", "eviction_policy must be one of"),
        ("enable_partial_reuse", 1, "enable_partial_reuse must be a bool"),
    ],
)
def test_invalid_config_names_field_and_value(field: str, value: object, message: str) -> None:
    """Each invalid config field raises ValueError naming the field."""
    with pytest.raises(ValueError, match=message):
        CacheConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"request_id": "", "tokens": [1]}, "request_id must be a non-empty str"),
        ({"request_id": "r", "tokens": []}, "tokens of 'r' must not be empty"),
        ({"request_id": "r", "tokens": [1, 2.5]},
         "token at index 1 must be an int in 0..2\\*\\*63-1, got 2.5 \\(float\\)"),
        ({"request_id": "r", "tokens": [1, "x", 3]}, "token at index 1 must be an int"),
        ({"request_id": "r", "tokens": "abc"}, "tokens of 'r' must be a sequence of ints"),
        ({"request_id": "r", "tokens": [1], "priority": 101}, "priority must be an integer"),
        ({"request_id": "r", "tokens": [1], "retention_s": -1},
         "retention_s must be a finite number"),
        ({"request_id": "r", "tokens": [1], "num_new_tokens": 0}, "num_new_tokens must be"),
        ({"request_id": "r", "tokens": [1, 2], "mm_items": (MultimodalItem(1, 5, b"i"),)},
         "runs past the 2 tokens"),
    ],
)
def test_invalid_spec_names_the_problem(kwargs: dict[str, object], message: str) -> None:
    """A malformed SequenceSpec raises ValueError naming field and value."""
    with pytest.raises(ValueError, match=message):
        SequenceSpec(**kwargs)  # type: ignore[arg-type]


def test_duplicate_and_unknown_ids_raise_without_state_change() -> None:
    """Live or repeated request ids and unknown ids raise; nothing changes."""
    mgr = make_manager()
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 5]))
    free = mgr.num_free_gpu_blocks
    with pytest.raises(ValueError, match=r"'a' .* is already live"):
        mgr.add_sequence_batch([SequenceSpec("b", [1]), SequenceSpec("a", [2])])
    with pytest.raises(ValueError, match="'b' appears twice in the batch"):
        mgr.add_sequence_batch([SequenceSpec("b", [1]), SequenceSpec("b", [2])])
    with pytest.raises(KeyError, match="unknown request_id 'zz'"):
        mgr.remove_sequence("zz")
    with pytest.raises(KeyError, match="unknown request_id 'zz'"):
        mgr.append_tokens("zz", [1])
    with pytest.raises(ValueError, match="token at index 0 must be an int"):
        mgr.append_tokens("a", [None])  # type: ignore[list-item]
    assert mgr.num_free_gpu_blocks == free and mgr.num_sequences == 1
    mgr.check_invariants()


def test_batch_larger_than_pool_raises_with_numbers() -> None:
    """A request or a batch that can't fit an empty pool raises, claiming nothing."""
    mgr = make_manager()
    with pytest.raises(ValueError, match=r"needs 9 blocks .* num_gpu_blocks is 8"):
        mgr.add_sequence(SequenceSpec("big", list(range(33))))
    with pytest.raises(ValueError, match="batch of 2 requests needs 10 GPU blocks"):
        mgr.add_sequence_batch([SequenceSpec("x", list(range(20))),
                                SequenceSpec("y", list(range(100, 120)))])
    assert mgr.num_sequences == 0 and mgr.num_free_gpu_blocks == 8
    mgr.check_invariants()


def test_shortage_rejects_and_rolls_back_claims() -> None:
    """A request that doesn't fit now is rejected; its claims are rolled back."""
    mgr = make_manager()
    mgr.add_sequence(SequenceSpec("hold", list(range(100, 120))))  # 5 blocks held
    mgr.add_sequence(SequenceSpec("p", [1, 2, 3, 4, 9]))
    mgr.remove_sequence("p")  # [1 2 3 4] cached, 3 blocks available
    ok, no = mgr.add_sequence_batch([SequenceSpec("ok", [1, 2, 3, 4, 5]),
                                     SequenceSpec("no", [1, 2, 3, 4] + list(range(40, 52)))])
    assert ok.admitted and (ok.num_reused_tokens, ok.block_ids) == (4, (5, 6))
    assert not no.admitted and no.block_ids == () and "not enough" in (no.reason or "")
    assert mgr.stats.num_rejected == 1
    mgr.check_invariants()


def test_append_grows_stores_full_blocks_and_reports_shortage() -> None:
    """Decode growth allocates as blocks fill, stores them, and returns None on shortage."""
    mgr = make_manager(num_gpu_blocks=3)
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 5]))
    assert mgr.append_tokens("a", [6, 7, 8]) == []
    assert mgr.lookup([1, 2, 3, 4, 5, 6, 7, 8, 0]).num_tokens == 8  # early reuse
    assert mgr.append_tokens("a", [9, 10, 11, 12]) == [2]
    assert mgr.append_tokens("a", [13]) is None  # needs a 4th block
    assert mgr.lookup(list(range(1, 13)) + [0]).num_tokens == 12
    assert mgr.block_table("a") == [0, 1, 2]
    mgr.check_invariants()


def test_release_tail_first_keeps_prefix_longest() -> None:
    """Released blocks are evicted tail first: the prefix outlives its extensions."""
    mgr = make_manager(num_gpu_blocks=4)
    mgr.add_sequence(SequenceSpec("a", list(range(13))))
    mgr.remove_sequence("a")  # blocks 0..2 cached, 3 free
    mgr.add_sequence(SequenceSpec("b", [50] * 8))  # needs 2 blocks: the free one, the tail
    assert mgr.lookup(list(range(13))).num_tokens == 8
    mgr.check_invariants()


def test_priority_then_lru_and_retention_expiry() -> None:
    """Low priority goes first; a retention that expires falls back to the default."""
    clock = FakeClock()
    mgr = make_manager(num_gpu_blocks=3, clock=clock)
    mgr.add_sequence(SequenceSpec("hi", [1, 1, 1, 1], priority=90, retention_s=10))
    mgr.remove_sequence("hi")
    mgr.add_sequence(SequenceSpec("lo", [2, 2, 2, 2], priority=10))
    mgr.remove_sequence("lo")
    mgr.add_sequence(SequenceSpec("mid", [3, 3, 3, 3]))
    mgr.remove_sequence("mid")  # cached: hi(90, until t=10), lo(10), mid(35); 0 free
    mgr.add_sequence(SequenceSpec("x", [7, 7, 7]))
    mgr.remove_sequence("x", store_for_reuse=False)  # 1 free
    assert mgr.lookup([2, 2, 2, 2, 0]).num_tokens == 0  # priority 10 went first
    assert mgr.lookup([1, 1, 1, 1, 0]).num_tokens == 4
    clock.now = 11.0  # hi's retention is over: 35, and older than mid
    mgr.add_sequence(SequenceSpec("y", [8] * 5))  # the free block and one eviction
    assert mgr.lookup([1, 1, 1, 1, 0]).num_tokens == 0
    assert mgr.lookup([3, 3, 3, 3, 0]).num_tokens == 4
    mgr.check_invariants()


def test_partial_reuse_in_place_takes_the_leaf_block() -> None:
    """An unreferenced leaf block is reused in place: no copy, it leaves the tree."""
    mgr = make_manager(enable_partial_reuse=True)
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 5, 6, 7, 8, 0]))
    mgr.remove_sequence("a")  # [1 2 3 4](0) -> [5 6 7 8](1)
    assert mgr.lookup([1, 2, 3, 4, 5, 6, 9, 9]).num_tokens == 6
    b = mgr.add_sequence(SequenceSpec("b", [1, 2, 3, 4, 5, 6, 9, 9]))
    assert (b.num_reused_tokens, b.block_ids) == (6, (0, 1))
    assert mgr.stats.num_partial_in_place == 1 and mgr.stats.num_partial_copies == 0
    assert mgr.lookup([1, 2, 3, 4, 5, 6, 7, 8, 0]).num_tokens == 6  # old block is gone
    mgr.check_invariants()


def test_partial_reuse_without_copy_skips_shared_source() -> None:
    """With copy off, a referenced source gives no partial reuse, and lookup agrees."""
    mgr = make_manager(enable_partial_reuse=True, copy_on_partial_reuse=False)
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 5, 6, 7, 8, 0]))
    m = mgr.lookup([1, 2, 3, 4, 5, 6, 9, 9])
    assert (m.num_tokens, m.num_partial_tokens) == (4, 0)
    b = mgr.add_sequence(SequenceSpec("b", [1, 2, 3, 4, 5, 6, 9, 9]))
    assert b.num_reused_tokens == 4
    mgr.check_invariants()


def test_only_len_minus_one_tokens_are_reusable() -> None:
    """The last prompt token is always computed, even when all are cached."""
    mgr = make_manager(enable_partial_reuse=False)
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 5, 6, 7, 8]))
    mgr.remove_sequence("a")
    assert mgr.lookup([1, 2, 3, 4, 5, 6, 7, 8]).num_tokens == 4
    assert mgr.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9]).num_tokens == 8


def test_salt_lora_and_multimodal_isolate_blocks() -> None:
    """Equal tokens under another salt, LoRA id or image never share a block."""
    mgr = make_manager(num_gpu_blocks=16)
    toks = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    img = (MultimodalItem(4, 2, b"cat"),)
    mgr.add_sequence(SequenceSpec("a", toks, salt="tenant-a", lora_id=3, mm_items=img))
    mgr.remove_sequence("a")
    assert mgr.lookup(toks, salt="tenant-a", lora_id=3, mm_items=img).num_tokens == 8
    assert mgr.lookup(toks, salt="tenant-b", lora_id=3, mm_items=img).num_tokens == 0
    assert mgr.lookup(toks, salt="tenant-a", lora_id=4, mm_items=img).num_tokens == 0
    assert mgr.lookup(toks, salt="tenant-a", lora_id=3).num_tokens == 4  # image in block 1
    other = (MultimodalItem(4, 2, b"dog"),)
    assert mgr.lookup(toks, salt="tenant-a", lora_id=3, mm_items=other).num_tokens == 4


def test_multimodal_items_in_any_order_give_the_same_blocks() -> None:
    """Items are keyed by position, whatever order the caller lists them in, even two at
    one place with hashes of different types; a different image still misses."""
    mgr = make_manager(num_gpu_blocks=16)
    toks = [7] * 12 + [1]
    items = (MultimodalItem(0, 3, b"a"), MultimodalItem(2, 4, "b"), MultimodalItem(2, 4, 9),
             MultimodalItem(8, 2, 5))
    mgr.add_sequence(SequenceSpec("a", toks, mm_items=items))
    mgr.remove_sequence("a")
    for order in (items[::-1], (items[2], items[0], items[3], items[1])):
        assert mgr.lookup(toks, mm_items=order).num_tokens == 12
    changed = (*items[:3], MultimodalItem(8, 2, 6))
    assert mgr.lookup(toks, mm_items=changed).num_tokens == 8
    mgr.check_invariants()


def test_common_prefix_blocks_are_the_ids_every_live_table_starts_with() -> None:
    """Exact ids: two requests sharing 2 cached blocks share them; a third with only the
    first block in common cuts it to 1; none live, 0. Against a block-by-block reference
    after random admissions and releases."""
    mgr = make_manager(num_gpu_blocks=16)
    assert mgr.num_common_prefix_blocks() == 0
    mgr.add_sequence(SequenceSpec("a", list(range(1, 14))))   # blocks 0-3
    assert mgr.num_common_prefix_blocks() == 4
    mgr.add_sequence(SequenceSpec("b", [*range(1, 9), 20, 21]))  # 0, 1, then 4
    assert (mgr.block_table("b"), mgr.num_common_prefix_blocks()) == ([0, 1, 4], 2)
    mgr.add_sequence(SequenceSpec("c", [1, 2, 3, 4, 9, 9]))  # 0, then 5
    assert (mgr.block_table("c"), mgr.num_common_prefix_blocks()) == ([0, 5], 1)
    for rid in "abc":
        mgr.remove_sequence(rid)
    assert mgr.num_common_prefix_blocks() == 0
    rng = random.Random(5)
    live: list[str] = []
    for step in range(300):
        if live and (len(live) > 3 or rng.random() < 0.4):
            mgr.remove_sequence(live.pop(rng.randrange(len(live))))
        else:
            prompt = [rng.randrange(2) for _ in range(rng.randrange(1, 17))]
            if mgr.add_sequence(SequenceSpec(f"r{step}", prompt)).admitted:
                live.append(f"r{step}")
        tables = [mgr.block_table(rid) for rid in live]
        expected = 0
        while tables and all(len(t) > expected and t[expected] == tables[0][expected]
                             for t in tables):
            expected += 1
        assert mgr.num_common_prefix_blocks() == expected, step


def test_events_follow_store_offload_onboard_and_removal() -> None:
    """Events carry chained hashes and tiers in order, with gapless sequence numbers."""
    mgr = make_manager(num_gpu_blocks=2, num_host_blocks=1, enable_events=True)
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 0]))
    mgr.remove_sequence("a")
    mgr.add_sequence(SequenceSpec("b", [5, 5, 5, 5, 5, 5]))  # pushes [1 2 3 4] to host
    mgr.remove_sequence("b")
    mgr.add_sequence(SequenceSpec("c", [1, 2, 3, 4, 7]))  # onboards it
    events = mgr.drain_events()
    assert [e.seq for e in events] == list(range(len(events)))
    h = get_hash_fn("xxh3_128")
    h_a = chain_hashes(h, root_hash(h, None, None), [1, 2, 3, 4], 4, None)[0]
    h_b = chain_hashes(h, root_hash(h, None, None), [5, 5, 5, 5], 4, None)[0]
    kinds = [(type(e).__name__, getattr(e, "block_hash", None)) for e in events]
    # c onboards a into the free slot, then evicts b into the host slot a left.
    assert kinds == [("BlockStored", h_a), ("BlockTierChanged", h_a), ("BlockStored", h_b),
                     ("BlockTierChanged", h_a), ("BlockTierChanged", h_b)]
    assert isinstance(events[0], BlockStored) and events[0].parent_hash is None
    assert isinstance(events[1], BlockTierChanged) and events[1].new_tier is Tier.HOST
    assert isinstance(events[3], BlockTierChanged) and events[3].new_tier is Tier.GPU
    mgr.remove_sequence("c")
    mgr.add_sequence(SequenceSpec("d", [6] * 8))  # a, used later than b, displaces b on host
    removed = [e for e in mgr.drain_events() if isinstance(e, BlockRemoved)]
    assert [(e.block_hash, e.tier) for e in removed] == [(h_b, Tier.HOST)]
    assert mgr.drain_events() == []


def test_stored_events_carry_each_blocks_tokens_and_extra_key() -> None:
    """A ``BlockStored`` names the block's own tokens, extra-key and salt bytes: with them and
    the LoRA id a consumer recomputes every hash of the chain as hashing.py documents it
    (the seed ``H(namespace || lora || salt)``, then ``H(parent || lora || tokens ||
    extra)``), for stored prompts and decode growth."""
    mgr = make_manager(num_gpu_blocks=16, enable_events=True)
    toks = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    img = (MultimodalItem(4, 2, b"cat"),)  # tokens 4-5: block 1
    mgr.add_sequence(SequenceSpec("a", toks, salt="s", lora_id=3, mm_items=img))
    mgr.append_tokens("a", [10, 11, 12, 13])  # 13 tokens: blocks 2 and 3 complete
    stored = [e for e in mgr.drain_events() if isinstance(e, BlockStored)]
    assert [e.token_ids for e in stored] == [(1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12)]
    assert [e.extra_key for e in stored] == [None, encode_key(((b"cat", 0),)), None]
    assert {e.salt_key for e in stored} == {encode_key("s")}
    h = get_hash_fn("xxh3_128")
    assert stored[0].salt_key is not None
    prev = h(b"kvtier/v2" + encode_key(3) + stored[0].salt_key)
    assert prev == root_hash(h, 3, "s")
    for e in stored:
        assert e.parent_hash == (None if e is stored[0] else prev)
        assert e.token_ids is not None and (e.num_tokens, e.lora_id) == (4, 3)
        data = array("Q", e.token_ids).tobytes()  # as hashing.py packs them
        prev = h(prev.to_bytes(16, "big") + encode_key(3) + data + (e.extra_key or b"n"))
        assert e.block_hash == prev
    mgr.check_invariants()


def test_sha256_hashes_are_reproducible() -> None:
    """sha256 chained hashes are fixed values, equal across processes and machines."""
    h = get_hash_fn("sha256")
    hashes = chain_hashes(h, root_hash(h, None, "s"), [1, 2, 3, 4, 5, 6, 7, 8], 4, None)
    assert len(hashes) == 2 and hashes[0] != hashes[1]
    assert hashes == chain_hashes(h, root_hash(h, None, "s"), [1, 2, 3, 4, 5, 6, 7, 8], 4, None)
    assert root_hash(h, None, "s") != root_hash(h, None, "t")
    assert hex(hashes[0]) == hex(hashes[0] & ((1 << 128) - 1))


def test_reset_cache_drops_everything_when_idle() -> None:
    """reset_cache refuses while requests are live, then clears every tier."""
    mgr = make_manager(enable_events=True)
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 5]))
    assert not mgr.reset_cache()
    mgr.remove_sequence("a")
    assert mgr.reset_cache()
    assert mgr.lookup([1, 2, 3, 4, 5]).num_tokens == 0 and mgr.num_free_gpu_blocks == 8
    assert type(mgr.drain_events()[-1]).__name__ == "AllBlocksCleared"
    mgr.check_invariants()


def test_chunked_prefill_stores_only_scheduled_blocks() -> None:
    """Blocks become reusable only once a prefill chunk schedules them."""
    mgr = make_manager()
    toks = list(range(1, 14))
    mgr.add_sequence(SequenceSpec("a", toks, num_new_tokens=5))
    assert mgr.lookup(toks + [0]).num_tokens == 4
    mgr.schedule_prefill("a", 6)
    assert mgr.lookup(toks + [0]).num_tokens == 8
    with pytest.raises(ValueError, match="'a' has 2 unscheduled prompt tokens, asked 3"):
        mgr.schedule_prefill("a", 3)
    with pytest.raises(ValueError, match="unscheduled prompt tokens; append only after"):
        mgr.append_tokens("a", [1])
    mgr.schedule_prefill("a", 2)
    assert mgr.lookup(toks + [0]).num_tokens == 12
    mgr.check_invariants()


def test_chunked_prefill_allocates_chunk_by_chunk_from_its_reservation() -> None:
    """A chunked admission allocates the blocks of its first chunk and reserves the rest of
    its prompt; each later chunk takes its blocks from the reservation, so the eviction a
    long prompt needs is spread over the steps that compute it."""
    mgr = make_manager(num_gpu_blocks=7, num_host_blocks=8, enable_partial_reuse=False)
    mgr.add_sequence(SequenceSpec("old", list(range(100, 125))))  # 7 blocks: slots 0..6
    mgr.remove_sequence("old")  # its 6 full blocks cached on the GPU, slot 6 free
    mgr.take_plan()

    def moves() -> list[tuple[str, int, int]]:
        return [(op.kind.value, op.src_slot, op.dst_slot) for op in mgr.take_plan().ops]

    # 'a': 13 tokens = 4 blocks; its first chunk, 5 tokens, needs 2 now:
    #   GPU  [0 1 2 3 4 | 5 -> host 0] + free 6      table [5 6], 2 blocks reserved
    a = mgr.add_sequence(SequenceSpec("a", list(range(1, 14)), num_new_tokens=5))
    assert a.block_ids == (5, 6) and mgr.num_reserved_blocks == 2
    assert moves() == [("offload", 5, 0)]
    assert mgr.num_free_gpu_blocks == 7 - 2 - 2
    mgr.check_invariants()
    # Each later chunk evicts only for itself:  tokens ..11 -> block 2, tokens ..13 -> block 3
    mgr.schedule_prefill("a", 6)
    assert mgr.block_table("a") == [5, 6, 4] and mgr.num_reserved_blocks == 1
    assert moves() == [("offload", 4, 1)]
    mgr.schedule_prefill("a", 2)
    assert mgr.block_table("a") == [5, 6, 4, 3] and mgr.num_reserved_blocks == 0
    assert moves() == [("offload", 3, 2)]
    assert mgr.num_free_gpu_blocks == 7 - 4
    mgr.check_invariants()


def test_import_blocks_become_host_hits_and_are_onboarded() -> None:
    """Blocks imported from elsewhere (a remote store) are host hits, onboarded on admission."""
    mgr = make_manager(num_gpu_blocks=8, num_host_blocks=4, enable_partial_reuse=False)
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 9]))
    mgr.remove_sequence("a")  # [1 2 3 4] cached on the GPU
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 0]
    h = get_hash_fn("xxh3_128")
    chain = chain_hashes(h, root_hash(h, None, None), prompt[:12], 4, None)
    assert mgr.missing_block_hashes(prompt) == chain[1:]  # block 0 is cached
    assert mgr.import_blocks(prompt, 5) == [0, 1]  # 2 more full blocks fit the prompt
    assert mgr.missing_block_hashes(prompt) == []
    assert mgr.lookup(prompt) == PrefixMatch(12, 4, 8, 0)
    assert mgr.stats.num_imported_blocks == 2
    mgr.take_plan()
    b = mgr.add_sequence(SequenceSpec("b", prompt))
    assert (b.num_reused_tokens, b.num_onboarded_tokens) == (12, 8)
    onboards = [(op.src_slot, op.dst_slot) for op in mgr.take_plan().ops]
    assert onboards == [(0, b.block_ids[1]), (1, b.block_ids[2])]
    assert mgr.import_blocks(prompt, 5) == []  # nothing past what is cached
    mgr.check_invariants()


def test_import_blocks_without_host_room_imports_nothing() -> None:
    """Without a host tier nothing is imported; with too little room, the first blocks."""
    mgr = make_manager(num_gpu_blocks=8, num_host_blocks=0)
    assert mgr.import_blocks([1, 2, 3, 4, 5], 1) == []
    mgr = make_manager(num_gpu_blocks=8, num_host_blocks=1)
    assert mgr.import_blocks([5, 5, 5, 5, 0], 1) == [0]
    mgr.add_sequence(SequenceSpec("x", [5, 5, 5, 5, 0]))  # claims and onboards it
    # Until the onboard's plan is taken, slot 0 is not handed out (the onboard would read
    # the imported KV): none imported.
    assert mgr.import_blocks([6, 6, 6, 6, 6, 6, 6, 6, 0], 2) == []
    mgr.take_plan()
    assert mgr.import_blocks([6, 6, 6, 6, 6, 6, 6, 6, 0], 2) == [0]  # 1 slot: block 0 only
    assert mgr.lookup([6, 6, 6, 6, 6, 6, 6, 6, 0]).num_host_tokens == 4
    with pytest.raises(ValueError, match=r"num_blocks must be an integer in 0\.\.4294967296"):
        mgr.import_blocks([1], -1)
    mgr.check_invariants()


def test_a_prompt_matched_on_an_unchanged_tree_is_not_matched_again() -> None:
    """The lookup, admission and hint of one step match a spec's prompt once: the match is
    kept while its key space's tree keeps its shape (``Root.num_changes``); a claim that
    splits a run under it makes the next call match again::

        a stored:  root ─ A [1-4|5-8|9-12]             b matches A whole (3 blocks)
        c claims:  root ─ H [1-4|5-8] ─ A [9-12]       A is split: b matches H, A
    """
    mgr = make_manager(num_gpu_blocks=16)
    mgr.add_sequence(SequenceSpec("a", list(range(1, 13))))
    mgr.remove_sequence("a")
    cache = mgr._cache
    root = cache.root(None, None)
    b = SequenceSpec("b", [*range(1, 13), 99])
    first = cache.match_spec(root, b, None)
    assert [n.num_blocks for n in first.path] == [3]
    assert cache.match_spec(root, b, None) is first and mgr.lookup_spec(b).num_tokens == 12
    mgr.add_sequence(SequenceSpec("c", [*range(1, 9), 50, 51, 52, 53, 54]))  # splits A
    again = cache.match_spec(root, b, None)
    assert again is not first and [n.num_blocks for n in again.path] == [2, 1]
    assert mgr.lookup_spec(b).num_tokens == 12
    mgr.check_invariants()


def test_hint_waiting_names_the_first_item_that_is_no_spec() -> None:
    """The queue is checked whole first; one holding something else is refused naming the
    item's index."""
    mgr = make_manager(eviction_policy="kvtier-predict-cost")
    spec = SequenceSpec("a", [1, 2, 3, 4, 5])
    with pytest.raises(TypeError, match=r"specs\[1\] must be a SequenceSpec, got \[1, 2\]"):
        mgr.hint_waiting([spec, [1, 2], spec])  # type: ignore[list-item]
    mgr.hint_waiting((spec,))  # any sequence of specs
    mgr.check_invariants()


def test_a_prompt_matched_long_before_is_rematched_not_walked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A waiting prompt matched as it entered the hinted window is looked up again as it
    reaches the head, after a match of every request ahead of it: its match is kept that
    long (two hinted windows of other prompts), so the lookup after the tree changed checks
    the runs it went through and walks none of its ids again; kept matches of prompts gone
    are dropped first, and the memo stays bounded."""
    import kvtier.cache_state as cache_module
    from kvtier.matching import match_prompt as walk

    walks: list[int] = []

    def counted(root: Any, tokens: Any, extras: Any, config: Any) -> Any:
        walks.append(len(tokens))
        return walk(root, tokens, extras, config)

    monkeypatch.setattr(cache_module, "match_prompt", counted)
    mgr = make_manager(num_gpu_blocks=64)
    mgr.add_sequence(SequenceSpec("a", list(range(1, 13))))
    mgr.remove_sequence("a")
    cache = mgr._cache
    root = cache.root(None, None)
    first = SequenceSpec("first", [*range(1, 13), 99])
    assert [n.num_blocks for n in cache.match_spec(root, first, None).path] == [3]
    others = [SequenceSpec(f"o{i}", [1, 2, 3, 4, 100 + i]) for i in range(128)]
    for spec in others:
        cache.match_spec(root, spec, None)
    assert len(walks) == 1 + 128
    mgr.add_sequence(SequenceSpec("b", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 7, 7, 7, 7]))
    assert len(walks) == 1 + 128 + 1  # b's own
    m = cache.match_spec(root, first, None)  # the tree changed: a rematch, no walk
    assert len(walks) == 1 + 128 + 1
    assert (m.num_blocks, m.tail) == (3, None) and [n.num_blocks for n in m.path] == [3]
    # Filled: the matches of prompts gone go first, then the oldest, down to half.
    del others
    many = [SequenceSpec(f"m{i}", [1, 2, 3, 4, 200 + i]) for i in range(cache_module._MAX_MATCHES)]
    for spec in many:
        cache.match_spec(root, spec, None)
    kept = cache._matches
    assert len(kept) <= cache_module._MAX_MATCHES
    assert all(v[0]() is not None for v in kept.values())
    assert id(many[-1].token_array) in kept
    mgr.check_invariants()


def test_kept_matches_stay_exact_as_the_tree_changes() -> None:
    """Over random admissions, releases and evictions (a small GPU tier, a host tier), the
    match ``match_spec`` gives for each of many waiting prompts, kept across the changes,
    is what a walk of the tree now finds (path, tail, blocks and partial match)."""
    from kvtier.matching import match_prompt

    rng = random.Random(11)
    mgr = make_manager(num_gpu_blocks=24, num_host_blocks=16)
    cache = mgr._cache
    waiting = [SequenceSpec(f"w{i}", [rng.randrange(4) for _ in range(rng.randrange(1, 30))])
               for i in range(80)]
    for step in range(300):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        if mgr.add_sequence(SequenceSpec(f"r{step}", tokens)).admitted:
            mgr.remove_sequence(f"r{step}")
        root = cache.root(None, None)
        for spec in rng.sample(waiting, 10):
            got = cache.match_spec(root, spec, None)
            if root is None:
                continue
            want = match_prompt(root, spec.token_array, None, cache.config)
            assert (got.path, got.tail, got.num_blocks, got.partial) == (
                want.path, want.tail, want.num_blocks, want.partial), (step, spec.request_id)
    mgr.check_invariants()
