"""Red team 22c, the core's half: what a transfer engine's error names of a plan."""

from __future__ import annotations

import pytest

from kvtier.tier import Tier
from kvtier.transfer.engine import TransferError
from kvtier.transfer.plan import OpKind, TransferOp, TransferPlan

PLAN = TransferPlan([TransferOp(OpKind.OFFLOAD, Tier.GPU, i, Tier.HOST, i, 4) for i in range(3)])
ALL = [0, 1, 2]


@pytest.mark.parametrize(("failed_ops", "failed_indices", "expected"), [
    ((PLAN.op(1),), (), [1]),  # the ops named, where the plan holds them
    ((PLAN.op(2), PLAN.op(0)), (), [0, 2]),
    ((), (2,), [2]),  # the indices, where given
    ((), (), ALL),  # nothing named: every op
    # An op the plan does not hold (another plan's, a field changed) matched nothing: the
    # plan counted as done, and its unfilled blocks were served.
    ((PLAN.op(1)._replace(num_tokens=3),), (), ALL),
    ((PLAN.op(0), PLAN.op(1)._replace(dst_slot=9)), (), ALL),
    # An unhashable op raised TypeError out of the model engine's recovery.
    (([1, 2],), (), ALL),
    # An index past the plan, or no int: transfer_failed refused it, and the step raised.
    ((), (3,), ALL),
    ((), (-1,), ALL),
    ((), (1.0,), ALL),
])
def test_what_an_error_names_of_a_plan_is_every_op_unless_the_plans_own(
        failed_ops: tuple[object, ...], failed_indices: tuple[object, ...],
        expected: list[int]) -> None:
    """``TransferError.failed_in`` gives the positions its error names where they are the
    plan's own ops or indices, and every op where it names nothing or what the plan does
    not hold (an op failed more than it did only costs a recompute)."""
    error = TransferError("injected", failed_ops, failed_indices)  # type: ignore[arg-type]
    assert error.failed_in(PLAN) == expected
