"""A mixture of eviction orders by regret (issue 10, fourteenth session): a probe.

kvtier's default ranks by its learned order unless its LRU witness says LRU leads beyond
chance, a switch on one-sided evidence (docs/policy-lab.md, twelfth session: in LRU's
order only the learned order's losses can still show). The literature's answer to two
experts each right on some workloads is a mixture weighted by regret (LeCaR, Vietri et al.,
HotStorage '18; CACHEUS, Rodriguez et al., FAST '21): each eviction is made by one expert,
drawn with its weight; a dropped run's ghost remembers which expert dropped it; a request
that comes back for it is that expert's regret. Both experts keep choosing victims, so
both keep paying for their mistakes: the evidence is two-sided.

Here, deterministic and on runs:

- **Experts**: LRU's order (priority and soft claims first, as always; then the oldest
  release; a queue gives its head) and the learned order (``KvtierPredict``'s rank and
  ``within``, cost-aware, without its witness).
- **The draw**: a low-discrepancy sequence of LRU's weight ``w``: an accumulator adds
  ``w`` at every drop and LRU's order rules while it is past 1 (a Sturmian word: over any
  ``k`` drops LRU's order makes ``k w`` of them, +-1). The expert holds from one drop to the
  next, so what a pop ranks and what an offload may displace are judged in one order.
- **Regret**: a ghost carries its expert and that expert's weight when it dropped the run
  (packed into its class field). A recall adds ``blocks / weight`` to the expert's loss
  (inverse propensity: an expert that makes a tenth of the drops is charged ten times per
  block recalled, so the losses estimate what each order alone would have lost per drop,
  not how often it was drawn), and ``(blocks / weight)^2`` to the volume; both halve every
  two turnovers of the capacity in blocks dropped.
- **The weight**: ``w = Phi(z)`` with ``z = (loss_learned - loss_lru) / sqrt(volume)``:
  the sign test the witness uses, read as a chance instead of a verdict (no evidence:
  half and half; LRU's weight falls to Phi(-1) = 0.16 where the witness would have
  switched to the learned order at once, and 0.84 where it would have switched to LRU).
  ``sharp`` scales ``z`` (``Phi(sharp z)``): 1 the plain reading, larger nearer a switch.
  ``floor`` bounds each weight below (exploration; LeCaR has none, the fading stands in).

Variants (``make_policy``): ``main`` (the default as it is), ``blind`` (its learned order
without the witness), ``mix`` (the mixture, no witness), ``mix-s2`` / ``mix-s4``
(sharper), ``mix-w`` (the witness's verdict still rules where it says LRU is ahead; the
mixture elsewhere), ``lecar`` (no inverse propensity: LeCaR's charge, the regret per
recall, not per drop), ``fix<w>`` (a constant weight, nothing learned: ``fix0`` is the
learned order alone, ``fix1`` LRU's order with soft claims), ``ep<c>[-s<sharp>]`` (the
draw held for ``c`` capacities of dropped blocks: coherent tenures).

``veto`` (:class:`RegretVeto`) is what the mixture's books pointed to: the default with its
witness, whose verdict for LRU's order is overruled while LRU's own drops come back more
often than the learned order's, per block, beyond chance; ``veto2`` also the other way;
``vstrat`` / ``vstrat2`` (:class:`StratifiedVeto`) the same test within each reuse class.
Measured and written up in docs/policy-lab.md, "Fourteenth session"; not in ``src/``.

    PYTHONPATH=src:. .venv/bin/python benchmarks/policy_lab/mixture.py \
        --rows azure-code,mcc3 --variants main,mix --num-scales 3
    PYTHONPATH=src:. .venv/bin/python benchmarks/policy_lab/mixture.py \
        --audit --rows memoryless --variants main,veto --num-scales 3
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kvtier.config import CacheConfig
from kvtier.policies import _LAST_BIN_S, NUM_AGE_BINS, KvtierPredict
from kvtier.pool import Key
from kvtier.radix import Node
from kvtier.sim import Workload, simulate
from kvtier.witness import Z as WITNESS_Z

_LRU, _LEARNED = 0, 1
_CLASS_BITS = 6         # a reuse class fits in 6 bits (13 classes)
_WEIGHT_SCALE = 1 << 20  # an expert's weight at the drop, in the ghost's class field


def phi(z: float) -> float:
    """The standard normal CDF. Pure."""
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def pack_class(reuse_class: int, expert: int, weight: float) -> int:
    """A ghost's class field: the run's reuse class, the expert that dropped it and that
    expert's weight then (to 2^-20). Pure."""
    q = max(1, min(_WEIGHT_SCALE, round(weight * _WEIGHT_SCALE)))
    return reuse_class | (expert << _CLASS_BITS) | (q << (_CLASS_BITS + 1))


