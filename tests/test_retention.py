"""Retention by token range (TensorRT-LLM's ``KvCacheRetentionConfig``): each block takes the
range its first token lies in, decoded blocks the decode settings, the rest the request's
own; a run whose blocks differ is cut at release so every run has one priority."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fake_clock import FakeClock
from kvtier import (
    CacheConfig,
    KVCacheManager,
    Request,
    Retention,
    RetentionRange,
    Scheduler,
    SchedulerConfig,
    SequenceSpec,
)

R = RetentionRange


def make_manager(clock: FakeClock | None = None, **kw: Any) -> KVCacheManager:
    """4-token blocks, 8 GPU blocks, priority-LRU, full blocks only, unless told otherwise."""
    cfg: dict[str, Any] = {"tokens_per_block": 4, "num_gpu_blocks": 8,
                           "enable_partial_reuse": False, "eviction_policy": "priority-lru",
                           **kw}
    return KVCacheManager(CacheConfig(**cfg), clock=clock or FakeClock())


def priorities(mgr: KVCacheManager) -> list[tuple[int, int | None]]:
    """(slot, priority now) of every cached block, parents first."""
    return [(b.slot, b.priority) for b in mgr.cached_blocks()]


def priority_by_prefix(mgr: KVCacheManager) -> dict[tuple[int, ...], int | None]:
    """Every cached block's priority now, by the whole prefix it holds (its tokens and its
    ancestors'), parents first."""
    by_prefix: dict[tuple[int, ...], int | None] = {}
    prefixes: dict[int, tuple[int, ...]] = {}
    for b in mgr.cached_blocks():
        prefix = (prefixes[b.parent_hash] if b.parent_hash is not None else ()) + b.tokens
        prefixes[b.block_hash] = prefix
        by_prefix[prefix] = b.priority
    return by_prefix


# ---- the settings themselves ----------------------------------------------------------------


@pytest.mark.parametrize("ranges", [
    [(0, 64), (90, 128)], [(0, None)], [(50, 100), (30, 40)], [(0, 30), (30, 50), (60, 80)]])
def test_ranges_that_do_not_overlap_are_kept_sorted(ranges: list[tuple[int, int | None]]
                                                    ) -> None:
    """TensorRT-LLM's valid examples are accepted, sorted by start."""
    retention = Retention(tuple(R(s, e, 50) for s, e in ranges))
    assert [(r.start, r.end) for r in retention.ranges] == sorted(ranges, key=lambda r: r[0])


@pytest.mark.parametrize(("ranges", "message"), [
    ([(0, None), (30, 50)], r"overlap: \[0, the prompt end\) and \[30, 50\)"),
    ([(0, 64), (60, 80)], r"overlap: \[0, 64\) and \[60, 80\)"),
    ([(0, 128), (64, 256)], r"overlap: \[0, 128\) and \[64, 256\)"),
    ([(5, 10), (5, 6)], r"overlap: \[5, 10\) and \[5, 6\)"),
])
def test_overlapping_ranges_are_refused(ranges: list[tuple[int, int | None]],
                                        message: str) -> None:
    """TensorRT-LLM's invalid examples are refused, naming both ranges."""
    with pytest.raises(ValueError, match=message):
        Retention(tuple(R(s, e, 50) for s, e in ranges))


