"""Red team 24c, tensor parallelism's half: ranks whose KV shards are not one model's.

Two gloo ranks on the CPU. ``DistributedTransferEngine`` compared only the ranks' pool
sizes, so rank 1 holding a bfloat16 (or another head_dim's) shard beside rank 0's float32
one ran every plan as one deployment's; and a worker's ``serve`` took a model shard that
does not fit its storage, whose first forward pass failed on that rank alone while the
others waited in the pass's all-reduce; and a ``TensorParallelLlama`` cut from a shard
rather than the whole model (rank 1's: empty columns, its first pass failing alone)."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the tensor-parallel tests need torch: "
                                            "pip install 'kvtier[torch]'")
import torch.distributed as dist  # noqa: E402

from kvtier.model import LlamaModel, ModelConfig  # noqa: E402
from kvtier.model.tensor_parallel import TensorParallelLlama  # noqa: E402
from kvtier.model.tp_engine import CommandChannel, PlanCommand, StopCommand, serve  # noqa: E402
from kvtier.storage import KVLayout, KVStorage  # noqa: E402
from kvtier.tier import Tier  # noqa: E402
from kvtier.transfer import OpKind, TransferOp, TransferPlan  # noqa: E402
from kvtier.transfer.torch_engine import TorchTransferEngine  # noqa: E402
from kvtier.transfer.tp_engine import DistributedTransferEngine  # noqa: E402

TP_SIZE = 2
# Rank 1's shard in each case; rank 0's is always SOUND's.
SOUND = KVLayout(2, 2, 16, 4, "float32")
OTHERS = {"dtype": KVLayout(2, 2, 16, 4, "bfloat16"), "head_dim": KVLayout(2, 2, 8, 4),
          "layers": KVLayout(3, 2, 16, 4)}


def engine_of(layout: KVLayout, rank: int) -> DistributedTransferEngine:
    shard = layout.shard(rank, TP_SIZE)
    return DistributedTransferEngine(TorchTransferEngine(KVStorage(shard, 8),
                                                         KVStorage(shard, 8)))


def rank_main(rank: int, rendezvous: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # NOTE: a collective one rank never joins fails after 20 s.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=TP_SIZE, timeout=timedelta(seconds=20))
    outcomes: dict[str, Any] = {}
    try:
        for name, theirs in OTHERS.items():
            try:
                engine_of(SOUND if rank == 0 else theirs, rank)
                outcomes[name] = "built"
            except ValueError as exc:
                outcomes[name] = str(exc)
        transfer = engine_of(SOUND, rank)  # the ranks are still paired
        outcomes["sound"] = "built"
        full = LlamaModel(ModelConfig())
        try:
            TensorParallelLlama(TensorParallelLlama(full, rank, TP_SIZE), rank, TP_SIZE)
            outcomes["shard of a shard"] = "cut"
        except ValueError as exc:
            outcomes["shard of a shard"] = str(exc)
        if rank == 1:
            # A bfloat16 model's shard over this rank's float32 storage: refused before
            # its first command is awaited.
            shard = TensorParallelLlama(LlamaModel(ModelConfig(dtype="bfloat16")), rank,
                                        TP_SIZE)
            try:
                serve(shard, transfer, CommandChannel())
                outcomes["serve"] = "served"
            except ValueError as exc:
                outcomes["serve"] = str(exc)
        torch.save(outcomes, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_holding_shards_of_two_models_are_refused_alike(tmp_path: Path) -> None:
    """Every rank raises the same ValueError listing each rank's block shape (layers, KV
    heads, head_dim, tokens per block, dtype), whatever differs; a worker's serve refuses a
    shard whose blocks its storage does not hold, naming both."""
    args = (str(tmp_path / "rendezvous"), str(tmp_path))
    torch.multiprocessing.spawn(rank_main, args=args, nprocs=TP_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(TP_SIZE)]
    for name, theirs in OTHERS.items():
        shapes = [SOUND.model_shape, theirs.model_shape]
        message = ("every rank must hold a shard of the same model's blocks, got (num_layers, "
                   f"num_kv_heads, head_dim, tokens_per_block, dtype) by rank {shapes}")
        assert [outcome[name] for outcome in ranks] == [message, message], name
    assert [outcome["sound"] for outcome in ranks] == ["built", "built"]
    # Each rank cutting its shard out of its own shard (rank 1's: empty columns): refused.
    assert [outcome["shard of a shard"] for outcome in ranks] == [
        "full must be a whole model, got the shard of rank 0 of 2",
        "full must be a whole model, got the shard of rank 1 of 2"]
    assert ranks[1]["serve"] == (
        "rank 1's GPU storage holds 2 layers of KV heads 1..1 of 2 KV heads (rank 1 of 2) of "
        "head_dim 16 in float32, the model computes 2 layers of KV heads 1..1 of 2 KV heads "
        "(rank 1 of 2) of head_dim 16 in bfloat16")


# A plan every rank refuses alike (a GPU slot past the pools of 8), then a sound one.
REFUSED = (TransferOp(OpKind.OFFLOAD, Tier.GPU, 99, Tier.HOST, 0, 4),)
SOUND_PLAN = (TransferOp(OpKind.OFFLOAD, Tier.GPU, 1, Tier.HOST, 2, 4),)


def refused_plan_main(rank: int, rendezvous: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=TP_SIZE, timeout=timedelta(seconds=20))
    outcome: dict[Any, Any] = {}
    try:
        transfer = engine_of(SOUND, rank)
        host = transfer.host
        assert host is not None
        transfer.gpu.fill_(1.0)
        host.fill_(0.0)
        channel = CommandChannel()
        if rank == 0:  # the leader, as ModelEngine drives it: a refused plan degrades
            for ops in (REFUSED, SOUND_PLAN):
                channel.send(PlanCommand(ops))
                try:
                    transfer.synchronize(transfer.submit(TransferPlan(ops)))
                    outcome[len(outcome)] = "done"
                except ValueError as exc:
                    outcome[len(outcome)] = f"ValueError: {exc}"
            channel.send(StopCommand(7))
        else:
            try:
                outcome["serve"] = serve(TensorParallelLlama(LlamaModel(ModelConfig()), rank,
                                                             TP_SIZE), transfer, channel)
            except Exception as exc:
                outcome["serve"] = f"{type(exc).__name__}: {exc}"
            outcome["host"] = float(host.layer(0)[2].abs().sum())
        torch.save(outcome, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_plan_every_rank_refuses_leaves_the_workers_serving(tmp_path: Path) -> None:
    """A plan every rank refuses alike (a slot out of the pools: ValueError on every rank,
    agreed) was degraded by the leader's ModelEngine, which went on, but ended the worker's
    serve (it caught only TransferError): the leader's next command waited on a rank that
    was gone. Now the worker degrades it too: it runs the next plan and returns at stop."""
    args = (str(tmp_path / "rendezvous"), str(tmp_path))
    torch.multiprocessing.spawn(refused_plan_main, args=args, nprocs=TP_SIZE, join=True)
    leader, worker = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
                      for r in range(TP_SIZE))
    assert leader[0].startswith("ValueError: ") and "99" in leader[0]
    assert leader[1] == "done"
    assert worker["serve"] == 7
    assert worker["host"] == 2 * 4 * 1 * 16  # the sound plan's offload: K and V of slot 1


def wrong_rank_main(rank: int, rendezvous: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # NOTE: before, rank 0 waited in the gather for these 20 s (gloo's default: 30 min).
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=TP_SIZE, timeout=timedelta(seconds=20))
    outcome: dict[str, Any] = {}
    try:
        shard = SOUND.shard(0, TP_SIZE)  # rank 1 too holds rank 0's shard
        start = time.monotonic()
        try:
            DistributedTransferEngine(TorchTransferEngine(KVStorage(shard, 8),
                                                          KVStorage(shard, 8)))
            outcome["built"] = "built"
        except Exception as exc:
            outcome["built"] = f"{type(exc).__name__}: {exc}"
        outcome["seconds"] = time.monotonic() - start
        engine_of(SOUND, rank)  # still paired
        outcome["then"] = "built"
        torch.save(outcome, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_rank_holding_another_ranks_shard_is_refused_on_every_rank(tmp_path: Path) -> None:
    """A rank whose storage holds another rank's shard raised at once, alone, before the
    collective that checks the pools: every other rank waited in it until the group's
    timeout (gloo's default: 30 minutes), then failed with a connection error. Now the
    shards are gathered first and every rank raises the same ValueError at once, the
    collectives still paired."""
    args = (str(tmp_path / "rendezvous"), str(tmp_path))
    torch.multiprocessing.spawn(wrong_rank_main, args=args, nprocs=TP_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(TP_SIZE)]
    message = "ValueError: rank 1 of 2 in the group holds the shard of rank 0 of 2"
    assert [outcome["built"] for outcome in ranks] == [message, message]
    assert all(outcome["seconds"] < 10 for outcome in ranks)
    assert [outcome["then"] for outcome in ranks] == ["built", "built"]
