"""Red team 23c, the remote tier's data path: a resync request of an event stream that
Redis lost, a tensor-parallel rank whose store refused its shards of a write, payloads
whose size in bytes is not their length, and a background write of a buffer the caller
reuses."""

from __future__ import annotations

import threading
import uuid
from array import array
from collections.abc import Iterator

import pytest
from remote_helpers import RedisServers, make_blocks, make_namespace

from kvtier.events import BlockStored
from kvtier.publisher import RedisStreamPublisher, RedisStreamSubscriber, Snapshot
from kvtier.remote import InMemoryRemoteStore, RemoteStats
from kvtier.remote.store import RemoteStoreBase
from kvtier.router import PrefixIndex
from kvtier.tier import Tier

G = Tier.GPU


def stored(seq: int, h: int) -> BlockStored:
    """A BlockStored event of one 4-token block."""
    return BlockStored(seq, h, None, G, 4, None, (1, 2, 3, 4), None, None)


# ---- a resync request that Redis lost --------------------------------------------------------


def test_a_stale_subscriber_asks_again_when_its_resync_request_was_lost(
        redis_servers: RedisServers) -> None:
    """A subscriber that saw a gap asked for a snapshot once (one entry of the capped
    resync stream) and never again: where that entry was lost before the publisher read
    it (the stream trimmed past it by other requests, a server restarted without it), no
    snapshot ever came and the instance stayed stale, its blocks never routed to. Now a
    subscriber still stale ``resync_retry_s`` after its request asks again; the
    publisher reads it and the snapshot resyncs the index."""
    url = redis_servers.url
    stream = f"kvtier:test:{uuid.uuid4().hex}"
    pub = RedisStreamPublisher(url, stream)
    sub = RedisStreamSubscriber(url, stream, resync_retry_s=0.0)
    raw = pub._redis
    index = PrefixIndex()
    try:
        pub.publish("a", [stored(0, 1)])
        pub.publish("a", [stored(1, 2)])
        raw.xtrim(stream, maxlen=0, approximate=False)  # seq 0 and 1 never reach it
        pub.publish("a", [stored(2, 3)])
        index.apply_updates(sub.poll())
        assert sub.tracker.stale_instances() == ["a"] and sub.num_resync_requests == 1
        raw.delete(f"{stream}:resync")  # the request is lost
        assert pub.resync_requests() == set()
        index.apply_updates(sub.poll())
        assert sub.num_resync_requests == 2  # asked again
        assert pub.resync_requests() == {"a"}
        pub.publish_snapshot(Snapshot("a", 3, frozenset({(1, G), (2, G), (3, G)})))
        index.apply_updates(sub.poll())
        assert index.blocks("a") == {1: G, 2: G, 3: G} and sub.tracker.stale_instances() == []
        index.apply_updates(sub.poll())
        assert sub.num_resync_requests == 2  # resynced: nothing more asked
    finally:
        raw.delete(stream, f"{stream}:resync", f"{{{stream}}}:snapshot:a")


def test_a_subscriber_asks_at_most_once_per_retry_interval(
        redis_servers: RedisServers) -> None:
    """With the default interval (1 s) polls in a row ask once; a bad interval is refused
    naming it, before any connection is made, and when set later (the interval kept)."""
    url = redis_servers.url
    stream = f"kvtier:test:{uuid.uuid4().hex}"
    pub = RedisStreamPublisher(url, stream)
    sub = RedisStreamSubscriber(url, stream)
    try:
        pub.publish("a", [stored(5, 1)])  # joined late: a gap
        for _ in range(3):
            sub.poll()
        assert sub.num_resync_requests == 1
    finally:
        pub._redis.delete(stream, f"{stream}:resync")
    for bad in (-1.0, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="resync_retry_s must be"):
            RedisStreamSubscriber(url, stream, resync_retry_s=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="resync_retry_s must be"):
            sub.resync_retry_s = bad  # type: ignore[assignment]
        assert sub.resync_retry_s == 1.0


# ---- a tensor-parallel rank whose store refused its shards of a write ------------------------


@pytest.fixture
def held_io() -> Iterator[list[threading.Event]]:
    """Gates to hold a store's I/O thread busy; every one is opened at the end."""
    gates: list[threading.Event] = []
    yield gates
    for gate in gates:
        gate.set()


