"""LMCache's storage-backend and connector tests (``put`` / ``contains`` / ``get`` of a
chunk under its key, a restarted backend finding what was stored, a chunk of the wrong
size), mirrored against kvtier's remote store.

Each test names the test it mirrors (LMCache/LMCache, ``tests/test_backends.py``,
``tests/test_connector.py``, ``tests/test_serde.py``). An LMCache chunk under its
``CacheEngineKey`` is one kvtier block's KV bytes under its chained hash, in a
``RemoteNamespace`` (model, layout, salt scope: the parts of LMCache's key besides the chunk
hash); ``put`` / ``contains`` / ``get`` are ``put_many`` / ``contains_many`` /
``get_many``, and a backend process is the dict an ``InMemoryRemoteStore`` shares. The
payloads are checked byte for byte. No torch: the store moves bytes.
"""

from __future__ import annotations

import random

import pytest

from kvtier.remote import InMemoryRemoteStore, RemoteNamespace
from kvtier.storage import KVLayout

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, tokens_per_block=4,
                  dtype="float32")
NAMESPACE = RemoteNamespace("lmsys/longchat-7b-16k", LAYOUT)


def random_blocks(n: int, seed: int) -> dict[int, bytes]:
    """``n`` random 128-bit hashes, each with a random payload of one block's size."""
    rng = random.Random(seed)
    return {rng.getrandbits(128): rng.randbytes(LAYOUT.bytes_per_block) for _ in range(n)}


def test_every_block_put_is_contained_and_read_back_exactly() -> None:
    """Mirrors tests/test_backends.py::test_backends (10 random keys, each put then found by
    ``contains`` and read back equal by ``get``): all 10 blocks are written, contained and
    read back byte for byte, counted as 10 puts and 10 hits."""
    store = InMemoryRemoteStore(NAMESPACE)
    blocks = random_blocks(10, seed=1)
    assert LAYOUT.bytes_per_block == 512  # 2 layers x K, V x 2 heads x 4 dims x 4 tokens x 4 B
    assert store.put_many(blocks) == 10
    assert store.contains_many(blocks) == set(blocks)
    got = store.get_many(blocks)
    assert {h: bytes(v) for h, v in got.items()} == blocks
    assert (store.stats.num_puts, store.stats.num_hits, store.stats.num_misses) == (10, 10, 0)


def test_a_key_never_set_does_not_exist_until_it_is() -> None:
    """Mirrors tests/test_connector.py::test_lm_connector (a special key does not exist;
    after ``set`` it exists and ``get`` returns the value set): a hash never put is neither
    contained nor read (a miss, counted); once put, both, with its exact bytes. (kvtier's
    store has no ``list``: a tier asks for the hashes it needs.)"""
    store = InMemoryRemoteStore(NAMESPACE)
    ((h, payload),) = random_blocks(1, seed=2).items()
    assert (store.contains_many([h]), store.get_many([h])) == (set(), {})
    assert store.stats.num_misses == 1
    assert store.put_many({h: payload}) == 1
    assert store.contains_many([h]) == {h}
    assert bytes(store.get_many([h])[h]) == payload


def test_a_restarted_backend_finds_every_block_stored_before() -> None:
    """Mirrors tests/test_backends.py::test_restart (a new backend over the same server
    fetches the existing keys): a new store over the same backend finds all 10 blocks with
    their bytes; one of another model (another configuration, test_creation's distinct
    backends) finds none of them."""
    backend: dict[str, bytes] = {}
    blocks = random_blocks(10, seed=3)
    assert InMemoryRemoteStore(NAMESPACE, backend).put_many(blocks) == 10
    restarted = InMemoryRemoteStore(NAMESPACE, backend)
    assert restarted.contains_many(blocks) == set(blocks)
    assert {h: bytes(v) for h, v in restarted.get_many(blocks).items()} == blocks
    other = InMemoryRemoteStore(RemoteNamespace("another-model", LAYOUT), backend)
    assert (other.contains_many(blocks), other.get_many(blocks)) == (set(), {})


def test_a_chunk_of_the_wrong_size_is_refused_and_a_damaged_one_is_a_miss() -> None:
    """Mirrors tests/test_serde.py::test_cachegen_unmatched_size (a chunk whose size does
    not match its configuration is not decoded): a payload one byte short is refused with
    ValueError before anything is written, even beside a good one; a stored value cut short
    in the backend reads as a miss, counted as a bad payload and never returned, while the
    other block of the batch is read whole."""
    backend: dict[str, bytes] = {}
    store = InMemoryRemoteStore(NAMESPACE, backend)
    (good, good_payload), (bad, bad_payload) = random_blocks(2, seed=4).items()
    with pytest.raises(ValueError):
        store.put_many({good: good_payload, bad: bad_payload[:-1]})
    assert backend == {} and store.stats.num_puts == 0
    assert store.put_many({good: good_payload, bad: bad_payload}) == 2
    damaged = NAMESPACE.key(bad)
    backend[damaged] = backend[damaged][:-1]
    got = store.get_many([good, bad])
    assert {h: bytes(v) for h, v in got.items()} == {good: good_payload}
    assert (store.stats.num_bad_payloads, store.stats.num_misses) == (1, 1)
