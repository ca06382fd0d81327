"""Red team 29a, the router and its event feed: per-instance state bounded by the live
instances, restarts seen without their seq 0, and fleet figures of what was served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fake_clock import FakeClock
from fake_stream_redis import FakeRedis
from kvtier import publisher
from kvtier.cli import main
from kvtier.config import CacheConfig
from kvtier.event_codec import encode_events
from kvtier.events import AllBlocksCleared, BlockStored, Event
from kvtier.publisher import (
    EventBatch,
    InMemoryEventBus,
    RedisStreamPublisher,
    RedisStreamSubscriber,
    Snapshot,
)
from kvtier.router import CacheAware, InstanceLoad, PrefixHit, PrefixIndex, Router
from kvtier.scheduler import SchedulerConfig
from kvtier.sim.fleet import simulate_fleet
from kvtier.sim.fleet_report import format_fleet_report
from kvtier.sim.workload import TraceRequest
from kvtier.tier import Tier
from list_workload import ListWorkload

G = Tier.GPU

pytest_plugins = ["shared_fixtures"]  # fake_redis

# ---- the fleet counts only what it served ------------------------------------------------------

def _fleet_workload() -> ListWorkload:
    """Ten requests, one every second; r1, r4 and r7 need more than the 8 GPU blocks of 4
    tokens an instance has (40 tokens: 10 blocks with their output)."""
    requests = []
    for k in range(10):
        size = 40 if k in (1, 4, 7) else 8
        requests.append(TraceRequest(f"r{k}", float(k), [1000 * k + t for t in range(size)], 2))
    return ListWorkload(requests)


def test_a_fleet_counts_skipped_requests_apart_from_those_it_routed() -> None:
    """Round robin over two instances: the three requests too large for any instance were
    routed first and skipped by the instance they reached: i0 read 5 routed and i1 5
    (3 of them skipped), the router's stats 10 routed. Now they are skipped before
    routing: 7 routed (4 and 3, in turn), 3 skipped, the router's stats 7."""
    cache = CacheConfig(tokens_per_block=4, num_gpu_blocks=8, num_host_blocks=0)
    report = simulate_fleet(_fleet_workload(), cache, 2, "round-robin",
                            SchedulerConfig(max_batch_size=4))
    assert [s.num_routed for s in report.instances] == [4, 3]
    assert [s.num_requests for s in report.instances] == [4, 3]
    assert report.num_requests == 7 and report.num_rejected_too_large == 3
    assert report.router_stats["num_routed"] == 7
    assert report.router_stats["per_instance"] == {"i0": 4, "i1": 3}
    assert report.requests_max_over_mean == 4 / 3.5
    lines = format_fleet_report(report)
    assert lines[1].startswith("requests    7 finished, 3 too large;")
    assert "requests max/mean 1.14" in lines[5]


def test_the_fleet_table_and_json_agree_on_what_was_served(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``kvtier replay --instances 2``: six requests, two of them past the 64 GPU blocks
    of 32 tokens (3,000 tokens): the table's routed column and the JSON's per-instance
    counts read 4 and 2 (3 and 3 before, skipped ones included), the router's stats 4."""
    path = tmp_path / "trace.csv"
    rows = [(100, 4), (3000, 4), (100, 4), (3000, 4), (100, 4), (100, 4)]
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:15:{10 + k:02d},{n},{m}\n" for k, (n, m) in enumerate(rows)))
    code, out, _ = _run_cli(capsys, "replay", str(path), "--no-progress", "--instances", "2",
                            "--router", "round-robin", "--gpu-blocks", "64", "--host-blocks", "0",
                            "--json", str(tmp_path / "report.json"))
    assert code == 0
    table = out.splitlines()
    assert table[1].startswith("requests    4 finished, 2 too large;")
    rows_out = [line.split()[:2] for line in table if line.startswith("i")
                and line.split()[0] in ("i0", "i1")]
    assert rows_out == [["i0", "2"], ["i1", "2"]]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["num_routed"] for s in report["instances"]] == [2, 2]
    assert report["num_rejected_too_large"] == 2 and report["num_requests"] == 4
    assert report["router_stats"]["num_routed"] == 4
    assert report["requests_max_over_mean"] == 1.0


def _run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- a Redis stream restart whose seq 0 was trimmed -----------------------------------------


def stored(seq: int, h: int) -> BlockStored:
    """A BlockStored event of one 4-token block."""
    return BlockStored(seq, h, None, G, 4, None, (1, 2, 3, 4), None, None)


