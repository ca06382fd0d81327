"""Red team, fifteenth pass: the simulator, router, events and publisher as a library
(hostile configs and workloads given as objects, batches out of order, sinks that fail).
Each test fails on the code before its fix and asserts the exact refusal and that nothing
else changed (no progress call, no request served)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import pytest

from kvtier import CacheConfig, SchedulerConfig
from kvtier.event_codec import Snapshot
from kvtier.events import BlockRemoved, BlockStored
from kvtier.publisher import EventBatch, InstanceLost, SeqTracker, Update
from kvtier.router import (
    CacheAware,
    InstanceLoad,
    PrefixHit,
    RouteDecision,
    Router,
    RouterStats,
)
from kvtier.sim import (
    OracleRequest,
    RaceWorkload,
    TraceRequest,
    belady_hit_tokens,
    lru_hit_tokens,
    simulate,
    unlimited_hit_tokens,
)
from kvtier.sim.fleet import simulate_fleet
from kvtier.tier import Tier

CACHE = CacheConfig(tokens_per_block=16, num_gpu_blocks=64, num_host_blocks=0)


class Objects:
    """A workload of request objects given by the caller (a test's, a notebook's)."""

    name = "objects"

    def __init__(self, requests: list[object]) -> None:
        self.requests = requests

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.requests)

    def describe(self) -> dict[str, object]:
        return {"num_requests": len(self.requests)}


def req(request_id: str, arrival_s: float, token: int = 1) -> TraceRequest:
    return TraceRequest(request_id, arrival_s, [token] * 20, 3)


def fleet(workload: object, cache: object, **kwargs: object) -> object:
    return simulate_fleet(workload, cache, 2, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("run", [simulate, fleet], ids=["simulate", "fleet"])
@pytest.mark.parametrize(("kwargs", "error", "message"), [
    # before: AttributeError ('list' has no 'describe') after the whole replay had run
    ({"workload": [req("a", 0.0)]}, TypeError,
     "workload must be a Workload (name, describe() and __iter__), got "
     "[TraceRequest(request_id='a', arrival_s=0.0, prompt=[1, 1, 1, 1, 1, 1, 1, 1, ..."),
    # before: AttributeError 'int' object has no attribute 'admission', from deep inside
    ({"sched": 5}, TypeError, "sched must be a SchedulerConfig or None, got 5"),
    # before: TypeError 'int' object is not callable, after the first request was served
    ({"progress": 5}, TypeError, "progress must be a callable or None, got 5"),
    # before (fleet): TypeError from dataclasses.replace, naming no argument
    ({"cache": 5}, TypeError, "cache must be a CacheConfig, got 5"),
])
def test_replay_arguments_of_the_wrong_kind_are_refused_before_any_step(
        run: Callable[..., object], kwargs: dict[str, object], error: type[Exception],
        message: str) -> None:
    calls: list[int] = []
    args: dict[str, object] = {"workload": Objects([req("a", 0.0)]), "cache": CACHE,
                               "progress": calls.append}
    args.update(kwargs)
    workload, cache = args.pop("workload"), args.pop("cache")
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        run(workload, cache, **args)
    assert calls == []  # not a request served


@pytest.mark.parametrize("flag", ["oracle", "phases"])
def test_simulate_flags_must_be_bools(flag: str) -> None:
    """before: ``phases="no"`` timed every phase, ``oracle="no"`` ran the oracles."""
    calls: list[int] = []
    with pytest.raises(TypeError, match=f"^{flag} must be a bool, got 'no'$"):
        options: dict[str, Any] = {flag: "no"}
        simulate(Objects([req("a", 0.0)]), CACHE, progress=calls.append, **options)
    assert calls == []


@pytest.mark.parametrize("run", [simulate, fleet], ids=["simulate", "fleet"])
def test_a_workload_yielding_a_non_request_names_its_position(run: Callable[..., object]) -> None:
    """before: AttributeError 'int' object has no attribute 'arrival_s'."""
    with pytest.raises(ValueError, match=r"^request 1 of the workload must be a TraceRequest, "
                                         r"got 5$"):
        run(Objects([req("a", 0.0), 5]), CACHE)


@pytest.mark.parametrize("run", [simulate, fleet], ids=["simulate", "fleet"])
def test_a_workload_out_of_arrival_order_is_refused(run: Callable[..., object]) -> None:
    """before: "b" (arriving at 1 s) was queued after "a" at 5 s and its latencies counted
    from 1 s: a TTFT of four seconds no engine took. The trace readers refuse such lines;
    a workload of objects now meets the same contract."""
    with pytest.raises(ValueError, match=re.escape(
            "request 1 of the workload ('b') arrives at 1.0 s, before the request before it "
            "(5.0 s): a workload yields requests in arrival order")):
        run(Objects([req("a", 5.0), req("b", 1.0, token=2)]), CACHE)


def test_a_workload_in_order_with_equal_arrivals_still_replays() -> None:
    report = simulate(Objects([req("a", 1.0), req("b", 1.0, token=2), req("c", 2.0)]), CACHE,
                      sched=SchedulerConfig())
    assert report.num_requests == 3


# ---- the subscriber's gap tracker, fed directly ----------------------------------------------


def tracker_with_one_batch() -> tuple[SeqTracker, list[Update]]:
    """A tracker that has taken seq 0 of instance "a"."""
    tracker, out = SeqTracker(), []  # type: ignore[var-annotated]
    tracker.receive("a", [BlockRemoved(0, 5, Tier.GPU)], out)
    return tracker, out


@pytest.mark.parametrize(("call", "error", "message"), [
    # before: AttributeError 'int' object has no attribute 'seq', seq 1 already taken
    (lambda t, out: t.receive("a", [BlockRemoved(1, 5, Tier.GPU), 5], out), TypeError,
     "events[1] must be a BlockStored, BlockRemoved, BlockTierChanged or AllBlocksCleared, "
     "got 5"),
    # before: a stream for the int 7, which no wire batch can name
    (lambda t, out: t.receive(7, [], out), TypeError, "instance_id must be a str, got 7"),
    (lambda t, out: t.lose(7, out), TypeError, "instance_id must be a str, got 7"),
    # before: AttributeError 'int' object has no attribute 'instance_id'
    (lambda t, out: t.offer(5, out), TypeError, "offer needs a Snapshot, got 5"),
])
def test_a_tracker_fed_garbage_refuses_it_changing_nothing(
        call: Callable[[SeqTracker, list[Update]], object], error: type[Exception],
        message: str) -> None:
    tracker, out = tracker_with_one_batch()
    before = (dataclasses.replace(tracker.streams["a"]), dict(tracker.streams), len(out))
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        call(tracker, out)
    assert (tracker.streams["a"], dict(tracker.streams), len(out)) == before
    assert (tracker.num_gaps, tracker.num_skipped, tracker.num_resyncs) == (0, 0, 0)
    # the next good event is taken as if the garbage had never come
    tracker.receive("a", [BlockRemoved(1, 5, Tier.GPU)], out)
    assert out[-1] == EventBatch("a", [BlockRemoved(1, 5, Tier.GPU)])
    assert tracker.streams["a"].next_seq == 2


def test_a_tracker_fed_a_reordered_batch_loses_the_instance_until_a_snapshot() -> None:
    """What held: seq 2 before seq 1 is a hole (the instance is lost, its blocks
    forgotten), seq 1 after it is skipped, and a snapshot covering both resyncs it."""
    tracker, out = tracker_with_one_batch()
    tracker.receive("a", [BlockRemoved(2, 5, Tier.GPU), BlockRemoved(1, 6, Tier.GPU)], out)
    assert out[1:] == [InstanceLost("a", 1, 2)]
    assert (tracker.num_gaps, tracker.num_skipped) == (1, 2)
    assert not tracker.offer(Snapshot("a", 2, frozenset()), out)  # covers only seq 0 and 1
    assert tracker.offer(Snapshot("a", 3, frozenset()), out)
    tracker.receive("a", [BlockRemoved(3, 7, Tier.GPU)], out)
    assert out[-1] == EventBatch("a", [BlockRemoved(3, 7, Tier.GPU)])


# ---- the router, an instance gone ----------------------------------------------------------


def test_an_instance_gone_from_the_loads_sets_no_best_prefix() -> None:
    """before: the index still held the blocks of "gone" (its InstanceLost not yet seen),
    which the caller no longer offers: every decision said a prefix of 2 blocks existed
    (best_hit_blocks 2) and the stats counted 3 routes that missed the best prefix."""
    router = Router(CacheAware(), 4)
    tokens = list(range(8))
    hashes = router.block_hashes(tokens)
    router.index.apply("gone", [
        BlockStored(i, h, hashes[i - 1] if i else None, Tier.GPU, 4, None,
                    tuple(tokens[4 * i:4 * i + 4]), None, None) for i, h in enumerate(hashes)])
    offered = [InstanceLoad("a", 0, 4), InstanceLoad("b", 0, 4)]
    decisions = [router.route(tokens, offered) for _ in range(3)]
    assert decisions == [RouteDecision("a", 2, PrefixHit(0, 0), 0),
                         RouteDecision("b", 2, PrefixHit(0, 0), 0),
                         RouteDecision("a", 2, PrefixHit(0, 0), 0)]
    assert router.stats == RouterStats(num_routed=3, num_with_prefix=0, num_best_prefix=0,
                                       num_predicted_hit_blocks=0, num_prompt_blocks=6,
                                       per_instance={"a": 2, "b": 1})
    assert router.index.num_blocks("gone") == 2  # the index is the subscriber's to clear
    # offered again, it is routed to for its prefix
    back = router.route(tokens, [*offered, InstanceLoad("gone", 0, 4)])
    # (one block promised: the second holds the prompt's last token, which a manager
    # computes: test_red_team_26b)
    assert back == RouteDecision("gone", 2, PrefixHit(1, 0), 1)


@pytest.mark.parametrize("run", [simulate, fleet], ids=["simulate", "fleet"])
def test_a_workload_repeating_a_request_id_is_refused(run: Callable[..., object]) -> None:
    """before: the second "a" was refused by the scheduler while the first was queued
    (simulate) or served beside it on another instance (a fleet: two requests counted)."""
    calls: list[int] = []
    with pytest.raises(ValueError, match=re.escape(
            "request 1 of the workload has the id 'a' of an earlier request: a workload's "
            "request ids are distinct")):
        run(Objects([req("a", 0.0), req("a", 0.0, token=2)]), CACHE, progress=calls.append)
    assert calls == []


# ---- the oracles and the race workload ------------------------------------------------------


@pytest.mark.parametrize("oracle", [
    lambda rs: belady_hit_tokens(rs, 4, 16), lambda rs: lru_hit_tokens(rs, 4, 16),
    lambda rs: unlimited_hit_tokens(rs, 16)], ids=["belady", "lru", "unlimited"])
@pytest.mark.parametrize(("bad", "message"), [
    # before: AttributeError 'tuple' object has no attribute 'block_keys'
    (((1, 2), 20), "a request of the oracles must be an OracleRequest, got ((1, 2), 20)"),
    (5, "a request of the oracles must be an OracleRequest, got 5"),
    # before: an OracleResult with num_tokens 36.5
    (OracleRequest((1,), 16.5),  # type: ignore[arg-type]
     "num_tokens must be an integer >= 0, got 16.5"),
    # before: TypeError 'int' has no len()
    (OracleRequest(5, 16),  # type: ignore[arg-type]
     "block_keys must be a tuple or list of keys, got 5"),
])
def test_an_oracle_fed_a_bad_request_names_it(
        oracle: Callable[[list[object]], object], bad: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        oracle([OracleRequest((7, 8), 20), bad])


def test_a_race_workload_needs_a_cache_config() -> None:
    """before: taken, an AttributeError once iterated."""
    with pytest.raises(ValueError, match=r"^cache must be a CacheConfig, got 5$"):
        RaceWorkload(5)  # type: ignore[arg-type]
