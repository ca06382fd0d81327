"""The remote tier of one engine: its KV blocks shared with other engines through a store.

::

    write    write-through: a request's prompt is computed, its full blocks' KV goes to the
             store, keyed by the chained block hash; write-back: a host block's KV goes
             there as the block leaves the cache (read from its slot before the step's
             plan may reuse it). Both queued on the store's I/O thread
    fetch    a request waits: the blocks of its prompt past what the local tiers hold are
             looked up in the store on the I/O thread (``start_fetch``); ``poll`` imports
             the consecutive run found into host blocks (``KVCacheManager.import_blocks``)
             and writes their KV there, so admission onboards them like any host hit, with
             exact credit. The engine holds the request back until its fetch is done or
             ``fetch_deadline_s`` passes, then it goes on without what has not arrived.
    decide   with ``recompute_s_per_token`` (the model's prefill seconds per token), only
             the part of the missing prefix whose fetch beats its recompute is read
             (:func:`num_blocks_worth_fetching`), under the read throughput the tier
             measures on its own fetches (``measured_bytes_per_s``); without it, all of it.

Under tensor parallelism every rank holds its share of each block's KV heads, and each
rank's shard is its own value under that rank's namespace
(:meth:`~kvtier.remote.codec.RemoteNamespace.for_rank`). The tier talks to every rank's
:class:`RemoteShard` (its store and storages) through :class:`RemoteRanks`, and stays
rank-agnostic itself::

    write   every rank puts its shard of each block (its own store client, its own I/O)
    fetch   every rank looks its shards up; a block counts as found only when every rank
            found (and decoded) its shard, counted from the first (num_found_on_every_rank):
            the manager imports that many host blocks once, then each rank writes its
            shards into those slots. A shard missing or corrupt on one rank is a miss there,
            so that block and every later one are a miss on all ranks (never half written)
    ranks   LocalRanks: every rank's shard in this process (TP 1 is one of them);
            kvtier.model.tp_engine.DistributedRanks: one process per rank, the leader's
            tier sends each call to the workers and joins their results

Keys are content hashes under a namespace that fingerprints model, block shape, dtype and
memory layout (the tier refuses a store whose namespace is not its storages' layout), and a
value is refused unless its header matches: another model, layout or a corrupt value is a
miss. Store faults are misses too (the store never raises): the request recomputes. A
prompt's hash chain is computed once per fetch.

Contract: ``RemoteTier`` may change the shared store's values, the manager's host tier (only
through ``import_blocks`` and ``drain_spills``), the KV bytes of the host slots it imports
into (on every rank), and its own counters; it never changes a block that a live request
holds.
"""

from __future__ import annotations

import itertools
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple, get_args

from kvtier.hashing import get_hash_fn, prompt_block_hashes
from kvtier.remote.codec import num_found_on_every_rank
from kvtier.remote.options import check_number
from kvtier.remote.store import RemoteStore
from kvtier.tier import Tier

if TYPE_CHECKING:
    import torch

    from kvtier.manager import KVCacheManager
    from kvtier.remote.codec import RemoteNamespace
    from kvtier.storage import KVStorage


@dataclass(slots=True)
class _Fetch:
    """A fetch in flight for a waiting request."""

    tokens: list[int]
    salt: bytes | str | int | None
    lora_id: int | None
    hashes: list[int]  # of the prompt's reusable full blocks, computed once
    started_s: float
    fetch_id: int  # the ranks' name for it
    released: bool = False


# What a fetch costs before the first measurement: the simulator's RemoteLink defaults
# (kvtier.sim.timemodel, a test keeps them equal), measured by benchmarks/bench_remote.py
# (4 MiB blocks from one Redis on loopback; benchmarks/results/remote.md). The tier replaces
# the throughput with what its own fetches take.
DEFAULT_FETCH_LATENCY_S = 0.1e-3
DEFAULT_FETCH_BYTES_PER_S = 0.25e9
# Weight of the newest fetch in the tier's running estimate of the store's read throughput.
THROUGHPUT_EWMA_WEIGHT = 0.25


