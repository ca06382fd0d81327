"""What a caller asks the manager to admit: :class:`SequenceSpec` and its validation."""

from __future__ import annotations

import itertools
import math
import sys
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, NoReturn, overload

from kvtier.blocks import cdiv
from kvtier.config import MAX_BLOCKS, check_priority
from kvtier.counts import as_integer, check_count
from kvtier.radix import Node, Root
from kvtier.reprs import shown
from kvtier.slots import SLOT_TYPECODE, slot_array

if TYPE_CHECKING:
    from kvtier.metrics import CountedReuse
    from kvtier.retention import BlockRetention, Retention

MAX_TOKEN_ID = 2**63 - 1
"""Token ids are ints in ``0 ..= MAX_TOKEN_ID`` (they hash as signed 64-bit integers)."""

MAX_KEY_INT = 2**128
"""Int salts and content hashes lie in ``-MAX_KEY_INT < value < MAX_KEY_INT``."""

MAX_KEY_LEN = 4096
"""Str and bytes salts and content hashes are at most this long."""

MAX_RETENTION_S = 1e9
"""The longest retention, in seconds (about 31 years); ``None`` means no expiry."""


class TokenIds(Sequence[int]):
    """A validated prompt that refuses to change (a snapshot), its ids packed in one
    ``array('Q')``: holding or freeing a long prompt touches no Python int, and the garbage
    collector never walks it. It reads like the list it was built from: ``len``, iteration,
    an index gives an int, a slice a plain list, and it equals a list (or a ``TokenIds``) of
    the same ids; it hashes like a tuple of them. ``TokenIds(tokens)`` validates ``tokens``
    as a prompt (see ``SequenceSpec``)."""

    __slots__ = ("_ids",)
    _ids: array[int]

    def __init__(self, tokens: Sequence[int]) -> None:
        self._ids = tokens._ids if type(tokens) is TokenIds else checked_token_array(
            as_token_sequence(tokens, "tokens"), "tokens")

    @classmethod
    def of_array(cls, ids: array[int]) -> TokenIds:
        """The snapshot of ``ids``, a validated ``array('Q')`` handed over (never changed
        after: the caller gives it up)."""
        snapshot = object.__new__(cls)
        snapshot._ids = ids
        return snapshot

    def __len__(self) -> int:
        return len(self._ids)

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> list[int]: ...

    def __getitem__(self, index: int | slice) -> int | list[int]:
        if type(index) is slice:
            return self._ids[index].tolist()
        return self._ids[index]

    def __iter__(self) -> Iterator[int]:
        return iter(self._ids)

    def __contains__(self, value: object) -> bool:
        return value in self._ids

    def __eq__(self, other: object) -> bool:
        if type(other) is TokenIds:
            return self._ids == other._ids
        if isinstance(other, list):
            return len(other) == len(self._ids) and self._ids.tolist() == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self._ids))  # it never changes, so it may be hashed like a tuple

    def __repr__(self) -> str:
        return f"TokenIds({shown(self._ids.tolist())})"

    def __reduce__(self) -> tuple[type[TokenIds], tuple[array[int]]]:
        return (TokenIds, (self._ids,))  # validated again when unpickled

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("a SequenceSpec's tokens are a snapshot and cannot change")

    append = extend = insert = remove = pop = clear = sort = reverse = _refuse
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse


@dataclass(frozen=True, slots=True)
class MultimodalItem:
    """A multimodal input occupying ``tokens[offset : offset + length]``.

    ``content_hash`` identifies the content (e.g. an image digest). It becomes part of the key
    of every block the item overlaps, so equal placeholder tokens with different images never
    share a block.
    """

    offset: int
    length: int
    content_hash: bytes | str | int

    def __post_init__(self) -> None:
        object.__setattr__(self, "offset", check_count("MultimodalItem.offset", self.offset))
        object.__setattr__(self, "length", check_count("MultimodalItem.length", self.length, 1))
        object.__setattr__(self, "content_hash", check_key(
            "MultimodalItem.content_hash", self.content_hash, allow_none=False))


