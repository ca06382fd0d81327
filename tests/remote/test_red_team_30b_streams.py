"""Red team 30b: KV events over a real Redis stream: forgotten instances, incarnations of
one instance id, a publisher's goodbye, a stream trimmed to nothing.

Every count here is exact; each test failed before its fix.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from remote_helpers import RedisServers

from fake_clock import FakeClock
from kvtier.events import BlockStored
from kvtier.publisher import (
    InstanceGone,
    InstanceLost,
    RedisStreamPublisher,
    RedisStreamSubscriber,
    Snapshot,
    encode_events,
)
from kvtier.router import PrefixIndex
from kvtier.tier import Tier

G = Tier.GPU


def stored(seq: int, h: int) -> BlockStored:
    """A BlockStored event of one 4-token block."""
    return BlockStored(seq, h, None, G, 4, None, (1, 2, 3, 4), None, None)


@pytest.fixture
def stream(redis_servers: RedisServers) -> Iterator[str]:
    """A fresh stream name; its keys are deleted after the test."""
    name = f"kvtier:test:{uuid.uuid4().hex}"
    yield name
    import redis

    client = redis.Redis.from_url(redis_servers.url)
    keys = list(client.scan_iter(match=f"{name}*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_entries_replayed_after_an_expiry_do_not_make_instances_again(
        redis_servers: RedisServers, stream: str) -> None:
    """a, b and c publish seq 0 and 1, store their snapshots (next_seq 2) and crash; the
    subscriber forgets them, quiet past ``forget_after_s``. Their seq 1 entries are then
    added again (a replay of the stream; a seq 0 replayed reads as a restart): each made
    its instance again, a gap and the crashed process's snapshot applied (routed to): 3
    resurrections. Now none."""
    clock = FakeClock()
    pub = RedisStreamPublisher(redis_servers.url, stream)
    sub = RedisStreamSubscriber(redis_servers.url, stream, forget_after_s=10.0, clock=clock)
    index = PrefixIndex()
    for k, iid in enumerate("abc"):
        pub.publish(iid, [stored(0, 10 * k)])
        pub.publish(iid, [stored(1, 10 * k + 1)])
        pub.publish_snapshot(Snapshot(iid, 2, frozenset({(10 * k, G), (10 * k + 1, G)})))
    index.apply_updates(sub.poll())
    assert index.instances() == ["a", "b", "c"]
    clock.now = 11.0
    assert sub.poll() == [InstanceGone("a"), InstanceGone("b"), InstanceGone("c")]
    index.apply_updates([InstanceGone(iid) for iid in "abc"])
    raw = pub._redis
    for _, fields in raw.xrange(stream)[1::2]:  # the seq 1 entries, replayed
        raw.xadd(stream, fields)
    for _ in range(2):
        index.apply_updates(sub.poll())
    made_again = [iid for iid in "abc" if iid in sub.tracker.streams or index.blocks(iid)]
    assert made_again == []  # before: ['a', 'b', 'c']
    assert sub.tracker.num_past_entries == 3 and sub.num_resync_requests == 0


@pytest.mark.parametrize("query", ["", "?protocol=3", "?decode_responses=true"])
def test_two_incarnations_of_one_instance_do_not_mix(redis_servers: RedisServers,
                                                     stream: str, query: str) -> None:
    """Engine a restarts (new) while its old process still publishes (old). A subscriber
    that joined after the new one's seq 0 reads new's seq 1 (a gap: stale), then old's
    late seq 1: before, read as another restart, new retired, its seq 2 and 3 skipped (2
    events lost for good), and both processes answering the resync, old's snapshot,
    written last, overwrote new's and was applied: the index held old's blocks 100, 101.
    Now new claims a with its first entry: old's entry is skipped, its snapshot refused
    when written (``num_refused_snapshots``), and new's applied."""
    url = redis_servers.url + query
    old = RedisStreamPublisher(url, stream, incarnation="old")
    new = RedisStreamPublisher(url, stream, incarnation="new")
    old.publish("a", [stored(0, 100)])
    new.publish("a", [stored(0, 1)])
    first_read = old._redis.xrevrange(stream, count=1)[0][0]
    new.publish("a", [stored(1, 2)])
    start_id = first_read.decode() if isinstance(first_read, bytes) else first_read
    sub = RedisStreamSubscriber(url, stream, start_id=start_id)
    index = PrefixIndex()
    index.apply_updates(sub.poll())  # new's seq 1: a gap
    old.publish("a", [stored(1, 101)])  # the old process, still up
    new.publish("a", [stored(2, 3)])
    new.publish("a", [stored(3, 4)])
    index.apply_updates(sub.poll())
    assert old.resync_requests() == new.resync_requests() == {"a"}
    new.publish_snapshot(Snapshot("a", 4, frozenset({(1, G), (2, G), (3, G), (4, G)})))
    old.publish_snapshot(Snapshot("a", 2, frozenset({(100, G), (101, G)})))
    new.publish("a", [stored(4, 5)])
    index.apply_updates(sub.poll())
    assert index.blocks("a") == {1: G, 2: G, 3: G, 4: G, 5: G}  # before: {100: G, 101: G}
    assert (old.num_refused_snapshots, new.num_refused_snapshots) == (1, 0)
    assert sub.tracker.streams["a"].retired == ("old",)
    assert (sub.tracker.num_other_incarnation, sub.tracker.num_restarts) == (1, 0)
    assert sub.tracker.stale_instances() == [] and sub.tracker.num_resyncs == 1


