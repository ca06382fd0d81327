"""Eviction: which cached runs may leave a tier, in which order, and when retentions end.

A policy is a key function: of a tier's candidates, the smallest key goes first. The
:class:`Evictor` files every run that may be evicted now in its tier pool's candidate heap,
keeps the heap of retention expiries, and hands out the next victim, rejoined with the
runs a claim split off it and trimmed to size. ``BlockCache`` then moves it (offload or
drop). Candidates, so that a prefix never leaves a tier before its own extensions::

    GPU   an unreferenced GPU run with no GPU child   (host children may hang below it)
    host  an unreferenced host run with no child

Contract: the Evictor changes only candidate heaps, the expiry heap, and the shape of
unreferenced runs (rejoining or cutting them); it never frees a slot.

Every key starts with the run's effective priority (TensorRT-LLM's semantics: lower goes
first; a retention that ran out falls back to the default), so whatever a policy learns only
orders runs of one priority. What a policy may know of a run is on its ``Node``, kept by the
cache: ``last_used`` (release tick), ``last_used_s`` and ``created_s`` (the cache's clock),
``num_accesses`` (claims), ``start_block`` (depth), ``root`` (key space), ``reuse_class``
(how its last release was filed) and ``soft_claimed`` (a waiting request will reuse it).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from kvtier.config import CacheConfig
from kvtier.pool import Key, TierPool
from kvtier.radix import Node, absorb_parent, cut_tail
from kvtier.tier import Tier

if TYPE_CHECKING:
    from kvtier.sequence import SequenceSpec



def effective_priority(node: Node, now: float, default_priority: int) -> int:
    """``node``'s priority at ``now``: its own until its retention runs out, then the
    default. The one expiry rule. Pure."""
    expiry = node.expiry
    if expiry is not None and now >= expiry:
        return default_priority
    return node.priority


class EvictionPolicy(Protocol):
    """Orders the eviction candidates of a tier. A key should only change when the cache
    re-files the node (on release, on expiry of its retention, on a tier change, on a soft
    claim); a key that changes otherwise is re-filed when its stale entry reaches the top
    of the heap, so it may go later than its new key says, never before it is a candidate."""

    name: str

    def key(self, node: Node, now: float, default_priority: int) -> Key:
        """The sort key of ``node``; smaller is evicted first. Pure."""
        ...


@runtime_checkable
class ReuseLearner(Protocol):
    """A policy that learns from the stream. The cache files each run it releases under
    ``reuse_class`` (stored on the node), and reports how each release ended: claimed again
    (``reused``) or dropped from the cache, ``age_s`` after the release, for ``num_blocks``
    blocks. A run still cached has an open release; nothing about it is reported yet."""

    def reuse_class(self, node: Node, is_tail: bool) -> int:
        """The class of ``node`` as it is released now (``is_tail``: the deepest run of
        the releasing request's path). Pure."""
        ...

    def record(self, reuse_class: int, age_s: float, num_blocks: int, reused: bool) -> None:
        """A release of ``num_blocks`` blocks filed under ``reuse_class`` ended."""
        ...


@runtime_checkable
class QueueHint(Protocol):
    """What a scheduler tells the cache's policy about its waiting queue: the requests it
    will admit next. Their cached prefixes are *soft-claimed*: ranked above every other run
    of their priority, but still evictable, so they yield before a request is refused."""

    def hint_waiting(self, specs: Sequence[SequenceSpec]) -> None:
        """The waiting requests now, first to be admitted first; replaces the last hint."""
        ...


@runtime_checkable
class QueueAwarePolicy(QueueHint, Protocol):
    """A policy that ranks soft-claimed runs; the cache that uses it binds its hook."""

    def bind(self, soft_claim: Callable[[Sequence[SequenceSpec]], None]) -> None:
        """Hand the policy the cache's ``set_soft_claims``; called once, by that cache."""
        ...


class PriorityLRU:
    """Lowest priority first, then least recently released.

    A block's priority holds until its retention expires, then falls back to the default.
    Releasing a request touches its blocks tail first, so within one priority a prefix is
    always more recent than its own extensions and outlives them.
    """

    name = "priority-lru"

    def key(self, node: Node, now: float, default_priority: int) -> Key:
        return (effective_priority(node, now, default_priority), node.last_used)


class LRU:
    """Least recently released first; priorities ignored."""

    name = "lru"

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

    A policy object serves one cache (the cache binds its soft-claim hook at creation), and
    is the scheduler's :class:`QueueHint`. O(1) per key; O(classes) per refresh, every 64
    ended releases.
    """

    name = "kvtier-predict"
    NUM_CLASSES = 2 * (len(_ACCESS_BUCKETS) + 1)

    def __init__(self) -> None:
        self.predictor = ReusePredictor(self.NUM_CLASSES)
        self._soft_claim: Callable[[Sequence[SequenceSpec]], None] | None = None

    def bind(self, soft_claim: Callable[[Sequence[SequenceSpec]], None]) -> None:
        """Called once by the cache that uses this policy: how to soft-claim prefixes."""
        if self._soft_claim is not None:
            raise ValueError("a kvtier-predict policy serves one cache; make one per manager")
        self._soft_claim = soft_claim

    def hint_waiting(self, specs: Sequence[SequenceSpec]) -> None:
        if self._soft_claim is not None:
            self._soft_claim(specs)

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


def get_policy(name: str) -> EvictionPolicy:
    """The eviction policy called ``name``."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"eviction_policy must be one of {sorted(POLICIES)}, got {name!r}"
        ) from None


