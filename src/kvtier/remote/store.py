"""The remote tier's contract (:class:`RemoteStore`), its stats, and the base class the
stores share for keys, payload checks and background I/O (:class:`RemoteStoreBase`).

A remote store maps 128-bit block hashes to one block's raw KV bytes. Values are encoded
with :mod:`kvtier.remote.codec`; a value that fails a check is a miss, is counted, and is
never returned. No fault of the backend raises out of any method; bad arguments (a hash that
is not a 128-bit unsigned int, a payload of the wrong size) raise ``ValueError`` before any
I/O.

Background jobs (``prefetch``, ``write_back``) run in order on one I/O thread::

    submit ──accepted──> queue ──> I/O thread runs it (exactly once, even across close())
       └──refused (queue full, or closed) ──> returns False, counted, never runs

``close()`` refuses new jobs, lets the accepted ones run, then stops the thread; later
calls are misses and failed puts, counted.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from kvtier.remote.codec import PayloadError, RemoteNamespace, exact_bytes, payload_size
from kvtier.remote.io_thread import IOThread
from kvtier.remote.options import check_count, check_number, check_timeout, describe
from kvtier.reprs import shown

PrefetchCallback = Callable[[dict[int, memoryview]], None]
# Called on the I/O thread with the hashes of a background write the store did not take
# whole (its backend down, a batch refused, a subclass's put_many raised).
LostCallback = Callable[[list[int]], None]

MAX_INFLIGHT = 1 << 20


_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


@dataclass(slots=True)
class RemoteStats:
    """Counters of one store; ``store.stats`` returns a copy."""

    num_hits: int = 0
    num_misses: int = 0
    num_bad_payloads: int = 0
    num_puts: int = 0
    num_failed_puts: int = 0
    num_errors: int = 0
    num_timeouts: int = 0
    num_retries: int = 0
    num_short_circuited: int = 0  # batches skipped while a circuit breaker was open
    # batches skipped while a breaker was half-open (its cooldown passed), its one probe
    # out: not yet answered
    num_refused_probes: int = 0
    num_dropped_jobs: int = 0  # background jobs refused: the queue was full, or closed
    # times the backend was found to be another incarnation than before (a server's run id
    # changed: restarted or failed over): what was written to it before is gone
    num_resets: int = 0
    # keys a cluster node answered ASK for (their slot migrating to the node it named),
    # made on that node after ASKING
    num_asked: int = 0
    # keys whose one redirect was answered by another (an ASK answered ASK or MOVED, a
    # MOVED answered MOVED once the slot map was read again): misses, or not written
    num_redirects_given_up: int = 0
    # keys a cluster node answered TRYAGAIN (their slot being resharded), made again once
    # on it (where the batch's deadline left time for it)
    num_tryagain_retries: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    bad_payload_reasons: dict[str, int] = field(default_factory=dict)

    def copy(self) -> RemoteStats:
        return dataclasses.replace(self, bad_payload_reasons=dict(self.bad_payload_reasons))

    @property
    def num_faults(self) -> int:
        """Batches the backend failed or refused, or skipped for a breaker: what a caller
        compares before and after a call to tell a miss of an outage (which says nothing
        of the key) from a key the store lacks. Pure."""
        return self.num_errors + self.num_short_circuited + self.num_refused_probes


class RemoteStore(Protocol):
    """A shared, content-addressed store of full KV blocks of one ``namespace``.

    May change: the shared values (``put_many``, ``write_back``) and its own stats. Never
    raises on a fault of the backend; raises ``ValueError`` on bad arguments, before I/O.
    """

    @property
    def namespace(self) -> RemoteNamespace: ...

    def get_many(self, hashes: Iterable[int]) -> dict[int, memoryview]:
        """Payloads of the blocks found and valid (read-only views into the values read,
        not copies); misses are absent."""
        ...

    def put_many(self, items: Mapping[int, bytes]) -> int:
        """Store blocks; returns how many were written."""
        ...

    def contains_many(self, hashes: Iterable[int]) -> set[int]:
        """Hashes the store holds now (the values are not checked). Changes no stats
        beyond fault counters."""
        ...

    def prefetch(self, hashes: Iterable[int], callback: PrefetchCallback) -> bool:
        """Queue a ``get_many`` whose result goes to ``callback``; False (counted) if refused."""
        ...

    def write_back(self, items: Mapping[int, bytes]) -> bool:
        """Queue a ``put_many``; False (counted) if refused. (A :class:`RemoteStoreBase`
        also takes ``on_lost``: told, on the I/O thread, of a write it did not take whole.)"""
        ...

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every accepted job has run; False if ``timeout`` seconds passed first."""
        ...

    @property
    def stats(self) -> RemoteStats: ...

    def close(self) -> None:
        """Refuse new jobs, run the accepted ones, release the backend. Idempotent."""
        ...


