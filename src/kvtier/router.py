"""Routing requests across engine instances: a prefix index fed by KV events, and policies.

The index knows, per instance, which chained block hashes it holds and in which tier. As a
block's hash covers its whole prefix, an instance's match for a request is the run of the
request's block hashes it holds, from the first, up to the first it lacks::

    request blocks:  h0  h1  h2  h3  h4
    instance a:      G   G   H   -   G     → (gpu 2, host 1): h4 is past the hole
    instance b:      -   G   G   G   G     → no match: h0 is missing

Policies see only :class:`InstanceLoad` and the :class:`PrefixHit` of each instance.

Contracts: :class:`PrefixIndex` changes only its own maps, from events and snapshots; a
:class:`RoutingPolicy` only its own rotation state; :class:`Router` only its stats (it
hashes a request once, and asks the index and the policy).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from kvtier.config import check_tokens_per_block
from kvtier.counts import as_integer
from kvtier.event_codec import Snapshot
from kvtier.event_updates import EventBatch, InstanceGone, InstanceLost, Update, check_batch
from kvtier.events import AllBlocksCleared, BlockRemoved, BlockStored, BlockTierChanged, Event
from kvtier.hashing import get_hash_fn, prompt_block_hashes
from kvtier.reprs import shown
from kvtier.sequence import MultimodalItem, block_extras, checked_prompt, short_repr
from kvtier.tier import Tier


class PrefixHit(NamedTuple):
    """Blocks of a request's prefix that one instance holds, by tier."""

    num_gpu_blocks: int
    num_host_blocks: int


