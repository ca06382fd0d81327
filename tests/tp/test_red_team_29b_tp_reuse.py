"""Red team 29b at TP 2: the reuse the tensor-parallel leader reports per request is the
reuse its admission that ran got. Two gloo ranks on the CPU; the leader's ``ModelEngine``
notes each request's figures, so the defects ``c2fefac`` and 5fd1ea4 fixed there are checked
here through the leader, with the fault on the worker rank only::

    "output"  a computes PROMPT (3 tokens); b is queued with PROMPT and a's first 2 output
              tokens (11 to prefill): it reuses a's 2 full blocks, computes 3
    "onboard" a computes PROMPT, x pushes a's second block to the host; b's admission
              promises 4 GPU + 4 host tokens, rank 1 fails its onboard: both ranks raise,
              b recomputes; its readmission reuses the 4 GPU tokens, computes 5
    "remote"  engine A writes LONG's 3 full blocks through to each rank's store; engine B
              (a fresh manager) fetches them (12 tokens imported into the host), rank 1
              fails their onboard: the host blocks are gone, b recomputes all 13
    "partial" r5's lookup promises 6 GPU tokens, 2 of them a partial copy of r0's block;
              its admission reuses the full block alone (4) and computes 3

Before ``c2fefac`` the leader reported b 0 reused, 0 computed ("output"), 4 GPU + 4 host
reused, 1 computed ("onboard"), and 12 remote reused, 1 computed ("remote"): the admission
that never ran; and before 5fd1ea4, r5 6 reused, 1 computed ("partial"): the lookup's
promise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the tensor-parallel tests need torch: "
                                            "pip install 'kvtier[torch]'")
import torch.distributed as dist  # noqa: E402

from kvtier import CacheConfig, KVCacheManager  # noqa: E402
from kvtier.model import LlamaModel, ModelConfig, RequestResult  # noqa: E402
from kvtier.model.tensor_parallel import TensorParallelLlama  # noqa: E402
from kvtier.model.tp_engine import (  # noqa: E402
    CommandChannel,
    DistributedRanks,
    TensorParallelLeader,
    serve,
)
from kvtier.remote import InMemoryRemoteStore, RemoteNamespace  # noqa: E402
from kvtier.remote.ranks import RemoteShard  # noqa: E402
from kvtier.remote.tier import RemoteTier  # noqa: E402
from kvtier.scheduler import Request, Scheduler, SchedulerConfig  # noqa: E402
from kvtier.storage import KVStorage  # noqa: E402
from kvtier.tier import Tier  # noqa: E402
from kvtier.transfer.batching import TransferBatch  # noqa: E402
from kvtier.transfer.torch_engine import TorchTransferEngine  # noqa: E402
from kvtier.transfer.tp_engine import DistributedTransferEngine  # noqa: E402

TP_SIZE = 2
TPB = 4
PROMPT = [1, 2, 3, 4, 5, 6, 7, 8, 9]  # 2 full blocks of 4 and a last token
OTHER = [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31]  # 3 full blocks
LONG = [(7 * i + 3) % 256 for i in range(13)]  # 3 full blocks and a last token
# Per scenario: GPU blocks, host blocks, whether rank 1's first onboard batch fails.
SCENARIOS = {"output": (12, 0, False), "onboard": (4, 8, True), "partial": (9, 0, False)}
# The "partial" scenario's arrivals, a list per step (test_red_team_29b_reuse's): r5's
# lookup promises 6 GPU tokens (2 a partial copy), its admission reuses 4, computes 3.
PARTIAL_ARRIVALS: tuple[list[Request], ...] = (
    [Request("r0", [*PROMPT, 2], 1), Request("r1", [5, 5, 5, 5, 5, 1], 5, output=[6, 7, 5])],
    [Request("r2", [1, 2, 3, 1], 5, output=[7, 6, 1])],
    [Request("r3", [1, 2, 3, 4, 7, 7, 3], 3), Request("r4", [1, 2, 3, 3], 6, output=[7, 3, 5])],
    [],
    [Request("r5", [1, 2, 3, 4, 5, 6, 1], 2)],
)


def split(result: RequestResult) -> tuple[int, int, int, int]:
    return (result.num_gpu_tokens, result.num_host_tokens, result.num_remote_tokens,
            result.num_computed_tokens)


class FailFirstOnboard:
    """Rank 1's fault: its first host->GPU batch fails."""

    def __init__(self) -> None:
        self.num_failed = 0

    def __call__(self, batch: TransferBatch) -> None:
        if batch.src_tier is Tier.HOST and batch.dst_tier is Tier.GPU and not self.num_failed:
            self.num_failed += 1
            raise RuntimeError("injected onboard fault on rank 1")


