"""The remote tier's contract (:class:`RemoteStore`), its stats, and the stores that share
one implementation of keys, payload checks and background I/O (:class:`BlockStoreBase`).

A store maps 128-bit block hashes to one block's raw KV bytes. Values are encoded with
:mod:`kvtier.remote.codec`; a value that fails a check is a miss, is counted, and is never
returned. No fault of the backend raises out of ``get_many``/``put_many``/``contains_many``.
"""

from __future__ import annotations

import dataclasses
import queue
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from kvtier.remote.codec import PayloadError, RemoteNamespace

PrefetchCallback = Callable[[dict[int, bytes]], None]


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
    num_short_circuited: int = 0  # batches skipped while the circuit breaker was open
    num_dropped_jobs: int = 0  # background jobs refused because the queue was full
    bytes_read: int = 0
    bytes_written: int = 0
    bad_payload_reasons: dict[str, int] = field(default_factory=dict)

    def copy(self) -> RemoteStats:
        return dataclasses.replace(self, bad_payload_reasons=dict(self.bad_payload_reasons))


class RemoteStore(Protocol):
    """A shared, content-addressed store of full KV blocks."""

    def get_many(self, hashes: Iterable[int]) -> dict[int, bytes]:
        """Payloads of the blocks found and valid; misses are absent. Never raises on faults."""
        ...

    def put_many(self, items: Mapping[int, bytes]) -> int:
        """Store blocks; returns how many were written. Never raises on faults."""
        ...

    def contains_many(self, hashes: Iterable[int]) -> set[int]:
        """Hashes the store holds now (the values are not checked). Does not change stats
        beyond fault counters."""
        ...

    @property
    def stats(self) -> RemoteStats: ...

    def close(self) -> None: ...


