"""The block cache's state: the tree's key spaces (roots), the two tier pools, the evictor,
the journal, the policy's learner, the memo of matched prompts (``match_spec``) and the
recency ticks; how a run is split, and how a copy or pickle carries it all.

:class:`CacheState` builds it; the parts of the cache (``run_drops.py``, ``tier_moves.py``,
``path_claims.py``, ``run_stores.py``, ``soft_claims.py``) are its subclasses, and
:class:`~kvtier.cache.BlockCache` is all of them: one object, one owner of the tree's nodes,
the pools' slots and ``stats``.
"""

from __future__ import annotations

import itertools
import weakref
from array import array
from collections.abc import Callable, Iterator

from kvtier.config import CacheConfig
from kvtier.eviction import EvictionPolicy, Evictor, ReuseLearner
from kvtier.journal import Journal
from kvtier.matching import NO_MATCH, Match, match_prompt, rematch
from kvtier.metrics import CacheStats
from kvtier.policies import KvtierPredict, get_policy, recalls_by_its_ghosts
from kvtier.policy_guard import PolicyGuard, guard_policy
from kvtier.pool import TierPool
from kvtier.radix import Node, Root, next_uid, reserve_uids, subtree
from kvtier.radix import split as split_run
from kvtier.reprs import shown
from kvtier.sequence import SequenceSpec
from kvtier.tier import Tier

# What a policy object must have (``kvtier.eviction.EvictionPolicy``, a Protocol the
# constructor checks by name: a wrong object fails at once, not at the first eviction).
_POLICY_ATTRS = ("name", "ranks_soft_claims", "num_queue_fields", "key", "rank")

# The most prompt matches ``match_spec`` keeps. A waiting request is matched as it enters
# the hinted window (``Scheduler.MAX_HINTED``, 64) and looked up again as it reaches the
# queue's head, after about a match per request ahead of it and one per lookup of those:
# kept that long, its lookup is a ``rematch`` of the runs it went through, not a walk of
# its whole prompt. When full, the matches of prompts gone are dropped, then the oldest
# down to half.
_MAX_MATCHES = 512

MAX_EVICTION_BATCH = 32
"""The largest batch a GPU victim run gives (``eviction_batch``)."""


