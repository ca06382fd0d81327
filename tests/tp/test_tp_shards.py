"""Tensor parallelism in one process: shard layouts, one plan on every rank's shard (equal to
the whole-model copy, head slice by head slice), failures joined over ranks, and the remote
tier's per-rank namespaces and found rule."""

from __future__ import annotations

import random
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the tensor-parallel tests need torch: "
                                            "pip install 'kvtier[torch]'")

from kvtier.remote import InMemoryRemoteStore, PayloadError, RemoteNamespace  # noqa: E402
from kvtier.remote.codec import (  # noqa: E402
    namespace_fingerprint,
    num_found_on_every_rank,
)
from kvtier.storage import KVLayout, KVStorage  # noqa: E402
from kvtier.tier import Tier  # noqa: E402
from kvtier.transfer import OpKind, TransferError, TransferOp, TransferPlan  # noqa: E402
from kvtier.transfer.batching import TransferBatch  # noqa: E402
from kvtier.transfer.torch_engine import TorchTransferEngine  # noqa: E402
from kvtier.transfer.tp_engine import ShardedTransferEngine, union_error  # noqa: E402

G, H = Tier.GPU, Tier.HOST
TPB = 4
NUM_LAYERS = 2
NUM_GPU, NUM_HOST = 12, 10
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def make_layout(kind: str = "block_major") -> KVLayout:
    """The whole model's layout: 4 KV heads."""
    return KVLayout(NUM_LAYERS, 4, 8, TPB, "float32", kind)


def make_whole(gpu_kind: str, host_kind: str, device: str) -> tuple[KVStorage, KVStorage]:
    """A whole-model GPU and host storage filled with seeded random values."""
    gpu = KVStorage(make_layout(gpu_kind), NUM_GPU, device)
    host = KVStorage(make_layout(host_kind), NUM_HOST)
    gen = torch.Generator().manual_seed(0)
    for storage in (gpu, host):
        for t in storage.tensors:
            t.copy_(torch.randn(t.shape, generator=gen))
    return gpu, host


def make_shard(whole: KVStorage, rank: int, tp_size: int) -> KVStorage:
    """Rank ``rank``'s storage, holding its heads of ``whole``'s blocks."""
    shard = KVStorage(whole.layout.shard(rank, tp_size), whole.num_blocks, whole.device)
    heads = shard.layout.kv_head_slice
    for i in range(NUM_LAYERS):
        shard.layer(i).copy_(whole.layer(i)[..., heads, :])
    return shard


def make_ops(seed: int) -> list[TransferOp]:
    """Offloads, onboards and partial copies between random slots, with slot reuse."""
    rng = random.Random(seed)
    ops = []
    for _ in range(24):
        kind = rng.choice(list(OpKind))
        src, dst = {OpKind.OFFLOAD: (G, H), OpKind.ONBOARD: (H, G), OpKind.COPY: (G, G)}[kind]
        n = TPB if kind is not OpKind.COPY else rng.randrange(1, TPB)
        size = {G: NUM_GPU, H: NUM_HOST}
        src_slot = rng.randrange(size[src])
        dst_slot = rng.choice([s for s in range(size[dst]) if (dst, s) != (src, src_slot)])
        ops.append(TransferOp(kind, src, src_slot, dst, dst_slot, n))
    return ops


def assert_shard_of(shard: KVStorage, whole: KVStorage) -> None:
    """``shard`` holds exactly its heads of every block of ``whole``."""
    heads = shard.layout.kv_head_slice
    for i in range(NUM_LAYERS):
        torch.testing.assert_close(shard.layer(i).cpu(), whole.layer(i)[..., heads, :].cpu(),
                                   rtol=0, atol=0)


# ---- layouts -----------------------------------------------------------------------------


