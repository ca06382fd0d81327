"""Red team 33b: a tensor-parallel engine's transfer counters say whose they are.

``stats`` is the counters summed over every rank and ``rank_stats`` each rank's, alike on
``ShardedTransferEngine`` (one process) and the TP leader's engine (one process per rank,
gathered from the workers); ``DistributedTransferEngine.local_stats`` is one rank's. Each is
checked exactly against one whole-model engine running the same plans: every rank does
every op on its half of the heads, so ops add up to ``tp_size`` times the single engine's
and bytes to the single engine's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the tensor-parallel tests need torch: "
                                            "pip install 'kvtier[torch]'")
import torch.distributed as dist  # noqa: E402

from kvtier import CacheConfig, KVCacheManager  # noqa: E402
from kvtier.model import LlamaModel, ModelConfig, ModelEngine  # noqa: E402
from kvtier.model.tensor_parallel import TensorParallelLlama  # noqa: E402
from kvtier.model.tp_engine import CommandChannel, TensorParallelLeader, serve  # noqa: E402
from kvtier.scheduler import Request, Scheduler, SchedulerConfig  # noqa: E402
from kvtier.storage import KVLayout, KVStorage  # noqa: E402
from kvtier.tier import Tier  # noqa: E402
from kvtier.transfer import OpKind, TransferOp, TransferPlan  # noqa: E402
from kvtier.transfer.torch_engine import TorchTransferEngine  # noqa: E402
from kvtier.transfer.torch_handle import TransferStats  # noqa: E402
from kvtier.transfer.tp_engine import (  # noqa: E402
    DistributedTransferEngine,
    ShardedTransferEngine,
)

TP_SIZE = 2
COUNTED = ("num_plans", "num_ops", "num_partial_ops", "bytes_h2d", "bytes_d2h", "bytes_d2d")
TPB = 4
NUM_GPU_BLOCKS, NUM_HOST_BLOCKS = 12, 64  # a GPU pool of a few requests: offload, onboard


def make_engine_parts(model: LlamaModel | TensorParallelLlama
                      ) -> tuple[TorchTransferEngine, KVCacheManager, Scheduler]:
    """A transfer engine over ``model``'s (shard's) layout, and the one manager."""
    layout = (model.kv_layout(TPB) if isinstance(model, TensorParallelLlama)
              else model.config.kv_layout(TPB))
    engine = TorchTransferEngine(KVStorage(layout, NUM_GPU_BLOCKS),
                                 KVStorage(layout, NUM_HOST_BLOCKS))
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=NUM_GPU_BLOCKS,
                                         num_host_blocks=NUM_HOST_BLOCKS))
    return engine, manager, Scheduler(manager, SchedulerConfig(max_num_tokens=32,
                                                               max_batch_size=4))


def run_workload(engine: ModelEngine) -> None:
    """Three prefixes in turn, one request a step: later ones onboard what earlier ones
    offloaded."""
    prefixes = [[(7 * i + 13 * k) % 256 for i in range(17)] for k in range(3)]
    pending = [Request(f"r{n}", prefixes[n % 3] + [n], 2) for n in range(9)]
    while pending or engine.scheduler.has_unfinished():
        if pending:
            engine.add_request(pending.pop(0))
        engine.step()


def make_whole(tp_size: int) -> tuple[KVStorage, KVStorage]:
    """A whole-model GPU and host storage (4 KV heads) of seeded values."""
    layout = KVLayout(2, 4, 8, TPB, "float32")
    gpu, host = KVStorage(layout, 12), KVStorage(layout, 10)
    gen = torch.Generator().manual_seed(tp_size)
    for storage in (gpu, host):
        for t in storage.tensors:
            t.copy_(torch.randn(t.shape, generator=gen))
    return gpu, host


def make_shard(whole: KVStorage, rank: int, tp_size: int) -> KVStorage:
    shard = KVStorage(whole.layout.shard(rank, tp_size), whole.num_blocks)
    heads = shard.layout.kv_head_slice
    for i in range(whole.layout.num_layers):
        shard.layer(i).copy_(whole.layer(i)[..., heads, :])
    return shard


def make_ops() -> list[TransferOp]:
    """An offload, an onboard, a whole and a partial GPU copy."""
    g, h = Tier.GPU, Tier.HOST
    return [TransferOp(OpKind.OFFLOAD, g, 0, h, 1, TPB),
            TransferOp(OpKind.ONBOARD, h, 2, g, 3, TPB),
            TransferOp(OpKind.COPY, g, 4, g, 5, TPB), TransferOp(OpKind.COPY, g, 6, g, 7, 3)]


def counted(stats: TransferStats) -> dict[str, int]:
    return {name: getattr(stats, name) for name in COUNTED}


def test_total_sums_every_counter() -> None:
    a = TransferStats(num_plans=1, num_ops=2, bytes_h2d=10, bytes_d2h=3)
    b = TransferStats(num_plans=4, num_ops=5, bytes_h2d=1, bytes_d2d=7, num_waves=2)
    total = TransferStats.total([a, b])
    assert total == TransferStats(num_plans=5, num_ops=7, bytes_h2d=11, bytes_d2h=3,
                                  bytes_d2d=7, num_waves=2)
    assert TransferStats.total([]) == TransferStats()
    assert a == TransferStats(num_plans=1, num_ops=2, bytes_h2d=10, bytes_d2h=3)  # unchanged


@pytest.mark.parametrize("tp_size", [2, 4])
def test_sharded_stats_are_totals_and_rank_stats_each_ranks(tp_size: int) -> None:
    gpu, host = make_whole(tp_size)
    shards = [(make_shard(gpu, r, tp_size), make_shard(host, r, tp_size))
              for r in range(tp_size)]
    sharded = ShardedTransferEngine([TorchTransferEngine(g, h) for g, h in shards])
    whole = TorchTransferEngine(gpu, host)
    plan = TransferPlan(tuple(make_ops()))
    whole.submit(plan)
    sharded.synchronize(sharded.submit(plan))
    sharded.close()
    single = counted(whole.stats)
    assert single["num_ops"] == len(plan.ops) > 0
    assert single["bytes_h2d"] + single["bytes_d2h"] + single["bytes_d2d"] > 0
    assert isinstance(sharded.stats, TransferStats)
    assert counted(sharded.stats) == {
        name: value * tp_size if name.startswith("num_") else value
        for name, value in single.items()}
    assert [counted(s) for s in sharded.rank_stats] == [{
        name: value if name.startswith("num_") else value // tp_size
        for name, value in single.items()}] * tp_size


def rank_main(rank: int, rendezvous: str, out_dir: str) -> None:
    """Rank 0 leads the exactness workload (offloads and onboards); every rank saves what
    it counted, and the leader what its engine's ``stats`` / ``rank_stats`` said."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=TP_SIZE)
    try:
        shard = TensorParallelLlama(LlamaModel(ModelConfig(), "cpu"), rank, TP_SIZE)
        engine, manager, scheduler = make_engine_parts(shard)
        transfer = DistributedTransferEngine(engine, None)
        channel = CommandChannel(None)
        saved: dict[str, Any] = {}
        if rank == 0:
            leader = TensorParallelLeader(shard, transfer, manager, scheduler, channel)
            run_workload(leader.engine)
            # ModelEngine types it a TorchTransferEngine; it is the leader's _LeaderTransfer.
            transfer_view: Any = leader.engine.transfer
            saved["before_stop"] = (transfer_view.stats, transfer_view.rank_stats)
            leader.stop()
            leader.stop()  # idempotent: no second command, no second gather
            saved["after_stop"] = (transfer_view.stats, transfer_view.rank_stats)
        else:
            saved["num_steps"] = serve(shard, transfer, channel)
        saved["local"] = transfer.local_stats
        torch.save(saved, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_leader_stats_are_totals_over_ranks(tmp_path: Path) -> None:
    """The TP 2 leader's ``stats`` equal a single device's run of the same workload with
    ops doubled and bytes equal, read while the workers serve and after the stop."""
    model = LlamaModel(ModelConfig(), "cpu")
    engine, manager, scheduler = make_engine_parts(model)
    reference = ModelEngine(model, manager, scheduler, engine)
    run_workload(reference)
    single = counted(engine.stats)
    assert single["bytes_h2d"] > 0 and single["bytes_d2h"] > 0  # offloads and onboards ran
    assert manager.stats.host.onboarded_blocks > 0

    torch.multiprocessing.spawn(rank_main, args=(str(tmp_path / "rendezvous"), str(tmp_path)),
                                nprocs=TP_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(TP_SIZE)]
    per_rank = {name: value if name.startswith("num_") else value // TP_SIZE
                for name, value in single.items()}
    totals = {name: value * TP_SIZE if name.startswith("num_") else value
              for name, value in single.items()}
    assert [counted(r["local"]) for r in ranks] == [per_rank] * TP_SIZE
    for when in ("before_stop", "after_stop"):
        stats, rank_stats = ranks[0][when]
        assert isinstance(stats, TransferStats)
        assert counted(stats) == totals, when
        assert [counted(s) for s in rank_stats] == [per_rank] * TP_SIZE, when
    assert ranks[1]["num_steps"] > 0
