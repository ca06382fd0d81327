"""A witness whose LRU tenure holds, with a two-sided exit (issue 10, fifteenth session): a probe.

kvtier's default ranks by LRU's order while its witness says LRU leads beyond chance, and
its evidence halves every two turnovers of prompt blocks admitted. While LRU's order rules
the cache *is* LRU: nothing new can be learned of the learned order's choices, the
evidence only fades, and the learned order is tried again once it has faded within chance
(docs/policy-lab.md, twelfth session). On Azure code at 3 % LRU's order with the default's
soft claims is 0.3182, the default 0.3117: the trials were taken for the whole loss there.
Measured (fifteenth session): they are not, and the fade is what Mooncake conversation,
scan-hot and phase-shift win by; nothing here passed the bar.

- **The hold** (:class:`HeldWitness`): the evidence fades with the learned order's own
  tenure only: prompt blocks admitted count towards a fade only while the learned order
  ranks. In LRU's order the lead stands where the learned order's tenure left it, plus
  what still comes in: the learned order's ghosts recalled (lost) and its kept runs hit
  (won: the only way out of an LRU tenure, and the one Azure code leaves by).
- **The exit** (:class:`HeldVeto`): the fourteenth session's stratified veto
  (``StratifiedVeto``): LRU's rule is overruled while LRU's own drops come back, per
  block within each reuse class, more often than the learned order's, beyond chance. That
  is evidence LRU's tenure *does* produce (its own drops, recalled), so the exit is
  two-sided: the learned order's drops against LRU's, each order's books from its own
  tenure. While the veto rules the learned order ranks, so the witness fades again.

Variants (``make_policy``; the rest are ``mixture.make_policy``'s): ``hold`` (the held
tenure alone), ``hold-miss`` (:class:`MissWitness`: in LRU's order the fade counts LRU's
own capacity misses, its ghosts recalled), ``hold-vstrat`` (held, the stratified veto its
way out besides the outcomes the witness still counts), ``hold-veto`` (the pooled veto
instead), ``seal-vstrat`` / ``seal-veto`` (:class:`SealedWitness`: nothing counted in LRU's order,
so the veto is the *only* exit), ``swap`` / ``swap-b`` (:class:`SwapShadow`: held, its
exit the counterfactual books of LRU's own drops against the learned order's choice at
each, both ways; ``swap-b`` counts X's return within one drop age only).

    PYTHONPATH=src:. .venv/bin/python benchmarks/policy_lab/tenure.py \
        --rows azure-code,agentic200 --variants main,hold,hold-vstrat
    PYTHONPATH=src:. .venv/bin/python benchmarks/policy_lab/tenure.py \
        --audit --rows flip --variants main,hold-vstrat --num-scales 3
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.policy_lab import mixture
from benchmarks.policy_lab.mixture import (
    RegretVeto,
    StratifiedVeto,
    learned_rank,
    learned_within,
)

from kvtier.config import CacheConfig
from kvtier.policies import KvtierPredict
from kvtier.pool import Key
from kvtier.radix import Node
from kvtier.sim import simulate
from kvtier.witness import LruWitness
from kvtier.witness import Z as WITNESS_Z


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


class MissWitness(HeldWitness):
    """A :class:`HeldWitness` whose fade, while LRU's order ranks, counts the blocks of
    LRU's own drops come back for (its ghosts recalled: the cache *is* LRU then, so these
    are LRU's capacity misses, what another order could have hit) instead of every prompt
    block admitted: where LRU misses nothing it could have kept, nothing new could favour
    the learned order and the tenure holds; where it misses much, it fades as main's."""

    def recalled(self, tick: int, num_blocks: int) -> None:
        super().recalled(tick, num_blocks)
        if tick and self.ruling_lru():
            self._traffic += num_blocks
            if self._traffic >= self.window_blocks:
                self._traffic = 0
                self.lead /= 2
                self.volume /= 2
                self._judge()


class SealedWitness(HeldWitness):
    """A :class:`HeldWitness` that also counts no outcome while LRU's order ranks (won or
    lost: the twelfth session's censor), so an LRU tenure has no exit of its own."""

    def _count(self, won: int) -> None:
        if self.ruling_lru():
            return
        super()._count(won)


