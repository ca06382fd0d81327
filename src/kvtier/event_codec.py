"""The wire format of KV events and snapshots: compact JSON, hashes as 32 hex digits.

The decoders accept any bytes and raise only ``ValueError``: every field is checked (ints
that are not bools, 32-hex hashes, known tiers, exact row sizes) before an event is built.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import cast

from kvtier import json_text
from kvtier.events import AllBlocksCleared, BlockRemoved, BlockStored, BlockTierChanged, Event
from kvtier.reprs import shown
from kvtier.sequence import short_repr
from kvtier.tier import Tier

_MAX_SEQ = 1 << 63
_MAX_HASH = 1 << 128  # every hash is 128 bits (hashing.get_hash_fn); 32 hex digits


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The blocks ``instance_id`` holds after applying every event with ``seq < next_seq``,
    taken by its publisher ``incarnation`` where it names one (None: a snapshot that names
    none, as of an earlier publisher, read by its seq alone)."""

    instance_id: str
    next_seq: int
    blocks: frozenset[tuple[int, Tier]]
    incarnation: str | None = None

    def __post_init__(self) -> None:
        # NOTE: a snapshot source is a caller's callable: a wrong field here surfaced later,
        # far away (a tier 7 as an IndexError in PrefixIndex.match, a str seq as a
        # TypeError in SeqTracker.offer).
        if not isinstance(self.instance_id, str):
            raise TypeError(f"Snapshot.instance_id must be a str, got "
                            f"{short_repr(self.instance_id)}")
        if type(self.next_seq) is not int or not 0 <= self.next_seq < _MAX_SEQ:
            raise ValueError(f"Snapshot.next_seq must be an int in [0, 2**63), got "
                             f"{short_repr(self.next_seq)}")
        if not isinstance(self.blocks, frozenset):
            raise TypeError(f"Snapshot.blocks must be a frozenset of (hash, Tier), got "
                            f"{short_repr(self.blocks)}")
        for block in self.blocks:
            if not (type(block) is tuple and len(block) == 2 and type(block[0]) is int
                    and 0 <= block[0] < _MAX_HASH and isinstance(block[1], Tier)):
                raise ValueError(f"Snapshot.blocks: a block is (hash in [0, 2**128), Tier), "
                                 f"got {short_repr(block)}")
        if self.incarnation is not None and not is_incarnation(self.incarnation):
            raise ValueError(f"Snapshot.incarnation must be None or a str of 1..64 "
                             f"characters, got {short_repr(self.incarnation)}")


def is_incarnation(value: object) -> bool:
    """Whether ``value`` is a publisher incarnation the wire carries: a str of 1..64
    characters. Pure."""
    return isinstance(value, str) and 1 <= len(value) <= 64


_EVENT_TYPES = (BlockStored, BlockRemoved, BlockTierChanged, AllBlocksCleared)
_INT = frozenset((int,))


def check_events(events: object, *, token_ids: bool = True) -> None:
    """Raise TypeError unless ``events`` is a sequence of events, ValueError naming the
    event, its field and the value unless each field is one the wire format carries: what
    ``decode_events`` accepts (ints that are no bools in range, hashes in [0, 2**128),
    ``Tier`` s, a stored block's ``num_tokens`` token ids as a tuple, non-empty key bytes).
    An event that passes is encoded and decoded to itself. ``token_ids=False`` leaves the
    ids themselves (not their tuple and count) to a consumer that reads them. Pure.

    NOTE: events are a caller's NamedTuples, built with any fields: a tier 7 surfaced as
    an IndexError in a later ``PrefixIndex.match``, an unhashable hash as a TypeError with
    half the batch applied, a str ``seq`` as a TypeError in a subscriber's poll (its buffer
    drained: every instance's updates lost), a hash past 128 bits as an entry no Redis
    subscriber could read (a hole).
    """
    if not isinstance(events, Sequence) or isinstance(events, str | bytes):
        raise TypeError(f"events must be a sequence of events, got {short_repr(events)}")
    # NOTE: the in-memory bus and the router check every event of a fleet replay (~1 M a
    # minute), which reads no token id: each event passes one quick test (``_event_ok``),
    # and only a batch with a doubt is walked to name it.
    if all(map(_event_ok, events)) and (not token_ids or all(
            e.token_ids is None or _ids_ok(e.token_ids)
            for e in events if type(e) is BlockStored)):
        return
    for i, event in enumerate(events):
        if not isinstance(event, _EVENT_TYPES):
            raise TypeError(f"events[{i}] must be a BlockStored, BlockRemoved, "
                            f"BlockTierChanged or AllBlocksCleared, got {short_repr(event)}")
        problem = _event_problem(event, token_ids)
        if problem is not None:
            field, rule = problem
            raise ValueError(f"events[{i}].{field} must be {rule}, got "
                             f"{short_repr(getattr(event, field))}")


