"""Red team 29c: a Redis Cluster during slot migration. A key of a migrating slot that has
gone to the target node is answered ASK by the source: the store follows it (``ASKING``,
then the command, on the node named, its slot map unchanged), once; a redirect answered by
another is given up, counted; TRYAGAIN and CLUSTERDOWN cost their key alone.

The fake cluster answers as a real one does while a slot migrates (the source serves the
keys it still holds and answers ASK for the others; the target serves a key of the slot
only right after ``ASKING`` on that connection, and answers MOVED back to the source
otherwise)::

    client map: slot -> a            a (MIGRATING -> b)            b (IMPORTING <- a)
    GET k2 ──────────────────────>   k2 gone: -ASK 1 b
                                     ASKING; GET k2 ─────────────> value
                                     GET k2 (no ASKING) ─────────> -MOVED 1 a
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from remote_helpers import PrivateCluster, PrivateRedis, make_blocks, make_namespace

pytest.importorskip("redis")

from test_red_team_21b_remote import FakeRedis, Pieces, bulk
from test_resp import ChunkSocket

from kvtier.remote.redis_store import RedisRemoteStore
from kvtier.remote.resp import ErrorReply, ProtocolError, SocketReader, read_asking_replies


class MigratingNode(FakeRedis):
    """A cluster node of ``cluster``: GET, EXISTS and SET of a key as ``cluster.refusal``
    lets it, ``ASKING`` for the next command of the same connection; ``commands`` logs
    every keyed command and ASKING it was sent, in order. ``down``: it closes the
    connection at every such command."""

    def __init__(self, cluster: MigratingCluster) -> None:
        super().__init__()
        self.cluster = cluster
        self.address = self.url.split("//")[1].split("/")[0]  # host:port, redis-py's name
        self.host, port = self.address.rsplit(":", 1)
        self.port = int(port)
        self.commands: list[tuple[bytes, bytes]] = []
        self.down = False
        self._connection = threading.local()  # FakeRedis serves a connection per thread

    def _answer(self, args: list[bytes]) -> Pieces:
        command = args[0].upper()
        if self.down and command in (b"ASKING", b"GET", b"EXISTS", b"SET"):
            return None
        if command == b"ASKING":
            self._connection.asking = True
            with self._lock:
                self.commands.append((command, b""))
            return [(b"+OK\r\n", 0.0)]
        if command not in (b"GET", b"EXISTS", b"SET"):
            return super()._answer(args)
        asking = getattr(self._connection, "asking", False)
        self._connection.asking = False  # ASKING holds for one command
        with self._lock:
            self.commands.append((command, args[1]))
        refusal = self.cluster.refusal(self, args[1].decode(), asking)
        if refusal is not None:
            return [(refusal, 0.0)]
        if command == b"SET":
            with self._lock:
                self.data[args[1]] = args[2]
            return [(b"+OK\r\n", 0.0)]
        with self._lock:
            value = self.data.get(args[1])
        if command == b"EXISTS":
            return [(b":%d\r\n" % (value is not None), 0.0)]
        return [(bulk(value), 0.0)]

    def sent(self, command: bytes) -> int:
        """How many ``command``s this node was sent."""
        with self._lock:
            return sum(c == command for c, _ in self.commands)


def node_client(host: str, port: int) -> Any:
    """A client of one node, configured as the store's are (RESP2, no retries of its own)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis(host=host, port=port, protocol=2, socket_timeout=5,
                       retry=Retry(NoBackoff(), 0))


class _Node(NamedTuple):
    name: str


