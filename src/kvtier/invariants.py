"""``check_invariants``: recompute a manager's books from scratch and compare.

Kept apart from the manager so the hot paths stay small; tests call it after every step.
"""

from __future__ import annotations

from array import array
from collections import Counter

from kvtier.blocks import cdiv
from kvtier.cache import BlockCache
from kvtier.live import LiveTable
from kvtier.radix import Node, block_key, path_to_root
from kvtier.slots import SLOT_TYPECODE
from kvtier.tier import Tier


def check_books(store: BlockCache, live: LiveTable) -> None:
    """Assert every invariant of a manager's cache and live requests; raises
    AssertionError naming the first broken one. Pure."""
    tpb = store.tpb
    owner: dict[tuple[Tier, int], str] = {}

    def own(tier: Tier, slot: int, who: str) -> None:
        pool = store.pool(tier)
        assert 0 <= slot < pool.capacity, f"{who}: slot {slot} outside {tier.name} pool"
        prev = owner.get((tier, slot))
        assert prev is None, f"{tier.name} slot {slot} held by both {prev} and {who}"
        owner[(tier, slot)] = who

    # NOTE: the never-used free slots are a range, checked as one at the end: a pool is
    # built lazily, and a slot a time made the check O(capacity) (an empty manager of
    # 2**32 blocks, as the config allows, raised MemoryError; one of 1 M + 4 M took 17 s).
    for tier in Tier:
        for slot in store.pool(tier).given_back_slots():
            own(tier, slot, "free list")

    # The tree.
    for root in store.roots.values():
        assert root.parent is None and not root.slots and root.ref_count == 0
        assert root.children or root.num_users, f"empty root {root} kept"
    nodes: list[Node] = list(store.nodes())
    for node in nodes:
        parent = node.parent
        assert parent is not None, f"{node} is in the tree but marked dropped"
        assert parent.children.get(node.key) is node, f"{node} not under its parent"
        assert node.num_blocks >= 1 and len(node.tokens) == node.num_blocks * tpb, node
        assert node.start_block == parent.start_block + parent.num_blocks, node
        assert node.root is parent.root, node
        if node.extras is not None:
            assert len(node.extras) == node.num_blocks, node
        if node.hashes is not None:
            assert len(node.hashes) == node.num_blocks, node
        if parent.parent is not None:
            assert node.tier >= parent.tier, f"{node} is closer to the GPU than its parent"
            assert parent.ref_count >= node.ref_count, f"{node} outranks its parent in refs"
        assert _is_slot_array(node.slots), f"{node}: slots not an array('q')"
        for slot in node.slots:
            own(node.tier, slot, f"node {node.uid}")
        assert node.num_gpu_children == sum(
            c.tier is Tier.GPU for c in node.iter_children()), f"{node} GPU children count"
        by_first = sorted(c.uid for bucket in node.by_first.values() for c in bucket)
        assert by_first == sorted(c.uid for c in node.iter_children()), f"{node} by_first"
        for first, bucket in node.by_first.items():
            assert all(c.tokens[0] == first for c in bucket), f"{node} by_first key"
        assert node.key == block_key(node.tokens, 0, tpb,
                                     node.extras[0] if node.extras else None), f"{node} key"

    check_soft_claims(store)

    # The live sequences: refs, block tables, private blocks.
    expected_refs: Counter[int] = Counter()
    num_private = 0
    users: Counter[int] = Counter()
    for seq in live:
        rid = seq.request_id
        users[seq.root.uid] += 1
        path = list(path_to_root(seq.last_node))
        for node in path:
            assert node.tier is Tier.GPU, f"{rid}: path node {node} is not on the GPU"
            expected_refs[node.uid] += 1
        assert seq.last_node.parent is not None or seq.last_node is seq.root, rid
        table = seq.block_table
        assert _is_slot_array(table), f"{rid}: block table not an array('q')"
        # The table covers every scheduled token, and past its tokens only the draft slots
        # it reserved; the prompt's blocks past it are reserved (allocated as later chunks
        # are scheduled).
        covered = max(len(seq.tokens), seq.lookahead_end)
        assert cdiv(seq.num_scheduled_tokens, tpb) <= len(table) <= cdiv(covered, tpb), (
            f"{rid}: block table of {len(table)} blocks for {seq.num_scheduled_tokens} "
            f"scheduled of {len(seq.tokens)} tokens (lookahead to {seq.lookahead_end})")
        assert seq.num_reserved_blocks >= cdiv(len(seq.tokens), tpb) - len(table), (
            f"{rid}: prompt blocks past its table not reserved")
        path_slots = [s for node in reversed(path) for s in node.slots]
        n_path = seq.num_path_blocks
        assert len(path_slots) == n_path <= len(table), f"{rid}: path longer than its table"
        # Where the table and the path differ, the table holds the request's own copy of a
        # block another request stored first: exactly its private_slots, in order.
        # strict=False: the table runs past the path by the blocks the request has not stored.
        shadowed = [t for t, p in zip(table, path_slots, strict=False) if t != p]
        assert shadowed == seq.private_slots, (
            f"{rid}: block table disagrees with its path beyond its private copies")
        for slot in seq.own_slots():
            own(Tier.GPU, slot, f"private block of {rid}")
        num_private += len(seq.own_slots())
        assert seq.num_scheduled_tokens <= len(seq.tokens), rid
    for root in store.roots.values():
        assert root.num_users == users[root.uid], f"{root}: {root.num_users} users recorded"
    num_reserved = sum(seq.num_reserved_blocks for seq in live)
    assert live.num_reserved_blocks == num_reserved, (
        f"reserved {live.num_reserved_blocks} != {num_reserved}")
    assert 0 <= num_reserved <= store.gpu.num_available, (
        f"{num_reserved} blocks reserved, only {store.gpu.num_available} available")
    for node in nodes:
        assert node.ref_count == expected_refs[node.uid], (
            f"{node}: ref_count {node.ref_count}, live requests hold {expected_refs[node.uid]}")

    # Per tier: free + cached + referenced == capacity, and the heaps cover every candidate.
    for tier in Tier:
        pool = store.pool(tier)
        referenced = sum(n.num_blocks for n in nodes if n.tier is tier and n.ref_count)
        cached = sum(n.num_blocks for n in nodes if n.tier is tier and not n.ref_count)
        if tier is Tier.GPU:
            referenced += num_private
        assert pool.num_referenced == referenced, (
            f"{tier.name}: books say {pool.num_referenced} referenced, recount {referenced}")
        assert pool.num_free + cached + referenced == pool.capacity, (
            f"{tier.name}: {pool.num_free} free + {cached} cached + {referenced} referenced "
            f"!= {pool.capacity}")
        filed = {n.uid for n in pool.heap_nodes()}
        candidate_key = (store.evictor.gpu_candidate_key if tier is Tier.GPU
                         else store.evictor.host_candidate_key)
        for node in nodes:
            if node.tier is tier and candidate_key(node) is not None:
                assert node.uid in filed, f"{tier.name}: candidate {node} is not filed"
    num_owned = Counter(tier for tier, _ in owner)
    for tier in Tier:
        pool = store.pool(tier)
        fresh = pool.never_used_slots()
        for (t, slot), who in owner.items():
            assert t is not tier or slot not in fresh, (
                f"{tier.name} slot {slot} held by both the free list (never used) and {who}")
        assert num_owned[tier] + len(fresh) == pool.capacity, (
            f"{tier.name}: {num_owned[tier] + len(fresh)} slots accounted for, capacity "
            f"{pool.capacity}")