def _ids_ok(ids: tuple[object, ...]) -> bool:
    """Whether every one of ``ids`` (a tuple) is an int in [0, 2**63). Pure."""
    if not ids:
        return True
    if not _INT.issuperset(map(type, ids)):
        return False
    ints = cast("tuple[int, ...]", ids)
    return min(ints) >= 0 and max(ints) < _MAX_SEQ


def _event_ok(e: object) -> bool:
    """Whether ``e`` is an event ``_event_problem`` passes without its token ids (False: it
    may still pass; it is then asked). Pure.

    NOTE: one quick test per kind, so a batch of kvtier's own events passes at about C
    speed; ``_event_problem``, which names the field, runs only on a batch with a doubt.
    """
    kind = type(e)
    if kind is BlockStored:
        seq, h, parent, tier, n, lora, ids, extra, salt = cast("tuple[object, ...]", e)
        return (type(seq) is int and 0 <= seq < _MAX_SEQ and type(h) is int
                and 0 <= h < _MAX_HASH
                and (parent is None or (type(parent) is int and 0 <= parent < _MAX_HASH))
                and type(tier) is Tier and type(n) is int and 1 <= n < _MAX_SEQ
                and (lora is None or (type(lora) is int and -_MAX_SEQ <= lora < _MAX_SEQ))
                and (ids is None or (type(ids) is tuple and len(ids) == n))
                and (extra is None or (type(extra) is bytes and len(extra) > 0))
                and (salt is None or (type(salt) is bytes and len(salt) > 0)))
    if kind is BlockRemoved:
        seq, h, tier = cast("tuple[object, ...]", e)
        return (type(seq) is int and 0 <= seq < _MAX_SEQ and type(h) is int
                and 0 <= h < _MAX_HASH and type(tier) is Tier)
    if kind is BlockTierChanged:
        seq, h, old, new = cast("tuple[object, ...]", e)
        return (type(seq) is int and 0 <= seq < _MAX_SEQ and type(h) is int
                and 0 <= h < _MAX_HASH and type(old) is Tier and type(new) is Tier)
    if kind is AllBlocksCleared:
        (seq,) = cast("tuple[object, ...]", e)
        return type(seq) is int and 0 <= seq < _MAX_SEQ
    return False


def _is_count(value: object, low: int = 0, high: int = _MAX_SEQ) -> bool:
    return type(value) is int and low <= value < high


def _event_problem(e: Event, token_ids: bool) -> tuple[str, str] | None:
    """The first field of ``e`` the wire format cannot carry, and what it must be. Pure."""
    seq = "an int in [0, 2**63)"
    h = "an int in [0, 2**128)"
    if not _is_count(e.seq):
        return "seq", seq
    if isinstance(e, AllBlocksCleared):
        return None
    if not _is_count(e.block_hash, 0, _MAX_HASH):
        return "block_hash", h
    if isinstance(e, BlockTierChanged):
        for field in ("old_tier", "new_tier"):
            if not isinstance(getattr(e, field), Tier):
                return field, "a Tier"
        return None
    if not isinstance(e.tier, Tier):
        return "tier", "a Tier"
    if isinstance(e, BlockRemoved):
        return None
    if e.parent_hash is not None and not _is_count(e.parent_hash, 0, _MAX_HASH):
        return "parent_hash", f"None or {h}"
    if not _is_count(e.num_tokens, 1):
        return "num_tokens", "an int in [1, 2**63)"
    if e.lora_id is not None and not _is_count(e.lora_id, -_MAX_SEQ):
        return "lora_id", "None or an int in [-2**63, 2**63)"
    ids = e.token_ids
    if ids is not None and not (type(ids) is tuple and len(ids) == e.num_tokens
                                and (not token_ids or _ids_ok(ids))):
        return "token_ids", f"None or a tuple of num_tokens ({e.num_tokens}) ids in [0, 2**63)"
    for field in ("extra_key", "salt_key"):
        key = getattr(e, field)
        if key is not None and not (type(key) is bytes and key):
            return field, "None or non-empty bytes"
    return None