class MigratingCluster:
    """Three nodes a, b, c and a stand-in for redis-py's cluster client over them.

    The cluster's state per key (a key is its own slot here): ``owner`` (absent: a), the
    node its slot migrates to (``migrating``), and ``faults``, the error line a node
    answers for a key whatever else holds. The client's slot map (``slot_map``, absent:
    a) becomes ``owner`` when reloaded (``nodes_manager.initialize``, counted); it lists
    the nodes in ``listed`` (redis-py's lists those that serve a slot)."""

    def __init__(self) -> None:

        self.a, self.b, self.c = (MigratingNode(self) for _ in range(3))
        self.owner: dict[str, MigratingNode] = {}
        self.migrating: dict[str, MigratingNode] = {}
        self.faults: dict[tuple[MigratingNode, str], bytes] = {}
        self.slot_map: dict[str, MigratingNode] = {}
        self.num_reloads = 0
        self.nodes_manager = self
        self.nodes = {n.address: n for n in (self.a, self.b, self.c)}
        self.listed = set(self.nodes)
        self.made: list[str] = []  # the nodes a client was made for (an unlisted ASK target)
        self._clients = {name: node_client(node.host, node.port)
                         for name, node in self.nodes.items()}
        self.pipelines: list[tuple[str, list[str]]] = []  # (node, its commands) per pipeline

    def refusal(self, node: MigratingNode, key: str, asking: bool) -> bytes | None:
        """The error line ``node`` answers for ``key`` (None: it serves the command)."""
        if (node, key) in self.faults:
            return self.faults[node, key]
        owner = self.owner.get(key, self.a)
        target = self.migrating.get(key)
        if node is owner:
            if target is not None and key.encode() not in node.data:
                return b"-ASK 1 %s\r\n" % target.address.encode()
            return None
        if node is target and asking:
            return None
        return b"-MOVED 1 %s\r\n" % owner.address.encode()

    def migrate(self, key: str, target: MigratingNode) -> None:
        """``key``'s slot migrates from its owner to ``target``, and ``key`` has gone."""
        owner = self.owner.get(key, self.a)
        self.migrating[key] = target
        if key.encode() in owner.data:
            target.data[key.encode()] = owner.data.pop(key.encode())

    # -- redis-py's RedisCluster, as the store uses it --------------------------------
    def get_node_from_key(self, key: str) -> _Node:
        return _Node(self.slot_map.get(key, self.a).address)

    def get_node(self, node_name: str) -> _Node | None:
        return _Node(node_name) if node_name in self.listed else None

    def get_redis_connection(self, node: _Node) -> Any:
        return self._clients[node.name]

    def create_redis_connections(self, nodes: list[Any]) -> None:
        """A client of each of ``nodes`` (redis-py's ``ClusterNode``s) set on it."""
        for node in nodes:
            self.made.append(node.name)
            node.redis_connection = node_client(node.host, node.port)
            self._clients[node.name] = node.redis_connection  # closed with the others

    def initialize(self) -> None:
        self.num_reloads += 1
        self.slot_map = dict(self.owner)

    def name_of(self, client: Any) -> str:
        return next(name for name, c in self._clients.items() if c is client)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        for node in self.nodes.values():
            node.close()


@pytest.fixture
def cluster(logged_cluster: MigratingCluster) -> MigratingCluster:
    """The fake cluster whose pipelines are logged (``conftest.logged_cluster``)."""
    return logged_cluster


def cluster_store(cluster: MigratingCluster, num_blocks: int = 4,
                  **options: Any) -> tuple[RedisRemoteStore, dict[int, bytes]]:
    """A store whose client is ``cluster``, with ``num_blocks`` blocks on node a; no retries,
    a breaker of three failures and a 60 s cooldown unless ``options`` say otherwise."""
    ns = make_namespace()
    settings: dict[str, Any] = dict(timeout_s=2.0, max_retries=0, breaker_threshold=3,
                                    cooldown_s=60.0)
    settings.update(options)
    store = RedisRemoteStore(cluster.a.url.rsplit("/", 1)[0], ns, cluster=True, **settings)
    store._clients._client = cluster  # the stand-in for redis-py's RedisCluster
    blocks = make_blocks(ns, num_blocks)
    for h, payload in blocks.items():
        cluster.a.data[ns.key(h).encode()] = ns.encode(h, payload)
    return store, blocks


def got(store: RedisRemoteStore, blocks: dict[int, bytes]) -> dict[int, bytes]:
    return {h: bytes(v) for h, v in store.get_many(blocks).items()}


