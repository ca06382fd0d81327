"""Red team 31a: the remote tier under a cluster that answers TRYAGAIN on the ASK path,
a breaker half-open while a read runs in several chunks, and an adversarial store.

The fake cluster is red team 29c's (``MigratingCluster``): every key on node a unless
moved; a key of a migrating slot that has gone is answered ASK by a, served by the target
only right after ``ASKING``::

    GET k1..k4 ──node a──> v1, -ASK b (k2), v3, v4
    ASKING; GET k2 ──node b──> -TRYAGAIN          (the slot mid-resharding on b too)
    ASKING; GET k2 ──node b──> v2                 asked again once, after the backoff
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from remote_helpers import RedisServers, make_blocks

pytest.importorskip("redis")

from test_red_team_29c_cluster import MigratingCluster, MigratingNode, cluster_store

import kvtier.remote.redis_store as redis_store
from kvtier.remote.redis_store import RedisRemoteStore

TRYAGAIN = b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n"


@pytest.fixture
def cluster(logged_cluster: MigratingCluster) -> MigratingCluster:
    """The fake cluster whose pipelines are logged (``conftest.logged_cluster``)."""
    return logged_cluster


def make_store(cluster: MigratingCluster, num_blocks: int = 4,
               **options: Any) -> tuple[RedisRemoteStore, dict[int, bytes]]:
    """A store whose client is ``cluster``, ``num_blocks`` blocks on node a; one retry, a
    1 ms backoff, a breaker of three and a 60 s cooldown unless ``options`` say otherwise."""
    settings: dict[str, Any] = dict(max_retries=1, backoff_s=0.001)
    settings.update(options)
    return cluster_store(cluster, num_blocks, **settings)


def tryagain_on(cluster: MigratingCluster, node: MigratingNode, key: str,
                times: int | None) -> None:
    """``node`` answers TRYAGAIN for ``key`` its first ``times`` times (None: always)."""
    refusal = cluster.refusal
    left = {"n": times}

    def answer(at: Any, asked: str, asking: bool) -> bytes | None:
        if at is node and asked == key and (left["n"] is None or left["n"] > 0):
            if left["n"] is not None:
                left["n"] -= 1
            return TRYAGAIN
        return refusal(at, asked, asking)

    cluster.refusal = answer  # type: ignore[method-assign, assignment]


def test_tryagain_on_the_ask_target_is_asked_again_once(cluster: MigratingCluster) -> None:
    """Blocks 2 and 3 have gone to b with their migrating slots; b answers TRYAGAIN once
    for block 2 (after ASKING), every time for block 3. Both are asked again once on b,
    ASKING first, in one pipeline: block 2 hits, block 3 misses (one error: its second
    TRYAGAIN). The same for a probe and a write. Before, a TRYAGAIN on the ASK path was its
    key's error at once: 2 hits of 4, nothing asked again."""
    store, blocks = make_store(cluster)
    key = store.namespace.key
    for h in (2, 3):
        cluster.migrate(key(h), cluster.b)
    tryagain_on(cluster, cluster.b, key(2), 1)
    tryagain_on(cluster, cluster.b, key(3), None)
    assert sorted(store.get_many(blocks)) == [1, 2, 4], store.last_error
    a, b = cluster.a.address, cluster.b.address
    assert cluster.pipelines == [(a, ["GET"] * 4), (b, ["ASKING", "GET"] * 2),
                                 (b, ["ASKING", "GET"] * 2)]
    stats = store.stats
    assert (stats.num_hits, stats.num_asked, stats.num_tryagain_retries,
            stats.num_errors) == (3, 2, 2, 1)
    tryagain_on(cluster, cluster.b, key(2), 1)
    assert store.contains_many(range(1, 5)) == {1, 2, 4}
    new = make_blocks(store.namespace, 1, first_hash=5)
    cluster.migrating[key(5)] = cluster.b  # a new key of a migrating slot: written on b
    tryagain_on(cluster, cluster.b, key(5), 1)
    assert store.put_many(new) == 1, store.last_error
    assert cluster.b.data[key(5).encode()] == store.namespace.encode(5, new[5])
    stats = store.stats
    assert (stats.num_tryagain_retries, stats.num_errors, stats.num_puts) == (5, 2, 1)
    store.close()


def test_tryagain_on_the_ask_target_is_not_asked_past_the_deadline(
        cluster: MigratingCluster) -> None:
    """With no retries the batch's deadline leaves no time to ask b again: block 2's
    TRYAGAIN on the ASK path is its miss, counted, and no third pipeline is sent."""
    store, blocks = make_store(cluster, max_retries=0)
    key = store.namespace.key
    cluster.migrate(key(2), cluster.b)
    tryagain_on(cluster, cluster.b, key(2), 1)
    assert sorted(store.get_many(blocks)) == [1, 3, 4]
    assert len(cluster.pipelines) == 2
    stats = store.stats
    assert (stats.num_tryagain_retries, stats.num_errors) == (0, 1)
    assert store.last_error is not None and "TRYAGAIN" in store.last_error
    store.close()


