"""The staging path's planning: batches sorted by host slot, cut into chunks of one staging
buffer, one DMA per run of consecutive host slots; executed here on CPU tensors (memmove
for the DMA, the same torch gather/scatter as on CUDA) in any order two streams per
direction may run them."""

from __future__ import annotations

import random

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the data-plane tests need torch: "
                                            "pip install 'kvtier[torch]'")

from data_plane.in_order import assert_matches, in_order  # noqa: E402
from kvtier.storage import KVLayout, KVStorage  # noqa: E402
from kvtier.tier import Tier  # noqa: E402
from kvtier.transfer.dma_batch import (  # noqa: E402
    DmaBatch,
    DmaBatchCopier,
    memmove_batch,
    queue_keys,
)
from kvtier.transfer.dma_gather import (  # noqa: E402
    D2H,
    H2D,
    DmaGatherCopier,
    GatherChunk,
    GatherCost,
    GatherPlan,
    host_runs,
    queue,
    queue_order,
    staged_columns,
    staged_keys,
)
from kvtier.transfer.fused import LaunchTarget, plan_arrays  # noqa: E402
from kvtier.transfer.plan import OpKind, PlanRecorder, TransferOp, TransferPlan  # noqa: E402
from kvtier.transfer.torch_memory import blocks_view, copy_view, layer_view  # noqa: E402
from plan_ops import TPB, G, H, offload, onboard, random_ops  # noqa: E402

NUM_LAYERS = 2
NUM_BLOCKS: dict[Tier, int | None] = {G: 12, H: 10}


def make_copier(gpu_kind: str, capacity: int,
                spanned: bool = False) -> tuple[dict[Tier, KVStorage], DmaGatherCopier]:
    """CPU storages (GPU of ``gpu_kind``, host block-major) with random values, and a copier
    whose staging buffers hold ``capacity`` blocks, two per direction; ``spanned``: a
    layer-major GPU's layers gathered through one view spanning them all."""
    kinds = {G: gpu_kind, H: "block_major"}
    storages = {tier: KVStorage(KVLayout(NUM_LAYERS, 2, 4, TPB, "float32", kinds[tier]), num)
                for tier, num in ((G, 12), (H, 10))}
    gen = torch.Generator().manual_seed(0)
    for storage in storages.values():
        for t in storage.tensors:
            t.copy_(torch.randn(t.shape, generator=gen))
    views = {tier: [copy_view(t) for t in s.tensors] for tier, s in storages.items()}
    layers = [LaunchTarget(layer_view(views[G], gpu_kind, i), layer_view(views[H], "block_major",
                                                                        i), 2)
              for i in range(NUM_LAYERS)]
    whole = (LaunchTarget(views[G][0], views[H][0], 2 * NUM_LAYERS)
             if gpu_kind == "block_major" else None)
    direct = DmaBatchCopier(layers, whole, TPB)
    block_bytes = storages[H].layout.bytes_per_block
    parts = views[G]
    if spanned:
        view = blocks_view(parts)
        assert view is not None
        assert all(torch.equal(view[:, i], part) for i, part in enumerate(parts))
        parts = [view]
    copier = DmaGatherCopier(parts, views[H][0], direct, TPB, num_streams=2,
                             staging_bytes=capacity * block_bytes)
    return storages, copier


def runs_of(plan: GatherPlan, chunk: GatherChunk) -> list[tuple[int, int, int]]:
    """(first host slot, position in the buffer, blocks) of each DMA run of ``chunk``."""
    a, b = chunk.run_first, chunk.run_end
    return list(zip(plan.run_host[a:b].tolist(), plan.run_pos[a:b].tolist(),
                    plan.run_len[a:b].tolist(), strict=True))


