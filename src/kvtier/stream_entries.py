"""Redis stream entries as redis-py gives them: entry ids (``stream_id``, ``check_start_id``),
XREAD replies in RESP2's or RESP3's shape (``stream_entries``), and an entry's fields whether
their names came as bytes or str (``raw_field``, ``field``). Pure; no redis import.
"""

from __future__ import annotations

import re

from kvtier.sequence import short_repr

__all__ = ["check_start_id", "field", "raw_field", "stream_entries", "stream_id"]

# A stream entry id as XREAD takes it: ms[-seq], each below 2**64. NOTE: not "$": a poll
# without block_ms reads past it only what arrives during that very call, so nothing.
_STREAM_ID = re.compile(r"\d{1,20}(-\d{1,20})?")


def check_start_id(start_id: object) -> None:
    """ValueError unless ``start_id`` is an id XREAD takes. NOTE: Redis refuses a bad one
    with an error that, as any Redis fault, is a skipped read: the subscriber read nothing,
    ever, and said nothing."""
    text = start_id.decode("ascii", "replace") if isinstance(start_id, bytes) else start_id
    ok = isinstance(text, str) and _STREAM_ID.fullmatch(text) is not None
    if not (ok and isinstance(text, str) and all(int(n) < 1 << 64 for n in text.split("-"))):
        raise ValueError(f"start_id must be a stream id 'ms' or 'ms-seq' (each below 2**64), "
                         f"got {short_repr(start_id)}")


def stream_id(value: object) -> tuple[int, int] | None:
    """A stream entry id (``ms-seq`` or ``ms``, bytes or str) as numbers that order as
    Redis orders ids, or None where it is none. Pure."""
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    if not isinstance(text, str) or _STREAM_ID.fullmatch(text) is None:
        return None
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def stream_entries(reply: object) -> list[tuple[str | bytes, object]]:
    """The (entry id, fields) of an XREAD reply of one stream, in order, in either of
    redis-py's shapes: RESP2's ``[[stream, entries]]`` or RESP3's ``{stream: [entries]}``
    (a URL's ``?protocol=3``). Pure.

    NOTE: the RESP3 shape, read as RESP2's, raised ValueError from every poll."""
    if not reply:
        return []
    if isinstance(reply, dict):
        groups = [entries for value in reply.values() for entries in value]
    else:
        groups = [item[1] for item in reply]  # type: ignore[attr-defined]
    return [(entry[0], entry[1]) for entries in groups for entry in entries]


def raw_field(entry: object, name: str) -> object:
    """Field ``name`` of a stream entry as redis-py gave it (None if it has none), whether
    the entry's names came as bytes or, from a connection whose URL set
    ``decode_responses``, as str. Pure.

    NOTE: looked up as bytes only, every entry of such a connection had no field: a
    subscriber counted each one malformed and read nothing, ever (no instance even reported
    lost), and a publisher's ``resync_requests`` never saw a request."""
    if not isinstance(entry, dict):
        return None
    value = entry.get(name.encode())
    return entry.get(name) if value is None else value


def field(entry: object, name: str) -> str | None:
    """The UTF-8 text of field ``name`` of a stream entry (``raw_field``), or None if it
    has none. Pure."""
    value = raw_field(entry, name)
    if isinstance(value, str):
        return value
    if not isinstance(value, bytes):
        return None
    try:
        return value.decode()
    except UnicodeDecodeError:
        return None