def hold_io_thread(store: RemoteStoreBase, gates: list[threading.Event],
                   fill_queue: bool = False) -> None:
    """Keep ``store``'s I/O thread running one job until its gate (the last of ``gates``)
    opens; with ``fill_queue`` fill its queue of one job too: its next background write is
    refused."""
    gate, running = threading.Event(), threading.Event()
    gates.append(gate)

    def hold(found: object) -> None:
        running.set()
        gate.wait(10)

    assert store.prefetch([], hold)
    assert running.wait(10)
    if fill_queue:
        assert store.prefetch([], lambda found: None)


def test_a_ranks_refused_background_write_is_written_again(
        held_io: list[threading.Event]) -> None:
    """At TP 2, rank 1's store refused its shards of a write-through (its I/O queue full:
    its server slow) while the leader's took them. The tier counts what the leader handed
    over, so it held the prompt's blocks as written; the next write of that prefix (a
    reused prefix: the next turn) skipped them, and no engine ever found them whole: rank
    1's shards were missing, for as long as the tier remembered the blocks. Now a refused
    write is a lost one (``RemoteShard.lost``): the next write hands every rank its shards
    again, and another engine's fetch finds all five blocks."""
    pytest.importorskip("torch", reason="the remote tier moves real KV")
    from test_remote_tp import (
        PROMPT,
        gpu_blocks,
        host_blocks,
        make_ranks,
        make_tier,
    )
    from test_remote_tp import (
        make_namespace as rank_namespaces,
    )

    backend: dict[str, bytes] = {}
    namespaces = rank_namespaces(2)
    stores = [InMemoryRemoteStore(namespaces[0], backend),
              InMemoryRemoteStore(namespaces[1], backend, max_inflight=1)]
    ranks = make_ranks(2, backend, stores=list(stores))
    tier = make_tier(ranks)
    hold_io_thread(stores[1], held_io, fill_queue=True)
    assert tier.write(PROMPT, list(range(5))) == 5  # the leader's count
    assert stores[1].stats.num_dropped_jobs == 1
    held_io[0].set()
    assert tier.flush(10.0)
    assert len(backend) == 5  # rank 0's shards only
    assert tier.write(PROMPT, list(range(5)), reused_blocks=5) == 5  # written again
    assert tier.flush(10.0) and len(backend) == 10
    other = make_ranks(2, backend, fill=0.0)
    reader = make_tier(other)
    assert reader.fetch(PROMPT) == 5
    for rank in range(2):  # each rank's own heads of the writer's blocks
        assert host_blocks(other.shards[rank]) == gpu_blocks(ranks.shards[rank], 5)


# ---- payloads whose size in bytes is not their length ---------------------------------------


def typed_view(num_items: int) -> memoryview:
    """A view of ``num_items`` 4-byte floats: its len() is ``num_items``, its bytes 4x."""
    return memoryview(array("f", [1.0]) * num_items)


