"""TorchTransferEngine against plain indexing: random plans, layouts, partial copies,
slot-ordering hazards, poisoned destinations, errors and injected faults."""

from __future__ import annotations

import platform
import random
from typing import TYPE_CHECKING

import pytest

torch = pytest.importorskip("torch", reason="the data-plane tests need torch: "
                                            "pip install 'kvtier[torch]'")

from kvtier.storage import KVLayout, KVStorage  # noqa: E402
from kvtier.tier import Tier  # noqa: E402
from kvtier.transfer import OpKind, TransferError, TransferOp, TransferPlan  # noqa: E402
from kvtier.transfer.batching import TransferBatch  # noqa: E402
from kvtier.transfer.dma_gather import GatherCost, staged_columns  # noqa: E402
from kvtier.transfer.fused import plan_arrays  # noqa: E402
from kvtier.transfer.torch_engine import TorchTransferEngine  # noqa: E402
from kvtier.transfer.torch_memory import HEAP_PAD_BYTES, retain_freed_heap  # noqa: E402

G, H = Tier.GPU, Tier.HOST
TPB = 4
NUM_LAYERS = 3
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
# (GPU layout, host layout): the same kind on both tiers, or GPU layer-major over a
# block-major host (what an engine whose kernels want layer-major would pick).
LAYOUTS = [("block_major", "block_major"), ("layer_major", "layer_major"),
           ("layer_major", "block_major")]

if TYPE_CHECKING:
    from torch import Tensor

Snapshot = dict[Tier, list["Tensor"]]


def make_tiers(gpu_kind: str, host_kind: str, device: str, num_gpu: int = 12,
               num_host: int = 10, seed: int = 0) -> tuple[KVStorage, KVStorage]:
    """A GPU and a host storage of 4-token blocks, filled with seeded random values."""
    def layout(kind: str) -> KVLayout:
        return KVLayout(NUM_LAYERS, 2, 8, TPB, "float32", kind)

    gpu = KVStorage(layout(gpu_kind), num_gpu, device)
    host = KVStorage(layout(host_kind), num_host)
    gen = torch.Generator().manual_seed(seed)
    for storage in (gpu, host):
        for t in storage.tensors:
            t.copy_(torch.randn(t.shape, generator=gen))
    return gpu, host


def snapshot(gpu: KVStorage, host: KVStorage) -> Snapshot:
    """Per tier, a CPU copy of each layer [blocks, 2, tokens, heads, head_dim]."""
    return {tier: [s.layer(i).cpu().clone() for i in range(NUM_LAYERS)]
            for tier, s in ((G, gpu), (H, host))}


def poison(gpu: KVStorage, host: KVStorage, ops: list[TransferOp]) -> None:
    """NaN every destination block, so a block the engine forgets stays NaN."""
    for op in ops:
        storage = gpu if op.dst_tier is G else host
        for i in range(NUM_LAYERS):
            storage.layer(i)[op.dst_slot] = float("nan")


def reference(before: Snapshot, ops: list[TransferOp]) -> Snapshot:
    """The plan executed one op at a time, in order, with plain indexing."""
    tiers = {tier: [t.clone() for t in layers] for tier, layers in before.items()}
    for op in ops:
        for i in range(NUM_LAYERS):
            n = op.num_tokens
            tiers[op.dst_tier][i][op.dst_slot, :, :n] = tiers[op.src_tier][i][op.src_slot, :, :n]
    return tiers


def assert_matches(gpu: KVStorage, host: KVStorage, expected: Snapshot) -> None:
    """Both tiers equal ``expected`` bit for bit (NaN where NaN)."""
    got = snapshot(gpu, host)
    for tier in (G, H):
        for i in range(NUM_LAYERS):
            torch.testing.assert_close(got[tier][i], expected[tier][i], rtol=0, atol=0,
                                       equal_nan=True, msg=f"{tier.name} layer {i}")


