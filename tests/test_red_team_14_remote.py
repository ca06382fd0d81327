"""Red team, fourteenth pass (remote): the remote tier as an engine calls it, given a store
that fails in the background, answers with values of the wrong size or blocks, and calls
out of order (a fetch for a request aborted, a cache reset under a fetch). Each test fails
on the code before its fix and asserts the exact state after it."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

pytest.importorskip("torch", reason="the remote tier moves real KV: needs torch")

from kvtier import CacheConfig, KVCacheManager, Request, Scheduler, SchedulerConfig, SequenceSpec
from kvtier.model import LlamaModel, ModelConfig, ModelEngine
from kvtier.remote import FaultyRemoteStore, InMemoryRemoteStore, RemoteNamespace
from kvtier.remote.store import RemoteStore
from kvtier.remote.tier import RemoteTier
from kvtier.storage import KVLayout, KVStorage
from kvtier.transfer.plan import TransferPlan
from kvtier.transfer.torch_engine import TorchTransferEngine

TPB = 4
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, tokens_per_block=TPB)
PROMPT = list(range(10, 31))  # 5 full blocks and one token
TABLE = [0, 1, 2, 3, 4]


def make_tier(store: object) -> RemoteTier:
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=8,
                                         num_host_blocks=8, hash_algo="sha256"))
    tier = RemoteTier(store, manager, KVStorage(LAYOUT, 8), KVStorage(LAYOUT, 8),  # type: ignore[arg-type]
                      fetch_deadline_s=1.0)
    for slot in range(8):
        tier.gpu.tensors[0][slot].fill_(slot)
    return tier


def faulty_tier() -> tuple[RemoteTier, FaultyRemoteStore, dict[str, bytes]]:
    backend: dict[str, bytes] = {}
    store = FaultyRemoteStore(InMemoryRemoteStore(RemoteNamespace("m", LAYOUT), backend))
    return make_tier(store), store, backend


# ---- a background write the store lost is not remembered as held --------------------------


def test_a_background_write_the_store_lost_is_written_again() -> None:
    """Write-through hands the store the blocks and returns; the I/O thread's put then
    failed (the store down), yet the tier kept their hashes as held (``KNOWN_BLOCKS``): a
    later write of the same prompt as a reused prefix skipped them all, so they were never
    written. Now the store reports the lost write and the next write writes them."""
    tier, store, backend = faulty_tier()
    store.down = True
    assert tier.write(PROMPT, TABLE) == 5  # handed over; lost on the I/O thread
    assert tier.flush(10.0)
    assert backend == {} and store.stats.num_failed_puts == 5
    store.down = False
    assert tier.write(PROMPT, TABLE, wait=True, reused_blocks=5) == 5
    assert len(backend) == 5
    assert tier.write(PROMPT, TABLE, wait=True, reused_blocks=5) == 0  # held now: skipped


def test_a_background_write_that_succeeded_stays_remembered() -> None:
    """The success path is unchanged: a write the store took is skipped as reused."""
    tier, _, backend = faulty_tier()
    assert tier.write(PROMPT, TABLE) == 5
    assert tier.flush(10.0)
    assert len(backend) == 5
    assert tier.write(PROMPT, TABLE, wait=True, reused_blocks=5) == 0


class RaisingPut(InMemoryRemoteStore):
    """A caller's store client past the contract: its put raises its backend's error while
    ``raising``."""

    raising = True

    def put_many(self, items: object) -> int:
        if self.raising:
            raise TimeoutError("the store timed out")
        return super().put_many(items)  # type: ignore[arg-type]


def test_a_background_write_whose_put_raises_is_lost_too() -> None:
    """A subclass's ``put_many`` that raised on the I/O thread wrote nothing, yet the tier
    kept the blocks as held. Now counted as an error and reported lost: once the store
    takes writes again, a write of them as reused writes them."""
    store = RaisingPut(RemoteNamespace("m", LAYOUT))
    tier = make_tier(store)
    assert tier.write(PROMPT, TABLE) == 5
    assert tier.flush(10.0)
    assert store.stats.num_errors == 1
    store.raising = False
    assert tier.write(PROMPT, TABLE, wait=True, reused_blocks=5) == 5
    assert len(store.backend) == 5


# ---- a fetch in flight for a request that is gone ----------------------------------------


class GatedStore(InMemoryRemoteStore):
    """A store whose reads wait until ``gate`` is set (a slow server)."""

    def __init__(self, namespace: RemoteNamespace, backend: dict[str, bytes]) -> None:
        super().__init__(namespace, backend)
        self.gate = threading.Event()

    def read_values(self, keys: list[str]) -> list[bytes | None]:
        self.gate.wait(30.0)
        return super().read_values(keys)


def make_engine(store_for: Callable[[RemoteNamespace], RemoteStore]) -> ModelEngine:
    """A model engine on CPU with a remote tier over ``store_for(namespace)``."""
    model = LlamaModel(ModelConfig(), "cpu")
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=32,
                                         num_host_blocks=16, hash_algo="sha256"))
    layout = model.config.kv_layout(TPB)
    gpu, host = KVStorage(layout, 32, "cpu"), KVStorage(layout, 16)
    remote = RemoteTier(store_for(RemoteNamespace("tiny-llama", layout)), manager, gpu, host,
                        fetch_deadline_s=60.0)
    return ModelEngine(model, manager, Scheduler(manager, SchedulerConfig(max_num_tokens=64)),
                       TorchTransferEngine(gpu, host), remote=remote)


SHARED = [(7 * i + 3) % 256 for i in range(22)]  # 5 full blocks and two tokens


def test_an_aborted_requests_fetch_holds_nobody() -> None:
    """A request aborted while its fetch was in flight: the fetch still counted as held
    (``num_waiting``), so the idle engine, whose waiting requests all wait for fetches,
    no longer blocked for them and spun (5,000 empty steps in half a second, then ``run``
    raised), and a new request of that id started no fetch (one was in flight). Now the
    fetch holds nobody, lands in the cache when it comes, and the new request fetches."""
    backend: dict[str, bytes] = {}
    writer = make_engine(lambda ns: InMemoryRemoteStore(ns, backend))
    writer.add_request(Request("w", SHARED + [1], 2))
    writer.run()
    assert len(backend) == 5
    stores: list[GatedStore] = []

    def gated(ns: RemoteNamespace) -> GatedStore:
        stores.append(GatedStore(ns, backend))
        return stores[-1]

    engine = make_engine(gated)
    assert engine.remote is not None
    engine.add_request(Request("other", [200, 201, 202], 4))  # nothing to fetch
    engine.step()  # running: the engine does not block on fetches
    engine.add_request(Request("r", SHARED + [2], 2))
    engine.step()
    assert engine.remote.num_waiting == 1
    assert engine.abort("r") is not None
    assert engine.remote.num_waiting == 0
    engine.add_request(Request("r", SHARED + [3], 2))
    engine.step()
    assert engine.remote.num_waiting == 1  # its own fetch
    stores[0].gate.set()
    engine.run(max_steps=200)
    result = engine.results["r"]
    assert result.stop_reason == "length" and result.num_remote_tokens == 20
    assert engine.remote.num_fetched_blocks == 5  # the aborted one's import, then reused
    engine.manager.check_invariants()


def test_a_request_id_whose_late_fetch_is_in_flight_fetches_again() -> None:
    """A fetch past its deadline (its request went on without it) and still in flight kept
    the id: a later request of that id (the first one done, the id reused) started no
    fetch of its own (``start_fetch`` False). Now it does; the late one still lands."""
    backend: dict[str, bytes] = {}
    assert make_tier(InMemoryRemoteStore(RemoteNamespace("m", LAYOUT), backend)).write(
        PROMPT, TABLE, wait=True) == 5
    store = GatedStore(RemoteNamespace("m", LAYOUT), backend)
    tier = make_tier(store)
    tier.fetch_deadline_s = 0.0
    assert tier.start_fetch("r", PROMPT)
    assert tier.poll() == ["r"]  # past its deadline: released, still in flight
    assert tier.num_waiting == 0
    assert tier.start_fetch("r", PROMPT)
    assert tier.num_waiting == 1
    with pytest.raises(TypeError, match="request_id must be a str, got int"):
        tier.cancel_fetch(7)  # type: ignore[arg-type]
    assert tier.cancel_fetch("r") and not tier.cancel_fetch("r")
    assert tier.num_waiting == 0
    store.gate.set()
    assert tier.flush(10.0)
    assert tier.poll() == []
    assert tier.num_fetched_blocks == 5  # imported once: the second found them local
    assert tier.manager.lookup(PROMPT).num_host_tokens == 20


# ---- an engine over parts that do not belong together --------------------------------------


def engine_parts(num_host: int = 16) -> tuple[LlamaModel, KVCacheManager, Scheduler,
                                              KVStorage, KVStorage]:
    model = LlamaModel(ModelConfig(), "cpu")
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=32,
                                         num_host_blocks=num_host, hash_algo="sha256"))
    layout = model.config.kv_layout(TPB)
    return (model, manager, Scheduler(manager, SchedulerConfig(max_num_tokens=64)),
            KVStorage(layout, 32), KVStorage(layout, 16))


def test_a_remote_tier_over_other_storages_is_refused() -> None:
    """A remote tier built over other tensors than the transfer engine's: write-through
    stored those tensors' bytes (garbage) under the prompts' hashes, for every engine to
    fetch, and a fetch filled host slots the engine never read from (its onboards served
    garbage). Now refused, as is a remote tier of another manager."""
    model, manager, scheduler, gpu, host = engine_parts()
    store = InMemoryRemoteStore(RemoteNamespace("tiny-llama", gpu.layout))
    other_gpu, other_host = KVStorage(gpu.layout, 32), KVStorage(gpu.layout, 16)
    with pytest.raises(ValueError, match=r"^the remote tier must move the transfer engine's "
                                         r"own gpu and host storages, not other tensors$"):
        ModelEngine(model, manager, scheduler, TorchTransferEngine(gpu, host),
                    remote=RemoteTier(store, manager, other_gpu, other_host))
    other = KVCacheManager(manager.config)
    with pytest.raises(ValueError, match=r"^the remote tier must run on the given manager"):
        ModelEngine(model, manager, scheduler, TorchTransferEngine(gpu, host),
                    remote=RemoteTier(store, other, gpu, host))
    engine = ModelEngine(model, manager, scheduler, TorchTransferEngine(gpu, host),
                         remote=RemoteTier(store, manager, gpu, host))
    assert engine.remote is not None


def test_a_host_storage_short_of_the_host_pool_is_refused() -> None:
    """A host storage of 8 slots under a manager of 16 host blocks: every plan offloading
    past slot 7 failed in the transfer engine, its requests requeued, step after step. Now
    refused when the engine is built, as a GPU storage too small was."""
    model, manager, scheduler, gpu, _ = engine_parts()
    with pytest.raises(ValueError, match=r"^host storage \(8 blocks of 4 tokens\) does not fit "
                                         r"the manager's 16 blocks of 4$"):
        ModelEngine(model, manager, scheduler, TorchTransferEngine(gpu, KVStorage(gpu.layout,
                                                                                  8)))
    with pytest.raises(ValueError, match=r"^the manager has 16 host blocks but the transfer "
                                         r"engine no host storage$"):
        ModelEngine(model, manager, scheduler, TorchTransferEngine(gpu, None))


def test_a_storage_of_another_models_shape_is_refused() -> None:
    """Storages of another model's shape (1 layer of head_dim 4, the model 2 of 16): every
    forward pass raised, each request ended with an error after three. Now refused."""
    model, manager, scheduler, _, _ = engine_parts(num_host=0)
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, tokens_per_block=TPB)
    with pytest.raises(ValueError, match=r"^GPU storage holds 1 layers of head_dim 4, the "
                                         r"model 2 of 16$"):
        ModelEngine(model, manager, scheduler, TorchTransferEngine(KVStorage(layout, 32), None))


@pytest.mark.parametrize(("gpu", "host", "message"), [
    (8, 2, "the host storage holds 2 blocks, the manager's host pool 8"),
    (4, 8, "the gpu storage holds 4 blocks, the manager's gpu pool 8"),
])
def test_a_remote_tier_over_storages_short_of_the_pools_is_refused(
        gpu: int, host: int, message: str) -> None:
    """A host storage of 2 slots under a host pool of 8: a fetch imported 5 blocks into the
    manager, then its fill raised IndexError at slot 2, leaving the manager with hits on
    slots never written (garbage served). Now refused when the tier is built."""
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=8,
                                         num_host_blocks=8, hash_algo="sha256"))
    with pytest.raises(ValueError, match=f"^{message}$"):
        RemoteTier(InMemoryRemoteStore(RemoteNamespace("m", LAYOUT)), manager,
                   KVStorage(LAYOUT, gpu), KVStorage(LAYOUT, host))


@pytest.mark.parametrize("layer", [-1, 2, True, 1.0])
def test_waiting_for_a_layer_the_storage_lacks_is_refused(layer: object) -> None:
    """``wait(handle, -1)`` waited for the last layer's copies only (the caller's layer 0
    read before its copies landed), ``wait(handle, 2)`` of a 2-layer storage raised
    IndexError, on CUDA; on CPU both passed. Now ValueError naming the layers."""
    layout = ModelConfig().kv_layout(TPB)  # 2 layers
    engine = TorchTransferEngine(KVStorage(layout, 4), KVStorage(layout, 4))
    handle = engine.submit(TransferPlan(()))
    with pytest.raises(ValueError, match=r"^layer must be None or an int in 0..1, got "):
        engine.wait(handle, layer)  # type: ignore[arg-type]
    engine.wait(handle, 1)
    engine.wait(handle)


def test_lost_spills_do_not_pile_up_under_write_back() -> None:
    """Under write-back only ``write_spilled`` writes: the lost writes' hashes the store
    reported were drained only by ``write``, so with the store down they piled up for
    ever. Now each ``write_spilled`` drains those reported so far."""
    backend: dict[str, bytes] = {}
    store = FaultyRemoteStore(InMemoryRemoteStore(RemoteNamespace("m", LAYOUT), backend))
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=2,
                                         num_host_blocks=1, hash_algo="sha256"))
    tier = RemoteTier(store, manager, KVStorage(LAYOUT, 2), KVStorage(LAYOUT, 1),
                      write_policy="write-back")
    store.down = True
    for first in (10, 20, 30, 40):  # each pushes an older block off the host
        manager.add_sequence(SequenceSpec("r", list(range(first, first + 5))))
        manager.remove_sequence("r")
        manager.take_plan()  # its offload runs: the host slot holds the block from here
        tier.write_spilled()
        assert tier.flush(10.0)
    assert store.stats.num_failed_puts == 2  # the first two blocks' spills
    assert len(tier.ranks.lost()) == 1  # the first drained by the last write_spilled
