"""Red team 25b, the remote tier's answers from a store: what a caller's store client
answers past the contract is a miss or a failure, never the caller's exception."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("torch", reason="the remote tier tests move real KV: needs torch")

from answering_store import AnsweringStore
from kvtier import CacheConfig, KVCacheManager
from kvtier.remote import InMemoryRemoteStore, RemoteNamespace
from kvtier.remote.tier import RemoteTier
from kvtier.storage import KVLayout, KVStorage

TPB = 4
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, tokens_per_block=TPB)


def make_tier(store: InMemoryRemoteStore) -> RemoteTier:
    """A tier over ``store`` with a fresh manager of 8 GPU and 8 host blocks."""
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=8,
                                         num_host_blocks=8, hash_algo="sha256"))
    return RemoteTier(store, manager, KVStorage(LAYOUT, 8), KVStorage(LAYOUT, 8))


@pytest.mark.parametrize("answer", [None, "yes", 1, ConnectionError("gone")])
def test_a_flush_answered_past_the_contract_is_not_flushed(answer: object) -> None:
    """A store whose flush raised (a client's ConnectionError) ended ``RemoteTier.flush``
    with it (the engine's ``run`` after every request had finished); one that answered
    "yes" or 1 was taken as flushed. Now anything but a bool, or a raise, is False."""
    store = AnsweringStore(RemoteNamespace("m", LAYOUT))
    store.answer = answer
    tier = make_tier(store)
    assert tier.flush(1.0) is False
    assert tier.flush(None) is False
    store.answer = True
    assert tier.flush(1.0) is True


class GarbageBackend(InMemoryRemoteStore):
    """A backend whose per-item answers to writes and existence checks are ``answer``."""

    answer: object = "no"

    def write_values(self, pairs: list[tuple[str, bytes]]) -> list[bool]:
        return [self.answer] * len(pairs)  # type: ignore[list-item]

    def has_keys(self, keys: list[str]) -> list[bool]:
        return [self.answer] * len(keys)  # type: ignore[list-item]


@pytest.mark.parametrize("answer", ["no", 1, b"OK", None, 0])
def test_per_item_answers_that_are_no_bool_count_as_no(answer: object) -> None:
    """A backend answering a write's items with "no" (or 1, b"OK") had them counted
    written (``bool(ok)``): ``put_many`` said 2 of 2, the stats ``num_puts`` 2, a tier
    remembered the blocks as held and skipped them in later writes; ``contains_many`` said
    a key answered "no" was there. Now only True is yes: 0 written, 2 failed, none held."""
    store = GarbageBackend(RemoteNamespace("m", LAYOUT))
    store.answer = answer
    payload = bytes(LAYOUT.bytes_per_block)
    assert store.put_many({1: payload, 2: payload}) == 0
    stats = store.stats
    assert (stats.num_puts, stats.num_failed_puts, stats.bytes_written) == (0, 2, 0)
    assert store.contains_many([1, 2]) == set()
    store.answer = True
    assert store.put_many({1: payload}) == 1 and store.contains_many([1, 2]) == {1, 2}


class GatedStore(InMemoryRemoteStore):
    """A store whose lookups on the I/O thread wait for ``gate`` (at most 10 s)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gate = threading.Event()

    def read_values(self, keys: list[str]) -> list[bytes | None]:
        self.gate.wait(10)
        return super().read_values(keys)


def test_a_wait_ends_at_the_held_requests_deadline() -> None:
    """A request held for a fetch that hangs, its deadline 1 s; the engine fell idle 0.7 s
    into it and waited (``wait(fetch_deadline_s)``) a whole second more: the request was
    released after 1.7 s, not 1. Now the wait ends at the deadline (0.3 s later), and the
    poll then releases the request."""
    store = GatedStore(RemoteNamespace("m", LAYOUT))
    tier = make_tier(store)
    tier.fetch_deadline_s = 1.0
    try:
        assert tier.start_fetch("r", list(range(1, 14)))
        time.sleep(0.7)
        start = time.monotonic()
        tier.wait(tier.fetch_deadline_s)
        assert time.monotonic() - start < 0.65  # 0.3 s; the whole deadline was 1 s
        assert tier.poll() == ["r"] and tier.num_waiting == 0
    finally:
        store.gate.set()
        store.close()
