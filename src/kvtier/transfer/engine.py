"""Transfer engines execute :class:`TransferPlan`; this one records plans, moves no bytes."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Protocol

from kvtier.transfer.plan import OpKind, TransferOp, TransferPlan


class TransferEngine(Protocol):
    """Executes a manager's plans. ``submit`` must preserve the plan's order per slot."""

    def submit(self, plan: TransferPlan) -> object:
        """Start (or perform) the copies of ``plan``; may return a handle to wait on."""
        ...


class TransferError(RuntimeError):
    """Copies of a plan failed. ``failed_ops`` were not (or not surely) done, in plan
    order; every other op of the plan completed."""

    def __init__(self, message: str, failed_ops: Sequence[TransferOp],
                 failed_indices: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.failed_ops = tuple(failed_ops)
        self.failed_indices = tuple(failed_indices)  # positions in the plan's ops


class RecordingTransferEngine:
    """Keeps the last ``max_plans`` plans and running totals; moves no bytes."""

    def __init__(self, max_plans: int = 1024) -> None:
        self.plans: deque[TransferPlan] = deque(maxlen=max_plans)
        self.num_ops = {kind: 0 for kind in OpKind}
        self.num_tokens = {kind: 0 for kind in OpKind}

    def submit(self, plan: TransferPlan) -> None:
        self.plans.append(plan)
        for op in plan.ops:
            self.num_ops[op.kind] += 1
            self.num_tokens[op.kind] += op.num_tokens
