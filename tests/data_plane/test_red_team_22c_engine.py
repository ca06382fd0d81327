"""Red team 22c, the data plane on the CPU: hand-built plans whose ops hold what is no
slot, tier or token count, the GPU paths' array check of tiers, and a storage's layer
index; the model's token ids and block tables."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="the data-plane tests need torch: pip install 'kvtier[torch]'")

import torch

from kvtier.model.config import ModelConfig
from kvtier.model.llama import LlamaModel
from kvtier.storage import KVLayout, KVStorage
from kvtier.tier import Tier
from kvtier.transfer.fused import arrays_of, check_arrays
from kvtier.transfer.plan import OpKind, TransferOp, TransferPlan
from kvtier.transfer.torch_engine import TorchTransferEngine

TPB = 4
G, H = Tier.GPU, Tier.HOST
OFF = OpKind.OFFLOAD


def engine() -> TorchTransferEngine:
    """A CPU engine of 4 GPU and 4 host blocks, every block numbered by its contents."""
    layout = KVLayout(2, 1, 4, TPB, "float32", "block_major")
    gpu, host = KVStorage(layout, 4), KVStorage(layout, 4)
    for storage, base in ((gpu, 0.0), (host, 100.0)):
        for slot in range(4):
            storage.tensors[0][slot] = base + slot
    return TorchTransferEngine(gpu, host)


def contents(e: TorchTransferEngine) -> list[float]:
    """Each block's number, GPU blocks then host blocks."""
    assert e.host is not None
    return [float(s.tensors[0][slot].mean()) for s in (e.gpu, e.host) for slot in range(4)]


def op_of(*fields: object) -> TransferOp:
    """An op with any fields, as a caller may build one."""
    return TransferOp._make(fields)


UNTOUCHED = [0.0, 1.0, 2.0, 3.0, 100.0, 101.0, 102.0, 103.0]


@pytest.mark.parametrize(("op", "shown"), [
    # A float slot was truncated by the index tensor: block 1 copied, no word said.
    (op_of(OFF, G, 1.5, H, 0, TPB), r"op 1: src_slot must be an int, got 1\.5"),
    (op_of(OFF, G, 1, H, 2.0, TPB), r"op 1: dst_slot must be an int, got 2\.0"),
    (op_of(OFF, G, True, H, 0, TPB), r"op 1: src_slot must be an int, got True"),
    (op_of(OFF, G, np.int64(1), H, 0, TPB),
     r"op 1: src_slot must be an int, got np\.int64\(1\)"),
    # A float or bool token count failed in torch's narrow: a TransferError, as a copy
    # that failed, where the plan was at fault.
    (op_of(OFF, G, 1, H, 0, 2.5), r"op 1: num_tokens must be an int, got 2\.5"),
    (op_of(OFF, G, 1, H, 0, True), r"op 1: num_tokens must be an int, got True"),
    # A tier that is none was an AttributeError ('int' object has no attribute 'name').
    (op_of(OFF, 2, 1, H, 0, TPB), r"op 1: src_tier must be a Tier, got 2"),
    (op_of(OFF, G, 1, -1, 0, TPB), r"op 1: dst_tier must be a Tier, got -1"),
    # A str slot failed in the wave planner: "can only concatenate str (not "Tier") to str".
    (op_of(OFF, G, "1", H, 0, TPB), r"op 1: src_slot must be an int, got '1'"),
    (op_of(OFF, G, None, H, 0, TPB), r"op 1: src_slot must be an int, got None"),
    # Three fields: "not enough values to unpack (expected 6, got 3)".
    ((OFF, G, 1), r"op 1 must be a TransferOp, got \(<OpKind"),
])
def test_an_op_that_is_no_copy_is_refused_copying_nothing(op: object, shown: str) -> None:
    """A plan built by hand with a slot, tier or token count that is none is refused with
    ValueError naming the op and its field, and no block of either tier changes (not even
    the good op before it)."""
    e = engine()
    plan = TransferPlan([TransferOp(OFF, G, 3, H, 3, TPB), op])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=shown):
        e.submit(plan)
    assert contents(e) == UNTOUCHED