@pytest.mark.parametrize("with_xinfo", [True, False])
def test_a_restart_whose_seq_0_was_trimmed_is_resynced(
        fake_redis: FakeRedis, monkeypatch: pytest.MonkeyPatch, with_xinfo: bool) -> None:
    """Instance a published seq 0..9 (blocks 100..109), then its process restarted and
    published seq 0..4 (blocks 1..5), one entry each, on a stream of MAXLEN 3: the
    subscriber never read the new seq 0 or 1. It read seq 2..4 as already applied
    (skipped; without XINFO, no word at all) or, seeing the trim, went stale and then
    refused the new incarnation's snapshot (next_seq 5 <= 9 read): the index held the old
    blocks, or none, until the new counter passed 9. Now each entry names its publisher's
    incarnation: the restart is seen at seq 2, the snapshot applied."""
    if not with_xinfo:
        monkeypatch.delattr(FakeRedis, "xinfo_stream")
    old = RedisStreamPublisher("redis://fake", maxlen=100)
    sub = RedisStreamSubscriber("redis://fake")
    index = PrefixIndex()
    for seq in range(10):
        old.publish("a", [stored(seq, 100 + seq)])
    index.apply_updates(sub.poll())
    assert index.blocks("a") == {100 + seq: G for seq in range(10)}
    new = RedisStreamPublisher("redis://fake", maxlen=3)  # the restarted process
    for seq in range(5):
        new.publish("a", [stored(seq, 1 + seq)])
    index.apply_updates(sub.poll())
    assert sub.tracker.num_restarts == 1
    assert index.blocks("a") == {} and sub.tracker.stale_instances() == ["a"]
    assert new.resync_requests() == {"a"}
    new.publish_snapshot(Snapshot("a", 5, frozenset((h, G) for h in range(1, 6))))
    new.publish("a", [stored(5, 6)])
    index.apply_updates(sub.poll())
    assert index.blocks("a") == {h: G for h in range(1, 7)}
    assert sub.tracker.stale_instances() == [] and sub.tracker.num_resyncs == 1


def test_a_restart_whose_seq_0_batch_failed_never_resyncs_from_the_old_snapshot(
        fake_redis: FakeRedis) -> None:
    """The restarted process's seq 0 batch failed (Redis down), and with it the delete of
    the old incarnation's snapshot (next_seq 10, blocks 100..109). The subscriber sees the
    restart at seq 1 by its incarnation and goes stale: the old snapshot covered seq 1, so
    it was applied (blocks gone with the old process routed to) and seq 1..9 skipped.
    Now the delete goes with the instance's next batch sent, where the snapshot names no
    other incarnation; this one names the old process's and stays (red team 29a, h-snap:
    an old process's owed delete took the new one's), refused by the subscriber."""
    old = RedisStreamPublisher("redis://fake")
    sub = RedisStreamSubscriber("redis://fake")
    index = PrefixIndex()
    old.publish("a", [stored(seq, 100 + seq) for seq in range(10)])
    old.publish_snapshot(Snapshot("a", 10, frozenset((100 + seq, G) for seq in range(10))))
    index.apply_updates(sub.poll())
    new = RedisStreamPublisher("redis://fake")
    fake_redis.down = 1
    new.publish("a", [stored(0, 1)])
    assert new.num_failed_batches == 1
    new.publish("a", [stored(1, 2)])
    index.apply_updates(sub.poll())
    assert index.blocks("a") == {} and sub.tracker.stale_instances() == ["a"]
    assert sub.tracker.num_other_incarnation == 1
    assert publisher.decode_snapshot(fake_redis.keys["{kvtier:events}:snapshot:a"]).incarnation \
        == old.incarnation
    new.publish_snapshot(Snapshot("a", 2, frozenset([(1, G), (2, G)])))
    new.publish("a", [stored(2, 3)])
    index.apply_updates(sub.poll())
    assert index.blocks("a") == {1: G, 2: G, 3: G}


def test_entries_without_an_incarnation_are_read_by_their_seq_as_before(
        fake_redis: FakeRedis) -> None:
    """An entry of an earlier publisher (no ``n`` field) decodes as before: in seq order
    applied, a seq 0 after others a restart, a later seq (2 after the new 0) a gap."""
    sub = RedisStreamSubscriber("redis://fake")
    index = PrefixIndex()
    for seq, h in ((0, 1), (1, 2), (0, 7), (2, 8)):
        fake_redis.xadd("kvtier:events", {"i": "a", "e": encode_events([stored(seq, h)])})
    updates = sub.poll()
    index.apply_updates(updates)
    assert [type(u).__name__ for u in updates] == [
        "EventBatch", "EventBatch", "InstanceLost", "EventBatch", "InstanceLost"]
    assert sub.tracker.num_restarts == 1 and sub.tracker.num_gaps == 1
    assert index.blocks("a") == {}  # forgotten at the gap, stale until a snapshot
    assert sub.tracker.stale_instances() == ["a"]


def test_a_publisher_refuses_an_incarnation_it_cannot_send(fake_redis: FakeRedis) -> None:
    with pytest.raises(ValueError, match=r"incarnation must be None or a str of 1\.\.64 "
                                         r"characters, got ''"):
        RedisStreamPublisher("redis://fake", incarnation="")


# ---- per-instance state bounded by the live instances ------------------------------------------

HORIZON_S = 15.0  # forget_after_s: pods are stepped 10 s apart, live ones publish each step
LIVE = 4  # pods live at once: pod k joins at step k and leaves at step k + LIVE


def _pod_prompt(k: int) -> list[int]:
    """A shared 8-token system prompt, then 8 tokens of pod k's own (4 tokens a block)."""
    return [1, 2, 3, 4, 5, 6, 7, 8] + [10_000 + 8 * k + t for t in range(8)]