@dataclass(frozen=True, slots=True)
class SequenceSpec:
    """One request to admit.

    ``tokens`` is the prompt: token ids in ``0 ..= MAX_TOKEN_ID``, given as any sequence of
    ints and kept as ``TokenIds``, a snapshot: changing the caller's list later changes
    nothing, and the snapshot itself refuses to change.
    ``token_array`` is the ``array('Q')`` that snapshot keeps its ids in (built by the
    validation itself; never change it): what the cache matches and stores, compared at C
    speed and never walked by the garbage collector.
    ``salt`` isolates tenants (mixed into the first block's key), ``lora_id`` selects an
    adapter (part of every block's key). ``priority`` (0..100, lower is evicted first;
    ``None`` means the config's default) applies to the request's blocks once released, for
    ``retention_s`` seconds if given (``None``: no expiry), after which they fall back to the
    default. ``num_new_tokens`` is how many prompt tokens past the reused prefix this step
    computes (a prefill chunk); ``None`` means the whole prompt. Only computed or scheduled
    blocks are ever stored for reuse. ``num_reserved_blocks`` GPU blocks are set aside for the
    request's later growth (``append_tokens`` draws on them first), so a scheduler can
    guarantee that decoding never runs out of blocks. ``retention``
    (:class:`~kvtier.retention.Retention`) sets priorities and retentions per token range and
    for decoded blocks, TensorRT-LLM's way; ``priority`` / ``retention_s`` then apply to the
    prompt blocks in no range. ``skip_reading_prefix_cache`` admits the request as if
    nothing were cached (vLLM's flag of that name: a request that needs every prompt
    position's logits, e.g. prompt logprobs, computes them all); its blocks are still stored
    for others as they fill. ``resumed`` marks a request admitted again after it was
    admitted once (preempted, or requeued by a failed step) to recompute: its reuse is
    counted apart from the queries (vLLM's preempted prefix-cache stats), since the blocks
    it finds again are mostly its own, computed for it a moment ago, not reuse a fresh
    request would get. ``bool`` is refused wherever an int or a float is meant.
    """

    request_id: str
    tokens: Sequence[int]
    salt: bytes | str | int | None = None
    lora_id: int | None = None
    priority: int | None = None
    retention_s: float | None = None
    mm_items: tuple[MultimodalItem, ...] = field(default=())
    num_new_tokens: int | None = None
    num_reserved_blocks: int = 0
    retention: Retention | None = None
    skip_reading_prefix_cache: bool = False
    resumed: bool = False
    token_array: array[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rid = request_id_of(self.request_id)
        if not rid:
            raise ValueError(f"request_id must be a non-empty str, got {shown(self.request_id)}")
        if rid is not self.request_id:
            object.__setattr__(self, "request_id", rid)
        tokens = self.tokens
        if type(tokens) is TokenIds:  # validated, and never changes: shared
            ids = tokens._ids
        else:
            # NOTE: a list that packs is the common case: its check names nothing, so the
            # message (an f-string) is built only for the other cases.
            packed = token_array(tokens) if type(tokens) is list and tokens else None
            if packed is None:
                what = f"tokens of {shown(self.request_id)}"
                packed = checked_token_array(as_token_sequence(tokens, what), what)
            ids = packed
            tokens = TokenIds.of_array(ids)
        setattr_ = object.__setattr__
        setattr_(self, "token_array", ids)
        setattr_(self, "tokens", tokens)
        # NOTE: each check is called only for a value other than its default (None, (), 0:
        # what they let through as they are): a spec is made per request, most with
        # nothing but an id and a prompt.
        if self.salt is not None:
            setattr_(self, "salt", check_key("salt", self.salt))
        if self.lora_id is not None:
            setattr_(self, "lora_id", check_lora_id(self.lora_id))
        if self.priority is not None:
            setattr_(self, "priority", check_priority("priority", self.priority))
        if self.retention_s is not None:
            setattr_(self, "retention_s", check_retention(self.retention_s))
        if self.retention is not None:
            check_retention_type(self.retention, f"retention of {shown(self.request_id)}",
                                 len(ids))
        if type(self.mm_items) is not tuple or self.mm_items:
            setattr_(self, "mm_items",
                     check_mm_items(self.mm_items, len(ids), self.request_id))
        if type(self.skip_reading_prefix_cache) is not bool:
            raise ValueError(f"skip_reading_prefix_cache of {shown(self.request_id)} must be a "
                             f"bool, "
                             f"got {short_repr(self.skip_reading_prefix_cache)}")
        if self.resumed is not False and self.resumed is not True:
            raise ValueError(f"resumed of {shown(self.request_id)} must be a bool, "
                             f"got {short_repr(self.resumed)}")
        if (self.num_new_tokens is not None or type(self.num_reserved_blocks) is not int
                or self.num_reserved_blocks):
            n, r = _check_schedule(self.num_new_tokens, self.num_reserved_blocks)
            setattr_(self, "num_new_tokens", n)
            setattr_(self, "num_reserved_blocks", r)

    def with_schedule(self, num_new_tokens: int | None, num_reserved_blocks: int) -> SequenceSpec:
        """A copy with other scheduling fields. Only those are checked: the rest was
        validated when this spec was built (a scheduler re-admits the same prompt often)."""
        num_new_tokens, num_reserved_blocks = _check_schedule(num_new_tokens,
                                                              num_reserved_blocks)
        spec = object.__new__(SequenceSpec)
        for name in _SPEC_FIELDS:  # NOTE: not ``fields(self)``, a tuple built each call
            object.__setattr__(spec, name, getattr(self, name))
        object.__setattr__(spec, "num_new_tokens", num_new_tokens)
        object.__setattr__(spec, "num_reserved_blocks", num_reserved_blocks)
        return spec


_SPEC_FIELDS = tuple(f.name for f in fields(SequenceSpec))


def _check_schedule(num_new_tokens: int | None, num_reserved_blocks: int
                    ) -> tuple[int | None, int]:
    """The two counts as plain ints (``kvtier.counts``); ValueError naming the field."""
    n = None if num_new_tokens is None else check_count("num_new_tokens", num_new_tokens, 1)
    return n, check_count("num_reserved_blocks", num_reserved_blocks, 0, MAX_BLOCKS)


def token_list(tokens: object, what: str) -> list[int]:
    """``tokens`` as a list of token ids (the list itself if it is one), validated.

    Any sequence of ints is accepted (a list, a tuple, an ``array``, a ``range``); a str,
    bytes, a mapping, a set or an iterator is refused, since none has one clear order of
    ids. Raises ValueError naming ``what``, the index and the value of the first bad id.
    """
    ids = as_token_list(tokens, what)
    check_tokens(ids, what)
    if not _INT_TYPES.issuperset(map(type, ids)):  # NumPy ints: kept as ints
        ids = [check_token(t, what) for t in ids]
    return ids


def as_token_list(tokens: object, what: str) -> list[int]:
    """``tokens`` as a list (the list itself if it is one), not yet validated; ValueError
    naming ``what`` for a str, bytes, a mapping, a set or an iterator."""
    if type(tokens) is list:
        return tokens
    return list(as_token_sequence(tokens, what))


def as_token_sequence(tokens: object, what: str) -> Sequence[int]:
    """``tokens`` itself, not yet validated, if it is a sequence that may hold token ids;
    ValueError naming ``what`` for a str, bytes, a mapping, a set or an iterator."""
    if type(tokens) is list:
        return tokens
    if isinstance(tokens, (str, bytes, bytearray, memoryview)) or not isinstance(
            tokens, Sequence):
        raise ValueError(
            f"{what} must be a sequence of ints (a list or tuple), got {type(tokens).__name__}")
    return tokens


def check_tokens(tokens: Sequence[int], what: str) -> None:
    """Raise ValueError unless ``tokens`` is a non-empty list of ids in ``0 ..= MAX_TOKEN_ID``."""
    checked_token_array(tokens, what)


def checked_token_array(tokens: Sequence[int], what: str) -> array[int]:
    """``tokens`` as a new ``array('Q')``; ValueError naming ``what``, the index and the value
    of the first bad id unless it is a non-empty sequence of ids in ``0 ..= MAX_TOKEN_ID``
    (a sequence ``as_token_sequence`` accepts: never bytes, read as raw memory here).

    NOTE: the fast path is the array itself, built at C speed (packing as unsigned refuses
    non-ints, negative and too large ids; the top byte of each id then tells whether any is
    at least 2**63); only a list that fails it is scanned in Python, to name the bad id.
    """
    if not tokens:
        raise ValueError(f"{what} must not be empty")
    ids = token_array(tokens)
    if ids is not None:
        return ids
    for index, token in enumerate(tokens):
        check_token(token, f"{what}: token at index {index}")
    raise AssertionError(f"{what}: no bad id, yet the ids did not pack")


def packed_token_ids(tokens: Sequence[int]) -> bytes | None:
    """``tokens`` packed as native 64-bit ints (what block hashes cover), or ``None`` unless
    every one is an int in ``0 ..= MAX_TOKEN_ID``. C-level (see ``token_array``)."""
    if type(tokens) is TokenIds:
        return tokens._ids.tobytes()  # validated when it was built
    try:
        ids = tokens if type(tokens) is array and tokens.typecode == "Q" else _packed(tokens)
    except (TypeError, OverflowError):
        return None
    packed = ids.tobytes()
    if not packed[_TOP_BYTE::8].isascii() or (type(tokens) is not array
                                              and _bool_in(tokens, packed, 0)):
        return None
    return packed


def token_array(tokens: Sequence[int]) -> array[int] | None:
    """``tokens`` as a new ``array('Q')``, or ``None`` unless every one is an int in
    ``0 ..= MAX_TOKEN_ID``. C-level: packing as unsigned refuses non-ints, negative and too
    large ids; the top byte of each packed id then tells whether any is at least 2**63
    (below it, signed and unsigned bytes are the same)."""
    try:
        if type(tokens) is list:  # the common case, without a call
            ids = array("Q")
            ids.fromlist(tokens)
        else:
            ids = _packed(tokens)
    except (TypeError, OverflowError):
        return None
    if len(ids) <= _CHECK_IDS:  # NOTE: a short prompt pays no call
        packed = ids.tobytes()
        if not packed[_TOP_BYTE::8].isascii() or (
                type(tokens) is not array and _bool_in(tokens, packed, 0)):
            return None
        return ids
    if not _below_top_bit(ids):
        return None
    if type(tokens) is not array:
        with memoryview(ids) as view:
            for start in range(0, len(ids), _CHECK_IDS):
                if _bool_in(tokens, view[start:start + _CHECK_IDS].tobytes(), start):
                    return None
    return ids


def _bool_in(tokens: Sequence[int], packed: bytes, start: int) -> bool:
    """Whether ``tokens`` holds a bool among the ids packed in ``packed``, from its index
    ``start`` (a bool packs as the id 0 or 1). Pure.

    NOTE: only the items whose id is 0 or 1 modulo 256 are looked at, found at C speed
    (their low byte); where there are many, every item's type is read at once (20 ns an
    id, three times the packing: too dear for every prompt, to refuse what none holds)."""
    if type(tokens) is TokenIds or type(tokens) is range:
        return False
    flags = packed[_LOW_BYTE::8].translate(_NOT_0_OR_1)
    num_low = flags.count(0)
    if num_low > 8 + len(flags) // 32:
        return bool in set(map(type, itertools.islice(tokens, start, start + len(flags))))
    at = flags.find(0) if num_low else -1
    while at >= 0:
        if type(tokens[start + at]) is bool:
            return True
        at = flags.find(0, at + 1)
    return False


def _below_top_bit(ids: array[int]) -> bool:
    """Whether every id of the ``array('Q')`` ``ids`` is below 2**63 (its top byte below
    0x80). Pure, C-level: the bytes are read ``_CHECK_IDS`` ids at a time."""
    n = len(ids)
    with memoryview(ids) as view:
        for start in range(0, n, _CHECK_IDS):
            if not view[start:start + _CHECK_IDS].tobytes()[_TOP_BYTE::8].isascii():
                return False
    return True


def _packed(tokens: Sequence[int]) -> array[int]:
    """``tokens`` in a new ``array('Q')``, unchecked beyond what packing refuses (raises
    TypeError or OverflowError)."""
    if type(tokens) is list:  # NOTE: fromlist packs a list ~1.4x faster than array()
        ids = array("Q")
        ids.fromlist(tokens)
        return ids
    if type(tokens) is TokenIds:
        return array("Q", tokens._ids)  # a copy at C speed
    return array("Q", tokens)


# The most significant byte of a packed 64-bit id: below 0x80 for ids below 2**63.
_TOP_BYTE = 7 if sys.byteorder == "little" else 0
# A packed id's least significant byte, and a table mapping a byte 0 or 1 (what a bool
# packs as) to 0 and any other to 1 (``_bool_in``).
_LOW_BYTE = 0 if sys.byteorder == "little" else 7
_NOT_0_OR_1 = bytes([0, 0] + [1] * 254)
_INT_TYPES = frozenset((int,))

# NOTE: ids checked per copy (32 KiB): a long prompt's ids copied at once are a buffer as
# large as its array, fresh memory whose page faults cost more than the copy (measured in
# the bench_manager loop: 2.1 -> 1.5 ns an id, the whole-prompt copy and its step-8 slice
# against these).
_CHECK_IDS = 4096


def is_finite_number(value: object) -> bool:
    """A finite int or float, never a bool. Pure. NOTE: ``math.isfinite`` raises
    OverflowError for an int too large for a float (a trace's ``1e400`` written out): such
    an int is not finite here."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_spec(spec: object, what: str) -> SequenceSpec:
    """``spec`` itself; TypeError naming ``what`` unless it is a ``SequenceSpec``."""
    if not isinstance(spec, SequenceSpec):
        raise TypeError(f"{what} must be a SequenceSpec, got {short_repr(spec)}")
    return spec


def check_token(token: object, what: str) -> int:
    """One token id as an int; ValueError naming ``what``, the value and its type unless it
    is an integer in ``0..2**63-1``: an ``int`` or an integer of another kind (a NumPy
    ``int64``, as engines sample them, read as the int it is: ``kvtier.counts``), never a
    bool (nor a NumPy bool), a float or a str. Every entry that takes token ids, one or a
    list, takes exactly these (``checked_token_array``)."""
    if type(token) is int:
        if 0 <= token <= MAX_TOKEN_ID:
            return token
    else:
        value = as_integer(token)
        if value is not None and 0 <= value <= MAX_TOKEN_ID:
            return value
    raise ValueError(f"{what} must be an int in 0..2**63-1, got {short_repr(token)} "
                     f"({type(token).__name__})")


def check_key(what: str, value: object, allow_none: bool = True) -> bytes | str | int | None:
    """``value`` as the plain key it is, if it may be part of a block key (a salt or a
    content hash): bytes or str of at most ``MAX_KEY_LEN`` (one of a subclass, NumPy's
    ``str_`` or ``bytes_``, read as the plain str or bytes it equals), or an integer
    (``kvtier.counts``: a NumPy or ``__index__`` one read as the plain int it is, never a
    bool or a float) of magnitude below ``MAX_KEY_INT``; ``None`` if allowed. Else
    ValueError naming ``what``. Pure.

    NOTE: the plain value, not the caller's: a key is hashed by its type (``encode_key``),
    so a NumPy ``int64(5)`` salt kept as given named no block of the salt 5."""
    if value is None and allow_none:
        return None
    kind = type(value)
    if kind is not int and kind is not str and kind is not bytes:
        if isinstance(value, str):
            value = str.__str__(value)
        elif isinstance(value, bytes):
            value = bytes(value)
        else:
            number = as_integer(value)
            value = value if number is None else number
        kind = type(value)
    if kind is int:
        assert isinstance(value, int)
        if -MAX_KEY_INT < value < MAX_KEY_INT:
            return value
        raise ValueError(
            f"{what} must be an int of magnitude below 2**128, got {short_repr(value)}")
    if kind is bytes or kind is str:
        assert isinstance(value, (bytes, str))
        if len(value) <= MAX_KEY_LEN:
            return value
        raise ValueError(f"{what} must be at most {MAX_KEY_LEN} long, got {len(value)}")
    allowed = "bytes, str, int" + (" or None" if allow_none else "")
    raise ValueError(f"{what} must be {allowed}, got {short_repr(value)} ({type(value).__name__})")


def request_id_of(value: object) -> str | None:
    """``value`` as the plain str of a request id if it is a str (one of a subclass, NumPy's
    ``str_`` say, names the request of the str it equals), else None. Every call that takes
    a request id, the manager's and the scheduler's, reads it so. Pure."""
    if type(value) is str:
        return value
    if isinstance(value, str):
        return str.__str__(value)  # the plain str: a subclass keeps nothing of its own
    return None


def check_lora_id(lora_id: object, what: str = "lora_id") -> int | None:
    """``lora_id`` as a plain int (or None); ValueError naming ``what`` unless it is
    ``None`` or an integer (``kvtier.counts``) in ``0 ..= MAX_TOKEN_ID``."""
    if lora_id is None:
        return None
    n = as_integer(lora_id)
    if n is None or not 0 <= n <= MAX_TOKEN_ID:
        raise ValueError(f"{what} must be an int in 0..2**63-1 or None, got {short_repr(lora_id)}")
    return n


def check_retention_type(retention: object, what: str, num_tokens: int | None = None) -> None:
    """TypeError naming ``what`` unless ``retention`` is a
    :class:`~kvtier.retention.Retention` (which checks its own fields); ValueError if its
    ``decode_start`` lies past the ``num_tokens`` it is admitted with."""
    # NOTE: imported here: the retention module builds on this one's checks.
    from kvtier.retention import Retention

    if type(retention) is not Retention:
        raise TypeError(f"{what} must be a Retention or None, got {short_repr(retention)}")
    start = retention.decode_start
    if num_tokens is not None and start is not None and start > num_tokens:
        raise ValueError(f"{what}: decode_start {shown(start)} lies past the {num_tokens} tokens "
                         "admitted")


def check_retention(retention_s: object, what: str = "retention_s") -> float | None:
    """``retention_s`` as a float, or ``None``; ValueError naming ``what`` unless a finite
    number of seconds in ``0 ..= MAX_RETENTION_S`` (``None`` for no expiry; never a bool)."""
    if retention_s is None:
        return None
    if type(retention_s) in (int, float):
        assert isinstance(retention_s, (int, float))
        if 0 <= retention_s <= MAX_RETENTION_S:  # False for nan; no float() of a huge int
            return float(retention_s)
    raise ValueError(
        f"{what} must be a finite number of seconds in 0..{MAX_RETENTION_S:.0e}, or None "
        f"for no expiry, got {short_repr(retention_s)}")


def check_mm_items(items: object, num_tokens: int, request_id: str) -> tuple[MultimodalItem, ...]:
    """``items`` as a tuple of ``MultimodalItem`` lying within ``num_tokens`` tokens."""
    if isinstance(items, (str, bytes, bytearray)) or not isinstance(items, (tuple, list)):
        raise ValueError(f"mm_items must be a tuple or list of MultimodalItem, got "
                         f"{type(items).__name__}")
    items = tuple(items)
    for item in items:
        if not isinstance(item, MultimodalItem):
            raise ValueError(f"mm_items must hold MultimodalItem, got {short_repr(item)}")
        if item.offset + item.length > num_tokens:
            raise ValueError(
                f"MultimodalItem at offset {shown(item.offset)} with length "
                f"{shown(item.length)} runs past the {num_tokens} tokens of {shown(request_id)}")
    return items


def checked_prompt(tokens: object, mm_items: object, what: str
                   ) -> tuple[Sequence[int], tuple[MultimodalItem, ...]]:
    """``tokens`` as a sequence (its ids checked later, as they are hashed) and ``mm_items``
    as :func:`check_mm_items` gives them, for a caller that names a prompt's blocks outside
    the manager (a router, a remote tier); ValueError naming ``what`` otherwise, and for
    an empty prompt, which the manager refuses too.

    NOTE: an empty prompt was routed: its reusable prefix, (0 - 1) // tokens_per_block
    blocks, came out as -1, the decision's hit and the router's stats counting -1 blocks."""
    ids = as_token_sequence(tokens, "tokens")  # before len(): None, an iterator
    if not len(ids):
        raise ValueError(f"{what}: tokens must not be empty")
    return ids, check_mm_items(mm_items, len(ids), what)


def short_repr(value: object) -> str:
    """``repr(value)``, cut short: a bad value may be a huge int or a long string."""
    if type(value) is int and value.bit_length() > 128:
        return f"an int of {value.bit_length()} bits"
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # nested past the recursion limit, or an int past
        return f"a {type(value).__name__} too deep or too long to print"  # str's digits
    return text if len(text) <= 80 else text[:77] + "..."


def first_line(text: object, limit: int = 300) -> str:
    """The first non-empty line of ``str(text)``, cut to ``limit`` characters (" ..."
    marking what was left out): a library's error text inside a one-sentence message. Pure.

    NOTE: torch's refusal of a device it has no kernels for is 55 lines long (every
    dispatch key it tried), all of it printed as the command line's "one sentence"."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not lines:
        return ""
    head = lines[0]
    if len(head) > limit:
        return head[:limit - 4] + " ..."
    return head + " ..." if len(lines) > 1 else head


