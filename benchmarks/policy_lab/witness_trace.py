"""When, and on what evidence, the default policy's LRU witness switches (twelfth session).

``TracedWitness`` is ``kvtier.witness.LruWitness`` with its books kept: every switch (the
admission it came at, the lead and the noise ``sqrt(volume)`` it was judged on, and the
runs won and lost so far). Two variants that change what it does, for probes only:

- ``blind``: it counts as ever but never switches, so the learned order runs alone and
  the witness says what it *would* have done: its won less lost is then the learned
  order's blocks over LRU's (on the first 200 agentic steps 2,301 against the simulator's
  2,194 between the two runs).
- ``censor``: while LRU's order rules, no outcome is counted. In LRU's order the cache
  drops first the old runs the learned order kept (LRU would have dropped them), so of the
  learned order's earlier bets only the losses can still show (its ghosts recalled); the
  wins it had in flight are gone. Censoring both puts the two on the same footing.

    .venv/bin/python benchmarks/policy_lab/witness_trace.py --seed 1 --variant blind
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kvtier import policies
from kvtier.config import CacheConfig
from kvtier.sim import AgenticWorkload, simulate
from kvtier.witness import LruWitness

VARIANTS = ("witnessed", "blind", "censor")


@dataclass(frozen=True)
class Switch:
    """The witness changed its verdict at ``admission`` (1-based): to LRU's order
    (``to_lru``) or back, on ``lead`` against ``noise`` = sqrt(volume) (both faded)."""

    admission: int
    to_lru: bool
    lead: int
    noise: int
    runs_won: int
    runs_lost: int


@dataclass
class Trace:
    hit_rate: float = 0.0
    num_admissions: int = 0
    num_lru_admissions: int = 0  # admissions made while LRU's order ruled
    blocks_won: int = 0
    blocks_lost: int = 0
    runs_won: int = 0
    runs_lost: int = 0
    switches: list[Switch] = field(default_factory=list)


class TracedWitness(LruWitness):
    """An ``LruWitness`` that keeps its books in ``trace`` (``variant``: see the module)."""

    def __init__(self, capacity: int, variant: str, trace: Trace) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant, self.trace = variant, trace
        self._verdict = False  # what it says, whether or not it acts on it
        super().__init__(capacity)

    def admitted(self, num_prompt_blocks: int, runs: list[tuple[int, int]], room: int) -> None:
        super().admitted(num_prompt_blocks, runs, room)
        self.trace.num_admissions += 1
        self.trace.num_lru_admissions += self.lru_ahead

    def recalled(self, tick: int, num_blocks: int) -> None:
        if self.variant == "censor" and self.lru_ahead:
            if tick > self._mark:
                self._add(tick, -num_blocks)  # LRU would take it back all the same
            return
        super().recalled(tick, num_blocks)

    def _count(self, won: int) -> None:
        if self.variant == "censor" and self.lru_ahead:
            return
        trace = self.trace
        if won > 0:
            trace.runs_won += 1
        else:
            trace.runs_lost += 1
        super()._count(won)

    def _judge(self) -> None:
        super()._judge()
        verdict = self.lru_ahead
        if self.variant == "blind":
            self.lru_ahead = False
        if verdict != self._verdict:
            self._verdict = verdict
            t = self.trace
            t.switches.append(Switch(t.num_admissions + 1, verdict, round(self.lead),
                                     round(self.volume ** 0.5), t.runs_won, t.runs_lost))


def trace_agentic(variant: str, num_requests: int, seed: int = 0, num_host_blocks: int = 0,
                  time_scale: float = 4.1317) -> Trace:
    """One replay of agentic on 2,698 GPU blocks (``bench_policy``'s rows) under the
    default policy with a traced witness."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    trace = Trace()
    policy = policies.KvtierPredict(cost_aware=True)
    bind = policy.bind
    witnesses: list[TracedWitness] = []

    def traced_bind(config: CacheConfig) -> None:
        bind(config)
        witnesses.append(TracedWitness(config.num_gpu_blocks + config.num_host_blocks,
                                       variant, trace))
        policy.witness = witnesses[-1]

    policy.bind = traced_bind  # type: ignore[method-assign]
    config = CacheConfig(tokens_per_block=32, num_gpu_blocks=2698,
                         num_host_blocks=num_host_blocks, eviction_policy=policy.name)
    report = simulate(AgenticWorkload(num_requests=num_requests, seed=seed), config,
                      time_scale=time_scale, policy=policy)
    trace.hit_rate = report.token_hit_rate
    trace.blocks_won, trace.blocks_lost = witnesses[-1].num_won, witnesses[-1].num_lost
    return trace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="witnessed", choices=VARIANTS)
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host-blocks", type=int, default=0)
    args = parser.parse_args(argv)
    t = trace_agentic(args.variant, args.limit, args.seed, args.host_blocks)
    print(f"hit rate {t.hit_rate:.4f}; {t.num_lru_admissions} of {t.num_admissions} "
          f"admissions in LRU's order; won {t.blocks_won} blocks in {t.runs_won} runs, "
          f"lost {t.blocks_lost} in {t.runs_lost}")
    for s in t.switches:
        print(f"  admission {s.admission}: {'to LRU' if s.to_lru else 'back'} at lead "
              f"{s.lead} against {s.noise}; runs won {s.runs_won}, lost {s.runs_lost}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    raise SystemExit(main())
