"""Red team 32a: the KV event streams without a Redis server: a stale snapshot of an old
incarnation, entries that carry nothing, and hostile input to the subscriber's memory.

Every count here is exact; each test failed before its fix.
"""

from __future__ import annotations

import pytest

from fake_stream_redis import FakeRedis
from kvtier.event_codec import encode_events, encode_snapshot
from kvtier.events import BlockStored
from kvtier.publisher import (
    EventBatch,
    InMemoryEventBus,
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


def test_a_snapshot_naming_the_incarnation_before_a_restart_is_refused(
        fake_redis: FakeRedis) -> None:
    """Instance a restarts behind its publisher (seq 0 again: a new incarnation); a
    snapshot naming the publisher's first incarnation explicitly is the old one's: refused
    with a ValueError naming both, nothing stored. Before, it was relabelled to the new
    incarnation and stored: subscribers applied the blocks of before the restart."""
    publisher = RedisStreamPublisher("redis://fake", incarnation="p1")
    publisher.publish("a", [stored(0, 100), stored(1, 101)])
    publisher.publish("a", [stored(0, 200)])  # the manager restarted
    new = publisher.incarnation_of("a")
    assert new != "p1"
    stale = Snapshot("a", 2, frozenset({(100, G), (101, G)}), incarnation="p1")
    with pytest.raises(ValueError, match=f"{new!r}, got 'p1'"):
        publisher.publish_snapshot(stale)
    assert "{kvtier:events}:snapshot:a" not in fake_redis.keys
    assert publisher.num_failed_batches == 0
    publisher.publish_snapshot(Snapshot("a", 1, frozenset({(200, G)}), incarnation=None))
    assert f'"p":"{new}"'.encode() in fake_redis.keys["{kvtier:events}:snapshot:a"]
    # an instance that never restarted still takes its snapshot naming "p1"
    publisher.publish("b", [stored(0, 300)])
    publisher.publish_snapshot(Snapshot("b", 1, frozenset({(300, G)}), incarnation="p1"))
    assert b'"p":"p1"' in fake_redis.keys["{kvtier:events}:snapshot:b"]


@pytest.mark.parametrize("fields", [
    {"i": "ghost", "e": "[]", "n": "p1"},  # no events, no goodbye
    {"i": "ghost", "e": "[]"},  # of a publisher older than n
    {"i": "", "e": '[["S",0,1,null,0,4,null,[1,2,3,4],null,null]]', "n": "p1"},
    {"i": "", "e": "[]", "n": "p1", "g": "1"},  # an empty id's goodbye
    {"i": "", "e": "not json"},
])
def test_an_entry_of_nothing_is_malformed_and_makes_no_state(
        fake_redis: FakeRedis, fields: dict[str, str]) -> None:
    """An entry with no events and no goodbye, or with an empty instance id, between two
    good entries of b: counted malformed, no tracker entry, no resync asked; b's entries
    delivered. Before, each made a tracker entry ("ghost" or "") kept until
    forget_after_s."""
    publisher = RedisStreamPublisher("redis://fake")
    subscriber = RedisStreamSubscriber("redis://fake")
    publisher.publish("b", [stored(0, 1)])
    fake_redis.xadd("kvtier:events", dict(fields))
    publisher.publish("b", [stored(1, 2)])
    assert subscriber.poll() == [EventBatch("b", [stored(0, 1)]), EventBatch("b", [stored(1, 2)])]
    assert subscriber.num_malformed_entries == 1
    assert sorted(subscriber.tracker.streams) == ["b"]
    assert subscriber.num_resync_requests == 0


def test_an_empty_instance_id_is_refused_by_every_publisher(fake_redis: FakeRedis) -> None:
    """``publish("", ...)`` raises a ValueError naming the field on the Redis publisher and
    the in-memory bus, sending nothing. Before, both published it."""
    publisher = RedisStreamPublisher("redis://fake")
    with pytest.raises(ValueError, match="instance_id must be a non-empty str"):
        publisher.publish("", [stored(0, 1)])
    assert fake_redis.streams == {}
    bus = InMemoryEventBus()
    subscriber = bus.subscribe()
    with pytest.raises(ValueError, match="instance_id must be a non-empty str"):
        bus.publish("", [stored(0, 1)])
    assert subscriber.poll() == []


def test_keys_of_a_publisher_before_hash_tags_are_still_read(fake_redis: FakeRedis) -> None:
    """A publisher of before hash tags wrote instance a's claim and snapshot under
    ``kvtier:events:...``: a subscriber of now follows that claim (an entry of another
    incarnation is skipped as replaced) and resyncs from that snapshot, where the keys of
    now (``{kvtier:events}:...``) are missing; where both are there, the new one wins."""
    old = "kvtier:events:"
    fake_redis.set(old + "incarnation:a", "p0")
    subscriber = RedisStreamSubscriber("redis://fake")
    # NOTE: these entries' hashes were unreadable ("1", no 32 hex digits): a's first
    # entry read is a gap only where its events read; an unreadable one of an instance
    # never read makes no state (red team 33a).
    fake_redis.xadd("kvtier:events", {"i": "a", "e": encode_events([stored(0, 1)]), "n": "p0"})
    fake_redis.xadd("kvtier:events", {"i": "a", "e": encode_events([stored(2, 3)]),
                                      "n": "p0"})  # seq 1 lost: a gap
    subscriber.poll()
    assert subscriber.tracker.stale_instances() == ["a"]
    fake_redis.xadd("kvtier:events", {"i": "a", "e": "[]", "n": "late", "g": "1"})
    fake_redis.set(old + "snapshot:a", encode_snapshot(
        Snapshot("a", 3, frozenset({(1, G), (3, G)}), incarnation="p0")))
    subscriber.poll()
    assert subscriber.tracker.stale_instances() == []
    assert subscriber.tracker.num_resyncs == 1 and sorted(subscriber.tracker.streams) == ["a"]
    assert subscriber.tracker.num_other_incarnation == 1  # the late goodbye: replaced
    fake_redis.set("{kvtier:events}:snapshot:a", encode_snapshot(
        Snapshot("a", 3, frozenset({(5, G)}), incarnation="p0")))
    fresh = RedisStreamSubscriber("redis://fake")  # reads the gap again: stale
    out = fresh.poll()
    assert [u.blocks for u in out if isinstance(u, Snapshot)] == [frozenset({(5, G)})]