def check_hashes(hashes: Iterable[int]) -> list[int]:
    """``hashes`` without repeats, in order; ValueError naming the first that is not a
    128-bit unsigned int (a bool is not one). Pure."""
    try:
        given = list(hashes)
    except TypeError:
        raise ValueError(f"block hashes must be an iterable of 128-bit unsigned ints, got "
                         f"{describe(hashes)[:40]}") from None
    for h in given:  # before dedup: True would hide behind an equal 1
        if type(h) is not int or not 0 <= h < 1 << 128:
            raise ValueError(f"block hashes must be 128-bit unsigned ints, got {describe(h)}")
    return list(dict.fromkeys(given))


class RemoteStoreBase(ABC):
    """A :class:`RemoteStore` over a raw key-value backend: keys, payload checks, stats and
    the background I/O thread.

    Subclasses implement three batch operations on encoded values (``read_values``,
    ``write_values``, ``has_keys``); each returns ``None`` for a batch that failed (after
    counting the fault itself) and never raises. They are public so that a wrapper (e.g.
    :class:`FaultyRemoteStore`) can call another store's backend; they change no stats
    beyond fault counters.
    """

    def __init__(self, namespace: RemoteNamespace, *, max_inflight: int = 64) -> None:
        self._max_inflight = check_count("max_inflight", max_inflight, 1, MAX_INFLIGHT)
        if not isinstance(namespace, RemoteNamespace):
            raise ValueError(f"namespace must be a RemoteNamespace, got {shown(namespace)}")
        self._namespace = namespace
        self._fingerprint = namespace.fingerprint
        self._stats = RemoteStats()
        self._lock = threading.Lock()  # guards _stats and _backend_ids
        self._backend_ids: dict[str, str] = {}  # each server's run id, as last read
        self._state_lock = threading.Lock()  # guards _io, _accepting and _closed
        self._io: IOThread | None = None
        self._accepting = True  # False from the start of close(): jobs are refused
        self._closed = False  # True once close() has run the accepted jobs

    @property
    def namespace(self) -> RemoteNamespace:
        return self._namespace

    # -- backend -------------------------------------------------------------------------
    @abstractmethod
    def read_values(self, keys: list[str]) -> list[bytes | None] | None:
        """The raw values of ``keys`` (None where absent), or None if the batch failed."""

    @abstractmethod
    def write_values(self, pairs: list[tuple[str, bytes]]) -> list[bool] | None:
        """Set each key to its value; per pair whether it was written, or None."""

    @abstractmethod
    def has_keys(self, keys: list[str]) -> list[bool] | None:
        """Per key whether it exists, or None if the batch failed."""

    def _close_backend(self) -> None:  # noqa: B027 - optional hook
        pass

    def _note_backend(self, run_ids: Mapping[str, str]) -> bool:
        """Say which incarnation of each server answers now (a server's name -> its run
        id, as far as read): one that answers with another run id than before was restarted
        or replaced, and lost what it held: counted once per call (``num_resets``), which
        the remote tier reads as "forget what this store was given". Returns whether a
        reset was counted."""
        with self._lock:
            old = self._backend_ids
            reset = any(old.get(name, run_id) != run_id for name, run_id in run_ids.items())
            old.update(run_ids)
            if reset:
                self._stats.num_resets += 1
        return reset

    # -- stats ---------------------------------------------------------------------------
    @property
    def stats(self) -> RemoteStats:
        with self._lock:
            return self._stats.copy()

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + delta)

    def _key(self, block_hash: int) -> str:
        return f"kvtier:{self._fingerprint}:{block_hash:032x}"

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called. Pure."""
        return self._closed

    # -- RemoteStore ---------------------------------------------------------------------
    def get_many(self, hashes: Iterable[int]) -> dict[int, memoryview]:
        wanted = check_hashes(hashes)
        if not wanted:
            return {}
        values = None if self._closed else self._batch(self.read_values,
                                                       [self._key(h) for h in wanted])
        if values is None:
            self._count(num_misses=len(wanted))
            return {}
        found: dict[int, memoryview] = {}
        bad: list[str] = []
        num_bytes = 0
        for block_hash, value in zip(wanted, values, strict=True):
            if value is None:
                continue
            try:
                found[block_hash] = self._namespace.decode(block_hash, value)
            except PayloadError as exc:
                bad.append(exc.reason)
            if isinstance(value, bytes | bytearray):
                num_bytes += len(value)
        with self._lock:
            s = self._stats
            s.num_hits += len(found)
            s.num_misses += len(wanted) - len(found)
            s.num_bad_payloads += len(bad)
            s.bytes_read += num_bytes
            for reason in bad:
                s.bad_payload_reasons[reason] = s.bad_payload_reasons.get(reason, 0) + 1
        return found

    def put_many(self, items: Mapping[int, bytes]) -> int:
        if not isinstance(items, Mapping):
            raise ValueError(f"items must be a mapping of block hashes to payloads, got "
                             f"{describe(items)[:40]}")
        check_hashes(items)
        # Encode every item first: a bad payload raises before anything is written.
        pairs = [(self._key(h), self._namespace.encode(h, payload))
                 for h, payload in items.items()]
        if not pairs:
            return 0
        results = None if self._closed else self._batch(self.write_values, pairs)
        if results is None:
            self._count(num_failed_puts=len(pairs))
            return 0
        # NOTE: an item's answer is True or a failure: "no", 1 or b"OK" (a subclass's
        # backend past its contract) counted as written, and a tier held those blocks.
        num_written = sum(ok is True for ok in results)
        num_bytes = sum(len(v) for (_, v), ok in zip(pairs, results, strict=True) if ok is True)
        self._count(num_puts=num_written, num_failed_puts=len(pairs) - num_written,
                    bytes_written=num_bytes)
        return num_written

    def contains_many(self, hashes: Iterable[int]) -> set[int]:
        wanted = check_hashes(hashes)
        if not wanted or self._closed:
            return set()
        present = self._batch(self.has_keys, [self._key(h) for h in wanted])
        if present is None:
            return set()
        return {h for h, ok in zip(wanted, present, strict=True) if ok is True}

    def _batch(self, operation: Callable[[list[_Item]], list[_Result] | None],
               items: list[_Item]) -> list[_Result] | None:
        """``operation(items)`` of the backend, or None for a failed batch: one the backend
        failed (and counted), or where it broke its contract, counted here as an error: it
        raised (a third-party backend's ConnectionError or timeout), or answered with no
        list of one result per item. A fault of the store is a miss, never the caller's."""
        try:
            results = operation(items)
        except Exception:
            self._count(num_errors=1)
            return None
        if results is None:
            return None
        if not isinstance(results, list) or len(results) != len(items):
            self._count(num_errors=1)
            return None
        return results

    # -- background I/O ------------------------------------------------------------------
    def prefetch(self, hashes: Iterable[int], callback: PrefetchCallback) -> bool:
        """Queue a ``get_many`` whose result goes to ``callback`` on the I/O thread. Returns
        False (and counts a dropped job) when ``max_inflight`` jobs are already queued or
        the store is closed; then ``callback`` is never called."""
        wanted = check_hashes(hashes)

        def job() -> None:
            # NOTE: ``callback`` comes whatever ``get_many`` does: a subclass's that raises
            # (its backend's error) is a miss, where no call would leave the caller waiting
            # for this lookup for ever.
            try:
                found = self.get_many(wanted)
            except Exception:
                self._count(num_errors=1)
                found = {}
            callback(found)

        return self._submit(job)

    def write_back(self, items: Mapping[int, bytes], on_lost: LostCallback | None = None
                   ) -> bool:
        """Queue a ``put_many`` on the I/O thread; False (counted) when refused. Once it
        has run, ``on_lost`` (if given) gets the hashes of ``items`` when the store did not
        write them all (every hash: which of them it wrote is not known), on that thread;
        it is not called for a write that succeeded, nor for one refused here."""
        if on_lost is not None and not callable(on_lost):
            raise ValueError(f"on_lost must be callable, got {describe(on_lost)[:40]}")
        if not isinstance(items, Mapping):
            raise ValueError(f"items must be a mapping of block hashes to payloads, got "
                             f"{describe(items)[:40]}")
        snapshot = dict(items)
        check_hashes(snapshot)
        size = self._namespace.layout.bytes_per_block
        for block_hash, payload in snapshot.items():  # refused here, not on the thread
            # NOTE: as encode_block checks it: its bytes, contiguous (a view of floats as
            # long as a block has bytes was taken, and failed on the thread, uncounted).
            data = exact_bytes(payload, size)
            if data is None:
                raise ValueError(f"payload must be {size} bytes (contiguous: one block of "
                                 f"{self._namespace.layout}), got {payload_size(payload)}")
            if type(payload) is not bytes:
                # NOTE: a mutable buffer (a bytearray, a view of the caller's staging
                # memory) is copied now: the I/O thread read it later, and what the caller
                # wrote there meanwhile (the next block) was stored under this block's hash,
                # with a checksum of its own: every engine was served it as this block.
                snapshot[block_hash] = bytes(data)
        if on_lost is None:
            return self._submit(lambda: self.put_many(snapshot))

        def job() -> None:
            # NOTE: ``on_lost`` comes whatever ``put_many`` does: a subclass's that raises
            # (its backend's error) wrote nothing the caller may count on.
            try:
                written = self.put_many(snapshot)
            except Exception:
                self._count(num_errors=1)
                written = 0
            if written != len(snapshot):
                on_lost(list(snapshot))

        return self._submit(job)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every accepted job has run; False if ``timeout`` seconds passed first
        (None or infinity: no limit). ValueError for a negative or NaN timeout."""
        timeout = check_timeout("timeout", timeout)
        with self._state_lock:
            io = self._io
        return io is None or io.wait_idle(timeout)

    def _submit(self, job: Callable[[], object]) -> bool:
        # NOTE: the job is queued under the state lock, so close() sees every accepted job.
        with self._state_lock:
            accepted = False
            if self._accepting:
                if self._io is None:
                    self._io = IOThread(self._max_inflight, self._on_job_error)
                accepted = self._io.submit(job)
        if not accepted:
            self._count(num_dropped_jobs=1)
        return accepted

    def _on_job_error(self, exc: BaseException) -> None:
        self._count(num_errors=1)  # a callback raised; the I/O thread carries on

    def close(self) -> None:
        """Refuse new jobs, run every accepted one, stop the I/O thread and release the
        backend. Idempotent; may be called from any thread, a callback included."""
        with self._state_lock:
            if not self._accepting:
                return
            self._accepting = False
            io, self._io = self._io, None
        if io is not None:
            io.stop()  # the accepted jobs run against the open backend
        with self._state_lock:
            self._closed = True
        self._close_backend()


class InMemoryRemoteStore(RemoteStoreBase):
    """A dict-backed store for tests of callers. Stores sharing ``backend`` share blocks,
    like processes sharing one server; tests may change ``backend`` values to corrupt them.
    May change: ``backend``, its stats."""

    def __init__(self, namespace: RemoteNamespace, backend: dict[str, bytes] | None = None,
                 *, max_inflight: int = 64) -> None:
        super().__init__(namespace, max_inflight=max_inflight)
        self.backend: dict[str, bytes] = {} if backend is None else backend

    def read_values(self, keys: list[str]) -> list[bytes | None]:
        return [self.backend.get(k) for k in keys]

    def write_values(self, pairs: list[tuple[str, bytes]]) -> list[bool]:
        self.backend.update(pairs)
        return [True] * len(pairs)

    def has_keys(self, keys: list[str]) -> list[bool]:
        return [k in self.backend for k in keys]


class FaultyRemoteStore(RemoteStoreBase):
    """Wraps another :class:`RemoteStoreBase`'s backend with injected faults, for tests.

    Set the attributes at any time: ``down`` fails every batch; ``delay_s`` sleeps before
    each batch; ``miss_rate`` drops that fraction of found values (as an eviction would).
    May change: the inner store's backend values, its own stats.
    """

    def __init__(self, inner: RemoteStoreBase, *, seed: int = 0) -> None:
        super().__init__(inner.namespace)
        self.inner = inner
        self.down = False
        self.delay_s = 0.0
        self.miss_rate = 0.0
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()

    def _fault(self) -> bool:
        delay_s = check_number("delay_s", self.delay_s, 0.0, 3600.0)
        if delay_s > 0:
            time.sleep(delay_s)
        if self.down:
            self._count(num_errors=1)
        return self.down

    def read_values(self, keys: list[str]) -> list[bytes | None] | None:
        if self._fault():
            return None
        values = self.inner.read_values(keys)
        if values is None:
            return None
        with self._rng_lock:
            return [None if self._rng.random() < self.miss_rate else v for v in values]

    def write_values(self, pairs: list[tuple[str, bytes]]) -> list[bool] | None:
        return None if self._fault() else self.inner.write_values(pairs)

    def has_keys(self, keys: list[str]) -> list[bool] | None:
        return None if self._fault() else self.inner.has_keys(keys)
