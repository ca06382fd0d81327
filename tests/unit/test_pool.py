"""Unit tests of ``kvtier.pool.TierPool``: the free list's order, the books, the lazy heap."""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import partial

import pytest

from kvtier.pool import TierPool
from kvtier.radix import Node
from kvtier.tier import Tier

Key = tuple[int, int]


def make_node(first_token: int) -> Node:
    """A one-block node; only its identity (uid) matters to the pool."""
    return Node(None, [first_token], [first_token], Tier.GPU, None, 0, None)


def keys_of(current: dict[int, Key]) -> Callable[[Node], Key | None]:
    """A ``current_key`` callback reading each node's key now (absent: no candidate)."""
    return lambda node: current.get(node.uid)


def test_fresh_pool_hands_out_lowest_ids_first() -> None:
    """take() on a fresh pool returns 0, 1, 2, ... in order."""
    pool = TierPool(Tier.HOST, 5)
    assert pool.take(0).tolist() == []
    assert pool.take(2).tolist() == [0, 1]
    assert pool.take(1).tolist() == [2]
    assert pool.num_free == 2
    assert pool.take(2).tolist() == [3, 4] and pool.num_free == 0


def test_give_back_hands_the_first_slot_out_first() -> None:
    """Slots given back come out again in the order they were given."""
    pool = TierPool(Tier.GPU, 4)
    pool.take(4)
    pool.give_back([2, 0])
    pool.give_back([3])
    # free stack, top last: [0 2] then [3] on top
    assert pool.take(1).tolist() == [3]
    assert pool.take(2).tolist() == [2, 0]
    assert pool.num_free == 0


def test_take_more_than_free_is_asserted() -> None:
    """Taking more than the free list holds is a bug in the caller."""
    pool = TierPool(Tier.GPU, 2)
    with pytest.raises(AssertionError):
        pool.take(3)
    assert pool.num_free == 2


def test_books_free_cached_referenced() -> None:
    """capacity == free + cached + referenced; available == free + cached."""
    pool = TierPool(Tier.GPU, 8)
    assert (pool.num_free, pool.num_cached, pool.num_available) == (8, 0, 8)
    pool.take(5)  # 3 of them referenced by requests, 2 cached in unreferenced nodes
    pool.num_referenced = 3
    assert (pool.num_free, pool.num_cached, pool.num_available) == (3, 2, 5)
    assert pool.num_free + pool.num_cached + pool.num_referenced == pool.capacity


def test_pop_candidate_in_key_order_then_uid() -> None:
    """The smallest key goes first; equal keys go in filing (uid) order."""
    pool = TierPool(Tier.GPU, 4)
    a, b, c = make_node(1), make_node(2), make_node(3)
    current = {a.uid: (35, 7), b.uid: (0, 9), c.uid: (35, 7)}
    for node in (c, a, b):
        pool.push(node, current[node.uid])
    pop = keys_of(current)
    assert [pool.pop_candidate(pop) for _ in range(4)] == [b, a, c, None]


def test_pop_candidate_drops_stale_entries() -> None:
    """Entries of nodes that are no candidates any more (key None) are dropped."""
    pool = TierPool(Tier.GPU, 4)
    a, b = make_node(1), make_node(2)
    pool.push(a, (0, 1))
    pool.push(b, (0, 2))
    current = {b.uid: (0, 2)}  # a was claimed again: no candidate
    assert pool.pop_candidate(keys_of(current)) is b
    assert pool.heap_nodes() == []


def test_pop_candidate_refiles_a_changed_key() -> None:
    """A node whose key changed without a re-file (a retention ran out) is filed anew
    under its current key, not returned out of order."""
    pool = TierPool(Tier.GPU, 4)
    a, b = make_node(1), make_node(2)
    pool.push(a, (0, 1))  # filed at priority 0 ...
    pool.push(b, (20, 2))
    current = {a.uid: (35, 1), b.uid: (20, 2)}  # ... now the default priority 35
    pop = keys_of(current)
    assert pool.pop_candidate(pop) is b
    assert pool.heap_nodes() == [a]
    assert pool.pop_candidate(pop) is a