class HeldTenure(KvtierPredict):
    """The default (cost-aware, witnessed) with a :class:`HeldWitness`: LRU's tenure
    lasts; no exit (``misses``: a :class:`MissWitness`, fading with LRU's misses)."""

    def __init__(self, misses: bool = False) -> None:
        super().__init__(cost_aware=True, witnessed=True)
        self.name = "kvtier-hold"
        self.misses = misses

    def bind(self, config: CacheConfig) -> None:
        super().bind(config)
        capacity = max(1, config.num_gpu_blocks + config.num_host_blocks)
        self.witness = (MissWitness if self.misses else HeldWitness)(capacity)


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


class SwapShadow(KvtierPredict):
    """The default over a :class:`HeldWitness` whose LRU tenure ends on counterfactual
    books of its own drops, both ways (variant ``swap``). At every drop LRU's order makes
    (tier: the last the cache drops from), the learned order's choice among the same
    queue heads is noted (``Evictor.take_victim`` wrapped: ``swapping``); where the two
    differ, LRU dropped run X that the learned order would have kept, and kept run Y that
    it would have dropped. X's ghost recalled is a win of the learned order (``|X|``
    blocks); Y hit while cached (re-used: its release tick moved) is a loss (``|Y|``);
    Y dropped unhit is neither. A first-order counterfactual: it assumes the learned order
    would have kept X until its return (the twelfth session's shadow counted only the
    first side, and overstated where reuses come minutes late). The tenure ends while the
    learned order leads its books beyond chance (``lead > Z sqrt(volume)``, the witness's
    test the other way); the books start empty at every tenure."""

    def __init__(self, bounded: bool = False) -> None:
        super().__init__(cost_aware=True, witnessed=True)
        self.name = "kvtier-swap"
        # ``bounded``: X's return counts only within one drop age (the learner's mean age
        # of the runs dropped now) of its drop: kept instead of Y, X would itself be
        # dropped about a turnover later.
        self.bounded = bounded
        self.exited = False   # the tenure ended on the books: the learned order ranks
        self.cf_lead = 0.0
        self.cf_volume = 0.0
        self._tenure = 0      # the tenure the books belong to
        self._ahead_seen = False
        self._swapped: dict[int, tuple[int, float]] = {}  # X's tick -> tenure, deadline
        self._kept: deque[tuple[Node, int, int, int]] = deque()  # Y, tick, first block, tenure
        self.num_swaps = 0
        self.num_exits = 0
        self.drop_tier_is_host = False

    def bind(self, config: CacheConfig) -> None:
        super().bind(config)
        witness = HeldWitness(max(1, config.num_gpu_blocks + config.num_host_blocks))
        witness.ruling_lru = lambda: self.lru_now
        self.witness = witness
        self.drop_tier_is_host = config.num_host_blocks > 0

    @property
    def lru_now(self) -> bool:
        witness = self.witness
        ahead = witness is not None and witness.lru_ahead
        if ahead != self._ahead_seen:
            self._ahead_seen = ahead
            if ahead:  # a new tenure: its own books
                self._tenure += 1
                self.exited = False
                self.cf_lead = self.cf_volume = 0.0
        return ahead and not self.exited

    def rank(self, node: Node, now: float, default_priority: int) -> Key:
        expiry = node.expiry
        priority = default_priority if expiry is not None and now >= expiry else node.priority
        if self.lru_now:
            return (priority, 1 if node.soft_claimed else 0, 0.0, node.last_used)
        return learned_rank(self, node, now, priority)

    def within(self, node: Node, now: float) -> float:
        return 0.0 if self.lru_now else learned_within(self, node, now)

    @property
    def rank_version(self) -> int:
        return 2 * self.learner.num_refreshes + (1 if self.lru_now else 0)

    def swapped(self, x: Node, y: Node, now: float) -> None:
        """LRU's order took ``x`` where the learned order would have taken ``y``."""
        self.num_swaps += 1
        age = self.learner.drop_age_s
        self._swapped[x.last_used] = (
            self._tenure, now + age if self.bounded and age is not None else math.inf)
        self._kept.append((y, y.last_used, y.start_block, self._tenure))

    def look_at_kept(self, num: int = 4) -> None:
        """Settle up to ``num`` of the runs LRU kept against the learned order's choice:
        hit since (a loss of the learned order), dropped unhit (nothing), or still
        waiting (to the back)."""
        kept = self._kept
        for _ in range(min(num, len(kept))):
            y, tick, start, tenure = kept.popleft()
            if tenure != self._tenure:
                continue
            # A request that reused Y's head split it (``radix.split``: the object keeps
            # the tail, a new node above it the head): Y's blocks are the nodes from its
            # first block down to the object.
            hit = 0
            node: Node | None = y
            while node is not None and node.parent is not None and node.start_block >= start:
                if node.ref_count or node.last_used != tick:
                    hit += len(node.slots)
                node = node.parent
            if hit:
                self._book(-hit)
            elif y.parent is not None:
                kept.append((y, tick, start, tenure))

    def _book(self, won: int) -> None:
        self.cf_lead += won
        self.cf_volume += won * won
        if (self.lru_now and self.cf_lead > 0
                and self.cf_lead > WITNESS_Z * math.sqrt(self.cf_volume)):
            self.exited = True
            self.num_exits += 1

    def recall(self, ghost_key: object, now: float) -> tuple[int, int] | None:
        entry = self.ghosts._entries.get(hash(ghost_key))
        tick = n = 0
        if entry is not None:
            from kvtier.policies import _GHOST
            _, _, n, _, tick = _GHOST.unpack(entry)
        out = super().recall(ghost_key, now)
        swap = self._swapped.pop(tick, None) if out is not None else None
        if swap is not None and swap[0] == self._tenure and now <= swap[1]:
            self._book(n)
        return out


