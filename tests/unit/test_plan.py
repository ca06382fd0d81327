"""TransferPlan recorded as columns: ops built only when read, the same as recorded."""

from __future__ import annotations

import pickle
import random
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


@pytest.mark.parametrize("seed", range(12))
def test_swaps_and_runs_of_any_length_record_the_ops_one_by_one(seed: int) -> None:
    """Runs and swaps of 1-300 slots (short ones appended per slot, long ones packed at
    once) in pieces of any sizes, or of one size but the last (interleaved by strided
    slices), record exactly the ops written out one at a time, in order, with the
    columns of those ops."""
    rng = random.Random(seed)
    recorder = PlanRecorder()
    expected: list[TransferOp] = []
    for _ in range(40):
        num = rng.randint(1, 300)
        gpu = rng.sample(range(1 << 20), num)
        host = [rng.randrange(1 << 40) for _ in range(num)]
        if rng.random() < 0.3:
            recorder.record_run(OpKind.OFFLOAD, G, gpu, H, host, 16)
            expected += [TransferOp(OpKind.OFFLOAD, G, g, H, h, 16)
                         for g, h in zip(gpu, host, strict=True)]
            continue
        num_swap = rng.randint(1, num)
        path = [rng.randrange(1 << 32) for _ in range(num_swap)]
        if rng.random() < 0.5:  # as the cache cuts them: the host's room, the last less
            room = rng.choice([1, 2, 3, rng.randint(1, num_swap)])
            ends = [*range(room, num_swap, room), num_swap]
        else:
            ends = sorted(rng.sample(range(1, num_swap), rng.randint(0, num_swap - 1)))
            ends.append(num_swap)
        recorder.record_swap(gpu, host, path, ends, 32)
        start = 0
        for end in ends:
            expected += [TransferOp(OpKind.OFFLOAD, G, gpu[i], H, host[i], 32)
                         for i in range(start, end)]
            expected += [TransferOp(OpKind.ONBOARD, H, path[i], G, gpu[i], 32)
                         for i in range(start, end)]
            start = end
        expected += [TransferOp(OpKind.OFFLOAD, G, gpu[i], H, host[i], 32)
                     for i in range(num_swap, num)]
    plan = recorder.take()
    assert plan.columns == PlanColumns.of(expected)
    assert plan.ops == tuple(expected)


@pytest.mark.parametrize(("bad", "error"), [
    ("x", TypeError), (1.0, TypeError), (2**63, OverflowError), (None, TypeError)])
def test_a_long_run_with_a_bad_slot_raises_as_a_short_one(bad: object, error: type) -> None:
    """A slot that is no int64 raises the same error in a run of 40 slots (packed at
    once) as in a run of 2 (appended per slot), and a swap records nothing."""
    for num in (2, 40):
        slots: list[object] = [*range(num - 1), bad]
        with pytest.raises(error):
            PlanRecorder().record_run(OpKind.OFFLOAD, G, slots, H, list(range(num)), 4)  # type: ignore[arg-type]
        recorder = PlanRecorder()
        with pytest.raises(error):
            recorder.record_swap(list(range(num)), slots, list(range(num)), [num], 4)  # type: ignore[arg-type]
        assert len(recorder) == 0 and recorder.take().ops == ()