def random_ops(rng: random.Random, num_gpu: int, num_host: int) -> list[TransferOp]:
    """Offloads, onboards (some in consecutive runs) and partial copies over few slots, so
    hazards are common."""
    ops: list[TransferOp] = []
    for _ in range(rng.randrange(1, 40)):
        kind = rng.randrange(4)
        if kind == 0:
            ops.append(TransferOp(OpKind.OFFLOAD, G, rng.randrange(num_gpu), H,
                                  rng.randrange(num_host), TPB))
        elif kind == 1:
            ops.append(TransferOp(OpKind.ONBOARD, H, rng.randrange(num_host), G,
                                  rng.randrange(num_gpu), TPB))
        elif kind == 2:
            n = rng.randrange(1, 4)
            s, d = rng.randrange(num_host - n), rng.randrange(num_gpu - n)
            ops += [TransferOp(OpKind.ONBOARD, H, s + j, G, d + j, TPB) for j in range(n)]
        else:
            src = rng.choice((G, H))
            dst = rng.randrange(num_gpu)
            choices = [x for x in range(num_gpu if src is G else num_host) if (src, x) != (G, dst)]
            ops.append(TransferOp(OpKind.COPY, src, rng.choice(choices), G, dst,
                                  rng.randrange(1, TPB + 1)))
    return ops


def run_plan(engine: TorchTransferEngine, ops: list[TransferOp]) -> None:
    """Submit and wait until the copies are visible to the CPU."""
    handle = engine.submit(TransferPlan(tuple(ops)))
    engine.synchronize(handle)
    assert engine.poll(handle)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("gpu_kind", "host_kind"), LAYOUTS)
@pytest.mark.parametrize("method", ["auto", "dma_batch", "dma_gather", "fused", "kernel", "dma",
                                    "staged"])
@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "whole"])
def test_random_plans_match_plain_indexing(device: str, gpu_kind: str, host_kind: str,
                                           method: str, layerwise: bool) -> None:
    """Random plans with hazards and partial copies give exactly the in-order result."""
    gpu, host = make_tiers(gpu_kind, host_kind, device)
    if method == "kernel" and device == "cuda" and not TorchTransferEngine(gpu, host).has_uva:
        pytest.skip("no unified addressing on this machine")
    try:  # staging buffers of 3 blocks: plans are cut into several chunks
        engine = TorchTransferEngine(gpu, host, method=method, layerwise=layerwise,
                                     staging_bytes=3 * host.layout.bytes_per_block)
    except ValueError as exc:  # fused: CUDA, unified addressing and Triton; dma_*: CUDA;
        # dma_gather: a block-major host
        if method == "fused" or (method in ("dma_batch", "dma_gather")
                                 and (device == "cpu" or host_kind == "layer_major")):
            pytest.skip(str(exc))
        raise
    rng = random.Random(f"{gpu_kind}-{host_kind}-{method}-{layerwise}")
    for _ in range(25):
        ops = random_ops(rng, gpu.num_blocks, host.num_blocks)
        poison(gpu, host, ops)
        expected = reference(snapshot(gpu, host), ops)
        run_plan(engine, ops)
        assert_matches(gpu, host, expected)
    assert engine.stats.num_partial_ops > 0
    if engine.fused:  # one launch per layer, or one for whole block-major blocks
        per_plan = 1 if not layerwise and gpu_kind == host_kind == "block_major" else NUM_LAYERS
        assert engine.stats.num_fused_launches == 25 * per_plan
    if method == "dma_batch":  # at least one batch per layer and plan
        assert engine.dma_batched and engine.stats.num_dma_batches >= 25 * NUM_LAYERS
    if method == "dma_gather":
        assert engine.stats.num_gather_plans == 25
    # Whole-block DMA needs slots contiguous in memory: whole tensors of one layout kind,
    # or one layer of a layer-major pair.
    if method == "dma" and gpu_kind == host_kind and (not layerwise or gpu_kind == "layer_major"):
        assert engine.stats.num_dma_copies > 0


