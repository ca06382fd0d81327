"""The fused path: plans as arrays, components of ops that share a written slot, and the
one-kernel copy (run in Triton's interpreter on CPU tensors; on CUDA by the engine tests)."""

from __future__ import annotations

import importlib.util
import itertools
import random
from typing import TYPE_CHECKING

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch", reason="the data-plane tests need torch: "
                                            "pip install 'kvtier[torch]'")

from data_plane.in_order import assert_matches, in_order  # noqa: E402
from kvtier.storage import KVLayout, KVStorage  # noqa: E402
from kvtier.tier import Tier  # noqa: E402
from kvtier.transfer.fused import (  # noqa: E402
    FusedCopier,
    LaunchTarget,
    check_arrays,
    components,
    plan_arrays,
)
from kvtier.transfer.plan import (  # noqa: E402
    OpKind,
    PlanColumns,
    PlanRecorder,
    TransferOp,
    TransferPlan,
)
from kvtier.transfer.torch_memory import copy_view  # noqa: E402
from plan_ops import TPB, G, H, offload, onboard, random_ops  # noqa: E402

if TYPE_CHECKING:
    from torch import Tensor

NUM_LAYERS = 2
TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                            reason="needs Triton (its interpreter runs the kernel on CPU)")


def grouped(ops: list[TransferOp], dense: bool | None = None,
            pairs: bool = True) -> list[list[int]] | None:
    """The components as lists of plan positions, in run order."""
    result = components(plan_arrays(ops), dense, pairs)
    if result is None:
        return None
    order, starts = result
    bounds = starts.tolist()
    return [order[a:b].tolist() for a, b in itertools.pairwise(bounds)]


def test_evict_then_onboard_pairs_each_offload_with_its_onboard() -> None:
    """Offload g -> h, onboard into g: one component per GPU slot, offload first; ops on
    slots nobody writes twice or reads after a write stay alone."""
    #   0 off g0->h0   1 off g1->h1   2 on h9->g0   3 on h8->g1   4 on h7->g5
    ops = [offload(0, 0), offload(1, 1), onboard(9, 0), onboard(8, 1), onboard(7, 5)]
    assert grouped(ops) == [[0, 2], [1, 3], [4]]
    # No op touches a slot another writes: no components at all (one op each).
    assert grouped([offload(0, 0), offload(1, 1), onboard(9, 2)]) is None
    # Two reads of one slot are not ordered; a chain through the host is.
    #   0 off g0->h3   1 off g0->h4   2 on h3->g2
    assert grouped([offload(0, 3), offload(0, 4), onboard(3, 2)]) == [[0, 2], [1]]


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
    return TransferOp(OpKind.COPY, src, s, G, g, draw(st.integers(1, TPB)))


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(any_op(), min_size=1, max_size=30))
def test_conflicting_ops_share_a_component_in_plan_order(ops: list[TransferOp]) -> None:
    """Any two ops touching a slot that one of them writes are in one component, which
    lists its ops in plan order; every op is in exactly one component. Slots indexed
    directly or numbered by sorting, pairs found directly or not: the same components."""
    assert grouped(ops, dense=True) == grouped(ops, dense=False) == grouped(ops, pairs=False)
    groups = grouped(ops) or [[i] for i in range(len(ops))]
    assert sorted(i for g in groups for i in g) == list(range(len(ops)))
    assert all(g == sorted(g) for g in groups)
    where = {i: n for n, g in enumerate(groups) for i in g}
    for j, b in enumerate(ops):
        for i in range(j):
            a = ops[i]
            writes_a, writes_b = (a.dst_tier, a.dst_slot), (b.dst_tier, b.dst_slot)
            if writes_a in ((b.src_tier, b.src_slot), writes_b) or writes_b == (a.src_tier,
                                                                                a.src_slot):
                assert where[i] == where[j], (ops, groups)


def test_array_check_names_the_first_bad_op() -> None:
    """The array check raises the same ValueError as the batch path, naming the op."""
    good = offload(0, 0)
    num_blocks: dict[Tier, int | None] = {G: 12, H: 10}
    cases = [([good, onboard(10, 0)], "op 1 .*slot 10 outside the 10 HOST blocks"),
             ([TransferOp(OpKind.COPY, G, 1, G, 2, 5)], r"num_tokens must be in 1\.\.4"),
             ([good, TransferOp(OpKind.COPY, G, 1, G, 1, 2)], "op 1 .*copies a slot onto itself")]
    for ops, message in cases:
        with pytest.raises(ValueError, match=message):
            check_arrays(plan_arrays(ops), ops, num_blocks, TPB)
    with pytest.raises(ValueError, match="HOST tier, which has no storage"):
        check_arrays(plan_arrays([good]), [good], {G: 12, H: None}, TPB)