def num_blocks_worth_fetching(num_blocks: int, *, latency_s: float, fetch_s_per_block: float,
                              recompute_s_per_block: float,
                              max_wait_s: float | None = None) -> int:
    """How many of the next ``num_blocks`` blocks of a prefix to fetch from a remote store
    rather than recompute: the first ``k``, where ``k`` is the answer. Pure.

    ::

        prefix   | local tiers | fetched: k blocks   | recomputed: the rest      |
        time     fetch = latency_s + k x fetch_s_per_block  vs  k x recompute_s_per_block

    The rule, per fetch, from the costs the caller measures or is configured with:

    1. A block is worth fetching only if reading it is faster than computing it:
       ``fetch_s_per_block < recompute_s_per_block``, i.e. the store's read throughput is
       above the break-even ``KV bytes per token / prefill seconds per token`` (131,072 B /
       40 us = 3.3 GB/s for Llama-3-8B on an H100). Otherwise nothing is fetched.
    2. Blocks that could not arrive within ``max_wait_s`` (a request's fetch deadline) are
       not fetched: the request would go on without them. So a prefix's first blocks may be
       worth fetching and the rest not.
    3. The fixed ``latency_s`` must be paid back: ``k x (recompute - fetch) > latency_s``.
       The saving grows with ``k``, so the answer is the most blocks rule 2 allows, or 0.

    Raises ValueError for a negative count or a cost that is not a finite number >= 0.
    """
    if type(num_blocks) is not int or num_blocks < 0:
        raise ValueError(f"num_blocks must be an integer >= 0, got {num_blocks!r}")
    latency_s = check_number("latency_s", latency_s, 0.0, 3600.0)
    fetch_s = check_number("fetch_s_per_block", fetch_s_per_block, 0.0, 3600.0)
    recompute_s = check_number("recompute_s_per_block", recompute_s_per_block, 0.0, 3600.0)
    if num_blocks == 0 or fetch_s >= recompute_s:
        return 0
    k = num_blocks
    if max_wait_s is not None:
        wait_s = check_number("max_wait_s", max_wait_s, 0.0, 3600.0)
        if latency_s >= wait_s:
            return 0
        if fetch_s > 0:
            k = min(k, int((wait_s - latency_s) / fetch_s))
    return k if k * (recompute_s - fetch_s) > latency_s else 0


WritePolicy = Literal["write-through", "write-back"]
"""When blocks reach the shared store: as soon as they are computed (write-through), or
when host blocks leave the cache (write-back)."""
WRITE_POLICIES: tuple[WritePolicy, ...] = get_args(WritePolicy)


class Arrival(NamedTuple):
    """What one fetch found: on one rank, or joined over every rank (:func:`join_arrivals`)."""

    found_by_rank: tuple[frozenset[int], ...]  # hashes of the valid values, in rank order
    num_bytes: int  # of the payloads the leader (rank 0) found
    elapsed_s: float  # on the leader, from asking to having them


def join_arrivals(by_rank: Sequence[Mapping[int, Arrival]]) -> dict[int, Arrival]:
    """The fetches that arrived on every rank (``by_rank[r]``: rank ``r``'s own, by fetch
    id), each with every rank's found hashes and the leader's bytes and time. Pure."""
    if not by_rank:
        raise ValueError("by_rank must hold the arrivals of at least one rank")
    leader, others = by_rank[0], by_rank[1:]
    return {fid: Arrival(tuple(h for rank in by_rank for h in rank[fid].found_by_rank),
                         first.num_bytes, first.elapsed_s)
            for fid, first in leader.items() if all(fid in rank for rank in others)}


