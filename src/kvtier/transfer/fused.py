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

Planning is array work (sort, search, scatter) over the plan's columns
(``PlanColumns``, or its ops read into them once), never a Python step per op.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from kvtier.reprs import shown
from kvtier.tier import Tier
from kvtier.transfer.batching import check_op
from kvtier.transfer.plan import PlanColumns, TransferOp, TransferPlan

if TYPE_CHECKING:
    import numpy.typing as npt
    import torch

    Ints = npt.NDArray[np.int64]

ITEM_FIELDS = 4  # flags, src_slot, dst_slot, num_tokens (see copy_kernel)
# The launch shape, from ``benchmarks/sweep_fused.py`` on an H200 (warps 4/8/16, turns of
# 8-32 KiB, 1-2 turns a unit, 4-16 programs an SM): 8 warps moving 8 KiB turns, one turn a
# unit, was at or near the best of every plan and block size (16-256 KiB, both layouts);
# 4 warps and two turns a unit lost 8-12 % in step plans of 64-256 KiB blocks, where a
# pair's onboard waits at a barrier for its offload's whole unit.
BLOCK_BYTES = 8192  # bytes one program moves per loop turn
CHUNK_BLOCKS = 1  # loop turns per unit of work (see copy_kernel)
NUM_WARPS = 8
DENSE_KEYS_PER_OP = 8  # components() indexes by slot key below this many keys per op


class PlanArrays(NamedTuple):
    """A plan's ops as int64 arrays, one per field.

    NOTE: NumPy, not torch: CPU torch spreads even a 65,536-element comparison over its
    thread pool, and on a busy many-core host a waking pool took milliseconds per op."""

    src_tier: Ints
    src_slot: Ints
    dst_tier: Ints
    dst_slot: Ints
    num_tokens: Ints


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
    """The fields of ``ops`` (non-empty) as int64 arrays, taken without a copy from
    ``columns`` where the plan carries them. Pure."""
    if columns is None:
        columns = PlanColumns.of(ops)
    if len(columns.src_slots) != len(ops):
        raise ValueError(f"the plan's columns hold {len(columns.src_slots)} ops, its ops "
                         f"{len(ops)}")
    return PlanArrays(*(np.frombuffer(column, dtype=np.int64) for column in columns))


def arrays_of(plan: TransferPlan) -> PlanArrays:
    """``plan``'s ops as int64 arrays: its columns without a copy where it carries them
    (its ops are then never built), else read off its ops. Pure."""
    columns = plan.columns
    if columns is None:
        return plan_arrays(plan.ops)
    if len(columns.src_slots) != len(plan):
        raise ValueError(f"the plan's columns hold {len(columns.src_slots)} ops, the plan "
                         f"{len(plan)}")
    return PlanArrays(*(np.frombuffer(column, dtype=np.int64) for column in columns))


def check_arrays(arrays: PlanArrays, ops: Sequence[TransferOp] | TransferPlan,
                 num_blocks: dict[Tier, int | None], tokens_per_block: int) -> None:
    """Raise ValueError naming the first op whose slot is outside its tier, whose token
    count is not in 1..tokens_per_block, or that copies a slot onto itself. Pure."""
    bad = (arrays.num_tokens < 1) | (arrays.num_tokens > tokens_per_block)
    bad |= (arrays.src_tier == arrays.dst_tier) & (arrays.src_slot == arrays.dst_slot)
    for tiers, slots in ((arrays.src_tier, arrays.src_slot), (arrays.dst_tier, arrays.dst_slot)):
        # NOTE: a tier that is none (2, -1) was on neither tier's test below: its op was
        # copied as the kernels' flags and keys took it, another slot of another tier.
        bad |= (tiers < 0) | (tiers >= len(Tier))
        for tier in Tier:
            num = num_blocks.get(tier)
            on_tier = tiers == tier
            bad |= on_tier if num is None else on_tier & ((slots < 0) | (slots >= num))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        op = ops.op(i) if isinstance(ops, TransferPlan) else ops[i]
        check_op(i, op, num_blocks, tokens_per_block)
        raise AssertionError(f"op {i} {op} failed the array check but not check_op")


