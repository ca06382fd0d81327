"""KV events over a real Redis stream: order, gaps after a trim, resync from a snapshot."""

from __future__ import annotations

import uuid

from remote_helpers import RedisServers

from kvtier.events import BlockRemoved, BlockStored, BlockTierChanged
from kvtier.publisher import RedisStreamPublisher, RedisStreamSubscriber, Snapshot
from kvtier.router import PrefixIndex
from kvtier.tier import Tier

G, H = Tier.GPU, Tier.HOST


def stored(seq: int, h: int, tier: Tier = G) -> BlockStored:
    """A BlockStored event of one 4-token block."""
    return BlockStored(seq, h, None, tier, 4, None, (1, 2, 3, 4), None, None)


def test_redis_stream_round_trip_and_resync_after_trim(redis_servers: RedisServers) -> None:
    """Events cross a Redis stream in order; a trimmed stream shows a gap, the subscriber
    asks for a resync and applies the stored snapshot."""
    url = redis_servers.url
    stream = f"kvtier:test:{uuid.uuid4().hex}"
    pub = RedisStreamPublisher(url, stream, maxlen=1000)
    sub = RedisStreamSubscriber(url, stream)
    try:
        pub.publish("a", [stored(0, 1), stored(1, 2)])
        pub.publish("a", [BlockTierChanged(2, 2, G, H)])
        index = PrefixIndex()
        index.apply_updates(sub.poll())
        assert index.blocks("a") == {1: G, 2: H}
        pub._redis.xtrim(stream, maxlen=0, approximate=False)  # everything unread is lost
        pub.publish("a", [stored(3, 3)])
        pub.publish("a", [stored(4, 4)])
        pub._redis.xtrim(stream, maxlen=1, approximate=False)  # keeps seq 4 only
        index.apply_updates(sub.poll())
        assert index.blocks("a") == {} and sub.tracker.stale_instances() == ["a"]
        assert pub.resync_requests() == {"a"}
        pub.publish_snapshot(Snapshot("a", 5, frozenset({(1, G), (2, H), (3, G), (4, G)})))
        pub.publish("a", [BlockRemoved(5, 1, G)])
        index.apply_updates(sub.poll())
        assert index.blocks("a") == {2: H, 3: G, 4: G}
        assert (sub.tracker.num_gaps, sub.tracker.num_resyncs) == (1, 1)
    finally:
        pub._redis.delete(stream, f"{stream}:resync", f"{{{stream}}}:snapshot:a")


def test_malformed_entries_are_skipped_counted_and_reported(redis_servers: RedisServers
                                                            ) -> None:
    """A bad entry between good ones: the good events before and after it (of other
    instances) are delivered, its instance is reported lost and resyncs; nothing raises."""
    from kvtier.publisher import EventBatch, InstanceLost

    url = redis_servers.url
    stream = f"kvtier:test:{uuid.uuid4().hex}"
    pub = RedisStreamPublisher(url, stream)
    sub = RedisStreamSubscriber(url, stream)
    raw = pub._redis
    try:
        pub.publish("a", [stored(0, 1)])
        pub.publish("b", [stored(0, 10)])
        raw.xadd(stream, {"i": "a", "e": "[[\"S\", 1, \"nothex\"]]"})  # a's seq 1, unreadable
        raw.xadd(stream, {"i": b"\xff\xfe", "e": "[]"})  # no readable instance id
        raw.xadd(stream, {"x": "no fields at all"})
        pub.publish("a", [stored(2, 3)])  # skipped: a is stale
        pub.publish("b", [stored(1, 11)])
        updates = sub.poll()
        assert updates == [EventBatch("a", [stored(0, 1)]), EventBatch("b", [stored(0, 10)]),
                           InstanceLost("a", 1, None), EventBatch("b", [stored(1, 11)])]
        assert (sub.num_malformed_entries, sub.tracker.num_gaps) == (3, 1)
        assert pub.resync_requests() == {"a"}
        pub.publish_snapshot(Snapshot("a", 3, frozenset({(1, G), (3, G)})))
        # stored naming its publisher's incarnation (red team 29a)
        assert sub.poll() == [Snapshot("a", 3, frozenset({(1, G), (3, G)}), pub.incarnation)]
    finally:
        raw.delete(stream, f"{stream}:resync", f"{{{stream}}}:snapshot:a")


