"""SGLang's pin tests (``test/registered/radix_cache/test_pin_blocks.py``: ``pin_blocks`` /
``unpin_blocks`` by block hash, over ``inc_lock_ref`` / ``dec_lock_ref``) and the block-hash
index they keep, mirrored against kvtier.

kvtier pins by holding: a live request references its path, and an unreferenced block is
evictable (``CachedBlock.priority`` is ``None`` while held). Pinning twice is two requests
holding one prefix; unpinning is a request leaving. SGLang's ``block_hash_index`` is
kvtier's ``cached_blocks()`` (each block's chained hash) and ``missing_block_hashes`` (what
the tiers do not hold). Pinning a hash that names no block has no counterpart (a request
holds only what it matched). Each test names the case it mirrors and asserts exact slots,
counts and hashes.
"""

from __future__ import annotations

from kvtier import BlockRemoved, BlockStored, KVCacheManager, SequenceSpec, Tier
from peer_mirror.mirror_helpers import admit, blocks_of, hit, make_manager, release


def held_and_evictable(mgr: KVCacheManager) -> tuple[list[int], list[int]]:
    """(held slots, evictable slots) of the cached blocks: a held block has no priority."""
    rows = [(b.slot, b.priority) for b in mgr.cached_blocks()]
    return [s for s, p in rows if p is None], [s for s, p in rows if p is not None]


def stores_and_removals(mgr: KVCacheManager) -> list[tuple[str, int]]:
    """The drained events, as (kind, block hash) of each store and removal."""
    return [(type(e).__name__, e.block_hash) for e in mgr.drain_events()
            if isinstance(e, (BlockStored, BlockRemoved))]


def test_a_prefix_held_twice_stays_protected_until_both_holders_leave() -> None:
    """Mirrors test_pin_blocks.py::test_double_pin_requires_double_unpin (pinned twice, one
    unpin leaves it pinned and an eviction cannot take it; the second unpin makes it
    evictable and the next eviction takes it): two requests hold the 2-block prefix; after
    one leaves it is still held and a request needing the whole pool is refused; after the
    second leaves the prefix is evictable, and that request takes its slots."""
    mgr = make_manager(num_gpu_blocks=4)
    admit(mgr, "x", [*blocks_of(1, 2), 0])
    admit(mgr, "y", [*blocks_of(1, 2), 5])
    assert held_and_evictable(mgr) == ([0, 1], [])
    release(mgr, "x")
    assert held_and_evictable(mgr) == ([0, 1], [])
    assert not mgr.add_sequence(SequenceSpec("big", [*blocks_of(7, 8), 1])).admitted
    assert hit(mgr, [*blocks_of(1, 2), 0]) == 8
    release(mgr, "y")
    assert held_and_evictable(mgr) == ([], [0, 1])
    big = admit(mgr, "big", [*blocks_of(7, 8, 9), 1])
    assert sorted(big.block_ids) == [0, 1, 2, 3]
    assert hit(mgr, [*blocks_of(1, 2), 0]) == 0


def test_a_held_prefix_survives_an_eviction_of_everything_else() -> None:
    """Mirrors test_pin_blocks.py::test_pin_survives_eviction_unpin_does_not (A pinned, B
    not; evicting everything removes B and keeps A, which still matches; after A is unpinned
    the next full eviction takes it too): A = [1..] held, B = [5..] cached; a request taking
    every other block evicts B only; once A's holder leaves, another takes A's block."""
    mgr = make_manager(num_gpu_blocks=4, enable_events=True)
    admit(mgr, "a", [*blocks_of(1), 0])  # A: 1 full block + its partial one
    admit(mgr, "b", [*blocks_of(5), 0])
    release(mgr, "b")
    mgr.drain_events()
    (a_hash,) = [b.block_hash for b in mgr.cached_blocks() if b.tokens == (1, 1, 1, 1)]
    (b_hash,) = [b.block_hash for b in mgr.cached_blocks() if b.tokens == (5, 5, 5, 5)]
    admit(mgr, "all", [7, 7])  # the last free block
    admit(mgr, "more", [8, 8])  # needs B's block: B is evicted, A is held
    assert stores_and_removals(mgr) == [("BlockRemoved", b_hash)]
    assert (hit(mgr, [*blocks_of(1), 0]), hit(mgr, [*blocks_of(5), 0])) == (4, 0)
    release(mgr, "a")
    admit(mgr, "last", [9, 9, 9, 9, 9, 9])  # 2 blocks: A's freed partial one and A
    (last_block,) = mgr.cached_blocks()  # last's own full block, stored as A leaves
    assert last_block.tokens == (9, 9, 9, 9)
    assert stores_and_removals(mgr) == [("BlockRemoved", a_hash),
                                        ("BlockStored", last_block.block_hash)]
    assert hit(mgr, [*blocks_of(1), 0]) == 0


def test_an_evicted_block_leaves_the_index_and_is_missing_again() -> None:
    """Mirrors test_pin_blocks.py::test_index_cleared_on_evict and
    test_block_hash_index_multiple_pages (every stored page hash is in the index; an
    evicted node's hashes leave it): the 3 blocks a prompt stores are the index's 3 hashes,
    none missing; once evicted, none is cached and ``missing_block_hashes`` names all 3
    again, in order."""
    mgr = make_manager(num_gpu_blocks=4, enable_events=True)
    prompt = [*blocks_of(1, 2, 3), 0]
    admit(mgr, "a", prompt)
    stored = [e.block_hash for e in mgr.drain_events() if isinstance(e, BlockStored)]
    assert len(stored) == 3
    assert [b.block_hash for b in mgr.cached_blocks()] == stored
    assert mgr.missing_block_hashes(prompt) == []
    release(mgr, "a")
    admit(mgr, "other", [*blocks_of(7, 8, 9), 0])
    assert [e.block_hash for e in mgr.drain_events()
            if isinstance(e, BlockRemoved)] == stored
    assert stored[0] not in {b.block_hash for b in mgr.cached_blocks()}
    assert mgr.missing_block_hashes(prompt) == stored


def test_a_reset_clears_the_index_of_both_tiers() -> None:
    """Mirrors test_pin_blocks.py::test_index_cleared_on_reset (reset empties the hash
    index and the pins) and test_radix_cache_unit.py's test_reset, with a host tier:
    blocks on the GPU and on the host are all dropped (each reported with its tier, then
    AllBlocksCleared), both pools are wholly free and the prompt is missing again."""
    mgr = make_manager(num_gpu_blocks=4, num_host_blocks=4, enable_events=True)
    first = [*blocks_of(1, 2, 3), 0]
    admit(mgr, "a", first)
    release(mgr, "a")
    admit(mgr, "b", [*blocks_of(4, 5, 6), 0])
    release(mgr, "b")
    mgr.take_plan()
    tiers = sorted(b.tier.name for b in mgr.cached_blocks())
    assert tiers == ["GPU"] * 3 + ["HOST"] * 3
    mgr.drain_events()
    assert mgr.reset_cache()
    events = mgr.drain_events()
    assert sorted(e.tier.name for e in events if isinstance(e, BlockRemoved)) == tiers
    assert type(events[-1]).__name__ == "AllBlocksCleared" and len(events) == 7
    assert mgr.cached_blocks() == []
    assert (mgr.num_free_gpu_blocks, mgr.num_free_host_blocks) == (4, 4)
    assert len(mgr.missing_block_hashes(first)) == 3
    mgr.check_invariants()
    assert Tier.HOST not in {b.tier for b in mgr.cached_blocks()}
