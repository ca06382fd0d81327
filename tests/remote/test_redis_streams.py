"""KV events over a real Redis stream: order, gaps after a trim, resync from a snapshot."""

from __future__ import annotations

import uuid

from remote_helpers import RedisServers

from kvtier.events import BlockRemoved, BlockStored, BlockTierChanged
from kvtier.publisher import RedisStreamPublisher, RedisStreamSubscriber, Snapshot
from kvtier.radix import Tier
from kvtier.router import PrefixIndex

G, H = Tier.GPU, Tier.HOST


def stored(seq: int, h: int, tier: Tier = G) -> BlockStored:
    """A BlockStored event of one 4-token block."""
    return BlockStored(seq, h, None, tier, 4, None)


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
        pub._redis.delete(stream, f"{stream}:resync", f"{stream}:snapshot:a")
