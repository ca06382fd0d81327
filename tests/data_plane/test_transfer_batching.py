"""Waves and batches of a plan: per-slot order kept, few batches (pure Python)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.tier import Tier
from kvtier.transfer.batching import CopyGroup, Run, merge_runs, plan_batches, plan_waves
from kvtier.transfer.plan import OpKind, TransferOp
from plan_ops import G, H, offload, onboard


def copy(src_tier: Tier, src: int, g: int, num_tokens: int) -> TransferOp:
    """The first tokens of a block into GPU slot g."""
    return TransferOp(OpKind.COPY, src_tier, src, G, g, num_tokens)


def test_evict_then_onboard_is_two_waves_of_one_batch() -> None:
    """Offload victims, onboard into the freed slots: 2 waves, 1 batch each, any size."""
    #   wave 0: off g0->h0 .. g63->h63      wave 1: on h100->g0 .. h163->g63
    ops = [offload(g, g) for g in range(64)] + [onboard(100 + g, g) for g in range(64)]
    batches = plan_batches(ops)
    assert [(b.wave, b.src_tier, b.dst_tier, len(b.positions)) for b in batches] == [
        (0, G, H, 64), (1, H, G, 64)]
    assert batches[1].positions == list(range(64, 128))
    assert batches[1].groups == [CopyGroup(4, list(range(100, 164)), list(range(64)))]


def test_each_hazard_starts_a_new_wave() -> None:
    """RAW, WAW and WAR each push an op past the op it conflicts with; RAR does not."""
    ops = [
        offload(1, 5),        # 0: wave 0
        onboard(5, 2),        # 1: reads h5 after op 0 wrote it (RAW)      -> wave 1
        offload(3, 5),        # 2: writes h5 after op 1 read it (WAR)      -> wave 2
        copy(G, 1, 4, 2),     # 3: reads g1 like op 0 (RAR)                -> wave 0
        onboard(7, 4),        # 4: writes g4 after op 3 wrote it (WAW)     -> wave 1
        onboard(8, 9),        # 5: unrelated                               -> wave 0
    ]
    assert plan_waves(ops) == [0, 1, 2, 0, 1, 0]
    batches = plan_batches(ops)
    assert [(b.wave, b.src_tier, b.dst_tier, b.positions) for b in batches] == [
        (0, G, G, [3]), (0, G, H, [0]), (0, H, G, [5]),
        (1, H, G, [1, 4]),
        (2, G, H, [2]),
    ]
    assert batches[0].groups == [CopyGroup(2, [1], [4])]


SLOT = st.integers(0, 3)


@st.composite
def any_op(draw: st.DrawFn) -> TransferOp:
    """An offload, an onboard or a partial copy among 4 GPU and 4 host slots."""
    kind = draw(st.sampled_from(["offload", "onboard", "copy"]))
    if kind == "offload":
        return offload(draw(SLOT), draw(SLOT))
    if kind == "onboard":
        return onboard(draw(SLOT), draw(SLOT))
    src, g = draw(st.sampled_from([G, H])), draw(SLOT)
    s = draw(SLOT.filter(lambda x: (src, x) != (G, g)))
    return copy(src, s, g, draw(st.integers(1, 4)))


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(any_op(), min_size=1, max_size=30))
def test_random_plans_keep_every_conflicting_pair_in_order(ops: list[TransferOp]) -> None:
    """For random plans, any two ops touching a slot that one of them writes keep their
    program order across waves, and every batch holds ops of one wave and direction."""
    waves = plan_waves(ops)
    for j, b in enumerate(ops):
        for i in range(j):
            a = ops[i]
            writes_a, writes_b = (a.dst_tier, a.dst_slot), (b.dst_tier, b.dst_slot)
            reads_a, reads_b = (a.src_tier, a.src_slot), (b.src_tier, b.src_slot)
            if writes_a in (reads_b, writes_b) or writes_b == reads_a:
                assert waves[i] < waves[j], (ops, i, j, waves)
    batches = plan_batches(ops)
    assert sorted(p for batch in batches for p in batch.positions) == list(range(len(ops)))
    for batch in batches:
        for p in batch.positions:
            op = ops[p]
            assert (waves[p], op.src_tier, op.dst_tier) == (batch.wave, batch.src_tier,
                                                            batch.dst_tier), (ops, batch)


def test_merge_runs_needs_both_sides_consecutive() -> None:
    """Runs merge, in the given order, only where source and destination both advance by
    one; past ``max_runs`` runs the answer is None."""
    src = [10, 11, 12, 20, 21, 22, 0]
    dst = [2, 3, 4, 5, 9, 10, 0]
    runs = [Run(10, 2, 3), Run(20, 5, 1), Run(21, 9, 2), Run(0, 0, 1)]
    assert merge_runs(src, dst) == runs
    assert merge_runs(src, dst, max_runs=4) == runs
    assert merge_runs(src, dst, max_runs=3) is None
