"""Copies described, not executed: what a step must move between tiers."""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from enum import Enum
from typing import NamedTuple

from kvtier.tier import Tier


class OpKind(str, Enum):
    OFFLOAD = "offload"  # GPU -> host, a whole block
    ONBOARD = "onboard"  # host -> GPU, a whole block
    COPY = "copy"  # the first num_tokens of a block into a new GPU block (partial reuse)


class TransferOp(NamedTuple):
    """Copy the first ``num_tokens`` tokens of a block between two slots."""

    kind: OpKind
    src_tier: Tier
    src_slot: int
    dst_tier: Tier
    dst_slot: int
    num_tokens: int


class PlanColumns(NamedTuple):
    """A plan's ops as parallel int64 arrays, one per field but the kind: what an engine
    plans from with array operations, never touching the ops one by one (an engine turns
    them into tensors without a copy)."""

    src_tiers: array[int]
    src_slots: array[int]
    dst_tiers: array[int]
    dst_slots: array[int]
    num_tokens: array[int]

    @classmethod
    def of(cls, ops: Sequence[TransferOp]) -> PlanColumns:
        """The columns of ``ops``: one transposition (``zip``), each column read into an
        array at C speed. Pure."""
        if not ops:
            return cls(*(array("q") for _ in range(5)))
        return cls(*(array("q", column) for column in list(zip(*ops, strict=True))[1:]))

    def extend(self, src_tier: int, src_slots: Sequence[int], dst_tier: int,
               dst_slots: Sequence[int], num_tokens: int) -> None:
        """Append a run of ops that share tiers and token count (slot lists copied at C
        speed), the way a producer that already holds slot lists records them."""
        if len(src_slots) != len(dst_slots):
            raise ValueError(f"src_slots and dst_slots differ in length: {len(src_slots)} "
                             f"vs {len(dst_slots)}")
        n = len(src_slots)
        self.src_tiers.extend(array("q", [src_tier]) * n)
        self.src_slots.extend(src_slots)
        self.dst_tiers.extend(array("q", [dst_tier]) * n)
        self.dst_slots.extend(dst_slots)
        self.num_tokens.extend(array("q", [num_tokens]) * n)


class TransferPlan(NamedTuple):
    """The copies of one manager call, in program order.

    Executing the ops in order is always correct: the manager hands a slot to a new owner
    only after recording every op that reads its old content, so an op never overwrites a
    slot that an earlier op still has to read, and never reads a slot before the op that
    fills it. An engine that reorders or overlaps ops must keep that order per slot.

    ``columns``, where the producer gives them, are the same ops as arrays (an engine then
    plans without reading ``ops``); they must describe exactly ``ops``.
    """

    ops: tuple[TransferOp, ...]
    columns: PlanColumns | None = None


class PlanRecorder:
    """Where a producer records its copies in program order, as ops and as columns at
    once, so the plan it hands out carries both (an engine then plans from the columns).
    Recording a run costs one C-speed array extend per field besides the ops."""

    __slots__ = ("columns", "ops")

    def __init__(self) -> None:
        self.ops: list[TransferOp] = []
        self.columns = PlanColumns.of(())

    def __len__(self) -> int:
        return len(self.ops)

    def record_run(self, kind: OpKind, src_tier: Tier, src_slots: Sequence[int],
                   dst_tier: Tier, dst_slots: Sequence[int], num_tokens: int) -> None:
        """Record ``src_slots[i] -> dst_slots[i]`` for every ``i``, in order."""
        self.columns.extend(src_tier, src_slots, dst_tier, dst_slots, num_tokens)
        self.ops.extend(TransferOp(kind, src_tier, src, dst_tier, dst, num_tokens)
                        for src, dst in zip(src_slots, dst_slots, strict=True))

    def take(self) -> TransferPlan:
        """The ops recorded since the last take, as one plan; the recorder starts empty."""
        plan = TransferPlan(tuple(self.ops), self.columns)
        self.ops = []
        self.columns = PlanColumns.of(())
        return plan
