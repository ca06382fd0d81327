"""Red team 33a: the KV event streams without a Redis server: what a hostile or broken
writer can make a subscriber hold, and what a publisher keeps of instances it forgot.

Every count here is exact; each test failed before its fix.
"""

from __future__ import annotations

import pytest

from fake_stream_redis import FakeRedis
from kvtier.event_codec import encode_events
from kvtier.event_updates import MAX_INSTANCE_ID_CHARS
from kvtier.events import BlockStored
from kvtier.publisher import (
    EventBatch,
    InMemoryEventBus,
    InstanceLost,
    RedisStreamPublisher,
    RedisStreamSubscriber,
    Snapshot,
)
from kvtier.tier import Tier

pytest_plugins = ["shared_fixtures"]

G = Tier.GPU


def stored(seq: int, h: int) -> BlockStored:
    """A BlockStored event of one 4-token block."""
    return BlockStored(seq, h, None, G, 4, None, (1, 2, 3, 4), None, None)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


BAD_ENTRIES = [
    {"e": "not json", "n": "p1"},  # events unreadable
    {"e": '[["S",5', "n": "p1"},  # cut short
    {"e": encode_events([stored(0, 1)]), "n": "x" * 65},  # an n that is no incarnation
]


@pytest.mark.parametrize("fields", BAD_ENTRIES)
def test_a_malformed_entry_of_an_instance_not_read_makes_no_state(
        fake_redis: FakeRedis, fields: dict[str, str]) -> None:
    """1,000 malformed entries, each of a new id, between two good entries of b: counted
    malformed, no tracker entry, no resync asked, even after resync_retry_s passed; b's
    entries delivered. Before, each id made a stale tracker entry (1,001 entries) and a
    resync request every poll past resync_retry_s (2,000 after two polls) until
    forget_after_s."""
    clock = Clock()
    publisher = RedisStreamPublisher("redis://fake")
    subscriber = RedisStreamSubscriber("redis://fake", clock=clock)
    publisher.publish("b", [stored(0, 1)])
    for n in range(1000):
        fake_redis.xadd("kvtier:events", {"i": f"ghost-{n}", **fields})
    publisher.publish("b", [stored(1, 2)])
    assert subscriber.poll() == [EventBatch("b", [stored(0, 1)]), EventBatch("b", [stored(1, 2)])]
    clock.now = 10.0
    assert subscriber.poll() == []
    assert subscriber.num_malformed_entries == 1000
    assert sorted(subscriber.tracker.streams) == ["b"]
    assert subscriber.num_resync_requests == 0
    assert "kvtier:events:resync" not in fake_redis.streams


@pytest.mark.parametrize("fields", BAD_ENTRIES)
def test_a_malformed_entry_of_an_instance_read_is_still_a_hole(
        fake_redis: FakeRedis, fields: dict[str, str]) -> None:
    """A malformed entry of b, an instance read already, is a hole as before: b is lost
    (InstanceLost, got_seq None), stale, its snapshot asked for once."""
    publisher = RedisStreamPublisher("redis://fake", incarnation="p1")
    subscriber = RedisStreamSubscriber("redis://fake")
    publisher.publish("b", [stored(0, 1)])
    subscriber.poll()
    fake_redis.xadd("kvtier:events", {"i": "b", **fields})
    assert subscriber.poll() == [InstanceLost("b", 1, None)]
    assert subscriber.num_malformed_entries == 1
    assert subscriber.tracker.stale_instances() == ["b"]
    assert subscriber.num_resync_requests == 1


