"""The live-request table: admitted requests, their reservations, and the current step.

Contract: the manager, admission (``add``) and recovery (``discard``) change it; nothing
else does. It holds no blocks itself: each ``LiveSequence`` records its claimed path and
its private slots, and the cache counts them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import cast

from kvtier.reprs import shown
from kvtier.sequence import (
    MAX_TOKEN_ID,
    LiveSequence,
    SequenceSpec,
    check_spec,
    check_token,
    request_id_of,
)

# The item types a decode batch's fast check accepts; any other goes the item-by-item way.
_PAIR_TYPES = frozenset((tuple, list))
_INT_TYPES = frozenset((int,))  # a token's one type (a bool is refused, as check_token does)


class LiveTable:
    """Live requests by id, the GPU blocks they reserve for growth, and step bookkeeping.

    Between ``begin_step`` and ``end_step``, ``touched`` holds the requests the step
    scheduled tokens for (their tokens scheduled before the step stay the valid ones) and
    ``pending_stores`` those with blocks to store when the step ends.
    """

    def __init__(self) -> None:
        self.seqs: dict[str, LiveSequence] = {}
        self.num_reserved_blocks = 0
        self.touched: dict[str, LiveSequence] | None = None
        self.pending_stores: dict[str, LiveSequence] = {}
        # Requests discarded since the table was built (released or aborted): it only grows.
        self.num_discarded = 0

    def __len__(self) -> int:
        return len(self.seqs)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self.seqs

    def __iter__(self) -> Iterator[LiveSequence]:
        return iter(self.seqs.values())

    def get(self, request_id: str) -> LiveSequence:
        """The live request ``request_id``; KeyError naming it if there is none."""
        rid = request_id_of(request_id)
        seq = self.seqs.get(rid) if rid is not None else None
        if seq is None:
            raise KeyError(f"unknown request_id {shown(request_id)}")
        return seq

    def new_batch(self, specs: object) -> list[SequenceSpec]:
        """``specs`` as a list of specs of new requests; TypeError for a batch that is no
        iterable of ``SequenceSpec``, ValueError naming a duplicate or live request id."""
        # NOTE: a list (``add_sequence``'s, a scheduler's) skips the ABC's isinstance.
        if type(specs) is not list and (isinstance(specs, (SequenceSpec, str, bytes))
                                        or not isinstance(specs, Iterable)):
            raise TypeError(f"specs must be an iterable of SequenceSpec, got {shown(specs)}")
        batch = list(specs)
        seen: set[str] = set()
        for i, spec in enumerate(batch):
            check_spec(spec, f"batch item {i}")
            rid = spec.request_id
            if rid in self.seqs:
                raise ValueError(f"request_id {shown(rid)} (batch item {i}) is already live")
            if rid in seen:
                raise ValueError(f"request_id {shown(rid)} appears twice in the batch (item {i})")
            seen.add(rid)
        return batch

    def decode_items(self, items: object) -> list[tuple[LiveSequence, int]]:
        """``(request_id, token)`` items as (live request, token) pairs, every one checked:
        ValueError or KeyError naming the first bad item.

        NOTE: a step's batch (up to the running requests) is checked whole at C speed
        (``map`` over the items, ids looked up at once, token bounds by ``min``/``max``);
        only a batch that fails is walked item by item, to name the first bad one.
        """
        if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
            raise ValueError(f"items must be (request_id, token) pairs, got {shown(items)}")
        batch = items if type(items) is list else list(items)
        if not batch:
            return []
        if _PAIR_TYPES.issuperset(map(type, batch)):
            try:  # pairs only: items of one length (strict), and that length 2 (unpacking)
                rids, tokens = zip(*batch, strict=True)
            except ValueError:
                return self._decode_items_one_by_one(batch)
            seqs = self.decode_columns(rids, tokens) if set(map(type, rids)) == {str} else None
            if seqs is not None:
                return list(zip(seqs, tokens, strict=True))
        return self._decode_items_one_by_one(batch)

    def decode_columns(self, request_ids: Sequence[str],
                       tokens: Sequence[int]) -> list[LiveSequence] | None:
        """The live requests of a decode batch given as two lists of equal length, the
        form kvtier's scheduler builds from its running table: every check
        ``decode_items`` makes of an item's values (the id live, the token an id in range,
        the request past its prefill), or None where one fails (then ``decode_items``
        names the first bad item). Pure.

        NOTE: the lists' shape is the caller's to guarantee (ids are str, one token an
        id): this skips only the checks of the pairs' shape, which cost most of
        ``decode_items`` on a step's batch; every value is still checked at C speed.
        """
        if len(tokens) != len(request_ids):
            return None
        if not request_ids:
            return []
        seqs = list(map(self.seqs.get, request_ids))
        if (None in seqs or not _INT_TYPES.issuperset(map(type, tokens))
                or min(tokens) < 0 or max(tokens) > MAX_TOKEN_ID):
            return None
        # NOTE: a loop, not ``all(map(ge, map(attrgetter ...)))``: on CPython 3.11 a slot
        # read by a specialized ``LOAD_ATTR`` is about twice as fast as ``attrgetter``'s
        # generic lookup (a step's batch of 256: ~25 us against ~40-80 us, measured).
        for seq in cast("list[LiveSequence]", seqs):
            if seq.num_scheduled_tokens < len(seq.tokens):
                return None
        return cast("list[LiveSequence]", seqs)

    @staticmethod
    def column_pairs(request_ids: object, tokens: object) -> list[tuple[object, object]]:
        """A decode batch given as two columns, as ``decode_items``'s pairs: ValueError
        naming the column that is no sequence, or the two lengths where they differ. The
        values are ``decode_items``'s to check. Pure."""
        columns = []
        for name, column in (("request_ids", request_ids), ("tokens", tokens)):
            if isinstance(column, (str, bytes)) or not isinstance(column, Sequence):
                raise ValueError(f"{name} must be a list, got {shown(column)}")
            columns.append(column)
        if len(columns[0]) != len(columns[1]):
            raise ValueError(f"request_ids has {len(columns[0])} ids but tokens has "
                             f"{len(columns[1])} tokens")
        return list(zip(columns[0], columns[1], strict=True))

    def _decode_items_one_by_one(self, items: list[object]) -> list[tuple[LiveSequence, int]]:
        """``decode_items``, each item checked in turn: raises naming the first bad one."""
        batch: list[tuple[LiveSequence, int]] = []
        for i, item in enumerate(items):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"item {i} must be a (request_id, token) pair, got {shown(item)}")
            rid, token = item
            key = request_id_of(rid)
            seq = self.seqs.get(key) if key is not None else None
            if seq is None:
                raise KeyError(f"item {i}: unknown request_id {shown(rid)}")
            token = check_token(token, f"item {i}: the token appended to {shown(rid)}")
            seq.check_prefilled()
            batch.append((seq, token))
        return batch

    def add(self, seq: LiveSequence) -> None:
        """Admit ``seq`` (with its reservation)."""
        self.seqs[seq.request_id] = seq
        self.num_reserved_blocks += seq.num_reserved_blocks

    def discard(self, seq: LiveSequence) -> None:
        """Forget ``seq`` and its reservation (the caller releases its blocks)."""
        del self.seqs[seq.request_id]
        self.num_discarded += 1
        self.num_reserved_blocks -= seq.num_reserved_blocks
        if self.touched is not None:
            self.touched.pop(seq.request_id, None)
            self.pending_stores.pop(seq.request_id, None)

    def use_reserved(self, seq: LiveSequence, num_blocks: int) -> None:
        """``seq`` took ``num_blocks`` new GPU blocks: they come out of its reservation first."""
        used = min(num_blocks, seq.num_reserved_blocks)
        seq.num_reserved_blocks -= used
        self.num_reserved_blocks -= used

    @property
    def in_step(self) -> bool:
        return self.touched is not None

    def begin_step(self) -> None:
        if self.touched is not None:
            raise RuntimeError("begin_step() called twice without end_step()")
        self.touched = {}

    def end_step(self) -> list[LiveSequence]:
        """Close the step; returns the live requests with blocks to store, in order."""
        if self.touched is None:
            raise RuntimeError("end_step() called without begin_step()")
        self.touched = None
        pending, self.pending_stores = self.pending_stores, {}
        return [seq for rid, seq in pending.items() if self.seqs.get(rid) is seq]

    def schedule(self, seq: LiveSequence, num_tokens: int) -> None:
        """Set ``seq``'s scheduled tokens. What was scheduled before stays valid (computed
        by the time a later step reads it); inside a step, only what was scheduled before
        the step began (a request may be touched twice in one step)."""
        touched = self.touched
        if touched is None:
            seq.num_valid_tokens = seq.num_scheduled_tokens
        elif seq.request_id not in touched:
            seq.num_valid_tokens = seq.num_scheduled_tokens
            touched[seq.request_id] = seq
        seq.num_scheduled_tokens = num_tokens

    def defer_store(self, seq: LiveSequence) -> bool:
        """Inside a step, note that ``seq`` has blocks to store at its end and return True;
        outside one, return False (store now)."""
        touched = self.touched
        if touched is None:
            return False
        touched[seq.request_id] = seq
        self.pending_stores[seq.request_id] = seq
        return True

    def touched_in_step(self, request_id: str) -> bool:
        """Whether the current step scheduled tokens for ``request_id``. Pure."""
        return self.touched is not None and request_id in self.touched
