"""kvtier's candidate policies: prefix-aware, queue-aware, learned online, cost-aware.

One class, :class:`Predictive`, with three switches; with all off it is LRU exactly.

* Leaves first: evicting a block evicts its cached extensions (useless without it), and a
  block is filed as older than its parent, so a chain shrinks from its tail.
* ``queue_aware``: blocks that requests waiting in the queue will reuse are soft-claimed:
  they leave the eviction queues and are evicted only when nothing else can go.
* ``predictor``: every access files the blocks under a *class* read off the request:
  the turn of its session (1 + the turn of the earlier request whose prompt it extends)
  and the block's role (``shared``: a prefix reused across sessions, ``body``: the
  session's history, ``last``: the prompt's final block). Per class, the lab learns online
  the hazard of the next access as a function of the time since the last one (ages in
  log2 bins, Kaplan-Meier style: accesses are events, blocks forgotten by a bounded ghost
  directory are censored). The value of keeping a block is its *hit density* over the
  cache's current eviction horizon ``T`` (LHD, Beckmann et al., NSDI '18): the chance of
  an access within ``T`` divided by the expected block-seconds spent waiting for it.
* ``cost_aware``: value times the recompute cost of the block, ``1 + depth_tokens /
  crossover_tokens`` (attention grows with depth, Marconi-style).

Each class keeps its blocks in one LRU queue; eviction compares the oldest block of each
class (a handful) by value, then by age: O(number of classes) per eviction, O(1) per touch.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from benchmarks.policy_lab.replay import LabRequest, Policy

NUM_AGE_BINS = 18  # ages [0,1), [1,2), [2,4), ... [2**16, inf) seconds
TURN_BUCKETS = (1, 2, 3, 4, 5, 5, 5, 6)  # turn -> bucket (1-based turn, capped)
ROLE_BODY, ROLE_LAST = 0, 1
SHARED_CLASS = 0
CLAIMED = -1
# Sessions split by their previous inter-turn gap (a knob): on Mooncake conversation,
# (60, 240) s gave 0.1275 against 0.1308 unsplit (first 3,000 requests, 5,120 blocks), at
# three times the classes to compare, so it is off.
PACE_EDGES_S: tuple[float, ...] = ()
NUM_PACES = len(PACE_EDGES_S) + 1


def age_bin(age_s: float) -> int:
    return min(NUM_AGE_BINS - 1, int(age_s).bit_length()) if age_s > 0 else 0


def _edges(b: int) -> tuple[float, float]:
    lo = 0.0 if b == 0 else float(2 ** (b - 1))
    return lo, (float(2 ** b) if b < NUM_AGE_BINS - 1 else 4.0 * lo)


class Predictive(Policy):
    """LRU per class, classes compared by learned hit density (see the module docstring)."""

    def __init__(self, capacity: int, *, predictor: bool = True, queue_aware: bool = False,
                 cost_aware: bool = False, tokens_per_block: int = 512,
                 crossover_tokens: int = 16384, ghost_factor: int = 8,
                 refresh_every: int = 64, prior_weight: float = 8.0,
                 horizon_factor: float = math.inf, best_stop: bool = False, mode: str = "density",
                 name: str | None = None) -> None:
        super().__init__(capacity)
        self.predictor, self.queue_aware, self.cost_aware = predictor, queue_aware, cost_aware
        switches = "".join(s for s, on in (("-pred", predictor), ("-queue", queue_aware),
                                            ("-cost", cost_aware)) if on)
        self.name = name or ("kv" + switches if switches else "kv-lru")
        self._depth_scale = crossover_tokens / tokens_per_block
        num_classes = 1 + 2 * NUM_PACES * (max(TURN_BUCKETS) + 1)
        self._queues: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_classes)]
        self._claimed: OrderedDict[int, None] = OrderedDict()
        self._claims: dict[int, int] = {}
        self._where: dict[int, int] = {}      # cached key -> class, or CLAIMED
        self._children: dict[int, set[int]] = {}
        self._parent: dict[int, int] = {}
        # Every key seen lately, cached or not: (class, last access s, request, depth).
        self._meta: OrderedDict[int, tuple[int, float, int, int]] = OrderedDict()
        self._ghost_limit = ghost_factor * capacity
        self._req_len: dict[int, int] = {}
        self._req_turn: dict[int, int] = {}
        self._req_arrival: dict[int, float] = {}
        self._events = [[0] * NUM_AGE_BINS for _ in range(num_classes)]
        self._censored = [[0] * NUM_AGE_BINS for _ in range(num_classes)]
        self._value = [[1.0] * NUM_AGE_BINS for _ in range(num_classes)]
        self._horizon_s = 600.0
        self._refresh_every, self._prior_weight = refresh_every, prior_weight
        self._horizon_factor = horizon_factor
        self._best_stop = best_stop
        self._mode = mode
        self._num_served = 0

    def __contains__(self, key: int) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    # -- queue: soft claims ------------------------------------------------------------
    def claim(self, request: LabRequest) -> None:
        if not self.queue_aware:
            return
        for key in request.keys:
            self._claims[key] = self._claims.get(key, 0) + 1
            cls = self._where.get(key)
            if cls is not None and cls != CLAIMED:
                del self._queues[cls][key]
                self._where[key] = CLAIMED
                self._claimed[key] = None

    def release(self, request: LabRequest) -> None:
        if not self.queue_aware:
            return
        for key in request.keys:
            count = self._claims[key] - 1
            if count:
                self._claims[key] = count
                continue
            del self._claims[key]
            if self._where.get(key) == CLAIMED:
                del self._claimed[key]
                cls = self._meta[key][0]
                self._where[key] = cls
                self._queues[cls][key] = None

    # -- learning ----------------------------------------------------------------------
    def _classify(self, request: LabRequest) -> tuple[int, int, int]:
        """(leading keys seen before, turn of this request's session, pace of the session)."""
        meta, keys = self._meta, request.keys
        seen = 0
        for key in keys:
            if key not in meta:
                break
            seen += 1
        turn, pace = 1, 0
        if seen:
            parent = meta[keys[seen - 1]][2]
            # Extends an earlier prompt (all of it, or all but its partial last block).
            if seen >= self._req_len.get(parent, 1 << 30) - 1:
                turn = self._req_turn.get(parent, 1) + 1
                gap_s = request.arrival_s - self._req_arrival.get(parent, request.arrival_s)
                pace = sum(gap_s > edge for edge in PACE_EDGES_S)
        self._req_arrival[request.index] = request.arrival_s
        return seen, turn, pace

    def _learn(self, request: LabRequest, now: float) -> None:
        meta, events = self._meta, self._events
        for key in request.keys:
            entry = meta.get(key)
            if entry is not None:
                events[entry[0]][age_bin(now - entry[1])] += 1
        self._num_served += 1
        if self._num_served % self._refresh_every == 0:
            self._refresh()

    def _refresh(self) -> None:
        """Recompute the value table from the event and censoring histograms."""
        num_classes = len(self._events)
        at_risk = [[0] * NUM_AGE_BINS for _ in range(num_classes)]
        for c in range(num_classes):
            total = 0
            for b in range(NUM_AGE_BINS - 1, -1, -1):
                total += self._events[c][b] + self._censored[c][b]
                at_risk[c][b] = total
        pooled_events = [sum(e[b] for e in self._events) for b in range(NUM_AGE_BINS)]
        pooled_risk = [sum(r[b] for r in at_risk) for b in range(NUM_AGE_BINS)]
        pooled = [e / r if r else 0.0 for e, r in zip(pooled_events, pooled_risk, strict=True)]
        w, horizon = self._prior_weight, self._horizon_s * self._horizon_factor
        for c in range(num_classes):
            hazard = [(self._events[c][b] + w * pooled[b]) / (at_risk[c][b] + w)
                      for b in range(NUM_AGE_BINS)]
            for b in range(NUM_AGE_BINS):
                start = _edges(b)[0]
                end = start + horizon
                alive, hits, waited, best = 1.0, 0.0, 0.0, 0.0
                for b2 in range(b, NUM_AGE_BINS):
                    lo, hi = _edges(b2)
                    lo_in, hi_in = max(lo, start), min(hi, end)
                    if hi_in <= lo_in:
                        break
                    p = hazard[b2] * (hi_in - lo_in) / (hi - lo)
                    hits += alive * p
                    waited += alive * (hi_in - lo_in) * (1.0 - p / 2)
                    alive *= 1.0 - p
                    best = max(best, hits / waited) if self._best_stop else hits / waited
                self._value[c][b] = hits if self._mode == "prob" else best

    # -- cache ---------------------------------------------------------------------
    def _file(self, key: int, cls: int) -> None:
        if self._claims.get(key):
            self._where[key] = CLAIMED
            self._claimed[key] = None
            self._claimed.move_to_end(key)
        else:
            self._where[key] = cls
            self._queues[cls][key] = None

    def _unfile(self, key: int) -> None:
        cls = self._where.pop(key)
        if cls == CLAIMED:
            del self._claimed[key]
        else:
            del self._queues[cls][key]

    def _evict(self, key: int, now: float) -> None:
        """Evict ``key`` and its cached extensions."""
        parent = self._parent.pop(key, None)
        if parent is not None and parent in self._children:
            self._children[parent].discard(key)
        stack = [key]
        while stack:
            victim = stack.pop()
            self._unfile(victim)
            self._parent.pop(victim, None)
            stack.extend(self._children.pop(victim, ()))
        age = now - self._meta[key][1]
        self._horizon_s = max(1.0, 0.99 * self._horizon_s + 0.01 * age)

    def _pick_victim(self, now: float, protected: set[int]) -> int:
        best: tuple[float, float, int] | None = None
        for cls, queue in enumerate(self._queues):
            for scanned, key in enumerate(queue):
                if scanned > 64:
                    break
                if key in protected:
                    continue
                _, last, _, depth = self._meta[key]
                value = self._value[cls][age_bin(now - last)] if self.predictor else 0.0
                if self.cost_aware:
                    value *= 1.0 + depth / self._depth_scale
                score = (value, last, key)
                if best is None or score < best:
                    best = score
                break
        if best is not None:
            return best[2]
        # Soft claims yield: only blocks waiting requests want are left.
        for pool in (self._claimed, *self._queues):
            for key in pool:
                if key not in protected:
                    return key
        raise AssertionError(f"{self.name}: every cached block is protected")

    def serve(self, request: LabRequest, num_hit: int) -> None:
        now, keys = request.arrival_s, request.keys
        self._req_len[request.index] = len(keys)
        body, shared_upto = 0, 0
        if self.predictor:
            seen, turn, pace = self._classify(request)
            self._req_turn[request.index] = turn
            self._learn(request, now)
            bucket = TURN_BUCKETS[min(turn, len(TURN_BUCKETS)) - 1]
            body = 1 + 2 * (NUM_PACES * bucket + pace) + ROLE_BODY
            shared_upto = seen if turn == 1 else 0
        protected = set(keys)
        meta, where = self._meta, self._where
        # Move the request's cached blocks out of the way of the victim scan first.
        for key in keys:
            cls = where.get(key)
            if cls is not None and cls != CLAIMED:
                self._queues[cls].move_to_end(key)
        last_depth = len(keys) - 1
        for depth, key in enumerate(keys):
            if not self.predictor:
                cls = 0
            elif depth < shared_upto:
                cls = SHARED_CLASS
            else:
                cls = body + ROLE_LAST if depth == last_depth else body
            meta[key] = (cls, now, request.index, depth)
            meta.move_to_end(key)
            if key not in where:
                while len(where) >= self.capacity:
                    self._evict(self._pick_victim(now, protected), now)
                if depth:
                    self._parent[key] = keys[depth - 1]
                    self._children.setdefault(keys[depth - 1], set()).add(key)
                self._file(key, cls)
        # Refile tail first so that, within a class, a block is older than its parent.
        for key in reversed(keys):
            self._unfile(key)
            self._file(key, meta[key][0])
        while len(meta) > self._ghost_limit:
            key, entry = meta.popitem(last=False)
            if key in where:  # still cached: keep its record, look at it again later
                meta[key] = entry
                continue
            self._censored[entry[0]][age_bin(now - entry[1])] += 1