class Evictor:
    """Eviction candidates and retention expiries of the two tier pools."""

    def __init__(self, config: CacheConfig, clock: Callable[[], float],
                 policy: EvictionPolicy, gpu: TierPool, host: TierPool) -> None:
        self.policy = policy
        self._clock = clock
        self._default_priority = config.default_priority
        self._tpb = config.tokens_per_block
        self._gpu = gpu
        self._host = host
        self._expiries: list[tuple[float, int, Node]] = []
        self._num_live_expiries = 0  # entries that were current at the last purge

    def now(self) -> float:
        """The clock's time now. Pure."""
        return self._clock()

    def priority(self, node: Node) -> int:
        """``node``'s priority now. Pure."""
        return effective_priority(node, self._clock(), self._default_priority)

    def key(self, node: Node) -> Key:
        """``node``'s eviction key now. Pure."""
        return self.policy.key(node, self._clock(), self._default_priority)

    def gpu_candidate_key(self, node: Node) -> Key | None:
        """``node``'s key if it is a GPU eviction candidate now, else None. Pure."""
        if (node.parent is None or node.tier is not Tier.GPU or node.ref_count
                or node.num_gpu_children):
            return None
        return self.key(node)

    def host_candidate_key(self, node: Node) -> Key | None:
        """``node``'s key if it is a host eviction candidate now, else None. Pure."""
        if node.parent is None or node.tier is not Tier.HOST or node.ref_count or node.children:
            return None
        return self.key(node)

    def refile(self, node: Node) -> None:
        """File ``node`` as a candidate of its tier if it is one now."""
        if node.tier is Tier.GPU:
            key = self.gpu_candidate_key(node)
            if key is not None:
                self._gpu.push(node, key)
                self._gpu.compact(self.gpu_candidate_key)
        else:
            key = self.host_candidate_key(node)
            if key is not None:
                self._host.push(node, key)
                self._host.compact(self.host_candidate_key)

    def track_retention(self, node: Node) -> None:
        """Note when ``node``'s retention runs out, if it has one. Entries of nodes released
        again or dropped go stale; they are purged whenever they could outnumber the live
        ones, so the heap does not grow with the history."""
        if node.expiry is None:
            return
        expiries = self._expiries
        heapq.heappush(expiries, (node.expiry, node.uid, node))
        if len(expiries) > 2 * self._num_live_expiries + 64:
            # One current entry per node in the tree (a node released twice with the same
            # expiry has two entries that look current).
            live = {e[2].uid: e for e in expiries
                    if e[2].expiry == e[0] and e[2].parent is not None}
            self._expiries = list(live.values())
            heapq.heapify(self._expiries)
            self._num_live_expiries = len(self._expiries)

    def expire(self) -> None:
        """Re-file nodes whose retention ran out, so they sort by the default priority."""
        now = self._clock()
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            expiry, _, node = heapq.heappop(expiries)
            if node.expiry == expiry and node.parent is not None and not node.ref_count:
                self.refile(node)

    def cut_tail(self, node: Node, num_tail_blocks: int) -> Node:
        """Cut the last blocks of the unreferenced ``node`` into a new child; return it."""
        tail = cut_tail(node, num_tail_blocks, self._tpb)
        self.track_retention(tail)
        return tail

    def take_victim(self, tier: Tier, max_blocks: int, below: Key | None = None) -> Node | None:
        """The next run to evict from ``tier``: the best candidate, rejoined with parents
        that are the same run in all but name, cut to its last ``max_blocks`` blocks (the
        rest stays, filed again once the victim is gone). ``None`` when there is no
        candidate, or (with ``below``) when the best one's key is not below it."""
        pool, current_key = ((self._gpu, self.gpu_candidate_key) if tier is Tier.GPU
                             else (self._host, self.host_candidate_key))
        node = pool.pop_candidate(current_key)
        if node is None:
            return None
        _merge_up(node)
        if below is not None:
            key = self.key(node)
            if key >= below:
                pool.push(node, key)
                return None
        if max_blocks >= node.num_blocks:
            return node
        return self.cut_tail(node, max_blocks)


def _merge_up(node: Node) -> None:
    """Rejoin ``node`` with parents that are the same run in all but name (left split by a
    claim that was rolled back or released), so eviction sees runs as if never split."""
    while True:
        head = node.parent
        if (head is None or head.parent is None or len(head.children) != 1
                or head.tier is not node.tier or head.ref_count != node.ref_count
                or head.priority != node.priority or head.expiry != node.expiry
                or head.last_used != node.last_used or head.soft_claimed != node.soft_claimed
                or head.reuse_class != node.reuse_class):
            return
        absorb_parent(node)