@pytest.mark.parametrize(("make", "error", "message"), [
    (lambda: R(-1, 4, 50), ValueError,
     "start of a retention range must be an integer >= 0, got -1"),
    (lambda: R(True, 4, 50), ValueError, "start of a retention range must be an integer >= 0"),
    (lambda: R(4, 4, 50), ValueError, "end of the retention range starting at 4 must be None "
     "or an integer in 5\\.\\.2\\*\\*48, got 4"),
    (lambda: R(0, 2.5, 50), ValueError,  # type: ignore[arg-type]
     "must be None or an integer in 1\\.\\.2\\*\\*48, got 2.5"),
    (lambda: R(0, 4, 101), ValueError, "priority of the retention range at 0 must be an "
     "integer in 0..100, got 101"),
    (lambda: R(0, 4, True), ValueError, "priority of the retention range at 0"),
    (lambda: R(0, 4, 50, float("nan")), ValueError, "retention_s of the retention range at 0"),
    (lambda: R(0, 4, 50, -1), ValueError, "retention_s of the retention range at 0"),
    (lambda: Retention("abc"), TypeError,  # type: ignore[arg-type]
     "ranges must be an iterable of RetentionRange"),
    (lambda: Retention(((0, 4, 50),)), TypeError,  # type: ignore[arg-type]
     r"ranges\[0\] must be a RetentionRange"),
    (lambda: Retention(decode_priority=-1), ValueError, "decode_priority must be an integer"),
    (lambda: Retention(decode_retention_s=5.0), ValueError,
     "decode_retention_s needs a decode_priority"),
    (lambda: Retention(decode_priority=10, decode_retention_s=float("inf")), ValueError,
     "decode_retention_s must be a finite number"),
    (lambda: Retention(decode_start=0), ValueError, "decode_start must be an integer >= 1"),
    (lambda: SequenceSpec("a", [1, 2], retention=Retention(decode_start=3)), ValueError,
     "retention of 'a': decode_start 3 lies past the 2 tokens admitted"),
    (lambda: SequenceSpec("a", [1, 2], retention=R(0, 4, 50)), TypeError,  # type: ignore[arg-type]
     "retention of 'a' must be a Retention or None, got RetentionRange"),
    (lambda: Request("a", [1, 2], 4, retention={"ranges": ()}), TypeError,  # type: ignore[arg-type]
     "retention of request 'a' must be a Retention or None"),
])
def test_bad_settings_are_refused_naming_the_field(make: Any, error: type[Exception],
                                                    message: str) -> None:
    """Every field is checked when it is made, with its value in the message."""
    with pytest.raises(error, match=message):
        make()


def reference(ranges: list[tuple[int, int | None, int]], num_prompt_tokens: int,
              num_blocks: int, tpb: int, own: int, decode: int | None) -> list[int]:
    """Each block's priority, written token by token: the range of its first token."""
    per_token = [own] * num_prompt_tokens
    for start, end, priority in ranges:
        for t in range(start, num_prompt_tokens if end is None else min(end, num_prompt_tokens)):
            per_token[t] = priority
    return [per_token[b * tpb] if b * tpb < num_prompt_tokens
            else (own if decode is None else decode) for b in range(num_blocks)]


@st.composite
def retentions(draw: st.DrawFn) -> tuple[list[tuple[int, int | None, int]], int | None]:
    points = sorted(draw(st.sets(st.integers(0, 60), max_size=8)))
    ranges: list[tuple[int, int | None, int]] = []
    for start, end in zip(points[::2], points[1::2], strict=False):
        ranges.append((start, end, draw(st.integers(0, 100))))
    if len(points) % 2 and draw(st.booleans()):
        ranges.append((points[-1], None, draw(st.integers(0, 100))))
    decode = draw(st.none() | st.integers(0, 100))
    return ranges, decode


@settings(max_examples=300, deadline=None)
@given(retentions(), st.integers(1, 64), st.sampled_from([1, 2, 4, 8, 16]), st.integers(0, 20),
       st.integers(0, 20))
def test_block_settings_and_cuts_match_a_token_by_token_reference(
        spec: tuple[list[tuple[int, int | None, int]], int | None], num_prompt_tokens: int,
        tpb: int, start: int, length: int) -> None:
    """``at`` gives every block the reference's priority; ``cuts`` are exactly where the
    reference's priorities change along a run."""
    ranges, decode = spec
    retention = Retention(tuple(R(s, e, p) for s, e, p in ranges), decode_priority=decode)
    resolved = retention.for_request(num_prompt_tokens, 35, None)
    num_blocks = start + length + 1
    expected = reference(ranges, num_prompt_tokens, num_blocks, tpb, 35, decode)
    assert [resolved.at(b, tpb)[0] for b in range(num_blocks)] == expected
    run = expected[start:start + length + 1]
    assert resolved.cuts(start, length + 1, tpb) == [
        k for k in range(1, len(run)) if run[k] != run[k - 1]]


# ---- in the cache ---------------------------------------------------------------------------


