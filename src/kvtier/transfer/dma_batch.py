"""A plan copied by the GPU's copy engines: many scattered copies per call
(``cudaMemcpyBatchAsync``, CUDA 12.8+), one stream per direction, so offloads and
onboards move at once (extra ``torch``; the runtime library that CUDA torch brings).

Why copy engines: on an H200 (PCIe Gen5 x16) copies driven by the SMs over unified
addressing reach 0.92-0.95 of a copy engine one way, but both ways at once only ~0.76 of
the copy engines' two-way ceiling, even for a trivial kernel over contiguous memory (so
the limit is the SM path, not the plan's layout), and an SM kernel beside a copy engine
moved only 0.55-0.60 of it. One copy engine per direction is the path to that ceiling:
0.92-1.06 of it for scattered copies of 64 KiB and up. Each copy costs the driver CPU
time and the engine a fixed overhead, so small copies stay with the fused kernel
(``TorchTransferEngine``'s ``min_batch_copy_bytes``).

Hazards: ops that share a written slot form a component (``fused.components``); an op's
*level* is its position in its component. Components are cut into ``num_groups``
contiguous groups; a batch holds the ops of one group, level and direction, which never
touch a slot another of them writes. A batch waits only for the batches of the level
before in its group, so groups pipeline across the two streams::

    d2h stream   [g0 L0 off][g1 L0 off][g2 L0 off] ...
    h2d stream              [g0 L1 on ][g1 L1 on ][g2 L1 on ] ...   (a step's offload
                                                                     then onboard pairs)

Planning is array work over the plan's columns; a launch target's block ``b`` starts at
``b * stride(0)`` and holds ``num_segs`` segments (K and V per layer) of which a partial
op copies the first ``num_tokens`` tokens each: one copy per segment, a whole op one copy.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from kvtier.tier import Tier
from kvtier.transfer.fused import LaunchTarget, PlanArrays, arrays_of, check_arrays, components
from kvtier.transfer.plan import TransferPlan

if TYPE_CHECKING:
    import numpy.typing as npt

    Ints = npt.NDArray[np.int64]
    Addrs = npt.NDArray[np.uint64]

# dsts, srcs, sizes (uint64, equal lengths), stream handle: queue the copies.
Executor = Callable[["Addrs", "Addrs", "Addrs", int], None]
EVENT_DISABLE_TIMING = 2  # cudaEventDisableTiming
PIPELINE_STAGES = 16  # groups x launches a plan is cut into, at least (fill and drain cost 1/17)


class DmaPlan(NamedTuple):
    """A plan cut into batches of pieces (one copy each, in batch order): per piece its
    tiers, slots, tokens and segment (0 for a whole op); ``batches`` rows are
    ``(group, level, flags, first piece, end piece)``, flags as the fused kernel's (bit 0
    source on the host, bit 1 destination on the host)."""

    src_host: npt.NDArray[np.bool_]
    src_slot: Ints
    dst_host: npt.NDArray[np.bool_]
    dst_slot: Ints
    num_tokens: Ints
    segment: Ints
    batches: Ints
    arrays: PlanArrays
    num_components: int
    num_segs: int


class DmaBatch(NamedTuple):
    """One call's copies: ``group``/``level`` say what it waits for (the level before, same
    group); ``flags`` its direction."""

    group: int
    level: int
    flags: int
    dsts: Addrs
    srcs: Addrs
    sizes: Addrs


class CudartBatch:
    """``cudaMemcpyBatchAsync`` of the CUDA runtime through ctypes (arrays passed as raw
    pointers: no Python step per copy), and the event calls that order such copies from a
    thread that holds no torch objects (``new_event``, ``record_event``, ``wait_event``:
    raw handles, the GIL released in each call). Raises RuntimeError naming the code on
    failure (and clears the runtime's last error, so torch does not report it later)."""

    def __init__(self, lib: ctypes.CDLL, version: int) -> None:
        self._lib = lib
        self._version = version
        # cudaMemcpyAttributes: srcAccessOrder, srcLocHint {type, id}, dstLocHint, flags.
        # Order "stream": a copy reads its source only after the stream's earlier work.
        self._attrs = (ctypes.c_int * 6)(1, 0, 0, 0, 0, 0)
        self._attr_index = (ctypes.c_size_t * 1)(0)
        self._fail_index = ctypes.c_size_t(0)

    def __call__(self, dsts: Addrs, srcs: Addrs, sizes: Addrs, stream: int) -> None:
        args: list[object] = [ctypes.c_void_p(dsts.ctypes.data), ctypes.c_void_p(srcs.ctypes.data),
                              ctypes.c_void_p(sizes.ctypes.data), ctypes.c_size_t(len(sizes)),
                              self._attrs, self._attr_index, ctypes.c_size_t(1)]
        if self._version < 13000:  # CUDA 12.8 and 12.9 also report the failing copy
            args.append(ctypes.byref(self._fail_index))
        rc = self._lib.cudaMemcpyBatchAsync(*args, ctypes.c_void_p(stream))
        if rc != 0:
            self._lib.cudaGetLastError()
            raise RuntimeError(f"cudaMemcpyBatchAsync of {len(sizes)} copies returned CUDA "
                               f"error {rc}")

    def new_event(self) -> int:
        """A new event of the current device, without timing (the caller keeps it)."""
        event = ctypes.c_void_p(0)
        self._check(self._lib.cudaEventCreateWithFlags(ctypes.byref(event),
                                                       ctypes.c_uint(EVENT_DISABLE_TIMING)),
                    "cudaEventCreateWithFlags")
        assert event.value is not None
        return event.value

    def record_event(self, event: int, stream: int) -> None:
        """Record ``event`` on ``stream`` (raw handles)."""
        self._check(self._lib.cudaEventRecord(ctypes.c_void_p(event), ctypes.c_void_p(stream)),
                    "cudaEventRecord")

    def wait_event(self, stream: int, event: int) -> None:
        """Make ``stream`` wait for ``event``'s last record (raw handles)."""
        self._check(self._lib.cudaStreamWaitEvent(ctypes.c_void_p(stream),
                                                  ctypes.c_void_p(event), ctypes.c_uint(0)),
                    "cudaStreamWaitEvent")

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            self._lib.cudaGetLastError()
            raise RuntimeError(f"{what} returned CUDA error {rc}")


def load_cudart_batch() -> CudartBatch | None:
    """The CUDA runtime's batched copy, or ``None`` where the runtime is missing or older
    than 12.8. Pure apart from loading the library."""
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int(0)
        if (not hasattr(lib, "cudaMemcpyBatchAsync")
                or lib.cudaRuntimeGetVersion(ctypes.byref(version)) != 0
                or version.value < 12080):
            return None
        lib.cudaMemcpyBatchAsync.restype = ctypes.c_int
        return CudartBatch(lib, version.value)
    return None


def memmove_batch(dsts: Addrs, srcs: Addrs, sizes: Addrs, stream: int) -> None:
    """An executor for CPU tensors (tests): the copies one after the other."""
    del stream
    for dst, src, size in zip(dsts.tolist(), srcs.tolist(), sizes.tolist(), strict=True):
        ctypes.memmove(dst, src, size)


def _levels(arrays: PlanArrays) -> tuple[Ints, Ints, int]:
    """Per op its component and its position in it (plan order); the number of
    components."""
    n = len(arrays.src_slot)
    grouped = components(arrays)
    if grouped is None:
        return np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int64), n
    order, starts = grouped
    num_components = len(starts) - 1
    sizes = np.diff(starts)
    component = np.empty(n, dtype=np.int64)
    component[order] = np.repeat(np.arange(num_components, dtype=np.int64), sizes)
    level = np.empty(n, dtype=np.int64)
    level[order] = np.arange(n, dtype=np.int64) - np.repeat(starts[:-1], sizes)
    return component, level, num_components


