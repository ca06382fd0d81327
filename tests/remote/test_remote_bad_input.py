"""The remote store never crashes on bad data: options checked at construction, garbage
values are misses, bad arguments raise ValueError before any I/O or state change, and
close() racing background jobs loses none."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from remote_helpers import make_blocks, make_namespace

from kvtier.remote import (
    FaultyRemoteStore,
    InMemoryRemoteStore,
    RedisRemoteStore,
    RemoteNamespace,
    namespace_fingerprint,
)
from kvtier.storage import KVLayout

REFUSED = "redis://127.0.0.1:1/0"  # nothing listens on port 1
BAD_NUMBERS = [True, False, float("nan"), float("inf"), -float("inf"), -1, 1e300, 10**400, "1",
               None]


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=lambda v: repr(v)[:12])
@pytest.mark.parametrize("field", ["timeout_s", "backoff_s", "cooldown_s", "ttl_s",
                                   "max_retries", "breaker_threshold", "max_batch_keys",
                                   "max_batch_bytes", "max_inflight"])
def test_every_numeric_option_is_checked(field: str, value: object) -> None:
    """Not finite, out of range, a bool or not a number: ValueError naming the field."""
    if field == "ttl_s" and value is None:
        return  # None is ttl_s's "no expiry"
    with pytest.raises(ValueError, match=f"^{field} must be"):
        RedisRemoteStore(REFUSED, make_namespace(), **{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(("field", "value"), [("timeout_s", 0), ("timeout_s", 3601),
                                              ("backoff_s", 61), ("max_retries", 101),
                                              ("ttl_s", 0), ("cooldown_s", 86401.0),
                                              ("max_inflight", 0), ("max_batch_keys", 0)])
def test_bounds_are_stated(field: str, value: object) -> None:
    """Each option has a range, and the message shows it."""
    with pytest.raises(ValueError, match=f"^{field} must be .* in [\\[(]"):
        RedisRemoteStore(REFUSED, make_namespace(), **{field: value})  # type: ignore[arg-type]


def test_huge_backoff_is_refused_and_the_largest_allowed_stays_finite() -> None:
    """backoff_s=1e300 once overflowed in get_many; now it is refused, and the largest
    options allowed give a finite bound (each sleep is capped)."""
    with pytest.raises(ValueError, match="backoff_s must be a finite number in \\[0, 60\\], "
                                         "got 1e\\+300"):
        RedisRemoteStore(REFUSED, make_namespace(), backoff_s=1e300)
    store = RedisRemoteStore(REFUSED, make_namespace(), backoff_s=60, max_retries=100,
                             timeout_s=1)
    assert store.max_blocking_s == 101 * 1 + 100 * 60


def test_refused_port_with_retries_never_raises() -> None:
    """A server that refuses connections gives misses and failed puts, counted."""
    pytest.importorskip("redis", reason="the retries are redis-py's connection attempts")
    ns = make_namespace()
    store = RedisRemoteStore(REFUSED, ns, timeout_s=0.2, max_retries=3, backoff_s=0.001)
    assert store.get_many([1, 2]) == {}
    assert store.put_many(make_blocks(ns, 2)) == 0
    assert store.contains_many([1]) == set()
    stats = store.stats
    assert (stats.num_misses, stats.num_failed_puts, stats.num_retries) == (2, 2, 9)
    store.close()


@pytest.mark.parametrize("value", [True, None, 1.0, b"x"], ids=repr)
def test_cluster_flag_and_url_types(value: object) -> None:
    """cluster is a bool, url a str: anything else is named."""
    if value is not True:
        with pytest.raises(ValueError, match=r"^cluster must be a bool"):
            RedisRemoteStore(REFUSED, make_namespace(), cluster=value)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^url must be a str"):
        RedisRemoteStore(value, make_namespace())  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, 1 << 128, True, 1.0, "1", None], ids=repr)
def test_bad_hashes_raise_before_any_io_or_count(bad: object) -> None:
    """A hash that is not a 128-bit unsigned int is named; nothing is read or counted."""
    store = InMemoryRemoteStore(make_namespace())
    store.put_many(make_blocks(store.namespace, 1))
    before = store.stats
    for call in (lambda: store.get_many([1, bad]),  # type: ignore[list-item]
                 lambda: store.contains_many([bad]),  # type: ignore[list-item]
                 lambda: store.put_many({bad: b""}),  # type: ignore[dict-item]
                 lambda: store.prefetch([bad], lambda found: None)):  # type: ignore[list-item]
        with pytest.raises(ValueError, match="block hashes must be 128-bit unsigned ints"):
            call()
    assert store.stats == before
    store.close()


def test_a_bad_payload_in_a_batch_writes_nothing() -> None:
    """put_many and write_back check every payload before writing any."""
    store = InMemoryRemoteStore(make_namespace())
    items = {**make_blocks(store.namespace, 2), 3: b"short"}
    with pytest.raises(ValueError, match="payload must be"):
        store.put_many(items)
    with pytest.raises(ValueError, match="payload must be"):
        store.write_back(items)
    assert store.backend == {} and store.stats.num_puts == 0
    store.close()


garbage = (st.binary(max_size=200) | st.text(max_size=20) | st.integers() | st.none()
           | st.lists(st.integers(), max_size=3) | st.just(b"KVTB" + bytes(200)))


@settings(max_examples=300, deadline=None)
@given(st.lists(garbage, min_size=1, max_size=6), st.data())
def test_garbage_values_are_misses_never_crashes(values: list[object], data: Any) -> None:
    """Whatever the backend holds under a key, get_many returns only valid blocks and counts
    every other value as a miss (a bad payload when it was there)."""
    ns = NAMESPACE
    store = InMemoryRemoteStore(ns)
    good = make_blocks(ns, 1, first_hash=100)
    store.put_many(good)
    for i, value in enumerate(values):
        store.backend[ns.key(i)] = value  # type: ignore[assignment]
    wanted = [*range(len(values)), 100]
    found = store.get_many(data.draw(st.permutations(wanted)))
    assert found == good
    stats = store.stats
    num_present = sum(v is not None for v in values)
    assert (stats.num_hits, stats.num_misses, stats.num_bad_payloads) == (
        1, len(values), num_present)


NAMESPACE = make_namespace(tokens_per_block=1)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=6), st.none() | st.text(max_size=6), st.text(max_size=6),
       st.none() | st.text(max_size=6))
def test_fingerprints_of_distinct_namespaces_differ(model_a: str, salt_a: str | None,
                                                   model_b: str, salt_b: str | None) -> None:
    """Distinct (model, salt scope) pairs, NULs and separators included, never share a
    fingerprint."""
    layout = KVLayout(2, 2, 4, 4, dtype="float16")
    same = (model_a, salt_a) == (model_b, salt_b)
    assert (namespace_fingerprint(model_a, layout, salt_a)
            == namespace_fingerprint(model_b, layout, salt_b)) == same


@pytest.mark.parametrize(("model", "salt"), [(b"m", None), (1, None), ("m", 1), ("m", b"s")],
                         ids=repr)
def test_namespace_fields_must_be_text(model: object, salt: object) -> None:
    """A model id or salt scope that is not a str is refused by name."""
    layout = KVLayout(2, 2, 4, 4)
    with pytest.raises(ValueError, match=r"^(model_id|salt_scope) must be"):
        RemoteNamespace(model, layout, salt)  # type: ignore[arg-type]


# ---- close() racing background jobs ----------------------------------------------------------


def io_threads() -> list[threading.Thread]:
    """Live remote I/O threads."""
    return [t for t in threading.enumerate() if t.name == "kvtier-remote-io"]


def test_jobs_after_close_are_refused_and_start_no_thread() -> None:
    """After close, prefetch and write_back return False, count a dropped job, never call
    back and start no I/O thread; get and put are misses and failed puts."""
    before = len(io_threads())
    store = InMemoryRemoteStore(make_namespace())
    blocks = make_blocks(store.namespace, 2)
    store.put_many(blocks)
    store.close()
    called: list[dict[int, memoryview]] = []
    assert not store.prefetch([1], called.append)
    assert not store.write_back(blocks)
    assert len(io_threads()) == before
    assert store.get_many([1]) == {} and store.put_many(blocks) == 0
    assert store.contains_many([1]) == set()
    assert store.flush(timeout=1)
    stats = store.stats
    assert (stats.num_dropped_jobs, stats.num_misses, stats.num_failed_puts) == (2, 1, 2)
    assert called == []
    store.close()  # idempotent


def test_close_runs_every_accepted_job() -> None:
    """Jobs accepted before close (a slow backend keeps them queued) all run before close
    returns: every callback gets its result; every write lands."""
    inner = InMemoryRemoteStore(make_namespace())
    store = FaultyRemoteStore(inner)
    store.delay_s = 0.02
    blocks = make_blocks(inner.namespace, 3)
    results: list[dict[int, memoryview]] = []
    assert store.write_back(blocks)
    for _ in range(5):
        assert store.prefetch(blocks, results.append)
    store.close()
    assert results == [blocks] * 5
    assert len(inner.backend) == 3


def test_close_from_a_callback_does_not_deadlock() -> None:
    """A callback on the I/O thread may close its own store."""
    store = InMemoryRemoteStore(make_namespace())
    done = threading.Event()

    def closing(found: dict[int, memoryview]) -> None:
        store.close()
        done.set()

    assert store.prefetch([1], closing)
    assert done.wait(5)
    assert not store.prefetch([1], closing)


@pytest.mark.parametrize("seed", range(5))
def test_many_threads_hammering_prefetch_and_close(seed: int) -> None:
    """8 threads submit while another closes: each accepted prefetch is called back exactly
    once, no refused one ever is, and no I/O thread outlives close."""
    before = len(io_threads())
    inner = InMemoryRemoteStore(make_namespace(), max_inflight=4)
    blocks = make_blocks(inner.namespace, 2)
    inner.put_many(blocks)
    store = FaultyRemoteStore(inner, seed=seed)
    lock = threading.Lock()
    accepted: list[int] = []
    refused: list[int] = []
    called: list[int] = []
    start = threading.Barrier(9)

    def submitter(t: int) -> None:
        start.wait()
        for i in range(50):
            job = t * 1000 + i

            def callback(found: dict[int, memoryview], job: int = job) -> None:
                assert found == blocks
                with lock:
                    called.append(job)

            ok = store.prefetch(blocks, callback)
            with lock:
                (accepted if ok else refused).append(job)
            if seed % 2 and i % 7 == 0:
                assert isinstance(store.write_back(blocks), bool)

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    start.wait()
    time.sleep(0.001 * seed)
    store.close()
    for thread in threads:
        thread.join()
    assert sorted(called) == sorted(accepted)
    assert not set(called) & set(refused)
    assert len(accepted) + len(refused) == 400
    assert store.stats.num_dropped_jobs >= len(refused)
    assert store.stats.num_errors == 0  # no callback raised
    assert len(io_threads()) == before


@pytest.mark.parametrize("bad", [5, None, 1.5], ids=repr)
def test_hashes_that_are_no_iterable_are_refused(bad: object) -> None:
    """get_many/contains_many/prefetch of a non-iterable, put_many/write_back of a
    non-mapping: ValueError naming what was expected, nothing counted."""
    store = InMemoryRemoteStore(make_namespace())
    for call, what in ((store.get_many, "block hashes"), (store.contains_many, "block hashes"),
                       (lambda x: store.prefetch(x, lambda found: None), "block hashes"),
                       (store.put_many, "items"), (store.write_back, "items")):
        with pytest.raises(ValueError, match=f"^{what} must be"):
            call(bad)  # type: ignore[arg-type]
    assert store.stats == type(store.stats)()
    store.close()