def test_a_batch_is_sorted_by_host_slot_and_cut_into_buffer_sized_chunks() -> None:
    """No hazards: one batch per direction, sorted by host slot, cut into chunks of two
    blocks dealt to the direction's two streams; consecutive host slots share one DMA."""
    #   onboards  h8->g0  h9->g1  h4->g3      sorted by host: h4 | h8 h9 -> chunks [h4 h8] [h9]
    #   offloads  g5->h3  g2->h1  g7->h2      sorted by host: h1 h2 | h3 -> chunks [h1 h2] [h3]
    ops = (onboard(8, 0), onboard(9, 1), onboard(4, 3), offload(5, 3), offload(2, 1),
           offload(7, 2))
    _, copier = make_copier("block_major", capacity=2)
    plan = copier.prepare(TransferPlan(ops), NUM_BLOCKS)
    assert plan.direct is None
    assert [(c.group, c.level, c.flags, c.stream, c.early, c.first, c.end)
            for c in plan.chunks] == [(0, 0, H2D, 0, True, 0, 2), (0, 0, H2D, 1, True, 2, 3),
                                      (0, 0, D2H, 0, False, 3, 5), (0, 0, D2H, 1, False, 5, 6)]
    assert plan.gpu_slots.tolist() == [3, 0, 1, 2, 7, 5]
    assert [runs_of(plan, c) for c in plan.chunks] == [[(4, 0, 1), (8, 1, 1)], [(9, 0, 1)],
                                                       [(1, 0, 2)], [(3, 0, 1)]]


def test_an_onboard_that_reads_a_host_slot_the_plan_writes_waits_for_it() -> None:
    """A step: offload g0->h0, then onboard into g0 (early: only its scatter waits); an
    onboard from h0 (written by the offload) is not early."""
    #   component 0: off g0->h0, on h5->g0, on h0->g3 (reads h0 after the offload wrote it)
    ops = (offload(0, 0), onboard(5, 0), onboard(0, 3))
    _, copier = make_copier("layer_major", capacity=4)
    plan = copier.prepare(TransferPlan(ops), NUM_BLOCKS)
    assert [(c.level, c.flags, c.early) for c in plan.chunks] == [
        (0, D2H, False), (1, H2D, True), (2, H2D, False)]


def test_staging_pays_where_runs_are_long_and_the_cpu_keeps_up() -> None:
    """With the costs measured on an H200 host, 512 MiB plans in 32 MiB chunks: 64 KiB
    blocks pay from runs of 2, not at random slots (runs below 128 KiB never pay); 16 KiB
    blocks in runs of 8 or more, not of 7 (the CPU would fall behind the link); a 12.5
    MiB step pays for its calls, not its bytes."""
    cost = GatherCost()
    kib, chunk = 1024, 32 << 20
    assert cost.pays(8192, 4096, 64 * kib, chunk) and cost.pays(8192, 1024, 64 * kib, chunk)
    assert not cost.pays(8192, 8192, 64 * kib, chunk)  # runs of 1: 64 KiB each
    assert not cost._replace(cpu_us_per_run=0.0).pays(8192, 8192, 64 * kib, chunk)
    assert cost.pays(32768, 4096, 16 * kib, chunk)  # runs of 8: 5.47 ms against 5.65
    assert not cost.pays(32768, 4682, 16 * kib, chunk)  # runs of 7: 5.76 ms
    assert not cost._replace(min_run_bytes=0).pays(32768, 4682, 16 * kib, chunk)
    assert cost.pays(32768, 2731, 16 * kib, chunk)  # runs of 12
    assert not cost.pays(200, 25, 64 * kib, chunk)  # two chunks' calls: 0.15 ms against 0.14
    assert not cost.pays(0, 0, 64 * kib, chunk)
    assert cost.cpu_us(32768, 4096, 16) == pytest.approx(32768 * 0.075 + 4096 * 0.5 + 960)


def test_host_runs_count_whole_offloads_and_onboards_in_plan_order() -> None:
    """Runs of consecutive host slots, one direction at a time, in plan order."""
    ops = (offload(0, 4), offload(1, 5), offload(2, 6), onboard(7, 3), onboard(8, 9),
           onboard(2, 8))
    assert host_runs(staged_columns(plan_arrays(ops), TPB)) == (6, 3)  # h4-6 | h7-8 | h2


Action = tuple[str, object, tuple[int, int]]


