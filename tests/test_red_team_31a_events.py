"""Red team 31a: the KV event streams without a Redis server: the round trips of a poll,
a replayed first entry, an incarnation's claim kept alive, and entries an adversary wrote.

Every count here is exact; each test failed before its fix.
"""

from __future__ import annotations

import pytest

from fake_clock import FakeClock
from fake_stream_redis import FakePipeline, FakeRedis
from kvtier import stream_client, stream_publisher
from kvtier.event_codec import encode_events
from kvtier.events import BlockStored
from kvtier.publisher import (
    EventBatch,
    InstanceLost,
    RedisStreamPublisher,
    RedisStreamSubscriber,
    SeqTracker,
    Snapshot,
    Update,
)
from kvtier.tier import Tier

G = Tier.GPU


def stored(seq: int, h: int) -> BlockStored:
    """A BlockStored event of one 4-token block."""
    return BlockStored(seq, h, None, G, 4, None, (1, 2, 3, 4), None, None)


class CountingRedis(FakeRedis):
    """``FakeRedis`` that counts its round trips: one a command, one a pipeline's EXEC."""

    def __init__(self) -> None:
        super().__init__()
        self.num_round_trips = 0
        self.num_xinfo = 0

    def _check(self) -> None:
        self.num_round_trips += 1
        super()._check()

    def xinfo_stream(self, stream: str) -> dict[str, object]:
        self.num_xinfo += 1
        return super().xinfo_stream(stream)

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return CountingPipeline(self)


class CountingPipeline(FakePipeline):
    """A pipeline of ``CountingRedis``: its commands one round trip together."""

    client: CountingRedis

    def execute(self, raise_on_error: bool = True) -> list[object]:
        trips = self.client.num_round_trips
        replies = super().execute(raise_on_error)
        self.client.num_round_trips = trips + 1
        return replies


@pytest.fixture
def counting_redis(monkeypatch: pytest.MonkeyPatch) -> CountingRedis:
    """The event stream's commands in memory, counted, in place of every client made."""
    pytest.importorskip("redis")  # the publisher catches its errors
    client = CountingRedis()
    monkeypatch.setattr(stream_client, "connect", lambda url, **_: client)
    return client


def test_a_poll_after_entries_is_one_round_trip(counting_redis: CountingRedis) -> None:
    """Ten polls of a stream with one entry added before each: each poll reads its entry
    in one round trip (XINFO and XREAD pipelined), the trim check still made every poll.
    Before, XINFO was a round trip of its own before each XREAD: 2 a poll."""
    publisher = RedisStreamPublisher("redis://fake")
    subscriber = RedisStreamSubscriber("redis://fake")
    publisher.publish("a", [stored(0, 100)])
    assert subscriber.poll() == [EventBatch("a", [stored(0, 100)])]
    per_poll = []
    for seq in range(1, 11):
        publisher.publish("a", [stored(seq, 100 + seq)])
        before = counting_redis.num_round_trips, counting_redis.num_xinfo
        assert subscriber.poll() == [EventBatch("a", [stored(seq, 100 + seq)])]
        per_poll.append((counting_redis.num_round_trips - before[0],
                         counting_redis.num_xinfo - before[1]))
    assert per_poll == [(1, 1)] * 10


def test_a_trim_is_seen_in_the_poll_that_reads_past_it(counting_redis: CountingRedis) -> None:
    """Instance a publishes 0, instance b 0..5 and the stream is trimmed to b's last two
    entries: the next poll loses a (stale, its BlockStored maybe trimmed) before it reads
    b's entries, in one round trip, as the check before the read saw it."""
    pub_a = RedisStreamPublisher("redis://fake")
    pub_b = RedisStreamPublisher("redis://fake")
    subscriber = RedisStreamSubscriber("redis://fake")
    pub_a.publish("a", [stored(0, 1)])
    pub_b.publish("b", [stored(0, 10)])
    assert len(subscriber.poll()) == 2
    for seq in range(1, 6):
        pub_b.publish("b", [stored(seq, 10 + seq)])
    counting_redis.xtrim("kvtier:events", 2)
    out = subscriber.poll()
    assert subscriber.num_trims == 1
    assert [type(u).__name__ for u in out][:2] == ["InstanceLost", "InstanceLost"]
    assert subscriber.tracker.stale_instances() == ["a", "b"]


