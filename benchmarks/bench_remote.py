"""Pipelined read and write throughput of RedisRemoteStore against one local Redis, next to
``redis-benchmark`` on the same server in the same run (the ceiling), and the latency of a
one-block fetch.

For each block size (64 KiB, 1 MiB, 4 MiB of KV bytes: 4 MiB is one 32-token block of
Llama-3-8B; each value carries a 76-byte header too) the store writes ``--total-mib`` of
distinct blocks with ``put_many`` in batches of ``--batch`` blocks, reads them back with
``get_many`` (payload checks included) over one connection and over ``--connections``
connections (``RedisRemoteStore(num_connections=...)``), then deletes them.
``redis-benchmark`` runs ``-t set,get -d <size> -n <same count>`` with 1 client x 16
pipelined and with ``--connections`` clients x 4 pipelined; the better GET is the ceiling.
The fetch latency is the median ``get_many`` of one 1 KiB block. The read figures are what
``kvtier.sim.timemodel.RemoteLink`` and ``kvtier.remote.tier`` take as their defaults.

The import section (needs torch, no Redis) times what a fetch costs after the store answered:
``--import-mib`` of Llama-3-8B blocks (32 layers x 8 KV heads x 128 x 32 tokens, bfloat16:
4 MiB) read from an in-memory store and written into host slots (``RemoteShard.get`` then
``fill``: payload checks and copies), in batches of ``--batch``, for both memory layouts,
next to a plain copy (numpy) of the same payloads into the same slots in the same run
(the ceiling: what is left is the lookup, the checks and first touches).

    .ci/redis.sh start && python benchmarks/bench_remote.py
    python benchmarks/bench_remote.py --smoke        # seconds
    python benchmarks/bench_remote.py --import-only  # the import section alone

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
import statistics
import subprocess
import sys
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
    head_dim = max(1, block_bytes // (2 * 2 * 16))
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=head_dim, tokens_per_block=16,
                      dtype="float16")
    assert layout.bytes_per_block == block_bytes, (layout.bytes_per_block, block_bytes)
    return layout


def measure_store(url: str, block_bytes: int, num_blocks: int, batch: int,
                  connections: int) -> dict[str, float]:
    """Write ``num_blocks`` blocks, then read them over one connection and over
    ``connections``; seconds of each."""
    namespace = RemoteNamespace(f"bench-{uuid.uuid4().hex}", layout_of(block_bytes))
    store = RedisRemoteStore(url, namespace, timeout_s=30.0, max_retries=0)
    parallel = RedisRemoteStore(url, namespace, timeout_s=30.0, max_retries=0,
                                num_connections=connections)
    base = os.urandom(block_bytes)
    hashes = list(range(1, num_blocks + 1))
    # Distinct payloads without paying for os.urandom per block: stamp the hash in front.
    blocks = {h: h.to_bytes(8, "big") + base[8:] for h in hashes}
    store.put_many({0: base})  # connect before the clock starts
    parallel.get_many([0] * connections)
    started = time.perf_counter()
    for i in range(0, num_blocks, batch):
        store.put_many({h: blocks[h] for h in hashes[i : i + batch]})
    times = {"write_s": time.perf_counter() - started}
    for key, reader in (("read_s", store), ("parallel_read_s", parallel)):
        started = time.perf_counter()
        num_hits = 0
        for i in range(0, num_blocks, batch):
            num_hits += len(reader.get_many(hashes[i : i + batch]))
        times[key] = time.perf_counter() - started
        if num_hits != num_blocks:
            raise RuntimeError(f"{num_hits} hits of {num_blocks} blocks: {reader.last_error}")
    stats = store.stats
    import redis

    with redis.Redis.from_url(url) as client:
        client.delete(namespace.key(0))
        for i in range(0, num_blocks, 1000):
            client.delete(*(namespace.key(h) for h in hashes[i : i + 1000]))
    store.close()
    parallel.close()
    if stats.num_puts != num_blocks + 1:
        raise RuntimeError(f"{stats.num_puts} puts of {num_blocks} blocks: {store.last_error}")
    return times


def measure_latency(url: str, num_calls: int) -> float:
    """Median seconds of ``get_many`` of one 1 KiB block (a fetch's fixed cost)."""
    namespace = RemoteNamespace(f"bench-{uuid.uuid4().hex}", layout_of(KIB))
    store = RedisRemoteStore(url, namespace, timeout_s=30.0, max_retries=0)
    store.put_many({1: os.urandom(KIB)})
    samples = []
    for _ in range(num_calls):
        started = time.perf_counter()
        if len(store.get_many([1])) != 1:
            raise RuntimeError(f"the latency probe missed: {store.last_error}")
        samples.append(time.perf_counter() - started)
    import redis

    with redis.Redis.from_url(url) as client:
        client.delete(namespace.key(1))
    store.close()
    return statistics.median(samples)


IMPORT_LAYOUT = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, tokens_per_block=32,
                         dtype="bfloat16")  # Llama-3-8B's block of 32 tokens: 4 MiB