def unpack_class(code: int) -> tuple[int, int, float]:
    """``(reuse class, expert, weight)`` of a packed class field. Pure."""
    return (code & ((1 << _CLASS_BITS) - 1), (code >> _CLASS_BITS) & 1,
            (code >> (_CLASS_BITS + 1)) / _WEIGHT_SCALE)


def drop_tagged(policy: KvtierPredict, ghost_key: object, node_uid: int, reuse_class: int,
                released_s: float, num_blocks: int, now: float, released_tick: int,
                expert: int, weight: float) -> None:
    """``KvtierPredict.forget``'s books with the run's ghost tagged by the order that
    dropped it (``pack_class``): the learner's drop, the ghost, the releases it trims."""
    learner = policy.learner
    learner.dropped(now - released_s)
    code = pack_class(reuse_class, expert, weight)
    for cls, released, n, _, _ in policy.ghosts.add_trim(
            ghost_key, code, released_s, num_blocks, node_uid, released_tick):
        learner.record(unpack_class(cls)[0], now - released, n, False)


def recall_tagged(policy: KvtierPredict, returning: set[int], ghost_key: object,
                  now: float) -> tuple[int, float, int, int] | None:
    """``KvtierPredict.recall``'s books for a ghost tagged by ``drop_tagged``: the reuse
    learned, the witness told, a shared run's return remembered in ``returning``; the
    order that dropped it, its weight then, its blocks and its node's uid (None for no
    ghost)."""
    entry = policy.ghosts.pop(ghost_key)
    if entry is None:
        return None
    code, released_s, n, uid, tick = entry
    cls, expert, weight = unpack_class(code)
    policy.learner.record(cls, now - released_s, n, True)
    if policy.witness is not None:
        policy.witness.recalled(tick, n)
    if cls == 0:
        if len(returning) >= policy.ghosts.max_entries:
            returning.clear()
        returning.add(hash(ghost_key))
    return expert, weight, n, uid