def test_pop_candidate_skips_an_entry_filed_under_an_older_key() -> None:
    """An entry filed under an older key is refiled under the current one: the node comes
    out at its current key, after b; once it is no candidate its other entry is dropped."""
    pool = TierPool(Tier.GPU, 4)
    a, b = make_node(1), make_node(2)
    pool.push(a, (0, 1))
    pool.push(b, (0, 5))
    pool.push(a, (0, 9))  # released again later: the newer key
    current = {a.uid: (0, 9), b.uid: (0, 5)}
    pop = keys_of(current)
    assert pool.pop_candidate(pop) is b
    assert pool.pop_candidate(pop) is a
    del current[a.uid]  # evicted
    assert pool.pop_candidate(pop) is None and pool.heap_nodes() == []


def test_compact_keeps_one_live_entry_per_node() -> None:
    """Past 2 * capacity + 64 entries, compact drops stale and duplicate entries."""
    pool = TierPool(Tier.GPU, 1)
    a, b = make_node(1), make_node(2)
    for t in range(70):
        pool.push(a, (0, t))
    pool.push(b, (0, 100))
    current = {a.uid: (0, 69)}  # b is no candidate
    pool.compact(keys_of(current))
    assert pool.heap_nodes() == [a]
    assert pool.pop_candidate(keys_of(current)) is a
    assert pool.pop_candidate(keys_of(current)) is None


def test_compact_below_the_threshold_changes_nothing() -> None:
    """A small heap is left alone, stale entries and all."""
    pool = TierPool(Tier.GPU, 1)
    a = make_node(1)
    for t in range(66):
        pool.push(a, (0, t))
    pool.compact(keys_of({}))
    assert len(pool.heap_nodes()) == 66


def make_queued(num_nodes: int) -> tuple[TierPool, list[int], Callable[[Node], Key | None],
                                         Callable[[Node], Key], list[int]]:
    """A pool with two queues (odd and even uids) holding ``num_nodes`` one-block nodes;
    returns it, the uids in order, the current-key callback, a rank that logs every node
    it ranks, and that log."""
    pool = TierPool(Tier.GPU, 8, num_queue_fields=1)
    nodes = [make_node(t) for t in range(num_nodes)]
    current = {n.uid: (n.uid % 2, n.uid) for n in nodes}
    for n in nodes:
        pool.push(n, current[n.uid])
    ranked: list[int] = []

    def rank(node: Node) -> Key:
        ranked.append(node.uid)
        return (0, node.uid)

    return pool, [n.uid for n in nodes], keys_of(current), rank, ranked


def test_queue_heads_are_ranked_once_per_rank_version() -> None:
    """With queues, a head ranked under a rank version is not ranked again while the
    version holds and it stays the head; a new version ranks every head afresh."""
    pool, (a, b, c, d), current_key, rank, ranked = make_queued(4)
    order = [pool.pop_candidate(current_key, rank, "v1") for _ in range(2)]
    # Pop 1 ranks both heads (a, b) and takes a; pop 2 ranks only c, the new head of a's queue.
    assert [n.uid for n in order if n is not None] == [a, b]
    assert ranked == [a, b, c]
    ranked.clear()
    last = [pool.pop_candidate(current_key, rank, "v2") for _ in range(2)]
    assert [n.uid for n in last if n is not None] == [c, d]
    assert sorted(ranked[:2]) == [c, d]  # a new version: both heads ranked again
    assert pool.pop_candidate(current_key, rank, "v2") is None


def test_queue_heads_are_ranked_at_every_pop_without_a_version() -> None:
    """rank_version None (a policy that keeps none): every pop ranks every head."""
    pool, (a, b, c), current_key, rank, ranked = make_queued(3)
    pool.pop_candidate(current_key, rank)
    pool.pop_candidate(current_key, rank)
    assert sorted(ranked[:2]) == [a, b] and sorted(ranked[2:]) == [b, c]


def make_two_ended(num_nodes: int, tree: bool = False
                   ) -> tuple[TierPool, list[Node], dict[int, Key]]:
    """A pool with one queue of ``num_nodes`` one-block nodes filed oldest first, keeping
    both ends (of a cache tree's runs with ``tree``); the nodes and their keys (queue 0,
    release order)."""
    pool = TierPool(Tier.GPU, 8, num_queue_fields=1, both_ends=True, tree=tree)
    nodes = [make_node(t) for t in range(num_nodes)]
    current = {n.uid: (0, i) for i, n in enumerate(nodes)}
    for n in nodes:
        pool.push(n, current[n.uid])
    return pool, nodes, current