def test_an_op_of_plain_ints_and_tuples_still_copies() -> None:
    """Tiers given as the ints 0 and 1, and an op given as a plain 6-tuple, are what they
    say (their slots copied), as before."""
    e = engine()
    e.submit(TransferPlan([op_of(OFF, 0, 1, 1, 0, TPB),
                           (OFF, G, 2, H, 3, TPB)]))  # type: ignore[list-item]
    assert contents(e) == [0.0, 1.0, 2.0, 3.0, 1.0, 101.0, 102.0, 2.0]


def test_a_failed_batch_of_int_tiers_is_a_transfer_error_naming_its_direction() -> None:
    """A copy that fails in a batch whose tiers came as plain ints is a TransferError
    naming its direction (the message read ``.name`` off the int: AttributeError)."""
    from kvtier.transfer.engine import TransferError

    e = engine()

    def fail(batch: object) -> None:
        raise RuntimeError("copy engine down")

    e.before_batch = fail
    with pytest.raises(TransferError, match=r"1 of 1 copies not done: a GPU->HOST batch"):
        e.submit(TransferPlan([op_of(OFF, 0, 1, 1, 0, TPB)]))


@pytest.mark.parametrize(("tier", "field"), [(2, "src_tier"), (-1, "src_tier")])
def test_the_gpu_paths_array_check_refuses_a_tier_that_is_none(tier: int, field: str) -> None:
    """``check_arrays`` (the fused, batched and staging paths' check) passed an op of tier
    2 or -1: on neither tier's test, it was copied as the kernels read the number (a slot
    key ``2 * slot + tier`` of another tier's block). Now ValueError naming the op."""
    plan = TransferPlan([TransferOp(OFF, G, 0, H, 0, TPB),
                         op_of(OFF, tier, 1, H, 1, TPB)])
    with pytest.raises(ValueError, match=rf"op 1: {field} must be a Tier, got {tier}"):
        check_arrays(arrays_of(plan), plan, {G: 4, H: 4}, TPB)


@pytest.mark.parametrize("kind", ["block_major", "layer_major"])
@pytest.mark.parametrize("index", [-1, 2, True, 1.0])
def test_a_layer_that_is_none_is_refused(kind: str, index: object) -> None:
    """``storage.layer(-1)`` was the last layer and (block-major) ``layer(True)`` a view
    with one more axis that ``write`` broadcast into; past the last layer, torch's
    IndexError. Now ValueError naming the index, as ``block`` does for a slot."""
    storage = KVStorage(KVLayout(2, 1, 4, TPB, "float32", kind), 3)
    storage.fill_(0.0)
    k = torch.ones(1, 1, 4)
    with pytest.raises(ValueError, match=r"layer must be an int in 0\.\.1, got"):
        storage.write(index, torch.tensor([0]), torch.tensor([0]), k, k)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"layer must be an int in 0\.\.1, got"):
        storage.layer(index)  # type: ignore[arg-type]
    assert all(not bool(t.any()) for t in storage.tensors)


def tiny_model() -> tuple[LlamaModel, KVStorage]:
    """The seeded tiny model and a zeroed pool of 4 blocks of its layout."""
    model = LlamaModel(ModelConfig(), "cpu")
    c = model.config
    kv = KVStorage(KVLayout(c.num_layers, c.num_kv_heads, c.head_dim, TPB), 4)
    kv.fill_(0.0)
    return model, kv