@pytest.mark.parametrize("kind", ["typed", "strided", "rows"])
def test_a_payload_is_measured_in_bytes_and_must_be_contiguous(kind: str) -> None:
    """``put_many`` and ``write_back`` measured a payload by ``len()``: a view of 4-byte
    floats (or of rows of 2 bytes) with as many items as a block has bytes passed, and its
    value (four blocks of
    bytes, the header saying one) was written to the shared store and counted as written,
    then refused by every reader ('length'); a strided view raised BufferError, no
    ValueError. Now each refuses a payload that is not exactly a block's contiguous
    bytes, naming its size, and writes or queues nothing."""
    namespace = make_namespace()
    size = namespace.layout.bytes_per_block
    payload = {"typed": typed_view(size),
               "strided": memoryview(bytes(2 * size))[::2],
               "rows": memoryview(bytes(2 * size)).cast("B", (size, 2))}[kind]
    store = InMemoryRemoteStore(namespace)
    described = {"typed": f"got {4 * size} bytes ({size} items of format 'f'",
                 "strided": f"got {size} bytes (not contiguous)",
                 "rows": f"got {2 * size} bytes ({size} items of format 'B', shape "
                         f"({size}, 2))"}[kind]
    for call in (store.put_many, store.write_back):
        with pytest.raises(ValueError, match=rf"payload must be {size} bytes") as info:
            call({1: payload})  # type: ignore[dict-item]
        assert described in str(info.value)
    assert store.flush(5.0)
    assert store.backend == {} and store.stats == RemoteStats()
    rows = memoryview(bytes(size)).cast("B", (size // 2, 2))
    store.put_many({1: rows})  # type: ignore[dict-item]  # a block's bytes, as rows: taken
    assert bytes(store.get_many([1])[1]) == bytes(size)


def test_a_background_write_keeps_the_bytes_it_was_given(
        held_io: list[threading.Event]) -> None:
    """``write_back`` took a bytearray (or a view of the caller's memory) and read it
    later, on the I/O thread: what the caller wrote there meanwhile (its staging buffer's
    next block) was stored under the first block's hash, with a checksum of its own, and
    every engine was served it as that block. Now a mutable payload is copied when the
    write is queued: the store holds the bytes it was given."""
    namespace = make_namespace()
    size = namespace.layout.bytes_per_block
    first, second = make_blocks(namespace, 2).values()
    store = InMemoryRemoteStore(namespace)
    hold_io_thread(store, held_io)
    staging = bytearray(first)
    view = memoryview(bytearray(first))
    assert store.write_back({7: staging, 8: view})  # type: ignore[dict-item]
    staging[:] = second  # the caller's next block, before the I/O thread ran
    view[:] = second
    held_io[0].set()
    assert store.flush(5.0)
    found = store.get_many([7, 8])
    assert bytes(found[7]) == first and bytes(found[8]) == first and len(first) == size


# ---- a store that was slow for a while ------------------------------------------------------


class SteppedClock:
    """``time.monotonic`` for the tier's fetches: each reading ``step_s`` after the last,
    so a blocking fetch (two readings) takes exactly ``step_s``."""

    def __init__(self, step_s: float) -> None:
        self.now_s = 1000.0
        self.step_s = step_s

    def __call__(self) -> float:
        self.now_s += self.step_s
        return self.now_s


def test_a_store_slow_for_a_while_is_measured_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tier decides each fetch under the read throughput it measured on its own
    fetches. A store slow for a while (a stall: 50 ms a fetch) dragged the estimate below
    the break-even; from then on every fetch was turned down, so none was made, nothing
    was measured again, and every remote hit was lost for good once the store was fast
    again. Now after ``PROBE_AFTER_SKIPS`` fetches in a row that only the measurement
    turned down (the configured throughput would make them), the next is made: the probe
    measures the fast store and fetching goes on."""
    pytest.importorskip("torch", reason="the remote tier moves real KV")
    from kvtier import CacheConfig, KVCacheManager
    from kvtier.remote import RemoteNamespace
    from kvtier.remote.tier import PROBE_AFTER_SKIPS, RemoteTier
    from kvtier.storage import KVLayout, KVStorage

    tpb = 16
    layout = KVLayout(num_layers=1, num_kv_heads=8, head_dim=64, tokens_per_block=tpb)
    assert layout.bytes_per_block == 1 << 16
    namespace = RemoteNamespace(f"rt23c-{uuid.uuid4().hex}", layout)
    backend: dict[str, bytes] = {}

    def make_tier(recompute_s_per_token: float | None = None) -> RemoteTier:
        manager = KVCacheManager(CacheConfig(tokens_per_block=tpb, num_gpu_blocks=8,
                                             num_host_blocks=128, hash_algo="sha256"))
        gpu, host = KVStorage(layout, 8), KVStorage(layout, 128)
        gpu.fill_(1.0)
        return RemoteTier(InMemoryRemoteStore(namespace, backend), manager, gpu, host,
                          recompute_s_per_token=recompute_s_per_token, fetch_latency_s=0.0)

    writer = make_tier()
    prompts = [[1000 * p + i for i in range(3 * tpb + 1)] for p in range(40)]
    for prompt in prompts:
        assert writer.write(prompt, [0, 1, 2], wait=True) == 3
    # Recomputing a block takes 1.6 ms; reading one at the configured 0.25 GB/s 0.26 ms:
    # the break-even is 41 MB/s.
    reader = make_tier(recompute_s_per_token=1e-4)
    clock = SteppedClock(0.05)
    monkeypatch.setattr("kvtier.remote.ranks.time.monotonic", clock)
    fetched = [reader.fetch(prompt) for prompt in prompts[:8]]
    assert fetched == [3] * 7 + [0]  # 3.9 MB/s a fetch: the estimate falls below it
    assert reader.measured_bytes_per_s < (1 << 16) / 1.6e-3
    clock.step_s = 1e-4  # the store is fast again: 1.97 GB/s
    # The 8th fetch was the first turned down: PROBE_AFTER_SKIPS in a row, then a probe.
    fetched = [reader.fetch(prompt) for prompt in prompts[8:8 + PROBE_AFTER_SKIPS + 1]]
    assert fetched == [0] * (PROBE_AFTER_SKIPS - 1) + [3, 3]
    assert reader.num_probes == 1
    assert reader.measured_bytes_per_s > (1 << 16) / 1.6e-3
    assert reader.num_fetched_blocks == 3 * 9
