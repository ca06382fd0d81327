"""Red team, eleventh pass: the event bus, its snapshots and the router fed by them, given
garbage by a caller or a faulty peer."""

from __future__ import annotations

import pytest

from kvtier import CacheConfig, KVCacheManager
from kvtier.event_codec import Snapshot
from kvtier.events import BlockStored
from kvtier.publisher import EventBatch, InMemoryEventBus, InstanceLost, manager_snapshot
from kvtier.router import InstanceLoad, PrefixIndex, Router, make_policy
from kvtier.tier import Tier

G = Tier.GPU


def make_manager() -> KVCacheManager:
    return KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16, enable_events=True))


def stored(seq: int, block_hash: int) -> BlockStored:
    return BlockStored(seq, block_hash, None, G, 4, None, (1, 2, 3, 4), None, None)


@pytest.mark.parametrize(("args", "error", "message"), [
    (("a", 1, frozenset({(1, 7)})), ValueError, r"Snapshot.blocks: .* got \(1, 7\)"),
    (("a", 1, frozenset({(1 << 128, G)})), ValueError, r"Snapshot.blocks"),
    (("a", 1, frozenset({(True, G)})), ValueError, r"Snapshot.blocks"),
    (("a", -1, frozenset()), ValueError, r"Snapshot.next_seq .* got -1"),
    (("a", True, frozenset()), ValueError, r"Snapshot.next_seq .* got True"),
    (("a", "3", frozenset()), ValueError, r"Snapshot.next_seq .* got '3'"),
    ((5, 1, frozenset()), TypeError, r"Snapshot.instance_id must be a str, got 5"),
    (("a", 1, {(1, G)}), TypeError, r"Snapshot.blocks must be a frozenset"),
])
def test_a_snapshot_with_a_bad_field_is_refused_when_made(args: tuple[object, ...],
                                                          error: type[Exception],
                                                          message: str) -> None:
    """A Snapshot took any fields: a tier 7 became an IndexError in PrefixIndex.match much
    later, a str next_seq a TypeError in SeqTracker.offer. Now it is refused when made."""
    with pytest.raises(error, match=message):
        Snapshot(*args)  # type: ignore[arg-type]


def test_manager_snapshot_refuses_a_negative_next_seq() -> None:
    """manager_snapshot(next_seq=-5) made a snapshot that every subscriber would accept."""
    with pytest.raises(ValueError, match=r"next_seq .* got -5"):
        manager_snapshot(make_manager(), "a", -5)


@pytest.mark.parametrize("answer", ["garbage", None, "other"])
def test_a_snapshot_source_answering_garbage_loses_no_update(answer: str | None) -> None:
    """A snapshot source that answered a str raised AttributeError from poll, its drained
    updates (other instances' too) lost; one that answered another instance's snapshot
    resynced the wrong instance. Now either counts as a failed snapshot: the instance stays
    stale, the other updates come back."""
    bus = InMemoryEventBus()
    subscriber = bus.subscribe(max_events=3)
    other = Snapshot("healthy", 2, frozenset({(1, G)}))
    bus.register_snapshot("down", lambda: other if answer == "other" else answer)  # type: ignore[arg-type,return-value]
    bus.publish("down", [stored(seq, 10 + seq) for seq in range(5)])  # 5 into 3: a gap
    bus.publish("healthy", [stored(0, 1), stored(1, 2)])
    updates = subscriber.poll()
    assert [type(u) for u in updates] == [InstanceLost, EventBatch]
    assert updates[1].instance_id == "healthy"
    assert subscriber.tracker.stale_instances() == ["down"]
    assert subscriber.num_failed_snapshots == (0 if answer is None else 1)


@pytest.mark.parametrize(("instance_id", "events", "message"), [
    ("b", [1], r"events\[0\] must be a BlockStored"),
    ("b", [stored(0, 1), None], r"events\[1\] must be a BlockStored"),
    ("b", "abc", r"events must be a sequence of events"),
    (7, [stored(0, 1)], r"instance_id must be a str, got 7"),
])
def test_a_batch_of_garbage_is_refused_when_published(instance_id: object, events: object,
                                                      message: str) -> None:
    """InMemoryEventBus.publish took any batch; the subscriber's next poll raised
    AttributeError with its buffer drained, losing every other instance's updates. Now the
    batch is refused when published and nothing of it reaches a subscriber."""
    bus = InMemoryEventBus()
    subscriber = bus.subscribe()
    bus.publish("a", [stored(0, 1)])
    with pytest.raises(TypeError, match=message):
        bus.publish(instance_id, events)  # type: ignore[arg-type]
    assert bus.num_published == 1
    assert subscriber.poll() == [EventBatch("a", [stored(0, 1)])]


