"""Blocks whose KV comes from elsewhere (a remote store), cached as host blocks that a
waiting request will then onboard like any host hit.

Contract: changes the cache only by making host room (dropping unreferenced host leaves,
lowest key first) and storing one unreferenced host run past what the tiers hold; it claims
nothing beyond the call, and copies nothing: the caller writes the returned host slots.
"""

from __future__ import annotations

from collections.abc import Collection

from kvtier.cache import BlockCache
from kvtier.matching import match_prompt
from kvtier.radix import Node, add_child
from kvtier.slots import slot_array
from kvtier.tier import Tier


def import_prefix(cache: BlockCache, tokens: list[int], num_blocks: int, lora_id: object,
                  salt: object, extras: list[object] | None = None,
                  pending_host_slots: Collection[int] = ()) -> list[int]:
    """Cache up to ``num_blocks`` full blocks of ``tokens`` (validated) past what the tiers
    already hold, as host blocks; return their host slots, in order (fewer, or none, when
    the host has less room). Only the first ``len(tokens) - 1`` tokens are reusable. No
    slot of ``pending_host_slots`` (the host slots that copies recorded and not yet run
    read or write) is handed out: the caller writes the slots now, and such a copy would
    read the imported KV for another block's, or overwrite it, when its plan runs."""
    if not cache.config.enable_block_reuse or not cache.config.num_host_blocks:
        return []
    tpb = cache.tpb
    root = cache.join_root(lora_id, salt)
    try:
        m = match_prompt(root, tokens, extras, cache.config)
        start = m.num_blocks
        end = min(start + num_blocks, (len(tokens) - 1) // tpb)
        if end <= start:
            return []
        parent: Node = m.path[-1] if m.path else root
        if m.tail is not None:
            parent = cache.split(m.tail[0], m.tail[1])
        # The parent's run must not be evicted while room is made for its extension.
        cache.ref_path(parent)
        try:
            num = min(end - start, cache.free_host(end - start, None))
        finally:
            cache.unref_path(parent)
        if num == 0:
            return []
        slots = cache.host.take(num)
        if pending_host_slots:
            # NOTE: a host block offloaded by a call whose plan is not taken yet, then
            # dropped to make this room, left its slot free with the offload still to come
            # (it overwrote the imported KV when the plan ran); a host block onboarded left
            # its slot free with the onboard still to read it (it read the imported KV into
            # the request's GPU block).
            busy = [s for s in slots if s in pending_host_slots]
            if busy:
                cache.host.give_back(busy)
                slots = slot_array([s for s in slots if s not in pending_host_slots])
                num = len(slots)
                if num == 0:
                    return []
        node = Node(parent, tokens[start * tpb:(start + num) * tpb], slots,
                    Tier.HOST, extras[start:start + num] if extras is not None else None,
                    parent.start_block + parent.num_blocks, parent.root)
        node.priority = cache.config.default_priority
        node.last_used = cache.next_tick()
        node.created_s = node.last_used_s = cache.evictor.now()
        add_child(parent, node)
        cache.journal.stored(node)
        cache.evictor.refile(node)
        cache.stats.num_imported_blocks += num
        return list(node.slots)
    finally:
        cache.leave_root(root)
