"""Real Redis servers for the remote-tier tests.

The shared servers come from ``KVTIER_REDIS_URL`` / ``KVTIER_REDIS_CLUSTER_URL`` (set by CI
after ``.ci/redis.sh start``); without them this starts its own with that script for the
session. Tests that kill, pause or fill a server get a private one (``make_redis_server``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "redis.sh"


class RedisServers(NamedTuple):
    url: str  # standalone, with a password
    cluster_url: str


@pytest.fixture(scope="session")
def redis_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServers]:
    """The shared standalone server and three-node cluster."""
    pytest.importorskip("redis")
    url = os.environ.get("KVTIER_REDIS_URL")
    cluster_url = os.environ.get("KVTIER_REDIS_CLUSTER_URL")
    if url and cluster_url:
        yield RedisServers(url, cluster_url)
        return
    env = {**os.environ, "KVTIER_REDIS_DIR": str(tmp_path_factory.mktemp("redis"))}
    started = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True,
                             timeout=600, check=False)
    if started.returncode != 0:
        pytest.skip("redis-server is missing and .ci/redis.sh could not install or start it: "
                    + started.stderr.strip()[-400:])
    urls = dict(line.split("=", 1) for line in started.stdout.split() if "=" in line)
    yield RedisServers(urls["KVTIER_REDIS_URL"], urls["KVTIER_REDIS_CLUSTER_URL"])
    if "already running" not in started.stderr:  # stop only what this session started
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, timeout=60,
                       check=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """One loopback redis-server of one test, which it may kill, restart, pause or fill."""

    def __init__(self, directory: Path) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        assert self.proc is None
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--enable-debug-command", "local",
             "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with self.client() as client:
                    client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError(f"private redis-server on port {self.port} did not start in 10 s")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)


@pytest.fixture
def make_redis_server(redis_servers: RedisServers, tmp_path: Path) -> Iterator[type[object]]:
    """A factory of private servers; each is killed at the end of the test."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH (the shared servers run elsewhere)")
    servers: list[PrivateRedis] = []

    def make() -> PrivateRedis:
        server = PrivateRedis(tmp_path)
        servers.append(server)
        return server

    yield make  # type: ignore[misc]
    for server in servers:
        if server.proc is not None:
            server.kill()