class _Pod:
    """An engine as the router sees it: its id, seq counter and what it holds."""

    def __init__(self, router: Router, k: int) -> None:
        self.instance_id = f"pod-{k}"
        self.next_seq = 0
        self.held: set[int] = set()
        self.own = router.block_hashes(_pod_prompt(k))
        self.batches: list[list[Event]] = []  # every batch it published

    def batch(self, hashes: list[int], clear: bool = False) -> list[Event]:
        events: list[Event] = []
        if clear:
            events.append(AllBlocksCleared(self.next_seq))
            self.next_seq += 1
            self.held.clear()
        for h in hashes:
            events.append(stored(self.next_seq, h))
            self.next_seq += 1
            self.held.add(h)
        self.batches.append(events)
        return events

    def snapshot(self) -> Snapshot:
        return Snapshot(self.instance_id, self.next_seq, frozenset((h, G) for h in self.held))


def test_a_thousand_pods_through_join_publish_leave_leave_nothing_behind() -> None:
    """1,000 pod ids join, publish, take a request, and leave: a third by the bus's
    ``forget``, a third clearing their cache and going quiet, a third quiet (a crash).
    The router's index (an empty entry per cleared or lost id), its stats' per-instance
    counts, the subscriber's streams and the bus's snapshot sources (the quiet ones' the
    fleet's controller forgets 30 s on) each kept one entry per id ever seen (1,000
    each). Now, after every step, each holds the 4 live pods and at most the two that
    went quiet within 15 s (forgotten then); a pod back under an old id is read as new;
    and the routing equals a fresh router's fed the live pods' events."""
    clock = FakeClock()
    bus = InMemoryEventBus()
    sub = bus.subscribe(forget_after_s=HORIZON_S, clock=clock)
    router = Router(CacheAware(), tokens_per_block=4)
    pods: dict[str, _Pod] = {}
    order: list[_Pod] = []
    for k in range(1000):
        clock.now = 10.0 * k
        pod = _Pod(router, k)
        pods[pod.instance_id] = pod
        order.append(pod)
        bus.register_snapshot(pod.instance_id, pod.snapshot)
        bus.publish(pod.instance_id, pod.batch(pod.own))
        if k >= LIVE:
            gone = order[k - LIVE]
            del pods[gone.instance_id]
            if k % 3 == 0:
                bus.forget(gone.instance_id)
            elif k % 3 == 1:
                bus.publish(gone.instance_id, gone.batch([], clear=True))
        if k >= LIVE + 3 and k % 3 != 0:
            # The fleet's controller sees later that one that went quiet is gone (by then
            # forgotten by the subscriber: nothing more to forget there).
            bus.forget(order[k - 3 - LIVE].instance_id)
        for other in pods.values():  # the live ones are heard every step
            if other is not pod:
                bus.publish(other.instance_id, other.batch([10**9 + k]))
        router.apply_updates(sub.poll())
        loads = [InstanceLoad(iid, 0, 8) for iid in pods]
        decision = router.route(_pod_prompt(k), loads)
        assert decision.instance_id == pod.instance_id and decision.hit == PrefixHit(3, 0)
        # Bounded by the live pods, plus those quiet within the horizon: the one that left
        # this step (k - 4; last heard a step ago), and one that cleared its cache a step
        # ago (heard then); none of the 1,000 ids before. The index forgets a cleared one
        # at once.
        quiet = [order[j - LIVE].instance_id for j in (k, k - 1)
                 if j >= LIVE and (j % 3 == 1 or (j == k and j % 3 == 2))]
        crashed = [order[k - LIVE].instance_id] if k >= LIVE and k % 3 == 2 else []
        assert sorted(sub.tracker.streams) == sorted([*pods, *quiet]), k
        assert sorted(router.stats.per_instance) == sorted([*pods, *quiet]), k
        assert sorted(router.index.instances()) == sorted([*pods, *crashed]), k
        registered = [order[j - LIVE].instance_id for j in (k, k - 1, k - 2)
                      if j >= LIVE and j % 3 != 0]
        assert sorted(bus._snapshot_sources) == sorted([*pods, *registered]), k
    router.index.check_invariants()
    assert router.stats.num_routed == 1000
    assert sum(router.stats.per_instance.values()) + router.stats.num_routed_forgotten == 1000
    clock.now += HORIZON_S + 1  # the last quiet one expires; the live ones speak
    for pod in pods.values():
        bus.publish(pod.instance_id, pod.batch([2 * 10**9]))
    router.apply_updates(sub.poll())
    live = sorted(pods)
    assert sorted(sub.tracker.streams) == live and sorted(router.index.instances()) == live
    assert sorted(router.stats.per_instance) == live
    assert sub.tracker.num_forgotten == 996 and sub._dropped == {}
    # Holders: the 2 shared blocks, each live pod's 2 own, and the blocks published since.
    assert len(router.index._holders) == len({h for p in pods.values() for h in p.held})

    # The same decisions as a fresh router fed only the live pods' events.
    fresh_bus = InMemoryEventBus()
    fresh_sub = fresh_bus.subscribe()
    fresh = Router(CacheAware(), tokens_per_block=4)
    for pod in pods.values():
        for events in pod.batches:
            fresh_bus.publish(pod.instance_id, events)
    fresh.apply_updates(fresh_sub.poll())
    assert fresh.index._blocks == router.index._blocks
    assert fresh.index._holders == router.index._holders
    loads = [InstanceLoad(iid, depth, 8) for depth, iid in enumerate(live)]
    for k in [0, 500, *range(995, 1000)]:
        fresh.policy._next = router.policy._next  # type: ignore[attr-defined]
        assert router.route(_pod_prompt(k), loads) == fresh.route(_pod_prompt(k), loads)

    # A pod back under a forgotten id is a new instance: from its seq 0 ...
    again = _Pod(router, 0)
    bus.publish(again.instance_id, again.batch(again.own))
    router.apply_updates(sub.poll())
    assert router.index.blocks("pod-0") == {h: G for h in again.own}
    # ... or from a later seq (a gap), resynced from its snapshot source.
    later = _Pod(router, 1)
    later.next_seq = 7
    later.held = set(later.own)
    bus.register_snapshot(later.instance_id, later.snapshot)
    bus.publish(later.instance_id, later.batch([3 * 10**9]))
    router.apply_updates(sub.poll())
    assert router.index.blocks("pod-1") == {h: G for h in [*later.own, 3 * 10**9]}


