"""Eviction policies: key functions over what an online cache may know of a run.

The candidate with the smallest key is evicted first; every key starts with the run's
effective priority (TensorRT-LLM's semantics: lower goes first, a retention's priority
holds until it expires), so priorities and retention override anything a policy learns.

    priority-lru    priority, then least recently released (the peers' policy; the default)
    lru             least recently released; priorities ignored
    kvtier-predict  priority, soft queue claims, then release time shifted by a reuse
                    predictor learned online per class of run (see ``KvtierPredict``)
"""

from __future__ import annotations

import math

from kvtier.config import EVICTION_POLICIES
from kvtier.eviction import EvictionPolicy, effective_priority
from kvtier.pool import Key
from kvtier.radix import Node


class PriorityLRU:
    """Lowest priority first, then least recently released.

    A block's priority holds until its retention expires, then falls back to the default.
    Releasing a request touches its blocks tail first, so within one priority a prefix is
    always more recent than its own extensions and outlives them.
    """

    name = "priority-lru"
    ranks_soft_claims = False

    def key(self, node: Node, now: float, default_priority: int) -> Key:
        return (effective_priority(node, now, default_priority), node.last_used)


class LRU:
    """Least recently released first; priorities ignored."""

    name = "lru"
    ranks_soft_claims = False

    def key(self, node: Node, now: float, default_priority: int) -> Key:
        return (0, node.last_used)


class ReusePredictor:
    """Online, per reuse class: how likely a released block is claimed again within the
    cache's horizon, and the retention credit that follows.

    The horizon ``horizon_s`` is the running mean age (time since release) of the blocks the
    cache drops. A release ends as a *hit* (claimed again within the horizon), a *miss*
    (claimed later, or dropped past the horizon), or *censored* (dropped younger than the
    horizon: the policy ended it, so it says nothing about reuse; counting it a miss would
    let a class the policy evicts early look ever less worth keeping).

    Every ``refresh_every`` records each class's hit probability ``p`` is shrunk toward the
    pooled ``p0`` and, where it differs from ``p0`` by more than two standard errors, buys a
    credit of ``horizon_s x log2(p / p0)`` seconds (clipped to two horizons either way):
    a class twice as likely to come back is kept one horizon longer. With no significant
    difference every credit is 0 and the order is LRU's.
    """

    def __init__(self, num_classes: int, refresh_every: int = 64, prior_blocks: float = 64.0,
                 min_blocks: float = 256.0, decay_blocks: float = float(1 << 20)) -> None:
        self.num_classes = num_classes
        self.refresh_every = refresh_every
        self.prior_blocks = prior_blocks
        self.min_blocks = min_blocks
        self.decay_blocks = decay_blocks  # past this many observed blocks, halve the counts
        self.horizon_s = 0.0
        self.num_hits = [0.0] * num_classes
        self.num_trials = [0.0] * num_classes
        self.credit_s = [0.0] * num_classes
        self.num_records = 0

    def record(self, reuse_class: int, age_s: float, num_blocks: int, reused: bool) -> None:
        """Count one ended release (see the class docstring)."""
        horizon = self.horizon_s
        if not reused:
            # NOTE: a slow running mean (1 % per drop) so that one burst of evictions of
            # fresh blocks does not collapse the horizon.
            self.horizon_s = age_s if horizon == 0.0 else horizon + 0.01 * (age_s - horizon)
        if reused or age_s >= horizon:
            self.num_trials[reuse_class] += num_blocks
            if reused and (horizon == 0.0 or age_s < horizon):
                self.num_hits[reuse_class] += num_blocks
        self.num_records += 1
        if self.num_records % self.refresh_every == 0:
            self.refresh()

    def refresh(self) -> None:
        """Recompute every class's credit from the counts."""
        total = sum(self.num_trials)
        if total > self.decay_blocks:
            self.num_hits = [h / 2 for h in self.num_hits]
            self.num_trials = [t / 2 for t in self.num_trials]
            total /= 2
        credit = self.credit_s
        if total < self.min_blocks:
            credit[:] = [0.0] * self.num_classes
            return
        p0 = sum(self.num_hits) / total
        if not 0.0 < p0 < 1.0:
            credit[:] = [0.0] * self.num_classes
            return
        k = self.prior_blocks
        for c in range(self.num_classes):
            n = self.num_trials[c]
            if n == 0:
                credit[c] = 0.0
                continue
            p = (self.num_hits[c] + k * p0) / (n + k)
            if abs(p - p0) < 2.0 * math.sqrt(p0 * (1.0 - p0) / n):
                credit[c] = 0.0
            else:
                credit[c] = self.horizon_s * max(-2.0, min(2.0, math.log2(max(p, 1e-3) / p0)))


# Access-count buckets of a reuse class: 1, 2, 3-4, 5-8, 9+ claims.
_ACCESS_BUCKETS = (1, 2, 4, 8)


class KvtierPredict:
    """kvtier's own policy: priority, then soft queue claims, then LRU order shifted by a
    reuse predictor learned online (:class:`ReusePredictor`).

    Key: ``(priority, soft_claimed, last_used_s + credit[reuse_class], last_used)``. A run
    released by a request is filed under a class: is it the request's deepest run (its
    last stored blocks, often output that the next turn does not extend), and how many
    claims took it (1, 2, 3-4, 5-8, 9+). A class whose blocks come back more often than
    the pool's is kept longer, one that rarely comes back goes sooner; nothing is known
    of a request's future. Credits change as the predictor learns: a filed key is then
    stale and the pool re-files it when it reaches the top (``TierPool.pop_candidate``).

    A policy object serves one cache (it learns from that cache's releases); the waiting
    queue reaches it as soft claims (``KVCacheManager.hint_waiting``). O(1) per key;
    O(classes) per refresh, every 64 ended releases.
    """

    name = "kvtier-predict"
    ranks_soft_claims = True
    NUM_CLASSES = 2 * (len(_ACCESS_BUCKETS) + 1)

    def __init__(self) -> None:
        self.predictor = ReusePredictor(self.NUM_CLASSES)

    def reuse_class(self, node: Node, is_tail: bool) -> int:
        bucket = 0
        while bucket < len(_ACCESS_BUCKETS) and node.num_accesses > _ACCESS_BUCKETS[bucket]:
            bucket += 1
        return 2 * bucket + int(is_tail)

    def record(self, reuse_class: int, age_s: float, num_blocks: int, reused: bool) -> None:
        self.predictor.record(reuse_class, age_s, num_blocks, reused)

    def key(self, node: Node, now: float, default_priority: int) -> Key:
        cls = node.reuse_class
        credit = 0.0 if cls is None else self.predictor.credit_s[cls]
        return (effective_priority(node, now, default_priority), int(node.soft_claimed),
                node.last_used_s + credit, node.last_used)


POLICIES: dict[str, type[PriorityLRU] | type[LRU] | type[KvtierPredict]] = {
    "priority-lru": PriorityLRU, "lru": LRU, "kvtier-predict": KvtierPredict}
assert tuple(POLICIES) == EVICTION_POLICIES, "config.EVICTION_POLICIES names every policy"


def get_policy(name: str) -> EvictionPolicy:
    """The eviction policy called ``name``."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"eviction_policy must be one of {sorted(POLICIES)}, got {name!r}"
        ) from None
