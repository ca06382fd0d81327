"""One tier's physical slots: a free list and a heap of eviction candidates."""

from __future__ import annotations

import heapq
from array import array
from collections import deque
from collections.abc import Callable, Sequence

from kvtier.radix import Node
from kvtier.slots import SLOT_TYPECODE, slot_array, slot_range
from kvtier.tier import Tier

Key = tuple[float, ...]
"""An eviction key: the smallest is evicted first (see ``kvtier.eviction``)."""

_Order = float | Key
_Entry = tuple[_Order, int, Node, Key]
"""A heap entry: what orders it within its heap (see ``TierPool.push``), the node's uid
(no two nodes tie), the node, and the key it was filed under."""


class TierPool:
    """Slots ``0 .. capacity-1`` of one tier.

    A slot is *free* (no data), *cached* (holds a block of an unreferenced tree node, evictable)
    or *referenced* (a claimed node's block, or a request's private block)::

        capacity = num_free + num_cached + num_referenced      (invariant 10)

    ``num_free`` and ``num_referenced`` are kept; ``num_cached`` is derived. Candidates for
    eviction sit in a heap keyed by the eviction policy; entries go stale when a node is
    re-filed, and are skipped on pop (lazy deletion).

    With ``num_queue_fields`` > 0 the candidates sit in one heap per *queue*, the key's
    first ``num_queue_fields`` fields (a policy's class of runs), and a pop takes the best
    of the queues' heads by the policy's ``rank``: the policies whose order depends on a
    run's age (``kvtier.eviction``). O(queues) per pop, O(log n) per push. A head's rank
    is kept while the caller's ``rank_version`` holds (the clock and the policy's own
    version, see ``EvictionPolicy``): a pop then ranks only heads that changed.

    With ``both_ends`` each queue also keeps its entries in filing order (a stack), and a
    pop given ``within`` takes from the queue that won by its head's rank either the head
    (its oldest run) or its most recently filed live run (its youngest, but for runs
    re-filed since), whichever ``within`` values less: for a policy whose value of a run
    rises with its age over the near term (a loop of sessions, each back a few seconds
    after it left), the youngest is the one to give up. O(1) more per pop, amortised: a
    head taken leaves the bottom of the filing order with it (an evicted run must not stay
    referenced there, with everything it holds, until a compaction).
    """

    def __init__(self, tier: Tier, capacity: int, num_queue_fields: int = 0,
                 both_ends: bool = False, tree: bool = False) -> None:
        self.tier = tier
        # Whether the candidates are a cache tree's runs (``BlockCache``'s pools): then a
        # run gone (no parent), in use or on another tier is no candidate, which a pop
        # tests itself before asking the caller's ``current_key``.
        self._tree = tree
        self.capacity = capacity
        # The free slots form a stack: slots given back sit on top, above the never-used
        # slots ``num_fresh .. capacity-1``, which are handed out lowest id first. The
        # never-used part is a counter, so a pool costs nothing per slot until it is used.
        # Slots move as ``array('q')`` (``kvtier.slots``): a take or a give-back is a copy.
        self._given_back: array[int] = array(SLOT_TYPECODE)
        self._num_fresh = 0
        # NOTE: kept, not derived (``len(given back) + capacity - fresh``): an eviction
        # round reads it after every victim, a property call each time.
        self.num_free = capacity
        self.num_referenced = 0
        self._heap: list[_Entry] = []
        self._num_queue_fields = num_queue_fields
        self._queues: dict[Key, list[_Entry]] = {}
        self._num_entries = 0  # in every heap, stale ones included
        # Per queue, its entries in filing order (``both_ends``; stale ones dropped from
        # the top as met, from the bottom as heads are taken, all at a compaction).
        self._both_ends = both_ends and num_queue_fields > 0
        self._filed: dict[Key, deque[_Entry]] = {}
        self._num_filed = 0
        # Node uid -> the key of its newest heap entry, while that entry is in a heap.
        self._newest: dict[int, Key] = {}
        self._num_repairs = 0  # stale heads re-filed under their current key, in all
        # Queue -> (its head entry when ranked, (rank, uid)), valid while the caller's
        # rank version is ``_rank_version``; a head entry is recognised by identity.
        self._ranked: dict[Key, tuple[_Entry, tuple[Key, int]]] = {}
        self._rank_version: object = None
        # Queue -> its head entry when found live, valid while the caller's
        # ``check_version`` is ``_check_version`` (see ``pop_candidate``).
        self._checked: dict[Key, _Entry] = {}
        self._check_version: object = None
        self._compact_bound = 2 * capacity + 64  # entries (or filings) that make a compaction due
        # Whether a queue entry is ordered by the one key field after the queue fields, a
        # number (True), or by the tuple of the fields after them (False; None: nothing
        # filed yet). See ``push``.
        self._scalar: bool | None = None

    @property
    def num_cached(self) -> int:
        """Blocks of unreferenced cached nodes: evictable. Derived, pure."""
        return self.capacity - self.num_free - self.num_referenced

    @property
    def num_available(self) -> int:
        """Blocks an allocation may take: free plus evictable. Pure."""
        return self.capacity - self.num_referenced

    def free_slots(self) -> list[int]:
        """The free slots, the next one handed out last. Pure; O(free slots)."""
        return list(range(self.capacity - 1, self._num_fresh - 1, -1)) + self._given_back.tolist()

    def never_used_slots(self) -> range:
        """The free slots never handed out: ``num_fresh .. capacity-1``. Pure; O(1)."""
        return range(self._num_fresh, self.capacity)

    def given_back_slots(self) -> list[int]:
        """The free slots handed out and given back, the next one handed out last. Pure;
        O(those slots)."""
        return self._given_back.tolist()

    def take(self, num_blocks: int) -> array[int]:
        """Take ``num_blocks`` free slots: those given back last first, then never-used ones
        from the lowest id (a new ``array('q')``)."""
        assert num_blocks <= self.num_free, (num_blocks, self.num_free)
        self.num_free -= num_blocks
        back = self._given_back
        k = min(num_blocks, len(back))
        slots = back[len(back) - k:]
        del back[len(back) - k:]
        slots.reverse()
        if k < num_blocks:
            first = self._num_fresh
            self._num_fresh = first + num_blocks - k
            slots += slot_range(first, self._num_fresh)
        return slots

    def give_back(self, slots: Sequence[int]) -> None:
        """Return slots to the free list so the first of ``slots`` is handed out first."""
        self._given_back += (slots if type(slots) is array else slot_array(slots))[::-1]
        self.num_free += len(slots)

    def push(self, node: Node, key: Key, young: bool = True) -> bool:
        """File ``node`` as an eviction candidate under ``key`` (with ``both_ends``, as
        its queue's youngest unless ``young`` is False). Returns whether stale entries
        may outnumber the live ones now: then a ``compact`` is due (the check, without
        a call per push)."""
        nq = self._num_queue_fields
        order: _Order
        queue: Key = ()
        if not nq:
            heap = self._heap
            order = key
        else:
            # NOTE: looked up, not ``setdefault``: its default (a new list, and a new deque
            # below) was built and thrown away at every push of a queue that exists.
            queue = key[:nq]
            found = self._queues.get(queue)
            if found is None:
                found = self._queues[queue] = []
            heap = found
            # NOTE: within a queue every key's first ``nq`` fields are equal, so the rest
            # orders it: one number where the rest is one field, so that a sift compares
            # two numbers, not two tuples field by field (half a heap operation's time).
            # A key of another length turns the pool to tuples (numbers and tuples do
            # not compare).
            if self._scalar is not False and len(key) == nq + 1:
                self._scalar = True
                order = key[nq]
            else:
                if self._scalar:
                    self._to_tuple_order()
                self._scalar = False
                order = key[nq:]
        uid = node.uid
        entry = (order, uid, node, key)
        newest = self._newest
        if newest.get(uid) != key:
            heapq.heappush(heap, entry)
            self._num_entries += 1
            newest[uid] = key
        # Else its newest heap entry has this key and is still there (a run re-filed
        # unchanged: a parent whose child left, a run put back): a second one would only
        # pop as stale later. The filing order still takes it as the youngest.
        if young and self._both_ends:
            filed = self._filed.get(queue)
            if filed is None:
                filed = self._filed[queue] = deque()
            filed.append(entry)
            self._num_filed += 1
        bound = self._compact_bound
        return self._num_entries > bound or self._num_filed > bound

    def _pop(self, heap: list[_Entry]) -> Node:
        self._num_entries -= 1
        _, uid, node, key = heapq.heappop(heap)
        if self._newest.get(uid) == key:
            del self._newest[uid]
        return node

    def pop_candidate(self, current_key: Callable[[Node], Key | None],
                      rank: Callable[[Node], Key] | None = None,
                      rank_version: object = None,
                      within: Callable[[Node], float] | None = None,
                      check_version: object = None,
                      accept: Callable[[Node], bool] | None = None) -> Node | None:
        """Pop the best live candidate. ``current_key`` returns a node's key if it is a
        candidate now, else ``None``; entries of nodes that are no candidates are dropped.
        With queues, ``rank`` orders the queues' heads (the smallest goes); a head ranked
        before under the same ``rank_version`` (not None) is not ranked again. With
        ``both_ends`` and ``within``, the winning queue gives its youngest run instead of
        its head where ``within`` values that one less.

        ``check_version`` (not None): a value the caller changes whenever a node that may
        head a queue may have changed its key or stopped being a candidate other than by
        leaving through this pool; while it holds, a head entry found live is not checked
        again (a pop checks every queue's head: most are the same as at the last pop).

        ``accept`` (not None): asked of the run the pop chose before it leaves; where it
        answers False the pop returns None and leaves the pool as a pop of the run followed
        by its ``push`` under the same key would (a head taken leaves the bottom of its
        filing order as ``_trim_oldest`` trims it and is filed as its queue's youngest; a
        youngest stays where it is), without the heap's pop and push."""
        if not self._num_queue_fields:
            heap = self._heap
            if not self._live_head(heap, current_key):
                return None
            if accept is not None and not accept(heap[0][2]):
                self._newest[heap[0][1]] = heap[0][3]  # as the push after a pop leaves it
                return None
            return self._pop(heap)
        assert rank is not None
        queues = self._queues
        ranked = self._ranked
        if rank_version is None or rank_version != self._rank_version:
            ranked.clear()
            self._rank_version = rank_version
        checked = self._checked
        if check_version is None or check_version != self._check_version:
            checked.clear()
            self._check_version = check_version
        heads: list[tuple[Key, list[_Entry]]] = []
        # NOTE: first a pass that only reads: every head found live (the common case), no
        # copy of the queues; at the first head that is not, the full pass below, which
        # may change them.
        all_live = True
        for q, heap in queues.items():
            if heap:
                head = heap[0]
                if checked.get(q) is head or current_key(head[2]) == head[3]:
                    if check_version is not None:
                        checked[q] = head
                    heads.append((q, heap))
                    continue
            all_live = False
            break
        while not all_live:
            # Re-filing a stale head (``_live_head``) may move a node to a queue already
            # passed (or a new one), where it may be the head now: then pass again.
            repairs = self._num_repairs
            heads = []
            for q, heap in list(queues.items()):
                if heap:
                    head = heap[0]
                    if checked.get(q) is head:  # found live before, nothing changed since
                        heads.append((q, heap))
                        continue
                    if current_key(head[2]) == head[3]:  # the head is live: the common case
                        if check_version is not None:
                            checked[q] = head
                        heads.append((q, heap))
                        continue
                if self._live_head(heap, current_key):
                    heads.append((q, heap))
                else:
                    del queues[q]
                    checked.pop(q, None)
                    self._drop_filed(q)  # no live entry left there either
            if repairs == self._num_repairs:
                break
        if not heads:
            return None
        if len(heads) == 1:
            best_queue, best_heap = heads[0]  # nothing to rank against
        else:
            best: tuple[Key, int] | None = None
            for q, heap in heads:
                head = heap[0]
                known = ranked.get(q)
                if known is not None and known[0] is head:
                    score = known[1]
                else:
                    node = head[2]
                    score = (rank(node), node.uid)
                    ranked[q] = (head, score)
                if best is None or score < best:
                    best, best_heap, best_queue = score, heap, q
        if within is not None and self._both_ends:
            order = self._filed.get(best_queue)
            if order and current_key(order[-1][2]) == order[-1][3]:
                young: Node | None = order[-1][2]  # the top filing is live: the common case
            else:
                young = self._youngest(best_queue, current_key)
            if young is not None:
                oldest = best_heap[0][2]
                if young is not oldest and within(young) < within(oldest):
                    if accept is not None and not accept(young):
                        # Its filing stays the youngest, where a push would put it; the
                        # heap as that push leaves it (a new entry only where the newest
                        # one has another key).
                        self.push(young, self._filed[best_queue][-1][3], young=False)
                        return None
                    self._filed[best_queue].pop()
                    self._num_filed -= 1
                    return young  # its heap entry goes stale: skipped when met
            entry = best_heap[0]
            node = entry[2]
            # NOTE: trimmed before ``accept`` is asked, as after a pop: ``accept`` may
            # rejoin the run with its parent, which ends a filing the trim would meet.
            self._trim_oldest(best_queue, node)
            if accept is not None and not accept(node):
                # What a push of the run under its key would leave after the pop: the same
                # heap entry (its order and uid) as its newest, and a filing as the queue's
                # youngest.
                self._newest[entry[1]] = entry[3]
                filed = self._filed.get(best_queue)
                if filed is None:
                    filed = self._filed[best_queue] = deque()
                filed.append(entry)
                self._num_filed += 1
                return None
            return self._pop(best_heap)
        if accept is not None and not accept(best_heap[0][2]):
            self._newest[best_heap[0][1]] = best_heap[0][3]  # as the push after a pop leaves it
            return None
        return self._pop(best_heap)

    def _trim_oldest(self, queue: Key, taken: Node) -> None:
        """Drop from the bottom of ``queue``'s filing order ``taken`` (popped from the heap,
        about to go) and the filings below the first that may be live: the bottom holds the
        oldest filings, the ones a head pop leaves behind. Without this an evicted run
        stayed referenced there, with everything it holds, until a compaction (at 1 M GPU
        blocks, never: 344 MB of dropped runs' token arrays at the end of the whole Mooncake
        trace). A filing cannot be live where its node is gone, in use or on another tier
        (a tree's run: a node that comes back is filed anew) or was filed since under
        another key (its newest heap entry's key, no call to the policy); only those go, so
        no run's place in the order changes. A run filed again under another key leaves a
        stale filing behind it: checking the key here keeps such filings from holding the
        bottom, and with it every run dropped above them."""
        filed = self._filed.get(queue)
        if not filed:
            return
        tier = self.tier
        tree = self._tree
        newest = self._newest
        while filed:
            _, uid, node, key = filed[0]
            # NOTE: the tree's test only for a tree's runs: the nodes of a pool outside a
            # tree (the vLLM chunk pool's) have no parent, and trimming them all left the
            # young end empty after the first head pop.
            if (node is not taken and (not tree or (node.parent is not None
                                                    and not node.ref_count
                                                    and node.tier is tier))
                    and newest.get(uid) == key):
                return
            filed.popleft()
            self._num_filed -= 1

    def _youngest(self, queue: Key, current_key: Callable[[Node], Key | None]) -> Node | None:
        """The most recently filed live candidate of ``queue``; stale entries above it
        are dropped."""
        filed = self._filed.get(queue)
        tier = self.tier if self._tree else None
        while filed:
            _, _, node, key = filed[-1]
            # NOTE: a tree's run gone, in use or on another tier is no candidate (the
            # first tests of ``current_key``), no call: stale filings pile up at the young
            # end where a long path was onboarded or a host run's extensions dropped.
            if (tier is None or (node.parent is not None and not node.ref_count
                                 and node.tier is tier)) and current_key(node) == key:
                return node
            filed.pop()
            self._num_filed -= 1
        return None

    def _drop_filed(self, queue: Key) -> None:
        filed = self._filed.pop(queue, None)
        if filed is not None:
            self._num_filed -= len(filed)

    def _live_head(self, heap: list[_Entry], current_key: Callable[[Node], Key | None]) -> bool:
        """Drop stale entries from the top of ``heap`` until its head is current; False
        if none is left."""
        tier = self.tier if self._tree else None
        while heap:
            _, _, node, filed = heap[0]
            # NOTE: as in ``_youngest``: a tree's run gone, in use or on another tier is
            # no candidate of this pool (``current_key`` None), no call.
            if tier is not None and (node.parent is None or node.ref_count
                                     or node.tier is not tier):
                self._pop(heap)
                continue
            key = current_key(node)
            if key == filed:
                return True
            self._pop(heap)
            if key is not None:
                # A key that changed without a re-file (a retention ran out, a learned
                # policy's values moved): file it anew in the heaps, not as the youngest
                # of its queue (its filing-order place is where it was filed).
                self.push(node, key, young=False)
                self._num_repairs += 1
        return False

    def _entries(self) -> list[_Entry]:
        return [e for heap in (self._heap, *self._queues.values()) for e in heap]

    def forget_candidates(self) -> None:
        """Drop every heap entry: where no run of the pool is cached (the cache was
        cleared; stale, each kept a dropped run alive until a compaction), or before
        ``compact`` files the live ones again."""
        self._heap = []
        self._queues = {}
        self._ranked = {}
        self._checked = {}
        self._newest = {}
        self._num_entries = 0
        self._filed = {}
        self._num_filed = 0

    def compact(self, current_key: Callable[[Node], Key | None]) -> None:
        """Drop stale heap entries once they outnumber the live ones."""
        bound = self._compact_bound
        if self._num_entries <= bound and self._num_filed <= bound:
            return
        live = {}
        changed: dict[int, tuple[Node, Key]] = {}
        for entry in self._entries():
            node = entry[2]
            key = current_key(node)
            if key is None:
                continue
            if key == entry[3]:
                live[node.uid] = entry
            else:
                # A candidate whose key changed without a re-file (a retention that ran
                # out before the next round's ``expire``; every key at a caller's policy's
                # fault): filed again under its key now, as a pop would (``_live_head``),
                # never dropped: dropped, its blocks could never be evicted again.
                changed[node.uid] = (node, key)
        self.forget_candidates()
        entries = live.values()
        if self._both_ends:
            # Oldest release first, so each queue's filing order starts as its age order.
            entries = sorted(entries, key=lambda e: e[2].last_used)  # type: ignore[assignment]
        for _, _, node, key in entries:
            self.push(node, key)
        for uid, (node, key) in changed.items():
            if uid not in live:
                self.push(node, key, young=False)

    def _to_tuple_order(self) -> None:
        """Order every queue entry by the tuple of its key's fields after the queue fields
        (the same order), keeping which entries are one object (a heap's and a filing
        order's, a kept rank's head)."""
        nq = self._num_queue_fields
        new: dict[int, _Entry] = {}

        def convert(entry: _Entry) -> _Entry:
            out = new.get(id(entry))
            if out is None:
                key = entry[3]
                out = new[id(entry)] = (key[nq:], entry[1], entry[2], key)
            return out

        for heap in self._queues.values():
            heap[:] = map(convert, heap)  # the same order: still a heap
        for filed in self._filed.values():
            for i, entry in enumerate(filed):
                filed[i] = convert(entry)
        for q, (head, score) in list(self._ranked.items()):
            self._ranked[q] = (convert(head), score)
        self._checked.clear()

    def heap_nodes(self) -> list[Node]:
        """Nodes with an entry in the heap (stale or not); for invariant checks."""
        return [entry[2] for entry in self._entries()]