def test_a_half_open_breaker_lets_the_probing_read_through_whole(
        cluster: MigratingCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Node a's breaker is half-open; a read of 4 blocks over two connections is cut into
    two chunks. The first probes a alone (its pipeline held until the other chunk asked
    the breaker, or 1 s); the second is sent once the probe answered and closed the
    breaker: 4 hits, two pipelines, no probe refused. Before, the second chunk asked the
    breaker while the probe was out and was refused: 2 hits of 4, the other two counted
    as misses of data the node held."""
    store, blocks = make_store(cluster, num_connections=2)
    for h in blocks:
        cluster.faults[cluster.a, store.namespace.key(h)] = b"-CLUSTERDOWN down\r\n"
    for _ in range(2):  # two chunks a read: 4 failures in a row
        assert store.get_many(blocks) == {}
    assert store._breakers.num_failures_in_row(cluster.a.address) >= 3
    cluster.faults.clear()
    store._breakers.end_cooldowns()
    cluster.pipelines.clear()
    errors_before = store.stats.num_errors

    asked_again = threading.Event()
    admit = store._breakers.admit
    num_admits = {"n": 0}

    def counting(server: str) -> Any:
        num_admits["n"] += server == cluster.a.address
        if num_admits["n"] == 2:
            asked_again.set()
        return admit(server)

    monkeypatch.setattr(store._breakers, "admit", counting)
    send: Callable[..., list[Any]] = vars(redis_store)["pipeline"]
    first = threading.Lock()

    def holding(commands: list[tuple[Any, ...]], client: Any, *args: Any) -> list[Any]:
        if first.acquire(blocking=False):
            asked_again.wait(1.0)  # the other chunk asks meanwhile, if it runs at once
        return send(commands, client, *args)

    monkeypatch.setattr(redis_store, "pipeline", holding)
    assert sorted(store.get_many(blocks)) == [1, 2, 3, 4], store.last_error
    a = cluster.a.address
    assert cluster.pipelines == [(a, ["GET"] * 2), (a, ["GET"] * 2)]
    stats = store.stats
    assert (stats.num_refused_probes, stats.num_errors - errors_before) == (0, 0)
    store.close()


def test_a_claim_is_renewed_with_a_batch_on_a_real_server(redis_servers: RedisServers) -> None:
    """A publisher with a 3 s snapshot TTL claims instance a with its first batch; 1.2 s
    later (past a third of the TTL) its next batch renews the claim (the Lua script runs
    on a real server): the claim's TTL is back near 3 s, where it would be under 1.8 s.
    Another incarnation's claim is left as it is."""
    import redis

    from kvtier.events import BlockStored
    from kvtier.publisher import RedisStreamPublisher
    from kvtier.tier import Tier

    name = f"kvtier:test:{uuid.uuid4().hex}"
    client = redis.Redis.from_url(redis_servers.url)
    now = [0.0]
    publisher = RedisStreamPublisher(redis_servers.url, name, snapshot_ttl_s=3,
                                     clock=lambda: now[0])
    try:
        def batch(seq: int) -> list[BlockStored]:
            return [BlockStored(seq, 100 + seq, None, Tier.GPU, 4, None, (1, 2, 3, 4),
                                None, None)]

        publisher.publish("a", batch(0))
        claim = f"{{{name}}}:incarnation:a"
        assert client.get(claim) == publisher.incarnation.encode()
        time.sleep(1.3)
        now[0] = 1.3
        publisher.publish("a", batch(1))
        assert client.pttl(claim) > 2500
        assert publisher.num_failed_batches == 0
        client.set(claim, "another", ex=3)
        now[0] = 2.6
        publisher.publish("a", batch(2))
        assert client.get(claim) == b"another"
    finally:
        publisher.close()
        keys = list(client.scan_iter(match=f"{name}*"))
        if keys:
            client.delete(*keys)
        client.close()


def test_a_probe_does_not_hold_back_the_other_nodes_chunks(
        cluster: MigratingCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks 1-2 on node a (its breaker half-open), 3-4 on node b (closed), read over two
    connections: b's chunks are sent beside a's probe, not after it (a's probe, held until
    b's first pipeline starts or 1 s, sees it start), and all four hit. Probing first
    alone, b's chunks waited for a's probe: a wait of up to ``max_blocking_s``."""
    store, blocks = make_store(cluster, num_connections=2)
    key = store.namespace.key
    for h in (3, 4):
        cluster.owner[key(h)] = cluster.slot_map[key(h)] = cluster.b
        cluster.b.data[key(h).encode()] = cluster.a.data.pop(key(h).encode())
    for h in (1, 2):
        cluster.faults[cluster.a, key(h)] = b"-CLUSTERDOWN down\r\n"
    for _ in range(2):
        assert sorted(store.get_many(blocks)) == [3, 4]
    cluster.faults.clear()
    store._breakers.end_cooldowns()
    assert store._breakers.state(cluster.a.address).value == "half-open"
    b_started = threading.Event()
    waited: list[bool] = []
    send: Callable[..., list[Any]] = vars(redis_store)["pipeline"]

    def holding(commands: list[tuple[Any, ...]], client: Any, *args: Any) -> list[Any]:
        if cluster.name_of(client) == cluster.b.address:
            b_started.set()
        else:
            waited.append(b_started.wait(1.0))
        return send(commands, client, *args)

    monkeypatch.setattr(redis_store, "pipeline", holding)
    assert sorted(store.get_many(blocks)) == [1, 2, 3, 4], store.last_error
    assert waited[0] is True
    assert store.stats.num_refused_probes == 0
    store.close()
