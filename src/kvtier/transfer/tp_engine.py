"""Tensor parallelism on the data plane: one :class:`TransferPlan` on every rank's shard.

Under tensor parallelism one manager decides block ids for all ranks, and each rank holds
its share of the KV heads of every block (``KVLayout.tp_rank`` of ``tp_size``). A plan is
therefore executed once per rank, on that rank's storages, by that rank's own
:class:`TorchTransferEngine` (its own streams on its own GPU, its own pinned host shard)::

    manager ── plan ──┬── rank 0: TorchTransferEngine(gpu shard 0, host shard 0)
                      ├── rank 1: TorchTransferEngine(gpu shard 1, host shard 1)
                      └── ...      all at once
    failed ops = the union over ranks  ──>  TransferError for the manager

A block is never half onboarded: an op that failed on any rank is reported failed, so the
manager drops its destination on every rank (the ranks where it succeeded hold bytes that
nobody will read). Two ways to hold the ranks:

    ShardedTransferEngine      one process holds every rank's storages (one GPU with two
                               storages, several GPUs driven from one process, or CPU)
    DistributedTransferEngine  one process per rank (torch.distributed); the failures are
                               joined with one all-reduce of a byte per op
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from kvtier.storage import MODEL_SHAPE_FIELDS
from kvtier.transfer.engine import TransferError
from kvtier.transfer.plan import PlanColumns, TransferPlan
from kvtier.transfer.torch_engine import TorchTransferEngine
from kvtier.transfer.torch_handle import TransferHandle, TransferStats

if TYPE_CHECKING:
    from kvtier.storage import KVLayout, KVStorage

MAX_TP_SIZE = 63


def union_error(plan: TransferPlan,
                failed_by_rank: Sequence[Sequence[int]]) -> TransferError | None:
    """The error the manager must see when rank ``r`` failed the ops at positions
    ``failed_by_rank[r]`` of ``plan``: every op that failed anywhere, in plan order; ``None``
    when every rank did every op. Pure."""
    failed = sorted({i for indices in failed_by_rank for i in indices})
    if not failed:
        return None
    ranks = [r for r, indices in enumerate(failed_by_rank) if indices]
    return TransferError(f"{len(failed)} of {len(plan.ops)} copies not done on every rank "
                         f"(failed on rank(s) {ranks})", [plan.ops[i] for i in failed], failed)


def _check_shards(layouts: Sequence[KVLayout], tp_size: int) -> None:
    """ValueError unless ``layouts[r]`` is rank ``r``'s shard of one model's blocks (one
    shape and dtype: the first's), split over ``tp_size`` ranks. Pure.

    NOTE: only the ranks were compared: shards of two models (another head_dim, layer
    count or dtype) ran one plan as one deployment's."""
    first = layouts[0]
    for rank, layout in enumerate(layouts):
        if (layout.tp_rank, layout.tp_size) != (rank, tp_size):
            raise ValueError(f"engine {rank} holds the shard of rank {layout.tp_rank} of "
                             f"{layout.tp_size}, expected rank {rank} of {tp_size}")
        if layout.model_shape != first.model_shape:
            raise ValueError(f"engine {rank} holds a shard of {layout}, engine 0 of {first}: "
                             f"every rank must hold a shard of the same model's blocks")



class ShardedHandle:
    """A plan submitted to every rank of a :class:`ShardedTransferEngine`: one
    :class:`TransferHandle` per rank, in rank order."""

    __slots__ = ("handles", "plan")

    def __init__(self, plan: TransferPlan, handles: list[TransferHandle]) -> None:
        self.plan = plan
        self.handles = handles


class ShardedTransferEngine:
    """Executes each plan on the shards of every rank held by this process.

    ``engines[r]`` moves rank ``r``'s shard; all must hold ranks ``0..n-1`` of ``n`` with
    pools of the same sizes (the same block ids). On CUDA each engine queues its copies on
    its own streams and returns, so the ranks copy at the same time from one thread. On CPU
    copies are done when ``submit`` returns, so the ranks run on threads of their own (the
    copies release the GIL). ``stats``: the counters summed over the ranks;
    ``rank_stats``: each rank's, in rank order.
    """

    def __init__(self, engines: Sequence[TorchTransferEngine]) -> None:
        if not engines:
            raise ValueError("engines must hold at least one rank's engine")
        _check_shards([e.gpu.layout for e in engines], len(engines))
        sizes = {(e.gpu.num_blocks, None if e.host is None else e.host.num_blocks)
                 for e in engines}
        if len(sizes) != 1:
            raise ValueError(f"every rank must hold pools of the same size (the same block "
                             f"ids), got (gpu, host) blocks {sorted(sizes, key=str)}")
        self.engines = list(engines)
        self.is_cuda = engines[0].is_cuda
        # NOTE: CUDA submits only queue work; a thread per rank would also move the
        # caller's current stream out of reach (it is per thread).
        self._pool = (None if self.is_cuda or len(engines) == 1
                      else ThreadPoolExecutor(len(engines), thread_name_prefix="kvtier-tp"))

    @property
    def tp_size(self) -> int:
        return len(self.engines)

    @property
    def gpu(self) -> list[KVStorage]:
        """Each rank's GPU shard, in rank order."""
        return [e.gpu for e in self.engines]

    @property
    def stats(self) -> TransferStats:
        """The counters summed over every rank (``TransferStats.total`` of ``rank_stats``):
        each rank counts its own shard's copies, so ``num_ops`` is ``tp_size`` times the
        plan's ops and the bytes are the whole model's."""
        return TransferStats.total(self.rank_stats)

    @property
    def rank_stats(self) -> list[TransferStats]:
        """Each rank's own counters, in rank order.

        NOTE: ``stats`` was this list while ``DistributedTransferEngine.stats`` was one
        rank's and the TP leader's rank 0's alone, all under one name."""
        return [e.stats for e in self.engines]

    def submit(self, plan: TransferPlan) -> ShardedHandle:
        """Start ``plan`` on every rank. Raises TransferError naming every op that failed on
        any rank (the others ran everywhere); ValueError (copying nothing anywhere) for an
        op outside the pools; TypeError, copying nothing, for what is no TransferPlan."""
        _check_plan(plan)
        if self._pool is None:
            outcomes = [_submit(e, plan) for e in self.engines]
        else:
            outcomes = list(self._pool.map(lambda e: _submit(e, plan), self.engines))
        error = union_error(plan, [o.failed_indices if isinstance(o, TransferError) else ()
                                   for o in outcomes])
        if error is not None:
            raise error
        return ShardedHandle(plan, [o for o in outcomes if isinstance(o, TransferHandle)])

    def wait(self, handle: ShardedHandle, layer: int | None = None) -> None:
        """Make each rank's device's current stream wait for its copies (of ``layer``).
        TypeError or ValueError, as ``poll``'s, for a handle that is none of this
        engine's ranks'."""
        for engine, h in zip(self.engines, self._handles(handle), strict=True):
            engine.wait(h, layer)

    def poll(self, handle: ShardedHandle) -> bool:
        """Whether every rank's copies of ``handle`` are done. Pure. TypeError for what is
        no ShardedHandle, ValueError for one of another number of ranks."""
        return all(e.poll(h) for e, h in zip(self.engines, self._handles(handle), strict=True))

    def synchronize(self, handle: ShardedHandle) -> None:
        """Block the CPU until every rank's copies of ``handle`` are done. Errors as
        ``poll``'s."""
        for engine, h in zip(self.engines, self._handles(handle), strict=True):
            engine.synchronize(h)

    def _handles(self, handle: object) -> list[TransferHandle]:
        """``handle``'s per-rank handles, checked. Pure.

        NOTE: a rank's TransferHandle (or a str) was an AttributeError ('handles'), and a
        handle of an engine of fewer ranks zip's 'argument 2 is shorter than argument 1'."""
        if not isinstance(handle, ShardedHandle):
            raise TypeError(f"handle must be a ShardedHandle, got {type(handle).__name__}")
        if len(handle.handles) != len(self.engines):
            raise ValueError(f"handle holds {len(handle.handles)} ranks' handles, this engine "
                             f"{len(self.engines)} ranks")
        return handle.handles

    def synchronize_all(self) -> None:
        for engine in self.engines:
            engine.synchronize_all()

    def close(self) -> None:
        """Stop the CPU threads (idempotent); later plans run the ranks one after another
        on the caller's thread.

        NOTE: a plan submitted after close raised the thread pool's RuntimeError ('cannot
        schedule new futures after shutdown'), which a ModelEngine took for a failed copy
        of every op, every step."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()


def _check_plan(plan: object) -> None:
    """TypeError unless ``plan`` is a TransferPlan. Pure.

    NOTE: a rank's engine refused it (TypeError), which ``_submit`` took for an engine's
    fault, and its report of every op failed read ``plan.ops``: an AttributeError ('str'
    object has no attribute 'ops') out of ``submit``, naming nothing."""
    if not isinstance(plan, TransferPlan):
        raise TypeError(f"plan must be a TransferPlan, got {type(plan).__name__}")


def _submit(engine: TorchTransferEngine, plan: TransferPlan) -> TransferHandle | TransferError:
    """``plan`` started on one rank's ``engine``, or the error that says which of its ops
    failed there. ValueError (an op outside the pools, refused before any copy and alike on
    every rank, whose pools have the same sizes) is raised; any other fault of the engine
    leaves every op in doubt on that rank, and is reported as such, so that every rank
    still joins the agreement on what failed."""
    try:
        return engine.submit(plan)
    except TransferError as exc:
        return exc
    except ValueError:
        raise
    except Exception as exc:
        ops = plan.ops
        return TransferError(f"{len(ops)} of {len(ops)} copies not done: the engine raised "
                             f"{type(exc).__name__}: {exc}", ops, range(len(ops)))


class DistributedTransferEngine:
    """One rank's side of a plan, in a process of its own: runs the plan on this rank's
    ``engine``, then agrees with every rank of ``group`` (a ``torch.distributed`` process
    group, the default one when ``None``) on the ops that failed anywhere.

    Every rank must ``submit`` the same plans in the same order (the leader sends them,
    ``kvtier.model.tp_engine``). Every plan, an empty one too, costs one all-reduce of six
    words that checks every rank ran the same plan and counts the ops that failed
    (``_agree_on``), and where any did, one more of a word per op (bit ``r`` set where rank
    ``r`` failed it); a CPU (gloo) group keeps them off the GPU's streams.
    Construction is a collective too: every rank's pools must have the same sizes.
    Counts: ``num_failed_ops`` (ops reported failed), ``num_failed_elsewhere`` (of those,
    ops this rank had done); ``local_stats``: this rank's ``TransferStats`` alone (no
    ``stats``: totals need every rank, which only a collective can ask).
    """

    def __init__(self, engine: TorchTransferEngine, group: Any = None) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("DistributedTransferEngine needs torch.distributed initialised "
                             "(init_process_group) in every rank's process")
        layout = engine.gpu.layout
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        if size > MAX_TP_SIZE:  # the same on every rank
            raise ValueError(f"at most {MAX_TP_SIZE} ranks (one bit each in an int64), "
                             f"got {size}")
        # Same pools, same block ids: then a bad op is refused on every rank alike. Shards
        # of one model's blocks (as ShardedTransferEngine's ``_check_shards``).
        # NOTE: only the pools' sizes were compared: ranks holding shards of two models
        # (another dtype, head_dim, layer count) ran every plan as one deployment's, and the
        # first forward pass that failed on one rank alone left the others waiting in its
        # all-reduce. Gathered in one collective, refused on every rank alike.
        # NOTE: a rank whose storage holds another rank's shard raised before the gather,
        # alone: the others waited in it until the group's timeout (gloo's: 30 minutes).
        # Its shard is gathered too, and every rank raises alike.
        every: list[Any] = [None] * size
        mine = ((engine.gpu.num_blocks, None if engine.host is None else engine.host.num_blocks),
                layout.model_shape, (layout.tp_rank, layout.tp_size))
        dist.all_gather_object(every, mine, group=group)
        for r, (_, _, (held_rank, held_size)) in enumerate(every):
            if (held_rank, held_size) != (r, size):
                raise ValueError(f"rank {r} of {size} in the group holds the shard of rank "
                                 f"{held_rank} of {held_size}")
        sizes = [pools for pools, _, _ in every]
        if len(set(sizes)) != 1:
            raise ValueError(f"every rank must hold pools of the same size (the same block "
                             f"ids), got (gpu, host) blocks by rank {sizes}")
        shapes = [shape for _, shape, _ in every]
        if len(set(shapes)) != 1:
            raise ValueError(f"every rank must hold a shard of the same model's blocks, got "
                             f"({', '.join(MODEL_SHAPE_FIELDS)}) by rank {shapes}")
        self.engine = engine
        self.group = group
        self.tp_rank = rank
        self.tp_size = size
        self._on_device = dist.get_backend(group) == "nccl"
        self.num_failed_ops = 0
        self.num_failed_elsewhere = 0

    @property
    def gpu(self) -> KVStorage:
        return self.engine.gpu

    @property
    def host(self) -> KVStorage | None:
        return self.engine.host

    @property
    def local_stats(self) -> TransferStats:
        """This rank's own counters (its shard's copies only), no collective. Totals over
        the ranks need the others' counters: the TP leader's engine gathers them
        (``kvtier.model.tp_engine``: ``stats`` and ``rank_stats``).

        NOTE: this was ``stats``, the name under which ``ShardedTransferEngine`` answers
        totals: a reader took one rank's counters for the deployment's."""
        return self.engine.stats

    def submit(self, plan: TransferPlan) -> TransferHandle:
        """Start ``plan`` on this rank; raises TransferError (on every rank alike) naming
        every op that failed on any rank; ValueError, before copying, for an op outside the
        pools (the same on every rank: the pools have the same sizes), and ValueError on
        every rank alike where the ranks were given different plans. A collective, an
        empty plan's too (a caller that skips empty plans skips them on every rank, as
        ``kvtier.model.tp_engine``'s leader and workers do). TypeError, copying nothing
        (and joining no collective), for what is no TransferPlan.

        NOTE: an empty plan joined no agreement: a rank given one returned at once while a
        rank given a plan with ops waited in the agreement's all-reduce for a collective
        that never came (or met the next, unlike one)."""
        _check_plan(plan)
        refused: ValueError | None = None
        try:
            outcome: TransferHandle | TransferError | None = _submit(self.engine, plan)
        except ValueError as exc:  # still joins the agreement: no rank is left waiting
            refused, outcome = exc, None
        local = outcome.failed_indices if isinstance(outcome, TransferError) else ()
        num_failed = self._agree_on(plan, len(local), refused is not None)
        if refused is not None:
            raise refused
        if not num_failed:
            assert isinstance(outcome, TransferHandle)
            return outcome
        error = union_error(plan, self._failed_by_rank(len(plan.ops), local))
        assert error is not None
        self.num_failed_ops += len(error.failed_indices)
        self.num_failed_elsewhere += len(error.failed_indices) - len(local)
        raise error

    def _agree_on(self, plan: TransferPlan, num_failed: int, refused: bool) -> int:
        """Check that every rank submitted this same plan, and return how many of its ops
        failed over all ranks (0: none anywhere, and no further collective is needed): one
        all-reduce of six words (the plan's length and a fingerprint of its ops, each with
        its square: ``n`` equal values ``x`` sum to ``n x`` and ``n x**2``, and unequal
        ones to ``n * sum(x**2) > sum(x)**2``; the failed ops; whether it refused the plan).
        Raises ValueError on every rank alike where the plans differ.

        NOTE: ranks given different plans (a leader's bug: a worker's plan stale, cut, or
        one rank's refused as out of its pools) all-reduced masks of different lengths, or
        one rank raised before the all-reduce: gloo answered one rank 'ok' and the other a
        connection error, or left one waiting on a collective that never came."""
        import torch
        import torch.distributed as dist

        digest = hashlib.blake2b(plan.kinds.tobytes(), digest_size=8)
        for column in plan.columns or PlanColumns.of(plan.ops):  # at C speed
            digest.update(column.tobytes())
        # 20 bits: the squares' sums stay far inside an int64 for 63 ranks.
        fingerprint = int.from_bytes(digest.digest(), "little") & 0xFFFFF
        num_ops = len(plan.ops)
        words = torch.tensor([num_ops, num_ops * num_ops, fingerprint,
                              fingerprint * fingerprint, num_failed, int(refused)],
                             dtype=torch.int64)
        if self._on_device:
            words = words.to(self.engine.device)
        dist.all_reduce(words, op=dist.ReduceOp.SUM, group=self.group)
        ops, ops_sq, fp, fp_sq, total_failed, num_refused = words.tolist()
        n = self.tp_size
        if (n * ops_sq != ops * ops or n * fp_sq != fp * fp
                or num_refused not in (0, n)):
            if not refused:
                self.engine.synchronize_all()  # its own plan's copies: let them land
            raise ValueError(f"the ranks were given different plans (rank {self.tp_rank}: "
                             f"{num_ops} ops, fingerprint {fingerprint:#07x}; {ops} ops over "
                             f"{n} ranks): every rank must submit the leader's plans, in "
                             f"order; each ran its own, so their shards may differ now")
        return int(total_failed)

    def _failed_by_rank(self, num_ops: int, local: Sequence[int]) -> list[list[int]]:
        """Every rank's failed op positions: one all-reduce, rank ``r`` adding bit ``r``
        (distinct bits, so the sum is their union)."""
        import torch
        import torch.distributed as dist

        mask = torch.zeros(num_ops, dtype=torch.int64)
        if local:
            mask[torch.tensor(list(local), dtype=torch.long)] = 1 << self.tp_rank
        if self._on_device:
            mask = mask.to(self.engine.device)
        dist.all_reduce(mask, op=dist.ReduceOp.SUM, group=self.group)
        bits = mask.tolist()
        return [[i for i, b in enumerate(bits) if b >> r & 1] for r in range(self.tp_size)]

    def wait(self, handle: TransferHandle, layer: int | None = None) -> None:
        self.engine.wait(handle, layer)

    def poll(self, handle: TransferHandle) -> bool:
        return self.engine.poll(handle)

    def synchronize(self, handle: TransferHandle) -> None:
        self.engine.synchronize(handle)

    def synchronize_all(self) -> None:
        self.engine.synchronize_all()
