"""The ranks of the remote tier: each rank's side of it (:class:`RemoteShard`: its store,
its storages, what its fetches found) and every rank's as one (:class:`RemoteRanks`),
through which :class:`~kvtier.remote.tier.RemoteTier`, rank-agnostic itself, reaches them
all from the leader.

A fetched block is copied once: the store hands over read-only views of the payloads in the
values it read (after their checks), and :meth:`RemoteShard.fill` copies each into its host
slot.

Under tensor parallelism every rank holds its share of each block's KV heads, and each
rank's shard is its own value under that rank's namespace
(:meth:`~kvtier.remote.codec.RemoteNamespace.for_rank`)::

    write   every rank puts its shard of each block (its own store client, its own I/O)
    fetch   every rank looks its shards up; a block counts as found only when every rank
            found (and decoded) its shard, counted from the first (num_found_on_every_rank):
            the manager imports that many host blocks once, then each rank writes its
            shards into those slots. A shard missing or corrupt on one rank is a miss there,
            so that block and every later one are a miss on all ranks (never half written)
    ranks   LocalRanks: every rank's shard in this process (TP 1 is one of them);
            kvtier.model.tp_engine.DistributedRanks: one process per rank, the leader's
            tier sends each call to the workers and joins their results
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

from kvtier.remote.codec import exact_bytes
from kvtier.remote.store import RemoteStore, RemoteStoreBase
from kvtier.tier import Tier

if TYPE_CHECKING:
    import torch

    from kvtier.remote.codec import RemoteNamespace
    from kvtier.storage import KVStorage


STORE_RESET = -1
"""What :meth:`RemoteShard.lost` holds, beside lost writes' hashes, when its store found its
backend to be another incarnation than the one it wrote to (a server restarted or failed
over: ``RemoteStats.num_resets``): every block written before is gone. No block's hash (they
are unsigned), so it travels in the same set through every rank's gather."""


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
        if host.device.type != "cpu":
            raise ValueError(f"the host storage must be in CPU memory (fetched values are "
                             f"copied into its slots from there), got device {host.device}")
        self.store = store
        self.gpu = gpu
        self.host = host
        # By fetch id: what it found (views into the values read) and how long it took.
        self._found: dict[int, tuple[dict[int, memoryview], float]] = {}
        self._cond = threading.Condition()
        # Hashes of background writes the store reported lost (its I/O thread adds them).
        self._lost: set[int] = set()
        self._num_resets = self._store_resets()  # the store's as last seen by ``lost``

    def put(self, tier: Tier, blocks: Sequence[tuple[int, int]], wait: bool) -> int:
        """Hand the store the blocks ``(hash, slot)`` of the ``tier`` storage, their bytes
        copied now: written now with ``wait``, else on the I/O thread. Returns how many
        were written (``wait``) or handed over."""
        storage = self.gpu if tier is Tier.GPU else self.host
        items = {h: _to_bytes(storage.block(slot)) for h, slot in blocks}
        if not items:
            return 0
        # NOTE: a store never raises on a fault of its backend (the contract); a caller's
        # client that does anyway wrote nothing: the blocks stay local, the step goes on.
        try:
            if wait:
                written = self.store.put_many(items)
                # NOTE: a caller's client may answer anything (a subclass's put_many): None
                # or a str raised TypeError from the tier's count in the engine's step, 2.0
                # made the count a float, 99 counted 99 blocks for 2, -1 took one off. No
                # count of the blocks written is a write that failed: they stay unknown.
                return written if type(written) is int and 0 <= written <= len(items) else 0
            # A store of the base class reports a background write it lost (``lost``):
            # else the tier would count those blocks held and never write them again.
            accepted = (self.store.write_back(items, on_lost=self._on_lost)
                        if isinstance(self.store, RemoteStoreBase)
                        else self.store.write_back(items))
        except Exception:
            accepted = False
        if not accepted:
            # NOTE: a write refused (its queue full, the store closed) is lost too: the
            # tier counts what the leader handed over, and a rank past the leader whose
            # store refused its shards was never heard of: the tier held the blocks as
            # written and skipped them in every later write of their prefix, so no engine
            # ever found them whole (that rank's shards missing).
            self._on_lost(list(items))
            return 0
        return len(items)

    def _on_lost(self, hashes: list[int]) -> None:
        with self._cond:
            self._lost.update(hashes)

    def lost(self) -> set[int]:
        """The hashes of background writes the store refused or lost since the last call
        (a store of :class:`RemoteStoreBase` reports a loss; another store's losses past
        its acceptance are not known), and
        ``STORE_RESET`` where the store has found its backend reset since (it held nothing
        of what it was given before)."""
        num_resets = self._store_resets()
        with self._cond:
            lost, self._lost = self._lost, set()
            if num_resets != self._num_resets:
                self._num_resets = num_resets
                lost.add(STORE_RESET)
        return lost

    def _store_resets(self) -> int:
        """The store's ``num_resets`` (0 for a store whose stats do not count them)."""
        try:
            value = getattr(self.store.stats, "num_resets", 0)
        except Exception:  # a client past the contract (see put): no reset is known
            return 0
        return value if type(value) is int else 0

    def flush(self, timeout_s: float | None) -> bool:
        """Wait until the store's queued jobs ran, at most ``timeout_s`` (None: no limit);
        False where that is not known: the time passed, or the store answered anything but
        a bool or raised (a client past the contract, see ``put``).

        NOTE: a caller's client that answered None (no answer of its own) raised TypeError
        out of a worker's ``serve`` (``int()`` of it) while the other ranks waited in the
        flush's all-reduce; one that raised ended the engine's ``run`` after every request
        had finished."""
        try:
            answer = self.store.flush(timeout_s)
        except Exception:
            return False
        return answer if type(answer) is bool else False

    def start_get(self, fetch_id: int, hashes: Sequence[int]) -> bool:
        """Look ``hashes`` up on the I/O thread; False if the store refused the job."""
        started_s = time.monotonic()

        def arrived(found: dict[int, memoryview]) -> None:
            self._arrive(fetch_id, found, time.monotonic() - started_s)

        try:
            return bool(self.store.prefetch(hashes, arrived))
        except Exception:  # a client past the contract (see put): the job was refused
            return False

    def get(self, fetch_id: int, hashes: Sequence[int]) -> None:
        """Look ``hashes`` up now (blocking); a store that raises found nothing."""
        started_s = time.monotonic()
        try:
            found = self.store.get_many(hashes)
        except Exception:  # a client past the contract (see put): a miss
            found = {}
        self._arrive(fetch_id, found, time.monotonic() - started_s)

    def miss(self, fetch_id: int) -> None:
        """Record that this rank found nothing for ``fetch_id`` (its store refused it)."""
        self._arrive(fetch_id, {}, 0.0)

    def _arrive(self, fetch_id: int, found: dict[int, memoryview], elapsed_s: float) -> None:
        # A caller's store client may answer past the codec's checks (a subclass's
        # ``get_many``): a value the host slot cannot take whole is a miss, so no import
        # ever counts a block that ``fill`` could not write.
        size = self.host.layout.bytes_per_block
        if not isinstance(found, dict):
            found = {}
        elif not all(type(v) is memoryview and v.nbytes == size and v.itemsize == 1
                     and v.c_contiguous for v in found.values()):
            found = {h: view for h, v in found.items()
                     if (view := exact_bytes(v, size)) is not None}
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
        passed on any rank, or a rank's store did not say they ran (``RemoteShard.flush``)."""

    def lost(self) -> set[int]:
        """:meth:`RemoteShard.lost`: the hashes of background writes lost since the last
        call, on the leader (a rank that keeps its own shards in another process reports
        none here)."""
        return self.leader.lost()


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

    def lost(self) -> set[int]:
        return set().union(*(s.lost() for s in self.shards))

    def flush(self, timeout_s: float | None) -> bool:
        if timeout_s is None:
            return all([s.flush(None) for s in self.shards])
        deadline_s = time.monotonic() + timeout_s
        return all([s.flush(max(0.0, deadline_s - time.monotonic())) for s in self.shards])


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


def _to_bytes(block: torch.Tensor) -> bytes:
    import torch

    return bytes(block.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())


def _write_block(storage: KVStorage, slot: int, payload: memoryview) -> None:
    """Copy one block's ``payload`` (its bytes layer by layer, as :meth:`KVStorage.block`
    lays them out) into ``slot`` of a CPU ``storage``: one copy of each byte.

    NOTE: numpy copies the bytes, not torch: the payload sits 76 bytes into its value (after
    the header), and ``copy_`` from a tensor over that unaligned address ran at 0.3 GB/s
    here against 7-14 GB/s for numpy (``torch.frombuffer`` also warns on a read-only
    buffer, which a stored value is)."""
    import numpy as np
    import torch

    # The codec checked the length against the namespace's layout, the shard that layout.
    assert len(payload) == storage.layout.bytes_per_block, (len(payload), storage.layout)
    offset = 0
    # Each tensor's slot is contiguous and the tensors run in layer order: [all layers]
    # block-major, one tensor a layer layer-major.
    for tensor in storage.tensors:
        dst = tensor[slot].view(torch.uint8).numpy().reshape(-1)
        np.copyto(dst, np.frombuffer(payload, np.uint8, dst.size, offset))
        offset += dst.size
