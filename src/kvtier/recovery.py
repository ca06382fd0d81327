"""Failed copies and forward passes degrade to recompute: nothing stale is ever served,
nothing leaks.

``fail_transfers`` runs when a transfer engine reports that some ops of a plan did not
complete. Their destinations hold garbage, and so do the destinations of later ops that read
them. Every live request whose block table holds such a block is aborted, and with it the
blocks it only scheduled (never computed) in its latest call; requests reading those are
aborted too. Then every bad block leaves the cache with its extensions (never spilled to a
write-back remote tier), except where a live request follows it with a copy of its own:
that copy takes its place. The caller requeues the
aborted requests: a fresh lookup no longer finds the bad blocks.

``fail_computes`` runs when the forward passes of some requests of a step fail: the blocks
they scheduled in that step are garbage (stored for reuse at the step's end, never
computed), and the same spreading and dropping follows from there.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvtier.cache import BlockCache
from kvtier.counts import as_integer
from kvtier.live import LiveTable
from kvtier.radix import Node, path_to_root
from kvtier.reprs import shown
from kvtier.sequence import LiveSequence
from kvtier.tier import Tier
from kvtier.transfer.plan import OP_KINDS, OpKind, PlanColumns, TransferPlan


def check_failed_indices(plan: object, failed_indices: object) -> list[int]:
    """``failed_indices`` as a list of indices into ``plan``'s ops; TypeError or ValueError
    naming what is wrong otherwise."""
    if not isinstance(plan, TransferPlan):
        raise TypeError(f"plan must be a TransferPlan, got {shown(plan)}")
    if isinstance(failed_indices, (str, bytes)) or not isinstance(failed_indices, Iterable):
        raise TypeError(f"failed_indices must be an iterable of op indices, got "
                        f"{shown(failed_indices)}")
    failed: list[int] = []
    for i, given in enumerate(list(failed_indices)):
        index = as_integer(given)  # a NumPy or torch integer is read as the int it is
        if index is None:
            # NOTE: a bool or a float was refused as "not an index into the plan's N ops"
            # though it lay in range: the message named the wrong fault.
            raise ValueError(f"failed_indices[{i}] is {shown(given)}, a {type(given).__name__}, "
                             f"not an integer")
        failed.append(index)
        if not 0 <= index < len(plan.ops):
            raise ValueError(f"failed op index {shown(index)} is not an index into the plan's "
                             f"{len(plan.ops)} ops")
    return failed


def fail_transfers(cache: BlockCache, live: LiveTable, plan: TransferPlan,
                   failed_indices: Iterable[int], later: PlanColumns | None = None
                   ) -> list[str]:
    """Handle the failure of the ops at ``failed_indices`` of ``plan`` (a plan of this
    cache); return the ids of the requests aborted, in admission order, to requeue.
    ``later`` are the ops recorded since ``plan`` was taken (not taken yet): they run after
    it, so one reading a slot the failure left garbage writes garbage too.

    Contract: discards aborted requests from ``live`` and releases their blocks; drops
    damaged and never-computed blocks from ``cache``; takes back from its stats the reuse
    of an aborted request that computed nothing since its admission (``_take_back_unrun``)
    and the failed copies (``_uncount_copies``); changes nothing else.
    """
    damaged: set[tuple[int, int]] = set()
    failed = set(failed_indices)
    _uncount_copies(cache, plan, failed)
    for i, op in enumerate(plan.ops):
        if i in failed or (op.src_tier, op.src_slot) in damaged:
            damaged.add((op.dst_tier, op.dst_slot))
        else:
            damaged.discard((op.dst_tier, op.dst_slot))  # rewritten with good data
    # NOTE: a host block the plan left garbage, dropped by a call since (an eviction
    # before the failure was reported), is in the spill log, to be written to the remote
    # store under its hash: its entry goes.
    cache.journal.forget_spills({slot for tier, slot in damaged if tier == Tier.HOST})
    if damaged and later is not None:
        # NOTE: a failure reported late (after more calls) spreads through the copies those
        # calls recorded: an offload of a garbage GPU block, an onboard of a garbage host
        # block into a slot a new request reads, left garbage the report never named.
        for src_tier, src_slot, dst_tier, dst_slot in zip(
                later.src_tiers, later.src_slots, later.dst_tiers, later.dst_slots,
                strict=True):
            if (src_tier, src_slot) in damaged:
                damaged.add((dst_tier, dst_slot))
            else:
                damaged.discard((dst_tier, dst_slot))
    if not damaged:
        return []
    aborted = _abort_spreading(cache, live, damaged, [], later)
    cache.stats.num_failed_transfers += len(failed)
    return aborted


def _uncount_copies(cache: BlockCache, plan: TransferPlan, failed: set[int]) -> None:
    """Take the copies at ``failed`` of ``plan`` out of the counters that counted them when
    they were recorded: onboarded and offloaded blocks, partial copies. They never landed.

    NOTE: counted when recorded and never taken back, a step whose onboard and two of
    its three offloads failed reported (1, 3, 0) onboarded, offloaded, partial-copied
    blocks where (0, 1, 0) landed."""
    if not failed:
        return
    kinds = plan.kinds
    num = [0] * len(OP_KINDS)
    for i in failed:
        num[kinds[i]] += 1
    stats = cache.stats
    stats.gpu.offloaded_blocks -= num[OP_KINDS.index(OpKind.OFFLOAD)]
    stats.host.onboarded_blocks -= num[OP_KINDS.index(OpKind.ONBOARD)]
    stats.num_partial_copies -= num[OP_KINDS.index(OpKind.COPY)]


def fail_computes(cache: BlockCache, live: LiveTable, request_ids: Iterable[str],
                  later: PlanColumns | None = None) -> list[str]:
    """Handle the failure of the forward passes of ``request_ids`` (live requests) in the
    step just scheduled; return the ids of the requests aborted, in admission order, to
    requeue: those, and any request reading what they were to compute.

    Their KV past what earlier steps computed is garbage (a pass may fail halfway through
    its layers): the blocks they scheduled but did not compute leave the cache, though
    ``end_step`` stored them for reuse. What earlier steps computed stays cached.
    ``later`` are the ops recorded since the step ended, as for ``fail_transfers``.

    Contract: as ``fail_transfers``."""
    seqs = {rid: live.get(rid) for rid in request_ids}
    aborted = _abort_spreading(cache, live, set(), list(seqs.values()), later)
    cache.stats.num_failed_computes += len(aborted)
    return aborted


def _abort_spreading(cache: BlockCache, live: LiveTable, damaged: set[tuple[int, int]],
                     failed: list[LiveSequence], later: PlanColumns | None = None
                     ) -> list[str]:
    """Abort ``failed`` and every live request reading a ``damaged`` block (garbage); drop
    the garbage from the cache; return the aborted requests' ids in admission order. The
    ``later`` ops (recorded, not taken) reading a bad slot make their destinations bad."""
    tpb = cache.tpb
    # Garbage spreads: a request reading a bad slot is aborted, and the blocks it scheduled
    # but may not have computed (in its own slots) are bad too, for anyone reading them.
    bad: set[tuple[int, int]] = set(damaged)  # (tier, slot): a Tier is its int
    aborted: dict[str, LiveSequence] = {}
    more = failed
    while True:
        for seq in more:
            aborted[seq.request_id] = seq
            bad.update((Tier.GPU, slot) for slot in _uncomputed(seq, tpb))
        if later is not None and len(later.src_slots):
            # NOTE: a request admitted after the failed step (before the report) copies
            # what a failed pass left garbage into a slot of its own (a partial copy).
            for src_tier, src_slot, dst_tier, dst_slot in zip(
                    later.src_tiers, later.src_slots, later.dst_tiers, later.dst_slots,
                    strict=True):
                if (src_tier, src_slot) in bad:
                    bad.add((dst_tier, dst_slot))
        more = [seq for seq in live if seq.request_id not in aborted
                and any((Tier.GPU, slot) in bad for slot in seq.block_table)]
        if not more:
            break
    # In admission order, whatever order the loop above found them in.
    order = {seq.request_id: i for i, seq in enumerate(live)}
    ordered = sorted(aborted.values(), key=lambda seq: order[seq.request_id])
    for seq in ordered:
        _release_unstored(cache, live, seq)
        _take_back_unrun(cache, seq)
    # Bad blocks leave the cache with their extensions; one that a live request still
    # claims (reading its own copy of it instead) takes that copy in its place.
    owners: dict[tuple[int, int], tuple[Node, int]] = {
        (node.tier, slot): (node, i) for node in cache.nodes()
        for i, slot in enumerate(node.slots)}
    for key in sorted(bad):
        owner = owners.get(key)
        if owner is None:
            continue  # free, or private to an aborted request
        node, index = owner
        # Still cached where it was? (An earlier drop may have taken it with its prefix.)
        if node.parent is None or index >= node.num_blocks or node.slots[index] != key[1]:
            continue
        if node.ref_count:
            _replace_with_copy(cache, live, node, index)
        else:
            # Never spilled: a write-back remote tier would write the garbage to the shared
            # store under the block's hash, for every engine to fetch.
            cache.drop_from(node, index, spill=False)
    return [seq.request_id for seq in ordered]


def _replace_with_copy(cache: BlockCache, live: LiveTable, node: Node, index: int) -> None:
    """Block ``index`` of the claimed GPU run ``node`` is bad: every live request on it
    reads its own copy instead (or it would have been aborted). Give the run the first
    such copy, and free the bad slot; the run's later blocks that its holder holds copies
    of too (and no other live request reads) take those copies the same way, and the runs
    below it that no live request holds leave the cache."""
    position = node.start_block + index
    bad_slot = node.slots[index]
    for seq in live:
        if (position < len(seq.block_table) and seq.block_table[position] != bad_slot
                and seq.block_table[position] in seq.private_slots
                and any(n is node for n in path_to_root(seq.last_node))):
            # NOTE: the run's blocks after a bad one were computed reading it, by a request
            # gone since (finished before the failure was reported) or whose valid tokens
            # moved past them: nothing marked them bad, and swapping the bad block alone
            # left its garbage successors cached under the good copy. The holder of the
            # copy computed its own successors from it: those replace them.
            table, private = seq.block_table, set(seq.private_slots)
            swapped = []
            for j in range(index, node.num_blocks):
                pos, old = node.start_block + j, node.slots[j]
                if pos >= len(table) or table[pos] not in private or table[pos] == old:
                    break
                if j > index and any(other is not seq and pos < len(other.block_table)
                                     and other.block_table[pos] == old for other in live):
                    break
                node.slots[j] = table[pos]
                swapped.append(old)
            taken = {node.slots[j] for j in range(index, index + len(swapped))}
            seq.private_slots = [s for s in seq.private_slots if s not in taken]
            cache.free_gpu(swapped)
            if index + len(swapped) == node.num_blocks:
                # The runs below that no live request holds were computed reading the old
                # blocks (a live one holding them reads its own copies: it computed them).
                for child in [c for c in node.iter_children() if not c.ref_count]:
                    cache.drop_from(child, 0, spill=False)
            return
    raise AssertionError(f"{node} block {index} is claimed, but nobody holds a copy")


def _uncomputed(seq: LiveSequence, tpb: int) -> list[int]:
    """The GPU slots of ``seq``'s path holding blocks it scheduled but may not have
    computed: past its valid tokens, in its own slots (not blocks another request stored
    first, which its path only follows), decided block by block. Deepest run first. Pure.

    NOTE: a run is no unit of ownership: a decode run another request stored first, that
    ``seq`` followed with a private copy and grew in place once it held the run alone
    (``run_stores._grows``), starts with the other request's block and goes on with ``seq``'s.
    Judged by its first block, the whole run was the other's, and ``seq``'s garbage past
    it stayed cached::

        run   [ other's block 2 | seq's block 3 ]     seq valid through block 2
        table [ ... | private copy of 2 | 3 ]          -> block 3 bad, block 2 not
    """
    valid_blocks = seq.num_valid_tokens // tpb
    table = seq.block_table
    out: list[int] = []
    for node in path_to_root(seq.last_node):
        start = node.start_block
        if start + node.num_blocks <= valid_blocks:
            break
        slots = node.slots
        out.extend(slots[j] for j in range(max(0, valid_blocks - start), node.num_blocks)
                   if slots[j] == table[start + j])
    return out


def _take_back_unrun(cache: BlockCache, seq: LiveSequence) -> None:
    """If the aborted ``seq`` computed nothing since its admission (its valid tokens are
    still the ones it reused: no later call scheduled past them), its admission's reuse
    was never obtained: the stats take it back (``CacheStats.take_back``).

    NOTE: counted at admission, a request whose onboard failed kept its promised reuse
    in the hit rate and host hits, though it recomputed all of it (4 GPU + 4 host tokens
    counted, none obtained)."""
    counted = seq.counted
    if counted is not None and counted.num_reused_tokens and \
            seq.num_valid_tokens == counted.num_reused_tokens:
        cache.stats.take_back(counted)


def _release_unstored(cache: BlockCache, live: LiveTable, seq: LiveSequence) -> None:
    """Remove ``seq`` without storing anything more (a rollback: no LRU touch)."""
    live.discard(seq)
    cache.free_gpu(seq.own_slots())
    cache.unref_path(seq.last_node)
    cache.leave_root(seq.root)
