"""The cached blocks of every tier: the tree, the tier pools, and the moves between them.

:class:`BlockCache` is the manager's lower half. It knows nothing of requests: it allocates
GPU slots (evicting and offloading unreferenced runs to make room), onboards host runs,
stores new runs, claims and releases paths. Every move appends the copies it needs to the
caller's op list, in program order; the ``Evictor`` chooses victims, the ``Journal``
reports hashes and events.

Contract: only the cache changes the tree's nodes, the pools' slots and ``stats``; a
referenced node is never evicted, an offload target or detached.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Sequence
from operator import attrgetter, is_
from typing import NamedTuple

from kvtier.cache_state import MAX_EVICTION_BATCH, CacheState, eviction_batch
from kvtier.eviction import (
    ROLE_BODY,
    ROLE_SHARED,
    ROLE_TAIL,
    ghost_key,
    ghost_key_below,
    node_ghost_key,
)
from kvtier.matching import num_common_blocks
from kvtier.onboarding import Onboarding
from kvtier.pool import Key
from kvtier.radix import BlockKey, Node, add_child, block_key, extend_run, remove_child, subtree
from kvtier.sequence import LiveSequence, SequenceSpec, block_extras
from kvtier.slots import SLOT_TYPECODE, slot_array
from kvtier.tier import Tier
from kvtier.transfer.plan import OpKind, PlanRecorder

__all__ = ["MAX_EVICTION_BATCH", "BlockCache", "StoredRun", "eviction_batch"]

# The most requests a hinted queue may have lost at its head for ``_shift_hint``.
_MAX_SHIFT = 8

_parent = attrgetter("parent")


class StoredRun(NamedTuple):
    """What ``insert_run`` did: the request's path now ends at ``node`` and covers
    ``num_blocks`` more blocks; ``private_slots`` are its copies of blocks cached before."""

    node: Node
    num_blocks: int
    private_slots: list[int]


class BlockCache(CacheState):
    """Tree + pools. Referenced nodes are never evicted, offload targets, or detached."""

    # ---- references --------------------------------------------------------------------------

    def ref_path(self, node: Node) -> None:
        """Add one reference to ``node`` and every ancestor (a claim). What the claim means
        for the eviction policy is told only once it holds (``note_reuse``): a claim rolled
        back leaves no trace."""
        while node.parent is not None:
            if node.ref_count == 0:
                self.pool(node.tier).num_referenced += len(node.slots)
            node.ref_count += 1
            node = node.parent

    def note_reuse(self, seq: LiveSequence) -> None:
        """``seq`` was admitted on its claimed path: count an access of every run on it,
        end each run's open release as a reuse (for the policy's learner), and tell the
        learner where the reused prefix ends (``recall_miss``)."""
        learner, witness = self._learner, self._witness
        runs: list[tuple[int, int]] = []  # (release tick, blocks), for the witness
        now = self.evictor.now()
        node = seq.last_node
        while node.parent is not None:
            node.num_accesses += 1
            if learner is not None and node.reuse_class is not None:
                learner.record(node.reuse_class, now - node.last_used_s, len(node.slots), True)
                if witness is not None:
                    runs.append((node.last_used, len(node.slots)))
                node.reuse_class = None
            node = node.parent
        if witness is not None:
            witness.admitted(seq.num_prompt_blocks, runs,
                             self.gpu.num_cached + self.host.num_cached)
        self.recall_miss(seq, now)

    def unref_path(self, node: Node, release: LiveSequence | None = None) -> None:
        """Drop one reference from ``node`` and its ancestors, deepest first.

        With ``release`` (the request whose path this is) this is a release: nodes that
        become unreferenced are stamped most recently used (deepest first, so a prefix
        outlives its extensions), take the request's priority and retention, and are filed
        under the learner's reuse class. Without it, it is a rollback: keys stay as they were.
        """
        evictor = self.evictor
        learner = self._learner if release is not None else None
        witness = self._witness if release is not None else None
        now = evictor.now() if release is not None else 0.0
        # NOTE: the runs a release files are keyed at its one reading of the clock; a
        # rollback's at the evictor's own (its keys stay as they were).
        filed_at = now if release is not None else None
        per_block = release.retention if release is not None else None
        while node.parent is not None:
            if per_block is not None and node.ref_count == 1 and len(node.slots) > 1:
                # Only this request holds the run: cut it where its settings change, so
                # each piece takes one priority and one expiry. ``node`` keeps the last
                # piece; the walk goes on up through the others.
                head = node
                for k in reversed(per_block.cuts(node.start_block, len(node.slots), self.tpb)):
                    head = self.split(head, k)
            node.ref_count -= 1
            if node.ref_count == 0:
                self.pool(node.tier).num_referenced -= len(node.slots)
                if release is not None:
                    # Counted under its old tick unless it was reused (then counted in use).
                    old_tick = node.last_used if node.reuse_class is not None else 0
                    node.last_used = self.next_tick()
                    if witness is not None:
                        witness.released(old_tick, node.last_used, len(node.slots))
                    node.last_used_s = now
                    if per_block is None:
                        node.priority = release.priority
                        retention_s = release.retention_s
                    else:
                        node.priority, retention_s = per_block.at(node.start_block, self.tpb)
                    node.expiry = None if retention_s is None else now + retention_s
                    if learner is not None:
                        node.reuse_class = learner.reuse_class(
                            node, release.turn, _role(node, release))
                    evictor.track_retention(node)
                evictor.refile(node, filed_at)
            node = node.parent

    # ---- sessions ----------------------------------------------------------------------------

    def turn(self, node: Node, num_blocks: int) -> int:
        """The turn of a request whose reused prefix is ``num_blocks`` blocks ending in
        ``node``: one past the turn of the request that stored ``node`` if the prefix covers
        that request's whole prompt (the request continues its session), else 1. Pure."""
        if node.turn and num_blocks >= node.prompt_end_block:
            return node.turn + 1
        return 1

    def recall_miss(self, seq: LiveSequence, now: float | None = None) -> None:
        """Tell the learner where ``seq``'s reused prefix ends: if runs dropped from there
        are what it would have reused next, those releases end as reuses after all.
        ``now``: the clock's time of the admission (``note_reuse``'s reading; None: read
        it here)."""
        learner = self._learner
        if learner is None:
            return
        table = self._ghost_table
        if table is not None and not table:
            return  # nothing dropped is remembered: every recall would find nothing
        tpb = self.tpb
        tokens, extras = seq.tokens, seq.extras
        num_full = len(tokens) // tpb
        block = seq.num_path_blocks
        if block >= num_full:
            return  # every full block of the prompt was reused: nothing missed
        root = seq.last_node.root
        assert root is not None
        if now is None:
            now = self.evictor.now()
        if extras is None and type(tokens) is array:
            # NOTE: ``ghost_key`` and ``block_key`` written out (the same keys, a block's
            # key its ids' bytes): a recall is asked at every admission that misses.
            lora_id, salt = root.lora_id, root.salt
            while block < num_full:
                start = block * tpb
                prev = tokens[start - tpb:start].tobytes() if block else b""
                found = learner.recall(
                    (lora_id, salt, block, prev, tokens[start:start + tpb].tobytes()), now)
                if found is None:
                    return
                block += found[1]
            return
        while block < num_full:
            before: BlockKey = (block_key(tokens, (block - 1) * tpb, tpb,
                                          extras[block - 1] if extras is not None else None)
                                if block else b"")
            key = block_key(tokens, block * tpb, tpb, extras[block] if extras is not None else None)
            found = learner.recall(ghost_key(root, block, before, key), now)
            if found is None:
                return
            block += found[1]

    # ---- allocation and eviction -------------------------------------------------------------

    def allocate_gpu(self, num_blocks: int, ops: PlanRecorder) -> array[int]:
        """Take ``num_blocks`` GPU slots for a request's private use, evicting as needed.

        The caller has checked ``gpu.num_available``; the slots count as referenced.
        """
        gpu = self.gpu
        if num_blocks > gpu.num_free:
            self._evict_gpu(num_blocks - gpu.num_free, ops)
        gpu.num_referenced += num_blocks
        return gpu.take(num_blocks)

    def free_gpu(self, slots: Sequence[int]) -> None:
        """Give a request's private (uncached) slots back; they are handed out first."""
        self.gpu.num_referenced -= len(slots)
        self.gpu.give_back(slots)

    def _evict_gpu(self, num_blocks: int, ops: PlanRecorder) -> None:
        """Free ``num_blocks`` GPU slots from unreferenced runs, tails first."""
        evictor = self.evictor
        with evictor.eviction_round():
            batch = self._gpu_batch
            if not self.host.capacity:
                self._drop_gpu(num_blocks)
                return
            while num_blocks > 0:
                victim = evictor.take_victim(Tier.GPU, max(num_blocks, batch))
                assert victim is not None, (
                    f"GPU: {num_blocks} blocks short of eviction candidates")
                num_blocks -= len(victim.slots)
                parent = victim.parent
                assert parent is not None
                self._evict_gpu_run(victim, ops)
                evictor.refile(parent)

    def _drop_gpu(self, num_blocks: int) -> None:
        """``_evict_gpu`` with no host tier, within its round: every victim is dropped, and
        one larger than the need loses its tail in place (``drop_tail``): the tree, slots
        and forgets a cut and a drop leave, without a node (and a copy of its ids) made only
        to be dropped."""
        evictor = self.evictor
        batch = self._gpu_batch
        while num_blocks > 0:
            need = max(num_blocks, batch)
            victim = evictor.take_victim(Tier.GPU, need, cut=False)
            assert victim is not None, f"GPU: {num_blocks} blocks short of eviction candidates"
            if len(victim.slots) > need:
                num_blocks -= need
                self.drop_tail(victim, need)
                evictor.refile(victim)
            else:
                num_blocks -= len(victim.slots)
                parent = victim.parent
                assert parent is not None
                self.drop(victim)
                evictor.refile(parent)

    def _evict_gpu_run(self, victim: Node, ops: PlanRecorder,
                       onboarding: Onboarding | None = None) -> None:
        """Offload the unreferenced GPU run ``victim`` as far as the host takes it; drop the rest.

        The host takes a block into a free slot, or in place of a host block that is worth
        less (a smaller eviction key), never of one worth as much: so the host keeps the most
        valuable blocks that left the GPU, and one eviction round doesn't churn its own
        offloads. The dropped part is the tail, so what stays cached is still a prefix.

        With ``onboarding`` (a path coming in, ``onboard_path``) the victim's first blocks
        are swapped with the path's next ones, a piece as large as the host's free room at a
        time: a piece leaves, the path's blocks take its GPU slots, and their host slots
        (free now) take the next piece. The swapped blocks need the host room of one piece
        (at most a batch's), not their own::

            host free   [r slots]  <- piece 1 of the victim   (offload)
            victim GPU  [piece 1]  <- path blocks 1..r         (onboard: r host slots free)
            host free   [r slots]  <- piece 2 ...
        """
        host = self.host
        num_blocks = len(victim.slots)
        num_swap = min(num_blocks, onboarding.num_left) if onboarding is not None else 0
        num_offload = 0
        offloadable = bool(host.capacity) and (
            self.evictor.priority(victim) >= self.config.offload_min_priority)
        if offloadable:
            need = num_blocks - num_swap + min(num_swap, self._gpu_batch)
            # NOTE: ``_make_host_room``'s first test, no call: an onboarding's path gives
            # back the host room its swaps need (most of its victims find it free).
            room = need if host.num_free >= need else self._make_host_room(victim, need)
            if room:
                num_offload = num_swap + min(num_blocks - num_swap, room)
        if num_offload < num_blocks:
            if not num_offload:
                if offloadable and num_swap and num_blocks > 1:
                    # NOTE: no host room now, but the path frees a host slot with every
                    # block it takes in: drop only the victim's last block, so one comes in
                    # and the rest of the victim can swap out into the slots it leaves.
                    self.drop_tail(victim, 1)
                    self.evictor.refile(victim)
                    return
                self.drop(victim)
                return
            self.drop_tail(victim, num_blocks - num_offload)
        old = victim.slots
        if num_swap:
            assert onboarding is not None
            swap = onboarding.swap_in(old[:num_swap])
            host_slots = swap.host_slots
            if num_offload > num_swap:  # the rest leaves into the room made for it
                assert num_offload - num_swap <= host.num_free, (num_offload, host.num_free)
                host_slots += host.take(num_offload - num_swap)
                self.gpu.give_back(old[num_swap:])
            self.journal.host_slots_filled(host_slots)
            # Each piece's offload, then the onboard into its slots; then the rest.
            ops.record_swap(old, host_slots, swap.path_slots, swap.piece_ends, self.tpb)
        else:
            host_slots = host.take(num_offload)
            self.journal.host_slots_filled(host_slots)  # filled only when the plan runs
            ops.record_run(OpKind.OFFLOAD, Tier.GPU, old, Tier.HOST, host_slots, self.tpb)
            self.gpu.give_back(old)
        victim.slots = host_slots
        victim.tier = Tier.HOST
        assert victim.parent is not None
        victim.parent.num_gpu_children -= 1
        self.stats.gpu.offloaded_blocks += num_offload
        self.journal.moved(victim, Tier.GPU)
        self.evictor.refile(victim)

    def _make_host_room(self, victim: Node, num_blocks: int) -> int:
        """Free ``num_blocks`` host slots for ``victim`` by dropping host blocks worth less
        than it, then its own host extensions (lost anyway if it is dropped); return how
        many of them are free now."""
        host = self.host
        # NOTE: the victim's rank only where a host block must go (``rank`` is pure; the
        # one its pop computed, where kept).
        if host.num_free >= num_blocks or (
                self.free_host(num_blocks, self.evictor.victim_rank(victim)) >= num_blocks):
            return num_blocks
        # Below a GPU frontier run all is host and unreferenced: take its extensions, tails
        # first (children before their parent, the last child first), walking only as far
        # as the room needed. Each leaf dropped frees what it gives up of ``short``.
        short = num_blocks - host.num_free
        stack = [(victim, list(victim.children.values()))]
        while stack and short > 0:
            node, pending = stack[-1]
            if pending:
                child = pending.pop()
                stack.append((child, list(child.children.values())))
                continue
            stack.pop()
            if node is not victim and node.parent is not None and not node.children:
                n = len(node.slots)
                self.drop_from(node, max(0, n - short))
                short -= min(n, short)
        return min(num_blocks, host.num_free)

    def free_host(self, num_blocks: int, below: Key | None) -> int:
        """Drop unreferenced host leaves, tails first, lowest key first, until
        ``num_blocks`` host slots are free, stopping at blocks whose key is not below
        ``below`` (``None``: no limit). Returns the free host slots now."""
        host = self.host
        evictor = self.evictor
        while True:
            short = num_blocks - host.num_free
            if short <= 0:
                break
            victim = evictor.take_victim(Tier.HOST, short, below, cut=False)
            if victim is None:
                break
            if len(victim.slots) > short:
                self.drop_tail(victim, short)
                evictor.refile(victim)
                continue
            parent = victim.parent
            assert parent is not None
            self.drop(victim)
            evictor.refile(parent)
        return host.num_free

    def drop_from(self, node: Node, index: int, spill: bool = True) -> None:
        """Drop the unreferenced blocks ``index ..`` of ``node`` and everything below them,
        and file what stays as a candidate again (``spill``: as ``drop``)."""
        self.evictor.changed()  # no victim taken: a queue's head, maybe
        if index == 0:
            parent = node.parent
            assert parent is not None
            self.drop(node, spill)
            self.evictor.refile(parent)
        else:
            self.drop_tail(node, len(node.slots) - index, spill)
            self.evictor.refile(node)

    def drop_tail(self, node: Node, num_tail_blocks: int, spill: bool = True) -> None:
        """Drop the last ``num_tail_blocks`` blocks of the unreferenced run ``node`` and
        everything below them: ``drop(evictor.cut_tail(node, num_tail_blocks))``. A leaf's
        tail gets no node of its own where the journal needs none (``Evictor.trim_tail``:
        no copy of its tokens), and is forgotten as that node would have been (the same
        uid, ghost and counts)."""
        journal = self.journal
        if node.children or journal.events is not None or journal.spill_log is not None:
            self.drop(self.evictor.cut_tail(node, num_tail_blocks), spill)
            return
        evictor = self.evictor
        tail = evictor.trim_tail(node, num_tail_blocks)
        learner = self._learner
        if learner is not None and node.reuse_class is not None:
            learner.forget(ghost_key_below(node, tail.start_block, tail.key, self.tpb),
                           tail.uid, node.reuse_class, node.last_used_s, num_tail_blocks,
                           evictor.now(), node.last_used)
        self._evicted(node.tier, tail.slots)

    def drop_key_space(self, lora_id: object, salt: object) -> int:
        """Drop every run of the key space (``lora_id``, ``salt``) that no live request
        holds, with everything below it, on every tier, never spilled to a write-back
        remote tier; return how many blocks left. Runs live requests hold stay."""
        root = self.roots.get((lora_id, salt))
        if root is None:
            return 0
        doomed: list[Node] = []
        stack = list(root.iter_children())
        while stack:  # the unheld runs nearest the root: below a held run, held or not
            node = stack.pop()
            if node.ref_count:
                stack.extend(node.iter_children())
            else:
                doomed.append(node)
        num_blocks = 0
        for node in doomed:
            num_blocks += sum(n.num_blocks for n in subtree(node))
            parent = node.parent
            assert parent is not None
            self.evictor.changed()
            self.drop(node, spill=False)
            self.evictor.refile(parent)
        return num_blocks

    def drop(self, node: Node, spill: bool = True) -> None:
        """Remove the unreferenced run ``node`` and everything below it from the cache
        (host blocks go to the spill log of a write-back remote tier unless ``spill`` is
        False)."""
        parent = node.parent
        assert parent is not None and node.ref_count == 0, node
        if node.children:
            doomed = subtree(node)
            self.evictor.changed()  # runs below a victim leave too: queue heads, maybe
        else:
            doomed = [node]  # most victims are leaves
        journal = self.journal
        if journal.events is not None or journal.spill_log is not None:
            journal.removed(doomed, spill)  # NOTE: else a no-op: not called for every victim
        remove_child(parent, node)
        if parent.parent is None:  # only a root is pruned
            self._prune(parent)
        learner = self._learner
        now = self.evictor.now() if learner is not None else 0.0
        for n in doomed:
            assert n.ref_count == 0, n
            if learner is not None and n.reuse_class is not None:
                assert n.parent is not None
                learner.forget(node_ghost_key(n, self.tpb), n.uid, n.reuse_class, n.last_used_s,
                               len(n.slots), now, n.last_used)
            self._evicted(n.tier, n.slots)
            n.parent = None

    def _evicted(self, tier: Tier, slots: Sequence[int]) -> None:
        """``slots`` of ``tier`` left the cache: free, and counted as evicted."""
        if tier is Tier.GPU:
            self.gpu.give_back(slots)
            self.stats.gpu.evicted_blocks += len(slots)
        else:
            self.host.give_back(slots)
            self.stats.host.evicted_blocks += len(slots)

    # ---- tier moves and stores -----------------------------------------------------------

    def onboard_path(self, nodes: Sequence[Node], ops: PlanRecorder) -> int:
        """Move the claimed host runs ``nodes`` (of one path, top down) to GPU slots in one
        eviction round; return their block count.

        The path's blocks come in, in order, as GPU slots come free: the free ones first,
        then those of GPU victims, each swapped out a piece at a time into the host slots
        the path leaves (``_evict_gpu_run``). So a long path is one round with victims as
        large as it needs, and needs the host room of a piece, not of every victim.
        """
        gpu = self.gpu
        host_slots = array(SLOT_TYPECODE)
        for node in nodes:
            assert node.tier is Tier.HOST and node.ref_count > 0, node
            host_slots += node.slots  # NOTE: a run at a time, a copy (paths of 1,000s)
        onboarding = Onboarding(host_slots, ops, gpu, self.host, self.tpb)
        num_free = min(gpu.num_free, onboarding.num_left)
        if num_free:
            onboarding.copy_in(gpu.take(num_free))
        if onboarding.num_left:
            evictor = self.evictor
            with evictor.eviction_round():
                while onboarding.num_left:
                    victim = evictor.take_victim(
                        Tier.GPU, max(onboarding.num_left, self._gpu_batch))
                    assert victim is not None, (
                        f"GPU: {onboarding.num_left} blocks short of eviction candidates")
                    parent = victim.parent
                    assert parent is not None
                    self._evict_gpu_run(victim, ops, onboarding)
                    evictor.refile(parent)
                    num_free = min(gpu.num_free, onboarding.num_left)
                    if num_free:  # a victim dropped, or its tail
                        onboarding.copy_in(gpu.take(num_free))
        gpu_slots = onboarding.gpu_slots
        journal = self.journal
        events = journal.events is not None  # NOTE: else ``moved`` is a no-op: no call a run
        gpu_tier = Tier.GPU
        pos = 0
        for node in nodes:
            n = len(node.slots)
            node.slots = gpu_slots[pos:pos + n]
            pos += n
            node.tier = gpu_tier
            parent = node.parent
            assert parent is not None
            parent.num_gpu_children += 1
            if events:
                journal.moved(node, Tier.HOST)
        self.stats.host.onboarded_blocks += pos
        return pos

    def insert_run(
        self, parent: Node, tokens: Sequence[int], slots: Sequence[int],
        extras: list[object] | None,
        turn: int = 0, prompt_end_block: int = 0,
    ) -> StoredRun:
        """Store a request's computed full blocks below ``parent``, the request's claimed
        path, and extend its claim over them.

        Where another request stored the same blocks first, the request's later blocks are
        still stored, below the cached run: if that run is claimed, the claim follows it and
        the request's own copies stay private (``StoredRun.private_slots``); if it is not,
        it takes over the request's copies (a host run moves to the GPU without a copy) and
        its old slots are free again. A claimed duplicate on the host (being onboarded by
        another request) stops the store there; a later call continues. The GPU pool's
        books don't change: the slots are referenced before and after. New runs record
        the storing request's ``turn`` and ``prompt_end_block`` (see ``turn``).
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
                if pos:  # NOTE: slice only after a duplicate: a run's tokens are long
                    tokens, slots = tokens[pos * tpb:], slots[pos:]
                    extras = extras[pos:] if extras is not None else None
                if _grows(node, turn, prompt_end_block):
                    extend_run(node, tokens, slots, extras)
                    self.journal.extended(node, start - node.start_block)
                    return StoredRun(node, num_blocks, private)
                new = Node(node, tokens, slots, Tier.GPU, extras, start, node.root)
                new.ref_count = 1
                new.num_accesses = 1
                new.created_s = new.last_used_s = self.evictor.now()
                new.turn, new.prompt_end_block = turn, prompt_end_block
                add_child(node, new)
                self.journal.stored(new)
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

    def _adopt(self, node: Node, gpu_slots: Sequence[int]) -> None:
        """Give the unreferenced run ``node`` the slots ``gpu_slots``, a request's private
        copies of the same blocks, and claim it once for that request; its own slots are
        free again. A host run thus moves to the GPU without a copy. Claiming a cached run
        in place would take blocks from what is available; this takes none."""
        assert not node.ref_count and node.parent is not None
        self.pool(node.tier).give_back(node.slots)
        node.slots = array(SLOT_TYPECODE, slot_array(gpu_slots))  # a copy: the node's own
        node.ref_count = 1  # the GPU slots stay referenced: the pool's books don't change
        if node.tier is Tier.HOST:
            node.tier = Tier.GPU
            node.parent.num_gpu_children += 1
            self.journal.moved(node, Tier.HOST)

    def detach_leaf_block(self, node: Node) -> int:
        """Take a one-block, claimed-once GPU leaf out of the tree for reuse in place.

        Its slot becomes the caller's private block (still referenced); returns the slot.
        """
        assert node.num_blocks == 1 and not node.children and node.tier is Tier.GPU
        parent = node.parent
        assert parent is not None
        self.journal.removed([node])
        remove_child(parent, node)
        node.parent = None
        self.evictor.refile(parent)
        self._prune(parent)
        return node.slots[0]

    # ---- the waiting queue ----------------------------------------------------------------

    def set_soft_claims(self, specs: Sequence[SequenceSpec]) -> None:
        """Soft-claim the cached prefixes of the waiting requests ``specs`` (replacing the
        last call's): a policy that ``ranks_soft_claims`` keeps them longer; they stay
        evictable, and the pools' books do not change.

        A request hinted before keeps the deepest run its prefix was found to end in while
        that run is still cached (blocks stored since may extend the prefix unclaimed: they
        are the most recent anyway), so a queue hinted step after step is matched once."""
        last_specs, lasts, unmatched = self._hinted_queue
        if (len(specs) == len(last_specs) and all(map(is_, specs, last_specs))
                and None not in map(_parent, lasts)
                and all(self._prefix_end(spec) is None for spec in unmatched)):
            # NOTE: the same queue as last time (most steps change the cache, not the
            # queue), every run found still cached, and still nothing cached for the rest:
            # the loop below would find the same.
            self.evictor.soft_claim(lasts)
            return
        if not self._shift_hint(specs):
            self._hint_afresh(specs)
        self.evictor.soft_claim(self._hinted_queue[1])

    def _shift_hint(self, specs: Sequence[SequenceSpec]) -> bool:
        """``_hint_afresh``'s result for a queue that lost its first few requests (at most
        ``_MAX_SHIFT``) and gained some at its end, the usual change (a step admits the
        head), without walking the rest of the queue again: False (nothing changed) where
        that does not hold, or where the walk would find another run or a first one for a
        request the queue kept, or the requests' ids are not distinct. The same dict, in
        the same order, the same lists."""
        last_specs, lasts, unmatched = self._hinted_queue
        rids = self._hinted_rids
        if rids is None or not specs or not last_specs:
            return False
        first = specs[0]
        for m in range(min(_MAX_SHIFT, len(last_specs) - 1) + 1):
            if last_specs[m] is first:
                break
        else:
            return False
        k = len(last_specs) - m
        if len(specs) < k or not all(map(is_, itertools.islice(specs, k), last_specs[m:])):
            return False
        found = self._hinted
        dropped = last_specs[:m]
        num_dropped_unmatched = sum(1 for s in dropped if s.request_id not in found)
        kept_lasts = lasts[m - num_dropped_unmatched:]
        kept_unmatched = unmatched[num_dropped_unmatched:]
        if None in map(_parent, kept_lasts) or any(
                self._prefix_end(spec) is not None for spec in kept_unmatched):
            return False
        new_rids = rids.difference(s.request_id for s in dropped)
        tail = specs[k:]
        for spec in tail:
            if spec.request_id in new_rids:
                return False
            new_rids.add(spec.request_id)
        hinted = dict(found)
        for spec in dropped:
            hinted.pop(spec.request_id, None)
        tail_lasts, tail_unmatched = self._hint_all(tail, found, hinted)
        self._hinted = hinted
        self._hinted_rids = new_rids
        self._hinted_queue = (list(specs), kept_lasts + tail_lasts,
                              kept_unmatched + tail_unmatched)
        return True

    def _hint_of(self, spec: SequenceSpec,
                 found: dict[str, tuple[SequenceSpec, Node]]) -> Node | None:
        """The deepest run of ``spec``'s cached prefix: the one found at the last hint
        (``found``) while it is cached, else matched now (None: nothing cached)."""
        entry = found.get(spec.request_id)
        last = entry[1] if entry is not None and entry[0] is spec else None
        if last is None or last.parent is None:
            return self._prefix_end(spec)
        return last

    def _hint_all(self, specs: Sequence[SequenceSpec],
                  found: dict[str, tuple[SequenceSpec, Node]],
                  hinted: dict[str, tuple[SequenceSpec, Node]]
                  ) -> tuple[list[Node], list[SequenceSpec]]:
        """``_hint_of`` each of ``specs``, filed in ``hinted`` by request id; return the
        runs found and the specs with nothing cached, in ``specs``' order."""
        lasts: list[Node] = []
        unmatched: list[SequenceSpec] = []
        for spec in specs:
            last = self._hint_of(spec, found)
            if last is None:
                unmatched.append(spec)
            else:
                hinted[spec.request_id] = (spec, last)
                lasts.append(last)
        return lasts, unmatched

    def _hint_afresh(self, specs: Sequence[SequenceSpec]) -> None:
        """Find the deepest cached run of each request of ``specs`` (``_hint_of``)."""
        hinted: dict[str, tuple[SequenceSpec, Node]] = {}
        _, unmatched = self._hint_all(specs, self._hinted, hinted)
        self._hinted = hinted
        rids = {spec.request_id for spec in specs}
        self._hinted_rids = rids if len(rids) == len(specs) else None
        lasts = [last for _, last in hinted.values()]  # one a request id, as claimed
        self._hinted_queue = (list(specs), lasts, unmatched)

    def _prefix_end(self, spec: SequenceSpec) -> Node | None:
        """The deepest run of ``spec``'s cached prefix (None: nothing cached). Pure."""
        root = self.root(spec.lora_id, spec.salt)
        extras = block_extras(spec.mm_items, len(spec.token_array), self.tpb)
        m = self.match_spec(root, spec, extras)
        if m.tail is not None:
            return m.tail[0]
        return m.path[-1] if m.path else None

    def clear(self) -> None:
        """Drop every cached block of every tier (no request may be live), none spilled:
        their KV is stale (a reset follows a weight update)."""
        for root in list(self.roots.values()):
            for child in list(root.iter_children()):
                self.drop(child, spill=False)
        self.roots.clear()
        # NOTE: what still named the dropped runs kept them alive (their token ids too)
        # after a reset: the memo of matches until 512 prompts later, the pools' stale
        # heap entries until a compaction (twice the pool's filings).
        self._matches = {}
        self.evictor.cleared()
        self._hinted = {}
        self._hinted_rids = set()
        self._hinted_queue = ([], [], [])
        if self._witness is not None:
            self._witness.clear()
        self.journal.cleared()