def test_a_two_ended_queue_gives_its_youngest_where_within_values_it_less() -> None:
    """The winning queue gives its youngest run when ``within`` values it below the head,
    else its head; a tail taken leaves its heap entry stale, skipped when met."""
    pool, (a, b, c, d), current = make_two_ended(4)
    current_key = keys_of(current)

    def rank(node: Node) -> Key:
        return current[node.uid]

    value = {a.uid: 1.0, b.uid: 2.0, c.uid: 3.0, d.uid: 0.5}  # the youngest, d, least

    def within(node: Node) -> float:
        return value[node.uid]

    def pop() -> Node | None:
        node = pool.pop_candidate(current_key, rank, None, within)
        if node is not None:
            del current[node.uid]  # evicted: no candidate any more
        return node

    assert pop() is d  # youngest, valued below the head a
    assert pop() is a  # the youngest now is c (3.0), above a (1.0): the head
    assert pop() is b  # c above b: the head again
    assert pop() is c  # d's stale heap entry was skipped on the way
    assert pop() is None
    # Without ``within`` the same pool gives heads only.
    pool, nodes, current = make_two_ended(3)
    assert [pool.pop_candidate(keys_of(current), lambda n: current[n.uid])
            for _ in range(3)] == nodes


def test_a_head_taken_keeps_the_young_end_of_a_pool_of_plain_nodes() -> None:
    """In a pool of nodes outside a cache tree (``tree=False``: the vLLM chunk pool's, none
    with a parent), a head taken trims only itself from the filing order: the live filings
    above it stay, so a later pop can still give the youngest. Before, the tree's test
    (no parent: a run gone) trimmed every filing, and the pool gave heads only after its
    first head pop."""
    pool, (a, b, c, d), current = make_two_ended(4)
    value = {a.uid: 0.0, b.uid: 2.0, c.uid: 3.0, d.uid: 5.0}  # first the head a goes

    def pop() -> Node | None:
        node = pool.pop_candidate(keys_of(current), lambda n: current[n.uid], None,
                                  lambda n: value[n.uid])
        if node is not None:
            del current[node.uid]
        return node

    assert pop() is a
    value[d.uid] = 1.0  # now the youngest, d, is worth less than the head b
    assert pop() is d
    assert pop() is b  # c (3.0) above b (2.0)
    assert pop() is c
    assert pop() is None


def test_a_two_ended_queue_skips_stale_young_entries_and_stays_bounded() -> None:
    """A youngest entry filed under a key the node no longer has is dropped, not taken;
    and the filing-order stacks do not grow with the history: a compaction rebuilds them
    (oldest release first) once they outnumber the live candidates."""
    pool, (_, b, c), current = make_two_ended(3)
    current[c.uid] = (0, 99)  # c's key moved without a re-file: its entry is stale
    got = pool.pop_candidate(keys_of(current), lambda n: current[n.uid], None,
                             lambda n: 0.0 if n is b else 1.0)
    assert got is b  # the youngest entry still current, valued below the head a
    # Many cycles of file and evict at the heads: the stacks keep only what is live.
    pool = TierPool(Tier.GPU, 4, num_queue_fields=1, both_ends=True)
    live: dict[int, Key] = {}
    for t in range(2000):
        n = make_node(t)
        live[n.uid] = (0, t)
        pool.push(n, live[n.uid])
        pool.compact(keys_of(live))
        if len(live) > 3:
            head = pool.pop_candidate(keys_of(live), lambda n: live[n.uid])
            assert head is not None
            del live[head.uid]
    assert pool._num_filed <= 2 * pool.capacity + 64 + 1
    young = pool.pop_candidate(keys_of(live), lambda n: live[n.uid], None,
                               lambda n: -live[n.uid][1])
    assert young is not None and live[young.uid] == max(live.values())


