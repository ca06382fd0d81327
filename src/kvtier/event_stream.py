"""KV events from Redis Streams (extra ``redis``, imported only when a client is made):
:class:`RedisStreamSubscriber` reads the stream a
:class:`~kvtier.stream_publisher.RedisStreamPublisher` writes (``XREAD``), asks for a
snapshot of an instance it missed events of, and resyncs from it.

A Redis fault is a hole a resync repairs (counted), never an exception in the serving loop.
May change: the resync stream, its own position and
:class:`~kvtier.seq_tracker.SeqTracker`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from kvtier import stream_client
from kvtier.event_codec import decode_events, decode_snapshot, is_incarnation
from kvtier.event_updates import MAX_INSTANCE_ID_CHARS, InstanceGone, Update
from kvtier.remote.options import check_number
from kvtier.reprs import shown
from kvtier.seq_tracker import SeqTracker, check_forget_after
from kvtier.sequence import short_repr
from kvtier.stream_client import (
    attempt,
    check_cluster,
    check_stream,
    claim_key,
    get_each,
    get_either,
    legacy_claim_key,
    legacy_snapshot_key,
    snapshot_key,
)
from kvtier.stream_entries import (
    check_start_id,
    field,
    raw_field,
    stream_entries,
    stream_id,
)

__all__ = ["BLOCK_SLICE_MS", "RedisStreamSubscriber"]


# The longest one XREAD of a blocking poll blocks (``RedisStreamSubscriber._read``): well
# below ``stream_client.COMMAND_TIMEOUT_S``, the time its reply is due in, leaving 150 ms
# for the reply to come back once the block ended.
BLOCK_SLICE_MS = 100


class RedisStreamSubscriber:
    """Reads a :class:`RedisStreamPublisher` stream from the last id read (``XREAD``).

    Gaps (the stream was trimmed past us, or we started late) make an instance stale: a
    resync request is added and the stored snapshot is used once it covers what was read
    (a stream trimmed past the last entry read, to nothing, or deleted makes every instance
    read stale at once, ``num_trims``: which instances' entries went is not known; one
    deleted or made again behind the last id read is read again from its start).
    A malformed entry (its events unreadable, or an ``n`` that is no incarnation) is
    skipped and counted (``num_malformed_entries``); its instance, when
    readable, is reported lost (a gap) and resynced; the entries after it are delivered.
    An entry with an empty instance id, or with no events and no goodbye (no publisher
    writes either), is malformed too, counted, and makes no state, as does a malformed
    entry of an instance not read (not in ``tracker.streams``) and one whose id is past
    ``MAX_INSTANCE_ID_CHARS``. At most ``max_instances`` instances are tracked at once: an
    entry of one more is skipped and counted (``num_refused_instances``) until one is
    forgotten (a hostile or broken writer of many ids grows nothing past it). A
    malformed snapshot is skipped and counted (``num_malformed_snapshots``); the instance
    stays stale until a sound one comes. An instance still stale ``resync_retry_s`` seconds
    after its request is asked for again (``num_resync_requests`` counts them): a request
    is one entry of a capped stream, which a trim or a restarted server may lose before
    the publisher reads it. An entry of an incarnation new to the subscriber is read as
    the instance's only where the instance's claim (``claim_key``, one GET) names it or
    none: one of another is skipped as replaced (``SeqTracker.supersede``). The claim and
    snapshot keys are read by their names in the stream's hash slot (``claim_key``,
    ``snapshot_key``), and by the names of publishers before hash tags
    (``<stream>:snapshot:<instance>``) where those are missing. ``cluster=True`` reads
    a Redis Cluster (a ``RedisCluster`` client).
    An instance not heard from (no entry read, no snapshot applied)
    for more than ``forget_after_s`` on ``clock`` (by default 3600 s, an hour; None:
    never), or one the caller ``forget`` s, is forgotten (``InstanceGone``: the consumer
    drops its blocks), its requests with it, and its entries added until then and still
    unread are skipped (as is its past read again: ``SeqTracker``). One that comes back is
    read as new: from its
    seq 0, or, an instance that was only quiet, from a gap at its next entry (stale, asked
    for, resynced from its snapshot, which the publisher must answer).
    May change: the resync stream, its own state.

    NOTE: unlike the in-memory bus's subscribers (None by default: their owner says when
    an instance leaves), a stream names no departure: a crashed pod's id would stay, and
    a stale one be asked for, for ever. An hour keeps an instance quiet that long
    routed to; a fleet whose instances may stay quiet longer raises it.
    """

    def __init__(self, url: str, stream: str = "kvtier:events", start_id: str = "0-0",
                 resync_retry_s: float = 1.0, forget_after_s: float | None = 3600.0,
                 clock: Callable[[], float] = time.monotonic, cluster: bool = False,
                 max_instances: int = 16_384) -> None:
        if type(max_instances) is not int or max_instances < 1:
            raise ValueError(f"max_instances must be an int >= 1, got {short_repr(max_instances)}")
        check_stream(stream)
        check_cluster(stream, cluster)
        check_start_id(start_id)
        self.resync_retry_s = resync_retry_s
        self.forget_after_s = check_forget_after(forget_after_s)
        self._clock = clock
        self._redis = stream_client.connect(url, cluster=cluster)
        self.stream = stream
        self.last_id: str | bytes = start_id
        self.tracker = SeqTracker(clock=clock)
        self._gone: list[Update] = []  # instances forgotten since the last poll
        self.num_malformed_entries = 0
        self.num_malformed_snapshots = 0
        self.num_resync_requests = 0
        self.num_trims = 0  # polls that found the stream trimmed past what was read
        self.max_instances = max_instances
        self.num_refused_instances = 0  # entries of an instance past max_instances
        # Stale instances asked for, with when (on ``clock``) the request was added.
        self._asked: dict[str, float] = {}
        # Instances forgotten with entries maybe still unread: the stream's last id then.
        self._forgotten: dict[str, tuple[int, int]] = {}

    def close(self) -> None:
        """Close the connection to Redis (idempotent); ``with RedisStreamSubscriber(...)``
        closes it at the block's end."""
        stream_client.close(self._redis)

    def __enter__(self) -> RedisStreamSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def forget(self, instance_id: str) -> None:
        """``instance_id`` left: its stream and resync request go, and the next poll says
        so (``InstanceGone``); its entries added before (XINFO's last id, where Redis
        answers) are skipped when read, so that one publishing again is a new instance.
        TypeError, changing nothing, unless it is a str.

        NOTE: the entries it added before it left, still unread, were read at the next
        poll as a new instance's: its blocks held until ``forget_after_s``, or, from a
        gap, a snapshot asked for that long."""
        self.tracker.forget(instance_id, self._gone)
        self._asked.pop(instance_id, None)
        self._skip_unread([instance_id])

    def _skip_unread(self, instance_ids: list[str]) -> None:
        """The entries of ``instance_ids`` (forgotten) added until now and not yet read
        are skipped when read (XINFO's last id, where Redis answers)."""
        xinfo_stream = getattr(self._redis, "xinfo_stream", None)
        info = None if xinfo_stream is None else attempt(xinfo_stream, self.stream)
        last = stream_id(info.get("last-generated-id")) if isinstance(info, dict) else None
        read = stream_id(self.last_id)
        if last is not None and (read is None or last > read):
            for instance_id in instance_ids:
                self._forgotten[instance_id] = last

    @property
    def resync_retry_s(self) -> float:
        """How long a stale instance's request stands before it is asked for again
        (0..3600 s; checked when set, as when made)."""
        return self._resync_retry_s

    @resync_retry_s.setter
    def resync_retry_s(self, value: float) -> None:
        self._resync_retry_s = check_number("resync_retry_s", value, 0.0, 3600.0)

    def poll(self, count: int = 10_000, block_ms: int | None = None) -> list[Update]:
        """The updates of up to ``count`` entries after ``last_id``, with any resyncs.
        ValueError, reading nothing, unless ``count`` is an int >= 1 and ``block_ms`` None
        or an int >= 0 (Redis refused them: every poll was a silent empty read); a
        ``block_ms`` of 0 waits for nothing, as None.

        NOTE: 0 went to XREAD as ``BLOCK 0``, which Redis reads as "wait for ever": on a
        quiet stream every poll of a loop that meant not to wait stalled until an entry
        came or the connection's read timed out (5 s with redis-py's defaults, a fault
        skipped without a word)."""
        if type(count) is not int or count < 1:
            raise ValueError(f"count must be an int >= 1, got {short_repr(count)}")
        if block_ms is not None and (type(block_ms) is not int or block_ms < 0):
            raise ValueError(f"block_ms must be None or an int >= 0, got {short_repr(block_ms)}")
        out, self._gone = self._gone, []
        started_s = self._clock()
        # NOTE: snapshots first: entries read while an instance is stale are skipped, and a
        # snapshot must cover every event read, so reading first could refuse a good one.
        # With Redis down, each command is skipped and retried at the next poll: what was
        # read is returned (``last_id`` has moved past it), nothing raised.
        self._try_snapshots(out)
        reply = self._read(out, count, block_ms or None)
        for entry_id, entry in stream_entries(reply):
            self.last_id = entry_id  # never read a bad entry twice
            self._receive(entry_id, entry, out)
        if self._forgotten:  # kept until every entry added before the forget is read
            read = stream_id(self.last_id) or (0, 0)
            self._forgotten = {iid: last for iid, last in self._forgotten.items()
                               if last > read}
        self._try_snapshots(out)
        if self.forget_after_s is not None:
            num_updates = len(out)
            self.tracker.expire(self.forget_after_s, out, started_s)
            # NOTE: an instance expired with entries not yet read (a subscriber behind)
            # was made again by them when read: a gap, and its crashed process's snapshot
            # applied (routed to, gone). Expired, it is forgotten as ``forget`` does.
            expired = [u.instance_id for u in out[num_updates:] if isinstance(u, InstanceGone)]
            if expired:
                self._skip_unread(expired)
        # NOTE: asked once, an instance waited for ever where its request was lost (the
        # resync stream trimmed past it, a server restarted without it): no snapshot came,
        # and the instance's blocks were never routed to again.
        now = self._clock()
        stale = self.tracker.stale_instances()
        self._asked = {iid: self._asked[iid] for iid in stale if iid in self._asked}
        for instance_id in stale:
            asked_s = self._asked.get(instance_id)
            if asked_s is not None and now - asked_s < self.resync_retry_s:
                continue
            if attempt(self._redis.xadd, f"{self.stream}:resync", {"i": instance_id},
                        maxlen=1000, approximate=True) is not None:
                self._asked[instance_id] = now
                self.num_resync_requests += 1
        return out

    def _read(self, out: list[Update], count: int, block_ms: int | None) -> object:
        """XREAD's reply after ``last_id`` (None where Redis failed: ``_read_once``); one
        of ``block_ms`` (wall time, as Redis blocks) is read in slices of at most
        ``BLOCK_SLICE_MS``, each an XREAD BLOCK, until one reads an entry, fails, or
        ``block_ms`` has passed (at most ``ceil(block_ms / BLOCK_SLICE_MS)`` of them).

        NOTE: each read of the client is due within ``stream_client.COMMAND_TIMEOUT_S``
        (a server that hangs costs a command that long, not redis-py's 5 s): one XREAD
        blocking longer than that would time out every quiet poll, a fault."""
        if block_ms is None:
            return self._read_once(out, count, None)
        deadline_s = time.monotonic() + block_ms / 1000
        reply = self._read_once(out, count, min(block_ms, BLOCK_SLICE_MS))
        for _ in range(math.ceil(block_ms / BLOCK_SLICE_MS) - 1):
            left_ms = math.floor((deadline_s - time.monotonic()) * 1000)
            if reply is None or reply or left_ms < 1:  # failed, read, or waited enough
                break
            reply = attempt(self._redis.xread, {self.stream: self.last_id}, count=count,
                            block=min(left_ms, BLOCK_SLICE_MS))
        return reply

    def _read_once(self, out: list[Update], count: int, block_ms: int | None) -> object:
        """XREAD's reply after ``last_id`` (None where Redis failed), the stream checked
        for a trim first (``_check_trimmed``): both in one round trip where the client
        pipelines, XREAD sent again only where the check moved ``last_id``.

        NOTE: XINFO was a round trip of its own before every XREAD once anything was
        read: two a poll. Pipelined, the server still answers XINFO first, so a trim
        seen is the one the read would meet, as before."""
        make_pipeline = getattr(self._redis, "pipeline", None)
        if self._read_until() is None or make_pipeline is None:
            self._check_trimmed(out)
            return attempt(self._redis.xread, {self.stream: self.last_id}, count=count,
                           block=block_ms)

        def send() -> object:
            pipe = make_pipeline(transaction=False)  # a cluster's client is made here
            pipe.xinfo_stream(self.stream)
            pipe.xread({self.stream: self.last_id}, count=count, block=block_ms)
            return pipe.execute(raise_on_error=False)

        replies = attempt(send)
        if not isinstance(replies, list) or len(replies) != 2:
            return None  # Redis down: each command retried at the next poll
        info, reply = replies
        before = self.last_id
        self._check_trimmed(out, info)
        if self.last_id != before:  # to be read from elsewhere (its start, past a trim)
            return attempt(self._redis.xread, {self.stream: self.last_id}, count=count,
                           block=block_ms)
        return None if isinstance(reply, Exception) else reply

    def _read_until(self) -> tuple[int, int] | None:
        """The id read last where a trim past it can be checked, or None: a client without
        XINFO, or nothing read yet (``last_id`` unparsed or 0-0). Pure."""
        read = stream_id(self.last_id)
        if getattr(self._redis, "xinfo_stream", None) is None or read is None or read == (0, 0):
            return None
        return read

    def _check_trimmed(self, out: list[Update], info: object = None) -> None:
        """Every instance read so far is lost (stale until a snapshot) where the stream
        lost entries past ``last_id`` (``num_trims``), of instances unknown: trimmed past
        it (its oldest entry is newer than the last one read, or, trimmed to nothing, its
        last id is), or deleted. A stream deleted, or made again behind ``last_id`` (its
        last id older), is read again from its start.

        NOTE: a trimmed entry showed as a hole only at its instance's next entry: a quiet
        instance's trimmed BlockRemoved was routed to for as long as it stayed quiet. A
        trim that cut exactly where the subscriber stood costs a resync; one between this
        check and the read shows, as before, at each instance's next entry. A stream
        trimmed to nothing (first id 0-0) or deleted (no XINFO) read as nothing lost, and
        one made again behind ``last_id`` was read from there: never an entry again.
        ``info``: XINFO STREAM's reply where it was read already (``_read``)."""
        read = self._read_until()
        if read is None:
            return  # a client without XINFO, or nothing read yet (a hole shows as any other)
        if info is None:
            info = attempt(self._redis.xinfo_stream, self.stream)
        if not isinstance(info, dict):  # Redis down, or no such stream
            exists = getattr(self._redis, "exists", None)
            if self.tracker.streams and exists is not None \
                    and attempt(exists, self.stream) == 0:
                self._lose_all(out, read_again=True)
            return
        first = stream_id(info.get("recorded-first-entry-id"))
        newest = stream_id(info.get("last-generated-id"))
        if newest is not None and newest < read:
            self._lose_all(out, read_again=True)
        elif first == (0, 0):  # empty: trimmed past us where entries came after ours
            if newest is not None and newest > read:
                self._lose_all(out)
                self.last_id = f"{newest[0]}-{newest[1]}"  # nothing left before it
        elif first is not None and first > read:
            self._lose_all(out)

    def _lose_all(self, out: list[Update], read_again: bool = False) -> None:
        """Every instance read is lost (``num_trims``); ``read_again``: the stream is
        read from its start (what was forgotten with it is forgotten). A trim of nothing
        read (every instance forgotten) is no loss: not counted."""
        if not self.tracker.streams and not read_again:
            return
        self.num_trims += 1
        for instance_id in list(self.tracker.streams):
            self.tracker.lose(instance_id, out)
        if read_again:
            self.last_id = "0-0"
            self._forgotten.clear()

    def _receive(self, entry_id: object, entry: object, out: list[Update]) -> None:
        instance_id = field(entry, "i")
        if instance_id == "" or (instance_id is not None
                                 and len(instance_id) > MAX_INSTANCE_ID_CHARS):
            # NOTE: no publisher writes an empty id or a longer one (``check_batch``): ""
            # made an instance kept until forget_after_s, a long one was held (and written
            # to the resync stream) whole. Malformed, of no instance: no state made.
            self.num_malformed_entries += 1
            return
        if instance_id in self._forgotten:
            entry_seq = stream_id(entry_id)
            if entry_seq is not None and entry_seq <= self._forgotten[instance_id]:
                return  # added before its instance left
        if instance_id is not None and instance_id not in self.tracker.streams \
                and len(self.tracker.streams) >= self.max_instances:
            # NOTE: every id read made a tracker entry, kept until forget_after_s: a
            # writer of many ids (hostile, or a bug) grew the subscriber without bound,
            # and its snapshot GETs and resync requests with it.
            self.num_refused_instances += 1
            return
        incarnation = field(entry, "n")
        if raw_field(entry, "n") is not None and not is_incarnation(incarnation):
            # NOTE: an ``n`` no publisher writes (past 64 characters, no UTF-8, empty) was
            # taken for a new incarnation (a restart: the instance's publisher retired, its
            # later entries skipped) or read as naming none. Malformed, as a bad ``e`` is.
            self._malformed(instance_id, None, out)
            return
        if instance_id is not None and incarnation is not None \
                and not self.tracker.knows(instance_id, incarnation):
            # NOTE: an incarnation new to this subscriber is taken as the instance's
            # current one only where its claim does not name another (``claim_key``): the
            # incarnation read last was taken for it, and an old process's late entry,
            # read after the new one's, replaced the new one.
            claim = get_either(self._redis, claim_key(self.stream, instance_id),
                               legacy_claim_key(self.stream, instance_id))
            current = claim.decode(errors="replace") if isinstance(claim, bytes) else claim
            if is_incarnation(current) and current != incarnation:
                assert isinstance(current, str)
                self.tracker.supersede(instance_id, incarnation, current, out)
                return
        if instance_id is not None and raw_field(entry, "g") is not None:
            if self.tracker.farewell(instance_id, incarnation, out):
                self._asked.pop(instance_id, None)
            return
        try:
            if instance_id is None:
                raise ValueError("no readable instance id")
            events = decode_events(raw_field(entry, "e"))  # type: ignore[arg-type]
        except (ValueError, KeyError, TypeError):
            self._malformed(instance_id, incarnation, out)
            return
        if not events:
            # NOTE: a publisher sends no empty batch (only a goodbye has no events): one
            # made a tracker entry of an id seen nowhere else, kept until forget_after_s.
            # It carries no seq, so it is no hole either: counted, no state made.
            self.num_malformed_entries += 1
            return
        # decoded: checked; an entry without a readable incarnation is read by its seq alone
        self.tracker.receive_checked(instance_id, events, out, incarnation)

    def _malformed(self, instance_id: str | None, incarnation: str | None,
                   out: list[Update]) -> None:
        """An unreadable entry of ``instance_id`` (None: no readable id) is counted; an
        instance read already is lost (stale, resynced), one not read makes no state.

        NOTE: a malformed entry of an id never read made a tracker entry and asked for its
        snapshot every ``resync_retry_s`` until ``forget_after_s``: a writer of random ids
        grew the subscriber and the resync stream without bound. One that is real shows
        its hole at its next readable entry (a gap from seq 0) and is resynced then."""
        self.num_malformed_entries += 1
        if instance_id is not None and instance_id in self.tracker.streams:
            self.tracker.lose_entry(instance_id, incarnation, out)

    def _try_snapshots(self, out: list[Update]) -> None:
        stale = self.tracker.stale_instances()
        raws = get_each(self._redis, [(snapshot_key(self.stream, instance_id),
                                       legacy_snapshot_key(self.stream, instance_id))
                                      for instance_id in stale])
        for instance_id, raw in zip(stale, raws, strict=True):
            if raw is None:
                continue
            try:
                snapshot = decode_snapshot(raw)
                if snapshot.instance_id != instance_id:
                    raise ValueError(f"snapshot of {shown(snapshot.instance_id)} under the key of "
                                     f"{shown(instance_id)}")
            except ValueError:
                self.num_malformed_snapshots += 1
                continue
            if self.tracker.offer(snapshot, out):
                self._asked.pop(instance_id, None)
