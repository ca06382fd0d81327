"""What the torch transfer engine hands back for a plan, and what it counts."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from kvtier.transfer.plan import TransferPlan

if TYPE_CHECKING:
    import torch


@dataclass(slots=True)
class TransferStats:
    """What the engine did since it was created. Calls count per layer when layerwise."""

    num_plans: int = 0
    num_ops: int = 0
    num_partial_ops: int = 0
    num_waves: int = 0
    num_batches: int = 0
    num_kernel_groups: int = 0
    num_staged_groups: int = 0
    num_dma_copies: int = 0
    num_fused_launches: int = 0  # fused path: kernels launched
    num_components: int = 0  # fused and batched paths: groups of ops that share a written slot
    num_dma_batches: int = 0  # copy-engine paths: cudaMemcpyBatchAsync calls
    num_gather_plans: int = 0  # plans run through the GPU staging buffers (dma_gather)
    bytes_h2d: int = 0
    bytes_d2h: int = 0
    bytes_d2d: int = 0

    @classmethod
    def total(cls, stats: Iterable[TransferStats]) -> TransferStats:
        """Every counter summed over ``stats`` (the ranks of a tensor-parallel engine: each
        counts its own shard's copies, so ops and calls add up to ``tp_size`` times a
        single engine's and bytes to the whole model's). Pure."""
        out = cls()
        for s in stats:
            for f in fields(cls):
                setattr(out, f.name, getattr(out, f.name) + getattr(s, f.name))
        return out


class TransferHandle:
    """A submitted plan. On CUDA, ``event`` completes with every copy of it, and
    ``layer_events[i]`` (layerwise engines) with every copy of layer ``i``."""

    __slots__ = ("event", "layer_events", "num_batches", "num_waves", "plan")

    def __init__(self, plan: TransferPlan, num_batches: int = 0, num_waves: int = 0,
                 event: torch.cuda.Event | None = None,
                 layer_events: list[Any] | None = None) -> None:
        self.plan = plan
        self.num_batches = num_batches
        self.num_waves = num_waves
        self.event = event
        self.layer_events = layer_events
