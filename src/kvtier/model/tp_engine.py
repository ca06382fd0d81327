"""One scheduler and one manager driving a tensor-parallel model, one process per rank.

Rank 0 (the leader) runs the only :class:`Scheduler` and :class:`KVCacheManager`, inside a
plain :class:`ModelEngine`; the other ranks (workers) hold no manager and only follow. The
leader's model and transfer engine send each call to the workers before doing their own
share, so every rank executes the same plans and forward passes in the same order::

    leader (rank 0)                                  worker (rank r)
    ModelEngine.step()
      scheduler.step() -> plan (block ids for all)
      transfer.submit(plan) ── PlanCommand ────────► submit(plan) on shard r
         all-reduce of failed ops (every rank raises the same TransferError, or none)
      model.forward_chunk ──── ForwardCommand ─────► forward_chunk on shard r
         all-reduce per row-split projection
      sample, scheduler.update
    stop() ─────────────────── StopCommand ────────► serve() returns

Commands travel as pickled NamedTuples over ``channel_group``, which should be a CPU
(gloo) group so that control never waits on a GPU stream; the manager never learns that
ranks exist (it plans block ids; each rank's storage holds its heads of every block).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import torch

from kvtier.manager import KVCacheManager
from kvtier.model.engine import ModelEngine
from kvtier.model.llama import LlamaModel
from kvtier.model.tensor_parallel import TensorParallelLlama
from kvtier.scheduler import Scheduler
from kvtier.storage import KVStorage
from kvtier.transfer.engine import TransferError
from kvtier.transfer.plan import TransferOp, TransferPlan
from kvtier.transfer.torch_engine import TorchTransferEngine
from kvtier.transfer.torch_handle import TransferHandle, TransferStats
from kvtier.transfer.tp_engine import DistributedTransferEngine


class PlanCommand(NamedTuple):
    """Execute this plan on your shard."""

    ops: tuple[TransferOp, ...]


class ForwardCommand(NamedTuple):
    """Run ``tokens`` from ``start_pos`` through your shard, over ``block_table``."""

    block_table: list[int]
    tokens: list[int]
    start_pos: int


class StopCommand(NamedTuple):
    """The leader is done: return from ``serve``."""

    num_steps: int


Command = PlanCommand | ForwardCommand | StopCommand


class CommandChannel:
    """Commands from rank ``src`` (global rank) to every rank of ``group``; a collective:
    the leader ``send``s exactly when every worker ``receive``s."""

    def __init__(self, group: Any = None, src: int = 0) -> None:
        self.group = group
        self.src = src

    def send(self, command: Command) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([command], src=self.src, group=self.group)

    def receive(self) -> Command:
        import torch.distributed as dist

        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=self.src, group=self.group)
        command = box[0]
        if not isinstance(command, PlanCommand | ForwardCommand | StopCommand):
            raise TypeError(f"expected a command from rank {self.src}, got {command!r}")
        return command


class _LeaderTransfer:
    """The leader's transfer engine as ModelEngine sees it: each plan goes to the workers,
    then runs here; failures are joined over every rank."""

    def __init__(self, transfer: DistributedTransferEngine, channel: CommandChannel) -> None:
        self._transfer = transfer
        self._channel = channel
        self.gpu: KVStorage = transfer.gpu
        self.host: KVStorage | None = transfer.host

    @property
    def stats(self) -> TransferStats:
        return self._transfer.stats

    def submit(self, plan: TransferPlan) -> TransferHandle:
        if plan.ops:  # an empty plan is no work and no collective, on any rank
            self._channel.send(PlanCommand(plan.ops))
        return self._transfer.submit(plan)

    def wait(self, handle: TransferHandle, layer: int | None = None) -> None:
        self._transfer.wait(handle, layer)

    def synchronize_all(self) -> None:
        self._transfer.synchronize_all()


class _LeaderModel:
    """The leader's model as ModelEngine sees it: each forward pass goes to the workers,
    then runs on the leader's shard."""

    def __init__(self, shard: TensorParallelLlama, channel: CommandChannel) -> None:
        self._shard = shard
        self._channel = channel
        self.config = shard.config
        self.device = shard.device

    def forward_chunk(self, kv: KVStorage, block_table: Sequence[int], tokens: Sequence[int],
                      start_pos: int,
                      before_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        self._channel.send(ForwardCommand(list(block_table), list(tokens), start_pos))
        return self._shard.forward_chunk(kv, block_table, tokens, start_pos, before_layer)


class TensorParallelLeader:
    """Rank 0: ``engine`` is a :class:`ModelEngine` over the one scheduler and manager,
    whose copies and forward passes run on every rank. Call :meth:`stop` when done (the
    workers' ``serve`` returns)."""

    def __init__(self, shard: TensorParallelLlama, transfer: DistributedTransferEngine,
                 manager: KVCacheManager, scheduler: Scheduler, channel: CommandChannel,
                 record_logits: bool = False) -> None:
        if shard.tp_rank != channel.src:
            raise ValueError(f"the leader is rank {channel.src} of the channel, this shard "
                             f"rank {shard.tp_rank}")
        if shard.tp_rank != transfer.tp_rank or shard.tp_size != transfer.tp_size:
            raise ValueError(f"the shard is rank {shard.tp_rank} of {shard.tp_size}, the "
                             f"transfer engine rank {transfer.tp_rank} of {transfer.tp_size}")
        self.channel = channel
        self.transfer = transfer
        # NOTE: ModelEngine names LlamaModel and TorchTransferEngine; it calls only
        # forward_chunk and submit / wait / synchronize_all / gpu, which these provide.
        self.engine = ModelEngine(cast(LlamaModel, _LeaderModel(shard, channel)), manager,
                                  scheduler, cast(TorchTransferEngine,
                                                  _LeaderTransfer(transfer, channel)),
                                  record_logits=record_logits)

    def stop(self) -> None:
        self.channel.send(StopCommand(self.engine.num_steps))


def serve(shard: TensorParallelLlama, transfer: DistributedTransferEngine,
          channel: CommandChannel) -> int:
    """A worker rank: execute the leader's commands until it stops; returns the leader's
    step count. A plan that failed anywhere raises here as on the leader: this rank waits
    for its own copies and its next forward passes wait for nothing (the manager has
    dropped what the failed copies were to fill)."""
    if shard.tp_rank == channel.src:
        raise ValueError(f"rank {shard.tp_rank} is the leader: it runs TensorParallelLeader")
    wait: Callable[[int], None] | None = None
    while True:
        command = channel.receive()
        if isinstance(command, PlanCommand):
            try:
                handle = transfer.submit(TransferPlan(command.ops))
                wait = functools.partial(transfer.wait, handle)
            except TransferError:
                transfer.synchronize_all()
                wait = None
        elif isinstance(command, ForwardCommand):
            shard.forward_chunk(transfer.gpu, command.block_table, command.tokens,
                                command.start_pos, wait)
        else:
            return command.num_steps
