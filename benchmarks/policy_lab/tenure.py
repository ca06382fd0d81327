"""A witness whose LRU tenure holds, with a two-sided exit (issue 10, fifteenth session): a probe.

kvtier's default ranks by LRU's order while its witness says LRU leads beyond chance, and
its evidence halves every two turnovers of prompt blocks admitted. While LRU's order rules
the cache *is* LRU: nothing new can be learned of the learned order's choices, the
evidence only fades, and the learned order is tried again once it has faded within chance
(docs/policy-lab.md, twelfth session). On Azure code at 3 % those trials are the whole
loss: LRU's order with the default's soft claims is 0.3182 there, the default 0.3117.

- **The hold** (:class:`HeldWitness`): the evidence fades with the learned order's own
  tenure only: prompt blocks admitted count towards a fade only while the learned order
  ranks. In LRU's order the lead stands where the learned order's tenure left it (plus
  what still comes in: the learned order's kept runs hit or its ghosts recalled), so an
  LRU tenure, once begun, lasts. Alone it locks every early switch for good (the agentic
  cold start: the twelfth session's one-sided evidence).
- **The exit** (:class:`HeldVeto`): the fourteenth session's stratified veto
  (``StratifiedVeto``): LRU's rule is overruled while LRU's own drops come back, per
  block within each reuse class, more often than the learned order's, beyond chance. That
  is evidence LRU's tenure *does* produce (its own drops, recalled), so the exit is
  two-sided: the learned order's drops against LRU's, each order's books from its own
  tenure. While the veto rules the learned order ranks, so the witness fades again.

Variants (``make_policy``; the rest are ``mixture.make_policy``'s): ``hold`` (the held
tenure alone), ``hold-vstrat`` (held, the stratified veto its way out besides the
outcomes the witness still counts), ``hold-veto`` (the pooled veto instead),
``seal-vstrat`` / ``seal-veto`` (:class:`SealedWitness`: nothing counted in LRU's order,
so the veto is the *only* exit).

    PYTHONPATH=src:. .venv/bin/python benchmarks/policy_lab/tenure.py \
        --rows azure-code,agentic200 --variants main,hold,hold-vstrat
    PYTHONPATH=src:. .venv/bin/python benchmarks/policy_lab/tenure.py \
        --audit --rows flip --variants main,hold-vstrat --num-scales 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.policy_lab import mixture
from benchmarks.policy_lab.mixture import RegretVeto, StratifiedVeto

from kvtier.config import CacheConfig
from kvtier.policies import KvtierPredict
from kvtier.sim import simulate
from kvtier.witness import LruWitness


class HeldWitness(LruWitness):
    """An ``LruWitness`` whose evidence fades only with the learned order's tenure:
    prompt blocks admitted while ``ruling_lru()`` says LRU's order ranks count towards no
    fade (``ruling_lru`` defaults to the witness's own verdict)."""

    def __init__(self, capacity: int, window_blocks: int | None = None,
                 ruling_lru: Callable[[], bool] | None = None) -> None:
        super().__init__(capacity, window_blocks)
        self.ruling_lru: Callable[[], bool] = (
            ruling_lru if ruling_lru is not None else (lambda: self.lru_ahead))
        self.num_held_blocks = 0  # prompt blocks admitted in LRU's order, in all

    def admitted(self, num_prompt_blocks: int, runs: list[tuple[int, int]], room: int) -> None:
        if self.ruling_lru():
            # The fade's count stands still: ``LruWitness.admitted`` adds these blocks to
            # it, so take them back first (it fades only past the window, which the count
            # held below it cannot reach).
            self.num_held_blocks += num_prompt_blocks
            self._traffic -= num_prompt_blocks
        super().admitted(num_prompt_blocks, runs, room)


class SealedWitness(HeldWitness):
    """A :class:`HeldWitness` that also counts no outcome while LRU's order ranks (won or
    lost: the twelfth session's censor), so an LRU tenure has no exit of its own."""

    def _count(self, won: int) -> None:
        if self.ruling_lru():
            return
        super()._count(won)


class HeldTenure(KvtierPredict):
    """The default (cost-aware, witnessed) with a :class:`HeldWitness`: LRU's tenure
    lasts; no exit."""

    def __init__(self) -> None:
        super().__init__(cost_aware=True, witnessed=True)
        self.name = "kvtier-hold"

    def bind(self, config: CacheConfig) -> None:
        super().bind(config)
        self.witness = HeldWitness(max(1, config.num_gpu_blocks + config.num_host_blocks))


class HeldPooledVeto(RegretVeto):
    """``RegretVeto`` (pooled over classes) over a :class:`HeldWitness`."""

    def __init__(self, sealed: bool = False) -> None:
        super().__init__(symmetric=False)
        self.name = "kvtier-hold-pooled"
        self.sealed = sealed

    def bind(self, config: CacheConfig) -> None:
        super().bind(config)
        cls = SealedWitness if self.sealed else HeldWitness
        witness = cls(max(1, config.num_gpu_blocks + config.num_host_blocks))
        witness.ruling_lru = lambda: witness.lru_ahead and self.veto != 1
        self.witness = witness


class HeldVeto(StratifiedVeto):
    """``StratifiedVeto`` over a :class:`HeldWitness`: LRU's tenure lasts until the
    stratified veto overrules it (LRU's own drops come back more often, class by class,
    than the learned order's); while vetoed the learned order ranks and the witness
    fades again."""

    def __init__(self, sealed: bool = False) -> None:
        super().__init__(symmetric=False)
        self.name = "kvtier-hold-veto"
        self.sealed = sealed

    def bind(self, config: CacheConfig) -> None:
        super().bind(config)
        capacity = max(1, config.num_gpu_blocks + config.num_host_blocks)
        witness = (SealedWitness if self.sealed else HeldWitness)(capacity)
        witness.ruling_lru = lambda: witness.lru_ahead and self.veto != 1
        self.witness = witness


def make_policy(variant: str) -> KvtierPredict:
    if variant == "hold":
        return HeldTenure()
    if variant == "hold-vstrat":
        return HeldVeto()
    if variant == "seal-vstrat":
        return HeldVeto(sealed=True)
    if variant == "hold-veto":
        return HeldPooledVeto()
    if variant == "seal-veto":
        return HeldPooledVeto(sealed=True)
    return mixture.make_policy(variant)


def run(name: str, variant: str, scale_step: float = 0.0) -> dict[str, float]:
    """One row (``miniature._row`` / ``mixture._mixed_row``) through ``variant``: its hit
    rate, CPU seconds, and for the held witness the share of prompt blocks admitted in
    LRU's order, for a veto the drops it took from LRU's order."""
    from benchmarks.policy_lab.miniature import _row

    make, config, scale = (mixture._mixed_row(name) if name.startswith("mixed")
                           else _row(name))
    if config is None:  # an audit row (scan-hot10): its 10 % capacity, as mixture.run
        from benchmarks import bench_policy as bp

        from kvtier.blocks import cdiv
        from kvtier.sim import oracle_requests
        stream = list(oracle_requests(make(), 32))
        mb = max(cdiv(r.num_tokens, 32) for r in stream) + 16
        g, h = bp.capacities(stream, 32, mb, (0.10,))[0]
        config = CacheConfig(tokens_per_block=32, num_gpu_blocks=g, num_host_blocks=h,
                             eviction_policy="kvtier-predict-cost")
    policy = make_policy(variant)
    t0 = time.process_time()
    report = simulate(make(), config, time_scale=scale * (1 + 0.0005 * scale_step),
                      policy=policy)
    out: dict[str, float] = {"hit_rate": report.token_hit_rate,
                             "cpu_s": time.process_time() - t0}
    witness = policy.witness
    if witness is not None:
        out["switches"] = witness.num_switches
    if isinstance(witness, HeldWitness):
        out["held_blocks"] = witness.num_held_blocks
    if isinstance(policy, RegretVeto):
        out["vetoed_drops"] = policy.num_vetoed_drops
    return out


def audit(only: str, num_scales: int, variant: str) -> None:
    """The audit's rows (``bench_policy.AUDIT_ROWS``) through ``variant``, as
    ``mixture.audit_vetoes`` (with this module's variants)."""
    saved = mixture.make_policy
    mixture.make_policy = make_policy
    try:
        mixture.audit_vetoes(only, num_scales, variant)
    finally:
        mixture.make_policy = saved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="azure-code")
    ap.add_argument("--variants", default="main,hold,hold-vstrat")
    ap.add_argument("--num-scales", type=int, default=1)
    ap.add_argument("--audit", action="store_true",
                    help="the audit's rows (--rows: label substrings, '' for all)")
    args = ap.parse_args(argv)
    if args.audit:
        for variant in args.variants.split(","):
            audit(args.rows if args.rows != "azure-code" else "", args.num_scales, variant)
        return 0
    steps = [k - (args.num_scales - 1) / 2 for k in range(args.num_scales)]
    for name in args.rows.split(","):
        for variant in args.variants.split(","):
            results = [run(name, variant, s) for s in steps]
            hs = [r["hit_rate"] for r in results]
            sd = statistics.stdev(hs) if len(hs) > 1 else 0.0
            extra = " ".join(
                "[" + ", ".join(f"{k} {v:.0f}" if k != "cpu_s" else f"cpu {v:.1f}s"
                                for k, v in r.items() if k != "hit_rate") + "]"
                for r in results)
            print(f"{name:12s} {variant:12s} {statistics.mean(hs):.4f} (sd {sd:.4f}) "
                  f"{' '.join(f'{h:.4f}' for h in hs)} {extra}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