class RemoteShard:
    """One rank's side of the remote tier: its ``store`` (keyed under its rank's namespace),
    its ``gpu`` and ``host`` storages of that layout, and what its fetches found until the
    tier says which host slots it goes to.

    May change: the store's values, the host slots :meth:`fill` names, its fetch results.
    """

    def __init__(self, store: RemoteStore, gpu: KVStorage, host: KVStorage) -> None:
        layout = store.namespace.layout
        for name, storage in (("gpu", gpu), ("host", host)):
            if storage.layout != layout:
                raise ValueError(f"the store's namespace has layout {layout}, the {name} "
                                 f"storage {storage.layout}: their blocks would be misread")
        self.store = store
        self.gpu = gpu
        self.host = host
        self._found: dict[int, tuple[dict[int, bytes], float]] = {}  # by fetch id
        self._cond = threading.Condition()

    def put(self, tier: Tier, blocks: Sequence[tuple[int, int]], wait: bool) -> int:
        """Hand the store the blocks ``(hash, slot)`` of the ``tier`` storage, their bytes
        copied now: written now with ``wait``, else on the I/O thread. Returns how many
        were written (``wait``) or handed over."""
        storage = self.gpu if tier is Tier.GPU else self.host
        items = {h: _to_bytes(storage.block(slot)) for h, slot in blocks}
        if not items:
            return 0
        if wait:
            return self.store.put_many(items)
        return len(items) if self.store.write_back(items) else 0

    def start_get(self, fetch_id: int, hashes: Sequence[int]) -> bool:
        """Look ``hashes`` up on the I/O thread; False if the store refused the job."""
        started_s = time.monotonic()

        def arrived(found: dict[int, bytes]) -> None:
            self._arrive(fetch_id, found, time.monotonic() - started_s)

        return self.store.prefetch(hashes, arrived)

    def get(self, fetch_id: int, hashes: Sequence[int]) -> None:
        """Look ``hashes`` up now (blocking)."""
        started_s = time.monotonic()
        found = self.store.get_many(hashes)
        self._arrive(fetch_id, found, time.monotonic() - started_s)

    def miss(self, fetch_id: int) -> None:
        """Record that this rank found nothing for ``fetch_id`` (its store refused it)."""
        self._arrive(fetch_id, {}, 0.0)

    def _arrive(self, fetch_id: int, found: dict[int, bytes], elapsed_s: float) -> None:
        with self._cond:
            self._found[fetch_id] = (found, elapsed_s)
            self._cond.notify_all()

    def arrivals(self, fetch_ids: Collection[int]) -> dict[int, Arrival]:
        """Those of ``fetch_ids`` that arrived here. Pure."""
        with self._cond:
            got = {fid: self._found[fid] for fid in fetch_ids if fid in self._found}
        return {fid: Arrival((frozenset(found),), sum(len(v) for v in found.values()), seconds)
                for fid, (found, seconds) in got.items()}

    def wait(self, fetch_id: int, timeout_s: float) -> None:
        """Block until ``fetch_id`` arrived here or ``timeout_s`` passed."""
        with self._cond:
            self._cond.wait_for(lambda: fetch_id in self._found, timeout_s)

    def fill(self, fetch_id: int, blocks: Sequence[tuple[int, int]]) -> None:
        """Write what ``fetch_id`` found into host slots: ``(hash, slot)`` pairs (each hash
        found here); forget the fetch."""
        with self._cond:
            found, _ = self._found.pop(fetch_id)
        for h, slot in blocks:
            _write_block(self.host, slot, found[h])

    @property
    def num_unfilled(self) -> int:
        """Fetches that arrived here and were not filled yet. Pure."""
        with self._cond:
            return len(self._found)