def components(arrays: PlanArrays, dense: bool | None = None,
               pairs: bool = True) -> tuple[Ints, Ints] | None:
    """``(order, starts)``: the ops grouped into components (ops that share a slot some op
    of the plan writes), each in plan order, components ordered by their first op;
    ``None`` when every op is a component of its own.

    Slots are keyed ``2 * slot + tier``. ``dense`` (the default where keys are fewer than
    ``DENSE_KEYS_PER_OP`` per op) indexes arrays by key directly, in linear time; else keys
    are numbered by sorting them. ``pairs`` first tries the case of a step (components of
    at most two ops, no slot written twice) in a few passes. Pure."""
    n = len(arrays.src_slot)
    src_key = arrays.src_slot * 2 + arrays.src_tier
    dst_key = arrays.dst_slot * 2 + arrays.dst_tier
    num_keys = int(max(src_key.max(), dst_key.max())) + 1
    if dense is None:
        dense = num_keys <= DENSE_KEYS_PER_OP * n + 1024
    if dense:
        src_k, dst_k = src_key, dst_key
    else:
        keys, inverse = np.unique(np.concatenate([dst_key, src_key]), return_inverse=True)
        num_keys, dst_k, src_k = len(keys), inverse[:n], inverse[n:]
    num_writes = np.bincount(dst_k, minlength=num_keys)
    reads_written = num_writes[src_k] > 0
    written_once = num_writes.max() <= 1
    if not reads_written.any() and written_once:
        return None
    if pairs and written_once:
        found = _pairs(src_k, num_keys, dst_k)
        if found is not None:
            return found
    linked = np.flatnonzero(reads_written)  # ops whose source some op writes
    src_k = src_k[linked]
    # Label propagation over ops and slots: every op takes the smallest label of the slots
    # it touches, until nothing changes; then each component holds its first op's index.
    label = np.arange(n, dtype=np.int64)
    while True:
        key_label = np.full(num_keys, n, dtype=np.int64)
        np.minimum.at(key_label, dst_k, label)
        np.minimum.at(key_label, src_k, label[linked])
        new = np.minimum(label, key_label[dst_k])
        new[linked] = np.minimum(new[linked], key_label[src_k])
        new = new[new]  # a label is an earlier op of the same component: jump to its label
        if np.array_equal(new, label):
            break
        label = new
    order = np.argsort(label, kind="stable")
    sorted_label = label[order]
    boundaries = np.flatnonzero(sorted_label[1:] != sorted_label[:-1]) + 1
    starts = np.concatenate([[0], boundaries, [n]]).astype(np.int64)
    return order, starts


def _pairs(src_k: Ints, num_keys: int, dst_k: Ints) -> tuple[Ints, Ints] | None:
    """``components()`` where no key is written twice and every component is at most a
    pair: a writer and the one op that reads its slot (a step's offload of a GPU slot and
    the onboard into it), found without iterating; ``None`` where it does not apply."""
    n = len(src_k)
    writer = np.full(num_keys, -1, dtype=np.int64)
    writer[dst_k] = np.arange(n, dtype=np.int64)  # keys are written once: no collisions
    partner = writer[src_k]  # the op that writes my source, if any
    readers = np.flatnonzero(partner >= 0)
    writers = partner[readers]
    is_writer = np.zeros(n, dtype=bool)
    is_writer[writers] = True
    if int(is_writer.sum()) != len(writers) or is_writer[readers].any():
        return None  # a slot read twice, or a chain of three ops or more: not pairs
    first, later = np.minimum(readers, writers), np.maximum(readers, writers)
    mate = np.full(n, -1, dtype=np.int64)
    mate[first] = later
    is_later = np.zeros(n, dtype=bool)
    is_later[later] = True
    heads = np.flatnonzero(~is_later)  # each component's first op, in plan order
    head_mates = mate[heads]
    paired = head_mates >= 0
    starts = np.zeros(len(heads) + 1, dtype=np.int64)
    np.cumsum(1 + paired, out=starts[1:])
    order = np.empty(n, dtype=np.int64)
    order[starts[:-1]] = heads
    order[starts[:-1][paired] + 1] = head_mates[paired]
    return order, starts