class InlineStore(InMemoryRemoteStore):
    """An in-memory store whose lookups answer before ``prefetch`` returns (as in
    test_tp_exactness: a fetch has arrived by the engine's next poll, whatever the load)."""

    def prefetch(self, hashes: Any, callback: Any) -> bool:
        callback(self.get_many(hashes))
        return True


def lead(name: str, engine: Any) -> dict[str, Any]:
    """The leader's scenario ``name`` to the end; what the parent checks."""
    def drain() -> list[tuple[tuple[int, int, int], ...]]:
        chunks = []
        while engine.scheduler.has_unfinished():
            step = engine.step()[0]
            chunks.append(tuple((c.first_token, c.num_tokens, c.num_reused_tokens)
                                for c in step.context_chunks))
        return chunks

    if name == "partial":
        for arrivals in PARTIAL_ARRIVALS:
            for req in arrivals:
                engine.add_request(req)
            engine.step()
    elif name == "output":
        engine.add_request(Request("a", PROMPT, 3))
        drain()
        engine.add_request(Request("b", PROMPT, 6, output=engine.results["a"].output[:2]))
    elif name in ("remote a", "remote b"):
        engine.add_request(Request(name[-1], LONG, 2))
    else:
        for rid, prompt in (("a", PROMPT), ("x", OTHER)):
            engine.add_request(Request(rid, prompt, 1))
            drain()
        engine.add_request(Request("b", PROMPT, 2))
    chunks = drain()
    engine.run()  # nothing left to step: with a remote tier, waits for its writes
    engine.manager.check_invariants()
    stats = engine.manager.stats
    return {"splits": {rid: split(r) for rid, r in engine.results.items()},
            "chunks": chunks, "num_failed_steps": engine.num_failed_steps,
            "reused": (stats.num_reused_tokens, stats.num_resumed_reused_tokens,
                       stats.num_lost_reused_tokens),
            "fetched": None if engine.remote is None else engine.remote.num_fetched_blocks}


def remote_scenario(shard: TensorParallelLlama, rank: int) -> dict[str, Any]:
    """Engines A and B over this rank's store (a dict of its own shards); rank 1 fails
    B's first onboard. What each rank saw."""
    backend: dict[str, bytes] = {}
    namespace = RemoteNamespace("tiny-llama", shard.config.kv_layout(TPB)).for_rank(
        rank, TP_SIZE)
    out: dict[str, Any] = {}
    for name in ("remote a", "remote b"):
        faulty = name == "remote b" and rank == 1
        layout = shard.kv_layout(TPB)
        gpu, host = KVStorage(layout, 16, "cpu"), KVStorage(layout, 8)
        engine = TorchTransferEngine(gpu, host, method="kernel" if faulty else "auto")
        if faulty:
            engine.before_batch = FailFirstOnboard()
        remote = RemoteShard(InlineStore(namespace, backend), gpu, host)
        transfer = DistributedTransferEngine(engine)
        channel = CommandChannel()
        if rank == 0:
            manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=16,
                                                 num_host_blocks=8, hash_algo="sha256"))
            scheduler = Scheduler(manager, SchedulerConfig(max_num_tokens=64))
            tier = RemoteTier(DistributedRanks(remote, channel), manager,
                              write_policy="write-through", fetch_deadline_s=60.0)
            leader = TensorParallelLeader(shard, transfer, manager, scheduler, channel,
                                          remote=tier)
            out[name] = lead(name, leader.engine)
            leader.stop()
        else:
            out[name] = {"num_steps": serve(shard, transfer, channel, remote)}
        out[name].update(num_failed_ops=transfer.num_failed_ops,
                         num_failed_elsewhere=transfer.num_failed_elsewhere)
    return out


