"""Red team 25b, the model engine's remote tier (CPU, a fake store): the figures it reports
per request are what its own fetch imported, never the cache's growth meanwhile."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="the data-plane tests need torch: pip install 'kvtier[torch]'")
import torch

from kvtier import CacheConfig, KVCacheManager, Request, Scheduler, SchedulerConfig
from kvtier.model import LlamaModel, ModelConfig, ModelEngine
from kvtier.remote import InMemoryRemoteStore, RemoteNamespace
from kvtier.remote.store import PrefetchCallback
from kvtier.remote.tier import RemoteTier
from kvtier.storage import KVStorage
from kvtier.transfer.torch_engine import TorchTransferEngine

TPB = 4
PREFIX = [(7 * i + 3) % 256 for i in range(22)]


class InstantStore(InMemoryRemoteStore):
    """A store whose lookups arrive at once, in the caller's thread: every fetch the engine
    starts has arrived by the poll right after it (no race with the I/O thread)."""

    def prefetch(self, hashes: object, callback: PrefetchCallback) -> bool:
        callback(self.get_many(hashes))  # type: ignore[arg-type]
        return True


def make_engine(backend: dict[str, bytes]) -> ModelEngine:
    """A model engine over an :class:`InstantStore` sharing ``backend``."""
    model = LlamaModel(ModelConfig(), "cpu")
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=32,
                                         num_host_blocks=16, hash_algo="sha256"))
    scheduler = Scheduler(manager, SchedulerConfig(max_num_tokens=64))
    layout = model.config.kv_layout(TPB)
    gpu, host = KVStorage(layout, 32, "cpu"), KVStorage(layout, 16)
    remote = RemoteTier(InstantStore(RemoteNamespace("tiny-llama", layout), backend),
                        manager, gpu, host)
    return ModelEngine(model, manager, scheduler, TorchTransferEngine(gpu, host),
                       remote=remote)


def test_two_requests_one_import_count_the_remote_tokens_once() -> None:
    """Two waiting requests of one 20-token prefix (5 blocks the store has) and other
    tails fetch at once, in one step: the first fetch imports the 5 blocks, the second
    finds them local and imports nothing. Each request's figure counted the host's growth
    during its fetch: both reported 20 remote tokens, 40 for 20 imported. Now the one whose
    fetch imported them counts 20 remote, the other reuses them as 20 host tokens::

        store     [ b0 b1 b2 b3 b4 ]          (written by engine a)
        x fetch   imports b0..b4   -> remote 20
        y fetch   finds them local -> host 20, remote 0 (admitted in the same step)
    """
    backend: dict[str, bytes] = {}
    a = make_engine(backend)
    a.add_request(Request("w", PREFIX + [11, 12, 13], 2))
    a.run()
    b = make_engine(backend)
    b.add_request(Request("x", PREFIX + [90, 91, 92, 93], 2))
    b.add_request(Request("y", PREFIX + [50, 51, 52, 53], 2))
    results = b.run()
    assert b.remote is not None and b.remote.num_fetched_blocks == 5
    x, y = results["x"], results["y"]
    assert (x.num_gpu_tokens, x.num_host_tokens, x.num_remote_tokens) == (0, 0, 20)
    assert (y.num_gpu_tokens, y.num_host_tokens, y.num_remote_tokens) == (0, 20, 0)
    assert sum(r.num_remote_tokens for r in results.values()) == 5 * TPB
    b.manager.check_invariants()


def test_poll_imports_says_what_each_requests_fetch_imported() -> None:
    """``RemoteTier.poll_imports``: the requests whose wait is over, and per request the
    blocks its own fetch imported (a fetch that found its blocks local imported none)."""
    backend: dict[str, bytes] = {}
    a = make_engine(backend)
    a.add_request(Request("w", PREFIX + [11, 12, 13], 2))
    a.run()
    b = make_engine(backend)
    tier = b.remote
    assert tier is not None
    assert tier.start_fetch("x", PREFIX + [90, 91, 92, 93])
    assert tier.start_fetch("y", PREFIX + [50, 51, 52, 53])
    polled = tier.poll_imports()
    assert sorted(polled.released) == ["x", "y"]
    assert polled.imported == {"x": 5}
    assert tier.poll_imports() == ([], {})
    assert tier.poll() == []


def test_a_write_through_that_raises_degrades_to_not_writing() -> None:
    """Reading a GPU block for the write-through raised out of ``ModelEngine.step`` after
    the step was applied (its finished requests lost to the caller, ``run`` ended). Now
    the blocks stay local: the step returns, the request finishes with the output a
    healthy engine gives, the fault is counted, nothing reaches the store, and the next
    write-through (the device healthy again) writes as before."""
    backend: dict[str, bytes] = {}
    healthy = make_engine({})
    healthy.add_request(Request("w", PREFIX + [11, 12, 13], 3))
    want = healthy.run()["w"].output

    engine = make_engine(backend)
    tier = engine.remote
    assert tier is not None
    gpu = engine.transfer.gpu
    read = gpu.block

    def broken(slot: int) -> torch.Tensor:
        raise RuntimeError("device fault")

    gpu.block = broken  # type: ignore[method-assign]
    engine.add_request(Request("w", PREFIX + [11, 12, 13], 3))
    results = engine.run()
    assert results["w"].output == want
    assert (engine.num_failed_writes, tier.num_written_blocks, len(backend)) == (1, 0, 0)
    engine.manager.check_invariants()

    gpu.block = read  # type: ignore[method-assign]
    engine.add_request(Request("v", [200 + i for i in range(9)], 2))
    engine.run()
    assert engine.num_failed_writes == 1
    assert tier.num_written_blocks == 2 and len(backend) == 2  # v's two full blocks