def test_a_read_answered_ask_is_read_on_the_target_after_asking(
        cluster: MigratingCluster) -> None:
    """Blocks 2 and 4 have gone to node b with their migrating slots; node a answers ASK
    for them. Both are read from b in one pipeline (ASKING, GET, ASKING, GET), the client's
    slot map untouched: every block hits. Before, both missed (the data in the cluster)."""
    store, blocks = cluster_store(cluster)
    key = store.namespace.key
    cluster.migrate(key(2), cluster.b)
    cluster.migrate(key(4), cluster.b)
    assert got(store, blocks) == blocks, store.last_error
    a, b = cluster.a.address, cluster.b.address
    assert cluster.pipelines == [(a, ["GET"] * 4), (b, ["ASKING", "GET"] * 2)]
    assert cluster.b.commands == [(b"ASKING", b""), (b"GET", key(2).encode()),
                                  (b"ASKING", b""), (b"GET", key(4).encode())]
    assert (cluster.num_reloads, cluster.slot_map) == (0, {})
    stats = store.stats
    assert (stats.num_hits, stats.num_misses, stats.num_asked, stats.num_errors,
            stats.num_redirects_given_up) == (4, 0, 2, 0, 0)
    store.close()


def test_asks_of_chunks_read_at_once_go_to_their_node_in_one_pipeline(
        cluster: MigratingCluster) -> None:
    """With two connections the eight blocks are read as two chunks at once; blocks 3 and
    7, one in each, answered ASK, are read from b together: one pipeline, not one per
    chunk."""
    store, blocks = cluster_store(cluster, num_blocks=8, num_connections=2)
    key = store.namespace.key
    cluster.migrate(key(3), cluster.b)
    cluster.migrate(key(7), cluster.b)
    assert got(store, blocks) == blocks, store.last_error
    a, b = cluster.a.address, cluster.b.address
    assert sorted(cluster.pipelines) == sorted([(a, ["GET"] * 4), (a, ["GET"] * 4),
                                                (b, ["ASKING", "GET"] * 2)])
    assert store.stats.num_asked == 2
    store.close()


def test_a_probe_answered_ask_asks_the_target(cluster: MigratingCluster) -> None:
    """``contains_many`` on the same migration: block 2 is on b, found there after ASKING;
    block 5 is on neither node (b answers 0 after ASKING): absent. Before, block 2 was
    absent too."""
    store, _ = cluster_store(cluster)
    key = store.namespace.key
    cluster.migrate(key(2), cluster.b)
    cluster.migrate(key(5), cluster.b)
    assert store.contains_many([1, 2, 3, 4, 5]) == {1, 2, 3, 4}, store.last_error
    assert cluster.b.commands == [(b"ASKING", b""), (b"EXISTS", key(2).encode()),
                                  (b"ASKING", b""), (b"EXISTS", key(5).encode())]
    assert (store.stats.num_asked, store.stats.num_errors, cluster.num_reloads) == (2, 0, 0)
    store.close()


def test_a_write_answered_ask_is_written_on_the_target_once(
        cluster: MigratingCluster) -> None:
    """Blocks 5, 6, 7 are new; block 6's slot migrates to b, so a answers its SET with
    ASK. It is written on b after ASKING, in the same call: three written, each SET sent
    once to the node that keeps it. Before, block 6 was counted as not written (and the
    tier wrote it again later)."""
    store, _ = cluster_store(cluster)
    key = store.namespace.key
    cluster.migrate(key(6), cluster.b)
    new = make_blocks(store.namespace, 3, first_hash=5)
    assert store.put_many(new) == 3, store.last_error
    assert cluster.a.sent(b"SET") == 3  # block 6's answered ASK
    assert cluster.b.commands == [(b"ASKING", b""), (b"SET", key(6).encode())]
    assert key(6).encode() in cluster.b.data and key(6).encode() not in cluster.a.data
    stats = store.stats
    assert (stats.num_puts, stats.num_failed_puts, stats.num_asked, stats.num_errors) == (
        3, 0, 1, 0)
    assert got(store, new) == new  # block 6 read back from b, after an ASK
    lost: list[list[int]] = []
    cluster.migrate(key(8), cluster.b)
    assert store.write_back(make_blocks(store.namespace, 1, first_hash=8), on_lost=lost.append)
    assert store.flush(10.0) and lost == []  # a background write: not reported lost
    assert key(8).encode() in cluster.b.data
    store.close()


