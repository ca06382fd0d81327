"""Publishing KV events to other processes, with sequence numbers and resync from snapshots.

Every instance's events carry its manager's monotonic ``seq``. A subscriber expects them
without holes; a hole (a bounded buffer dropped events, a Redis stream was trimmed, the
subscriber joined late) makes the instance *stale*: the subscriber tells its consumer to
forget that instance and asks for a :class:`Snapshot`, the set of (block hash, tier) the
instance holds as of some ``next_seq``::

    seq:      0 1 2 3 4 . . . 9 10 11 12
    applied:  ✓ ✓ ✓ ✓ ✓ (lost)  |           gap seen at 9: stale, snapshot requested
    snapshot(next_seq=11) ──────┘ ✓  ✓      resync; events < 11 are skipped

A snapshot is accepted only if it covers every event already read from that instance
(``next_seq > highest seq seen``), so the events after it are still to come. An instance
whose seq starts again from 0, or whose Redis entries name another publisher
incarnation, has restarted (a new manager, an empty cache): its old blocks are forgotten
and its new stream is read from 0. From then on what names the replaced incarnation (a
late entry or snapshot of an old process still up) is refused, never applied.

Instances come and go (a restarted pod gets a new id): a subscriber holds state only for
instances heard from within its ``forget_after_s``, or until it is told one left
(``forget``); it then forgets it entirely (:class:`InstanceGone`), and reads it as a new
instance should it come back.

:class:`InMemoryEventBus` serves the simulator and tests; :class:`RedisStreamPublisher` and
:class:`RedisStreamSubscriber` carry the same updates over Redis Streams (extra ``redis``).

This module holds the :class:`EventPublisher` protocol and gathers every name of the
transport, each from its own module: the updates and ``check_batch`` (``event_updates``),
:class:`SeqTracker` (``seq_tracker``), the in-memory bus (``event_bus``), Redis Streams
(``stream_publisher`` writes, ``event_stream`` reads, both through ``stream_client``;
``stream_entries`` reads their entries) and the wire format
(``event_codec``).

Contracts: a publisher changes only its transport (buffers, a stream, snapshot keys); a
subscriber only its own position and :class:`SeqTracker`; neither ever changes a manager
(``manager_snapshot`` is a pure query). The decoders raise only ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from kvtier.event_bus import InMemoryEventBus, InMemorySubscriber
from kvtier.event_codec import (
    Snapshot,
    decode_events,
    decode_snapshot,
    encode_events,
    encode_snapshot,
)
from kvtier.event_stream import RedisStreamSubscriber
from kvtier.event_updates import (
    EventBatch,
    InstanceGone,
    InstanceLost,
    Update,
    check_batch,
    manager_snapshot,
)
from kvtier.events import Event
from kvtier.seq_tracker import SeqTracker
from kvtier.stream_publisher import RedisStreamPublisher

__all__ = [
    "EventBatch",
    "EventPublisher",
    "InMemoryEventBus",
    "InMemorySubscriber",
    "InstanceGone",
    "InstanceLost",
    "RedisStreamPublisher",
    "RedisStreamSubscriber",
    "SeqTracker",
    "Snapshot",
    "Update",
    "check_batch",
    "decode_events",
    "decode_snapshot",
    "encode_events",
    "encode_snapshot",
    "manager_snapshot",
]


class EventPublisher(Protocol):
    """Where an instance sends its events; ``events`` are in ``seq`` order, oldest first."""

    def publish(self, instance_id: str, events: Sequence[Event]) -> None:
        """Hand ``events`` of ``instance_id`` to every subscriber; never blocks on a slow one."""
        ...
