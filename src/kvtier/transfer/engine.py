"""Transfer engines execute :class:`TransferPlan`; this one records plans, moves no bytes."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Protocol

from kvtier.counts import as_integer
from kvtier.reprs import shown
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

    def failed_in(self, plan: TransferPlan) -> list[int]:
        """The positions in ``plan`` of the ops not done: ``failed_indices`` where given;
        else the positions of the ops equal to one of ``failed_ops``; else, where the error
        names nothing, or names what is no op of ``plan`` (an index out of its range or no
        int, an op it does not hold), every op. Pure. NOTE: an engine of another project
        may name only the ops, or nothing: taken as nothing failed, the manager would serve
        blocks the failed copies never filled; an op failed more than it did only costs a
        recompute."""
        everything = list(range(len(plan)))
        if self.failed_indices:
            # NOTE: an index past the plan (or a float) made transfer_failed raise inside
            # the model engine's recovery, and the step raised to its caller instead of
            # recomputing. Any integer is read as the plain int it is (``kvtier.counts``):
            # a NumPy index failed every op of the plan.
            indices = [i if type(i) is int else as_integer(i) for i in self.failed_indices]
            if all(i is not None and 0 <= i < len(plan) for i in indices):
                return indices  # type: ignore[return-value]
            return everything
        if not self.failed_ops:
            return everything
        try:
            failed = set(self.failed_ops)
        except TypeError:  # an unhashable "op": nothing says which ops it meant
            return everything
        positions = [i for i, op in enumerate(plan.ops) if op in failed]
        # NOTE: an op named that the plan does not hold (another plan's, or a copy of one
        # with a field changed) matched nothing: with none matched the plan counted as done,
        # and the manager served blocks its copies never filled.
        if len({plan.op(i) for i in positions}) < len(failed):
            return everything
        return positions


class RecordingTransferEngine:
    """Keeps the last ``max_plans`` plans and running totals; moves no bytes."""

    def __init__(self, max_plans: int = 1024) -> None:
        # NOTE: True kept one plan, -1 raised deque's "maxlen must be non-negative".
        n = as_integer(max_plans)  # any integer, kept as the plain int (kvtier.counts)
        if n is None or n < 0:
            raise ValueError(f"max_plans must be an int >= 0, got {shown(max_plans)}")
        max_plans = n
        self.plans: deque[TransferPlan] = deque(maxlen=max_plans)
        self.num_ops = {kind: 0 for kind in OpKind}
        self.num_tokens = {kind: 0 for kind in OpKind}

    def submit(self, plan: TransferPlan) -> None:
        """Record ``plan``; TypeError, recording nothing, for what is no TransferPlan (as
        every engine refuses it).

        NOTE: a str was kept as a plan, then raised AttributeError ('ops')."""
        if not isinstance(plan, TransferPlan):
            raise TypeError(f"plan must be a TransferPlan, got {type(plan).__name__}")
        self.plans.append(plan)
        for op in plan.ops:
            self.num_ops[op.kind] += 1
            self.num_tokens[op.kind] += op.num_tokens
