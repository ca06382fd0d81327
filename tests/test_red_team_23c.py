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
    from kvtier.storage import KVLayout, KVStorage

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


# ---- tensor-parallel transfer engines of shards that are not one deployment's ----------------


def _shard_layout(rank: int, tp_size: int = 2, head_dim: int = 4) -> KVLayout:
    """Rank ``rank``'s shard of a small model's blocks (4 KV heads)."""
    return KVLayout(num_layers=2, num_kv_heads=4, head_dim=head_dim,
                    tokens_per_block=TPB).shard(rank, tp_size)


def test_an_engine_refuses_a_host_shard_of_another_rank() -> None:
    """A TorchTransferEngine took a GPU shard of rank 0 with a host shard of rank 1 (as
    many bytes per block: only the rank differs), so two ranks' engines could be wired
    with their host shards swapped. Each engine's own offload and onboard round trip
    agreed with itself, but a remote tier's fetch fills each rank's own host shard
    (``RemoteShard``, checked against the store's namespace): rank 0 then onboarded rank
    1's KV heads. Now the engine refuses it, naming the field, and the storages are
    untouched."""
    pytest.importorskip("torch", reason="the transfer engine copies torch tensors")
    from kvtier.storage import KVStorage
    from kvtier.transfer.torch_engine import TorchTransferEngine

    gpu, host = KVStorage(_shard_layout(0), 4), KVStorage(_shard_layout(1), 4)
    gpu.fill_(1.0)
    host.fill_(2.0)
    with pytest.raises(ValueError, match=r"differ beyond the layout kind \(tp_rank\)"):
        TorchTransferEngine(gpu, host)
    assert bool((gpu.tensors[0] == 1.0).all()) and bool((host.tensors[0] == 2.0).all())
    whole = _shard_layout(0, tp_size=1)
    with pytest.raises(ValueError, match=r"\(tp_size\)"):
        TorchTransferEngine(KVStorage(whole, 4), KVStorage(_shard_layout(0), 4))
    TorchTransferEngine(gpu, KVStorage(_shard_layout(0), 4))  # its own rank's: taken


def test_a_sharded_engine_refuses_ranks_of_two_models() -> None:
    """ShardedTransferEngine compared only each engine's rank and TP size: rank 0 of one
    model and rank 1 of another (another head_dim) ran every plan as one deployment's.
    Now it refuses them with ValueError naming the engine and both layouts; ranks of one
    model are taken as before."""
    pytest.importorskip("torch", reason="the transfer engine copies torch tensors")
    from kvtier.storage import KVStorage
    from kvtier.transfer.torch_engine import TorchTransferEngine
    from kvtier.transfer.tp_engine import ShardedTransferEngine

    def engine(rank: int, head_dim: int = 4) -> TorchTransferEngine:
        layout = _shard_layout(rank, head_dim=head_dim)
        return TorchTransferEngine(KVStorage(layout, 4), KVStorage(layout, 4))

    with pytest.raises(ValueError, match=r"engine 1 holds a shard of .*head_dim=8.* engine 0 "
                                         r"of .*head_dim=4"):
        ShardedTransferEngine([engine(0), engine(1, head_dim=8)])
    with pytest.raises(ValueError, match="engine 0 holds the shard of rank 1 of 2, expected "
                                         "rank 0 of 2"):
        ShardedTransferEngine([engine(1), engine(0)])
    sharded = ShardedTransferEngine([engine(0), engine(1)])
    assert sharded.tp_size == 2
    sharded.close()


# ---- a remote tier's write policy replaced after it was built ------------------------------


