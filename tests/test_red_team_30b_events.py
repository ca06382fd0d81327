"""Red team 30b: the event transport without a Redis server: subscribers of the in-memory
bus dropped by their owner, forgotten instances, incarnations of one instance id.

Every count here is exact; each test failed before its fix.
"""

from __future__ import annotations

import gc
import weakref

from fake_clock import FakeClock
from fake_stream_redis import FakeRedis
from kvtier.events import BlockStored
from kvtier.publisher import (
    EventBatch,
    InMemoryEventBus,
    InstanceGone,
    InstanceLost,
    RedisStreamPublisher,
    RedisStreamSubscriber,
    SeqTracker,
    Snapshot,
    Update,
)
from kvtier.router import PrefixIndex
from kvtier.tier import Tier

pytest_plugins = ["shared_fixtures"]  # fake_redis

G = Tier.GPU


def stored(seq: int, h: int) -> BlockStored:
    """A BlockStored event of one 4-token block."""
    return BlockStored(seq, h, None, G, 4, None, (1, 2, 3, 4), None, None)


def test_a_bus_keeps_no_subscriber_its_owner_dropped() -> None:
    """100 subscribers made and dropped beside one kept: the bus held all 101 for ever and
    pushed every batch into each one's buffer (up to max_events each); now it holds only
    the live one, which still reads every batch."""
    bus = InMemoryEventBus()
    live = bus.subscribe(max_events=16)
    dropped = [weakref.ref(bus.subscribe(max_events=16)) for _ in range(100)]
    gc.collect()
    bus.publish("a", [stored(0, 1), stored(1, 2)])
    assert sum(ref() is not None for ref in dropped) == 0  # before: 100
    assert bus.num_subscribers == 1  # before: 101
    assert live.poll() == [EventBatch("a", [stored(0, 1), stored(1, 2)])]


def test_instances_expired_are_not_made_again_by_their_entries_read_late(
        fake_redis: FakeRedis) -> None:
    """a, b and c publish seq 0 and 1 and crash, their snapshots (next_seq 2) left under
    their keys; the subscriber, behind (``count=1``), reads their seq 1 only after it
    forgot them, quiet past ``forget_after_s``. Each was made again: a gap at seq 1, and
    the crashed process's snapshot applied (its blocks routed to): 3 resurrections. Now
    an expiry skips the entries added before it, as ``forget`` does: none."""
    clock = FakeClock()
    pub = RedisStreamPublisher("redis://fake", incarnation="run-1")
    sub = RedisStreamSubscriber("redis://fake", forget_after_s=10.0, clock=clock)
    index = PrefixIndex()
    for k, iid in enumerate("abc"):
        pub.publish(iid, [stored(0, 10 * k)])
    index.apply_updates(sub.poll())
    pub.publish("x", [stored(0, 99)])
    for k, iid in enumerate("abc"):
        pub.publish(iid, [stored(1, 10 * k + 1)])
        pub.publish_snapshot(Snapshot(iid, 2, frozenset({(10 * k, G), (10 * k + 1, G)})))
    clock.now = 11.0
    updates = sub.poll(count=1)  # x's entry; a, b and c quiet for 11 s
    assert updates == [EventBatch("x", [stored(0, 99)]), InstanceGone("a"),
                       InstanceGone("b"), InstanceGone("c")]
    index.apply_updates(updates)
    for _ in range(2):
        index.apply_updates(sub.poll())
    made_again = [iid for iid in "abc" if iid in sub.tracker.streams or index.blocks(iid)]
    assert made_again == []  # before: ['a', 'b', 'c']
    assert index.instances() == ["x"] and sub.num_resync_requests == 0


def test_a_forgotten_incarnations_past_does_not_make_it_again() -> None:
    """Instance a (run-2, which replaced run-1) is forgotten. An entry of run-2 read
    again (replayed), an unreadable one of it, a late one of run-1 and run-2's snapshot:
    before, the first made a again (a gap), the late run-1 entry was read as a restart to
    run-1 and run-1's snapshot applied: the old process's blocks routed to. Now each is
    skipped or refused; a past what was read is back."""
    clock = FakeClock()
    tracker = SeqTracker(clock=clock)
    out: list[Update] = []
    tracker.receive_checked("a", [stored(0, 1)], out, "run-1")
    tracker.receive_checked("a", [stored(0, 5), stored(1, 6)], out, "run-2")
    tracker.forget("a", out)
    assert out[-1] == InstanceGone("a")
    out.clear()
    tracker.receive_checked("a", [stored(1, 6)], out, "run-2")  # replayed
    tracker.lose_entry("a", "run-2", out)  # an unreadable entry of run-2
    tracker.receive_checked("a", [stored(2, 2)], out, "run-1")  # the old process, late
    assert not tracker.offer(Snapshot("a", 2, frozenset({(5, G), (6, G)}), "run-2"), out)
    assert not tracker.offer(Snapshot("a", 3, frozenset({(1, G)}), "run-1"), out)
    assert out == [] and tracker.streams == {}  # before: a gap, then the snapshot applied
    assert (tracker.num_past_entries, tracker.num_other_incarnation) == (3, 2)
    # run-2 only quiet: its next seq brings it back, stale until its snapshot.
    tracker.receive_checked("a", [stored(3, 7)], out, "run-2")
    assert out == [InstanceLost("a", 0, 3)]
    assert tracker.offer(Snapshot("a", 4, frozenset({(5, G), (7, G)}), "run-2"), out)
    assert tracker.streams["a"].retired == ("run-1",) and tracker.gone == {}