def eviction_batch(capacity: int) -> int:
    """How many blocks a GPU victim run gives at least, where it has them, in a pool of
    ``capacity`` blocks: 1/128 of the pool (a slack the hit rate does not feel), at most
    ``MAX_EVICTION_BATCH``, at least 1 (exact cuts). Pure."""
    return max(1, min(MAX_EVICTION_BATCH, capacity // 128))


class CacheState:
    """The state of a :class:`~kvtier.cache.BlockCache`: key spaces, pools, matches."""

    def __init__(self, config: CacheConfig, clock: Callable[[], float],
                 policy: EvictionPolicy | None = None) -> None:
        self.config = config
        self.tpb = config.tokens_per_block
        self.roots: dict[tuple[object, object], Root] = {}
        policy = policy if policy is not None else get_policy(config.eviction_policy)
        missing = [a for a in _POLICY_ATTRS if not hasattr(policy, a)]
        if missing:
            raise ValueError(f"policy must be an eviction policy (kvtier.eviction."
                             f"EvictionPolicy); {shown(policy)} has no {', '.join(missing)}")
        # A caller's policy behind a guard of its shape: a call that raises or answers
        # nonsense mid-operation falls back to priority-LRU, never half-done (kvtier's own
        # policies are used as they are).
        policy = guard_policy(policy)
        both_ends = callable(getattr(policy, "within", None))
        self.gpu = TierPool(Tier.GPU, config.num_gpu_blocks, policy.num_queue_fields, both_ends,
                            tree=True)
        self.host = TierPool(Tier.HOST, config.num_host_blocks, policy.num_queue_fields,
                             both_ends, tree=True)
        self.stats = CacheStats()
        self.evictor = Evictor(config, clock, policy, self.gpu, self.host)
        if isinstance(policy, PolicyGuard):
            policy.on_fault = self.evictor.changed
        self.journal = Journal(config)
        self._tick = itertools.count(1)
        # The policy's learner, told how each release of a run ends (None: it learns nothing).
        self._learner = policy if isinstance(policy, ReuseLearner) else None
        if self._learner is not None:
            self._learner.bind(config)
        # What LRU would hold (the learner's evidence against it), kept from releases and
        # admissions here; the learner tells it of recalls (None: the policy keeps none).
        self._witness = self._learner.witness if self._learner is not None else None
        # The table of dropped runs that the learner's ``recall`` alone reads, where the
        # learner is kvtier's own and recalls as its class does (None: not known): while
        # it is empty a recall finds nothing, and ``recall_miss`` builds no key to ask.
        self._ghost_table = (self._learner.ghosts.live_view()
                             if isinstance(self._learner, KvtierPredict)
                             and recalls_by_its_ghosts(self._learner) else None)
        # NOTE: a GPU victim run gives at least this many blocks where it has them (the
        # spare slots serve the next allocations): decode growth allocates a block at a
        # time, and a victim cut to exactly that would move one block per run through the
        # whole eviction path (ranking, offload, host room, drop). A tiny pool keeps exact
        # cuts. The host cuts exactly: a host block dropped early is lost (batches there
        # cost the learned policy hit rate beyond its noise; GPU batches only move blocks
        # to the host a little earlier).
        self._gpu_batch = eviction_batch(config.num_gpu_blocks)
        # Waiting request -> (its spec, the deepest run of its prefix), at the last hint.
        self._hinted: dict[str, tuple[SequenceSpec, Node]] = {}
        # The last hint's specs, the runs their prefixes ended in, and the specs with
        # nothing cached (``set_soft_claims``).
        self._hinted_queue: tuple[list[SequenceSpec], list[Node], list[SequenceSpec]] = (
            [], [], [])
        # The last hint's request ids, if distinct (None: not; ``_shift_hint`` needs them so).
        self._hinted_rids: set[str] | None = set()
        # Spec prompts matched lately (``match_spec``), by the id of the prompt's array: (a
        # weak reference to the array, its root, the root's change count then, the match,
        # the block count then of each run it went through, for ``rematch`` once the tree
        # changed). NOTE: weak, so a finished request's prompt is not kept alive.
        self._matches: dict[int, tuple[weakref.ref[array[int]], Root, int, Match,
                                       list[int]]] = {}

    def __getstate__(self) -> dict[str, object]:
        """The cache without its memo of matches (``match_spec``), which holds weak
        references: a copy or a pickle starts with none, and matches as the original does.

        NOTE: a manager that had matched a spec could not be pickled ('cannot pickle
        weakref.ReferenceType object'); one that had not could."""
        tick = next(self._tick)
        self._tick = itertools.count(tick)  # as it was: the tick drawn is given back
        state = self.__dict__.copy()
        state["_matches"] = {}
        # NOTE: counters travel as ints: an itertools.count is pickled or copied with a
        # DeprecationWarning from Python 3.12 and not at all from 3.14. And the nodes'
        # uids come from this process's counter: another process unpickling the tree
        # must number its new nodes past them (a uid met twice confused the pools' books).
        state["_tick"] = tick
        state["_next_uid"] = next_uid()
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        state = dict(state)
        tick = state.pop("_tick")
        next_node_uid = state.pop("_next_uid")
        assert type(tick) is int and type(next_node_uid) is int
        self.__dict__.update(state)
        self._tick = itertools.count(tick)
        reserve_uids(next_node_uid)

    def pool(self, tier: Tier) -> TierPool:
        return self.gpu if tier is Tier.GPU else self.host

    def root(self, lora_id: object, salt: object) -> Root | None:
        """The root of this key space, if it holds blocks or users. Pure."""
        return self.roots.get((lora_id, salt))

    def match_spec(self, root: Root | None, spec: SequenceSpec,
                   extras: list[object] | None) -> Match:
        """``match_prompt`` of ``spec``'s prompt under ``root`` (its key space), remembered
        while the tree under the root keeps its shape and ids (``Root.num_changes``): a
        scheduler looks a prompt up, admits it and hints it in one step, on one tree; a
        long prompt's match is tens of microseconds. Once the tree changed, the runs the
        remembered match went through are checked and only what lies past them is walked
        (``rematch``). Pure (the memo aside)."""
        tokens = spec.token_array  # a spec's array never changes (``SequenceSpec``)
        if (root is None or (len(tokens) > 1 and tokens[0] not in root.by_first)
                or spec.skip_reading_prefix_cache):
            # NOTE: no cached run starts with the prompt's first id, so none of it is
            # cached (a full or partial match starts there): the answer for a new prompt,
            # and at every step for a waiting one with nothing cached (the scheduler's
            # lookups and hints), without a walk or a rematch. A request that skips reading
            # the cache is admitted as if nothing were cached.
            return NO_MATCH
        if extras is not None or not self.config.enable_block_reuse:
            return match_prompt(root, tokens, extras, self.config)
        matches = self._matches
        known = matches.get(id(tokens))
        m: Match | None = None
        if known is not None and known[0]() is tokens and known[1] is root:
            if known[2] == root.num_changes:
                return known[3]
            # NOTE: the tree changed somewhere (a decode block stored, a victim cut): the
            # runs the match went through are checked, not compared again, and only what
            # lies past them is walked (a long prompt's match reads ~100 KB of ids).
            m = rematch(known[3], known[4], root, tokens, len(tokens) - 1, self.tpb,
                        self.config.enable_partial_reuse)
        if m is None:
            m = match_prompt(root, tokens, None, self.config)
        if len(matches) >= _MAX_MATCHES:
            # Keep those of prompts still alive, the newest half at most (a dict keeps the
            # order of first insertion).
            kept = [(k, v) for k, v in matches.items() if v[0]() is not None]
            self._matches = matches = dict(kept[-(_MAX_MATCHES // 2):])
        runs = m.path if m.tail is None else [*m.path, m.tail[0]]
        matches[id(tokens)] = (weakref.ref(tokens), root, root.num_changes, m,
                               [len(node.slots) for node in runs])
        return m

    def join_root(self, lora_id: object, salt: object) -> Root:
        """The root of this key space, created empty if new, with one more user: it stays
        until every user has left (``leave_root``) and it holds no blocks."""
        root = self.roots.get((lora_id, salt))
        if root is None:
            root = self.roots[(lora_id, salt)] = Root(lora_id, salt)
        root.num_users += 1
        return root

    def leave_root(self, root: Root) -> None:
        """One user of ``root`` is done with it."""
        root.num_users -= 1
        self._prune(root)

    def _prune(self, root: Node) -> None:
        """Forget ``root`` if it is a root with no blocks and no users."""
        if (isinstance(root, Root) and not root.children and not root.num_users
                and self.roots.get((root.lora_id, root.salt)) is root):
            del self.roots[(root.lora_id, root.salt)]

    def nodes(self) -> Iterator[Node]:
        """Every cached run, parents before children within a key space. Pure."""
        for root in self.roots.values():
            for top in root.iter_children():
                yield from subtree(top)

    def next_tick(self) -> int:
        """A new recency stamp, later than every one before."""
        return next(self._tick)

    def split(self, node: Node, num_head_blocks: int) -> Node:
        """Cut ``node`` after ``num_head_blocks`` blocks; returns the head, ``node`` keeps
        the tail. Both halves keep the key, and a retention keeps running on both."""
        head = split_run(node, num_head_blocks, self.tpb)
        self.evictor.split_off(head)
        return head
