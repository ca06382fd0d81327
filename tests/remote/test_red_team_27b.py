"""Red team 27b: several engines on one shared remote tier (the fleet simulator's and the
engine's), faults on the wire, and what each fetch is charged."""

from __future__ import annotations

import os
import pickle
import select
import signal
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, NamedTuple

import pytest
from remote_helpers import RedisServers, make_blocks, make_namespace

from kvtier.config import CacheConfig
from kvtier.events import BlockStored
from kvtier.remote import InMemoryRemoteStore, RemoteNamespace
from kvtier.sim.fleet import simulate_fleet
from kvtier.sim.timemodel import RemoteLink
from kvtier.sim.workload import TraceRequest
from list_workload import ListWorkload

PREFIX = list(range(1000, 1320))  # 10 full blocks of 32 tokens


def test_a_fleet_writes_through_only_the_blocks_an_instance_computes() -> None:
    """r0 computes the 10-block prefix on i0 and writes it through; r1 on i1 fetches those
    10 and computes 1 block of its own. The store takes 11 writes, as the engines' tiers
    make them: the imported blocks were written back to it (21), and a removed block written
    again, each write taking the store's queue ahead of the next fetch.

    ::

        i0   r0 | b0 .. b9 computed | -> store: 10 writes
        i1   r1 | b0 .. b9 fetched  | b10 computed | -> store: 1 write (not b0 .. b9 again)
    """
    workload = ListWorkload([TraceRequest("r0", 0.0, PREFIX + [1], 1),
                             TraceRequest("r1", 10.0, PREFIX + list(range(5, 38)), 1)])
    cache = CacheConfig(tokens_per_block=32, num_gpu_blocks=64, num_host_blocks=32)
    report = simulate_fleet(workload, cache, 2, "round-robin", remote="write-through",
                            remote_link=RemoteLink(latency_s=1e-3, bytes_per_s=32e9))
    remote = report.remote
    assert remote is not None
    assert (remote["num_fetched_blocks"], remote["num_imported_blocks"],
            remote["num_written_blocks"]) == (10, 10, 11)


def test_a_fleet_writing_through_never_writes_a_block_as_it_leaves() -> None:
    """Two-block GPU pools and no room to spare: r0's blocks leave i0 when r1 and r2 come,
    and nothing is written then (write-through wrote them when computed: 2 blocks of r0,
    2 of r1, 2 of r2); before, every removal was a second write of its block."""
    workload = ListWorkload([TraceRequest("r0", 0.0, list(range(65)), 1),
                             TraceRequest("r1", 1.0, list(range(100, 165)), 1),
                             TraceRequest("r2", 2.0, list(range(200, 265)), 1)])
    cache = CacheConfig(tokens_per_block=32, num_gpu_blocks=4, num_host_blocks=1)
    report = simulate_fleet(workload, cache, 1, "round-robin", remote="write-through",
                            remote_link=RemoteLink(latency_s=1e-3, bytes_per_s=32e9))
    remote = report.remote
    assert remote is not None
    assert report.events["num_published"] > 6  # blocks were stored and removed
    assert remote["num_written_blocks"] == 6


def in_a_fork(work: Callable[[], object], timeout_s: float = 10.0) -> object:
    """What ``work()`` returns in a child forked now (or its exception's repr), or
    "timed out" where it gave nothing within ``timeout_s`` (the child is killed)."""
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():  # Python 3.12 warns of a fork with threads running
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            data = pickle.dumps(work())
        except BaseException as exc:
            data = pickle.dumps(repr(exc))
        os.write(write_fd, data)
        os._exit(0)
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], timeout_s)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            return "timed out"
        chunks = []
        while chunk := os.read(read_fd, 1 << 16):
            chunks.append(chunk)
        return pickle.loads(b"".join(chunks))
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@needs_fork
def test_a_store_forked_after_its_io_thread_started_still_runs_its_jobs() -> None:
    """An engine forked from the process whose store had started its I/O thread: in the
    child the thread is gone. Every job was accepted and never run (a fetch found nothing,
    a background write was lost and never reported lost, a flush timed out); now the thread
    is started again in the child."""
    ns = make_namespace()
    store = InMemoryRemoteStore(ns)
    blocks = make_blocks(ns, 3)
    store.put_many({1: blocks[1]})
    got: list[dict[int, memoryview]] = []
    assert store.prefetch([1], got.append) and store.flush(5.0)  # the thread is running

    def child() -> object:
        found: list[list[int]] = []
        lost: list[list[int]] = []
        accepted = (store.prefetch([1, 2], lambda f: found.append(sorted(f))),
                    store.write_back({2: blocks[2]}, on_lost=lost.append))
        flushed = store.flush(5.0)
        return accepted, flushed, found, lost, sorted(store.contains_many([1, 2]))

    assert in_a_fork(child) == ((True, True), True, [[1]], [], [1, 2])
    store.close()