def test_shard_layout_holds_its_heads_and_their_bytes() -> None:
    """Rank r of N holds KV heads [r*KVH/N, (r+1)*KVH/N); bytes and shapes count them only."""
    whole = make_layout()
    assert (whole.tp_rank, whole.tp_size, whole.num_shard_kv_heads) == (0, 1, 4)
    assert whole.bytes_per_token == 2 * NUM_LAYERS * 4 * 8 * 4
    shards = [whole.shard(r, 4) for r in range(4)]
    assert [s.kv_head_slice for s in shards] == [slice(r, r + 1) for r in range(4)]
    assert all(4 * s.bytes_per_block == whole.bytes_per_block for s in shards)
    assert whole.shard(1, 2).tensor_shapes(3) == [(3, NUM_LAYERS, 2, TPB, 2, 8)]
    assert make_layout("layer_major").shard(1, 2).tensor_shapes(3) == [(3, 2, TPB, 2, 8)] * 2


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tp_size": 3}, "num_kv_heads (4) must split evenly over tp_size (3)"),
    ({"tp_size": 0}, "tp_size must be an integer >= 1, got 0"),
    ({"tp_size": 2, "tp_rank": 2}, "tp_rank must be an integer in 0..1 (tp_size 2), got 2"),
    ({"tp_size": 2, "tp_rank": True}, "tp_rank must be an integer in 0..1 (tp_size 2), got True"),
])
def test_bad_shard_is_refused_naming_the_field(kwargs: dict[str, Any], message: str) -> None:
    """A shard that cannot exist raises with the field and value in the message."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        KVLayout(NUM_LAYERS, 4, 8, TPB, **kwargs)


def test_a_shard_is_not_split_again() -> None:
    """``shard`` takes a whole-model layout; a shard's shard is refused."""
    with pytest.raises(ValueError, match="already rank 1 of 2"):
        make_layout().shard(1, 2).shard(0, 2)


# ---- one plan on every rank --------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("gpu_kind", "host_kind"), [("block_major", "block_major"),
                                                     ("layer_major", "block_major")])
@pytest.mark.parametrize("tp_size", [2, 4])
def test_every_rank_runs_the_plan_on_its_heads(device: str, gpu_kind: str, host_kind: str,
                                               tp_size: int) -> None:
    """After one plan, rank r's shards are exactly rank r's heads of what the whole-model
    engine produced from the same start (on CUDA: one GPU holding every rank's storages)."""
    gpu, host = make_whole(gpu_kind, host_kind, device)
    shards = [(make_shard(gpu, r, tp_size), make_shard(host, r, tp_size))
              for r in range(tp_size)]
    sharded = ShardedTransferEngine([TorchTransferEngine(g, h) for g, h in shards])
    plan = TransferPlan(tuple(make_ops(seed=tp_size)))
    TorchTransferEngine(gpu, host).submit(plan)
    handle = sharded.submit(plan)
    sharded.synchronize(handle)
    torch.cuda.synchronize() if device == "cuda" else None
    assert sharded.poll(handle)
    for g, h in shards:
        assert_shard_of(g, gpu)
        assert_shard_of(h, host)
    assert [s.num_ops for s in sharded.rank_stats] == [len(plan.ops)] * tp_size
    whole_bytes = sum(s.bytes_d2h + s.bytes_h2d + s.bytes_d2d for s in sharded.rank_stats)
    assert whole_bytes == sum(op.num_tokens for op in plan.ops) * gpu.layout.bytes_per_token
    sharded.close()


def fail_onboards(batch: TransferBatch) -> None:
    """Fault injection: every host->GPU batch fails."""
    if batch.src_tier is H and batch.dst_tier is G:
        raise RuntimeError("injected onboard fault")


