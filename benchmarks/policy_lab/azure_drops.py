"""Where the default loses to LRU on Azure code (issue 10, twenty-ninth session): a probe.

Replays one row of ``azure_code.py`` (the prefix model's ``--seed``, ``--fraction`` of the
distinct blocks, the bench's capacities) under ``lru`` and the default at the given time
scales, with books kept by monkeypatches (nothing in ``src/`` changes):

- **per request**, from the admission's own counts (``BatchAdmission._record_admission``):
  tokens reused, of them partial (the head of a block, not on the path), on the host;
  the default's less LRU's, request by request, split into whole blocks and partial tokens
  and by tier;
- **the witness's runs** (``LruWitness``): every run won (hit where LRU would have dropped
  it) and lost (a ghost recalled that LRU would still hold), with the run's class, depth
  (first block), the tier it was dropped from and its age at the drop and at the return;
- **the witness over time**: admissions made while LRU's order ruled, the switches;
- with ``--tables``, the learner's books and values at the given refreshes (of the
  default's replay; printed as they happen).

    PYTHONPATH=src:. .venv/bin/python benchmarks/policy_lab/azure_drops.py --seed 0 \
        --fraction 0.10 --scales 1.0,1.0005
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.policy_lab.azure_bar import VARIANTS
from benchmarks.policy_lab.azure_code import TPB, setup, workload

from kvtier import admission, cache
from kvtier.config import CacheConfig
from kvtier.policies import HitDensity, KvtierPredict
from kvtier.sim import simulate
from kvtier.tier import Tier
from kvtier.witness import LruWitness

DEFAULT = "kvtier-predict-cost"
CLASS_NAMES = ["shared"] + [f"t{t}{r}" for t in ("1", "2", "3", "4", "5-7", "8+")
                            for r in ("body", "tail")]


def age_label(age_s: float) -> str:
    for hi, label in ((1, "<1s"), (4, "1-4s"), (16, "4-16s"), (64, "16-64s"),
                      (256, "64-256s"), (1024, "256-1024s")):
        if age_s < hi:
            return label
    return ">=1024s"


def depth_label(block: int) -> str:
    for hi, label in ((1, "0"), (16, "1-15"), (64, "16-63"), (256, "64-255")):
        if block < hi:
            return label
    return ">=256"


class Books:
    """What one replay's patches saw."""

    def __init__(self) -> None:
        # request id -> tokens reused, of them partial, of them on the host; prompt tokens
        self.requests: dict[str, tuple[int, int, int, int]] = {}
        self.dropped: dict[int, dict[str, Any]] = {}  # hash(ghost key) -> the drop
        self.won: list[dict[str, Any]] = []
        self.lost: list[dict[str, Any]] = []
        self.num_admissions = 0
        self.num_lru_admissions = 0
        self.switches: list[tuple[int, bool]] = []  # (admission, to LRU's order)
        self.ruling_lru = False  # the witness's verdict after the last admission
        self.pending: dict[str, Any] | None = None  # a drop waiting for its tier
        self.context: list[tuple[int, int, Tier, float]] = []  # runs of the admission


