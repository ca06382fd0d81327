"""TorchTransferEngine: runs a manager's plans on real KV tensors (extra ``torch``).

On CUDA with the pinned host seen from the GPU (unified addressing) and Triton present,
``auto`` and ``fused`` run a plan as one kernel per layer that moves offloads, onboards
and partial copies at once, ordering only the ops that share a written slot
(``kvtier.transfer.fused``: the plan is planned as arrays, no Python step per op).

Elsewhere (CPU, ``dma``, ``staged``, no Triton) a plan is cut into waves and batches
(``kvtier.transfer.batching``); each batch copies all its blocks with a few large
operations, never one Python call per block. Per group of ops with the same token count,
one of three methods::

    dma      one copy_ per merged run of consecutive slots, on the copy engine; chosen when
             runs are long (at least ``min_dma_copy_bytes`` per call)
    kernel   one gather (index_select) and one scatter (index_copy_) per tensor. On CUDA the
             pinned host tier is also seen as a CUDA tensor (unified addressing), so the
             gather or the scatter reads or writes host memory over PCIe directly
    staged   CUDA without unified addressing: gather into a pinned staging buffer, one DMA,
             scatter on the other side (the host side runs on the CPU, synchronously)

NOTE: on an H200 (PCIe Gen5 x16, torch 2.11) with blocks at random slots, ``kernel`` moved
0.89-0.93 of one large pinned copy's bandwidth for blocks of 16 KiB to 4 MiB, each way;
one DMA per block only won at 4 MiB (0.96) and lost below 1 MiB (0.03 at 16 KiB: the
per-call cost); ``staged`` reached 0.1-0.5 (the CPU side). Hence ``auto``'s choice.

Layer by layer (``layerwise``, the default): layers never share memory, so the plan runs
once per layer, layer 0 first, and each layer gets its own completion event. The forward
pass waits for layer ``i``'s event just before its layer ``i`` touches the pool, so it
computes while later layers are still being onboarded::

    copy streams   [L0 copies][L1 copies][L2 copies] ...
    forward             [wait L0|layer 0][wait L1|layer 1][wait L2|layer 2] ...

On CUDA each direction has its own stream; a wave waits for the events of the previous
one, the first wave for the work already queued on the caller's stream (the forward pass
that wrote the blocks being offloaded) and for the previous plan. ``wait`` makes the
caller's stream wait (the CPU does not block). On CPU every copy is done when ``submit``
returns, through the same code.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvtier.tier import Tier
from kvtier.transfer.batching import (
    CopyGroup,
    Run,
    TransferBatch,
    check_batches,
    merge_runs,
    plan_batches,
)
from kvtier.transfer.engine import TransferError
from kvtier.transfer.fused import FusedCopier, FusedPlan, LaunchTarget, fused_available
from kvtier.transfer.plan import TransferPlan
from kvtier.transfer.torch_handle import TransferHandle, TransferStats
from kvtier.transfer.torch_memory import (
    copy_staged,
    copy_view,
    new_event,
    new_stream,
    uva_alias,
)

if TYPE_CHECKING:
    import torch

    from kvtier.storage import KVStorage

METHODS = ("auto", "fused", "kernel", "dma", "staged")
Pair = tuple["torch.Tensor", "torch.Tensor", int]  # source, destination, token axis


class TorchTransferEngine:
    """Executes plans between a GPU tier and a host tier (see the module docstring).

    ``gpu`` may live on the CPU (tests without a GPU); ``host`` is a CPU storage, pinned on
    a CUDA machine, or ``None`` when there is no host tier. ``before_batch`` is called with
    each batch before it runs, ``before_launch`` with each layer (``None``: all) before the
    fused kernel's launch for it (fault injection in tests).
    """

    def __init__(
        self,
        gpu: KVStorage,
        host: KVStorage | None,
        method: str = "auto",
        min_dma_copy_bytes: int = 2 << 20,
        layerwise: bool = True,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if host is not None:
            a, b = gpu.layout, host.layout
            if (a.num_layers, a.num_kv_heads, a.head_dim, a.tokens_per_block, a.dtype) != (
                    b.num_layers, b.num_kv_heads, b.head_dim, b.tokens_per_block, b.dtype):
                raise ValueError(f"GPU and host layouts differ beyond the layout kind: {a} vs {b}")
            if host.device.type != "cpu":
                raise ValueError(f"the host tier must be on the CPU, got {host.device}")
        self.gpu = gpu
        self.host = host
        self.method = method
        self.min_dma_copy_bytes = min_dma_copy_bytes
        self.layerwise = layerwise
        self.device = gpu.device
        self.is_cuda = gpu.device.type == "cuda"
        self.stats = TransferStats()
        self.before_batch: Callable[[TransferBatch], None] | None = None
        self.before_launch: Callable[[int | None], None] | None = None
        self._tpb = gpu.layout.tokens_per_block
        self._num_layers = gpu.layout.num_layers
        self._bytes_per_token = gpu.layout.bytes_per_token
        self._storage = {Tier.GPU: gpu, Tier.HOST: host}
        self._num_blocks = {tier: None if s is None else s.num_blocks
                            for tier, s in self._storage.items()}
        self._views = {tier: [copy_view(t) for t in s.tensors]
                       for tier, s in self._storage.items() if s is not None}
        # What a gather/scatter kernel indexes: host views aliased on the GPU under CUDA.
        self._kernel_views: dict[Tier, list[torch.Tensor]] | None = dict(self._views)
        if self.is_cuda and host is not None:
            aliases = [uva_alias(v, gpu.device) for v in self._views[Tier.HOST]]
            if all(a is not None for a in aliases) and host.pinned:
                self._kernel_views = {Tier.GPU: self._views[Tier.GPU],
                                      Tier.HOST: [a for a in aliases if a is not None]}
            else:
                self._kernel_views = None
        if method in ("kernel", "fused") and self._kernel_views is None:
            raise ValueError(f"method {method!r} needs a pinned host tier visible to the GPU "
                             "(unified addressing); use 'auto' or 'staged'")
        self._streams: dict[str, torch.cuda.Stream] = {}
        self._last_done: torch.cuda.Event | None = None
        self._fused: FusedCopier | None = None
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
        return self._fused is not None

    def _fused_copier(self) -> FusedCopier:
        import torch

        assert self._kernel_views is not None
        views = self._kernel_views
        # Without a host tier, plans only copy GPU blocks: the host view is never read.
        host = Tier.HOST if self.host is not None else Tier.GPU
        layers = [LaunchTarget(self._layer(views, Tier.GPU, i), self._layer(views, host, i), 2)
                  for i in range(self._num_layers)]
        whole = None
        if self._kind(Tier.GPU) == self._kind(host) == "block_major":
            whole = LaunchTarget(views[Tier.GPU][0], views[host][0], 2 * self._num_layers)
        num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        return FusedCopier(layers, whole, self._tpb, 8 * num_sms)

    # ---- the protocol ------------------------------------------------------------------

    def submit(self, plan: TransferPlan) -> TransferHandle:
        """Start the copies of ``plan``; on CPU they are done on return.

        Raises ValueError (copying nothing) for an op outside the tiers. When a copy fails,
        the batches that can't be trusted (the failing one and every later one) are
        dropped, the others finish, and TransferError names the ops not done.
        """
        ops = plan.ops
        if not ops:
            return TransferHandle(plan)
        if self._fused is not None:
            return self._submit_fused(plan, self._fused)
        batches = plan_batches(ops)
        check_batches(batches, ops, self._num_blocks, self._tpb)
        num_waves = batches[-1].wave + 1
        self._count(batches, len(ops), num_waves)
        waves = [list(w) for _, w in itertools.groupby(enumerate(batches),
                                                       key=lambda ib: ib[1].wave)]
        layers: list[int | None] = (list(range(self._num_layers)) if self.layerwise
                                    else [None])
        start = self._start_events()
        indices: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        failed: set[int] = set()
        error: tuple[str, Exception] | None = None
        layer_events: list[Any] = []
        for layer in layers:
            deps = start
            for wave in waves:
                events: list[Any] = []
                for index, batch in wave:
                    if index in failed:
                        continue
                    try:
                        if self.before_batch is not None and layer == layers[0]:
                            self.before_batch(batch)
                        event = self._run_batch(batch, deps, layer, indices)
                    except Exception as exc:
                        # Batches are sorted by wave: this one and all later ones are out.
                        failed.update(range(index, len(batches)))
                        error = error or (f"a {batch.src_tier.name}->{batch.dst_tier.name} "
                                          f"batch of {len(batch.positions)} ops in wave "
                                          f"{batch.wave} failed: {exc}", exc)
                        continue
                    if event is not None:
                        events.append(event)
                if events:
                    deps = events
            layer_events.append(self._join(deps))
        done = self._finish(layer_events)
        if error is not None:
            positions = sorted(i for index in failed for i in batches[index].positions)
            failed_ops = [ops[i] for i in positions]
            raise TransferError(f"{len(failed_ops)} of {len(ops)} copies not done: {error[0]}",
                                failed_ops, positions) from error[1]
        return TransferHandle(plan, len(batches), num_waves, done,
                              layer_events if self.layerwise and self.is_cuda else None)

    def _submit_fused(self, plan: TransferPlan, fused: FusedCopier) -> TransferHandle:
        """``submit`` on the fused path: one launch per layer on one stream (layer ``i``'s
        event completes with its copies). A launch that fails fails every op: earlier
        layers were copied, later ones not, so no op is surely done."""
        import torch

        ops = plan.ops
        start = self._start_events()
        stream = self._stream("fused")
        for event in start:
            stream.wait_event(event)
        layers: list[int | None] = (list(range(self._num_layers)) if self.layerwise
                                    else [None])
        layer_events: list[Any] = []
        # NOTE: Triton launches on the current device; an engine of another rank's GPU
        # (tensor parallelism) must not rely on the caller having switched to it.
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            prepared = fused.prepare(plan, self._num_blocks, self.device)
            self._count_arrays(prepared)
            try:
                for layer in layers:
                    if self.before_launch is not None:
                        self.before_launch(layer)
                    self.stats.num_fused_launches += fused.launch(prepared, layer)
                    event = new_event()
                    event.record(stream)
                    layer_events.append(event)
            except Exception as exc:
                self._last_done = new_event()
                self._last_done.record(stream)
                raise TransferError(f"{len(ops)} of {len(ops)} copies not done: the fused "
                                    f"copy of layer {layer} failed: {exc}", ops,
                                    range(len(ops))) from exc
        self._last_done = layer_events[-1]
        return TransferHandle(plan, 0, 0, layer_events[-1],
                              layer_events if self.layerwise else None)

    def wait(self, handle: TransferHandle, layer: int | None = None) -> None:
        """Make the caller's current stream wait for ``handle``'s copies, or only for those
        of ``layer`` (CPU: no-op)."""
        event = handle.event
        if layer is not None and handle.layer_events is not None:
            event = handle.layer_events[layer]
        if event is not None:
            import torch

            torch.cuda.current_stream(self.device).wait_event(event)

    def poll(self, handle: TransferHandle) -> bool:
        """Whether every copy of ``handle`` is done. Pure."""
        return handle.event is None or bool(handle.event.query())  # type: ignore[no-untyped-call]

    def synchronize(self, handle: TransferHandle) -> None:
        """Block the CPU until ``handle``'s copies are done (before reading host blocks)."""
        if handle.event is not None:
            handle.event.synchronize()

    def synchronize_all(self) -> None:
        """Block the CPU until every copy submitted so far is done (after a failure, when
        no handle came back)."""
        if self.is_cuda:
            import torch

            torch.cuda.synchronize(self.device)

    # ---- counts ------------------------------------------------------------------------

    def _count(self, batches: list[TransferBatch], num_ops: int, num_waves: int) -> None:
        stats = self.stats
        stats.num_plans += 1
        stats.num_ops += num_ops
        stats.num_batches += len(batches)
        stats.num_waves += num_waves
        for batch in batches:
            for group in batch.groups:
                num = len(group.src_slots)
                nbytes = num * group.num_tokens * self._bytes_per_token
                if group.num_tokens < self._tpb:
                    stats.num_partial_ops += num
                if batch.dst_tier is Tier.GPU and batch.src_tier is Tier.HOST:
                    stats.bytes_h2d += nbytes
                elif batch.dst_tier is Tier.HOST:
                    stats.bytes_d2h += nbytes
                else:
                    stats.bytes_d2d += nbytes

    def _count_arrays(self, prepared: FusedPlan) -> None:
        """``_count`` for the fused path, over the plan's arrays."""
        stats = self.stats
        a = prepared.arrays
        stats.num_plans += 1
        stats.num_ops += len(a.num_tokens)
        stats.num_components += prepared.num_components
        stats.num_partial_ops += int((a.num_tokens < self._tpb).sum())
        for src, dst, field in ((Tier.HOST, Tier.GPU, "bytes_h2d"),
                                (Tier.GPU, Tier.HOST, "bytes_d2h"),
                                (Tier.GPU, Tier.GPU, "bytes_d2d")):
            mask = (a.src_tier == src) & (a.dst_tier == dst)
            nbytes = int(a.num_tokens[mask].sum()) * self._bytes_per_token
            setattr(stats, field, getattr(stats, field) + nbytes)

    # ---- streams and events ------------------------------------------------------------

    def _start_events(self) -> list[Any]:
        if not self.is_cuda:
            return []
        import torch

        start = new_event()
        start.record(torch.cuda.current_stream(self.device))
        return [start] if self._last_done is None else [start, self._last_done]

    def _join(self, deps: list[Any]) -> Any:
        """One event after all of ``deps`` (CUDA), on a stream of its own so that joining
        holds up no copy."""
        if not self.is_cuda or not deps:
            return None
        if len(deps) == 1:
            return deps[0]
        stream = self._stream("join")
        for event in deps:
            stream.wait_event(event)
        joined = new_event()
        joined.record(stream)
        return joined

    def _finish(self, layer_events: list[Any]) -> Any:
        """The plan's completion event; the next plan starts after it."""
        done = self._join([e for e in layer_events if e is not None])
        if done is not None:
            self._last_done = done
        return done

    def _stream(self, name: str) -> torch.cuda.Stream:
        stream = self._streams.get(name)
        if stream is None:
            stream = self._streams[name] = new_stream(self.device)
        return stream

    # ---- copies ------------------------------------------------------------------------

    def _run_batch(self, batch: TransferBatch, deps: list[Any], layer: int | None,
                   indices: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> Any:
        src, dst = batch.src_tier, batch.dst_tier
        if not self.is_cuda:
            for group in batch.groups:
                self._copy_group(src, dst, group, layer, deps, indices)
            return None
        import torch

        name = "d2d" if src is dst is Tier.GPU else ("h2d" if dst is Tier.GPU else "d2h")
        stream = self._stream(name)
        for event in deps:
            stream.wait_event(event)
        with torch.cuda.stream(stream):
            for group in batch.groups:
                self._copy_group(src, dst, group, layer, deps, indices)
            event = new_event()
            event.record(stream)
        return event

    def _kind(self, tier: Tier) -> str:
        storage = self._storage[tier]
        assert storage is not None
        return storage.layout.layout

    def _pairs(self, views: dict[Tier, list[torch.Tensor]], src: Tier, dst: Tier,
               layer: int | None) -> list[Pair]:
        """Tensor pairs to copy between: whole tensors when both tiers have the same layout
        kind and no layer is asked for, else one pair per layer (or the one layer)."""
        if layer is None and self._kind(src) == self._kind(dst):
            axis = 3 if self._kind(src) == "block_major" else 2
            return [(s, d, axis) for s, d in zip(views[src], views[dst], strict=True)]
        layers = range(self._num_layers) if layer is None else (layer,)
        return [(self._layer(views, src, i), self._layer(views, dst, i), 2) for i in layers]

    def _layer(self, views: dict[Tier, list[torch.Tensor]], tier: Tier,
               index: int) -> torch.Tensor:
        if self._kind(tier) == "block_major":
            return views[tier][0][:, index]
        return views[tier][index]

    def _dma_runs(self, src: Tier, dst: Tier, group: CopyGroup,
                  layer: int | None) -> list[Run] | None:
        """The runs to copy with one DMA each, or ``None`` where a gather/scatter is better:
        partial blocks, slots not contiguous in memory, or runs too short to pay for one
        call each (see the module docstring). Pure."""
        contiguous = (self._kind(src) == self._kind(dst)
                      and (layer is None or self._kind(src) == "layer_major"))
        if self.method not in ("auto", "dma") or group.num_tokens < self._tpb or not contiguous:
            return None
        if self.method == "dma" or self.min_dma_copy_bytes <= 0:
            return merge_runs(group.src_slots, group.dst_slots)
        num_tensors = len(self._views[src]) if layer is None else 1
        nbytes = len(group.src_slots) * self._tpb * self._bytes_per_token
        if layer is not None:
            nbytes //= self._num_layers
        max_runs = nbytes // (num_tensors * self.min_dma_copy_bytes)
        if max_runs == 0:
            return None
        return merge_runs(group.src_slots, group.dst_slots, max_runs)

    def _index(self, slots: list[int], device: torch.device) -> torch.Tensor:
        import torch

        index = torch.tensor(slots, dtype=torch.long)
        if device.type == "cpu":
            return index
        # NOTE: pinned and non-blocking, so building the index never waits for the stream.
        return index.pin_memory().to(device, non_blocking=True)

    def _indices(self, group: CopyGroup, src_device: torch.device, dst_device: torch.device,
                 cache: dict[int, tuple[torch.Tensor, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The group's slot indices, built once per plan (every layer uses them)."""
        pair = cache.get(id(group))
        if pair is None:
            pair = cache[id(group)] = (self._index(group.src_slots, src_device),
                                       self._index(group.dst_slots, dst_device))
        return pair

    def _copy_group(self, src: Tier, dst: Tier, group: CopyGroup, layer: int | None,
                    deps: list[Any], cache: dict[int, tuple[torch.Tensor, torch.Tensor]]
                    ) -> None:
        import torch

        runs = self._dma_runs(src, dst, group, layer)
        if runs is not None:
            pairs = self._pairs(self._views, src, dst, layer)
            self.stats.num_dma_copies += len(runs) * len(pairs)
            for s, d, _ in pairs:
                for run in runs:
                    d[run.dst_slot:run.dst_slot + run.num_blocks].copy_(
                        s[run.src_slot:run.src_slot + run.num_blocks], non_blocking=True)
            return
        views: dict[Tier, list[torch.Tensor]] | None = None
        if not self.is_cuda or src is dst is Tier.GPU:
            views = self._views
        elif self.method != "staged":
            views = self._kernel_views
        if views is None:
            self.stats.num_staged_groups += 1
            cpu = torch.device("cpu")
            src_index = self._index(group.src_slots, self.device if src is Tier.GPU else cpu)
            dst_index = self._index(group.dst_slots, self.device if dst is Tier.GPU else cpu)
            if src is Tier.HOST:
                for event in deps:  # earlier waves may still write these host blocks
                    event.synchronize()
            for s, d, axis in self._pairs(self._views, src, dst, layer):
                if group.num_tokens < self._tpb:
                    s = s.narrow(axis, 0, group.num_tokens)
                    d = d.narrow(axis, 0, group.num_tokens)
                copy_staged(s, d, src_index, dst_index)
            return
        self.stats.num_kernel_groups += 1
        src_index, dst_index = self._indices(group, self.device, self.device, cache)
        for s, d, axis in self._pairs(views, src, dst, layer):
            if group.num_tokens < self._tpb:
                s, d = s.narrow(axis, 0, group.num_tokens), d.narrow(axis, 0, group.num_tokens)
            d.index_copy_(0, dst_index, s.index_select(0, src_index))
