"""Tiny factories shared by the remote-tier tests."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from kvtier.remote import RemoteNamespace
from kvtier.storage import KVLayout


def make_namespace(bytes_per_token_scale: int = 1, tokens_per_block: int = 16) -> RemoteNamespace:
    """A namespace no other test shares: blocks of 2 * 2 * 2 * 64 * 2 B * tokens."""
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64 * bytes_per_token_scale,
                      tokens_per_block=tokens_per_block, dtype="float16")
    return RemoteNamespace(f"test-{uuid.uuid4().hex}", layout)


def make_blocks(namespace: RemoteNamespace, num_blocks: int, first_hash: int = 1,
                seed: int = 0) -> dict[int, bytes]:
    """``num_blocks`` distinct payloads keyed by hashes ``first_hash, first_hash + 1, ...``."""
    size = namespace.layout.bytes_per_block
    return {first_hash + i: (seed * 1_000_003 + first_hash + i).to_bytes(8, "big") * (size // 8)
            for i in range(num_blocks)}


class RedisServers(NamedTuple):
    url: str  # standalone, with a password
    cluster_url: str


REDIS_SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "redis.sh"


def shared_redis_servers(work_dir: Path) -> Iterator[RedisServers]:
    """The shared standalone server (with a password) and three-node cluster, for a session
    fixture to yield from: CI's (``KVTIER_REDIS_URL`` / ``KVTIER_REDIS_CLUSTER_URL``), else
    started with .ci/redis.sh in ``work_dir`` and stopped after, unless it was running."""
    url = os.environ.get("KVTIER_REDIS_URL")
    cluster_url = os.environ.get("KVTIER_REDIS_CLUSTER_URL")
    if url and cluster_url:
        yield RedisServers(url, cluster_url)
        return
    env = {**os.environ, "KVTIER_REDIS_DIR": str(work_dir)}
    started = subprocess.run([str(REDIS_SCRIPT), "start"], env=env, capture_output=True,
                             text=True, timeout=600, check=False)
    if started.returncode != 0:
        pytest.skip("redis-server is missing and .ci/redis.sh could not install or start it: "
                    + started.stderr.strip()[-400:])
    urls = dict(line.split("=", 1) for line in started.stdout.split() if "=" in line)
    yield RedisServers(urls["KVTIER_REDIS_URL"], urls["KVTIER_REDIS_CLUSTER_URL"])
    if "already running" not in started.stderr:  # stop only what this session started
        subprocess.run([str(REDIS_SCRIPT), "stop"], env=env, capture_output=True, timeout=60,
                       check=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """One loopback redis-server of one test, which it may kill, restart, pause or fill."""

    def __init__(self, directory: Path, cluster: bool = False) -> None:
        self.port = _free_cluster_port() if cluster else _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = directory
        self.cluster = cluster
        directory.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        assert self.proc is None
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--enable-debug-command", "local",
             "--dir", str(self.directory),
             *(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000",
                "--cluster-require-full-coverage", "no"] if self.cluster else [])],
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


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    import random

    for _ in range(200):
        port = random.randint(20000, 40000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class PrivateCluster:
    """A three-master Redis Cluster of one test, on loopback, which it may kill a node of.

    ``cluster-require-full-coverage no``: the live masters keep serving their slots while
    one is down (the setting a cluster that wants partial availability runs with).
    """

    def __init__(self, directory: Path) -> None:
        self.nodes = [PrivateRedis(directory / f"node{i}", cluster=True) for i in range(3)]
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas",
                        "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with self.nodes[0].client() as client:
                info = client.execute_command("CLUSTER", "INFO")
                if "cluster_state:ok" in str(info) or (
                        isinstance(info, dict) and info.get("cluster_state") == "ok"):
                    break
            time.sleep(0.1)
        else:
            raise RuntimeError("private cluster did not reach cluster_state:ok in 20 s")
        time.sleep(0.5)  # let every node learn the slot map
        self.url = self.nodes[0].url.removesuffix("/0")

    def node_of(self, key: str) -> PrivateRedis:
        """The node that owns ``key``'s slot."""
        with self.nodes[0].client() as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, owner, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    port = int(owner[1])
                    return next(n for n in self.nodes if n.port == port)
        raise AssertionError(f"no node owns the slot of {key!r}")

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None:
                node.kill()