def _hex(value: int | None) -> str | None:
    return None if value is None else format(value, "032x")


# The most bytes of one encoded batch (a stream entry's ``e``) that ``decode_events``
# reads: ``encode_event_batches`` cuts a longer batch into entries within it. NOTE: an
# entry's events were decoded whole, whatever their size: a writer of the stream made a
# subscriber build every event of a field of any length (350,000 events of 4 MiB) before a
# check. 4 MiB holds a stored block of 65,536 tokens of 19-digit ids three times over.
MAX_EVENT_BATCH_BYTES = 4 << 20


def encode_events(events: Sequence[Event]) -> str:
    """Compact JSON of ``events``: one array each, hashes as 32 hex digits, tiers as ints,
    a stored block's tokens as an array and its extra and salt keys as hex."""
    return json.dumps(_rows(events), separators=(",", ":"))


def encode_event_batches(events: Sequence[Event], max_bytes: int | None = None) -> list[str]:
    """``events`` as ``encode_events`` texts of at most ``max_bytes`` each (by default
    ``MAX_EVENT_BATCH_BYTES``), in order, each as long as it may be: one text where the
    whole fits. ValueError naming the event whose own text is longer, encoding nothing.
    Pure."""
    limit = MAX_EVENT_BATCH_BYTES if max_bytes is None else max_bytes
    rows = _rows(events)
    whole = json.dumps(rows, separators=(",", ":"))
    if len(whole) <= limit:
        return [whole]
    parts = [json.dumps(row, separators=(",", ":")) for row in rows]
    for i, part in enumerate(parts):
        if len(part) + 2 > limit:
            raise ValueError(f"events[{i}] encodes to {len(part) + 2} bytes, past the "
                             f"{limit} one stream entry may carry (MAX_EVENT_BATCH_BYTES)")
    texts: list[str] = []
    batch: list[str] = []
    size = 2  # the brackets
    for part in parts:
        if batch and size + 1 + len(part) > limit:
            texts.append(f"[{','.join(batch)}]")
            batch, size = [], 2
        size += len(part) + (1 if batch else 0)
        batch.append(part)
    texts.append(f"[{','.join(batch)}]")
    return texts


def _rows(events: Sequence[Event]) -> list[list[object]]:
    """Each event as the array ``encode_events`` writes. Pure."""
    rows: list[list[object]] = []
    for e in events:
        if isinstance(e, BlockStored):
            rows.append(["S", e.seq, _hex(e.block_hash), _hex(e.parent_hash), int(e.tier),
                         e.num_tokens, e.lora_id,
                         None if e.token_ids is None else list(e.token_ids),
                         None if e.extra_key is None else e.extra_key.hex(),
                         None if e.salt_key is None else e.salt_key.hex()])
        elif isinstance(e, BlockRemoved):
            rows.append(["R", e.seq, _hex(e.block_hash), int(e.tier)])
        elif isinstance(e, BlockTierChanged):
            rows.append(["T", e.seq, _hex(e.block_hash), int(e.old_tier), int(e.new_tier)])
        else:
            rows.append(["C", e.seq])
    return rows


_HEX_DIGITS = frozenset("0123456789abcdef")


def _count(value: object, field: str, low: int = 0, high: int = _MAX_SEQ) -> int:
    if type(value) is not int or not low <= value < high:
        raise ValueError(f"{field} must be an integer in [{low}, {high}), got {shown(value):.40}")
    return value


def _hash(value: object, field: str = "block hash") -> int:
    if not (isinstance(value, str) and len(value) == 32 and _HEX_DIGITS.issuperset(value)):
        raise ValueError(f"{field} must be 32 lowercase hex digits, got {shown(value):.40}")
    return int(value, 16)


def _tier(value: object) -> Tier:
    if type(value) is not int or value not in {int(t) for t in Tier}:
        raise ValueError(f"tier must be one of {[int(t) for t in Tier]}, got {shown(value):.40}")
    return Tier(value)


