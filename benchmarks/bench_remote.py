"""Pipelined read and write throughput of RedisRemoteStore against one local Redis, next to
``redis-benchmark`` on the same server (the ceiling: C clients, SET/GET of the same value
size, ``-P 16`` pipelining).

For each block size (64 KiB, 256 KiB, 1 MiB of KV bytes; each value carries a 76-byte header
too) the store writes ``--total-mib`` of distinct blocks with ``put_many`` in batches of
``--batch`` blocks, reads them back with ``get_many`` (payload checks included), then
deletes them. ``redis-benchmark`` runs ``-t set,get -d <size> -P 16 -n <same count>``.

    .ci/redis.sh start && python benchmarks/bench_remote.py
    python benchmarks/bench_remote.py --smoke        # seconds

Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shutil
import subprocess
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

from kvtier.remote import RedisRemoteStore, RemoteNamespace
from kvtier.storage import KVLayout

KIB = 1024
MIB = 1024 * KIB
DEFAULT_URL = "redis://:kvtier-ci@127.0.0.1:6390/0"


def layout_of(block_bytes: int) -> KVLayout:
    """A float16 layout of 16 tokens a block, one layer, one head, sized to ``block_bytes``."""
    head_dim = block_bytes // (2 * 2 * 16)
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=head_dim, tokens_per_block=16,
                      dtype="float16")
    assert layout.bytes_per_block == block_bytes, (layout.bytes_per_block, block_bytes)
    return layout


def measure_store(url: str, block_bytes: int, num_blocks: int, batch: int) -> dict[str, float]:
    """Write then read ``num_blocks`` blocks; seconds and counts of each direction."""
    namespace = RemoteNamespace(f"bench-{uuid.uuid4().hex}", layout_of(block_bytes))
    store = RedisRemoteStore(url, namespace, timeout_s=30.0, max_retries=0)
    base = os.urandom(block_bytes)
    hashes = list(range(1, num_blocks + 1))
    # Distinct payloads without paying for os.urandom per block: stamp the hash in front.
    blocks = {h: h.to_bytes(8, "big") + base[8:] for h in hashes}
    store.put_many({0: base})  # connect before the clock starts
    started = time.perf_counter()
    for i in range(0, num_blocks, batch):
        store.put_many({h: blocks[h] for h in hashes[i : i + batch]})
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    num_hits = 0
    for i in range(0, num_blocks, batch):
        num_hits += len(store.get_many(hashes[i : i + batch]))
    read_s = time.perf_counter() - started
    stats = store.stats
    import redis

    with redis.Redis.from_url(url) as client:
        client.delete(namespace.key(0))
        for i in range(0, num_blocks, 1000):
            client.delete(*(namespace.key(h) for h in hashes[i : i + 1000]))
    store.close()
    if num_hits != num_blocks or stats.num_puts != num_blocks + 1:
        raise RuntimeError(f"{stats.num_puts} puts and {num_hits} hits of {num_blocks} blocks: "
                           f"{store.last_error}")
    return {"write_s": write_s, "read_s": read_s}


def redis_benchmark_rps(url: str, block_bytes: int, num_requests: int) -> dict[str, float] | None:
    """Requests a second of ``redis-benchmark`` SET and GET, or None without the tool."""
    tool = shutil.which("redis-benchmark")
    if tool is None:
        return None
    parts = urlsplit(url)
    cmd = [tool, "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379),
           "-t", "set,get", "-d", str(block_bytes), "-P", "16", "-n", str(num_requests),
           "--csv"]
    if parts.password:
        # NOTE: redis-benchmark 7.0 ignores REDISCLI_AUTH, so the password goes on the
        # command line (visible in ps; fine for the loopback CI server).
        cmd += ["-a", parts.password]
    if parts.username:
        cmd += ["--user", parts.username]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    rows = {row[0]: float(row[1]) for row in csv.reader(io.StringIO(out.stdout))
            if len(row) > 1 and row[0] in ("SET", "GET")}
    import redis

    with redis.Redis.from_url(url) as client:
        client.delete("key:__rand_int__")
    return rows


def environment(url: str) -> dict[str, Any]:
    import redis

    with redis.Redis.from_url(url) as client:
        server = client.info("server")
    return {"machine": platform.machine(), "processor": platform.processor() or None,
            "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "redis_py": redis.__version__,
            "redis_server": server.get("redis_version")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("KVTIER_REDIS_URL", DEFAULT_URL))
    parser.add_argument("--sizes-kib", default="64,256,1024")
    parser.add_argument("--total-mib", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32, help="blocks per put_many/get_many")
    parser.add_argument("--smoke", action="store_true", help="4 MiB per size, no ceiling")
    args = parser.parse_args()
    total_bytes = (4 if args.smoke else args.total_mib) * MIB
    results = []
    for size_kib in (int(s) for s in args.sizes_kib.split(",")):
        block_bytes = size_kib * KIB
        num_blocks = max(1, total_bytes // block_bytes)
        times = measure_store(args.url, block_bytes, num_blocks, args.batch)
        ceiling = None if args.smoke else redis_benchmark_rps(args.url, block_bytes, num_blocks)
        row: dict[str, Any] = {"block_kib": size_kib, "num_blocks": num_blocks}
        for op, key, bench in (("write", "write_s", "SET"), ("read", "read_s", "GET")):
            blocks_per_s = num_blocks / times[key]
            row[f"{op}_blocks_per_s"] = round(blocks_per_s, 1)
            row[f"{op}_mb_per_s"] = round(blocks_per_s * block_bytes / 1e6, 1)
            rps = None if ceiling is None else ceiling.get(bench)
            ceiling_mb = None if rps is None else round(rps * block_bytes / 1e6, 1)
            row[f"{op}_ceiling_mb_per_s"] = ceiling_mb
            row[f"{op}_ratio"] = None if rps is None else round(blocks_per_s / rps, 3)
        results.append(row)
    header = (f"{'block':>8} {'blocks':>7} | {'write MB/s':>10} {'blk/s':>8} {'ceiling':>8} "
              f"{'ratio':>6} | {'read MB/s':>10} {'blk/s':>8} {'ceiling':>8} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for r in results:
        cells = [f"{r['block_kib']:>5}KiB", f"{r['num_blocks']:>7}", "|"]
        for op in ("write", "read"):
            cells += [f"{r[op + '_mb_per_s']:>10.1f}", f"{r[op + '_blocks_per_s']:>8.1f}",
                      f"{r[op + '_ceiling_mb_per_s'] or float('nan'):>8.1f}",
                      f"{r[op + '_ratio'] or float('nan'):>6.2f}", "|"]
        print(" ".join(cells[:-1]))
    print(json.dumps({"benchmark": "remote", "batch_blocks": args.batch,
                      "total_mib": total_bytes // MIB, "pipeline_ceiling": 16,
                      "env": environment(args.url), "results": results}))


if __name__ == "__main__":
    main()
