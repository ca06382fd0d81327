"""kvtier's eviction policies over vLLM CPU-tier chunks (``PolicyChunks``): no vLLM needed."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.config import EVICTION_POLICIES
from kvtier.integrations.vllm.chunk_policy import PolicyChunks


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def k(i: int) -> bytes:
    return i.to_bytes(32, "big") + bytes(4)


def make_chunks(policy: str = "priority-lru", capacity: int = 16,
                clock: Clock | None = None) -> PolicyChunks[str]:
    return PolicyChunks(policy, capacity, clock=clock or Clock())


def test_unknown_policy_names_the_known_ones() -> None:
    """A policy name kvtier does not have raises listing the ones it has."""
    with pytest.raises(ValueError, match="eviction_policy must be one of"):
        make_chunks("fifo")


def test_priority_lru_evicts_tails_first_and_keeps_protected() -> None:
    """A released request's chunks go tail first; protected chunks stay; ``n`` exactly."""
    chunks = make_chunks()
    for i in range(4):  # one request's prompt, head (0) to tail (3)
        chunks.insert(k(i), f"c{i}", evictable=True, depth=16 * (i + 1))
    chunks.release([k(0), k(1), k(2), k(3)], reused=set())
    chunks.check_invariants()
    # LRU order after a tail-first release:  3 (oldest)  2  1  0 (newest)
    assert chunks.evict(2, protected={k(3)}) == [(k(2), "c2"), (k(1), "c1")]
    chunks.check_invariants()
    assert [key for key, _ in chunks.evict(2, set()) or []] == [k(3), k(0)]
    assert len(chunks) == 0


def test_live_request_keeps_its_prefix_over_its_tail() -> None:
    """Chunks a live request stores in batches go tail first under pressure (its head is
    newest), and a chunk it reads is raised to its tick; found by vLLM's own LRU tests."""
    chunks = make_chunks()
    old = chunks.new_rank()
    chunks.insert(k(9), "old", evictable=True, rank=old, depth=16)
    live = chunks.new_rank()
    for i in (0, 1):  # first batch: positions 16, 32
        chunks.insert(k(i), f"c{i}", evictable=True, rank=live, depth=16 * (i + 1))
    chunks.insert(k(2), "c2", evictable=True, rank=live, depth=48)  # a later batch
    chunks.access([(k(9), 64)], live)  # the live request reads the old chunk too
    chunks.check_invariants()
    # recency, oldest first:  9@64  2@48  1@32  0@16   (one tick; deeper = older)
    assert [key for key, _ in chunks.evict(3, set()) or []] == [k(9), k(2), k(1)]


def test_evict_is_atomic_when_it_cannot_take_n() -> None:
    """Too few evictable chunks outside ``protected``: None, and nothing changed."""
    chunks = make_chunks()
    for i in range(3):
        chunks.insert(k(i), f"c{i}", evictable=i != 1)
    assert chunks.evict(2, protected={k(0)}) is None
    assert chunks.evict(3, set()) is None
    chunks.check_invariants()
    assert (len(chunks), chunks.num_evictable) == (3, 2)
    assert chunks.evict(2, set()) == [(k(0), "c0"), (k(2), "c2")]


def test_pinned_chunks_are_never_evicted() -> None:
    """A chunk marked non-evictable (a load in flight) is skipped until marked again."""
    chunks = make_chunks()
    chunks.insert(k(0), "c0", evictable=True)
    chunks.insert(k(1), "c1", evictable=True)
    chunks.mark_non_evictable(k(0))
    assert chunks.evict(1, set()) == [(k(1), "c1")]
    assert chunks.evict(1, set()) is None
    chunks.mark_evictable(k(0))
    assert chunks.evict(1, set()) == [(k(0), "c0")]


def test_priority_and_retention_order_and_expire() -> None:
    """A high-priority chunk outlives older default ones until its retention runs out."""
    clock = Clock()
    chunks = make_chunks(clock=clock)
    chunks.insert(k(0), "kept", evictable=True, priority=90, retention_s=10.0)
    chunks.insert(k(1), "a", evictable=True)
    chunks.insert(k(2), "b", evictable=True)
    assert [key for key, _ in chunks.evict(2, set()) or []] == [k(1), k(2)]
    chunks.insert(k(3), "c", evictable=True)
    clock.now += 11.0  # the retention of k(0) ended: default priority, and it is older
    assert [key for key, _ in chunks.evict(1, set()) or []] == [k(0)]


@pytest.mark.parametrize("policy", EVICTION_POLICIES)
def test_every_kvtier_policy_runs_the_vllm_call_order(policy: str) -> None:
    """Each policy of config.EVICTION_POLICIES survives vLLM's calls (store miss, insert,
    access, release with reuse, touch, pin, evict, remove, clear) with its books intact."""
    run_the_vllm_call_order(policy, Clock())