class BlockStoreBase(ABC):
    """Keys, payload checks, stats and a background I/O thread over a raw key-value backend.

    Subclasses implement three batch operations on encoded values; each returns ``None`` for
    a batch that failed (after counting the fault itself) and never raises.
    """

    def __init__(self, namespace: RemoteNamespace, *, max_inflight: int = 64) -> None:
        if type(max_inflight) is not int or max_inflight < 1:
            raise ValueError(f"max_inflight must be an integer >= 1, got {max_inflight!r}")
        self.namespace = namespace
        self._fingerprint = namespace.fingerprint
        self._stats = RemoteStats()
        self._lock = threading.Lock()
        self._max_inflight = max_inflight
        self._io: _IOThread | None = None

    # -- backend -------------------------------------------------------------------------
    @abstractmethod
    def _fetch(self, keys: list[str]) -> list[bytes | None] | None: ...

    @abstractmethod
    def _store(self, pairs: list[tuple[str, bytes]]) -> list[bool] | None: ...

    @abstractmethod
    def _exists(self, keys: list[str]) -> list[bool] | None: ...

    def _close_backend(self) -> None:  # noqa: B027 - optional hook
        pass

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

    # -- RemoteStore ---------------------------------------------------------------------
    def get_many(self, hashes: Iterable[int]) -> dict[int, bytes]:
        wanted = list(dict.fromkeys(hashes))
        if not wanted:
            return {}
        values = self._fetch([self._key(h) for h in wanted])
        if values is None:
            self._count(num_misses=len(wanted))
            return {}
        found: dict[int, bytes] = {}
        bad: list[str] = []
        num_bytes = 0
        for block_hash, value in zip(wanted, values):
            if value is None:
                continue
            num_bytes += len(value)
            try:
                found[block_hash] = self.namespace.decode(block_hash, value)
            except PayloadError as exc:
                bad.append(exc.reason)
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
        if not items:
            return 0
        pairs = [(self._key(h), self.namespace.encode(h, payload)) for h, payload in items.items()]
        results = self._store(pairs)
        if results is None:
            self._count(num_failed_puts=len(pairs))
            return 0
        num_written = sum(results)
        num_bytes = sum(len(v) for (_, v), ok in zip(pairs, results) if ok)
        self._count(num_puts=num_written, num_failed_puts=len(pairs) - num_written,
                    bytes_written=num_bytes)
        return num_written

    def contains_many(self, hashes: Iterable[int]) -> set[int]:
        wanted = list(dict.fromkeys(hashes))
        if not wanted:
            return set()
        present = self._exists([self._key(h) for h in wanted])
        if present is None:
            return set()
        return {h for h, ok in zip(wanted, present) if ok}

    # -- background I/O ------------------------------------------------------------------
    def prefetch(self, hashes: Iterable[int], callback: PrefetchCallback) -> bool:
        """Queue a ``get_many`` whose result goes to ``callback`` on the I/O thread. Returns
        False (and counts a dropped job) when ``max_inflight`` jobs are already queued."""
        wanted = list(hashes)
        return self._submit(lambda: callback(self.get_many(wanted)))

    def write_back(self, items: Mapping[int, bytes]) -> bool:
        """Queue a ``put_many`` on the I/O thread; False (counted) when the queue is full."""
        snapshot = dict(items)
        return self._submit(lambda: self.put_many(snapshot))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued job has run; False if ``timeout`` seconds passed first."""
        return self._io is None or self._io.wait_idle(timeout)

    def _submit(self, job: Callable[[], object]) -> bool:
        if self._io is None:
            with self._lock:
                if self._io is None:
                    self._io = _IOThread(self._max_inflight, self._on_job_error)
        if self._io.submit(job):
            return True
        self._count(num_dropped_jobs=1)
        return False

    def _on_job_error(self, exc: BaseException) -> None:
        self._count(num_errors=1)  # a callback raised; the I/O thread carries on

    def close(self) -> None:
        if self._io is not None:
            self._io.stop()
            self._io = None
        self._close_backend()


class _IOThread:
    """One daemon thread running queued jobs in order; the queue holds at most ``maxsize``."""

    def __init__(self, maxsize: int, on_error: Callable[[BaseException], None]) -> None:
        self._jobs: queue.Queue[Callable[[], object] | None] = queue.Queue(maxsize)
        self._on_error = on_error
        self._idle = threading.Condition()
        self._num_pending = 0
        self._thread = threading.Thread(target=self._run, name="kvtier-remote-io", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], object]) -> bool:
        with self._idle:
            try:
                self._jobs.put_nowait(job)
            except queue.Full:
                return False
            self._num_pending += 1
        return True

    def wait_idle(self, timeout: float | None) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._num_pending == 0, timeout)

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception as exc:
                self._on_error(exc)
            with self._idle:
                self._num_pending -= 1
                self._idle.notify_all()


class MemoryRemoteStore(BlockStoreBase):
    """A dict-backed store for tests of callers. Stores sharing ``backend`` share blocks,
    like processes sharing one server; tests may change ``backend`` values to corrupt them."""

    def __init__(self, namespace: RemoteNamespace, backend: dict[str, bytes] | None = None,
                 *, max_inflight: int = 64) -> None:
        super().__init__(namespace, max_inflight=max_inflight)
        self.backend: dict[str, bytes] = {} if backend is None else backend

    def _fetch(self, keys: list[str]) -> list[bytes | None]:
        return [self.backend.get(k) for k in keys]

    def _store(self, pairs: list[tuple[str, bytes]]) -> list[bool]:
        self.backend.update(pairs)
        return [True] * len(pairs)

    def _exists(self, keys: list[str]) -> list[bool]:
        return [k in self.backend for k in keys]


class FaultyRemoteStore(BlockStoreBase):
    """Wraps a :class:`BlockStoreBase` backend with injected faults, for tests of callers.

    Set the attributes at any time: ``down`` fails every batch; ``delay_s`` sleeps before
    each batch; ``miss_rate`` drops that fraction of found values (as an eviction would).
    """

    def __init__(self, inner: BlockStoreBase, *, seed: int = 0) -> None:
        super().__init__(inner.namespace)
        self.inner = inner
        self.down = False
        self.delay_s = 0.0
        self.miss_rate = 0.0
        self._rng = random.Random(seed)

    def _fault(self) -> bool:
        if self.delay_s > 0:
            time.sleep(self.delay_s)
        if self.down:
            self._count(num_errors=1)
        return self.down

    def _fetch(self, keys: list[str]) -> list[bytes | None] | None:
        if self._fault():
            return None
        values = self.inner._fetch(keys)
        if values is None:
            return None
        return [None if self._rng.random() < self.miss_rate else v for v in values]

    def _store(self, pairs: list[tuple[str, bytes]]) -> list[bool] | None:
        return None if self._fault() else self.inner._store(pairs)

    def _exists(self, keys: list[str]) -> list[bool] | None:
        return None if self._fault() else self.inner._exists(keys)
