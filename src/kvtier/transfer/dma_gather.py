"""Whole-block offloads and onboards moved by the copy engines in large copies, through a
staging buffer on the GPU (extra ``torch``; the runtime's batched copy, CUDA 12.8+).

Why: the copy engines pay per copy (on an H200, 16 KiB copies moved 0.72 of the two-way
ceiling, 4 KiB ones 0.05, each costing the driver ~0.5-1 us of CPU), and a layer's share
of a small block is a small copy. On a block-major host a block's layers are contiguous,
and a step's offloads take consecutive host slots from the free queue (on the Mooncake
conversation trace runs of 6-11 blocks on average, 8-13 for onboards; see
``benchmarks/results/transfer.md``). So an offload gathers its GPU blocks, any GPU layout,
into the staging buffer with one GPU kernel (one per layer tensor where no view spans
them; HBM speed, not PCIe), and then copies each run of consecutive host slots with one
DMA; an onboard copies runs into staging and scatters them::

    offload   GPU blocks --gather--> staging [b0 b1 b2 b3] --one DMA per run--> host h7..h10
    onboard   host h3..h5 --one DMA--> staging [b0 b1 b2] --scatter--> GPU blocks

Whole blocks only: the layers of a block travel together, so every layer's event of a
plan completes with the plan (the forward cannot start layer 0 early).

Order: the ops are keyed like the batched path's (``dma_batch.queue_keys``: group, level,
direction; a group at least ``GROUP_BYTES``); a batch's ops are sorted by host slot (runs
form even where the plan's order scattered them) and cut into *chunks* of at most one
staging buffer, dealt round-robin to ``num_streams`` streams per direction, each with its
own buffer (stream order makes a buffer's reuse safe). A chunk waits for the level
before in its group, except that an onboard's DMA into staging may start at once when no
op of the plan writes a host slot it reads: only its scatter waits. Ops staging does not
take (partial copies, GPU to GPU) go as the batched path's direct copies, in the same
order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from kvtier.reprs import shown
from kvtier.tier import Tier
from kvtier.transfer.dma_batch import (
    PIPELINE_STAGES,
    DmaBatch,
    DmaBatchCopier,
    DmaPlan,
    QueueKeys,
    cut_pieces,
    queue_keys,
)
from kvtier.transfer.fused import PlanArrays, arrays_of, check_arrays
from kvtier.transfer.plan import TransferPlan

if TYPE_CHECKING:
    import numpy.typing as npt
    import torch

    from kvtier.transfer.dma_batch import Executor

    Addrs = npt.NDArray[np.uint64]
    Bools = npt.NDArray[np.bool_]
    Ints = npt.NDArray[np.int64]

D2H, H2D = 2, 1  # flags: bit 0 source on the host, bit 1 destination on the host
STAGING_BYTES = 32 << 20  # one stream's staging buffer
# NOTE: at most this many groups (half the batched path's): an onboard's DMA does not wait
# for its group's offloads, so a shallower pipeline costs little, and each chunk costs the
# CPU ~0.1 ms of calls (fewer, larger chunks: measured on an H200, results/transfer.md).
MAX_GROUPS = 8
# A pipeline stage (group) moves at least this much: cutting a small step into groups
# would cost a DMA call and kernels per group and save nothing (its copies take us).
GROUP_BYTES = 8 << 20
NUM_STREAMS = 2  # per direction: while one stream's kernel runs, the other's DMA does


class GatherCost(NamedTuple):
    """What ``auto`` weighs before staging a plan: staging pays where its DMA runs average
    at least ``min_run_bytes`` and the CPU keeps up with the link: ``cpu_us_per_op`` of
    planning per op, ``cpu_us_per_run`` of the driver per DMA run and ``cpu_us_per_chunk``
    of calls per chunk (at least one per direction), against the plan's bytes at
    ``link_bytes_per_us`` (both ways at once).

    NOTE: fitted to ``submit`` of 512 MiB plans on an H200 host (benchmarks/results/
    transfer.md, fourth session, with 64 MiB of freed heap kept): 0.073 us an op and
    0.4-0.6 us a DMA run of 128 KiB or more, but 0.7-1.2 us a run where runs are single
    16 or 64 KiB blocks (the driver's batched copy alone took 0.47-1.26 us a copy),
    against 0.69 us that a 64 KiB run takes on the link: so runs below 128 KiB never pay,
    whatever the plan. The link moved 95-98 GB/s both
    ways. 16 KiB blocks (0.17 us each on the link) pay in runs of ~8 or more in a large
    plan, 64 KiB blocks from runs of 2; a step of a few MiB stays with the fused kernel.
    Measured CPU times scattered +-25 % around the fit from one run to the next."""

    min_run_bytes: int = 128 << 10
    cpu_us_per_op: float = 0.075
    cpu_us_per_run: float = 0.5
    cpu_us_per_chunk: float = 60.0
    link_bytes_per_us: float = 95_000.0

    def cpu_us(self, num_ops: int, num_runs: int, num_chunks: int) -> float:
        """The CPU time ``submit`` takes for such a plan. Pure."""
        return (num_ops * self.cpu_us_per_op + num_runs * self.cpu_us_per_run
                + num_chunks * self.cpu_us_per_chunk)

    def pays(self, num_ops: int, num_runs: int, block_bytes: int, chunk_bytes: int) -> bool:
        """Whether ``num_ops`` blocks of ``block_bytes`` in ``num_runs`` runs, staged in
        chunks of up to ``chunk_bytes``, are worth staging (see the class docstring).
        Pure."""
        nbytes = num_ops * block_bytes
        num_chunks = max(2, -(-nbytes // chunk_bytes))
        cpu_us = self.cpu_us(num_ops, num_runs, num_chunks)
        return (num_ops > 0 and nbytes >= num_runs * self.min_run_bytes
                and cpu_us < nbytes / self.link_bytes_per_us)


GATHER_COST = GatherCost()


class GatherChunk(NamedTuple):
    """Ops ``first..end`` (of ``GatherPlan.gpu_slots``) of one batch, one direction, on
    stream ``stream`` of that direction; DMA runs ``run_first..run_end``. ``early``: an
    onboard whose DMA need not wait for the level before (see the module docstring)."""

    group: int
    level: int
    flags: int
    stream: int
    early: bool
    first: int
    end: int
    run_first: int
    run_end: int


class GatherPlan(NamedTuple):
    """A plan cut for the staging path: per staged op (in chunk order) its GPU slot; per
    DMA run its first host slot, its first position in its chunk's buffer and its length
    in blocks; the chunks; the ops staging does not take, as direct batches."""

    gpu_slots: Ints
    run_host: Ints
    run_pos: Ints
    run_len: Ints
    chunks: list[GatherChunk]
    direct: DmaPlan | None
    arrays: PlanArrays
    num_components: int


def _in_pool(slots: Ints, num_blocks: int | None) -> bool:
    return num_blocks is not None and int(slots.min()) >= 0 and int(slots.max()) < num_blocks


def staged_keys(flags: Ints, to_host: Bools, gpu: Ints, host: Ints, max_groups: int
                ) -> QueueKeys | None:
    """``queue_keys`` of a plan of whole-block offloads and onboards (``flags``,
    ``to_host``: whether it is an offload, GPU and host slot per op) in which no host slot
    repeats and a GPU slot at most in a pair that one of them writes (a step: the offload
    of a victim and the onboard into its slot), in a few passes; ``None`` for any other
    plan. Pure.

    NOTE: the general ``components`` numbers every slot of both tiers and labels the ops
    over them (1-2 ms per 32,768 ops); here each slot is checked by writing the op's
    index at it and reading it back: an op that reads back another's shares its slot."""
    n = len(gpu)
    index = np.arange(n, dtype=np.int64)
    seen = np.empty(int(host.max()) + 1, dtype=np.int64)
    seen[host] = index
    if not np.array_equal(seen[host], index):
        return None  # a host slot touched twice
    seen = np.empty(int(gpu.max()) + 1, dtype=np.int64)
    seen[gpu] = index
    holder = seen[gpu]
    losers = np.flatnonzero(holder != index)
    if not len(losers):
        zeros = np.zeros(n, dtype=np.int64)
        return QueueKeys(zeros, zeros, flags, n)
    holders = holder[losers]
    shared = gpu[losers]
    seen[shared] = losers
    if not np.array_equal(seen[shared], losers):
        return None  # a GPU slot touched three times or more
    if (to_host[losers] & to_host[holders]).any():
        return None  # two offloads read one slot: no hazard, not a pair
    later = np.maximum(losers, holders)
    is_later = np.zeros(n, dtype=bool)
    is_later[later] = True
    # Components are numbered by their first op, as ``components`` orders them.
    component = np.cumsum(~is_later) - 1
    component[later] = component[np.minimum(losers, holders)]
    num_components = n - len(later)
    num_groups = min(num_components, PIPELINE_STAGES, max_groups)
    return QueueKeys(component * num_groups // num_components, is_later.astype(np.int64),
                     flags, num_components)


def queue_order(batch: Ints, host: Ints) -> Ints:
    """The ops (``batch`` and ``host`` slot each, plan order) sorted by batch, then host
    slot: runs of consecutive host slots in one batch stay together. Pure.

    NOTE: the runs are sorted, not the ops: a step's ops come in runs of ~12 (its offloads
    take consecutive slots of the free queue), and sorting 32,768 int64 keys took 1.7 ms on
    the 2-core test machine, sorting their ~3,000 runs 0.05 ms. Within a batch no op
    writes a slot another reads, so where runs overlap (one host slot read twice) either
    order is correct."""
    n = len(host)
    new_run = np.empty(n, dtype=bool)
    new_run[:1] = True
    np.not_equal(host[1:], host[:-1] + 1, out=new_run[1:])
    new_run[1:] |= batch[1:] != batch[:-1]
    run_first = np.flatnonzero(new_run)
    if len(run_first) <= 1:
        return np.arange(n, dtype=np.int64)
    head_batch, head_host = batch[run_first], host[run_first]
    if int(head_batch.max()) > 0:
        keys = head_batch * (int(head_host.max()) + 1) + head_host
    else:
        keys = head_host
    run_order = np.argsort(keys, kind="stable")
    run_len = np.diff(np.append(run_first, n))[run_order]
    starts = run_first[run_order]
    # Op k of the sorted runs is op (start of its run) + (k - the run's sorted offset).
    offset = np.cumsum(run_len) - run_len
    return np.repeat(starts - offset, run_len) + np.arange(n, dtype=np.int64)


class StagedColumns(NamedTuple):
    """A plan's arrays as the staging path reads them, per op: its ``flags`` (bit 0 source
    on the host, bit 1 destination on the host), whether it is an offload (``to_host``),
    whether staging takes it (``staged``: a whole offload or onboard), its host and GPU
    slot (either slot of an op between two GPU slots); ``all_staged``: every op is."""

    arrays: PlanArrays
    flags: Ints
    to_host: Bools
    staged: Bools
    all_staged: bool
    host: Ints
    gpu: Ints


def staged_columns(arrays: PlanArrays, tokens_per_block: int) -> StagedColumns:
    """``arrays`` read for the staging path (one pass each: ``auto``'s count of runs and
    the planning share them). Pure."""
    flags = arrays.src_tier + 2 * arrays.dst_tier
    # NOTE: from both tiers, not from the flags: an op of tiers (2, 0), (-1, 1) or (3, -1)
    # has the flags of an offload or an onboard, and a staged plan's short check reads
    # only its slots, so it was staged as one, never refused.
    to_host = (arrays.src_tier == Tier.GPU) & (arrays.dst_tier == Tier.HOST)
    onboard = (arrays.src_tier == Tier.HOST) & (arrays.dst_tier == Tier.GPU)
    staged = (arrays.num_tokens == tokens_per_block) & (to_host | onboard)
    host = np.where(to_host, arrays.dst_slot, arrays.src_slot)
    gpu = np.where(to_host, arrays.src_slot, arrays.dst_slot)
    return StagedColumns(arrays, flags, to_host, staged, bool(staged.all()), host, gpu)


def host_runs(columns: StagedColumns) -> tuple[int, int]:
    """``(ops, runs)``: how many whole-block offloads and onboards a plan holds, and in how
    many runs of consecutive host slots (same direction, plan order) they come: what
    ``auto`` weighs before taking this path. Pure."""
    host, flags = columns.host, columns.flags
    if not columns.all_staged:
        host, flags = host[columns.staged], flags[columns.staged]
    if not len(host):
        return 0, 0
    joined = (host[1:] == host[:-1] + 1) & (flags[1:] == flags[:-1])
    return len(host), len(host) - int(np.count_nonzero(joined))


class DmaGatherCopier:
    """Cuts plans into staged chunks and runs them (see the module docstring) between the
    GPU's ``gpu_parts`` (the whole block-major tensor, a view spanning every layer of a
    layer-major one (``torch_memory.blocks_view``), or one tensor per layer) and a
    block-major host tensor ``host`` ([blocks, ...], one block contiguous). ``direct``
    copies the ops staging does not take. The staging buffers (``num_streams`` per
    direction, ``staging_bytes`` each) are allocated on ``gpu_parts``' device at first use.
    """

    def __init__(self, gpu_parts: list[torch.Tensor], host: torch.Tensor,
                 direct: DmaBatchCopier, tokens_per_block: int,
                 num_streams: int = NUM_STREAMS, staging_bytes: int = STAGING_BYTES) -> None:
        if num_streams < 1:
            raise ValueError(f"num_streams must be >= 1, got {shown(num_streams)}")
        elem = host.element_size()
        self.block_bytes = host.stride(0) * elem
        if host[0].numel() * elem != self.block_bytes or not host[0].is_contiguous():
            raise ValueError("the host tensor's blocks must be contiguous (block-major)")
        if sum(p[0].numel() for p in gpu_parts) * gpu_parts[0].element_size() != \
                self.block_bytes:
            raise ValueError("the GPU parts of a block and a host block differ in size")
        self.gpu_parts = gpu_parts
        self.host = host
        self.direct = direct
        self.tokens_per_block = tokens_per_block
        self.num_streams = num_streams
        self.capacity = max(1, staging_bytes // self.block_bytes)  # blocks a buffer holds
        self._staging: torch.Tensor | None = None
        self._buffer_parts: list[list[torch.Tensor]] = []  # per buffer, its part per GPU part

    def staging(self) -> torch.Tensor:
        """The buffers [2 * num_streams, capacity, *block], d2h ones first: allocated once,
        on the GPU parts' device, in their element type."""
        if self._staging is None:
            import torch

            part = self.gpu_parts[0]
            shape = (part.shape[1:] if len(self.gpu_parts) == 1
                     else (len(self.gpu_parts), *part.shape[1:]))
            self._staging = torch.empty((2 * self.num_streams, self.capacity, *shape),
                                        dtype=part.dtype, device=part.device)
        return self._staging

    def prepare(self, plan: TransferPlan, num_blocks: dict[Tier, int | None],
                columns: StagedColumns | None = None) -> GatherPlan:
        """Check ``plan`` (ValueError, nothing copied) and cut it into chunks; ``columns``:
        its ``staged_columns``, where the caller has them. Pure."""
        if columns is None:
            columns = staged_columns(arrays_of(plan), self.tokens_per_block)
        arrays, flags, to_host, staged, all_staged, host, gpu = columns
        max_groups = min(MAX_GROUPS, max(
            1, len(arrays.src_slot) * self.block_bytes // GROUP_BYTES))
        # A plan of whole offloads and onboards is valid where its slots lie in their pools
        # (four reductions); any other is checked op by op, naming the first bad one.
        if not (all_staged and _in_pool(host, num_blocks.get(Tier.HOST))
                and _in_pool(gpu, num_blocks.get(Tier.GPU))):
            check_arrays(arrays, plan, num_blocks, self.tokens_per_block)
        keys = staged_keys(flags, to_host, gpu, host, max_groups) if all_staged else None
        host_hazards = keys is None  # the fast keys hold only where no host slot repeats
        if keys is None:
            keys = queue_keys(arrays, 1, max_groups)
        num_host = int(host.max()) + 1
        batch = (keys.group * (int(keys.level.max()) + 1) + keys.level) * 4 + flags
        direct = None
        if all_staged:
            order = queue_order(batch, host)
        else:
            picked = np.flatnonzero(staged)
            order = picked[queue_order(batch[picked], host[picked])]
            rest = np.flatnonzero(~staged)
            rest = rest[np.argsort(batch[rest], kind="stable")]
            direct = cut_pieces(arrays, keys, rest, self.direct.targets(None)[0].num_segs,
                                self.tokens_per_block)
        chunks, run_host, run_pos, run_len = self._chunks(
            arrays, keys, order, batch, host[order], num_host if host_hazards else None)
        return GatherPlan(gpu[order], run_host, run_pos, run_len, chunks, direct, arrays,
                          keys.num_components)

    def _chunks(self, arrays: PlanArrays, keys: QueueKeys, order: Ints, batch: Ints, h: Ints,
                num_host: int | None) -> tuple[list[GatherChunk], Ints, Ints, Ints]:
        """The chunks of the staged ops ``order`` (queue order; ``batch`` every op's batch
        key; ``h`` their host slots, all below ``num_host``; ``None``: no host slot is
        touched twice) and their DMA runs."""
        n = len(order)
        if n == 0:
            empty = np.zeros(0, dtype=np.int64)
            return [], empty, empty, empty
        # Batches, each cut into chunks of at most a buffer: worked out per batch, not op.
        in_order = batch[order]
        batch_firsts = np.flatnonzero(in_order[1:] != in_order[:-1]) + 1
        batch_firsts = np.concatenate([[0], batch_firsts])
        num_cuts = -(-np.diff(np.append(batch_firsts, n)) // self.capacity)
        cut = np.arange(int(num_cuts.sum())) - np.repeat(np.cumsum(num_cuts) - num_cuts,
                                                          num_cuts)
        firsts = np.repeat(batch_firsts, num_cuts) + cut * self.capacity
        ends = np.append(firsts[1:], n)
        heads = order[firsts]
        group, level, dirs = keys.group[heads], keys.level[heads], keys.flags[heads]
        new_run = np.empty(n, dtype=bool)
        new_run[0] = True
        np.not_equal(h[1:], h[:-1] + 1, out=new_run[1:])
        new_run[firsts] = True
        run_first = np.flatnonzero(new_run)
        run_len = np.diff(np.append(run_first, n))
        run_bounds = np.searchsorted(run_first, np.append(firsts, n))
        run_pos = run_first - np.repeat(firsts, np.diff(run_bounds))
        # An onboard may start its DMA early unless the plan writes a host slot it reads.
        if num_host is None:
            late = np.zeros(len(firsts), dtype=bool)
        else:
            written = np.zeros(num_host, dtype=bool)
            dst_host = arrays.dst_slot[arrays.dst_tier == Tier.HOST]
            written[dst_host[dst_host < num_host]] = True
            late = np.logical_or.reduceat(written[h] & (keys.flags[order] == H2D), firsts)
        stream = np.zeros(len(firsts), dtype=np.int64)
        for f in (D2H, H2D):
            mine = dirs == f
            stream[mine] = np.arange(int(mine.sum())) % self.num_streams
        chunks = [GatherChunk(g, lv, f, s, f == H2D and not lt, a, b, ra, rb)
                  for g, lv, f, s, lt, a, b, ra, rb in zip(
                      group.tolist(), level.tolist(), dirs.tolist(),
                      stream.tolist(), late.tolist(), firsts.tolist(), ends.tolist(),
                      run_bounds[:-1].tolist(), run_bounds[1:].tolist(), strict=True)]
        return chunks, h[run_first], run_pos, run_len

    def runs(self, plan: GatherPlan) -> tuple[Addrs, Addrs, Addrs]:
        """The DMA runs of every chunk, in chunk order, between the host and the chunk's
        stream's buffer: (dsts, srcs, sizes) as the executor takes them; chunk ``c``'s are
        ``[c.run_first:c.run_end]``. Pure."""
        num_runs = np.array([c.run_end - c.run_first for c in plan.chunks], dtype=np.int64)
        chunk_flags = np.array([c.flags for c in plan.chunks], dtype=np.int64)
        buffer = np.array([(0 if c.flags == D2H else self.num_streams) + c.stream
                           for c in plan.chunks], dtype=np.int64)
        staging = self.staging()
        buffer_bytes = staging[0].numel() * staging.element_size()
        stage_base = staging.data_ptr() + np.repeat(buffer * buffer_bytes, num_runs)
        host_addr = self.host.data_ptr() + plan.run_host * self.block_bytes
        stage_addr = stage_base + plan.run_pos * self.block_bytes
        to_host = np.repeat(chunk_flags == D2H, num_runs)
        dsts = np.where(to_host, host_addr, stage_addr).astype(np.uint64)
        srcs = np.where(to_host, stage_addr, host_addr).astype(np.uint64)
        return dsts, srcs, (plan.run_len * self.block_bytes).astype(np.uint64)

    def gather(self, chunk: GatherChunk, gpu_slots: torch.Tensor) -> None:
        """Queue (on the current stream) the copy of ``chunk``'s GPU blocks into its
        buffer; ``gpu_slots`` is ``GatherPlan.gpu_slots`` as a tensor on the GPU."""
        import torch

        index = gpu_slots[chunk.first:chunk.end]
        for part, stage in zip(self.gpu_parts, self._stage_parts(chunk), strict=True):
            torch.index_select(part, 0, index, out=stage)

    def scatter(self, chunk: GatherChunk, gpu_slots: torch.Tensor) -> None:
        """Queue (on the current stream) the copy of ``chunk``'s buffer into its GPU
        blocks (no two ops of a chunk write one slot)."""
        index = gpu_slots[chunk.first:chunk.end]
        for part, stage in zip(self.gpu_parts, self._stage_parts(chunk), strict=True):
            part.index_copy_(0, index, stage)

    def _stage_parts(self, chunk: GatherChunk) -> list[torch.Tensor]:
        buffer = (0 if chunk.flags == D2H else self.num_streams) + chunk.stream
        if not self._buffer_parts:  # views made once: indexing costs us a chunk
            staging = self.staging()
            self._buffer_parts = [
                [staging[i]] if len(self.gpu_parts) == 1
                else [staging[i, :, j] for j in range(len(self.gpu_parts))]
                for i in range(len(staging))]
        num = chunk.end - chunk.first
        return [part[:num] for part in self._buffer_parts[buffer]]


def run_in_order(copier: DmaGatherCopier, plan: GatherPlan, execute: Executor,
                 gpu_slots: torch.Tensor) -> None:
    """Run ``plan`` on the current stream, chunk by chunk in queue order, direct batches
    in their place (tests on CPU tensors, with ``memmove_batch``)."""
    dsts, srcs, sizes = copier.runs(plan)
    for step in queue(copier, plan):
        if isinstance(step, GatherChunk):
            a, b = step.run_first, step.run_end
            if step.flags == D2H:
                copier.gather(step, gpu_slots)
            execute(dsts[a:b], srcs[a:b], sizes[a:b], 0)
            if step.flags == H2D:
                copier.scatter(step, gpu_slots)
        else:
            execute(step.dsts, step.srcs, step.sizes, 0)


def queue(copier: DmaGatherCopier, plan: GatherPlan) -> list[GatherChunk | DmaBatch]:
    """Chunks and direct batches (one per target) merged in queue order: by group, then
    level, then direction. Pure."""
    steps: list[tuple[tuple[int, int, int], int, GatherChunk | DmaBatch]] = [
        ((c.group, c.level, c.flags), i, c) for i, c in enumerate(plan.chunks)]
    if plan.direct is not None:
        for target in copier.direct.targets(None):
            for batch in copier.direct.batches(plan.direct, target):
                steps.append(((batch.group, batch.level, batch.flags), len(steps), batch))
    steps.sort(key=lambda s: (s[0], s[1]))
    return [s[2] for s in steps]