class FaultyClock(Clock):
    """Every 13th reading raises, every 17th answers NaN (kvtier.clock.CacheClock gives the
    last good time for them)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_reads = 0

    def __call__(self) -> float:
        self.num_reads += 1
        if self.num_reads % 13 == 0:
            raise OSError("clock source gone")
        return float("nan") if self.num_reads % 17 == 0 else self.now


@pytest.mark.parametrize("policy", ["priority-lru", "kvtier-predict-cost"])
def test_a_faulty_clock_fails_no_call(policy: str) -> None:
    """The same calls under a clock that raises or answers NaN now and then: every call
    succeeds and the books hold (a raise used to escape from the middle of a call)."""
    run_the_vllm_call_order(policy, FaultyClock())


def run_the_vllm_call_order(policy: str, clock: Clock) -> None:
    chunks = make_chunks(policy, capacity=8, clock=clock)
    rng = random.Random(policy)
    live: set[int] = set()
    for step in range(300):
        clock.now += rng.random()
        request = [rng.randrange(24) for _ in range(rng.randrange(1, 6))]
        new = [i for i in dict.fromkeys(request) if i not in live]
        chunks.recall(k(i) for i in new)
        if len(live) + len(new) > 8:
            victims = chunks.evict(len(live) + len(new) - 8, {k(i) for i in request})
            if victims is None:
                continue
            live -= {int.from_bytes(key[:32], "big") for key, _ in victims}
        for i in new:
            chunks.insert(k(i), f"c{i}", evictable=step % 7 != 0, depth=16 * (i + 1))
            live.add(i)
        claimed = chunks.soft_claim(k(i) for i in request)
        chunks.touch([k(i) for i in request[:1]])
        chunks.unclaim(claimed)
        reused = {k(i) for i in request if i not in new}
        chunks.release([k(i) for i in dict.fromkeys(request)], reused)
        for i in new:
            chunks.mark_evictable(k(i))
        if step % 50 == 49 and live:
            gone = live.pop()
            chunks.remove(k(gone))
        chunks.check_invariants()
        assert {i for i in range(24) if chunks.get(k(i)) is not None} == live
    chunks.clear()
    assert len(chunks) == 0 and chunks.num_evictable == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["insert", "pin", "unpin", "evict", "release"]),
                          st.integers(0, 9), st.integers(1, 3)), max_size=60),
       st.sampled_from(EVICTION_POLICIES))
def test_evict_matches_a_reference_of_evictable_chunks(
        ops: list[tuple[str, int, int]], policy: str) -> None:
    """Random operations against a set model: evict returns exactly n distinct evictable,
    unprotected chunks, or None exactly when fewer than n exist, and then changes nothing."""
    chunks = make_chunks(policy, capacity=10)
    cached: dict[int, bool] = {}  # key -> evictable
    for op, i, n in ops:
        if op == "insert" and i not in cached:
            chunks.insert(k(i), f"c{i}", evictable=True)
            cached[i] = True
        elif op == "pin" and i in cached:
            chunks.mark_non_evictable(k(i))
            cached[i] = False
        elif op == "unpin" and i in cached:
            chunks.mark_evictable(k(i))
            cached[i] = True
        elif op == "release":
            chunks.release([k(j) for j in range(i) if j in cached], {k(0)})
        elif op == "evict":
            protected = {k(i)}
            allowed = {j for j, ev in cached.items() if ev and j != i}
            out = chunks.evict(n, protected)
            if len(allowed) < n:
                assert out is None
            else:
                assert out is not None and len(out) == n
                evicted = {int.from_bytes(key[:32], "big") for key, _ in out}
                assert len(evicted) == n and evicted <= allowed
                for j in evicted:
                    del cached[j]
        chunks.check_invariants()
        assert chunks.num_evictable == sum(cached.values())
        assert {j for j in range(10) if chunks.get(k(j)) is not None} == set(cached)


def test_kvtier_predict_gives_a_class_youngest_chunk_where_the_near_term_says() -> None:
    """Three chunks released at 100, 110 and 120 s; at 121 s one must go. Where the
    policy's near-term value of their class rises with age (they come back seconds after
    they leave), the youngest goes; where it is flat, the oldest, as LRU."""
    from kvtier.policies import NUM_AGE_BINS, KvtierPredict

    for near, first in ((list(range(NUM_AGE_BINS)), k(2)), ([1.0] * NUM_AGE_BINS, k(0))):
        clock = Clock()
        chunks = make_chunks("kvtier-predict-cost", capacity=8, clock=clock)
        policy = chunks.policy
        assert isinstance(policy, KvtierPredict)
        for i in range(3):
            clock.now = 100.0 + 10 * i
            chunks.insert(k(i), f"c{i}", evictable=False, depth=16)
            chunks.mark_evictable(k(i))
            chunks.release([k(i)], reused=set())
        classes = {entry.node.reuse_class for entry in chunks._chunks.values()}
        cls = classes.pop()
        assert not classes and cls is not None
        policy.learner.near[cls][:] = [float(x) for x in near]
        clock.now = 121.0
        assert chunks.evict(1, set()) == [(first, f"c{first[31]}")]
        chunks.check_invariants()