@pytest.mark.parametrize("device", DEVICES)
def test_evict_then_onboard_into_the_same_slots(device: str) -> None:
    """Offload g->h then onboard h'->g: the host gets g's old block, g gets h''s."""
    gpu, host = make_tiers("block_major", "block_major", device)
    before = snapshot(gpu, host)
    ops = [TransferOp(OpKind.OFFLOAD, G, g, H, g, TPB) for g in range(4)]
    ops += [TransferOp(OpKind.ONBOARD, H, 9 - g, G, g, TPB) for g in range(4)]
    engine = TorchTransferEngine(gpu, host)
    run_plan(engine, ops)
    after = snapshot(gpu, host)
    for g in range(4):
        for i in range(NUM_LAYERS):
            assert torch.equal(after[H][i][g], before[G][i][g])
            assert torch.equal(after[G][i][g], before[H][i][9 - g])
    if engine.fused:  # each offload and the onboard into its slot: one program, in order
        assert (engine.stats.num_components, engine.stats.num_batches) == (4, 0)
    else:
        assert (engine.stats.num_batches, engine.stats.num_waves) == (2, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_partial_copy_writes_only_the_first_tokens(device: str) -> None:
    """A 3-token copy fills tokens 0..2 of every layer's K and V and leaves token 3."""
    gpu, host = make_tiers("layer_major", "block_major", device)
    op = TransferOp(OpKind.COPY, H, 7, G, 2, 3)
    poison(gpu, host, [op])
    run_plan(TorchTransferEngine(gpu, host), [op])
    for i in range(NUM_LAYERS):
        block = gpu.layer(i)[2].cpu()
        assert torch.equal(block[:, :3], host.layer(i)[7, :, :3])
        assert block[:, 3].isnan().all()


def test_many_blocks_take_few_calls() -> None:
    """64 offloads plus 64 onboards into the freed slots: 2 batches, one gather/scatter per
    batch and layer (no per-block calls); long runs go as one DMA per run and tensor."""
    gpu, host = make_tiers("block_major", "block_major", "cpu", num_gpu=128, num_host=256)
    engine = TorchTransferEngine(gpu, host)
    ops = [TransferOp(OpKind.OFFLOAD, G, 2 * g, H, 3 * g, TPB) for g in range(64)]
    ops += [TransferOp(OpKind.ONBOARD, H, 200 + (g * 7) % 50, G, 2 * g, TPB) for g in range(50)]
    expected = reference(snapshot(gpu, host), ops)
    run_plan(engine, ops)
    assert_matches(gpu, host, expected)
    assert (engine.stats.num_batches, engine.stats.num_kernel_groups) == (2, 2 * NUM_LAYERS)
    whole = TorchTransferEngine(gpu, host, min_dma_copy_bytes=0, layerwise=False)
    run_plan(whole, [TransferOp(OpKind.OFFLOAD, G, g, H, 100 + g, TPB) for g in range(64)])
    assert (whole.stats.num_dma_copies, whole.stats.num_kernel_groups) == (1, 0)


def test_stats_count_bytes_by_direction() -> None:
    """Bytes moved are counted per direction, partial copies by their tokens."""
    gpu, host = make_tiers("block_major", "block_major", "cpu")
    engine = TorchTransferEngine(gpu, host)
    per_token = gpu.layout.bytes_per_token
    run_plan(engine, [TransferOp(OpKind.OFFLOAD, G, 0, H, 0, TPB),
                      TransferOp(OpKind.ONBOARD, H, 1, G, 1, TPB),
                      TransferOp(OpKind.COPY, G, 2, G, 3, 1)])
    s = engine.stats
    assert (s.bytes_d2h, s.bytes_h2d, s.bytes_d2d) == (4 * per_token, 4 * per_token, per_token)
    assert (s.num_plans, s.num_ops, s.num_partial_ops) == (1, 3, 1)
    # The CUDA paths count the plan's arrays (one pass per field): the same figures.
    arrays_engine = TorchTransferEngine(gpu, host)
    arrays_engine._count_arrays(plan_arrays([
        TransferOp(OpKind.OFFLOAD, G, 0, H, 0, TPB), TransferOp(OpKind.OFFLOAD, G, 4, H, 5, 2),
        TransferOp(OpKind.ONBOARD, H, 1, G, 1, TPB), TransferOp(OpKind.COPY, G, 2, G, 3, 1)]), 4)
    a = arrays_engine.stats
    assert (a.bytes_d2h, a.bytes_h2d, a.bytes_d2d) == (6 * per_token, 4 * per_token, per_token)
    assert (a.num_plans, a.num_ops, a.num_partial_ops, a.num_components) == (1, 4, 2, 4)


def test_invalid_ops_raise_before_any_copy() -> None:
    """A slot outside a tier, a bad token count or a self-copy raises ValueError; nothing
    is copied."""
    gpu, host = make_tiers("block_major", "block_major", "cpu")
    engine = TorchTransferEngine(gpu, host)
    before = snapshot(gpu, host)
    good = TransferOp(OpKind.OFFLOAD, G, 0, H, 0, TPB)
    with pytest.raises(ValueError, match="slot 10 outside the 10 HOST blocks"):
        engine.submit(TransferPlan((good, TransferOp(OpKind.ONBOARD, H, 10, G, 0, TPB))))
    with pytest.raises(ValueError, match=r"num_tokens must be in 1\.\.4"):
        engine.submit(TransferPlan((TransferOp(OpKind.COPY, G, 1, G, 2, 5),)))
    with pytest.raises(ValueError, match="copies a slot onto itself"):
        engine.submit(TransferPlan((TransferOp(OpKind.COPY, G, 1, G, 1, 2),)))
    assert_matches(gpu, host, before)
    no_host = TorchTransferEngine(gpu, None)
    with pytest.raises(ValueError, match="HOST tier, which has no storage"):
        no_host.submit(TransferPlan((good,)))
    with pytest.raises(ValueError, match="method must be one of"):
        TorchTransferEngine(gpu, host, method="fast")


@pytest.mark.parametrize("device", DEVICES)
def test_a_failing_batch_names_the_ops_not_done(device: str) -> None:
    """When the second wave's batch raises, TransferError lists its ops and the later
    ones; the first wave's copies are done, nothing else is."""
    gpu, host = make_tiers("block_major", "block_major", device)
    ops = [TransferOp(OpKind.OFFLOAD, G, 0, H, 0, TPB),    # wave 0
           TransferOp(OpKind.ONBOARD, H, 5, G, 0, TPB),    # wave 1: writes g0 after op 0
           TransferOp(OpKind.OFFLOAD, G, 0, H, 1, TPB),    # wave 2: reads g0 after op 1
           TransferOp(OpKind.ONBOARD, H, 6, G, 7, TPB)]    # wave 0
    before = snapshot(gpu, host)
    # The batch path ("kernel" on CUDA): the fused path fails whole plans (test below).
    engine = TorchTransferEngine(gpu, host, method="kernel")

    def fail_in_wave_1(batch: TransferBatch) -> None:
        if batch.wave == 1:
            raise RuntimeError("injected copy failure")

    engine.before_batch = fail_in_wave_1
    with pytest.raises(TransferError, match="2 of 4 copies not done") as info:
        engine.submit(TransferPlan(tuple(ops)))
    assert info.value.failed_ops == (ops[1], ops[2])
    if device == "cuda":
        torch.cuda.synchronize()
    assert_matches(gpu, host, reference(before, [ops[0], ops[3]]))
    engine.before_batch = None
    run_plan(engine, ops[1:3])  # the engine stays usable
    assert_matches(gpu, host, reference(before, [ops[0], ops[3], ops[1], ops[2]]))


@CUDA
def test_auto_stages_plans_whose_host_slots_come_in_runs() -> None:
    """Small blocks on a block-major host: ``auto`` takes the staging path for a plan whose
    host slots come in runs long enough, the fused kernel (or waves) for scattered ones."""
    gpu, host = make_tiers("layer_major", "block_major", "cuda", num_gpu=64, num_host=64)
    block = host.layout.bytes_per_block
    # Runs of 4 blocks or more, and a link slow enough that the CPU always keeps up.
    cost = GatherCost(min_run_bytes=4 * block, link_bytes_per_us=1.0)
    engine = TorchTransferEngine(gpu, host, gather_cost=cost)
    if engine.path != "fused":
        pytest.skip(f"small copies take {engine.path} here")
    runs = [TransferOp(OpKind.OFFLOAD, G, 2 * i, H, 10 + i, TPB) for i in range(8)]
    scattered = [TransferOp(OpKind.OFFLOAD, G, 2 * i, H, 3 * i, TPB) for i in range(8)]
    assert engine.plan_path(TransferPlan(tuple(runs))) == "dma_gather"
    assert engine.plan_path(TransferPlan(tuple(scattered))) == "fused"
    expected = reference(snapshot(gpu, host), runs)
    run_plan(engine, runs)
    assert_matches(gpu, host, expected)
    assert engine.stats.num_gather_plans == 1


@CUDA
@pytest.mark.parametrize("method", ["fused", "dma_batch", "dma_gather"])
def test_a_failing_launch_fails_every_op(method: str) -> None:
    """A launch that raises (layer 1 of 3) fails the whole plan: every op is named, since
    layer 0 was copied and layer 2 not; the engine stays usable."""
    gpu, host = make_tiers("layer_major", "block_major", "cuda")
    try:
        engine = TorchTransferEngine(gpu, host, method=method)
    except ValueError as exc:
        if method == "dma_batch":
            raise
        pytest.skip(str(exc))
    ops = [TransferOp(OpKind.OFFLOAD, G, 0, H, 0, TPB), TransferOp(OpKind.ONBOARD, H, 5, G, 0, TPB)]

    def fail_layer_1(layer: int | None) -> None:
        if layer == 1 or method == "dma_gather":  # the staging path launches whole plans
            raise RuntimeError("injected launch failure")

    engine.before_launch = fail_layer_1
    with pytest.raises(TransferError, match="2 of 2 copies not done") as info:
        engine.submit(TransferPlan(tuple(ops)))
    assert info.value.failed_indices == (0, 1)
    engine.before_launch = None
    torch.cuda.synchronize()
    expected = reference(snapshot(gpu, host), ops)
    run_plan(engine, ops)
    assert_matches(gpu, host, expected)


@CUDA
def test_cuda_copies_start_after_the_callers_queued_work() -> None:
    """An offload submitted right after the caller's stream writes a block copies the new
    values, and a stream that waits on the handle sees onboarded blocks."""
    gpu, host = make_tiers("layer_major", "layer_major", "cuda")
    engine = TorchTransferEngine(gpu, host)
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # keep the caller's stream busy
    for i in range(NUM_LAYERS):
        gpu.layer(i)[3] = 42.0
    h1 = engine.submit(TransferPlan((TransferOp(OpKind.OFFLOAD, G, 3, H, 4, TPB),)))
    engine.synchronize(h1)
    assert all(bool((host.layer(i)[4] == 42.0).all()) for i in range(NUM_LAYERS))
    for i in range(NUM_LAYERS):
        host.layer(i)[5] = 7.0
    h2 = engine.submit(TransferPlan((TransferOp(OpKind.ONBOARD, H, 5, G, 6, TPB),)))
    engine.wait(h2)
    total = sum(float(gpu.layer(i)[6].sum()) for i in range(NUM_LAYERS))
    assert total == 7.0 * NUM_LAYERS * gpu.layer(0)[6].numel()


def step_ops(rng: random.Random, num_gpu: int, num_host: int, num: int) -> list[TransferOp]:
    """A serving step: ``num`` victims offloaded into runs of free host slots, then as many
    blocks onboarded into the GPU slots they free (each onboard after its slot's offload)."""
    gpu = rng.sample(range(num_gpu), num)
    start = rng.randrange(num_host - num // 2)  # half the offloads' slots in one run
    run = list(range(start, start + num // 2))
    rest = rng.sample([h for h in range(num_host) if h not in run], 2 * num - len(run))
    offload_to, onboard_from = run + rest[:num - len(run)], rest[num - len(run):]
    return ([TransferOp(OpKind.OFFLOAD, G, g, H, h, TPB)
             for g, h in zip(gpu, offload_to, strict=True)]
            + [TransferOp(OpKind.ONBOARD, H, h, G, g, TPB)
               for g, h in zip(gpu, onboard_from, strict=True)])


@CUDA
@pytest.mark.parametrize("submit_threads", [True, False], ids=["threads", "caller"])
def test_staged_steps_match_in_order_from_submit_threads_or_the_callers(
        submit_threads: bool) -> None:
    """Steps on the staging path, queued from a thread per stream or from the caller's,
    with buffers of 3 blocks (several chunks on each of the 2 streams a direction), give
    exactly the in-order result, one plan after another."""
    gpu, host = make_tiers("layer_major", "block_major", "cuda", num_gpu=40, num_host=64)
    engine = TorchTransferEngine(gpu, host, method="dma_gather", submit_threads=submit_threads,
                                 staging_bytes=3 * host.layout.bytes_per_block)
    rng = random.Random(3)
    for _ in range(8):
        ops = step_ops(rng, gpu.num_blocks, host.num_blocks, 16)
        poison(gpu, host, ops)
        expected = reference(snapshot(gpu, host), ops)
        run_plan(engine, ops)
        assert_matches(gpu, host, expected)
    assert engine.stats.num_gather_plans == 8
    assert engine.stats.num_dma_batches >= 8 * 12  # 16 blocks a direction, 3 a chunk


@CUDA
def test_a_step_failing_on_a_submit_thread_fails_every_op() -> None:
    """The third step of a staged plan raises while the DMAs before it are posted to the
    DMA threads: TransferError names every op, nothing waits forever, and the engine runs
    the next plan exactly."""
    gpu, host = make_tiers("layer_major", "block_major", "cuda", num_gpu=40, num_host=64)
    engine = TorchTransferEngine(gpu, host, method="dma_gather", submit_threads=True,
                                 staging_bytes=3 * host.layout.bytes_per_block)
    ops = step_ops(random.Random(5), gpu.num_blocks, host.num_blocks, 16)
    calls: list[int | None] = []

    def fail_third(layer: int | None) -> None:
        calls.append(layer)
        if len(calls) == 3:
            raise RuntimeError("injected failure of a step")

    engine.before_launch = fail_third
    with pytest.raises(TransferError, match="32 of 32 copies not done") as info:
        engine.submit(TransferPlan(tuple(ops)))
    assert info.value.failed_indices == tuple(range(32))
    engine.before_launch = None
    torch.cuda.synchronize()
    expected = reference(snapshot(gpu, host), ops)
    run_plan(engine, ops)
    assert_matches(gpu, host, expected)


@CUDA
def test_a_staged_plan_failing_before_its_count_counts_no_copy() -> None:
    """A staged plan whose first step fails fails every op before the staging path counts
    the plan (it counts once the last DMA is posted): the failed ops were taken out of
    counts never made, leaving the engine -32 ops and negative bytes. Now the plan is
    counted, and none of its copies."""
    gpu, host = make_tiers("layer_major", "block_major", "cuda", num_gpu=40, num_host=64)
    engine = TorchTransferEngine(gpu, host, method="dma_gather",
                                 staging_bytes=3 * host.layout.bytes_per_block)
    ops = step_ops(random.Random(5), gpu.num_blocks, host.num_blocks, 16)

    def fail_first(layer: int | None) -> None:
        raise RuntimeError("injected failure of a step")

    engine.before_launch = fail_first
    with pytest.raises(TransferError, match="32 of 32 copies not done"):
        engine.submit(TransferPlan(tuple(ops)))
    s = engine.stats
    assert (s.num_plans, s.num_ops, s.bytes_h2d, s.bytes_d2h, s.bytes_d2d) == (1, 0, 0, 0, 0)


def test_staged_plans_are_counted_as_their_arrays_are() -> None:
    """The staging path's count (one count of offloads for whole offloads and onboards)
    gives the figures of the count over a plan's arrays; a plan with a partial copy is
    counted over its arrays."""
    gpu, host = make_tiers("block_major", "block_major", "cpu")
    staged = [TransferOp(OpKind.OFFLOAD, G, 0, H, 0, TPB),
              TransferOp(OpKind.ONBOARD, H, 1, G, 1, TPB),
              TransferOp(OpKind.OFFLOAD, G, 2, H, 3, TPB)]
    for ops in (staged, [*staged, TransferOp(OpKind.COPY, G, 2, G, 3, 1)]):
        by_arrays, by_columns = TorchTransferEngine(gpu, host), TorchTransferEngine(gpu, host)
        by_arrays._count_arrays(plan_arrays(ops), 3)
        by_columns._count_staged(staged_columns(plan_arrays(ops), TPB), 3)
        assert by_columns.stats == by_arrays.stats
    assert by_columns.stats.bytes_d2h == 2 * TPB * gpu.layout.bytes_per_token


def test_a_negative_heap_pad_is_refused_and_glibc_keeps_freed_heap() -> None:
    """``heap_pad_bytes`` below 0 raises naming it; on glibc the pad is set."""
    gpu, host = make_tiers("block_major", "block_major", "cpu")
    with pytest.raises(ValueError, match="heap_pad_bytes must be >= 0 or None, got -1"):
        TorchTransferEngine(gpu, host, heap_pad_bytes=-1)
    assert retain_freed_heap(HEAP_PAD_BYTES) == (platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize("device", DEVICES)
def test_a_managers_plan_runs_once(device: str) -> None:
    """A plan a manager handed out is refused when submitted again (or after a later one),
    copying nothing. a2's plan swaps: its onboard reads host slot 0 into GPU slot 1, then
    b's block is offloaded into host slot 0. Run again (an engine retrying after a
    TransferError), the onboard read b's KV into a's GPU block. A plan built by hand may
    run again (benchmarks repeat theirs)."""
    from kvtier import CacheConfig, KVCacheManager, SequenceSpec

    gpu, host = make_tiers("block_major", "block_major", device, num_gpu=2, num_host=2)
    engine = TorchTransferEngine(gpu, host)
    mgr = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=2,
                                     num_host_blocks=2, enable_partial_reuse=False))
    for rid, first, kv in (("a", 10, 1.0), ("b", 20, 2.0), ("a2", 10, None)):
        mgr.add_sequence(SequenceSpec(rid, list(range(first, first + 5))))
        plan = mgr.take_plan()
        engine.submit(plan)
        engine.synchronize_all()
        if kv is not None:  # the forward pass writes the full block's KV
            for i in range(NUM_LAYERS):
                gpu.layer(i)[mgr.block_table(rid)[0]] = kv
        mgr.remove_sequence(rid)
    # a2 swaps a in for b: host slot 0 read, then written
    assert [(op.kind, op.src_slot, op.dst_slot) for op in plan.ops] == [
        (OpKind.ONBOARD, 0, 1), (OpKind.OFFLOAD, 0, 0)]
    after = snapshot(gpu, host)
    assert all(bool((after[G][i][1] == 1.0).all()) for i in range(NUM_LAYERS))  # a's
    assert all(bool((after[H][i][0] == 2.0).all()) for i in range(NUM_LAYERS))  # b's
    with pytest.raises(ValueError, match=r"^plan 2 of its manager was submitted to this "
                                         r"engine already: a plan's copies run once"):
        engine.submit(plan)
    assert_matches(gpu, host, after)
    engine.submit(TransferPlan(plan.ops))  # by hand: runs, and reads b's KV into a's block
    engine.synchronize_all()
    assert all(bool((gpu.layer(i)[1] == 2.0).all()) for i in range(NUM_LAYERS))
