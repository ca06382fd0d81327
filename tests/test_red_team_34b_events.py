"""Red team 34b: the KV event streams without a Redis server: a cluster's client made at
its first command and its errors taken as faults, a bound on an entry's events, the keys
of before hash tags swept, and the old names read in the same round trip as the new.

Every count here is exact; each test failed before its fix.
"""

from __future__ import annotations

from typing import Any

import pytest

from fake_stream_redis import FakeRedis
from kvtier import stream_client
from kvtier.event_codec import MAX_EVENT_BATCH_BYTES, encode_events
from kvtier.events import BlockStored
from kvtier.publisher import EventBatch, RedisStreamPublisher, RedisStreamSubscriber, Snapshot
from kvtier.tier import Tier

redis = pytest.importorskip("redis")
pytest_plugins = ["shared_fixtures"]

G = Tier.GPU


def stored(seq: int, h: int) -> BlockStored:
    """A BlockStored event of one 4-token block."""
    return BlockStored(seq, h, None, G, 4, None, (1, 2, 3, 4), None, None)


@pytest.mark.parametrize(("url", "problem"), [
    ("redis://:secret@127.0.0.1:1/3", "database 0 only, the url names database 3"),
    ("unix:///tmp/kvtier.sock", "not a unix:// socket"),
    ("http://127.0.0.1:1", "is no Redis URL"),
])
def test_a_cluster_url_redis_py_cannot_use_is_refused_when_made(url: str, problem: str) -> None:
    """A cluster URL naming a database other than 0, a unix socket or another scheme is a
    ValueError naming it (its password hidden) when the publisher or subscriber is made,
    nothing contacted. Before, redis-py's RedisClusterException (no ValueError) for the
    first two, or, the URL sound, its RedisClusterUnreachableError for a cluster down."""
    for make in (RedisStreamPublisher, RedisStreamSubscriber):
        with pytest.raises(ValueError, match=problem) as caught:
            make(url, "ev", cluster=True)
        assert "secret" not in str(caught.value)


def test_a_cluster_client_is_made_at_its_first_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """``connect(cluster=True)`` makes no RedisCluster (none answering: no error); the
    first command makes it, a failure to make it is that command's fault (``attempt``:
    None), and the next command past the wait makes it again: 0 made, then 2 tries, the
    second served.
    ``getattr(client, "xinfo_stream", None)`` makes nothing."""
    from redis.cluster import RedisCluster
    from redis.exceptions import RedisClusterUnreachableError

    made: list[str] = []

    class Served:
        def get(self, key: str) -> bytes:
            return b"v:" + key.encode()

    def from_url(url: str, **options: Any) -> Served:
        made.append(url)
        if len(made) == 1:
            raise RedisClusterUnreachableError("Redis Cluster cannot be connected.")
        return Served()

    monkeypatch.setattr(RedisCluster, "from_url", from_url)
    client = stream_client.connect("redis://127.0.0.1:1", cluster=True)
    assert getattr(client, "xinfo_stream", None) is not None
    assert made == []
    now_s = [0.0]
    client = stream_client.LazyCluster("redis://127.0.0.1:1", clock=lambda: now_s[0])
    assert stream_client.attempt(client.get, "k") is None
    now_s[0] += stream_client.CLUSTER_RETRY_FIRST_S  # 34d: tried again after a wait
    assert stream_client.attempt(client.get, "k") == b"v:k"
    assert made == ["redis://127.0.0.1:1"] * 2
    stream_client.close(client)


class Unreachable:
    """A cluster's client whose every node went down: each command, and each pipeline's
    execute, raises RedisClusterUnreachableError (redis-py's, no RedisError)."""

    def __getattr__(self, name: str) -> Any:
        from redis.exceptions import RedisClusterUnreachableError

        def fail(*args: object, **options: object) -> Any:
            raise RedisClusterUnreachableError("Redis Cluster cannot be connected.")

        return fail


