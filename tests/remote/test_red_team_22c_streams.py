"""Red team 22c, KV events over a Redis stream: a publisher that restarted (its seq counts
from 0 again) and the snapshot its earlier incarnation left under the instance's key."""

from __future__ import annotations

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


def test_a_restarted_publisher_drops_its_earlier_incarnations_snapshot(
        redis_servers: RedisServers) -> None:
    """An instance published seq 0..9 and a snapshot (next_seq 10), then restarted: its
    new stream counts from 0, with an empty cache. A subscriber that missed the new seq 2
    (a trim) is stale, and read the old incarnation's snapshot still under the key: as it
    covered every seq read (10 > 3) it was applied, the blocks of before the restart
    routed to, and the new incarnation's events up to seq 9 skipped as covered by it. The
    batch holding seq 0 now deletes that key first: the subscriber waits for a snapshot
    of the new incarnation, and applies it."""
    url = redis_servers.url
    stream = f"kvtier:test:{uuid.uuid4().hex}"
    old = RedisStreamPublisher(url, stream)
    sub = RedisStreamSubscriber(url, stream)
    raw = old._redis
    index = PrefixIndex()
    try:
        old.publish("a", [stored(seq, 100 + seq) for seq in range(10)])
        old.publish_snapshot(Snapshot("a", 10, frozenset((100 + seq, G) for seq in range(10))))
        index.apply_updates(sub.poll())
        assert len(index.blocks("a")) == 10
        new = RedisStreamPublisher(url, stream)  # the restarted process
        new.publish("a", [stored(0, 1), stored(1, 2)])
        index.apply_updates(sub.poll())  # the restart is seen: the old blocks forgotten
        assert index.blocks("a") == {1: G, 2: G} and sub.tracker.num_restarts == 1
        new.publish("a", [stored(2, 3)])
        raw.xtrim(stream, maxlen=0, approximate=False)  # seq 2 never reaches the subscriber
        new.publish("a", [stored(3, 4)])
        index.apply_updates(sub.poll())
        # A gap: the instance is stale, and no snapshot of the new incarnation exists yet.
        assert sub.tracker.stale_instances() == ["a"] and index.blocks("a") == {}
        new.publish("a", [stored(4, 5)])
        index.apply_updates(sub.poll())
        assert sub.tracker.stale_instances() == ["a"] and index.blocks("a") == {}
        assert new.resync_requests() == {"a"}
        new.publish_snapshot(Snapshot("a", 5, frozenset((h, G) for h in (1, 2, 3, 4, 5))))
        new.publish("a", [stored(5, 6)])
        index.apply_updates(sub.poll())
        assert index.blocks("a") == {1: G, 2: G, 3: G, 4: G, 5: G, 6: G}
        assert sub.tracker.stale_instances() == []
    finally:
        raw.delete(stream, f"{stream}:resync", f"{{{stream}}}:snapshot:a")
