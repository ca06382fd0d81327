"""Speculative decoding's draft slots (``KVCacheManager.reserve_lookahead``): the table covers
the drafts, only accepted tokens fill and store blocks, nothing leaks, and the cache ends up
exactly as without the drafts."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier import CacheConfig, KVCacheManager, SequenceSpec


def make_manager(**kw: Any) -> KVCacheManager:
    cfg: dict[str, Any] = {"tokens_per_block": 4, "num_gpu_blocks": 8, **kw}
    return KVCacheManager(CacheConfig(**cfg))


def test_drafts_get_slots_and_only_accepted_tokens_are_cached() -> None:
    """Exact ids: a 6-token prompt holds blocks 0-1; 5 drafts take block 2; two accepted
    tokens fill block 1 (stored), a rejected step adds one token; on release only the
    accepted tokens' full blocks stay cached and the draft block is free again."""
    mgr = make_manager()
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 5, 6]))
    assert mgr.block_table("a") == [0, 1] and mgr.num_free_gpu_blocks == 6
    #   tokens |1 2 3 4|5 6 . .|. . . .|     drafts d1..d5 at positions 6-10
    #   table  [   0   ][  1   ][  2   ]
    assert mgr.reserve_lookahead("a", 5) == [2]
    assert mgr.block_table("a") == [0, 1, 2] and mgr.num_free_gpu_blocks == 5
    mgr.check_invariants()
    # d1, d2 accepted (and the bonus token 9 sampled after them): block 1 fills.
    assert mgr.append_tokens("a", [7, 8, 9]) == []
    assert mgr.lookup([1, 2, 3, 4, 5, 6, 7, 8, 0]).num_tokens == 8
    # The next drafts need slots to position 9 + 4 = 13: block 3.
    assert mgr.reserve_lookahead("a", 4) == [3]
    assert mgr.reserve_lookahead("a", 3) == []  # already covered
    mgr.check_invariants()
    assert mgr.append_tokens("a", [10]) == []  # every draft rejected: the bonus token only
    mgr.remove_sequence("a")
    mgr.check_invariants()
    # Tokens 1-10 leave blocks 0-1 cached; block 2 held 9, 10 (not full), 3 nothing.
    assert mgr.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0]).num_tokens == 8
    assert [(b.slot, b.tokens) for b in mgr.cached_blocks()] == [(0, (1, 2, 3, 4)),
                                                                (1, (5, 6, 7, 8))]
    assert mgr.num_free_gpu_blocks == 8  # 2 of them cached, evictable


def test_a_reservation_the_pool_cannot_supply_changes_nothing() -> None:
    """``None``, with the table, the free count and the version unchanged."""
    mgr = make_manager(num_gpu_blocks=3)
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 5]))
    before = (mgr.block_table("a"), mgr.num_free_gpu_blocks, mgr.version)
    assert mgr.reserve_lookahead("a", 8) is None
    assert (mgr.block_table("a"), mgr.num_free_gpu_blocks, mgr.version) == before
    assert mgr.reserve_lookahead("a", 7) == [2]  # exactly what is left
    mgr.check_invariants()


def test_drafts_draw_on_their_own_reservation_never_on_anothers() -> None:
    """Blocks another request reserved for its growth are not the drafts' to take; the
    request's own reservation is (as ``append_tokens`` draws on it first)."""
    mgr = make_manager(num_gpu_blocks=7)
    mgr.add_sequence(SequenceSpec("b", [20, 21, 22, 23, 24], num_reserved_blocks=2))
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 5], num_reserved_blocks=1))
    assert (mgr.num_free_gpu_blocks, mgr.num_reserved_blocks) == (0, 3)  # 3 unused, reserved
    assert mgr.reserve_lookahead("a", 3) == []  # 8 tokens: its 2 blocks hold them
    assert mgr.reserve_lookahead("a", 4) == [4]  # its own reserved block
    assert mgr.num_reserved_blocks == 2
    assert mgr.reserve_lookahead("a", 8) is None  # b's two are not free for a
    assert mgr.append_tokens("b", list(range(25, 36))) == [5, 6]  # 16 tokens: its 2
    mgr.check_invariants()


@pytest.mark.parametrize(("num_tokens", "error"), [
    (-1, ValueError), (True, ValueError), (1.0, ValueError), ("2", ValueError)])
def test_bad_counts_are_refused_naming_the_value(num_tokens: Any, error: type) -> None:
    """A count that is no int >= 0 raises, naming it, and changes nothing."""
    mgr = make_manager()
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3]))
    version = mgr.version
    with pytest.raises(error, match=f"num_tokens must be an int >= 0, got {num_tokens!r}"):
        mgr.reserve_lookahead("a", num_tokens)
    assert mgr.version == version and mgr.block_table("a") == [0]


def test_unknown_requests_and_unfinished_prefills_are_refused() -> None:
    """No draft slots for a request that is not live or still has prompt to prefill."""
    mgr = make_manager()
    with pytest.raises(KeyError, match="'nobody'"):
        mgr.reserve_lookahead("nobody", 2)
    mgr.add_sequence(SequenceSpec("a", list(range(10)), num_new_tokens=4))
    with pytest.raises(ValueError, match="6 unscheduled prompt tokens"):
        mgr.reserve_lookahead("a", 2)
    assert mgr.block_table("a") == [0]


ops = st.lists(st.tuples(st.sampled_from(["add", "reserve", "accept", "remove"]),
                         st.integers(0, 2), st.integers(0, 6)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_drafts_change_nothing_but_the_free_blocks(program: list[tuple[str, int, int]]) -> None:
    """Random admissions, draft reservations, accepted tokens and releases, run twice: with
    the reservations and without (a pool that never evicts). After every step both caches
    hold exactly the same blocks, the plain tables cover exactly the tokens, and the free
    blocks differ by exactly the draft blocks live requests hold."""
    with_drafts, plain = make_manager(num_gpu_blocks=256), make_manager(num_gpu_blocks=256)
    live: dict[str, int] = {}
    for step, (op, which, n) in enumerate(program):
        rid = f"r{which}"
        if op == "add" and rid not in live:
            prompt = [which, *range(n + 1)]
            for mgr in (with_drafts, plain):
                mgr.add_sequence(SequenceSpec(rid, prompt))
            live[rid] = len(prompt)
        elif op == "reserve" and rid in live:
            assert with_drafts.reserve_lookahead(rid, n) is not None
        elif op == "accept" and rid in live:
            tokens = [(step + i) % 3 for i in range(n + 1)]
            for mgr in (with_drafts, plain):
                assert mgr.append_tokens(rid, tokens) is not None
            live[rid] += len(tokens)
        elif op == "remove" and rid in live:
            for mgr in (with_drafts, plain):
                mgr.remove_sequence(rid)
            del live[rid]
        with_drafts.check_invariants()
        plain.check_invariants()
        assert ({b.block_hash for b in with_drafts.cached_blocks()}
                == {b.block_hash for b in plain.cached_blocks()})
        num_drafts = 0
        for r, num_tokens in live.items():
            table, base = with_drafts.block_table(r), plain.block_table(r)
            assert len(table) >= len(base) == -(-num_tokens // 4)
            num_drafts += len(table) - len(base)
        assert plain.num_free_gpu_blocks - with_drafts.num_free_gpu_blocks == num_drafts
