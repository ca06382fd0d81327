"""Slot lists as packed int64 arrays: what nodes, free lists and block tables hold.

A slot list held as a Python list is one int object per slot, scattered over the heap and
cold between steps: every copy of the list touches each of them (a reference count), and
packing it into a plan column reads each one. As an ``array('q')`` a slice, a
concatenation, a reversal or a plan column's append is a copy of contiguous memory, and a
plan's columns are appended without reading a Python object per block.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from struct import Struct
from struct import error as StructError
from typing import Any, overload

SLOT_TYPECODE = "q"
"""The arrays' typecode: a plan's columns are ``array('q')``, appended from these by memcpy."""

# ``packed_slots``'s packers, by slot count (cleared past a bound: any length is fine).
_PACKERS: dict[int, Struct] = {}
_MAX_PACKERS = 4096
_MIN_PACKED = 16  # below this many slots ``fromlist`` is the faster (measured: ~20 slots even)

# Slots ``0 .. len - 1`` in order: a pool's never-used slots are a slice of it (a copy),
# not an int object each. Grown by doubling, shared by every pool.
_iota: array[int] = array(SLOT_TYPECODE)


def packed_slots(slots: list[int]) -> bytes:
    """``slots`` as an ``array('q')``'s bytes: one ``Struct.pack`` call (a third of
    ``array.fromlist``'s time a slot). A value that is no int in range raises as
    ``fromlist`` raises it (TypeError, OverflowError)."""
    n = len(slots)
    packer = _PACKERS.get(n)
    if packer is None:
        if len(_PACKERS) >= _MAX_PACKERS:
            _PACKERS.clear()
        packer = _PACKERS[n] = Struct(f"{n}q")
    try:
        return packer.pack(*slots)
    except StructError:
        return array(SLOT_TYPECODE, slots).tobytes()  # raises fromlist's error


def slot_array(slots: Sequence[int]) -> array[int]:
    """``slots`` as an ``array('q')``: the array itself where it is one, else a new one
    (TypeError or OverflowError for a value that is no int64, as ``array`` raises it)."""
    if type(slots) is array and slots.typecode == SLOT_TYPECODE:
        return slots
    out = array(SLOT_TYPECODE)
    extend_slots(out, slots)
    return out


def extend_slots(column: array[int], slots: Sequence[int]) -> None:
    """Append ``slots`` to the ``array('q')`` ``column``: another ``array('q')`` (the
    cache's slot lists) by ``extend``, a copy of memory; a list by ``fromlist`` (half the
    time of ``extend``, which iterates), or past ``_MIN_PACKED`` slots packed
    (``packed_slots``: a third of that a slot, a little more a call); anything else as a
    list. TypeError or OverflowError for a value that is no int64, as ``array`` raises it
    (nothing appended)."""
    if type(slots) is array and slots.typecode == SLOT_TYPECODE:
        column.extend(slots)
    elif type(slots) is list:
        if len(slots) > _MIN_PACKED:
            column.frombytes(packed_slots(slots))
        else:
            column.fromlist(slots)
    else:
        column.fromlist(list(slots))


def slot_range(start: int, stop: int) -> array[int]:
    """Slots ``start .. stop - 1`` as a new ``array('q')`` (a copy of a shared range)."""
    if stop > len(_iota):
        size = max(stop, 2 * len(_iota), 1024)
        # NOTE: built as 'Q' and taken as bytes: 'Q' packs an int without ``PyArg_Parse``
        # (half the time a slot of ``array('q', range(...))``); the ids are below 2**63.
        with memoryview(array("Q", range(len(_iota), size))) as grown:
            _iota.frombytes(grown.cast("B"))
    return _iota[start:stop]


class BlockIds(Sequence[int]):
    """A block table as an admission hands it out (``Admission.block_ids``): a snapshot that
    reads like the tuple of its slots, kept packed. Its ints are made only when read (an
    index, an iteration, a comparison with a tuple): a caller that only takes its length,
    or passes it on unread, pays a copy of memory, not an int object per block.

    ``len``, an index (an int), a slice (a tuple), iteration, ``in``, ``count``, ``index``,
    ``+`` with a tuple (a tuple); it equals a tuple of the same slots (and another
    ``BlockIds``), hashes like that tuple and prints like it. Never a list, like a tuple.
    """

    __slots__ = ("_slots",)
    _slots: array[int]

    def __init__(self, slots: Sequence[int] = ()) -> None:
        self._slots = array(SLOT_TYPECODE, slot_array(slots))  # a copy: the snapshot's own

    @classmethod
    def of_array(cls, slots: array[int]) -> BlockIds:
        """The snapshot of the ``array('q')`` ``slots``, handed over (never changed after)."""
        ids = object.__new__(cls)
        ids._slots = slots
        return ids

    def __len__(self) -> int:
        return len(self._slots)

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[int, ...]: ...

    def __getitem__(self, index: int | slice) -> int | tuple[int, ...]:
        if type(index) is slice:
            return tuple(self._slots[index].tolist())
        return self._slots[index]

    def __iter__(self) -> Iterator[int]:
        return iter(self._slots)

    def __contains__(self, value: object) -> bool:
        return value in self._slots

    def count(self, value: Any) -> int:
        return self._slots.count(value)

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        return self._slots.index(value, start, len(self._slots) if stop is None else stop)

    def as_tuple(self) -> tuple[int, ...]:
        """The slots as a tuple (an int each, made now)."""
        return tuple(self._slots.tolist())

    def __eq__(self, other: object) -> bool:
        if type(other) is BlockIds:
            return self._slots == other._slots
        if isinstance(other, tuple):
            return len(other) == len(self._slots) and self.as_tuple() == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.as_tuple())  # equal to its tuple, so hashed like it

    def __add__(self, other: object) -> tuple[int, ...]:
        if isinstance(other, (tuple, BlockIds)):
            return self.as_tuple() + tuple(other)
        return NotImplemented

    def __radd__(self, other: object) -> tuple[int, ...]:
        if isinstance(other, tuple):
            return other + self.as_tuple()
        return NotImplemented

    def __repr__(self) -> str:
        return repr(self.as_tuple())

    def __reduce__(self) -> tuple[type[BlockIds], tuple[tuple[int, ...]]]:
        return (BlockIds, (self.as_tuple(),))
