"""The radix tree of cached blocks: one tree for all tiers, compressed along runs.

A :class:`Node` is a run of consecutive full blocks on one path that share a tier, a
reference count and an eviction key. Runs keep Python work per *run*, not per block: a match
compares a whole run's tokens with one C-level list comparison, and an insert stores a run
with one slice. Runs split wherever the tree branches, a request's claim ends, or eviction
takes the tail of a run::

    root ─ [b0 b1 b2 | GPU] ─┬─ [b3 b4 | GPU] ─ [b5 | HOST]
                             └─ [c3 | HOST]

Invariants kept by the manager (checked in ``check_invariants``):
  * tiers never get faster going down a path (GPU* then HOST*), so a cached prefix is at
    least as close to the GPU as its extensions;
  * ``ref_count(parent) >= ref_count(child)``: a request references a whole path prefix.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, NoReturn

from kvtier.slots import slot_array
from kvtier.tier import Tier

_uids = itertools.count(1)


def next_uid() -> int:
    """The uid the next node will get (none is drawn)."""
    global _uids
    uid = next(_uids)
    _uids = itertools.count(uid)
    return uid


def reserve_uids(upto: int) -> None:
    """Make every later uid at least ``upto``: a tree unpickled in another process (whose
    nodes were numbered by that process's counter) meets no new node of the same uid."""
    global _uids
    _uids = itertools.count(max(next_uid(), upto))

BlockKey = bytes | tuple[bytes, object]


class _NoEntries(dict[Any, Any]):
    """The one empty ``children`` (and ``by_first``) every childless run shares until it
    gets a child (``add_child``, ``split`` and ``cut_tail`` give it a dict of its own): most
    runs are leaves, and a dict per leaf was two allocations per run, counted by the garbage
    collector, whose collections (paced by allocations) scan the caller's prompts.
    Refuses to change; copies and pickles as itself."""

    __slots__ = ()

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("the shared empty children of a leaf cannot change")

    __setitem__ = __delitem__ = __ior__ = setdefault = update = pop = popitem = clear = _refuse

    def __copy__(self) -> _NoEntries:
        return self

    def __deepcopy__(self, memo: object) -> _NoEntries:
        return self

    def __reduce__(self) -> str:
        return "_NO_ENTRIES"


_NO_ENTRIES = _NoEntries()


def block_key(tokens: Sequence[int], start: int, tokens_per_block: int,
              extra: object) -> BlockKey:
    """The key of the block at ``tokens[start:]`` among its siblings: its tokens packed as
    64-bit ids, paired with its multimodal extra key when it has one. Siblings never share
    a key."""
    block = tokens[start : start + tokens_per_block]
    key = (block if type(block) is array else array("Q", block)).tobytes()
    return key if extra is None else (key, extra)


class Node:
    """A run of cached blocks; ``tier`` and ``slots`` say where their KV lives.

    NOTE: ``tokens`` is an ``array('Q')``, not a list: it compares at C speed like a list,
    the garbage collector never walks it (a cache of a million blocks holds tens of millions
    of ids), and dropping a run frees one buffer instead of its ids one by one.
    """

    __slots__ = (
        "by_first",
        "children",
        "created_s",
        "expiry",
        "extras",
        "hashes",
        "key",
        "last_used",
        "last_used_s",
        "num_accesses",
        "num_gpu_children",
        "parent",
        "priority",
        "prompt_end_block",
        "ref_count",
        "reuse_class",
        "root",
        "slots",
        "soft_claimed",
        "start_block",
        "tier",
        "tokens",
        "turn",
        "uid",
    )

    def __init__(
        self,
        parent: Node | None,
        tokens: Sequence[int],
        slots: Sequence[int],
        tier: Tier,
        extras: list[object] | None,
        start_block: int,
        root: Root | None,
    ) -> None:
        self.parent = parent
        self.children: dict[BlockKey, Node] = _NO_ENTRIES
        # The children again, by first token: the candidates of a partial match.
        self.by_first: dict[int, list[Node]] = _NO_ENTRIES
        # How many children are on the GPU: a GPU run is an eviction candidate only with
        # none. Kept, not derived, so a node with many children answers in O(1).
        self.num_gpu_children = 0
        self.tokens: array[int] = tokens if type(tokens) is array else array("Q", tokens)
        # NOTE: an ``array('q')`` (``kvtier.slots``): a run's slots are sliced, joined and
        # recorded into plans by memcpy, never an int object each.
        self.slots: array[int] = slot_array(slots)
        self.tier = tier
        self.extras = extras
        self.key: BlockKey = block_key(self.tokens, 0, len(tokens) // max(len(slots), 1),
                                       extras[0] if extras else None) if slots else b""
        self.start_block = start_block
        self.root = root
        self.ref_count = 0
        self.priority = 0
        self.expiry: float | None = None
        self.last_used = 0
        # What an online eviction policy may know of the run (kept by the cache): the
        # clock's time of its last release and of its store, how many claims took it, the
        # class its last release filed it under (None: no release open, see
        # ``kvtier.eviction.ReuseLearner``), and whether a waiting request will reuse it.
        self.last_used_s = 0.0
        self.created_s = 0.0
        self.num_accesses = 0
        self.reuse_class: int | None = None
        self.soft_claimed = False
        # The session of the request that stored the run: its turn (1: the first; 0: not
        # known) and where its prompt's full blocks end (absolute block index). A request
        # whose reused prefix covers that prompt continues the session (``BlockCache.turn``).
        self.turn = 0
        self.prompt_end_block = 0
        self.hashes: list[int] | None = None
        self.uid = next(_uids)

    @property
    def num_blocks(self) -> int:
        return len(self.slots)

    def iter_children(self) -> Iterator[Node]:
        return iter(self.children.values())

    def __repr__(self) -> str:
        return (
            f"Node(uid={self.uid}, blocks={self.start_block}+{self.num_blocks}, "
            f"tier={self.tier.name}, slots={self.slots.tolist()}, ref={self.ref_count})"
        )


class Root(Node):
    """The root of one key space: requests with other LoRA ids or salts never meet."""

    __slots__ = ("lora_id", "num_changes", "num_users", "salt")

    def __init__(self, lora_id: object, salt: object) -> None:
        super().__init__(None, [], [], Tier.GPU, None, 0, None)
        self.root = self
        self.lora_id = lora_id
        self.salt = salt
        # Counts every change of the tree's shape or ids below (each function here that
        # changes them counts it): a match found under this count still holds while it
        # stays (``BlockCache.match``).
        self.num_changes = 0
        # Live requests (and calls in progress) under this root: an empty root is dropped
        # only when it has none, so memory does not grow with the salts ever seen.
        self.num_users = 0


def _changed(node: Node) -> None:
    """The tree under ``node``'s root changes its shape or ids."""
    root = node.root
    assert root is not None, node
    root.num_changes += 1


def add_child(parent: Node, child: Node) -> None:
    _changed(parent)
    if parent.children is _NO_ENTRIES:
        parent.children = {}
        parent.by_first = {}
    parent.children[child.key] = child
    if child.tier is Tier.GPU:
        parent.num_gpu_children += 1
    parent.by_first.setdefault(child.tokens[0], []).append(child)


def remove_child(parent: Node, child: Node) -> None:
    _changed(parent)
    del parent.children[child.key]
    if child.tier is Tier.GPU:
        parent.num_gpu_children -= 1
    first = child.tokens[0]
    bucket = parent.by_first[first]
    if len(bucket) == 1:
        del parent.by_first[first]
    else:
        bucket.remove(child)
    if not parent.children:  # a leaf again: its dicts go
        parent.children = parent.by_first = _NO_ENTRIES


def copy_stats(src: Node, dst: Node) -> None:
    """Give ``dst``, a part of ``src`` cut off, ``src``'s eviction key and statistics."""
    dst.priority = src.priority
    dst.expiry = src.expiry
    dst.last_used = src.last_used
    dst.last_used_s = src.last_used_s
    dst.created_s = src.created_s
    dst.num_accesses = src.num_accesses
    dst.reuse_class = src.reuse_class
    dst.soft_claimed = src.soft_claimed
    dst.turn = src.turn
    dst.prompt_end_block = src.prompt_end_block


def split(node: Node, num_head_blocks: int, tokens_per_block: int) -> Node:
    """Cut ``node`` after ``num_head_blocks`` blocks and return the new head node.

    NOTE: the original object keeps the tail, so every request whose path ends at or below
    ``node`` still ends at the right object, and heap entries of ``node`` stay valid.
    """
    assert 0 < num_head_blocks < node.num_blocks, (num_head_blocks, node)
    _changed(node)
    cut = num_head_blocks * tokens_per_block
    parent = node.parent
    assert parent is not None
    head = Node(
        parent,
        node.tokens[:cut],
        node.slots[:num_head_blocks],
        node.tier,
        node.extras[:num_head_blocks] if node.extras is not None else None,
        node.start_block,
        node.root,
    )
    head.ref_count = node.ref_count
    copy_stats(node, head)
    if node.hashes is not None:
        head.hashes = node.hashes[:num_head_blocks]
        node.hashes = node.hashes[num_head_blocks:]
    parent.children[node.key] = head
    bucket = parent.by_first[node.tokens[0]]
    bucket[bucket.index(node)] = head
    node.parent = head
    node.tokens = node.tokens[cut:]
    node.slots = node.slots[num_head_blocks:]
    if node.extras is not None:
        node.extras = node.extras[num_head_blocks:]
    node.start_block += num_head_blocks
    node.key = block_key(node.tokens, 0, tokens_per_block,
                         node.extras[0] if node.extras is not None else None)
    head.children = {node.key: node}
    head.by_first = {node.tokens[0]: [node]}
    head.num_gpu_children = int(node.tier is Tier.GPU)
    return head


def absorb_parent(node: Node) -> None:
    """Undo a :func:`split`: ``node`` takes in its parent, whose only child it is.

    The caller checks that the two are one run in all but name (same tier, refs and key).
    ``node`` keeps its identity, like a split's tail, so requests ending at it stay right.
    """
    head = node.parent
    assert head is not None and head.parent is not None and len(head.children) == 1, node
    grand = head.parent
    _changed(node)
    n = head.num_blocks
    # NOTE: the head is discarded, so its buffers are taken and extended: a host run that
    # grows by a cut tail at a time copies the tail, not the whole run, each time.
    head.tokens.extend(node.tokens)
    node.tokens = head.tokens
    head.slots.extend(node.slots)
    node.slots = head.slots
    if node.extras is not None or head.extras is not None:
        node.extras = ((head.extras or [None] * n)
                       + (node.extras or [None] * (len(node.slots) - n)))
    node.hashes = (head.hashes + node.hashes
                   if head.hashes is not None and node.hashes is not None else None)
    node.start_block = head.start_block
    node.key = head.key
    node.parent = grand
    grand.children[head.key] = node
    bucket = grand.by_first[head.tokens[0]]
    bucket[bucket.index(head)] = node
    head.parent = None
    head.children = head.by_first = _NO_ENTRIES


def cut_tail(node: Node, num_tail_blocks: int, tokens_per_block: int) -> Node:
    """Cut the last ``num_tail_blocks`` blocks of ``node`` into a new child node; return it.

    The mirror of :func:`split` for eviction: the original object keeps the head, trimmed in
    place, so trimming a long run costs the size of the tail, not of the run. Only for
    unreferenced runs, which no request's path ends in.
    """
    n = len(node.slots)
    assert 0 < num_tail_blocks < n and node.ref_count == 0, (num_tail_blocks, node)
    keep = n - num_tail_blocks
    _changed(node)
    cut = keep * tokens_per_block
    tail = Node(
        node,
        node.tokens[cut:],
        node.slots[keep:],
        node.tier,
        node.extras[keep:] if node.extras is not None else None,
        node.start_block + keep,
        node.root,
    )
    copy_stats(node, tail)
    # NOTE: a tail cut off for eviction is no longer protected by a waiting request's soft
    # claim: it is the victim, and a flag left on it (if it is offloaded) would outlive
    # the claim, whose release walks the claimed path only.
    tail.soft_claimed = False
    if node.hashes is not None:
        tail.hashes = node.hashes[keep:]
        del node.hashes[keep:]
    tail.children = node.children
    tail.by_first = node.by_first
    tail.num_gpu_children = node.num_gpu_children
    for child in tail.iter_children():
        child.parent = tail
    del node.tokens[cut:]
    del node.slots[keep:]
    if node.extras is not None:
        del node.extras[keep:]
    node.children = {tail.key: tail}
    node.by_first = {tail.tokens[0]: [tail]}
    node.num_gpu_children = int(tail.tier is Tier.GPU)
    return tail


class TrimmedTail(NamedTuple):
    """The blocks :func:`trim_tail` dropped, as the node :func:`cut_tail` would have made
    of them: its uid, first block (absolute index), key and slots."""

    uid: int
    start_block: int
    key: BlockKey
    slots: array[int]


def trim_tail(node: Node, num_tail_blocks: int, tokens_per_block: int) -> TrimmedTail:
    """Drop the last ``num_tail_blocks`` blocks of the unreferenced leaf ``node`` in place:
    the tree :func:`cut_tail` and then removing the tail leave, without a node for the
    tail (no copy of its tokens). The tail's uid is drawn as its node's would have been,
    so the uids of later nodes (a tie-break of eviction keys) stay the same."""
    n = len(node.slots)
    assert 0 < num_tail_blocks < n and node.ref_count == 0 and not node.children, (
        num_tail_blocks, node)
    keep = n - num_tail_blocks
    _changed(node)
    cut = keep * tokens_per_block
    extras = node.extras
    tail = TrimmedTail(next(_uids), node.start_block + keep,
                       block_key(node.tokens, cut, tokens_per_block,
                                 extras[keep] if extras is not None else None),
                       node.slots[keep:])
    if node.hashes is not None:
        del node.hashes[keep:]
    del node.tokens[cut:]
    del node.slots[keep:]
    if extras is not None:
        del extras[keep:]
    return tail


def extend_run(node: Node, tokens: Sequence[int], slots: Sequence[int],
               extras: list[object] | None) -> None:
    """Append full blocks (``tokens``, one slot and extra each) to the leaf ``node``, in
    place: the run a request is storing grows instead of gaining a one-block child per
    decode block."""
    assert not node.children and node.parent is not None, node
    _changed(node)
    n = node.num_blocks
    node.tokens.extend(tokens if type(tokens) is array else array("Q", tokens))
    node.slots.extend(slot_array(slots))
    if node.extras is not None or extras is not None:
        node.extras = ((node.extras if node.extras is not None else [None] * n)
                       + (extras if extras is not None else [None] * len(slots)))


def subtree(node: Node) -> list[Node]:
    """``node`` and all its descendants, parents before children."""
    out = [node]
    i = 0
    while i < len(out):
        out.extend(out[i].iter_children())
        i += 1
    return out


def path_to_root(node: Node) -> Iterator[Node]:
    """``node`` and its ancestors up to, not including, the root; deepest first."""
    while node.parent is not None:
        yield node
        node = node.parent
