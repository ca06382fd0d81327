"""What an order that knows only the past reaches on the built-in agentic workload.

The in-simulator clairvoyant (``kvtier.sim.clairvoyant.Clairvoyant``) knows when every run
comes back. Part of what it knows an online policy could know in principle (when each
session's last step arrived, the law its step gaps are drawn from), part it could not (the
gap each step draws, whether the session goes on). ``PastAware`` is Belady's rule on the
*expected* next use instead of the true one, from the past alone:

    a run's next use = its session's last arrival (a request whose prompt held the run's
    last block) + E[gap | gap > time since that arrival], the gap law uniform over
    ``min_gap_s .. max_gap_s``; past ``max_gap_s`` the session has ended (never again);
    a run two sessions used less than ``min_gap_s`` apart (a tool spec) goes last.

With ``knows_ends`` it is also told the one future bit per session (whether its last step
has come: then never again), as the sixth session's oracle. ``PastDensity`` ranks by hit
density instead (the chance the session comes back over the expected wait), the chance of
an end from the step-count law: a session silent for long is likelier to have ended. The
rest of the clairvoyant's gain is the draws. These are reference orders, not bounds: a
better rule on the same knowledge could do better; with a host tier (runs outlive the
longest gap) both fall well below the learned default, so they say nothing there.

    .venv/bin/python benchmarks/policy_lab/reach.py             # seven scales, ~8 min
    .venv/bin/python benchmarks/policy_lab/reach.py --host-blocks 2896  # the host row
"""

from __future__ import annotations

import argparse
import statistics
import sys
from bisect import bisect_right
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from kvtier.config import CacheConfig
from kvtier.eviction import EvictionPolicy
from kvtier.policies import KvtierPredict
from kvtier.pool import Key
from kvtier.radix import Node
from kvtier.sim import AgenticWorkload, simulate
from kvtier.sim.clairvoyant import Clairvoyant
from kvtier.sim.workload import TraceRequest

_NEVER = float("inf")


class PastAware(Clairvoyant):
    """Belady's rule on the expected next use, from past arrivals and the gap law (see the
    module docstring). A policy object serves one cache."""

    name = "past-aware"

    def __init__(self, requests: Iterable[TraceRequest], tokens_per_block: int,
                 time_scale: float, min_gap_s: float, max_gap_s: float,
                 knows_ends: bool = False) -> None:
        super().__init__(requests, tokens_per_block, time_scale)
        if not 0 < min_gap_s <= max_gap_s:
            raise ValueError(f"need 0 < min_gap_s <= max_gap_s, got {min_gap_s!r}, {max_gap_s!r}")
        self.min_gap_s = min_gap_s * time_scale
        self.max_gap_s = max_gap_s * time_scale
        self.knows_ends = knows_ends

    def next_use(self, node: Node, now: float) -> float:
        """The expected next arrival of a request that needs ``node``'s last block, from the
        arrivals up to ``now`` (and, with ``knows_ends``, whether any comes after). Pure but
        for the memo."""
        arrivals = self._uses.get(self._end_key(node))
        if not arrivals:
            return _NEVER
        i = bisect_right(arrivals, now)
        if i == 0:  # stored by a request still to come: not a state a cached run is in
            return now
        if self.knows_ends and i == len(arrivals):
            return _NEVER
        last = arrivals[i - 1]
        if i >= 2 and last - arrivals[i - 2] < self.min_gap_s:
            return now  # two sessions' use apart by less than one gap: shared, soonest
        waited = now - last
        if waited > self.max_gap_s:
            return _NEVER
        return last + (max(self.min_gap_s, waited) + self.max_gap_s) / 2


class PastDensity(PastAware):
    """``PastAware`` weighing the chance that the session has ended: a run is worth the
    chance its session comes back over the expected wait for it (hit density, as LHD), the
    chance from the gap law and a fixed chance ``end_chance`` that a step is its session's
    last (Bayes: a session silent for longer is likelier to have ended). Smaller goes
    first; a shared run (see ``PastAware``) last. With ``release_clock`` the time waited
    counts from the run's release, not its session's last arrival: all an online policy
    has where the next step follows the completion (closed loop), as in serving."""

    name = "past-density"

    def __init__(self, requests: Iterable[TraceRequest], tokens_per_block: int,
                 time_scale: float, min_gap_s: float, max_gap_s: float,
                 end_chance: float, release_clock: bool = False) -> None:
        super().__init__(requests, tokens_per_block, time_scale, min_gap_s, max_gap_s)
        if not 0 <= end_chance < 1:
            raise ValueError(f"end_chance must be in [0, 1), got {end_chance!r}")
        self.end_chance = end_chance
        self.release_clock = release_clock

    def density(self, node: Node, now: float) -> float:
        """The chance ``node`` is needed again over the expected seconds until then. Pure
        but for the memo."""
        arrivals = self._uses.get(self._end_key(node))
        if not arrivals:
            return 0.0
        i = bisect_right(arrivals, now)
        if i == 0:
            return _NEVER
        last = arrivals[i - 1]
        if i >= 2 and last - arrivals[i - 2] < self.min_gap_s:
            return _NEVER
        waited = now - (node.last_used_s if self.release_clock else last)
        lo, hi = self.min_gap_s, self.max_gap_s
        if waited >= hi:
            return 0.0
        alive = (hi - max(lo, waited)) / (hi - lo) if hi > lo else 1.0  # P(gap > waited)
        going_on = (1 - self.end_chance) * alive
        chance = going_on / (going_on + self.end_chance)
        return chance / max((max(lo, waited) + hi) / 2 - waited, 1e-9)

    def key(self, node: Node, now: float, default_priority: int) -> Key:
        return (int(node.soft_claimed), self.density(node, now), node.last_used)

    rank = key