def test_a_cluster_unreachable_is_a_fault_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command raising RedisClusterUnreachableError: a batch, a snapshot and a
    goodbye are 3 failed batches, a resync read 1 failed read, a poll nothing. Before, the
    error escaped ``publish`` (the first call) into the serving loop."""
    monkeypatch.setattr(stream_client, "connect", lambda url, **_: Unreachable())
    pub = RedisStreamPublisher("redis://fake", "ev")
    sub = RedisStreamSubscriber("redis://fake", "ev")
    pub.publish("a", [stored(0, 1)])
    pub.publish_snapshot(Snapshot("a", 1, frozenset({(1, G)})))
    pub.forget("a")
    assert pub.resync_requests() == set()
    assert (pub.num_failed_batches, pub.num_failed_reads) == (3, 1)
    assert sub.poll() == []


def stale_subscriber(fake_redis: FakeRedis, num_instances: int) -> RedisStreamSubscriber:
    """A subscriber that read seq 0 of ``num_instances`` instances, then seq 2 of each (a
    gap): every one stale, no snapshot under either name; the fake's log emptied."""
    pub = RedisStreamPublisher("redis://fake")
    sub = RedisStreamSubscriber("redis://fake", resync_retry_s=3600.0)
    names = [f"i{n}" for n in range(num_instances)]
    for name in names:
        pub.publish(name, [stored(0, 1)])
    sub.poll()
    for name in names:
        pub.publish(name, [stored(2, 3)])
    sub.poll()
    assert sub.tracker.stale_instances() == names
    fake_redis.round_trips.clear()
    return sub


def test_a_poll_reads_every_stale_snapshot_under_both_names_in_one_round_trip(
        fake_redis: FakeRedis) -> None:
    """Three stale instances, no snapshot: a poll (snapshots tried before and after the
    read) asks the new and the old key of each in one pipeline: 2 round trips of snapshot
    reads, the XREAD's 1 (beside its XINFO), none else. Before, a GET per key and per
    name: 12 GETs a poll (3 instances x 2 names x 2 tries)."""
    sub = stale_subscriber(fake_redis, 3)
    assert sub.poll() == []
    assert fake_redis.round_trips == ["pipeline"] * 3
    fake_redis.set("{kvtier:events}:snapshot:i1", '{"i":"i1","n":3,"b":[]}')
    fake_redis.set("kvtier:events:snapshot:i2", '{"i":"i2","n":3,"b":[]}')  # its old name
    fake_redis.round_trips.clear()
    assert [(u.instance_id, type(u).__name__) for u in sub.poll()] == [
        ("i1", "Snapshot"), ("i2", "Snapshot")]
    assert fake_redis.round_trips == ["pipeline"] * 3


def test_a_new_incarnations_claim_is_read_under_both_names_in_one_round_trip(
        fake_redis: FakeRedis) -> None:
    """An entry of an incarnation new to the subscriber, no claim under either name: its
    claim is read in 1 round trip (a pipeline of both GETs) after the XREAD that read it
    (no snapshot read: nothing stale). Before, a GET of the new name, then one of the
    old: 2."""
    sub = RedisStreamSubscriber("redis://fake")
    fake_redis.xadd("kvtier:events", {"i": "a", "e": encode_events([stored(0, 1)]),
                                      "n": "p1"})
    assert sub.poll() == [EventBatch("a", [stored(0, 1)])]
    assert fake_redis.round_trips == ["xadd", "xread", "pipeline"]


def cleared_batch(num_events: int, first_seq: int = 0) -> str:
    """An ``e`` field of ``num_events`` AllBlocksCleared events, seqs from ``first_seq``:
    each sound, the whole as long as it comes."""
    return "[" + ",".join(f'["C",{first_seq + n}]' for n in range(num_events)) + "]"


def test_an_entry_past_the_bound_is_malformed_and_makes_no_state(fake_redis: FakeRedis) -> None:
    """An ``e`` field of 350,000 sound events (4.6 MB, past MAX_EVENT_BATCH_BYTES, 4 MiB)
    of an instance not read: counted malformed, no tracker entry, no update; one of b,
    read already: malformed, b lost (stale, a resync asked); entries within the bound
    delivered. Before, both were decoded whole and delivered: 350,000 events each."""
    big = cleared_batch(350_000)
    assert len(big) > MAX_EVENT_BATCH_BYTES
    pub = RedisStreamPublisher("redis://fake")
    sub = RedisStreamSubscriber("redis://fake")
    pub.publish("b", [stored(0, 1)])
    assert sub.poll() == [EventBatch("b", [stored(0, 1)])]
    fake_redis.xadd("kvtier:events", {"i": "ghost", "e": big, "n": "p1"})
    fake_redis.xadd("kvtier:events", {"i": "b", "e": cleared_batch(350_000, 1),
                                      "n": pub.incarnation})
    updates = sub.poll()
    assert [type(u).__name__ for u in updates] == ["InstanceLost"]
    assert sub.num_malformed_entries == 2
    assert sorted(sub.tracker.streams) == ["b"]
    assert sub.tracker.stale_instances() == ["b"]
    assert sub.num_resync_requests == 1