class QueueKeys(NamedTuple):
    """Per op of a plan: its group, its level (position in its component) and its
    direction's flags; batches are runs of equal keys (see the module docstring)."""

    group: Ints
    level: Ints
    flags: Ints
    num_components: int


def queue_keys(arrays: PlanArrays, num_targets: int, max_groups: int | None = None
               ) -> QueueKeys:
    """The ops' keys, with enough groups (at most ``max_groups``) that ``num_targets``
    launches make ``PIPELINE_STAGES`` stages. Pure."""
    component, level, num_components = _levels(arrays)
    if int(level.max()) == 0:
        num_groups = 1  # no op waits for another: one batch per direction
    else:
        num_groups = min(num_components, -(-PIPELINE_STAGES // num_targets),
                         max_groups or num_components)
    group = component * num_groups // num_components
    return QueueKeys(group, level, arrays.src_tier + 2 * arrays.dst_tier, num_components)


def cut_pieces(arrays: PlanArrays, keys: QueueKeys, order: Ints, num_segs: int,
               tokens_per_block: int) -> DmaPlan:
    """The ops ``order`` (indices, sorted by their keys) cut into batches of pieces. Pure."""
    keys_in_order = np.stack([keys.group[order], keys.level[order], keys.flags[order]], 1)
    first = np.flatnonzero(np.any(keys_in_order[1:] != keys_in_order[:-1], axis=1)) + 1
    # Pieces: a whole op is one copy; a partial op one per segment (see module doc).
    tokens = arrays.num_tokens[order]
    pieces = np.where(tokens == tokens_per_block, 1, num_segs)
    op_of_piece = np.repeat(np.arange(len(order)), pieces)
    first_piece = np.concatenate([[0], np.cumsum(pieces)])
    seg = np.arange(len(op_of_piece)) - first_piece[op_of_piece]
    bounds = np.concatenate([[0], first, [len(order)]])
    heads = keys_in_order[bounds[:-1]]
    batches = np.stack([heads[:, 0], heads[:, 1], heads[:, 2], first_piece[bounds[:-1]],
                        first_piece[bounds[1:]]], 1)
    src_host = (arrays.src_tier[order] == Tier.HOST)[op_of_piece]
    dst_host = (arrays.dst_tier[order] == Tier.HOST)[op_of_piece]
    return DmaPlan(src_host, arrays.src_slot[order][op_of_piece], dst_host,
                   arrays.dst_slot[order][op_of_piece], tokens[op_of_piece], seg,
                   batches, arrays, keys.num_components, num_segs)


class DmaBatchCopier:
    """Cuts plans into copy-engine batches over a list of launch targets (one per layer,
    and optionally one for whole blocks), the same targets as ``FusedCopier``'s. Only
    plans whose targets have the same element size on both tiers are accepted."""

    def __init__(self, layers: list[LaunchTarget], whole: LaunchTarget | None,
                 tokens_per_block: int) -> None:
        for target in [*layers, *([whole] if whole is not None else [])]:
            if target.gpu.element_size() != target.host.element_size():
                raise ValueError(f"GPU and host views differ in element size: "
                                 f"{target.gpu.dtype} vs {target.host.dtype}")
        self.layers = layers
        self.whole = whole
        self.tokens_per_block = tokens_per_block

    def targets(self, layer: int | None) -> list[LaunchTarget]:
        """What one launch copies between (``None``: every layer). Pure."""
        if layer is not None:
            return [self.layers[layer]]
        return [self.whole] if self.whole is not None else self.layers

    def copy_bytes(self, layer: int | None) -> int:
        """Bytes of one whole block in one copy of a launch (the smallest over its
        targets): the copy engines pay per copy, so small pieces favour the SMs. Pure."""
        return min(t.num_segs * self.tokens_per_block * t.gpu.shape[-1] * t.gpu.element_size()
                   for t in self.targets(layer))

    def prepare(self, plan: TransferPlan, num_blocks: dict[Tier, int | None],
                num_targets: int, num_segs: int) -> DmaPlan:
        """Check ``plan`` (ValueError, nothing copied) and cut it into batches over targets
        of ``num_segs`` segments, enough groups that ``num_targets`` launches make
        ``PIPELINE_STAGES`` stages. Pure."""
        arrays = arrays_of(plan)
        check_arrays(arrays, plan, num_blocks, self.tokens_per_block)
        keys = queue_keys(arrays, num_targets)
        order = np.lexsort((keys.flags, keys.level, keys.group))
        return cut_pieces(arrays, keys, order, num_segs, self.tokens_per_block)

    def batches(self, plan: DmaPlan, target: LaunchTarget) -> list[DmaBatch]:
        """The calls that copy ``plan`` over ``target``, in queue order (group by group,
        level by level). Pure."""
        if target.num_segs != plan.num_segs:
            raise ValueError(f"the plan was cut for targets of {plan.num_segs} segments, this "
                             f"one has {target.num_segs}")
        gpu, host = target.gpu, target.host
        elem = gpu.element_size()
        row_bytes = gpu.shape[-1] * elem
        seg_bytes = self.tokens_per_block * row_bytes
        block_bytes = target.num_segs * seg_bytes
        whole = plan.num_tokens == self.tokens_per_block
        offset = plan.segment * seg_bytes
        sizes = np.where(whole, block_bytes, plan.num_tokens * row_bytes).astype(np.uint64)
        bases = (gpu.data_ptr(), host.data_ptr())
        strides = (gpu.stride(0) * elem, host.stride(0) * elem)
        srcs = (np.where(plan.src_host, bases[1], bases[0])
                + plan.src_slot * np.where(plan.src_host, strides[1], strides[0])
                + offset).astype(np.uint64)
        dsts = (np.where(plan.dst_host, bases[1], bases[0])
                + plan.dst_slot * np.where(plan.dst_host, strides[1], strides[0])
                + offset).astype(np.uint64)
        return [DmaBatch(int(g), int(lv), int(f), dsts[a:b], srcs[a:b], sizes[a:b])
                for g, lv, f, a, b in plan.batches.tolist()]
