"""Azure code at 3 % and 10 %: every kvtier policy over nearby time scales (issue 10,
twenty-ninth session): a probe.

The bench's rows (``bench_policy.py --workloads azure-code``: the Azure 2023 code trace
with kvtier's synthetic prefixes, first 2,000 requests, 3 % and 10 % of the distinct
blocks, a quarter on the GPU) and the audit's ``azure-code seed 1`` (the prefix model's
seed 1), with the same capacities and time-scale rule as ``bench_policy.py``. Each policy
runs at ``--num-scales`` time scales ``scale x (1 + 0.0005 k)``, k centred on 0, as
``--audit`` runs the default (a learned order is chaotic in the arrival times; the
baselines do not move): per policy and row the mean and the population sd of the draws.

    PYTHONPATH=src:. .venv/bin/python benchmarks/policy_lab/azure_code.py --num-scales 7 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.bench_policy import TRACES, TTFT_TARGET_S, capacities

from kvtier.blocks import cdiv
from kvtier.config import CacheConfig
from kvtier.policies import POLICIES
from kvtier.sim import AzureTrace, Workload, oracle_bounds, oracle_requests, simulate

TPB = 32
LIMIT = 2000


def workload(seed: int) -> Workload:
    """The Azure code trace's first 2,000 requests under the prefix model's ``seed``."""
    return AzureTrace(TRACES / "azure_llm_2023_code.csv", seed=seed, limit=LIMIT)


def setup(seed: int, fractions: tuple[float, ...]) -> list[dict[str, object]]:
    """Per capacity: blocks, the bench's time scale, Belady (partial reuse, as replayed)."""
    wl = workload(seed)
    stream = list(oracle_requests(wl, TPB))
    max_blocks = max(cdiv(r.num_tokens, TPB) for r in stream) + 16
    caps = capacities(stream, TPB, max_blocks, fractions)
    bounds = oracle_bounds(wl, TPB, [g + h for g, h in caps],
                           partial_reuse=CacheConfig().enable_partial_reuse)
    probe = simulate(wl, CacheConfig(tokens_per_block=TPB, num_gpu_blocks=caps[0][0],
                                     num_host_blocks=caps[0][1],
                                     eviction_policy="priority-lru"))
    scale = 1.0
    if (probe.ttft_s.p50 or 0.0) > TTFT_TARGET_S:
        scale = max(1.0, (probe.load.utilization or 0.0) / 0.7)
    return [{"seed": seed, "fraction": f, "gpu_blocks": g, "host_blocks": h,
             "time_scale": scale, "belady": b.belady_hit_rate}
            for f, (g, h), b in zip(fractions, caps, bounds, strict=True)]


def sim(job: tuple[int, int, int, float, str]) -> float:
    seed, gpu, host, scale, policy = job
    config = CacheConfig(tokens_per_block=TPB, num_gpu_blocks=gpu, num_host_blocks=host,
                         eviction_policy=policy)
    return simulate(workload(seed), config, time_scale=scale).token_hit_rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--fractions", default="0.03,0.10")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--num-scales", type=int, default=7)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    fractions = tuple(float(f) for f in args.fractions.split(","))
    policies = args.policies.split(",")
    steps = [k - (args.num_scales - 1) / 2 for k in range(args.num_scales)]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = [r for rs in pool.map(setup, seeds, [fractions] * len(seeds)) for r in rs]
        jobs = [(int(str(r["seed"])), int(str(r["gpu_blocks"])), int(str(r["host_blocks"])),
                 float(str(r["time_scale"])) * (1 + 0.0005 * k), p)
                for r in rows for p in policies for k in steps]
        hits = iter(pool.map(sim, jobs))
    for row in rows:
        for p in policies:
            draws = [next(hits) for _ in steps]
            row[p] = statistics.mean(draws)
            row[f"{p} sd"] = statistics.pstdev(draws)
            row[f"{p} draws"] = draws
        blocks = f"{row['gpu_blocks']}+{row['host_blocks']}"
        label = f"seed {row['seed']} {row['fraction']:.0%} ({blocks})"
        cells = "  ".join(f"{p} {row[p]:.4f} ({row[f'{p} sd']:.4f})" for p in policies)
        print(f"{label}: {cells}  belady {row['belady']:.4f}", flush=True)
    print(json.dumps({"probe": "azure_code", "num_scales": args.num_scales, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
