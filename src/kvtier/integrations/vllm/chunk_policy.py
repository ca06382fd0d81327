"""kvtier's eviction policies over the chunks of vLLM's CPU tier. Pure; no vLLM import.

vLLM's CPU tier keeps one chunk per ``OffloadKey`` and asks its ``CachePolicy`` which to
evict. kvtier's policies (``kvtier.policies``, named by ``config.EVICTION_POLICIES``) order
radix ``Node``s; here every chunk carries a detached ``Node`` (a run of one block, in no
tree) whose fields are kept the way kvtier's ``BlockCache`` keeps them, and the candidates
sit in a kvtier ``TierPool`` (one heap per policy queue, heads compared by ``rank``)::

    vLLM call                    Node                                   learner (ReuseLearner)
    insert (a store)             created_s, last_used(_s), accesses 1   -
                                 (last_used: the request's tick, tail older than head)
    on_request_finished(keys)    tail first: last_used = next tick,     reused with an open
      (the request's release)    last_used_s = now, priority/retention  release: record(reuse)
                                                                        each: reuse_class(...)
    touch(keys)                  last_used = next tick                  -
    on_request_access (live)     last_used raised to the request's      -
                                 tick; soft_claimed while it holds it
    on_store_miss(keys)          -                                      recall(key): a ghost?
    evict                        smallest rank first, protected kept    forget(key, ...)

A chunk's key is its own place (vLLM keys are content-addressed), so the ghost key of an
evicted chunk is its ``OffloadKey``. Releasing tail first makes a prefix more recent than its
own extensions, as in kvtier's tree. ``evict`` is atomic: exactly ``n`` chunks, or no change.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, NamedTuple, TypeVar

from kvtier.clock import CacheClock
from kvtier.config import DEFAULT_PRIORITY, EVICTION_POLICIES, CacheConfig, check_priority
from kvtier.counts import check_count
from kvtier.eviction import ROLE_BODY, ROLE_SHARED, ReuseLearner
from kvtier.policies import get_policy
from kvtier.pool import Key, TierPool
from kvtier.radix import Node
from kvtier.tier import Tier

C = TypeVar("C")
MAX_CAPACITY = 1 << 32
# Recency (``Node.last_used``) is ``tick << 32`` minus a position: the chunks one live request
# stores or reads share its tick, its tail older than its head (vLLM's own LRU does the same
# with (rank, -position) pairs), so a prefix outlives its extensions while the request runs.
_POSITION_BITS = 32
VLLM_PREFIX = "kvtier-"


def vllm_policy_name(policy: str) -> str:
    """The ``eviction_policy`` name vLLM knows kvtier's ``policy`` by: prefixed with
    ``kvtier-`` unless it already is, since vLLM's own ``lru`` and ``arc`` are registered
    names that win over any module path. Pure."""
    return policy if policy.startswith(VLLM_PREFIX) else VLLM_PREFIX + policy


def kvtier_policy_name(vllm_name: str) -> str | None:
    """The kvtier policy vLLM's ``eviction_policy`` name ``vllm_name`` stands for, or None
    (any policy in ``config.EVICTION_POLICIES``, so new ones need no change here). Pure."""
    for policy in EVICTION_POLICIES:
        if vllm_policy_name(policy) == vllm_name:
            return policy
    return None


class Claim(NamedTuple):
    """One soft claim: the chunk's key and its node's uid (the chunk stored under the key
    when the claim was made)."""

    key: bytes
    uid: int


class _Chunk(Generic[C]):
    __slots__ = ("chunk", "claims", "evictable", "key", "node")

    def __init__(self, key: bytes, chunk: C, node: Node) -> None:
        self.key = key
        self.chunk = chunk
        self.node = node
        self.evictable = False
        self.claims = 0  # live requests soft-claiming this chunk


class PolicyChunks(Generic[C]):
    """The chunks of one CPU tier of ``capacity`` chunks under kvtier's ``policy_name``.

    May change: its own books and the policy's learned state. Not thread-safe (vLLM calls
    its policy under the manager's lock).
    """

    def __init__(self, policy_name: str, capacity: int, *,
                 default_priority: int = DEFAULT_PRIORITY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        # NOTE: the plain ints the checks return (``kvtier.counts``), not the caller's: an
        # ``__index__`` default priority reached the policies' keys, a NumPy capacity was
        # refused.
        default_priority = check_priority("default_priority", default_priority)
        capacity = check_count("capacity", capacity, 0, MAX_CAPACITY)
        self._policy_name = policy_name
        self._capacity = capacity
        self._default_priority = default_priority
        # A clock that raises or answers garbage gives the last good time: no call fails
        # half done (``kvtier.clock``).
        self._clock = CacheClock(clock)
        self._chunks: dict[bytes, _Chunk[C]] = {}
        self._by_uid: dict[int, _Chunk[C]] = {}
        self._expiries: list[float] = []  # retention ends, to re-file in time
        self._ticks = itertools.count(1)
        self._num_evictable = 0
        self.generation = 0  # bumped by clear(): ranks handed out before are void
        self._reset_policy()

    def _reset_policy(self) -> None:
        self.policy = get_policy(self._policy_name)  # ValueError naming the known policies
        self._learner = self.policy if isinstance(self.policy, ReuseLearner) else None
        if self._learner is not None:
            # NOTE: one "block" per chunk, one "token" per position: cost-aware policies
            # read depth as start_block x tokens_per_block, and start_block holds the
            # chunk's end position in tokens.
            self._learner.bind(CacheConfig(tokens_per_block=1,
                                           num_gpu_blocks=max(1, self._capacity),
                                           eviction_policy=self._policy_name))
        # A policy that picks within a queue (``EvictionPolicy.within``) gets both ends.
        self._within = getattr(self.policy, "within", None)
        self._pool = TierPool(Tier.HOST, max(1, self._capacity), self.policy.num_queue_fields,
                              both_ends=self._within is not None)

    # -- queries ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._chunks)

    def get(self, key: bytes) -> C | None:
        """The chunk stored under ``key``, or None. Pure."""
        entry = self._chunks.get(key)
        return None if entry is None else entry.chunk

    def node(self, key: bytes) -> Node | None:
        """What the policy sees of ``key``'s chunk (for tests and reports). Pure."""
        entry = self._chunks.get(key)
        return None if entry is None else entry.node

    @property
    def num_evictable(self) -> int:
        return self._num_evictable

    # -- commands --------------------------------------------------------------------------
    def new_rank(self) -> int:
        """A tick for one request's stores and reads (``insert``, ``access``)."""
        return next(self._ticks)

    def insert(self, key: bytes, chunk: C, *, evictable: bool, depth: int | None = None,
               rank: int | None = None, priority: int | None = None,
               retention_s: float | None = None) -> None:
        """Add a chunk a request just stored (``depth``: its end position, if known;
        ``rank``: the storing request's ``new_rank``, if known)."""
        if key in self._chunks:
            raise ValueError(f"chunk {key.hex()[:16]}... is already cached")
        now = self._clock()
        node = Node(None, [], [0], Tier.HOST, None, depth or 0, None)
        node.created_s = node.last_used_s = now
        node.last_used = self._recency(rank, depth)
        node.num_accesses = 1
        self._set_retention(node, now, priority, retention_s)
        entry = _Chunk(key, chunk, node)
        self._chunks[key] = entry
        self._by_uid[node.uid] = entry
        if evictable:
            self.mark_evictable(key)

    def remove(self, key: bytes) -> None:
        """Forget ``key`` (a failed store): no reuse is learned from it."""
        entry = self._chunks.pop(key)
        del self._by_uid[entry.node.uid]
        if entry.evictable:
            self._num_evictable -= 1
        self._bound_expiries()

    def touch(self, keys: Iterable[bytes]) -> None:
        """Make ``keys`` most recent, the first most recent of all."""
        for key in reversed(list(keys)):
            entry = self._chunks.get(key)
            if entry is not None:
                entry.node.last_used = self._recency(None, None)
                self._refile(entry)

    def access(self, keys: Iterable[tuple[bytes, int]], rank: int) -> None:
        """A live request of ``rank`` read or stored ``keys`` (with their end positions):
        they are at least as recent as its own chunks, its tail older than its head."""
        for key, position in keys:
            entry = self._chunks.get(key)
            recency = self._recency(rank, position)
            if entry is not None and entry.node.last_used < recency:
                entry.node.last_used = recency
                self._refile(entry)

    def release(self, keys: Sequence[bytes], reused: set[bytes], *,
                priority: int | None = None, retention_s: float | None = None) -> None:
        """A request ended: ``keys`` are its chunks head to tail, ``reused`` the ones it
        found cached (not stored itself). Reused chunks end their open release as reuses;
        every chunk opens a new one (role: shared if reused, else body)."""
        now = self._clock()
        learner = self._learner
        for key in reversed(keys):
            entry = self._chunks.get(key)
            if entry is None:
                continue
            node = entry.node
            if key in reused:
                if learner is not None and node.reuse_class is not None:
                    learner.record(node.reuse_class, now - node.last_used_s, 1, True)
                node.num_accesses += 1
            node.last_used = self._recency(None, None)
            node.last_used_s = now
            if priority is not None or retention_s is not None:
                self._set_retention(node, now, priority, retention_s)
            if learner is not None:
                # NOTE: vLLM tells a policy nothing of sessions: the turn is unknown (0).
                node.reuse_class = learner.reuse_class(
                    node, 0, ROLE_SHARED if key in reused else ROLE_BODY)
            self._refile(entry)

    def recall(self, keys: Iterable[bytes]) -> None:
        """Requests are about to store ``keys``, which the tier lacks: for a learner, a
        miss where an evicted chunk sat (its ghost) is a reuse that came too late."""
        learner = self._learner
        if learner is None:
            return
        now = self._clock()
        for key in keys:
            learner.recall(key, now)

    def soft_claim(self, keys: Iterable[bytes]) -> list[Claim]:
        """A live request will read ``keys``: rank them later while it lives (policies that
        ``ranks_soft_claims`` only; else a no-op). Returns the claims made, for
        ``unclaim``."""
        if not self.policy.ranks_soft_claims:
            return []
        claimed = []
        for key in keys:
            entry = self._chunks.get(key)
            if entry is None:
                continue
            entry.claims += 1
            claimed.append(Claim(key, entry.node.uid))
            if entry.claims == 1:
                entry.node.soft_claimed = True
                self._refile(entry)
        return claimed

    def unclaim(self, claims: Iterable[Claim]) -> None:
        """End the soft claims ``soft_claim`` returned.

        NOTE: a claim ends on the chunk it was made on: counted per key, a request's claim
        on a chunk since evicted ended another request's claim on the chunk stored again
        under that key (ranked unclaimed while that request read it)."""
        for key, uid in claims:
            entry = self._chunks.get(key)
            if entry is None or entry.node.uid != uid or entry.claims == 0:
                continue
            entry.claims -= 1
            if entry.claims == 0:
                entry.node.soft_claimed = False
                self._refile(entry)

    def mark_evictable(self, key: bytes) -> None:
        entry = self._chunks[key]
        if entry.evictable:
            return
        entry.evictable = True
        self._num_evictable += 1
        self._refile(entry)

    def mark_non_evictable(self, key: bytes) -> None:
        entry = self._chunks[key]
        if entry.evictable:
            entry.evictable = False
            self._num_evictable -= 1

    def evict(self, n: int, protected: set[bytes]) -> list[tuple[bytes, C]] | None:
        """Exactly ``n`` evictable chunks outside ``protected``, best victims first, gone
        from the books; or None, changing nothing, when fewer than ``n`` qualify."""
        if n <= 0:
            return []
        if n > self._num_evictable:
            return None
        now = self._clock()
        self._expire(now)
        chosen: list[_Chunk[C]] = []
        kept: list[_Chunk[C]] = []
        seen: set[int] = set()
        current: _Chunk[C] | None = None  # popped, not yet in chosen or kept
        try:
            while len(chosen) < n:
                node = self._pool.pop_candidate(self._current_key, self._rank, None,
                                                self._within_now if self._within else None)
                if node is None:
                    break
                if node.uid in seen:  # a second entry of one chunk filed twice with one key
                    continue
                seen.add(node.uid)
                current = self._by_uid[node.uid]
                (kept if current.key in protected else chosen).append(current)
                current = None
        except BaseException:
            # Whatever raised mid-selection (the caller's ``protected``, a clock), no chunk
            # taken off the heap is lost: each is filed again, and the books are as before.
            for entry in (*chosen, *kept, *([current] if current is not None else [])):
                self._refile(entry)
            raise
        for entry in kept:
            self._refile(entry)
        if len(chosen) < n:
            for entry in chosen:
                self._refile(entry)
            return None
        learner = self._learner
        out: list[tuple[bytes, C]] = []
        for entry in chosen:
            node = entry.node
            del self._chunks[entry.key]
            del self._by_uid[node.uid]
            self._num_evictable -= 1
            if learner is not None and node.reuse_class is not None:
                learner.forget(entry.key, node.uid, node.reuse_class, node.last_used_s, 1, now)
            out.append((entry.key, entry.chunk))
        self._bound_expiries()
        return out

    def clear(self) -> None:
        """Forget every chunk and what the policy learned."""
        self._chunks.clear()
        self._by_uid.clear()
        self._expiries.clear()
        self._num_evictable = 0
        self.generation += 1
        self._reset_policy()

    def check_invariants(self) -> None:
        """Recount the books: evictable count, a current pool entry per evictable chunk,
        soft claims, the retention heap's bound."""
        evictable = {e.node.uid for e in self._chunks.values() if e.evictable}
        assert len(evictable) == self._num_evictable, (len(evictable), self._num_evictable)
        assert self._by_uid.keys() == {e.node.uid for e in self._chunks.values()}
        filed = {n.uid for n in self._pool.heap_nodes()}
        assert evictable <= filed, evictable - filed
        assert len(self._expiries) <= 2 * len(self._chunks) + 64, len(self._expiries)
        for key, entry in self._chunks.items():
            assert entry.key == key
            assert entry.claims >= 0 and entry.node.soft_claimed == (entry.claims > 0), key

    # -- internals -------------------------------------------------------------------------
    def _recency(self, rank: int | None, position: int | None) -> int:
        tick = next(self._ticks) if rank is None else rank
        offset = 0 if position is None else min(position, (1 << _POSITION_BITS) - 1)
        return (tick << _POSITION_BITS) - offset

    def _current_key(self, node: Node) -> Key | None:
        entry = self._by_uid.get(node.uid)
        if entry is None or not entry.evictable or entry.node is not node:
            return None
        return self.policy.key(node, self._clock(), self._default_priority)

    def _rank(self, node: Node) -> Key:
        return self.policy.rank(node, self._clock(), self._default_priority)

    def _within_now(self, node: Node) -> float:
        assert self._within is not None
        return float(self._within(node, self._clock()))

    def _set_retention(self, node: Node, now: float, priority: int | None,
                       retention_s: float | None) -> None:
        node.priority = self._default_priority if priority is None else priority
        node.expiry = None if retention_s is None else now + retention_s
        if node.expiry is None:
            return
        heapq.heappush(self._expiries, node.expiry)
        self._bound_expiries(node)

    def _bound_expiries(self, node: Node | None = None) -> None:
        """Rebuild the retention heap from the chunks' expiries (and ``node``'s, which may
        not be filed yet) once it holds more than twice as many entries as chunks.

        NOTE: an entry per release, kept until it ran out (a chunk released again, evicted
        or removed left its old ones): a tier whose requests set a retention held one
        float per chunk release of the last retention period (4 chunks released 10,000
        times: 40,004 entries). Bounded as the evictor's retention heap is."""
        if len(self._expiries) <= 2 * len(self._chunks) + 64:
            return
        live = [e.node.expiry for e in self._chunks.values() if e.node.expiry is not None]
        if node is not None and node.expiry is not None:
            live.append(node.expiry)
        heapq.heapify(live)
        self._expiries = live

    def _refile(self, entry: _Chunk[C]) -> None:
        if not entry.evictable:
            return
        key = self._current_key(entry.node)
        assert key is not None
        self._pool.push(entry.node, key)
        self._pool.compact(self._current_key)

    def _expire(self, now: float) -> None:
        """Re-file chunks whose retention ran out: their keys fall to the default priority,
        which their filed (higher) keys would otherwise hide."""
        if not self._expiries or self._expiries[0] > now:
            return
        while self._expiries and self._expiries[0] <= now:
            heapq.heappop(self._expiries)
        for entry in self._chunks.values():
            expiry = entry.node.expiry
            if expiry is not None and expiry <= now:
                entry.node.expiry = None
                entry.node.priority = self._default_priority
                self._refile(entry)
