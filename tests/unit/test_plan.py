"""TransferPlan recorded as columns: ops built only when read, the same as recorded."""

from __future__ import annotations

import pickle
from array import array

import pytest

from kvtier.tier import Tier
from kvtier.transfer.plan import (
    OP_KINDS,
    OpKind,
    PlanColumns,
    PlanRecorder,
    TransferOp,
    TransferPlan,
)

G, H = Tier.GPU, Tier.HOST


def make_recorded() -> TransferPlan:
    """Two offloads, an onboard, a partial copy, recorded as a manager records them."""
    recorder = PlanRecorder()
    recorder.record_run(OpKind.OFFLOAD, G, [0, 1], H, [5, 6], 4)
    recorder.record_run(OpKind.ONBOARD, H, [7], G, [0], 4)
    recorder.record_run(OpKind.COPY, G, [2], G, [3], 3)
    return recorder.take()


EXPECTED = (
    TransferOp(OpKind.OFFLOAD, G, 0, H, 5, 4),
    TransferOp(OpKind.OFFLOAD, G, 1, H, 6, 4),
    TransferOp(OpKind.ONBOARD, H, 7, G, 0, 4),
    TransferOp(OpKind.COPY, G, 2, G, 3, 3),
)


def test_recorded_plan_reads_columns_without_building_ops(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """len, op(i) and the kinds column answer from the columns; ops stay unbuilt."""
    plan = make_recorded()

    def refuse(_: object) -> TransferOp:
        raise AssertionError("the plan built its ops")

    with monkeypatch.context() as patch:
        patch.setattr(TransferOp, "_make", refuse)
        assert len(plan) == 4
        assert plan.op(2) == EXPECTED[2]
        assert [OP_KINDS[k] for k in plan.kinds] == [op.kind for op in EXPECTED]
        with pytest.raises(AssertionError, match="built its ops"):
            plan.ops  # noqa: B018 (the property is what is tested)
    assert plan.ops == EXPECTED
    assert type(plan.ops[0].src_tier) is Tier and plan.ops[3].kind is OpKind.COPY
    assert plan.columns == PlanColumns.of(EXPECTED)


def test_plan_of_ops_and_of_columns_agree() -> None:
    """A plan built from ops (as engines' callers and tests build them) equals the
    recorded one, has the same kinds column, and survives pickling either way."""
    recorded = make_recorded()
    built = TransferPlan(EXPECTED, PlanColumns.of(EXPECTED))
    assert built == recorded and hash(built) == hash(recorded)
    assert built.kinds == recorded.kinds == array("b", [0, 0, 1, 2])
    assert pickle.loads(pickle.dumps(recorded)) == recorded
    assert TransferPlan(EXPECTED) != recorded  # no columns: a different plan, as before
    assert len(TransferPlan(())) == 0 and not TransferPlan(()).ops


def test_recorder_starts_empty_after_take() -> None:
    """take() hands the arrays over: the next plan does not share them."""
    recorder = PlanRecorder()
    recorder.record_run(OpKind.OFFLOAD, G, [0], H, [1], 4)
    first = recorder.take()
    assert len(recorder) == 0 and recorder.take().ops == ()
    recorder.record_run(OpKind.ONBOARD, H, [1], G, [0], 4)
    assert first.ops == (TransferOp(OpKind.OFFLOAD, G, 0, H, 1, 4),)


def test_of_columns_rejects_mismatched_kinds() -> None:
    """A kinds column of another length than the columns is refused, naming both."""
    columns = PlanColumns.of(EXPECTED)
    with pytest.raises(ValueError, match="kinds hold 1 ops, the columns 4"):
        TransferPlan.of_columns(array("b", [0]), columns)


def test_a_swap_records_its_pieces_interleaved_in_one_call() -> None:
    """record_swap gives the ops of a record_run per piece and kind, in the same order:
    piece 1's offload, its onboard, piece 2's, then the offload of the run's rest::

        GPU run  [10 11 | 12 | 13 14]   pieces end at 2, 3 (the path's 3 blocks)
        host     [20 21 | 22 | 23 24]   path [30 31 | 32]
    """
    gpu, host, path = [10, 11, 12, 13, 14], [20, 21, 22, 23, 24], [30, 31, 32]
    swapped = PlanRecorder()
    swapped.record_run(OpKind.COPY, G, [1], G, [2], 3)  # what came before stays first
    swapped.record_swap(gpu, host, path, [2, 3], 4)
    one_by_one = PlanRecorder()
    one_by_one.record_run(OpKind.COPY, G, [1], G, [2], 3)
    for start, end in ((0, 2), (2, 3)):
        one_by_one.record_run(OpKind.OFFLOAD, G, gpu[start:end], H, host[start:end], 4)
        one_by_one.record_run(OpKind.ONBOARD, H, path[start:end], G, gpu[start:end], 4)
    one_by_one.record_run(OpKind.OFFLOAD, G, gpu[3:], H, host[3:], 4)
    plan, expected = swapped.take(), one_by_one.take()
    assert plan == expected and plan.kinds == expected.kinds
    assert [(op.kind.value, op.src_slot, op.dst_slot) for op in plan.ops[1:5]] == [
        ("offload", 10, 20), ("offload", 11, 21), ("onboard", 30, 10), ("onboard", 31, 11)]


@pytest.mark.parametrize(("host", "path", "ends", "message"), [
    ([20, 21], [30], [1], "as many host slots as GPU slots"),
    ([20, 21, 22], [30, 31], [1], r"must increase to the path's 2 slots, got \[1\]"),
    ([20, 21, 22], [30, 31], [2, 2], r"got \[2, 2\]"),
    ([20, 21, 22], [30, 31], [0, 2], r"got \[0, 2\]"),
    ([20, 21, 22], [30, 31], [], r"got \[\]"),
])
def test_a_bad_swap_is_refused_recording_nothing(
        host: list[int], path: list[int], ends: list[int], message: str) -> None:
    """Slot lists of other lengths or piece ends that do not increase to the path's end are
    refused with the numbers, and the recorder keeps what it had."""
    recorder = PlanRecorder()
    recorder.record_run(OpKind.OFFLOAD, G, [0], H, [1], 4)
    with pytest.raises(ValueError, match=message):
        recorder.record_swap([10, 11, 12], host, path, ends, 4)
    assert recorder.take().ops == (TransferOp(OpKind.OFFLOAD, G, 0, H, 1, 4),)