def test_a_head_taken_leaves_no_reference_in_the_filing_order() -> None:
    """A run popped at its queue's head (the oldest) leaves the filing order at once, with
    the filings below the first that may be live (a node gone, in use or on another
    tier): an evicted run kept referenced there kept everything it holds alive until a
    compaction (on a long stream, a garbage collection every few admissions walking the
    young token lists). A filing that may be live stays, whatever is above it."""
    pool, (a, b, c, d, e), current = make_two_ended(5, tree=True)
    parent = make_node(100)
    for n in (a, b, c, d, e):
        n.parent = parent  # in a tree: cached

    def pop() -> Node | None:
        node = pool.pop_candidate(keys_of(current), lambda n: current[n.uid], None,
                                  lambda n: 1.0)  # every run alike: the head goes
        if node is not None:
            del current[node.uid]
            node.parent = None  # evicted
        return node

    def filed() -> list[Node]:
        return [entry[2] for entry in pool._filed.get((0,), ())]

    b.ref_count = 1  # claimed by a request: no candidate, its filing cannot be live
    del current[b.uid]
    assert pop() is a and filed() == [c, d, e]  # a and b's filing gone
    d.parent = None  # gone some other way (its filing is in the middle: it waits)
    del current[d.uid]
    assert pop() is c and filed() == [e]  # c, then d's filing, now at the bottom
    assert pool._num_filed == 1
    assert pop() is e and filed() == [] and pop() is None


def test_a_run_filed_again_under_another_key_does_not_hold_the_bottom() -> None:
    """A run filed again under another key leaves its old filing at the bottom of the
    filing order; that filing is stale (not its newest heap entry's key) and goes with the
    next head taken, and so do the runs dropped above it. Before, it held the bottom while
    the run lived, and every run dropped above it stayed referenced there (7,988 at the peak
    of Mooncake 3,000 at 16,384 + 65,536 GPU + host blocks, 2,205 now)."""
    pool, (a, b, c, d), current = make_two_ended(4, tree=True)
    parent = make_node(100)
    for n in (a, b, c, d):
        n.parent = parent
    current[a.uid] = (0, 10)
    pool.push(a, current[a.uid])  # a released again: newest filing on top
    c.parent = None  # dropped from the middle
    del current[c.uid]

    def filed() -> list[Node]:
        return [entry[2] for entry in pool._filed[(0,)]]

    assert filed() == [a, b, c, d, a]
    head = pool.pop_candidate(keys_of(current), lambda n: current[n.uid], None,
                              lambda n: 1.0)  # every run alike: the head goes
    assert head is b
    assert filed() == [d, a]  # a's old filing, b taken and c dropped: all gone


def test_a_refile_under_the_same_key_adds_no_heap_entry_but_makes_the_run_youngest() -> None:
    """A run filed again under the key its heap entry still has (a parent whose child
    left, a run put back) gets no second heap entry, which would only pop as stale later;
    the filing order still takes it as its queue's youngest. Once its entry has left the
    heap, filing it again adds one."""
    pool, (a, b, c), current = make_two_ended(3)
    assert pool._num_entries == 3
    pool.push(a, current[a.uid])  # a again, unchanged
    assert pool._num_entries == 3 and pool._filed[(0,)][-1][2] is a

    def within(node: Node) -> float:
        return 0.0 if node is a else 1.0  # the youngest, a, valued least

    assert pool.pop_candidate(keys_of(current), lambda n: current[n.uid], None, within) is a
    # a's heap entry is still there (taken from the filing order); put back unchanged:
    pool.push(a, current[a.uid])
    assert pool._num_entries == 3
    assert pool.pop_candidate(keys_of(current), lambda n: current[n.uid]) is a  # the head
    assert pool._num_entries == 2
    pool.push(a, current[a.uid])  # its entry left the heap: a new one
    assert pool._num_entries == 3
    assert [pool.pop_candidate(keys_of(current), lambda n: current[n.uid])
            for _ in range(3)] == [a, b, c]


