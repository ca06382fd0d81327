"""KVLayout validation and sizes; KVStorage shapes, layer views, write and gather."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the data-plane tests need torch: "
                                            "pip install 'kvtier[torch]'")

from kvtier.storage import KVLayout, KVStorage, num_gpu_blocks, num_host_blocks  # noqa: E402


def make_layout(layout: str = "block_major", dtype: str = "bfloat16") -> KVLayout:
    """Llama-3-8B's KV shape with 32-token blocks."""
    return KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, tokens_per_block=32,
                    dtype=dtype, layout=layout)


def test_layout_errors_name_the_field() -> None:
    """Invalid layout fields raise ValueError naming field and value."""
    with pytest.raises(ValueError, match="num_layers must be an integer >= 1, got 0"):
        KVLayout(0, 8, 128, 32)
    with pytest.raises(ValueError, match="dtype must be one of"):
        KVLayout(1, 8, 128, 32, dtype="int4")
    with pytest.raises(ValueError, match="layout must be one of"):
        KVLayout(1, 8, 128, 32, layout="token_major")


def test_sizes_from_bytes() -> None:
    """Llama-3-8B bf16: 128 KiB a token, 4 MiB a 32-token block; budgets round down."""
    layout = make_layout()
    assert layout.bytes_per_token == 128 * 1024
    assert layout.bytes_per_block == 4 * 1024 * 1024
    assert layout.num_blocks_for_bytes(10 * 1024 * 1024) == 2
    assert num_host_blocks(layout, 64 << 30) == 16384
    assert num_gpu_blocks(layout, gpu_cache_bytes=(8 << 20) - 1) == 1
    with pytest.raises(ValueError, match="exactly one of gpu_cache_bytes and free_memory_fraction"):
        num_gpu_blocks(layout)
    with pytest.raises(ValueError, match=r"free_memory_fraction must be in \(0, 1\], got 1.5"):
        num_gpu_blocks(layout, free_memory_fraction=1.5)


@pytest.mark.parametrize("kind", ["block_major", "layer_major"])
def test_shapes_and_layer_views(kind: str) -> None:
    """Block-major is one tensor, layer-major one per layer; layer views agree on shape."""
    layout = KVLayout(3, 2, 8, 4, "float32", kind)
    storage = KVStorage(layout, 5)
    expected = [(5, 3, 2, 4, 2, 8)] if kind == "block_major" else [(5, 2, 4, 2, 8)] * 3
    assert [tuple(t.shape) for t in storage.tensors] == expected
    assert all(tuple(storage.layer(i).shape) == (5, 2, 4, 2, 8) for i in range(3))
    assert storage.nbytes == 5 * layout.bytes_per_block
    assert storage.pinned == torch.cuda.is_available()


@pytest.mark.parametrize("kind", ["block_major", "layer_major"])
def test_write_then_gather_through_a_block_table(kind: str) -> None:
    """Tokens written at (block, offset) come back in block-table order, other layers
    untouched."""
    storage = KVStorage(KVLayout(2, 2, 8, 4, "float32", kind), 6)
    storage.fill_(float("nan"))
    table = torch.tensor([4, 1, 3])  # positions 0..3 in block 4, 4..7 in 1, 8..11 in 3
    positions = torch.arange(10)
    k, v = torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    storage.write(1, table[positions // 4], positions % 4, k, v)
    got_k, got_v = storage.gather(1, table, 10)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    assert storage.layer(0).isnan().all()
    assert storage.block(3)[1, :, 2:].isnan().all()  # positions 10, 11: never written