class RemoteRanks(ABC):
    """Every rank's :class:`RemoteShard` as one. The tier calls these from the leader, in
    one order; each call reaches every rank. ``leader`` is rank 0's shard (this process's).
    """

    leader: RemoteShard
    tp_size: int

    @abstractmethod
    def put(self, tier: Tier, blocks: Sequence[tuple[int, int]], wait: bool) -> int:
        """:meth:`RemoteShard.put` on every rank; the leader's count, or with ``wait`` the
        fewest any rank wrote."""

    @abstractmethod
    def start_get(self, fetch_id: int, hashes: Sequence[int]) -> bool:
        """:meth:`RemoteShard.start_get` on every rank; False (started nowhere) when the
        leader's store refused it (another rank's refusal is a miss there)."""

    @abstractmethod
    def get(self, fetch_id: int, hashes: Sequence[int]) -> None:
        """:meth:`RemoteShard.get` on every rank (blocking)."""

    @abstractmethod
    def wait(self, fetch_id: int, timeout_s: float) -> None:
        """Block until ``fetch_id`` arrived on every rank or ``timeout_s`` passed."""

    @abstractmethod
    def collect(self, fetch_ids: Collection[int]) -> dict[int, Arrival]:
        """Those of ``fetch_ids`` that arrived on every rank (:func:`join_arrivals`); the
        caller must :meth:`fill` each one."""

    @abstractmethod
    def fill(self, fetch_id: int, blocks: Sequence[tuple[int, int]]) -> None:
        """:meth:`RemoteShard.fill` on every rank."""

    @abstractmethod
    def flush(self, timeout_s: float | None) -> bool:
        """Wait until every rank's queued writes and fetches ran; False if ``timeout_s``
        passed on any rank."""


class LocalRanks(RemoteRanks):
    """Every rank's shard in this process (one rank without tensor parallelism): ``shards[r]``
    is rank ``r``'s, over pools of the same sizes, under the namespaces of one deployment."""

    def __init__(self, shards: Sequence[RemoteShard]) -> None:
        if not shards:
            raise ValueError("shards must hold at least one rank's RemoteShard")
        check_rank_namespaces([s.store.namespace for s in shards])
        sizes = {(s.gpu.num_blocks, s.host.num_blocks) for s in shards}
        if len(sizes) != 1:
            raise ValueError(f"every rank must hold pools of the same size (the same block "
                             f"ids), got (gpu, host) blocks {sorted(sizes)}")
        self.shards = list(shards)
        self.leader = shards[0]
        self.tp_size = len(shards)

    def put(self, tier: Tier, blocks: Sequence[tuple[int, int]], wait: bool) -> int:
        counts = [s.put(tier, blocks, wait) for s in self.shards]
        return min(counts) if wait else counts[0]

    def start_get(self, fetch_id: int, hashes: Sequence[int]) -> bool:
        if not self.leader.start_get(fetch_id, hashes):
            return False
        for shard in self.shards[1:]:
            if not shard.start_get(fetch_id, hashes):
                shard.miss(fetch_id)
        return True

    def get(self, fetch_id: int, hashes: Sequence[int]) -> None:
        for shard in self.shards:
            shard.get(fetch_id, hashes)

    def wait(self, fetch_id: int, timeout_s: float) -> None:
        deadline_s = time.monotonic() + timeout_s
        for shard in self.shards:
            shard.wait(fetch_id, max(0.0, deadline_s - time.monotonic()))

    def collect(self, fetch_ids: Collection[int]) -> dict[int, Arrival]:
        return join_arrivals([s.arrivals(fetch_ids) for s in self.shards])

    def fill(self, fetch_id: int, blocks: Sequence[tuple[int, int]]) -> None:
        for shard in self.shards:
            shard.fill(fetch_id, blocks)

    def flush(self, timeout_s: float | None) -> bool:
        if timeout_s is None:
            return all([s.store.flush(None) for s in self.shards])
        deadline_s = time.monotonic() + timeout_s
        return all([s.store.flush(max(0.0, deadline_s - time.monotonic()))
                    for s in self.shards])


def check_rank_namespaces(namespaces: Sequence[RemoteNamespace]) -> None:
    """ValueError unless ``namespaces[r]`` is rank ``r``'s of one deployment (one model,
    layout and salt scope, split over ``len(namespaces)`` ranks). Pure."""
    expected = namespaces[0].every_rank()
    if len(expected) != len(namespaces):
        raise ValueError(f"{len(namespaces)} ranks' stores, but the first store's namespace "
                         f"is rank {namespaces[0].layout.tp_rank} of {len(expected)}")
    for rank, (got, want) in enumerate(zip(namespaces, expected, strict=True)):
        if got != want:
            raise ValueError(f"rank {rank}'s store has namespace {got}, expected {want} "
                             f"(rank {rank} of {len(expected)})")


