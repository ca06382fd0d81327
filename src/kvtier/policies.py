"""Eviction policies: key functions over what an online cache may know of a run.

The candidate with the smallest key (``rank``, across queues) is evicted first; every key
but the bare ``lru`` baseline's starts with the run's effective priority (TensorRT-LLM's
semantics: lower goes first, a retention's priority holds until it expires), so priorities
and retention override anything a policy learns.

    priority-lru         priority, then least recently released (the peers' policy)
    lru                  least recently released; priorities ignored
    arc                  ARC over runs: runs reused once vs more, an adaptive split,
                         ghosts of dropped runs (Megiddo & Modha, FAST '03)
    s3fifo               S3-FIFO over runs: a small FIFO for new runs, a main queue for
                         reused ones, ghosts send returning runs to main (SOSP '23)
    kvtier-predict       priority, soft queue claims, then hit density learned online per
                         class of run (session turn x role), by LRU while its witness
                         says LRU does better; see ``KvtierPredict``
    kvtier-predict-cost  the same, value weighed by recompute cost growing with depth
                         (the default, by measurement: docs/policy-lab.md)

ARC and S3-FIFO are the known baselines, adapted to runs (a run of blocks is one entry,
its size counts in blocks) and to kvtier's two tiers (one count over both: a run offloaded
to the host keeps its class). Each policy object serves one cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from itertools import accumulate
from operator import add
from struct import Struct

from kvtier.config import EVICTION_POLICIES, CacheConfig
from kvtier.eviction import (
    ROLE_BODY,
    ROLE_SHARED,
    ROLE_TAIL,
    EvictionPolicy,
    effective_priority,
    node_ghost_key,
)
from kvtier.pool import Key
from kvtier.radix import Node
from kvtier.reprs import shown
from kvtier.witness import LruWitness


class PriorityLRU:
    """Lowest priority first, then least recently released.

    A block's priority holds until its retention expires, then falls back to the default.
    Releasing a request touches its blocks tail first, so within one priority a prefix is
    always more recent than its own extensions and outlives them.
    """

    name = "priority-lru"
    ranks_soft_claims = False
    num_queue_fields = 0

    def key(self, node: Node, now: float, default_priority: int) -> Key:
        return (effective_priority(node, now, default_priority), node.last_used)

    rank = key


class LRU:
    """Least recently released first; priorities ignored."""

    name = "lru"
    ranks_soft_claims = False
    num_queue_fields = 0

    def key(self, node: Node, now: float, default_priority: int) -> Key:
        return (0, node.last_used)

    rank = key


# A dropped run: (reuse class, release time, blocks, its uid, its release tick).
GhostEntry = tuple[int, float, int, int, int]


# A ghost entry as the ``Ghosts`` table keeps it: packed, so the table holds no object the
# garbage collector tracks (a tuple a dropped run, up to 2**18 of them, made every
# collection walk them and set off more of them: ~8 % of the manager's time on the whole
# Mooncake trace under the default policy).
_GHOST = Struct("<qdqqq")
_pack_ghost, _unpack_ghost = _GHOST.pack, _GHOST.unpack


class Ghosts:
    """Runs dropped lately, by where they sat (``kvtier.eviction.ghost_key``: by content),
    bounded in blocks: what lets a policy see that a request came back for a run it
    evicted. An entry maps ``hash(ghost_key)`` to a ``GhostEntry`` (kept packed). The
    blocks held are counted in all and, with ``count_classes``, per reuse class
    (``class_blocks``), kept on every change."""

    def __init__(self, max_blocks: int = 1 << 20, max_entries: int = 1 << 18,
                 count_classes: bool = True) -> None:
        self.max_blocks = max_blocks
        self.max_entries = max_entries
        self.num_blocks = 0
        self.count_classes = count_classes
        self.class_blocks: dict[int, int] = {}
        self._entries: OrderedDict[int, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def live_view(self) -> Mapping[int, bytes]:
        """The table itself, read-only to the caller, as it changes: what a hot path
        tests for emptiness (``not view``) with no call per test. Pure."""
        return self._entries

    def values(self) -> list[GhostEntry]:
        """Every entry, oldest first. Pure; O(entries)."""
        return [_GHOST.unpack(v) for v in self._entries.values()]

    def _count(self, reuse_class: int, num_blocks: int) -> None:
        self.num_blocks += num_blocks
        if self.count_classes:
            class_blocks = self.class_blocks
            class_blocks[reuse_class] = class_blocks.get(reuse_class, 0) + num_blocks

    def add(self, ghost_key: object, entry: GhostEntry) -> None:
        self._put(ghost_key, *entry)

    def _put(self, ghost_key: object, reuse_class: int, released_s: float, num_blocks: int,
             uid: int, released_tick: int) -> None:
        """File the entry under ``ghost_key``, replacing one already there."""
        h = hash(ghost_key)
        entries = self._entries
        old = entries.pop(h, None)
        if old is not None:
            cls, _, n, _, _ = _unpack_ghost(old)
            self._count(cls, -n)
        entries[h] = _pack_ghost(reuse_class, released_s, num_blocks, uid, released_tick)
        # NOTE: ``_count`` written out (the same sums): a put comes with every drop.
        self.num_blocks += num_blocks
        if self.count_classes:
            class_blocks = self.class_blocks
            class_blocks[reuse_class] = class_blocks.get(reuse_class, 0) + num_blocks

    def pop(self, ghost_key: object) -> GhostEntry | None:
        packed = self._entries.pop(hash(ghost_key), None)
        if packed is None:
            return None
        entry: GhostEntry = _unpack_ghost(packed)
        self._count(entry[0], -entry[2])
        return entry

    def add_trim(self, ghost_key: object, reuse_class: int, released_s: float,
                 num_blocks: int, uid: int, released_tick: int) -> Sequence[GhostEntry]:
        """``add`` of the entry ``(reuse_class, released_s, num_blocks, uid,
        released_tick)``, then ``trim``: what a drop does, with no entry tuple built and the
        trim called only past a bound (a drop is the commonest eviction step)."""
        self._put(ghost_key, reuse_class, released_s, num_blocks, uid, released_tick)
        if self.num_blocks > self.max_blocks or len(self._entries) > self.max_entries:
            return self.trim()
        return _NO_GHOSTS

    def trim(self) -> list[GhostEntry]:
        """Forget the oldest entries past the bounds; return them."""
        out = []
        entries = self._entries
        while entries and (self.num_blocks > self.max_blocks
                           or len(entries) > self.max_entries):
            entry: GhostEntry = _unpack_ghost(entries.popitem(last=False)[1])
            self._count(entry[0], -entry[2])
            out.append(entry)
        return out


_NO_GHOSTS: tuple[GhostEntry, ...] = ()  # what ``add_trim`` trims while under the bounds


def check_unbound(policy: _ClassCounts | KvtierPredict) -> None:
    """ValueError, changing nothing, where ``policy`` serves a cache already; else mark it
    as serving one (``bind`` is called once, by the cache it serves).

    NOTE: a learner handed to a second manager was bound again: its ghost bounds and LRU
    witness resized to the second cache, both caches' releases and recalls learned as one
    stream (each evicting by the other's reuse), and the first manager changed under it,
    without a word, where the module says each policy object serves one cache."""
    if policy.bound:
        name = getattr(policy, "name", type(policy).__name__)
        raise ValueError(f"this {name} policy object serves a cache already (its "
                         "learned reuse, ghosts and witness are that cache's): a policy "
                         "object serves one cache; pass a new one (kvtier.policies.get_policy)")
    policy.bound = True


class _ClassCounts:
    """Cached blocks per reuse class, kept from the learner's hooks (a release files
    blocks under a class; its end, reuse or drop, takes them out), plus ghosts."""

    num_classes = 2
    witness = None

    def __init__(self) -> None:
        self.tokens_per_block = 1
        self.cached = [0] * self.num_classes
        self.ghosts = Ghosts()
        self.bound = False

    def bind(self, config: CacheConfig) -> None:
        check_unbound(self)
        capacity = config.num_gpu_blocks + config.num_host_blocks
        self.ghosts.max_blocks = max(1, capacity)
        self.tokens_per_block = config.tokens_per_block

    def _file(self, cls: int, num_blocks: int) -> int:
        self.cached[cls] += num_blocks
        return cls

    def record(self, reuse_class: int, age_s: float, num_blocks: int, reused: bool) -> None:
        self.cached[reuse_class] = max(0, self.cached[reuse_class] - num_blocks)

    def forget(self, ghost_key: object, node_uid: int, reuse_class: int, released_s: float,
               num_blocks: int, now: float, released_tick: int = 0) -> None:
        self.record(reuse_class, now - released_s, num_blocks, False)
        self.ghosts.add(ghost_key, (reuse_class, released_s, num_blocks, node_uid,
                                    released_tick))
        self.ghosts.trim()

    def first_class(self) -> int:
        """The class whose queue the victim comes from now."""
        raise NotImplementedError

    @property
    def rank_version(self) -> int:
        """What ``rank`` reads besides the node and ``now``: the class that goes first."""
        return self.first_class()

    def rank(self, node: Node, now: float, default_priority: int) -> Key:
        """Runs of ``first_class`` first, least recently released first in each."""
        cls = node.reuse_class if node.reuse_class is not None else 0
        return (effective_priority(node, now, default_priority), int(cls != self.first_class()),
                node.last_used)


class ARC(_ClassCounts):
    """ARC over runs. Class 0 (T1): runs claimed once (stored, never reused); class 1
    (T2): runs reused. Each is an LRU queue; the victim comes from T1 while T1 holds more
    than the target ``p`` blocks, else from T2. A request that misses where a dropped T1
    run sat raises ``p`` (recency was cut short), one that misses where a T2 run sat
    lowers it; each by the run's blocks, scaled by the ghosts' size ratio as in ARC."""

    name = "arc"
    ranks_soft_claims = False
    num_queue_fields = 2

    def __init__(self) -> None:
        super().__init__()
        self.target = 0.0

    def reuse_class(self, node: Node, turn: int, role: int) -> int:
        return self._file(int(node.num_accesses > 1), node.num_blocks)

    def key(self, node: Node, now: float, default_priority: int) -> Key:
        cls = node.reuse_class if node.reuse_class is not None else 0
        return (effective_priority(node, now, default_priority), cls, node.last_used)

    def first_class(self) -> int:
        t1, t2 = self.cached
        return 0 if t1 > self.target or not t2 else 1

    def recall(self, ghost_key: object, now: float) -> tuple[int, int] | None:
        entry = self.ghosts.pop(ghost_key)
        if entry is None:
            return None
        cls, _, n, uid, _ = entry
        ghost_blocks = self.ghosts.class_blocks
        b1, b2 = max(1, ghost_blocks.get(0, 0)), max(1, ghost_blocks.get(1, 0))
        total = sum(self.cached) + n
        if cls == 0:
            self.target = min(float(total), self.target + n * max(1.0, b2 / b1))
        else:
            self.target = max(0.0, self.target - n * max(1.0, b1 / b2))
        return uid, n


class S3FIFO(_ClassCounts):
    """S3-FIFO over runs. Class 0 (small, S): runs stored and released without a reuse,
    first in first out; class 1 (main, M): runs reused, or stored again right where a
    dropped run sat (a ghost hit), least recently released first (M's FIFO with
    reinsertion of reused entries behaves as CLOCK, close to LRU). The victim comes from
    S while S holds at least a tenth of the cached blocks, else from M."""

    name = "s3fifo"
    ranks_soft_claims = False
    num_queue_fields = 2
    SMALL_FRACTION = 0.1

    def __init__(self) -> None:
        super().__init__()
        self._returning: set[int] = set()  # ghost keys hit lately: their new runs go to M

    def reuse_class(self, node: Node, turn: int, role: int) -> int:
        cls = int(node.num_accesses > 1)
        if not cls and self._returning and node.parent is not None:
            h = hash(node_ghost_key(node, self.tokens_per_block))
            if h in self._returning:
                self._returning.discard(h)
                cls = 1
        return self._file(cls, node.num_blocks)

    def key(self, node: Node, now: float, default_priority: int) -> Key:
        cls = node.reuse_class if node.reuse_class is not None else 0
        order = node.created_s if cls == 0 else node.last_used
        return (effective_priority(node, now, default_priority), cls, order, node.last_used)

    def first_class(self) -> int:
        small, main = self.cached
        return 0 if small >= self.SMALL_FRACTION * (small + main) or not main else 1

    def recall(self, ghost_key: object, now: float) -> tuple[int, int] | None:
        entry = self.ghosts.pop(ghost_key)
        if entry is None:
            return None
        if len(self._returning) > self.ghosts.max_entries:
            self._returning.clear()
        self._returning.add(hash(ghost_key))
        return entry[3], entry[2]


# Ages in log2 bins: [0, 1), [1, 2), [2, 4), ... [2**16, inf) seconds.
NUM_AGE_BINS = 18
# Session turn -> bucket: 1, 2, 3, 4, 5-7, 8+.
_TURN_BUCKETS = (0, 1, 2, 3, 4, 4, 4, 5)
NUM_TURN_BUCKETS = 6
# The near term of ``HitDensity.near``: this many times the mean age of a run at its drop.
NEAR_TERM_DROP_AGES = 4.0
DROP_AGE_WEIGHT = 0.01  # of each drop in that mean


# Where the open last age bin starts: an age at or past it is in the last bin.
_LAST_BIN_S = float(2 ** (NUM_AGE_BINS - 2))


def age_bin(age_s: float) -> int:
    """The log2 bin of an age in seconds. (Written out where a call per run counts:
    ``HitDensity.record``, ``KvtierPredict.rank`` and ``within``; the same expression.)"""
    return (NUM_AGE_BINS - 1 if age_s >= _LAST_BIN_S else int(age_s).bit_length()) \
        if age_s > 0 else 0


def _bin_widths() -> list[float]:
    widths = [1.0] + [float(2 ** (b - 1)) for b in range(1, NUM_AGE_BINS)]
    widths[-1] = 3.0 * 2 ** (NUM_AGE_BINS - 2)  # the open last bin counts as [lo, 4 lo)
    return widths


# Where each age bin starts, in seconds.
_BIN_LOWS = [0.0] + [float(2 ** (b - 1)) for b in range(1, NUM_AGE_BINS)]


class HitDensity:
    """Online hit density per class of run and age (LHD, Beckmann et al., NSDI '18).

    Per class, the hazard of the next reuse as a function of the time since the release,
    Kaplan-Meier style, in blocks: a reuse at age ``a`` is an event in ``a``'s bin; a
    release that ends unreused (its ghost forgotten, or dropped with no place to find it
    again) is censored at its age. Hazards are shrunk toward the pooled hazard
    (``prior_blocks`` pseudo-observations). A run of age ``a`` is worth its *hit density*:
    the chance it is reused at all from ``a`` on, over the expected block-seconds it waits
    for that (the whole learned future: no horizon), in ``value``; and the same over the
    *near term* only, the next ``horizon_s`` seconds, in ``near``: a few times the age at
    which the cache drops runs now (``dropped``), as LHD bounds a lifetime by eviction.
    ``value`` ranks classes against each other (whether a run comes back at all);
    ``near`` picks within a class, where runs differ only by age (how soon it comes back
    before the cache would drop it anyway). Every ``refresh_every`` records both tables are
    recomputed, O(classes x bins); counts halve past ``decay_blocks`` so the learner
    follows a changing stream. Until the first refresh every value is equal: the order is
    LRU's within a class, and between the classes' queue heads LRU's too unless the policy
    weighs values by depth (``KvtierPredict(cost_aware=True)``, the default), which then
    ranks the shallowest head first whatever its age (measured both ways in
    docs/policy-lab.md, thirtieth session: keeping LRU's order there loses more than it wins).
    """

    def __init__(self, num_classes: int, refresh_every: int = 256, prior_blocks: float = 8.0,
                 decay_blocks: float = float(1 << 22)) -> None:
        self.num_classes = num_classes
        self.refresh_every = refresh_every
        self.prior_blocks = prior_blocks
        self.decay_blocks = decay_blocks
        self.events = [[0.0] * NUM_AGE_BINS for _ in range(num_classes)]
        self.censored = [[0.0] * NUM_AGE_BINS for _ in range(num_classes)]
        self.value = [[1.0] * NUM_AGE_BINS for _ in range(num_classes)]
        self.near = [[1.0] * NUM_AGE_BINS for _ in range(num_classes)]
        self.drop_age_s: float | None = None  # a moving mean of the age at a drop
        self.horizon_s = float("inf")  # the near term: NEAR_TERM_DROP_AGES x drop_age_s
        self.num_records = 0
        self._to_refresh = refresh_every  # records until the next refresh
        self.num_refreshes = 0  # the value table's version (``KvtierPredict.rank_version``)
        self._total = 0.0

    def record(self, reuse_class: int, age_s: float, num_blocks: int, reused: bool) -> None:
        """Count one ended release."""
        # NOTE: ``age_bin`` written out: a record comes with every reused run and every
        # ghost forgotten, and a call is a measurable part of the policy's cost per block.
        table = self.events if reused else self.censored
        table[reuse_class][
            (NUM_AGE_BINS - 1 if age_s >= _LAST_BIN_S else int(age_s).bit_length())
            if age_s > 0 else 0] += num_blocks
        self._total += num_blocks
        self.num_records += 1
        self._to_refresh -= 1
        if not self._to_refresh:
            self._to_refresh = self.refresh_every
            self.refresh()

    def dropped(self, age_s: float) -> None:
        """A run was dropped ``age_s`` after its release: the near term follows the age
        at which the cache drops runs (a moving mean over the last ~100 drops)."""
        mean = self.drop_age_s
        mean = age_s if mean is None else mean + DROP_AGE_WEIGHT * (age_s - mean)
        self.drop_age_s = mean
        self.horizon_s = max(1.0, NEAR_TERM_DROP_AGES * mean)

    def refresh(self) -> None:
        """Recompute the value table from the histograms."""
        self.num_refreshes += 1
        if self._total > self.decay_blocks:
            for table in (self.events, self.censored):
                for row in table:
                    row[:] = [x / 2 for x in row]
            self._total /= 2
        nb = NUM_AGE_BINS
        # NOTE: the same sums and products in the same order as bin-by-bin loops (the
        # tables must come out bit for bit the same: they order evictions), with the
        # per-bin work that no class changes done once: the bins each near-term window
        # ends in, and the column sums of the pooled hazard.
        at_risk = [list(accumulate(map(add, reversed(ev), reversed(ce))))[::-1]
                   for ev, ce in zip(self.events, self.censored, strict=True)]
        pooled = [e / r if r else 0.0
                  for e, r in zip(map(sum, zip(*self.events, strict=True)),
                                  map(sum, zip(*at_risk, strict=True)), strict=True)]
        w = self.prior_blocks
        widths = _bin_widths()
        windows = _near_windows(widths, self.horizon_s)
        # NOTE: each product or difference that the loops took more than once (``w * p``
        # per bin of every class; ``1 - p`` and ``1 - p / 2`` per bin, in the value's and
        # the near term's loops) is taken once, the same operands: the same floats. A
        # refresh sits in the step it falls in, and its time in that step's tail.
        prior = [w * p for p in pooled]
        backwards = list(zip(reversed(widths), range(nb - 1, -1, -1), strict=True))
        # A class with nothing counted (no release of it yet: a stream without outputs
        # never files a tail) has the same tables as any other such class: computed once.
        unseen: int | None = None
        for c in range(self.num_classes):
            if not any(at_risk[c]):
                if unseen is not None:
                    self.value[c][:] = self.value[unseen]
                    self.near[c][:] = self.near[unseen]
                    continue
                unseen = c
            hazard = [(h if (h := (e + x) / denom) < 1.0 else 1.0) if (denom := r + w) else 0.0
                      for e, x, r in zip(self.events[c], prior, at_risk[c], strict=True)]
            missed = [1.0 - p for p in hazard]  # no reuse in the bin
            halves = [1.0 - p / 2 for p in hazard]  # of the bin waited
            value = self.value[c]
            hits = waited = 0.0
            for width, b in backwards:
                p = hazard[b]
                q = missed[b]
                hits = p + q * hits
                waited = width * halves[b] + q * waited
                value[b] = hits / waited
            _near_densities(hazard, widths, windows, self.near[c], missed, halves)


def _near_windows(widths: list[float], horizon_s: float) -> list[tuple[int, float]]:
    """Per age bin ``b``: the bin a window of ``horizon_s`` seconds from ``b``'s start
    ends in, and the part of that bin it covers (the last bin is open). Pure."""
    lows = _BIN_LOWS
    last = len(widths) - 1
    out = []
    for b in range(len(widths)):
        end = lows[b] + horizon_s
        if end >= lows[last]:
            out.append((last, 1.0))
        else:
            e = max(b, int(end).bit_length())
            out.append((e, (end - lows[e]) / widths[e]))
    return out


def _near_densities(hazard: list[float], widths: list[float],
                    windows: list[tuple[int, float]], out: list[float],
                    missed: list[float] | None = None, halves: list[float] | None = None,
                    ) -> None:
    """``out[b]``: the hit density from the start of age bin ``b`` over the next
    ``horizon_s`` seconds (``windows``: where each bin's window ends, ``_near_windows``),
    given each bin's ``hazard`` of a reuse: the chance of a reuse in the window over the
    expected block-seconds waited in it (a reuse waits half its bin). O(bins): the
    chance of no reuse before bin ``x`` (``alive``) and the wait up to it (``wait``) are
    running products and sums, a window's the ratio and difference of its ends'.
    ``missed`` and ``halves``: ``1 - p`` and ``1 - p / 2`` of each bin's hazard, where the
    caller has them."""
    if missed is None or halves is None:
        missed = [1.0 - p for p in hazard]
        halves = [1.0 - p / 2 for p in hazard]
    alive, wait = [1.0], [0.0]
    a = 1.0
    s = 0.0
    for width, half, q in zip(widths, halves, missed, strict=True):
        s += a * width * half
        a *= q
        alive.append(a)
        wait.append(s)
    for b, (e, part) in enumerate(windows):
        start = alive[b]
        if start <= 0.0:
            out[b] = 2.0 * hazard[b] / widths[b]  # a reuse certain in this bin
            continue
        p = hazard[e] * part
        rest = alive[e] / start
        hits = 1.0 - rest + rest * p
        waited = (wait[e] - wait[b]) / start + rest * widths[e] * part * (1.0 - p / 2)
        out[b] = hits / waited if waited else 0.0


class KvtierPredict:
    """kvtier's own policy: priority, then soft queue claims, then the hit density of the
    run's class at its age (:class:`HitDensity`); within a class its oldest or its
    youngest run, whichever is worth less over the near term (``within``).

    Key ``(priority, soft_claimed, class, last_used)``: one queue per (priority, soft,
    class), compared by ``rank = (priority, soft_claimed, value[class][age bin],
    last_used)``; the queue that wins gives its head or its youngest run (``within``:
    where a class's runs come back seconds after they leave, a loop of agent steps, the
    youngest is the furthest from its next use). A released run's class is what the
    releasing request says of it: the turn of its session (1, 2, 3, 4, 5-7, 8+: a
    request whose reused prefix covers an earlier request's whole prompt continues that
    session) and the run's role (``shared``:
    the prefix a first turn found cached, a system prompt or tool spec, and such a prefix
    come back for at the head of a prompt once the cache dropped it; ``body``: the rest
    of the prompt; ``tail``: output past the prompt). Later turns of a session are likelier
    to continue, output that a next turn does not repeat is rarely reused, and shared
    prefixes come back across sessions: the learner finds out how much, per stream, online.
    Dropped runs are remembered as ghosts, so a request that comes back for an evicted run
    counts as a reuse (else a class the cache evicts early would look ever less worth
    keeping). Nothing is known of a request's future; the waiting queue reaches the policy
    as soft claims (``KVCacheManager.hint_waiting``). O(classes) per eviction, O(1) per
    release, O(classes x bins) per refresh.

    With ``cost_aware`` a run's value is weighed by its recompute cost, ``1 + depth /
    crossover_tokens`` (attention over a deeper prefix costs more per token).

    With ``witnessed`` (the default) the policy keeps an :class:`~kvtier.witness.LruWitness`
    and ranks by LRU's order (priority and soft claims first, as always) while the witness
    says LRU is ahead beyond chance: a learned order is only worth its errors where it wins.
    """

    name = "kvtier-predict"
    ranks_soft_claims = True
    num_queue_fields = 3
    NUM_CLASSES = 1 + 2 * NUM_TURN_BUCKETS

    def __init__(self, cost_aware: bool = False, crossover_tokens: int = 16384,
                 witnessed: bool = True) -> None:
        self.cost_aware = cost_aware
        self.crossover_tokens = crossover_tokens
        self.witnessed = witnessed
        self.tokens_per_block = 1
        self.learner = HitDensity(self.NUM_CLASSES)
        self.ghosts = Ghosts(count_classes=False)  # nothing here reads blocks per class
        self.witness: LruWitness | None = None
        self._returning: set[int] = set()  # ghosts recalled lately, by hash of their key
        self.bound = False
        if cost_aware:
            self.name = "kvtier-predict-cost"

    def bind(self, config: CacheConfig) -> None:
        check_unbound(self)
        capacity = max(1, config.num_gpu_blocks + config.num_host_blocks)
        self.tokens_per_block = config.tokens_per_block
        self.ghosts.max_blocks = 4 * capacity
        if self.witnessed:
            self.witness = LruWitness(capacity)

    def reuse_class(self, node: Node, turn: int, role: int) -> int:
        if role == ROLE_SHARED:
            return 0
        returning = self._returning
        if (returning and not node.start_block and role == ROLE_BODY and turn <= 1
                and node.parent is not None):
            # NOTE: a prompt's head that was shared (a system prompt, a tool spec, a hot
            # prompt), dropped, and come back for by a first turn stays shared: the role
            # is the stream's, not whether this cache kept the run. Filed as a first turn's
            # body, it went back to the class that scans and one-off prompts make worth
            # least, and was dropped again before its next use (S3-FIFO's ghost -> main
            # queue, as a role). Heads only: below the head, what a first turn found
            # cached is mostly its own session's history (the turn restarts at 1 once
            # that was dropped), and keeping those shared cost the agentic rows ~0.008.
            h = hash(node_ghost_key(node, self.tokens_per_block))
            if h in returning:
                returning.discard(h)
                return 0
        bucket = _TURN_BUCKETS[min(max(turn, 1), len(_TURN_BUCKETS)) - 1]
        return 1 + 2 * bucket + int(role == ROLE_TAIL)

    def record(self, reuse_class: int, age_s: float, num_blocks: int, reused: bool) -> None:
        self.learner.record(reuse_class, age_s, num_blocks, reused)

    def forget(self, ghost_key: object, node_uid: int, reuse_class: int, released_s: float,
               num_blocks: int, now: float, released_tick: int = 0) -> None:
        learner = self.learner
        # NOTE: ``HitDensity.dropped`` and ``Ghosts.add_trim`` written out (the same
        # expressions, in the same order): a forget comes with every run dropped.
        age_s = now - released_s
        mean = learner.drop_age_s
        mean = age_s if mean is None else mean + DROP_AGE_WEIGHT * (age_s - mean)
        learner.drop_age_s = mean
        learner.horizon_s = max(1.0, NEAR_TERM_DROP_AGES * mean)
        ghosts = self.ghosts
        ghosts._put(ghost_key, reuse_class, released_s, num_blocks, node_uid, released_tick)
        entries = ghosts._entries
        if ghosts.num_blocks <= ghosts.max_blocks and len(entries) <= ghosts.max_entries:
            return
        # ``Ghosts.trim`` (this table counts no classes) and a censored
        # ``HitDensity.record`` of each entry it forgets, written out, each entry recorded
        # as it goes: the same records in the same order (a pop changes nothing the
        # learner reads, a record nothing of the ghosts), no list, no call an entry.
        censored = learner.censored
        while entries and (ghosts.num_blocks > ghosts.max_blocks
                           or len(entries) > ghosts.max_entries):
            cls, released, n, _, _ = _unpack_ghost(entries.popitem(last=False)[1])
            ghosts.num_blocks -= n
            age_s = now - released
            censored[cls][(NUM_AGE_BINS - 1 if age_s >= _LAST_BIN_S
                           else int(age_s).bit_length()) if age_s > 0 else 0] += n
            learner._total += n
            learner.num_records += 1
            learner._to_refresh -= 1
            if not learner._to_refresh:
                learner._to_refresh = learner.refresh_every
                learner.refresh()

    def recall(self, ghost_key: object, now: float) -> tuple[int, int] | None:
        # NOTE: ``Ghosts.pop`` written out (this table counts no classes): a recall is
        # asked at every admission that misses, and most find nothing.
        ghosts = self.ghosts
        packed = ghosts._entries.pop(hash(ghost_key), None)
        if packed is None:
            return None
        cls, released_s, n, uid, tick = _unpack_ghost(packed)
        ghosts.num_blocks -= n
        self.learner.record(cls, now - released_s, n, True)
        if self.witness is not None:
            self.witness.recalled(tick, n)
        if cls == 0:  # a shared run came back (``reuse_class`` files it shared again)
            returning = self._returning
            if len(returning) >= self.ghosts.max_entries:
                returning.clear()  # bounded as the ghosts are; a stale hash misfiles one run
            returning.add(hash(ghost_key))
        return uid, n

    # NOTE: ``key``, ``rank`` and ``within`` write ``effective_priority`` and ``age_bin``
    # out (the same expressions): the cache calls them at every queue head it checks and
    # ranks, and each call was a measurable part of the default policy's cost per block.

    def key(self, node: Node, now: float, default_priority: int) -> Key:
        expiry = node.expiry
        cls = node.reuse_class
        return (default_priority if expiry is not None and now >= expiry else node.priority,
                1 if node.soft_claimed else 0, 1 if cls is None else cls, node.last_used)

    def rank(self, node: Node, now: float, default_priority: int) -> Key:
        expiry = node.expiry
        priority = default_priority if expiry is not None and now >= expiry else node.priority
        witness = self.witness
        if witness is not None and witness.lru_ahead:
            # LRU has done better lately: its order, until the learned one wins again.
            return (priority, 1 if node.soft_claimed else 0, 0.0, node.last_used)
        cls = node.reuse_class
        age = now - node.last_used_s
        value = self.learner.value[1 if cls is None else cls][
            (NUM_AGE_BINS - 1 if age >= _LAST_BIN_S else int(age).bit_length())
            if age > 0 else 0]
        if self.cost_aware:
            value *= 1.0 + node.start_block * self.tokens_per_block / self.crossover_tokens
        return (priority, 1 if node.soft_claimed else 0, value, node.last_used)

    def within(self, node: Node, now: float) -> float:
        """Which run of a class goes, its oldest or its youngest: the one with the
        lower hit density over the near term at its age (``HitDensity.near``). Where a
        class's runs come back within seconds of an age (a loop of agent sessions), the
        youngest is the furthest from its next use. While the witness says LRU is
        ahead, no run is worth less than another (a queue gives its head, as LRU). Pure."""
        witness = self.witness
        if witness is not None and witness.lru_ahead:
            return 0.0  # LRU's order, whole: every run alike, so a queue gives its head
        cls = node.reuse_class
        age = now - node.last_used_s
        return self.learner.near[1 if cls is None else cls][
            (NUM_AGE_BINS - 1 if age >= _LAST_BIN_S else int(age).bit_length())
            if age > 0 else 0]

    @property
    def rank_version(self) -> int:
        """What ``rank`` reads besides the node and ``now``: the value table (its refresh
        count) and the witness's verdict, as one number (twice the count, plus one while
        LRU is ahead; no tuple a pop). Any state ``rank`` reads must be folded in here:
        the pool keeps a queue head's rank while this and ``now`` hold."""
        witness = self.witness
        return 2 * self.learner.num_refreshes + (
            1 if witness is not None and witness.lru_ahead else 0)


def recalls_by_its_ghosts(policy: KvtierPredict) -> bool:
    """Whether ``policy``'s ``recall`` is ``KvtierPredict``'s own, which finds nothing (and
    changes nothing) while its ghost table is empty. Pure."""
    return _defined_by(type(policy), "recall") is KvtierPredict


def _defined_by(cls: type, name: str) -> type | None:
    """The class in ``cls``'s method order that defines ``name``. Pure."""
    return next((k for k in cls.__mro__ if name in k.__dict__), None)


def _kvtier_predict_cost() -> KvtierPredict:
    return KvtierPredict(cost_aware=True)


POLICIES: dict[str, Callable[[], EvictionPolicy]] = {
    "priority-lru": PriorityLRU, "lru": LRU, "arc": ARC, "s3fifo": S3FIFO,
    "kvtier-predict": KvtierPredict, "kvtier-predict-cost": _kvtier_predict_cost,
}
assert tuple(POLICIES) == EVICTION_POLICIES, "config.EVICTION_POLICIES names every policy"


def get_policy(name: str) -> EvictionPolicy:
    """A new eviction policy called ``name`` (a policy object serves one cache)."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(
            f"eviction_policy must be one of {sorted(POLICIES)}, got {shown(name)}"
        ) from None
    return factory()
