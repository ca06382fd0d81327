"""The copy-engine path's planning: batches of one group, level and direction, and the
copies they name (executed here with memmove on CPU tensors, in any order their
dependencies allow; on CUDA the engine tests run them through cudaMemcpyBatchAsync)."""

from __future__ import annotations

import random

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
)
from kvtier.transfer.fused import LaunchTarget  # noqa: E402
from kvtier.transfer.plan import TransferPlan  # noqa: E402
from kvtier.transfer.torch_memory import copy_view, layer_view  # noqa: E402
from plan_ops import TPB, G, H, offload, onboard, random_ops  # noqa: E402

NUM_LAYERS = 2
NUM_BLOCKS: dict[Tier, int | None] = {G: 12, H: 10}


def make_copier(gpu_kind: str, host_kind: str) -> tuple[dict[Tier, KVStorage], DmaBatchCopier]:
    """CPU storages of both tiers with random values, and a copier over their views."""
    storages = {tier: KVStorage(KVLayout(NUM_LAYERS, 2, 4, TPB, "float32", kind), num)
                for tier, kind, num in ((G, gpu_kind, 12), (H, host_kind, 10))}
    gen = torch.Generator().manual_seed(0)
    for storage in storages.values():
        for t in storage.tensors:
            t.copy_(torch.randn(t.shape, generator=gen))
    views = {tier: [copy_view(t) for t in s.tensors] for tier, s in storages.items()}
    kinds = {G: gpu_kind, H: host_kind}
    layers = [LaunchTarget(layer_view(views[G], gpu_kind, i), layer_view(views[H], host_kind, i),
                           2) for i in range(NUM_LAYERS)]
    whole = None
    if kinds[G] == kinds[H] == "block_major":
        whole = LaunchTarget(views[G][0], views[H][0], 2 * NUM_LAYERS)
    return storages, DmaBatchCopier(layers, whole, TPB)


def test_a_step_pipelines_offloads_and_onboards_by_group() -> None:
    """Four offload/onboard pairs and an unrelated onboard on two launches: five groups
    (16 stages / 2 launches, at most one per component), each pair an offload batch
    (level 0, d2h) and then its onboard batch (level 1, h2d), the lone onboard last."""
    #   component   0: off g0->h0, on h9->g0   1: off g1->h1, on h8->g1   ...   4: on h4->g9
    ops = [offload(g, g) for g in range(4)] + [onboard(9 - g, g) for g in range(4)]
    ops.append(onboard(4, 9))
    _, copier = make_copier("block_major", "block_major")
    prepared = copier.prepare(TransferPlan(tuple(ops)), NUM_BLOCKS, 2, 2)
    batches = copier.batches(prepared, copier.layers[0])
    d2h, h2d = 2, 1
    assert [(b.group, b.level, b.flags, len(b.sizes)) for b in batches] == [
        (0, 0, d2h, 1), (0, 1, h2d, 1), (1, 0, d2h, 1), (1, 1, h2d, 1),
        (2, 0, d2h, 1), (2, 1, h2d, 1), (3, 0, d2h, 1), (3, 1, h2d, 1), (4, 0, h2d, 1)]
    # A plan without hazards: one batch per direction, all at level 0.
    free = copier.prepare(TransferPlan((offload(0, 0), onboard(9, 5), offload(1, 1))),
                          NUM_BLOCKS, 2, 2)
    assert [(b.group, b.level, b.flags, len(b.sizes))
            for b in copier.batches(free, copier.layers[0])] == [(0, 0, h2d, 1), (0, 0, d2h, 2)]


def run_in_any_allowed_order(batches: list[DmaBatch], rng: random.Random) -> None:
    """Execute ``batches``, each only after every batch of the level before in its group,
    otherwise in random order (what two streams may do)."""
    pending = list(batches)
    done: set[tuple[int, int]] = set()
    while pending:
        ready = [b for b in pending
                 if b.level == 0 or all((x.group, x.level) in done or x.group != b.group
                                        or x.level != b.level - 1 for x in pending)]
        batch = rng.choice(ready)
        pending.remove(batch)
        memmove_batch(batch.dsts, batch.srcs, batch.sizes, 0)
        if not any((x.group, x.level) == (batch.group, batch.level) for x in pending):
            done.add((batch.group, batch.level))


@pytest.mark.parametrize(("gpu_kind", "host_kind"), [("block_major", "block_major"),
                                                     ("layer_major", "block_major")])
def test_random_plans_match_in_order_copies(gpu_kind: str, host_kind: str) -> None:
    """Random plans with hazards and partial copies, layer by layer and whole, executed in
    any order the batches' dependencies allow: exactly the in-order result."""
    storages, copier = make_copier(gpu_kind, host_kind)
    rng = random.Random(gpu_kind + host_kind)
    for trial in range(30):
        ops = random_ops(rng, 24)
        expected = in_order(storages, ops, NUM_LAYERS)
        launches: list[int | None] = [None] if trial % 2 else list(range(NUM_LAYERS))
        targets = [t for layer in launches for t in copier.targets(layer)]
        prepared = copier.prepare(TransferPlan(tuple(ops)), NUM_BLOCKS, len(targets),
                                  targets[0].num_segs)
        for target in targets:
            run_in_any_allowed_order(copier.batches(prepared, target), rng)
        assert_matches(storages, expected, (trial, ops))


def test_a_plan_cut_for_other_targets_is_refused() -> None:
    """Batches are cut for one segment count: another target's raises, naming both."""
    _, copier = make_copier("block_major", "block_major")
    assert copier.whole is not None
    prepared = copier.prepare(TransferPlan((offload(0, 0),)), NUM_BLOCKS, 2, 2)
    with pytest.raises(ValueError, match="cut for targets of 2 segments, this one has 4"):
        copier.batches(prepared, copier.whole)
