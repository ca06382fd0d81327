"""Unit tests of ``kvtier.radix``: match, split / absorb_parent / cut_tail, walks.

Trees are built by hand with ``make_run``; ``tpb`` is 2 unless a test says otherwise.
"""

from __future__ import annotations

from array import array
from typing import Any

import pytest

from kvtier.matching import Match, PartialMatch, match, rematch
from kvtier.radix import (
    Node,
    Root,
    absorb_parent,
    add_child,
    block_key,
    cut_tail,
    path_to_root,
    remove_child,
    split,
    subtree,
    trim_tail,
)
from kvtier.tier import Tier

TPB = 2


def make_run(parent: Node, tokens: list[int], slots: list[int], tier: Tier = Tier.GPU,
             extras: list[object] | None = None) -> Node:
    """A run of ``len(slots)`` blocks hung under ``parent``."""
    assert len(tokens) == len(slots) * TPB
    node = Node(parent, list(tokens), list(slots), tier, extras,
                parent.start_block + parent.num_blocks, parent.root)
    add_child(parent, node)
    return node


def key(*tokens: int) -> bytes:
    """The key of a block of these ids (no extra): the ids packed as 64-bit ints."""
    return array("Q", tokens).tobytes()


def shape(node: Node) -> tuple[object, ...]:
    """Everything a split or absorb must keep consistent, children by identity."""
    # NOTE: copies: cut_tail trims the lists in place.
    return (list(node.tokens), list(node.slots), node.tier,
            None if node.extras is None else list(node.extras), node.key, node.start_block,
            None if node.hashes is None else list(node.hashes),
            {k: id(c) for k, c in node.children.items()},
            {k: [id(c) for c in v] for k, v in node.by_first.items()}, node.num_gpu_children,
            node.ref_count, node.priority, node.last_used)


# ---- match --------------------------------------------------------------------------------


def test_match_whole_runs() -> None:
    """Two whole runs on the path: both in ``path``, no tail, no partial."""
    # root ─ a[1 2 | 3 4] ─ b[5 6]
    root = Root(None, None)
    a = make_run(root, [1, 2, 3, 4], [0, 1])
    b = make_run(a, [5, 6], [2])
    m = match(root, [1, 2, 3, 4, 5, 6, 7], 6, TPB, None, True)
    assert m.path == [a, b] and m.tail is None and m.num_blocks == 3 and m.partial is None


def test_match_stops_inside_a_run_at_the_first_unequal_block() -> None:
    """A run matched in part is the tail, with the number of its blocks that match."""
    # root ─ a[1 2 | 3 4 | 5 6]; the request diverges in block 2
    root = Root(None, None)
    a = make_run(root, [1, 2, 3, 4, 5, 6], [0, 1, 2])
    m = match(root, [1, 2, 3, 4, 5, 9, 9], 6, TPB, None, False)
    assert m.path == [] and m.tail == (a, 2) and m.num_blocks == 2 and m.partial is None


@pytest.mark.parametrize("first_unequal", range(1, 9))
def test_match_gallops_to_every_divergence_point(first_unequal: int) -> None:
    """In a run of 9 one-token blocks, the match ends exactly at the first unequal block."""
    root = Root(None, None)
    run = Node(root, list(range(9)), list(range(9)), Tier.GPU, None, 0, root)
    add_child(root, run)
    tokens = list(range(9)) + [99]
    tokens[first_unequal] = 50
    m = match(root, tokens, len(tokens) - 1, 1, None, False)
    assert m.tail == (run, first_unequal) and m.num_blocks == first_unequal


def test_match_never_covers_the_last_token() -> None:
    """A prompt equal to a cached run reuses all but its last block (the last token is
    always computed)."""
    root = Root(None, None)
    a = make_run(root, [1, 2, 3, 4], [0, 1])
    m = match(root, [1, 2, 3, 4], 3, TPB, None, True)
    assert m.path == [] and m.tail == (a, 1) and m.num_blocks == 1
    assert m.partial == PartialMatch(a, 1, 1)  # token 3 of block 1


def test_match_finds_a_partial_block_in_the_tail() -> None:
    """Past the full blocks, the tail's next block gives the partial match."""
    # root ─ a[1 2 | 3 4]; request [1 2 3 9 9]: block 0 whole, then 1 token of block 1
    root = Root(None, None)
    a = make_run(root, [1, 2, 3, 4], [0, 1])
    m = match(root, [1, 2, 3, 9, 9], 4, TPB, None, True)
    assert m.tail == (a, 1) and m.partial == PartialMatch(a, 1, 1)
    assert match(root, [1, 2, 3, 9, 9], 4, TPB, None, False).partial is None


