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