def test_a_redis_subscriber_forgets_pods_gone_quiet_and_stops_asking_for_them(
        fake_redis: FakeRedis) -> None:
    """1,000 pod ids on a Redis stream, each publishing twice and going quiet; every
    other one lost an entry (a gap: stale, a snapshot asked for, none ever comes). The
    subscriber kept a stream per id (1,000) and asked again for the 500 stale ones' every
    ``resync_retry_s`` for ever. Now one not heard from for ``forget_after_s`` is
    forgotten, its request with it: after every poll the subscriber holds the pods heard
    within 15 s, and a forgotten one is never asked for again."""
    clock = FakeClock()
    pub = RedisStreamPublisher("redis://fake")
    sub = RedisStreamSubscriber("redis://fake", resync_retry_s=1.0, forget_after_s=HORIZON_S,
                                clock=clock)
    router = Router(CacheAware(), tokens_per_block=4)
    for k in range(1000):
        clock.now = 10.0 * k
        iid = f"pod-{k}"
        pub.publish(iid, [stored(0, 1000 * k)])
        pub.publish(iid, [stored(2 if k % 2 else 1, 1000 * k + 1)])  # odd ones: a gap
        router.apply_updates(sub.poll())
        heard = [f"pod-{j}" for j in (k - 1, k) if j >= 0]
        assert sorted(sub.tracker.streams) == sorted(heard), k
        assert sorted(sub._asked) == [i for i in heard if int(i[4:]) % 2], k
        assert router.index.instances() == [i for i in heard if int(i[4:]) % 2 == 0], k
    asked = [f[b"i"].decode() for _, f in fake_redis.streams["kvtier:events:resync"]]
    # Each stale pod asked for at its gap and once more 10 s on, never after it was forgotten.
    assert asked == [f"pod-{j}" for k in range(1000) for j in (k - 1, k)
                     if j >= 0 and j % 2][-1000:]
    assert sub.tracker.num_forgotten == 998
    clock.now += HORIZON_S + 1
    router.apply_updates(sub.poll())
    assert sub.tracker.streams == {} and sub._asked == {}
    assert router.index.instances() == [] and router.index._holders == {}
    assert router.stats.per_instance == {}
    # A pod back under a forgotten id, from its seq 0 on, is read at once.
    pub.publish("pod-2", [stored(0, 7)])
    router.apply_updates(sub.poll())
    assert router.index.blocks("pod-2") == {7: G}


def test_a_retiring_publisher_leaves_no_snapshot_key(fake_redis: FakeRedis) -> None:
    """Each instance's snapshot key stayed in Redis for good: one per id ever seen. Now
    ``forget`` deletes it (a failure counted), and ``snapshot_ttl_s`` bounds one left by
    an engine that never retired (a crash)."""
    pub = RedisStreamPublisher("redis://fake", snapshot_ttl_s=600)
    for k in range(100):
        pub.publish_snapshot(Snapshot(f"pod-{k}", 1, frozenset([(k, G)])))
    assert len(fake_redis.keys) == 100
    assert set(fake_redis.ttls.values()) == {600}
    for k in range(99):
        pub.forget(f"pod-{k}")
    assert list(fake_redis.keys) == ["{kvtier:events}:snapshot:pod-99"]
    fake_redis.down = 1
    pub.forget("pod-99")
    assert pub.num_failed_batches == 1 and len(fake_redis.keys) == 1
    with pytest.raises(ValueError, match=r"snapshot_ttl_s must be .*got 0"):
        RedisStreamPublisher("redis://fake", snapshot_ttl_s=0)
    with pytest.raises(TypeError, match=r"instance_id must be a str, got 5"):
        pub.forget(5)  # type: ignore[arg-type]


def test_a_retiring_old_process_leaves_the_new_ones_snapshot(fake_redis: FakeRedis) -> None:
    """Instance a restarted: the new process published its seq 0 and its snapshot; the
    old one, retiring gracefully, then ``forget`` s a. Its delete took the new snapshot,
    and a subscriber stale on a waited for another. Now the key goes only where its
    snapshot names the retiring incarnation, or none (of a publisher older than ``p``)."""
    key = "{kvtier:events}:snapshot:a"
    old = RedisStreamPublisher("redis://fake", incarnation="old")
    new = RedisStreamPublisher("redis://fake", incarnation="new")
    new.publish("a", [stored(0, 1)])
    new.publish_snapshot(Snapshot("a", 1, frozenset([(1, G)])))
    old.forget("a")
    assert old.num_failed_batches == 0
    assert publisher.decode_snapshot(fake_redis.keys[key]).incarnation == "new"
    new.forget("a")
    assert key not in fake_redis.keys
    fake_redis.keys[key] = b'{"i":"a","n":1,"b":[]}'  # an earlier publisher's: goes
    old.forget("a")
    assert key not in fake_redis.keys


