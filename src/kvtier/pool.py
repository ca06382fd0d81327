"""One tier's physical slots: a free list and a heap of eviction candidates."""

from __future__ import annotations

import heapq
from collections.abc import Callable

from kvtier.radix import Node, Tier

_Entry = tuple[int, int, int, Node]


class TierPool:
    """Slots ``0 .. capacity-1`` of one tier.

    A slot is *free* (no data), *cached* (holds a block of an unreferenced tree node, evictable)
    or *referenced* (a claimed node's block, or a request's private block)::

        capacity = num_free + num_cached + num_referenced      (invariant 10)

    ``num_free`` and ``num_referenced`` are kept; ``num_cached`` is derived. Candidates for
    eviction sit in a heap keyed by the eviction policy; entries go stale when a node is
    re-filed, and are skipped on pop (lazy deletion).
    """

    def __init__(self, tier: Tier, capacity: int) -> None:
        self.tier = tier
        self.capacity = capacity
        # A stack: pop() hands out the lowest ids first on a fresh pool.
        self.free: list[int] = list(range(capacity - 1, -1, -1))
        self.num_referenced = 0
        self._heap: list[_Entry] = []

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_cached(self) -> int:
        """Blocks of unreferenced cached nodes: evictable. Derived, pure."""
        return self.capacity - len(self.free) - self.num_referenced

    @property
    def num_available(self) -> int:
        """Blocks an allocation may take: free plus evictable. Pure."""
        return self.capacity - self.num_referenced

    def take(self, num_blocks: int) -> list[int]:
        """Pop ``num_blocks`` free slots, in the order repeated ``pop()`` would give them."""
        free = self.free
        assert num_blocks <= len(free), (num_blocks, len(free))
        if num_blocks == 0:
            return []
        slots = free[-num_blocks:]
        del free[-num_blocks:]
        slots.reverse()
        return slots

    def give_back(self, slots: list[int]) -> None:
        """Return slots to the free list so the first of ``slots`` is handed out first."""
        self.free.extend(reversed(slots))

    def push(self, node: Node, key: tuple[int, int]) -> None:
        """File ``node`` as an eviction candidate under ``key``."""
        heapq.heappush(self._heap, (key[0], key[1], node.uid, node))

    def pop_candidate(self, current_key: Callable[[Node], tuple[int, int] | None]) -> Node | None:
        """Pop the best live candidate. ``current_key`` returns a node's key if it is a
        candidate now, else ``None``; entries of nodes that are no candidates are dropped."""
        heap = self._heap
        while heap:
            prio, last_used, _, node = heapq.heappop(heap)
            key = current_key(node)
            if key is None:
                continue
            if key[0] == prio and key[1] == last_used:
                return node
            # A key that changed without a re-file (a retention ran out): file it anew.
            heapq.heappush(heap, (key[0], key[1], node.uid, node))
        return None

    def compact(self, current_key: Callable[[Node], tuple[int, int] | None]) -> None:
        """Drop stale heap entries once they outnumber the live ones."""
        if len(self._heap) <= 2 * self.capacity + 64:
            return
        live = {}
        for entry in self._heap:
            key = current_key(entry[3])
            if key is not None and key == (entry[0], entry[1]):
                live[entry[3].uid] = entry
        self._heap = list(live.values())
        heapq.heapify(self._heap)

    def heap_nodes(self) -> list[Node]:
        """Nodes with an entry in the heap (stale or not); for invariant checks."""
        return [entry[3] for entry in self._heap]
