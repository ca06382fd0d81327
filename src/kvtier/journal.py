"""What the cache reports about its blocks: chained hashes, KV events and the spill log.

Hashes are computed lazily, once per block, only when something needs them (events, the
spill log of a write-back remote tier, a snapshot for a router). Contract: the Journal
changes only the runs' cached ``hashes``, its event log and its spill log.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from kvtier.config import CacheConfig
from kvtier.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    BlockTierChanged,
    EventLog,
)
from kvtier.hashing import chain_hashes, encode_key, get_hash_fn, root_hash
from kvtier.radix import Node, Root
from kvtier.tier import Tier


class CachedBlock(NamedTuple):
    """One cached block: its chained hash and its parent's (as other processes name it),
    where its KV lives, its key space, its own tokens, and the priority eviction ranks it by
    now (the one it was last released with until that retention runs out, then the
    default; ``None`` while a request holds it: it cannot be evicted)."""

    block_hash: int
    parent_hash: int | None
    tier: Tier
    slot: int
    lora_id: int | None
    salt: bytes | str | int | None
    tokens: tuple[int, ...]
    priority: int | None


class Journal:
    """Block hashes, KV events (with ``enable_events``) and the write-back spill log."""

    def __init__(self, config: CacheConfig) -> None:
        self._tpb = config.tokens_per_block
        self._hash_fn = get_hash_fn(config.hash_algo)
        self.events = EventLog(config.max_events) if config.enable_events else None
        # With a write-back remote tier: (block hash, host slot) of host blocks dropped
        # since the last drain whose slot still holds their KV (no offload into it pending).
        self.spill_log: list[tuple[int, int]] | None = None
        self._fresh_host_slots: set[int] = set()

    # ---- hashes -----------------------------------------------------------------------------

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
                if isinstance(parent, Root):
                    prev = root_hash(self._hash_fn, root.lora_id, root.salt)
                else:
                    assert parent.hashes is not None
                    prev = parent.hashes[-1]
                p.hashes = chain_hashes(self._hash_fn, prev, p.tokens, self._tpb,
                                        root.lora_id, p.extras)
        assert node.hashes is not None
        return node.hashes

    def parent_hash(self, node: Node) -> int | None:
        """The hash of the block before ``node``'s first, or None at the root."""
        parent = node.parent
        if parent is None or parent.parent is None:
            return None
        return self.hashes(parent)[-1]

    def report(self, nodes: Iterable[Node],
               priority: Callable[[Node], int]) -> list[CachedBlock]:
        """The blocks of ``nodes`` (parents before children) as ``CachedBlock``, an
        unreferenced one with ``priority(node)``. Pure."""
        tpb = self._tpb
        blocks = []
        for node in nodes:
            root = node.root
            assert root is not None
            lora_id, salt = root.lora_id, root.salt
            assert lora_id is None or type(lora_id) is int
            assert salt is None or isinstance(salt, (bytes, str, int))
            parent_hash = self.parent_hash(node)
            rank = None if node.ref_count else priority(node)
            for i, (h, slot) in enumerate(zip(self.hashes(node), node.slots, strict=True)):
                blocks.append(CachedBlock(h, parent_hash, node.tier, slot, lora_id, salt,
                                          tuple(node.tokens[i * tpb:(i + 1) * tpb]), rank))
                parent_hash = h
        return blocks

    # ---- events -----------------------------------------------------------------------------

    def stored(self, node: Node) -> None:
        """``node``'s blocks were cached."""
        if self.events is not None:
            self._report_stored(node, 0)

    def extended(self, node: Node, num_old_blocks: int) -> None:
        """``node`` grew past its first ``num_old_blocks`` blocks (``radix.extend_run``):
        its cached hashes grow with it, and the new blocks are reported stored."""
        if node.hashes is not None:
            root = node.root
            assert root is not None
            extras = node.extras[num_old_blocks:] if node.extras is not None else None
            node.hashes += chain_hashes(self._hash_fn, node.hashes[-1],
                                        node.tokens[num_old_blocks * self._tpb:], self._tpb,
                                        root.lora_id, extras)
        if self.events is not None:
            self._report_stored(node, num_old_blocks)

    def _report_stored(self, node: Node, first: int) -> None:
        """A ``BlockStored`` for each of ``node``'s blocks from its ``first`` on."""
        events = self.events
        assert events is not None and node.root is not None
        lora, salt = node.root.lora_id, node.root.salt
        assert lora is None or isinstance(lora, int)
        salt_key = None if salt is None else encode_key(salt)
        hashes = self.hashes(node)
        parent_hash = self.parent_hash(node) if first == 0 else hashes[first - 1]
        tpb, tokens, extras = self._tpb, node.tokens, node.extras
        for i in range(first, len(hashes)):
            h = hashes[i]
            extra = extras[i] if extras is not None else None
            events.append(BlockStored(events.next_seq(), h, parent_hash, node.tier, tpb, lora,
                                      tuple(tokens[i * tpb:(i + 1) * tpb]),
                                      None if extra is None else encode_key(extra), salt_key))
            parent_hash = h

    def moved(self, node: Node, old: Tier) -> None:
        """``node``'s blocks moved from tier ``old`` to ``node.tier``."""
        events = self.events
        if events is None:
            return
        for h in self.hashes(node):
            events.append(BlockTierChanged(events.next_seq(), h, old, node.tier))

    def removed(self, nodes: list[Node], spill: bool = True) -> None:
        """``nodes`` left the cache (their slots are about to be reused); their host blocks
        go to the spill log unless ``spill`` is False (a key space dropped on purpose)."""
        events = self.events
        if events is not None:
            for n in nodes:
                for h in self.hashes(n):
                    events.append(BlockRemoved(events.next_seq(), h, n.tier))
        if self.spill_log is not None and spill:
            fresh = self._fresh_host_slots
            self.spill_log.extend((h, slot) for n in nodes if n.tier is Tier.HOST
                                  for h, slot in zip(self.hashes(n), n.slots, strict=True)
                                  if slot not in fresh)

    def cleared(self) -> None:
        """Every block of every tier left the cache; so do the spills not drained yet (KV of
        before a reset, which a write-back remote tier must not write after it)."""
        if self.events is not None:
            self.events.append(AllBlocksCleared(self.events.next_seq()))
        if self.spill_log is not None:
            self.spill_log.clear()
            self._fresh_host_slots.clear()

    # ---- the spill log ----------------------------------------------------------------------

    def host_slots_filled(self, slots: Sequence[int]) -> None:
        """``slots`` get their KV only when the current plan runs (an offload into them):
        until it is taken (``plan_taken``), a block dropped from them is not spilled."""
        if self.spill_log is not None:
            self._fresh_host_slots.update(slots)

    def forget_spills(self, host_slots: set[int]) -> None:
        """The KV in ``host_slots`` is garbage (a failed copy wrote them): the spills not
        drained yet that would read them are dropped, never written to the remote store."""
        if self.spill_log:
            self.spill_log = [(h, slot) for h, slot in self.spill_log
                              if slot not in host_slots]

    def drain_spills(self) -> list[tuple[int, int]]:
        """The spill log since the last drain; the next plan may overwrite those slots."""
        assert self.spill_log is not None
        spills, self.spill_log = self.spill_log, []
        return spills

    def plan_taken(self) -> None:
        """The plan holding the offloads into the fresh host slots was handed out: they hold
        their KV once it runs, before any later call drops them.

        NOTE: a drain forgot them instead: a host block offloaded, drained over, then
        dropped before its plan was taken was spilled from a slot its offload had not
        reached yet (a write-back tier wrote the slot's old KV under its hash)."""
        self._fresh_host_slots.clear()