def test_match_picks_the_longest_partial_among_siblings() -> None:
    """Children sharing a first token compete; the one matching most tokens wins."""
    # tpb 4: root ─ p[1 1 1 1] ─┬─ x[5 6 6 6]
    #                           └─ y[5 8 8 1]     request [1 1 1 1 5 8 8 9 0]
    root = Root(None, None)
    p = Node(root, [1, 1, 1, 1], [0], Tier.GPU, None, 0, root)
    add_child(root, p)
    x = Node(p, [5, 6, 6, 6], [1], Tier.GPU, None, 1, root)
    y = Node(p, [5, 8, 8, 1], [2], Tier.HOST, None, 1, root)
    add_child(p, x)
    add_child(p, y)
    m = match(root, [1, 1, 1, 1, 5, 8, 8, 9, 0], 8, 4, None, True)
    assert m.path == [p] and m.tail is None and m.num_blocks == 1
    assert m.partial == PartialMatch(y, 0, 3)


def test_match_partial_stops_at_the_reusable_limit() -> None:
    """A partial match never covers the request's last token."""
    # tpb 4: root ─ x[5 6 7 8]; request [5 6 7]: 2 reusable tokens, both match
    root = Root(None, None)
    x = Node(root, [5, 6, 7, 8], [0], Tier.GPU, None, 0, root)
    add_child(root, x)
    m = match(root, [5, 6, 7], 2, 4, None, True)
    assert m.num_blocks == 0 and m.partial == PartialMatch(x, 0, 2)


def test_match_with_extra_keys() -> None:
    """A block carrying a multimodal extra key matches only a request with the same extra."""
    # root ─ a[1 2 {img} | 3 4]
    root = Root(None, None)
    a = make_run(root, [1, 2, 3, 4], [0, 1], extras=["img", None])
    assert a.key == (key(1, 2), "img")
    tokens = [1, 2, 3, 4, 5]
    assert match(root, tokens, 4, TPB, None, True) == ([], None, 0, None)
    assert match(root, tokens, 4, TPB, ["other", None, None], True) == ([], None, 0, None)
    m = match(root, tokens, 4, TPB, ["img", None, None], True)
    assert m.path == [a] and m.num_blocks == 2
    # The extra differs in block 1 only: block 0 matches, block 1 is no partial either.
    m = match(root, tokens, 4, TPB, ["img", "x", None], True)
    assert m.tail == (a, 1) and m.partial is None


def test_match_is_pure() -> None:
    """A match changes nothing in the tree."""
    root = Root(None, None)
    a = make_run(root, [1, 2, 3, 4, 5, 6], [0, 1, 2])
    b = make_run(a, [7, 8], [3])
    before = [shape(n) for n in subtree(root)]
    match(root, [1, 2, 3, 4, 5, 6, 7, 9, 0], 8, TPB, None, True)
    match(root, [1, 2, 3, 9], 3, TPB, None, True)
    assert [shape(n) for n in subtree(root)] == before and b.parent is a


def counts(m: Match) -> list[int]:
    """The block counts of the runs ``m`` went through (what ``rematch`` is given)."""
    return [len(n.slots) for n in m.path] + ([len(m.tail[0].slots)] if m.tail else [])


def same(m: Match, f: Match) -> bool:
    """Whether two matches meet the same runs (by identity) and blocks."""
    return (len(m.path) == len(f.path)
            and all(a is b for a, b in zip(m.path, f.path, strict=True))
            and m.tail == f.tail and m.num_blocks == f.num_blocks and m.partial == f.partial)


def test_rematch_goes_on_past_a_path_whose_runs_stayed() -> None:
    """A path that ended at a run's end goes on into a run stored since, without comparing
    the runs it went through again; the answer is a fresh match's."""
    # root ─ a[1 2 | 3 4] ─ b[5 6]   then   b ─ c[7 8]
    root = Root(None, None)
    a = make_run(root, [1, 2, 3, 4], [0, 1])
    b = make_run(a, [5, 6], [2])
    tokens = array("Q", [1, 2, 3, 4, 5, 6, 7, 8, 9, 9])
    m = match(root, tokens, 9, TPB, None, True)
    then = counts(m)
    c = make_run(b, [7, 8], [3])
    a.tier = Tier.HOST  # a tier move keeps a run's ids: the match stands
    again = rematch(m, then, root, tokens, 9, TPB, True)
    assert again is not None and again.path == [a, b, c] and again.num_blocks == 4
    assert same(again, match(root, tokens, 9, TPB, None, True))


