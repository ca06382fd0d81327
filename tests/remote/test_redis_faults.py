"""Faults of a real, private redis-server: killed, paused, full, evicting.

Each becomes misses or failed puts counted in stats; no call raises or blocks for long.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from remote_helpers import PrivateCluster, PrivateRedis, make_blocks, make_namespace

from kvtier.remote import RedisRemoteStore, RemoteNamespace

MakeServer = Callable[[], PrivateRedis]


def make_store(server: PrivateRedis, namespace: RemoteNamespace, **options: Any
               ) -> RedisRemoteStore:
    """A store that gives up fast: 0.2 s timeouts, one retry, a 0.3 s breaker cool-down."""
    defaults = dict(timeout_s=0.2, max_retries=1, backoff_s=0.01, breaker_threshold=2,
                    cooldown_s=0.3)
    return RedisRemoteStore(server.url, namespace, **{**defaults, **options})


def set_maxmemory(server: PrivateRedis, headroom_bytes: int, policy: str) -> None:
    """Cap the server at its current use plus ``headroom_bytes``, with eviction ``policy``."""
    with server.client() as client:
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", used + headroom_bytes)
        client.config_set("maxmemory-policy", policy)


def test_server_killed_mid_run_then_restarted(make_redis_server: MakeServer) -> None:
    """A dead server means misses and failed puts, then the breaker skips; after a restart
    (and the cool-down) the store works again."""
    server = make_redis_server()
    namespace = make_namespace()
    store = make_store(server, namespace)
    blocks = make_blocks(namespace, 8)
    assert store.put_many(blocks) == 8
    server.kill()
    started = time.monotonic()
    assert store.get_many(blocks) == {}
    assert store.put_many(blocks) == 0
    assert store.get_many(blocks) == {}  # the breaker is open now: skipped
    assert time.monotonic() - started < 2 * store.max_blocking_s + 0.5
    stats = store.stats
    assert stats.num_errors >= 2 and stats.num_retries >= 1
    assert (stats.num_misses, stats.num_failed_puts, stats.num_short_circuited) == (16, 8, 1)
    assert store.last_error is not None and "ConnectionError" in store.last_error
    server.start()  # no persistence: it comes back empty
    time.sleep(store.cooldown_s)
    assert store.get_many(blocks) == {}
    assert store.put_many(blocks) == 8
    assert store.get_many(blocks) == blocks
    store.close()


def test_debug_sleep_longer_than_the_timeout(make_redis_server: MakeServer) -> None:
    """A server paused by DEBUG SLEEP costs timeouts, counted, within the stated bound."""
    server = make_redis_server()
    namespace = make_namespace()
    store = make_store(server, namespace)
    blocks = make_blocks(namespace, 4)
    store.put_many(blocks)
    pauser = server.client()
    sleeper = threading.Thread(target=pauser.execute_command, args=("DEBUG", "SLEEP", 1.5))
    sleeper.start()
    time.sleep(0.1)  # let the server enter the sleep
    started = time.monotonic()
    assert store.get_many(blocks) == {}
    elapsed = time.monotonic() - started
    assert elapsed <= store.max_blocking_s + 0.2
    assert store.stats.num_timeouts == 2 and store.stats.num_retries == 1
    sleeper.join()
    pauser.close()
    assert store.get_many(blocks) == blocks  # one failure is below the breaker's threshold
    store.close()


def test_out_of_memory_with_noeviction_fails_puts(make_redis_server: MakeServer) -> None:
    """Under maxmemory with noeviction, puts past the cap fail, counted, and reads go on."""
    server = make_redis_server()
    namespace = make_namespace(bytes_per_token_scale=4)  # 64 KiB blocks
    set_maxmemory(server, 512 << 10, "noeviction")
    store = make_store(server, namespace)
    blocks = make_blocks(namespace, 32)  # 2 MiB
    num_written = sum(store.put_many({h: b}) for h, b in blocks.items())
    assert 0 < num_written < 32
    stats = store.stats
    assert stats.num_failed_puts == 32 - num_written == stats.num_errors
    assert store.last_error is not None and "out of memory" in store.last_error
    assert len(store.get_many(blocks)) == num_written
    store.close()


def test_allkeys_lru_evictions_become_misses(make_redis_server: MakeServer) -> None:
    """Blocks the server evicts by its own LRU policy are misses later; recent ones hit."""
    server = make_redis_server()
    namespace = make_namespace(bytes_per_token_scale=4)  # 64 KiB blocks
    set_maxmemory(server, 1 << 20, "allkeys-lru")
    store = make_store(server, namespace)
    blocks = make_blocks(namespace, 64)  # 4 MiB
    for block_hash, payload in blocks.items():
        assert store.put_many({block_hash: payload}) == 1
    found = store.get_many(blocks)
    assert 0 < len(found) < 64
    assert 64 in found and 1 not in found
    assert store.stats.num_misses == 64 - len(found)
    assert store.stats.num_errors == 0
    with server.client() as client:
        assert int(client.info("stats")["evicted_keys"]) > 0
    store.close()


def test_a_dead_cluster_node_costs_only_its_own_slots(redis_cluster: PrivateCluster) -> None:
    """Killing one of three masters: keys on the live nodes still hit (reads, writes and
    contains), keys of the dead node's slots are misses, and the dead node's breaker opens
    without touching the others."""
    namespace = make_namespace()
    store = RedisRemoteStore(redis_cluster.url, namespace, cluster=True, timeout_s=0.3,
                             max_retries=1, backoff_s=0.01, breaker_threshold=2,
                             cooldown_s=30.0)
    blocks = make_blocks(namespace, 60)
    assert store.put_many(blocks) == 60, store.last_error
    victim = redis_cluster.nodes[1]
    on_victim = {h for h in blocks if redis_cluster.node_of(namespace.key(h)) is victim}
    assert 0 < len(on_victim) < 60
    alive = {h: b for h, b in blocks.items() if h not in on_victim}
    victim.kill()
    for _ in range(3):  # the third round finds the victim's breaker open
        assert store.get_many(blocks) == alive
        assert store.contains_many(blocks) == set(alive)
    rewritten = make_blocks(namespace, 60, seed=1)
    assert store.put_many(rewritten) == len(alive)
    assert store.get_many(blocks) == {h: rewritten[h] for h in alive}
    stats = store.stats
    assert stats.num_short_circuited >= 1 and stats.num_errors >= 2
    assert stats.num_hits == 4 * len(alive)
    assert stats.num_failed_puts == len(on_victim)
    assert store.last_error is not None and f"node 127.0.0.1:{victim.port}" in store.last_error
    store.close()


def test_a_restart_is_counted_as_a_reset(make_redis_server: MakeServer) -> None:
    """A server restarted empty answers a new connection with another run id: the store
    counts one reset (``num_resets``), which the remote tier reads as "forget what it was
    given". A fault without a restart (a dropped connection) counts none."""
    server = make_redis_server()
    namespace = make_namespace()
    store = make_store(server, namespace, num_connections=2)
    blocks = make_blocks(namespace, 8)
    assert store.put_many(blocks) == 8
    with server.client() as client:
        client.client_kill_filter(_type="normal", skipme=True)  # the same server: no reset
    assert store.get_many(blocks) == blocks
    assert store.stats.num_resets == 0
    server.kill()
    server.start()
    assert store.get_many(blocks) == {}
    assert store.put_many(blocks) == 8
    assert store.get_many(blocks) == blocks
    assert store.stats.num_resets == 1
    store.close()