def run_in_any_allowed_order(copier: DmaGatherCopier, plan: GatherPlan,
                             rng: random.Random) -> None:
    """Execute ``plan`` in a random order that two streams per direction allow: each
    stream in queue order (its buffer is reused), a step after the level before in its
    group, an early onboard's DMA at once but its scatter after that level."""
    slots = torch.from_numpy(plan.gpu_slots)
    dsts, srcs, sizes = copier.runs(plan)
    streams: dict[tuple[int, int], list[tuple[str, GatherChunk | DmaBatch]]] = {}
    count: dict[tuple[int, int], int] = {}
    for step in queue(copier, plan):
        stream = (step.flags, step.stream if isinstance(step, GatherChunk) else 0)
        count[(step.group, step.level)] = count.get((step.group, step.level), 0) + 1
        if isinstance(step, GatherChunk) and step.flags == H2D:
            streams.setdefault(stream, []).extend([("dma", step), ("scatter", step)])
        else:
            streams.setdefault(stream, []).append(("all", step))
    finished: dict[tuple[int, int], int] = {}

    def ready(part: str, step: GatherChunk | DmaBatch) -> bool:
        if step.level == 0 or (part == "dma" and isinstance(step, GatherChunk) and step.early):
            return True
        before = (step.group, step.level - 1)
        return finished.get(before, 0) == count[before]

    while any(streams.values()):
        heads = [key for key, todo in streams.items() if todo and ready(*todo[0])]
        key = rng.choice(heads)
        part, step = streams[key].pop(0)
        if isinstance(step, GatherChunk):
            if step.flags == D2H:
                copier.gather(step, slots)
            if part in ("all", "dma"):
                a, b = step.run_first, step.run_end
                memmove_batch(dsts[a:b], srcs[a:b], sizes[a:b], 0)
            if part == "scatter":
                copier.scatter(step, slots)
        else:
            memmove_batch(step.dsts, step.srcs, step.sizes, 0)
        if part != "dma":
            finished[(step.group, step.level)] = finished.get((step.group, step.level), 0) + 1


@pytest.mark.parametrize(("gpu_kind", "spanned"), [("block_major", False),
                                                   ("layer_major", False), ("layer_major", True)])
def test_random_plans_match_in_order_copies(gpu_kind: str, spanned: bool) -> None:
    """Random plans with hazards, runs and partial copies, in buffers of three blocks, run
    in any order the streams allow: exactly the in-order result."""
    storages, copier = make_copier(gpu_kind, capacity=3, spanned=spanned)
    rng = random.Random(f"{gpu_kind}{spanned}")
    for trial in range(40):
        ops = random_ops(rng, 24)
        if trial % 2:  # runs of consecutive host slots, as a step's offloads take them
            start = rng.randrange(6)
            ops += [offload(rng.randrange(12), start + i) for i in range(4)]
        expected = in_order(storages, ops, NUM_LAYERS)
        plan = copier.prepare(TransferPlan(tuple(ops)), NUM_BLOCKS)
        run_in_any_allowed_order(copier, plan, rng)
        assert_matches(storages, expected, (trial, ops))


class ColumnsOnly(TransferPlan):
    """A plan whose ops may not be read: the copy paths must plan from its columns."""

    __slots__ = ()

    @property
    def ops(self) -> tuple[TransferOp, ...]:
        raise AssertionError("the ops of a plan recorded as columns were built")


def test_a_plan_recorded_as_columns_is_cut_without_building_its_ops() -> None:
    """The staging and batched paths plan from the columns alone (a Python object per op
    is what the columns save the producer)."""
    recorder = PlanRecorder()
    recorder.record_run(OpKind.OFFLOAD, G, [0, 1, 2], H, [4, 5, 6], TPB)
    recorder.record_run(OpKind.ONBOARD, H, [7, 8], G, [0, 1], TPB)
    taken = recorder.take()
    plan = ColumnsOnly.of_columns(taken.kinds, taken.columns)  # type: ignore[arg-type]
    _, copier = make_copier("layer_major", capacity=8)
    prepared = copier.prepare(plan, NUM_BLOCKS)
    assert [runs_of(prepared, c) for c in prepared.chunks] == [[(4, 0, 3)], [(7, 0, 2)]]
    assert len(copier.direct.prepare(plan, NUM_BLOCKS, 2, 2).src_slot) == 5


def test_only_equally_spaced_slices_of_one_allocation_span_layers() -> None:
    """A layer-major storage's layers are slices of one allocation: one view spans them;
    separate allocations, or slices out of order, are refused."""
    storage = KVStorage(KVLayout(3, 2, 4, TPB, "float32", "layer_major"), 5)
    assert blocks_view(storage.tensors) is not None
    apart = [torch.zeros(5, 2, TPB, 8) for _ in range(3)]
    assert blocks_view(apart) is None
    assert blocks_view([storage.tensors[0], storage.tensors[2], storage.tensors[1]]) is None