def test_a_read_answered_moved_then_ask_follows_both_once(cluster: MigratingCluster) -> None:
    """Block 3's slot was resharded to b (the client's map still says a: MOVED), and b is
    migrating it on to c, where block 3 now is (ASK). The map is read again, b asked,
    then c after ASKING: a hit. Before, the second redirect was a miss."""
    store, blocks = cluster_store(cluster)
    key = store.namespace.key(3)
    cluster.owner[key] = cluster.b
    cluster.migrating[key] = cluster.c
    cluster.c.data[key.encode()] = cluster.a.data.pop(key.encode())
    assert got(store, blocks) == blocks, store.last_error
    a, b, c = cluster.a.address, cluster.b.address, cluster.c.address
    assert cluster.pipelines == [(a, ["GET"] * 4), (b, ["GET"]), (c, ["ASKING", "GET"])]
    assert cluster.num_reloads == 1 and cluster.slot_map == {key: cluster.b}
    assert (store.stats.num_asked, store.stats.num_redirects_given_up) == (1, 0)
    store.close()


def test_a_redirect_answered_by_another_is_given_up_counted(
        cluster: MigratingCluster) -> None:
    """Loops, bounded: block 2 is asked on b, which answers ASK back to a (a migration
    in two minds); block 3 is asked on b, which answers MOVED back to a (ASKING ignored:
    the migration was called off); block 4 is MOVED to c, and c answers MOVED again after
    the map is read. Each is given up after its one redirect: a miss, counted, and each
    read takes at most four pipelines; no breaker opens over five reads. Before, block 4
    was counted and blocks 2 and 3 missed with no count of a redirect given up."""
    store, blocks = cluster_store(cluster)
    key = store.namespace.key
    for h in (2, 3):
        cluster.migrate(key(h), cluster.b)
    cluster.faults[cluster.b, key(2)] = b"-ASK 1 %s\r\n" % cluster.a.address.encode()
    cluster.faults[cluster.b, key(3)] = b"-MOVED 1 %s\r\n" % cluster.a.address.encode()
    cluster.owner[key(4)] = cluster.c
    cluster.faults[cluster.c, key(4)] = b"-MOVED 1 %s\r\n" % cluster.b.address.encode()
    for _ in range(5):
        assert sorted(store.get_many(blocks)) == [1]
    a, b, c = cluster.a.address, cluster.b.address, cluster.c.address
    assert cluster.pipelines[:3] == [(a, ["GET"] * 4), (b, ["ASKING", "GET"] * 2), (c, ["GET"])]
    # from the second read on the map sends block 4 to c first: a, c, b's asks, c again
    assert len(cluster.pipelines) == 3 + 4 * 4
    stats = store.stats
    assert (stats.num_asked, stats.num_redirects_given_up, stats.num_errors,
            stats.num_short_circuited) == (10, 15, 15, 0)
    assert store.last_error is not None and "given up" in store.last_error
    store.close()


def test_tryagain_and_clusterdown_cost_their_key_alone(cluster: MigratingCluster) -> None:
    """Node a answers block 2 with TRYAGAIN (its slot mid-migration) and block 3 with
    CLUSTERDOWN (its slot served by no node): those two miss, are absent and are not
    written; the others hit, four reads in a row, and node a's breaker stays shut: once the
    faults pass the next read hits all four. Before, each failed its whole chunk (every
    block missed), and the third opened a's breaker for its 60 s cooldown."""
    store, blocks = cluster_store(cluster)
    key = store.namespace.key
    cluster.faults[cluster.a, key(2)] = b"-TRYAGAIN Multiple keys request during rehashing\r\n"
    cluster.faults[cluster.a, key(3)] = b"-CLUSTERDOWN Hash slot not served\r\n"
    for _ in range(4):
        assert sorted(store.get_many(blocks)) == [1, 4], store.last_error
        assert store.contains_many(blocks) == {1, 4}
    assert store.put_many(make_blocks(store.namespace, 4, seed=1)) == 2
    stats = store.stats
    assert (stats.num_hits, stats.num_misses, stats.num_errors, stats.num_short_circuited,
            stats.num_failed_puts) == (8, 8, 18, 0, 2)
    assert cluster.num_reloads == 0
    cluster.faults.clear()
    assert sorted(store.get_many(blocks)) == [1, 2, 3, 4]
    store.close()