def test_an_old_process_retrying_its_seq_0_delete_leaves_the_new_ones_snapshot(
        fake_redis: FakeRedis) -> None:
    """The old process's seq 0 batch failed (its delete owed with its next batch); a new
    process then published its seq 0 and snapshot, and the old one sent its seq 1: the
    owed delete took the new snapshot. Now it leaves a snapshot of another incarnation,
    and a seq 0 batch still deletes one of its own (an earlier manager of this process)
    or of none."""
    key = "{kvtier:events}:snapshot:a"
    old = RedisStreamPublisher("redis://fake", incarnation="old")
    new = RedisStreamPublisher("redis://fake", incarnation="new")
    fake_redis.down = 1
    old.publish("a", [stored(0, 100)])
    new.publish("a", [stored(0, 1)])
    new.publish_snapshot(Snapshot("a", 1, frozenset([(1, G)])))
    old.publish("a", [stored(1, 101)])
    assert old.num_failed_batches == 1 and len(fake_redis.streams["kvtier:events"]) == 2
    assert publisher.decode_snapshot(fake_redis.keys[key]).incarnation == "new"
    new.publish("a", [stored(0, 2)])  # its manager restarted: its own snapshot goes
    assert key not in fake_redis.keys
    fake_redis.keys[key] = b'{"i":"a","n":5,"b":[]}'
    new.publish("a", [stored(0, 3)])
    assert key not in fake_redis.keys and new.num_failed_batches == 0


@pytest.mark.parametrize("value", [-1.0, float("nan"), "60", True, 2e9])
def test_a_forget_horizon_a_clock_cannot_use_is_refused(fake_redis: FakeRedis,
                                                        value: object) -> None:
    with pytest.raises(ValueError, match=r"forget_after_s must be .*got"):
        InMemoryEventBus().subscribe(forget_after_s=value)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"forget_after_s must be .*got"):
        RedisStreamSubscriber("redis://fake", forget_after_s=value)  # type: ignore[arg-type]


def test_forgetting_an_id_that_is_no_str_changes_nothing(fake_redis: FakeRedis) -> None:
    bus = InMemoryEventBus()
    sub = bus.subscribe()
    bus.publish("a", [stored(0, 1)])
    redis_sub = RedisStreamSubscriber("redis://fake")
    for forget in (bus.forget, sub.forget, redis_sub.forget, Router(CacheAware(), 4).forget):
        with pytest.raises(TypeError, match=r"instance_id must be a str, got 5"):
            forget(5)  # type: ignore[arg-type]
    assert sub.poll() == [EventBatch("a", [stored(0, 1)])]


# ---- state of an old incarnation never applied after the new one was seen -----------------------


def test_a_late_snapshot_of_the_old_process_is_refused_after_a_restart(
        fake_redis: FakeRedis) -> None:
    """The old process (seq 0..9, blocks 100..109) writes its snapshot (next_seq 10) after
    the restarted one's seq 0 deleted the key; the new one's seq 1 is lost (a gap at
    seq 2: stale). The subscriber applied the old snapshot (it covered seq 2): the index
    held blocks 100..109, gone with the old process, and the new seq 3..9 were skipped
    as covered. Now the snapshot names its incarnation and is refused (counted); the
    instance stays stale, asks again, and resyncs from the new one's snapshot. (Red team
    30b: the new process claims the instance, so the old one's write is refused at the
    source, ``num_refused_snapshots``, and no subscriber is offered it.)"""
    clock = FakeClock()
    old = RedisStreamPublisher("redis://fake")
    sub = RedisStreamSubscriber("redis://fake", clock=clock)
    index = PrefixIndex()
    old.publish("a", [stored(seq, 100 + seq) for seq in range(10)])
    index.apply_updates(sub.poll())
    new = RedisStreamPublisher("redis://fake")
    new.publish("a", [stored(0, 1)])
    old.publish_snapshot(Snapshot("a", 10, frozenset((100 + seq, G) for seq in range(10))))
    assert old.num_refused_snapshots == 1 and "{kvtier:events}:snapshot:a" not in fake_redis.keys
    new.publish("a", [stored(2, 3)])  # seq 1 lost
    index.apply_updates(sub.poll())
    assert index.blocks("a") == {}
    assert sub.tracker.stale_instances() == ["a"] and sub.tracker.num_resyncs == 0
    assert new.resync_requests() == {"a"}
    clock.now += 1.0
    index.apply_updates(sub.poll())  # still no snapshot: asked again
    assert sub.tracker.stale_instances() == ["a"] and index.blocks("a") == {}
    assert sub.tracker.num_other_incarnation == 0 and sub.num_resync_requests == 2
    new.publish_snapshot(Snapshot("a", 3, frozenset([(1, G), (2, G), (3, G)])))
    new.publish("a", [stored(3, 4)])
    index.apply_updates(sub.poll())
    assert index.blocks("a") == {1: G, 2: G, 3: G, 4: G}
    assert sub.tracker.stale_instances() == [] and sub.tracker.num_resyncs == 1
    index.check_invariants()


