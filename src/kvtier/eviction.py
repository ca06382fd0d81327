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
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Protocol

from kvtier.config import CacheConfig
from kvtier.pool import TierPool
from kvtier.radix import Node, absorb_parent, cut_tail
from kvtier.tier import Tier

Key = tuple[int, int]


def effective_priority(node: Node, now: float, default_priority: int) -> int:
    """``node``'s priority at ``now``: its own until its retention runs out, then the
    default. The one expiry rule. Pure."""
    expiry = node.expiry
    if expiry is not None and now >= expiry:
        return default_priority
    return node.priority


class EvictionPolicy(Protocol):
    """Orders the eviction candidates of a tier. A key must only change when the cache
    re-files the node (on release, on expiry of its retention, on a tier change)."""

    name: str

    def key(self, node: Node, now: float, default_priority: int) -> Key:
        """The sort key of ``node``; smaller is evicted first. Pure."""
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


POLICIES: dict[str, type[PriorityLRU] | type[LRU]] = {"priority-lru": PriorityLRU, "lru": LRU}


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
                or head.last_used != node.last_used):
            return
        absorb_parent(node)
