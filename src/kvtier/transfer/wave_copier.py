"""The torch engine's path by waves and batches (extra ``torch``): where the fused kernel
and the copy engines' batches do not run (CPU, ``kernel``, ``dma``, ``staged``, no Triton).

A plan is cut into waves and batches (``kvtier.transfer.batching``); each batch copies
all its blocks with a few large operations, never one Python call per block. Per group of
ops with the same token count, one of three methods::

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
per-call cost); ``staged`` reached 0.1-0.5 (the CPU side).

On CUDA each direction has its own stream; a wave waits for the events of the previous
one, the first wave for the plan's start events (``CopyStreams``).
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
    check_ops,
    merge_runs,
    plan_batches,
)
from kvtier.transfer.engine import TransferError
from kvtier.transfer.plan import TransferPlan
from kvtier.transfer.torch_handle import TransferHandle, TransferStats
from kvtier.transfer.torch_memory import copy_staged, layer_view, new_event

if TYPE_CHECKING:
    import torch

    from kvtier.transfer.copy_streams import CopyStreams

Pair = tuple["torch.Tensor", "torch.Tensor", int]  # source, destination, token axis
Views = dict[Tier, list["torch.Tensor"]]


class WaveCopier:
    """Runs plans wave by wave between tiers' ``views`` (byte views of their tensors).
    ``kernel_views`` are what a gather/scatter indexes (host views aliased on the GPU
    under CUDA), ``None`` where only staging reaches the host."""

    def __init__(self, views: Views, kernel_views: Views | None, kinds: dict[Tier, str],
                 num_blocks: dict[Tier, int | None], num_layers: int, tokens_per_block: int,
                 bytes_per_token: int, method: str, min_dma_copy_bytes: int,
                 streams: CopyStreams, stats: TransferStats) -> None:
        self.views = views
        self.kernel_views = kernel_views
        self.kinds = kinds
        self.num_blocks = num_blocks
        self.tokens_per_block = tokens_per_block
        self.bytes_per_token = bytes_per_token
        self.method = method
        self.min_dma_copy_bytes = min_dma_copy_bytes
        self.streams = streams
        self.stats = stats
        self.num_layers = num_layers

    def submit(self, plan: TransferPlan, layerwise: bool,
               before_batch: Callable[[TransferBatch], None] | None) -> TransferHandle:
        """Queue ``plan`` (non-empty); on the CPU it is done on return. Raises ValueError
        (copying nothing) for an op outside the tiers. When a copy fails, the batches that
        can't be trusted (the failing one and every later one) are dropped, the others
        finish, and TransferError names the ops not done."""
        ops = plan.ops
        try:
            batches = plan_batches(ops)
        except (TypeError, ValueError, AttributeError):
            # NOTE: an op of the wrong shape, or a tier or slot no arithmetic takes (a str),
            # failed in the wave planner with Python's words ("can only concatenate str"):
            # the op is named instead.
            check_ops(ops, self.num_blocks, self.tokens_per_block)
            raise
        check_batches(batches, ops, self.num_blocks, self.tokens_per_block)
        num_waves = batches[-1].wave + 1
        self._count(batches, len(ops), num_waves)
        waves = [list(w) for _, w in itertools.groupby(enumerate(batches),
                                                       key=lambda ib: ib[1].wave)]
        layers: list[int | None] = list(range(self.num_layers)) if layerwise else [None]
        start = self.streams.start_events()
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
                        if before_batch is not None and layer == layers[0]:
                            before_batch(batch)
                        event = self._run_batch(batch, deps, layer, indices)
                    except Exception as exc:
                        # Batches are sorted by wave: this one and all later ones are out.
                        failed.update(range(index, len(batches)))
                        error = error or (f"a {Tier(batch.src_tier).name}->"
                                          f"{Tier(batch.dst_tier).name} "
                                          f"batch of {len(batch.positions)} ops in wave "
                                          f"{batch.wave} failed: {exc}", exc)
                        continue
                    if event is not None:
                        events.append(event)
                if events:
                    deps = events
            layer_events.append(self.streams.join(deps))
        done = self.streams.finish(layer_events)
        if error is not None:
            positions = sorted(i for index in failed for i in batches[index].positions)
            failed_ops = [ops[i] for i in positions]
            raise TransferError(f"{len(failed_ops)} of {len(ops)} copies not done: {error[0]}",
                                failed_ops, positions) from error[1]
        return TransferHandle(plan, len(batches), num_waves, done,
                              layer_events if layerwise and self.streams.is_cuda else None)

    def _count(self, batches: list[TransferBatch], num_ops: int, num_waves: int) -> None:
        stats = self.stats
        stats.num_plans += 1
        stats.num_ops += num_ops
        stats.num_batches += len(batches)
        stats.num_waves += num_waves
        for batch in batches:
            for group in batch.groups:
                num = len(group.src_slots)
                nbytes = num * group.num_tokens * self.bytes_per_token
                if group.num_tokens < self.tokens_per_block:
                    stats.num_partial_ops += num
                if batch.dst_tier is Tier.GPU and batch.src_tier is Tier.HOST:
                    stats.bytes_h2d += nbytes
                elif batch.dst_tier is Tier.HOST:
                    stats.bytes_d2h += nbytes
                else:
                    stats.bytes_d2d += nbytes

    def _run_batch(self, batch: TransferBatch, deps: list[Any], layer: int | None,
                   indices: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> Any:
        src, dst = batch.src_tier, batch.dst_tier
        if not self.streams.is_cuda:
            for group in batch.groups:
                self._copy_group(src, dst, group, layer, deps, indices)
            return None
        import torch

        name = "d2d" if src is dst is Tier.GPU else ("h2d" if dst is Tier.GPU else "d2h")
        stream = self.streams.stream(name)
        for event in deps:
            stream.wait_event(event)
        with torch.cuda.stream(stream):
            for group in batch.groups:
                self._copy_group(src, dst, group, layer, deps, indices)
            event = new_event()
            event.record(stream)
        return event

    def _pairs(self, views: Views, src: Tier, dst: Tier, layer: int | None) -> list[Pair]:
        """Tensor pairs to copy between: whole tensors when both tiers have the same layout
        kind and no layer is asked for, else one pair per layer (or the one layer)."""
        kinds = self.kinds
        if layer is None and kinds[src] == kinds[dst]:
            axis = 3 if kinds[src] == "block_major" else 2
            return [(s, d, axis) for s, d in zip(views[src], views[dst], strict=True)]
        layers = range(self.num_layers) if layer is None else (layer,)
        return [(layer_view(views[src], kinds[src], i), layer_view(views[dst], kinds[dst], i), 2)
                for i in layers]

    def _dma_runs(self, src: Tier, dst: Tier, group: CopyGroup,
                  layer: int | None) -> list[Run] | None:
        """The runs to copy with one DMA each, or ``None`` where a gather/scatter is better:
        partial blocks, slots not contiguous in memory, or runs too short to pay for one
        call each (see the module docstring). Pure."""
        kinds = self.kinds
        contiguous = (kinds[src] == kinds[dst]
                      and (layer is None or kinds[src] == "layer_major"))
        if (self.method not in ("auto", "dma") or group.num_tokens < self.tokens_per_block
                or not contiguous):
            return None
        if self.method == "dma" or self.min_dma_copy_bytes <= 0:
            return merge_runs(group.src_slots, group.dst_slots)
        num_tensors = len(self.views[src]) if layer is None else 1
        nbytes = len(group.src_slots) * self.tokens_per_block * self.bytes_per_token
        if layer is not None:
            nbytes //= self.num_layers
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

    def _indices(self, group: CopyGroup, device: torch.device,
                 cache: dict[int, tuple[torch.Tensor, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The group's slot indices, built once per plan (every layer uses them)."""
        pair = cache.get(id(group))
        if pair is None:
            pair = cache[id(group)] = (self._index(group.src_slots, device),
                                       self._index(group.dst_slots, device))
        return pair

    def _copy_group(self, src: Tier, dst: Tier, group: CopyGroup, layer: int | None,
                    deps: list[Any], cache: dict[int, tuple[torch.Tensor, torch.Tensor]]
                    ) -> None:
        import torch

        runs = self._dma_runs(src, dst, group, layer)
        if runs is not None:
            pairs = self._pairs(self.views, src, dst, layer)
            self.stats.num_dma_copies += len(runs) * len(pairs)
            for s, d, _ in pairs:
                for run in runs:
                    d[run.dst_slot:run.dst_slot + run.num_blocks].copy_(
                        s[run.src_slot:run.src_slot + run.num_blocks], non_blocking=True)
            return
        device = self.streams.device
        views: Views | None = None
        if not self.streams.is_cuda or src is dst is Tier.GPU:
            views = self.views
        elif self.method != "staged":
            views = self.kernel_views
        if views is None:
            self.stats.num_staged_groups += 1
            cpu = torch.device("cpu")
            src_index = self._index(group.src_slots, device if src is Tier.GPU else cpu)
            dst_index = self._index(group.dst_slots, device if dst is Tier.GPU else cpu)
            if src is Tier.HOST:
                for event in deps:  # earlier waves may still write these host blocks
                    event.synchronize()
            for s, d, axis in self._pairs(self.views, src, dst, layer):
                if group.num_tokens < self.tokens_per_block:
                    s = s.narrow(axis, 0, group.num_tokens)
                    d = d.narrow(axis, 0, group.num_tokens)
                copy_staged(s, d, src_index, dst_index)
            return
        self.stats.num_kernel_groups += 1
        src_index, dst_index = self._indices(group, device, cache)
        for s, d, axis in self._pairs(views, src, dst, layer):
            if group.num_tokens < self.tokens_per_block:
                s, d = s.narrow(axis, 0, group.num_tokens), d.narrow(axis, 0, group.num_tokens)
            d.index_copy_(0, dst_index, s.index_select(0, src_index))
