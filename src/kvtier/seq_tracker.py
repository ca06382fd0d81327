"""Per-instance sequence tracking of one subscriber: :class:`SeqTracker` turns the raw
(instance, events) it reads into :data:`~kvtier.event_updates.Update` s, seeing holes,
restarts and resyncs (``kvtier.publisher`` draws them). Both subscribers, the in-memory
bus's and the Redis stream's, read through one.

May change: only its own streams and counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kvtier.event_codec import Snapshot
from kvtier.event_updates import EventBatch, InstanceGone, InstanceLost, Update, check_batch
from kvtier.events import Event
from kvtier.remote.options import check_number
from kvtier.sequence import short_repr

__all__ = ["SeqTracker", "check_forget_after"]

_MAX_RETIRED = 8  # replaced incarnations a stream remembers (restarts while one lingers)
_MAX_GONE = 4096  # forgotten instances a tracker remembers (``_Gone``), the latest kept


def check_forget_after(value: object) -> float | None:
    """``forget_after_s`` checked: None (never), or seconds in [0, 1e9]."""
    return None if value is None else check_number("forget_after_s", value, 0.0, 1e9)


@dataclass(slots=True)
class _Stream:
    next_seq: int | None = None  # None: nothing known yet, accept seq 0 or a snapshot
    max_seen: int = -1
    stale: bool = False
    incarnation: str | None = None  # the publisher's, where its batches name one
    retired: tuple[str, ...] = ()  # incarnations it replaced, the latest last
    heard_s: float = 0.0  # the tracker's clock when an event was read or a snapshot applied


@dataclass(frozen=True, slots=True)
class _Gone:
    """What a tracker keeps of a forgotten instance: the incarnation it read last (None:
    none named), the highest seq read of it, and the incarnations that one replaced."""

    incarnation: str | None
    max_seen: int
    retired: tuple[str, ...]

    def is_past(self, incarnation: str | None, seqs: tuple[int, int] | None) -> bool:
        """Whether a batch naming ``incarnation`` whose lowest and highest seq are
        ``seqs`` (None: unknown, an unreadable entry) is of the instance's past: of an
        incarnation it had retired, or of its last one and read before (no seq past
        ``max_seen``). A batch that names none, or holds a seq 0 (its manager restarted),
        is never known to be. Pure."""
        if incarnation is None:
            return False
        if incarnation in self.retired:
            return True
        return incarnation == self.incarnation and (
            seqs is None or (seqs[0] > 0 and seqs[1] <= self.max_seen))

    def retired_by(self, incarnation: str | None) -> tuple[str, ...]:
        """The incarnations a new stream of the instance, of ``incarnation``, starts with
        retired: these, and the one read last where ``incarnation`` names another. Pure."""
        if incarnation is None or self.incarnation in (None, incarnation):
            return self.retired
        return (*self.retired, self.incarnation)[-_MAX_RETIRED:]


@dataclass(slots=True)
class SeqTracker:
    """Gap detection of one subscriber: turns raw (instance, events) into :data:`Update` s.

    ``num_gaps`` counts holes seen, ``num_resyncs`` snapshots applied, ``num_skipped``
    events dropped as already covered by a snapshot, read while stale or of a retired
    incarnation,
    ``num_restarts`` instances that counted from seq 0 again (a restarted publisher: its
    old blocks are lost, ``InstanceLost(.., got_seq=0)``, and its new stream is read from
    0), or whose batches name another incarnation than before (a restarted publisher
    process, whether or not its seq 0 was read). A seq 0 naming the incarnation read
    already is that incarnation's first entry again (a duplicate, skipped); a restart
    names a new one (``RedisStreamPublisher`` does), or none (the in-memory bus).

    An incarnation once replaced by another is retired (the last ``_MAX_RETIRED`` of each
    instance): a batch naming it, from an old process still up, is skipped whole (an
    unreadable entry naming it is no hole).
    ``num_other_incarnation`` counts such batches, and snapshots refused as taken by
    another incarnation than the one whose stream is read (``offer``).

    ``streams`` holds one entry per instance until it is forgotten (``forget``,
    ``expire``: ``num_forgotten``), so that it is bounded by the instances live, not by
    every id ever seen. ``clock`` (seconds) dates what was heard of each.

    Of a forgotten instance the tracker keeps (``gone``, the last ``_MAX_GONE``) the
    incarnation read last, its highest seq and the incarnations it retired: a batch of
    that past read later (an entry replayed or read late, naming that incarnation with no
    seq past the one read, or a retired one) is skipped (``num_past_entries``), and a
    snapshot naming one of those incarnations refused (``num_other_incarnation``). A
    batch past it, or of another incarnation, or naming none, is the instance back.
    """

    streams: dict[str, _Stream] = field(default_factory=dict)
    num_gaps: int = 0
    num_resyncs: int = 0
    num_skipped: int = 0
    num_restarts: int = 0
    num_forgotten: int = 0
    num_other_incarnation: int = 0
    num_past_entries: int = 0
    gone: dict[str, _Gone] = field(default_factory=dict)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def _stream(self, instance_id: str, incarnation: str | None = None) -> _Stream:
        """``instance_id``'s stream, made (heard now) if it has none: back from being
        forgotten, of ``incarnation``, it starts with what that one retired."""
        stream = self.streams.get(instance_id)
        if stream is None:
            gone = self.gone.pop(instance_id, None)
            stream = self.streams[instance_id] = _Stream(
                heard_s=self.clock(), retired=() if gone is None else gone.retired_by(incarnation))
        return stream

    def _is_past(self, instance_id: str, incarnation: str | None,
                 seqs: tuple[int, int] | None) -> bool:
        """Whether a batch of ``instance_id`` (``_Gone.is_past``) is of the past of an
        instance forgotten and not back since. Pure."""
        gone = self.gone.get(instance_id) if instance_id not in self.streams else None
        return gone is not None and gone.is_past(incarnation, seqs)

    def forget(self, instance_id: str, out: list[Update]) -> None:
        """Forget ``instance_id`` entirely (it left): its stream goes, ``InstanceGone``
        tells the consumer. Nothing where it has no stream. TypeError, changing nothing,
        unless it is a str."""
        if not isinstance(instance_id, str):
            raise TypeError(f"instance_id must be a str, got {short_repr(instance_id)}")
        stream = self.streams.pop(instance_id, None)
        if stream is not None:
            self.num_forgotten += 1
            out.append(InstanceGone(instance_id))
            # NOTE: forgotten without a trace, the instance was made again by its own past:
            # an entry read late (a subscriber behind) or replayed, a gap, and the snapshot
            # its crashed process left under its key applied: routed to, gone.
            self.gone.pop(instance_id, None)
            self.gone[instance_id] = _Gone(stream.incarnation, stream.max_seen, stream.retired)
            if len(self.gone) > _MAX_GONE:
                del self.gone[next(iter(self.gone))]

    def farewell(self, instance_id: str, incarnation: str | None,
                 out: list[Update]) -> bool:
        """``instance_id``'s publisher ``incarnation`` said goodbye: the instance is
        forgotten (``forget``) unless the stream reads another incarnation (a replaced
        process retiring after the new one took over: ``num_other_incarnation``). True
        where it was forgotten."""
        stream = self.streams.get(instance_id)
        if stream is None:
            return False
        if incarnation is not None and (incarnation in stream.retired or (
                stream.incarnation is not None and incarnation != stream.incarnation)):
            self.num_other_incarnation += 1
            return False
        self.forget(instance_id, out)
        return True

    def expire(self, forget_after_s: float, out: list[Update],
               now: float | None = None) -> None:
        """Forget every instance not heard from (no event read, no snapshot applied) for
        more than ``forget_after_s`` before ``now`` (None: the clock now): one gone
        without a word (a crashed pod), or stale and never resynced, whose snapshot would
        be asked for ever. A poll passes the clock read as it started.

        NOTE: a subscriber kept an entry per instance id ever seen, and asked for the
        snapshot of a stale one gone for ever. With the clock read at the expiry, an
        instance the same poll heard (earlier on the clock) was forgotten with a short
        horizon (0: always), its batch followed by ``InstanceGone``."""
        if now is None:
            now = self.clock()
        for instance_id in [iid for iid, stream in self.streams.items()
                            if now - stream.heard_s > forget_after_s]:
            self.forget(instance_id, out)

    def knows(self, instance_id: str, incarnation: str) -> bool:
        """Whether ``incarnation`` is one this tracker read of ``instance_id`` (its current
        or a retired one, or of its past where it was forgotten). Pure."""
        stream = self.streams.get(instance_id)
        if stream is not None:
            return incarnation == stream.incarnation or incarnation in stream.retired
        gone = self.gone.get(instance_id)
        return gone is not None and (incarnation == gone.incarnation
                                     or incarnation in gone.retired)

    def supersede(self, instance_id: str, stale: str, current: str,
                  out: list[Update]) -> None:
        """``instance_id``'s publisher is ``current`` (its claim says so), not ``stale``,
        whose batch read is skipped (``num_other_incarnation``): ``stale`` is retired, and
        the incarnation read before, where it is another than ``current``, too (a restart:
        the instance's blocks are lost). ``current``'s entries, its snapshot, are the
        instance's from now on, read from its seq 0 or a gap.

        NOTE: the tracker took the incarnation read last for the current one: a
        subscriber that read the new process's entries first (it joined late, or the
        seq 0 was trimmed) read the old one's late entry as a restart, retired the new
        incarnation, skipped its entries and applied the old one's snapshot."""
        self.num_other_incarnation += 1
        stream = self._stream(instance_id, current)
        if stream.incarnation is not None and stream.incarnation != current:
            retired = stream.incarnation
            self._restarted(instance_id, stream, out)
            stream.retired = (*stream.retired, retired)[-_MAX_RETIRED:]
        stream.incarnation = current
        stream.retired = tuple(i for i in (*stream.retired, stale)
                               if i != current)[-_MAX_RETIRED:]

    def stale_instances(self) -> list[str]:
        """Instances waiting for a snapshot, in first-seen order. Pure."""
        return [iid for iid, s in self.streams.items() if s.stale]

    def receive(self, instance_id: str, events: Iterable[Event], out: list[Update]) -> None:
        """Append to ``out`` the updates that ``events`` (in seq order) make. TypeError or
        ValueError as ``check_batch`` (token ids unchecked), changing nothing, for a batch
        that is not a str id and events.

        NOTE: a non-event was an AttributeError from the loop with the instance's stream
        already made (and the batch's events before it taken), an int id made a stream
        no batch of the wire could name."""
        events = list(events)
        check_batch(instance_id, events, token_ids=False)
        self.receive_checked(instance_id, events, out)

    def receive_checked(self, instance_id: str, events: Iterable[Event],
                        out: list[Update], incarnation: str | None = None) -> None:
        """``receive`` of a batch already checked (a bus's, a decoded stream entry), of
        the publisher ``incarnation`` where it names one (None: a batch that names none,
        read by its seq alone)."""
        if instance_id not in self.streams and instance_id in self.gone:
            events = list(events)
            seqs = [e.seq for e in events]
            if self._is_past(instance_id, incarnation,
                             (min(seqs), max(seqs)) if seqs else None):
                self.num_past_entries += 1
                self.num_skipped += len(events)
                return
        stream = self._heard(instance_id, incarnation, out)
        if stream is None:
            self.num_skipped += sum(1 for _ in events)
            return
        batch: list[Event] = []
        for event in events:
            seq = event.seq
            if seq == 0 and stream.max_seen >= 0 and (
                    incarnation is None or incarnation != stream.incarnation):
                # nothing read yet: seq 0 is expected. NOTE: a seq 0 naming the
                # incarnation read already is its first entry delivered again (a retried
                # XADD that had landed, a replay): a duplicate, skipped below, where it was
                # taken for a restart (every block of the instance forgotten, and the
                # entries after it a gap and a resync). A restart names a new one.
                # A new incarnation: the instance restarted and counts from 0 again, with
                # an empty cache. Its old blocks are forgotten and its stream starts over.
                # NOTE: seq 0 was skipped as "already read", and so was every later event
                # until the new counter passed the old one; a snapshot of the restarted
                # instance was refused as older than the events read (a router kept the
                # old incarnation's blocks and never learnt the new ones). A seq 0 that is
                # a redelivered duplicate costs a resync, nothing else: the events after
                # it show a gap. Whether the stream applied anything does not matter: one
                # stale since its first event read (a subscriber that joined late) took a
                # restart's seq 0 for the one it expected, skipped it as stale, and then
                # refused every snapshot of the new incarnation until its counter passed
                # the old one's.
                if batch:
                    out.append(EventBatch(instance_id, batch))
                    batch = []
                self._restarted(instance_id, stream, out)
                stream.incarnation = incarnation
            stream.max_seen = max(stream.max_seen, seq)
            expected = 0 if stream.next_seq is None else stream.next_seq
            if stream.stale or seq < expected:
                self.num_skipped += 1
                continue
            if seq > expected:
                if batch:
                    out.append(EventBatch(instance_id, batch))
                    batch = []
                self.num_gaps += 1
                stream.stale = True
                self.num_skipped += 1
                out.append(InstanceLost(instance_id, expected, seq))
                continue
            batch.append(event)
            stream.next_seq = seq + 1
        if batch:
            out.append(EventBatch(instance_id, batch))

    def _heard(self, instance_id: str, incarnation: str | None,
               out: list[Update]) -> _Stream | None:
        """``instance_id``'s stream, heard now from its publisher ``incarnation`` (None:
        an entry that names none): a restart where that is another than the one read
        before, which is retired. None, counted in ``num_other_incarnation``, for an
        incarnation retired already: an old process's entry, to skip."""
        stream = self._stream(instance_id, incarnation)
        if incarnation is not None and incarnation in stream.retired:
            # NOTE: an old process still up after the restart (a rolling update, a late
            # write) read as yet another restart: the new incarnation's blocks forgotten,
            # the instance stale on its seq, and the old one's snapshot, of the incarnation
            # read last, applied (its blocks routed to) until the new one spoke again.
            # Not heard of the instance: the new incarnation's silence still counts.
            self.num_other_incarnation += 1
            return None
        stream.heard_s = self.clock()
        if incarnation is not None and incarnation != stream.incarnation:
            if stream.incarnation is not None:
                stream.retired = (*stream.retired, stream.incarnation)[-_MAX_RETIRED:]
                # NOTE: a restart seen without its seq 0: a trimmed stream (MAXLEN) or a
                # failed XADD lost it, and the new incarnation's events read as ones
                # already applied (skipped, or a gap past what the old one had read, whose
                # snapshots were refused as older than the events read) until its counter
                # passed the old one's: the consumer kept the old blocks and never learnt
                # the new ones. Forgotten as a restart; what the batch holds from seq 0 on
                # is read as any new stream's (a gap and a resync where it starts later).
                self._restarted(instance_id, stream, out)
            stream.incarnation = incarnation
        return stream

    def _restarted(self, instance_id: str, stream: _Stream, out: list[Update]) -> None:
        """``instance_id`` restarted: its old blocks are lost, its stream starts over, of
        an incarnation not known (the caller sets the one its batch names).

        NOTE: a restart seen by its seq 0 in batches that name no incarnation (the
        in-memory bus's) kept the one a snapshot had named: every snapshot of the new
        incarnation was refused as of another, the instance stale for ever."""
        out.append(InstanceLost(instance_id, stream.next_seq or 0, 0))
        stream.incarnation = None
        self.num_restarts += 1
        stream.next_seq = None
        stream.max_seen = -1
        stream.stale = False

    def restart(self, instance_id: str, out: list[Update]) -> None:
        """``instance_id`` counted from seq 0 again, and that event was lost with what
        followed it (a bounded buffer dropped them): where any of its events was read, its
        old blocks are forgotten (``InstanceLost(.., got_seq=0)``) and it is stale until a
        snapshot of the new incarnation (else nothing: its hole is one as any other).
        TypeError, changing nothing, unless ``instance_id`` is a str.

        NOTE: the restart was not seen: the new incarnation's later events read as ones
        already applied and were skipped until its counter passed the old one, while the
        consumer kept the old incarnation's blocks (routed to, gone) and its snapshots were
        refused as older than the events read."""
        if not isinstance(instance_id, str):
            raise TypeError(f"instance_id must be a str, got {short_repr(instance_id)}")
        stream = self.streams.get(instance_id)
        if stream is None or stream.max_seen < 0:
            return  # nothing of it read: the hole is one as any other
        out.append(InstanceLost(instance_id, stream.next_seq or 0, 0))
        self.num_restarts += 1
        self.num_gaps += 1
        self.streams[instance_id] = _Stream(stale=True, heard_s=self.clock())

    def lose(self, instance_id: str, out: list[Update]) -> None:
        """An entry of ``instance_id`` was unreadable: its events are a hole, the instance
        is stale until a snapshot covers it. TypeError, changing nothing, unless
        ``instance_id`` is a str."""
        if not isinstance(instance_id, str):
            raise TypeError(f"instance_id must be a str, got {short_repr(instance_id)}")
        self._stale(instance_id, self._stream(instance_id), out)

    def lose_entry(self, instance_id: str, incarnation: str | None, out: list[Update]) -> None:
        """``lose`` of an unreadable entry read, of the publisher ``incarnation`` where it
        names a readable one: a restart where that is new (as ``receive_checked``), nothing
        where it is retired.

        NOTE: the unreadable first entry of a restarted process was a hole of the old
        incarnation's stream: stale, it applied the old process's snapshot written late,
        as covering every seq read."""
        if self._is_past(instance_id, incarnation, None):
            self.num_past_entries += 1
            return
        stream = self._heard(instance_id, incarnation, out)
        if stream is not None:
            self._stale(instance_id, stream, out)

    def _stale(self, instance_id: str, stream: _Stream, out: list[Update]) -> None:
        """``instance_id`` missed events of unknown seq: stale, unless it is already."""
        if stream.stale:
            return
        self.num_gaps += 1
        stream.stale = True
        expected = 0 if stream.next_seq is None else stream.next_seq
        out.append(InstanceLost(instance_id, expected, None))

    def offer(self, snapshot: Snapshot, out: list[Update]) -> bool:
        """Resync from ``snapshot`` if it covers every event seen and, where both name an
        incarnation, was taken by the one whose stream is read (another is counted in
        ``num_other_incarnation``); True if it was applied. A snapshot that names none,
        or offered for a stream that knows none, is read by its seq alone (the stream then
        takes its incarnation); one naming a retired incarnation, or one of a forgotten
        instance's past (``gone``), is refused. TypeError, changing nothing, unless it is a
        :class:`Snapshot` (another object was an AttributeError)."""
        if not isinstance(snapshot, Snapshot):
            raise TypeError(f"offer needs a Snapshot, got {short_repr(snapshot)}")
        if self._is_past(snapshot.instance_id, snapshot.incarnation, None):
            # NOTE: a forgotten instance's snapshot (its crashed process's, left under its
            # key) made it again: routed to, gone.
            self.num_other_incarnation += 1
            return False
        stream = self._stream(snapshot.instance_id, snapshot.incarnation)
        if snapshot.incarnation is not None and (
                snapshot.incarnation in stream.retired or (
                    stream.incarnation is not None
                    and snapshot.incarnation != stream.incarnation)):
            # NOTE: the old process wrote its snapshot after the new one's seq 0 deleted
            # the key (a late writer): a subscriber stale on a gap in the new stream
            # applied it, as it covered every seq read of the new one. The instance's
            # old blocks were routed to, gone with the old process, and the new events
            # it claimed skipped. Refused as a missing snapshot is: still stale, asked for
            # again. Which of two incarnations is the later is not known, so one not yet
            # read (a restart whose entries are still to come) waits for its entries too.
            self.num_other_incarnation += 1
            return False
        if snapshot.next_seq <= stream.max_seen:
            return False
        stream.heard_s = self.clock()
        if snapshot.incarnation is not None:
            stream.incarnation = snapshot.incarnation
        stream.next_seq = snapshot.next_seq
        # NOTE: the events the snapshot covers count as seen: a stream that knew its
        # instance only from a snapshot (offered first, or after an unreadable entry, which
        # reads no seq) took the instance's restart, seq 0, for an event the snapshot
        # covered: skipped, with every later one until the new counter passed next_seq,
        # while the consumer kept the old incarnation's blocks for good.
        stream.max_seen = max(stream.max_seen, snapshot.next_seq - 1)
        stream.stale = False
        self.num_resyncs += 1
        out.append(snapshot)
        return True