@contextmanager
def swapping() -> Iterator[None]:
    """``Evictor.take_victim`` noting, for a :class:`SwapShadow` in LRU's tenure, the
    learned order's choice among the same live queue heads (its rank, then its oldest or
    youngest by ``within``, as the pool's pop) where the cache drops."""
    from kvtier.eviction import Evictor
    from kvtier.tier import Tier

    original = Evictor.take_victim

    def take_victim(self: Evictor, tier: Tier, max_blocks: int, below: Key | None = None,
                    cut: bool = True) -> Node | None:
        policy = getattr(self.policy, "inner", self.policy)  # behind the policy guard
        if not isinstance(policy, SwapShadow) or not policy.lru_now or (
                (tier is Tier.HOST) != policy.drop_tier_is_host):
            return original(self, tier, max_blocks, below, cut)
        pool, current_key = ((self._host, self._host_key) if tier is Tier.HOST
                             else (self._gpu, self._gpu_key))
        now = self.now()
        best = None
        best_q = None
        for q, heap in pool._queues.items():
            if heap and current_key(heap[0][2]) == heap[0][3]:
                node = heap[0][2]
                expiry = node.expiry
                priority = (self._default_priority if expiry is not None and now >= expiry
                            else node.priority)
                score = (learned_rank(policy, node, now, priority), node.uid)
                if best is None or score < best[0]:
                    best, best_q = (score, node), q
        y = None
        if best is not None and best_q is not None:
            y = best[1]
            young = pool._youngest(best_q, current_key) if pool._both_ends else None
            if young is not None and young is not y and (
                    learned_within(policy, young, now) < learned_within(policy, y, now)):
                y = young
        x = original(self, tier, max_blocks, below, cut)
        if x is not None and y is not None and y is not x and y.parent is not None:
            policy.swapped(x, y, now)
        policy.look_at_kept()
        return x

    Evictor.take_victim = take_victim  # type: ignore[method-assign]
    try:
        yield
    finally:
        Evictor.take_victim = original  # type: ignore[method-assign]


_MIXTURE_VARIANTS = mixture.make_policy  # the mixture's own (``audit`` swaps it out)


def make_policy(variant: str) -> KvtierPredict:
    if variant == "hold":
        return HeldTenure()
    if variant == "hold-miss":
        return HeldTenure(misses=True)
    if variant == "swap":
        return SwapShadow()
    if variant == "swap-b":
        return SwapShadow(bounded=True)
    if variant == "hold-vstrat":
        return HeldVeto()
    if variant == "seal-vstrat":
        return HeldVeto(sealed=True)
    if variant == "hold-veto":
        return HeldPooledVeto()
    if variant == "seal-veto":
        return HeldPooledVeto(sealed=True)
    return _MIXTURE_VARIANTS(variant)


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
    with swapping():
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
    if isinstance(policy, SwapShadow):
        out.update(swaps=policy.num_swaps, exits=policy.num_exits)
    return out


def audit(only: str, num_scales: int, variant: str) -> None:
    """The audit's rows (``bench_policy.AUDIT_ROWS``) through ``variant``, as
    ``mixture.audit_vetoes`` (with this module's variants)."""
    mixture.make_policy = make_policy
    try:
        with swapping():
            mixture.audit_vetoes(only, num_scales, variant)
    finally:
        mixture.make_policy = _MIXTURE_VARIANTS


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
