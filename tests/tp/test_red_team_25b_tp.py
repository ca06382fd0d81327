"""Red team 25b, tensor parallelism's collectives: what one rank alone may skip or raise.

Two gloo ranks on the CPU. ``DistributedTransferEngine.submit`` of an empty plan joined no
agreement, so a rank given one returned while a rank given a plan with ops waited in the
agreement's all-reduce; a worker's store whose ``flush`` answered None raised TypeError
out of the flush's collective (``int(None)``), alone, while the leader waited in it."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the tensor-parallel tests need torch: "
                                            "pip install 'kvtier[torch]'")
import torch.distributed as dist  # noqa: E402

from answering_store import AnsweringStore  # noqa: E402
from kvtier.model import LlamaModel, ModelConfig  # noqa: E402
from kvtier.model.tensor_parallel import TensorParallelLlama  # noqa: E402
from kvtier.model.tp_engine import (  # noqa: E402
    CommandChannel,
    DistributedRanks,
    RemoteFlushCommand,
    run_remote,
    serve,
)
from kvtier.remote import InMemoryRemoteStore, RemoteNamespace  # noqa: E402
from kvtier.remote.ranks import RemoteShard  # noqa: E402
from kvtier.storage import KVLayout, KVStorage  # noqa: E402
from kvtier.tier import Tier  # noqa: E402
from kvtier.transfer import OpKind, TransferOp, TransferPlan  # noqa: E402
from kvtier.transfer.torch_engine import TorchTransferEngine  # noqa: E402
from kvtier.transfer.tp_engine import DistributedTransferEngine  # noqa: E402

TP_SIZE = 2
LAYOUT = KVLayout(2, 2, 16, 4, "float32")
PLAN = TransferPlan((TransferOp(OpKind.OFFLOAD, Tier.GPU, 1, Tier.HOST, 2, 4),))


def attempt(outcome: dict[str, Any], name: str, call: Any) -> None:
    """Record ``call()``'s result, or its exception as 'Type: message'."""
    try:
        outcome[name] = call()
    except Exception as exc:
        outcome[name] = f"{type(exc).__name__}: {exc}"


def rank_main(rank: int, rendezvous: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # NOTE: a collective one rank never joins fails after 20 s.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=TP_SIZE, timeout=timedelta(seconds=20))
    outcome: dict[str, Any] = {}
    try:
        shard = LAYOUT.shard(rank, TP_SIZE)
        gpu, host = KVStorage(shard, 8), KVStorage(shard, 8)
        transfer = DistributedTransferEngine(TorchTransferEngine(gpu, host))
        # Rank 0 is given an empty plan, rank 1 one with an op: a leader's bug.
        attempt(outcome, "mismatched",
                lambda: type(transfer.submit(TransferPlan(()) if rank == 0 else PLAN)).__name__)
        transfer.synchronize_all()
        attempt(outcome, "empty", lambda: type(transfer.submit(TransferPlan(()))).__name__)
        attempt(outcome, "sound", lambda: type(transfer.submit(PLAN)).__name__)
        transfer.synchronize_all()

        namespace = RemoteNamespace("m", LAYOUT).for_rank(rank, TP_SIZE)
        store = AnsweringStore(namespace)
        remote = RemoteShard(store, gpu, host)
        for name, answer in (("None", None), ("raised", ConnectionError("gone")),
                             ("str", "yes"), ("True", True)):
            store.answer = answer if rank == 1 else True  # the leader's store is sound
            attempt(outcome, f"flush {name}",
                    lambda: run_remote(remote, RemoteFlushCommand(1.0), None))
        torch.save(outcome, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Each rank's outcomes of ``rank_main``, in rank order."""
    tmp_path = tmp_path_factory.mktemp("rt25b_tp")
    args = (str(tmp_path / "rendezvous"), str(tmp_path))
    torch.multiprocessing.spawn(rank_main, args=args, nprocs=TP_SIZE, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(TP_SIZE)]


def test_an_empty_plan_on_one_rank_is_refused_on_every_rank(
        outcomes: list[dict[str, Any]]) -> None:
    """Rank 0's empty plan returned a handle at once; rank 1 waited for the agreement.
    Now every rank joins it and raises the same kind of ValueError naming both plans'
    sizes; the ranks stay paired (an empty plan, then a sound one, run on both)."""
    leader, worker = outcomes
    assert leader["mismatched"].startswith(
        "ValueError: the ranks were given different plans (rank 0: 0 ops")
    assert worker["mismatched"].startswith(
        "ValueError: the ranks were given different plans (rank 1: 1 ops")
    assert "1 ops over 2 ranks" in leader["mismatched"]
    for outcome in outcomes:
        assert (outcome["empty"], outcome["sound"]) == ("TransferHandle", "TransferHandle")


def test_a_flush_answered_past_the_contract_is_false_on_every_rank(
        outcomes: list[dict[str, Any]]) -> None:
    """A worker's store whose flush answered None raised TypeError there (``int(None)``),
    alone, while the leader waited in the all-reduce. Now an answer that is no bool, or a
    raise, is "not known flushed": False on every rank; True where every store says so."""
    for outcome in outcomes:
        assert [outcome[f"flush {name}"] for name in ("None", "raised", "str", "True")] == [
            False, False, False, True]


def no_remote_main(rank: int, rendezvous: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=TP_SIZE, timeout=timedelta(seconds=20))
    outcome: dict[str, Any] = {}
    try:
        shard = TensorParallelLlama(LlamaModel(ModelConfig()), rank, TP_SIZE)
        layout = shard.kv_layout(4)
        gpu, host = KVStorage(layout, 8), KVStorage(layout, 8)
        transfer = DistributedTransferEngine(TorchTransferEngine(gpu, host))
        channel = CommandChannel()
        start = time.monotonic()
        if rank == 0:  # the leader starts a remote tier; the worker serves none
            remote = RemoteShard(InMemoryRemoteStore(RemoteNamespace("m", layout)), gpu, host)
            attempt(outcome, "started", lambda: type(DistributedRanks(remote, channel)).__name__)
        else:
            attempt(outcome, "started", lambda: serve(shard, transfer, channel))
        outcome["seconds"] = time.monotonic() - start
        torch.save(outcome, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_worker_serving_no_remote_tier_is_refused_on_every_rank(tmp_path: Path) -> None:
    """A worker whose ``serve`` was given no RemoteShard raised at the leader's first remote
    command, alone: the leader's DistributedRanks waited in the hello's gather until the
    group's timeout (gloo's default: 30 minutes). Now the worker joins the gather and every
    rank raises the same ValueError naming the rank, at once."""
    args = (str(tmp_path / "rendezvous"), str(tmp_path))
    torch.multiprocessing.spawn(no_remote_main, args=args, nprocs=TP_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(TP_SIZE)]
    message = ("ValueError: rank 1 serves no remote tier (pass its RemoteShard to serve), "
               "the leader's has one")
    assert [outcome["started"] for outcome in ranks] == [message, message]
    assert all(outcome["seconds"] < 10 for outcome in ranks)