def test_a_user_without_info_still_works(make_redis_server: MakeServer) -> None:
    """An ACL user who may not run INFO: the store cannot tell a restart (no reset is ever
    counted) but reads and writes as before, with no error counted."""
    server = make_redis_server()
    with server.client() as client:
        client.execute_command("ACL", "SETUSER", "noinfo", "on", ">pw", "~*", "+@all", "-info")
    namespace = make_namespace()
    store = RedisRemoteStore(f"redis://noinfo:pw@127.0.0.1:{server.port}/0", namespace,
                             timeout_s=0.2)
    blocks = make_blocks(namespace, 3)
    assert store.put_many(blocks) == 3
    assert store.get_many(blocks) == blocks
    stats = store.stats
    assert (stats.num_errors, stats.num_resets) == (0, 0)
    store.close()


def test_a_restarted_cluster_node_is_counted_as_a_reset(redis_cluster: PrivateCluster) -> None:
    """One of three masters restarted (its slots kept, its keys gone): a new connection to
    it finds another run id, one reset; the keys of the other nodes still hit."""
    namespace = make_namespace()
    store = RedisRemoteStore(redis_cluster.url, namespace, cluster=True, timeout_s=0.3,
                             max_retries=1, backoff_s=0.01, cooldown_s=0.0)
    blocks = make_blocks(namespace, 30)
    assert store.put_many(blocks) == 30, store.last_error
    victim = redis_cluster.nodes[1]
    on_victim = {h for h in blocks if redis_cluster.node_of(namespace.key(h)) is victim}
    assert 0 < len(on_victim) < 30
    victim.kill()
    victim.start()  # its nodes.conf keeps its slots; its keys are gone
    deadline = time.monotonic() + 10
    while store.get_many(blocks).keys() != blocks.keys() - on_victim:
        assert time.monotonic() < deadline, store.last_error
        time.sleep(0.1)
    assert store.stats.num_resets == 1
    store.close()