def test_a_snapshot_names_its_publishers_incarnation_and_old_ones_read_as_before(
        fake_redis: FakeRedis) -> None:
    """A stored snapshot carries ``p``, its publisher's incarnation; one of another is
    refused by the publisher, storing nothing. A snapshot without ``p`` (an earlier
    publisher's) decodes as before and is applied by its seq alone."""
    pub = RedisStreamPublisher("redis://fake", incarnation="run-1")
    pub.publish_snapshot(Snapshot("a", 1, frozenset([(5, G)])))
    assert json.loads(fake_redis.keys["{kvtier:events}:snapshot:a"]) == {
        "i": "a", "n": 1, "b": [["0" * 31 + "5", 0]], "p": "run-1"}
    with pytest.raises(ValueError, match=r"snapshot\.incarnation must be None or this "
                                         r"publisher's 'run-1', got 'run-2'"):
        pub.publish_snapshot(Snapshot("b", 1, frozenset(), "run-2"))
    assert "{kvtier:events}:snapshot:b" not in fake_redis.keys
    assert publisher.decode_snapshot(b'{"i":"a","n":1,"b":[]}') == Snapshot("a", 1, frozenset())
    for bad in ('"p":""', '"p":null', '"p":7', '"q":"x"'):
        with pytest.raises(ValueError, match=r"malformed snapshot: (incarnation must be a "
                                             r"string of 1\.\.64|an object with exactly)"):
            publisher.decode_snapshot('{"i":"a","n":1,"b":[],' + bad + "}")
    with pytest.raises(ValueError, match=r"Snapshot\.incarnation must be None or a str of "
                                         r"1\.\.64 characters, got ''"):
        Snapshot("a", 1, frozenset(), "")
    # an old-format snapshot resyncs a stream that names an incarnation, by its seq alone
    sub = RedisStreamSubscriber("redis://fake")
    pub.publish("a", [stored(0, 1), stored(2, 3)])  # a gap at seq 2
    sub.poll()
    fake_redis.keys["{kvtier:events}:snapshot:a"] = (
        b'{"i":"a","n":3,"b":[["' + b"0" * 31 + b'3",0]]}')
    updates = sub.poll()
    assert updates == [Snapshot("a", 3, frozenset([(3, G)]))]
    assert sub.tracker.num_other_incarnation == 0


def test_late_entries_of_the_old_process_are_skipped_after_a_restart(
        fake_redis: FakeRedis) -> None:
    """The old process (seq 0..9, blocks 100..109) is still up after the restart: it
    adds seq 10 (block 110) and its snapshot (next_seq 11) after the new one's seq 0..2
    (blocks 1..3) were read. Its entry read as yet another restart (the new blocks
    forgotten, a gap at seq 10: stale) and its snapshot, of the incarnation read last,
    was applied: the index held the old blocks, then, at the new one's seq 3, none (a
    restart again, a gap). Now an incarnation once replaced stays retired: its entries are
    skipped (counted), its snapshot refused, and the new one's seq 3 applies."""
    old = RedisStreamPublisher("redis://fake")
    sub = RedisStreamSubscriber("redis://fake")
    index = PrefixIndex()
    old.publish("a", [stored(seq, 100 + seq) for seq in range(10)])
    index.apply_updates(sub.poll())
    new = RedisStreamPublisher("redis://fake")
    new.publish("a", [stored(seq, 1 + seq) for seq in range(3)])
    index.apply_updates(sub.poll())
    assert index.blocks("a") == {1: G, 2: G, 3: G} and sub.tracker.num_restarts == 1
    old.publish("a", [stored(10, 110)])
    old.publish_snapshot(Snapshot("a", 11, frozenset((100 + seq, G) for seq in range(11))))
    updates = sub.poll()
    assert updates == []
    index.apply_updates(updates)
    assert index.blocks("a") == {1: G, 2: G, 3: G}
    assert sub.tracker.stale_instances() == [] and sub.tracker.num_restarts == 1
    assert (sub.tracker.num_other_incarnation, sub.tracker.num_skipped) == (1, 1)
    new.publish("a", [stored(3, 4)])
    index.apply_updates(sub.poll())
    assert index.blocks("a") == {1: G, 2: G, 3: G, 4: G}
    assert sub.tracker.num_gaps == 0 and sub.tracker.num_resyncs == 0
    for k in range(10):  # ten restarts more: the last 8 replaced are remembered
        RedisStreamPublisher("redis://fake", incarnation=f"run-{k}").publish("a", [stored(0, k)])
    sub.poll()
    assert sub.tracker.streams["a"].retired == tuple(f"run-{k}" for k in range(1, 9))
    # Red team 30b: run-9 claims the instance last, so run-0..8 are skipped as replaced
    # when read: one restart, not ten.
    assert sub.tracker.streams["a"].incarnation == "run-9" and sub.tracker.num_restarts == 2


