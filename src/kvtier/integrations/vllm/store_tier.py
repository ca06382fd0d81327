"""The secondary tier's mechanics on a kvtier :class:`~kvtier.remote.store.RemoteStore`,
without vLLM: non-blocking lookups, store and load jobs on one background I/O thread.

``KvtierRedisTier`` (``tier.py``) is the thin vLLM face of this class; keeping vLLM out of
here lets the main test suite drive every path against in-memory and faulty stores.

A key's existence is probed once, in a batch with the step's other unknown keys::

    lookup(k) ─unknown─> pending ──flush() (end of step)──> in flight ──I/O thread──> present
        │                  RETRY                               RETRY          (HIT)  or absent
        └─ known ──> HIT / MISS                   in flight longer than max_lookup_wait_s: MISS

Verdicts belong to the requests that asked: a request sees one answer per key for its life
(but a store of ours makes the key a HIT, and a failed load a MISS), and a verdict no live
request holds is forgotten (another engine may store the key later).
A probe the store failed (its ``stats.num_faults`` grew: down, a breaker open) finds the
keys it found present, but says nothing of the others: a MISS for the requests that asked
(they compute), never a verdict for a later request, which probes afresh.
A load that fails marks its keys bad: they are MISSes from then on (so a corrupt value is
not promoted again and again) until a store of ours overwrites them; but a load the store
failed (down, a breaker open: its ``stats.num_faults`` grew during the load) says nothing
of its keys: they are MISSes for the requests that held them, and probed afresh for any
other. A load reports as
arrived only what a request can use: a key past a failed one of its KV-cache group (in
the job's order, the request's lookup order) is neither copied nor reported::

    job (group 0)   k1   k2   k3          arrived: k1; failed: k2 (bad), k3 (not bad)
    store           ok   --   ok

Every fault of the
store (down, slow, full, corrupt) is a MISS or a failed job; nothing raises to the caller.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal, NamedTuple, cast

from kvtier.clock import CacheClock
from kvtier.counts import as_integer
from kvtier.integrations.vllm.keys import fold_key, key_group
from kvtier.remote.codec import RemoteNamespace, exact_bytes
from kvtier.remote.io_thread import IOThread
from kvtier.remote.options import check_count, check_number
from kvtier.remote.store import RemoteStore
from kvtier.sequence import short_repr

Verdict = Literal["hit", "miss", "retry"]
MAX_SAMPLES = 4096  # latency samples kept per kind, the most recent
MAX_BAD_KEYS = 1 << 16


class JobOutcome(NamedTuple):
    """How one store or load job ended. ``successful_keys`` (loads only): the keys that
    arrived when some did not; None when all share ``success``."""

    job_id: int
    success: bool
    successful_keys: list[bytes] | None
    transfer_s: float
    transfer_bytes: int


class _ProbeDone(NamedTuple):
    hashes: list[int]
    present: set[int]
    probe_s: float
    outage: bool  # the store failed while probing: the keys not present are unknown


class _StoreDone(NamedTuple):
    outcome: JobOutcome
    stored: list[int]  # the hashes it wrote when it succeeded (not those skipped), else none
    present: list[int]  # every hash of the job when it succeeded (the store holds each)
    num_skipped: int  # pages the store already held


class _LoadDone(NamedTuple):
    outcome: JobOutcome
    failed: list[int]
    outage: bool  # the store failed while loading: ``failed`` are unknown, not bad


class _State(Enum):
    PENDING = "pending"  # asked for, not yet sent
    IN_FLIGHT = "in flight"
    PRESENT = "present"
    ABSENT = "absent"


class _Probe:
    __slots__ = ("request_ids", "sent_s", "state")

    def __init__(self) -> None:
        self.state = _State.PENDING
        self.sent_s = 0.0
        self.request_ids: set[str] = set()


@dataclass(slots=True)
class TierStats:
    """Counters of one tier; ``StoreTier.stats`` returns a copy."""

    num_lookups: int = 0
    # Lookups answered HIT: what the tier reported, not what vLLM got (a HIT vLLM cannot
    # promote, its CPU tier full, is asked again next step; a load may fail). The pages a
    # request got are num_loaded_pages.
    num_hits: int = 0
    num_misses: int = 0
    num_retries: int = 0
    num_lookups_given_up: int = 0  # a probe took longer than max_lookup_wait_s
    num_probe_batches: int = 0
    num_probed_keys: int = 0
    num_store_jobs: int = 0
    num_failed_store_jobs: int = 0
    num_stored_pages: int = 0
    num_skipped_pages: int = 0  # already in the store: not written again
    num_load_jobs: int = 0
    num_failed_load_jobs: int = 0
    num_loaded_pages: int = 0
    # Jobs and probes the I/O queue (full) or the closed tier refused; a refused job is
    # also a failed one, as vLLM counts it.
    num_refused_jobs: int = 0
    num_job_errors: int = 0  # a job raised past its own handler: a bug, counted
    bytes_stored: int = 0
    bytes_loaded: int = 0
    probe_s: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    store_s: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    load_s: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))

    def copy(self) -> TierStats:
        return dataclasses.replace(
            self, probe_s=deque(self.probe_s, maxlen=MAX_SAMPLES),
            store_s=deque(self.store_s, maxlen=MAX_SAMPLES),
            load_s=deque(self.load_s, maxlen=MAX_SAMPLES))


class StoreTier:
    """Pages of ``view`` (``page_bytes`` each, addressed by chunk id) kept in ``store``
    under folded vLLM keys.

    May change: the store's values of its namespace, the pages of ``view`` named by a load
    job (on the I/O thread), its own verdicts and stats. Not thread-safe on the caller's
    side (vLLM calls a tier under its manager's lock); results cross from the I/O thread
    through a deque.
    """

    def __init__(self, store: RemoteStore, view: memoryview, page_bytes: int, *,
                 max_lookup_wait_s: float = 0.1, max_queued_jobs: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._page_bytes = check_count("page_bytes", page_bytes, 1, 1 << 40)
        if not isinstance(view, memoryview) or view.format != "B" or view.ndim != 1:
            raise ValueError("view must be a flat memoryview of bytes (memoryview.cast('B'))")
        if view.readonly:
            raise ValueError("view must be writable: loads copy pages into it")
        if len(view) % page_bytes:
            raise ValueError(f"view is {len(view)} bytes, not a whole number of "
                             f"{page_bytes}-byte pages")
        self._max_wait_s = check_number("max_lookup_wait_s", max_lookup_wait_s, 0.0, 3600.0)
        namespace = getattr(store, "namespace", None)
        if (isinstance(namespace, RemoteNamespace)
                and namespace.layout.bytes_per_block != page_bytes):
            # NOTE: taken, every store job failed (the codec refused each page's size) and
            # every load missed, counted as the store's faults: nothing said why.
            raise ValueError(f"the store's blocks are {namespace.layout.bytes_per_block} "
                             f"bytes (namespace {namespace.fingerprint}), the pages "
                             f"page_bytes={page_bytes}: no page could be stored or loaded")
        self._store = store
        self._view = view
        self._num_pages = len(view) // page_bytes
        # NOTE: read as a cache reads its clock (the last good time when it fails): one that
        # raised on the I/O thread ended a job before it reported (vLLM waited on it for
        # ever, a load's pages pinned), and in a lookup or flush raised into vLLM's step.
        self._clock = CacheClock(clock)
        self._io = IOThread(check_count("max_queued_jobs", max_queued_jobs, 1, 1 << 20),
                            self._on_job_error)
        self._results: deque[_ProbeDone | _StoreDone | _LoadDone] = deque()  # by the I/O thread
        self._probes: dict[int, _Probe] = {}
        self._keys_of_request: dict[str, list[int]] = {}
        self._batch: list[int] = []
        self._bad: OrderedDict[int, None] = OrderedDict()  # loads failed: MISS until stored
        # Per request, keys it was told MISS because of an outage: its answer for its life,
        # kept apart from the probes (whose verdicts later requests share).
        self._outage_misses: dict[str, set[int]] = {}
        self._num_probes_in_flight = 0
        self._num_jobs_in_flight = 0
        self._finished: list[JobOutcome] = []
        # Job ids submitted whose outcome ``finished_jobs`` has not handed back yet: a
        # second job under one of them would be reported under the same id.
        self._open_jobs: set[int] = set()
        self._stats = TierStats()
        self._stats_lock = threading.Lock()
        self._closed = False

    # -- queries ---------------------------------------------------------------------------
    @property
    def stats(self) -> TierStats:
        """A copy of the counters. Pure."""
        with self._stats_lock:
            return self._stats.copy()

    def has_pending_work(self) -> bool:
        """Whether probes are unsent or in flight, or jobs open: in flight, or ended and
        not handed back by ``finished_jobs`` (the engine must keep stepping to see them
        end). Pure.

        NOTE: a job's outcome applied by a ``lookup`` (or refused at once) and not handed
        back yet was no pending work: an engine that steps while work is pending stopped,
        and vLLM never learnt that the job ended (a load's CPU pages pinned for ever)."""
        return bool(self._batch or self._num_probes_in_flight or self._open_jobs
                    or self._results)

    # -- lookups ---------------------------------------------------------------------------
    def lookup(self, key: bytes, request_id: str) -> Verdict:
        """``key``'s verdict for ``request_id``; never waits on the store. ValueError,
        changing nothing, for a key that is no OffloadKey or a request id that is no str."""
        block_hash = fold_key(key)
        _check_request_id(request_id)
        self._drain()
        with self._stats_lock:
            self._stats.num_lookups += 1
        verdict = self._verdict(block_hash, request_id)
        with self._stats_lock:
            s = self._stats
            if verdict == "hit":
                s.num_hits += 1
            elif verdict == "miss":
                s.num_misses += 1
            else:
                s.num_retries += 1
        return verdict

    def _verdict(self, block_hash: int, request_id: str) -> Verdict:
        if self._closed or block_hash in self._bad:
            return "miss"
        if block_hash in self._outage_misses.get(request_id, ()):
            return "miss"
        probe = self._probes.get(block_hash)
        if probe is None:
            probe = self._probes[block_hash] = _Probe()
            self._batch.append(block_hash)
        if request_id not in probe.request_ids:
            probe.request_ids.add(request_id)
            self._keys_of_request.setdefault(request_id, []).append(block_hash)
        if probe.state is _State.PRESENT:
            return "hit"
        if probe.state is _State.ABSENT:
            return "miss"
        if probe.state is _State.IN_FLIGHT and self._clock() - probe.sent_s > self._max_wait_s:
            # NOTE: a slow store must not hold a request back: it computes instead. The
            # probe's answer still arrives and serves requests that ask later.
            with self._stats_lock:
                self._stats.num_lookups_given_up += 1
            return "miss"
        return "retry"

    def flush(self) -> None:
        """Send the keys asked for since the last flush as one probe (once per step)."""
        self._drain()
        if not self._batch:
            return
        hashes, self._batch = self._batch, []
        now = self._clock()
        for block_hash in hashes:
            probe = self._probes[block_hash]
            probe.state = _State.IN_FLIGHT
            probe.sent_s = now
        if self._submit(lambda: self._run_probe(hashes, now)):
            self._num_probes_in_flight += 1
        else:
            self._resolve(hashes, set(), outage=True)  # never asked: nothing known

    def request_finished(self, request_id: str) -> None:
        """Forget ``request_id``'s verdicts (those no other request holds go); ValueError
        for a request id that is no str."""
        _check_request_id(request_id)
        self._outage_misses.pop(request_id, None)
        for block_hash in self._keys_of_request.pop(request_id, ()):
            probe = self._probes.get(block_hash)
            if probe is None:
                continue
            probe.request_ids.discard(request_id)
            if not probe.request_ids and probe.state in (_State.PRESENT, _State.ABSENT):
                del self._probes[block_hash]

    # -- jobs ------------------------------------------------------------------------------
    def submit_store(self, job_id: int, keys: Sequence[bytes], chunk_ids: Sequence[int]) -> None:
        """Write the pages ``chunk_ids`` under ``keys`` (the ones the store lacks)."""
        job_id, hashes, pages = self._check_job(job_id, keys, chunk_ids)
        rewrite = {h for h in hashes if h in self._bad}
        with self._stats_lock:
            self._stats.num_store_jobs += 1
        if self._submit(lambda: self._run_store(job_id, hashes, pages, rewrite)):
            self._num_jobs_in_flight += 1
        else:
            self._refused(job_id, "store")

    def submit_load(self, job_id: int, keys: Sequence[bytes], chunk_ids: Sequence[int]) -> None:
        """Copy the values of ``keys`` into the pages ``chunk_ids``, each group's keys up to
        its first that fails (``keys`` in the request's lookup order, as vLLM sends them)."""
        job_id, hashes, pages = self._check_job(job_id, keys, chunk_ids)
        with self._stats_lock:
            self._stats.num_load_jobs += 1
        if self._submit(lambda: self._run_load(job_id, list(keys), hashes, pages)):
            self._num_jobs_in_flight += 1
        else:
            self._refused(job_id, "load")

    def finished_jobs(self) -> list[JobOutcome]:
        """The jobs that ended since the last call."""
        self._drain()
        out, self._finished = self._finished, []
        for outcome in out:
            self._open_jobs.discard(outcome.job_id)
        return out

    def drain(self) -> None:
        """Wait until every submitted job and probe has ended (their outcomes are then
        queued for ``finished_jobs``). A job is never cut short."""
        self._io.wait_idle(None)
        self._drain()

    def close(self) -> None:
        """Run the accepted jobs, stop the I/O thread; later lookups miss and later jobs
        fail. Does not close the store (its owner does). Idempotent."""
        self._closed = True
        self._io.stop()
        self._drain()
        # NOTE: keys asked for and not sent yet were never resolved: pending work for ever.
        hashes, self._batch = self._batch, []
        for block_hash in hashes:
            self._probes[block_hash].state = _State.IN_FLIGHT
        self._resolve(hashes, set())

    def check_invariants(self) -> None:
        """Recount the verdict books from scratch."""
        holders: dict[int, set[str]] = {}
        for request_id, hashes in self._keys_of_request.items():
            assert len(hashes) == len(set(hashes)), f"{request_id} holds a key twice"
            for block_hash in hashes:
                holders.setdefault(block_hash, set()).add(request_id)
        for block_hash, probe in self._probes.items():
            assert probe.request_ids == holders.get(block_hash, set()), block_hash
            if not probe.request_ids:
                assert probe.state in (_State.PENDING, _State.IN_FLIGHT), block_hash
        assert set(self._batch) == {h for h, p in self._probes.items()
                                    if p.state is _State.PENDING}
        for request_id, missed in self._outage_misses.items():
            assert not missed & set(self._keys_of_request.get(request_id, ())), request_id
        assert self._num_probes_in_flight >= 0 and self._num_jobs_in_flight >= 0
        assert len(self._bad) <= MAX_BAD_KEYS

    # -- internals -------------------------------------------------------------------------
    def _check_job(self, job_id: int, keys: Sequence[bytes], chunk_ids: Sequence[int]
                   ) -> tuple[int, list[int], list[int]]:
        # NOTE: ``int(c)`` took a chunk id of 1.9 as page 1, "2" as page 2 and True as
        # page 1 (another request's page written or read), and a job id of "x" was handed
        # back to the engine as such.
        # NOTE: ids read as the plain ints they are (``kvtier.counts``): a NumPy chunk id
        # was refused.
        plain_id = as_integer(job_id)
        if plain_id is None:
            raise ValueError(f"job_id must be an int, got {short_repr(job_id)}")
        job_id = plain_id
        if job_id in self._open_jobs:
            raise ValueError(f"job {job_id} is still open (its outcome not handed back by "
                             f"finished_jobs): a second job under its id would be reported "
                             f"as it")
        if len(keys) != len(chunk_ids):
            raise ValueError(f"a job has {len(keys)} keys but {len(chunk_ids)} chunk ids")
        pages: list[int] = []
        for i, given in enumerate(chunk_ids):
            page = as_integer(given)
            if page is None:
                raise ValueError(f"chunk_ids[{i}] must be an int, got {short_repr(given)}")
            pages.append(page)
            if not 0 <= page < self._num_pages:
                raise ValueError(f"chunk id {page} is outside the {self._num_pages} pages "
                                 f"(chunk_ids[{i}])")
        if len(set(pages)) < len(pages):
            # NOTE: one page under two keys: a store wrote it under both (one of them another
            # chunk's bytes, in the store every engine reads), a load wrote both values into
            # it and reported both loaded (one chunk's page holding the other's KV).
            first: dict[int, int] = {}
            for i, page in enumerate(pages):
                if page in first:
                    raise ValueError(f"chunk id {page} is given twice (chunk_ids[{first[page]}] "
                                     f"and chunk_ids[{i}]): one page holds one chunk")
                first[page] = i
        hashes = [fold_key(k) for k in keys]
        self._open_jobs.add(job_id)  # NOTE: last: a refused job opens nothing
        return job_id, hashes, pages

    def _page(self, chunk_id: int) -> memoryview:
        start = chunk_id * self._page_bytes
        return self._view[start:start + self._page_bytes]

    def _submit(self, job: Callable[[], None]) -> bool:
        accepted = not self._closed and self._io.submit(job)
        if not accepted:
            with self._stats_lock:
                self._stats.num_refused_jobs += 1
        return accepted

    def _refused(self, job_id: int, kind: Literal["store", "load"]) -> None:
        # NOTE: counted failed: a refused job was counted a job but no failure, so of
        # num_load_jobs 1, num_failed_load_jobs 0, a load that never ran read as one that
        # succeeded (vLLM had counted a failed promotion and recomputed).
        with self._stats_lock:
            if kind == "load":
                self._stats.num_failed_load_jobs += 1
            else:
                self._stats.num_failed_store_jobs += 1
        self._finished.append(JobOutcome(job_id, False, None, 0.0, 0))

    def _on_job_error(self, exc: BaseException) -> None:
        # Every job catches the store's faults; reaching here is a bug of this class.
        with self._stats_lock:
            self._stats.num_job_errors += 1

    def _run_probe(self, hashes: list[int], sent_s: float) -> None:
        num_faults = self._num_faults()
        try:
            present = _as_set(self._store.contains_many(hashes))
            outage = self._num_faults() > num_faults
        except Exception:  # a store must not raise; if one does, nothing is known
            present, outage = set(), True
        self._results.append(_ProbeDone(hashes, present, self._clock() - sent_s, outage))

    def _run_store(self, job_id: int, hashes: list[int], pages: list[int],
                   rewrite: set[int]) -> None:
        start = self._clock()
        items: dict[int, memoryview] = {}
        num_written = 0
        # NOTE: counted once the store answered: a check that raised counted every page of
        # the job as one the store already held.
        num_skipped = 0
        try:
            present = _as_set(
                self._store.contains_many([h for h in hashes if h not in rewrite]))
            items = {h: self._page(p) for h, p in zip(hashes, pages, strict=True)
                     if h not in present}
            num_skipped = len(hashes) - len(items)
            # NOTE: pages go as views of the pinned chunks (the codec copies them once, into
            # the value); put_many takes any buffer though it is typed for bytes.
            num_written = self._store.put_many(cast("dict[int, bytes]", items)) if items else 0
            if type(num_written) is not int or not 0 <= num_written <= len(items):
                num_written = -1  # no count of the pages written: the job failed
        except Exception:  # a store fault is a failed job, never a crash
            num_written = -1
        ok = num_written == len(items)
        outcome = JobOutcome(job_id, ok, None, self._clock() - start,
                             max(num_written, 0) * self._page_bytes)
        # NOTE: only what it wrote: a key it skipped as present may have failed a load
        # queued before it (a corrupt value); clearing that key's bad mark made it HIT again.
        self._results.append(_StoreDone(outcome, list(items) if ok else [],
                                        hashes if ok else [], num_skipped))

    def _num_faults(self) -> int:
        """The store's count of faults so far (``RemoteStats.num_faults``), 0 where it
        keeps none that reads."""
        try:
            return int(self._store.stats.num_faults)
        except Exception:
            return 0

    def _run_load(self, job_id: int, keys: list[bytes], hashes: list[int],
                  pages: list[int]) -> None:
        start = self._clock()
        num_faults = self._num_faults()
        try:
            found = self._store.get_many(hashes)
            outage = self._num_faults() > num_faults
        except Exception:  # a store fault is a failed job, never a crash
            found, outage = {}, True
        if not isinstance(found, dict):
            found, outage = {}, True  # an answer of no use: every key failed
        loaded: list[bytes] = []
        failed: list[int] = []
        broken_groups: set[int] = set()
        for key, block_hash, page in zip(keys, hashes, pages, strict=True):
            group = key_group(key)
            if group in broken_groups:
                # NOTE: a chunk past a failed one of its group, in the request's lookup
                # order (its prefix): reported arrived, vLLM kept it in its CPU tier (the
                # request's prefix ends at the gap), counted it promoted, and the request
                # that computed it found it cached: a reuse that nothing used. Not bad: its
                # value is sound, and a later lookup asks for it again.
                continue
            payload = exact_bytes(found.get(block_hash), self._page_bytes)
            if payload is None:
                failed.append(block_hash)
                broken_groups.add(group)
                continue
            self._page(page)[:] = payload
            loaded.append(key)
        ok = len(loaded) == len(keys)
        outcome = JobOutcome(job_id, ok, None if ok else loaded, self._clock() - start,
                             len(loaded) * self._page_bytes)
        self._results.append(_LoadDone(outcome, failed, outage))

    def _resolve(self, hashes: list[int], present: set[int], *, outage: bool = False) -> None:
        """The answer of the probe of ``hashes``: those in ``present`` are PRESENT, the
        others ABSENT, but with ``outage`` (the store failed while probing) unknown.

        NOTE: a probe that failed in an outage made its keys ABSENT, the verdict of every
        request that asked while one that held it lived: the MISS of a store down was
        shared with requests that came after it was back."""
        unknown: list[int] = []
        for block_hash in hashes:
            probe = self._probes.get(block_hash)
            if probe is None or probe.state is not _State.IN_FLIGHT:
                continue
            if block_hash in present:
                probe.state = _State.PRESENT
            elif outage:
                unknown.append(block_hash)
                continue
            else:
                probe.state = _State.ABSENT
            if not probe.request_ids:
                del self._probes[block_hash]
        self._forget_unknown(unknown)

    def _learn_present(self, hashes: list[int]) -> None:
        """A store job of ours left ``hashes`` in the store: probes that learnt otherwise
        (or are still on their way) answer HIT from now on.

        NOTE: the MISS a request's probe learnt stayed every request's verdict while that
        request lived: the pages it then computed and stored were a MISS for every other
        request (a long decode's whole prompt, recomputed by each request sharing it)."""
        for block_hash in hashes:
            probe = self._probes.get(block_hash)
            if probe is None or probe.state is _State.PENDING:
                continue  # a pending probe is sent at the step's end and finds it
            if probe.request_ids:
                probe.state = _State.PRESENT
            else:
                del self._probes[block_hash]  # in flight, asked for by no live request

    def _forget_unknown(self, hashes: list[int]) -> None:
        """An outage of the store left ``hashes`` unknown: the requests holding a verdict on
        one are told MISS for their life (they compute), and its probe is dropped, so a
        later request probes it afresh.

        NOTE: a load that failed because the store was down marked its keys bad: MISSes
        for every request, for good (until this engine stored them again), though the
        values were sound and the store came back."""
        for block_hash in hashes:
            probe = self._probes.get(block_hash)
            if probe is None or probe.state is _State.PENDING:
                continue  # a pending probe is sent at the step's end and asks afresh
            for request_id in probe.request_ids:
                self._outage_misses.setdefault(request_id, set()).add(block_hash)
                self._keys_of_request[request_id].remove(block_hash)
            del self._probes[block_hash]

    def _mark_bad(self, hashes: list[int]) -> None:
        for block_hash in hashes:
            self._bad[block_hash] = None
            self._bad.move_to_end(block_hash)
            probe = self._probes.get(block_hash)
            if probe is not None and probe.state is _State.PRESENT:
                probe.state = _State.ABSENT
        while len(self._bad) > MAX_BAD_KEYS:
            self._bad.popitem(last=False)

    def _drain(self) -> None:
        """Apply what the I/O thread finished (on the caller's thread: it owns the books)."""
        results = self._results
        while results:
            done = results.popleft()
            if isinstance(done, _ProbeDone):
                self._num_probes_in_flight -= 1
                self._resolve(done.hashes, done.present, outage=done.outage)
                with self._stats_lock:
                    self._stats.num_probe_batches += 1
                    self._stats.num_probed_keys += len(done.hashes)
                    self._stats.probe_s.append(done.probe_s)
                continue
            self._num_jobs_in_flight -= 1
            outcome = done.outcome
            if isinstance(done, _StoreDone):
                for block_hash in done.stored:
                    self._bad.pop(block_hash, None)
                self._learn_present(done.present)
                with self._stats_lock:
                    s = self._stats
                    s.num_failed_store_jobs += not outcome.success
                    s.num_stored_pages += outcome.transfer_bytes // self._page_bytes
                    s.num_skipped_pages += done.num_skipped
                    s.bytes_stored += outcome.transfer_bytes
                    s.store_s.append(outcome.transfer_s)
            else:
                if done.outage:
                    self._forget_unknown(done.failed)
                else:
                    self._mark_bad(done.failed)
                with self._stats_lock:
                    s = self._stats
                    s.num_failed_load_jobs += not outcome.success
                    s.num_loaded_pages += outcome.transfer_bytes // self._page_bytes
                    s.bytes_loaded += outcome.transfer_bytes
                    s.load_s.append(outcome.transfer_s)
            self._finished.append(outcome)


# NOTE: a job that raised on the I/O thread would never report: its job would stay in
# flight for ever and vLLM would wait on it (a load pins its CPU pages). So what a store
# answers is checked before use, as a caller's store client (a subclass, past the codec's
# checks) may answer anything: an answer of the wrong type is a miss, never an exception.


def _as_set(present: object) -> set[int]:
    """``contains_many``'s answer, or no key present if it is no set."""
    if isinstance(present, set):
        return present
    return set(present) if isinstance(present, frozenset) else set()


def _check_request_id(request_id: object) -> None:
    """ValueError unless ``request_id`` is a str (vLLM's req_id). Pure.

    NOTE: a list was a TypeError after the lookup was counted and its probe queued; None
    or an int were kept as the key of a request's verdicts."""
    if not isinstance(request_id, str):
        raise ValueError(f"request_id must be a str, got {short_repr(request_id)}")