class RegretMixture(KvtierPredict):
    """``kvtier-predict-cost`` whose every drop is made by LRU's order or the learned
    one, drawn by a low-discrepancy sequence of LRU's weight, the weight set by each
    order's regret (its dropped runs come back for, per drop). See the module."""

    def __init__(self, sharp: float = 1.0, floor: float = 0.0, ipw: bool = True,
                 witnessed: bool = False, fixed: float | None = None,
                 epoch: float = 0.0) -> None:
        super().__init__(cost_aware=True, witnessed=witnessed)
        self.name = "kvtier-mix"
        self.sharp = sharp
        self.floor = floor
        self.ipw = ipw
        self.fixed = fixed    # a constant weight of LRU's order (nothing learned)
        self.epoch = epoch    # the draw holds for this many capacities of dropped blocks
        self.epoch_blocks = 0
        self._since_draw = 0
        self.w_lru = 0.5 if fixed is None else fixed
        self.lru_now = False
        self._acc = 0.0
        self.loss = [0.0, 0.0]
        self.volume = 0.0
        self.window_blocks = 1
        self._dropped = 0
        self.num_drops = [0, 0]     # drops per expert, in all
        self.num_recalled = [0, 0]  # blocks recalled per expert, in all

    def bind(self, config: CacheConfig) -> None:
        super().bind(config)
        capacity = max(1, config.num_gpu_blocks + config.num_host_blocks)
        self.window_blocks = 2 * capacity
        self.epoch_blocks = int(self.epoch * capacity)

    # The order: LRU's while ``lru_now`` (or the witness says LRU is ahead), else learned.

    def _lru_rules(self) -> bool:
        if self.lru_now:
            return True
        witness = self.witness
        return witness is not None and witness.lru_ahead

    def rank(self, node: Node, now: float, default_priority: int) -> Key:
        if self.lru_now:
            expiry = node.expiry
            priority = (default_priority if expiry is not None and now >= expiry
                        else node.priority)
            return (priority, 1 if node.soft_claimed else 0, 0.0, node.last_used)
        return super().rank(node, now, default_priority)

    def within(self, node: Node, now: float) -> float:
        if self.lru_now:
            return 0.0
        return super().within(node, now)

    @property
    def rank_version(self) -> int:
        return 2 * super().rank_version + (1 if self.lru_now else 0)

    # The books.

    def _expert(self) -> tuple[int, float]:
        if self._lru_rules():
            return _LRU, (self.w_lru if self.lru_now else 1.0)
        return _LEARNED, 1.0 - self.w_lru

    def forget(self, ghost_key: object, node_uid: int, reuse_class: int, released_s: float,
               num_blocks: int, now: float, released_tick: int = 0) -> None:
        expert, weight = self._expert()
        self.num_drops[expert] += 1
        drop_tagged(self, ghost_key, node_uid, reuse_class, released_s, num_blocks, now,
                    released_tick, expert, weight)
        self._dropped += num_blocks
        if self._dropped >= self.window_blocks:
            self._dropped = 0
            self.loss = [x / 2 for x in self.loss]
            self.volume /= 2
            self._weigh()
        self._since_draw += num_blocks
        if self._since_draw >= self.epoch_blocks:
            self._since_draw = 0
            self._draw()

    def _draw(self) -> None:
        self._acc += self.w_lru
        if self._acc >= 1.0:
            self._acc -= 1.0
            self.lru_now = True
        else:
            self.lru_now = False

    def _weigh(self) -> None:
        if self.fixed is not None:
            return
        volume = self.volume
        z = (self.loss[_LEARNED] - self.loss[_LRU]) / math.sqrt(volume) if volume > 0 else 0.0
        w = phi(self.sharp * z)
        lo = self.floor
        self.w_lru = min(1.0 - lo, max(lo, w))

    def recall(self, ghost_key: object, now: float) -> tuple[int, int] | None:
        recalled = recall_tagged(self, self._returning, ghost_key, now)
        if recalled is None:
            return None
        expert, weight, n, uid = recalled
        self.num_recalled[expert] += n
        charge = n / weight if self.ipw else float(n)
        self.loss[expert] += charge
        self.volume += charge * charge
        self._weigh()
        return uid, n


def learned_rank(policy: KvtierPredict, node: Node, now: float, priority: int) -> Key:
    """``KvtierPredict.rank`` of ``node`` in the learned order, cost-aware, whatever the
    policy's witness says (the probes decide the order themselves). Pure."""
    cls = node.reuse_class
    age = now - node.last_used_s
    value = policy.learner.value[1 if cls is None else cls][
        (NUM_AGE_BINS - 1 if age >= _LAST_BIN_S else int(age).bit_length())
        if age > 0 else 0]
    value *= 1.0 + node.start_block * policy.tokens_per_block / policy.crossover_tokens
    return (priority, 1 if node.soft_claimed else 0, value, node.last_used)


def learned_within(policy: KvtierPredict, node: Node, now: float) -> float:
    """``KvtierPredict.within`` of ``node`` in the learned order, whatever the witness
    says. Pure."""
    cls = node.reuse_class
    age = now - node.last_used_s
    return policy.learner.near[1 if cls is None else cls][
        (NUM_AGE_BINS - 1 if age >= _LAST_BIN_S else int(age).bit_length())
        if age > 0 else 0]