def check_soft_claims(store: BlockCache) -> None:
    """Assert the soft claims' flags (the waiting queue's hint, ``soft_claims.py``),
    recounted from the tree: every flagged run is tracked by the evictor (else its flag is
    never released) and lies on a path the last hint claimed (the path of a run it named,
    or of a hinted request's cached prefix as matched now: a claimed run below it may have
    left since); with no claimed run cut since the hint, every path it claimed that is
    still cached is flagged whole. Pure."""
    nodes = list(store.nodes())
    tracked = {id(node) for node in store.evictor.soft_claimed_runs()}
    ends, cut = store.evictor.soft_claim_ends()
    claimed: set[int] = set()
    for end in [*ends, *store.hinted_prefix_ends()]:
        if end.parent is None:
            continue  # dropped since: its cached ancestors are on a hinted prefix
        claimed.update(id(node) for node in path_to_root(end))
    for node in nodes:
        if node.soft_claimed:
            assert id(node) in tracked, (
                f"{node} is soft-claimed but the evictor does not track it: its flag would "
                f"never be released")
            assert id(node) in claimed, (
                f"{node} is soft-claimed but lies on no path the waiting queue's hint claimed")
    if not cut:
        for end in ends:
            if end.parent is None:
                continue
            for node in path_to_root(end):
                assert node.soft_claimed, (
                    f"{node} lies on a path the waiting queue's hint claimed (to {end}) "
                    f"but is not soft-claimed")


def _is_slot_array(slots: object) -> bool:
    """Whether ``slots`` is a slot list as nodes and tables hold it (``kvtier.slots``). Pure."""
    return type(slots) is array and slots.typecode == SLOT_TYPECODE
