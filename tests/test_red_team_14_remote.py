"""Red team, fourteenth pass (remote): the remote tier as an engine calls it, given a store
that fails in the background, answers with values of the wrong size or blocks, and calls
out of order (a fetch for a request aborted, a cache reset under a fetch). Each test fails
on the code before its fix and asserts the exact state after it."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="the remote tier moves real KV: needs torch")

from kvtier import CacheConfig, KVCacheManager
from kvtier.remote import FaultyRemoteStore, InMemoryRemoteStore, RemoteNamespace
from kvtier.remote.tier import RemoteTier
from kvtier.storage import KVLayout, KVStorage

TPB = 4
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, tokens_per_block=TPB)
PROMPT = list(range(10, 31))  # 5 full blocks and one token
TABLE = [0, 1, 2, 3, 4]


def make_tier(store: object) -> RemoteTier:
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=8,
                                         num_host_blocks=8, hash_algo="sha256"))
    tier = RemoteTier(store, manager, KVStorage(LAYOUT, 8), KVStorage(LAYOUT, 8),  # type: ignore[arg-type]
                      fetch_deadline_s=1.0)
    for slot in range(8):
        tier.gpu.tensors[0][slot].fill_(slot)
    return tier


def faulty_tier() -> tuple[RemoteTier, FaultyRemoteStore, dict[str, bytes]]:
    backend: dict[str, bytes] = {}
    store = FaultyRemoteStore(InMemoryRemoteStore(RemoteNamespace("m", LAYOUT), backend))
    return make_tier(store), store, backend


# ---- a background write the store lost is not remembered as held --------------------------


def test_a_background_write_the_store_lost_is_written_again() -> None:
    """Write-through hands the store the blocks and returns; the I/O thread's put then
    failed (the store down), yet the tier kept their hashes as held (``KNOWN_BLOCKS``): a
    later write of the same prompt as a reused prefix skipped them all, so they were never
    written. Now the store reports the lost write and the next write writes them."""
    tier, store, backend = faulty_tier()
    store.down = True
    assert tier.write(PROMPT, TABLE) == 5  # handed over; lost on the I/O thread
    assert tier.flush(10.0)
    assert backend == {} and store.stats.num_failed_puts == 5
    store.down = False
    assert tier.write(PROMPT, TABLE, wait=True, reused_blocks=5) == 5
    assert len(backend) == 5
    assert tier.write(PROMPT, TABLE, wait=True, reused_blocks=5) == 0  # held now: skipped


def test_a_background_write_that_succeeded_stays_remembered() -> None:
    """The success path is unchanged: a write the store took is skipped as reused."""
    tier, _, backend = faulty_tier()
    assert tier.write(PROMPT, TABLE) == 5
    assert tier.flush(10.0)
    assert len(backend) == 5
    assert tier.write(PROMPT, TABLE, wait=True, reused_blocks=5) == 0


class RaisingPut(InMemoryRemoteStore):
    """A caller's store client past the contract: its put raises its backend's error while
    ``raising``."""

    raising = True

    def put_many(self, items: object) -> int:
        if self.raising:
            raise TimeoutError("the store timed out")
        return super().put_many(items)  # type: ignore[arg-type]


def test_a_background_write_whose_put_raises_is_lost_too() -> None:
    """A subclass's ``put_many`` that raised on the I/O thread wrote nothing, yet the tier
    kept the blocks as held. Now counted as an error and reported lost: once the store
    takes writes again, a write of them as reused writes them."""
    store = RaisingPut(RemoteNamespace("m", LAYOUT))
    tier = make_tier(store)
    assert tier.write(PROMPT, TABLE) == 5
    assert tier.flush(10.0)
    assert store.stats.num_errors == 1
    store.raising = False
    assert tier.write(PROMPT, TABLE, wait=True, reused_blocks=5) == 5
    assert len(store.backend) == 5