def test_one_subscribers_expiry_keeps_the_bus_snapshot_source_for_all() -> None:
    """Two subscribers of one bus, one forgetting instances quiet for 10 s, one never.
    Instance a (blocks 1, 2) goes quiet 11 s: the first forgets it (``InstanceGone``),
    the second keeps its blocks, and the bus keeps its source: when a speaks again (seq
    2, a gap for the first) the first resyncs from it to exactly a's blocks. Only
    ``forget`` (a left, as its owner says) drops the source, for every subscriber."""
    clock = FakeClock()
    bus = InMemoryEventBus()
    brief = bus.subscribe(forget_after_s=10.0, clock=clock)
    patient = bus.subscribe(clock=clock)
    held = {1: G, 2: G}
    bus.register_snapshot("a", lambda: Snapshot("a", 3, frozenset({**held, 3: G}.items())))
    bus.publish("a", [stored(0, 1), stored(1, 2)])
    first, second = PrefixIndex(), PrefixIndex()
    first.apply_updates(brief.poll())
    second.apply_updates(patient.poll())
    clock.now = 11.0
    gone = brief.poll()
    assert gone == [publisher.InstanceGone("a")] and patient.poll() == []
    first.apply_updates(gone)
    assert first.instances() == [] and second.blocks("a") == held
    assert list(bus._snapshot_sources) == ["a"]
    bus.publish("a", [stored(2, 3)])
    updates = brief.poll()
    assert updates == [publisher.InstanceLost("a", 0, 2),
                       Snapshot("a", 3, frozenset({(1, G), (2, G), (3, G)}))]
    first.apply_updates(updates)
    second.apply_updates(patient.poll())
    assert first.blocks("a") == second.blocks("a") == {1: G, 2: G, 3: G}
    bus.forget("a")
    assert bus._snapshot_sources == {}
    assert brief.poll() == patient.poll() == [publisher.InstanceGone("a")]


def test_an_instance_forgotten_holding_blocks_is_resynced_when_it_speaks_again(
        fake_redis: FakeRedis) -> None:
    """With the default horizon (an hour): instance a holds blocks 1..3 and goes quiet
    for 3,601 s; the subscriber forgets it (the router drops its blocks, its stats). Its
    next entry (seq 3) is a gap of a new stream: stale, asked for, and resynced from the
    snapshot it answers, never from one it stored before (next_seq 2, covered)."""
    clock = FakeClock()
    pub = RedisStreamPublisher("redis://fake")
    sub = RedisStreamSubscriber("redis://fake", clock=clock)
    assert sub.forget_after_s == 3600.0
    router = Router(CacheAware(), tokens_per_block=4)
    pub.publish("a", [stored(0, 1), stored(1, 2)])
    pub.publish_snapshot(Snapshot("a", 2, frozenset([(1, G), (2, G)])))
    pub.publish("a", [stored(2, 3)])
    router.apply_updates(sub.poll())
    router.stats.per_instance["a"] = 5
    clock.now = 3600.0
    router.apply_updates(sub.poll())
    assert router.index.blocks("a") == {1: G, 2: G, 3: G}  # an hour quiet: kept
    clock.now = 3601.0
    assert sub.poll() == [publisher.InstanceGone("a")]
    router.apply_updates([publisher.InstanceGone("a")])
    assert router.index.instances() == [] and router.stats.per_instance == {}
    assert router.stats.num_routed_forgotten == 5
    pub.publish("a", [stored(3, 4)])
    router.apply_updates(sub.poll())
    assert router.index.instances() == [] and sub.tracker.stale_instances() == ["a"]
    assert pub.resync_requests() == {"a"}
    pub.publish_snapshot(Snapshot("a", 4, frozenset((h, G) for h in (1, 2, 3, 4))))
    router.apply_updates(sub.poll())
    assert router.index.blocks("a") == {1: G, 2: G, 3: G, 4: G}
    assert sub.tracker.num_resyncs == 1 and sub.tracker.stale_instances() == []


def test_an_unreadable_entry_of_a_new_incarnation_is_its_restart(
        fake_redis: FakeRedis) -> None:
    """The restarted process's first entry read is unreadable (its events garbled), and
    the old process writes its snapshot (next_seq 10) late. The entry was a hole of the
    old incarnation's stream: stale, the old snapshot (next_seq 10 > 9 read) applied, its
    blocks 100..109 routed to. Now the entry's incarnation says the instance restarted:
    the old one is retired, its snapshot refused, and the new one's applied. (Red team
    30b: the new process claims the instance with its first entry, so the old one's
    snapshot is refused at the source and never offered.)"""
    old = RedisStreamPublisher("redis://fake")
    sub = RedisStreamSubscriber("redis://fake")
    index = PrefixIndex()
    old.publish("a", [stored(seq, 100 + seq) for seq in range(10)])
    index.apply_updates(sub.poll())
    fake_redis.set("{kvtier:events}:incarnation:a", "run-2")  # its claim, with its entry
    fake_redis.xadd("kvtier:events", {"i": "a", "e": "garbled", "n": "run-2"})
    old.publish_snapshot(Snapshot("a", 10, frozenset((100 + seq, G) for seq in range(10))))
    assert old.num_refused_snapshots == 1
    updates = sub.poll()
    assert updates == [publisher.InstanceLost("a", 10, 0), publisher.InstanceLost("a", 0, None)]
    index.apply_updates(updates)
    assert index.blocks("a") == {} and sub.tracker.stale_instances() == ["a"]
    assert sub.tracker.streams["a"].incarnation == "run-2"
    assert sub.num_malformed_entries == 1 and sub.tracker.num_other_incarnation == 0
    new = RedisStreamPublisher("redis://fake", incarnation="run-2")
    new.publish_snapshot(Snapshot("a", 2, frozenset([(1, G), (2, G)])))
    index.apply_updates(sub.poll())
    assert index.blocks("a") == {1: G, 2: G} and sub.tracker.stale_instances() == []
    # an unreadable entry of the retired old process is no hole of the new one
    fake_redis.xadd("kvtier:events", {"i": "a", "e": "garbled", "n": old.incarnation})
    assert sub.poll() == [] and sub.num_malformed_entries == 2
    assert sub.tracker.stale_instances() == [] and sub.tracker.num_other_incarnation == 1