@needs_fork
def test_a_redis_store_forked_after_reading_on_several_connections_reads_in_the_child(
) -> None:
    """With ``num_connections`` 2 a read of several chunks runs on a pool of reader threads,
    made at the first such read; a child forked after it has none of those threads, and
    the pool made no more: every read of the child waited for ever on its first chunk."""
    pytest.importorskip("redis")
    from test_red_team_21b_remote import FakeRedis

    from kvtier.remote.redis_store import RedisRemoteStore

    server = FakeRedis()
    try:
        ns = make_namespace()
        store = RedisRemoteStore(server.url, ns, timeout_s=0.5, max_retries=0,
                                 num_connections=2)
        blocks = make_blocks(ns, 4)
        assert store.put_many(blocks) == 4, store.last_error
        assert sorted(store.get_many(blocks)) == [1, 2, 3, 4]  # on two reader threads

        def child() -> object:
            return sorted(store.get_many(blocks))

        assert in_a_fork(child) == [1, 2, 3, 4]
        store.close()
    finally:
        server.close()


class _Node(NamedTuple):
    name: str


class FakeCluster:
    """Two loopback servers as a Redis Cluster's nodes, behind a stand-in for redis-py's
    cluster client: ``owner`` is the client's slot map (key -> node), ``moved`` what
    reloading it (``nodes_manager.initialize``) makes it; a node answers GET of a key in
    ``asked`` with ASK (its slot migrating, the key gone to the other node) and of a key
    it does not own with MOVED. Its slot map lists nodes a and b by those names only: the
    node an ASK names by address is one it does not list (``get_node`` gives None, as
    redis-py's does), reached on a client made for it. The node asked knows no ASKING and
    answers ASK again (a faithful migration: test_red_team_29c_cluster)."""

    def __init__(self) -> None:
        import redis
        from test_red_team_21b_remote import FakeRedis, bulk

        cluster = self

        class ClusterNode(FakeRedis):
            def _answer(self, args: list[bytes]) -> list[tuple[bytes, float]] | None:
                command = args[0].upper()
                if command not in (b"GET", b"EXISTS"):
                    return super()._answer(args)
                key = args[1].decode()
                if key in cluster.asked:
                    return [(b"-ASK 1 %s\r\n" % cluster.other(self).encode(), 0.0)]
                if cluster.serving.get(key, cluster.a) is not self:
                    return [(b"-MOVED 1 %s\r\n" % cluster.other(self).encode(), 0.0)]
                with self._lock:
                    value = self.data.get(args[1])
                if command == b"EXISTS":
                    return [(b":%d\r\n" % (value is not None), 0.0)]
                return [(bulk(value), 0.0)]

        self.a, self.b = ClusterNode(), ClusterNode()
        self.serving: dict[str, FakeRedis] = {}  # where a key is; absent: on a
        self.owner: dict[str, str] = {}  # the client's slot map; absent: a
        self.moved: dict[str, str] = {}
        self.asked: set[str] = set()
        self.nodes_manager = self
        self._clients = {name: redis.Redis.from_url(node.url, protocol=2)
                         for name, node in (("a", self.a), ("b", self.b))}

    def other(self, node: object) -> str:
        return (self.b if node is self.a else self.a).url.split("//")[1].split("/")[0]

    def get_node_from_key(self, key: str) -> _Node:
        return _Node(self.owner.get(key, "a"))

    def get_node(self, node_name: str) -> _Node | None:
        return _Node(node_name) if node_name in self._clients else None

    def create_redis_connections(self, nodes: list[Any]) -> None:
        import redis

        for node in nodes:  # redis-py's ClusterNodes, the store closes their clients
            node.redis_connection = redis.Redis(host=node.host, port=node.port, protocol=2)

    def get_redis_connection(self, node: _Node) -> Any:
        return self._clients[node.name]

    def initialize(self) -> None:
        self.owner.update(self.moved)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self.a.close()
        self.b.close()