def test_plan_columns_are_the_ops_as_arrays() -> None:
    """Columns recorded run by run equal those read off the ops; the arrays an engine
    plans from are the same either way; columns that miscount the ops are refused."""
    ops = [offload(0, 3), offload(1, 4), onboard(9, 0), TransferOp(OpKind.COPY, H, 2, G, 7, 3)]
    columns = PlanColumns.of([])
    columns.extend(G, [0, 1], H, [3, 4], TPB)
    columns.extend(H, [9], G, [0], TPB)
    columns.extend(H, [2], G, [7], 3)
    assert columns == PlanColumns.of(ops)
    assert columns.dst_slots.tolist() == [3, 4, 0, 7]
    with_columns, from_ops = plan_arrays(ops, columns), plan_arrays(ops)
    assert all((a == b).all() for a, b in zip(with_columns, from_ops, strict=True))
    with pytest.raises(ValueError, match="columns hold 4 ops, its ops 3"):
        plan_arrays(ops[:3], columns)
    with pytest.raises(ValueError, match="differ in length: 2 vs 1"):
        columns.extend(G, [0, 1], H, [3], TPB)


def test_a_recorder_hands_out_ops_and_their_columns() -> None:
    """Runs recorded in order come back as one plan whose columns are its ops; the
    recorder is empty after a take."""
    recorder = PlanRecorder()
    recorder.record_run(OpKind.OFFLOAD, G, [0, 1], H, [3, 4], TPB)
    recorder.record_run(OpKind.COPY, H, [2], G, [7], 3)
    plan = recorder.take()
    assert plan.ops == (offload(0, 3), offload(1, 4), TransferOp(OpKind.COPY, H, 2, G, 7, 3))
    assert plan.columns == PlanColumns.of(plan.ops)
    assert len(recorder) == 0 and recorder.take().ops == ()


def make_copier(gpu_kind: str, host_kind: str) -> tuple[KVStorage, KVStorage, FusedCopier]:
    """CPU storages with random values and a copier whose kernel runs interpreted, moving
    32 bytes a turn: a layer's block (128 bytes of K, 128 of V) spans 4 units of 64 bytes,
    so units cut partial copies and the whole-block launch alike."""
    def layout(kind: str) -> KVLayout:
        return KVLayout(NUM_LAYERS, 2, 4, TPB, "float32", kind)

    gpu, host = KVStorage(layout(gpu_kind), 12), KVStorage(layout(host_kind), 10)
    gen = torch.Generator().manual_seed(0)
    for storage in (gpu, host):
        for t in storage.tensors:
            t.copy_(torch.randn(t.shape, generator=gen))
    views = {tier: [copy_view(t) for t in s.tensors] for tier, s in ((G, gpu), (H, host))}

    def layer(tier: Tier, kind: str, i: int) -> Tensor:
        return views[tier][0][:, i] if kind == "block_major" else views[tier][i]

    layers = [LaunchTarget(layer(G, gpu_kind, i), layer(H, host_kind, i), 2)
              for i in range(NUM_LAYERS)]
    whole = None
    if gpu_kind == host_kind == "block_major":
        whole = LaunchTarget(views[G][0], views[H][0], 2 * NUM_LAYERS)
    return gpu, host, FusedCopier(layers, whole, TPB, num_programs=4, interpret=True,
                                     block_bytes=32)


@TRITON
@pytest.mark.parametrize(("gpu_kind", "host_kind"), [("block_major", "block_major"),
                                                     ("layer_major", "block_major")])
def test_fused_kernel_matches_plain_indexing(gpu_kind: str, host_kind: str) -> None:
    """Random plans with hazards and partial copies, layer by layer and whole: the kernel
    gives exactly the in-order result."""
    gpu, host, copier = make_copier(gpu_kind, host_kind)
    storages = {G: gpu, H: host}
    rng = random.Random(gpu_kind + host_kind)
    for trial in range(6):
        ops = random_ops(rng, 16)
        expected = in_order(storages, ops, NUM_LAYERS)
        prepared = copier.prepare(TransferPlan(tuple(ops)), {G: 12, H: 10}, torch.device("cpu"))
        for layer in (None,) if trial % 2 else range(NUM_LAYERS):
            copier.launch(prepared, layer)
        assert_matches(storages, expected, (trial, ops))
