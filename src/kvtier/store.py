"""The cached blocks of every tier: the tree, the tier pools, and moves between them.

:class:`BlockStore` is the manager's lower half. It knows nothing of requests: it allocates
GPU slots (evicting and offloading unreferenced blocks to make room), onboards host runs,
stores new runs, and files every unreferenced node as an eviction candidate of its tier.
Every move appends the copies it needs to the caller's op list, in program order.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import NamedTuple

from kvtier.config import CacheConfig
from kvtier.events import BlockRemoved, BlockStored, BlockTierChanged, EventLog
from kvtier.eviction import EvictionPolicy, get_policy
from kvtier.hashing import chain_hashes, get_hash_fn, root_hash
from kvtier.metrics import CacheStats
from kvtier.pool import TierPool
from kvtier.radix import (
    Node,
    Root,
    Tier,
    absorb_parent,
    add_child,
    block_key,
    cut_tail,
    num_common_blocks,
    remove_child,
    subtree,
)
from kvtier.radix import split as split_run
from kvtier.transfer.plan import OpKind, TransferOp


class StoredRun(NamedTuple):
    """What ``insert_run`` did: the request's path now ends at ``node`` and covers
    ``num_blocks`` more blocks; ``private_slots`` are its copies of blocks cached before."""

    node: Node
    num_blocks: int
    private_slots: list[int]


class BlockStore:
    """Tree + pools. Referenced nodes are never evicted, offload targets, or detached."""

    def __init__(
        self,
        config: CacheConfig,
        clock: Callable[[], float],
        policy: EvictionPolicy | None = None,
    ) -> None:
        self.config = config
        self.tpb = config.tokens_per_block
        self.clock = clock
        self.policy = policy if policy is not None else get_policy(config.eviction_policy)
        self.roots: dict[tuple[object, object], Root] = {}
        self.gpu = TierPool(Tier.GPU, config.num_gpu_blocks)
        self.host = TierPool(Tier.HOST, config.num_host_blocks)
        self.stats = CacheStats()
        self.events = EventLog(config.max_events) if config.enable_events else None
        self._hash_fn = get_hash_fn(config.hash_algo)
        self._tick = itertools.count(1)
        self._expiries: list[tuple[float, int, Node]] = []
        self._num_live_expiries = 0  # entries that were current at the last purge
        # With a write-back remote tier: (block hash, host slot) of host blocks dropped since
        # the last drain whose slot still holds their KV (not filled by a pending offload).
        self.spill_log: list[tuple[int, int]] | None = None
        self._fresh_host_slots: set[int] = set()

    # ---- keys and candidates ------------------------------------------------------------

    def pool(self, tier: Tier) -> TierPool:
        return self.gpu if tier is Tier.GPU else self.host

    def root(self, lora_id: object, salt: object) -> Root | None:
        """The root of this key space, if any block was ever stored under it. Pure."""
        return self.roots.get((lora_id, salt))

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

    def _key(self, node: Node) -> tuple[int, int]:
        return self.policy.key(node, self.clock(), self.config.default_priority)

    def priority(self, node: Node) -> int:
        """``node``'s priority now: its own until its retention expires. Pure."""
        expiry = node.expiry
        if expiry is not None and self.clock() >= expiry:
            return self.config.default_priority
        return node.priority

    def _gpu_candidate_key(self, node: Node) -> tuple[int, int] | None:
        if node.parent is None or node.tier is not Tier.GPU or node.ref_count:
            return None
        if node.has_child_in(Tier.GPU):
            return None
        return self._key(node)

    def _host_candidate_key(self, node: Node) -> tuple[int, int] | None:
        if node.parent is None or node.tier is not Tier.HOST or node.ref_count or node.children:
            return None
        return self._key(node)

    def refile(self, node: Node) -> None:
        """File ``node`` as an eviction candidate of its tier if it is one now."""
        if node.tier is Tier.GPU:
            key = self._gpu_candidate_key(node)
            if key is not None:
                self.gpu.push(node, key)
                self.gpu.compact(self._gpu_candidate_key)
        else:
            key = self._host_candidate_key(node)
            if key is not None:
                self.host.push(node, key)
                self.host.compact(self._host_candidate_key)

    def _expire(self) -> None:
        """Re-file nodes whose retention ran out, so they sort by the default priority."""
        now = self.clock()
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            expiry, _, node = heapq.heappop(expiries)
            if node.expiry == expiry and node.parent is not None and not node.ref_count:
                self.refile(node)

    def _push_expiry(self, node: Node) -> None:
        """Note when ``node``'s retention runs out. Entries of nodes released again or
        dropped go stale; they are purged whenever they could outnumber the live ones, so
        the heap does not grow with the history."""
        assert node.expiry is not None
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

    def split(self, node: Node, num_head_blocks: int) -> Node:
        """Cut ``node`` after ``num_head_blocks`` blocks; returns the head, ``node`` keeps
        the tail. Both halves keep the key, and a retention keeps running on both."""
        head = split_run(node, num_head_blocks, self.tpb)
        if head.expiry is not None:
            self._push_expiry(head)
        return head

    def cut_tail(self, node: Node, num_tail_blocks: int) -> Node:
        """Cut the last blocks of the unreferenced ``node`` into a new child; return it."""
        tail = cut_tail(node, num_tail_blocks, self.tpb)
        if tail.expiry is not None:
            self._push_expiry(tail)
        return tail

    # ---- references -----------------------------------------------------------------------

    def ref_path(self, node: Node) -> None:
        """Add one reference to ``node`` and every ancestor (a claim)."""
        while node.parent is not None:
            if node.ref_count == 0:
                self.pool(node.tier).num_referenced += len(node.slots)
            node.ref_count += 1
            node = node.parent

    def unref_path(
        self, node: Node, priority: int | None = None, retention_s: float | None = None
    ) -> None:
        """Drop one reference from ``node`` and its ancestors, deepest first.

        With ``priority`` set this is a release: nodes that become unreferenced are stamped
        most recently used (deepest first, so a prefix outlives its extensions) and take the
        releasing request's priority. Without it, it is a rollback: keys stay as they were.
        """
        now = self.clock() if retention_s is not None else 0.0
        while node.parent is not None:
            node.ref_count -= 1
            if node.ref_count == 0:
                self.pool(node.tier).num_referenced -= len(node.slots)
                if priority is not None:
                    node.last_used = next(self._tick)
                    node.priority = priority
                    if retention_s is not None:
                        node.expiry = now + retention_s
                        self._push_expiry(node)
                    else:
                        node.expiry = None
                self.refile(node)
            node = node.parent

    # ---- allocation and eviction ------------------------------------------------------------

    def allocate_gpu(self, num_blocks: int, ops: list[TransferOp]) -> list[int]:
        """Take ``num_blocks`` GPU slots for a request's private use, evicting as needed.

        The caller has checked ``gpu.num_available``; the slots count as referenced.
        """
        gpu = self.gpu
        if num_blocks > gpu.num_free:
            self._evict(num_blocks - gpu.num_free, ops)
        gpu.num_referenced += num_blocks
        return gpu.take(num_blocks)

    def free_gpu(self, slots: list[int]) -> None:
        """Give a request's private (uncached) slots back; they are handed out first."""
        self.gpu.num_referenced -= len(slots)
        self.gpu.give_back(slots)

    def _evict(self, num_blocks: int, ops: list[TransferOp]) -> None:
        """Free ``num_blocks`` GPU slots from unreferenced runs, tails first."""
        self._expire()
        gpu = self.gpu
        while num_blocks > 0:
            node = gpu.pop_candidate(self._gpu_candidate_key)
            assert node is not None, f"GPU: {num_blocks} blocks short of eviction candidates"
            self._merge_up(node)
            take = min(node.num_blocks, num_blocks)
            victim = node if take == node.num_blocks else self.cut_tail(node, take)
            num_blocks -= take
            parent = victim.parent
            assert parent is not None
            self._evict_gpu_run(victim, ops)
            self.refile(parent)

    def _evict_gpu_run(self, victim: Node, ops: list[TransferOp]) -> None:
        """Offload the unreferenced GPU run ``victim`` as far as the host takes it; drop the rest.

        The host takes a block into a free slot, or in place of a host block that is worth
        less (a smaller eviction key), never of one worth as much: so the host keeps the most
        valuable blocks that left the GPU, and one eviction round doesn't churn its own
        offloads. The dropped part is the tail, so what stays cached is still a prefix.
        """
        host = self.host
        num_offload = 0
        if host.capacity and self.priority(victim) >= self.config.offload_min_priority:
            num_offload = self._make_host_room(victim)
        if num_offload < victim.num_blocks:
            if not num_offload:
                self.drop(victim)
                return
            self.drop(self.cut_tail(victim, victim.num_blocks - num_offload))
        host_slots = host.take(num_offload)
        if self.spill_log is not None:
            self._fresh_host_slots.update(host_slots)  # filled only when the plan runs
        old = victim.slots
        for src, dst in zip(old, host_slots):
            ops.append(TransferOp(OpKind.OFFLOAD, Tier.GPU, src, Tier.HOST, dst, self.tpb))
        self.gpu.give_back(old)
        victim.slots = host_slots
        victim.tier = Tier.HOST
        assert victim.parent is not None
        victim.parent.num_gpu_children -= 1
        self.stats.gpu.offloaded_blocks += num_offload
        if self.events is not None:
            self._emit_moves(victim, Tier.GPU, Tier.HOST)
        self.refile(victim)

    def _make_host_room(self, victim: Node) -> int:
        """Free host slots for ``victim`` by dropping host blocks worth less than it, then
        its own host extensions (lost anyway if it is dropped); return how many slots are
        free for its offload now."""
        host = self.host
        num_blocks = victim.num_blocks
        self.free_host(num_blocks, self._key(victim))
        # Below a GPU frontier run all is host and unreferenced: take its deepest blocks.
        for node in reversed(subtree(victim)[1:]):
            short = num_blocks - host.num_free
            if short <= 0:
                break
            if node.parent is None or node.children:
                continue
            self.drop_from(node, max(0, node.num_blocks - short))
        return min(num_blocks, host.num_free)

    def free_host(self, num_blocks: int, key: tuple[int, int] | None) -> int:
        """Drop unreferenced host leaves, tails first, lowest key first, until
        ``num_blocks`` host slots are free, stopping at blocks whose key is not below
        ``key`` (``None``: no limit). Returns the free host slots now."""
        host = self.host
        while host.num_free < num_blocks:
            node = host.pop_candidate(self._host_candidate_key)
            if node is None:
                break
            self._merge_up(node)
            node_key = self._key(node)
            if key is not None and node_key >= key:
                host.push(node, node_key)
                break
            take = min(node.num_blocks, num_blocks - host.num_free)
            self.drop_from(node, node.num_blocks - take)
        return host.num_free

    def import_run(self, parent: Node, tokens: list[int], num_blocks: int) -> Node | None:
        """Store the first ``num_blocks`` blocks of ``tokens`` (whose KV comes from
        elsewhere, e.g. a remote store), or as many as the host makes room for, as an
        unreferenced host run below ``parent``; ``None`` if there is no room at all.
        ``parent`` must be claimed by the caller while this runs."""
        num_blocks = min(num_blocks, self.free_host(num_blocks, None))
        if num_blocks == 0:
            return None
        start = parent.start_block + parent.num_blocks
        node = Node(parent, tokens[:num_blocks * self.tpb], self.host.take(num_blocks),
                    Tier.HOST, None, start, parent.root)
        node.priority = self.config.default_priority
        node.last_used = next(self._tick)
        add_child(parent, node)
        if self.events is not None:
            self._emit_stored(node)
        self.refile(node)
        return node

    def _merge_up(self, node: Node) -> None:
        """Rejoin ``node`` with parents that are the same run in all but name (left split by a
        claim that was rolled back or released), so eviction sees runs as if never split."""
        while True:
            head = node.parent
            if (head is None or head.parent is None or len(head.children) != 1
                    or head.tier is not node.tier or head.ref_count != node.ref_count
                    or head.priority != node.priority or head.expiry != node.expiry
                    or head.last_used != node.last_used):
                return
            absorb_parent(node)

    def drain_spills(self) -> list[tuple[int, int]]:
        """The spill log since the last drain; the next plan may overwrite those slots."""
        assert self.spill_log is not None
        spills, self.spill_log = self.spill_log, []
        self._fresh_host_slots.clear()
        return spills

    def drop_from(self, node: Node, index: int) -> None:
        """Drop the unreferenced blocks ``index ..`` of ``node`` and everything below them,
        and file what stays as a candidate again."""
        if index == 0:
            parent = node.parent
            assert parent is not None
            self.drop(node)
            self.refile(parent)
        else:
            self.drop(self.cut_tail(node, node.num_blocks - index))
            self.refile(node)

    def drop(self, node: Node) -> None:
        """Remove the unreferenced run ``node`` and everything below it from the cache."""
        parent = node.parent
        assert parent is not None and node.ref_count == 0, node
        doomed = subtree(node)
        if self.events is not None:
            for n in doomed:
                self._emit_removed(n)
        if self.spill_log is not None:
            fresh = self._fresh_host_slots
            self.spill_log.extend((h, slot) for n in doomed if n.tier is Tier.HOST
                                  for h, slot in zip(self.hashes(n), n.slots)
                                  if slot not in fresh)
        remove_child(parent, node)
        self._prune(parent)
        for n in doomed:
            assert n.ref_count == 0, n
            self.pool(n.tier).give_back(n.slots)
            if n.tier is Tier.GPU:
                self.stats.gpu.evicted_blocks += len(n.slots)
            else:
                self.stats.host.evicted_blocks += len(n.slots)
            n.parent = None

    # ---- tier moves and stores -----------------------------------------------------------

    def onboard(self, node: Node, ops: list[TransferOp]) -> int:
        """Move the claimed host run ``node`` to GPU slots; return its block count."""
        assert node.tier is Tier.HOST and node.ref_count > 0, node
        n = node.num_blocks
        gpu_slots = self.allocate_gpu(n, ops)  # counted referenced: the node is claimed
        for src, dst in zip(node.slots, gpu_slots):
            ops.append(TransferOp(OpKind.ONBOARD, Tier.HOST, src, Tier.GPU, dst, self.tpb))
        self.host.num_referenced -= n
        self.host.give_back(node.slots)
        node.slots = gpu_slots
        node.tier = Tier.GPU
        assert node.parent is not None
        node.parent.num_gpu_children += 1
        self.stats.host.onboarded_blocks += n
        if self.events is not None:
            self._emit_moves(node, Tier.HOST, Tier.GPU)
        return n

    def insert_run(
        self, parent: Node, tokens: list[int], slots: list[int], extras: list[object] | None
    ) -> StoredRun:
        """Store a request's computed full blocks below ``parent``, the request's claimed
        path, and extend its claim over them.

        Where another request stored the same blocks first, the request's later blocks are
        still stored, below the cached run: if that run is claimed, the claim follows it and
        the request's own copies stay private (``StoredRun.private_slots``); if it is not,
        it takes over the request's copies (a host run moves to the GPU without a copy) and
        its old slots are free again. A claimed duplicate on the host (being onboarded by
        another request) stops the store there; a later call continues. The GPU pool's
        books don't change: the slots are referenced before and after.
        """
        tpb = self.tpb
        node = parent
        num_blocks = len(slots)
        pos = 0
        private: list[int] = []
        while pos < num_blocks:
            extra = extras[pos] if extras is not None else None
            cached = node.children.get(block_key(tokens, pos * tpb, tpb, extra))
            if cached is None:
                start = node.start_block + node.num_blocks
                new = Node(node, tokens[pos * tpb:], slots[pos:], Tier.GPU,
                           extras[pos:] if extras is not None else None, start, node.root)
                new.ref_count = 1
                add_child(node, new)
                if self.events is not None:
                    self._emit_stored(new)
                return StoredRun(new, num_blocks, private)
            if cached.tier is Tier.HOST and cached.ref_count:
                break
            run_extras = extras[pos:] if extras is not None else None
            k = num_common_blocks(cached, tokens[pos * tpb:], 0,
                                  min(cached.num_blocks, num_blocks - pos), tpb, run_extras)
            if k < cached.num_blocks:
                cached = self.split(cached, k)
            self.stats.num_duplicate_stores += k
            if cached.ref_count:
                private += slots[pos:pos + k]
                cached.ref_count += 1
            else:
                self._adopt(cached, slots[pos:pos + k])
            node = cached
            pos += k
        return StoredRun(node, pos, private)

    def _adopt(self, node: Node, gpu_slots: list[int]) -> None:
        """Give the unreferenced run ``node`` the slots ``gpu_slots``, a request's private
        copies of the same blocks, and claim it once for that request; its own slots are
        free again. A host run thus moves to the GPU without a copy. Claiming a cached run
        in place would take blocks from what is available; this takes none."""
        assert not node.ref_count and node.parent is not None
        self.pool(node.tier).give_back(node.slots)
        node.slots = list(gpu_slots)
        node.ref_count = 1  # the GPU slots stay referenced: the pool's books don't change
        if node.tier is Tier.HOST:
            node.tier = Tier.GPU
            node.parent.num_gpu_children += 1
            if self.events is not None:
                self._emit_moves(node, Tier.HOST, Tier.GPU)

    def detach_leaf_block(self, node: Node) -> int:
        """Take a one-block, claimed-once GPU leaf out of the tree for reuse in place.

        Its slot becomes the caller's private block (still referenced); returns the slot.
        """
        assert node.num_blocks == 1 and not node.children and node.tier is Tier.GPU
        parent = node.parent
        assert parent is not None
        if self.events is not None:
            self._emit_removed(node)
        remove_child(parent, node)
        node.parent = None
        self.refile(parent)
        self._prune(parent)
        return node.slots[0]

    def slot_owners(self) -> dict[tuple[Tier, int], tuple[Node, int]]:
        """Every cached block's (tier, slot) -> (node, block index). Pure; walks the tree."""
        owners: dict[tuple[Tier, int], tuple[Node, int]] = {}
        for root in self.roots.values():
            for top in root.iter_children():
                for node in subtree(top):
                    for i, slot in enumerate(node.slots):
                        owners[(node.tier, slot)] = (node, i)
        return owners

    # ---- hashes and events -----------------------------------------------------------------

    def hashes(self, node: Node) -> list[int]:
        """The chained hashes of ``node``'s blocks, computed once on first use."""
        if node.hashes is None:
            pending = []
            n: Node | None = node
            while n is not None and n.parent is not None and n.hashes is None:
                pending.append(n)
                n = n.parent
            for p in reversed(pending):
                parent = p.parent
                assert parent is not None and p.root is not None
                root = p.root
                if parent is root:
                    prev = root_hash(self._hash_fn, root.lora_id, root.salt)
                else:
                    assert parent.hashes is not None
                    prev = parent.hashes[-1]
                lora = root.lora_id
                p.hashes = chain_hashes(self._hash_fn, prev, p.tokens, self.tpb, lora, p.extras)
        assert node.hashes is not None
        return node.hashes

    def parent_hash(self, node: Node) -> int | None:
        parent = node.parent
        if parent is None or parent.parent is None:
            return None
        return self.hashes(parent)[-1]

    def _emit_stored(self, node: Node) -> None:
        events = self.events
        assert events is not None
        hashes = self.hashes(node)
        parent_hash = self.parent_hash(node)
        assert node.root is not None
        lora = node.root.lora_id
        assert lora is None or isinstance(lora, int)
        for h in hashes:
            events.append(BlockStored(events.next_seq(), h, parent_hash, node.tier, self.tpb, lora))
            parent_hash = h

    def _emit_removed(self, node: Node) -> None:
        events = self.events
        assert events is not None
        for h in self.hashes(node):
            events.append(BlockRemoved(events.next_seq(), h, node.tier))

    def _emit_moves(self, node: Node, old: Tier, new: Tier) -> None:
        events = self.events
        assert events is not None
        for h in self.hashes(node):
            events.append(BlockTierChanged(events.next_seq(), h, old, new))