@pytest.fixture
def fake_cluster() -> Iterator[FakeCluster]:
    pytest.importorskip("redis")
    cluster = FakeCluster()
    yield cluster
    cluster.close()


def cluster_store(cluster: FakeCluster) -> tuple[Any, dict[int, bytes]]:
    """A cluster store whose client is ``cluster``, with four blocks on node a."""
    from kvtier.remote.redis_store import RedisRemoteStore

    ns = make_namespace()
    store = RedisRemoteStore(cluster.a.url.rsplit("/", 1)[0], ns, cluster=True, timeout_s=0.5,
                             max_retries=0, breaker_threshold=3, cooldown_s=60.0)
    store._clients._client = cluster  # the stand-in for redis-py's RedisCluster
    blocks = make_blocks(ns, 4)
    for h, payload in blocks.items():
        cluster.a.data[ns.key(h).encode()] = ns.encode(h, payload)
    return store, blocks


def test_a_key_of_a_migrating_slot_misses_alone(fake_cluster: FakeCluster) -> None:
    """Block 2's slot is being migrated and its key has gone to node b: node a answers ASK
    for it, and node b answers ASK again (it is given up: test_red_team_29c_cluster follows
    a migration whole). Only block 2 misses; before, each read of the four failed
    whole (every block missed), and three in a row opened node a's breaker: for its
    cooldown every read and write of node a was skipped."""
    store, blocks = cluster_store(fake_cluster)
    fake_cluster.asked.add(store.namespace.key(2))
    for _ in range(4):
        assert sorted(store.get_many(blocks)) == [1, 3, 4], store.last_error
    assert store.stats.num_short_circuited == 0
    assert store.put_many({9: make_blocks(store.namespace, 1, first_hash=9)[9]}) == 1
    store.close()


def test_a_read_answered_moved_is_read_again_after_the_slot_map(
        fake_cluster: FakeCluster) -> None:
    """Block 3's slot was resharded to node b; the client's slot map still says a, which
    answers MOVED. The map is read again and block 3 read from b in the same call, as a
    write answered MOVED is written again; before, the whole read missed."""
    store, blocks = cluster_store(fake_cluster)
    key = store.namespace.key(3)
    fake_cluster.b.data[key.encode()] = fake_cluster.a.data.pop(key.encode())
    fake_cluster.serving[key] = fake_cluster.b
    fake_cluster.moved[key] = "b"
    assert sorted(store.get_many(blocks)) == [1, 2, 3, 4], store.last_error
    assert fake_cluster.owner == {key: "b"}
    store.close()


def test_a_probe_answered_moved_or_ask_costs_only_its_key(fake_cluster: FakeCluster) -> None:
    """``contains_many`` (the vLLM tier's probe of a step's keys) on the same cluster:
    block 3 answered MOVED is asked again after the slot map is read, block 2 answered ASK
    (asked on b, which answers ASK again) is absent alone. Before, each failed the chunk:
    every block absent, and three probes in a row opened node a's breaker."""
    store, blocks = cluster_store(fake_cluster)
    key = store.namespace.key(3)
    fake_cluster.b.data[key.encode()] = fake_cluster.a.data.pop(key.encode())
    fake_cluster.serving[key] = fake_cluster.b
    fake_cluster.moved[key] = "b"
    fake_cluster.asked.add(store.namespace.key(2))
    for _ in range(4):
        assert store.contains_many(blocks) == {1, 3, 4}, store.last_error
    assert store.stats.num_short_circuited == 0
    store.close()


