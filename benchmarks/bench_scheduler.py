"""Scheduler + manager CPU time per step at a full budget with many running requests.

Steady state: a batch of ``--running`` requests (``max_batch_size``), most of them
decoding one token per step, while new ~8k-token prompts fill the rest of
``max_num_tokens`` with prefill chunks; the queue never runs dry. Times
``Scheduler.step()`` + ``update()`` (perf_counter) only. Prints a table, then one JSON line.

    python benchmarks/bench_scheduler.py [--steps 2000] [--running 256]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import time

from kvtier import CacheConfig, KVCacheManager
from kvtier.scheduler import Request, Scheduler, SchedulerConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--running", type=int, default=256)
    ap.add_argument("--max-num-tokens", type=int, default=8192)
    ap.add_argument("--prompt-tokens", type=int, default=8192)
    ap.add_argument("--output-tokens", type=int, default=256)
    ap.add_argument("--gpu-blocks", type=int, default=65536)
    ap.add_argument("--host-blocks", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    mgr = KVCacheManager(CacheConfig(tokens_per_block=32, num_gpu_blocks=args.gpu_blocks,
                                     num_host_blocks=args.host_blocks))
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=args.max_num_tokens,
                                           max_batch_size=args.running))
    ids = itertools.count()
    fresh = itertools.count(1 << 40)
    system = [next(fresh) for _ in range(512)]  # a shared system prompt

    def new_request() -> Request:
        n = rng.randint(args.prompt_tokens // 2, args.prompt_tokens * 3 // 2)
        prompt = system + [next(fresh) for _ in range(n - len(system))]
        out = rng.randint(args.output_tokens // 2, args.output_tokens * 3 // 2)
        return Request(f"r{next(ids)}", prompt, out)

    for _ in range(args.running + 8):
        sched.add_request(new_request())
    times: list[float] = []
    full: list[float] = []
    tokens: list[int] = []
    running: list[int] = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step = sched.step()
        sampled = {c.request_id: next(fresh) for c in step.context_chunks}
        sampled.update({rid: next(fresh) for rid in step.decode_request_ids})
        sched.update(step, sampled)
        dt = time.perf_counter() - t0
        times.append(dt)
        tokens.append(step.num_scheduled_tokens)
        running.append(len(sched.running))
        if step.num_scheduled_tokens >= 0.9 * args.max_num_tokens and len(sched.running) >= (
                0.9 * args.running):
            full.append(dt)
        while len(sched.waiting) < 4:
            sched.add_request(new_request())
    mgr.check_invariants()
    steady = times[len(times) // 4:]

    def pct(xs: list[float], q: float) -> float:
        ys = sorted(xs)
        return ys[min(len(ys) - 1, int(q * len(ys)))] * 1e6 if ys else float("nan")

    result = {
        "benchmark": "bench_scheduler", "python": platform.python_version(),
        "machine": platform.machine(), "cpus": os.cpu_count(), "steps": args.steps,
        "target_running": args.running, "max_num_tokens": args.max_num_tokens,
        "mean_scheduled_tokens": sum(tokens) / len(tokens),
        "mean_running": sum(running) / len(running),
        "us_per_step_mean": sum(steady) / len(steady) * 1e6,
        "us_per_step_p50": pct(steady, 0.5), "us_per_step_p99": pct(steady, 0.99),
        "num_full_steps": len(full),
        "us_per_full_step_mean": sum(full) / len(full) * 1e6 if full else None,
        "us_per_full_step_p99": pct(full, 0.99) if full else None,
    }
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; python "
          f"{platform.python_version()}; 32-token blocks, {args.gpu_blocks} GPU blocks")
    print(f"{'steps':>6} {'running':>8} {'tokens/step':>12} {'us/step':>9} {'p99':>9} "
          f"{'full steps':>11} {'us/full':>9} {'p99 full':>9}")
    print(f"{args.steps:>6} {result['mean_running']:>8.1f} "
          f"{result['mean_scheduled_tokens']:>12.0f} {result['us_per_step_mean']:>9.0f} "
          f"{result['us_per_step_p99']:>9.0f} {len(full):>11} "
          f"{(result['us_per_full_step_mean'] or float('nan')):>9.0f} "
          f"{(result['us_per_full_step_p99'] or float('nan')):>9.0f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
