"""What flows from a publisher to a subscriber's consumer: the :data:`Update` s (a batch of
events, a :class:`Snapshot`, an instance lost or gone), the check every publisher makes of a
batch before taking any of it (``check_batch``), and a manager's blocks as a snapshot
(``manager_snapshot``). ``kvtier.publisher`` tells the protocol these serve.
"""

from __future__ import annotations

from typing import NamedTuple

from kvtier.event_codec import Snapshot, check_events
from kvtier.events import Event
from kvtier.manager import KVCacheManager
from kvtier.sequence import short_repr

__all__ = [
    "MAX_BUFFER",
    "MAX_INSTANCE_ID_CHARS",
    "EventBatch",
    "InstanceGone",
    "InstanceLost",
    "Update",
    "check_batch",
    "manager_snapshot",
]


class EventBatch(NamedTuple):
    """Events of one instance, contiguous in ``seq`` and not yet applied."""

    instance_id: str
    events: list[Event]


class InstanceLost(NamedTuple):
    """Events of ``instance_id`` from ``expected_seq`` on were missed; forget its blocks.

    ``got_seq`` is the seq that showed the hole, None when an entry of the instance was
    unreadable (so which events it held is unknown), or 0 when the instance restarted
    (its seq counts from 0 again, its new cache starts empty)."""

    instance_id: str
    expected_seq: int
    got_seq: int | None


class InstanceGone(NamedTuple):
    """The subscriber forgot ``instance_id``: it left (``forget``), or was not heard from
    (no event read, no snapshot applied) for the subscriber's ``forget_after_s``. Forget it
    entirely; should it come back, it is read as a new instance (from its seq 0, or a gap
    and a snapshot)."""

    instance_id: str


Update = EventBatch | Snapshot | InstanceLost | InstanceGone


def manager_snapshot(manager: KVCacheManager, instance_id: str, next_seq: int) -> Snapshot:
    """The blocks ``manager`` caches now, as a snapshot. Pure (hashes are computed lazily).

    ``next_seq`` must be one past the last event drained from ``manager``: call it with no
    events left undrained, or the snapshot claims events it does not reflect.
    """
    blocks = {(b.block_hash, b.tier) for b in manager.cached_blocks()}
    return Snapshot(instance_id, next_seq, frozenset(blocks))


MAX_BUFFER = 1 << 40  # events a subscriber's buffer or a stream may hold
# NOTE: an id is a key of every subscriber's tracker and the body of its resync requests:
# an unbounded one (a megabyte read from a stream) was held and written back as it came.
MAX_INSTANCE_ID_CHARS = 256


def check_batch(instance_id: object, events: object, *, token_ids: bool = True) -> None:
    """Raise TypeError naming what is wrong unless ``instance_id`` is a str (ValueError
    where it is empty or past ``MAX_INSTANCE_ID_CHARS``) and ``events``
    a sequence of events, ValueError naming the event and field the wire format cannot
    carry (``event_codec.check_events``; ``token_ids=False`` for a consumer that reads no
    token id). Pure.

    NOTE: a publisher checks a batch before it takes any of it: a bad event pushed on was
    found only by a subscriber's poll, which raised with its buffer already drained (every
    other instance's updates of that poll lost), or, on Redis, never: a hole in the stream.
    """
    if not isinstance(instance_id, str):
        raise TypeError(f"instance_id must be a str, got {short_repr(instance_id)}")
    if not instance_id:
        # NOTE: an empty id was published, and every subscriber kept an instance "" that
        # no router can tell from a missing field.
        raise ValueError("instance_id must be a non-empty str, got ''")
    if len(instance_id) > MAX_INSTANCE_ID_CHARS:
        raise ValueError(f"instance_id must be at most {MAX_INSTANCE_ID_CHARS} characters, "
                         f"got {len(instance_id)}: {short_repr(instance_id)}")
    check_events(events, token_ids=token_ids)