@contextmanager
def patched(books: Books) -> Iterator[None]:
    """Keep ``books`` while the context is open."""
    saved: list[tuple[object, str, Callable[..., Any]]] = []

    def patch(owner: object, name: str, fn: Callable[..., Any]) -> None:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, fn)

    record_admission = admission.BatchAdmission._record_admission

    def _record_admission(self: Any, seq: Any, promise: Any, spec: Any) -> None:
        record_admission(self, seq, promise, spec)
        if not spec.skip_reading_prefix_cache and not spec.resumed:
            books.requests[seq.request_id] = (promise.match.num_tokens, promise.num_partial_tokens,
                                              promise.match.num_host_tokens, len(seq.tokens))

    forget = KvtierPredict.forget

    def _forget(self: KvtierPredict, ghost_key: object, node_uid: int, reuse_class: int,
                released_s: float, num_blocks: int, now: float, released_tick: int = 0) -> None:
        block = ghost_key[2] if isinstance(ghost_key, tuple) else -1
        entry = {"cls": reuse_class, "refreshes": self.learner.num_refreshes,
                 "at": books.num_admissions, "block": block,
                 "drop_age": now - released_s, "released_s": released_s, "n": num_blocks,
                 "tier": None, "tick": released_tick}
        books.dropped[hash(ghost_key)] = entry
        books.pending = entry
        forget(self, ghost_key, node_uid, reuse_class, released_s, num_blocks, now, released_tick)

    evicted = cache.BlockCache._evicted

    def _evicted(self: Any, tier: Tier, slots: Any) -> None:
        if books.pending is not None:
            books.pending["tier"] = tier.name
            books.pending = None
        evicted(self, tier, slots)

    recall = KvtierPredict.recall

    def _recall(self: KvtierPredict, ghost_key: object, now: float) -> tuple[int, int] | None:
        witness = self.witness
        entry = books.dropped.get(hash(ghost_key))
        mark = witness._mark if witness is not None else 0
        found = recall(self, ghost_key, now)
        if found is not None and entry is not None and entry["tick"] > mark:
            books.lost.append({**entry, "return_age": now - entry["released_s"],
                               "admission": books.num_admissions})
        return found

    note_reuse = cache.BlockCache.note_reuse

    def _note_reuse(self: Any, seq: Any) -> None:
        now = self.evictor.now()
        ctx = []
        node = seq.last_node
        while node.parent is not None:
            if node.reuse_class is not None:
                ctx.append((node.reuse_class, node.start_block, node.tier, now - node.last_used_s))
            node = node.parent
        books.context = ctx
        note_reuse(self, seq)

    admitted = LruWitness.admitted

    def _admitted(self: LruWitness, num_prompt_blocks: int, runs: list[tuple[int, int]],
                  room: int) -> None:
        if runs:
            reused = sum(n for _, n in runs)
            self.settle(room + reused)  # as ``admitted`` judges them (idempotent)
            for (tick, n), (cls, block, tier, age) in zip(runs, books.context, strict=True):
                won = n - self._num_held(tick, n)
                if won:
                    books.won.append({"cls": cls, "block": block, "tier": tier.name, "n": won,
                                      "age": age, "admission": books.num_admissions})
        # NOTE: the verdict also changes on a recall (``recalled``), between admissions.
        if self.lru_ahead != books.ruling_lru:
            books.switches.append((books.num_admissions, self.lru_ahead))
        admitted(self, num_prompt_blocks, runs, room)
        books.num_admissions += 1
        books.ruling_lru = self.lru_ahead
        if self.lru_ahead:
            books.num_lru_admissions += 1

    patch(admission.BatchAdmission, "_record_admission", _record_admission)
    patch(KvtierPredict, "forget", _forget)
    patch(cache.BlockCache, "_evicted", _evicted)
    patch(KvtierPredict, "recall", _recall)
    patch(cache.BlockCache, "note_reuse", _note_reuse)
    patch(LruWitness, "admitted", _admitted)
    try:
        yield
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)


def print_tables(refreshes: set[int]) -> None:
    """Print the learner's books and values at the given refreshes of each replay."""
    refresh = HitDensity.refresh

    def _refresh(self: HitDensity) -> None:
        refresh(self)
        if self.num_refreshes in refreshes:
            events, censored = sum(map(sum, self.events)), sum(map(sum, self.censored))
            print(f"  refresh {self.num_refreshes}: blocks reused {events:.0f}, "
                  f"censored {censored:.0f}")
            for c in range(self.num_classes):
                if any(self.events[c]) or any(self.censored[c]):
                    values = " ".join(f"{v:.3g}" for v in self.value[c][:10])
                    print(f"    {CLASS_NAMES[c]}: value by age bin (<1 s, 1-2 s, 2-4 s, ..) "
                          f"{values}")

    setattr(HitDensity, "refresh", _refresh)  # noqa: B010 (a probe's monkeypatch)