def _grows(node: Node, turn: int, prompt_end_block: int) -> bool:
    """Whether a request (at ``turn``, its prompt's full blocks ending at
    ``prompt_end_block``) that stores blocks right after ``node`` appends them to it rather
    than to a new child: ``node`` is a run of its output (past the prompt's end: decode
    growth, a block at a time) on the GPU, a leaf that only this request holds and that it
    stored itself (one access, no release yet, no soft claim, its session). Separate runs
    would differ only in their release ticks, consecutive, deepest first: the order in
    which eviction takes a run's tail anyway; one run keeps eviction per run, not per
    decode block. Pure.

    NOTE: prompt chunks are not joined: a prompt's runs are what the policy's learner and
    its LRU witness count in (claims, ghosts, release ticks), and joining them moved the
    learned policy's hit rate beyond its noise (decode runs did not).
    """
    return (node.start_block >= prompt_end_block and node.ref_count == 1
            and not node.children and node.tier is Tier.GPU and node.parent is not None
            and node.num_accesses == 1 and node.reuse_class is None
            and not node.soft_claimed and node.turn == turn
            and node.prompt_end_block == prompt_end_block)


def _role(node: Node, seq: LiveSequence) -> int:
    """``node``'s role in the request ``seq`` that releases it (``kvtier.eviction.ROLE_*``)."""
    if node.start_block >= seq.num_prompt_blocks:
        return ROLE_TAIL
    if seq.turn == 1 and node.start_block + node.num_blocks <= seq.num_hit_blocks:
        return ROLE_SHARED
    return ROLE_BODY
