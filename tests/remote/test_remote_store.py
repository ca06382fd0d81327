"""The store base over a dict: payload checks, fault injection and the background I/O thread."""

from __future__ import annotations

import threading

from remote_helpers import make_blocks, make_namespace

from kvtier.remote import FaultyRemoteStore, InMemoryRemoteStore, RemoteStore


def test_memory_store_round_trip_and_misses() -> None:
    """Blocks put come back byte for byte; unknown hashes are absent and counted as misses."""
    store = InMemoryRemoteStore(make_namespace())
    contract: RemoteStore = store  # the dict store satisfies the protocol
    blocks = make_blocks(store.namespace, 4)
    assert contract.put_many(blocks) == 4
    assert contract.get_many([*blocks, 99]) == blocks
    assert store.contains_many([1, 2, 99]) == {1, 2}
    stats = store.stats
    assert (stats.num_hits, stats.num_misses, stats.num_puts) == (4, 1, 4)
    assert stats.bytes_written == stats.bytes_read > 4 * store.namespace.layout.bytes_per_block


def test_stores_sharing_a_backend_keep_namespaces_apart() -> None:
    """Another model's store over the same backend sees none of the first model's blocks."""
    backend: dict[str, bytes] = {}
    first, second = InMemoryRemoteStore(make_namespace(), backend), InMemoryRemoteStore(
        make_namespace(), backend)
    first.put_many(make_blocks(first.namespace, 3))
    assert second.get_many([1, 2, 3]) == {}
    assert InMemoryRemoteStore(first.namespace, backend).get_many([1]) == make_blocks(
        first.namespace, 1)


def test_value_under_another_key_is_refused_and_counted() -> None:
    """A value copied under another block's key is a miss with reason 'block_hash'."""
    store = InMemoryRemoteStore(make_namespace())
    store.put_many(make_blocks(store.namespace, 1))
    store.backend[store.namespace.key(2)] = store.backend[store.namespace.key(1)]
    assert store.get_many([1, 2]) == make_blocks(store.namespace, 1)
    assert store.stats.num_bad_payloads == 1
    assert store.stats.bad_payload_reasons == {"block_hash": 1}


def test_faulty_store_down_and_lossy() -> None:
    """A down backend gives misses and failed puts, counted; a lossy one drops some hits."""
    inner = InMemoryRemoteStore(make_namespace())
    faulty = FaultyRemoteStore(inner, seed=1)
    blocks = make_blocks(inner.namespace, 50)
    faulty.down = True
    assert faulty.put_many(blocks) == 0
    assert faulty.get_many(blocks) == {}
    assert faulty.contains_many(blocks) == set()
    assert (faulty.stats.num_failed_puts, faulty.stats.num_misses, faulty.stats.num_errors) == (
        50, 50, 3)
    faulty.down = False
    assert faulty.put_many(blocks) == 50
    faulty.miss_rate = 0.5
    assert 0 < len(faulty.get_many(blocks)) < 50


def test_prefetch_and_write_back_run_on_the_io_thread() -> None:
    """write_back then prefetch deliver the blocks to the callback; flush waits for both."""
    store = InMemoryRemoteStore(make_namespace())
    blocks = make_blocks(store.namespace, 5)
    results: list[dict[int, memoryview]] = []
    assert store.write_back(blocks)
    assert store.prefetch(blocks, results.append)
    assert store.flush(timeout=5)
    assert results == [blocks]
    store.close()


def test_full_queue_drops_jobs_and_counts_them() -> None:
    """With max_inflight=1, a job behind a busy one is queued and the next one dropped."""
    store = InMemoryRemoteStore(make_namespace(), max_inflight=1)
    started, release = threading.Event(), threading.Event()

    def blocking_callback(found: dict[int, memoryview]) -> None:
        started.set()
        release.wait(5)

    assert store.prefetch([1], blocking_callback)
    assert started.wait(5)  # the worker is busy; the queue is empty
    assert store.write_back(make_blocks(store.namespace, 1))  # fills the queue
    assert not store.prefetch([1], blocking_callback)  # dropped
    assert not store.flush(timeout=0.05)
    release.set()
    assert store.flush(timeout=5)
    assert store.stats.num_dropped_jobs == 1
    assert store.stats.num_puts == 1
    store.close()


def test_a_raising_callback_is_counted_and_the_thread_goes_on() -> None:
    """An exception in a prefetch callback is counted as an error; later jobs still run."""
    store = InMemoryRemoteStore(make_namespace())

    def bad_callback(found: dict[int, memoryview]) -> None:
        raise RuntimeError("caller bug")

    results: list[dict[int, memoryview]] = []
    store.prefetch([1], bad_callback)
    store.prefetch([1], results.append)
    assert store.flush(timeout=5)
    assert results == [{}]
    assert store.stats.num_errors == 1
    store.close()
