"""Eviction: which cached runs may leave a tier, in which order, and when retentions end.

A policy is a key function: of a tier's candidates, the smallest key goes first (a policy
whose order moves with age files runs in per-class queues and ranks the queues' heads at
each pop, see ``EvictionPolicy``). The :class:`Evictor` files every run that may be evicted
now in its tier pool's candidate heap, keeps the heap of retention expiries, and hands out
the next victim, rejoined with the runs a claim split off it and trimmed to size.
``BlockCache`` then moves it (offload or drop). Candidates, so that a prefix never leaves a
tier before its own extensions::

    GPU   an unreferenced GPU run with no GPU child   (host children may hang below it)
    host  an unreferenced host run with no child

Contract: the Evictor changes only candidate heaps, the expiry heap, and the shape of
unreferenced runs (rejoining or cutting them); it never frees a slot.

Every key starts with the run's effective priority (TensorRT-LLM's semantics: lower goes
first; a retention that ran out falls back to the default), so whatever a policy learns only
orders runs of one priority. What a policy may know of a run is on its ``Node``, kept by the
cache: ``last_used`` (release tick), ``last_used_s`` and ``created_s`` (the cache's clock),
``num_accesses`` (admitted claims), ``start_block`` (depth), ``root`` (key space),
``reuse_class`` (how its last release was filed), ``soft_claimed`` (a waiting request will
reuse it), and ``turn`` / ``prompt_end_block`` (the session of the request that stored it).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from functools import partial
from operator import attrgetter
from typing import Protocol, runtime_checkable

from kvtier.config import CacheConfig
from kvtier.pool import Key, TierPool
from kvtier.radix import (
    BlockKey,
    Node,
    Root,
    TrimmedTail,
    absorb_parent,
    cut_tail,
    trim_tail,
)
from kvtier.tier import Tier
from kvtier.witness import LruWitness

_parent = attrgetter("parent")  # a run's parent (None: dropped), read at C speed

# NOTE: the tiers as module globals: a pop checks every queue head's tier, and an enum
# member read off its class costs several times a global's lookup.
_GPU = Tier.GPU
_HOST = Tier.HOST


class _Within(Protocol):
    """A policy's ``within`` (see ``EvictionPolicy``)."""

    def __call__(self, node: Node, now: float) -> float: ...


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
    of the heap, so it may go later than its new key says, never before it is a candidate.
    (Within one eviction round a queue head found live is not checked again until the
    cache changes a run other than the victims it takes: a key that changes by itself in
    the middle of a round counts from the next round.)

    A policy whose order depends on a run's age (a learned value that changes as the run
    waits) sets ``num_queue_fields``: the key's first fields name a queue (a class of runs),
    the rest order the queue (oldest first), and ``rank`` compares the queues' heads now.
    With ``num_queue_fields == 0`` there is one queue and ``rank`` is ``key``.

    Optional: ``rank_version``, any value compared with ``==`` that changes whenever
    ``rank`` may give another answer for an unchanged node at an unchanged ``now`` (a
    learned table refreshed, a verdict flipped). While it and the clock hold, a queue
    head's rank is kept, not computed again at every pop. A policy without it (or with
    ``None``) is ranked afresh at every pop.

    Optional: ``within(node, now) -> float``, for a policy with queues: which run of the
    queue that won goes, its head (oldest) or its youngest, the one ``within`` values less
    (``TierPool``'s ``both_ends``). Without it a queue always gives its head.

    Faults: a key or rank is a tuple of real numbers, none NaN (a key has more fields than
    ``num_queue_fields``), ``within`` a real number, not NaN; a policy reads the node and
    changes nothing of it. A policy that is not one of kvtier's own runs behind a
    :class:`~kvtier.policy_guard.PolicyGuard`: its first call that raises (any
    ``Exception``) or answers otherwise is logged once at ERROR, counted
    (``KVCacheManager.num_policy_faults``), and from then on the cache evicts by priority,
    then least recently released, without calling the policy again; the operation in
    flight completes. ``name``, ``ranks_soft_claims`` (a bool) and ``num_queue_fields`` (an
    int >= 0) are read once, when the cache is built: an unusable one is a ValueError.
    """

    name: str
    # Whether the key ranks soft-claimed runs (the waiting queue's prefixes) higher: only
    # then does the cache soft-claim what the scheduler hints (``KVCacheManager.hint_waiting``).
    ranks_soft_claims: bool
    num_queue_fields: int

    def key(self, node: Node, now: float, default_priority: int) -> Key:
        """The sort key of ``node``; smaller is evicted first. Pure."""
        ...

    def rank(self, node: Node, now: float, default_priority: int) -> Key:
        """How ``node`` compares with runs of other queues now (and with runs of the other
        tier, when the host decides what an offload may displace); smaller goes first."""
        ...


def ghost_key(root: Root, block: int, prev_key: BlockKey, key: BlockKey) -> object:
    """Where a request finds a run again once it was dropped, by content: the key space,
    the run's first block (index and key) and the key of the block before it (``b""`` at
    the start). Content, not the parent's identity: a parent dropped and stored again is
    a new node, and the runs that hung below it must still be found. Pure."""
    return (root.lora_id, root.salt, block, prev_key, key)


def node_ghost_key(node: Node, tokens_per_block: int) -> object:
    """``ghost_key`` of the cached run ``node``. Pure."""
    parent = node.parent
    assert parent is not None and node.root is not None, node
    return ghost_key_below(parent, node.start_block, node.key, tokens_per_block)


def ghost_key_below(parent: Node, block: int, key: BlockKey, tokens_per_block: int) -> object:
    """``ghost_key`` of a run right below ``parent`` (a cached run or a root) that starts
    at ``block`` with a block keyed ``key``. Pure."""
    root = parent.root
    assert root is not None, parent
    if parent.parent is None:
        return (root.lora_id, root.salt, block, b"", key)
    # NOTE: ``block_key`` and ``ghost_key`` written out (the same key: the parent's last
    # block's ids as bytes, paired with its extra key where it has one): a ghost key is
    # made for every run dropped.
    last = len(parent.slots) - 1
    start = last * tokens_per_block
    ids = parent.tokens[start:start + tokens_per_block].tobytes()
    extras = parent.extras
    extra = extras[last] if extras else None
    return (root.lora_id, root.salt, block, ids if extra is None else (ids, extra), key)


# The role of a released run in the releasing request (``ReuseLearner.reuse_class``).
ROLE_SHARED = 0  # part of the prefix a first turn found cached: shared across sessions
ROLE_BODY = 1    # the rest of the prompt: the session's history, its new blocks
ROLE_TAIL = 2    # past the prompt: the output, which a next turn need not repeat


@runtime_checkable
class ReuseLearner(Protocol):
    """A policy that learns from the stream. The cache files each run it releases under
    ``reuse_class`` (stored on the node) and reports how each release ends: claimed again
    (``record``, ``age_s`` after the release, for ``num_blocks`` blocks), or dropped from
    the cache (``forget``, with the place it sat, ``node_ghost_key``).
    A request that later misses exactly at a forgotten place is ``recall``-ed, so the
    learner sees reuses that came after an eviction; the learner decides when a forgotten
    release has ended unreused. A run still cached has an open release.

    A learner may keep a ``witness`` (:class:`kvtier.witness.LruWitness`): the cache then
    tells it of every release and admitted reuse, the learner of every recall, and the
    learner may fall back to LRU's order while the witness says LRU would do better.

    Faults, as ``EvictionPolicy``'s: a learner's call (its witness's included) that raises,
    a ``reuse_class`` that is not an int, or a ``recall`` that is not None or ``(uid,
    blocks >= 1)`` is its policy's fault; from then on the learner is told nothing and
    recalls nothing."""

    witness: LruWitness | None

    def bind(self, config: CacheConfig) -> None:
        """Learn the cache's shape (called once, before any other call)."""
        ...

    def reuse_class(self, node: Node, turn: int, role: int) -> int:
        """The class of ``node`` as a request at ``turn`` of its session releases it, in
        ``role`` (``ROLE_*``)."""
        ...

    def record(self, reuse_class: int, age_s: float, num_blocks: int, reused: bool) -> None:
        """A release of ``num_blocks`` blocks filed under ``reuse_class`` ended, reused or
        not, ``age_s`` after it began."""
        ...

    def forget(self, ghost_key: object, node_uid: int, reuse_class: int, released_s: float,
               num_blocks: int, now: float, released_tick: int = 0) -> None:
        """The run ``node_uid``, released at ``released_s`` (tick ``released_tick``; 0 when
        not known), was dropped at ``now``; it sat at ``ghost_key``."""
        ...

    def recall(self, ghost_key: object, now: float) -> tuple[int, int] | None:
        """A request missed at ``ghost_key`` at ``now``. If a forgotten run sat there:
        ``(its uid, its blocks)``, so the caller can look for the run's own extensions
        (at the block after it); else None."""
        ...


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
        self._soft_claimed: dict[Node, None] = {}  # every run soft-claimed now, in order
        self._soft_deepest: list[Node] = []  # the paths' ends at the last soft_claim
        # Whether a claimed run was cut since: its tail (unclaimed, see ``radix.cut_tail``)
        # may lie on a claimed path, which the next soft_claim claims again.
        self._soft_cut = False
        self._held_now: float | None = None  # the clock's time, held for one eviction round
        # Which end of the winning queue goes (``EvictionPolicy.within``), if the policy says.
        within: _Within | None = getattr(policy, "within", None)
        self._policy_within = within
        self._within = self._within_now if within is not None else None
        # NOTE: the policy's key and rank, bound once: a pop checks every queue's head by
        # its key, and a round takes tens of victims (each lookup of a bound method and
        # each extra call is a measurable part of a step's eviction).
        self._key = policy.key
        self._rank = policy.rank
        self._gpu_key = self.gpu_candidate_key  # a pop's liveness check, bound once
        self._host_key = self.host_candidate_key
        self._versioned = hasattr(policy, "rank_version")
        # The ranks the pop in progress computed, by node (``_rank_run``): the victim's
        # is its rank now, so ``take_victim``'s ``below`` needs no second call. Emptied at
        # each ``take_victim``.
        self._ranked_now: dict[Node, Key] = {}
        # The victim ``take_victim`` last returned, whole, and its rank then, while nothing
        # has changed it (``victim_rank``); None: none kept.
        self._victim_rank: tuple[Node, Key] | None = None
        # Counts the changes that may touch a candidate other than the one a pop takes
        # (``changed``); with the round's held time, the pools' ``check_version``: a queue
        # head found live stays so while it holds.
        self._num_changes = 0
        # The policy's ``within`` with the held time bound in, and that time (a pop of the
        # same round reuses it: one object a round, not one a pop).
        self._within_held: tuple[float, Callable[[Node], float]] | None = None
        # ``take_victim``'s bound while its pop asks ``_is_below``, and the rank that found.
        self._below: Key = ()
        self._below_rank: Key = ()

    def now(self) -> float:
        """The clock's time now (the held time during an eviction round). Pure."""
        held = self._held_now
        return self._clock() if held is None else held

    def eviction_round(self) -> _Round:
        """An eviction round, a context manager: within it ``now`` is the time at its
        start, so the round ranks its candidates at one instant and a queue head's rank
        stays valid across its pops (a round inside a round keeps the outer one's time);
        retentions that ran out by then are re-filed first (``expire``)."""
        return _Round(self)

    def changed(self) -> None:
        """A cached run other than the victim just taken may have changed what a policy
        reads of it, or stopped being a candidate (dropped below a victim, rejoined): the
        pools check every queue head again at their next pop. (A victim's cut moves its
        children to the tail, which changes no field a policy reads.)"""
        self._num_changes += 1

    def priority(self, node: Node) -> int:
        """``node``'s priority now. Pure."""
        held = self._held_now
        return effective_priority(node, self._clock() if held is None else held,
                                  self._default_priority)

    def key(self, node: Node) -> Key:
        """``node``'s eviction key now. Pure."""
        held = self._held_now
        return self._key(node, self._clock() if held is None else held,
                         self._default_priority)

    def rank(self, node: Node) -> Key:
        """How ``node`` compares with any other candidate now. Pure."""
        held = self._held_now
        return self._rank(node, self._clock() if held is None else held,
                          self._default_priority)

    def _within_now(self, node: Node) -> float:
        """The policy's ``within`` of ``node`` now. Pure."""
        within = self._policy_within
        assert within is not None
        held = self._held_now
        return within(node, self._clock() if held is None else held)

    def _rank_run(self, node: Node) -> Key:
        """``rank`` of the run ``node`` is in all but name: a candidate is first rejoined
        with parents a rolled-back claim split off (as ``take_victim`` does with the one it
        takes), so a split leaves no trace in the order (a rank may read the run's depth)."""
        parent = node.parent
        # NOTE: ``_merge_up``'s first test here, no call: most candidates' parents are a
        # root or have other children.
        if (parent is not None and parent.parent is not None and len(parent.children) == 1
                and _merge_up(node)):
            self._num_changes += 1
        held = self._held_now
        rank = self._rank(node, self._clock() if held is None else held,
                          self._default_priority)
        self._ranked_now[node] = rank
        return rank

    def victim_rank(self, victim: Node) -> Key:
        """``rank(victim)`` for the run ``take_victim`` just returned, unchanged since: the
        rank its pop computed where it kept it. Pure."""
        kept = self._victim_rank
        self._victim_rank = None
        if kept is not None and kept[0] is victim:
            return kept[1]
        return self.rank(victim)

    def gpu_candidate_key(self, node: Node) -> Key | None:
        """``node``'s key if it is a GPU eviction candidate now, else None. Pure."""
        if (node.tier is not _GPU or node.ref_count or node.num_gpu_children
                or node.parent is None):
            return None
        held = self._held_now
        return self._key(node, self._clock() if held is None else held,
                         self._default_priority)

    def host_candidate_key(self, node: Node) -> Key | None:
        """``node``'s key if it is a host eviction candidate now, else None. Pure."""
        if node.tier is not _HOST or node.ref_count or node.children or node.parent is None:
            return None
        held = self._held_now
        return self._key(node, self._clock() if held is None else held,
                         self._default_priority)

    def refile(self, node: Node, now: float | None = None) -> None:
        """File ``node`` as a candidate of its tier if it is one now (keyed at ``now``, a
        reading of this evictor's ``now()`` the caller holds; None: read it here)."""
        # NOTE: ``gpu_candidate_key`` / ``host_candidate_key`` written out (the same
        # tests): a release refiles every run of its path, an eviction two runs a victim.
        if node.ref_count or node.parent is None:
            return
        if node.tier is _GPU:
            if node.num_gpu_children:
                return
            pool = self._gpu
        elif node.children:
            return
        else:
            pool = self._host
        if now is None:
            held = self._held_now
            now = self._clock() if held is None else held
        if pool.push(node, self._key(node, now, self._default_priority)):
            pool.compact(self._gpu_key if pool is self._gpu else self._host_key)

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

    def cleared(self) -> None:
        """The cache dropped every run: forget every candidate, expiry and soft claim
        (stale, they kept the dropped runs, with their token ids, alive)."""
        self._expiries = []
        self._num_live_expiries = 0
        self._soft_claimed = {}
        self._soft_deepest = []
        self._soft_cut = False
        self._ranked_now = {}
        self._victim_rank = None
        self._gpu.forget_candidates()
        self._host.forget_candidates()

    def expire(self) -> None:
        """Re-file nodes whose retention ran out, so they sort by the default priority."""
        now = self.now()
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            expiry, _, node = heapq.heappop(expiries)
            if node.expiry == expiry and node.parent is not None and not node.ref_count:
                self.refile(node)

    def soft_claim(self, deepest: list[Node]) -> None:
        """Soft-claim the paths ending at ``deepest`` (the waiting queue's cached prefixes),
        releasing the last call's; only runs whose flag changes are re-filed, so a queue
        that moves by a request costs a walk of the paths, not a re-file of every run."""
        if (not self._soft_cut and deepest == self._soft_deepest
                and None not in map(_parent, deepest)):
            # The same runs as last time, all still cached, none cut: the claimed paths
            # are the same (a split's head is claimed through ``split_off``, a rejoined run
            # keeps its flag, and a dropped run takes the deepest below it along).
            return
        self._soft_deepest = list(deepest)
        self._soft_cut = False
        # In walk order (a dict, not a set: a set of nodes iterates by address, and the
        # order runs are re-filed in is their queue's filing order, which a policy reads:
        # decisions must not hang on where the allocator put the nodes).
        claimed: dict[Node, None] = {}
        for last in deepest:
            node = last
            while node.parent is not None and node not in claimed:
                claimed[node] = None
                node = node.parent
        for node in self._soft_claimed:
            if node.soft_claimed and node not in claimed:
                node.soft_claimed = False
                self.refile(node)
        for node in claimed:
            if not node.soft_claimed:
                node.soft_claimed = True
                self.refile(node)
        self._soft_claimed = claimed

    def soft_claimed_runs(self) -> list[Node]:
        """Every run the last ``soft_claim`` claimed (and heads split off them since), as
        tracked for release: dropped ones included. For invariant checks. Pure."""
        return list(self._soft_claimed)

    def soft_claim_ends(self) -> tuple[list[Node], bool]:
        """The runs the last ``soft_claim`` claimed the paths of, and whether a claimed run
        was cut since (its tail, unclaimed, may lie on a claimed path). Pure."""
        return list(self._soft_deepest), self._soft_cut

    def split_off(self, head: Node) -> None:
        """``head`` was split off a run: it keeps the run's soft claim, released with the
        others; and its retention, tracked on its own."""
        if head.soft_claimed:
            self._soft_claimed[head] = None
        self.track_retention(head)

    def cut_tail(self, node: Node, num_tail_blocks: int) -> Node:
        """Cut the last blocks of the unreferenced ``node`` into a new child; return it."""
        if node.soft_claimed:
            self._soft_cut = True
        tail = cut_tail(node, num_tail_blocks, self._tpb)
        self.track_retention(tail)
        return tail

    def trim_tail(self, node: Node, num_tail_blocks: int) -> TrimmedTail:
        """``cut_tail`` for a tail dropped at once, of a leaf: the blocks leave ``node`` in
        place, with no node of their own (``radix.trim_tail``); no retention to track."""
        if node.soft_claimed:
            self._soft_cut = True
        return trim_tail(node, num_tail_blocks, self._tpb)

    def take_victim(self, tier: Tier, max_blocks: int, below: Key | None = None,
                    cut: bool = True) -> Node | None:
        """The next run to evict from ``tier``: the best candidate, rejoined with parents
        that are the same run in all but name, cut to its last ``max_blocks`` blocks (the
        rest stays, filed again once the victim is gone; with ``cut`` False the run comes
        whole, for a caller that drops its last ``max_blocks`` itself: ``trim_tail``).
        ``None`` when there is no candidate, or (with ``below``) when the best one's key is
        not below it."""
        pool, current_key = ((self._gpu, self._gpu_key) if tier is _GPU
                             else (self._host, self._host_key))
        ranked: object = None  # the rank version a queue head's kept rank holds under
        if self._versioned:
            version = self.policy.rank_version  # type: ignore[attr-defined]
            if version is not None:
                held = self._held_now
                ranked = (self._clock() if held is None else held, version)
        fresh = self._ranked_now
        fresh.clear()
        self._victim_rank = None
        # NOTE: heads found live are not checked again within a round while no change
        # (``changed``) may have touched them; outside a round ``now`` moves: no memo.
        held = self._held_now
        checks = self._num_changes if held is not None else None
        within: Callable[[Node], float] | None = self._within
        policy_within = self._policy_within
        if policy_within is not None and held is not None:
            # NOTE: the round's time bound into the policy's ``within(node, now)`` (its
            # documented parameter name; a caller's policy sits behind the guard's), no
            # Python call of our own between the pool and the policy.
            bound = self._within_held
            if bound is None or bound[0] != held:
                bound = self._within_held = (held, partial(policy_within, now=held))
            within = bound[1]
        if below is not None:
            # NOTE: the bound is judged before the run leaves the pool (``accept``): a run
            # not below it stays, as its pop and push back left it, without them (the host
            # room of a GPU victim finds none worth less about twice a full step).
            self._below = below
            node = pool.pop_candidate(current_key, self._rank_run, ranked, within, checks,
                                      self._is_below)
            fresh.clear()
            if node is None:
                return None
            rank: Key | None = self._below_rank
        else:
            node = pool.pop_candidate(current_key, self._rank_run, ranked, within, checks)
            if node is None:
                return None
            rank = self._rejoined_rank(node)
            fresh.clear()
        if not cut or max_blocks >= len(node.slots):
            if rank is not None:
                self._victim_rank = (node, rank)
            return node
        return self.cut_tail(node, max_blocks)

    def _rejoined_rank(self, node: Node) -> Key | None:
        """The rank the pop in progress computed for ``node``, None where it computed none
        (then ``node`` is rejoined here with its parents, as ``_rank_run`` does)."""
        # NOTE: a run the pop ranked was rejoined first (``_rank_run``) and is unchanged
        # since: its rank is its rank now, no second call to the policy for the same
        # answer, and no second look at its parents. A run taken from the young end was
        # not ranked: it is rejoined here.
        rank = self._ranked_now.get(node)
        if rank is None:
            parent = node.parent  # NOTE: ``_merge_up``'s first test, no call (as ``_rank_run``)
            if (parent is not None and parent.parent is not None
                    and len(parent.children) == 1 and _merge_up(node)):
                self._num_changes += 1
        return rank

    def _is_below(self, node: Node) -> bool:
        """Whether ``node``, the run a pop chose, ranks below ``take_victim``'s bound (its
        rank kept in ``_below_rank``)."""
        rank = self._rejoined_rank(node)
        if rank is None:
            rank = self.rank(node)
        self._below_rank = rank
        return not rank >= self._below


class _Round:
    """``Evictor.eviction_round``'s context. NOTE: a class, not a ``contextmanager``
    generator: a round opens at every allocation that evicts, and the generator's
    machinery (its frame, the helper object, ``__exit__``'s ``next``) was ~4 % of the
    slowest steps by sampling."""

    __slots__ = ("_evictor", "_outer")

    def __init__(self, evictor: Evictor) -> None:
        self._evictor = evictor
        self._outer = False

    def __enter__(self) -> None:
        evictor = self._evictor
        outer = self._outer = evictor._held_now is not None
        if not outer:
            evictor._held_now = evictor._clock()
        evictor._num_changes += 1
        try:
            evictor.expire()
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        evictor = self._evictor
        evictor._num_changes += 1
        if not self._outer:
            evictor._held_now = None


def _merge_up(node: Node) -> bool:
    """Rejoin ``node`` with parents that are the same run in all but name (left split by a
    claim that was rolled back or released), so eviction sees runs as if never split.
    Returns whether it rejoined any."""
    merged = False
    while True:
        head = node.parent
        if (head is None or head.parent is None or len(head.children) != 1
                or head.tier is not node.tier or head.ref_count != node.ref_count
                or head.priority != node.priority or head.expiry != node.expiry
                or head.last_used != node.last_used or head.soft_claimed != node.soft_claimed
                or head.reuse_class != node.reuse_class or head.turn != node.turn
                or head.prompt_end_block != node.prompt_end_block):
            return merged
        absorb_parent(node)
        merged = True