def pack_items(arrays: PlanArrays, order: Ints | None) -> Ints:
    """The kernel's op rows [n, 4]: flags (bit 0 source on the host, bit 1 destination on
    the host), source slot, destination slot, tokens; in ``order`` if given. Pure."""
    flags = arrays.src_tier + 2 * arrays.dst_tier
    items = np.stack([flags, arrays.src_slot, arrays.dst_slot, arrays.num_tokens], 1)
    return items if order is None else items[order]


def to_device(a: Ints, device: torch.device) -> torch.Tensor:
    """``a`` as a tensor on ``device``, through pinned memory so the CPU never waits."""
    import torch

    if device.type == "cpu":
        return torch.from_numpy(np.ascontiguousarray(a))
    # NOTE: NumPy fills the pinned buffer: Tensor.pin_memory() copies with CPU torch, whose
    # thread pool took 3.6-6.6 ms for 0.25-2 MiB in a profiled step on the 32-core host.
    pinned = torch.empty(a.shape, dtype=torch.int64, pin_memory=True)
    pinned.numpy()[...] = a
    return pinned.to(device, non_blocking=True)


class FusedCopier:
    """Runs plans with the kernel of ``copy_kernel`` over a list of launch targets (one per
    layer, and optionally one for whole blocks). ``interpret`` runs the kernel in Triton's
    interpreter on CPU tensors (tests on machines without a GPU); tests also shrink
    ``block_bytes`` (a power of two) so that blocks span several units."""

    def __init__(self, layers: list[LaunchTarget], whole: LaunchTarget | None,
                 tokens_per_block: int, num_programs: int, interpret: bool = False,
                 block_bytes: int = BLOCK_BYTES) -> None:
        from kvtier.transfer import copy_kernel

        if block_bytes < 1 or block_bytes & (block_bytes - 1):
            raise ValueError(f"block_bytes must be a power of two, got {shown(block_bytes)}")

        if num_programs < 2 or num_programs % 2:
            raise ValueError(f"num_programs must be even and >= 2 (half take units from "
                             f"each end), got {shown(num_programs)}")
        for target in [*layers, *([whole] if whole is not None else [])]:
            if target.gpu.dtype != target.host.dtype:
                raise ValueError(f"GPU and host views differ in element type: "
                                 f"{target.gpu.dtype} vs {target.host.dtype}")
        self.layers = layers
        self.whole = whole
        self.tokens_per_block = tokens_per_block
        self.num_programs = num_programs
        self.block_bytes = block_bytes
        self._kernel: Any = copy_kernel.jit(interpret)

    def prepare(self, plan: TransferPlan, num_blocks: dict[Tier, int | None],
                device: torch.device) -> FusedPlan:
        """Check ``plan`` (ValueError, nothing copied), group its ops, and queue their rows
        to ``device`` on the current stream."""
        arrays = arrays_of(plan)
        check_arrays(arrays, plan, num_blocks, self.tokens_per_block)
        grouped = components(arrays)
        if grouped is None:
            items = to_device(pack_items(arrays, None), device)
            return FusedPlan(items, None, len(plan), arrays)
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
        seg_stride = self.tokens_per_block * row
        block_len = target.num_segs * seg_stride
        block = max(1, self.block_bytes // gpu.element_size())
        chunk = CHUNK_BLOCKS * block
        num_chunks = -(-block_len // chunk)
        grid = (min(plan.num_components * num_chunks, self.num_programs),)
        self._kernel[grid](
            gpu, host, plan.items, plan.items if plan.starts is None else plan.starts,
            plan.num_components, num_chunks, gpu.stride(0), host.stride(0), block_len,
            seg_stride, row, target.num_segs, self.tokens_per_block,
            HAS_STARTS=plan.starts is not None, BLOCK=block, CHUNK=chunk, num_warps=NUM_WARPS,
        )
