"""Red team 34d: the KV event streams without a Redis server: a cluster no node of which
answers is waited for, not asked at every command; a snapshot and one poll's read are
bounded by bytes.

Every count here is exact; each test failed before its fix.
"""

from __future__ import annotations

from typing import Any

import pytest

from fake_stream_redis import FakeRedis
from kvtier import event_codec, stream_client
from kvtier.event_codec import MAX_SNAPSHOT_BYTES, encode_snapshot
from kvtier.events import BlockStored
from kvtier.publisher import RedisStreamPublisher, RedisStreamSubscriber, Snapshot
from kvtier.stream_client import CLUSTER_RETRY_CAP_S, CLUSTER_RETRY_FIRST_S
from kvtier.tier import Tier

redis = pytest.importorskip("redis")
pytest_plugins = ["shared_fixtures"]

G, H = Tier.GPU, Tier.HOST


def stored(seq: int, h: int) -> BlockStored:
    """A BlockStored event of one 4-token block."""
    return BlockStored(seq, h, None, G, 4, None, (1, 2, 3, 4), None, None)


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def unreachable_cluster(monkeypatch: pytest.MonkeyPatch, up: list[bool]) -> list[int]:
    """``RedisCluster.from_url`` replaced: each call is a connection attempt (counted in
    the list returned), raising RedisClusterUnreachableError unless ``up[0]``; a client
    made serves GET while ``up[0]``, else raises RedisClusterUnreachableError (each
    command counted as an attempt too)."""
    from redis.cluster import RedisCluster
    from redis.exceptions import RedisClusterUnreachableError

    attempts = [0]

    class Served:
        def get(self, key: str) -> bytes:
            attempts[0] += 1
            if not up[0]:
                raise RedisClusterUnreachableError("Redis Cluster cannot be connected.")
            return b"v"

    def from_url(url: str, **options: Any) -> Served:
        attempts[0] += 1
        if not up[0]:
            raise RedisClusterUnreachableError("Redis Cluster cannot be connected.")
        return Served()

    monkeypatch.setattr(RedisCluster, "from_url", from_url)
    return attempts


def test_a_cluster_down_is_tried_again_only_after_a_growing_wait(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No node answering: of 10 commands at one instant, 1 tries to make the client, 9
    fail at once (each None from ``attempt``: a fault counted, as before); the next try
    comes 0.5 s later, then 1, 2, 4, 8, 8 s (the cap) after each failed one; the cluster
    back, the command past the wait is served, and the next fault waits 0.5 s again.
    Before, every command tried: 10 attempts for 10 commands."""
    up = [False]
    attempts = unreachable_cluster(monkeypatch, up)
    clock = Clock()
    client = stream_client.LazyCluster("redis://127.0.0.1:1", clock=clock)
    assert [stream_client.attempt(client.get, "k") for _ in range(10)] == [None] * 10
    assert attempts == [1]
    waits: list[float] = []
    for _ in range(6):
        start_s = clock.now_s
        while attempts[0] == len(waits) + 1:  # 10 ms steps until the next try
            clock.now_s += 0.01
            assert stream_client.attempt(client.get, "k") is None
        waits.append(round(clock.now_s - start_s, 2))
    assert waits == [CLUSTER_RETRY_FIRST_S, 1.0, 2.0, 4.0, CLUSTER_RETRY_CAP_S,
                     CLUSTER_RETRY_CAP_S] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    up[0] = True
    clock.now_s += CLUSTER_RETRY_CAP_S
    assert stream_client.attempt(client.get, "k") == b"v"
    assert attempts == [9]  # 7 makes + 1 make served + its GET
    up[0] = False
    assert stream_client.attempt(client.get, "k") is None  # a made client's fault
    assert stream_client.attempt(client.get, "k") is None  # at once: waits
    assert attempts == [10]
    clock.now_s += CLUSTER_RETRY_FIRST_S
    assert stream_client.attempt(client.get, "k") is None
    assert attempts == [11]


def test_a_node_down_while_others_answer_is_no_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command of a shard that is down (redis-py's ConnectionError, other nodes
    answering) starts no wait: the next command, of another shard, is sent and served."""
    from redis.cluster import RedisCluster

    sent: list[str] = []

    class OneShardDown:
        def get(self, key: str) -> bytes:
            sent.append(key)
            if key == "down":
                raise redis.ConnectionError("Connection refused")
            return b"v"

    monkeypatch.setattr(RedisCluster, "from_url", lambda url, **_: OneShardDown())
    client = stream_client.LazyCluster("redis://127.0.0.1:1", clock=Clock())
    assert stream_client.attempt(client.get, "down") is None
    assert stream_client.attempt(client.get, "up") == b"v"
    assert sent == ["down", "up"]


def stale_subscriber(fake_redis: FakeRedis) -> tuple[RedisStreamPublisher,
                                                     RedisStreamSubscriber]:
    """A publisher of a and a subscriber that read its seq 0, then seq 2 (a gap): a
    stale, asked for."""
    pub = RedisStreamPublisher("redis://fake")
    sub = RedisStreamSubscriber("redis://fake", resync_retry_s=3600.0)
    pub.publish("a", [stored(0, 1)])
    sub.poll()
    pub.publish("a", [stored(2, 3)])
    sub.poll()
    assert sub.tracker.stale_instances() == ["a"]
    return pub, sub


def test_a_snapshot_past_the_bound_is_malformed_and_makes_no_state(
        fake_redis: FakeRedis) -> None:
    """A sound snapshot of a (next seq 3, no blocks) padded with spaces past
    MAX_SNAPSHOT_BYTES (32 MiB): counted malformed, refused before it is parsed, a stays
    stale, no update. Before, it was read whole and applied (a Snapshot update)."""
    _, sub = stale_subscriber(fake_redis)
    text = '{"i":"a","n":3,"b":[]}'.ljust(MAX_SNAPSHOT_BYTES + 1)
    fake_redis.set("{kvtier:events}:snapshot:a", text)
    assert sub.poll() == []
    assert sub.num_malformed_snapshots == 2  # tried before and after the read
    assert sub.tracker.stale_instances() == ["a"]
    fake_redis.set("{kvtier:events}:snapshot:a", text.strip())
    assert [type(u).__name__ for u in sub.poll()] == ["Snapshot"]


def test_a_snapshot_past_the_bound_is_cut_to_the_fastest_tiers_blocks(
        fake_redis: FakeRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound lowered to what holds a's snapshot with 2 blocks: one of 2 host and 3
    GPU blocks is stored with the GPU blocks of the 2 lowest hashes (within the bound,
    1 cut snapshot, 3 blocks left out), and a stale subscriber applies it. Before, all 5
    were written, past the bound (which subscribers now refuse)."""
    pub, sub = stale_subscriber(fake_redis)
    blocks = frozenset({(9, H), (8, H), (7, G), (5, G), (6, G)})
    two = encode_snapshot(Snapshot("a", 3, frozenset({(5, G), (6, G)}), pub.incarnation))
    monkeypatch.setattr(event_codec, "MAX_SNAPSHOT_BYTES", len(two) + 38)  # < 3 blocks
    pub.publish_snapshot(Snapshot("a", 3, blocks))
    stored_text = fake_redis.keys["{kvtier:events}:snapshot:a"].decode()
    assert stored_text == two
    assert (pub.num_cut_snapshots, pub.num_blocks_left_out) == (1, 3)
    assert sub.poll() == [Snapshot("a", 3, frozenset({(5, G), (6, G)}), pub.incarnation)]
    assert sub.tracker.stale_instances() == []