def test_a_system_prompt_range_outlives_older_and_newer_default_blocks() -> None:
    """The released run is cut where its priority changes; eviction takes the default
    blocks first (oldest first, tail first), and the system prompt stays."""
    mgr = make_manager()
    sys_prompt, conv = [1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]
    a = mgr.add_sequence(SequenceSpec("a", sys_prompt + conv + [0],
                                      retention=Retention((R(0, 8, 90),))))
    assert a.block_ids == (0, 1, 2, 3, 4)
    mgr.remove_sequence("a")   # cached: a0 a1 (90) -> a2 a3 (35); slot 4 (partial) freed
    c = mgr.add_sequence(SequenceSpec("c", [20, 21, 22, 23, 24, 25, 26, 27, 0]))
    assert c.block_ids == (4, 5, 6)
    mgr.remove_sequence("c")   # cached: c0 c1 (35, newer than a's); slots 6 and 7 free
    assert priorities(mgr) == [(0, 90), (1, 90), (2, 35), (3, 35), (4, 35), (5, 35)]
    # Five blocks: three evicted, a3 and a2 (the oldest 35s, tail first), then c1, and the
    # two free ones (the free slots are a stack: the evicted come off it first).
    b = mgr.add_sequence(SequenceSpec("b", list(range(100, 120))))
    assert b.block_ids == (5, 2, 3, 6, 7)
    assert mgr.lookup(sys_prompt + conv + [0]).num_tokens == 8   # the system prompt
    assert mgr.lookup([20, 21, 22, 23, 24, 25, 26, 27, 0]).num_tokens == 4
    mgr.check_invariants()


def test_without_the_range_the_same_stream_loses_the_system_prompt() -> None:
    """The control: the same calls with one priority evict a's whole run before c's."""
    mgr = make_manager()
    mgr.add_sequence(SequenceSpec("a", list(range(1, 17)) + [0]))
    mgr.remove_sequence("a")
    mgr.add_sequence(SequenceSpec("c", [20, 21, 22, 23, 24, 25, 26, 27, 0]))
    mgr.remove_sequence("c")
    b = mgr.add_sequence(SequenceSpec("b", list(range(100, 120))))
    assert b.block_ids == (1, 2, 3, 6, 7)  # a3, a2, a1 evicted, then the free ones
    assert mgr.lookup(list(range(1, 17)) + [0]).num_tokens == 4
    assert mgr.lookup([20, 21, 22, 23, 24, 25, 26, 27, 0]).num_tokens == 8


def test_decoded_blocks_take_the_decode_priority_and_ranges_expire() -> None:
    """Blocks that decoding filled take ``decode_priority``; a range's retention runs out
    and its blocks fall back to the default."""
    clock = FakeClock()
    mgr = make_manager(clock, num_gpu_blocks=16)
    retention = Retention((R(0, 4, 90, retention_s=10.0), R(4, None, 60)), decode_priority=5)
    mgr.add_sequence(SequenceSpec("a", list(range(1, 13)), retention=retention))
    mgr.append_tokens("a", [50, 51, 52, 53, 54])  # fills block 3 (tokens 12..15)
    mgr.remove_sequence("a")
    assert priorities(mgr) == [(0, 90), (1, 60), (2, 60), (3, 5)]
    clock.now = 10.0
    assert priorities(mgr) == [(0, 35), (1, 60), (2, 60), (3, 5)]
    mgr.check_invariants()


def test_the_last_release_sets_the_priority_of_a_shared_prefix() -> None:
    """A run two requests hold takes the settings of the one that releases it last."""
    mgr = make_manager(num_gpu_blocks=16)
    prompt = list(range(1, 13)) + [0]
    mgr.add_sequence(SequenceSpec("a", prompt, retention=Retention((R(0, 4, 90),))))
    mgr.add_sequence(SequenceSpec("b", prompt, priority=20))
    mgr.remove_sequence("a")   # b still holds the three blocks: nothing set
    assert [p for _, p in priorities(mgr)] == [None, None, None]
    mgr.remove_sequence("b")
    assert [p for _, p in priorities(mgr)] == [20, 20, 20]
    mgr.add_sequence(SequenceSpec("c", prompt))
    mgr.add_sequence(SequenceSpec("d", prompt, retention=Retention((R(4, 8, 70),))))
    mgr.remove_sequence("c")
    mgr.remove_sequence("d")   # d's ranges cut the run: 35 | 70 | 35
    assert [p for _, p in priorities(mgr)] == [35, 70, 35]
    mgr.check_invariants()


