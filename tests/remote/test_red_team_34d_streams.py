"""Red team 34d: the KV event streams on real Redis servers: a cluster gone down is tried
again after a wait, not at every command; one poll reads a bounded number of bytes."""

from __future__ import annotations

import socket

import pytest
from remote_helpers import PrivateCluster

from kvtier.events import BlockStored
from kvtier.publisher import EventBatch, RedisStreamPublisher, RedisStreamSubscriber
from kvtier.tier import Tier

redis = pytest.importorskip("redis")

G = Tier.GPU


def stored(seq: int, h: int) -> BlockStored:
    """A BlockStored event of one 4-token block."""
    return BlockStored(seq, h, None, G, 4, None, (1, 2, 3, 4), None, None)


def test_a_cluster_gone_down_costs_one_try_not_one_a_command(
        redis_cluster: PrivateCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A publisher and a subscriber that read the private cluster, then every node
    killed: 5 batches and 5 polls at once are all faults (5 failed batches, polls empty)
    and connect at most 20 times (14 or 15 seen: each client's one try, redis-py asking
    each node with its retries, at most 10), where before each command tried: 117."""
    with RedisStreamPublisher(redis_cluster.url, "ev", cluster=True) as pub, \
            RedisStreamSubscriber(redis_cluster.url, "ev", cluster=True) as sub:
        pub.publish("a", [stored(0, 1)])
        assert sub.poll() == [EventBatch("a", [stored(0, 1)])]
        for node in redis_cluster.nodes:
            node.kill()
        num_connects = [0]
        real = socket.socket.connect

        def counted(sock: socket.socket, address: object) -> None:
            num_connects[0] += 1
            real(sock, address)  # type: ignore[arg-type]

        monkeypatch.setattr(socket.socket, "connect", counted)
        for seq in range(1, 6):
            pub.publish("a", [stored(seq, seq + 1)])
            assert sub.poll() == []
        monkeypatch.undo()
        assert pub.num_failed_batches == 5
        assert num_connects[0] <= 20
