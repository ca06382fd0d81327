"""KV events to Redis Streams (extra ``redis``): :class:`RedisStreamPublisher` adds each
batch as one stream entry, claims its instances, stores their snapshots under their own
keys, says goodbye when one retires, and reads the resync requests of subscribers
(``kvtier.event_stream`` reads the stream).

A Redis fault is a lost batch a resync repairs (counted), never an exception in the
serving loop. May change: its stream, snapshot and claim keys.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kvtier import stream_client
from kvtier.event_codec import (
    Snapshot,
    encode_event_batches,
    encode_snapshot_within,
    is_incarnation,
)
from kvtier.event_updates import MAX_BUFFER, MAX_INSTANCE_ID_CHARS, check_batch
from kvtier.events import Event
from kvtier.remote.options import check_number
from kvtier.sequence import short_repr
from kvtier.stream_client import (
    attempt,
    check_cluster,
    check_stream,
    claim_key,
    legacy_claim_key,
    legacy_snapshot_key,
    run_script,
    snapshot_key,
)
from kvtier.stream_entries import field, stream_entries

__all__ = ["RedisStreamPublisher"]

# Forgotten instances a publisher remembers (``_Forgotten``), the latest kept. NOTE: as
# many as a subscriber remembers of forgotten instances (``SeqTracker.gone``): one
# published again past both is read as new by either name.
_MAX_FORGOTTEN = 4096


@dataclass(frozen=True, slots=True)
class _Forgotten:
    """What a publisher keeps of an instance it forgot, to name it as before if it is
    published again: the incarnation it restarted to (None: the publisher's), and whether
    its claim stayed (another incarnation's, or Redis was down): not claimed back."""

    restarted: str | None
    claim_stayed: bool


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

# Sets the claim KEYS[1] to ARGV[1] with an EX of ARGV[2] seconds where it names ARGV[1]
# or none (it expired): 1 where set, 0 where another incarnation holds it.
_RENEW_CLAIM = """
local claim = redis.call('GET', KEYS[1])
if claim and claim ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""

# Deletes the claim KEYS[1] where it names ARGV[1]: 1 where it went, 0 where not.
_DELETE_CLAIM_IF_MINE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisStreamPublisher:
    """Publishes each batch as one entry of the stream ``stream`` (``XADD MAXLEN ~ maxlen``).

    Entry fields: ``i`` the instance id, ``e`` :func:`encode_events` (at most
    ``MAX_EVENT_BATCH_BYTES``: a longer batch is cut into entries), ``g`` on a goodbye
    only (``forget``: no events), ``n`` the publisher's
    ``incarnation`` (by default a random id per publisher: a restarted process is a new
    one, which subscribers see as a restart even where its seq 0 was trimmed; publishers
    of one engine's events on several connections share one; an entry
    without ``n``, of an earlier publisher, is read by its seq alone). Snapshots go to the
    key ``{<stream>}:snapshot:<instance>`` (``snapshot_key``: every key of a stream in its
    hash slot, so that ``cluster=True``, a ``RedisCluster`` client, runs each script and
    transaction on one node), naming the incarnation too (a subscriber refuses
    one of another incarnation than the entries it read: a late write of an old
    process); a batch starting at seq 0 (a new incarnation of
    the instance) deletes it, so that no subscriber resyncs from the blocks of before a
    restart (where that batch failed, with the next batch of the instance that is sent).
    A batch from seq 0 of an instance this publisher sent batches of (its manager
    restarted behind it) names a new incarnation of the instance from then on
    (``incarnation_of``) and claims it: subscribers read a seq 0 of the incarnation
    they read already as a duplicate. A snapshot key lives ``snapshot_ttl_s`` (None:
    until overwritten), and goes when its
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
    ``{<stream>}:incarnation:<instance>`` (``claim_key``) to its incarnation, once; a
    snapshot is written only where no other incarnation holds that claim (one Lua script:
    refused ones counted in ``num_refused_snapshots``), and subscribers that read an
    incarnation new to them follow the claim (``RedisStreamSubscriber``). NOTE: the old
    process's snapshot, written after the new one's (both answering one resync request),
    overwrote it: subscribers reading the new entries refused it and waited, for ever
    where the old one answered last each time. A claim lives as its snapshot key does
    (``snapshot_ttl_s``, renewed with each snapshot, and with a batch once a third of
    it passed on ``clock``, where no other incarnation took it; none: until ``forget``);
    where it is gone, snapshots are written unconditionally, as before claims.
    """

    def __init__(self, url: str, stream: str = "kvtier:events", maxlen: int = 100_000,
                 incarnation: str | None = None,
                 snapshot_ttl_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic, cluster: bool = False) -> None:
        # NOTE: Redis refuses a MAXLEN past 2**63 - 1: every XADD failed, counted, silently.
        if type(maxlen) is not int or not 1 <= maxlen <= MAX_BUFFER:
            raise ValueError(f"maxlen must be an integer in 1..2**40, got {short_repr(maxlen)}")
        check_stream(stream)
        check_cluster(stream, cluster)
        if incarnation is None:
            incarnation = uuid.uuid4().hex
        if not is_incarnation(incarnation):
            raise ValueError(f"incarnation must be None or a str of 1..64 characters, got "
                             f"{short_repr(incarnation)}")
        # NOTE: whole seconds, at least 1 (Redis refuses an EX of 0); a subscriber still
        # stale when its key expired asks again (``resync_retry_s``), and is answered.
        self._snapshot_ex = None if snapshot_ttl_s is None else max(1, round(
            check_number("snapshot_ttl_s", snapshot_ttl_s, 1.0, 1e9)))
        self._redis = stream_client.connect(url, cluster=cluster)
        self.stream = stream
        self.maxlen = maxlen
        self.incarnation = incarnation
        # Instances whose seq 0 batch failed: the snapshot of their earlier incarnation
        # may still be under its key, deleted with their next batch sent.
        self._old_snapshots: set[str] = set()
        # Instances this publisher claimed (``claim_key``): claimed once, never again,
        # unless its ``forget`` took its own claim.
        self._claimed: set[str] = set()
        # When (on ``clock``) each claim's EX was last set or renewed (with ``snapshot_ttl_s``).
        self._claim_set_s: dict[str, float] = {}
        self._clock = clock
        # Instances a batch was sent of, and those restarted since (a batch from seq 0
        # again): the incarnation each names from then on (``incarnation_of``).
        self._published: set[str] = set()
        self._restarted: dict[str, str] = {}
        # Restarted instances whose snapshot of before (naming this incarnation) is owed
        # a delete: the incarnation it names.
        self._owed_by: dict[str, str] = {}
        # Instances forgotten since that restarted or whose claim stayed (the last
        # ``_MAX_FORGOTTEN``): what publishing one again takes back.
        self._forgotten: dict[str, _Forgotten] = {}
        # Instances whose keys under the names of before hash tags are owed a delete.
        self._legacy_owed: set[str] = set()
        self._resync_id: str | bytes = "0-0"
        self.num_failed_batches = 0  # batches (and snapshots) Redis did not take
        self.num_failed_reads = 0  # resync_requests calls Redis did not answer
        self.num_refused_snapshots = 0  # snapshots refused: another incarnation claims
        self.num_malformed_requests = 0  # resync requests of no instance id one may publish
        self.num_cut_snapshots = 0  # snapshots past MAX_SNAPSHOT_BYTES, cut to fit
        self.num_blocks_left_out = 0  # the blocks those left out

    def publish(self, instance_id: str, events: Sequence[Event]) -> None:
        """Add ``events`` as one entry (as several, in one transaction, where their text is
        past ``MAX_EVENT_BATCH_BYTES``: ``encode_event_batches``). NOTE: with Redis down the
        batch is lost, counted in ``num_failed_batches``, never raised into the serving
        loop: subscribers see the hole in ``seq`` at the next batch and resync from a
        snapshot. TypeError (nothing sent) for a batch that is not a str id and a sequence
        of events, ValueError for an event the wire format cannot carry (``check_batch``),
        or one whose own text is past ``MAX_EVENT_BATCH_BYTES``."""
        check_batch(instance_id, events)
        if not events:
            return
        # NOTE: a batch past what a subscriber reads of one entry (MAX_EVENT_BATCH_BYTES)
        # was one entry, which every subscriber now counts malformed: it goes as several,
        # in one transaction, every seq in order.
        texts = encode_event_batches(events)
        back = self._forgotten.pop(instance_id, None)
        if back is not None and back.restarted is not None:
            self._restarted[instance_id] = back.restarted
        if back is not None and back.claim_stayed:
            self._claimed.add(instance_id)  # renewed, not taken back
        if events[0].seq == 0 and instance_id in self._published:
            # NOTE: a manager restarted behind this publisher counts from seq 0 again under
            # the same incarnation, which subscribers read as the first entry delivered
            # twice (a duplicate, skipped): its instance names a new one from now on, and
            # claims it with this batch.
            self._owed_by[instance_id] = self.incarnation_of(instance_id)
            self._restarted[instance_id] = uuid.uuid4().hex
            self._published.discard(instance_id)
            self._claimed.discard(instance_id)
        incarnation = self.incarnation_of(instance_id)
        entries = [{"i": instance_id, "e": text, "n": incarnation} for text in texts]
        owes_delete = events[0].seq == 0 or instance_id in self._old_snapshots
        claims = instance_id not in self._claimed
        now = self._clock()
        # NOTE: a claim lived ``snapshot_ttl_s`` from its last snapshot: a publisher that
        # never snapshots lost it, and an old process's late entry or snapshot was taken
        # for the instance's (subscribers follow the claim). Renewed with a batch, in its
        # transaction, once a third of its EX passed: an EVAL about every ttl/3, no more.
        # A claim of unknown age (kept through a ``forget`` that failed, its time dropped
        # with the instance) is renewed at once. NOTE: it was read as set just now, so it
        # was never renewed and expired ``snapshot_ttl_s`` after its last renewal.
        renews = (not claims and self._snapshot_ex is not None
                  and now - self._claim_set_s.get(instance_id, -math.inf)
                  >= self._snapshot_ex / 3)
        if owes_delete or claims or renews or len(entries) > 1:
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
            def send(pipe: Any) -> Any:
                if claims:
                    pipe.set(claim_key(self.stream, instance_id), incarnation,
                             **self._ex_option())
                elif renews:
                    run_script(pipe, _RENEW_CLAIM, 1, claim_key(self.stream, instance_id),
                               incarnation, str(self._snapshot_ex))
                if owes_delete:
                    self._delete_own_snapshot(instance_id, pipe)
                for fields in entries:
                    pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
                return pipe.execute()

            sent = attempt(self._transaction, send)
            if sent is None:
                if owes_delete:
                    self._old_snapshots.add(instance_id)
            else:
                self._old_snapshots.discard(instance_id)
                self._claimed.add(instance_id)
                if claims or renews:
                    self._claim_set_s[instance_id] = now
        else:
            sent = attempt(self._redis.xadd, self.stream, entries[0], maxlen=self.maxlen,
                            approximate=True)
        if sent is None:
            self.num_failed_batches += 1
        else:
            self._published.add(instance_id)
            self._owed_by.pop(instance_id, None)
            if claims or instance_id in self._legacy_owed:
                self._sweep_legacy(instance_id)

    def _sweep_legacy(self, instance_id: str) -> None:
        """Delete ``instance_id``'s snapshot and claim keys under their names of before hash
        tags (``legacy_snapshot_key``, ``legacy_claim_key``), once a claim of this
        publisher's landed; owed again with the next batch where Redis failed.

        NOTE: publishers write only the new names, and subscribers read the old where the
        new is missing: the keys an older publisher left under the old names were never
        deleted (a snapshot without ``snapshot_ttl_s`` stayed for ever). Apart from the
        claim's transaction: on a cluster they are in other slots than the stream's."""
        legacy = [key for key in (legacy_snapshot_key(self.stream, instance_id),
                                  legacy_claim_key(self.stream, instance_id))
                  if key is not None]
        if legacy and attempt(self._redis.delete, *legacy) is None:
            self._legacy_owed.add(instance_id)
        else:
            self._legacy_owed.discard(instance_id)

    def incarnation_of(self, instance_id: str) -> str:
        """The incarnation ``instance_id``'s entries, claim and snapshots name: this
        publisher's, or a new one since its manager restarted (a batch from seq 0 after
        others were sent), kept where it was forgotten since. Pure."""
        restarted = self._restarted.get(instance_id)
        if restarted is None and instance_id in self._forgotten:
            restarted = self._forgotten[instance_id].restarted
        return self.incarnation if restarted is None else restarted

    def _transaction(self, send: Callable[[Any], Any]) -> Any:
        """``send(pipe)`` of a new MULTI/EXEC pipeline: what its ``execute`` answered.
        Raises what redis-py raises (callers ``attempt`` it): a cluster's client, made
        with its first pipeline, raises there where no node answers."""
        return send(self._redis.pipeline(transaction=True))

    def _snapshot_key(self, instance_id: str) -> str:
        return snapshot_key(self.stream, instance_id)

    def _ex_option(self) -> dict[str, int]:
        return {} if self._snapshot_ex is None else {"ex": self._snapshot_ex}

    def _delete_own_snapshot(self, instance_id: str, client: Any) -> Any:
        """Deletes ``instance_id``'s snapshot key on ``client`` (the connection or a
        pipeline) unless it names another incarnation (``_DELETE_UNLESS_OTHERS``): 1 where
        it went, 0 where not. Raises what redis-py raises: callers ``_attempt`` it."""
        own = self._owed_by.get(instance_id) or self.incarnation_of(instance_id)
        return run_script(client, _DELETE_UNLESS_OTHERS, 1, self._snapshot_key(instance_id),
                          json.dumps(own))

    def publish_snapshot(self, snapshot: Snapshot) -> None:
        """Store ``snapshot``, named by this publisher's ``incarnation`` (a subscriber
        refuses one of another incarnation than the stream it reads; a snapshot naming one
        must name ``incarnation_of`` its instance), unless another
        incarnation claims the instance (``num_refused_snapshots``); publish every event
        before ``next_seq`` first. A snapshot Redis does not take is counted in
        ``num_failed_batches``; a stale subscriber asks again. TypeError unless it is a
        :class:`Snapshot`, ValueError if it names another incarnation, storing nothing."""
        if not isinstance(snapshot, Snapshot):
            raise TypeError(f"snapshot must be a Snapshot, got {short_repr(snapshot)}")
        instance_id = snapshot.instance_id
        incarnation = self.incarnation_of(instance_id)
        # NOTE: one naming this publisher's first incarnation was relabelled too: after a
        # restart of the instance behind it, a stale snapshot of the old incarnation was
        # stored as the new one's, and subscribers applied the blocks of before the restart.
        if snapshot.incarnation is None:
            snapshot = replace(snapshot, incarnation=incarnation)
        elif snapshot.incarnation != incarnation:
            raise ValueError(f"snapshot.incarnation must be None or this publisher's "
                             f"{incarnation!r}, got {short_repr(snapshot.incarnation)}")
        # NOTE: a snapshot past MAX_SNAPSHOT_BYTES, which subscribers now refuse, is cut to
        # the blocks that fit, the fastest tier first (``encode_snapshot_within``): the
        # instance is resynced routing to fewer blocks, not stale for ever (asked again
        # every ``resync_retry_s``, each answer refused).
        text, num_left_out = encode_snapshot_within(snapshot)
        written = attempt(run_script, self._redis, _SET_IF_CLAIMED, 2,
                           self._snapshot_key(instance_id), claim_key(self.stream, instance_id),
                           text, incarnation, str(self._snapshot_ex or 0))
        if num_left_out:
            self.num_cut_snapshots += 1
            self.num_blocks_left_out += num_left_out
        if written is None:
            self.num_failed_batches += 1
        elif not written:
            self.num_refused_snapshots += 1  # another incarnation claims the instance
        else:
            self._old_snapshots.discard(instance_id)  # overwritten
            self._owed_by.pop(instance_id, None)
            if instance_id in self._claimed:  # its claim's EX renewed with it
                self._claim_set_s[instance_id] = self._clock()

    def close(self) -> None:
        """Close the connection to Redis (idempotent); ``with RedisStreamPublisher(...)``
        closes it at the block's end. Nothing published is lost: each batch was sent
        when ``publish`` returned."""
        stream_client.close(self._redis)

    def __enter__(self) -> RedisStreamPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def forget(self, instance_id: str) -> None:
        """``instance_id`` retires for good (its engine shuts down): a final entry says so
        (its goodbye: ``g`` set, no events), on which subscribers forget the instance at
        once (``InstanceGone``), where this is the incarnation they read; its snapshot key
        goes, so that Redis holds none per instance id ever seen, unless the snapshot names
        another incarnation (a new process of the instance already wrote its own: it
        stays), and so does its claim, where it is still this publisher's. One
        transaction: with Redis down, none of it, counted in ``num_failed_batches``
        (subscribers forget the instance at their ``forget_after_s``, ``snapshot_ttl_s``
        bounds the key). TypeError, changing nothing, unless it is a str. What the
        publisher kept of the instance goes with it, but (of the last ``_MAX_FORGOTTEN``)
        the incarnation of one restarted (subscribers retired the publisher's first one
        with the restart, and skip an entry naming it) and whether its claim stayed (one
        replaced by another process does not claim it back).

        NOTE: without a goodbye, subscribers held a retired instance, routed to, until
        their ``forget_after_s`` (an hour by default). A subscriber older than ``g`` reads
        the goodbye as an empty batch: nothing, as before."""
        if not isinstance(instance_id, str):
            raise TypeError(f"instance_id must be a str, got {short_repr(instance_id)}")
        self._old_snapshots.discard(instance_id)
        self._published.discard(instance_id)  # its seq 0 again is no restart to tell
        incarnation = self.incarnation_of(instance_id)

        def send(pipe: Any) -> Any:
            pipe.xadd(self.stream, {"i": instance_id, "e": "[]", "n": incarnation, "g": "1"},
                      maxlen=self.maxlen, approximate=True)
            self._delete_own_snapshot(instance_id, pipe)
            run_script(pipe, _DELETE_CLAIM_IF_MINE, 1, claim_key(self.stream, instance_id),
                       incarnation)
            return pipe.execute()

        done = attempt(self._transaction, send)
        if done is None:
            self.num_failed_batches += 1
        # NOTE: a claim (where another incarnation held it or Redis was down), its
        # renewal time, an owed delete and a restart were kept per instance ever
        # forgotten: a publisher of churning ids grew without bound. The delete is owed no
        # more (the goodbye's transaction made it, or ``snapshot_ttl_s`` bounds the key).
        claim_stayed = instance_id in self._claimed and (done is None or not done[-1])
        self._claimed.discard(instance_id)
        self._claim_set_s.pop(instance_id, None)
        self._owed_by.pop(instance_id, None)
        if instance_id in self._legacy_owed:  # tried once more, then left to their TTL
            self._sweep_legacy(instance_id)
            self._legacy_owed.discard(instance_id)
        restarted = self._restarted.pop(instance_id, None)
        if restarted is not None or claim_stayed:
            self._forgotten[instance_id] = _Forgotten(restarted, claim_stayed)
            if len(self._forgotten) > _MAX_FORGOTTEN:
                del self._forgotten[next(iter(self._forgotten))]

    def resync_requests(self) -> set[str]:
        """Instance ids that subscribers asked a snapshot of since the last call (the first
        call reads every request still in the capped resync stream). With Redis down: none,
        counted in ``num_failed_reads``; the requests are read at a later call. A request
        naming no id a batch may carry (none, empty, past ``MAX_INSTANCE_ID_CHARS``) is
        skipped, counted in ``num_malformed_requests``."""
        reply = attempt(self._redis.xread, {f"{self.stream}:resync": self._resync_id},
                         count=10_000)
        if reply is None:
            self.num_failed_reads += 1
        asked: set[str] = set()
        for entry_id, entry in stream_entries(reply):
            self._resync_id = entry_id
            instance_id = field(entry, "i")
            # NOTE: any text was a request: an empty id, or a megabyte's, no subscriber
            # asks for (``check_batch`` refuses both), was handed to the caller to answer.
            if instance_id and len(instance_id) <= MAX_INSTANCE_ID_CHARS:
                asked.add(instance_id)
            else:  # a malformed request is skipped, counted
                self.num_malformed_requests += 1
        return asked