@pytest.mark.parametrize(("tokens", "shown"), [
    ([-1, 2], r"tokens\[0\] is -1, not an int in 0\.\.255"),  # was the last token's row
    ([1.7, 2], r"tokens\[0\] is 1\.7, not an int in 0\.\.255"),  # was token 1
    ([True, 2], r"tokens\[0\] is True, not an int in 0\.\.255"),
    ([3, 256], r"tokens\[1\] is 256, not an int in 0\.\.255"),  # an IndexError (CUDA: assert)
])
def test_a_token_that_is_no_id_of_the_vocabulary_is_refused(tokens: list[object],
                                                            shown: str) -> None:
    """``full_recompute`` and ``forward_chunk`` embedded token -1 as the vocabulary's last
    and 1.7 as 1, silently; now ValueError naming the token, and the pool is untouched."""
    model, kv = tiny_model()
    with pytest.raises(ValueError, match=shown):
        model.full_recompute(tokens)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=shown):
        model.forward_chunk(kv, [0], tokens, 0)  # type: ignore[arg-type]
    assert not any(bool(t.any()) for t in kv.tensors)


@pytest.mark.parametrize(("table", "shown"), [
    ([-4, 1], r"block_table\[0\] is -4, not an int in 0\.\.3"),  # block 0 written, then IndexError
    ([0, 9], r"block_table\[1\] is 9, not an int in 0\.\.3"),
    ([0.5, 1], r"block_table\[0\] is 0\.5, not an int in 0\.\.3"),  # was block 0, silently
])
def test_a_block_table_naming_no_block_of_the_pool_is_refused(table: list[object],
                                                              shown: str) -> None:
    """``forward_chunk`` with a block id of -4 wrote the chunk's K/V into block 0 before
    the gather raised IndexError, and took 0.5 as block 0; now ValueError naming the entry
    before anything is written. Entries past the chunk's end are not read, nor checked."""
    model, kv = tiny_model()
    with pytest.raises(ValueError, match=shown):
        model.forward_chunk(kv, table, [5, 6, 7, 8, 9], 0)  # type: ignore[arg-type]
    assert not any(bool(t.any()) for t in kv.tensors)
    with pytest.raises(ValueError, match=r"start_pos must be an int, got 1\.0"):
        model.forward_chunk(kv, [0, 1], [5], 1.0)  # type: ignore[arg-type]
    assert model.forward_chunk(kv, [2, 9], [5, 6], 0).shape == (2, 256)


@pytest.mark.parametrize("call", ["poll", "synchronize"])
def test_an_engine_refuses_what_is_no_handle_of_its_own(call: str) -> None:
    """``poll('x')`` and ``synchronize('x')`` raised AttributeError ('event') from inside
    (``wait`` checked already): now TypeError naming what came."""
    with pytest.raises(TypeError, match=r"handle must be a TransferHandle, got str"):
        getattr(engine(), call)("x")


@pytest.mark.parametrize("call", ["wait", "poll", "synchronize"])
def test_a_sharded_engine_refuses_a_handle_of_other_ranks(call: str) -> None:
    """A ShardedTransferEngine's ``wait``, ``poll`` and ``synchronize`` given a rank's own
    TransferHandle raised AttributeError ('handles'), and a handle of an engine of one rank
    zip's ValueError ('argument 2 is shorter than argument 1'): now TypeError and
    ValueError naming them."""
    from kvtier.transfer.tp_engine import ShardedTransferEngine

    layout = KVLayout(1, 2, 4, TPB, "float32", "block_major")
    engines = [TorchTransferEngine(KVStorage(layout.shard(r, 2), 2),
                                   KVStorage(layout.shard(r, 2), 2)) for r in range(2)]
    sharded = ShardedTransferEngine(engines)
    one = ShardedTransferEngine([TorchTransferEngine(KVStorage(layout, 2), KVStorage(layout, 2))])
    try:
        plan = TransferPlan([TransferOp(OFF, G, 0, H, 1, TPB)])
        handle = one.submit(plan)
        with pytest.raises(ValueError, match=r"handle holds 1 ranks' handles, this engine 2 "
                                             r"ranks"):
            getattr(sharded, call)(handle)
        with pytest.raises(TypeError, match=r"handle must be a ShardedHandle, got "
                                            r"TransferHandle"):
            getattr(sharded, call)(handle.handles[0])
        assert sharded.poll(sharded.submit(plan))
    finally:
        sharded.close()
        one.close()


