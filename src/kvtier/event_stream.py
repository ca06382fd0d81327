"""KV events over Redis Streams (extra ``redis``, imported only when a client is made):
:class:`RedisStreamPublisher` adds each batch as one stream entry and stores snapshots
under their own keys; :class:`RedisStreamSubscriber` reads the stream (``XREAD``), asks for
a snapshot of an instance it missed events of, and resyncs from it.

A Redis fault is a hole a resync repairs (counted), never an exception in the serving loop.
May change: a publisher, its stream and snapshot keys; a subscriber, the resync stream and
its own position and :class:`~kvtier.seq_tracker.SeqTracker`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from kvtier.event_codec import (
    Snapshot,
    decode_events,
    decode_snapshot,
    encode_events,
    encode_snapshot,
    is_incarnation,
)
from kvtier.event_updates import MAX_BUFFER, InstanceGone, Update, check_batch
from kvtier.events import Event
from kvtier.remote.options import check_number
from kvtier.reprs import shown
from kvtier.seq_tracker import SeqTracker, check_forget_after
from kvtier.sequence import short_repr
from kvtier.stream_entries import (
    check_start_id,
    field,
    raw_field,
    stream_entries,
    stream_id,
)

__all__ = ["RedisStreamPublisher", "RedisStreamSubscriber"]


_T = TypeVar("_T")


def _attempt(command: Callable[..., _T], *args: Any, **options: Any) -> _T | None:
    """``command(*args, **options)`` of redis-py, or None where Redis failed (down, timed
    out): a fault of the event stream is a gap a resync repairs, never an exception in the
    loop."""
    import redis

    try:
        return command(*args, **options)
    except (redis.RedisError, OSError):
        return None


# Deletes KEYS[1] unless the snapshot under it names another publisher incarnation than
# ARGV[1] (its JSON string): one naming this one goes, and so does one naming none (of a
# publisher older than ``p``, read by its seq alone) or not a snapshot of ours at all.
# NOTE: the tail is compared, not the JSON decoded: ``encode_snapshot`` writes ``p`` last,
# compact, so a snapshot names one exactly where it ends with ``"}``; decoding a snapshot
# of a million blocks would hold the server for every retiring instance.
_DELETE_UNLESS_OTHERS = """
local raw = redis.pcall('GET', KEYS[1])
if not raw then return 0 end
if type(raw) == 'string' and string.sub(raw, -2) == '"}' then
  local mine = ',"p":' .. ARGV[1] .. '}'
  if string.sub(raw, -#mine) ~= mine then return 0 end
end
return redis.call('DEL', KEYS[1])
"""

# Sets the snapshot KEYS[1] to ARGV[1] (with an EX of ARGV[3] seconds unless it is '0')
# unless the instance's claim KEYS[2] names another incarnation than ARGV[2]: 1 where it
# was set, 0 where refused. The claim's EX is renewed with the snapshot's.
_SET_IF_CLAIMED = """
local claim = redis.call('GET', KEYS[2])
if claim and claim ~= ARGV[2] then return 0 end
if ARGV[3] == '0' then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
  if claim then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
end
return 1
"""

# Deletes the claim KEYS[1] where it names ARGV[1]: 1 where it went, 0 where not.
_DELETE_CLAIM_IF_MINE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def claim_key(stream: str, instance_id: str) -> str:
    """The key naming the incarnation that publishes ``instance_id`` on ``stream`` now
    (its claim: ``RedisStreamPublisher``). Pure."""
    return f"{stream}:incarnation:{instance_id}"


def _check_stream(stream: object) -> None:
    if not isinstance(stream, str) or not stream:
        raise ValueError(f"stream must be a non-empty str, got {short_repr(stream)}")


def _connect(url: str) -> Any:
    try:
        import redis
    except ImportError:
        raise ImportError(
            "Redis event streams need redis-py: pip install 'kvtier[redis]'") from None
    return redis.Redis.from_url(url)


class RedisStreamPublisher:
    """Publishes each batch as one entry of the stream ``stream`` (``XADD MAXLEN ~ maxlen``).

    Entry fields: ``i`` the instance id, ``e`` :func:`encode_events`, ``g`` on a goodbye
    only (``forget``: no events), ``n`` the publisher's
    ``incarnation`` (by default a random id per publisher: a restarted process is a new
    one, which subscribers see as a restart even where its seq 0 was trimmed; publishers
    of one engine's events on several connections share one; an entry
    without ``n``, of an earlier publisher, is read by its seq alone). Snapshots go to the
    key ``<stream>:snapshot:<instance>``, naming the incarnation too (a subscriber refuses
    one of another incarnation than the entries it read: a late write of an old
    process); a batch starting at seq 0 (a new incarnation of
    the instance) deletes it, so that no subscriber resyncs from the blocks of before a
    restart (where that batch failed, with the next batch of the instance that is sent).
    A snapshot key lives ``snapshot_ttl_s`` (None: until overwritten), and goes when its
    instance retires (``forget``): a key per instance id ever seen stayed in Redis.
    Both deletes are conditional (one Lua script, ``EVAL``): a snapshot naming another
    incarnation stays (subscribers refuse it where they read another's entries), one
    naming this one or none (of a publisher older than ``p``) goes. NOTE: an old process
    retiring, or retrying its failed seq 0 delete, deleted the new one's snapshot: a
    stale subscriber waited for another. A crashed process's snapshot stays until the
    new one writes its own, or ``snapshot_ttl_s``.
    Subscribers that missed events add the instance id to the stream ``<stream>:resync``,
    which :meth:`resync_requests` reads.

    Two processes may publish one instance id (a restarted engine re-using its name while
    the old process still publishes): the later claims it. With its first batch of the
    instance, in one transaction, a publisher sets the claim key
    ``<stream>:incarnation:<instance>`` (``claim_key``) to its incarnation, once; a
    snapshot is written only where no other incarnation holds that claim (one Lua script:
    refused ones counted in ``num_refused_snapshots``), and subscribers that read an
    incarnation new to them follow the claim (``RedisStreamSubscriber``). NOTE: the old
    process's snapshot, written after the new one's (both answering one resync request),
    overwrote it: subscribers reading the new entries refused it and waited, for ever
    where the old one answered last each time. A claim lives as its snapshot key does
    (``snapshot_ttl_s``, renewed with each snapshot; none: until ``forget``); where it is
    gone, snapshots are written unconditionally, as before claims.
    """

    def __init__(self, url: str, stream: str = "kvtier:events", maxlen: int = 100_000,
                 incarnation: str | None = None,
                 snapshot_ttl_s: float | None = None) -> None:
        # NOTE: Redis refuses a MAXLEN past 2**63 - 1: every XADD failed, counted, silently.
        if type(maxlen) is not int or not 1 <= maxlen <= MAX_BUFFER:
            raise ValueError(f"maxlen must be an integer in 1..2**40, got {short_repr(maxlen)}")
        _check_stream(stream)
        if incarnation is None:
            incarnation = uuid.uuid4().hex
        if not is_incarnation(incarnation):
            raise ValueError(f"incarnation must be None or a str of 1..64 characters, got "
                             f"{short_repr(incarnation)}")
        # NOTE: whole seconds, at least 1 (Redis refuses an EX of 0); a subscriber still
        # stale when its key expired asks again (``resync_retry_s``), and is answered.
        self._snapshot_ex = None if snapshot_ttl_s is None else max(1, round(
            check_number("snapshot_ttl_s", snapshot_ttl_s, 1.0, 1e9)))
        self._redis = _connect(url)
        self.stream = stream
        self.maxlen = maxlen
        self.incarnation = incarnation
        # Instances whose seq 0 batch failed: the snapshot of their earlier incarnation
        # may still be under its key, deleted with their next batch sent.
        self._old_snapshots: set[str] = set()
        # Instances this publisher claimed (``claim_key``): claimed once, never again,
        # unless its ``forget`` took its own claim.
        self._claimed: set[str] = set()
        self._resync_id: str | bytes = "0-0"
        self.num_failed_batches = 0  # batches (and snapshots) Redis did not take
        self.num_failed_reads = 0  # resync_requests calls Redis did not answer
        self.num_refused_snapshots = 0  # snapshots refused: another incarnation claims

    def publish(self, instance_id: str, events: Sequence[Event]) -> None:
        """Add ``events`` as one entry. NOTE: with Redis down the batch is lost, counted in
        ``num_failed_batches``, never raised into the serving loop: subscribers see the
        hole in ``seq`` at the next batch and resync from a snapshot. TypeError (nothing
        sent) for a batch that is not a str id and a sequence of events, ValueError for an
        event the wire format cannot carry (``check_batch``)."""
        check_batch(instance_id, events)
        if not events:
            return
        fields = {"i": instance_id, "e": encode_events(events), "n": self.incarnation}
        owes_delete = events[0].seq == 0 or instance_id in self._old_snapshots
        claims = instance_id not in self._claimed
        if owes_delete or claims:
            # NOTE: seq 0 is a new incarnation (a restarted manager, an empty cache): the
            # snapshot its earlier one left under the key goes with the same transaction.
            # A subscriber that saw the restart, then a gap, read that snapshot, which
            # covered every seq of the new stream it had read: it was applied (the blocks
            # of before the restart routed to) and the new events it claimed were skipped.
            # Where that batch failed, the key stayed, and a subscriber that saw the
            # restart by the incarnation applied it: the delete goes with each batch of
            # the instance until one is sent. Only a snapshot naming this incarnation or
            # none goes: an old process's owed delete took the new one's snapshot.
            # NOTE: the claim goes with the first entry, so that no subscriber reads an
            # entry of this incarnation before its claim (a later claim is a later one's).
            pipe = self._redis.pipeline(transaction=True)
            if claims:
                pipe.set(claim_key(self.stream, instance_id), self.incarnation,
                         **self._ex_option())
            if owes_delete:
                self._delete_own_snapshot(instance_id, pipe)
            pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
            sent = _attempt(pipe.execute)
            if sent is None:
                if owes_delete:
                    self._old_snapshots.add(instance_id)
            else:
                self._old_snapshots.discard(instance_id)
                self._claimed.add(instance_id)
        else:
            sent = _attempt(self._redis.xadd, self.stream, fields, maxlen=self.maxlen,
                            approximate=True)
        if sent is None:
            self.num_failed_batches += 1

    def _snapshot_key(self, instance_id: str) -> str:
        return f"{self.stream}:snapshot:{instance_id}"

    def _ex_option(self) -> dict[str, int]:
        return {} if self._snapshot_ex is None else {"ex": self._snapshot_ex}

    def _delete_own_snapshot(self, instance_id: str, client: Any) -> Any:
        """Deletes ``instance_id``'s snapshot key on ``client`` (the connection or a
        pipeline) unless it names another incarnation (``_DELETE_UNLESS_OTHERS``): 1 where
        it went, 0 where not. Raises what redis-py raises: callers ``_attempt`` it."""
        return client.eval(_DELETE_UNLESS_OTHERS, 1, self._snapshot_key(instance_id),
                           json.dumps(self.incarnation))

    def publish_snapshot(self, snapshot: Snapshot) -> None:
        """Store ``snapshot``, named by this publisher's ``incarnation`` (a subscriber
        refuses one of another incarnation than the stream it reads), unless another
        incarnation claims the instance (``num_refused_snapshots``); publish every event
        before ``next_seq`` first. A snapshot Redis does not take is counted in
        ``num_failed_batches``; a stale subscriber asks again. TypeError unless it is a
        :class:`Snapshot`, ValueError if it names another incarnation, storing nothing."""
        if not isinstance(snapshot, Snapshot):
            raise TypeError(f"snapshot must be a Snapshot, got {short_repr(snapshot)}")
        if snapshot.incarnation is None:
            snapshot = replace(snapshot, incarnation=self.incarnation)
        elif snapshot.incarnation != self.incarnation:
            raise ValueError(f"snapshot.incarnation must be None or this publisher's "
                             f"{self.incarnation!r}, got {short_repr(snapshot.incarnation)}")
        instance_id = snapshot.instance_id
        written = _attempt(self._redis.eval, _SET_IF_CLAIMED, 2,
                           self._snapshot_key(instance_id), claim_key(self.stream, instance_id),
                           encode_snapshot(snapshot), self.incarnation,
                           str(self._snapshot_ex or 0))
        if written is None:
            self.num_failed_batches += 1
        elif not written:
            self.num_refused_snapshots += 1  # another incarnation claims the instance
        else:
            self._old_snapshots.discard(instance_id)  # overwritten

    def forget(self, instance_id: str) -> None:
        """``instance_id`` retires for good (its engine shuts down): a final entry says so
        (its goodbye: ``g`` set, no events), on which subscribers forget the instance at
        once (``InstanceGone``), where this is the incarnation they read; its snapshot key
        goes, so that Redis holds none per instance id ever seen, unless the snapshot names
        another incarnation (a new process of the instance already wrote its own: it
        stays), and so does its claim, where it is still this publisher's. One
        transaction: with Redis down, none of it, counted in ``num_failed_batches``
        (subscribers forget the instance at their ``forget_after_s``, ``snapshot_ttl_s``
        bounds the key). TypeError, changing nothing, unless it is a str.

        NOTE: without a goodbye, subscribers held a retired instance, routed to, until
        their ``forget_after_s`` (an hour by default). A subscriber older than ``g`` reads
        the goodbye as an empty batch: nothing, as before."""
        if not isinstance(instance_id, str):
            raise TypeError(f"instance_id must be a str, got {short_repr(instance_id)}")
        self._old_snapshots.discard(instance_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.xadd(self.stream, {"i": instance_id, "e": "[]", "n": self.incarnation, "g": "1"},
                  maxlen=self.maxlen, approximate=True)
        self._delete_own_snapshot(instance_id, pipe)
        pipe.eval(_DELETE_CLAIM_IF_MINE, 1, claim_key(self.stream, instance_id),
                  self.incarnation)
        done = _attempt(pipe.execute)
        if done is None:
            self.num_failed_batches += 1
        elif done[-1]:
            self._claimed.discard(instance_id)  # publishing again claims it again

    def resync_requests(self) -> set[str]:
        """Instance ids that subscribers asked a snapshot of since the last call (the first
        call reads every request still in the capped resync stream). With Redis down: none,
        counted in ``num_failed_reads``; the requests are read at a later call."""
        reply = _attempt(self._redis.xread, {f"{self.stream}:resync": self._resync_id},
                         count=10_000)
        if reply is None:
            self.num_failed_reads += 1
        asked: set[str] = set()
        for entry_id, entry in stream_entries(reply):
            self._resync_id = entry_id
            instance_id = field(entry, "i")
            if instance_id is not None:  # a malformed request is skipped
                asked.add(instance_id)
        return asked


class RedisStreamSubscriber:
    """Reads a :class:`RedisStreamPublisher` stream from the last id read (``XREAD``).

    Gaps (the stream was trimmed past us, or we started late) make an instance stale: a
    resync request is added and the stored snapshot is used once it covers what was read
    (a stream trimmed past the last entry read, to nothing, or deleted makes every instance
    read stale at once, ``num_trims``: which instances' entries went is not known; one
    deleted or made again behind the last id read is read again from its start).
    A malformed entry is skipped and counted (``num_malformed_entries``); its instance, when
    readable, is reported lost (a gap) and resynced; the entries after it are delivered. A
    malformed snapshot is skipped and counted (``num_malformed_snapshots``); the instance
    stays stale until a sound one comes. An instance still stale ``resync_retry_s`` seconds
    after its request is asked for again (``num_resync_requests`` counts them): a request
    is one entry of a capped stream, which a trim or a restarted server may lose before
    the publisher reads it. An entry of an incarnation new to the subscriber is read as
    the instance's only where the instance's claim (``claim_key``, one GET) names it or
    none: one of another is skipped as replaced (``SeqTracker.supersede``).
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
                 clock: Callable[[], float] = time.monotonic) -> None:
        _check_stream(stream)
        check_start_id(start_id)
        self.resync_retry_s = resync_retry_s
        self.forget_after_s = check_forget_after(forget_after_s)
        self._clock = clock
        self._redis = _connect(url)
        self.stream = stream
        self.last_id: str | bytes = start_id
        self.tracker = SeqTracker(clock=clock)
        self._gone: list[Update] = []  # instances forgotten since the last poll
        self.num_malformed_entries = 0
        self.num_malformed_snapshots = 0
        self.num_resync_requests = 0
        self.num_trims = 0  # polls that found the stream trimmed past what was read
        # Stale instances asked for, with when (on ``clock``) the request was added.
        self._asked: dict[str, float] = {}
        # Instances forgotten with entries maybe still unread: the stream's last id then.
        self._forgotten: dict[str, tuple[int, int]] = {}

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
        info = None if xinfo_stream is None else _attempt(xinfo_stream, self.stream)
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
        self._check_trimmed(out)
        reply = _attempt(self._redis.xread, {self.stream: self.last_id}, count=count,
                         block=block_ms or None)
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
            if _attempt(self._redis.xadd, f"{self.stream}:resync", {"i": instance_id},
                        maxlen=1000, approximate=True) is not None:
                self._asked[instance_id] = now
                self.num_resync_requests += 1
        return out

    def _check_trimmed(self, out: list[Update]) -> None:
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
        one made again behind ``last_id`` was read from there: never an entry again."""
        xinfo_stream = getattr(self._redis, "xinfo_stream", None)
        read = stream_id(self.last_id)
        if xinfo_stream is None or read is None or read == (0, 0):
            return  # a client without XINFO, or nothing read yet (a hole shows as any other)
        info = _attempt(xinfo_stream, self.stream)
        if not isinstance(info, dict):  # Redis down, or no such stream
            exists = getattr(self._redis, "exists", None)
            if self.tracker.streams and exists is not None \
                    and _attempt(exists, self.stream) == 0:
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
        read from its start (what was forgotten with it is forgotten)."""
        self.num_trims += 1
        for instance_id in list(self.tracker.streams):
            self.tracker.lose(instance_id, out)
        if read_again:
            self.last_id = "0-0"
            self._forgotten.clear()

    def _receive(self, entry_id: object, entry: object, out: list[Update]) -> None:
        instance_id = field(entry, "i")
        if instance_id in self._forgotten:
            entry_seq = stream_id(entry_id)
            if entry_seq is not None and entry_seq <= self._forgotten[instance_id]:
                return  # added before its instance left
        incarnation = field(entry, "n") or None
        if instance_id is not None and incarnation is not None \
                and not self.tracker.knows(instance_id, incarnation):
            # NOTE: an incarnation new to this subscriber is taken as the instance's
            # current one only where its claim does not name another (``claim_key``): the
            # incarnation read last was taken for it, and an old process's late entry,
            # read after the new one's, replaced the new one.
            claim = _attempt(self._redis.get, claim_key(self.stream, instance_id))
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
            self.num_malformed_entries += 1
            if instance_id is not None:
                self.tracker.lose_entry(instance_id, incarnation, out)
            return
        # decoded: checked; an entry without a readable incarnation is read by its seq alone
        self.tracker.receive_checked(instance_id, events, out, incarnation)

    def _try_snapshots(self, out: list[Update]) -> None:
        for instance_id in self.tracker.stale_instances():
            raw = _attempt(self._redis.get, f"{self.stream}:snapshot:{instance_id}")
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