def measure_import(layout: KVLayout, num_blocks: int, batch: int,
                   repeats: int) -> dict[str, float]:
    """Best seconds (of ``repeats``) to import ``num_blocks`` blocks from an in-memory store
    into ``batch`` host slots (``RemoteShard.get`` + ``fill``, ``batch`` blocks a fetch), and
    to copy the same blocks' payloads (distinct buffers, as cold in the cache as the store's
    values) into the same slots, one memcpy a slot of each host tensor (the ceiling)."""
    import numpy as np
    import torch

    from kvtier.remote import InMemoryRemoteStore
    from kvtier.remote.ranks import RemoteShard
    from kvtier.storage import KVStorage

    store = InMemoryRemoteStore(RemoteNamespace(f"bench-{uuid.uuid4().hex}", layout))
    host = KVStorage(layout, batch, pin_memory=False)
    shard = RemoteShard(store, KVStorage(layout, 1, pin_memory=False), host)
    base = os.urandom(layout.bytes_per_block)
    hashes = list(range(1, num_blocks + 1))
    payloads = {h: h.to_bytes(8, "big") + base[8:] for h in hashes}
    store.put_many(payloads)
    best = {"import_s": float("inf"), "copy_s": float("inf")}
    fetch_ids = iter(range(1 << 62))
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(0, num_blocks, batch):
            fid, wanted = next(fetch_ids), hashes[i : i + batch]
            shard.get(fid, wanted)
            shard.fill(fid, [(h, slot) for slot, h in enumerate(wanted)])
        best["import_s"] = min(best["import_s"], time.perf_counter() - started)
        last = hashes[(num_blocks - 1) // batch * batch :]
        for slot, h in enumerate(last):  # what the import wrote is the stored payload
            if host.block(slot).view(torch.uint8).numpy().tobytes() != payloads[h]:
                raise RuntimeError(f"host slot {slot} does not hold block {h}'s bytes")
        started = time.perf_counter()
        for i in range(0, num_blocks, batch):
            for slot, h in enumerate(hashes[i : i + batch]):
                offset = 0
                for tensor in host.tensors:
                    dst = tensor[slot].view(torch.uint8).numpy().reshape(-1)
                    np.copyto(dst, np.frombuffer(payloads[h], np.uint8, dst.size, offset))
                    offset += dst.size
        best["copy_s"] = min(best["copy_s"], time.perf_counter() - started)
    store.close()
    return best


def redis_benchmark_rps(url: str, block_bytes: int, num_requests: int, clients: int,
                        pipeline: int) -> dict[str, float] | None:
    """Requests a second of ``redis-benchmark`` SET and GET with ``clients`` connections of
    ``pipeline`` requests in flight, or None without the tool."""
    tool = shutil.which("redis-benchmark")
    if tool is None:
        return None
    parts = urlsplit(url)
    cmd = [tool, "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379),
           "-t", "set,get", "-d", str(block_bytes), "-c", str(clients), "-P", str(pipeline),
           "-n", str(num_requests), "--csv"]
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


def environment(url: str | None) -> dict[str, Any]:
    """The machine, Python, and with ``url`` the Redis client, parser and server."""
    env: dict[str, Any] = {"machine": platform.machine(),
                           "processor": platform.processor() or None, "cpus": os.cpu_count(),
                           "platform": platform.platform(), "python": platform.python_version()}
    if url is None:
        return env
    import redis

    with redis.Redis.from_url(url) as client:
        server = client.info("server")
    # NOTE: a batch's replies are read off the socket by kvtier.remote.resp; redis-py's
    # parser (hiredis where installed) reads only a connection's handshake.
    try:
        import hiredis

        handshake = f"hiredis {hiredis.__version__}"
    except ImportError:
        handshake = "python (no hiredis)"
    parser = f"kvtier.remote.resp (handshake: redis-py, {handshake})"
    return {**env, "redis_py": redis.__version__, "reply_parser": parser,
            "redis_server": server.get("redis_version"),
            "server_io_threads": server.get("io_threads_active")}


def _mb(num_blocks: int, block_bytes: int, seconds: float) -> float:
    return round(num_blocks * block_bytes / seconds / 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("KVTIER_REDIS_URL", DEFAULT_URL))
    parser.add_argument("--sizes-kib", default="64,1024,4096")
    parser.add_argument("--total-mib", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32, help="blocks per put_many/get_many")
    parser.add_argument("--connections", type=int, default=4,
                        help="connections of the parallel reads and of redis-benchmark's "
                        "second run (default: 4)")
    parser.add_argument("--smoke", action="store_true", help="4 MiB per size, no ceiling")
    parser.add_argument("--import-mib", type=int, default=256,
                        help="MiB of 4 MiB blocks the import section reads (default: 256)")
    parser.add_argument("--import-repeats", type=int, default=3,
                        help="runs of the import section; the best is reported (default: 3)")
    parser.add_argument("--import-only", action="store_true",
                        help="only the import section (no Redis)")
    parser.add_argument("--no-hiredis", action="store_true",
                        help="redis-py parses the connection handshake in Python, as "
                        "without the hiredis package (a batch's replies are read by "
                        "kvtier.remote.resp either way)")
    args = parser.parse_args()
    if args.no_hiredis:
        # NOTE: redis-py picks its parser when first imported; a None entry hides hiredis.
        sys.modules["hiredis"] = None  # type: ignore[assignment]
    summary: dict[str, Any] = {"benchmark": "remote", "batch_blocks": args.batch}
    if not args.import_only:
        summary.update(store_section(args))
    summary["import"] = import_section(4 if args.smoke else args.import_mib, args.batch,
                                       1 if args.smoke else args.import_repeats)
    summary["env"] = environment(None if args.import_only else args.url)
    print(json.dumps(summary))


def store_section(args: argparse.Namespace) -> dict[str, Any]:
    """The store's read and write throughput and fetch latency (printed); their summary."""
    total_bytes = (4 if args.smoke else args.total_mib) * MIB
    latency_s = measure_latency(args.url, 20 if args.smoke else 200)
    results = []
    for size_kib in (int(s) for s in args.sizes_kib.split(",")):
        block_bytes = size_kib * KIB
        num_blocks = max(1, total_bytes // block_bytes)
        times = measure_store(args.url, block_bytes, num_blocks, args.batch, args.connections)
        row: dict[str, Any] = {"block_kib": size_kib, "num_blocks": num_blocks,
                               "write_mb_per_s": _mb(num_blocks, block_bytes, times["write_s"]),
                               "read_mb_per_s": _mb(num_blocks, block_bytes, times["read_s"]),
                               "parallel_read_mb_per_s": _mb(num_blocks, block_bytes,
                                                             times["parallel_read_s"])}
        ceilings = {}
        if not args.smoke:
            for clients, pipeline in ((1, 16), (args.connections, 4)):
                rps = redis_benchmark_rps(args.url, block_bytes, num_blocks, clients, pipeline)
                if rps is not None:
                    ceilings[f"c{clients}_p{pipeline}"] = {
                        op.lower(): round(v * block_bytes / 1e6, 1) for op, v in rps.items()}
        row["redis_benchmark_mb_per_s"] = ceilings
        best = max((c.get("get", 0.0) for c in ceilings.values()), default=None)
        row["read_ceiling_mb_per_s"] = best or None
        for key in ("read", "parallel_read"):
            row[f"{key}_ratio"] = (round(row[f"{key}_mb_per_s"] / best, 3) if best else None)
        results.append(row)
    header = (f"{'block':>8} {'blocks':>7} | {'write MB/s':>10} | {'read 1 conn':>11} "
              f"{f'read {args.connections} conn':>12} | {'redis-benchmark GET':>19} | "
              f"{'ratio 1':>7} {f'ratio {args.connections}':>7}")
    print(header)
    print("-" * len(header))
    for r in results:
        ceiling = r["read_ceiling_mb_per_s"]
        print(f"{r['block_kib']:>5}KiB {r['num_blocks']:>7} | {r['write_mb_per_s']:>10.1f} | "
              f"{r['read_mb_per_s']:>11.1f} {r['parallel_read_mb_per_s']:>12.1f} | "
              f"{ceiling or float('nan'):>19.1f} | {r['read_ratio'] or float('nan'):>7.2f} "
              f"{r['parallel_read_ratio'] or float('nan'):>7.2f}")
    print(f"fetch latency (get_many of one 1 KiB block, median): {latency_s * 1e3:.3f} ms")
    return {"connections": args.connections, "total_mib": total_bytes // MIB,
            "fetch_latency_s": latency_s, "results": results}


def import_section(total_mib: int, batch: int, repeats: int) -> list[dict[str, Any]]:
    """The import into host slots for both memory layouts (printed); a row each."""
    from dataclasses import replace

    rows = []
    for memory_layout in ("block_major", "layer_major"):
        layout = replace(IMPORT_LAYOUT, layout=memory_layout)
        num_blocks = max(1, total_mib * MIB // layout.bytes_per_block)
        times = measure_import(layout, num_blocks, min(batch, num_blocks), repeats)
        import_mib_s = num_blocks * layout.bytes_per_block / MIB / times["import_s"]
        copy_mib_s = num_blocks * layout.bytes_per_block / MIB / times["copy_s"]
        rows.append({"layout": memory_layout, "block_mib": layout.bytes_per_block / MIB,
                     "num_blocks": num_blocks, "repeats": repeats,
                     "import_mib_per_s": round(import_mib_s, 1),
                     "copy_mib_per_s": round(copy_mib_s, 1),
                     "ratio": round(import_mib_s / copy_mib_s, 3)})
    header = (f"{'import into host slots':<24} {'blocks':>7} | {'import MiB/s':>12} | "
              f"{'one copy MiB/s':>14} | {'ratio':>5}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['layout']:<15} {r['block_mib']:>4.0f} MiB {r['num_blocks']:>7} | "
              f"{r['import_mib_per_s']:>12.1f} | {r['copy_mib_per_s']:>14.1f} | "
              f"{r['ratio']:>5.2f}")
    return rows

if __name__ == "__main__":
    main()