def _token_ids(value: object, num_tokens: int) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) != num_tokens:
        raise ValueError(f"token ids must be an array of num_tokens ({num_tokens}) ids, "
                         f"got {shown(value):.40}")
    return tuple([_count(t, "token id") for t in value])


def _key_bytes(value: object, field: str) -> bytes:
    if not (isinstance(value, str) and value and len(value) % 2 == 0
            and _HEX_DIGITS.issuperset(value)):
        raise ValueError(f"{field} must be lowercase hex digits, got {shown(value):.40}")
    return bytes.fromhex(value)


def _row(row: object, kind: str, length: int) -> list[object]:
    if not isinstance(row, list) or len(row) != length:
        raise ValueError(f"a {shown(kind)} event is an array of {length} values, got "
                         f"{shown(row):.60}")
    return row


def _event(row: object) -> Event:
    kind = row[0] if isinstance(row, list) and row else None
    if kind == "S":
        # 7 values from a publisher older than the block's tokens and keys.
        fields = _row(row, kind, 10 if isinstance(row, list) and len(row) != 7 else 7)
        _, seq, h, parent, tier, num_tokens, lora = fields[:7]
        tokens, extra, salt = fields[7:] or (None, None, None)
        size = _count(num_tokens, "num_tokens", 1)
        return BlockStored(_count(seq, "seq"), _hash(h),
                           None if parent is None else _hash(parent, "parent hash"),
                           _tier(tier), size,
                           None if lora is None else _count(lora, "lora_id", -_MAX_SEQ),
                           None if tokens is None else _token_ids(tokens, size),
                           None if extra is None else _key_bytes(extra, "extra key"),
                           None if salt is None else _key_bytes(salt, "salt key"))
    if kind == "R":
        _, seq, h, tier = _row(row, kind, 4)
        return BlockRemoved(_count(seq, "seq"), _hash(h), _tier(tier))
    if kind == "T":
        _, seq, h, old, new = _row(row, kind, 5)
        return BlockTierChanged(_count(seq, "seq"), _hash(h), _tier(old), _tier(new))
    if kind == "C":
        _, seq = _row(row, kind, 2)
        return AllBlocksCleared(_count(seq, "seq"))
    raise ValueError(f"unknown event kind in {shown(row):.60}")


def _json(text: object, what: str) -> object:
    if not isinstance(text, str | bytes | bytearray):
        raise ValueError(f"malformed {what}: not text but {type(text).__name__}")
    try:
        return json_text.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, deep nesting
        raise ValueError(f"malformed {what}: {exc}"[:200]) from None


def decode_events(text: str | bytes) -> list[Event]:
    """Inverse of :func:`encode_events`. Raises ValueError, and only ValueError, on anything
    malformed, whatever the bytes, and on a text past ``MAX_EVENT_BATCH_BYTES`` before
    reading any of it. Pure."""
    if isinstance(text, str | bytes | bytearray) and len(text) > MAX_EVENT_BATCH_BYTES:
        raise ValueError(f"malformed event batch: {len(text)} bytes, past the "
                         f"{MAX_EVENT_BATCH_BYTES} one may carry (MAX_EVENT_BATCH_BYTES)")
    rows = _json(text, "event batch")
    if not isinstance(rows, list):
        raise ValueError(f"malformed event batch: not an array but {type(rows).__name__}")
    try:
        return [_event(row) for row in rows]
    except ValueError as exc:
        raise ValueError(f"malformed event batch: {exc}") from None


def encode_snapshot(snapshot: Snapshot) -> str:
    """Compact JSON of ``snapshot``: ``i`` its instance id, ``n`` its next seq, ``b`` its
    blocks as ``[hash, tier]`` and, where it names one, ``p`` its publisher incarnation.

    NOTE: a snapshot with ``p`` is refused as malformed by a decoder older than the field
    (it asks for exactly ``i``, ``n`` and ``b``): upgrade subscribers before publishers."""
    blocks = sorted([_hex(h), int(t)] for h, t in snapshot.blocks)
    doc: dict[str, object] = {"i": snapshot.instance_id, "n": snapshot.next_seq, "b": blocks}
    if snapshot.incarnation is not None:
        doc["p"] = snapshot.incarnation
    return json.dumps(doc, separators=(",", ":"))


