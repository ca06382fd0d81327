"""The bar for a change to the default on the twenty-ninth session's rows: a probe.

Each variant is the default (``kvtier-predict-cost``; ``--policy``: another learned
policy) with a monkeypatch; each row is a
bench or audit row at its capacities (``bench_policy.capacities``) and time scale (the
bench's rule), run at ``--num-scales`` scales within +-0.05 % a step as the audit does:
mean and population sd of the draws per variant.

- ``main``: the default as it is.
- ``censored-gate``: ``HitDensity`` keeps its initial, equal tables (LRU's order, weighed
  by depth) until its books hold a release that ended unreused (a ghost forgotten). A
  Kaplan-Meier table with no censored release is survivorship alone: only the runs that
  came back have ended, every class looks sure to come back, and a run's value rises
  with its age toward the ages of the returns seen, so young runs go first.
- ``open-at-risk``: Kaplan-Meier's risk set with the releases still open: at every
  refresh each cached run not reused since its release, and each remembered ghost, is
  counted as censored at its age now (not kept: the next refresh counts them again), so
  the runs that have not come back *yet* weigh against the ones that did.
- ``open-early``: ``open-at-risk`` only while the books hold no censored release (the
  cold start), the books as they are from then on.
- ``class-only``: until a refresh finds a censored release, classes by their learned
  value at release (age 0) and runs within a class by recency (the oldest goes): the
  survivorship-only books are trusted for which classes come back, not for how a run's
  chance changes with its age (there they say it only rises). The learned order whole
  from then on.
- ``lru-first``: before the learner's first refresh, LRU's order (with priority and soft
  claims), as ``HitDensity`` says the order then is: with every value equal, the cost
  weight alone ranks the class heads, the shallowest first whatever its age.
- ``flat``: nothing learned, ever (the tables stay equal): LRU's order with soft claims,
  the cost weight of depth over it under ``kvtier-predict-cost`` (a reference, not a
  candidate: what the default's order is before its first refresh).
- ``censored-lru``: until a refresh finds a censored release in the books, LRU's order (as
  while the witness rules: priority and soft claims first, no class value, no cost
  weight); the learned order from then on.

    PYTHONPATH=src:. .venv/bin/python benchmarks/policy_lab/azure_bar.py \
        --rows azure-code,azure-code#1 --variants main,censored-gate --num-scales 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.bench_policy import (
    AUDIT_ROWS,
    TTFT_TARGET_S,
    AuditSource,
    _workload,
    audit_workload,
    capacities,
)

from kvtier.blocks import cdiv
from kvtier.cache import BlockCache
from kvtier.config import CacheConfig
from kvtier.policies import HitDensity, KvtierPredict, _unpack_ghost, age_bin
from kvtier.pool import Key
from kvtier.radix import Node, subtree
from kvtier.sim import Workload, oracle_requests, simulate

DEFAULT = "kvtier-predict-cost"
# Bench rows: name -> (requests, time scale of the bench's last run).
BENCH_ROWS = {"azure-code": 1.0, "mooncake-conv": 2.874, "agentic": 4.132, "chat": 2.292,
              "mixed": 5.172, "mooncake-synth": 2.849, "azure-conv": 1.0}
EXTRA_ROWS: dict[str, tuple[AuditSource, int, tuple[float, ...]]] = {
    "azure-code#1": (("azure-code#1", 0, 2000), 32, (0.03, 0.10)),
}

_refresh = HitDensity.refresh


def _gated_refresh(self: HitDensity) -> None:
    if not any(map(any, self.censored)):
        self.num_refreshes += 1  # a version all the same: the tables stay as they were
        return
    _refresh(self)


_rank = KvtierPredict.rank
_within = KvtierPredict.within


def _blind_refresh(self: HitDensity) -> None:
    self.blind = not any(map(any, self.censored))  # type: ignore[attr-defined]
    _refresh(self)


def _blind_rank(self: KvtierPredict, node: Node, now: float, default_priority: int) -> Key:
    if getattr(self.learner, "blind", True):
        expiry = node.expiry
        priority = default_priority if expiry is not None and now >= expiry else node.priority
        return (priority, 1 if node.soft_claimed else 0, 0.0, node.last_used)
    return _rank(self, node, now, default_priority)


def _class_rank(self: KvtierPredict, node: Node, now: float, default_priority: int) -> Key:
    if getattr(self.learner, "blind", True):
        expiry = node.expiry
        priority = default_priority if expiry is not None and now >= expiry else node.priority
        witness = self.witness
        if witness is not None and witness.lru_ahead:
            return (priority, 1 if node.soft_claimed else 0, 0.0, node.last_used)
        cls = node.reuse_class
        value = self.learner.value[1 if cls is None else cls][0]  # at release: no age
        if self.cost_aware:
            value *= 1.0 + node.start_block * self.tokens_per_block / self.crossover_tokens
        return (priority, 1 if node.soft_claimed else 0, value, node.last_used)
    return _rank(self, node, now, default_priority)


def _first_rank(self: KvtierPredict, node: Node, now: float, default_priority: int) -> Key:
    if not self.learner.num_refreshes:
        expiry = node.expiry
        priority = default_priority if expiry is not None and now >= expiry else node.priority
        return (priority, 1 if node.soft_claimed else 0, 0.0, node.last_used)
    return _rank(self, node, now, default_priority)


def _blind_within(self: KvtierPredict, node: Node, now: float) -> float:
    return 0.0 if getattr(self.learner, "blind", True) else _within(self, node, now)


def _flat_refresh(self: HitDensity) -> None:
    self.num_refreshes += 1  # nothing learned, ever: LRU's order, weighed by depth if cost-aware


def _open_refresh(self: HitDensity) -> None:
    # NOTE: a probe's cost (a walk of the tree and the ghost table every refresh): what a
    # real version would keep as running counts.
    cache = getattr(self, "probe_cache", None)
    policy = getattr(self, "probe_policy", None)
    if cache is None or policy is None:
        _refresh(self)
        return
    now = cache.evictor.now()
    saved = [row[:] for row in self.censored]
    halves = self._total > self.decay_blocks
    for root in cache.roots.values():
        for top in list(root.iter_children()):
            for node in subtree(top):
                if node.reuse_class is not None and not node.ref_count:
                    self.censored[node.reuse_class][age_bin(now - node.last_used_s)] += len(
                        node.slots)
    for packed in policy.ghosts._entries.values():
        cls, released_s, n, _, _ = _unpack_ghost(packed)
        self.censored[cls][age_bin(now - released_s)] += n
    _refresh(self)
    self.censored = [[x / 2 for x in row] if halves else row for row in saved]


def _open_early_refresh(self: HitDensity) -> None:
    if any(map(any, self.censored)):
        _refresh(self)  # censoring seen: the books as they are
    else:
        _open_refresh(self)


_cache_init = BlockCache.__init__


def _bind_cache(self: BlockCache, *args: Any, **kwargs: Any) -> None:
    _cache_init(self, *args, **kwargs)
    policy = self._learner
    if isinstance(policy, KvtierPredict):
        policy.learner.probe_cache = self
        policy.learner.probe_policy = policy


BlockCache.__init__ = _bind_cache  # type: ignore[method-assign, assignment]  # __init__ is CacheState's


def _set(refresh: Callable[[HitDensity], None], rank: Callable[..., Key],
         within: Callable[..., float]) -> None:
    setattr(HitDensity, "refresh", refresh)  # noqa: B010 (a probe's monkeypatch)
    setattr(KvtierPredict, "rank", rank)  # noqa: B010
    setattr(KvtierPredict, "within", within)  # noqa: B010


VARIANTS: dict[str, Callable[[], None]] = {
    "main": lambda: _set(_refresh, _rank, _within),
    "censored-gate": lambda: _set(_gated_refresh, _rank, _within),
    "censored-lru": lambda: _set(_blind_refresh, _blind_rank, _blind_within),
    "open-at-risk": lambda: _set(_open_refresh, _rank, _within),
    "class-only": lambda: _set(_blind_refresh, _class_rank, _blind_within),
    "lru-first": lambda: _set(_refresh, _first_rank, _within),
    "open-early": lambda: _set(_open_early_refresh, _rank, _within),
    "flat": lambda: _set(_flat_refresh, _rank, _within),
}


def row_workload(row: str) -> tuple[Workload, int, tuple[float, ...], float | None]:
    """The row's workload, block size, capacities and time scale (None: the probe's)."""
    if row in BENCH_ROWS:
        return _workload(row, 2000), 32, (0.03, 0.10), BENCH_ROWS[row]
    if row in EXTRA_ROWS:
        source, tpb, fractions = EXTRA_ROWS[row]
        return audit_workload(source), tpb, fractions, None
    for label, source, tpb, fractions in AUDIT_ROWS:
        if label == row:
            return audit_workload(source), tpb, fractions, None
    raise SystemExit(f"unknown row {row!r}")


def setup(row: str) -> list[tuple[str, float, int, int, float]]:
    wl, tpb, fractions, scale = row_workload(row)
    method = getattr(wl, "oracle_requests", None)
    stream = list(method(tpb) if callable(method) else oracle_requests(wl, tpb))
    max_blocks = max(cdiv(r.num_tokens, tpb) for r in stream) + 16
    caps = capacities(stream, tpb, max_blocks, fractions)
    if scale is None:
        probe = simulate(wl, CacheConfig(tokens_per_block=tpb, num_gpu_blocks=caps[0][0],
                                         num_host_blocks=caps[0][1],
                                         eviction_policy="priority-lru"))
        scale = 1.0
        if (probe.ttft_s.p50 or 0.0) > TTFT_TARGET_S:
            scale = max(1.0, (probe.load.utilization or 0.0) / 0.7)
    return [(row, f, g, h, scale) for f, (g, h) in zip(fractions, caps, strict=True)]


def sim(job: tuple[str, str, int, int, float, str]) -> float:
    variant, row, gpu, host, scale, policy = job
    VARIANTS[variant]()
    wl, tpb, _, _ = row_workload(row)
    config = CacheConfig(tokens_per_block=tpb, num_gpu_blocks=gpu, num_host_blocks=host,
                         eviction_policy=policy)
    return simulate(wl, config, time_scale=scale).token_hit_rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", required=True)
    parser.add_argument("--variants", default="main,censored-gate")
    parser.add_argument("--fractions", default="", help="only these capacities")
    parser.add_argument("--num-scales", type=int, default=5)
    parser.add_argument("--policy", default=DEFAULT, help="the learned policy the variants patch")
    parser.add_argument("--lru", action="store_true", help="LRU once per row too")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    only = {float(f) for f in args.fractions.split(",")} if args.fractions else None
    steps = [k - (args.num_scales - 1) / 2 for k in range(args.num_scales)]
    with ProcessPoolExecutor(args.jobs) as pool:
        caps = [c for cs in pool.map(setup, args.rows.split(",")) for c in cs
                if only is None or c[1] in only]
        jobs = [(v, row, g, h, scale * (1 + 0.0005 * k), args.policy)
                for row, _, g, h, scale in caps for v in variants for k in steps]
        if args.lru:
            jobs += [("main", row, g, h, scale, "lru") for row, _, g, h, scale in caps]
        hits = list(pool.map(sim, jobs))
    out = []
    it = iter(hits)
    for row, f, g, h, scale in caps:
        res: dict[str, object] = {"row": row, "fraction": f, "gpu_blocks": g, "host_blocks": h,
                                  "time_scale": scale}
        for v in variants:
            draws = [next(it) for _ in steps]
            res[v] = statistics.mean(draws)
            res[f"{v} sd"] = statistics.pstdev(draws)
            res[f"{v} draws"] = draws
        out.append(res)
    if args.lru:
        for res in out:
            res["lru"] = next(it)
    for res in out:
        cells = "  ".join(f"{v} {res[v]:.4f} ({res[f'{v} sd']:.4f})" for v in variants)
        lru = f"  lru {res['lru']:.4f}" if "lru" in res else ""
        print(f"{res['row']} {res['fraction']:.0%} ({res['gpu_blocks']}+{res['host_blocks']}, "
              f"scale {res['time_scale']:.4g}): {cells}{lru}", flush=True)
    print(json.dumps({"probe": "azure_bar", "num_scales": args.num_scales, "rows": out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