def test_a_publishers_goodbye_on_a_real_server(redis_servers: RedisServers,
                                               stream: str) -> None:
    """``forget`` at the publisher: before, the subscriber held a and b, routed to, until
    ``forget_after_s``; now the goodbye entry (one MULTI/EXEC with the deletes of the
    snapshot and the claim) makes the next poll forget both. Its events, ``[]``, decode
    as an empty batch, so a subscriber older than the ``g`` field reads nothing."""
    from kvtier.publisher import decode_events

    pub = RedisStreamPublisher(redis_servers.url, stream)
    sub = RedisStreamSubscriber(redis_servers.url, stream)
    for k, iid in enumerate("ab"):
        pub.publish(iid, [stored(0, k)])
        pub.publish_snapshot(Snapshot(iid, 1, frozenset({(k, G)})))
    sub.poll()
    for iid in "ab":
        pub.forget(iid)
    assert sub.poll() == [InstanceGone("a"), InstanceGone("b")]  # before: []
    raw = pub._redis
    assert raw.exists(f"{{{stream}}}:snapshot:a", f"{{{stream}}}:incarnation:a") == 0
    (_, goodbye), = raw.xrevrange(stream, count=1)
    assert goodbye[b"g"] == b"1" and decode_events(goodbye[b"e"]) == []
    assert pub.num_failed_batches == 0


def test_a_deleted_stream_is_a_resync_and_one_made_again_is_read(
        redis_servers: RedisServers, stream: str) -> None:
    """The stream is deleted with a's seq 1 unread (a server flushed, a DEL), then made
    again by an entry with an id behind the last one read (a stream restored, or a
    server whose clock is behind). Before: nothing was lost for the subscriber (0
    instances), and it read the new stream from its old last id: never an entry again
    (b's seq 0 unread after 3 polls). Now a deleted stream loses every instance read and
    reads the stream again from its start; so does one whose last id is behind ours."""
    pub = RedisStreamPublisher(redis_servers.url, stream)
    sub = RedisStreamSubscriber(redis_servers.url, stream)
    pub.publish("a", [stored(0, 1)])
    sub.poll()
    pub.publish("a", [stored(1, 2)])
    raw = pub._redis
    raw.delete(stream)
    assert sub.poll() == [InstanceLost("a", 1, None)]  # before: []
    assert sub.num_trims == 1 and sub.last_id == "0-0"
    assert sub.poll() == [] and sub.num_trims == 1
    raw.xadd(stream, {"i": "b", "e": encode_events([stored(0, 7)]), "n": "run-b"}, id="1-0")
    index = PrefixIndex()
    for _ in range(3):
        index.apply_updates(sub.poll())
    assert index.blocks("b") == {7: G}  # before: {}
    # Made again behind the last id read, without a poll between: lost, read from 0.
    sub.poll()
    raw.delete(stream)
    raw.xadd(stream, {"i": "b", "e": encode_events([stored(1, 8)]), "n": "run-b"}, id="0-5")
    updates = sub.poll()
    assert updates[0] == InstanceLost("b", 1, None) and sub.num_trims == 2


def test_a_publisher_and_a_subscriber_close_their_connections(
        redis_servers: RedisServers, stream: str) -> None:
    """``close()`` (and a ``with`` block) gives the connection back to the server: the
    server no longer lists either client's connection; closing twice is harmless. Before,
    neither had a ``close``: their sockets stayed open until collected (a ResourceWarning,
    an error under this suite's warning filter, where the collector happened to run during
    a test). The server's own list is read by client id: other jobs share the server."""
    import redis

    admin = redis.Redis.from_url(redis_servers.url)
    try:
        def listed(ids: list[Any]) -> int:
            return len(admin.client_list(client_id=ids))

        with RedisStreamPublisher(redis_servers.url, stream) as pub, \
                RedisStreamSubscriber(redis_servers.url, stream) as sub:
            pub.publish("a", [BlockStored(0, 7, None, Tier.GPU, 4, None, (1, 2, 3, 4),
                                          None, None)])
            assert len(sub.poll()) == 1
            ids: list[Any] = [pub._redis.client_id(), sub._redis.client_id()]
            assert listed(ids) == 2
        assert listed(ids) == 0
        pub.close()
        sub.close()
        assert listed(ids) == 0
    finally:
        admin.close()
