"""The in-memory event bus, for one process (the simulator's fleet, tests):
:class:`InMemoryEventBus`, an :class:`~kvtier.publisher.EventPublisher` that fans each batch
out to bounded :class:`InMemorySubscriber` buffers, and the snapshot sources that resync a
subscriber which missed events.

May change: a bus, its subscribers' buffers and snapshot sources; a subscriber, its buffer
and :class:`~kvtier.seq_tracker.SeqTracker`. Neither ever changes a manager.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence

from kvtier.event_codec import Snapshot
from kvtier.event_updates import MAX_BUFFER, Update, check_batch
from kvtier.events import Event
from kvtier.seq_tracker import SeqTracker, check_forget_after
from kvtier.sequence import short_repr

__all__ = ["InMemoryEventBus", "InMemorySubscriber"]


class InMemorySubscriber:
    """One subscriber of an :class:`InMemoryEventBus`: a bounded buffer and a tracker.

    When the buffer is full the oldest events are dropped (``num_dropped``); at the next poll
    their instances are stale (one whose seq 0 was dropped restarted: its old blocks are
    forgotten) and repaired from the bus's snapshot source (a source that raises is counted
    in ``num_failed_snapshots`` and asked again at the next poll). An instance the bus
    forgets (``InMemoryEventBus.forget``), or, with ``forget_after_s``, one not heard from
    for that long on ``clock``, is forgotten (``InstanceGone``); the bus keeps its snapshot
    source for the other subscribers, and for this one should the instance speak again.
    """

    def __init__(self, bus: InMemoryEventBus, max_events: int,
                 forget_after_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        # NOTE: bounded as CacheConfig.max_events: past a C ssize_t the deque raised
        # OverflowError.
        if type(max_events) is not int or not 1 <= max_events <= MAX_BUFFER:
            raise ValueError(f"max_events must be an integer in 1..2**40, got "
                             f"{short_repr(max_events)}")
        self.forget_after_s = check_forget_after(forget_after_s)
        self._bus = bus
        self._buffer: deque[tuple[str, Event]] = deque(maxlen=max_events)
        # Instances whose events the buffer dropped since the last poll, in order; True
        # where their seq 0 was one: a restart, unless nothing of theirs was read yet.
        self._dropped: dict[str, bool] = {}
        self.tracker = SeqTracker(clock=clock)
        self._gone: list[Update] = []  # instances forgotten since the last poll
        self.num_dropped = 0
        self.num_failed_snapshots = 0  # snapshot sources that raised

    def forget(self, instance_id: str) -> None:
        """``instance_id`` left: its buffered events and its stream go, and the next poll
        says so (``InstanceGone``). TypeError, changing nothing, unless it is a str."""
        if not isinstance(instance_id, str):
            raise TypeError(f"instance_id must be a str, got {short_repr(instance_id)}")
        buffer = self._buffer
        if any(iid == instance_id for iid, _ in buffer):
            kept = [item for item in buffer if item[0] != instance_id]
            buffer.clear()
            buffer.extend(kept)
        self._dropped.pop(instance_id, None)
        self.tracker.forget(instance_id, self._gone)

    def push(self, instance_id: str, events: Sequence[Event]) -> None:
        buffer = self._buffer
        maxlen = buffer.maxlen
        assert maxlen is not None
        num_dropped = max(0, len(buffer) + len(events) - maxlen)
        if num_dropped:
            # The oldest go: those of the buffer first, then of ``events``.
            dropped = itertools.chain(itertools.islice(buffer, min(num_dropped, len(buffer))),
                                      ((instance_id, e) for e in
                                       events[:max(0, num_dropped - len(buffer))]))
            for iid, event in dropped:
                self._dropped[iid] = self._dropped.get(iid, False) or event.seq == 0
        self.num_dropped += num_dropped
        buffer.extend((instance_id, e) for e in events)

    def poll(self) -> list[Update]:
        """Every update since the last poll, in arrival order; stale instances are resynced
        from the bus's snapshot source where it has one."""
        out, self._gone = self._gone, []
        started_s = self.tracker.clock()
        items = list(self._buffer)
        self._buffer.clear()
        tracker = self.tracker
        # NOTE: an instance whose events were dropped is stale after this poll: its hole
        # showed only at its next event, so a quiet one's dropped BlockRemoved was routed
        # to for as long as it stayed quiet. One whose dropped seq 0 was a restart is
        # stale before what the buffer kept of it (all of the new incarnation): that was
        # never seen (its new events read as already applied, or applied onto the old
        # incarnation's blocks, which were kept; its snapshots refused).
        dropped, self._dropped = self._dropped, {}
        for instance_id, restarted in dropped.items():
            if restarted:
                tracker.restart(instance_id, out)
        i = 0
        while i < len(items):  # group runs of one instance into one batch
            instance_id = items[i][0]
            j = i
            while j < len(items) and items[j][0] == instance_id:
                j += 1
            # checked when published
            tracker.receive_checked(instance_id, (e for _, e in items[i:j]), out)
            i = j
        for instance_id in dropped:
            tracker.lose(instance_id, out)  # stale already where the buffer showed the hole
        if self.forget_after_s is not None:
            tracker.expire(self.forget_after_s, out, started_s)
        for instance_id in tracker.stale_instances():
            try:
                snapshot = self._bus.snapshot(instance_id)
            except Exception:
                # NOTE: the instance's source failed (it is down): it stays stale and is
                # asked again at the next poll; the updates of the others are not lost.
                self.num_failed_snapshots += 1
                continue
            if snapshot is None:
                continue
            if not isinstance(snapshot, Snapshot) or snapshot.instance_id != instance_id:
                # A source that answers garbage (or another instance's blocks) is as good
                # as down: applying it would corrupt the consumer's view of the instance.
                self.num_failed_snapshots += 1
                continue
            tracker.offer(snapshot, out)
        return out