def random_step(rng: random.Random) -> list[TransferOp]:
    """A step on the test's pools, shuffled: offloads of distinct GPU slots into distinct
    host slots (often consecutive), and onboards from other host slots, half of them into
    slots just offloaded; no host slot is touched twice."""
    hosts = rng.sample(range(10), rng.randrange(2, 10))
    if rng.random() < 0.5:
        hosts.sort()
    num_off = rng.randrange(1, len(hosts))
    victims = rng.sample(range(12), num_off)
    ops = [offload(g, h) for g, h in zip(victims, hosts[:num_off], strict=False)]
    free = [g for g in range(12) if g not in victims]
    for h in hosts[num_off:]:
        g = victims.pop() if victims and rng.random() < 0.5 else free.pop()
        ops.append(onboard(h, g))
    if rng.random() < 0.3:
        rng.shuffle(ops)
    return ops


def test_the_fast_keys_of_a_step_are_the_general_ones() -> None:
    """``staged_keys`` takes every step (no host slot repeats, GPU slots in offload/onboard
    pairs) and gives exactly ``queue_keys``' groups and levels; other plans of whole
    offloads and onboards it either keys the same or leaves to ``queue_keys``."""
    rng = random.Random(7)
    taken = 0
    for trial in range(300):
        if trial % 2:
            ops = random_step(rng)
        else:
            ops = [op for op in random_ops(rng, 24) if op.num_tokens == TPB
                   and op.src_tier != op.dst_tier] or [offload(0, 0)]
        arrays = plan_arrays(ops)
        flags = arrays.src_tier + 2 * arrays.dst_tier
        host = np.where(flags == D2H, arrays.dst_slot, arrays.src_slot)
        gpu = np.where(flags == D2H, arrays.src_slot, arrays.dst_slot)
        max_groups = rng.choice([1, 2, 8])
        fast = staged_keys(flags, flags == D2H, gpu, host, max_groups)
        if trial % 2:
            assert fast is not None, ops
        if fast is None:
            continue
        taken += 1
        general = queue_keys(arrays, 1, max_groups)
        for name in ("group", "level", "flags"):
            assert getattr(fast, name).tolist() == getattr(general, name).tolist(), (name, ops)
        assert fast.num_components == general.num_components
    assert taken > 150


def test_steps_staged_through_the_fast_keys_match_in_order_copies() -> None:
    """Steps (the fast keys' plans) in buffers of two blocks, run in any order the streams
    allow: exactly the in-order result."""
    storages, copier = make_copier("block_major", capacity=2)
    rng = random.Random(11)
    for trial in range(40):
        ops = random_step(rng)
        expected = in_order(storages, ops, NUM_LAYERS)
        plan = copier.prepare(TransferPlan(tuple(ops)), NUM_BLOCKS)
        run_in_any_allowed_order(copier, plan, rng)
        assert_matches(storages, expected, (trial, ops))


def test_queue_order_is_a_stable_sort_by_batch_then_host_slot() -> None:
    """Sorting runs of consecutive host slots gives the ops' stable sort by (batch, host
    slot) where a batch holds each host slot once; runs stay whole."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        n = int(rng.integers(1, 60))
        batch = np.sort(rng.integers(0, 4, n)) if rng.random() < 0.5 else rng.integers(0, 4, n)
        host = np.empty(n, dtype=np.int64)
        for b in np.unique(batch):  # distinct host slots per batch, in runs
            mine = np.flatnonzero(batch == b)
            starts = rng.permutation(4 * n)[: len(mine)] * 8
            lens = rng.integers(1, 6, len(mine))
            slots = np.concatenate([s + np.arange(k) for s, k in zip(starts, lens,
                                                                      strict=True)])
            host[mine] = slots[: len(mine)]
        expected = np.argsort(batch * (8 * 4 * n + 8) + host, kind="stable")
        assert queue_order(batch, host).tolist() == expected.tolist()


def test_a_staged_plan_with_a_slot_outside_its_pool_is_refused_by_name() -> None:
    """The short check of whole offloads and onboards (their slots' bounds) still names the
    first bad op, as the op-by-op check does."""
    _, copier = make_copier("block_major", capacity=4)
    with pytest.raises(ValueError, match=r"op 1 .*slot 10 outside the 10 HOST blocks"):
        copier.prepare(TransferPlan((offload(0, 1), offload(2, 10))), NUM_BLOCKS)
    with pytest.raises(ValueError, match=r"op 0 .*slot -1 outside the 12 GPU blocks"):
        copier.prepare(TransferPlan((onboard(3, -1), onboard(4, 2))), NUM_BLOCKS)
    with pytest.raises(ValueError, match="HOST tier, which has no storage"):
        copier.prepare(TransferPlan((offload(0, 1),)), {G: 12, H: None})
