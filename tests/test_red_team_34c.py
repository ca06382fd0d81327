"""Red team 34c: the integer rule's last holdouts (``kvtier.counts``).

The storage's layout and sizes, the vLLM integration's counts and ids, and the remote
tier's fetches take an integer of any kind (NumPy, a caller's ``__index__`` class) as the
plain int it is, and refuse a bool or a float naming the field, as every other entry does.
"""

from __future__ import annotations

import numpy as np
import pytest

from integer_kinds import Index, integer_kinds
from kvtier.storage import KVLayout

LAYOUT_FIELDS = ("num_layers", "num_kv_heads", "head_dim", "tokens_per_block")


# ---- storage ---------------------------------------------------------------------------------


@pytest.mark.parametrize("field", [*LAYOUT_FIELDS, "tp_size", "tp_rank"])
@pytest.mark.parametrize("kind", range(4))
def test_layout_takes_any_integer_as_the_plain_int(field: str, kind: int) -> None:
    """KVLayout(tokens_per_block=np.int64(4)) was refused ('must be an integer >= 1'): now
    every field holds the plain int, and the layout equals (and hashes as) the int one."""
    plain = {"num_layers": 2, "num_kv_heads": 4, "head_dim": 8, "tokens_per_block": 4,
             "tp_size": 2, "tp_rank": 1}
    given = dict(plain, **{field: integer_kinds(plain[field])[kind]})
    layout = KVLayout(**given)  # type: ignore[arg-type]
    assert type(getattr(layout, field)) is int
    assert layout == KVLayout(**plain)  # type: ignore[arg-type]
    assert hash(layout) == hash(KVLayout(**plain))  # type: ignore[arg-type]


@pytest.mark.parametrize("field", [*LAYOUT_FIELDS, "tp_size", "tp_rank"])
@pytest.mark.parametrize("value", [True, 4.0, "4"])
def test_layout_refuses_bools_floats_and_strs_naming_the_field(field: str,
                                                                value: object) -> None:
    """A bool, a float (even 4.0) or a str is no integer: ValueError naming the field."""
    given: dict[str, object] = {"num_layers": 2, "num_kv_heads": 4, "head_dim": 8,
                                "tokens_per_block": 4, "tp_size": 2, "tp_rank": 1}
    given[field] = value
    with pytest.raises(ValueError, match=rf"^{field} must be an integer"):
        KVLayout(**given)  # type: ignore[arg-type]


def test_layout_bytes_and_storage_sizes_take_any_integer() -> None:
    """num_blocks_for_bytes(np.int64(...)) and KVStorage(layout, np.int64(n)) were refused;
    a storage's layer, slot and gather's num_tokens likewise: now read as plain ints."""
    torch = pytest.importorskip("torch")
    from kvtier.storage import KVStorage

    layout = KVLayout(2, 1, 4, 4)
    assert layout.num_blocks_for_bytes(np.int64(10 * layout.bytes_per_block)) == 10
    storage = KVStorage(layout, np.int64(3))
    assert type(storage.num_blocks) is int and storage.num_blocks == 3
    assert storage.nbytes == 3 * layout.bytes_per_block
    storage.fill_(0.0)
    storage.layer(Index(1))[2] = 1.0  # type: ignore[arg-type]
    assert storage.block(np.int32(2))[1].eq(1.0).all()
    k, _ = storage.gather(np.uint8(1), torch.tensor([2]), np.int64(3))
    assert k.shape[0] == 3 and k.eq(1.0).all()
    for call in (lambda: storage.layer(True), lambda: storage.block(1.0),  # type: ignore[arg-type]
                 lambda: storage.gather(0, torch.tensor([2]), True),
                 lambda: KVStorage(layout, 2.0),  # type: ignore[arg-type]
                 lambda: layout.num_blocks_for_bytes(True)):
        with pytest.raises(ValueError, match="must be an int"):
            call()


# ---- remote fetches ----------------------------------------------------------------------------


class OnceIndex:
    """A caller's integer that may be read once: a second ``__index__`` raises."""

    def __init__(self, value: int) -> None:
        self.value, self.reads = value, 0

    def __index__(self) -> int:
        self.reads += 1
        if self.reads > 1:
            raise RuntimeError("read twice")
        return self.value


@pytest.mark.parametrize("how", ["fetch", "start_fetch"])
def test_a_fetch_reads_its_salt_once_and_keeps_the_plain_key(how: str) -> None:
    """The remote tier kept the caller's salt object in the fetch and read it again for the
    local lookup and the import (a salt read anew each time: another value, or an error,
    named other blocks). Now the plain key, read once, names the fetch: the blocks written
    under salt 5 are imported for a NumPy or one-shot salt 5 as for the int."""
    pytest.importorskip("torch")
    from kvtier import CacheConfig, KVCacheManager
    from kvtier.remote import InMemoryRemoteStore, RemoteNamespace
    from kvtier.remote.tier import RemoteTier
    from kvtier.storage import KVStorage

    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, tokens_per_block=4)
    store = InMemoryRemoteStore(RemoteNamespace("m", layout))
    prompt = list(range(10, 23))  # three full blocks and one token

    def tier() -> RemoteTier:
        manager = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8,
                                             num_host_blocks=8, hash_algo="sha256"))
        return RemoteTier(store, manager, KVStorage(layout, 8), KVStorage(layout, 8),
                          fetch_deadline_s=5.0)

    writer = tier()
    writer.write(prompt, [0, 1, 2], salt=5)
    writer.flush(10.0)
    for salt in (np.int64(5), OnceIndex(5), 5):
        reader = tier()
        if how == "fetch":
            assert reader.fetch(prompt, salt=salt) == 3  # type: ignore[arg-type]
        else:
            assert reader.start_fetch("r", prompt, salt=salt)  # type: ignore[arg-type]
            reader.wait(10.0)
            assert reader.poll_imports().imported == {"r": 3}
        assert reader.manager.lookup(prompt, salt=5).num_host_tokens == 12
    store.close()