class InMemoryEventBus:
    """An :class:`EventPublisher` for one process: fan-out to bounded subscriber buffers.

    Instances may register a snapshot source (``register_snapshot``) that subscribers call
    when they missed events. A source stays until the instance registers another or
    leaves (``forget``): a subscriber's expiry (``forget_after_s``) never drops it.

    NOTE: the bus is shared: one subscriber's expiry means only that the instance was
    quiet past that subscriber's horizon (another may hold its blocks, with a longer one
    or none), not that it is gone for all. Dropped then, a quiet instance that speaks
    again (a gap, its first event read after the expiry) could never be resynced: stale
    for every subscriber, without a word. In one process the owner of an instance knows
    when it crashes or leaves, and says so with ``forget``; the sources are bounded by the
    instances registered and not forgotten, as ``register_snapshot`` made them.

    NOTE: the subscribers are held weakly (a ``WeakSet``): held in a list, one its owner
    dropped (a request handler's, a test's) stayed alive for the bus's lifetime, every
    batch pushed into its buffer of up to ``max_events`` events that nobody polled.
    """

    def __init__(self) -> None:
        self._subscribers: weakref.WeakSet[InMemorySubscriber] = weakref.WeakSet()
        self._snapshot_sources: dict[str, Callable[[], Snapshot]] = {}
        self.num_published = 0

    def subscribe(self, max_events: int = 1 << 20, forget_after_s: float | None = None,
                  clock: Callable[[], float] = time.monotonic) -> InMemorySubscriber:
        """A new subscriber that sees every event published from now on, forgetting an
        instance not heard from for ``forget_after_s`` on ``clock`` (None: never). The
        bus holds it weakly: it reads for as long as the caller keeps it."""
        subscriber = InMemorySubscriber(self, max_events, forget_after_s, clock)
        self._subscribers.add(subscriber)
        return subscriber

    @property
    def num_subscribers(self) -> int:
        """The subscribers still held by their owners, which every batch reaches. Pure."""
        return len(self._subscribers)

    def publish(self, instance_id: str, events: Sequence[Event]) -> None:
        """Hand ``events`` to every subscriber. TypeError (nothing published) for a batch
        that is not a str id and a sequence of events, ValueError for an event with a field
        ``check_batch`` refuses (its token ids are the consumers' to check)."""
        check_batch(instance_id, events, token_ids=False)
        if not events:
            return
        self.num_published += len(events)
        for subscriber in list(self._subscribers):
            subscriber.push(instance_id, events)

    def register_snapshot(self, instance_id: str, source: Callable[[], Snapshot]) -> None:
        """``source`` answers ``instance_id``'s snapshot (its blocks as of now: a restarted
        instance registers its new manager's, replacing the old) until it registers
        another or is forgotten (``forget``). TypeError, changing nothing, unless it is a
        str id and a callable."""
        if not isinstance(instance_id, str) or not callable(source):
            raise TypeError(f"register_snapshot needs a str instance id and a callable, got "
                            f"{short_repr(instance_id)} and {short_repr(source)}")
        self._snapshot_sources[instance_id] = source

    def forget(self, instance_id: str) -> None:
        """``instance_id`` left the fleet: its snapshot source goes, and every subscriber
        forgets it (``InMemorySubscriber.forget``). Publishing under the id again makes a
        new instance. TypeError, changing nothing, unless it is a str.

        NOTE: a source stayed registered per instance id ever seen."""
        if not isinstance(instance_id, str):
            raise TypeError(f"instance_id must be a str, got {short_repr(instance_id)}")
        self._snapshot_sources.pop(instance_id, None)
        for subscriber in list(self._subscribers):
            subscriber.forget(instance_id)

    def snapshot(self, instance_id: str) -> Snapshot | None:
        """A fresh snapshot of ``instance_id``, or None if it registered no source."""
        source = self._snapshot_sources.get(instance_id)
        return None if source is None else source()
