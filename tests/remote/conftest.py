"""Real Redis servers for the remote-tier tests.

The shared servers come from ``KVTIER_REDIS_URL`` / ``KVTIER_REDIS_CLUSTER_URL`` (set by CI
after ``.ci/redis.sh start``); without them this starts its own with that script for the
session. Tests that kill, pause or fill a server get a private one (``make_redis_server``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from remote_helpers import PrivateCluster, PrivateRedis, RedisServers, shared_redis_servers


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
