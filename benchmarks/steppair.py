"""Scheduler + manager CPU per step, two versions replayed in lockstep in one process.

    python benchmarks/steppair.py BEFORE AFTER [REPLAY ARGS ...]

``BEFORE`` and ``AFTER`` are checkouts (each with ``src/kvtier``), loaded side by side as
packages of their own names as in ``pairpol.py``. Each version runs ``kvtier replay`` with
the same arguments (default: the Mooncake conversation trace, first 3,000 requests, 16,384
GPU + 65,536 host blocks, issue 13's step setting) on a thread of its own, and the two take
turns step by step: one step (``step`` + ``update``) of BEFORE, then one of AFTER, each
timed by its thread's CPU clock. So each pair of steps shares the machine's load of the same
moment, which runs in separate processes do not (on a shared 2-core VM single runs differ by
up to 1.4x; paired steps show 1-2 %). The virtual clock makes every version take the same
decisions however fast it runs: a pair of steps that scheduled different token counts stops
the run (a change that alters decisions is not a speed change).

Prints, per version, the mean and p99 of full steps (at least 90 % of ``max_num_tokens``),
then AFTER/BEFORE per full step: the median of the paired ratios and the ratio of the sums
(an A/A run of one checkout against itself gives the noise floor: ~0.99-1.02 on the shared
VM), and one JSON line last.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.pairpol import load_as  # noqa: E402
from benchmarks.peers import TRACE  # noqa: E402

DEFAULT_ARGS = [str(TRACE), "--limit", "3000", "--gpu-blocks", "16384", "--host-blocks", "65536"]
VERSIONS = ("before", "after")


class Lockstep:
    """Turns between the versions' replay threads: a version steps only on its turn, or once
    the other has finished. Records each step's thread CPU (``step`` + ``update``), tokens and
    budget."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._turn = VERSIONS[0]
        self._done: set[str] = set()
        self.cpu_ns: dict[str, list[int]] = {v: [] for v in VERSIONS}
        self.tokens: dict[str, list[int]] = {v: [] for v in VERSIONS}
        self.budget: dict[str, int] = {}

    def patch(self, version: str, scheduler_cls: Any) -> None:
        """Wrap ``scheduler_cls``'s ``step`` and ``update`` (a class of ``version``'s own copy
        of the package) to take turns and time themselves."""
        other = VERSIONS[1 - VERSIONS.index(version)]
        step, update = scheduler_cls.step, scheduler_cls.update
        lock = self
        clock = time.thread_time_ns
        started: list[int] = [0]

        def timed_step(sched: Any) -> Any:
            with lock._cond:
                lock._cond.wait_for(lambda: lock._turn == version or other in lock._done)
            lock.budget[version] = sched.config.max_num_tokens
            t0 = clock()
            out = step(sched)
            started[0] = clock() - t0
            lock.tokens[version].append(out.num_scheduled_tokens)
            return out

        def timed_update(sched: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            out = update(sched, *args, **kwargs)
            lock.cpu_ns[version].append(started[0] + clock() - t0)
            with lock._cond:
                lock._turn = other
                lock._cond.notify_all()
            return out

        scheduler_cls.step, scheduler_cls.update = timed_step, timed_update

    def finished(self, version: str) -> None:
        with self._cond:
            self._done.add(version)
            self._cond.notify_all()


def full_steps(lock: Lockstep) -> list[int]:
    """Indices of the steps both versions ran that filled at least 90 % of the budget;
    SystemExit where the versions scheduled differently."""
    a, b = lock.tokens["before"], lock.tokens["after"]
    if a != b:
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                     min(len(a), len(b)))
        raise SystemExit(f"the versions' decisions differ from step {first}: "
                         "not a speed comparison")
    budget = lock.budget["before"]
    return [i for i, n in enumerate(a) if n >= 0.9 * budget]


def summary(cpu_ns: list[int], idx: list[int]) -> tuple[float, float]:
    """Mean and p99 in microseconds of the steps ``idx``."""
    xs = sorted(cpu_ns[i] for i in idx)
    return sum(xs) / len(xs) / 1e3, xs[min(len(xs) - 1, int(0.99 * len(xs)))] / 1e3


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    before, after = Path(argv[0]), Path(argv[1])
    replay_args = argv[2:] or DEFAULT_ARGS
    lock = Lockstep()
    mains = {}
    # NOTE: the copies stay until the end: the package imports its modules lazily.
    with tempfile.TemporaryDirectory(prefix="steppair-") as tmp:
        for version, src in zip(VERSIONS, (before, after), strict=True):
            pkg = load_as(src, f"kvtier_{version}", Path(tmp))
            lock.patch(version, importlib.import_module(f"{pkg.__name__}.scheduler").Scheduler)
            mains[version] = importlib.import_module(f"{pkg.__name__}.cli").main

        def run(version: str) -> None:
            try:
                mains[version](["replay", *replay_args, "--no-progress"])
            finally:
                lock.finished(version)

        threads = [threading.Thread(target=run, args=(v,)) for v in VERSIONS]
        with contextlib.redirect_stdout(io.StringIO()):
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    idx = full_steps(lock)
    if not idx:
        raise SystemExit("no full steps: nothing to compare (raise the load)")
    a, b = lock.cpu_ns["before"], lock.cpu_ns["after"]
    ratios = sorted(b[i] / a[i] for i in idx)
    result = {v: dict(zip(("mean_us", "p99_us"), summary(lock.cpu_ns[v], idx), strict=True))
              for v in VERSIONS}
    median = ratios[len(ratios) // 2]
    total = sum(b[i] for i in idx) / sum(a[i] for i in idx)
    print(f"machine {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, load {os.getloadavg()[0]:.1f}; replay "
          f"{' '.join(replay_args)}; {len(idx)} full steps of {len(a)}")
    print(f"{'version':8} {'mean us':>9} {'p99 us':>9}")
    for v in VERSIONS:
        print(f"{v:8} {result[v]['mean_us']:9.1f} {result[v]['p99_us']:9.1f}")
    print(f"after/before per full step: median {median:.3f}, sums {total:.3f}")
    print(json.dumps({"bench": "steppair", "replay_args": replay_args, "num_steps": len(a),
                      "num_full_steps": len(idx), **result, "median_ratio": round(median, 4),
                      "sum_ratio": round(total, 4), "python": platform.python_version()}))


if __name__ == "__main__":
    main()
