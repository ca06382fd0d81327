"""RedisRemoteStore against real servers: round trips, refused values, sharing, auth."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import RedisServers
from remote_helpers import make_blocks, make_namespace

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
    results: list[dict[int, bytes]] = []
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