def test_an_op_failed_on_one_rank_fails_for_every_rank() -> None:
    """Rank 1's onboards fail, rank 0's all succeed: the manager is told every op rank 1
    did not do (the same ops a whole-model engine with that fault names), no fewer."""
    gpu, host = make_whole("block_major", "block_major", "cpu")
    engines = [TorchTransferEngine(make_shard(gpu, r, 2), make_shard(host, r, 2))
               for r in range(2)]
    engines[1].before_batch = fail_onboards
    sharded = ShardedTransferEngine(engines)
    plan = TransferPlan(tuple(make_ops(seed=7)))
    whole = TorchTransferEngine(gpu, host)
    whole.before_batch = fail_onboards
    with pytest.raises(TransferError) as expected:
        whole.submit(plan)
    with pytest.raises(TransferError, match=r"failed on rank\(s\) \[1\]") as got:
        sharded.submit(plan)
    assert got.value.failed_indices == expected.value.failed_indices
    assert 0 < len(got.value.failed_indices) < len(plan.ops)
    assert got.value.failed_ops == tuple(plan.ops[i] for i in got.value.failed_indices)
    assert engines[0].stats.num_ops == len(plan.ops)  # rank 0 did them all, in vain
    sharded.close()


def test_a_rank_whose_engine_raises_anything_fails_every_op_for_every_rank() -> None:
    """A rank's engine that raises other than TransferError (an OSError of a caller's
    engine) leaves all of that rank's ops in doubt: every op is reported failed, by the same
    TransferError every rank sees, not an exception of one rank alone (which, on ranks in
    processes of their own, would leave the others waiting in the agreement)."""
    gpu, host = make_whole("block_major", "block_major", "cpu")

    class Breaks(TorchTransferEngine):
        def submit(self, plan: TransferPlan) -> Any:
            raise OSError("the device went away")

    engines = [TorchTransferEngine(make_shard(gpu, 0, 2), make_shard(host, 0, 2)),
               Breaks(make_shard(gpu, 1, 2), make_shard(host, 1, 2))]
    sharded = ShardedTransferEngine(engines)
    plan = TransferPlan(tuple(make_ops(seed=7)))
    with pytest.raises(TransferError, match=r"failed on rank\(s\) \[1\]") as got:
        sharded.submit(plan)
    assert got.value.failed_indices == tuple(range(len(plan.ops)))
    sharded.close()


def test_union_error_is_the_union_in_plan_order() -> None:
    """Failures of several ranks join, sorted, each op once; none anywhere is no error."""
    ops = make_ops(seed=1)[:6]
    plan = TransferPlan(tuple(ops))
    assert union_error(plan, [(), ()]) is None
    error = union_error(plan, [(4, 5), (), (1, 4)])
    assert error is not None
    assert error.failed_indices == (1, 4, 5)
    assert error.failed_ops == (ops[1], ops[4], ops[5])
    assert "3 of 6 copies" in str(error) and "rank(s) [0, 2]" in str(error)


def test_sharded_engine_refuses_mismatched_ranks() -> None:
    """Engines must hold ranks 0..N-1 of N, in order, with pools of one size."""
    gpu, host = make_whole("block_major", "block_major", "cpu")
    r0, r1 = (TorchTransferEngine(make_shard(gpu, r, 2), make_shard(host, r, 2))
              for r in range(2))
    with pytest.raises(ValueError, match="engine 0 holds the shard of rank 1 of 2"):
        ShardedTransferEngine([r1, r0])
    with pytest.raises(ValueError, match="engine 0 holds the shard of rank 0 of 2, expected "
                                         "rank 0 of 3"):
        ShardedTransferEngine([r0, r1, r1])
    small = KVStorage(gpu.layout.shard(1, 2), NUM_GPU - 1)
    with pytest.raises(ValueError, match="pools of the same size"):
        ShardedTransferEngine([r0, TorchTransferEngine(small, make_shard(host, 1, 2))])


# ---- the remote tier per rank ------------------------------------------------------------