def test_malformed_snapshot_is_skipped_and_other_instances_go_on(redis_servers: RedisServers
                                                                ) -> None:
    """A garbage snapshot (or another instance's under this key) is counted and skipped:
    the stale instance keeps waiting, the others' events keep flowing, a sound one resyncs."""
    url = redis_servers.url
    stream = f"kvtier:test:{uuid.uuid4().hex}"
    pub = RedisStreamPublisher(url, stream)
    sub = RedisStreamSubscriber(url, stream)
    raw = pub._redis
    try:
        pub.publish("a", [stored(5, 1)])  # joined late: a is stale
        index = PrefixIndex()
        index.apply_updates(sub.poll())
        raw.set(f"{{{stream}}}:snapshot:a", b"\x80garbage")
        pub.publish("b", [stored(0, 10)])
        index.apply_updates(sub.poll())
        assert index.blocks("b") == {10: G}
        pub.publish_snapshot(Snapshot("b", 9, frozenset()))
        # b's, under a's key
        raw.set(f"{{{stream}}}:snapshot:a", raw.get(f"{{{stream}}}:snapshot:b"))
        pub.publish("b", [stored(1, 11)])
        index.apply_updates(sub.poll())
        assert index.blocks("b") == {10: G, 11: G} and index.blocks("a") == {}
        assert sub.num_malformed_snapshots == 4  # twice per poll: before and after reading
        pub.publish_snapshot(Snapshot("a", 6, frozenset({(1, G)})))
        index.apply_updates(sub.poll())
        assert index.blocks("a") == {1: G} and sub.tracker.stale_instances() == []
    finally:
        raw.delete(stream, f"{stream}:resync", f"{{{stream}}}:snapshot:a",
                   f"{{{stream}}}:snapshot:b")


def test_a_forgotten_instances_unread_entries_are_skipped_on_a_real_server(
        redis_servers: RedisServers) -> None:
    """Red team 29a: XINFO STREAM's last id, as a real server and redis-py give it (RESP2
    and RESP3, decoded or not), marks where a forgotten instance's entries end: those
    unread are skipped, the instance's later ones read as a new instance's, and a
    snapshot of another incarnation than the one read (a late write) is refused."""
    for query in ("", "?protocol=3", "?decode_responses=true"):
        url = redis_servers.url + query
        stream = f"kvtier:test:{uuid.uuid4().hex}"
        pub = RedisStreamPublisher(url, stream)
        sub = RedisStreamSubscriber(url, stream)
        try:
            index = PrefixIndex()
            pub.publish("b", [stored(0, 5)])
            pub.publish("b", [stored(1, 6)])
            sub.forget("b")
            pub.publish("a", [stored(0, 1)])
            index.apply_updates(sub.poll())
            assert index.instances() == ["a"] and sub._forgotten == {}, query
            back = RedisStreamPublisher(url, stream)
            back.publish("b", [stored(0, 7)])
            old = RedisStreamPublisher(url, stream)  # another incarnation of a, writing late
            old.publish_snapshot(Snapshot("a", 9, frozenset({(100, G)})))
            pub.publish("a", [stored(2, 2)])  # seq 1 lost: stale
            index.apply_updates(sub.poll())
            assert index.blocks("b") == {7: G} and index.blocks("a") == {}, query
            assert sub.tracker.stale_instances() == ["a"], query
            # red team 30b: refused at the source (pub claims a), never offered
            assert (old.num_refused_snapshots, sub.tracker.num_other_incarnation) == (1, 0)
        finally:
            pub._redis.delete(stream, f"{stream}:resync", f"{{{stream}}}:snapshot:a",
                              f"{{{stream}}}:incarnation:a", f"{{{stream}}}:incarnation:b")


def test_a_publisher_deletes_only_its_own_snapshot_on_a_real_server(
        redis_servers: RedisServers) -> None:
    """Red team 29a (h-snap): the conditional delete's Lua script, on a real server, alone
    (``forget``) and inside the seq 0 batch's MULTI/EXEC: a snapshot naming another
    incarnation stays; one naming this one, or none, goes; so does an odd incarnation's
    (quotes, non-ASCII), and a key of another type does not fail the batch."""
    for query in ("", "?protocol=3", "?decode_responses=true"):
        url = redis_servers.url + query
        stream = f"kvtier:test:{uuid.uuid4().hex}"
        key = f"{{{stream}}}:snapshot:a"
        old = RedisStreamPublisher(url, stream, incarnation='old "é"}')
        new = RedisStreamPublisher(url, stream, incarnation="new")
        raw = new._redis
        try:
            new.publish("a", [stored(0, 1)])
            new.publish_snapshot(Snapshot("a", 1, frozenset({(1, G)})))
            old.forget("a")  # retiring after the restart: the new snapshot stays
            old.publish("a", [stored(0, 100)])  # a seq 0 batch of the old process, too
            assert raw.exists(key) == 1, query
            new.forget("a")
            assert raw.exists(key) == 0, query
            old.publish_snapshot(Snapshot("a", 1, frozenset({(100, G)})))
            old.publish("a", [stored(0, 101)])  # its own (an earlier manager's) goes
            assert raw.exists(key) == 0, query
            raw.set(key, '{"i":"a","n":1,"b":[]}')  # an earlier publisher's goes
            new.forget("a")
            assert raw.exists(key) == 0, query
            raw.rpush(key, "x")  # not a string: deleted, nothing failed
            new.publish("a", [stored(0, 2)])
            assert raw.exists(key) == 0, query
            assert (old.num_failed_batches, new.num_failed_batches) == (0, 0), query
            assert raw.xlen(stream) == 4 + 3, query  # red team 30b: 3 forgets' goodbyes
        finally:
            raw.delete(stream, key, f"{{{stream}}}:incarnation:a")