class RegretVeto(KvtierPredict):
    """The default with its witness, whose switch to LRU's order is vetoed while LRU's
    own drops come back more often than the learned order's, beyond chance: each order
    judged on its own drops (two-sided), the witness's exact books kept for the rest.

    A ghost carries the order that dropped it (LRU's while the cache ranks by it). Per
    order: blocks dropped ``D``, of them come back for ``R``, runs dropped ``N``; the
    order in force halves its three every two capacities of its own dropped blocks (it
    follows the stream), the other's stay as its last tenure left them, plus the recalls
    of its ghosts that come in late (they are outcomes of its drops). Veto: ``R_L / D_L -
    R_P / D_P > Z * se``, ``se`` the two-proportion standard error over runs (Z = 1, as
    the witness). ``symmetric``: the learned order's rule is vetoed too, where its drops
    come back more often than LRU's beyond chance (LRU's order then, witness or not)."""

    def __init__(self, symmetric: bool = False) -> None:
        super().__init__(cost_aware=True, witnessed=True)
        self.name = "kvtier-veto"
        self.symmetric = symmetric
        self.dropped = [0.0, 0.0]
        self.recalled = [0.0, 0.0]
        self.runs = [0.0, 0.0]
        self._since = [0, 0]
        self.window_blocks = 1
        self.lru_now = False
        self.veto = 0  # +1: LRU's rule vetoed; -1: the learned order's; 0: none
        self.num_vetoed_drops = 0

    def bind(self, config: CacheConfig) -> None:
        super().bind(config)
        self.window_blocks = 2 * max(1, config.num_gpu_blocks + config.num_host_blocks)

    def _judge(self) -> None:
        d, r, n = self.dropped, self.recalled, self.runs
        veto = 0
        if n[_LRU] >= 1 and n[_LEARNED] >= 1 and d[_LRU] > 0 and d[_LEARNED] > 0:
            rl, rp = r[_LRU] / d[_LRU], r[_LEARNED] / d[_LEARNED]
            pooled = (r[_LRU] + r[_LEARNED]) / (d[_LRU] + d[_LEARNED])
            var = max(pooled * (1.0 - pooled), 1e-12) * (1.0 / n[_LRU] + 1.0 / n[_LEARNED])
            z = (rl - rp) / math.sqrt(var)
            if z > WITNESS_Z:
                veto = 1
            elif self.symmetric and z < -WITNESS_Z:
                veto = -1
        self.veto = veto
        witness = self.witness
        ahead = witness is not None and witness.lru_ahead
        self.lru_now = (ahead and veto != 1) or veto == -1

    def rank(self, node: Node, now: float, default_priority: int) -> Key:
        self._judge_if_witness_moved()
        expiry = node.expiry
        priority = default_priority if expiry is not None and now >= expiry else node.priority
        if self.lru_now:
            return (priority, 1 if node.soft_claimed else 0, 0.0, node.last_used)
        return learned_rank(self, node, now, priority)

    def within(self, node: Node, now: float) -> float:
        return 0.0 if self.lru_now else learned_within(self, node, now)

    def _judge_if_witness_moved(self) -> None:
        witness = self.witness
        ahead = witness is not None and witness.lru_ahead
        if ahead != self._ahead_seen:
            self._ahead_seen = ahead
            self._judge()

    _ahead_seen = False

    @property
    def rank_version(self) -> int:
        self._judge_if_witness_moved()
        return 2 * self.learner.num_refreshes + (1 if self.lru_now else 0)

    def forget(self, ghost_key: object, node_uid: int, reuse_class: int, released_s: float,
               num_blocks: int, now: float, released_tick: int = 0) -> None:
        self._judge_if_witness_moved()
        expert = _LRU if self.lru_now else _LEARNED
        if self.veto == 1 and self.witness is not None and self.witness.lru_ahead:
            self.num_vetoed_drops += 1
        drop_tagged(self, ghost_key, node_uid, reuse_class, released_s, num_blocks, now,
                    released_tick, expert, 1.0)
        self.dropped[expert] += num_blocks
        self.runs[expert] += 1
        self._since[expert] += num_blocks
        if self._since[expert] >= self.window_blocks:
            self._since[expert] = 0
            self.dropped[expert] /= 2
            self.recalled[expert] /= 2
            self.runs[expert] /= 2
        self._judge()

    def recall(self, ghost_key: object, now: float) -> tuple[int, int] | None:
        recalled = recall_tagged(self, self._returning, ghost_key, now)
        if recalled is None:
            return None
        expert, _, n, uid = recalled
        self.recalled[expert] += n
        self._judge()
        return uid, n