class PrefixIndex:
    """Which instance holds which block hash in which tier; fed by events and snapshots.

    ``num_inconsistent`` counts events that did not fit the index (removing or moving an
    unknown block): harmless, but a sign of a missed event.

    An instance has an entry only while it holds blocks: one cleared, lost or gone leaves
    nothing behind, so the index is bounded by the blocks the live instances hold, however
    many instance ids came and went.
    """

    def __init__(self) -> None:
        self._blocks: dict[str, dict[int, Tier]] = {}
        # Inverse of _blocks, for matching one request against every instance at once.
        self._holders: dict[int, dict[str, Tier]] = {}
        self.num_inconsistent = 0

    # ---- queries ------------------------------------------------------------------------------

    def instances(self) -> list[str]:
        """Instances holding blocks, in the order they came to hold them. Pure."""
        return list(self._blocks)

    def num_blocks(self, instance_id: str) -> int:
        """Blocks ``instance_id`` holds, every tier. Pure."""
        return len(self._blocks.get(instance_id, ()))

    def blocks(self, instance_id: str) -> dict[int, Tier]:
        """A copy of ``instance_id``'s hash -> tier map. Pure."""
        return dict(self._blocks.get(instance_id, {}))

    def match(self, block_hashes: Sequence[int]) -> dict[str, PrefixHit]:
        """Each instance's longest held prefix of ``block_hashes``; only instances holding
        at least the first block appear. TypeError for what is no sequence of hashes (a
        str, None: before, they matched nothing, as an uncached prompt does). Pure."""
        if isinstance(block_hashes, (str, bytes)) or not isinstance(block_hashes, Sequence):
            raise TypeError(f"block_hashes must be a sequence of block hashes, got "
                            f"{type(block_hashes).__name__}")
        if not block_hashes:
            return {}
        first = self._holders.get(block_hashes[0])
        if not first:
            return {}
        alive = dict(first)
        counts = {iid: [0, 0] for iid in alive}
        for h in block_hashes:
            holders = self._holders.get(h)
            if holders is None:
                break
            for iid in [i for i in alive if i not in holders]:
                del alive[iid]
            if not alive:
                break
            for iid in alive:
                counts[iid][holders[iid]] += 1
        return {iid: PrefixHit(gpu, host) for iid, (gpu, host) in counts.items()}

    # ---- commands -----------------------------------------------------------------------------

    def apply(self, instance_id: str, events: Iterable[Event]) -> None:
        """Apply ``events`` of ``instance_id`` in order. TypeError, changing nothing, for a
        batch that is not a str id and events; ValueError for an event with a field
        ``check_batch`` refuses (the token ids, which the index never reads, unchecked)."""
        events = list(events)
        check_batch(instance_id, events, token_ids=False)
        self._apply(instance_id, events)

    def _apply(self, instance_id: str, events: Sequence[Event]) -> None:
        """``apply`` of a batch ``check_batch`` passed."""
        blocks = self._blocks.setdefault(instance_id, {})
        for e in events:
            if isinstance(e, BlockStored):
                self._set(instance_id, blocks, e.block_hash, e.tier)
            elif isinstance(e, BlockRemoved):
                if e.block_hash in blocks:
                    self._remove(instance_id, blocks, e.block_hash)
                else:
                    self.num_inconsistent += 1
            elif isinstance(e, BlockTierChanged):
                if blocks.get(e.block_hash) is not e.old_tier:
                    self.num_inconsistent += 1
                self._set(instance_id, blocks, e.block_hash, e.new_tier)
            else:
                assert isinstance(e, AllBlocksCleared), e
                self.clear(instance_id)
                blocks = self._blocks.setdefault(instance_id, {})
        self._drop_if_empty(instance_id)

    def clear(self, instance_id: str) -> None:
        """Forget ``instance_id`` entirely: every block, and its entry. TypeError, changing
        nothing, unless ``instance_id`` is a str.

        NOTE: the instance's entry stayed, empty: a fleet whose engines restart under new
        ids (a Kubernetes pod's) kept one per id ever seen."""
        if not isinstance(instance_id, str):
            raise TypeError(f"instance_id must be a str, got {short_repr(instance_id)}")
        blocks = self._blocks.pop(instance_id, {})
        for h in list(blocks):
            self._remove(instance_id, blocks, h)

    def _drop_if_empty(self, instance_id: str) -> None:
        """Drop ``instance_id``'s entry where it holds no block (a batch that removed
        only unknown blocks, a snapshot of an empty cache)."""
        if not self._blocks.get(instance_id, True):
            del self._blocks[instance_id]

    def resync(self, snapshot: Snapshot) -> None:
        """Replace ``snapshot.instance_id``'s blocks with the snapshot's."""
        if not isinstance(snapshot, Snapshot):
            raise TypeError(f"resync needs a Snapshot, got {short_repr(snapshot)}")
        self.clear(snapshot.instance_id)
        blocks = self._blocks.setdefault(snapshot.instance_id, {})
        for h, tier in snapshot.blocks:
            self._set(snapshot.instance_id, blocks, h, tier)
        self._drop_if_empty(snapshot.instance_id)

    def apply_updates(self, updates: Iterable[Update]) -> None:
        """Apply a subscriber's updates: event batches, lost and gone instances (both
        forgotten) and snapshots. TypeError, changing nothing, if one is none of them;
        ValueError, changing nothing, for an event ``apply`` refuses."""
        updates = list(updates)
        for update in updates:
            if not isinstance(update, EventBatch | InstanceLost | InstanceGone | Snapshot):
                raise TypeError(f"an update is an EventBatch, InstanceLost, InstanceGone or "
                                f"Snapshot, got {short_repr(update)}")
            if isinstance(update, EventBatch):
                check_batch(update.instance_id, update.events, token_ids=False)
            elif isinstance(update, InstanceLost | InstanceGone) \
                    and not isinstance(update.instance_id, str):
                # NOTE: checked with the rest: an id that is no str (an int, a list) made an
                # instance no batch names, or raised from the dict after the updates before
                # it had been applied.
                raise TypeError(f"an {type(update).__name__}'s instance_id must be a str, got "
                                f"{short_repr(update.instance_id)}")
        for update in updates:
            if isinstance(update, EventBatch):
                self._apply(update.instance_id, update.events)  # checked above
            elif isinstance(update, InstanceLost | InstanceGone):
                self.clear(update.instance_id)
            else:
                self.resync(update)

    def _set(self, instance_id: str, blocks: dict[int, Tier], h: int, tier: Tier) -> None:
        blocks[h] = tier
        self._holders.setdefault(h, {})[instance_id] = tier

    def _remove(self, instance_id: str, blocks: dict[int, Tier], h: int) -> None:
        del blocks[h]
        holders = self._holders[h]
        del holders[instance_id]
        if not holders:
            del self._holders[h]

    def check_invariants(self) -> None:
        """Recompute the inverse map from the per-instance maps and compare."""
        holders: dict[int, dict[str, Tier]] = {}
        for iid, blocks in self._blocks.items():
            for h, tier in blocks.items():
                holders.setdefault(h, {})[iid] = tier
        assert holders == self._holders, "holders map out of sync with per-instance blocks"
        assert all(self._blocks.values()), "an instance holding no block kept its entry"