class RemoteTier:
    """Moves whole blocks between ``manager``'s storages and a shared store: ``store`` with
    this process's ``gpu`` and ``host`` storages, or every rank's (:class:`RemoteRanks`,
    with ``gpu`` and ``host`` left out: each rank's :class:`RemoteShard` holds its own)."""

    def __init__(self, store: RemoteStore | RemoteRanks, manager: KVCacheManager,
                 gpu: KVStorage | None = None, host: KVStorage | None = None,
                 fetch_deadline_s: float = 1.0, write_policy: WritePolicy = "write-through",
                 *, recompute_s_per_token: float | None = None,
                 fetch_latency_s: float = DEFAULT_FETCH_LATENCY_S,
                 fetch_bytes_per_s: float = DEFAULT_FETCH_BYTES_PER_S) -> None:
        config = manager.config
        if config.hash_algo != "sha256":
            raise ValueError("a shared remote tier needs hash_algo='sha256' (the same hash "
                             f"in every process and machine), got {config.hash_algo!r}")
        if not config.num_host_blocks:
            raise ValueError("a remote tier imports into host blocks: num_host_blocks is 0")
        if isinstance(store, RemoteRanks):
            if gpu is not None or host is not None:
                raise ValueError("with RemoteRanks each rank's RemoteShard holds its storages: "
                                 "leave gpu and host out")
            ranks = store
        elif gpu is None or host is None:
            raise ValueError("a remote tier over one store needs the gpu and host storages")
        else:
            ranks = LocalRanks([RemoteShard(store, gpu, host)])
        layout = ranks.leader.store.namespace.layout
        if layout.tokens_per_block != config.tokens_per_block:
            raise ValueError(f"the store's blocks hold {layout.tokens_per_block} tokens, the "
                             f"manager's {config.tokens_per_block}")
        self.fetch_deadline_s = check_number("fetch_deadline_s", fetch_deadline_s, 0.0, 3600.0)
        if write_policy not in WRITE_POLICIES:
            raise ValueError(f"write_policy must be one of {WRITE_POLICIES}, got {write_policy!r}")
        self.recompute_s_per_token = None
        if recompute_s_per_token is not None:
            self.recompute_s_per_token = check_number(
                "recompute_s_per_token", recompute_s_per_token, 0.0, 3600.0)
        self.fetch_latency_s = check_number("fetch_latency_s", fetch_latency_s, 0.0, 3600.0)
        self._bytes_per_s = check_number("fetch_bytes_per_s", fetch_bytes_per_s, 0.0, 1e15,
                                         low_open=True)
        self.ranks = ranks
        # The leader's (rank 0's) store and storages.
        self.store = ranks.leader.store
        self.gpu = ranks.leader.gpu
        self.host = ranks.leader.host
        self.write_policy = write_policy
        if write_policy == "write-back":
            manager.record_spills()
        self._pending: dict[str, _Fetch] = {}
        self._fetch_ids = itertools.count()
        self._lock = threading.Lock()
        self.manager = manager
        self._hash_fn = get_hash_fn(config.hash_algo)
        self._tpb = config.tokens_per_block
        self.num_written_blocks = 0
        self.num_fetched_blocks = 0
        self.num_skipped_blocks = 0  # missing blocks cheaper to recompute than to fetch

    @property
    def measured_bytes_per_s(self) -> float:
        """The store's read throughput as this tier's fetches saw it (bytes of the values
        found over the time from asking to having them, queueing included; a running
        average; the leader's store under tensor parallelism, each rank reading its own
        shards at once), or ``fetch_bytes_per_s`` before the first fetch that found
        anything. Pure."""
        with self._lock:
            return self._bytes_per_s

    def num_blocks_to_fetch(self, num_missing: int) -> int:
        """How many of ``num_missing`` blocks past the local tiers this tier would fetch now:
        all of them without ``recompute_s_per_token``, else :func:`num_blocks_worth_fetching`
        under the measured throughput and ``fetch_deadline_s``. Pure.

        NOTE: the rule assumes the store holds every one of them; where it holds fewer, the
        fetch saves less, and loses at most one ``fetch_latency_s`` against a recompute.
        Under tensor parallelism a block's bytes are a rank's shard: the ranks read at once."""
        if self.recompute_s_per_token is None:
            return num_missing
        bytes_per_block = self.store.namespace.layout.bytes_per_block
        return num_blocks_worth_fetching(
            num_missing, latency_s=self.fetch_latency_s,
            fetch_s_per_block=bytes_per_block / self.measured_bytes_per_s,
            recompute_s_per_block=self._tpb * self.recompute_s_per_token,
            max_wait_s=self.fetch_deadline_s)

    def _wanted(self, hashes: list[int], tokens: list[int], salt: bytes | str | int | None,
                lora_id: int | None) -> list[int]:
        """The hashes to fetch: past the local tiers, as many as are worth it."""
        missing = hashes[self._num_local_blocks(tokens, salt, lora_id):]
        k = self.num_blocks_to_fetch(len(missing))
        self.num_skipped_blocks += len(missing) - k
        return missing[:k]

    def _measured(self, arrival: Arrival) -> None:
        """Fold one fetch's throughput into the running estimate."""
        if not arrival.num_bytes or arrival.elapsed_s <= 0:
            return
        sample = arrival.num_bytes / arrival.elapsed_s
        with self._lock:
            self._bytes_per_s += THROUGHPUT_EWMA_WEIGHT * (sample - self._bytes_per_s)

    def block_hashes(self, tokens: list[int], salt: object, lora_id: int | None) -> list[int]:
        """The chained hashes of the full blocks of ``tokens``, as the manager names them.
        Pure."""
        return prompt_block_hashes(self._hash_fn, tokens, self._tpb, lora_id, salt)

    def _reusable_hashes(self, tokens: list[int], salt: object,
                         lora_id: int | None) -> list[int]:
        # The last prompt token is never reused, so neither is a block that ends with it.
        num_blocks = max(len(tokens) - 1, 0) // self._tpb
        return prompt_block_hashes(self._hash_fn, tokens, self._tpb, lora_id, salt,
                                   num_blocks=num_blocks)

    def _num_local_blocks(self, tokens: list[int], salt: bytes | str | int | None,
                          lora_id: int | None) -> int:
        """Full blocks of the prompt the local tiers hold now (a pure lookup, no hashing)."""
        m = self.manager.lookup(tokens, salt=salt, lora_id=lora_id)
        return (m.num_tokens - m.num_partial_tokens) // self._tpb

    def write(self, tokens: list[int], block_table: list[int], salt: object = None,
              lora_id: int | None = None, wait: bool = False) -> int:
        """Write the full blocks of computed ``tokens`` from their GPU slots, every rank its
        shard (their bytes are copied now, the store is written on its I/O thread, or now
        with ``wait``); returns how many blocks were handed to the store."""
        hashes = self.block_hashes(tokens, salt, lora_id)
        blocks = list(zip(hashes, block_table, strict=False))
        if not blocks:
            return 0
        written = self.ranks.put(Tier.GPU, blocks, wait)
        self.num_written_blocks += written
        return written

    def write_spilled(self) -> int:
        """Write-back: hand the store the host blocks that left the cache since the last
        call, every rank its shard, read from their slots now (call it before executing the
        step's plan, which may reuse them). Returns how many blocks were handed over."""
        blocks = list(self.manager.drain_spills())
        if not blocks:
            return 0
        written = self.ranks.put(Tier.HOST, blocks, False)
        self.num_written_blocks += written
        return written

    def fetch(self, tokens: list[int], salt: bytes | str | int | None = None,
              lora_id: int | None = None) -> int:
        """Fetch now (blocking) and import the blocks of ``tokens`` that the store has past
        the local tiers' prefix into host blocks; returns how many were imported."""
        hashes = self._reusable_hashes(tokens, salt, lora_id)
        wanted = self._wanted(hashes, tokens, salt, lora_id)
        if not wanted:
            return 0
        fetch = _Fetch(list(tokens), salt, lora_id, hashes, 0.0, next(self._fetch_ids))
        self.ranks.get(fetch.fetch_id, wanted)
        arrival = self.ranks.collect([fetch.fetch_id])[fetch.fetch_id]
        self._measured(arrival)
        return self._import(fetch, arrival)

    def start_fetch(self, request_id: str, tokens: list[int],
                    salt: bytes | str | int | None = None, lora_id: int | None = None) -> bool:
        """Look the prompt's missing blocks up on the stores' I/O threads; False when there
        is nothing to look up or the store refused the job (then don't wait for it)."""
        if request_id in self._pending:
            return False
        hashes = self._reusable_hashes(tokens, salt, lora_id)
        wanted = self._wanted(hashes, tokens, salt, lora_id)
        if not wanted:
            return False
        fetch = _Fetch(list(tokens), salt, lora_id, hashes, time.monotonic(),
                       next(self._fetch_ids))
        if not self.ranks.start_get(fetch.fetch_id, wanted):
            return False
        self._pending[request_id] = fetch
        return True

    def poll(self) -> list[str]:
        """Import what arrived on every rank; return the requests whose wait is over: fetch
        done, or past ``fetch_deadline_s`` (a late result is still imported when it comes)."""
        over = []
        if self._pending:
            by_id = {f.fetch_id: rid for rid, f in self._pending.items()}
            for fid, arrival in self.ranks.collect(by_id.keys()).items():
                fetch = self._pending.pop(by_id[fid])
                self._measured(arrival)
                self._import(fetch, arrival)
                if not fetch.released:
                    over.append(by_id[fid])
        now = time.monotonic()
        for rid, fetch in self._pending.items():
            if not fetch.released and now - fetch.started_s >= self.fetch_deadline_s:
                fetch.released = True
                over.append(rid)
        return over

    def wait(self, timeout_s: float) -> None:
        """Block until a fetch arrives on every rank or ``timeout_s`` passes (when nothing
        else can run).

        NOTE: it waits for the oldest fetch in flight: each store runs its jobs in order,
        so on every rank that one arrives first."""
        if self._pending:
            self.ranks.wait(next(iter(self._pending.values())).fetch_id, timeout_s)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until queued writes and fetches have run on every rank; False if
        ``timeout_s`` passed."""
        return self.ranks.flush(timeout_s)

    @property
    def num_waiting(self) -> int:
        """Fetches in flight whose requests are still held back. Pure."""
        return sum(not f.released for f in self._pending.values())

    def _import(self, fetch: _Fetch, arrival: Arrival) -> int:
        manager = self.manager
        # The local tiers may have changed since the lookup: import from where they end now.
        wanted = fetch.hashes[self._num_local_blocks(fetch.tokens, fetch.salt, fetch.lora_id):]
        run = num_found_on_every_rank(wanted, arrival.found_by_rank)
        slots = (manager.import_blocks(fetch.tokens, run, salt=fetch.salt,
                                       lora_id=fetch.lora_id) if run else [])
        if run and self.write_policy == "write-back":
            self.write_spilled()  # the import may reuse their slots: read them first
        self.ranks.fill(fetch.fetch_id, list(zip(wanted, slots, strict=False)))
        self.num_fetched_blocks += len(slots)
        return len(slots)


def _to_bytes(block: torch.Tensor) -> bytes:
    import torch

    return bytes(block.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())


def _write_block(storage: KVStorage, slot: int, payload: bytes) -> None:
    import torch

    layout = storage.layout
    dtype = layout.torch_dtype()
    flat = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype)
    per_layer = flat.numel() // layout.num_layers
    for i in range(layout.num_layers):
        dst = storage.layer(i)[slot]
        dst.copy_(flat[i * per_layer:(i + 1) * per_layer].view(dst.shape))