def test_a_queue_orders_by_the_fields_after_the_queue_fields_whatever_their_length() -> None:
    """A queue's heap orders its runs as their whole keys order them, then by uid: by the
    one field after the queue fields where keys have one (a number), and as before once a
    key of another length is filed into the pool (every entry turned to a tuple, kept
    heads and filing order with it: no number meets a tuple in a comparison)::

        queue 0:  keys (0, 5) (0, 2) (0, 2) (0, 9)      then (0, 3, 1) (0, 3) (0, 3, 0)
        pops:     2 (the lower uid first), 2, 5, ...     then 3, (3, 0), (3, 1), 5, 9
    """
    for mixed in (False, True):
        pool = TierPool(Tier.GPU, 16, num_queue_fields=1, both_ends=True)
        nodes = [make_node(t) for t in range(7)]
        keys = [(0, 5), (0, 2), (0, 2), (0, 9), (0, 3, 1), (0, 3), (0, 3, 0)]
        if not mixed:
            keys = keys[:4] + [(0, 4), (0, 3), (0, 1)]
        current: dict[int, tuple[int, ...]] = {}

        def current_key(node: Node, current: dict[int, tuple[int, ...]] = current
                        ) -> tuple[int, ...] | None:
            return current.get(node.uid)

        for i, (n, k) in enumerate(zip(nodes, keys, strict=True)):
            current[n.uid] = k
            pool.push(n, k)
            if i == 3:  # a pop between the pushes: a kept head's rank, a filing order
                assert pool.pop_candidate(current_key, lambda n: (0, n.uid), "v",
                                          lambda n: 0.0) is nodes[1]
                del current[nodes[1].uid]
        popped = []
        while (got := pool.pop_candidate(current_key, lambda n: (0, n.uid), "v",
                                         lambda n: 0.0)) is not None:
            popped.append(nodes.index(got))
            del current[got.uid]
        assert popped == sorted([0, 2, 3, 4, 5, 6], key=lambda i: (keys[i], nodes[i].uid))
    assert popped == [2, 5, 6, 4, 0, 3]  # mixed: 2 (0, 2); 5 (0, 3); 6 (0, 3, 0); 4 (0, 3, 1)


def test_queue_heads_found_live_are_checked_again_only_under_a_new_check_version() -> None:
    """With a check version, a queue head found live is not checked again at a later pop
    while the version holds (only a queue's new head is); a new version checks every
    head again, so a head that stopped being a candidate meanwhile is dropped, not taken;
    without a version every pop checks every head::

        queue 0: a(1) c(3)     queue 1: b(2) d(4)     (rank: the number)
    """
    for version in (1, None):
        pool = TierPool(Tier.GPU, 8, num_queue_fields=1)
        a, b, c, d = (make_node(t) for t in range(4))
        current = {a.uid: (0, 1), c.uid: (0, 3), b.uid: (1, 2), d.uid: (1, 4)}
        for n in (a, b, c, d):
            pool.push(n, current[n.uid])
        checked: list[int] = []

        def current_key(node: Node, current: dict[int, Key] = current,
                        checked: list[int] = checked) -> Key | None:
            checked.append(node.uid)
            return current.get(node.uid)

        def rank(node: Node, current: dict[int, Key] = current) -> Key:
            return (current[node.uid][1], 0)

        got = [pool.pop_candidate(current_key, rank, "r", check_version=version)
               for _ in range(3)]
        assert got == [a, b, c]
        if version is None:  # every head at every pop
            assert checked == [a.uid, b.uid, c.uid, b.uid, c.uid, d.uid]
            continue
        # Pop 1 checks both heads; pop 2 only c (b's queue kept its head); pop 3 only d.
        assert checked == [a.uid, b.uid, c.uid, d.uid]
        del current[d.uid]  # d stops being a candidate: its caller moves the version on
        assert pool.pop_candidate(current_key, rank, "r", check_version=2) is None
        assert set(checked[4:]) == {d.uid}