def test_rematch_keeps_a_tail_and_finds_the_partial_again() -> None:
    """A tail whose run stayed is kept; the partial block is found on the tree as it is."""
    # root ─ a[1 2 | 3 4 | 5 6]: the prompt leaves it after 2 blocks, with [3 4] then [9 9]
    root = Root(None, None)
    a = make_run(root, [1, 2, 3, 4, 5, 6], [0, 1, 2])
    tokens = array("Q", [1, 2, 3, 4, 5, 9, 9])
    m = match(root, tokens, 6, TPB, None, True)
    assert m.tail == (a, 2) and m.partial == PartialMatch(a, 2, 1)
    again = rematch(m, counts(m), root, tokens, 6, TPB, True)
    assert again is not None and same(again, match(root, tokens, 6, TPB, None, True))


def two_runs_matched() -> tuple[Root, Node, Node, array[int], Match]:
    """root ─ a[1 2 | 3 4] ─ b[5 6 | 7 8], and the match of 1..9 through both."""
    root = Root(None, None)
    a = make_run(root, [1, 2, 3, 4], [0, 1])
    b = make_run(a, [5, 6, 7, 8], [2, 3])
    tokens = array("Q", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    return root, a, b, tokens, match(root, tokens, 8, TPB, None, True)


@pytest.mark.parametrize("surgery", ["split", "cut", "grow", "drop", "rejoin"])
def test_rematch_gives_up_where_a_run_it_went_through_moved(surgery: str) -> None:
    """A run split, cut, grown, dropped or rejoined since: None (match afresh)."""
    root, a, b, tokens, m = two_runs_matched()
    then = counts(m)
    if surgery == "split":
        split(b, 1, TPB)
    elif surgery == "cut":
        cut_tail(b, 1, TPB)
    elif surgery == "grow":
        b.tokens.extend(array("Q", [9, 9]))
        b.slots.append(4)
    elif surgery == "drop":
        remove_child(a, b)
        b.parent = None
    else:
        absorb_parent(b)  # b takes in a, its parent: one run of 4 blocks under the root
    assert rematch(m, then, root, tokens, 8, TPB, True) is None


def test_rematch_of_a_run_split_and_rejoined_stands() -> None:
    """A split undone (the same run again, same ids, same parent) leaves the match standing."""
    root, _, b, tokens, m = two_runs_matched()
    then = counts(m)
    split(b, 1, TPB)
    absorb_parent(b)
    again = rematch(m, then, root, tokens, 8, TPB, True)
    assert again is not None and same(again, match(root, tokens, 8, TPB, None, True))


def test_block_key_is_the_block_tokens_plus_its_extra() -> None:
    """A key is the block's tokens, with its extra appended when it has one."""
    assert block_key([1, 2, 3, 4, 5], 2, 2, None) == key(3, 4) == array("Q", [3, 4]).tobytes()
    assert block_key([1, 2, 3, 4, 5], 2, 2, ("h", 0)) == (key(3, 4), ("h", 0))
    assert block_key([1, 2, 3], 2, 2, None) == key(3)
    # The same key from a list of ids and from an array of them.
    ids = [1, 2, 3, 4, 5]
    assert block_key(array("Q", ids), 2, 2, "e") == block_key(ids, 2, 2, "e")


# ---- children ----------------------------------------------------------------------------


def test_add_and_remove_child_keep_the_buckets() -> None:
    """children, by_first and num_gpu_children follow add_child / remove_child."""
    root = Root(None, None)
    x = make_run(root, [5, 6], [0])
    y = make_run(root, [5, 7], [1], Tier.HOST)
    z = make_run(root, [8, 8], [2])
    assert root.children == {key(5, 6): x, key(5, 7): y, key(8, 8): z}
    assert root.by_first == {5: [x, y], 8: [z]} and root.num_gpu_children == 2
    remove_child(root, x)
    assert root.by_first == {5: [y], 8: [z]} and root.num_gpu_children == 1
    remove_child(root, y)
    remove_child(root, z)
    assert root.children == {} and root.by_first == {} and root.num_gpu_children == 0


def test_a_leaf_shares_one_empty_children_that_refuses_to_change() -> None:
    """A childless run allocates no dicts: every leaf shares one empty mapping as its
    ``children`` and ``by_first``, which refuses writes and copies as itself; the first
    child gives a run dicts of its own, the last one leaving takes them away, and split,
    cut_tail and absorb_parent keep the rule::

        root ─ [1 2 | 3 4 | 5 6]  split 1:  root ─ [1 2] ─ [3 4 | 5 6]
    """
    import copy
    import pickle

    root = Root(None, None)
    leaves = [make_run(root, [i, i], [i]) for i in range(3)]
    shared: dict[Any, Any] = leaves[0].children

    def shares(*maps: object) -> bool:
        return all(m is shared for m in maps)

    assert all(shares(n.children, n.by_first) for n in leaves)
    assert shared == {} and not shared and len(shared) == 0
    for write in (lambda: shared.__setitem__(b"k", root), lambda: shared.setdefault(1, []),
                  lambda: shared.update({1: []}), lambda: shared.pop(1), lambda: shared.clear()):
        with pytest.raises(TypeError, match="shared empty children"):
            write()
    assert shared == {}
    assert shares(copy.deepcopy(leaves[0]).children, copy.copy(shared))
    assert shares(pickle.loads(pickle.dumps(shared)))
    child = make_run(leaves[0], [9, 9], [5])
    assert type(leaves[0].children) is dict and leaves[0].children == {key(9, 9): child}
    assert leaves[0].by_first == {9: [child]} and shares(leaves[1].children)
    remove_child(leaves[0], child)
    assert shares(leaves[0].children, leaves[0].by_first)
    for leaf in leaves:
        remove_child(root, leaf)
    assert shares(root.children, root.by_first)
    n = make_run(root, [1, 2, 3, 4, 5, 6], [0, 1, 2])
    head = split(n, 1, TPB)
    assert head.children == {key(3, 4): n} and head.by_first == {3: [n]}
    assert shares(n.children)
    tail = cut_tail(n, 1, TPB)
    assert n.children == {key(5, 6): tail} and shares(tail.children)
    remove_child(n, tail)
    absorb_parent(n)
    assert shares(head.children, head.by_first, n.children)
    assert root.children == {key(1, 2): n}


# ---- split, absorb_parent, cut_tail -------------------------------------------------------


def make_three_block_run() -> tuple[Root, Node, Node]:
    """root ─ n[1 2 | 3 4 | 5 6] (GPU 7 8 9, hashes 70 80 90, ref 2) ─ c[7 8] (HOST 10)."""
    root = Root(None, None)
    n = make_run(root, [1, 2, 3, 4, 5, 6], [7, 8, 9], extras=[None, "e", None])
    n.hashes = [70, 80, 90]
    n.ref_count, n.priority, n.last_used = 2, 60, 5
    c = make_run(n, [7, 8], [10], Tier.HOST)
    return root, n, c


def test_split_keeps_the_tail_in_the_original_object() -> None:
    """split(n, 1) returns a new head [1 2]; n keeps [3 4 | 5 6] and its children."""
    # root ─ head[1 2 | 7] ─ n[3 4 | 5 6 | 8 9] ─ c[7 8]
    root, n, c = make_three_block_run()
    head = split(n, 1, TPB)
    assert head.parent is root and root.children == {key(1, 2): head} and root.by_first == {
        1: [head]}
    assert (list(head.tokens), head.slots.tolist(), head.extras, head.hashes, head.start_block) == (
        [1, 2], [7], [None], [70], 0)
    assert (head.ref_count, head.priority, head.last_used) == (2, 60, 5)
    assert head.children == {(key(3, 4), "e"): n} and head.by_first == {3: [n]}
    assert head.num_gpu_children == 1
    assert (list(n.tokens), n.slots.tolist(), n.extras, n.hashes, n.start_block, n.key) == (
        [3, 4, 5, 6], [8, 9], ["e", None], [80, 90], 1, (key(3, 4), "e"))
    assert n.parent is head and n.children == {key(7, 8): c} and c.parent is n
    assert list(path_to_root(c)) == [c, n, head]


def test_absorb_parent_undoes_split() -> None:
    """split then absorb_parent gives back the same run, in the same object."""
    root, n, c = make_three_block_run()
    before = shape(n)
    for k in (1, 2):
        head = split(n, k, TPB)
        absorb_parent(n)
        assert shape(n) == before and n.parent is root and root.children == {key(1, 2): n}
        assert root.by_first == {1: [n]} and c.parent is n
        assert head.parent is None and head.children == {} and head.by_first == {}


def test_cut_tail_keeps_the_head_in_the_original_object() -> None:
    """cut_tail(n, 2) leaves n as [1 2] and hangs a new tail [3 4 | 5 6] with n's children."""
    # root ─ n[1 2 | 7] ─ tail[3 4 | 5 6 | 8 9] ─ c[7 8]
    root, n, c = make_three_block_run()
    n.ref_count = 0
    tail = cut_tail(n, 2, TPB)
    assert root.children == {key(1, 2): n} and n.parent is root
    assert (list(n.tokens), n.slots.tolist(), n.extras, n.hashes) == ([1, 2], [7], [None], [70])
    assert n.children == {(key(3, 4), "e"): tail} and n.by_first == {3: [tail]}
    assert n.num_gpu_children == 1
    assert (list(tail.tokens), tail.slots.tolist(), tail.extras, tail.hashes, tail.start_block) == (
        [3, 4, 5, 6], [8, 9], ["e", None], [80, 90], 1)
    assert (tail.priority, tail.last_used, tail.ref_count) == (60, 5, 0)
    assert tail.children == {key(7, 8): c} and tail.by_first == {7: [c]} and c.parent is tail
    assert tail.num_gpu_children == 0


def test_absorb_parent_undoes_cut_tail() -> None:
    """cut_tail then absorb_parent gives one run again, in the tail's object."""
    root, n, c = make_three_block_run()
    n.ref_count = 0
    before = shape(n)
    tail = cut_tail(n, 1, TPB)
    absorb_parent(tail)
    assert shape(tail) == before and tail.parent is root and root.children == {key(1, 2): tail}
    assert root.by_first == {1: [tail]} and c.parent is tail


def test_trim_tail_leaves_what_cut_tail_then_removing_the_tail_leaves() -> None:
    """trim_tail(n, k) of a leaf leaves n as cut_tail and remove_child do, and names the
    blocks it dropped as the cut tail was named (first block, key, slots), with the uid
    drawn right after the one before it."""
    # root ─ n[1 2 | 3 4 | 5 6] (GPU 7 8 9, extras None e None, hashes 70 80 90)
    for k in (1, 2):
        shapes, tails = [], []
        for trim in (True, False):
            root = Root(None, None)
            n = make_run(root, [1, 2, 3, 4, 5, 6], [7, 8, 9], extras=[None, "e", None])
            n.hashes = [70, 80, 90]
            before = Node(None, [], [], Tier.GPU, None, 0, None).uid
            if trim:
                got = trim_tail(n, k, TPB)
                tails.append((got.uid - before, got.start_block, got.key, got.slots.tolist()))
            else:
                tail = cut_tail(n, k, TPB)
                remove_child(n, tail)
                tails.append((tail.uid - before, tail.start_block, tail.key, tail.slots.tolist()))
            shapes.append(shape(n))
        assert shapes[0] == shapes[1] and tails[0] == tails[1], k
    assert tails[0] == (1, 1, (key(3, 4), "e"), [8, 9])  # k == 2
    _, n, _ = make_three_block_run()
    n.ref_count = 0
    with pytest.raises(AssertionError):
        trim_tail(n, 1, TPB)  # not a leaf: its child hangs below the tail


def test_absorb_parent_fills_missing_extras_and_drops_half_hashes() -> None:
    """Absorbing a parent without extras pads them with None; hashes known on one side
    only are dropped (recomputed lazily)."""
    root = Root(None, None)
    head = make_run(root, [1, 2], [0])
    head.hashes = [1]
    node = make_run(head, [3, 4, 5, 6], [1, 2], extras=["a", None])
    absorb_parent(node)
    assert node.extras == [None, "a", None] and node.hashes is None
    assert (list(node.tokens), node.slots.tolist(), node.key) == (
        [1, 2, 3, 4, 5, 6], [0, 1, 2], key(1, 2))


def test_split_and_cut_tail_refuse_empty_halves() -> None:
    """Cutting at 0 or at the run's length is a bug in the caller: asserted."""
    _, n, _ = make_three_block_run()
    with pytest.raises(AssertionError):
        split(n, 0, TPB)
    with pytest.raises(AssertionError):
        split(n, 3, TPB)
    n.ref_count = 0
    with pytest.raises(AssertionError):
        cut_tail(n, 3, TPB)


# ---- walks -------------------------------------------------------------------------------


def test_subtree_lists_parents_before_children() -> None:
    """subtree is breadth first from the node itself."""
    # root ─┬─ a ─ c
    #       └─ b
    root = Root(None, None)
    a = make_run(root, [1, 1], [0])
    b = make_run(root, [2, 2], [1])
    c = make_run(a, [3, 3], [2])
    assert subtree(root) == [root, a, b, c]
    assert subtree(a) == [a, c]
    assert subtree(c) == [c]


def test_path_to_root_is_deepest_first_without_the_root() -> None:
    """path_to_root yields the node and its ancestors, never the root."""
    root = Root(None, None)
    a = make_run(root, [1, 1], [0])
    c = make_run(a, [3, 3], [2])
    assert list(path_to_root(c)) == [c, a]
    assert list(path_to_root(root)) == []
