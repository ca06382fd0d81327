"""A plan as arrays, cut into independent components, and copied by one kernel per layer
that moves every direction at once (extra ``torch``; Triton, which CUDA torch brings).

Why one kernel: copies driven by the GPU's own threads (reading or writing pinned host
memory over unified addressing) reach ~0.9 of PCIe one way, but two such kernels on two
streams do not overlap (the first takes every multiprocessor), so offload and onboard of
one step ran one after the other (0.52 of the two-way ceiling). One kernel whose programs
take offloads and onboards side by side keeps both directions of the link busy.

Why components, not waves: a step offloads its victims and onboards into the slots they
free; waves put every onboard after every offload. Here only ops that share a *written*
slot are ordered: they form a component, which one program runs in plan order::

    ops          off g1->h4   off g2->h5   on h9->g1   on h8->g2   on h7->g6
    component        0            1           0           1           2
    program A: off g1->h4, barrier, on h9->g1     program B: off g2->h5, barrier, ...

Planning is array work over the plan's columns (sort, search, scatter), never a Python
step per op: the ops' fields are transposed once (``zip``) into int64 arrays.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from kvtier.tier import Tier
from kvtier.transfer.batching import check_op
from kvtier.transfer.plan import PlanColumns, TransferOp, TransferPlan

if TYPE_CHECKING:
    import torch

ITEM_FIELDS = 4  # flags, src_slot, dst_slot, num_tokens (see copy_kernel)
BLOCK_BYTES = 8192  # bytes one program moves per loop turn
NUM_WARPS = 4


class PlanArrays(NamedTuple):
    """A plan's ops as int64 CPU tensors, one per field."""

    src_tier: torch.Tensor
    src_slot: torch.Tensor
    dst_tier: torch.Tensor
    dst_slot: torch.Tensor
    num_tokens: torch.Tensor


class FusedPlan(NamedTuple):
    """A plan ready to launch: its op rows in run order (on the device) and where each
    component starts (``None``: every op is a component of its own)."""

    items: torch.Tensor
    starts: torch.Tensor | None
    num_components: int
    arrays: PlanArrays


class LaunchTarget(NamedTuple):
    """The memory one launch copies between: a GPU and a host view whose block ``b`` starts
    at ``b * stride(0)``, ``num_segs`` segments of ``tokens_per_block * row`` elements."""

    gpu: torch.Tensor
    host: torch.Tensor
    num_segs: int


def fused_available() -> bool:
    """Whether Triton is installed (CUDA builds of torch bring it). Pure."""
    return importlib.util.find_spec("triton") is not None


def plan_arrays(ops: Sequence[TransferOp], columns: PlanColumns | None = None) -> PlanArrays:
    """The fields of ``ops`` (non-empty) as int64 tensors, taken without a copy from
    ``columns`` where the plan carries them. Pure."""
    import torch

    if columns is None:
        columns = PlanColumns.of(ops)
    if len(columns.src_slots) != len(ops):
        raise ValueError(f"the plan's columns hold {len(columns.src_slots)} ops, its ops "
                         f"{len(ops)}")
    # NOTE: torch.frombuffer shares the array's memory; torch.tensor(list) would be several
    # times slower per element.
    return PlanArrays(*(torch.frombuffer(column, dtype=torch.int64) for column in columns))


def check_arrays(arrays: PlanArrays, ops: Sequence[TransferOp],
                 num_blocks: dict[Tier, int | None], tokens_per_block: int) -> None:
    """Raise ValueError naming the first op whose slot is outside its tier, whose token
    count is not in 1..tokens_per_block, or that copies a slot onto itself. Pure."""
    import torch

    bad = (arrays.num_tokens < 1) | (arrays.num_tokens > tokens_per_block)
    bad |= (arrays.src_tier == arrays.dst_tier) & (arrays.src_slot == arrays.dst_slot)
    for tiers, slots in ((arrays.src_tier, arrays.src_slot), (arrays.dst_tier, arrays.dst_slot)):
        for tier in Tier:
            num = num_blocks.get(tier)
            on_tier = tiers == tier
            bad |= on_tier if num is None else on_tier & ((slots < 0) | (slots >= num))
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        check_op(i, ops[i], num_blocks, tokens_per_block)
        raise AssertionError(f"op {i} {ops[i]} failed the array check but not check_op")


