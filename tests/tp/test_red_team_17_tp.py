"""Red team, seventeenth pass, over tensor parallelism's data plane: two gloo ranks on the
CPU, each given its own plan, as a leader with a bug (or a custom one) would give them.

Before, ``DistributedTransferEngine.submit`` all-reduced one word per op of whatever plan
its rank held: plans of different lengths answered one rank that every op was done and
the other a gloo connection error, and a plan one rank refused (a slot out of its pools)
left the other waiting on a collective that never came (here: until the 20 s timeout)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the tensor-parallel tests need torch: "
                                            "pip install 'kvtier[torch]'")
import torch.distributed as dist  # noqa: E402

from kvtier.storage import KVLayout, KVStorage  # noqa: E402
from kvtier.tier import Tier  # noqa: E402
from kvtier.transfer import OpKind, TransferOp, TransferPlan  # noqa: E402
from kvtier.transfer.torch_engine import TorchTransferEngine  # noqa: E402
from kvtier.transfer.tp_engine import DistributedTransferEngine  # noqa: E402

TP_SIZE = 2
OFFLOADS = [TransferOp(OpKind.OFFLOAD, Tier.GPU, i, Tier.HOST, i, 4) for i in range(3)]
# Rank 1's plan in each case (rank 0's is OFFLOADS), then a plan both are given.
CASES: dict[str, list[TransferOp]] = {
    "longer": [*OFFLOADS, TransferOp(OpKind.OFFLOAD, Tier.GPU, 5, Tier.HOST, 5, 4)],
    "other slot": [*OFFLOADS[:2], TransferOp(OpKind.OFFLOAD, Tier.GPU, 6, Tier.HOST, 2, 4)],
    "out of its pools": [*OFFLOADS[:2], TransferOp(OpKind.OFFLOAD, Tier.GPU, 99, Tier.HOST, 2,
                                                   4)],
}


def rank_main(rank: int, rendezvous: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # NOTE: a collective one rank never joins fails after 20 s (before the fix it hung).
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=TP_SIZE, timeout=timedelta(seconds=20))
    try:
        layout = KVLayout(2, 4, 8, 4, "float32").shard(rank, TP_SIZE)
        gpu, host = KVStorage(layout, 8, "cpu"), KVStorage(layout, 8)
        gpu.fill_(1.0)
        host.fill_(0.0)
        engine = DistributedTransferEngine(TorchTransferEngine(gpu, host))
        outcomes: dict[str, Any] = {}
        for name, theirs in CASES.items():
            try:
                engine.submit(TransferPlan(OFFLOADS if rank == 0 else theirs))
                outcomes[name] = "done"
            except Exception as exc:
                outcomes[name] = f"{type(exc).__name__}: {exc}"
        host.fill_(0.0)
        handle = engine.submit(TransferPlan(OFFLOADS))  # the ranks go on, agreed
        engine.synchronize(handle)
        outcomes["then"] = float(host.layer(0).abs().sum())
        torch.save(outcomes, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_given_different_plans_raise_alike_and_stay_paired(tmp_path: Path) -> None:
    """Every rank raises the same error naming its plan's length and the total, whatever
    the difference (a longer plan, another slot, a slot one rank refuses), and the
    collectives stay paired: the next plan both are given runs on both."""
    args = (str(tmp_path / "rendezvous"), str(tmp_path))
    torch.multiprocessing.spawn(rank_main, args=args, nprocs=TP_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(TP_SIZE)]
    for name, theirs in CASES.items():
        total = len(OFFLOADS) + len(theirs)
        for rank, outcome in enumerate(ranks):
            num_ops = len(OFFLOADS if rank == 0 else theirs)
            assert outcome[name].startswith(
                f"ValueError: the ranks were given different plans (rank {rank}: "
                f"{num_ops} ops, fingerprint "), (name, outcome[name])
            assert outcome[name].endswith(
                f"; {total} ops over 2 ranks): every rank must submit the leader's plans, in "
                f"order; each ran its own, so their shards may differ now"), (name, outcome[name])
    for outcome in ranks:
        assert outcome["then"] == 3 * 2 * 2 * 8 * 4  # 3 blocks of K and V, 2 heads, all 1