def test_a_malformed_redirect_costs_its_key_alone(cluster: MigratingCluster) -> None:
    """An ASK line with no node (``-ASK nonsense``) from node a for block 2: redis-py's
    parser raised ValueError making its exception, which failed the whole pipeline as a
    fault (every block missed, a's breaker counting). Now it is that key's refusal."""
    store, blocks = cluster_store(cluster)
    cluster.faults[cluster.a, store.namespace.key(2)] = b"-ASK nonsense\r\n"
    cluster.faults[cluster.a, store.namespace.key(3)] = b"-MOVED 1 nowhere\r\n"
    for _ in range(4):
        assert sorted(store.get_many(blocks)) == [1, 4], store.last_error
    stats = store.stats
    assert (stats.num_errors, stats.num_short_circuited, stats.num_asked) == (8, 0, 0)
    store.close()


def test_an_ask_to_a_node_down_or_unreachable_misses_and_trips_only_its_breaker(
        cluster: MigratingCluster) -> None:
    """Block 2 is asked on b, which is down; block 3 on an address nothing listens on,
    not in the slot map. Both miss, counted; the breakers of both open after three reads
    (then their asks are skipped, short-circuited), a's never does: blocks 1 and 4 hit
    throughout, and writes to a go on. No exception reaches the caller."""
    store, blocks = cluster_store(cluster)
    key = store.namespace.key
    cluster.migrate(key(2), cluster.b)
    cluster.faults[cluster.a, key(3)] = b"-ASK 1 127.0.0.1:1\r\n"
    cluster.b.down = True
    for _ in range(5):
        assert sorted(store.get_many(blocks)) == [1, 4], store.last_error
    stats = store.stats
    assert (stats.num_asked, stats.num_short_circuited, stats.num_errors) == (10, 4, 6)
    assert store.put_many(make_blocks(store.namespace, 1, first_hash=9)) == 1
    store.close()


def test_an_ask_to_a_node_the_slot_map_does_not_list_is_followed(
        cluster: MigratingCluster) -> None:
    """Node c was just added: it serves no slot yet, so the slot map does not list it
    (redis-py's lists the nodes of ``CLUSTER SLOTS``), and block 2's slot, the first to
    move to it, is migrating there. Block 2 is read from c after ASKING, on a connection
    made for it, as is block 3 written there; the slot map is not read again. Before,
    block 2 missed (no connection to a node it does not list)."""
    store, blocks = cluster_store(cluster)
    key = store.namespace.key
    cluster.listed.discard(cluster.c.address)
    cluster.migrate(key(2), cluster.c)
    cluster.migrate(key(5), cluster.c)
    assert got(store, blocks) == blocks, store.last_error
    assert store.put_many(make_blocks(store.namespace, 1, first_hash=5)) == 1
    assert cluster.c.commands == [(b"ASKING", b""), (b"GET", key(2).encode()),
                                  (b"ASKING", b""), (b"SET", key(5).encode())]
    assert (store.stats.num_asked, store.stats.num_errors, cluster.num_reloads) == (2, 0, 0)
    store.close()


def join_new_node(cluster: PrivateCluster, tmp_path: Path) -> PrivateRedis:
    """A fourth master met by ``cluster``'s nodes, serving no slot (not in CLUSTER SLOTS)."""
    node = PrivateRedis(tmp_path / "node3", cluster=True)
    with node.client() as new:
        new.execute_command("CLUSTER", "MEET", "127.0.0.1", cluster.nodes[0].port)
        new_id = new.execute_command("CLUSTER", "MYID").decode()

    def knows_it(other: PrivateRedis) -> bool:
        with other.client() as client:
            return new_id in str(client.execute_command("CLUSTER", "NODES"))

    def is_up() -> bool:
        with node.client() as client:
            info = client.execute_command("CLUSTER", "INFO")
        return "cluster_state:ok" in str(info) or (
            isinstance(info, dict) and info.get("cluster_state") == "ok")

    deadline = time.monotonic() + 20
    while not (all(knows_it(n) for n in cluster.nodes) and is_up()):
        assert time.monotonic() < deadline, "the new node was not met in 20 s"
        time.sleep(0.1)
    return node