def test_a_replayed_first_entry_is_a_duplicate_not_a_restart() -> None:
    """Instance a's entries seq 0..3 of incarnation "p1" are read, then its first entry
    (seq 0, "p1") is delivered again, then seq 4: the replay is skipped as a duplicate
    (one event), no restart, no gap, and seq 4 is read. Before, the replay was a restart:
    InstanceLost(a, 4, 0), every block of a forgotten, and seq 4 a gap (stale, a resync
    asked for)."""
    tracker = SeqTracker()
    out: list[Update] = []
    for seq in range(4):
        tracker.receive_checked("a", [stored(seq, 100 + seq)], out, "p1")
    out.clear()
    tracker.receive_checked("a", [stored(0, 100)], out, "p1")
    tracker.receive_checked("a", [stored(4, 104)], out, "p1")
    assert out == [EventBatch("a", [stored(4, 104)])]
    assert (tracker.num_restarts, tracker.num_gaps, tracker.num_skipped) == (0, 0, 1)
    assert tracker.stale_instances() == []
    tracker.receive_checked("a", [stored(0, 200)], out, "p2")  # a new incarnation
    assert out[1:] == [InstanceLost("a", 5, 0), EventBatch("a", [stored(0, 200)])]
    assert tracker.num_restarts == 1


def test_a_manager_restarted_behind_one_publisher_names_a_new_incarnation(
        counting_redis: CountingRedis) -> None:
    """A publisher sends a's seq 0..2, then a's manager restarts behind the same publisher
    (seq 0 again): that batch names a new incarnation and claims it, so the subscriber
    reads a restart (InstanceLost(a, 3, 0)) and the new seq 0, and the new incarnation's
    snapshot is taken. A replay of the first entry (the same fields added again) is a
    duplicate: nothing. Before, the restart's seq 0 named the old incarnation."""
    publisher = RedisStreamPublisher("redis://fake")
    subscriber = RedisStreamSubscriber("redis://fake")
    for seq in range(3):
        publisher.publish("a", [stored(seq, 100 + seq)])
    assert len(subscriber.poll()) == 3
    first = counting_redis.streams["kvtier:events"][0][1]
    counting_redis.xadd("kvtier:events", {k.decode(): v for k, v in first.items()})
    assert subscriber.poll() == []
    publisher.publish("a", [stored(0, 900)])
    assert subscriber.poll() == [InstanceLost("a", 3, 0), EventBatch("a", [stored(0, 900)])]
    assert subscriber.tracker.num_restarts == 1
    new = counting_redis.streams["kvtier:events"][-1][1][b"n"].decode()
    assert new != publisher.incarnation and new == publisher.incarnation_of("a")
    assert counting_redis.keys["{kvtier:events}:incarnation:a"] == new.encode()
    publisher.publish_snapshot(Snapshot("a", 1, frozenset(), incarnation=None))
    assert new.encode() in counting_redis.keys["{kvtier:events}:snapshot:a"]


class ExpiringRedis(CountingRedis):
    """``CountingRedis`` whose keys set with an EX expire on ``clock``."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.expires_s: dict[str, float] = {}

    def _check(self) -> None:
        for key, at in list(self.expires_s.items()):
            if self.clock.now >= at:
                self.keys.pop(key, None)
                del self.expires_s[key]
        super()._check()

    def set(self, key: str, value: object, ex: int | None = None) -> bool:
        self.expires_s.pop(key, None)
        if ex is not None:
            self.expires_s[key] = self.clock.now + ex
        return super().set(key, value, ex=ex)


def test_a_publisher_that_never_snapshots_keeps_its_claim(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A publisher with a 60 s snapshot TTL publishes a batch every 10 s for 300 s and never
    snapshots: its claim is renewed with a batch every 20 s (15 renewals, not one a batch)
    and still names it; an old process's late snapshot is refused. Before, the claim
    expired at 60 s and the old process's snapshot was stored (subscribers follow it)."""
    pytest.importorskip("redis")
    clock = FakeClock()
    client = ExpiringRedis(clock)
    monkeypatch.setattr(stream_client, "connect", lambda url, **_: client)
    publisher = RedisStreamPublisher("redis://fake", incarnation="p1", snapshot_ttl_s=60,
                                     clock=clock)
    old = RedisStreamPublisher("redis://fake", incarnation="p0", snapshot_ttl_s=60,
                               clock=clock)
    claim = "{kvtier:events}:incarnation:a"
    num_renewals = 0
    evaluate = client.eval

    def counted(script: str, numkeys: int, *args: str) -> int:
        nonlocal num_renewals
        num_renewals += script == stream_publisher._RENEW_CLAIM
        return evaluate(script, numkeys, *args)

    monkeypatch.setattr(client, "eval", counted)
    for seq in range(31):
        clock.now = 10.0 * seq
        publisher.publish("a", [stored(seq, 100 + seq)])
        assert client.keys.get(claim) == b"p1", clock.now
    assert num_renewals == 15
    old.publish_snapshot(Snapshot("a", 1, frozenset(), incarnation=None))
    assert old.num_refused_snapshots == 1
    assert "{kvtier:events}:snapshot:a" not in client.keys


