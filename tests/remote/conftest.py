"""Real Redis servers for the remote-tier tests.

The shared servers come from ``KVTIER_REDIS_URL`` / ``KVTIER_REDIS_CLUSTER_URL`` (set by CI
after ``.ci/redis.sh start``); without them this starts its own with that script for the
session. Tests that kill, pause or fill a server get a private one (``make_redis_server``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from remote_helpers import PrivateCluster, PrivateRedis, RedisServers, shared_redis_servers

if TYPE_CHECKING:
    from test_red_team_29c_cluster import MigratingCluster


@pytest.fixture(scope="session")
def redis_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServers]:
    """The shared standalone server and three-node cluster."""
    pytest.importorskip("redis")
    yield from shared_redis_servers(tmp_path_factory.mktemp("redis"))


@pytest.fixture
def make_redis_server(redis_servers: RedisServers,
                      tmp_path: Path) -> Iterator[Callable[[], PrivateRedis]]:
    """A factory of private servers; each is killed at the end of the test."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH (the shared servers run elsewhere)")
    servers: list[PrivateRedis] = []

    def make() -> PrivateRedis:
        server = PrivateRedis(tmp_path)
        servers.append(server)
        return server

    yield make
    for server in servers:
        if server.proc is not None:
            server.kill()


@pytest.fixture
def redis_cluster(redis_servers: RedisServers, tmp_path: Path) -> Iterator[PrivateCluster]:
    """A private three-node cluster, stopped at the end of the test (it may kill a node)."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server and redis-cli are needed for a private cluster")
    cluster = PrivateCluster(tmp_path)
    yield cluster
    cluster.stop()


@pytest.fixture
def logged_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[MigratingCluster]:
    """A fake cluster (``MigratingCluster``: three nodes, every key on a) whose every
    pipeline the store sends is logged (``pipelines``: the node's name and the commands)."""
    from test_red_team_29c_cluster import MigratingCluster

    import kvtier.remote.redis_pipeline as redis_pipeline
    from kvtier.remote import redis_store

    fake = MigratingCluster()
    pipeline = redis_pipeline.pipeline  # the store sends through its own name of it

    def logged(commands: list[tuple[Any, ...]], client: Any, *args: Any) -> list[Any]:
        fake.pipelines.append((fake.name_of(client), [str(c[0]) for c in commands]))
        return pipeline(commands, client, *args)

    monkeypatch.setattr(redis_store, "pipeline", logged)
    yield fake
    fake.close()

