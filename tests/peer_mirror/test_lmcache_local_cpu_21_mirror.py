"""LMCache's local CPU backend tests (``tests/v1/storage_backend/test_local_cpu_backend.py``:
``contains``, ``submit_put_task``, ``remove`` and the admit / evict messages it sends),
mirrored against kvtier's host tier as a remote tier fills it.

A put of chunks fetched from elsewhere is ``import_blocks`` (host blocks whose KV the caller
writes), ``contains`` is ``missing_block_hashes`` / ``lookup``, ``remove`` is
``drop_key_space`` and the controller's KVAdmitMsg / KVEvictMsg are the ``BlockStored`` /
``BlockRemoved`` events of the host tier. LMCache's memory objects, ref counts, formats and
allocators have no counterpart (the caller owns the host memory). Each test names the case
it mirrors and asserts kvtier's exact slots, hashes and events.
"""

from __future__ import annotations

from kvtier import BlockRemoved, BlockStored, Tier
from kvtier.hashing import get_hash_fn, prompt_block_hashes
from peer_mirror.mirror_helpers import blocks_of, make_manager

PROMPT = [*blocks_of(1, 2, 3), 0]  # 3 full blocks and the token whose logits are computed
HASHES = prompt_block_hashes(get_hash_fn("xxh3_128"), PROMPT, 4)


def test_a_block_is_contained_once_it_is_put() -> None:
    """Mirrors test_contains_key_not_exists / test_contains_key_exists (a key never put is
    not contained; once put it is): before the import every block is missing and none is a
    hit; after it, none is missing and all 12 tokens are host hits."""
    mgr = make_manager(num_gpu_blocks=4, num_host_blocks=4)
    assert mgr.missing_block_hashes(PROMPT) == HASHES
    assert mgr.lookup(PROMPT).num_tokens == 0
    assert mgr.import_blocks(PROMPT, 3) == [0, 1, 2]
    assert mgr.missing_block_hashes(PROMPT) == []
    m = mgr.lookup(PROMPT)
    assert (m.num_tokens, m.num_gpu_tokens, m.num_host_tokens) == (12, 0, 12)
    mgr.check_invariants()


def test_a_block_put_again_keeps_the_first_copy() -> None:
    """Mirrors test_submit_put_task_reinsert (a second put of a key keeps the object put
    first): importing the first 2 blocks fills host slots 0 and 1; importing all 3 then
    fills only slot 2, for the third; a third import finds nothing to put. 3 blocks are
    imported in all, and the first two kept their slots."""
    mgr = make_manager(num_gpu_blocks=4, num_host_blocks=4)
    assert mgr.import_blocks(PROMPT, 2) == [0, 1]
    assert mgr.import_blocks(PROMPT, 3) == [2]
    assert mgr.import_blocks(PROMPT, 3) == []
    assert sorted((b.slot, b.block_hash) for b in mgr.cached_blocks()) == list(
        zip([0, 1, 2], HASHES, strict=True))
    assert mgr.stats.num_imported_blocks == 3


def test_a_put_and_a_remove_report_an_admit_and_an_evict_per_block() -> None:
    """Mirrors test_remove_with_worker (a put then a remove send one admit and one evict
    message) with test_remove / test_remove_non_existent (the key leaves; removing what is
    not there is False): each imported block is reported stored on the host, chained on the
    one before; dropping the key space reports each removed from the host and drops 3;
    dropping it again drops nothing and reports nothing."""
    mgr = make_manager(num_gpu_blocks=4, num_host_blocks=4, enable_events=True)
    mgr.import_blocks(PROMPT, 3)
    stored = mgr.drain_events()
    assert [(type(e), e.block_hash, e.parent_hash, e.tier) for e in stored
            if isinstance(e, BlockStored)] == [
        (BlockStored, HASHES[0], None, Tier.HOST), (BlockStored, HASHES[1], HASHES[0], Tier.HOST),
        (BlockStored, HASHES[2], HASHES[1], Tier.HOST)]
    assert len(stored) == 3
    assert mgr.drop_key_space() == 3
    assert sorted((type(e), e.block_hash, e.tier) for e in mgr.drain_events()
                  if isinstance(e, BlockRemoved)) == sorted(
        (BlockRemoved, h, Tier.HOST) for h in HASHES)
    assert mgr.drop_key_space() == 0 and mgr.drain_events() == []
    assert mgr.missing_block_hashes(PROMPT) == HASHES and mgr.num_free_host_blocks == 4


def test_without_a_host_tier_nothing_is_put() -> None:
    """Mirrors test_batched_submit_put_task_disabled (with the local CPU cache off a batched
    put stores nothing): with no host blocks the import takes no block, and every block is
    still missing."""
    mgr = make_manager(num_gpu_blocks=4)
    assert mgr.import_blocks(PROMPT, 3) == []
    assert mgr.missing_block_hashes(PROMPT) == HASHES
    assert mgr.cached_blocks() == [] and mgr.stats.num_imported_blocks == 0