def test_a_batch_past_the_bound_is_published_as_entries_within_it(fake_redis: FakeRedis) -> None:
    """Five stored blocks of 65,536 tokens with 19-digit ids (1.3 MB each, 6.5 MB in all)
    go as 2 entries (3 + 2 blocks), each within MAX_EVENT_BATCH_BYTES, in 1 transaction
    (and the first claim's sweep of keys of before hash tags, a DEL);
    a subscriber reads all five, in order, none malformed. Before, 1 entry of 6.5 MB: a
    subscriber now counts it malformed. One event past the bound by itself: ValueError
    naming it, nothing sent."""
    tokens = tuple(range(10**18, 10**18 + 65_536))
    events = [BlockStored(n, n + 1, None, G, 65_536, None, tokens, None, None)
              for n in range(5)]
    pub = RedisStreamPublisher("redis://fake")
    sub = RedisStreamSubscriber("redis://fake")
    fake_redis.round_trips.clear()
    pub.publish("a", events)
    sizes = [len(fields[b"e"]) for _, fields in fake_redis.streams["kvtier:events"]]
    assert len(sizes) == 2 and max(sizes) <= MAX_EVENT_BATCH_BYTES, sizes
    assert fake_redis.round_trips == ["pipeline", "delete"]  # the delete: old names' keys
    got = [e for u in sub.poll() if isinstance(u, EventBatch) for e in u.events]
    assert got == events
    assert sub.num_malformed_entries == 0
    huge = BlockStored(5, 9, None, G, 4, None, (1, 2, 3, 4), b"x" * (3 << 20), None)
    with pytest.raises(ValueError, match=r"events\[1\] encodes to \d+ bytes, past the "
                                         r"4194304 one stream entry may carry"):
        pub.publish("a", [BlockStored(5, 8, None, G, 4, None, (1, 2, 3, 4), None, None),
                          huge])
    assert len(fake_redis.streams["kvtier:events"]) == 2


def test_a_publisher_sweeps_its_instances_keys_of_before_hash_tags_once(
        fake_redis: FakeRedis) -> None:
    """Snapshot and claim keys of a and b under the names of before hash tags (an older
    publisher's): publishing a deletes a's two (1 DEL after its claiming transaction), b's
    stay; a's next batch sends no DEL (1 XADD). With Redis down at the DEL, it is owed and
    made with the next batch. Before, the old names stayed for ever (4 keys -> 4)."""
    old = {f"kvtier:events:{kind}:{iid}": b"x" for kind in ("snapshot", "incarnation")
           for iid in ("a", "b", "c")}
    fake_redis.keys.update(old)
    pub = RedisStreamPublisher("redis://fake")
    fake_redis.round_trips.clear()
    pub.publish("a", [stored(0, 1)])
    assert fake_redis.round_trips == ["pipeline", "delete"]
    pub.publish("a", [stored(1, 2)])
    assert fake_redis.round_trips == ["pipeline", "delete", "xadd"]
    assert sorted(k for k in fake_redis.keys if k in old) == [
        "kvtier:events:incarnation:b", "kvtier:events:incarnation:c",
        "kvtier:events:snapshot:b", "kvtier:events:snapshot:c"]
    real_delete = fake_redis.delete
    fake_redis.delete = lambda *keys: (_ for _ in ()).throw(  # type: ignore[method-assign]
        redis.ConnectionError("down"))
    pub.publish("c", [stored(0, 1)])
    fake_redis.delete = real_delete  # type: ignore[method-assign]
    assert "kvtier:events:snapshot:c" in fake_redis.keys
    pub.publish("c", [stored(1, 2)])
    assert sorted(k for k in fake_redis.keys if k in old) == [
        "kvtier:events:incarnation:b", "kvtier:events:snapshot:b"]
