"""The clients a Redis store holds (``kvtier.remote.redis_clients``), over stand-in clients."""

from __future__ import annotations

from typing import Any

import pytest

from kvtier.remote.redis_clients import MAX_UNLISTED_NODES, WHOLE, RedisClients

pytest.importorskip("redis")


class FakePool:
    """A connection pool that notes each disconnect of its idle connections."""

    def __init__(self) -> None:
        self.num_idle_disconnects = 0

    def disconnect(self, inuse_connections: bool = True) -> None:
        assert not inuse_connections
        self.num_idle_disconnects += 1


class FakeNodeClient:
    """A node's client: its pool, and whether it was closed."""

    def __init__(self) -> None:
        self.connection_pool = FakePool()
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeNodesManager:
    """redis-py's nodes manager: makes a client per node; counts slot map reloads."""

    def __init__(self) -> None:
        self.num_initialized = 0

    def create_redis_connections(self, nodes: list[Any]) -> None:
        for node in nodes:
            node.redis_connection = FakeNodeClient()

    def initialize(self) -> None:
        self.num_initialized += 1


class FakeCluster(FakeNodeClient):
    """A cluster client whose slot map lists ``listed`` nodes."""

    def __init__(self, listed: tuple[str, ...] = ("10.0.0.1:7001",)) -> None:
        super().__init__()
        self.nodes = {name: FakeNodeClient() for name in listed}
        self.nodes_manager = FakeNodesManager()

    def get_node(self, node_name: str) -> str | None:
        return node_name if node_name in self.nodes else None

    def get_redis_connection(self, node: str) -> FakeNodeClient:
        return self.nodes[node]


def make_clients(closed: list[bool] | None = None) -> tuple[RedisClients, list[FakeCluster]]:
    """Clients whose every connect makes a new FakeCluster (listed in the list returned);
    closed while ``closed[0]``."""
    made: list[FakeCluster] = []
    flag = closed if closed is not None else [False]

    def connect() -> FakeCluster:
        made.append(FakeCluster())
        return made[-1]

    return RedisClients(connect, lambda: flag[0]), made


def test_the_client_is_made_once_and_again_after_a_drop() -> None:
    """get() connects on first use only; drop() closes it and the next get() connects."""
    clients, made = make_clients()
    assert clients.current() is None
    first = clients.get()
    assert clients.get() is first and made == [first]
    clients.drop()
    assert first.closed and clients.current() is None
    second = clients.get()
    assert made == [first, second] and second is not first


def test_a_closed_store_gets_no_client() -> None:
    """get() raises ConnectionError once the store says it is closed, and makes none."""
    closed = [True]
    clients, made = make_clients(closed)
    with pytest.raises(ConnectionError, match="closed"):
        clients.get()
    assert made == []


def test_a_node_is_the_whole_client_a_listed_nodes_or_an_asked_unlisted_one() -> None:
    """WHOLE: the client itself; a listed node: its client; an unlisted one: made only
    when an ASK named it, kept, and closed with the client."""
    clients, _ = make_clients()
    cluster = clients.get()
    assert clients.node(cluster, WHOLE) is cluster
    assert clients.node(cluster, "10.0.0.1:7001") is cluster.nodes["10.0.0.1:7001"]
    with pytest.raises(ConnectionError, match="not in the slot map"):
        clients.node(cluster, "10.0.0.9:7009")
    asked = clients.node(cluster, "10.0.0.9:7009", asked=True)
    assert clients.node(cluster, "10.0.0.9:7009") is asked  # kept once made
    clients.drop()
    assert asked.closed


def test_unlisted_node_clients_stop_at_the_cap() -> None:
    """Past MAX_UNLISTED_NODES unlisted nodes, an ASK target gets no client."""
    clients, _ = make_clients()
    cluster = clients.get()
    for i in range(MAX_UNLISTED_NODES):
        clients.node(cluster, f"10.0.1.{i}:7000", asked=True)
    with pytest.raises(ConnectionError):
        clients.node(cluster, "10.0.2.1:7000", asked=True)


def test_drop_idle_and_reload_slots_touch_only_a_made_client() -> None:
    """Without a client both do nothing; with one, the node's idle connections are
    closed and the slot map read again."""
    clients, made = make_clients()
    clients.drop_idle("10.0.0.1:7001")
    clients.reload_slots()
    assert made == []
    cluster = clients.get()
    clients.drop_idle("10.0.0.1:7001")
    clients.reload_slots()
    assert cluster.nodes["10.0.0.1:7001"].connection_pool.num_idle_disconnects == 1
    assert cluster.nodes_manager.num_initialized == 1