def test_the_instances_tracked_are_capped(fake_redis: FakeRedis) -> None:
    """With max_instances=8, good entries of 20 ids: 8 tracked, the 12 others' entries
    skipped and counted (num_refused_instances), none of their events delivered; once
    one is forgotten, a new one is read. Before, every id made a tracker entry (20)."""
    publisher = RedisStreamPublisher("redis://fake")
    subscriber = RedisStreamSubscriber("redis://fake", max_instances=8)
    for n in range(20):
        publisher.publish(f"i{n}", [stored(0, n)])
    out = subscriber.poll()
    assert len(subscriber.tracker.streams) == 8
    assert sorted(subscriber.tracker.streams) == sorted(f"i{n}" for n in range(8))
    assert subscriber.num_refused_instances == 12
    assert [u.instance_id for u in out] == [f"i{n}" for n in range(8)]
    publisher.publish("i3", [stored(1, 100)])  # a tracked one is still read
    assert subscriber.poll() == [EventBatch("i3", [stored(1, 100)])]
    subscriber.forget("i0")
    subscriber.poll()
    publisher.publish("late", [stored(0, 7)])
    assert subscriber.poll() == [EventBatch("late", [stored(0, 7)])]
    assert len(subscriber.tracker.streams) == 8 and subscriber.num_refused_instances == 12


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "8", None])
def test_a_bad_max_instances_is_refused(fake_redis: FakeRedis, value: object) -> None:
    """max_instances must be an int >= 1: a ValueError naming it."""
    with pytest.raises(ValueError, match="max_instances must be an int >= 1"):
        RedisStreamSubscriber("redis://fake", max_instances=value)  # type: ignore[arg-type]


def test_an_instance_id_past_its_limit_is_malformed(fake_redis: FakeRedis) -> None:
    """An entry whose id is 1 MB long: counted malformed, no state, nothing written to
    the resync stream; an id of exactly MAX_INSTANCE_ID_CHARS is read. Before, the
    megabyte id was a tracker key (and a gap there wrote it back in resync requests)."""
    subscriber = RedisStreamSubscriber("redis://fake")
    huge = "h" * 1_000_000
    fake_redis.xadd("kvtier:events", {"i": huge, "e": encode_events([stored(3, 1)]),
                                      "n": "p1"})
    longest = "l" * MAX_INSTANCE_ID_CHARS
    fake_redis.xadd("kvtier:events", {"i": longest, "e": encode_events([stored(0, 2)]),
                                      "n": "p1"})
    assert subscriber.poll() == [EventBatch(longest, [stored(0, 2)])]
    assert subscriber.num_malformed_entries == 1
    assert list(subscriber.tracker.streams) == [longest]
    assert "kvtier:events:resync" not in fake_redis.streams


def test_a_publisher_refuses_an_instance_id_past_its_limit(fake_redis: FakeRedis) -> None:
    """Both publishers refuse an id of MAX_INSTANCE_ID_CHARS + 1 characters with a
    ValueError naming its length, writing nothing. Before, the Redis publisher wrote it
    and every subscriber kept it."""
    too_long = "x" * (MAX_INSTANCE_ID_CHARS + 1)
    publisher = RedisStreamPublisher("redis://fake")
    with pytest.raises(ValueError, match=f"at most {MAX_INSTANCE_ID_CHARS} characters, "
                                         f"got {MAX_INSTANCE_ID_CHARS + 1}"):
        publisher.publish(too_long, [stored(0, 1)])
    assert fake_redis.streams == {} and fake_redis.keys == {}
    bus = InMemoryEventBus()
    subscriber = bus.subscribe()
    with pytest.raises(ValueError, match="at most"):
        bus.publish(too_long, [stored(0, 1)])
    assert subscriber.poll() == []


def publisher_books(publisher: RedisStreamPublisher) -> dict[str, int]:
    """How many instances each of the publisher's per-instance books holds."""
    names = ["_restarted", "_claim_set_s", "_owed_by", "_published", "_claimed",
             "_old_snapshots", "_forgotten"]
    return {name: len(getattr(publisher, name)) for name in names}