def test_redis_resync_requests_with_redis_down_asks_again_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RedisStreamPublisher.resync_requests raised redis' ConnectionError into the
    publisher's loop (publish and publish_snapshot already counted the fault). Now it
    answers none, counted, and reads the requests at the next call."""
    redis = pytest.importorskip("redis")
    from kvtier import publisher, stream_client

    class Client:
        """Down for its first read."""

        def __init__(self) -> None:
            self.reads = 0

        def xread(self, streams: dict[str, object], **options: object) -> object:
            self.reads += 1
            if self.reads == 1:
                raise redis.exceptions.ConnectionError("Connection refused")
            assert list(streams.values()) == ["0-0"]  # nothing was skipped
            return [(b"kvtier:events:resync", [(b"1-0", {b"i": b"i0"})])]

    monkeypatch.setattr(stream_client, "connect", lambda url, **_: Client())
    pub = publisher.RedisStreamPublisher("redis://unused")
    assert pub.resync_requests() == set() and pub.num_failed_reads == 1
    assert pub.resync_requests() == {"i0"} and pub.num_failed_reads == 1


@pytest.mark.parametrize("policy", ["cache-aware", "round-robin", "least-loaded"])
@pytest.mark.parametrize(("loads", "error", "message"), [
    ([InstanceLoad("a", 1, 0)], ValueError, r"loads\[0\].capacity must be an int >= 1, got 0"),
    ([InstanceLoad("a", 0, 1), InstanceLoad("b", -1, 1)], ValueError,
     r"loads\[1\].queue_depth must be an int >= 0, got -1"),
    ([InstanceLoad("a", "3", 1)], ValueError,  # type: ignore[arg-type]
     r"loads\[0\].queue_depth .* got '3'"),
    ([InstanceLoad("a", 0, 1), InstanceLoad("a", 0, 1)], ValueError,
     r"loads\[1\]: instance 'a' is listed twice"),
    ([("a", 0, 1)], TypeError, r"loads\[0\] must be an InstanceLoad"),
    ([InstanceLoad(None, 0, 1)], TypeError, r"loads\[0\] must be an InstanceLoad"),  # type: ignore[arg-type]
    ([], ValueError, r"at least one instance"),
])
def test_route_refuses_loads_a_policy_cannot_use(policy: str, loads: list[object],
                                                 error: type[Exception], message: str) -> None:
    """A capacity of 0 was a ZeroDivisionError from inside cache-aware and least-loaded
    (round-robin routed it); a str depth a TypeError from their arithmetic. Now route
    names the load, and its stats do not move."""
    router = Router(make_policy(policy), 4)
    with pytest.raises(error, match=message):
        router.route(list(range(8)), loads)  # type: ignore[arg-type]
    assert router.stats.num_routed == 0 and router.stats.per_instance == {}


def test_route_takes_loads_from_any_iterable() -> None:
    """A generator of loads: cache-aware called len() on it (TypeError)."""
    router = Router(make_policy("cache-aware"), 4)
    decision = router.route(list(range(8)), iter([InstanceLoad("a", 0, 1)]))
    assert decision.instance_id == "a"


@pytest.mark.parametrize("lora_id", ["x", -1, 1.0, True])
def test_route_refuses_a_lora_id_the_manager_refuses(lora_id: object) -> None:
    """route hashed lora_id='x' into the blocks' hashes (no manager can hold such a block).
    Now it is refused as the manager refuses it."""
    router = Router(make_policy("round-robin"), 4)
    with pytest.raises(ValueError, match=r"lora_id must be an int"):
        router.route(list(range(8)), [InstanceLoad("a", 0, 1)], lora_id=lora_id)  # type: ignore[arg-type]
    assert router.stats.num_routed == 0


def test_router_refuses_what_is_no_policy() -> None:
    """Router(None, 4) was made; its first route raised AttributeError."""
    with pytest.raises(TypeError, match=r"policy must be a RoutingPolicy"):
        Router(None, 4)  # type: ignore[arg-type]


def test_prefix_index_refuses_garbage_changing_nothing() -> None:
    """PrefixIndex.apply of a batch with a non-event after good ones applied the good ones,
    then raised AssertionError; apply_updates of a non-update AttributeError after applying
    the updates before it. Now both refuse the whole call, changing nothing."""
    index = PrefixIndex()
    index.apply("a", [stored(0, 1)])
    with pytest.raises(TypeError, match=r"events\[1\] must be a BlockStored"):
        index.apply("a", [stored(1, 2), 3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"an update is an EventBatch, InstanceLost, "
                                        r"InstanceGone or Snapshot, got 1"):
        index.apply_updates([InstanceLost("a", 0, None), 1])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"events\[0\] must be"):
        index.apply_updates([InstanceLost("a", 0, None), EventBatch("a", ["x"])])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"resync needs a Snapshot"):
        index.resync(("a", 3, frozenset()))  # type: ignore[arg-type]
    assert index.blocks("a") == {1: G} and index.instances() == ["a"]
    index.check_invariants()


@pytest.mark.parametrize(("salt", "shown"), [
    ((1, 2), r"salt must be bytes, str, int or None, got \(1, 2\)"),
    (1 << 200, r"salt must be an int of magnitude below 2\*\*128"),
])
def test_route_refuses_a_salt_the_manager_refuses(salt: object, shown: str) -> None:
    """route hashed a tuple salt (the manager refuses it: no instance can hold such a
    block). Now ValueError as the manager's, stats unchanged."""
    router = Router(make_policy("round-robin"), 4)
    with pytest.raises(ValueError, match=shown):
        router.route(list(range(8)), [InstanceLoad("a", 0, 1)], salt=salt)
    assert router.stats.num_routed == 0


