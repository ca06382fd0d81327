"""Soft claims of the waiting queue's cached prefixes (``set_soft_claims``): a policy that
``ranks_soft_claims`` keeps them longer; they stay evictable and change no pool's books. A
request hinted before keeps the deepest run its prefix was found to end in while that run
is cached, so a queue hinted step after step is matched once; a queue that only lost
requests at its head and gained some at its end walks only the new ones (``_shift_hint``).

:class:`SoftClaims` is a part of :class:`~kvtier.cache.BlockCache` over its state
(:class:`~kvtier.cache_state.CacheState`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from operator import attrgetter, is_

from kvtier.cache_state import CacheState
from kvtier.matching import match_prompt
from kvtier.radix import Node
from kvtier.sequence import SequenceSpec, block_extras

# The most requests a hinted queue may have lost at its head for ``_shift_hint``.
_MAX_SHIFT = 8

_parent = attrgetter("parent")


class SoftClaims(CacheState):
    """The waiting queue's hint: its requests' cached prefixes soft-claimed."""

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

    def hinted_prefix_ends(self) -> list[Node]:
        """The deepest run of each cached prefix of the last hint's requests, matched now
        without the memo of matches (``match_prompt``): for invariant checks. Pure."""
        ends = (self._prefix_end(spec, fresh=True) for spec in self._hinted_queue[0]
                if not spec.skip_reading_prefix_cache)
        return [end for end in ends if end is not None]

    def _prefix_end(self, spec: SequenceSpec, fresh: bool = False) -> Node | None:
        """The deepest run of ``spec``'s cached prefix (None: nothing cached), matched
        through the memo of matches, or, ``fresh``, without it. Pure."""
        root = self.root(spec.lora_id, spec.salt)
        extras = block_extras(spec.mm_items, len(spec.token_array), self.tpb)
        m = (match_prompt(root, spec.token_array, extras, self.config) if fresh
             else self.match_spec(root, spec, extras))
        if m.tail is not None:
            return m.tail[0]
        return m.path[-1] if m.path else None