# ---- policies -----------------------------------------------------------------------------------


MAX_LOAD_COUNT = (1 << 63) - 1  # a queue depth or capacity: the policies divide them as floats


class InstanceLoad(NamedTuple):
    """What a policy knows of an instance's load: requests queued or running, and how many it
    serves at once (``capacity``, e.g. its max batch size)."""

    instance_id: str
    queue_depth: int
    capacity: int

    @property
    def load(self) -> float:
        return self.queue_depth / self.capacity


class RoutingPolicy(Protocol):
    """Picks one of ``loads`` (never empty) for a request of ``num_prompt_blocks`` full
    blocks whose cached prefix per instance is ``hits``. May change only its own state."""

    name: str

    def choose(self, loads: Sequence[InstanceLoad], hits: Mapping[str, PrefixHit],
               num_prompt_blocks: int) -> str: ...


class RoundRobin:
    """Each instance in turn, ignoring caches and load."""

    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, loads: Sequence[InstanceLoad], hits: Mapping[str, PrefixHit],
               num_prompt_blocks: int) -> str:
        choice = loads[self._next % len(loads)].instance_id
        self._next += 1
        return choice


class LeastLoaded:
    """The instance with the lowest ``load`` (queue depth / capacity); ties go to the first
    in ``loads`` order."""

    name = "least-loaded"

    def choose(self, loads: Sequence[InstanceLoad], hits: Mapping[str, PrefixHit],
               num_prompt_blocks: int) -> str:
        return min(loads, key=lambda x: x.load).instance_id


# The range of :class:`CacheAware`'s ``alpha`` (``kvtier replay --router-alpha``).
ALPHA_BOUNDS = (0.0, 1e6)
# The number fields of :class:`CacheAware` and their ranges.
_CACHE_AWARE_BOUNDS = {"alpha": ALPHA_BOUNDS, "host_weight": (0.0, 1.0),
                       "load_factor": (1.0, 1e6)}


