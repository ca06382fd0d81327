"""Eviction policies as small key functions: the candidate with the smallest key goes first."""

from __future__ import annotations

from typing import Protocol

from kvtier.radix import Node


class EvictionPolicy(Protocol):
    """Orders the eviction candidates of a tier. A key must only change when the manager
    re-files the node (on release, on expiry of its retention, on a tier change)."""

    name: str

    def key(self, node: Node, now: float, default_priority: int) -> tuple[int, int]:
        """The sort key of ``node``; smaller is evicted first. Pure."""
        ...


class PriorityLRU:
    """Lowest priority first, then least recently released.

    A block's priority holds until its retention expires, then falls back to the default.
    Releasing a request touches its blocks tail first, so within one priority a prefix is
    always more recent than its own extensions and outlives them.
    """

    name = "priority-lru"

    def key(self, node: Node, now: float, default_priority: int) -> tuple[int, int]:
        expiry = node.expiry
        priority = default_priority if expiry is not None and now >= expiry else node.priority
        return (priority, node.last_used)


class LRU:
    """Least recently released first; priorities ignored."""

    name = "lru"

    def key(self, node: Node, now: float, default_priority: int) -> tuple[int, int]:
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
