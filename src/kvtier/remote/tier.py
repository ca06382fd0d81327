"""The remote tier of one engine: its KV blocks shared with other engines through a store.

::

    write    write-through: a request's prompt is computed, its full blocks' KV goes to the
             store, keyed by the chained block hash (at the end of that step: after its
             first token, before the next plan may reuse the slots); write-back: a host
             block's KV goes there as the block leaves the cache (read from its slot
             before the step's plan may reuse it). Both queued on the store's I/O thread
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
             Where the measured throughput alone turned down ``PROBE_AFTER_SKIPS`` fetches
             in a row (the configured ``fetch_bytes_per_s`` would make them), the next is
             made anyway, as the configured throughput decides it: a probe, which
             measures the store again (``num_probes``). The tier's ``decision``
             (:class:`~kvtier.remote.fetch_decision.FetchDecision`) holds this state.

Under tensor parallelism every rank holds its share of each block's KV heads as its own
value under that rank's namespace: the tier talks to every rank's side
(:class:`~kvtier.remote.ranks.RemoteShard`) through
:class:`~kvtier.remote.ranks.RemoteRanks` (:mod:`kvtier.remote.ranks`), and stays
rank-agnostic itself.

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
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal, get_args

from kvtier.hashing import get_hash_fn, prompt_block_hashes
from kvtier.remote.codec import num_found_on_every_rank
from kvtier.remote.fetch import Fetch, Polled
from kvtier.remote.fetch_decision import FetchDecision
from kvtier.remote.fetch_rule import (
    DEFAULT_FETCH_BYTES_PER_S,
    DEFAULT_FETCH_LATENCY_S,
    PROBE_AFTER_SKIPS,
    THROUGHPUT_EWMA_WEIGHT,
    num_blocks_worth_fetching,
)
from kvtier.remote.options import LONGEST_WAIT_S, check_timeout
from kvtier.remote.ranks import STORE_RESET, Arrival, LocalRanks, RemoteRanks, RemoteShard
from kvtier.remote.store import RemoteStore
from kvtier.reprs import shown
from kvtier.sequence import MultimodalItem, block_extras, check_key, checked_prompt
from kvtier.tier import Tier
from kvtier.wiring import Wired

__all__ = [  # the fetch rule's names too, where callers found them before its module
    "DEFAULT_FETCH_BYTES_PER_S",
    "DEFAULT_FETCH_LATENCY_S",
    "KNOWN_BLOCKS",
    "PROBE_AFTER_SKIPS",
    "THROUGHPUT_EWMA_WEIGHT",
    "WRITE_POLICIES",
    "Polled",
    "RemoteTier",
    "WritePolicy",
    "num_blocks_worth_fetching",
]

if TYPE_CHECKING:
    from kvtier.manager import KVCacheManager
    from kvtier.storage import KVStorage


# How many block hashes the tier remembers handing to the store or finding there (about 100
# bytes each): write-through skips a reused prefix's blocks only where it remembers them.
KNOWN_BLOCKS = 1 << 16

WritePolicy = Literal["write-through", "write-back"]
"""When blocks reach the shared store: as soon as they are computed (write-through), or
when host blocks leave the cache (write-back)."""
WRITE_POLICIES: tuple[WritePolicy, ...] = get_args(WritePolicy)


class RemoteTier(Wired):
    """Moves whole blocks between ``manager``'s storages and a shared store: ``store`` with
    this process's ``gpu`` and ``host`` storages, or every rank's (:class:`RemoteRanks`,
    with ``gpu`` and ``host`` left out: each rank's :class:`RemoteShard` holds its own)."""

    # NOTE: the write policy too: set to "write-back" later (the manager never asked to
    # log spills), every engine step raised from write_spilled ("drain_spills() needs
    # record_spills() first"); set back to "write-through", the spill log grew for ever
    # (nobody drains it); any other string was taken, and nothing was written at all.
    WIRED = frozenset({"store", "ranks", "gpu", "host", "manager", "write_policy"})

    def __init__(self, store: RemoteStore | RemoteRanks, manager: KVCacheManager,
                 gpu: KVStorage | None = None, host: KVStorage | None = None,
                 fetch_deadline_s: float = 1.0, write_policy: WritePolicy = "write-through",
                 *, recompute_s_per_token: float | None = None,
                 fetch_latency_s: float = DEFAULT_FETCH_LATENCY_S,
                 fetch_bytes_per_s: float = DEFAULT_FETCH_BYTES_PER_S) -> None:
        config = manager.config
        if config.hash_algo != "sha256":
            raise ValueError("a shared remote tier needs hash_algo='sha256' (the same hash "
                             f"in every process and machine), got {shown(config.hash_algo)}")
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
        for name, storage, num_blocks in (("gpu", ranks.leader.gpu, config.num_gpu_blocks),
                                          ("host", ranks.leader.host, config.num_host_blocks)):
            # NOTE: a host storage short of the pool failed a fetch's fill half way with an
            # IndexError, after the manager had imported every block: hits on slots never
            # written.
            if storage.num_blocks < num_blocks:
                raise ValueError(f"the {name} storage holds {storage.num_blocks} blocks, the "
                                 f"manager's {name} pool {num_blocks}")
        # NOTE: ranks.leader's layout: under tensor parallelism a block's bytes are a
        # rank's shard, and the ranks read at once.
        self.decision = FetchDecision(
            layout.bytes_per_block, config.tokens_per_block, fetch_deadline_s=fetch_deadline_s,
            recompute_s_per_token=recompute_s_per_token, fetch_latency_s=fetch_latency_s,
            fetch_bytes_per_s=fetch_bytes_per_s)
        if write_policy not in WRITE_POLICIES:
            raise ValueError(f"write_policy must be one of {WRITE_POLICIES}, got "
                             f"{shown(write_policy)}")
        self.ranks = ranks
        # The leader's (rank 0's) store and storages.
        self.store = ranks.leader.store
        self.gpu = ranks.leader.gpu
        self.host = ranks.leader.host
        self.write_policy = write_policy
        if write_policy == "write-back":
            manager.record_spills()
        self._pending: dict[str, Fetch] = {}
        # Fetches in flight that hold no request (``cancel_fetch``), by fetch id: what they
        # find is still imported when it arrives.
        self._orphans: dict[int, Fetch] = {}
        self._fetch_ids = itertools.count()
        # Hashes of blocks this tier wrote or fetched, most recent last (``KNOWN_BLOCKS``).
        self._known: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()
        self.manager = manager
        self._hash_fn = get_hash_fn(config.hash_algo)
        self._tpb = config.tokens_per_block
        self.num_written_blocks = 0
        self.num_fetched_blocks = 0

    # The fetch decision's costs, estimate and counters, as before it had its own module.
    @property
    def fetch_deadline_s(self) -> float:
        """The longest a request is held back for its fetch, in seconds (0..3600)."""
        return self.decision.fetch_deadline_s

    @fetch_deadline_s.setter
    def fetch_deadline_s(self, value: float) -> None:
        self.decision.fetch_deadline_s = value

    @property
    def recompute_s_per_token(self) -> float | None:
        """The model's prefill seconds per token (0..3600), or None: fetch every block."""
        return self.decision.recompute_s_per_token

    @recompute_s_per_token.setter
    def recompute_s_per_token(self, value: float | None) -> None:
        self.decision.recompute_s_per_token = value

    @property
    def fetch_latency_s(self) -> float:
        """The fixed cost of one fetch in seconds (0..3600)."""
        return self.decision.fetch_latency_s

    @fetch_latency_s.setter
    def fetch_latency_s(self, value: float) -> None:
        self.decision.fetch_latency_s = value

    @property
    def measured_bytes_per_s(self) -> float:
        """``FetchDecision.measured_bytes_per_s``. Pure."""
        return self.decision.measured_bytes_per_s

    @property
    def num_probes(self) -> int:
        """Fetches made only to measure the store again."""
        return self.decision.num_probes

    @property
    def num_skipped_blocks(self) -> int:
        """Missing blocks cheaper to recompute than to fetch."""
        return self.decision.num_skipped_blocks

    def num_blocks_to_fetch(self, num_missing: int) -> int:
        """``FetchDecision.num_blocks_to_fetch``. Pure."""
        return self.decision.num_blocks_to_fetch(num_missing)

    def _wanted(self, hashes: list[int], tokens: Sequence[int], salt: bytes | str | int | None,
                lora_id: int | None, mm_items: tuple[MultimodalItem, ...]) -> list[int]:
        """The hashes to fetch: past the local tiers, as many as ``FetchDecision.choose``
        takes."""
        missing = hashes[self._num_local_blocks(tokens, salt, lora_id, mm_items):]
        return missing[:self.decision.choose(len(missing))]

    def block_hashes(self, tokens: list[int], salt: object, lora_id: int | None,
                     mm_items: Sequence[MultimodalItem] = ()) -> list[int]:
        """The chained hashes of the full blocks of ``tokens``, as the manager names them (a
        block holding part of a multimodal item of ``mm_items`` by the item's hash too);
        ValueError for a ``salt``, ``lora_id`` or ``mm_items`` the manager refuses (its
        blocks could never be matched: a write under it filled the shared store with
        garbage). Pure."""
        ids, items = checked_prompt(tokens, mm_items, "remote tier")
        return self._hashes(ids, salt, lora_id, items)

    def _reusable_hashes(self, tokens: Sequence[int], salt: object, lora_id: int | None,
                         mm_items: tuple[MultimodalItem, ...]) -> list[int]:
        # The last prompt token is never reused, so neither is a block that ends with it.
        return self._hashes(tokens, salt, lora_id, mm_items,
                            max(len(tokens) - 1, 0) // self._tpb)

    def _hashes(self, tokens: Sequence[int], salt: object, lora_id: int | None,
                mm_items: tuple[MultimodalItem, ...], num_blocks: int | None = None
                ) -> list[int]:
        """The chained hashes of the first ``num_blocks`` full blocks (all when None) of a
        checked prompt (``checked_prompt``)."""
        return prompt_block_hashes(self._hash_fn, tokens, self._tpb, lora_id, salt,
                                   block_extras(mm_items, len(tokens), self._tpb),
                                   num_blocks=num_blocks)

    def _num_local_blocks(self, tokens: Sequence[int], salt: bytes | str | int | None,
                          lora_id: int | None, mm_items: tuple[MultimodalItem, ...]) -> int:
        """Full blocks of the prompt the local tiers hold now (a pure lookup, no hashing)."""
        m = self.manager.lookup(tokens, salt=salt, lora_id=lora_id, mm_items=mm_items)
        return (m.num_tokens - m.num_partial_tokens) // self._tpb

    def write(self, tokens: list[int], block_table: list[int], salt: object = None,
              lora_id: int | None = None, wait: bool = False, first_block: int = 0,
              mm_items: Sequence[MultimodalItem] = (), reused_blocks: int = 0) -> int:
        """Write the full blocks of computed ``tokens`` from their GPU slots, every rank its
        shard (their bytes are copied now, the store is written on its I/O thread, or now
        with ``wait``), from block ``first_block`` on: the caller says the blocks before it
        are in the store already (LMCache's masked store; their hashes still chain the later
        ones). The first ``reused_blocks`` are a prefix the caller reused from its own
        tiers: skipped where this tier wrote or fetched them lately (it remembers
        ``KNOWN_BLOCKS``), as LMCache's and vLLM's offloading stores skip what they hold,
        and written where it did not (a conversation's next turn reuses its last answer's
        blocks, decoded and never written through, whose absence would cut the chain for
        every other engine). A write the store refuses is not remembered, and one its I/O
        thread accepts and then loses is forgotten at the next write (a
        :class:`~kvtier.remote.store.RemoteStoreBase` reports it; with another store such a
        loss is not known), as is a block a fetch looked up and missed (evicted by the
        server, expired, flushed) and every block once the store saw its server restarted
        (``RemoteStats.num_resets``). A prompt with multimodal
        items must name them (``mm_items``, as admitted): the blocks holding them are keyed
        by their content too, and without it another image behind the same placeholder
        tokens would be served this one's KV. Returns how many blocks were handed to the
        store. Raises ValueError, writing nothing, for a ``block_table`` that is no
        sequence, a slot of it (of a full block, written or skipped) that is no GPU slot (a
        negative one would have written another block's bytes under this prompt's hash) or
        a ``first_block`` or ``reused_blocks`` that is no int >= 0.

        ::

            tokens       | b0 | b1 | b2 | b3 |..|     first_block=2: b2, b3 written
            hashes       [ h0   h1   h2   h3 ]       reused_blocks=2: b2, b3 written, and
                                                     b0, b1 unless this tier knows them
        """
        if type(wait) is not bool:
            raise ValueError(f"wait must be a bool, got {shown(wait)}")
        for name, value in (("first_block", first_block), ("reused_blocks", reused_blocks)):
            if type(value) is not int or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {shown(value)}")
        hashes = self.block_hashes(tokens, salt, lora_id, mm_items)
        # NOTE: every slot of the full blocks is checked before anything changes: a table
        # that was no sequence (None) raised TypeError from zip, naming nothing, and only
        # after the tier had taken its stores' lost writes (and forgotten them).
        try:
            table = (list(block_table) if not isinstance(block_table, str | bytes)
                     else None)
        except TypeError:
            table = None
        if table is None:
            raise ValueError(f"block_table must be a sequence of GPU slots, got "
                             f"{shown(block_table)}")
        table = table[:len(hashes)]
        num_slots = self.gpu.num_blocks
        for i, slot in enumerate(table):
            if type(slot) is not int or not 0 <= slot < num_slots:
                raise ValueError(f"block_table[{i}] must be a GPU slot in 0..{num_slots - 1}, "
                                 f"got {shown(slot)}")
        self._forget(self.ranks.lost())
        known = self._known
        blocks = [(h, slot) for i, (h, slot) in enumerate(zip(hashes, table, strict=False))
                  if i >= first_block and (i >= reused_blocks or h not in known)]
        written = self.ranks.put(Tier.GPU, blocks, wait) if blocks else 0
        if written == len(blocks):
            self._remember(hashes[:len(table)])  # the skipped refreshed, the written new
        else:  # NOTE: the store took less (down, refused): what it holds is not known
            self._remember(h for h in hashes[:len(table)] if h in known)
        self.num_written_blocks += written
        return written

    def _remember(self, hashes: Iterable[int]) -> None:
        """Note blocks the store holds (written or found there), the newest last."""
        known = self._known
        with self._lock:  # NOTE: the I/O threads' fetches import through ``_import`` too
            for h in hashes:
                known[h] = None
                known.move_to_end(h)
            while len(known) > KNOWN_BLOCKS:
                known.popitem(last=False)

    def _forget(self, hashes: Iterable[int]) -> None:
        """Forget blocks the store no longer holds (a background write it lost, a fetch
        that missed them; every block, where the hashes hold ``STORE_RESET``): a later write
        of them as a reused prefix writes them (else never, for as long as the tier
        remembered them)."""
        known = self._known
        with self._lock:
            for h in hashes:
                if h == STORE_RESET:
                    known.clear()
                else:
                    known.pop(h, None)

    def write_spilled(self) -> int:
        """Write-back: hand the store the host blocks that left the cache since the last
        call, every rank its shard, read from their slots now (call it before executing the
        step's plan, which may reuse them). Returns how many blocks were handed over."""
        self._forget(self.ranks.lost())  # NOTE: else they piled up under write-back
        blocks = list(self.manager.drain_spills())
        if not blocks:
            return 0
        written = self.ranks.put(Tier.HOST, blocks, False)
        self.num_written_blocks += written
        return written

    def fetch(self, tokens: list[int], salt: bytes | str | int | None = None,
              lora_id: int | None = None, mm_items: Sequence[MultimodalItem] = ()) -> int:
        """Fetch now (blocking) and import the blocks of ``tokens`` (with its multimodal
        ``mm_items``) that the store has past the local tiers' prefix into host blocks;
        returns how many were imported."""
        ids, items = checked_prompt(tokens, mm_items, "remote tier")
        # NOTE: the plain key, read once (``kvtier.counts``): the caller's object was kept
        # until the import and read again there.
        salt = check_key("salt", salt)
        hashes = self._reusable_hashes(ids, salt, lora_id, items)
        wanted = self._wanted(hashes, ids, salt, lora_id, items)
        if not wanted:
            return 0
        fetch = Fetch(list(ids), salt, lora_id, items, hashes, 0.0, next(self._fetch_ids),
                       wanted)
        self.ranks.get(fetch.fetch_id, wanted)
        arrival = self.ranks.collect([fetch.fetch_id])[fetch.fetch_id]
        self.decision.measure(arrival)
        return self._import(fetch, arrival)

    def start_fetch(self, request_id: str, tokens: list[int],
                    salt: bytes | str | int | None = None, lora_id: int | None = None,
                    mm_items: Sequence[MultimodalItem] = ()) -> bool:
        """Look the prompt's missing blocks up on the stores' I/O threads; False when there
        is nothing to look up or the store refused the job (then don't wait for it)."""
        if type(request_id) is not str or not request_id:
            raise ValueError(f"request_id must be a non-empty str, got {shown(request_id)}")
        old = self._pending.get(request_id)
        if old is not None and not old.released:
            return False  # still waiting for it
        # NOTE: the prompt is checked (and hashed, which checks the salt and LoRA id) before
        # anything changes: a refused one cancelled the earlier fetch of that id first.
        ids, items = checked_prompt(tokens, mm_items, "remote tier")
        # NOTE: the plain key, read once (``kvtier.counts``): the caller's object was kept
        # until the import and read again there.
        salt = check_key("salt", salt)
        hashes = self._reusable_hashes(ids, salt, lora_id, items)
        wanted = self._wanted(hashes, ids, salt, lora_id, items)
        if old is not None:
            # NOTE: a fetch past its deadline, still in flight, of an earlier request of
            # that id: it lands in the cache for anyone, this request fetches its own.
            self.cancel_fetch(request_id)
        if not wanted:
            return False
        fetch = Fetch(list(ids), salt, lora_id, items, hashes, time.monotonic(),
                       next(self._fetch_ids), wanted)
        if not self.ranks.start_get(fetch.fetch_id, wanted):
            return False
        self._pending[request_id] = fetch
        return True

    def cancel_fetch(self, request_id: str) -> bool:
        """The request ``request_id`` no longer waits for its fetch in flight (aborted, or
        done): the fetch holds nobody (``num_waiting``) and a new request of that id may
        start its own; what it finds still lands in the cache for others when it arrives.
        False where none of that id is in flight. TypeError for an id that is no str."""
        if type(request_id) is not str:
            raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
        fetch = self._pending.pop(request_id, None)
        if fetch is None:
            return False
        fetch.released = True
        self._orphans[fetch.fetch_id] = fetch
        return True

    def poll(self) -> list[str]:
        """Import what arrived on every rank; return the requests whose wait is over: fetch
        done, or past ``fetch_deadline_s`` (a late result is still imported when it comes).
        ``poll_imports`` says what each one's fetch imported too."""
        return self.poll_imports().released

    def poll_imports(self) -> Polled:
        """:meth:`poll`, with the blocks each request's own fetch imported (a late one past
        its deadline included; a cancelled one's count for nobody).

        NOTE: a caller counting the host's growth during a fetch as that request's remote
        reuse counted what other fetches imported (two requests of one prefix: one fetch
        imports it, both reported it fetched) and what the host gained otherwise."""
        over = []
        imported: dict[str, int] = {}
        if self._pending or self._orphans:
            by_id = {f.fetch_id: rid for rid, f in self._pending.items()}
            for fid, arrival in self.ranks.collect([*by_id, *self._orphans]).items():
                rid = by_id.get(fid)
                fetch = self._orphans.pop(fid) if rid is None else self._pending.pop(rid)
                self.decision.measure(arrival)
                num_imported = self._import(fetch, arrival)
                if rid is not None and num_imported:
                    imported[rid] = num_imported
                if rid is not None and not fetch.released:
                    over.append(rid)
        now = time.monotonic()
        for rid, fetch in self._pending.items():
            if not fetch.released and now - fetch.started_s >= self.fetch_deadline_s:
                fetch.released = True
                over.append(rid)
        return Polled(over, imported)

    def wait(self, timeout_s: float) -> None:
        """Block until a fetch arrives on every rank or ``timeout_s`` passes (when nothing
        else can run), and no longer than the oldest held request's ``fetch_deadline_s``
        (``poll`` releases it then). ValueError for a negative or NaN ``timeout_s``.

        NOTE: it waits for the oldest fetch in flight that holds a request (the oldest of
        all where none does): each store runs its jobs in order, so on every rank that one
        arrives before the later ones. A wait of the whole deadline, begun when the engine
        fell idle part way into it, held the request up to twice its deadline."""
        limit = check_timeout("timeout_s", timeout_s)
        wait_s = LONGEST_WAIT_S if limit is None else limit
        held = next((f for f in self._pending.values() if not f.released), None)
        if held is not None:
            left_s = self.fetch_deadline_s - (time.monotonic() - held.started_s)
            self.ranks.wait(held.fetch_id, max(0.0, min(wait_s, left_s)))
        elif self._pending:
            self.ranks.wait(next(iter(self._pending.values())).fetch_id, wait_s)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until queued writes and fetches have run on every rank; False if
        ``timeout_s`` passed (None or infinity: no limit) or a store did not say they ran
        (its flush answered no bool, or raised). ValueError for a negative or NaN
        ``timeout_s``."""
        return self.ranks.flush(check_timeout("timeout_s", timeout_s))

    @property
    def num_waiting(self) -> int:
        """Fetches in flight whose requests are still held back. Pure."""
        return sum(not f.released for f in self._pending.values())

    def _import(self, fetch: Fetch, arrival: Arrival) -> int:
        manager = self.manager
        # The local tiers may have changed since the lookup: import from where they end now.
        wanted = fetch.hashes[self._num_local_blocks(fetch.tokens, fetch.salt, fetch.lora_id,
                                                     fetch.mm_items):]
        run = num_found_on_every_rank(wanted, arrival.found_by_rank)
        slots = (manager.import_blocks(fetch.tokens, run, salt=fetch.salt,
                                       lora_id=fetch.lora_id, mm_items=fetch.mm_items)
                 if run else [])
        if run and self.write_policy == "write-back":
            self.write_spilled()  # the import may reuse their slots: read them first
        self.ranks.fill(fetch.fetch_id, list(zip(wanted, slots, strict=False)))
        self._remember(wanted[:run])  # found on every rank: the store holds them
        # A block the tier remembered as held that some rank's store did not have (evicted
        # by the server's maxmemory or TTL, flushed, a restart not seen, a shard gone):
        # forgotten, so the next write of its prefix writes it again.
        found = arrival.found_by_rank
        self._forget(h for h in fetch.asked if not all(h in f for f in found))
        self.num_fetched_blocks += len(slots)
        return len(slots)