class StratifiedVeto(RegretVeto):
    """``RegretVeto`` with its test stratified by reuse class: within a class, the rate at
    which LRU's drops come back against the learned order's, combined over the classes
    both orders dropped from by inverse variance (``z = sum w_c d_c / sqrt(sum w_c)``,
    ``w_c = 1 / var_c``), so that what each order drops (tails, one-off prompts) is not
    read as how well it chooses."""

    def __init__(self, symmetric: bool = False) -> None:
        super().__init__(symmetric=symmetric)
        self.name = "kvtier-veto-strat"
        n = self.NUM_CLASSES
        self.by_class = [[[0.0] * n for _ in range(3)] for _ in range(2)]  # [order][D,R,N][c]

    def forget(self, ghost_key: object, node_uid: int, reuse_class: int, released_s: float,
               num_blocks: int, now: float, released_tick: int = 0) -> None:
        self._judge_if_witness_moved()
        books = self.by_class[_LRU if self.lru_now else _LEARNED]
        since = self._since[_LRU if self.lru_now else _LEARNED] + num_blocks
        if since >= self.window_blocks:  # the base halves its totals now: so the classes
            for row in books:
                row[:] = [x / 2 for x in row]
        books[0][reuse_class] += num_blocks
        books[2][reuse_class] += 1
        super().forget(ghost_key, node_uid, reuse_class, released_s, num_blocks, now,
                       released_tick)

    def recall(self, ghost_key: object, now: float) -> tuple[int, int] | None:
        packed = self.ghosts._entries.get(hash(ghost_key))
        if packed is not None:
            from kvtier.policies import _GHOST
            cls, expert, _ = unpack_class(_GHOST.unpack(packed)[0])
            self.by_class[expert][1][cls] += _GHOST.unpack(packed)[2]
        return super().recall(ghost_key, now)

    def _judge(self) -> None:
        super()._judge()
        if not hasattr(self, "by_class"):
            return
        (dl, rl, nl), (dp, rp, np_) = self.by_class
        num = den = 0.0
        for c in range(self.NUM_CLASSES):
            if nl[c] >= 1 and np_[c] >= 1 and dl[c] > 0 and dp[c] > 0:
                pooled = (rl[c] + rp[c]) / (dl[c] + dp[c])
                var = max(pooled * (1.0 - pooled), 1e-6) * (1.0 / nl[c] + 1.0 / np_[c])
                num += (rl[c] / dl[c] - rp[c] / dp[c]) / var
                den += 1.0 / var
        z = num / math.sqrt(den) if den > 0 else 0.0
        veto = 1 if z > WITNESS_Z else (-1 if self.symmetric and z < -WITNESS_Z else 0)
        self.veto = veto
        witness = self.witness
        ahead = witness is not None and witness.lru_ahead
        self.lru_now = (ahead and veto != 1) or veto == -1


def make_policy(variant: str) -> KvtierPredict:
    if variant == "main":
        return KvtierPredict(cost_aware=True)
    if variant == "blind":
        return KvtierPredict(cost_aware=True, witnessed=False)
    if variant == "mix":
        return RegretMixture()
    if variant.startswith("mix-s"):
        return RegretMixture(sharp=float(variant[5:]))
    if variant == "mix-w":
        return RegretMixture(witnessed=True)
    if variant.startswith("mix-ws"):
        return RegretMixture(sharp=float(variant[6:]), witnessed=True)
    if variant.startswith("fix"):
        return RegretMixture(fixed=float(variant[3:]))
    if variant.startswith("ep"):  # ep<capacities>[-s<sharp>]
        epoch, _, sharp = variant[2:].partition("-s")
        return RegretMixture(epoch=float(epoch), sharp=float(sharp or 1.0))
    if variant == "veto":
        return RegretVeto()
    if variant == "veto2":
        return RegretVeto(symmetric=True)
    if variant == "vstrat":
        return StratifiedVeto()
    if variant == "vstrat2":
        return StratifiedVeto(symmetric=True)
    if variant == "lecar":
        return RegretMixture(ipw=False)
    raise ValueError(f"unknown variant {variant!r}")


def _mixed_row(name: str) -> tuple[Callable[[], Workload], CacheConfig, float]:
    """``bench_policy``'s mixed rows: chat and agents sharing one cache, scale 5.17."""
    from kvtier.sim import AgenticWorkload, MixedWorkload, SyntheticChat

    gpu, host = (2698, 573) if name == "mixed3" else (2726, 8180)
    return ((lambda: MixedWorkload((SyntheticChat(num_requests=2000),
                                    AgenticWorkload(num_requests=2000)))),
            CacheConfig(tokens_per_block=32, num_gpu_blocks=gpu, num_host_blocks=host), 5.17)


