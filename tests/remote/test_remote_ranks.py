"""One rank's side of the remote tier (``RemoteShard``): a fetched block lands in its host
slot byte for byte, in every memory layout and dtype, from a view of the stored value."""

from __future__ import annotations

from dataclasses import replace

import pytest

torch = pytest.importorskip("torch", reason="the remote tier's storages need torch")

from kvtier.remote import InMemoryRemoteStore, RemoteNamespace  # noqa: E402
from kvtier.remote.ranks import RemoteShard  # noqa: E402
from kvtier.storage import DTYPE_BYTES, LAYOUTS, KVLayout, KVStorage  # noqa: E402
from kvtier.tier import Tier  # noqa: E402

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, tokens_per_block=4)


def make_shard(layout: KVLayout) -> RemoteShard:
    """A shard over 3 GPU slots of seeded values and 3 zeroed host slots."""
    gen = torch.Generator().manual_seed(0)
    gpu, host = KVStorage(layout, 3), KVStorage(layout, 3)
    for t in gpu.tensors:
        t.copy_(torch.randn(t.shape, generator=gen))
    host.fill_(0.0)
    return RemoteShard(InMemoryRemoteStore(RemoteNamespace("m", layout)), gpu, host)


def as_bytes(storage: KVStorage, slot: int) -> bytes:
    """The bytes of one block of ``storage``. Pure."""
    return bytes(storage.block(slot).view(torch.uint8).numpy().tobytes())


@pytest.mark.parametrize("memory_layout", LAYOUTS)
@pytest.mark.parametrize("dtype", sorted(DTYPE_BYTES))
def test_a_fetched_block_lands_in_its_host_slot_byte_for_byte(memory_layout: str,
                                                              dtype: str) -> None:
    """GPU slot 1 put, fetched and filled into host slot 2: slot 2 holds its bytes, every
    layer in place (layer-major: one copy a layer), and the other host slots are untouched."""
    shard = make_shard(replace(LAYOUT, dtype=dtype, layout=memory_layout))
    assert shard.put(Tier.GPU, [(11, 1)], wait=True) == 1
    shard.get(0, [11])
    shard.fill(0, [(11, 2)])
    assert as_bytes(shard.host, 2) == as_bytes(shard.gpu, 1)
    for layer in range(LAYOUT.num_layers):  # not merely the same bytes in another order
        assert torch.equal(shard.host.layer(layer)[2], shard.gpu.layer(layer)[1]), layer
    assert not shard.host.block(0).any() and not shard.host.block(1).any()
    assert shard.num_unfilled == 0


def test_the_found_payloads_are_views_of_the_stored_values() -> None:
    """What a fetch holds until its fill are views into the values the store returned, not
    copies of them."""
    shard = make_shard(LAYOUT)
    shard.put(Tier.GPU, [(11, 0)], wait=True)
    stored = next(iter(shard.store.backend.values()))  # type: ignore[attr-defined]
    found = shard.store.get_many([11])
    assert isinstance(found[11], memoryview) and found[11].obj is stored


def test_a_host_storage_off_the_cpu_is_refused() -> None:
    """Fetched values are copied into the host slots from CPU memory: a host storage on
    another device is refused, naming it."""
    store = InMemoryRemoteStore(RemoteNamespace("m", LAYOUT))
    with pytest.raises(ValueError, match=r"host storage must be in CPU memory.*meta"):
        RemoteShard(store, KVStorage(LAYOUT, 2), KVStorage(LAYOUT, 2, "meta"))