def test_a_tree_pool_drops_gone_used_or_moved_runs_without_asking_and_pops_the_same() -> None:
    """A pool of a cache tree's runs (``tree``) drops an entry whose run is gone (no
    parent), in use or on another tier without calling ``current_key`` (whose answer
    for such a run is None), at a heap's head and at a queue's young end; and over
    random filings, changes and pops it takes exactly the runs, in exactly the order, of
    a pool that asks for every entry (as the vLLM chunk pool, whose nodes have no
    parent, does), with fewer calls."""
    rng = random.Random(7)
    calls = [0, 0]  # calls to current_key, in all: the asking pool's, the tree pool's
    for trial in range(30):
        root = Node(None, [], [], Tier.GPU, None, 0, None)
        nodes = [Node(root, [t], [t], Tier.GPU, None, 0, None) for t in range(40)]
        pools = [TierPool(Tier.GPU, 64, num_queue_fields=1, both_ends=True, tree=tree)
                 for tree in (False, True)]
        current: dict[int, Key] = {}

        def current_key(node: Node, side: int,
                        current: dict[int, Key] = current) -> Key | None:
            calls[side] += 1
            if node.parent is None or node.ref_count or node.tier is not Tier.GPU:
                return None
            return current.get(node.uid)

        def rank(node: Node, current: dict[int, Key]) -> Key:
            return (current[node.uid][1], 0)

        popped: list[list[int]] = [[], []]
        for _ in range(300):
            op = rng.random()
            n = rng.choice(nodes)
            if op < 0.45:  # (re-)file under a key, maybe a new one
                if n.parent is None:
                    n.parent = root
                n.ref_count, n.tier = 0, Tier.GPU
                current[n.uid] = (rng.randrange(3), rng.randrange(50))
                for pool in pools:
                    pool.push(n, current[n.uid])
            elif op < 0.55:
                n.parent = None  # dropped
            elif op < 0.65:
                n.ref_count = 1  # claimed
            elif op < 0.72:
                n.tier = Tier.HOST  # offloaded
            elif op < 0.76:
                current[n.uid] = (rng.randrange(3), rng.randrange(50))  # changed, no re-file
            else:
                for side, pool in enumerate(pools):
                    got = pool.pop_candidate(
                        partial(current_key, side=side), partial(rank, current=current),
                        None, lambda x: float(x.uid % 5), None)
                    popped[side].append(-1 if got is None else got.uid)
                if popped[0][-1] >= 0:
                    current.pop(popped[0][-1], None)
        assert popped[0] == popped[1], trial
        assert calls[1] <= calls[0], (trial, calls)
    assert calls[1] < calls[0], calls
    # At a heap's head and at the young end: no call for a run gone, used or moved.
    root = Node(None, [], [], Tier.GPU, None, 0, None)
    a, b, c, d = (Node(root, [t], [t], Tier.GPU, None, 0, None) for t in range(4))
    pool = TierPool(Tier.GPU, 8, num_queue_fields=1, both_ends=True, tree=True)
    keys = {x.uid: (0, i) for i, x in enumerate((a, b, c, d))}
    for x in (a, b, c, d):
        pool.push(x, keys[x.uid])
    asked: list[Node] = []

    def ask(node: Node) -> Key | None:
        asked.append(node)
        if node.parent is None or node.ref_count or node.tier is not Tier.GPU:
            return None
        return keys[node.uid]

    a.parent = None
    b.ref_count = 1
    d.tier = Tier.HOST  # the youngest
    assert pool.pop_candidate(ask, lambda x: keys[x.uid], None, lambda x: 0.0) is c
    # The head pass asks for the head a (twice: the reading pass, then the full one); the
    # heap's stale top then goes without a call (a, b: was a, a, b), c is asked; the young
    # end's top d is asked, then dropped without a second call (was d, d), c asked.
    assert asked == [a, a, c, d, c]


def pool_state(pool: TierPool) -> tuple[object, ...]:
    """Everything a later pop can depend on: each queue's heap entries (as a multiset: the
    order in which equal heaps pop is the entries' order), filing orders, the newest key of
    each node, and the counts that make a compaction due."""
    heaps = {q: sorted((e[0], e[1], e[3]) for e in heap)
             for q, heap in [((), pool._heap), *pool._queues.items()] if heap}
    filed = {q: [(e[1], e[3]) for e in order] for q, order in pool._filed.items() if order}
    return heaps, filed, dict(pool._newest), pool._num_entries, pool._num_filed