def test_the_default_policy_evicts_by_the_ranges_priorities_first() -> None:
    """Priorities override the learned order: under kvtier-predict-cost too, the system
    prompt at 90 outlives blocks at the default."""
    mgr = make_manager(eviction_policy="kvtier-predict-cost")
    mgr.add_sequence(SequenceSpec("a", list(range(1, 17)) + [0],
                                  retention=Retention((R(0, 8, 90),))))
    mgr.remove_sequence("a")
    mgr.add_sequence(SequenceSpec("c", [20, 21, 22, 23, 24, 25, 26, 27, 0]))
    mgr.remove_sequence("c")
    mgr.add_sequence(SequenceSpec("b", list(range(100, 120))))
    assert mgr.lookup(list(range(1, 17)) + [0]).num_tokens == 8
    mgr.check_invariants()


def test_a_scheduled_request_carries_its_retention_to_the_cache() -> None:
    """``Request.retention`` reaches the blocks through the scheduler."""
    mgr = make_manager(num_gpu_blocks=16)
    scheduler = Scheduler(mgr, SchedulerConfig(max_num_tokens=64))
    scheduler.add_request(Request("a", list(range(1, 14)), 1,
                                  retention=Retention((R(0, 8, 80),))))
    step = scheduler.step()
    scheduler.update(step, {"a": 99})
    assert not scheduler.has_unfinished()
    assert [p for _, p in priorities(mgr)] == [80, 80, 35]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "append", "remove"]), st.integers(0, 5),
                          st.lists(st.integers(1, 3), min_size=1, max_size=14),
                          retentions()), max_size=25))
def test_random_calls_keep_the_books_and_every_release_sets_the_reference_priorities(
        calls: list[tuple[str, int, list[int],
                          tuple[list[tuple[int, int | None, int]], int | None]]]) -> None:
    """After every call the books recount; after every release, each block of the request
    that no one holds any more carries the reference's priority for its position."""
    tpb = 2
    mgr = make_manager(tokens_per_block=tpb, num_gpu_blocks=24)
    live: dict[str, tuple[list[int], int, list[tuple[int, int | None, int]], int | None]] = {}
    for op, i, tokens, (ranges, decode) in calls:
        rid = f"r{i}"
        if op == "add" and rid not in live:
            spec = SequenceSpec(rid, tokens, retention=Retention(
                tuple(R(s, e, p) for s, e, p in ranges), decode_priority=decode))
            if mgr.add_sequence(spec).admitted:
                live[rid] = (list(tokens), len(tokens), ranges, decode)
        elif op == "append" and rid in live:
            if mgr.append_tokens(rid, tokens) is not None:
                live[rid][0].extend(tokens)
        elif op == "remove" and rid in live:
            all_tokens, num_prompt, ranges, decode = live.pop(rid)
            mgr.remove_sequence(rid)
            by_prefix = priority_by_prefix(mgr)
            num_full = len(all_tokens) // tpb
            expected = reference(ranges, num_prompt, num_full, tpb, 35, decode)
            for block in range(num_full):
                got = by_prefix.get(tuple(all_tokens[:(block + 1) * tpb]))
                if got is not None:  # cached, and no other request holds it
                    assert got == expected[block], (rid, block)
        mgr.check_invariants()


def test_a_preempted_requests_output_stays_decoded_blocks() -> None:
    """A request preempted mid-decode is admitted again with its output as tokens to
    prefill; the scheduler marks where that output begins, so the block its later decoding
    fills still takes ``decode_priority``, not the prompt's settings."""
    mgr = make_manager(num_gpu_blocks=4)
    s = Scheduler(mgr, SchedulerConfig(max_num_tokens=16, capacity_policy="max_utilization"))
    s.add_request(Request("old", [1, 2, 3, 4, 5, 6, 7], 6))
    s.add_request(Request("new", [9, 9, 9, 9, 8, 8, 8], 6,
                          retention=Retention(decode_priority=5)))
    preempted: list[str] = []
    token = 11
    while s.has_unfinished():
        step = s.step()
        preempted += step.preempted_request_ids
        sampled = {c.request_id: token for c in step.context_chunks}
        sampled.update({rid: token for rid in step.decode_request_ids})
        s.update(step, sampled)
        mgr.check_invariants()
        token += 1
    assert preempted == ["new"]
    by_prefix = priority_by_prefix(mgr)
    new = [p for prefix, p in by_prefix.items() if prefix[:4] == (9, 9, 9, 9)]
    # Block 0 and block 1 (tokens 4..7: its first token is the prompt's) at the default,
    # block 2 (tokens 8..11, all sampled, the last two after the preemption) at 5.
    assert new == [35, 35, 5]