def rank_main(rank: int, rendezvous: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=TP_SIZE)
    try:
        shard = TensorParallelLlama(LlamaModel(ModelConfig(), "cpu"), rank, TP_SIZE)
        layout = shard.kv_layout(TPB)
        saved: dict[str, Any] = {}
        for name, (num_gpu, num_host, faulty) in SCENARIOS.items():
            faulty = faulty and rank == 1
            engine = TorchTransferEngine(KVStorage(layout, num_gpu, "cpu"),
                                         KVStorage(layout, max(1, num_host)),
                                         method="kernel" if faulty else "auto")
            if faulty:
                engine.before_batch = FailFirstOnboard()
            transfer = DistributedTransferEngine(engine)
            channel = CommandChannel()
            if rank == 0:
                partial = name == "partial"
                manager = KVCacheManager(CacheConfig(
                    tokens_per_block=TPB, num_gpu_blocks=num_gpu, num_host_blocks=num_host,
                    enable_partial_reuse=partial, copy_on_partial_reuse=partial,
                    eviction_policy="priority-lru"))
                scheduler = Scheduler(manager, SchedulerConfig(
                    max_num_tokens=32 if partial else 64, enable_chunked_prefill=not partial))
                leader = TensorParallelLeader(shard, transfer, manager, scheduler, channel)
                saved[name] = lead(name, leader.engine)
                leader.stop()
            else:
                saved[name] = {"num_steps": serve(shard, transfer, channel)}
            saved[name].update(num_failed_ops=transfer.num_failed_ops,
                               num_failed_elsewhere=transfer.num_failed_elsewhere)
        saved.update(remote_scenario(shard, rank))
        torch.save(saved, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Spawn the ranks once for both scenarios; what each saved."""
    tmp = tmp_path_factory.mktemp("tp_reuse")
    args = (str(tmp / "rendezvous"), str(tmp))
    torch.multiprocessing.spawn(rank_main, args=args, nprocs=TP_SIZE, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(TP_SIZE)]


def test_a_request_queued_with_output_reports_the_reuse_its_prefill_got(
        ranks: list[dict[str, Any]]) -> None:
    """b, queued with PROMPT and 2 output tokens, reuses a's 2 full blocks (8 GPU tokens)
    and computes 3; the leader reports exactly that (it said 0 reused, 0 computed)."""
    out = ranks[0]["output"]
    assert out["chunks"][0] == ((8, 3, 8),)
    assert out["splits"] == {"a": (0, 0, 0, 9), "b": (8, 0, 0, 3)}
    assert out["num_failed_steps"] == 0
    assert out["num_failed_ops"] == ranks[1]["output"]["num_failed_ops"] == 0


def test_an_onboard_failed_on_a_worker_reports_the_readmission_that_ran(
        ranks: list[dict[str, Any]]) -> None:
    """Rank 1 fails b's onboard (rank 0's succeeds): every rank drops the step's copies,
    b is requeued and its readmission reuses 4 GPU tokens and computes 5; the leader
    reports that (it said 4 GPU + 4 host reused, 1 computed) and the counters count the
    8 promised tokens lost, the 4 resumed."""
    out, worker = ranks[0]["onboard"], ranks[1]["onboard"]
    assert out["num_failed_steps"] == 1
    # The failed step's chunk was taken out; the readmission's first chunk starts at 4.
    assert out["chunks"][0] == ()
    assert out["chunks"][1] == ((4, 5, 4),)
    assert out["splits"] == {"a": (0, 0, 0, 9), "x": (0, 0, 0, 12), "b": (4, 0, 0, 5)}
    assert out["reused"] == (0, 4, 8)
    # Rank 1's onboard batch failed, and with it the later wave (the offload into the
    # onboard's source slot): 2 ops reported failed on both ranks, elsewhere on rank 0.
    assert out["num_failed_ops"] == out["num_failed_elsewhere"] == 2
    assert (worker["num_failed_ops"], worker["num_failed_elsewhere"]) == (2, 0)


def test_remote_blocks_whose_onboard_failed_on_a_worker_are_not_reported_reused(
        ranks: list[dict[str, Any]]) -> None:
    """B fetches LONG's 3 blocks from the store (12 tokens imported into the host); rank 1
    fails their onboard, which takes the host blocks too: b recomputes its 13 tokens and
    the leader reports that (it said 12 remote reused, 1 computed). A computed its own."""
    a, b = ranks[0]["remote a"], ranks[0]["remote b"]
    assert (a["splits"], a["num_failed_steps"], a["fetched"]) == ({"a": (0, 0, 0, 13)}, 0, 0)
    assert (b["fetched"], b["num_failed_steps"]) == (3, 1)
    assert b["chunks"][:2] == [(), ((0, 13, 0),)]
    assert b["splits"] == {"b": (0, 0, 0, 13)}
    assert b["reused"] == (0, 0, 12)
    assert b["num_failed_ops"] == b["num_failed_elsewhere"] == 3
    assert (ranks[1]["remote b"]["num_failed_ops"],
            ranks[1]["remote b"]["num_failed_elsewhere"]) == (3, 0)


def test_an_admission_that_reused_less_than_its_lookup_is_reported_as_it_ran(
        ranks: list[dict[str, Any]]) -> None:
    """r5's lookup promised 6 GPU tokens (2 by partial copy); its admission reused 4 and
    computed 3: the leader reports that (it said 6 reused, 1 computed)."""
    out = ranks[0]["partial"]
    assert out["splits"] == {"r0": (0, 0, 0, 10), "r1": (0, 0, 0, 9), "r2": (3, 0, 0, 4),
                             "r3": (4, 0, 0, 3), "r4": (3, 0, 0, 4), "r5": (4, 0, 0, 3)}
    assert out["num_failed_steps"] == 0
