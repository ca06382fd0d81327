"""Red team, nineteenth pass: the core's admission, recovery and remote fetch rule, reached
with mixed batches (a request that skips reading the cache beside one reusing a partial
block), forward passes failing on runs two requests stored, and costs at the ends of their
ranges. Each test fails on the code before its fix and asserts the exact state after (block
ids, reuse, what stays cached), the books recounted."""

from __future__ import annotations

import pytest

from kvtier import CacheConfig, KVCacheManager, SequenceSpec
from kvtier.remote.tier import num_blocks_worth_fetching

TPB = 4


def make_manager(num_gpu_blocks: int = 8, num_host_blocks: int = 4,
                 partial: bool = False) -> KVCacheManager:
    return KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=num_gpu_blocks,
                                      num_host_blocks=num_host_blocks,
                                      enable_partial_reuse=partial), clock=lambda: 0.0)


def cached(mgr: KVCacheManager) -> list[tuple[int, tuple[int, ...]]]:
    """(GPU or host slot, tokens) of every cached block, parents first."""
    return [(b.slot, tuple(b.tokens)) for b in mgr.cached_blocks()]


# ---- admission: a skip-reading request's store inside its batch --------------------------

X0, X1 = [0, 1, 2, 3], [4, 5, 6, 7]


def x1_cached_as_a_leaf() -> KVCacheManager:
    """``X0 X1`` cached as one GPU run (slots 0, 1), unreferenced: ``X1`` is a leaf block a
    partial match can reuse in place."""
    mgr = make_manager(partial=True)
    mgr.add_sequence(SequenceSpec("p", X0 + X1 + [100]))
    mgr.remove_sequence("p")
    assert cached(mgr) == [(0, tuple(X0)), (1, tuple(X1))]
    return mgr


@pytest.mark.parametrize("tail", [[100], [100, 101, 102, 103, 104]])
def test_a_skip_reading_request_does_not_store_under_a_partial_claimed_in_its_batch(
        tail: list[int]) -> None:
    """``b`` reuses 2 tokens of the leaf ``X1`` in place; ``a``, ahead of it in the same
    batch, skips reading the cache and computes ``X0 X1`` again. ``a``'s blocks were stored
    during phase 2, before ``b``'s: its store followed ``b``'s claimed source (a second
    holder, or children grown below it), and ``b``'s in-place reuse detached a block that
    was no longer its alone (AssertionError, or a live request on a detached node). Now
    ``a`` stores after the whole batch: ``b`` takes ``X1``'s slot 1 in place and ``a``'s
    own ``X1`` (slot 3) is cached in its stead::

        before   root ─ X0(0) ─ X1(1)
        after    root ─ X0(0) ─ X1(3) ─ [100..103](4)       b: [0, 1]   a: [2, 3, 4, ...]
    """
    mgr = x1_cached_as_a_leaf()
    b_prompt = X0 + X1[:2] + [77]
    assert mgr.lookup(b_prompt).num_partial_tokens == 2
    a, b = mgr.add_sequence_batch([
        SequenceSpec("a", X0 + X1 + tail, skip_reading_prefix_cache=True),
        SequenceSpec("b", b_prompt)])
    mgr.check_invariants()
    assert (a.num_reused_tokens, list(a.block_ids)) == (0, [2, 3, 4, 5][:len(a.block_ids)])
    assert len(a.block_ids) == (8 + len(tail) + TPB - 1) // TPB
    assert (b.num_reused_tokens, list(b.block_ids)) == (6, [0, 1])
    assert mgr.stats.num_partial_in_place == 1
    want = [(0, tuple(X0)), (3, tuple(X1))]
    if len(tail) > TPB:
        want.append((4, tuple(tail[:TPB])))
    assert cached(mgr) == want
    mgr.remove_sequence("a")
    mgr.remove_sequence("b")
    mgr.check_invariants()
    assert cached(mgr) == want
    assert mgr.num_free_gpu_blocks == 8


# ---- recovery: a failed pass on a run another request stored first ----------------------