def replay(seed: int, gpu: int, host: int, scale: float, policy: str) -> tuple[float, Books]:
    books = Books()
    config = CacheConfig(tokens_per_block=TPB, num_gpu_blocks=gpu, num_host_blocks=host,
                         eviction_policy=policy)
    with patched(books):
        report = simulate(workload(seed), config, time_scale=scale)
    return report.token_hit_rate, books


def table(title: str, runs: list[dict[str, Any]], key: str) -> None:
    counts: Counter[str] = Counter()
    for r in runs:
        counts[str(r[key])] += r["n"]
    print(f"  {title} by {key}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fraction", type=float, default=0.10)
    parser.add_argument("--scales", default="1.0")
    parser.add_argument("--variant", default="main", help="one of azure_bar.VARIANTS")
    parser.add_argument("--tables", default="", help="refreshes to print the learner at")
    parser.add_argument("--verbose", action="store_true", help="every run lost")
    args = parser.parse_args(argv)
    VARIANTS[args.variant]()
    if args.tables:
        print_tables({int(x) for x in args.tables.split(",")})
    row = setup(args.seed, (args.fraction,))[0]
    gpu, host = int(str(row["gpu_blocks"])), int(str(row["host_blocks"]))
    base = float(str(row["time_scale"]))
    for s in (float(x) for x in args.scales.split(",")):
        scale = base * s
        lru, lb = replay(args.seed, gpu, host, scale, "lru")
        pred, pb = replay(args.seed, gpu, host, scale, DEFAULT)
        print(f"seed {args.seed} {args.fraction:.0%} ({gpu}+{host}) scale {scale}: "
              f"lru {lru:.4f} default {pred:.4f} ({pred - lru:+.4f})")
        # Per request: default - LRU, whole-block tokens and partial tokens, GPU and host.
        delta: dict[str, int] = defaultdict(int)
        for rid, (reused, partial, on_host, _) in pb.requests.items():
            lreused, lpartial, lhost, _ = lb.requests.get(rid, (0, 0, 0, 0))
            whole, lwhole = reused - partial, lreused - lpartial
            delta["whole"] += whole - lwhole
            delta["partial"] += partial - lpartial
            delta["host"] += on_host - lhost
            delta["gpu"] += (reused - on_host) - (lreused - lhost)
            delta["requests worse"] += reused < lreused
            delta["requests better"] += reused > lreused
            delta["tokens worse"] += min(0, reused - lreused)
            delta["tokens better"] += max(0, reused - lreused)
        print("  per request (default - LRU, tokens): "
              + ", ".join(f"{k} {v}" for k, v in delta.items()))
        won = sum(r["n"] for r in pb.won)
        lost = sum(r["n"] for r in pb.lost)
        print(f"  witness: won {won} blocks ({len(pb.won)} runs), "
              f"lost {lost} ({len(pb.lost)} runs); "
              f"{pb.num_lru_admissions} of {pb.num_admissions} admissions in LRU's order; "
              f"switches {pb.switches[:12]}{' ...' if len(pb.switches) > 12 else ''}")
        for name, runs in (("won", pb.won), ("lost", pb.lost)):
            for r in runs:
                r["class"] = CLASS_NAMES[r["cls"]]
                r["depth"] = depth_label(r["block"])
                r["age_at"] = age_label(r.get("age", r.get("drop_age", 0.0)))
                r["return_at"] = age_label(r.get("return_age", r.get("age", 0.0)))
                r["quarter"] = min(3, 4 * r["admission"] // max(1, pb.num_admissions))
            for key in ("class", "depth", "tier", "age_at", "return_at", "quarter"):
                table(name, runs, key)
        if args.verbose:
            for r in pb.lost:
                print("   lost", {k: (round(v, 2) if isinstance(v, float) else v)
                                  for k, v in r.items() if k not in ("released_s",)})
        # Every drop the default made, by class and tier (blocks).
        drops: Counter[tuple[str, str]] = Counter()
        for e in pb.dropped.values():
            drops[(CLASS_NAMES[e["cls"]], str(e["tier"]))] += e["n"]
        print("  default's drops (last drop per ghost key, blocks): "
              + ", ".join(f"{c}/{t} {v}" for (c, t), v in sorted(drops.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
