"""The agentic reach reference (eleventh session): ``PastAware`` ranks by the expected
next use from past arrivals and the gap law only, and is told of the future only the one
bit ``knows_ends`` names."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kvtier.radix import Node, Root
from kvtier.sim.workload import TraceRequest
from kvtier.tier import Tier

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.policy_lab.reach import MruDead, PastAware, PastDensity, hit_rate

SPEC = list(range(8))  # 2 blocks of 4 tokens, every session's head


def stream(later_b_arrival: float) -> list[TraceRequest]:
    """Session a at 0 and 10 s, session b at 1 s and at ``later_b_arrival``."""
    a1, b1 = [*SPEC, 100, 101, 102, 103], [*SPEC, 200, 201, 202, 203]
    return [TraceRequest("a1", 0.0, a1, 4), TraceRequest("b1", 1.0, b1, 4),
            TraceRequest("a2", 10.0, [*a1, 104, 105, 106, 107], 4),
            TraceRequest("b2", later_b_arrival, [*b1, 204, 205, 206, 207], 4)]


def nodes() -> tuple[Node, Node, Node]:
    """The tree a1 and b1 leave: the spec, then each session's own block below it."""
    root = Root(None, None)
    spec = Node(root, SPEC, [0, 1], Tier.GPU, None, 0, root)
    a = Node(spec, [100, 101, 102, 103], [2], Tier.GPU, None, 2, root)
    b = Node(spec, [200, 201, 202, 203], [3], Tier.GPU, None, 2, root)
    return spec, a, b


def test_expected_next_use_from_the_past_and_the_gap_law() -> None:
    """A session's run comes back at its last arrival + E[gap | gap > waited] (gaps uniform
    over 2-20 s), never past 20 s; a run two sessions used within one minimum gap is
    soonest; the time scale stretches the law."""
    spec, a, _ = nodes()
    order = PastAware(stream(30.0), 4, 1.0, 2.0, 20.0)
    assert order.next_use(a, 5.0) == 0.0 + (5.0 + 20.0) / 2
    assert order.next_use(a, 1.0) == 0.0 + (2.0 + 20.0) / 2  # waited less than the least gap
    assert order.next_use(a, 12.0) == 10.0 + (2.0 + 20.0) / 2  # from its latest arrival
    assert order.next_use(a, 30.5) == float("inf")  # 20.5 s since: the session has ended
    assert order.next_use(spec, 5.0) == 5.0  # a1 and b1 1 s apart: shared
    assert order.key(a, 5.0, 0) == (0, -12.5, 0)
    slow = PastAware(stream(30.0), 4, 2.0, 2.0, 20.0)  # arrivals and gaps twice as long
    assert slow.next_use(a, 10.0) == 0.0 + (10.0 + 40.0) / 2


def test_the_future_is_not_read_but_for_the_one_bit() -> None:
    """Whether b's next step comes at 15 s or 25 s changes nothing before it comes; with
    ``knows_ends`` a run whose session has no step left is never used again."""
    _, a, b = nodes()
    for now in (2.0, 9.0, 14.0):
        assert (PastAware(stream(15.0), 4, 1.0, 2.0, 20.0).next_use(b, now)
                == PastAware(stream(25.0), 4, 1.0, 2.0, 20.0).next_use(b, now)
                == 1.0 + (max(2.0, now - 1.0) + 20.0) / 2)
    ends = PastAware(stream(30.0), 4, 1.0, 2.0, 20.0, knows_ends=True)
    assert ends.next_use(a, 5.0) == 12.5  # a2 is still to come
    assert ends.next_use(a, 12.0) == float("inf")  # a2 was a's last step
    with pytest.raises(ValueError, match="min_gap_s"):
        PastAware(stream(30.0), 4, 1.0, 3.0, 2.0)


def test_density_weighs_the_chance_the_session_ended() -> None:
    """Hit density: the chance the session goes on (gap law and a 4 % chance a step is the
    last, by Bayes) over the expected wait, rising as the next step nears; a run silent past
    the longest gap is worth 0, a shared run most; with the release clock, counted from the
    run's release."""
    spec, a, _ = nodes()
    order = PastDensity(stream(30.0), 4, 1.0, 2.0, 20.0, 0.04)
    going_on = 0.96 * (20.0 - 5.0) / 18.0  # silent 5 s of a gap of 2-20 s, not the last step
    assert order.density(a, 5.0) == pytest.approx(going_on / (going_on + 0.04) / 7.5, rel=1e-12)
    assert order.density(a, 1.0) == pytest.approx(0.96 / (11.0 - 1.0), rel=1e-12)  # < least gap
    assert order.density(a, 3.0) < order.density(a, 5.0) < order.density(a, 9.9)  # sooner back
    assert order.density(a, 31.0) == 0.0
    assert order.density(spec, 5.0) == float("inf")
    assert order.key(a, 31.0, 0) == (0, 0.0, 0)
    a.last_used_s = 3.0  # released 3 s after a1 arrived: the release clock waits 2 s at 5 s
    released = PastDensity(stream(30.0), 4, 1.0, 2.0, 20.0, 0.04, release_clock=True)
    assert released.density(a, 5.0) == pytest.approx(0.96 / 9.0, rel=1e-12)
    assert released.density(a, 5.0) != order.density(a, 5.0)
    with pytest.raises(ValueError, match="end_chance"):
        PastDensity(stream(30.0), 4, 1.0, 2.0, 20.0, 1.0)


def test_mru_dead_drops_the_silent_then_the_youngest() -> None:
    """Runs silent past the longest gap since their release go first (oldest first), then
    the youngest; a shared run last."""
    spec, a, b = nodes()
    a.last_used, a.last_used_s = 7, 3.0
    b.last_used, b.last_used_s = 9, 4.0
    order = MruDead(stream(30.0), 4, 1.0, 2.0, 20.0)
    assert order.key(a, 10.0, 0) == (0, 1, -7)
    assert order.key(b, 10.0, 0) == (0, 1, -9)  # younger: goes before a
    assert order.key(a, 23.5, 0) == (0, 0, 7)  # silent 20.5 s since its release
    assert order.key(spec, 5.0, 0) == (0, 2, 0)  # a1 and b1 1 s apart: shared
    b.soft_claimed = True
    assert order.key(b, 10.0, 0) == (1, 1, -9)


def test_an_unknown_variant_is_refused() -> None:
    """Only kvtier's learned policies run ``/unwitnessed``."""
    with pytest.raises(ValueError, match="unknown order"):
        hit_rate(("lru/unwitnessed", 4.1317, 10, 0))


def test_more_knowledge_more_hits_on_a_short_replay() -> None:
    """The first 200 agentic steps through the simulator (2,698 GPU blocks, full after
    ~100): each order that knows more does better, LRU < past < past-density < past+ends
    < clairvoyant (0.7611, 0.8211, 0.8226, 0.8455, 0.8652 on this code); the plain rule
    0.8027, the learned order without its witness 0.7897 (with it 0.7457: its cold start)."""
    orders = ("lru", "past", "past-density", "past+ends", "clairvoyant", "mru-dead",
              "kvtier-predict-cost/unwitnessed", "kvtier-predict-cost")
    rates = [hit_rate((o, 4.1317, 200, 0)) for o in orders]
    assert [round(r, 4) for r in rates] == [0.7611, 0.8211, 0.8226, 0.8455, 0.8652, 0.8027,
                                            0.7897, 0.7457]