# The most bytes of a snapshot's text (``encode_snapshot``) that ``decode_snapshot`` reads:
# ``encode_snapshot_within`` cuts a larger one to the blocks that fit, the fastest tier
# first. 32 MiB holds 880,000 blocks (38 bytes and a comma each). NOTE: a snapshot was
# decoded whole, whatever its size: a writer of the key made a subscriber parse a text of
# any length (up to Redis's 512 MB a string) before a check.
MAX_SNAPSHOT_BYTES = 32 << 20


def encode_snapshot_within(snapshot: Snapshot,
                           max_bytes: int | None = None) -> tuple[str, int]:
    """``encode_snapshot`` of ``snapshot``, or, where that is past ``max_bytes`` (by
    default ``MAX_SNAPSHOT_BYTES``), of the most of its blocks that fit, taken in order
    of tier (the GPU's first), then hash: (the text, the number of blocks left out).
    ValueError where not even its blocks' absence fits (an instance id near the bound).
    Pure.

    NOTE: a snapshot is a hint of what to route to: one missing blocks routes fewer
    requests to them (misses, recomputed), never to a block the instance lacks; a later
    event of a block left out is tolerated (a removal counted inconsistent by the router,
    a tier change adds it)."""
    limit = MAX_SNAPSHOT_BYTES if max_bytes is None else max_bytes
    text = encode_snapshot(snapshot)
    if len(text) <= limit:
        return text, 0
    head = len(encode_snapshot(replace(snapshot, blocks=frozenset())))
    if head > limit:
        raise ValueError(f"a snapshot of {short_repr(snapshot.instance_id)} without blocks "
                         f"encodes to {head} bytes, past the {limit} one may carry "
                         f"(MAX_SNAPSHOT_BYTES)")
    blocks = sorted(snapshot.blocks, key=lambda block: (block[1], block[0]))
    size, num_kept = head, 0
    for _, tier in blocks:  # each row ["<32 hex>",<tier>]: its own length
        grown = size + len(str(int(tier))) + 37 + (1 if num_kept else 0)
        if grown > limit:
            break
        size, num_kept = grown, num_kept + 1
    text = encode_snapshot(replace(snapshot, blocks=frozenset(blocks[:num_kept])))
    assert len(text) <= limit, (len(text), limit)
    return text, len(blocks) - num_kept


def decode_snapshot(text: str | bytes) -> Snapshot:
    """Inverse of :func:`encode_snapshot`. Raises ValueError, and only ValueError, on
    anything malformed, whatever the bytes, and on a text past ``MAX_SNAPSHOT_BYTES``
    before reading any of it. Pure."""
    if isinstance(text, str | bytes | bytearray) and len(text) > MAX_SNAPSHOT_BYTES:
        raise ValueError(f"malformed snapshot: {len(text)} bytes, past the "
                         f"{MAX_SNAPSHOT_BYTES} one may carry (MAX_SNAPSHOT_BYTES)")
    doc = _json(text, "snapshot")
    try:
        if not isinstance(doc, dict) or set(doc) - {"p"} != {"i", "n", "b"}:
            raise ValueError("an object with exactly the keys i, n, b and an optional p is "
                             "expected")
        instance_id, next_seq, rows = doc["i"], doc["n"], doc["b"]
        incarnation = doc.get("p")  # None: a snapshot of a publisher older than the field
        if "p" in doc and not is_incarnation(incarnation):
            raise ValueError(f"incarnation must be a string of 1..64 characters, got "
                             f"{shown(incarnation):.40}")
        if not isinstance(instance_id, str):
            raise ValueError(f"instance id must be a string, got {shown(instance_id):.40}")
        if not isinstance(rows, list):
            raise ValueError(f"blocks must be an array, got {shown(rows):.40}")
        blocks = []
        for row in rows:
            if not isinstance(row, list) or len(row) != 2:
                raise ValueError(f"a block is [hash, tier], got {shown(row):.60}")
            blocks.append((_hash(row[0]), _tier(row[1])))
        return Snapshot(instance_id, _count(next_seq, "next_seq"), frozenset(blocks),
                        incarnation if isinstance(incarnation, str) else None)
    except ValueError as exc:
        raise ValueError(f"malformed snapshot: {exc}") from None
