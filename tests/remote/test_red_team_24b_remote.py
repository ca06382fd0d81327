"""Red team 24b, the data tiers over a real Redis server: an event stream whose first entry
a subscriber read of an instance was unreadable, resynced from a snapshot, when that
instance restarts; a subscriber and a publisher whose URL makes redis-py decode responses;
a poll that asks to wait 0 ms."""

from __future__ import annotations

import time
import uuid

from remote_helpers import RedisServers

from kvtier.events import BlockStored
from kvtier.publisher import RedisStreamPublisher, RedisStreamSubscriber, Snapshot
from kvtier.router import PrefixIndex
from kvtier.tier import Tier

G = Tier.GPU


def stored(seq: int, h: int) -> BlockStored:
    """A BlockStored event of one 4-token block."""
    return BlockStored(seq, h, None, G, 4, None, (1, 2, 3, 4), None, None)


def test_a_restart_after_a_resync_from_an_unreadable_entry(redis_servers: RedisServers) -> None:
    """A subscriber read seq 0..4 of instance "a", then an unreadable entry of "a" (a gap
    of unknown seq), so it resynced from the snapshot (next_seq 5). (It joined after
    seq 0..4 before red team 33a: an unreadable first entry of an instance never read now
    makes no state.)
    Then "a" restarted: its new seq 0 and 1 were skipped as covered by the snapshot of the
    old incarnation, the router kept the old blocks (gone) and never learnt the new ones
    until the new counter passed 5. Now the restart is seen: the index holds the new
    incarnation's blocks only."""
    url = redis_servers.url
    stream = f"kvtier:test:{uuid.uuid4().hex}"
    old = RedisStreamPublisher(url, stream)
    raw = old._redis
    index = PrefixIndex()
    try:
        old.publish("a", [stored(seq, 100 + seq) for seq in range(5)])
        raw.xadd(stream, {"i": "a", "e": "[[\"S\",5"})  # a truncated entry of "a"
        sub = RedisStreamSubscriber(url, stream)
        index.apply_updates(sub.poll())
        assert sub.num_malformed_entries == 1 and sub.tracker.stale_instances() == ["a"]
        old.publish_snapshot(Snapshot("a", 5, frozenset((100 + s, G) for s in range(5))))
        index.apply_updates(sub.poll())
        assert sub.tracker.stale_instances() == [] and len(index.blocks("a")) == 5
        new = RedisStreamPublisher(url, stream)  # the restarted process
        new.publish("a", [stored(0, 1), stored(1, 2)])
        index.apply_updates(sub.poll())
        assert index.blocks("a") == {1: G, 2: G} and sub.tracker.num_restarts == 1
        new.publish("a", [stored(2, 3)])
        index.apply_updates(sub.poll())
        assert index.blocks("a") == {1: G, 2: G, 3: G}
    finally:
        raw.delete(stream, f"{stream}:resync", f"{{{stream}}}:snapshot:a")


def test_a_subscriber_whose_url_decodes_responses_reads_its_entries(
        redis_servers: RedisServers) -> None:
    """With ``?decode_responses=true`` in the URL (a query redis-py takes, and lets win over
    its keyword arguments) XREAD answers each entry's fields as str: looked up as bytes, the
    subscriber found no field in any entry, counted each one malformed and read nothing, ever
    (no instance even reported lost), and the publisher's ``resync_requests`` never saw a
    request. Now the entries read alike on either connection, mixed with plain ones."""
    url = redis_servers.url
    decoding = f"{url}{'&' if '?' in url else '?'}decode_responses=true"
    stream = f"kvtier:test:{uuid.uuid4().hex}"
    plain = RedisStreamPublisher(url, stream)
    # one engine on two connections: one incarnation (another is a restart, red team 29a)
    publisher = RedisStreamPublisher(decoding, stream, incarnation=plain.incarnation)
    raw = plain._redis
    try:
        subscriber = RedisStreamSubscriber(decoding, stream)
        publisher.publish("a", [stored(0, 1)])
        plain.publish("a", [stored(1, 2)])
        index = PrefixIndex()
        index.apply_updates(subscriber.poll())
        assert subscriber.num_malformed_entries == 0 and index.blocks("a") == {1: G, 2: G}
        plain.publish("a", [stored(3, 4)])  # seq 2 lost: a gap, a resync request
        index.apply_updates(subscriber.poll())
        assert subscriber.tracker.stale_instances() == ["a"]
        assert publisher.resync_requests() == {"a"}
        publisher.publish_snapshot(Snapshot("a", 4, frozenset((h, G) for h in (1, 2, 3, 4))))
        index.apply_updates(subscriber.poll())
        assert index.blocks("a") == {1: G, 2: G, 3: G, 4: G}
        assert subscriber.tracker.stale_instances() == []
    finally:
        raw.delete(stream, f"{stream}:resync", f"{{{stream}}}:snapshot:a")


def test_a_poll_of_block_ms_0_waits_for_nothing(redis_servers: RedisServers) -> None:
    """``poll(block_ms=0)`` (an int >= 0, as the check asks) went to XREAD as ``BLOCK 0``,
    which Redis reads as "wait for ever": on a quiet stream the poll stalled until the
    connection's read timed out (5 s with redis-py's defaults), a fault skipped without a
    word, at every poll of a loop that meant not to wait. Now 0 waits for nothing, as
    None; a positive wait still waits and still reads what comes."""
    url = redis_servers.url
    stream = f"kvtier:test:{uuid.uuid4().hex}"
    subscriber = RedisStreamSubscriber(url, stream)
    publisher = RedisStreamPublisher(url, stream)
    try:
        started = time.monotonic()
        assert subscriber.poll(block_ms=0) == []
        assert time.monotonic() - started < 1.0
        started = time.monotonic()
        assert subscriber.poll(block_ms=200) == []
        assert time.monotonic() - started >= 0.15
        publisher.publish("a", [stored(0, 1)])
        index = PrefixIndex()
        index.apply_updates(subscriber.poll(block_ms=0))
        assert index.blocks("a") == {1: G}
    finally:
        publisher._redis.delete(stream, f"{stream}:resync")