def test_a_publisher_keeps_nothing_of_the_instances_it_forgot(fake_redis: FakeRedis) -> None:
    """1,000 cycles of a new id: published, restarted (seq 0 again), snapshotted, every
    other one's claim taken by another incarnation, published, forgotten; every third
    one's restart, snapshot and next batch lost with Redis down. After: every book empty
    but what is kept of forgotten instances restarted (1,000, capped at 4,096).
    Before, _restarted and _claim_set_s held 1,000, _claimed 333, _owed_by 334."""
    clock = Clock()
    publisher = RedisStreamPublisher("redis://fake", snapshot_ttl_s=30, clock=clock)
    for n in range(1000):
        iid = f"i{n}"
        publisher.publish(iid, [stored(0, 1)])
        fake_redis.down = 3 if n % 3 == 0 else 0
        publisher.publish(iid, [stored(0, 2)])  # its manager restarted
        publisher.publish_snapshot(Snapshot(iid, 1, frozenset({(2, G)})))
        if n % 2:
            fake_redis.keys["{kvtier:events}:incarnation:" + iid] = b"other"
        publisher.publish(iid, [stored(1, 3)])
        publisher.forget(iid)
        clock.now += 1.0
    assert publisher_books(publisher) == {
        "_restarted": 0, "_claim_set_s": 0, "_owed_by": 0, "_published": 0, "_claimed": 0,
        "_old_snapshots": 0, "_forgotten": 1000}
    for n in range(1000):  # neither restarted nor replaced: nothing kept of them
        publisher.publish(f"plain{n}", [stored(0, 1)])
        publisher.forget(f"plain{n}")
    assert sum(publisher_books(publisher).values()) == 1000
    for n in range(1000, 5000):  # restarted and forgotten: the latest 4,096 kept
        publisher.publish(f"i{n}", [stored(0, 1)])
        publisher.publish(f"i{n}", [stored(0, 2)])
        publisher.forget(f"i{n}")
    assert publisher_books(publisher)["_forgotten"] == 4096
    assert "i903" not in publisher._forgotten
    assert "i904" in publisher._forgotten


def test_a_restarted_instance_forgotten_and_published_again_is_read(
        fake_redis: FakeRedis) -> None:
    """Instance a restarts behind its publisher (a new incarnation), is forgotten, and is
    published again from seq 0: it names the restarted incarnation still (a subscriber
    retired the publisher's first one with the restart, and would skip it), and the
    subscriber reads it as back; forgotten again, the books are empty once more."""
    publisher = RedisStreamPublisher("redis://fake", incarnation="p1")
    subscriber = RedisStreamSubscriber("redis://fake")
    publisher.publish("a", [stored(0, 1)])
    publisher.publish("a", [stored(0, 2)])  # restarted: a new incarnation
    restarted = publisher.incarnation_of("a")
    assert restarted != "p1"
    subscriber.poll()
    publisher.forget("a")
    subscriber.poll()
    assert subscriber.tracker.streams == {}
    publisher.publish("a", [stored(0, 5)])
    assert publisher.incarnation_of("a") == restarted
    assert subscriber.poll() == [EventBatch("a", [stored(0, 5)])]
    publisher.forget("a")
    assert publisher_books(publisher) == {
        "_restarted": 0, "_claim_set_s": 0, "_owed_by": 0, "_published": 0, "_claimed": 0,
        "_old_snapshots": 0, "_forgotten": 1}


def test_a_resync_request_of_no_publishable_id_is_skipped(fake_redis: FakeRedis) -> None:
    """Requests naming an empty id, a 1 MB one and no id at all, between two good ones:
    the publisher is asked for a and b only, the three counted malformed. Before, "" and
    the megabyte id were handed to the caller to answer (a snapshot of an instance no
    batch may name)."""
    publisher = RedisStreamPublisher("redis://fake")
    resync = "kvtier:events:resync"
    fake_redis.xadd(resync, {"i": "a"})
    fake_redis.xadd(resync, {"i": ""})
    fake_redis.xadd(resync, {"i": "m" * 1_000_000})
    fake_redis.xadd(resync, {"x": "no id"})
    fake_redis.xadd(resync, {"i": "b" * MAX_INSTANCE_ID_CHARS})
    assert publisher.resync_requests() == {"a", "b" * MAX_INSTANCE_ID_CHARS}
    assert publisher.num_malformed_requests == 3