def run(name: str, variant: str, scale_step: float = 0.0) -> dict[str, float]:
    from benchmarks.policy_lab.miniature import _row

    make, config, scale = _mixed_row(name) if name.startswith("mixed") else _row(name)
    if config is None:  # an audit row: its 10 % capacity
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
    if isinstance(policy, RegretVeto):
        out.update(vetoed_drops=policy.num_vetoed_drops,
                   switches=policy.witness.num_switches if policy.witness else 0)
    if isinstance(policy, RegretMixture):
        out.update(w_lru=policy.w_lru, drops_lru=policy.num_drops[_LRU],
                   drops_learned=policy.num_drops[_LEARNED],
                   rec_lru=policy.num_recalled[_LRU], rec_learned=policy.num_recalled[_LEARNED])
    return out


def audit_vetoes(only: str, num_scales: int, variant: str = "veto") -> None:
    """The audit's rows (``bench_policy.AUDIT_ROWS``) through ``variant``, with how many
    drops the veto took from LRU's order (``veto``: where none, the row's decisions are
    the default's, to the bit)."""
    from benchmarks import bench_policy as bp

    from kvtier.blocks import cdiv
    from kvtier.sim import oracle_requests

    steps = [k - (num_scales - 1) / 2 for k in range(num_scales)]
    for label, source, tpb, fractions in bp.AUDIT_ROWS:
        if only and not any(w in label for w in only.split(",")):
            continue
        workload = bp.audit_workload(source)
        stream = list(oracle_requests(workload, tpb))
        max_blocks = max(cdiv(r.num_tokens, tpb) for r in stream) + 16
        caps = bp.capacities(stream, tpb, max_blocks, fractions)
        probe = simulate(workload, CacheConfig(tokens_per_block=tpb, num_gpu_blocks=caps[0][0],
                                               num_host_blocks=caps[0][1],
                                               eviction_policy="priority-lru"))
        scale = 1.0
        if (probe.ttft_s.p50 or 0.0) > bp.TTFT_TARGET_S:
            scale = max(1.0, (probe.load.utilization or 0.0) / 0.7)
        scale = round(scale, 4)
        for f, (gpu, host) in zip(fractions, caps, strict=True):
            config = CacheConfig(tokens_per_block=tpb, num_gpu_blocks=gpu, num_host_blocks=host)
            hs, vetoed = [], []
            for k in steps:
                policy = make_policy(variant)
                hs.append(simulate(bp.audit_workload(source), config,
                                   time_scale=scale * (1 + 0.0005 * k),
                                   policy=policy).token_hit_rate)
                if isinstance(policy, RegretVeto):
                    vetoed.append(policy.num_vetoed_drops)
            print(f"{label:26s} {f:5.2f} {variant:6s} {statistics.mean(hs):.4f} "
                  f"{' '.join(f'{h:.4f}' for h in hs)} vetoed drops {vetoed}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="", help="rows (default azure-code); --audit: "
                    "label substrings (default every row)")
    ap.add_argument("--variants", default="main,mix")
    ap.add_argument("--num-scales", type=int, default=1)
    ap.add_argument("--audit", action="store_true",
                    help="the audit's rows (--rows: label substrings), vetoes counted")
    args = ap.parse_args(argv)
    if args.audit:
        for variant in args.variants.split(","):
            audit_vetoes(args.rows, args.num_scales, variant)
        return 0
    steps = [k - (args.num_scales - 1) / 2 for k in range(args.num_scales)]
    for name in (args.rows or "azure-code").split(","):
        for variant in args.variants.split(","):
            hs = []
            extra = ""
            for s in steps:
                r = run(name, variant, s)
                hs.append(r["hit_rate"])
                if "vetoed_drops" in r:
                    extra += (f" [vetoed drops {r['vetoed_drops']:.0f}, witness switches "
                              f"{r['switches']:.0f}, cpu {r['cpu_s']:.1f}s]")
                elif "w_lru" in r:
                    extra += (f" [w {r['w_lru']:.2f} drops {r['drops_lru']:.0f}/"
                              f"{r['drops_learned']:.0f} rec {r['rec_lru']:.0f}/"
                              f"{r['rec_learned']:.0f} cpu {r['cpu_s']:.1f}s]")
                else:
                    extra += f" [cpu {r['cpu_s']:.1f}s]"
            sd = statistics.stdev(hs) if len(hs) > 1 else 0.0
            print(f"{name:12s} {variant:10s} {statistics.mean(hs):.4f} (sd {sd:.4f})"
                  f" {' '.join(f'{h:.4f}' for h in hs)}{extra}", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    raise SystemExit(main())
