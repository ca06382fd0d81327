"""Failed copies degrade to recompute: nothing stale is ever served, nothing leaks.

``fail_transfers`` runs when a transfer engine reports that some ops of a plan did not
complete. Their destinations hold garbage, and so do the destinations of later ops that read
them. Every live request holding such a block is aborted, and with it the blocks it only
scheduled (never computed) in its latest call; requests that reused those are aborted too.
Then every damaged block and its extensions leave the cache. The caller requeues the aborted
requests: a fresh lookup no longer finds the damaged blocks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from kvtier.radix import Tier, path_to_root
from kvtier.sequence import LiveSequence
from kvtier.transfer.plan import TransferPlan

if TYPE_CHECKING:
    from kvtier.manager import KVCacheManager


def fail_transfers(mgr: KVCacheManager, plan: TransferPlan,
                   failed_ops: Iterable[int]) -> list[str]:
    """Handle the failure of ops ``failed_ops`` (indices into ``plan.ops``) of ``mgr``'s
    plan; return the ids of the requests aborted, to requeue."""
    damaged: set[tuple[Tier, int]] = set()
    failed = set(failed_ops)
    for i, op in enumerate(plan.ops):
        if i in failed or (op.src_tier, op.src_slot) in damaged:
            damaged.add((op.dst_tier, op.dst_slot))
        else:
            damaged.discard((op.dst_tier, op.dst_slot))  # rewritten with good data
    if not damaged:
        return []
    mgr._version += 1
    store = mgr._store
    tpb = mgr.config.tokens_per_block
    owners = store.slot_owners()
    aborted: dict[str, LiveSequence] = {}
    for rid, seq in mgr._seqs.items():
        if any((Tier.GPU, s) in damaged for s in seq.own_slots()):
            aborted[rid] = seq
    damaged_nodes = {owners[key][0].uid for key in damaged if key in owners}
    for rid, seq in mgr._seqs.items():
        if any(n.uid in damaged_nodes for n in path_to_root(seq.last_node)):
            aborted[rid] = seq
    # Requests that reused blocks an aborted request never computed are aborted too.
    while True:
        unsafe = {n.uid for seq in aborted.values() for n in path_to_root(seq.last_node)
                  if n.start_block + n.num_blocks > seq.num_valid_tokens // tpb}
        more = {rid: seq for rid, seq in mgr._seqs.items() if rid not in aborted and any(
            n.uid in unsafe for n in path_to_root(seq.last_node))}
        if not more:
            break
        aborted.update(more)
    for seq in aborted.values():
        _release_unstored(mgr, seq)
    for seq in aborted.values():
        _drop_uncomputed(mgr, seq)
    owners = store.slot_owners()
    for key in sorted(damaged):
        owner = owners.get(key)
        if owner is None:
            continue  # free
        node, index = owner
        # Still cached where it was? (An earlier drop may have taken it with its prefix.)
        if node.parent is not None and index < node.num_blocks and node.slots[index] == key[1]:
            store.drop_from(node, index)
    store.stats.num_failed_transfers += len(failed)
    return list(aborted)


def _release_unstored(mgr: KVCacheManager, seq: LiveSequence) -> None:
    """Remove ``seq`` without storing anything more (a rollback: no LRU touch)."""
    del mgr._seqs[seq.request_id]
    if mgr._deferred is not None:
        mgr._deferred.pop(seq.request_id, None)
        mgr._pending_stores.pop(seq.request_id, None)
    mgr._num_reserved -= seq.num_reserved
    mgr._store.free_gpu(seq.own_slots())
    mgr._store.unref_path(seq.last_node)
    mgr._store.leave_root(seq.root)


def _drop_uncomputed(mgr: KVCacheManager, seq: LiveSequence) -> None:
    """Drop the blocks of released ``seq``'s path that its latest call only scheduled."""
    valid_blocks = seq.num_valid_tokens // mgr.config.tokens_per_block
    node = seq.last_node
    while node.parent is not None and node.start_block + node.num_blocks > valid_blocks:
        parent = node.parent
        assert node.ref_count == 0, node
        mgr._store.drop_from(node, max(0, valid_blocks - node.start_block))
        node = parent