def components(arrays: PlanArrays) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(order, starts)``: the ops grouped into components (ops that share a slot some op
    of the plan writes), each in plan order, components ordered by their first op;
    ``None`` when every op is a component of its own. Pure."""
    import torch

    n = len(arrays.src_slot)
    src_key = arrays.src_slot * 2 + arrays.src_tier
    dst_key = arrays.dst_slot * 2 + arrays.dst_tier
    written = torch.sort(dst_key).values
    pos = torch.searchsorted(written, src_key).clamp_(max=n - 1)
    reads_written = written[pos] == src_key
    if not bool(reads_written.any()) and not bool((written[1:] == written[:-1]).any()):
        return None
    keys, inverse = torch.unique(torch.cat([dst_key, src_key]), return_inverse=True)
    dst_k = inverse[:n]
    linked = torch.nonzero(reads_written).flatten()  # ops whose source some op writes
    src_k = inverse[n:][linked]
    # Label propagation over ops and slots: every op takes the smallest label of the slots
    # it touches, until nothing changes; then each component holds its first op's index.
    label = torch.arange(n)
    while True:
        key_label = torch.full((len(keys),), n, dtype=torch.int64)
        key_label.scatter_reduce_(0, dst_k, label, "amin")
        key_label.scatter_reduce_(0, src_k, label[linked], "amin")
        new = torch.minimum(label, key_label[dst_k])
        new[linked] = torch.minimum(new[linked], key_label[src_k])
        new = new[new]  # a label is an earlier op of the same component: jump to its label
        if torch.equal(new, label):
            break
        label = new
    sorted_label, order = torch.sort(label, stable=True)
    boundaries = torch.nonzero(sorted_label[1:] != sorted_label[:-1]).flatten() + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), boundaries,
                        torch.tensor([n], dtype=torch.int64)])
    return order, starts


def pack_items(arrays: PlanArrays, order: torch.Tensor | None) -> torch.Tensor:
    """The kernel's op rows [n, 4]: flags (bit 0 source on the host, bit 1 destination on
    the host), source slot, destination slot, tokens; in ``order`` if given. Pure."""
    import torch

    flags = arrays.src_tier + 2 * arrays.dst_tier
    items = torch.stack([flags, arrays.src_slot, arrays.dst_slot, arrays.num_tokens], 1)
    return items if order is None else items.index_select(0, order)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``, through pinned memory so the CPU never waits for the copy."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class FusedCopier:
    """Runs plans with the kernel of ``copy_kernel`` over a list of launch targets (one per
    layer, and optionally one for whole blocks). ``interpret`` runs the kernel in Triton's
    interpreter on CPU tensors (tests on machines without a GPU)."""

    def __init__(self, layers: list[LaunchTarget], whole: LaunchTarget | None,
                 tokens_per_block: int, num_programs: int, interpret: bool = False) -> None:
        from kvtier.transfer import copy_kernel

        for target in [*layers, *([whole] if whole is not None else [])]:
            if target.gpu.dtype != target.host.dtype:
                raise ValueError(f"GPU and host views differ in element type: "
                                 f"{target.gpu.dtype} vs {target.host.dtype}")
        self.layers = layers
        self.whole = whole
        self.tokens_per_block = tokens_per_block
        self.num_programs = num_programs
        self._kernel: Any = copy_kernel.jit(interpret)

    def prepare(self, plan: TransferPlan, num_blocks: dict[Tier, int | None],
                device: torch.device) -> FusedPlan:
        """Check ``plan`` (ValueError, nothing copied), group its ops, and queue their rows
        to ``device`` on the current stream."""
        ops = plan.ops
        arrays = plan_arrays(ops, plan.columns)
        check_arrays(arrays, ops, num_blocks, self.tokens_per_block)
        grouped = components(arrays)
        if grouped is None:
            items = to_device(pack_items(arrays, None), device)
            return FusedPlan(items, None, len(ops), arrays)
        order, starts = grouped
        items = to_device(pack_items(arrays, order), device)
        return FusedPlan(items, to_device(starts, device), len(starts) - 1, arrays)

    def launch(self, plan: FusedPlan, layer: int | None) -> int:
        """Queue the copies of one layer (``None``: all layers) on the current stream;
        returns the number of kernels launched."""
        if layer is not None:
            targets = [self.layers[layer]]
        else:
            targets = [self.whole] if self.whole is not None else self.layers
        for target in targets:
            self._launch(plan, target)
        return len(targets)

    def _launch(self, plan: FusedPlan, target: LaunchTarget) -> None:
        gpu, host = target.gpu, target.host
        row = gpu.shape[-1]
        grid = (min(plan.num_components, self.num_programs),)
        self._kernel[grid](
            gpu, host, plan.items, plan.items if plan.starts is None else plan.starts,
            plan.num_components, gpu.stride(0), host.stride(0), self.tokens_per_block * row,
            row, target.num_segs, self.tokens_per_block,
            HAS_STARTS=plan.starts is not None, BLOCK=BLOCK_BYTES // gpu.element_size(),
            num_warps=NUM_WARPS,
        )
