"""Red team 33c: the core's follow-ups of 31d.

``check_invariants`` recounts the soft claims' flags (the waiting queue's hint) against the
evictor and the hint; counts and ids accept any integral ``operator.index`` takes, never a
bool or a float; request ids are ``str`` at the scheduler's edge as at the manager's; sizes
past ``MAX_BLOCKS`` are refused naming the field.
"""

from __future__ import annotations

import pytest

from kvtier import CacheConfig, KVCacheManager, SequenceSpec
from kvtier.policies import KvtierPredict
from kvtier.radix import Node


def make_manager(num_gpu_blocks: int = 8) -> KVCacheManager:
    """A GPU-only manager of 4-token blocks under kvtier's own policy (it ranks soft claims)."""
    return KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=num_gpu_blocks),
                          clock=lambda: 0.0, policy=KvtierPredict())


def hinted_manager() -> tuple[KVCacheManager, Node, Node]:
    """A manager with two cached runs, A = [1]*8 hinted by a waiting request, B = [2]*8
    not; returns it with A's and B's runs.

        root ─ A [1 1 1 1 | 1 1 1 1]  soft-claimed (waiting "w" starts with it)
             └ B [2 2 2 2 | 2 2 2 2]  not claimed
    """
    mgr = make_manager()
    for rid, tokens in (("a", [1] * 8 + [9]), ("b", [2] * 8 + [9])):
        assert mgr.add_sequence(SequenceSpec(rid, tokens)).admitted
        mgr.remove_sequence(rid)
    mgr.hint_waiting([SequenceSpec("w", [1] * 8 + [5, 5])])
    runs = {node.tokens[0]: node for node in mgr._cache.nodes()}
    assert runs[1].soft_claimed and not runs[2].soft_claimed
    mgr.check_invariants()
    return mgr, runs[1], runs[2]


# ---- 1. the soft claims' flags recounted -----------------------------------------------


def test_a_flag_the_evictor_does_not_track_is_seen() -> None:
    """A run flagged soft-claimed behind the evictor's back (never released) is named."""
    mgr, _, b = hinted_manager()
    b.soft_claimed = True
    with pytest.raises(AssertionError, match="soft-claimed but the evictor does not track"):
        mgr.check_invariants()


def test_a_flag_on_a_run_no_hint_names_is_seen() -> None:
    """A run flagged and tracked, but on no path the hint claimed, is named."""
    mgr, _, b = hinted_manager()
    b.soft_claimed = True
    mgr._cache.evictor.split_off(b)  # tracked as a head split off a claimed run would be
    with pytest.raises(AssertionError, match="lies on no path the waiting queue's hint"):
        mgr.check_invariants()


def test_a_claimed_run_that_lost_its_flag_is_seen() -> None:
    """A run on a claimed path whose flag was cleared (no protection) is named."""
    mgr, a, _ = hinted_manager()
    a.soft_claimed = False
    with pytest.raises(AssertionError, match="not soft-claimed"):
        mgr.check_invariants()


def test_a_released_hint_leaves_no_flag() -> None:
    """A later hint without the request releases the claim; a flag put back is seen."""
    mgr, a, _ = hinted_manager()
    mgr.hint_waiting([])
    assert not a.soft_claimed
    mgr.check_invariants()
    a.soft_claimed = True
    with pytest.raises(AssertionError, match="soft-claimed"):
        mgr.check_invariants()
