"""Manager speed on the Mooncake conversation trace: microseconds per admitted block.

The loop (the same one the peers in ``benchmarks/peers`` run): for each request in order,
build its tokens (hash id ``h`` stands for tokens ``h*512 .. h*512+511``, the last block cut
to ``input_length``; not timed), then time request creation + lookup + allocation
(``add_sequence``) and, 16 requests later, its release (``remove_sequence``; full blocks stay
cached). The cache's clock is the trace's timestamps (decisions do not depend on how fast
the run goes). Prints a table, then one JSON line.

    python benchmarks/bench_manager.py                       # both settings
    python benchmarks/bench_manager.py --setting small --peers .venv-peers/bin/python
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from kvtier import CacheConfig, KVCacheManager, SequenceSpec
from kvtier.config import EVICTION_POLICIES

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.peers import TRACE, mooncake_prompts, run_isolated  # noqa: E402

SETTINGS = {
    "small": {"num_requests": 2000, "num_gpu_blocks": 16_384},
    "full": {"num_requests": None, "num_gpu_blocks": 1_000_000},
}


def arrivals_s(path: Path, limit: int | None) -> Iterator[float]:
    """The trace's arrival times in seconds (its ``timestamp``, ms), in request order."""
    with path.open() as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                return
            yield json.loads(line)["timestamp"] / 1000


def run_kvtier(prompts: Iterator[list[int]], num_gpu_blocks: int, tpb: int,
               in_flight: int, policy: str,
               arrivals: Iterator[float] | None = None) -> dict[str, object]:
    # The cache's clock is the trace's (each request at its arrival), not the machine's:
    # a policy that learns from ages then makes the same decisions however fast the run
    # goes, so two runs (and two versions of the code) do the same work.
    now = [0.0]
    mgr = KVCacheManager(CacheConfig(tokens_per_block=tpb, num_gpu_blocks=num_gpu_blocks,
                                     eviction_policy=policy), clock=lambda: now[0])
    times = arrivals if arrivals is not None else iter(())
    live: deque[tuple[str, list[int]]] = deque()
    seconds = cpu = 0.0
    num_blocks = num_tokens = num_reused = 0
    clock, cpu_clock = time.perf_counter, time.thread_time
    for i, tokens in enumerate(prompts):
        rid = str(i)
        now[0] = next(times, now[0])
        t0, c0 = clock(), cpu_clock()
        a = mgr.add_sequence(SequenceSpec(rid, tokens))
        mgr.take_plan()  # what a caller submits to its transfer engine
        live.append((rid, tokens))
        done = None
        if len(live) > in_flight:
            done = live.popleft()
            mgr.remove_sequence(done[0])
        seconds += clock() - t0
        cpu += cpu_clock() - c0
        # The caller's token list dies here, not timed: what a cache manager keeps alive
        # is its own cost, what the caller holds is not (the peers are timed alike).
        del done
        assert a.admitted, a
        num_blocks += len(a.block_ids)
        num_tokens += len(tokens)
        num_reused += a.num_reused_tokens
    t0, c0 = clock(), cpu_clock()
    for rid, _ in live:
        mgr.remove_sequence(rid)
    seconds += clock() - t0
    cpu += cpu_clock() - c0
    mgr.check_invariants()
    return {
        "name": "kvtier", "eviction_policy": policy, "version": "0.1.0",
        "num_requests": i + 1, "num_blocks": num_blocks,
        "num_prompt_tokens": num_tokens, "num_reused_tokens": num_reused,
        "hit_rate": num_reused / num_tokens, "seconds": seconds, "cpu_seconds": cpu,
        "us_per_block": seconds / num_blocks * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", choices=[*SETTINGS, "both"], default="both")
    ap.add_argument("--peers", metavar="PYTHON", help="interpreter with vllm/sglang installed")
    ap.add_argument("--tokens-per-block", type=int, default=32)
    ap.add_argument("--in-flight", type=int, default=16)
    ap.add_argument("--eviction-policy", default=CacheConfig().eviction_policy,
                    help="kvtier's policies, comma-separated (the first is the peers' "
                    "reference); default: the default policy")
    args = ap.parse_args()
    policies = args.eviction_policy.split(",")
    if unknown := [p for p in policies if p not in EVICTION_POLICIES]:
        ap.error(f"--eviction-policy: unknown {unknown}; choose from {EVICTION_POLICIES}")
    if not TRACE.exists():
        sys.exit(f"trace not found: {TRACE} (set KVTIER_TRACES)")
    names = list(SETTINGS) if args.setting == "both" else [args.setting]
    rows = []
    for name in names:
        setting = SETTINGS[name]
        ours: dict[str, object] = {}
        for policy in policies:
            # NOTE: the last run's manager (its tree: cycles of parents and children) is
            # freed before the next run, not collected in the middle of it: without this a
            # later run in the same process was up to 1.4x slower than the same run first.
            gc.collect()
            prompts = mooncake_prompts(TRACE, setting["num_requests"])
            row = run_kvtier(prompts, int(setting["num_gpu_blocks"] or 0),
                             args.tokens_per_block, args.in_flight, policy,
                             arrivals_s(TRACE, setting["num_requests"]))
            row["setting"] = name
            ours = ours or row
            if row is not ours:
                row["ratio_vs_kvtier"] = float(row["us_per_block"]) / float(ours["us_per_block"])
            rows.append(row)
        if args.peers:
            for peer in ("vllm", "sglang"):
                r = run_isolated(peer, trace=TRACE, limit=setting["num_requests"],
                                 python=args.peers, tokens_per_block=args.tokens_per_block,
                                 num_gpu_blocks=setting["num_gpu_blocks"],
                                 in_flight=args.in_flight)
                if "unavailable" in r:
                    print(f"{peer}: unavailable: {r['unavailable']}", file=sys.stderr)
                else:
                    r["setting"] = name
                    r["ratio_vs_kvtier"] = float(r["us_per_block"]) / float(ours["us_per_block"])
                    rows.append(r)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores; "
          f"python {platform.python_version()}; trace {TRACE.name}; "
          f"{args.tokens_per_block}-token blocks, {args.in_flight} in flight")
    print("features: kvtier reuse on, partial reuse on (copy), events off, xxh3 hashing lazy "
          "(unused), host tier off, token validation on")
    print(f"x kvtier: against the first kvtier row of the setting ({policies[0]})")
    print(f"{'setting':8} {'impl':28} {'requests':>9} {'blocks':>10} {'hit rate':>9} "
          f"{'seconds':>8} {'us/block':>9} {'cpu us/block':>12} {'x kvtier':>9}")
    for r in rows:
        ratio = r.get("ratio_vs_kvtier", 1.0)
        cpu_us = float(r["cpu_seconds"]) / float(r["num_blocks"]) * 1e6
        impl = f"{r['name']} {r.get('eviction_policy', '')}".strip()
        print(f"{r['setting']:8} {impl:28} {r['num_requests']:>9} {r['num_blocks']:>10} "
              f"{r['hit_rate']:>9.4f} {r['seconds']:>8.2f} {r['us_per_block']:>9.3f} "
              f"{cpu_us:>12.3f} {ratio:>9.2f}")
    print(json.dumps({"benchmark": "bench_manager", "python": platform.python_version(),
                      "cpus": os.cpu_count(), "results": rows}))


if __name__ == "__main__":
    main()
