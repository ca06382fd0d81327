"""Red team 24b, the data plane on the CPU: a storage's ``write`` given indices and K/V that
are not this storage's (a negative block or offset, K of another shape, a mask for
offsets): each refused naming the argument, nothing written."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="the data-plane tests need torch: pip install 'kvtier[torch]'")

import torch

from kvtier.storage import KVLayout, KVStorage

TPB = 4


def ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


@pytest.mark.parametrize("kind", ["block_major", "layer_major"])
@pytest.mark.parametrize(("args", "message"), [
    # -1 was the last block (block 2 overwritten with this token's KV, silently)
    ((ids(-1, 0), ids(0, 1), (2, 2, 4), (2, 2, 4)), r"block_ids must hold ints in 0\.\.2, got -1"),
    # -1 was the last token of block 0
    ((ids(0, 0), ids(0, -1), (2, 2, 4), (2, 2, 4)), r"offsets must hold ints in 0\.\.3, got -1"),
    ((ids(0, 3), ids(0, 1), (2, 2, 4), (2, 2, 4)), r"block_ids must hold ints in 0\.\.2, got 3"),
    # K and V of [n, head_dim] were broadcast over both heads: one head's KV in both
    ((ids(0, 1), ids(0, 1), (2, 4), (2, 4)),
     r"k must be a tensor of shape \[2, 2, 4\] \(tokens, this storage's KV heads, head_dim\), "
     r"got a tensor of shape \[2, 4\] and dtype torch.float32"),
    # K written, then V's shape refused by torch (RuntimeError): block 0 half written
    ((ids(0), ids(0), (1, 2, 4), (1, 3, 4)),
     r"v must be a tensor of shape \[1, 2, 4\] .*, got a tensor of shape \[1, 3, 4\]"),
    ((ids(0, 1), ids(0), (2, 2, 4), (2, 2, 4)),
     r"offsets must hold one offset per block id \(2\), got 1"),
])
def test_a_write_that_is_not_this_storages_is_refused_writing_nothing(
        kind: str, args: tuple[torch.Tensor, torch.Tensor, tuple[int, ...], tuple[int, ...]],
        message: str) -> None:
    """A storage of 3 blocks, 2 KV heads of 4: every write above was taken by torch's
    indexing (or half done before torch raised). Now ValueError naming the argument and
    value, and every block as it was."""
    storage = KVStorage(KVLayout(2, 2, 4, TPB, "float32", kind), 3)
    storage.fill_(0.0)
    block_ids, offsets, k_shape, v_shape = args
    with pytest.raises(ValueError, match=message):
        storage.write(1, block_ids, offsets, torch.ones(k_shape), torch.ones(v_shape))
    assert all(not bool(t.any()) for t in storage.tensors)


@pytest.mark.parametrize(("block_ids", "offsets", "shown"), [
    (ids(0, 1), torch.tensor([True, False]), r"offsets .* dtype torch\.bool"),  # a mask
    (torch.tensor([0.0, 1.0]), ids(0, 1), r"block_ids .* dtype torch\.float32"),
    ([0, 1], ids(0, 1), r"block_ids must be a 1-D tensor of int64 or int32, got \[0, 1\]"),
    (ids(0, 1).view(2, 1), ids(0, 1), r"block_ids .* shape \[2, 1\]"),
])
def test_indices_that_are_no_1d_int_tensor_are_refused(block_ids: object, offsets: object,
                                                       shown: str) -> None:
    """A bool tensor of offsets was read as a mask (the tokens at True positions of the
    first axis); a float or 2-D index, torch's own error. Now ValueError, nothing written."""
    storage = KVStorage(KVLayout(1, 2, 4, TPB), 3)
    storage.fill_(0.0)
    k = torch.ones(2, 2, 4)
    with pytest.raises(ValueError, match=shown):
        storage.write(0, block_ids, offsets, k, k)  # type: ignore[arg-type]
    assert not bool(storage.tensors[0].any())


def test_a_valid_write_lands_where_its_pairs_say() -> None:
    """Unchanged for valid writes: tokens at (block, offset) pairs, int32 indices too."""
    storage = KVStorage(KVLayout(1, 2, 4, TPB, "float16", "layer_major"), 3)
    storage.fill_(0.0)
    k = torch.arange(2 * 2 * 4, dtype=torch.float32).view(2, 2, 4)
    storage.write(0, torch.tensor([2, 0], dtype=torch.int32), ids(3, 1), k, -k)
    view = storage.layer(0)
    assert torch.equal(view[2, 0, 3], k[0].half()) and torch.equal(view[0, 1, 1], -k[1].half())
    assert float(view.abs().sum()) == 2 * float(k.abs().sum())


@pytest.mark.parametrize(("block_ids", "message"), [
    (ids(0, -1), r"block_ids must hold ints in 0\.\.2, got -1"),  # torch's IndexError
    (ids(3), r"block_ids must hold ints in 0\.\.2, got 3"),
    (torch.tensor([True, False]), r"block_ids must be a 1-D tensor of int64 or int32, got a "
                                  r"tensor of shape \[2\] and dtype torch\.bool"),
])
def test_a_gather_of_blocks_that_are_not_the_storages_is_refused(block_ids: torch.Tensor,
                                                                 message: str) -> None:
    """``gather`` read a block table of -1 or 3 (of 3 blocks) into torch's IndexError, a bool
    one into a RuntimeError of ``index_select``: now ValueError naming ``block_ids``, as
    ``write`` does."""
    storage = KVStorage(KVLayout(1, 2, 4, TPB), 3)
    with pytest.raises(ValueError, match=message):
        storage.gather(0, block_ids, 4)


