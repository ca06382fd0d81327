"""Known policies on the lab's block model: LRU, Belady (offline), ARC, SIEVE, S3-FIFO.

LRU and Belady follow ``kvtier.sim.oracle`` step for step (the lab checks they give the
same hits). ARC, SIEVE and S3-FIFO are the textbook algorithms on single blocks: like
vLLM's CPU-offload policies they know nothing of prefixes, so they may keep a block whose
parent is gone. A block of the request being served is never evicted.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence

from benchmarks.policy_lab.replay import LabRequest, Policy


class LRU(Policy):
    """Least recently used first; within a request deeper blocks count as older."""

    name = "lru"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._lru: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, key: int) -> bool:
        return key in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def serve(self, request: LabRequest, num_hit: int) -> None:
        lru = self._lru
        keys = request.keys
        for key in keys:
            if key in lru:
                lru.move_to_end(key)
        for key in keys:
            if key not in lru:
                if len(lru) >= self.capacity:
                    lru.popitem(last=False)
                lru[key] = None
        for key in reversed(keys):
            lru.move_to_end(key)


class Belady(Policy):
    """Offline optimum: evict the block whose next use is farthest (deeper first on ties)."""

    name = "belady"

    def __init__(self, capacity: int, requests: Sequence[LabRequest]) -> None:
        super().__init__(capacity)
        never = len(requests)
        self._next_uses: list[list[int]] = [[] for _ in requests]
        last_use: dict[int, int] = {}
        for i in range(len(requests) - 1, -1, -1):
            keys = requests[i].keys
            self._next_uses[i] = [last_use.get(key, never) for key in keys]
            for key in keys:
                last_use[key] = i
        self._cached: dict[int, int] = {}
        self._heap: list[tuple[int, int, int, int]] = []
        self._seq = 0

    def __contains__(self, key: int) -> bool:
        return key in self._cached

    def __len__(self) -> int:
        return len(self._cached)

    def serve(self, request: LabRequest, num_hit: int) -> None:
        cached, heap, i = self._cached, self._heap, request.index
        for key in request.keys[num_hit:]:
            if key in cached:
                continue
            if len(cached) >= self.capacity:
                while True:
                    neg_next, _, _, victim = heapq.heappop(heap)
                    if cached.get(victim) == -neg_next:
                        break
                del cached[victim]
            cached[key] = i
        for depth, (key, next_use) in enumerate(
            zip(request.keys, self._next_uses[i], strict=True)
        ):
            cached[key] = next_use
            heapq.heappush(heap, (-next_use, -depth, self._seq, key))
            self._seq += 1


class ARC(Policy):
    """Adaptive Replacement Cache (Megiddo & Modha, FAST '03) on single blocks."""

    name = "arc"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._t1: OrderedDict[int, None] = OrderedDict()
        self._t2: OrderedDict[int, None] = OrderedDict()
        self._b1: OrderedDict[int, None] = OrderedDict()
        self._b2: OrderedDict[int, None] = OrderedDict()
        self._p = 0.0

    def __contains__(self, key: int) -> bool:
        return key in self._t1 or key in self._t2

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def _replace(self, in_b2: bool, protected: set[int]) -> None:
        t1, t2 = self._t1, self._t2
        from_t1 = bool(t1) and (len(t1) > self._p or (in_b2 and len(t1) == int(self._p)))
        for source, ghost in ((t1, self._b1), (t2, self._b2)) if from_t1 else (
                (t2, self._b2), (t1, self._b1)):
            victim = next((k for k in source if k not in protected), None)
            if victim is not None:
                del source[victim]
                ghost[victim] = None
                return
        raise AssertionError("ARC: every cached block is protected")

    def serve(self, request: LabRequest, num_hit: int) -> None:
        t1, t2, b1, b2, c = self._t1, self._t2, self._b1, self._b2, self.capacity
        protected = set(request.keys)
        for key in reversed(request.keys):  # tail first: the root ends most recent
            if key in t1:
                del t1[key]
                t2[key] = None
            elif key in t2:
                t2.move_to_end(key)
            elif key in b1:
                self._p = min(c, self._p + max(1.0, len(b2) / len(b1)))
                if len(self) >= c:
                    self._replace(False, protected)
                del b1[key]
                t2[key] = None
            elif key in b2:
                self._p = max(0.0, self._p - max(1.0, len(b1) / len(b2)))
                if len(self) >= c:
                    self._replace(True, protected)
                del b2[key]
                t2[key] = None
            else:
                if len(t1) + len(b1) >= c:
                    if len(t1) < c and b1:
                        b1.popitem(last=False)
                        if len(self) >= c:
                            self._replace(False, protected)
                    elif len(self) >= c:
                        # T1 fills the cache: drop its LRU block outright.
                        victim = next(k for k in t1 if k not in protected)
                        del t1[victim]
                elif len(t1) + len(t2) + len(b1) + len(b2) >= c:
                    if len(t1) + len(t2) + len(b1) + len(b2) >= 2 * c and b2:
                        b2.popitem(last=False)
                    if len(self) >= c:
                        self._replace(False, protected)
                t1[key] = None


class SIEVE(Policy):
    """SIEVE (Zhang et al., NSDI '24): a FIFO with visited bits and a hand that sweeps
    from old to new, clearing bits and evicting the first unvisited block it meets."""

    name = "sieve"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        # Doubly linked FIFO: ``_newer``/``_older`` per key; head = newest, tail = oldest.
        self._newer: dict[int, int | None] = {}
        self._older: dict[int, int | None] = {}
        self._visited: dict[int, bool] = {}
        self._head: int | None = None
        self._tail: int | None = None
        self._hand: int | None = None

    def __contains__(self, key: int) -> bool:
        return key in self._visited

    def __len__(self) -> int:
        return len(self._visited)

    def _unlink(self, key: int) -> None:
        newer, older = self._newer.pop(key), self._older.pop(key)
        if newer is None:
            self._head = older
        else:
            self._older[newer] = older
        if older is None:
            self._tail = newer
        else:
            self._newer[older] = newer
        del self._visited[key]

    def _evict(self, protected: set[int]) -> None:
        hand = self._hand if self._hand is not None else self._tail
        for _ in range(2 * len(self._visited) + 1):
            assert hand is not None
            if self._visited[hand] or hand in protected:
                self._visited[hand] = False
                hand = self._newer[hand]
                if hand is None:
                    hand = self._tail
                continue
            self._hand = self._newer[hand]
            self._unlink(hand)
            return
        raise AssertionError("SIEVE: every cached block is protected")

    def serve(self, request: LabRequest, num_hit: int) -> None:
        protected = set(request.keys)
        for key in request.keys:
            if key in self._visited:
                self._visited[key] = True
                continue
            if len(self._visited) >= self.capacity:
                self._evict(protected)
            self._visited[key] = False
            self._older[key] = self._head
            self._newer[key] = None
            if self._head is not None:
                self._newer[self._head] = key
            self._head = key
            if self._tail is None:
                self._tail = key


class S3FIFO(Policy):
    """S3-FIFO (Yang et al., SOSP '23): a small probationary FIFO (10 %), a main FIFO with
    2-bit frequencies, and a ghost FIFO of keys that left the small queue unused."""

    name = "s3fifo"

    def __init__(self, capacity: int, small_fraction: float = 0.1) -> None:
        super().__init__(capacity)
        self._small_capacity = max(1, int(capacity * small_fraction))
        self._small: OrderedDict[int, None] = OrderedDict()
        self._main: OrderedDict[int, None] = OrderedDict()
        self._ghost: OrderedDict[int, None] = OrderedDict()
        self._freq: dict[int, int] = {}

    def __contains__(self, key: int) -> bool:
        return key in self._freq

    def __len__(self) -> int:
        return len(self._freq)

    def _evict_main(self, protected: set[int]) -> bool:
        main, freq = self._main, self._freq
        for _ in range(4 * len(main) + 1):
            if not main:
                return False
            key, _ = main.popitem(last=False)
            if freq[key] > 0 or key in protected:
                freq[key] = max(0, freq[key] - 1)
                main[key] = None
                continue
            del freq[key]
            return True
        return False

    def _evict(self, protected: set[int]) -> None:
        small, main, freq = self._small, self._main, self._freq
        while True:
            if len(small) >= self._small_capacity or not main:
                moved = 0
                while small and moved <= len(small):
                    key, _ = small.popitem(last=False)
                    if freq[key] > 0 or key in protected:
                        # Reused while on probation (or in use now): promote.
                        main[key] = None
                        freq[key] = 0
                        moved += 1
                        if len(main) > self.capacity - self._small_capacity and \
                                self._evict_main(protected):
                            return
                        continue
                    del freq[key]
                    self._ghost[key] = None
                    if len(self._ghost) > self.capacity:
                        self._ghost.popitem(last=False)
                    return
            if self._evict_main(protected):
                return
            if not small:
                raise AssertionError("S3-FIFO: every cached block is protected")

    def serve(self, request: LabRequest, num_hit: int) -> None:
        protected = set(request.keys)
        freq = self._freq
        for key in request.keys:
            if key in freq:
                freq[key] = min(3, freq[key] + 1)
                continue
            if len(freq) >= self.capacity:
                self._evict(protected)
            freq[key] = 0
            if key in self._ghost:
                del self._ghost[key]
                self._main[key] = None
            else:
                self._small[key] = None