@dataclass(slots=True)
class CacheAware:
    """Best cached prefix against load, within a load bound.

    **Load bound**: an instance is eligible only if its queue depth is at most
    ``load_factor x (least queue depth) + load_slack``; the request never goes past that.
    Among eligible instances the score is::

        score = (gpu_blocks + host_weight x host_blocks) / prompt_blocks  -  alpha x load

    with ``load = queue_depth / capacity``. The highest score wins; ties go to the lower
    load, then rotate so that equal instances share cold requests.
    """

    alpha: float = 1.0
    host_weight: float = 0.5
    load_factor: float = 1.5
    load_slack: int = 4
    name: str = "cache-aware"
    _next: int = field(default=0, repr=False)

    def __setattr__(self, name: str, value: object) -> None:
        """Set a field, checked: ValueError naming it, changing nothing, for a bad value.

        NOTE: checked when set, not only when made: ``alpha`` set to NaN later made every
        score NaN, and ``load_slack`` set below 0 left no instance within the bound: either
        way the router went round robin over the cache without a word."""
        bounds = _CACHE_AWARE_BOUNDS.get(name)
        # bool is never a number here; NaN and infinities fail the range.
        if bounds is not None and (not isinstance(value, int | float)
                                   or isinstance(value, bool)
                                   or not bounds[0] <= value <= bounds[1]):
            raise ValueError(f"{name} must be a finite number in [{bounds[0]:g}, "
                             f"{bounds[1]:g}], got {shown(value)}")
        if name == "load_slack":
            slack = as_integer(value)  # kept as the plain int (``kvtier.counts``)
            if slack is None or not 0 <= slack <= 1 << 31:
                raise ValueError(f"load_slack must be an integer in [0, 2**31], got "
                                 f"{shown(value)}")
            value = slack
        object.__setattr__(self, name, value)

    def bound(self, loads: Sequence[InstanceLoad]) -> float:
        """The largest queue depth an eligible instance may have. Pure."""
        return self.load_factor * min(x.queue_depth for x in loads) + self.load_slack

    def choose(self, loads: Sequence[InstanceLoad], hits: Mapping[str, PrefixHit],
               num_prompt_blocks: int) -> str:
        bound = self.bound(loads)
        n = len(loads)
        start = self._next % n
        self._next += 1
        best: tuple[float, float] | None = None
        choice = loads[start].instance_id
        for k in range(n):  # scan from the rotating start: first of equals wins
            x = loads[(start + k) % n]
            if x.queue_depth > bound:
                continue
            hit = hits.get(x.instance_id)
            cached = 0.0
            if hit is not None:
                cached = hit.num_gpu_blocks + self.host_weight * hit.num_host_blocks
            score = cached / max(num_prompt_blocks, 1) - self.alpha * x.load
            key = (score, -x.load)
            if best is None or key > best:
                best, choice = key, x.instance_id
        return choice


# ---- the router ---------------------------------------------------------------------------------


class RouteDecision(NamedTuple):
    """Where a request went and what the index promised there: ``hit`` and
    ``best_hit_blocks`` count the blocks a manager reuses whole, never the block holding
    the prompt's last token (which it computes)."""

    instance_id: str
    num_prompt_blocks: int
    hit: PrefixHit
    best_hit_blocks: int  # the longest prefix any instance offered held


@dataclass(slots=True)
class RouterStats:
    """``num_best_prefix``: decisions that went to an instance holding the longest prefix
    (of those with a prefix); ``num_predicted_hit_blocks``: blocks the index promised;
    ``per_instance``: decisions per instance not forgotten (``Router.forget``), those of
    forgotten ones summed in ``num_routed_forgotten``."""

    num_routed: int = 0
    num_with_prefix: int = 0
    num_best_prefix: int = 0
    num_predicted_hit_blocks: int = 0
    num_prompt_blocks: int = 0
    per_instance: dict[str, int] = field(default_factory=dict)
    num_routed_forgotten: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"num_routed": self.num_routed, "num_with_prefix": self.num_with_prefix,
                "num_best_prefix": self.num_best_prefix,
                "num_predicted_hit_blocks": self.num_predicted_hit_blocks,
                "num_prompt_blocks": self.num_prompt_blocks,
                "per_instance": dict(self.per_instance),
                "num_routed_forgotten": self.num_routed_forgotten}


