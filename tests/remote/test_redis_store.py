"""RedisRemoteStore against real servers: round trips, refused values, sharing, auth."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from remote_helpers import RedisServers, make_blocks, make_namespace

from kvtier.remote import RedisRemoteStore, RemoteNamespace


@pytest.fixture
def raw(redis_servers: RedisServers) -> Iterator[Any]:
    """A plain redis-py client of the shared standalone server, to tamper with values."""
    import redis

    client = redis.Redis.from_url(redis_servers.url)
    yield client
    client.close()


def make_store(url: str, namespace: RemoteNamespace, **options: Any) -> RedisRemoteStore:
    """A store with short timeouts, so a fault never stalls a test."""
    return RedisRemoteStore(url, namespace, **{"timeout_s": 1.0, **options})


@pytest.mark.parametrize("cluster", [False, True], ids=["standalone", "cluster"])
def test_round_trip(redis_servers: RedisServers, cluster: bool) -> None:
    """Blocks put come back byte for byte, spread over many slots on the cluster."""
    namespace = make_namespace()
    url = redis_servers.cluster_url if cluster else redis_servers.url
    store = make_store(url, namespace, cluster=cluster, max_batch_keys=16)
    blocks = make_blocks(namespace, 100)
    assert store.put_many(blocks) == 100, store.last_error
    assert store.get_many([*blocks, 1000]) == blocks
    assert store.contains_many([1, 50, 1000]) == {1, 50}
    stats = store.stats
    assert (stats.num_hits, stats.num_misses, stats.num_errors) == (100, 1, 0)
    store.close()


def test_ttl_expires_blocks(redis_servers: RedisServers) -> None:
    """With ttl_s the server forgets a block after that long."""
    namespace = make_namespace()
    store = make_store(redis_servers.url, namespace, ttl_s=0.1)
    store.put_many(make_blocks(namespace, 2))
    assert len(store.get_many([1, 2])) == 2
    time.sleep(0.3)
    assert store.get_many([1, 2]) == {}
    store.close()


def test_bad_values_are_refused_and_counted(redis_servers: RedisServers, raw: Any) -> None:
    """Corrupted, truncated, foreign-namespace and wrong-hash values are misses, by reason."""
    namespace = make_namespace()
    store = make_store(redis_servers.url, namespace)
    store.put_many(make_blocks(namespace, 5))
    good = raw.get(namespace.key(1))
    corrupted = bytearray(good)
    corrupted[-1] ^= 0xFF
    raw.set(namespace.key(2), bytes(corrupted))
    raw.set(namespace.key(3), good[: len(good) // 2])
    raw.set(namespace.key(4), good)  # block 1's value under block 4's key
    foreign = RemoteNamespace("another-model", namespace.layout)
    raw.set(namespace.key(5), foreign.encode(5, make_blocks(namespace, 1, first_hash=5)[5]))
    raw.set(namespace.key(6), b"\x80\x04\x95 not a pickle, never evaluated" * 4)
    assert store.get_many(range(1, 7)) == make_blocks(namespace, 1)
    assert store.stats.bad_payload_reasons == {
        "checksum": 1, "truncated": 1, "block_hash": 1, "namespace": 1, "magic": 1}
    assert (store.stats.num_bad_payloads, store.stats.num_misses) == (5, 5)
    store.close()


def test_second_process_reads_what_the_first_wrote(redis_servers: RedisServers) -> None:
    """A separate Python process with its own store writes; this process's store reads."""
    namespace = make_namespace()
    writer = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        from remote_helpers import make_blocks
        from kvtier.remote import RedisRemoteStore, RemoteNamespace
        from kvtier.storage import KVLayout
        namespace = RemoteNamespace({namespace.model_id!r}, KVLayout(**{{
            "num_layers": 2, "num_kv_heads": 2, "head_dim": 64, "tokens_per_block": 16,
            "dtype": "float16"}}))
        store = RedisRemoteStore({redis_servers.url!r}, namespace)
        print(store.put_many(make_blocks(namespace, 20, seed=7)))
        store.close()
    """)
    done = subprocess.run([sys.executable, "-c", writer], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "20"
    store = make_store(redis_servers.url, namespace)
    assert store.get_many(range(1, 21)) == make_blocks(namespace, 20, seed=7)
    store.close()


def test_background_prefetch_and_write_back(redis_servers: RedisServers) -> None:
    """write_back and prefetch run on the I/O thread against the server; flush waits."""
    namespace = make_namespace()
    store = make_store(redis_servers.url, namespace)
    blocks = make_blocks(namespace, 10)
    results: list[dict[int, memoryview]] = []
    assert store.write_back(blocks)
    assert store.prefetch(blocks, results.append)
    assert store.flush(timeout=10)
    assert results == [blocks]
    store.close()


def test_wrong_password_fails_cleanly(redis_servers: RedisServers) -> None:
    """A wrong password gives misses at once and one sentence, without the password."""
    url = redis_servers.url.replace(":kvtier-ci@", ":not-the-password@")
    assert url != redis_servers.url
    namespace = make_namespace()
    store = make_store(url, namespace)
    started = time.monotonic()
    assert store.get_many([1, 2]) == {}
    assert store.put_many(make_blocks(namespace, 1)) == 0
    sentence = store.check_connection()
    assert time.monotonic() - started < 1.0
    assert sentence is not None and "authentication failed" in sentence
    assert "not-the-password" not in sentence and sentence.endswith(".")
    assert store.stats.num_retries == 0  # an auth error is not retried
    store.close()
    assert make_store(redis_servers.url, namespace).check_connection() is None


def test_bad_url_and_options_raise_with_the_value() -> None:
    """A URL of another scheme or a negative timeout is an impossible request."""
    with pytest.raises(ValueError, match="url must start with"):
        RedisRemoteStore("http://u:secret@host", make_namespace())
    with pytest.raises(ValueError, match="timeout_s must be"):
        RedisRemoteStore("redis://127.0.0.1:1", make_namespace(), timeout_s=-1)


def test_benchmark_smoke(redis_servers: RedisServers) -> None:
    """benchmarks/bench_remote.py --smoke runs against the shared server and ends in JSON."""
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_remote.py"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--url", redis_servers.url,
                           "--sizes-kib", "64"], capture_output=True, text=True, timeout=60,
                          check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["results"][0]["num_blocks"] == 64


def _tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    ca_key, ca, key, csr, cert = (directory / n for n in
                                  ("ca.key", "ca.crt", "srv.key", "srv.csr", "srv.crt"))
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    for args in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=kvtier-ca",
         "-keyout", ca_key, "-out", ca],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", key,
         "-out", csr],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days",
         "1", "-extfile", ext, "-out", cert],
    ):
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
    return ca, cert, key


def test_tls_and_acl_user(tmp_path: Path) -> None:
    """rediss:// with a CA file and an ACL user: blocks round-trip; a wrong password is one
    clean sentence, not a hang."""
    import shutil
    import socket

    if shutil.which("openssl") is None or shutil.which("redis-server") is None:
        pytest.skip("needs openssl and redis-server")
    ca, cert, key = _tls_files(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    conf = tmp_path / "redis.conf"
    conf.write_text(f"port 0\ntls-port {port}\nbind 127.0.0.1\ntls-cert-file {cert}\n"
                    f"tls-key-file {key}\ntls-ca-cert-file {ca}\ntls-auth-clients no\n"
                    f'save ""\nappendonly no\ndir {tmp_path}\n'
                    "user kv on >secret ~kvtier:* +@all\n")
    proc = subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        ns = make_namespace()
        url = f"rediss://kv:secret@127.0.0.1:{port}/0"
        store = RedisRemoteStore(url, ns, ca_file=str(ca), timeout_s=2.0)
        deadline = time.monotonic() + 10
        while store.check_connection() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        blocks = make_blocks(ns, 3)
        assert store.put_many(blocks) == 3
        assert store.get_many(list(blocks)) == blocks
        bad = RedisRemoteStore(f"rediss://kv:wrong@127.0.0.1:{port}/0", ns, ca_file=str(ca),
                               timeout_s=2.0)
        t0 = time.monotonic()
        assert bad.get_many(list(blocks)) == {}
        assert time.monotonic() - t0 < 5
        assert bad.last_error is not None and "secret" not in bad.last_error
        with pytest.raises(ValueError, match="ca_file is for TLS"):
            RedisRemoteStore(f"redis://127.0.0.1:{port}/0", ns, ca_file=str(ca))
        store.close()
        bad.close()
    finally:
        proc.kill()
        proc.wait()
