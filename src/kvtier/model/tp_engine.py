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
      remote write-through ─── RemotePutCommand ───► put shard r of the prompts computed
    transfer.stats ─────────── StatsCommand ───────► all-gather of each rank's counters
    stop() ─────────────────── StatsCommand ───────► (the last counters, kept)
           ─────────────────── StopCommand ────────► serve() returns

With a remote tier (:class:`DistributedRanks`), the leader's :class:`RemoteTier` sends
each of its calls to the workers, whose :class:`RemoteShard` does it on their shard::

    write (write-through, write-back)  ── RemotePut ──►  put its shard of those blocks
    start_fetch                        ── RemoteGet ──►  look its shards up (I/O thread)
    poll                               ── RemotePoll ─►  all-gather of what arrived: a
                                                         block is found where every rank
                                                         found it; the leader imports
                                       ── RemoteFill ─►  write its shards into those slots

Commands travel as pickled NamedTuples over ``channel_group``, which should be a CPU
(gloo) group so that control never waits on a GPU stream; the manager never learns that
ranks exist (it plans block ids; each rank's storage holds its heads of every block).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple, cast

import torch

from kvtier.manager import KVCacheManager
from kvtier.model.engine import ModelEngine, check_kv_layout
from kvtier.model.llama import LlamaModel
from kvtier.model.tensor_parallel import TensorParallelLlama
from kvtier.remote.options import check_number
from kvtier.remote.ranks import Arrival, RemoteRanks, RemoteShard, join_arrivals
from kvtier.remote.tier import RemoteTier
from kvtier.reprs import shown
from kvtier.scheduler import Scheduler
from kvtier.storage import KVLayout, KVStorage
from kvtier.tier import Tier
from kvtier.transfer.plan import TransferOp, TransferPlan
from kvtier.transfer.torch_engine import TorchTransferEngine
from kvtier.transfer.torch_handle import TransferHandle, TransferStats
from kvtier.transfer.tp_engine import DistributedTransferEngine
from kvtier.wiring import Wired


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


class StatsCommand(NamedTuple):
    """Join the gather of every rank's transfer counters (``_gather_rank_stats``)."""


class RemoteHelloCommand(NamedTuple):
    """A remote tier starts: check that every rank's store is its rank's namespace."""


class RemotePutCommand(NamedTuple):
    """Put your shard of blocks ``(hash, slot)`` of the ``tier`` storage."""

    tier: Tier
    blocks: list[tuple[int, int]]
    wait: bool


class RemoteGetCommand(NamedTuple):
    """Look up your shards of ``hashes`` as fetch ``fetch_id`` (now, or on the I/O thread)."""

    fetch_id: int
    hashes: list[int]
    blocking: bool


class RemoteWaitCommand(NamedTuple):
    """Block until fetch ``fetch_id`` arrived here, at most ``timeout_s``."""

    fetch_id: int
    timeout_s: float


class RemotePollCommand(NamedTuple):
    """Say which of ``fetch_ids`` arrived here and what each found (an all-gather)."""

    fetch_ids: list[int]


class RemoteFillCommand(NamedTuple):
    """Write what fetch ``fetch_id`` found into host slots ``(hash, slot)``; forget it."""

    fetch_id: int
    blocks: list[tuple[int, int]]


class RemoteFlushCommand(NamedTuple):
    """Wait for your store's queued jobs (at most ``timeout_s``); all-reduce the outcome."""

    timeout_s: float | None


class RemoteLostCommand(NamedTuple):
    """Say which hashes your store's background writes lost since the last ask (an
    all-gather; the leader forgets them, so a later write of them is not skipped)."""


RemoteCommand = (RemoteHelloCommand | RemotePutCommand | RemoteGetCommand | RemoteWaitCommand
                 | RemotePollCommand | RemoteFillCommand | RemoteFlushCommand
                 | RemoteLostCommand)
Command = PlanCommand | ForwardCommand | StopCommand | StatsCommand | RemoteCommand
_COMMANDS = (PlanCommand, ForwardCommand, StopCommand, StatsCommand, RemoteHelloCommand,
             RemotePutCommand,
             RemoteGetCommand, RemoteWaitCommand, RemotePollCommand, RemoteFillCommand,
             RemoteFlushCommand, RemoteLostCommand)


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
        if not isinstance(command, _COMMANDS):
            raise TypeError(f"expected a command from rank {self.src}, got {shown(command)}")
        return command


def _gather_rank_stats(transfer: DistributedTransferEngine, group: Any) -> list[TransferStats]:
    """Every rank's transfer counters, in TP rank order: one all-gather over ``group`` (a
    collective: the leader's and each worker's part of a StatsCommand)."""
    import torch.distributed as dist

    every: list[Any] = [None] * dist.get_world_size(group)
    mine = (transfer.tp_rank, dataclasses.replace(transfer.local_stats))  # a snapshot
    dist.all_gather_object(every, mine, group=group)
    return [stats for _, stats in sorted(every, key=lambda entry: entry[0])]


class _LeaderTransfer:
    """The leader's transfer engine as ModelEngine sees it: each plan goes to the workers,
    then runs here; failures are joined over every rank.

    ``stats`` is the counters summed over every rank (``TransferStats.total``: ``num_ops``
    is ``tp_size`` times the plans' ops, the bytes the whole model's), ``rank_stats`` each
    rank's, in rank order, as ``ShardedTransferEngine``'s: while the workers serve, each
    read asks them (a StatsCommand: one all-gather; stats are read rarely); after
    ``TensorParallelLeader.stop``, the counters gathered at the stop.

    NOTE: ``stats`` was rank 0's counters alone, with nothing saying so (a TP 2 run
    reported half its bytes and ops)."""

    def __init__(self, transfer: DistributedTransferEngine, channel: CommandChannel) -> None:
        self._transfer = transfer
        self._channel = channel
        self.gpu: KVStorage = transfer.gpu
        self.host: KVStorage | None = transfer.host
        self._stopped_stats: list[TransferStats] | None = None

    @property
    def stats(self) -> TransferStats:
        return TransferStats.total(self.rank_stats)

    @property
    def rank_stats(self) -> list[TransferStats]:
        if self._stopped_stats is not None:
            return [dataclasses.replace(s) for s in self._stopped_stats]
        self._channel.send(StatsCommand())
        return _gather_rank_stats(self._transfer, self._channel.group)

    def stop(self, num_steps: int) -> None:
        """Tell the workers to stop, keeping every rank's last counters (idempotent)."""
        if self._stopped_stats is None:
            # NOTE: a StatsCommand of its own, StopCommand unchanged: a leader driving the
            # channel by hand still stops a worker with StopCommand alone.
            self._stopped_stats = self.rank_stats
            self._channel.send(StopCommand(num_steps))

    def submit(self, plan: TransferPlan) -> TransferHandle:
        if not plan.ops:
            # No work and no collective, on any rank: no command, so no worker submits it.
            return self._transfer.engine.submit(plan)
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

    def kv_layout(self, tokens_per_block: int, layout: str = "block_major") -> KVLayout:
        return self._shard.kv_layout(tokens_per_block, layout)

    def forward_chunk(self, kv: KVStorage, block_table: Sequence[int], tokens: Sequence[int],
                      start_pos: int,
                      before_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        self._channel.send(ForwardCommand(list(block_table), list(tokens), start_pos))
        return self._shard.forward_chunk(kv, block_table, tokens, start_pos, before_layer)


class DistributedRanks(RemoteRanks):
    """The leader's view of every rank's :class:`RemoteShard`, one process per rank: each
    call goes to the workers over ``channel`` (their ``serve`` does it on their shard), then
    runs on the leader's ``shard``; what arrived is joined with one all-gather. Construction
    is a collective (the workers' ``serve`` must be running): every rank's store must be
    its rank's namespace of one deployment, else every rank raises the same ValueError.

    ``lost`` asks the workers for the writes their stores lost (one all-gather) at most
    every ``lost_every_s`` seconds (0: at every call), the leader's own at every call: a
    lost write is rare, and the tier asks at every write."""

    def __init__(self, shard: RemoteShard, channel: CommandChannel,
                 lost_every_s: float = 1.0) -> None:
        import torch.distributed as dist

        self.lost_every_s = check_number("lost_every_s", lost_every_s, 0.0, 3600.0)
        self._next_lost_s = -math.inf

        rank, size = dist.get_rank(channel.group), dist.get_world_size(channel.group)
        if rank != channel.src:
            raise ValueError(f"the leader is rank {channel.src} of the channel, this process "
                             f"rank {rank}")
        self.leader = shard
        self.tp_size = size
        self.channel = channel
        self._run(RemoteHelloCommand())

    def _run(self, command: RemoteCommand) -> object:
        self.channel.send(command)
        return run_remote(self.leader, command, self.channel.group)

    def put(self, tier: Tier, blocks: Sequence[tuple[int, int]], wait: bool) -> int:
        written = self._run(RemotePutCommand(tier, list(blocks), wait))
        assert isinstance(written, int)
        return written

    def start_get(self, fetch_id: int, hashes: Sequence[int]) -> bool:
        if not self.leader.start_get(fetch_id, hashes):
            return False  # no worker learns of it
        self.channel.send(RemoteGetCommand(fetch_id, list(hashes), False))
        return True

    def get(self, fetch_id: int, hashes: Sequence[int]) -> None:
        self._run(RemoteGetCommand(fetch_id, list(hashes), True))

    def wait(self, fetch_id: int, timeout_s: float) -> None:
        self._run(RemoteWaitCommand(fetch_id, timeout_s))

    def collect(self, fetch_ids: Collection[int]) -> dict[int, Arrival]:
        joined = self._run(RemotePollCommand(list(fetch_ids)))
        assert isinstance(joined, dict)
        return joined

    def fill(self, fetch_id: int, blocks: Sequence[tuple[int, int]]) -> None:
        self._run(RemoteFillCommand(fetch_id, list(blocks)))

    def flush(self, timeout_s: float | None) -> bool:
        return bool(self._run(RemoteFlushCommand(timeout_s)))

    def lost(self) -> set[int]:
        # NOTE: a worker's lost writes stayed on the worker (dropped there after every
        # command): the leader kept those blocks as held by the store and skipped them in
        # every later write of their prefix, so the store never held them whole again.
        now = time.monotonic()
        if now < self._next_lost_s:
            return self.leader.lost()
        self._next_lost_s = now + self.lost_every_s
        lost = self._run(RemoteLostCommand())
        assert isinstance(lost, set)
        return lost


def run_remote(shard: RemoteShard, command: RemoteCommand, group: Any) -> object:
    """Do ``command`` on this rank's ``shard``, with the collectives every rank makes for
    it (the leader right after sending it, each worker on receiving it); what the leader's
    :class:`DistributedRanks` returns."""
    import torch.distributed as dist

    if isinstance(command, RemoteHelloCommand):
        _hello(shard, group)
    elif isinstance(command, RemotePutCommand):
        written = shard.put(command.tier, command.blocks, command.wait)
        return _min_over_ranks(written, group) if command.wait else written
    elif isinstance(command, RemoteGetCommand):
        if command.blocking:
            shard.get(command.fetch_id, command.hashes)
        elif not shard.start_get(command.fetch_id, command.hashes):
            shard.miss(command.fetch_id)  # the leader's started: this rank found nothing
    elif isinstance(command, RemoteWaitCommand):
        shard.wait(command.fetch_id, command.timeout_s)
    elif isinstance(command, RemotePollCommand):
        arrived: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(arrived, shard.arrivals(command.fetch_ids), group=group)
        return join_arrivals(arrived)
    elif isinstance(command, RemoteFillCommand):
        shard.fill(command.fetch_id, command.blocks)
    elif isinstance(command, RemoteLostCommand):
        lost: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(lost, shard.lost(), group=group)
        return set().union(*lost)
    else:
        return bool(_min_over_ranks(int(shard.flush(command.timeout_s)), group))
    return None


def _hello(shard: RemoteShard | None, group: Any) -> None:
    """Every rank's part of a remote tier's start: ValueError on every rank alike unless
    each serves one (``shard`` None: this worker serves none) and each rank's store is its
    rank's namespace of the leader's deployment."""
    import torch.distributed as dist

    mine: tuple[str, list[str], str] | None = None
    if shard is not None:
        namespace = shard.store.namespace
        mine = (namespace.fingerprint, [ns.fingerprint for ns in namespace.every_rank()],
                str(namespace))
    every: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    for rank, entry in enumerate(every):
        if entry is None:
            raise ValueError(f"rank {rank} serves no remote tier (pass its RemoteShard to "
                             f"serve), the leader's has one")
    expected = every[0][1]
    for rank, (fingerprint, _, described) in enumerate(every):
        if len(expected) != len(every) or fingerprint != expected[rank]:
            raise ValueError(f"rank {rank}'s store has namespace {described}, not rank "
                             f"{rank} of {len(every)} of the leader's deployment "
                             f"({every[0][2]})")


def _min_over_ranks(value: int, group: Any) -> int:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":  # NCCL reduces device tensors only
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t.item())


class TensorParallelLeader(Wired):
    """Rank 0: ``engine`` is a :class:`ModelEngine` over the one scheduler and manager,
    whose copies and forward passes run on every rank (and the ``remote`` tier's moves, over
    :class:`DistributedRanks` on ``channel``). Call :meth:`stop` when done (the
    workers' ``serve`` returns). ``engine.transfer.stats``: the transfer counters summed
    over every rank; ``engine.transfer.rank_stats``: each rank's (see ``_LeaderTransfer``);
    ``transfer.local_stats``: the leader's own."""

    WIRED = frozenset({"engine", "transfer", "channel"})

    def __init__(self, shard: TensorParallelLlama, transfer: DistributedTransferEngine,
                 manager: KVCacheManager, scheduler: Scheduler, channel: CommandChannel,
                 record_logits: bool = False, remote: RemoteTier | None = None) -> None:
        if shard.tp_rank != channel.src:
            raise ValueError(f"the leader is rank {channel.src} of the channel, this shard "
                             f"rank {shard.tp_rank}")
        if shard.tp_rank != transfer.tp_rank or shard.tp_size != transfer.tp_size:
            raise ValueError(f"the shard is rank {shard.tp_rank} of {shard.tp_size}, the "
                             f"transfer engine rank {transfer.tp_rank} of {transfer.tp_size}")
        if remote is not None and (not isinstance(remote.ranks, DistributedRanks)
                                   or remote.ranks.channel is not channel):
            raise ValueError("the remote tier must run over DistributedRanks on this "
                             "leader's channel (every rank moves its own shards)")
        self.channel = channel
        self.transfer = transfer
        # NOTE: ModelEngine names LlamaModel and TorchTransferEngine; it calls only
        # forward_chunk and submit / wait / synchronize_all / gpu, which these provide.
        self._leader_transfer = _LeaderTransfer(transfer, channel)
        self.engine = ModelEngine(cast(LlamaModel, _LeaderModel(shard, channel)), manager,
                                  scheduler, cast(TorchTransferEngine, self._leader_transfer),
                                  record_logits=record_logits, remote=remote)

    def stop(self) -> None:
        """The workers' ``serve`` returns, after one gather of every rank's transfer
        counters (``engine.transfer.stats`` answers them from then on). Idempotent."""
        self._leader_transfer.stop(self.engine.num_steps)


def serve(shard: TensorParallelLlama, transfer: DistributedTransferEngine,
          channel: CommandChannel, remote: RemoteShard | None = None) -> int:
    """A worker rank: execute the leader's commands until it stops; returns the leader's
    step count. ``remote`` is this rank's shard of the leader's remote tier, if it has one.
    A plan that failed (or was refused) anywhere raises here as on the leader, which
    degrades it to recompute: this rank waits for its own copies and its next forward
    passes wait for nothing (the manager has dropped what the failed copies were to
    fill)."""
    if shard.tp_rank == channel.src:
        raise ValueError(f"rank {shard.tp_rank} is the leader: it runs TensorParallelLeader")
    # NOTE: the leader's ModelEngine checks its own shard against its storage; a worker's
    # shard of another model (or rank) than its storage failed its first forward pass
    # alone, leaving the other ranks waiting in that pass's all-reduce.
    layout = transfer.gpu.layout
    check_kv_layout(f"rank {shard.tp_rank}'s GPU storage", layout,
                    shard.kv_layout(layout.tokens_per_block))
    wait: Callable[[int], None] | None = None
    copies_unwaited = False  # copies submitted that this CPU has not waited for
    while True:
        command = channel.receive()
        if isinstance(command, PlanCommand):
            try:
                handle = transfer.submit(TransferPlan(command.ops))
                wait = functools.partial(transfer.wait, handle)
                copies_unwaited = bool(command.ops)
            except Exception:
                # NOTE: as the leader's ModelEngine degrades any fault of a submit (it
                # raises alike on every rank: a TransferError, a plan refused as out of the
                # pools or unlike the other ranks'); a ValueError ended this rank's serve
                # while the leader went on, its next command waiting on a rank that was gone.
                transfer.synchronize_all()
                wait = None
        elif isinstance(command, ForwardCommand):
            shard.forward_chunk(transfer.gpu, command.block_table, command.tokens,
                                command.start_pos, wait)
        elif isinstance(command, StatsCommand):
            _gather_rank_stats(transfer, channel.group)
        elif isinstance(command, StopCommand):
            return command.num_steps
        elif remote is None:
            if isinstance(command, RemoteHelloCommand):
                # NOTE: raised here alone, the leader's DistributedRanks waited in the
                # hello's gather for the group's timeout (gloo's: 30 minutes); joined, every
                # rank raises alike.
                _hello(None, channel.group)
            raise ValueError(f"rank {shard.tp_rank} got {type(command).__name__} but serves "
                             f"no remote tier (pass its RemoteShard to serve)")
        else:
            if copies_unwaited:
                # NOTE: a remote command reads or writes this rank's host slots on the CPU
                # (as ``ModelEngine.step`` waits on the leader): the last plan's copies
                # first.
                transfer.synchronize_all()
                copies_unwaited = False
            run_remote(remote, command, channel.group)