class Router:
    """Hashes a request like the managers do and asks ``policy`` where it goes.

    ``tokens_per_block`` and ``hash_algo`` must equal the instances' :class:`CacheConfig`;
    salt and LoRA id enter the hashes as in the manager, so requests with other salts never
    match each other's blocks.
    """

    def __init__(self, policy: RoutingPolicy, tokens_per_block: int,
                 hash_algo: str = "xxh3_128", index: PrefixIndex | None = None) -> None:
        # NOTE: a cache's rule (``CacheConfig``): a size no instance can have (3) made a
        # router whose hashes matched no instance's blocks, routing without affinity.
        tokens_per_block = check_tokens_per_block(tokens_per_block)
        if not callable(getattr(policy, "choose", None)):
            raise TypeError(f"policy must be a RoutingPolicy (with a choose method), got "
                            f"{short_repr(policy)}")
        if index is not None and not isinstance(index, PrefixIndex):
            raise TypeError(f"index must be a PrefixIndex or None, got {short_repr(index)}")
        self.policy = policy
        self.tokens_per_block = tokens_per_block
        self._hash_fn = get_hash_fn(hash_algo)
        self.index = index if index is not None else PrefixIndex()
        self.stats = RouterStats()

    def apply_updates(self, updates: Iterable[Update]) -> None:
        """``PrefixIndex.apply_updates``; an instance gone (``InstanceGone``) is forgotten
        by the stats too (``forget``). Errors as the index's, changing nothing."""
        updates = list(updates)
        self.index.apply_updates(updates)
        for update in updates:
            if isinstance(update, InstanceGone):
                self._forget_stats(update.instance_id)

    def forget(self, instance_id: str) -> None:
        """``instance_id`` left the fleet: its blocks, its entry and its count in
        ``stats.per_instance`` go (the count into ``stats.num_routed_forgotten``). TypeError,
        changing nothing, unless it is a str. The router's side only: tell its subscriber
        too (``forget`` of the bus or subscriber), whose later updates of the instance,
        else, bring it back.

        NOTE: the router kept an entry per instance id ever routed to: with engines that
        restart under new ids, its stats grew without bound."""
        self.index.clear(instance_id)
        self._forget_stats(instance_id)

    def _forget_stats(self, instance_id: str) -> None:
        self.stats.num_routed_forgotten += self.stats.per_instance.pop(instance_id, 0)

    def block_hashes(self, tokens: Sequence[int], salt: object = None,
                     lora_id: int | None = None,
                     extras: Sequence[object] | None = None) -> list[int]:
        """The chained hashes of the full blocks of ``tokens``, as the manager computes them;
        ValueError for a ``salt`` or ``lora_id`` the manager refuses (no instance could hold
        such a block; a tuple salt nested deeply was a RecursionError). Pure."""
        return prompt_block_hashes(self._hash_fn, tokens, self.tokens_per_block, lora_id, salt,
                                   extras)

    def route(self, tokens: Sequence[int], loads: Iterable[InstanceLoad], salt: object = None,
              lora_id: int | None = None,
              mm_items: Sequence[MultimodalItem] = ()) -> RouteDecision:
        """Pick an instance of ``loads`` for a prompt of ``tokens`` (with its multimodal
        ``mm_items``: the blocks holding them are named by their content too, so another
        image behind the same placeholder tokens is no hit). ValueError, changing no stats,
        where the policy (a caller's) chooses an instance not among ``loads``."""
        loads = check_loads(loads)
        ids, items = checked_prompt(tokens, mm_items, "route")
        hashes = self.block_hashes(ids, salt, lora_id,
                                   block_extras(items, len(ids), self.tokens_per_block))
        # NOTE: only the instances offered: one the index still holds blocks of but the
        # caller no longer offers (gone, drained) set ``best_hit_blocks``, and the stats
        # counted a miss of the best prefix no instance offered had.
        offered = {load.instance_id for load in loads}
        hits = {iid: hit for iid, hit in self.index.match(hashes).items() if iid in offered}
        choice = self.policy.choose(loads, hits, len(hashes))
        if not any(type(choice) is str and choice == load.instance_id for load in loads):
            # NOTE: a caller's policy answering None, 5 or an unknown id was returned as the
            # decision (a request sent nowhere) and counted in the stats as an instance.
            raise ValueError(f"routing policy {short_repr(self.policy)} chose "
                             f"{short_repr(choice)}, none of the instances offered "
                             f"({', '.join(repr(load.instance_id) for load in loads)})")
        # NOTE: the policy weighs every block an instance holds, but a manager reuses
        # whole only the blocks before the one holding the prompt's last token: a
        # block-aligned prompt held whole was promised one block more than any instance
        # reuses (the stats' num_predicted_hit_blocks too). Cut off the deepest, host
        # blocks first (a path's tiers never get faster going down).
        reusable = (len(ids) - 1) // self.tokens_per_block
        hit = _reusable(hits.get(choice, PrefixHit(0, 0)), reusable)
        best = max((sum(_reusable(h, reusable)) for h in hits.values()), default=0)
        stats = self.stats
        stats.num_routed += 1
        stats.num_prompt_blocks += len(hashes)
        stats.num_predicted_hit_blocks += sum(hit)
        if best:
            stats.num_with_prefix += 1
            stats.num_best_prefix += sum(hit) == best
        stats.per_instance[choice] = stats.per_instance.get(choice, 0) + 1
        return RouteDecision(choice, len(hashes), hit, best)