def test_asks_naming_ever_new_nodes_make_a_bounded_number_of_clients(
        cluster: MigratingCluster) -> None:
    """Node a answers each of 20 blocks with ASK to another address nothing listens on:
    a client is made for the first 16 (``MAX_UNLISTED_NODES``), each tried once and
    refused; the other 4 miss without one. Every block misses, counted, none raises."""
    store, blocks = cluster_store(cluster, num_blocks=20)
    for h in blocks:
        cluster.faults[cluster.a, store.namespace.key(h)] = b"-ASK 1 127.0.0.1:%d\r\n" % h
    assert store.get_many(blocks) == {}
    assert cluster.made == [f"127.0.0.1:{h}" for h in range(1, 17)]
    assert (store.stats.num_asked, store.stats.num_errors) == (20, 20)
    store.close()


@pytest.mark.parametrize("target_kind", ["listed", "new"])
def test_a_real_cluster_migrating_a_slot_serves_its_keys_from_both_nodes(
        redis_cluster: PrivateCluster, tmp_path: Path, target_kind: str) -> None:
    """A real cluster with one slot set MIGRATING on its owner and IMPORTING on the target
    (another master, or one just added, which serves no slot and so is not in the client's
    slot map), two of its four keys migrated: all four are read and probed (two after
    ASK); a new key of the slot is written to the target (the source answers ASK for a
    key it does not hold); nothing is left to write again. Before, the two migrated keys
    missed and the new key's write failed."""
    ns = make_namespace()
    store = RedisRemoteStore(redis_cluster.url, ns, cluster=True, timeout_s=1.0,
                             max_retries=0)
    tag = "{29c}"  # one slot for every key
    keys = [f"{tag}:{i}" for i in range(5)]
    source = redis_cluster.node_of(keys[0])
    payloads = {k: f"value of {k}".encode() for k in keys[:4]}
    assert store.write_values(list(payloads.items())) == [True] * 4  # the slot map read
    target = (join_new_node(redis_cluster, tmp_path) if target_kind == "new"
              else next(n for n in redis_cluster.nodes if n is not source))
    try:
        with source.client() as src, target.client() as dst:
            slot = int(src.execute_command("CLUSTER", "KEYSLOT", keys[0]))
            source_id = src.execute_command("CLUSTER", "MYID")
            target_id = dst.execute_command("CLUSTER", "MYID")
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS",
                                keys[1], keys[3])
        assert store.read_values(keys) == [*payloads.values(), None], store.last_error
        assert store.has_keys(keys) == [True, True, True, True, False]
        assert store.write_values([(keys[4], b"new")]) == [True]
        with target.client() as dst:
            assert dst.execute_command("ASKING") in (b"OK", "OK", True)
            assert dst.get(keys[4]) == b"new"
        stats = store.stats
        assert (stats.num_asked, stats.num_errors, stats.num_redirects_given_up) == (7, 0, 0)
    finally:
        store.close()
        if target_kind == "new":
            target.kill()


def test_asking_replies_are_read_in_pairs_and_checked() -> None:
    """``read_asking_replies``: per pair ASKING's ``+OK`` (or its refusal) then the
    command's reply, a byte at a time; a bulk string in ASKING's place is a stream out of
    step, not a value."""
    data = b"+OK\r\n$3\r\nabc\r\n-ERR unknown command 'ASKING'\r\n-MOVED 1 h:1\r\n+OK\r\n$-1\r\n"
    reader = SocketReader(ChunkSocket(data, [1]))
    replies = read_asking_replies(reader, 6, scalars=False)
    assert [str(r) if isinstance(r, ErrorReply) else r for r in replies] == [
        b"OK", b"abc", "ERR unknown command 'ASKING'", "MOVED 1 h:1", b"OK", None]
    assert reader.drained
    with pytest.raises(ProtocolError, match="ASKING reply"):
        read_asking_replies(SocketReader(ChunkSocket(b"$2\r\nOK\r\n:1\r\n")), 2)
