"""TorchTransferEngine: runs a manager's plans on real KV tensors (extra ``torch``).

Four paths, chosen per plan (``auto``) or named (``method``)::

    dma_batch   CUDA with the runtime's batched copy (12.8+): the copy engines move the
                plan, one stream per direction, many scattered copies per call
                (``kvtier.transfer.dma_batch``). ``auto`` takes it where one copy (a
                block's share of a launch) is at least ``min_batch_copy_bytes``
    dma_gather  the same copy engines for smaller blocks on a block-major host: whole
                blocks gathered into (scattered from) a GPU staging buffer, one DMA per run
                of consecutive host slots (``kvtier.transfer.dma_gather``). ``auto`` takes
                it for a plan whose runs are long enough that it pays, the CPU included
                (``GatherCost``); every layer's event then completes with the whole plan
    fused       CUDA with the pinned host seen from the GPU (unified addressing) and
                Triton: one kernel per layer moves offloads, onboards and partial copies
                at once (``kvtier.transfer.fused``); ``auto``'s choice for smaller copies
    waves       elsewhere (CPU, ``kernel``, ``dma``, ``staged``, no Triton): waves of
                batches, a few large torch operations each (``kvtier.transfer.wave_copier``)

Every path orders only the ops that share a written slot, and plans its ops as arrays or
batches, never one Python step per op.

Layer by layer (``layerwise``, the default): layers never share memory, so the plan runs
once per layer, layer 0 first, and each layer gets its own completion event. The forward
pass waits for layer ``i``'s event just before its layer ``i`` touches the pool, so it
computes while later layers are still being onboarded::

    copy streams   [L0 copies][L1 copies][L2 copies] ...
    forward             [wait L0|layer 0][wait L1|layer 1][wait L2|layer 2] ...

(The fused path puts its layers' kernels on two streams in turn, so that each one's
programs start as the one before drains; see ``_submit_fused``.)

A plan's copies start after the work already queued on the caller's stream (the forward
pass that wrote the blocks being offloaded) and after the previous plan. ``wait`` makes
the caller's stream wait (the CPU does not block). On CPU every copy is done when
``submit`` returns.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from kvtier.counts import as_integer
from kvtier.reprs import shown
from kvtier.storage import MODEL_SHAPE_FIELDS
from kvtier.tier import Tier
from kvtier.transfer.batching import TransferBatch
from kvtier.transfer.copy_streams import CopyStreams
from kvtier.transfer.dma_batch import CudartBatch, DmaBatchCopier, Executor, load_cudart_batch
from kvtier.transfer.dma_gather import (
    GATHER_COST,
    STAGING_BYTES,
    DmaGatherCopier,
    GatherCost,
    StagedColumns,
    host_runs,
    staged_columns,
)
from kvtier.transfer.engine import TransferError
from kvtier.transfer.fused import (
    FusedCopier,
    LaunchTarget,
    PlanArrays,
    arrays_of,
    fused_available,
)
from kvtier.transfer.gather_submit import STREAM_OF_FLAGS, GatherSubmitter, StepFailed
from kvtier.transfer.plan import TransferPlan
from kvtier.transfer.stream_workers import StreamWorkers
from kvtier.transfer.torch_handle import TransferHandle, TransferStats
from kvtier.transfer.torch_memory import (
    HEAP_PAD_BYTES,
    blocks_view,
    copy_view,
    layer_view,
    new_event,
    retain_freed_heap,
    uva_alias,
)
from kvtier.transfer.wave_copier import WaveCopier

if TYPE_CHECKING:
    import torch

    from kvtier.storage import KVStorage

METHODS = ("auto", "dma_batch", "dma_gather", "fused", "kernel", "dma", "staged")
# NOTE: measured on an H200 (benchmarks/results/transfer.md), both directions at once: with
# copies of 64 KiB and up the copy engines' batches moved 0.92-1.06 of the two-way ceiling
# (the fused kernel 0.80-0.84); with 16 KiB copies 0.68-0.72 (fused 0.79-0.83) and with
# 4 KiB 0.04-0.16, when the driver took 1.5-6 us of CPU per copy.
MIN_BATCH_COPY_BYTES = 64 << 10
# What an engine's GPU and host storages share: all of a KVLayout but the layout kind.
_SHARED_LAYOUT_FIELDS = (*MODEL_SHAPE_FIELDS, "tp_rank", "tp_size")


class TorchTransferEngine:
    """Executes plans between a GPU tier and a host tier (see the module docstring).

    ``gpu`` may live on the CPU (tests without a GPU); ``host`` is a CPU storage, pinned on
    a CUDA machine, or ``None`` when there is no host tier. ``gather_streams`` and
    ``staging_bytes`` size the staging path: that many streams per direction, each with a
    GPU buffer of that many bytes (128 MiB of GPU memory in all by default, taken at its
    first plan); ``submit_threads``: its DMAs are made on a thread per stream while the
    caller's thread goes on (``gather_submit``; off by default: measured slower on an H200
    host but for plans of single 16 KiB blocks, results/transfer.md); ``heap_pad_bytes``:
    an engine with the
    staging path asks glibc to keep that much freed heap, for the whole process
    (``retain_freed_heap``; ``None``: malloc left alone). ``before_batch`` is called with
    each batch of the wave path before it runs, ``before_launch`` with each layer
    (``None``: all) before the fused or batched path queues it, and with ``None`` before
    each step of the staging path (fault injection in tests).
    """

    # NOTE: the storages are read-only: the engine's copiers, views and slot bounds are
    # built from them, and a storage assigned afterwards was copied into past them.
    @property
    def gpu(self) -> KVStorage:
        """The GPU storage the engine copies to and from (fixed at construction)."""
        return self._gpu

    @property
    def host(self) -> KVStorage | None:
        """The host storage, if any (fixed at construction)."""
        return self._host

    # NOTE: the tuning options are checked when set, as when made: set later, a bad value
    # failed every plan as the one given at construction did, and min_dma_copy_bytes set
    # on the engine was never seen by the wave path, which kept its own copy.
    @property
    def layerwise(self) -> bool:
        """Whether plans run layer by layer, each layer with its own completion event."""
        return self._layerwise

    @layerwise.setter
    def layerwise(self, value: bool) -> None:
        self._layerwise = _check_bool("layerwise", value)

    @property
    def min_dma_copy_bytes(self) -> int:
        """The wave path's bytes per call from which a run of slots is one DMA."""
        return self._waves.min_dma_copy_bytes

    @min_dma_copy_bytes.setter
    def min_dma_copy_bytes(self, value: int) -> None:
        self._waves.min_dma_copy_bytes = _check_int("min_dma_copy_bytes", value, 0)

    @property
    def min_batch_copy_bytes(self) -> int:
        """The copy bytes from which ``auto`` takes the copy engines' batches."""
        return self._min_batch_copy_bytes

    @min_batch_copy_bytes.setter
    def min_batch_copy_bytes(self, value: int) -> None:
        self._min_batch_copy_bytes = _check_int("min_batch_copy_bytes", value, 0)

    def __init__(
        self,
        gpu: KVStorage,
        host: KVStorage | None,
        method: str = "auto",
        min_dma_copy_bytes: int = 2 << 20,
        layerwise: bool = True,
        min_batch_copy_bytes: int = MIN_BATCH_COPY_BYTES,
        gather_cost: GatherCost = GATHER_COST,
        gather_streams: int = 2,
        staging_bytes: int = STAGING_BYTES,
        submit_threads: bool = False,
        heap_pad_bytes: int | None = HEAP_PAD_BYTES,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {shown(method)}")
        pad = None if heap_pad_bytes is None else as_integer(heap_pad_bytes)
        if heap_pad_bytes is not None and (pad is None or pad < 0):
            raise ValueError(f"heap_pad_bytes must be >= 0 or None, got {shown(heap_pad_bytes)} "
                             f"(an int of bytes)")
        heap_pad_bytes = pad
        # NOTE: checked here, not where a plan first reads them: a min_dma_copy_bytes of
        # None or "1" raised TypeError inside every batch's copy, each plan a TransferError
        # of every op (the engine degraded every step to recompute, reusing nothing), and a
        # layerwise of "no" ran layer by layer as True.
        # The plain ints the checks return are kept (``kvtier.counts``).
        min_dma_copy_bytes = _check_int("min_dma_copy_bytes", min_dma_copy_bytes, 0)
        min_batch_copy_bytes = _check_int("min_batch_copy_bytes", min_batch_copy_bytes, 0)
        gather_streams = _check_int("gather_streams", gather_streams, 1)
        staging_bytes = _check_int("staging_bytes", staging_bytes, 1)
        _check_bool("layerwise", layerwise)
        _check_bool("submit_threads", submit_threads)
        if not isinstance(gather_cost, GatherCost):
            raise ValueError(f"gather_cost must be a GatherCost, got {shown(gather_cost)}")
        if host is not None:
            a, b = gpu.layout, host.layout
            # NOTE: the shard too (tp_rank, tp_size): a host shard of another rank holds as
            # many bytes per block, and was taken; a remote tier's fetch fills this rank's
            # own host shard, which this engine never onboarded from: the GPU got the other
            # rank's KV heads.
            differ = [name for name in _SHARED_LAYOUT_FIELDS
                      if getattr(a, name) != getattr(b, name)]
            if differ:
                raise ValueError(f"GPU and host layouts differ beyond the layout kind "
                                 f"({', '.join(differ)}): {a} vs {b}")
            if host.device.type != "cpu":
                raise ValueError(f"the host tier must be on the CPU, got {host.device}")
        self._gpu = gpu
        self._host = host
        self.method = method
        self._min_batch_copy_bytes = min_batch_copy_bytes
        self.gather_cost = gather_cost
        self._layerwise = layerwise
        self.device = gpu.device
        self.is_cuda = gpu.device.type == "cuda"
        self.stats = TransferStats()
        self.before_batch: Callable[[TransferBatch], None] | None = None
        self.before_launch: Callable[[int | None], None] | None = None
        # Per issuing manager (``TransferPlan.issuer``), the number of the latest of its
        # plans submitted here: ``submit`` runs each issued plan once.
        # NOTE: weak: a plan unpickled alone names an issuer of its own (one per plan), and
        # a worker fed such plans kept an entry per plan for ever.
        self._submitted: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
        self._tpb = gpu.layout.tokens_per_block
        self._num_layers = gpu.layout.num_layers
        self._bytes_per_token = gpu.layout.bytes_per_token
        storages = {Tier.GPU: gpu, Tier.HOST: host}
        self._num_blocks = {tier: None if s is None else s.num_blocks
                            for tier, s in storages.items()}
        self._kinds = {tier: s.layout.layout for tier, s in storages.items() if s is not None}
        views = {tier: [copy_view(t) for t in s.tensors]
                 for tier, s in storages.items() if s is not None}
        # What a gather/scatter kernel indexes: host views aliased on the GPU under CUDA.
        self._kernel_views: dict[Tier, list[torch.Tensor]] | None = dict(views)
        if self.is_cuda and host is not None:
            aliases = [uva_alias(v, gpu.device) for v in views[Tier.HOST]]
            if all(a is not None for a in aliases) and host.pinned:
                self._kernel_views = {Tier.GPU: views[Tier.GPU],
                                      Tier.HOST: [a for a in aliases if a is not None]}
            else:
                self._kernel_views = None
        if method in ("kernel", "fused", "dma_batch", "dma_gather") and self._kernel_views is None:
            raise ValueError(f"method {shown(method)} needs a pinned host tier visible to the GPU "
                             "(unified addressing); use 'auto' or 'staged'")
        self._streams = CopyStreams(gpu.device)
        self._waves = WaveCopier(views, self._kernel_views, self._kinds, self._num_blocks,
                                 self._num_layers, self._tpb, self._bytes_per_token, method,
                                 min_dma_copy_bytes, self._streams, self.stats)
        self._fused: FusedCopier | None = None
        self._dma: tuple[DmaBatchCopier, CudartBatch] | None = None
        if self.has_uva and method in ("auto", "dma_batch", "dma_gather"):
            self._dma = self._dma_copier()
        if method in ("dma_batch", "dma_gather") and self._dma is None:
            raise ValueError(f"method {shown(method)} needs CUDA 12.8+ (cudaMemcpyBatchAsync) "
                             f"and a "
                             "pinned host tier; use 'auto'")
        self._gather: GatherSubmitter | None = None
        if self._dma is not None and method in ("auto", "dma_gather") and host is not None \
                and host.layout.layout == "block_major":
            assert self._kernel_views is not None
            gpu_views = views[Tier.GPU]
            spanned = blocks_view(gpu_views) if len(gpu_views) > 1 else None
            copier = DmaGatherCopier([spanned] if spanned is not None else gpu_views,
                                     views[Tier.HOST][0], self._dma[0], self._tpb,
                                     gather_streams, staging_bytes)
            # The GPU tensors' device has its index ("cuda" alone means the current one).
            index = gpu_views[0].device.index
            workers = (StreamWorkers(_device_setter(index)) if submit_threads and index is not None
                       else None)
            self._gather = GatherSubmitter(copier, self._dma[1], self._streams, gpu.device,
                                           workers)
            if heap_pad_bytes is not None:
                retain_freed_heap(heap_pad_bytes)
        if method == "dma_gather" and self._gather is None:
            raise ValueError("method 'dma_gather' needs a block-major host tier; use 'auto'")
        if self.has_uva and method in ("auto", "fused") and fused_available():
            self._fused = self._fused_copier()
        if method == "fused" and self._fused is None:
            raise ValueError("method 'fused' needs CUDA, a pinned host tier visible to the GPU "
                             "and Triton; use 'auto'")

    @property
    def has_uva(self) -> bool:
        """Whether gather/scatter kernels reach the host tier directly. Pure."""
        return self.is_cuda and self._kernel_views is not None

    @property
    def fused(self) -> bool:
        """Whether plans run as one kernel per layer in every direction at once. Pure."""
        return self._fused is not None and not self.dma_batched

    @property
    def dma_batched(self) -> bool:
        """Whether plans run as batches on the copy engines (see the module docstring).
        Pure."""
        if self._dma is None:
            return False
        if self.method == "dma_batch":
            return True
        copier = self._dma[0]
        return copier.copy_bytes(0 if self.layerwise else None) >= self.min_batch_copy_bytes

    @property
    def path(self) -> Literal["dma_batch", "dma_gather", "fused", "waves"]:
        """Which path runs plans whatever their slots (see the module docstring); ``auto``
        may still take ``dma_gather`` for a plan (``plan_path``). Pure."""
        if self.dma_batched:
            return "dma_batch"
        if self.method == "dma_gather":
            return "dma_gather"
        return "fused" if self.fused else "waves"

    def plan_path(self, plan: TransferPlan) -> Literal["dma_batch", "dma_gather", "fused",
                                                       "waves"]:
        """Which path ``submit`` takes for ``plan``: under ``auto``, ``dma_gather`` where
        its whole-block offloads and onboards come in runs of consecutive host slots long
        enough that staging pays (``gather_cost``). Pure."""
        path = self.path
        if path in ("fused", "waves") and self._staged_if_it_pays(plan) is not None:
            return "dma_gather"
        return path

    def _staged_if_it_pays(self, plan: TransferPlan) -> StagedColumns | None:
        """Under ``auto`` (fused or wave path), ``plan``'s columns for the staging path
        where it pays (``gather_cost``), else ``None``. Pure."""
        if self._gather is None or not len(plan):
            return None
        columns = staged_columns(arrays_of(plan), self._tpb)
        num_ops, num_runs = host_runs(columns)
        copier = self._gather.copier
        if self.gather_cost.pays(num_ops, num_runs, copier.block_bytes,
                                 copier.capacity * copier.block_bytes):
            return columns
        return None

    def _targets(self) -> tuple[list[LaunchTarget], LaunchTarget | None]:
        """Per layer, and for whole block-major blocks, what one launch copies between."""
        assert self._kernel_views is not None
        views, kinds = self._kernel_views, self._kinds
        # Without a host tier, plans only copy GPU blocks: the host view is never read.
        host = Tier.HOST if self.host is not None else Tier.GPU
        layers = [LaunchTarget(layer_view(views[Tier.GPU], kinds[Tier.GPU], i),
                               layer_view(views[host], kinds[host], i), 2)
                  for i in range(self._num_layers)]
        whole = None
        if kinds[Tier.GPU] == kinds[host] == "block_major":
            whole = LaunchTarget(views[Tier.GPU][0], views[host][0], 2 * self._num_layers)
        return layers, whole

    def _fused_copier(self) -> FusedCopier:
        import torch

        num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        return FusedCopier(*self._targets(), self._tpb, 8 * num_sms)

    def _dma_copier(self) -> tuple[DmaBatchCopier, CudartBatch] | None:
        """The copy-engine path, where the runtime has the batched copy and one probe copy
        through it (8 bytes on the GPU) arrives."""
        import numpy as np
        import torch

        execute = load_cudart_batch()
        if execute is None:
            return None
        stream = self._streams.stream("h2d")
        probe = torch.arange(2, dtype=torch.int64, device=self.device)
        torch.cuda.synchronize(self.device)
        with torch.cuda.device(self.device):
            def addr(x: int) -> np.ndarray[Any, np.dtype[np.uint64]]:
                return np.array([x], dtype=np.uint64)
            try:
                execute(addr(probe.data_ptr()), addr(probe.data_ptr() + 8), addr(8),
                        stream.cuda_stream)
            except RuntimeError:
                return None
            stream.synchronize()
        if probe.tolist() != [1, 1]:
            return None
        return DmaBatchCopier(*self._targets(), self._tpb), execute

    # ---- the protocol ------------------------------------------------------------------

    def submit(self, plan: TransferPlan) -> TransferHandle:
        """Start the copies of ``plan``; on CPU they are done on return.

        Raises ValueError (copying nothing) for an op outside the tiers, or for a plan a
        manager handed out that was submitted here already (each runs once). When a copy fails,
        TransferError names the ops not done (or not surely done): on the wave path the
        failing batch's and every later one's, on the fused and batched paths every op.
        TypeError, copying nothing, for what is no TransferPlan.
        """
        if not isinstance(plan, TransferPlan):
            raise TypeError(f"plan must be a TransferPlan, got {type(plan).__name__}")
        if not len(plan):
            return TransferHandle(plan)
        last = self._submit_once(plan)
        try:
            return self._submit_on_path(plan)
        except TransferError as exc:
            self._uncount(plan, exc.failed_in(plan))
            raise
        except ValueError:
            # NOTE: refused, nothing copied (every path checks the plan before its first
            # copy): the plan did not run here. Recorded as run, it was refused again as
            # "submitted already", and an older plan of its manager as older than it.
            self._unsubmit(plan, last)
            raise

    def _submit_on_path(self, plan: TransferPlan) -> TransferHandle:
        """``submit`` of a non-empty plan on the path it takes."""
        if self._dma is not None and self.dma_batched:
            return self._submit_batched(plan, *self._dma)
        if self._gather is not None:
            if self.method == "dma_gather":
                return self._submit_gather(plan, self._gather, None)
            if self.path in ("fused", "waves"):
                columns = self._staged_if_it_pays(plan)
                if columns is not None:
                    return self._submit_gather(plan, self._gather, columns)
        if self._fused is not None:
            return self._submit_fused(plan, self._fused)
        return self._waves.submit(plan, self.layerwise, self.before_batch)

    def _submit_once(self, plan: TransferPlan) -> int | None:
        """ValueError, copying nothing, for a plan a manager handed out (``issuer``) that
        was submitted here already, or is older than one that was: its copies ran (or
        failed: then ``transfer_failed`` is the way on), and run again a swap's offload
        would read what its onboard wrote since, corrupting the host block. A plan built by
        hand carries no issuer and may run as often as its caller likes (benchmarks).
        Returns the number recorded before (``None``: none), for ``_unsubmit``."""
        issuer = plan.issuer
        if issuer is None:
            return None
        key, number = issuer
        try:
            last = self._submitted.get(key)
        except TypeError:  # no weak reference takes it (an older manager's pickle's key)
            return None
        if last is not None and number <= last:
            raise ValueError(
                f"plan {number} of its manager was submitted to this engine already"
                f"{'' if number == last else f' (and plan {last} after it)'}: a plan's "
                f"copies run once; after a TransferError report its failed ops with "
                f"transfer_failed and go on with the next step's plan")
        self._submitted[key] = number
        return last

    def _unsubmit(self, plan: TransferPlan, last: int | None) -> None:
        """Undo ``_submit_once(plan)`` (which returned ``last``): the plan was refused."""
        issuer = plan.issuer
        if issuer is None:
            return
        key = issuer[0]
        try:
            if last is None:
                self._submitted.pop(key, None)
            else:
                self._submitted[key] = last
        except TypeError:  # not recorded: no weak reference takes it
            pass

    def _launches(self) -> list[int | None]:
        return list(range(self._num_layers)) if self.layerwise else [None]

    def _failed(self, plan: TransferPlan, layer: int | None, exc: Exception) -> TransferError:
        """A launch that fails fails every op: earlier layers were copied, later ones not,
        so no op is surely done."""
        ops = plan.ops
        what = "the plan's copy" if layer is None else f"the copy of layer {layer}"
        return TransferError(f"{len(ops)} of {len(ops)} copies not done: {what} failed: {exc}",
                             ops, range(len(ops)))

    def _submit_fused(self, plan: TransferPlan, fused: FusedCopier) -> TransferHandle:
        """``submit`` on the fused path: one launch per layer (layer ``i``'s event completes
        with its copies), the layers' launches on two streams in turn.

        NOTE: two streams, because layers never share memory: on one stream each layer's
        kernel drained (its last programs running on a few SMs) before the next one
        started, and at 64 KiB blocks of four layers (16 KiB a layer) the plan moved 72
        GB/s both ways against 81-83 for one launch of the same plan (H200). On two, the
        next layer's programs fill the SMs the last one's leave. A layer's programs start
        as the earlier layer's finish (its grid fills the GPU), so layer 0 is not later."""
        import torch

        first = self._streams.stream("fused")
        launches = self._launches()
        streams = [first] if len(launches) == 1 else [first, self._streams.stream("fused_b")]
        for event in self._streams.start_events():
            first.wait_event(event)
        layer_events: list[Any] = []
        # NOTE: Triton launches on the current device; an engine of another rank's GPU
        # (tensor parallelism) must not rely on the caller having switched to it.
        with torch.cuda.device(self.device), torch.cuda.stream(first):
            prepared = fused.prepare(plan, self._num_blocks, self.device)
            self._count_arrays(prepared.arrays, prepared.num_components)
            if len(streams) > 1:
                # The second stream starts where the first is now: after the caller's
                # work, the plan before, and the upload of this plan's op rows.
                uploaded = new_event()
                uploaded.record(first)
                streams[1].wait_event(uploaded)
                # Its kernels read the rows: their memory is not handed out again before
                # that stream's work is done either.
                prepared.items.record_stream(streams[1])
                if prepared.starts is not None:
                    prepared.starts.record_stream(streams[1])
            layer: int | None = None
            try:
                for i, layer in enumerate(launches):
                    stream = streams[i % len(streams)]
                    if self.before_launch is not None:
                        self.before_launch(layer)
                    with torch.cuda.stream(stream):
                        self.stats.num_fused_launches += fused.launch(prepared, layer)
                    event = new_event()
                    event.record(stream)
                    layer_events.append(event)
            except Exception as exc:
                queued = [*layer_events]
                for stream in streams:
                    event = new_event()
                    event.record(stream)
                    queued.append(event)
                self._streams.last_done = self._streams.join(queued)
                raise self._failed(plan, layer, exc) from exc
        # The plan's end: the last layer's event of each stream, joined.
        done = self._streams.finish(layer_events[-len(streams):])
        return TransferHandle(plan, 0, 0, done, layer_events if self.layerwise else None)

    def _submit_batched(self, plan: TransferPlan, copier: DmaBatchCopier,
                        execute: Executor) -> TransferHandle:
        """``submit`` on the copy engines: per layer, its batches on the stream of their
        direction, each after the batches of the level before in its group."""
        import torch

        launches = self._launches()
        targets = [copier.targets(layer) for layer in launches]
        prepared = copier.prepare(plan, self._num_blocks, sum(map(len, targets)),
                                  targets[0][0].num_segs)
        self._count_arrays(prepared.arrays, prepared.num_components)
        start = self._streams.start_events()
        layer_events: list[Any] = []
        queued: list[Any] = []  # every event recorded: what the next plan must follow
        layer: int | None = None
        try:
            with torch.cuda.device(self.device):
                for layer, layer_targets in zip(launches, targets, strict=True):
                    if self.before_launch is not None:
                        self.before_launch(layer)
                    last: dict[str, Any] = {}  # per stream, its last event in this layer
                    for target in layer_targets:
                        done: dict[tuple[int, int], list[Any]] = {}
                        for batch in copier.batches(prepared, target):
                            name = STREAM_OF_FLAGS[batch.flags]
                            stream = self._streams.stream(name)
                            deps = start if batch.level == 0 else done[(batch.group,
                                                                        batch.level - 1)]
                            for event in deps:
                                stream.wait_event(event)
                            execute(batch.dsts, batch.srcs, batch.sizes, stream.cuda_stream)
                            self.stats.num_dma_batches += 1
                            last[name] = _record(stream, done.setdefault(
                                (batch.group, batch.level), []), queued)
                    layer_events.append(self._streams.join(list(last.values())))
        except Exception as exc:
            self._streams.last_done = self._streams.join(queued or start)
            raise self._failed(plan, layer, exc) from exc
        done_event = self._streams.finish(layer_events)
        return TransferHandle(plan, 0, 0, done_event, layer_events if self.layerwise else None)

    def _submit_gather(self, plan: TransferPlan, submitter: GatherSubmitter,
                       columns: StagedColumns | None) -> TransferHandle:
        """``submit`` on the staging path (``gather_submit``; ``dma_gather``'s docstring
        says what waits for what): the plan's stats are counted while the DMAs are made.
        Every layer's event is the plan's."""
        if columns is None:
            columns = staged_columns(arrays_of(plan), self._tpb)
        prepared = submitter.copier.prepare(plan, self._num_blocks, columns)
        before = self.before_launch
        counted = []

        def count() -> None:
            self._count_staged(columns, prepared.num_components)
            counted.append(True)

        try:
            done_event, num_calls = submitter.submit(
                prepared, None if before is None else lambda: before(None), count)
        except StepFailed as failed:
            # NOTE: a step that fails before the last DMA is posted comes before the count:
            # counted here, as every path counts a plan it took before its copies fail
            # (``submit`` takes the failed ones back out). Uncounted, the failed plan left
            # the engine's ops and bytes below what had landed (negative, for the first).
            if not counted:
                self._count_staged(columns, prepared.num_components)
            raise self._failed(plan, None, failed.cause) from failed.cause
        self.stats.num_dma_batches += num_calls
        self.stats.num_gather_plans += 1
        return TransferHandle(plan, 0, 0, done_event,
                              [done_event] * self._num_layers if self.layerwise else None)

    def wait(self, handle: TransferHandle, layer: int | None = None) -> None:
        """Make the caller's current stream wait for ``handle``'s copies, or only for those
        of ``layer`` (CPU: no-op). TypeError for what is no TransferHandle of this engine's;
        ValueError for a layer that is none of the storage's (-1 waited for the last layer's
        copies only, a layer past the last raised IndexError, on CUDA)."""
        _check_handle(handle)
        if layer is not None:
            index = layer if type(layer) is int else as_integer(layer)
            if index is None or not 0 <= index < self._num_layers:
                raise ValueError(f"layer must be None or an int in 0..{self._num_layers - 1}, "
                                 f"got {shown(layer)}")
            layer = index
        event = handle.event
        if layer is not None and handle.layer_events is not None:
            event = handle.layer_events[layer]
        if event is not None:
            import torch

            torch.cuda.current_stream(self.device).wait_event(event)

    def poll(self, handle: TransferHandle) -> bool:
        """Whether every copy of ``handle`` is done. Pure. TypeError for what is no
        TransferHandle."""
        _check_handle(handle)
        return handle.event is None or bool(handle.event.query())  # type: ignore[no-untyped-call]

    def synchronize(self, handle: TransferHandle) -> None:
        """Block the CPU until ``handle``'s copies are done (before reading host blocks).
        TypeError for what is no TransferHandle."""
        _check_handle(handle)
        if handle.event is not None:
            handle.event.synchronize()

    def synchronize_all(self) -> None:
        """Block the CPU until every copy submitted so far is done (after a failure, when
        no handle came back)."""
        if self.is_cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def _count_staged(self, columns: StagedColumns, num_components: int) -> None:
        """``_count_arrays`` of a plan the staging path takes: for whole offloads and
        onboards only, one count of its offloads (its bytes follow)."""
        if not columns.all_staged:
            self._count_arrays(columns.arrays, num_components)
            return
        import numpy as np

        stats = self.stats
        num_ops = len(columns.flags)
        num_offloads = int(np.count_nonzero(columns.to_host))
        stats.num_plans += 1
        stats.num_ops += num_ops
        stats.num_components += num_components
        block_bytes = self._tpb * self._bytes_per_token
        stats.bytes_d2h += num_offloads * block_bytes
        stats.bytes_h2d += (num_ops - num_offloads) * block_bytes

    def _uncount(self, plan: TransferPlan, failed: list[int]) -> None:
        """Take the ops at ``failed`` of ``plan``, counted when it was prepared, out of the
        copies and bytes counted: they did not land (a launch counts as made).

        NOTE: a plan whose copies failed was counted whole: the engine reported the
        bytes of copies that never ran."""
        stats = self.stats
        per_token = self._bytes_per_token
        for i in failed:
            op = plan.op(i)
            stats.num_ops -= 1
            if op.num_tokens < self._tpb:
                stats.num_partial_ops -= 1
            nbytes = op.num_tokens * per_token
            if op.dst_tier is Tier.HOST:
                stats.bytes_d2h -= nbytes
            elif op.src_tier is Tier.HOST:
                stats.bytes_h2d -= nbytes
            else:
                stats.bytes_d2d -= nbytes

    def _count_arrays(self, a: PlanArrays, num_components: int) -> None:
        """What the fused and batched paths count, over the plan's arrays."""
        import numpy as np

        stats = self.stats
        stats.num_plans += 1
        stats.num_ops += len(a.num_tokens)
        stats.num_components += num_components
        stats.num_partial_ops += int((a.num_tokens < self._tpb).sum())
        # Tokens per direction in one pass (flags as the fused kernel's: bit 0 source on
        # the host, bit 1 destination on the host); float sums are exact below 2**53.
        tokens = np.bincount(a.src_tier + 2 * a.dst_tier, weights=a.num_tokens, minlength=4)
        for flags, field in ((1, "bytes_h2d"), (2, "bytes_d2h"), (0, "bytes_d2d")):
            nbytes = int(tokens[flags]) * self._bytes_per_token
            setattr(stats, field, getattr(stats, field) + nbytes)


def _check_int(name: str, value: object, low: int) -> int:
    """``value`` as a plain int if it is an integer (``kvtier.counts``: a NumPy or
    ``__index__`` one too, never a bool or a float) >= ``low``; else ValueError naming
    ``name``. Pure."""
    n = as_integer(value)
    if n is None or n < low:
        raise ValueError(f"{name} must be an int >= {low}, got {shown(value)}")
    return n


def _check_bool(name: str, value: object) -> bool:
    """``value`` if it is a bool; else ValueError naming ``name``. Pure."""
    if type(value) is not bool:
        raise ValueError(f"{name} must be a bool, got {shown(value)}")
    return value


def _check_handle(handle: object) -> None:
    """TypeError unless ``handle`` is a TransferHandle. Pure.

    NOTE: ``poll`` and ``synchronize`` read ``handle.event`` of anything: a str was an
    AttributeError from inside, as ``wait``'s was before it checked."""
    if not isinstance(handle, TransferHandle):
        raise TypeError(f"handle must be a TransferHandle, got {type(handle).__name__}")


def _record(stream: Any, level_events: list[Any], queued: list[Any]) -> Any:
    """An event recorded on ``stream`` now, added to its level's events (what the next
    level waits for) and to the plan's (what the next plan follows after a failure)."""
    event = new_event()
    event.record(stream)
    level_events.append(event)
    queued.append(event)
    return event


def _device_setter(index: int) -> Callable[[], None]:
    """What a submit thread runs first: select CUDA device ``index`` (the runtime's calls
    and torch's launches go to the thread's current device). Holds only the index: a thread
    that held the engine would keep it alive."""
    def select() -> None:
        import torch

        torch.cuda.set_device(index)
    return select
