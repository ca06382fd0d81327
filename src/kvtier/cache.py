"""The cached blocks of every tier: the tree, the tier pools, and the moves between them.

:class:`BlockCache` is the manager's lower half. It knows nothing of requests: it allocates
GPU slots (evicting and offloading unreferenced runs to make room), onboards host runs,
stores new runs, claims and releases paths. Every move appends the copies it needs to the
caller's op list, in program order; the ``Evictor`` chooses victims, the ``Journal``
reports hashes and events.

Contract: only the cache changes the tree's nodes, the pools' slots and ``stats``; a
referenced node is never evicted, an offload target or detached.

:class:`BlockCache` is one object built of parts, one module each, over one state
(``cache_state.py``: key spaces, pools, evictor, journal, learner, the memo of matched
prompts, ticks, splits): ``run_drops.py`` (runs dropped whole or by their tails),
``tier_moves.py`` (GPU allocation with eviction and offload, host room, onboarding a host
path, with ``onboarding.py``), ``path_claims.py`` (claims, releases, what the learner is
told), ``run_stores.py`` (storing computed runs) and ``soft_claims.py`` (the waiting
queue's hint). This module keeps ``clear``.
"""

from __future__ import annotations

from kvtier.cache_state import MAX_EVICTION_BATCH, eviction_batch
from kvtier.path_claims import PathClaims
from kvtier.run_stores import RunStores, StoredRun
from kvtier.soft_claims import SoftClaims
from kvtier.tier_moves import TierMoves

__all__ = ["MAX_EVICTION_BATCH", "BlockCache", "StoredRun", "eviction_batch"]


class BlockCache(TierMoves, PathClaims, RunStores, SoftClaims):
    """Tree + pools. Referenced nodes are never evicted, offload targets, or detached."""

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
