"""Red team 34d: the KV event streams without a Redis server: a cluster no node of which
answers is waited for, not asked at every command; a snapshot and one poll's read are
bounded by bytes.

Every count here is exact; each test failed before its fix.
"""

from __future__ import annotations

from typing import Any

import pytest

from kvtier import stream_client
from kvtier.stream_client import CLUSTER_RETRY_CAP_S, CLUSTER_RETRY_FIRST_S

redis = pytest.importorskip("redis")
pytest_plugins = ["shared_fixtures"]


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