# ---- a transfer engine's tuning options ------------------------------------------------------


@pytest.mark.parametrize(("option", "value", "message"), [
    ("min_dma_copy_bytes", None, r"min_dma_copy_bytes must be an int >= 0, got None"),
    ("min_dma_copy_bytes", "1", r"min_dma_copy_bytes must be an int >= 0, got '1'"),
    ("min_dma_copy_bytes", -1, r"min_dma_copy_bytes must be an int >= 0, got -1"),
    ("min_batch_copy_bytes", 2.5, r"min_batch_copy_bytes must be an int >= 0, got 2\.5"),
    ("gather_streams", 0, r"gather_streams must be an int >= 1, got 0"),
    ("staging_bytes", True, r"staging_bytes must be an int >= 1, got True"),
    ("layerwise", "no", r"layerwise must be a bool, got 'no'"),
    ("submit_threads", 1, r"submit_threads must be a bool, got 1"),
    ("gather_cost", (1, 2), r"gather_cost must be a GatherCost, got \(1, 2\)"),
    ("heap_pad_bytes", 1.5, r"heap_pad_bytes must be >= 0 or None, got 1\.5 \(an int of bytes\)"),
])
def test_a_transfer_engines_bad_option_is_refused_when_made(option: str, value: object,
                                                            message: str) -> None:
    """A layer-major pair of storages on the CPU: ``min_dma_copy_bytes=None`` (or "1") was
    taken, and every plan then failed inside its batches' copies ("'<=' not supported"), a
    TransferError of every op: an engine degrading every step to recompute, never reusing
    a block, for a typo; ``layerwise="no"`` ran layer by layer. Now ValueError naming the
    option when the engine is made."""
    from kvtier.transfer.torch_engine import TorchTransferEngine

    layout = KVLayout(1, 1, 2, 2, "float32", "layer_major")
    gpu, host = KVStorage(layout, 4), KVStorage(layout, 4)
    with pytest.raises(ValueError, match=message):
        TorchTransferEngine(gpu, host, **{option: value})  # type: ignore[arg-type]


def test_a_transfer_engines_options_set_later_are_checked_and_seen() -> None:
    """Set after construction, ``min_dma_copy_bytes`` was never seen by the wave path (it
    kept its own copy: a run of slots still copied by gather/scatter), and a bad value was
    taken. Now each option is checked when set, and the wave path copies with it."""
    from kvtier.tier import Tier
    from kvtier.transfer.plan import OpKind, TransferOp, TransferPlan
    from kvtier.transfer.torch_engine import TorchTransferEngine

    layout = KVLayout(1, 1, 2, 2, "float32", "layer_major")
    gpu, host = KVStorage(layout, 4), KVStorage(layout, 4)
    engine = TorchTransferEngine(gpu, host)
    plan = TransferPlan([TransferOp(OpKind.OFFLOAD, Tier.GPU, i, Tier.HOST, i, 2)
                         for i in range(3)])
    engine.submit(plan)
    assert (engine.stats.num_dma_copies, engine.stats.num_kernel_groups) == (0, 1)
    engine.min_dma_copy_bytes = 0  # every run of slots one DMA
    engine.submit(plan)
    assert (engine.stats.num_dma_copies, engine.stats.num_kernel_groups) == (1, 1)
    for option, value in (("min_dma_copy_bytes", None), ("min_batch_copy_bytes", -1),
                          ("layerwise", "no")):
        with pytest.raises(ValueError, match=rf"{option} must be"):
            setattr(engine, option, value)
    assert (engine.min_dma_copy_bytes, engine.layerwise) == (0, True)


@pytest.mark.parametrize("bad", ["x", None, [1]])
def test_a_sharded_engine_refuses_what_is_no_plan(bad: object) -> None:
    """``ShardedTransferEngine.submit`` of what is no TransferPlan: each rank's engine
    refused it (TypeError), ``_submit`` took that for a fault of the engine and built its
    report of every op failed from ``plan.ops``: AttributeError ("'str' object has no
    attribute 'ops'"). Now TypeError naming the type, as a rank's engine says."""
    from kvtier.transfer.torch_engine import TorchTransferEngine
    from kvtier.transfer.tp_engine import ShardedTransferEngine

    whole = KVLayout(1, 2, 2, 2)
    engines = [TorchTransferEngine(KVStorage(whole.shard(r, 2), 4),
                                   KVStorage(whole.shard(r, 2), 4)) for r in range(2)]
    sharded = ShardedTransferEngine(engines)
    try:
        with pytest.raises(TypeError, match=rf"plan must be a TransferPlan, got "
                                            rf"{type(bad).__name__}"):
            sharded.submit(bad)  # type: ignore[arg-type]
        assert [e.stats.num_plans for e in engines] == [0, 0]
    finally:
        sharded.close()