def block_extras(
    mm_items: Sequence[MultimodalItem], num_tokens: int, tpb: int
) -> list[object] | None:
    """Per block, the multimodal hashes (with offsets) of the items overlapping it, by
    position: the same items listed in any order give the same keys (as vLLM orders them)."""
    if not mm_items:
        return None
    per_block: list[list[tuple[object, int]]] = [[] for _ in range(cdiv(num_tokens, tpb))]
    for item in sorted(mm_items, key=_position):
        for b in range(item.offset // tpb, (item.offset + item.length - 1) // tpb + 1):
            per_block[b].append((item.content_hash, item.offset - b * tpb))
    return [tuple(x) if x else None for x in per_block]


def items_before(mm_items: Sequence[MultimodalItem], end: int,
                 tpb: int) -> tuple[tuple[bytes | str | int, int, int], ...]:
    """What keys a prompt's blocks of ``tpb`` tokens before token ``end`` (a block
    boundary) besides their tokens: the items that begin before it, in ``block_extras``'
    order, each as its hash, offset and the last of those blocks it overlaps. Two prompts'
    answers are equal exactly where ``block_extras`` keys those blocks alike, in whatever
    order their items were listed and whatever follows ``end``. Pure.

    NOTE: by the block an item ends in, not its last token: the cache keys a block by the
    items overlapping it (hash and offset), never by their lengths, so an image one token
    shorter within the same block was another key here and the same block there (the
    request computed beside the one computing it, reusing nothing)."""
    return tuple((item.content_hash, item.offset,
                  (min(item.offset + item.length, end) - 1) // tpb)
                 for item in sorted(mm_items, key=_position) if item.offset < end)


def _position(item: MultimodalItem) -> tuple[int, int, str, bytes | str | int]:
    """A total order of items: by offset, then length; two items at one place by their
    hash (compared within its type: the type's name first)."""
    return item.offset, item.length, type(item.content_hash).__name__, item.content_hash


_NO_SLOTS: list[int] = []  # NOTE: shared by every request without private copies (most)


class LiveSequence:
    """A live request: its claimed path (``last_node`` and up) and its private blocks."""

    __slots__ = (
        "block_table",
        "counted",
        "extras",
        "last_node",
        "lookahead_end",
        "num_hit_blocks",
        "num_prompt_blocks",
        "num_reserved_blocks",
        "num_scheduled_tokens",
        "num_valid_tokens",
        "owns_tokens",
        "priority",
        "private_slots",
        "request_id",
        "retention",
        "retention_s",
        "root",
        "tokens",
        "turn",
    )

    def __init__(self, spec: SequenceSpec, root: Root, extras: list[object] | None,
                 priority: int) -> None:
        self.request_id = spec.request_id
        # The spec's token array, until decoding grows it: then an array of its own.
        self.tokens: array[int] = spec.token_array
        self.owns_tokens = False
        self.root = root
        self.extras = extras
        self.priority = priority
        self.retention_s = spec.retention_s
        # Settings per block, where the spec sets them per token range (else None).
        self.retention: BlockRetention | None = None if spec.retention is None else (
            spec.retention.for_request(len(spec.token_array), priority, spec.retention_s))
        self.num_reserved_blocks = 0
        self.last_node: Node = root
        self.block_table: array[int] = array(SLOT_TYPECODE)  # ``kvtier.slots``
        # The most tokens its table was made to cover ahead of its tokens (speculative
        # decoding's draft slots, ``KVCacheManager.reserve_lookahead``); 0: never.
        self.lookahead_end = 0
        self.num_scheduled_tokens = 0
        # Tokens whose KV exists by the time this step's copies run: those scheduled before
        # the latest call (before the current step, inside begin_step/end_step).
        self.num_valid_tokens = 0
        # Its own copies of path blocks that another request had stored first: the path
        # refers to those, and these stay private (the block table keeps pointing to them).
        self.private_slots: list[int] = _NO_SLOTS  # replaced, never appended to
        # What eviction may learn from (``kvtier.eviction.ReuseLearner``), set at admission:
        # the turn of the request's session (``BlockCache.turn``), the full blocks it found
        # cached, and its prompt's full blocks.
        self.turn = 1
        self.num_hit_blocks = 0
        self.num_prompt_blocks = 0
        # The reuse its admission counted in the stats (None: none counted, it skipped
        # reading the cache), taken back if it is aborted before its work runs.
        self.counted: CountedReuse | None = None

    @property
    def num_path_blocks(self) -> int:
        node = self.last_node
        return node.start_block + len(node.slots)

    def check_prefilled(self) -> None:
        """Raise ValueError unless every prompt token is scheduled (decoding may start)."""
        if self.num_scheduled_tokens < len(self.tokens):
            raise ValueError(
                f"{shown(self.request_id)} still has "
                f"{len(self.tokens) - self.num_scheduled_tokens} "
                "unscheduled prompt tokens; append only after its prefill")

    def grow_tokens(self, tokens: list[int]) -> None:
        """Append ``tokens`` (validated) to the request's tokens."""
        if not self.owns_tokens:
            self.tokens = array("Q", self.tokens)
            self.owns_tokens = True
        self.tokens.extend(tokens)

    def own_slots(self) -> array[int]:
        """The GPU slots only this request holds: its copies of blocks stored first by
        another request, then the blocks past its path (a new array). Pure."""
        past = self.block_table[self.num_path_blocks:]
        return slot_array(self.private_slots) + past if self.private_slots else past