def test_a_replaced_process_neither_writes_its_snapshot_nor_claims_again(
        fake_redis: FakeRedis) -> None:
    """old published a, then new did (its claim). old's snapshot is refused; old retiring
    (``forget``) leaves new's claim; old publishing a again does not claim it back, so
    new's snapshot is still written, and a subscriber reading old's entry first skips it
    as replaced. Before: old's snapshot overwrote new's, which a subscriber reading new's
    entries refused (stale, asked again for ever while old answered last)."""
    claim = "{kvtier:events}:incarnation:a"
    old = RedisStreamPublisher("redis://fake", incarnation="old")
    new = RedisStreamPublisher("redis://fake", incarnation="new")
    old.publish("a", [stored(0, 100)])
    assert fake_redis.keys[claim] == b"old"
    new.publish("a", [stored(0, 1)])
    new.publish_snapshot(Snapshot("a", 1, frozenset({(1, G)})))
    old.publish_snapshot(Snapshot("a", 5, frozenset({(100, G)})))
    old.forget("a")
    old.publish("a", [stored(0, 200)])
    assert fake_redis.keys[claim] == b"new"
    new.publish_snapshot(Snapshot("a", 1, frozenset({(1, G)})))
    assert (old.num_refused_snapshots, new.num_refused_snapshots) == (1, 0)
    assert b'"p":"new"' in fake_redis.keys["{kvtier:events}:snapshot:a"]
    sub = RedisStreamSubscriber("redis://fake", start_id="2-0")  # from old's seq 0 again
    assert sub.poll() == []  # old's entry: replaced
    assert sub.tracker.streams["a"].incarnation == "new"
    assert sub.tracker.streams["a"].retired == ("old",)
    new.forget("a")
    assert claim not in fake_redis.keys


def test_a_publishers_goodbye_makes_subscribers_forget_its_instance_at_once(
        fake_redis: FakeRedis) -> None:
    """a, b and c retire (``forget`` at their publisher): their subscribers held all 3,
    and routed to them, until ``forget_after_s`` (an hour by default). Now ``forget``
    adds a final entry (``g``) and the next poll says ``InstanceGone`` for each. An old
    process's goodbye, of a replaced incarnation, leaves the new one; the entry's events
    are ``[]``, which a subscriber older than ``g`` reads as an empty batch."""
    pub = RedisStreamPublisher("redis://fake", incarnation="run-1")
    sub = RedisStreamSubscriber("redis://fake")
    index = PrefixIndex()
    for k, iid in enumerate("abc"):
        pub.publish(iid, [stored(0, k)])
    index.apply_updates(sub.poll())
    for iid in "abc":
        pub.forget(iid)
    updates = sub.poll()
    assert updates == [InstanceGone("a"), InstanceGone("b"), InstanceGone("c")]  # before: []
    index.apply_updates(updates)
    assert index.instances() == [] and sub.tracker.streams == {}
    *_, (_, goodbye) = fake_redis.streams["kvtier:events"]
    assert goodbye == {b"i": b"c", b"e": b"[]", b"n": b"run-1", b"g": b"1"}
    # The old process of d retires after the new one took d over: d stays.
    old = RedisStreamPublisher("redis://fake", incarnation="old")
    new = RedisStreamPublisher("redis://fake", incarnation="new")
    old.publish("d", [stored(0, 100)])
    new.publish("d", [stored(0, 1)])
    old.forget("d")
    index.apply_updates(sub.poll())
    assert index.blocks("d") == {1: G} and sub.tracker.streams["d"].incarnation == "new"


def test_a_stream_trimmed_to_nothing_makes_every_instance_read_stale(
        fake_redis: FakeRedis) -> None:
    """a and b add seq 1 (a block each) and go quiet; the stream is trimmed to nothing
    (MAXLEN 0) before the subscriber reads them. Its first entry id is then 0-0, read as
    "nothing trimmed past us": a and b were never stale, their lost blocks never learnt
    (0 instances lost, 0 resync requests). Now an empty stream whose last id is past the
    last one read is a trim past it: both lost, and asked for (2, 2)."""
    pub = RedisStreamPublisher("redis://fake")
    sub = RedisStreamSubscriber("redis://fake")
    for k, iid in enumerate("ab"):
        pub.publish(iid, [stored(0, k)])
    sub.poll()
    for k, iid in enumerate("ab"):
        pub.publish(iid, [stored(1, 10 + k)])
    fake_redis.xtrim("kvtier:events", maxlen=0)
    assert sub.poll() == [InstanceLost("a", 1, None), InstanceLost("b", 1, None)]  # before: []
    assert sub.tracker.stale_instances() == ["a", "b"]
    assert (sub.num_trims, sub.num_resync_requests) == (1, 2)
    assert sub.poll() == [] and sub.num_trims == 1  # said once