class MruDead(PastAware):
    """The plain rule: runs silent past the longest gap since their release first (oldest
    first), then the youngest; a shared run (see ``PastAware``) last. Reads the past only
    to tell a shared run."""

    name = "mru-dead"

    def key(self, node: Node, now: float, default_priority: int) -> Key:
        soft = int(node.soft_claimed)
        arrivals = self._uses.get(self._end_key(node))
        if arrivals:
            i = bisect_right(arrivals, now)
            if i >= 2 and arrivals[i - 1] - arrivals[i - 2] < self.min_gap_s:
                return (soft, 2, node.last_used)
            if now - node.last_used_s < self.max_gap_s:
                return (soft, 1, -node.last_used)
        return (soft, 0, node.last_used)

    rank = key


# Orders of the reference besides kvtier's policies by name (a kvtier policy's name with
# ``/unwitnessed`` runs it without its LRU witness).
REFERENCE_ORDERS = ("past", "past+ends", "past-density", "past-density-release", "mru-dead",
                    "clairvoyant")


def hit_rate(args: tuple[str, float, int, int] | tuple[str, float, int, int, int]) -> float:
    """One replay of agentic on 2,698 GPU blocks and ``num_host_blocks`` (``bench_policy``'s
    rows: 0 and 2,896) under ``order``: a kvtier policy's name (``/unwitnessed``: without
    its witness) or one of ``REFERENCE_ORDERS``; a fifth field names the workload's seed
    (0 by default)."""
    order, scale, num_requests, num_host_blocks, *seed = args
    workload = AgenticWorkload(num_requests=num_requests, seed=seed[0] if seed else 0)
    name, _, variant = order.partition("/")
    kvtier_policy = order not in REFERENCE_ORDERS
    config = CacheConfig(tokens_per_block=32, num_gpu_blocks=2698,
                         num_host_blocks=num_host_blocks,
                         eviction_policy=name if kvtier_policy else "lru")
    policy: EvictionPolicy | None = None
    if kvtier_policy and variant:
        if variant != "unwitnessed" or not name.startswith("kvtier-predict"):
            raise ValueError(f"unknown order {order!r}")
        policy = KvtierPredict(cost_aware=name.endswith("-cost"), witnessed=False)
    elif order == "mru-dead":
        policy = MruDead(workload, 32, scale, workload.min_step_gap_s, workload.max_step_gap_s)
    elif order == "clairvoyant":
        policy = Clairvoyant(workload, 32, scale)
    elif order.startswith("past-density"):  # a step is the last with 1 / the mean steps
        policy = PastDensity(workload, 32, scale, workload.min_step_gap_s,
                             workload.max_step_gap_s,
                             2 / (workload.min_steps + workload.max_steps),
                             release_clock=order == "past-density-release")
    elif not kvtier_policy:
        policy = PastAware(workload, 32, scale, workload.min_step_gap_s,
                           workload.max_step_gap_s, knows_ends=order == "past+ends")
    return simulate(workload, config, time_scale=scale, policy=policy).token_hit_rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--orders", default="lru,kvtier-predict-cost,past,past-density,"
                        "past-density-release,mru-dead,past+ends,clairvoyant")
    parser.add_argument("--num-scales", type=int, default=7)
    parser.add_argument("--scale", type=float, default=4.1317,
                        help="bench_policy's time scale for the agentic rows")
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--host-blocks", type=int, default=0, help="2896: the host row")
    parser.add_argument("--seed", type=int, default=0, help="the agentic workload's seed")
    args = parser.parse_args(argv)
    n = args.num_scales
    scales = [args.scale * (1 + 0.0005 * (k - (n - 1) / 2)) for k in range(n)]
    orders = args.orders.split(",")
    with ProcessPoolExecutor(args.jobs) as pool:
        hits = list(pool.map(hit_rate, [(o, s, args.limit, args.host_blocks, args.seed)
                                           for o in orders for s in scales]))
    print("| order | hit rate, mean (sd) over scales |")
    print("|---|---:|")
    for i, order in enumerate(orders):
        draws = hits[i * n:(i + 1) * n]
        print(f"| {order} | {statistics.mean(draws):.4f} ({statistics.pstdev(draws):.4f}) |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    raise SystemExit(main())
