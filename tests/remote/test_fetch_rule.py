"""The remote fetch rule (fetch only what beats its recompute) and the engine's remote tier
deciding with it under the throughput it measures."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the remote tier's storages need torch")

from kvtier import (  # noqa: E402
    CacheConfig,
    KVCacheManager,
    Request,
    Scheduler,
    SchedulerConfig,
)
from kvtier.model import LlamaModel, ModelConfig, ModelEngine  # noqa: E402
from kvtier.remote import InMemoryRemoteStore, RemoteNamespace  # noqa: E402
from kvtier.remote.tier import (  # noqa: E402
    DEFAULT_FETCH_BYTES_PER_S,
    DEFAULT_FETCH_LATENCY_S,
    THROUGHPUT_EWMA_WEIGHT,
    RemoteTier,
    num_blocks_worth_fetching,
)
from kvtier.sim.timemodel import RemoteLink  # noqa: E402
from kvtier.storage import KVStorage  # noqa: E402
from kvtier.transfer.torch_engine import TorchTransferEngine  # noqa: E402

TPB = 4


def worth(num_blocks: int, **kw: float | None) -> int:
    """The rule with round costs: 1 ms latency, 1 ms to fetch and 3 ms to recompute a block."""
    costs: dict[str, float | None] = dict(latency_s=1e-3, fetch_s_per_block=1e-3,
                                          recompute_s_per_block=3e-3)
    costs.update(kw)
    return num_blocks_worth_fetching(num_blocks, **costs)  # type: ignore[arg-type]


def test_rule_fetches_all_when_each_block_pays_and_the_latency_is_paid_back() -> None:
    """Saving k x (3 - 1) ms must exceed the 1 ms latency: 1 block saves 2 ms, so all go."""
    assert worth(10) == 10
    assert worth(1) == 1
    assert worth(0) == 0


def test_rule_fetches_nothing_at_or_below_the_break_even() -> None:
    """A block that takes as long (or longer) to read as to compute is never fetched."""
    assert worth(100, fetch_s_per_block=3e-3) == 0
    assert worth(100, fetch_s_per_block=5e-3) == 0
    # llama3-8b-h100: 32 x 128 KiB blocks at 0.5 GB/s vs 32 x 40 us of prefill.
    assert num_blocks_worth_fetching(1000, latency_s=0.5e-3,
                                     fetch_s_per_block=32 * 131072 / 0.5e9,
                                     recompute_s_per_block=32 * 40e-6) == 0


def test_rule_fetches_nothing_when_the_latency_is_not_paid_back() -> None:
    """2 blocks save 2 x 0.5 ms = 1 ms, not more than the 1 ms latency: recompute them."""
    assert worth(2, recompute_s_per_block=1.5e-3) == 0
    assert worth(3, recompute_s_per_block=1.5e-3) == 3


def test_rule_fetches_only_the_first_blocks_that_arrive_within_the_wait() -> None:
    """With 5.5 ms to wait, 1 ms latency and 1 ms a block, the first 4 blocks are worth
    fetching and the rest are not (they would arrive after the request went on)."""
    assert worth(10, max_wait_s=5.5e-3) == 4
    assert worth(10, max_wait_s=1e-3) == 0  # the latency alone uses the wait up
    assert worth(10, max_wait_s=2e-3) == 1  # 1 block in 2 ms saves 2 ms > 1 ms latency
    assert worth(10, max_wait_s=2e-3, recompute_s_per_block=1.9e-3) == 0


@pytest.mark.parametrize(("field", "value"), [
    ("latency_s", -1.0), ("fetch_s_per_block", float("nan")),
    ("recompute_s_per_block", True), ("max_wait_s", float("inf")),
])
def test_rule_refuses_bad_costs_naming_the_field(field: str, value: object) -> None:
    """A cost that is not a finite number >= 0 raises ValueError naming it."""
    with pytest.raises(ValueError, match=f"^{field} must be a finite number"):
        worth(3, **{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_blocks must be an integer >= 0, got -1"):
        worth(-1)


def make_tier(**options: object) -> RemoteTier:
    """A remote tier over an empty manager (8 GPU, 4 host blocks of 4 tokens) and store."""
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=8,
                                         num_host_blocks=4, hash_algo="sha256"))
    layout = ModelConfig().kv_layout(TPB)
    return RemoteTier(InMemoryRemoteStore(RemoteNamespace("m", layout)), manager,
                      KVStorage(layout, 8, "cpu"), KVStorage(layout, 4),
                      **options)  # type: ignore[arg-type]


PROMPT = list(range(1, 15))  # 3 reusable full blocks of 4 tokens (the last token is not)


def block_bytes(tier: RemoteTier) -> int:
    return tier.store.namespace.layout.bytes_per_block


def test_tier_without_a_recompute_cost_fetches_every_missing_block() -> None:
    """No recompute_s_per_token: the old behaviour, every missing block is asked for."""
    tier = make_tier()
    assert tier.num_blocks_to_fetch(3) == 3
    assert tier.start_fetch("r", PROMPT)
    assert tier.num_skipped_blocks == 0
    tier.store.close()


def test_tier_below_the_break_even_fetches_nothing_and_counts_it() -> None:
    """Recomputing a block takes 1 us, reading it at the default throughput far longer:
    start_fetch asks for nothing (False: don't hold the request) and counts 3 skipped."""
    tier = make_tier(recompute_s_per_token=0.25e-6)
    assert block_bytes(tier) / DEFAULT_FETCH_BYTES_PER_S > TPB * 0.25e-6
    assert not tier.start_fetch("r", PROMPT)
    assert tier.num_skipped_blocks == 3
    assert tier.num_waiting == 0
    tier.store.close()


def test_tier_above_the_break_even_fetches_all_and_measures_the_store(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Recomputing a block takes 1 s: the 3 blocks the store has are fetched and imported;
    the fetch took 10 ms on a stepped clock, so the throughput estimate moves a quarter of
    the way to 3 blocks / 10 ms."""
    tier = make_tier(recompute_s_per_token=0.25, fetch_latency_s=0.0)
    hashes = tier.block_hashes(PROMPT, None, None)[:3]
    size = block_bytes(tier)
    tier.store.put_many({h: bytes([i]) * size for i, h in enumerate(hashes)})
    ticks = iter([100.0, 100.01])
    monkeypatch.setattr("kvtier.remote.tier.time.monotonic", lambda: next(ticks))
    assert tier.fetch(PROMPT) == 3
    sample = 3 * size / (100.01 - 100.0)
    expected = DEFAULT_FETCH_BYTES_PER_S + THROUGHPUT_EWMA_WEIGHT * (
        sample - DEFAULT_FETCH_BYTES_PER_S)
    assert tier.measured_bytes_per_s == expected
    assert tier.num_fetched_blocks == 3 and tier.num_skipped_blocks == 0
    tier.store.close()


def test_tier_fetches_only_what_arrives_before_the_deadline() -> None:
    """1 block of bytes a second and a 2.5 s deadline: the first 2 of 3 missing blocks."""
    size = ModelConfig().kv_layout(TPB).bytes_per_block
    tier = make_tier(recompute_s_per_token=10.0, fetch_latency_s=0.0, fetch_deadline_s=2.5,
                     fetch_bytes_per_s=float(size))
    assert tier.num_blocks_to_fetch(3) == 2
    tier.store.close()


@pytest.mark.parametrize(("option", "value", "message"), [
    ("recompute_s_per_token", -1.0, "recompute_s_per_token must be a finite number"),
    ("fetch_latency_s", float("nan"), "fetch_latency_s must be a finite number"),
    ("fetch_bytes_per_s", 0, r"fetch_bytes_per_s must be a finite number in \(0"),
])
def test_tier_refuses_bad_fetch_costs(option: str, value: object, message: str) -> None:
    """A bad fetch cost raises ValueError naming the option."""
    with pytest.raises(ValueError, match=message):
        make_tier(**{option: value})


def test_engine_and_simulator_start_from_the_same_measured_costs() -> None:
    """The tier's first estimate is the simulator's default link (bench_remote's figures)."""
    link = RemoteLink()
    assert link.latency_s == DEFAULT_FETCH_LATENCY_S
    assert link.bytes_per_s == DEFAULT_FETCH_BYTES_PER_S


PREFIX = [(7 * i + 3) % 256 for i in range(22)]


def make_engine(backend: dict[str, bytes], **options: Any) -> ModelEngine:
    """A model engine of the tiny model whose remote tier shares ``backend``."""
    model = LlamaModel(ModelConfig(), "cpu")
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=32,
                                         num_host_blocks=16, hash_algo="sha256"))
    layout = model.config.kv_layout(TPB)
    gpu, host = KVStorage(layout, 32, "cpu"), KVStorage(layout, 16)
    store = InMemoryRemoteStore(RemoteNamespace("tiny-llama", layout), backend)
    remote = RemoteTier(store, manager, gpu, host, **options)
    return ModelEngine(model, manager, Scheduler(manager, SchedulerConfig(max_num_tokens=64)),
                       TorchTransferEngine(gpu, host), record_logits=True, remote=remote)


def serve(engine: ModelEngine, prompt: list[int], request_id: str) -> None:
    """Serve one prompt to completion and check every logit row against a recompute."""
    engine.add_request(Request(request_id, prompt, 3))
    engine.run()
    engine.manager.check_invariants()
    for r in engine.results.values():
        tokens = r.prompt + r.output
        ref = engine.model.full_recompute(tokens[:-1])
        for pos, row in r.logits.items():
            assert (row - ref[pos]).abs().max().item() < 1e-4, (r.request_id, pos)


@pytest.mark.parametrize(("recompute_s_per_token", "fetched"), [(1e-12, False), (1.0, True)])
def test_engine_reads_the_store_only_when_the_fetch_pays(recompute_s_per_token: float,
                                                         fetched: bool) -> None:
    """B misses 6 blocks locally, 5 of them in the store (A's prefix): with a near-free
    recompute it reads none (all 6 skipped, no store hit) and recomputes; with a 1 s/token
    recompute it asks for all 6 and gets the 5. Both serve exactly a full recompute."""
    backend: dict[str, bytes] = {}
    serve(make_engine(backend), PREFIX + [11, 12, 13], "a")
    b = make_engine(backend, recompute_s_per_token=recompute_s_per_token)
    serve(b, PREFIX + [90, 91, 92, 93], "b")
    assert b.remote is not None
    hits = b.remote.store.stats.num_hits
    if fetched:
        assert b.remote.num_fetched_blocks == 5 and hits == 5
        assert b.remote.num_skipped_blocks == 0
    else:
        assert (b.remote.num_fetched_blocks, hits, b.remote.num_skipped_blocks) == (0, 0, 6)
