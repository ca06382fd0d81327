"""Moves between the tiers: GPU slots allocated with eviction (each GPU victim run
offloaded to the host as far as the host takes it, the rest dropped), room made on the
host, and a claimed host path onboarded in one eviction round, swapping with GPU victims a
piece at a time.

:class:`TierMoves` is a part of :class:`~kvtier.cache.BlockCache` over its drops
(:class:`~kvtier.run_drops.RunDrops`).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

from kvtier.onboarding import Onboarding
from kvtier.radix import Node
from kvtier.run_drops import RunDrops
from kvtier.slots import SLOT_TYPECODE
from kvtier.tier import Tier
from kvtier.transfer.plan import OpKind, PlanRecorder


class TierMoves(RunDrops):
    """GPU allocation with eviction and offload, and onboarding of host paths."""

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
