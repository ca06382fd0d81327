"""RedisRemoteStore reading over several connections at once: same results, same fault
handling, threads gone after close."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from remote_helpers import PrivateRedis, RedisServers, make_blocks, make_namespace

from kvtier.remote import RedisRemoteStore

MakeServer = Callable[[], PrivateRedis]


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("kvtier-redis-read")]


@pytest.mark.parametrize("cluster", [False, True], ids=["standalone", "cluster"])
def test_parallel_reads_return_what_one_connection_reads(redis_servers: RedisServers,
                                                         cluster: bool) -> None:
    """100 blocks read over 4 connections come back byte for byte, misses counted once."""
    namespace = make_namespace()
    url = redis_servers.cluster_url if cluster else redis_servers.url
    store = RedisRemoteStore(url, namespace, cluster=cluster, timeout_s=1.0,
                             num_connections=4, max_batch_keys=16)
    blocks = make_blocks(namespace, 100)
    assert store.put_many(blocks) == 100, store.last_error
    assert store.get_many([*blocks, 1000]) == blocks
    stats = store.stats
    assert (stats.num_hits, stats.num_misses, stats.num_errors) == (100, 1, 0)
    assert reader_threads()
    store.close()
    assert store.get_many(blocks) == {}
    assert not reader_threads()  # close() ends the readers


def num_mget_calls(server: PrivateRedis) -> int:
    """How many MGET commands the server has run (INFO commandstats)."""
    with server.client() as client:
        stats = client.info("commandstats").get("cmdstat_mget", {})
    return int(stats.get("calls", 0))


def test_a_batch_is_cut_into_one_mget_per_connection(make_redis_server: MakeServer) -> None:
    """32 keys over 4 connections reach the server as 4 MGETs (8 keys each), 3 keys as 3;
    one connection sends 1 MGET for the 32."""
    server = make_redis_server()
    namespace = make_namespace()
    blocks = make_blocks(namespace, 32)
    parallel = RedisRemoteStore(server.url, namespace, num_connections=4)
    single = RedisRemoteStore(server.url, namespace)
    assert parallel.put_many(blocks) == 32
    for store, keys, num_mgets in ((parallel, list(blocks), 4), (parallel, [1, 2, 3], 3),
                                   (single, list(blocks), 1)):
        before = num_mget_calls(server)
        assert store.get_many(keys) == {h: blocks[h] for h in keys}
        assert num_mget_calls(server) - before == num_mgets
    parallel.close()
    single.close()


def test_parallel_reads_of_a_dead_server_are_misses(make_redis_server: MakeServer) -> None:
    """A killed server: every parallel chunk fails, the read returns no block and raises
    nothing, within one chunk's blocking bound (the chunks wait side by side)."""
    server = make_redis_server()
    namespace = make_namespace()
    store = RedisRemoteStore(server.url, namespace, timeout_s=0.2, max_retries=1,
                             backoff_s=0.01, breaker_threshold=100, num_connections=4,
                             max_batch_keys=2)
    blocks = make_blocks(namespace, 8)
    assert store.put_many(blocks) == 8
    server.kill()
    started = time.monotonic()
    assert store.get_many(blocks) == {}
    assert time.monotonic() - started < 2 * store.max_blocking_s + 0.5
    stats = store.stats
    assert stats.num_misses == 8 and stats.num_errors >= 4
    server.start()  # no persistence: it comes back empty
    assert store.put_many(blocks) == 8
    assert store.get_many(blocks) == blocks
    store.close()


@pytest.mark.parametrize("value", [0, 65, True, 2.0])
def test_num_connections_is_checked(value: Any) -> None:
    """num_connections must be an int in [1, 64]: else ValueError naming it."""
    with pytest.raises(ValueError, match=r"num_connections must be an integer in \[1, 64\]"):
        RedisRemoteStore("redis://127.0.0.1:1", make_namespace(), num_connections=value)
