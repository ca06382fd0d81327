"""The step's fast paths equal the checked ones: the scheduler's decode batch
(``KVCacheManager.append_token_columns``, two lists) against ``append_token_batch`` (pairs), and
the queue hint skipped exactly where the manager's version and the head's ids are the last
hint's."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from kvtier import CacheConfig, KVCacheManager, SequenceSpec
from kvtier.scheduler import Request, Scheduler, SchedulerConfig


def make_manager(num_gpu_blocks: int = 24, num_host_blocks: int = 8) -> KVCacheManager:
    return KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=num_gpu_blocks,
                                      num_host_blocks=num_host_blocks), clock=lambda: 0.0)


def observe(mgr: KVCacheManager, rids: Sequence[str]) -> tuple[object, ...]:
    """What a caller sees of ``mgr`` (the plan taken), its books checked first."""
    mgr.check_invariants()
    plan = mgr.take_plan()
    return (mgr.version, dataclasses.asdict(mgr.stats), mgr.num_free_gpu_blocks,
            mgr.num_free_host_blocks, [mgr.block_table(r) for r in rids],
            list(plan.ops),
            [mgr.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9, 1])])


@pytest.mark.parametrize("seed", range(12))
def test_the_scheduler_decode_path_equals_the_checked_batch(seed: int) -> None:
    """Random admissions, decode batches (some short of blocks), releases: each batch
    through ``append_token_columns`` on one manager and ``append_token_batch`` on its twin gives
    the same count applied and the same observable state after every operation."""
    rng = random.Random(seed)
    fast, checked = make_manager(), make_manager()
    live: list[str] = []
    for i in range(120):
        op = rng.random()
        if op < 0.3 or not live:
            rid = f"r{i}"
            prompt = [rng.randint(1, 3) for _ in range(rng.randint(1, 14))]
            admitted = [m.add_sequence(SequenceSpec(rid, prompt)).admitted
                        for m in (fast, checked)]
            assert admitted[0] == admitted[1]
            if admitted[0]:
                live.append(rid)
        elif op < 0.85:
            rids = rng.sample(live, rng.randint(1, len(live)))
            tokens = [rng.randint(0, 3) for _ in rids]
            done = fast.append_token_columns(rids, tokens)
            assert done == checked.append_token_batch(list(zip(rids, tokens, strict=True)))
        else:
            rid = live.pop(rng.randrange(len(live)))
            for m in (fast, checked):
                m.remove_sequence(rid)
        assert observe(fast, live) == observe(checked, live)


@pytest.mark.parametrize(("rids", "tokens", "error", "message"), [
    (["live", "ghost"], [6, 1], KeyError, "item 1: unknown request_id 'ghost'"),
    (["live", "other"], [6, -1], ValueError, "item 1: the token appended to 'other'"),
    (["live", "other"], [6, 2**63], ValueError, "item 1: the token appended to 'other'"),
    (["live", "other"], [6, True], ValueError, "item 1: the token appended to 'other'"),
    (["live", "other"], [6, 1.0], ValueError, "item 1: the token appended to 'other'"),
    (["live", "chunked"], [6, 1], ValueError, "'chunked' still has 2 unscheduled prompt"),
    (["live", "other"], [6], ValueError, "request_ids has 2 ids but tokens has 1 tokens"),
    (["live", ["other"]], [6, 1], KeyError, "item 1: unknown request_id \\[.other.\\]"),
    ([], [6], ValueError, "request_ids has 0 ids but tokens has 1 tokens"),
    ("live", [6], ValueError, "request_ids must be a list, got 'live'"),
    (["live"], 6, ValueError, "tokens must be a list, got 6"),
    (("live", "ghost"), (6, 1), KeyError, "item 1: unknown request_id 'ghost'"),
])
def test_the_scheduler_decode_path_refuses_what_the_checked_batch_refuses(
        rids: Any, tokens: Any, error: type[Exception], message: str) -> None:
    """A bad value or shape in the two columns raises the checked path's error naming the
    item (or the column), and nothing is applied (item 0 stays unappended)."""
    mgr = make_manager()
    for rid, spec in [("live", SequenceSpec("live", [1, 2, 3, 4, 5])),
                      ("other", SequenceSpec("other", [9, 9])),
                      ("chunked", SequenceSpec("chunked", [7, 7, 7, 7, 7], num_new_tokens=3))]:
        assert mgr.add_sequence(spec).admitted, rid
    before = observe(mgr, ["live", "other", "chunked"])
    with pytest.raises(error, match=message):
        mgr.append_token_columns(rids, tokens)
    assert observe(mgr, ["live", "other", "chunked"]) == before


def test_the_queue_hint_is_skipped_exactly_when_nothing_it_names_changed() -> None:
    """Over a replay with a queue, the scheduler hints the manager at a step exactly when
    the manager's version or the ids at the head of the queue differ from the last hint's
    (the rule the hint's cheaper check must keep: a decision input)."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=40, num_host_blocks=40,
                                     eviction_policy="kvtier-predict-cost"), clock=lambda: 0.0)
    assert mgr.ranks_soft_claims
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=24, max_batch_size=6))
    calls: list[tuple[int, list[str]]] = []
    seen: list[tuple[int, list[str]]] = []
    hint = mgr.hint_waiting

    def hint_waiting(specs: Sequence[SequenceSpec]) -> None:
        calls.append((mgr.version, [s.request_id for s in specs]))
        hint(specs)

    mgr.hint_waiting = hint_waiting  # type: ignore[method-assign]
    original: Callable[[], None] = sched._hint_queue

    def hint_queue() -> None:
        seen.append((mgr.version,
                     [r.request_id for r in list(sched.waiting)[:Scheduler.MAX_HINTED]]))
        original()

    sched._hint_queue = hint_queue  # type: ignore[method-assign]
    rng = random.Random(3)
    expected: list[tuple[int, list[str]]] = []
    for i in range(300):
        for _ in range(rng.choice([0, 0, 0, 1, 3])):
            sched.add_request(Request(f"q{i}-{len(sched.waiting)}",
                                      [rng.randint(1, 4) for _ in range(rng.randint(2, 20))],
                                      rng.randint(1, 6)))
        if not sched.has_unfinished():
            continue
        step = sched.step()
        if not expected or seen[-1] != expected[-1]:
            expected.append(seen[-1])
        sampled = {c.request_id: 5 for c in step.context_chunks}
        sampled.update(dict.fromkeys(step.decode_request_ids, 5))
        sched.update(step, sampled)
    assert len(seen) > 200 and len(calls) < len(seen)  # some skipped, some not
    assert calls == expected


def test_with_schedule_is_replace_of_the_two_scheduling_fields() -> None:
    """``SequenceSpec.with_schedule`` (the scheduler's candidate spec, a copy field by field
    from a name tuple built once) equals ``dataclasses.replace`` of its two fields; bad
    values are refused as the constructor refuses them."""
    spec = SequenceSpec("r", [1, 2, 3, 4, 5], salt="s", lora_id=3, priority=7,
                        retention_s=2.5)
    copy = spec.with_schedule(3, 2)
    assert copy == dataclasses.replace(spec, num_new_tokens=3, num_reserved_blocks=2)
    assert copy.token_array is spec.token_array
    with pytest.raises(ValueError,
                       match=r"num_reserved_blocks must be an integer in 0\.\.4294967296, got -1"):
        spec.with_schedule(3, -1)
