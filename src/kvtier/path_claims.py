"""Claims and releases of a request's path: a reference added to a run and its ancestors
(``ref_path``), dropped deepest first (``unref_path``: a release stamps the runs it frees
most recently used, with the request's priority and retention, filed under the learner's
reuse class; a rollback leaves their keys); an admission's reuse told to the learner and
its LRU witness (``note_reuse``), and where the reused prefix ends (``recall_miss``); the
session turn a request continues (``turn``).

:class:`PathClaims` is a part of :class:`~kvtier.cache.BlockCache` over its state
(:class:`~kvtier.cache_state.CacheState`).
"""

from __future__ import annotations

from array import array

from kvtier.cache_state import CacheState
from kvtier.eviction import ROLE_BODY, ROLE_SHARED, ROLE_TAIL, ghost_key
from kvtier.radix import BlockKey, Node, block_key
from kvtier.sequence import LiveSequence


class PathClaims(CacheState):
    """References on paths, releases, and what the learner is told of them."""

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


def _role(node: Node, seq: LiveSequence) -> int:
    """``node``'s role in the request ``seq`` that releases it (``kvtier.eviction.ROLE_*``)."""
    if node.start_block >= seq.num_prompt_blocks:
        return ROLE_TAIL
    if seq.turn == 1 and node.start_block + node.num_blocks <= seq.num_hit_blocks:
        return ROLE_SHARED
    return ROLE_BODY