def _reusable(hit: PrefixHit, num_blocks: int) -> PrefixHit:
    """``hit`` cut to its first ``num_blocks`` blocks (GPU ones first). Pure."""
    num_gpu = min(hit.num_gpu_blocks, num_blocks)
    return PrefixHit(num_gpu, min(hit.num_host_blocks, num_blocks - num_gpu))


def check_loads(loads: Iterable[InstanceLoad]) -> list[InstanceLoad]:
    """``loads`` as a list, each an :class:`InstanceLoad` of a distinct str instance id, an int
    queue depth >= 0 and an int capacity >= 1, both at most ``MAX_LOAD_COUNT``; ValueError
    or TypeError naming the first bad one otherwise. Pure.

    NOTE: a policy divides by the capacity and compares queue depths: a capacity of 0 was a
    ZeroDivisionError from inside a policy, a str depth a TypeError from its arithmetic, and
    a depth or capacity past the float range an OverflowError."""
    if not isinstance(loads, Iterable) or isinstance(loads, str | bytes):
        raise TypeError(f"loads must be an iterable of InstanceLoad, got {short_repr(loads)}")
    loads = list(loads)
    if not loads:
        raise ValueError("route needs at least one instance in loads")
    seen: set[str] = set()
    for i, x in enumerate(loads):
        if not isinstance(x, InstanceLoad) or not isinstance(x.instance_id, str):
            raise TypeError(f"loads[{i}] must be an InstanceLoad with a str instance_id, got "
                            f"{short_repr(x)}")
        # NOTE: any integer (``kvtier.counts``), read as the plain int: a NumPy depth was
        # refused, and an ``__index__`` one would have reached the policies' arithmetic.
        depth, capacity = as_integer(x.queue_depth), as_integer(x.capacity)
        if depth is None or depth < 0:
            raise ValueError(f"loads[{i}].queue_depth must be an int >= 0, got "
                             f"{short_repr(x.queue_depth)}")
        if capacity is None or capacity < 1:
            raise ValueError(f"loads[{i}].capacity must be an int >= 1, got "
                             f"{short_repr(x.capacity)}")
        for name, value in (("queue_depth", depth), ("capacity", capacity)):
            if value > MAX_LOAD_COUNT:
                raise ValueError(f"loads[{i}].{name} must be at most {MAX_LOAD_COUNT}, got "
                                 f"{short_repr(value)}")
        if x.instance_id in seen:
            raise ValueError(f"loads[{i}]: instance {shown(x.instance_id)} is listed twice")
        seen.add(x.instance_id)
        if type(x.queue_depth) is not int or type(x.capacity) is not int:
            loads[i] = x._replace(queue_depth=depth, capacity=capacity)
    return loads


POLICIES = ("cache-aware", "round-robin", "least-loaded")


def make_policy(name: str, alpha: float = 1.0) -> RoutingPolicy:
    """The policy called ``name`` (one of :data:`POLICIES`)."""
    if name == "cache-aware":
        return CacheAware(alpha=alpha)
    if name == "round-robin":
        return RoundRobin()
    if name == "least-loaded":
        return LeastLoaded()
    raise ValueError(f"router must be one of {POLICIES}, got {shown(name)}")