def test_a_salt_nested_deeply_is_a_value_error_not_a_recursion_error() -> None:
    """A salt of 100,000 nested tuples: the refusal's message (short_repr) raised
    RecursionError, in SequenceSpec, lookup, route and the remote tier alike."""
    deep: object = ()
    for _ in range(100_000):
        deep = (deep,)
    with pytest.raises(ValueError, match=r"salt must be"):
        Router(make_policy("round-robin"), 4).block_hashes(list(range(8)), salt=deep)


class _RefusingRedis:
    """Refuses what Redis refuses: XREAD's count and block, an unknown id."""

    def __init__(self) -> None:
        self.reads = 0

    def xread(self, streams: dict[str, object], **options: object) -> object:
        redis = pytest.importorskip("redis")
        self.reads += 1
        count, block = options.get("count"), options.get("block")
        if type(count) is not int or count < 1 or (block is not None and (
                type(block) is not int or block < 0)):
            raise redis.exceptions.DataError("XREAD count must be a positive integer")
        return []

    def get(self, key: str) -> None:
        return None


@pytest.mark.parametrize(("options", "shown"), [
    ({"count": 0}, r"count must be an int >= 1, got 0"),
    ({"count": "10"}, r"count must be an int >= 1, got '10'"),
    ({"block_ms": -5}, r"block_ms must be None or an int >= 0, got -5"),
    ({"block_ms": 1.5}, r"block_ms must be None or an int >= 0, got 1.5"),
])
def test_a_subscriber_poll_with_options_redis_refuses_says_so(
        monkeypatch: pytest.MonkeyPatch, options: dict[str, object], shown: str) -> None:
    """RedisStreamSubscriber.poll(count=0): Redis refused the XREAD, and a refusal, like
    any Redis fault, was a skipped read: every poll returned [] and the subscriber never
    read anything, silently. Now ValueError, nothing asked of Redis."""
    pytest.importorskip("redis")
    from kvtier import publisher, stream_client

    client = _RefusingRedis()
    monkeypatch.setattr(stream_client, "connect", lambda url, **_: client)
    subscriber = publisher.RedisStreamSubscriber("redis://unused")
    with pytest.raises(ValueError, match=shown):
        subscriber.poll(**options)  # type: ignore[arg-type]
    assert client.reads == 0 and subscriber.last_id == "0-0"
    assert subscriber.poll() == [] and client.reads == 1  # good options still read