def test_namespace_fingerprints_rank_and_tp_size() -> None:
    """Every (rank, TP size) is its own namespace; without TP the fingerprint is the one
    written before tensor parallelism existed (pinned: stored keys stay valid)."""
    layout = KVLayout(2, 2, 4, 4, "float16")
    assert namespace_fingerprint("m", layout) == "7d9150873d32c76d580068a4bd136c55"
    assert namespace_fingerprint("m", layout, "tenant") == "1089ff4baf1fd153ee1392668a88fb5c"
    names = {namespace_fingerprint("m", layout)}
    names |= {namespace_fingerprint("m", layout.shard(r, n)) for n in (2,) for r in range(n)}
    four = KVLayout(2, 4, 4, 4, "float16")
    names |= {namespace_fingerprint("m", four.shard(r, 4)) for r in range(4)}
    assert len(names) == 7
    ns = RemoteNamespace("m", layout)
    assert ns.for_rank(1, 2) == RemoteNamespace("m", layout.shard(1, 2))


def test_tp2_never_reads_tp4_bytes() -> None:
    """Two deployments of one model at TP 2 and TP 4 share a backend: each rank's keys are
    its own, and a value planted under another shard's key is refused (namespace)."""
    backend: dict[str, bytes] = {}
    whole = RemoteNamespace("m", KVLayout(2, 4, 4, 4, "float16"))
    tp2 = [InMemoryRemoteStore(whole.for_rank(r, 2), backend) for r in range(2)]
    tp4 = [InMemoryRemoteStore(whole.for_rank(r, 4), backend) for r in range(4)]
    h = 0x1234
    for store in tp4:
        assert store.put_many({h: bytes(store.namespace.layout.bytes_per_block)}) == 1
    assert all(store.get_many([h]) == {} for store in tp2)
    # A TP-4 rank's value copied under the TP-2 rank's key is refused, not misread.
    planted = backend[tp4[0].namespace.key(h)]
    backend[tp2[0].namespace.key(h)] = planted
    assert tp2[0].get_many([h]) == {}
    assert tp2[0].stats.bad_payload_reasons == {"namespace": 1}
    with pytest.raises(PayloadError, match="namespace"):
        tp2[0].namespace.decode(h, planted)


def test_a_block_is_found_only_when_every_rank_found_its_shard() -> None:
    """The run of wanted blocks that every rank found, from the first; a gap ends it."""
    wanted = [10, 11, 12, 13]
    assert num_found_on_every_rank(wanted, [{10, 11, 13}, {10, 11, 12, 13}]) == 2
    assert num_found_on_every_rank(wanted, [set(wanted), set(wanted)]) == 4
    assert num_found_on_every_rank(wanted, [set(wanted), set()]) == 0
    assert num_found_on_every_rank(wanted, [{11, 12, 13}]) == 0
    assert num_found_on_every_rank([], [set()]) == 0
    with pytest.raises(ValueError, match="at least one rank"):
        num_found_on_every_rank(wanted, [])


def test_a_closed_sharded_engine_still_runs_a_plan_on_every_rank() -> None:
    """After close() (twice), a plan raised the thread pool's RuntimeError ('cannot schedule
    new futures after shutdown'; red team, sixteenth pass), which a ModelEngine reads as
    every op failed. Now the ranks run it one after another: the same shards as the whole
    model's copy."""
    gpu, host = make_whole("block_major", "block_major", "cpu")
    shards = [(make_shard(gpu, r, 2), make_shard(host, r, 2)) for r in range(2)]
    sharded = ShardedTransferEngine([TorchTransferEngine(g, h) for g, h in shards])
    sharded.close()
    sharded.close()
    plan = TransferPlan(tuple(make_ops(seed=16)))
    TorchTransferEngine(gpu, host).submit(plan)
    sharded.synchronize(sharded.submit(plan))
    for g, h in shards:
        assert_shard_of(g, gpu)
        assert_shard_of(h, host)
    assert [s.num_ops for s in sharded.rank_stats] == [len(plan.ops)] * 2