class _TickingClock:
    """A clock one second later at each reading, as a slow poll's."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_an_instance_heard_in_a_poll_is_not_forgotten_by_that_poll(
        fake_redis: FakeRedis) -> None:
    """``forget_after_s=0``: forget whatever was not heard since the last poll. The
    clock read at the expiry is later than when the poll heard the instance, so a poll
    returned its batch and then ``InstanceGone``: the consumer dropped blocks it had just
    read. Now a poll forgets by the clock read as it started: the instance goes at the
    next poll that does not hear it."""
    bus = InMemoryEventBus()
    sub = bus.subscribe(forget_after_s=0.0, clock=_TickingClock())
    redis_sub = RedisStreamSubscriber("redis://fake", forget_after_s=0.0, clock=_TickingClock())
    RedisStreamPublisher("redis://fake").publish("a", [stored(0, 1)])
    bus.publish("a", [stored(0, 1)])
    assert sub.poll() == [EventBatch("a", [stored(0, 1)])]
    assert redis_sub.poll() == [EventBatch("a", [stored(0, 1)])]
    assert sub.poll() == redis_sub.poll() == [publisher.InstanceGone("a")]


def test_a_restart_seen_by_seq_0_forgets_the_incarnation_a_snapshot_named() -> None:
    """In-memory batches name no incarnation; a snapshot source may (run-1). After a
    restart seen by its seq 0, the stream kept run-1, and refused every snapshot of the
    restarted instance's new source (run-2) as of another incarnation: stale for ever.
    Now a restart the batch names no incarnation of forgets the one known."""
    bus = InMemoryEventBus()
    sub = bus.subscribe(max_events=1)
    answer = Snapshot("a", 2, frozenset([(1, G), (2, G)]), "run-1")
    bus.register_snapshot("a", lambda: answer)
    bus.publish("a", [stored(0, 1), stored(1, 2)])  # seq 0 dropped: stale, resynced
    index = PrefixIndex()
    index.apply_updates(sub.poll())
    assert index.blocks("a") == {1: G, 2: G} and sub.tracker.streams["a"].incarnation == "run-1"
    bus.publish("a", [stored(0, 7)])  # the restart
    index.apply_updates(sub.poll())
    assert index.blocks("a") == {7: G} and sub.tracker.streams["a"].incarnation is None
    answer = Snapshot("a", 3, frozenset([(7, G), (8, G), (9, G)]), "run-2")
    bus.publish("a", [stored(1, 8), stored(2, 9)])  # seq 1 dropped: stale
    index.apply_updates(sub.poll())
    assert index.blocks("a") == {7: G, 8: G, 9: G} and sub.tracker.stale_instances() == []
    assert sub.tracker.num_other_incarnation == 0


def test_entries_read_after_an_instance_was_forgotten_do_not_bring_it_back(
        fake_redis: FakeRedis) -> None:
    """Engine b retires (``forget`` at its publisher and the subscriber) with entries the
    subscriber had not read yet: its next poll read them as a new instance's, b's blocks
    held for an hour (``forget_after_s``), or, from a gap, asked for every second. Now
    the subscriber skips b's entries added before it was forgotten; b publishing again
    is a new instance. With Redis down at ``forget`` (no last id known) it is as before."""
    pub = RedisStreamPublisher("redis://fake")
    sub = RedisStreamSubscriber("redis://fake")
    index = PrefixIndex()
    pub.publish("a", [stored(0, 1)])
    pub.publish("b", [stored(0, 5)])
    index.apply_updates(sub.poll())
    pub.publish("b", [stored(1, 6)])
    pub.publish("c", [stored(0, 9)])  # never read before c is forgotten
    pub.publish("a", [stored(1, 2)])
    for iid in ("b", "c"):
        pub.forget(iid)
        sub.forget(iid)
    updates = sub.poll()
    assert updates == [publisher.InstanceGone("b"), EventBatch("a", [stored(1, 2)])]
    index.apply_updates(updates)
    assert index.instances() == ["a"] and sorted(sub.tracker.streams) == ["a"]
    assert sub.tracker.stale_instances() == [] and sub._forgotten == {}
    back = RedisStreamPublisher("redis://fake")  # b again, a new instance
    back.publish("b", [stored(0, 7)])
    index.apply_updates(sub.poll())
    assert index.blocks("b") == {7: G}
    pub.publish("d", [stored(0, 3)])
    fake_redis.down = 1
    sub.forget("d")
    index.apply_updates(sub.poll())
    assert index.blocks("d") == {3: G}