@pytest.mark.parametrize("start_id", ["garbage", "$", "-1", "1-2-3", f"{1 << 64}-0", "", 0])
def test_a_subscriber_start_id_redis_refuses_is_refused_when_made(
        monkeypatch: pytest.MonkeyPatch, start_id: object) -> None:
    """RedisStreamSubscriber(start_id='garbage'): Redis refused every XREAD from it, each a
    skipped read: the subscriber read nothing, ever ('$': nothing without block_ms). Now
    ValueError naming it."""
    pytest.importorskip("redis")
    from kvtier import publisher, stream_client

    monkeypatch.setattr(stream_client, "connect", lambda url, **_: _RefusingRedis())
    with pytest.raises(ValueError, match=r"start_id must be a stream id 'ms' or 'ms-seq'"):
        publisher.RedisStreamSubscriber("redis://unused", start_id=start_id)  # type: ignore[arg-type]
    assert publisher.RedisStreamSubscriber("redis://unused", start_id="1700000000000-3")


@pytest.mark.parametrize(("tokens_per_block", "extras", "shown"), [
    (0, None, r"tokens_per_block must be a power of two in 1..65536, got 0"),  # ZeroDivisionError
    (-1, None, r"tokens_per_block must be a power of two in 1..65536, got -1"),  # [] for any prompt
    # one hash a token:
    (True, None, r"tokens_per_block must be a power of two in 1..65536, got True"),
    (2, [b"x"], r"extras must hold one extra key per full block \(2\), got 1"),  # IndexError
])
def test_a_prompts_hash_chain_refuses_a_block_size_or_extras_that_cannot_be(
        tokens_per_block: object, extras: list[object] | None, shown: str) -> None:
    """prompt_block_hashes, the one helper for a prompt's hash chain (the router's, the
    remote tier's): a block size of 0 divided by zero, True hashed a block per token, too
    few extras raised IndexError. Now ValueError naming it."""
    from kvtier.hashing import get_hash_fn, prompt_block_hashes

    with pytest.raises(ValueError, match=shown):
        prompt_block_hashes(get_hash_fn("xxh3_128"), [1, 2, 3, 4], tokens_per_block,  # type: ignore[arg-type]
                            extras=extras)


def test_a_subscriber_on_a_resp3_connection_reads_its_entries(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``?protocol=3`` in the URL redis-py answers XREAD as ``{stream: [entries]}``,
    not RESP2's ``[[stream, entries]]``: every poll (and resync_requests) raised ValueError
    ("too many values to unpack"). Now both shapes read alike."""
    pytest.importorskip("redis")
    from kvtier import publisher, stream_client
    from kvtier.event_codec import encode_events

    rows = [(b"1-0", {b"i": b"a", b"e": encode_events([stored(0, 1)]).encode()}),
            (b"2-0", {b"i": b"a", b"e": encode_events([stored(1, 2)]).encode()}),
            (b"3-0", {b"i": b"a", b"e": encode_events([stored(2, 3)]).encode()})]

    class Resp3:
        def xread(self, streams: dict[str, object], **options: object) -> object:
            (name,) = streams
            return {name.encode(): [rows]}

        def get(self, key: str) -> None:
            return None

    monkeypatch.setattr(stream_client, "connect", lambda url, **_: Resp3())
    subscriber = publisher.RedisStreamSubscriber("redis://unused?protocol=3")
    assert subscriber.poll() == [EventBatch("a", [stored(0, 1)]), EventBatch("a", [stored(1, 2)]),
                                 EventBatch("a", [stored(2, 3)])]
    assert subscriber.last_id == b"3-0"
    assert publisher.RedisStreamPublisher("redis://unused?protocol=3").resync_requests() == {"a"}


def test_buffer_sizes_past_what_a_deque_or_redis_takes_are_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """subscribe(max_events=10**30): OverflowError from the deque; a publisher's maxlen
    past 2**63: Redis refused every XADD, each counted as a failed batch, silently. Now
    ValueError naming the bound; the bound itself is taken."""
    with pytest.raises(ValueError, match=r"max_events must be an integer in 1..2\*\*40"):
        InMemoryEventBus().subscribe(max_events=10**30)
    assert InMemoryEventBus().subscribe(max_events=1 << 40).poll() == []
    pytest.importorskip("redis")
    from kvtier import publisher, stream_client

    monkeypatch.setattr(stream_client, "connect", lambda url, **_: object())
    with pytest.raises(ValueError, match=r"maxlen must be an integer in 1..2\*\*40, got an "
                                         r"int of 200 bits"):
        publisher.RedisStreamPublisher("redis://unused", maxlen=1 << 199)
