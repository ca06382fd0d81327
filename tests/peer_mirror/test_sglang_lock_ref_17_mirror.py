"""SGLang's lock-ref balance tests (a request locks the prefix it matched, caches what it
computed, unlocks on finish or failure), mirrored against kvtier.

Each test names the test it mirrors (sgl-project/sglang,
``test/registered/unit/mem_cache/test_decode_radix_lock_ref.py``, whose four transfer
scenarios come from its PR #19746). The mapping is ``test_sglang_mirror.py``'s: one token
per block mirrors ``page_size=1``; ``inc_lock_ref`` is a live request and
``cache_finished_req`` its removal; ``protected_size`` / ``evictable_size`` are the held and
unheld cached blocks. A KV transfer that fails after the prefix was locked is kvtier's
``compute_failed``: what the request was to compute never arrived, so it leaves the cache
with the request, while the prefix it matched is unlocked and stays. Queries carry one
token more (``END``), since kvtier's ``lookup`` keeps the last prompt token out.
"""

from __future__ import annotations

from kvtier import KVCacheManager, SequenceSpec
from peer_mirror.mirror_helpers import admit, hit, make_manager, release

END = 999
PREFIX = [1, 2, 3]


def sizes(mgr: KVCacheManager) -> tuple[int, int]:
    """(evictable, protected) cached blocks: SGLang's evictable_size and protected_size."""
    blocks = mgr.cached_blocks()
    held = sum(1 for b in blocks if b.priority is None)
    return len(blocks) - held, held


def cache_with_prefix() -> KVCacheManager:
    """A tree holding [1, 2, 3], unlocked (SGLang's ``insert`` of the prefix)."""
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=16)
    admit(mgr, "prefix", PREFIX)
    release(mgr, "prefix")
    assert sizes(mgr) == (3, 0)
    return mgr


def test_an_incremental_transfer_that_succeeds_leaves_everything_unlocked() -> None:
    """Mirrors test_decode_radix_lock_ref.py::test_incremental_transfer_success: with
    [1, 2, 3] cached, a request [1, 2, 3, 4, 5] matches 3 tokens and locks them (3
    protected), caches its 2 new ones while it runs (5 protected), and once finished all 5
    are evictable and none protected."""
    mgr = cache_with_prefix()
    adm = admit(mgr, "r", [*PREFIX, 4, 5])
    assert (adm.num_reused_tokens, adm.block_ids) == (3, (0, 1, 2, 3, 4))
    assert sizes(mgr) == (0, 5)
    release(mgr, "r")
    assert sizes(mgr) == (5, 0)
    assert hit(mgr, [*PREFIX, 4, 5, END]) == 5


def test_a_full_transfer_that_succeeds_caches_the_whole_prompt() -> None:
    """Mirrors test_decode_radix_lock_ref.py::test_full_transfer_success: with nothing
    cached the request matches nothing (SGLang locks the root, a no-op), and once finished
    its 3 tokens are evictable and none protected."""
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=16)
    assert hit(mgr, [10, 20, 30, END]) == 0
    admit(mgr, "r", [10, 20, 30])
    release(mgr, "r")
    assert sizes(mgr) == (3, 0)


def test_an_incremental_transfer_that_fails_unlocks_the_prefix_and_keeps_it() -> None:
    """Mirrors test_decode_radix_lock_ref.py::test_incremental_transfer_failure: the
    request locks the cached [1, 2, 3] and its transfer fails; the prefix is unlocked and
    stays evictable (3, none protected), and what the request was to compute is not
    cached."""
    mgr = cache_with_prefix()
    admit(mgr, "r", [*PREFIX, 4, 5])
    assert mgr.compute_failed(["r"]) == ["r"]
    mgr.check_invariants()
    assert (mgr.has_sequence("r"), sizes(mgr)) == (False, (3, 0))
    assert hit(mgr, [*PREFIX, 4, 5, END]) == 3
    assert mgr.num_free_gpu_blocks == 16


def test_a_full_transfer_that_fails_leaves_the_tree_empty() -> None:
    """Mirrors test_decode_radix_lock_ref.py::test_full_transfer_failure: a request that
    matched nothing and whose transfer fails leaves nothing cached, nothing protected and
    every block free."""
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=16)
    admit(mgr, "r", [10, 20, 30])
    assert mgr.compute_failed(["r"]) == ["r"]
    mgr.check_invariants()
    assert (sizes(mgr), mgr.num_free_gpu_blocks, mgr.num_sequences) == ((0, 0), 16, 0)


def test_repeated_incremental_transfers_leak_no_lock() -> None:
    """Mirrors test_decode_radix_lock_ref.py::test_repeated_incremental_no_leak: five
    requests each match the cached [1, 2, 3] and add one token of their own; afterwards
    nothing is protected and the tree holds the prefix and the five branches, all
    evictable."""
    mgr = cache_with_prefix()
    for i in range(5):
        adm = admit(mgr, f"r{i}", [*PREFIX, 40 + i])
        assert (adm.num_reused_tokens, adm.block_ids) == (3, (0, 1, 2, 3 + i))
        release(mgr, f"r{i}")
    assert sizes(mgr) == (8, 0)
    assert [hit(mgr, [*PREFIX, 40 + i, END]) for i in range(5)] == [4] * 5


def test_a_budget_short_after_the_locks_leaves_no_lock_behind() -> None:
    """Mirrors test_decode_radix_lock_ref.py::test_pop_preallocated_rechecks_budget_after_
    lock (the budget fits before the prefix is locked and not after: the lock is released
    and nothing is allocated). kvtier checks a batch's room after phase 1 has claimed every
    request's prefix: in a pool holding the cached [1, 2, 3], a batch of a request
    locking that prefix and a 4-block request that needed it evicted admits the first and
    refuses the second, which holds nothing afterwards. The pool holds 8 blocks, 4 of them
    a running request's; alone, the 4-block request would fit (1 free, 3 evictable)."""
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=8)
    admit(mgr, "prefix", PREFIX)
    release(mgr, "prefix")
    admit(mgr, "running", [5, 5, 5, 5])
    assert (mgr.num_free_gpu_blocks, hit(mgr, [7, 7, 7, 7, END])) == (4, 0)
    first, second = mgr.add_sequence_batch([
        SequenceSpec("a", [*PREFIX, 4]), SequenceSpec("b", [7, 7, 7, 7])])
    mgr.check_invariants()
    assert (first.admitted, first.num_reused_tokens, first.block_ids) == (True, 3, (0, 1, 2, 7))
    assert (second.admitted, second.block_ids, mgr.has_sequence("b")) == (False, (), False)
    assert sizes(mgr) == (0, 8) and mgr.num_free_gpu_blocks == 0
    release(mgr, "a", "running")
    assert sizes(mgr) == (8, 0) and mgr.num_free_gpu_blocks == 8
