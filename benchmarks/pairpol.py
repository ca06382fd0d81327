"""Manager cost per admitted block, two versions paired per request in one process.

    python benchmarks/pairpol.py BEFORE AFTER [--limit 2000|all] [--policies a,b]
    python benchmarks/pairpol.py BEFORE AFTER --runs before:priority-lru,after:kvtier-predict-cost

``BEFORE`` and ``AFTER`` are checkouts (each with ``src/kvtier``): an export of ``main``
(``git archive main | tar -x -C /tmp/before``) and a worktree, say. Each is copied into a
temporary folder as a package of its own name (``kvtier_before``, ``kvtier_after``; its
``kvtier`` imports renamed), so both load in this one interpreter. Every pair of version
and policy gets a manager of its own, and the loop of ``bench_manager.py`` runs for all of
them request by request: each request is admitted (``add_sequence`` + ``take_plan``) and,
16 requests later, released by every manager in turn, the order rotating with the request,
each call timed by the thread's CPU clock with the cyclic collector off. The managers thus
share the machine's load of every moment, which the alternated runs of separate processes
do not: on a machine shared with other jobs, before/after differences of 1-2 % show here
that single runs (spread ~10 %) cannot. The cache's clock is the trace's timestamps, so
every version makes the same decisions however fast it runs; the hit rates printed must be
equal across versions.

Prints, per version and policy, microseconds per admitted block and the hit rate, then the
after/before ratio per policy and each version's ratio of the second policy to the first
(issue 10's CPU bound: the default against priority-LRU). ``--runs`` pairs chosen (version,
policy) runs instead of every version with every policy, and prints each run's ratio to the
first: an old checkout's priority-LRU against today's default, say (a checkout from before
``take_plan`` existed runs without it). The first 2,000 requests run
with 16,384 GPU blocks (eviction every few requests), the whole trace with 1,000,000 (none),
as in ``bench_manager.py``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.peers import TRACE, mooncake_prompts  # noqa: E402

_IMPORT = re.compile(r"(^|[^A-Za-z0-9_.])kvtier(\.|\s|$)", re.MULTILINE)


def load_as(src: Path, name: str, into: Path) -> ModuleType:
    """``src/kvtier`` of the checkout ``src`` copied under ``into`` as package ``name`` (every
    ``kvtier`` import inside it renamed) and imported."""
    dest = into / name
    shutil.copytree(src / "src" / "kvtier", dest,
                    ignore=shutil.ignore_patterns("__pycache__"))
    for path in dest.rglob("*.py"):
        text = path.read_text()
        path.write_text(_IMPORT.sub(lambda m: f"{m[1]}{name}{m[2]}", text))
    if str(into) not in sys.path:
        sys.path.insert(0, str(into))
    return importlib.import_module(name)


def arrivals_s(limit: int | None) -> list[float]:
    with TRACE.open() as f:
        return [json.loads(line)["timestamp"] / 1000
                for i, line in enumerate(f) if limit is None or i < limit]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--limit", default="2000", help="requests (default 2000) or 'all'")
    ap.add_argument("--policies", default="priority-lru,kvtier-predict-cost")
    ap.add_argument("--runs", default=None,
                    help="VERSION:POLICY,... (VERSION before or after): only these runs, "
                         "each one's ratio to the first printed")
    ap.add_argument("--in-flight", type=int, default=16)
    args = ap.parse_args()
    limit = None if args.limit == "all" else int(args.limit)
    policies = args.policies.split(",")
    chosen: list[tuple[str, str]] | None = None
    if args.runs is not None:
        chosen = []
        for item in args.runs.split(","):
            version, sep, policy = item.partition(":")
            if not sep or version not in ("before", "after") or not policy:
                ap.error(f"--runs: {item!r} is not VERSION:POLICY with VERSION before or after")
            chosen.append((version, policy))
    # NOTE: the copies stay until the end: the package imports its modules lazily.
    with tempfile.TemporaryDirectory(prefix="pairpol-") as tmp:
        versions = {"before": load_as(args.before, "kvtier_before", Path(tmp)),
                    "after": load_as(args.after, "kvtier_after", Path(tmp))}
        run(versions, policies, limit, args.in_flight, chosen)


def run(versions: dict[str, ModuleType], policies: list[str], limit: int | None,
        in_flight: int, chosen: list[tuple[str, str]] | None = None) -> None:
    num_gpu_blocks = 16_384 if limit is not None and limit <= 2000 else 1_000_000
    arrivals = arrivals_s(limit)
    runs = []
    pairs = chosen if chosen is not None else [
        (version, policy) for version in versions for policy in policies]
    for version, policy in pairs:
        mod = versions[version]
        now = [0.0]
        config = mod.CacheConfig(tokens_per_block=32, num_gpu_blocks=num_gpu_blocks,
                                 eviction_policy=policy)
        mgr = mod.KVCacheManager(config, clock=lambda now=now: now[0])
        runs.append({"version": version, "policy": policy, "now": now, "mgr": mgr,
                     "take_plan": getattr(mgr, "take_plan", None),
                     "spec": mod.SequenceSpec, "live": deque(), "cpu": 0.0,
                     "blocks": 0, "tokens": 0, "reused": 0})
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}; python {platform.python_version()}; trace "
          f"{TRACE.name}, {'all' if limit is None else limit} requests, {num_gpu_blocks:,} GPU "
          f"blocks, {in_flight} in flight")
    gc.collect()
    gc.disable()
    clock = time.thread_time
    try:
        for i, tokens in enumerate(mooncake_prompts(TRACE, limit)):
            rid = str(i)
            k = i % len(runs)
            for r in runs[k:] + runs[:k]:
                r["now"][0] = arrivals[i]
                mgr, live = r["mgr"], r["live"]
                t0 = clock()
                a = mgr.add_sequence(r["spec"](rid, tokens))
                if r["take_plan"] is not None:
                    r["take_plan"]()
                live.append(rid)
                if len(live) > in_flight:
                    mgr.remove_sequence(live.popleft())
                r["cpu"] += clock() - t0
                r["blocks"] += len(a.block_ids)
                r["reused"] += a.num_reused_tokens
                r["tokens"] += len(tokens)
                del a
    finally:
        gc.enable()
    rows = [{"version": r["version"], "policy": r["policy"],
             "us_per_block": r["cpu"] / r["blocks"] * 1e6,
             "hit_rate": r["reused"] / r["tokens"]} for r in runs]
    summary = {"benchmark": "pairpol", "python": platform.python_version(),
               "limit": limit, "num_gpu_blocks": num_gpu_blocks, "in_flight": in_flight,
               "load": os.getloadavg()[0], "runs": rows}
    if chosen is not None:
        first = rows[0]["us_per_block"]
        for row in rows:
            print(f"{row['version']:6} {row['policy']:22} {row['us_per_block']:.4f} us/block "
                  f"hit {row['hit_rate']:.4f} ratio to the first "
                  f"{row['us_per_block'] / first:.3f}")
        print(json.dumps(summary))
        return
    us = {}
    for r in runs:
        us[r["version"], r["policy"]] = per_block = r["cpu"] / r["blocks"] * 1e6
        print(f"{r['version']:6} {r['policy']:22} {per_block:.4f} us/block "
              f"hit {r['reused'] / r['tokens']:.4f}")
    for policy in policies:
        print(f"after/before {policy}: {us['after', policy] / us['before', policy]:.4f}")
    if len(policies) > 1:
        for version in versions:
            ratio = us[version, policies[1]] / us[version, policies[0]]
            print(f"{version} {policies[1]}/{policies[0]}: {ratio:.3f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