@pytest.mark.parametrize(("num_queue_fields", "both_ends"), [(0, False), (1, False), (1, True)])
def test_a_pop_refused_by_accept_leaves_the_pool_as_a_pop_and_push_back(
        num_queue_fields: int, both_ends: bool) -> None:
    """A pop whose run ``accept`` refuses returns None and leaves the pool exactly as the
    pop of that run followed by its push under its key leaves it (what a bound on the host
    room did): over random filings, changes without a re-file, drops, claims and bounded
    pops, the two pools pop the same runs and hold the same heaps (as multisets), filing
    orders, newest keys and counts after every operation."""
    rng = random.Random(13 + num_queue_fields + 2 * both_ends)
    refused = 0
    for trial in range(30):
        root = Node(None, [], [], Tier.GPU, None, 0, None)
        nodes = [Node(root, [t], [t], Tier.GPU, None, 0, None) for t in range(30)]
        # 0: with ``accept``; 1: the reference, a pop and a push back of a run not below.
        pools = [TierPool(Tier.GPU, 64, num_queue_fields=num_queue_fields,
                          both_ends=both_ends, tree=True) for _ in range(2)]
        current: dict[int, Key] = {}
        filed: dict[int, list[Key]] = {}  # every key a node was filed under

        def current_key(node: Node, current: dict[int, Key] = current) -> Key | None:
            if node.parent is None or node.ref_count or node.tier is not Tier.GPU:
                return None
            return current.get(node.uid)

        def rank(node: Node, current: dict[int, Key] = current) -> Key:
            return (current[node.uid][1], node.uid % 3)

        for _ in range(250):
            op = rng.random()
            n = rng.choice(nodes)
            if op < 0.4:  # (re-)file under a key, maybe a new one
                n.parent, n.ref_count = root, 0
                current[n.uid] = (rng.randrange(3), rng.randrange(40))
                filed.setdefault(n.uid, []).append(current[n.uid])
                for pool in pools:
                    pool.push(n, current[n.uid])
            elif op < 0.45:
                n.parent = None  # dropped
            elif op < 0.49:
                n.ref_count = 1  # claimed
            elif op < 0.53 and n.uid in current:  # changed without a re-file
                current[n.uid] = (rng.randrange(3), rng.randrange(40))
            elif op < 0.6 and n.uid in filed:  # back to a key filed before, no re-file
                current[n.uid] = rng.choice(filed[n.uid])
            else:
                below = (rng.randrange(40), rng.randrange(3))
                within = (lambda x: float(x.uid % 5)) if both_ends else None

                def is_below(node: Node, below: Key = below) -> bool:
                    return rank(node) < below

                got = pools[0].pop_candidate(current_key, rank, None, within, None, is_below)
                ref = pools[1].pop_candidate(current_key, rank, None, within, None)
                if ref is not None and rank(ref) >= below:
                    key = current_key(ref)
                    assert key is not None
                    pools[1].push(ref, key)
                    ref = None
                    refused += 1
                assert got is ref, trial
                if got is not None:
                    current.pop(got.uid, None)
                    got.parent = None  # it leaves
            assert pool_state(pools[0]) == pool_state(pools[1]), trial
    assert refused > 100, refused


@pytest.mark.parametrize("both_ends", [False, True])
def test_a_refused_head_filed_under_an_older_key_becomes_its_newest(both_ends: bool) -> None:
    """A head whose key went back to one it was filed under before (no re-file since: its
    newest entry, in another queue, has another key) and that ``accept`` refuses is left
    with that key as its newest, as the push back after a pop left it."""
    root = Node(None, [], [], Tier.GPU, None, 0, None)
    x, y = (Node(root, [t], [t], Tier.GPU, None, 0, None) for t in range(2))
    # 0: with ``accept``; 1: a pop and a push back.
    pools = [TierPool(Tier.GPU, 8, num_queue_fields=1, both_ends=both_ends, tree=True)
             for _ in range(2)]
    current = {x.uid: (0, 5), y.uid: (1, 3)}
    for pool in pools:
        pool.push(x, (0, 5))
        pool.push(y, (1, 3))
        pool.push(x, (1, 7))  # x's newest entry: queue 1, behind y
    current[x.uid] = (0, 5)  # back to its first key, not filed again
    #   queue 0: [x (0, 5)]          queue 1: [y (1, 3), x (1, 7) stale]
    rank = {x.uid: (0,), y.uid: (1,)}  # x's queue wins

    def within(n: Node) -> float:
        return 0.0

    assert pools[0].pop_candidate(keys_of(current), lambda n: rank[n.uid], None,
                                  within if both_ends else None, None, lambda n: False) is None
    assert pools[1].pop_candidate(keys_of(current), lambda n: rank[n.uid], None,
                                  within if both_ends else None, None) is x
    pools[1].push(x, (0, 5))
    assert pools[0]._newest[x.uid] == (0, 5)
    assert pool_state(pools[0]) == pool_state(pools[1])
