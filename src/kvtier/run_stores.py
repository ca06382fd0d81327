"""How a request's computed blocks are stored: ``insert_run`` below its claimed path (after
blocks another request stored first too: the cached run adopts the request's copies where
unclaimed, else they stay private), a request's output grown as one run (``_grows``), and a
one-block leaf taken back for reuse in place (``detach_leaf_block``).

:class:`RunStores` is a part of :class:`~kvtier.cache.BlockCache` over its state
(:class:`~kvtier.cache_state.CacheState`).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import NamedTuple

from kvtier.cache_state import CacheState
from kvtier.matching import num_common_blocks
from kvtier.radix import Node, add_child, block_key, extend_run, remove_child
from kvtier.slots import SLOT_TYPECODE, slot_array
from kvtier.tier import Tier


class StoredRun(NamedTuple):
    """What ``insert_run`` did: the request's path now ends at ``node`` and covers
    ``num_blocks`` more blocks; ``private_slots`` are its copies of blocks cached before."""

    node: Node
    num_blocks: int
    private_slots: list[int]


class RunStores(CacheState):
    """Runs stored for reuse, and a leaf block detached."""

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