def test_a_fleet_writing_back_writes_only_the_blocks_that_leave_the_host() -> None:
    """Write-back writes a host block as it leaves (the engine's spill log). With
    ``offload_min_priority`` above every request's priority no GPU block goes to the host:
    r0's and r1's blocks are dropped from the GPU with their KV, and nothing can be written
    (before, each such drop was written, and served remote hits no engine could have)."""
    workload = ListWorkload([TraceRequest("r0", 0.0, list(range(65)), 1),
                             TraceRequest("r1", 1.0, list(range(100, 165)), 1),
                             TraceRequest("r2", 2.0, list(range(200, 265)), 1)])
    cache = CacheConfig(tokens_per_block=32, num_gpu_blocks=4, num_host_blocks=2,
                        offload_min_priority=100)
    report = simulate_fleet(workload, cache, 1, "round-robin", remote="write-back",
                            remote_link=RemoteLink(latency_s=1e-3, bytes_per_s=32e9))
    remote = report.remote
    assert remote is not None
    assert report.events["num_published"] > 6  # blocks were stored and removed
    assert remote["num_written_blocks"] == 0


def test_a_stream_trimmed_past_a_quiet_instances_removal_is_never_routed_to(
        redis_servers: RedisServers) -> None:
    """Instance a stores block 10, then removes it and goes quiet; b publishes on; the
    stream is trimmed to b's last entry before the subscriber reads again. a's removal is
    gone: the subscriber sees the stream's oldest entry past what it read, and every
    instance it read is stale until resynced. Before, a's hole showed only at its next
    entry, and block 10 was routed to for as long as a stayed quiet."""
    from kvtier.events import BlockRemoved
    from kvtier.publisher import RedisStreamPublisher, RedisStreamSubscriber, Snapshot
    from kvtier.router import PrefixHit, PrefixIndex
    from kvtier.tier import Tier

    def stored(seq: int, h: int) -> BlockStored:
        return BlockStored(seq, h, None, Tier.GPU, 4, None, (1, 2, 3, 4), None, None)

    stream = f"kvtier:test:{uuid.uuid4().hex}"
    publisher = RedisStreamPublisher(redis_servers.url, stream)
    raw = publisher._redis
    subscriber = RedisStreamSubscriber(redis_servers.url, stream)
    index = PrefixIndex()
    try:
        publisher.publish("a", [stored(0, 10)])
        publisher.publish("b", [stored(0, 20)])
        index.apply_updates(subscriber.poll())
        assert index.match([10]) == {"a": PrefixHit(1, 0)}
        publisher.publish("a", [BlockRemoved(1, 10, Tier.GPU)])
        publisher.publish("b", [stored(1, 21)])
        raw.xtrim(stream, maxlen=1, approximate=False)  # only b's seq 1 is left
        publisher.publish_snapshot(Snapshot("a", 2, frozenset()))
        index.apply_updates(subscriber.poll())
        assert index.match([10]) == {}
        assert subscriber.num_trims == 1
        assert subscriber.tracker.stale_instances() == ["b"]  # no snapshot of b stored
    finally:
        raw.delete(stream, f"{stream}:resync", f"{{{stream}}}:snapshot:a")


def test_engines_on_one_backend_share_within_a_namespace_only() -> None:
    """Four engines' stores on one backend: a second engine of the same namespace reads
    the first's block; one of another tenant scope or block size never does, even under
    the same hash; and a value copied under another namespace's key (a writer past the
    contract) is refused by its header, counted, not served."""
    backend: dict[str, bytes] = {}
    ns = make_namespace()
    layout = ns.layout
    writer = InMemoryRemoteStore(ns, backend)
    payload = make_blocks(ns, 1, first_hash=7)[7]
    assert writer.put_many({7: payload}) == 1
    same = InMemoryRemoteStore(RemoteNamespace(ns.model_id, layout), backend)
    assert bytes(same.get_many([7])[7]) == payload
    tenant = InMemoryRemoteStore(RemoteNamespace(ns.model_id, layout, "tenant-b"), backend)
    wider = RemoteNamespace(ns.model_id, replace(layout, tokens_per_block=32))
    other_size = InMemoryRemoteStore(wider, backend)
    assert tenant.get_many([7]) == {} and other_size.get_many([7]) == {}
    backend[tenant.namespace.key(7)] = backend[ns.key(7)]  # copied under tenant b's key
    assert tenant.get_many([7]) == {}
    assert tenant.stats.bad_payload_reasons == {"namespace": 1}
