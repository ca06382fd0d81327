"""Red team 23c: the tiers that move data, without a Redis server: an event stream that a
subscriber joined late when its instance restarts, a remote fetch refused after an earlier
one of its id, and tensor-parallel transfer engines built from shards that are not one
deployment's (another rank's host shard, another model's rank).

Every refusal here is checked to name the field and value and to change nothing.
"""

from __future__ import annotations

import pytest

from kvtier import CacheConfig, KVCacheManager
from kvtier.events import BlockStored, Event
from kvtier.publisher import (
    EventBatch,
    InMemoryEventBus,
    InstanceLost,
    SeqTracker,
    Snapshot,
    Update,
)
from kvtier.router import PrefixIndex
from kvtier.storage import KVLayout
from kvtier.tier import Tier

G = Tier.GPU
TPB = 4


def stored(seq: int, h: int) -> BlockStored:
    """A BlockStored event of one 4-token block."""
    return BlockStored(seq, h, None, G, TPB, None, (1, 2, 3, 4), None, None)


# ---- an event stream joined late, whose instance restarts --------------------------------


def test_a_late_subscriber_sees_its_instances_restart() -> None:
    """A subscriber that joined late read seq 9 first: a gap, the instance stale. The
    instance then restarted (seq 0 again, an empty cache). Its seq 0 was taken for the one
    the subscriber still expected (it had applied nothing), skipped as read while stale,
    and every snapshot of the new incarnation (next_seq 2) was refused as older than seq 9:
    the instance stayed stale, its blocks never routed to, until its new counter passed the
    old one's. Now seq 0 after any event read is a restart: the new events apply at once."""
    tracker = SeqTracker()
    out: list[Update] = []
    tracker.receive("a", [stored(9, 109)], out)
    assert out == [InstanceLost("a", 0, 9)] and tracker.stale_instances() == ["a"]
    out.clear()
    tracker.receive("a", [stored(0, 1), stored(1, 2)], out)
    assert out == [InstanceLost("a", 0, 0), *_batch("a", [stored(0, 1), stored(1, 2)])]
    assert tracker.num_restarts == 1 and tracker.stale_instances() == []
    out.clear()
    tracker.receive("a", [stored(2, 3)], out)
    assert out == _batch("a", [stored(2, 3)])


def _batch(instance_id: str, events: list[BlockStored]) -> list[Update]:
    return [EventBatch(instance_id, list[Event](events))]


def test_a_late_subscribers_router_learns_the_restarted_instances_blocks() -> None:
    """End to end on the in-memory bus: a subscriber with a one-event buffer misses the
    first events of an instance (a gap at its first poll; no snapshot source answers while
    the instance is down), then the instance restarts with a snapshot source of its new
    cache. The router's index holds the new incarnation's blocks after the next poll (it
    held none for as long as the new counter stayed below the old one's)."""
    bus = InMemoryEventBus()
    sub = bus.subscribe(max_events=1)
    index = PrefixIndex()
    bus.publish("a", [stored(seq, 100 + seq) for seq in range(10)])  # only seq 9 kept
    index.apply_updates(sub.poll())
    assert sub.tracker.stale_instances() == ["a"] and index.blocks("a") == {}
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=8,
                                         num_host_blocks=0, enable_events=True))
    bus.register_snapshot("a", lambda: Snapshot("a", 1, frozenset({(1, G)})))
    bus.publish("a", [stored(0, 1)])  # the restarted instance's first event
    index.apply_updates(sub.poll())
    assert index.blocks("a") == {1: G}
    assert sub.tracker.stale_instances() == [] and sub.tracker.num_restarts == 1
    bus.publish("a", [stored(1, 2)])
    index.apply_updates(sub.poll())
    assert index.blocks("a") == {1: G, 2: G}
    manager.check_invariants()


def test_a_fresh_stream_still_takes_seq_0_as_its_first_event() -> None:
    """The restart rule leaves a fresh stream alone: its seq 0 is the one expected (no
    InstanceLost, no restart counted), and a snapshot accepted before any event keeps
    seq 0 expected too."""
    tracker = SeqTracker()
    out: list[Update] = []
    tracker.receive("a", [stored(0, 1)], out)
    assert out == _batch("a", [stored(0, 1)]) and tracker.num_restarts == 0
    out.clear()
    assert tracker.offer(Snapshot("b", 0, frozenset()), out)
    tracker.receive("b", [stored(0, 5)], out)
    assert out[1:] == _batch("b", [stored(0, 5)]) and tracker.num_restarts == 0


# ---- a remote fetch refused after an earlier one of its id ---------------------------------


def test_a_refused_start_fetch_keeps_the_earlier_fetch_of_its_id() -> None:
    """A request's fetch passed its deadline (released, still in flight); a new
    ``start_fetch`` of that id with a bad prompt (a str token) or a bad salt (a float) was
    refused with ValueError, but only after it had cancelled the earlier fetch: a refused
    call changed the tier (``cancel_fetch`` of the id then answered False). Now the
    arguments are checked first: the earlier fetch is still the id's."""
    torch = pytest.importorskip("torch", reason="the remote tier moves real KV")
    from kvtier.remote import FaultyRemoteStore, InMemoryRemoteStore, RemoteNamespace
    from kvtier.remote.tier import RemoteTier
    from kvtier.storage import KVStorage

    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, tokens_per_block=TPB)
    namespace = RemoteNamespace("rt23c", layout)
    inner = InMemoryRemoteStore(namespace)
    store = FaultyRemoteStore(inner)
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=4,
                                         num_host_blocks=4, hash_algo="sha256"))
    gpu, host = KVStorage(layout, 4), KVStorage(layout, 4)
    gpu.fill_(1.0)
    tier = RemoteTier(store, manager, gpu, host, fetch_deadline_s=0.0)
    prompt = list(range(1, 3 * TPB + 2))
    store.delay_s = 0.2  # the fetch is still in flight past its deadline of 0 s
    assert tier.start_fetch("r", prompt)
    assert tier.poll() == ["r"] and tier.num_waiting == 0  # released, in flight
    for bad in ({"tokens": ["x", *prompt[1:]]}, {"salt": 1.5}):
        kwargs = {"tokens": prompt, **bad}
        with pytest.raises(ValueError, match=r"token|salt") as info:
            tier.start_fetch("r", **kwargs)  # type: ignore[arg-type]
        assert ("'x'" in str(info.value)) or ("1.5" in str(info.value))
    assert tier.cancel_fetch("r")  # the earlier fetch is still the id's
    assert tier.flush(5.0)
    del torch
