"""Red team 34b: the KV event streams on real Redis servers: a cluster that is down when a
publisher or subscriber is made, or goes down under one, degrades as a standalone server
that is down does (its faults counted, the next command tries again), never raising; a
publisher deletes its instances' keys named as before hash tags."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest
from remote_helpers import PrivateCluster, PrivateRedis, RedisServers

from kvtier.event_updates import Update
from kvtier.events import BlockStored
from kvtier.publisher import EventBatch, RedisStreamPublisher, RedisStreamSubscriber, Snapshot
from kvtier.stream_client import CLUSTER_RETRY_FIRST_S
from kvtier.tier import Tier

redis = pytest.importorskip("redis")

G = Tier.GPU


def stored(seq: int, h: int) -> BlockStored:
    """A BlockStored event of one 4-token block."""
    return BlockStored(seq, h, None, G, 4, None, (1, 2, 3, 4), None, None)


def faults_while_down(url: str, cluster: bool) -> tuple[int, int, list[Update]]:
    """A publisher and a subscriber made while no server of ``url`` answers, each command
    tried once: (failed batches, failed reads, updates polled)."""
    with RedisStreamPublisher(url, "ev", cluster=cluster) as pub, \
            RedisStreamSubscriber(url, "ev", cluster=cluster) as sub:
        pub.publish("a", [stored(0, 1)])
        pub.publish_snapshot(Snapshot("a", 1, frozenset({(1, G)})))
        pub.forget("a")
        assert pub.resync_requests() == set()
        return pub.num_failed_batches, pub.num_failed_reads, sub.poll()


def test_a_cluster_down_at_start_degrades_as_a_server_down_at_start(
        redis_cluster: PrivateCluster, make_redis_server: Callable[[], PrivateRedis]) -> None:
    """Every node of a private cluster killed: a publisher and a subscriber with
    ``cluster=True`` are made, a batch, a snapshot and a goodbye fail (3 counted), the
    resync read fails (1), a poll reads nothing, as with a standalone server killed: (3, 1,
    []) for both. Before, each constructor raised RedisClusterUnreachableError. The
    nodes started again, the same publisher's next batch is taken and read."""
    server = make_redis_server()
    server.kill()
    for node in redis_cluster.nodes:
        node.kill()
    assert faults_while_down(server.url, cluster=False) == (3, 1, [])
    assert faults_while_down(redis_cluster.url, cluster=True) == (3, 1, [])
    with RedisStreamPublisher(redis_cluster.url, "ev2", cluster=True) as pub, \
            RedisStreamSubscriber(redis_cluster.url, "ev2", cluster=True) as sub:
        pub.publish("a", [stored(0, 1)])
        assert (pub.num_failed_batches, sub.poll()) == (1, [])
        for node in redis_cluster.nodes:
            node.start()
        wait_cluster_ok(redis_cluster)
        time.sleep(CLUSTER_RETRY_FIRST_S)  # 34d: each client waits that long after a fault
        pub.publish("b", [stored(0, 2)])
        assert (pub.num_failed_batches, sub.poll()) == (1, [EventBatch("b", [stored(0, 2)])])


def wait_cluster_ok(cluster: PrivateCluster) -> None:
    """Until every node of ``cluster`` says cluster_state:ok (at most 20 s)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        states = []
        for node in cluster.nodes:
            with node.client() as client:
                states.append("cluster_state:ok" in str(client.execute_command("CLUSTER",
                                                                                "INFO")))
        if all(states):
            return
        time.sleep(0.1)
    raise AssertionError("the private cluster did not come back in 20 s")


def test_a_cluster_gone_under_a_publisher_and_subscriber_is_counted_not_raised(
        redis_cluster: PrivateCluster) -> None:
    """A publisher and a subscriber that read the cluster, then every node killed: the
    next batch, snapshot, goodbye and resync read are counted (3 failed batches, 1 failed
    read) and a poll returns nothing. Before, redis-py raised
    RedisClusterUnreachableError (no RedisError) out of ``publish`` and ``poll``."""
    with RedisStreamPublisher(redis_cluster.url, "ev", cluster=True) as pub, \
            RedisStreamSubscriber(redis_cluster.url, "ev", cluster=True) as sub:
        pub.publish("a", [stored(0, 1)])
        assert sub.poll() == [EventBatch("a", [stored(0, 1)])]
        for node in redis_cluster.nodes:
            node.kill()
        for _ in range(2):  # the first fault asks for a refresh, which reaches no node
            pub.publish("a", [stored(1, 2)])
            assert sub.poll() == []
        pub.publish_snapshot(Snapshot("a", 2, frozenset({(1, G), (2, G)})))
        pub.forget("a")
        assert pub.resync_requests() == set()
        assert (pub.num_failed_batches, pub.num_failed_reads) == (4, 1)


@pytest.mark.parametrize("cluster", [False, True])
def test_a_publisher_sweeps_its_keys_of_before_hash_tags_on_a_real_server(
        redis_servers: RedisServers, cluster: bool) -> None:
    """A snapshot and a claim of a and of b under the names of before hash tags (an older
    publisher's, without EX): a publisher of a deletes a's (on the cluster, keys of other
    slots than the stream's), b's stay: 4 old keys -> 2. Before, all 4 stayed for ever."""
    url = redis_servers.cluster_url if cluster else redis_servers.url
    raw = (redis.RedisCluster if cluster else redis.Redis).from_url(url)
    stream = f"kvtier:test:{uuid.uuid4().hex}"
    old = [f"{stream}:{kind}:{iid}" for kind in ("snapshot", "incarnation")
           for iid in ("a", "b")]
    try:
        for key in old:
            raw.set(key, b"x")
        with RedisStreamPublisher(url, stream, cluster=cluster) as pub:
            pub.publish("a", [stored(0, 1)])
            assert pub.num_failed_batches == 0
        assert [key for key in old if raw.exists(key)] == [
            f"{stream}:snapshot:b", f"{stream}:incarnation:b"]
    finally:
        for key in [*old, stream, f"{{{stream}}}:incarnation:a"]:
            raw.delete(key)
        raw.close()
