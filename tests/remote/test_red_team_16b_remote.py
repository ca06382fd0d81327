"""Red team, sixteenth pass (b): the Redis store against a real server. Each test fails on
the code before its fix and asserts the exact refusal and that nothing changed."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

import pytest
from remote_helpers import (
    PrivateCluster,
    PrivateRedis,
    RedisServers,
    make_blocks,
    make_namespace,
)

from kvtier.remote import RedisRemoteStore

MakeServer = Callable[[], PrivateRedis]


@pytest.mark.parametrize(("query", "message"), [
    ("?socket_timeout=3", "url parameter 'socket_timeout' would override what the store "
                          "checks: set timeout_s, got 'redis://127.0.0.1:1/0?socket_timeout=3'"),
    ("?socket_connect_timeout=nan", "url parameter 'socket_connect_timeout' would override"),
    ("?password=hunter2&timeout=1e9", "url parameter 'timeout' would override what the store "
                                      "checks: set timeout_s, got "
                                      "'redis://127.0.0.1:1/0?password=***&timeout=1e9'"),
    ("?retry_on_timeout=yes", "set max_retries"),
    ("?max_connections=0", "set num_connections"),
    ("?socket_read_size=0", "set nothing (kvtier sets the read size)"),
    ("?foo=bar", "url parameter 'foo' is not one the store passes to redis (it takes db, "
                 "health_check_interval, password, username, client_name, socket_keepalive, "
                 "and ssl_check_hostname, ssl_cert_reqs, ssl_certfile, ssl_keyfile with "
                 "rediss://), got 'redis://127.0.0.1:1/0?foo=***'"),
    ("?ssl_cert_reqs=none", "url parameter 'ssl_cert_reqs' is for TLS: the url must start "
                            "with rediss://, got 'redis://127.0.0.1:1/0?ssl_cert_reqs=none'"),
    ("?ssl_ca_certs=/ca.pem", "set ca_file"),
    ("?db=x", "url parameter 'db' must be an integer >= 0, got 'x'"),
    ("?health_check_interval=-1", "url parameter 'health_check_interval' must be an integer"),
])
def test_a_url_query_cannot_override_or_break_the_checked_options(query: str,
                                                                  message: str) -> None:
    """redis-py lets a URL's query win over the keyword options the store checks: with
    ``?socket_timeout=3`` a read of a paused server took 3.9 s where ``max_blocking_s`` said
    0.41 s; ``?socket_timeout=nan``, ``?db=x`` or ``?foo=bar`` were accepted and then failed
    every batch for ever, as faults. Now each is refused at construction, by name, with the
    password redacted, and no I/O thread or client is made."""
    threads = threading.active_count()
    with pytest.raises(ValueError) as refusal:
        RedisRemoteStore("redis://127.0.0.1:1/0" + query, make_namespace(), timeout_s=0.2)
    assert message in str(refusal.value)
    assert "hunter2" not in str(refusal.value)
    assert threading.active_count() == threads


@pytest.mark.parametrize(("suffix", "database"), [("/3", 3), ("/?db=2", 2), ("/0?db=07", 7)])
def test_a_cluster_url_naming_another_database_is_refused(suffix: str, database: int) -> None:
    """A Redis Cluster has database 0 only: ``cluster=True`` over ``redis://host/3`` was
    accepted, then every batch failed ("A db querystring option can only be 0 in cluster
    mode"), as a fault. Now refused at construction, naming the database."""
    with pytest.raises(ValueError) as refusal:
        RedisRemoteStore("redis://:hunter2@127.0.0.1:1" + suffix, make_namespace(),
                         cluster=True)
    assert str(refusal.value) == (
        f"a Redis Cluster has database 0 only, the url names database {database}: "
        f"'redis://:***@127.0.0.1:1{suffix}'")
    RedisRemoteStore("redis://127.0.0.1:1/0?db=0", make_namespace(), cluster=True).close()


def test_tls_parameters_pass_with_rediss() -> None:
    """What a TLS connection takes in its query is still passed on with rediss://."""
    store = RedisRemoteStore("rediss://127.0.0.1:1/0?ssl_cert_reqs=none&ssl_check_hostname=0",
                             make_namespace())
    store.close()


def test_a_database_path_that_is_no_number_is_refused() -> None:
    """``redis://host/abc`` was read as database 0 (redis-py drops a path that is no number):
    another deployment's database. Now refused, naming the path."""
    with pytest.raises(ValueError, match=r"^url path must be a database number, got '/abc'$"):
        RedisRemoteStore("redis://127.0.0.1:1/abc", make_namespace())


def test_the_parameters_passed_on_still_work(redis_servers: RedisServers) -> None:
    """A database given in the query and a client name reach the server: the blocks land in
    database 3, not 0."""
    namespace = make_namespace()
    blocks = make_blocks(namespace, 2, first_hash=uuid.uuid4().int >> 72)
    base = redis_servers.url.rsplit("/", 1)[0]
    store = RedisRemoteStore(f"{base}/?db=3&client_name=kvtier-16b", namespace)
    assert store.put_many(blocks) == 2, store.last_error
    assert store.get_many(blocks) == blocks
    for db, found in (("0", {}), ("3", blocks)):
        other = RedisRemoteStore(f"{base}/{db}", namespace)
        assert other.get_many(blocks) == found
        other.close()
    store.close()


def test_a_key_of_another_type_on_a_cluster_misses_alone(redis_cluster: PrivateCluster) -> None:
    """A hash under one block's key (another client of the server) made the node's GET
    pipeline raise WRONGTYPE: every key of that node missed, and after two reads its breaker
    opened, so the node's puts failed too for the cool-down (30 s here). Now that key alone
    misses, counted as an error, and the node goes on serving and taking writes."""
    namespace = make_namespace()
    store = RedisRemoteStore(redis_cluster.url, namespace, cluster=True, timeout_s=0.3,
                             max_retries=1, breaker_threshold=2, cooldown_s=30.0)
    blocks = make_blocks(namespace, 30)
    assert store.put_many(blocks) == 30, store.last_error
    node = redis_cluster.node_of(namespace.key(1))
    with node.client() as client:
        client.delete(namespace.key(1))
        client.hset(namespace.key(1), "field", "value")
    rest = {h: b for h, b in blocks.items() if h != 1}
    neighbours = {h: b for h, b in rest.items() if redis_cluster.node_of(namespace.key(h)) is node}
    assert neighbours
    for _ in range(3):
        assert store.get_many(blocks) == rest
    assert store.put_many(neighbours) == len(neighbours)
    stats = store.stats
    assert (stats.num_hits, stats.num_misses, stats.num_errors, stats.num_short_circuited,
            stats.num_failed_puts, stats.num_retries) == (87, 3, 3, 0, 0, 0)
    assert store.last_error == (
        f"redis at {redis_cluster.url} (node 127.0.0.1:{node.port}): the server refused the "
        "command (WRONGTYPE Operation against a key holding the wrong kind of value).")
    assert store.put_many({1: blocks[1]}) == 1  # SET replaces the foreign value
    assert store.get_many(blocks) == blocks
    store.close()


def test_a_cluster_with_a_shard_gone_serves_the_rest(redis_cluster: PrivateCluster) -> None:
    """A master killed and forgotten by the others leaves its slots served by no node;
    ``cluster-require-full-coverage no`` keeps the rest serving. A store made afterwards
    (an engine restarted) could not even start its client ("All slots are not covered"):
    every read and write of every key failed, and its breaker opened. Now the keys of the
    gone shard's slots miss alone, counted, and the live shards read and write as before."""
    namespace = make_namespace()
    blocks = make_blocks(namespace, 30)
    writer = RedisRemoteStore(redis_cluster.url, namespace, cluster=True)
    assert writer.put_many(blocks) == 30, writer.last_error
    writer.close()
    victim = redis_cluster.nodes[1]
    gone = {h for h in blocks if redis_cluster.node_of(namespace.key(h)) is victim}
    assert 0 < len(gone) < 30
    with victim.client() as client:
        victim_id = client.execute_command("CLUSTER", "MYID")
    victim.kill()
    for node in (redis_cluster.nodes[0], redis_cluster.nodes[2]):
        with node.client() as client:
            client.execute_command("CLUSTER", "FORGET", victim_id)
    store = RedisRemoteStore(redis_cluster.url, namespace, cluster=True, timeout_s=0.3,
                             max_retries=1, breaker_threshold=2, cooldown_s=30.0)
    alive = {h: b for h, b in blocks.items() if h not in gone}
    for _ in range(3):
        assert store.get_many(blocks) == alive
    assert store.contains_many(blocks) == set(alive)
    assert store.put_many(blocks) == len(alive)
    stats = store.stats
    assert (stats.num_hits, stats.num_misses, stats.num_puts, stats.num_failed_puts,
            stats.num_errors, stats.num_short_circuited, stats.num_retries) == (
        3 * len(alive), 3 * len(gone), len(alive), len(gone), 5, 0, 0)
    assert store.last_error == (
        f"redis at {redis_cluster.url}: {len(gone)} of 30 keys are in slots no node of the "
        "cluster serves (a shard gone): they miss.")
    store.close()


def test_a_write_to_a_resharded_slot_follows_it(redis_cluster: PrivateCluster) -> None:
    """A slot moved to another master (resharding): its old owner answers MOVED. A write
    counted that as a refusal and never read the slot map again, so every later write of
    the slot's keys failed, for as long as no read happened to refresh it (a write-through
    tier that rarely fetches lost them all). Now the moved keys are written once more, to
    the new owner, after the map is read again: nothing fails and nothing is counted."""
    namespace = make_namespace()
    store = RedisRemoteStore(redis_cluster.url, namespace, cluster=True, timeout_s=0.3,
                             max_retries=1, breaker_threshold=2, cooldown_s=30.0)
    blocks = make_blocks(namespace, 4)
    assert store.put_many(blocks) == 4, store.last_error
    key = namespace.key(1)
    old = redis_cluster.node_of(key)
    new = next(node for node in redis_cluster.nodes if node is not old)
    with old.client() as client:
        slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
        for stale in client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000):
            client.delete(stale)
    with new.client() as client:
        new_id = client.execute_command("CLUSTER", "MYID")
    for node in redis_cluster.nodes:
        with node.client() as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", new_id)
    for _ in range(2):
        assert store.put_many({1: blocks[1]}) == 1, store.last_error
    with new.client() as client:
        assert client.exists(key) == 1
    assert store.get_many(blocks) == blocks
    stats = store.stats
    assert (stats.num_puts, stats.num_failed_puts, stats.num_errors, stats.num_hits,
            stats.num_misses) == (6, 0, 0, 4, 0)
    assert store.last_error is None
    store.close()


def test_a_refused_mget_is_still_a_failed_batch(make_redis_server: MakeServer) -> None:
    """Reading replies one by one is for a cluster's GETs only: a standalone MGET refused
    whole (an ACL user without it) stays one failed batch, counted and described."""
    server = make_redis_server()
    with server.client() as client:
        client.execute_command("ACL", "SETUSER", "reader", "on", ">pw", "~*", "+@all", "-mget")
    namespace = make_namespace()
    blocks = make_blocks(namespace, 3)
    store = RedisRemoteStore(f"redis://reader:pw@127.0.0.1:{server.port}/0", namespace,
                             timeout_s=0.2, breaker_threshold=1, cooldown_s=30.0)
    assert store.put_many(blocks) == 3
    assert store.get_many(blocks) == {}
    assert store.get_many(blocks) == {}  # the breaker opened on the refusal
    stats = store.stats
    assert (stats.num_errors, stats.num_misses, stats.num_short_circuited) == (1, 6, 1)
    assert store.last_error is not None
    assert store.last_error.endswith("this user has no permissions to run the 'mget' command).")
    store.close()