@pytest.mark.parametrize("num_tokens", [-3, 9, 2.5, True])
def test_a_gather_of_more_or_fewer_tokens_than_its_blocks_hold_is_refused(
        num_tokens: object) -> None:
    """``storage.gather(layer, two blocks, -3)`` gave all but the last 3 tokens and 9
    the 8 the blocks hold, without a word (2.5: slicing's TypeError); now ValueError naming
    the count and what the blocks hold. The 8 they hold still come."""
    storage = KVStorage(KVLayout(1, 1, 4, TPB), 3)
    storage.fill_(1.0)
    blocks = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"num_tokens must be an int in 0\.\.8 \(the tokens "
                                         r"of 2 blocks\), got"):
        storage.gather(0, blocks, num_tokens)  # type: ignore[arg-type]
    k, v = storage.gather(0, blocks, 8)
    assert k.shape == v.shape == (8, 1, 4)


@pytest.mark.parametrize(("tiers", "shown"), [
    ((2, 0), r"op 1: src_tier must be a Tier, got 2"),  # flags 2: an offload's
    ((-1, 1), r"op 1: src_tier must be a Tier, got -1"),  # flags 1: an onboard's
    ((3, -1), r"op 1: src_tier must be a Tier, got 3"),  # flags 1 too
])
def test_the_staging_paths_short_check_refuses_tiers_that_are_none(
        tiers: tuple[int, int], shown: str) -> None:
    """The staging path (``dma_gather``) took a plan of whole offloads and onboards, told
    by their flags ``src_tier + 2 * dst_tier``, with a check of their slots only: an op of
    tiers (2, 0) has an offload's flags, (-1, 1) an onboard's, and each was staged and
    copied as one. Now the tiers decide what is staged, and the op is refused by name."""
    from data_plane.test_dma_gather import NUM_BLOCKS, make_copier

    _, copier = make_copier("block_major", capacity=4)
    src_tier, dst_tier = tiers
    plan = TransferPlan([TransferOp(OFF, G, 0, H, 0, TPB),
                         op_of(OFF, src_tier, 1, dst_tier, 3, TPB)])
    with pytest.raises(ValueError, match=shown):
        copier.prepare(plan, NUM_BLOCKS)


def test_a_plan_the_engine_refused_is_not_recorded_as_run() -> None:
    """A manager's plan refused for a slot outside the engine's pools (nothing copied) was
    recorded as run all the same: submitted again it was refused as "submitted to this
    engine already", and its manager's older plan, never submitted, as older than it. Now
    the refusal records nothing: the same refusal again, and the older plan runs."""
    from kvtier import CacheConfig, KVCacheManager, SequenceSpec

    layout = KVLayout(2, 2, 8, TPB, "float32", "block_major")
    e = TorchTransferEngine(KVStorage(layout, 4), KVStorage(layout, 4))
    mgr = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=4,
                                     num_host_blocks=8, eviction_policy="lru",
                                     offload_min_priority=0))
    plans = []
    for rid, start in (("x", 0), ("y", 1000), ("z", 2000)):
        mgr.add_sequence(SequenceSpec(rid, list(range(start, start + 13))))
        mgr.remove_sequence(rid)
        if rid != "x":
            plans.append(mgr.take_plan())
    older, newer = plans
    assert [op.dst_slot for op in older.ops] == [0, 1, 2]
    assert [op.dst_slot for op in newer.ops] == [3, 4, 5]  # 4 and 5: past the engine's 4
    for _ in range(2):
        with pytest.raises(ValueError, match=r"op 1 .*slot 4 outside the 4 HOST blocks"):
            e.submit(newer)
    e.submit(older)
    with pytest.raises(ValueError, match=r"submitted to this engine already"):
        e.submit(older)
