"""Slot lists as packed int64 arrays: what nodes, free lists and block tables hold.

A slot list held as a Python list is one int object per slot, scattered over the heap and
cold between steps: every copy of the list touches each of them (a reference count), and
packing it into a plan column reads each one. As an ``array('q')`` a slice, a
concatenation, a reversal or a plan column's append is a copy of contiguous memory, and a
plan's columns are appended without reading a Python object per block.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from struct import Struct
from struct import error as StructError

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
    if type(slots) is list:
        if len(slots) > _MIN_PACKED:
            out.frombytes(packed_slots(slots))
        else:
            out.fromlist(slots)
    else:
        out.fromlist(list(slots))
    return out


def slot_range(start: int, stop: int) -> array[int]:
    """Slots ``start .. stop - 1`` as a new ``array('q')`` (a copy of a shared range)."""
    if stop > len(_iota):
        size = max(stop, 2 * len(_iota), 1024)
        # NOTE: built as 'Q' and taken as bytes: 'Q' packs an int without ``PyArg_Parse``
        # (half the time a slot of ``array('q', range(...))``); the ids are below 2**63.
        with memoryview(array("Q", range(len(_iota), size))) as grown:
            _iota.frombytes(grown.cast("B"))
    return _iota[start:stop]