def test_a_remote_tiers_write_policy_is_fixed_when_it_is_built() -> None:
    """``RemoteTier.write_policy`` was a plain attribute: set to "write-back" on a
    write-through tier (whose manager never logged spills), every engine step raised from
    ``write_spilled`` ('drain_spills() needs record_spills() first'); set back to
    "write-through", the manager's spill log grew for ever (nobody drained it); any other
    string was taken, and the engine wrote nothing to the store at all. It is now a part
    the tier is built from: replacing it raises AttributeError naming it, changing
    nothing."""
    pytest.importorskip("torch", reason="the remote tier moves real KV")
    from kvtier.remote import InMemoryRemoteStore, RemoteNamespace
    from kvtier.remote.tier import RemoteTier
    from kvtier.storage import KVStorage

    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, tokens_per_block=TPB)
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=4,
                                         num_host_blocks=4, hash_algo="sha256"))
    tier = RemoteTier(InMemoryRemoteStore(RemoteNamespace("rt23c", layout)), manager,
                      KVStorage(layout, 4), KVStorage(layout, 4))
    for value in ("write-back", "write-through", "bogus"):
        with pytest.raises(AttributeError, match=r"RemoteTier\.write_policy is a part"):
            tier.write_policy = value  # type: ignore[assignment]
        assert tier.write_policy == "write-through"
    with pytest.raises(AttributeError, match=r"RemoteTier\.write_policy is a part"):
        del tier.write_policy


# ---- a KV storage made of what is no layout, device or pin flag ---------------------------


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"layout": "block_major"}, TypeError, "layout must be a KVLayout, got 'block_major'"),
    ({"device": "gpu0"}, ValueError, "device must name a torch device ('cpu', 'cuda:0', "
                                     "...), got 'gpu0'"),
    ({"device": 3.5}, ValueError, "device must name a torch device ('cpu', 'cuda:0', ...), "
                                  "got 3.5"),
    ({"pin_memory": "yes"}, ValueError, "pin_memory must be None or a bool, got 'yes'"),
])
def test_a_storage_refuses_what_is_no_layout_device_or_pin_flag(
        kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    """KVStorage handed its arguments to torch unchecked: a str layout was an
    AttributeError ('torch_dtype'), a device of 'gpu0' torch's RuntimeError listing its
    device types, and a pin_memory of 'yes' was taken as True (pinning, or torch's error
    where no accelerator is). Each is now refused naming the argument and the value."""
    pytest.importorskip("torch", reason="KV storage is torch tensors")
    from kvtier.storage import KVStorage

    arguments: dict[str, object] = {"layout": _shard_layout(0, tp_size=1), "num_blocks": 2,
                                    **kwargs}
    with pytest.raises(error) as info:
        KVStorage(**arguments)  # type: ignore[arg-type]
    assert str(info.value) == message


# ---- a remote write of what is no block table ----------------------------------------------


@pytest.mark.parametrize(("table", "shown"), [(None, "None"), ("ab", "'ab'"), (7, "7")])
def test_a_remote_write_refuses_what_is_no_block_table(table: object, shown: str) -> None:
    """``RemoteTier.write`` zipped the prompt's hashes with ``block_table`` unchecked:
    None or an int raised TypeError from zip ('... is not iterable'), naming no argument,
    after the tier had taken its stores' lost writes; a str was read slot by slot. Each is
    now a ValueError naming ``block_table`` and the value, and nothing is written."""
    pytest.importorskip("torch", reason="the remote tier moves real KV")
    from kvtier.remote import InMemoryRemoteStore, RemoteNamespace, RemoteStats
    from kvtier.remote.tier import RemoteTier
    from kvtier.storage import KVStorage

    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, tokens_per_block=TPB)
    store = InMemoryRemoteStore(RemoteNamespace("rt23c", layout))
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=4,
                                         num_host_blocks=4, hash_algo="sha256"))
    tier = RemoteTier(store, manager, KVStorage(layout, 4), KVStorage(layout, 4))
    prompt = list(range(1, 3 * TPB + 2))
    with pytest.raises(ValueError) as info:
        tier.write(prompt, table, wait=True)  # type: ignore[arg-type]
    assert str(info.value) == f"block_table must be a sequence of GPU slots, got {shown}"
    with pytest.raises(ValueError, match=r"block_table\[2\] must be a GPU slot in 0\.\.3, "
                                         r"got -1"):
        tier.write(prompt, [0, 1, -1], wait=True, reused_blocks=3)  # a skipped slot too
    assert store.backend == {} and store.stats == RemoteStats()
    assert tier.num_written_blocks == 0
    assert tier.write(prompt, [0, 1, 2], wait=True) == 3
