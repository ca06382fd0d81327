"""Tiny factories shared by the remote-tier tests."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

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