def test_a_claim_kept_through_a_failed_forget_is_renewed_when_published_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Instance a's ``forget`` fails (Redis down), so its claim (60 s EX) stays; a is then
    published again every 10 s until 300 s and never snapshots. The claim is renewed with
    the first batch after the forget and every 20 s after, and names p1 throughout.
    Before, its renewal time went with the forget and the claim was read as set just
    then, never renewed: it expired 60 s after its last renewal (at 80 s)."""
    pytest.importorskip("redis")
    clock = FakeClock()
    client = ExpiringRedis(clock)
    monkeypatch.setattr(stream_client, "connect", lambda url, **_: client)
    publisher = RedisStreamPublisher("redis://fake", incarnation="p1", snapshot_ttl_s=60,
                                     clock=clock)
    claim = "{kvtier:events}:incarnation:a"
    for seq in range(3):
        clock.now = 10.0 * seq
        publisher.publish("a", [stored(seq, 100 + seq)])
    clock.now = 25.0
    client.down = 1
    publisher.forget("a")
    assert publisher.num_failed_batches == 1
    assert client.keys.get(claim) == b"p1"
    for seq in range(3, 31):
        clock.now = 10.0 * seq
        publisher.publish("a", [stored(seq, 100 + seq)])
        assert client.keys.get(claim) == b"p1", clock.now


@pytest.mark.parametrize("incarnation", ["x" * 65, b"\xff\xfe", ""])
def test_an_entry_naming_no_incarnation_the_wire_carries_is_malformed(
        counting_redis: CountingRedis, incarnation: str | bytes) -> None:
    """Instance a's publisher "p1" sent seq 0..2 and its claim expired (or it is of an
    older publisher). An entry for a naming an incarnation no publisher writes (65
    characters, bytes that are no UTF-8, empty) is malformed: counted, a hole of a (stale,
    resynced), p1 kept as its publisher, and p1's next entry read. Before, 65 characters
    were taken for a new incarnation (a restart, p1 retired: each of its later entries
    skipped, num_other_incarnation), and the others were read as naming none."""
    publisher = RedisStreamPublisher("redis://fake", incarnation="p1")
    subscriber = RedisStreamSubscriber("redis://fake")
    for seq in range(3):
        publisher.publish("a", [stored(seq, 100 + seq)])
    assert len(subscriber.poll()) == 3
    del counting_redis.keys["{kvtier:events}:incarnation:a"]
    counting_redis.xadd("kvtier:events", {"i": "a", "e": encode_events([stored(3, 103)]),
                                          "n": incarnation})
    out = subscriber.poll()
    assert out == [InstanceLost("a", 3, None)]
    assert subscriber.num_malformed_entries == 1
    assert subscriber.tracker.num_restarts == 0
    stream = subscriber.tracker.streams["a"]
    assert (stream.incarnation, stream.retired) == ("p1", ())
    publisher.publish_snapshot(Snapshot("a", 4, frozenset()))
    publisher.publish("a", [stored(4, 104)])
    assert subscriber.poll() == [Snapshot("a", 4, frozenset(), "p1"),
                                 EventBatch("a", [stored(4, 104)])]