def test_a_failed_pass_drops_its_block_grown_onto_a_run_another_request_stored() -> None:
    """``o`` and ``f`` decode the same tokens: ``o`` stores decode block 2 (slot 4) first,
    ``f`` follows it with a private copy (slot 5); ``o`` leaves, and ``f``'s next decode
    block (slot 6) grows that run in place (``f`` holds it alone). ``f``'s pass computing
    block 3 fails. Recovery judged a run by its first block, ``o``'s, so block 3, never
    computed, stayed cached for the next request to read. Now it is judged block by block:
    block 3 leaves, ``o``'s block 2 stays::

        run      [ 50..53 (4, o's) | 54..57 (6, f's: garbage) ]
        f table  [ 2 | 3 | 5 | 6 ]          valid through block 2
    """
    mgr = make_manager(num_gpu_blocks=16, num_host_blocks=0)
    prompt = X0 + X1
    mgr.add_sequence_batch([SequenceSpec("o", prompt), SequenceSpec("f", prompt)])
    for t in (50, 51, 52, 53):
        mgr.append_tokens("o", [t])
        mgr.append_tokens("f", [t])
    mgr.remove_sequence("o")
    for t in (54, 55, 56):
        mgr.append_tokens("f", [t])
    mgr.begin_step()
    mgr.append_tokens("f", [57])
    mgr.end_step()
    assert mgr.block_table("f") == [2, 3, 5, 6]
    assert cached(mgr)[2:] == [(4, (50, 51, 52, 53)), (6, (54, 55, 56, 57))]
    assert mgr.compute_failed(["f"]) == ["f"]
    mgr.check_invariants()
    assert cached(mgr) == [(0, tuple(X0)), (1, tuple(X1)), (4, (50, 51, 52, 53))]
    assert mgr.lookup(prompt + list(range(50, 58)) + [9]).num_tokens == 12
    assert mgr.num_free_gpu_blocks == 16


# ---- the remote fetch rule at the ends of its costs' ranges -----------------------------


def worth(num_blocks: int, **kw: object) -> int:
    costs: dict[str, object] = dict(latency_s=1e-3, fetch_s_per_block=1e-3,
                                    recompute_s_per_block=3e-3)
    costs.update(kw)
    return num_blocks_worth_fetching(num_blocks, **costs)  # type: ignore[arg-type]


def test_the_fetch_rule_decides_on_costs_past_an_hour() -> None:
    """A store queue of two hours ahead of the read (the fleet simulator adds it to the
    latency), a store measured at a block per 4096 s, a recompute of 3 hours a block: each
    raised ValueError (capped at 3600 s). Any finite cost decides."""
    assert worth(10, latency_s=7200.0, recompute_s_per_block=10_800.0) == 10
    assert worth(10, latency_s=7200.0) == 0  # 10 x 2 ms never pays two hours back
    assert worth(3, fetch_s_per_block=4096.0, recompute_s_per_block=10_800.0) == 3
    assert worth(3, fetch_s_per_block=4096.0, recompute_s_per_block=10_800.0,
                 max_wait_s=3 * 3600.0) == 2  # the third arrives after 12,288 s
    assert worth(10, max_wait_s=1e300) == 10


def test_the_fetch_rule_takes_a_subnormal_fetch_cost() -> None:
    """A fetch cost of 5e-324 s a block (a subnormal, from a huge measured throughput)
    made ``int((wait - latency) / fetch)`` an ``int(inf)``: OverflowError. Every block
    arrives within the wait."""
    assert worth(10, fetch_s_per_block=5e-324, max_wait_s=1.0) == 10
    assert worth(10, fetch_s_per_block=5e-324, recompute_s_per_block=1e-323,
                 latency_s=0.0, max_wait_s=1.0) == 10
    assert worth(10**400, max_wait_s=None) == 10**400  # no float of the count is made


@pytest.mark.parametrize("field", ["latency_s", "fetch_s_per_block", "recompute_s_per_block",
                                   "max_wait_s"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), -1e-300, True,
                                   "1", None, pytest.param(10**400, id="10**400")])
def test_the_fetch_rule_refuses_what_is_no_finite_cost(field: str, value: object) -> None:
    """NaN, infinities, a negative, a bool, a non-number, an int past the float range: a
    ValueError naming the field (``max_wait_s`` None is no limit, not a cost)."""
    if field == "max_wait_s" and value is None:
        assert worth(3, max_wait_s=None) == 3
        return
    with pytest.raises(ValueError, match=f"^{field} must be a finite number >= 0, got "):
        worth(3, **{field: value})
    # Refused even where the answer needs no cost (nothing to fetch).
    with pytest.raises(ValueError, match=f"^{field} must be a finite number >= 0"):
        worth(0, **{field: value})
