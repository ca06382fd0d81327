"""How runs leave the cache: an unreferenced run dropped with everything below it, a run's
tail trimmed in place, host leaves dropped to make room, a key space emptied; the learner
told what it forgets, the journal what left (and the write-back spill log what to spill).

:class:`RunDrops` is a part of :class:`~kvtier.cache.BlockCache` over its state
(:class:`~kvtier.cache_state.CacheState`).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.cache_state import CacheState
from kvtier.eviction import ghost_key_below, node_ghost_key
from kvtier.pool import Key
from kvtier.radix import Node, remove_child, subtree
from kvtier.tier import Tier


class RunDrops(CacheState):
    """Runs dropped from the cache, whole or by their tails."""

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
