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

Keys are content hashes under a namespace that fingerprints model, block shape, dtype and
memory layout (the tier refuses a store whose namespace is not its storages' layout), and a
value is refused unless its header matches: another model, layout or a corrupt value is a
miss. Store faults are misses too (the store never raises): the request recomputes. A
prompt's hash chain is computed once per fetch.

Contract: ``RemoteTier`` may change the shared store's values, the manager's host tier (only
through ``import_blocks`` and ``drain_spills``), the KV bytes of the host slots it imports
into, and its own counters; it never changes a block that a live request holds.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from kvtier.hashing import get_hash_fn, prompt_block_hashes
from kvtier.remote.options import check_number
from kvtier.remote.store import RemoteStore

if TYPE_CHECKING:
    import torch

    from kvtier.manager import KVCacheManager
    from kvtier.storage import KVStorage


@dataclass(slots=True)
class _Fetch:
    """A fetch in flight for a waiting request."""

    tokens: list[int]
    salt: bytes | str | int | None
    lora_id: int | None
    hashes: list[int]  # of the prompt's reusable full blocks, computed once
    started_s: float
    released: bool = False


WritePolicy = Literal["write-through", "write-back"]
"""When blocks reach the shared store: as soon as they are computed (write-through), or
when host blocks leave the cache (write-back)."""
WRITE_POLICIES: tuple[WritePolicy, ...] = get_args(WritePolicy)


class RemoteTier:
    """Moves whole blocks between ``manager``'s storages and a shared ``store``."""

    def __init__(self, store: RemoteStore, manager: KVCacheManager, gpu: KVStorage,
                 host: KVStorage, fetch_deadline_s: float = 1.0,
                 write_policy: WritePolicy = "write-through") -> None:
        config = manager.config
        if config.hash_algo != "sha256":
            raise ValueError("a shared remote tier needs hash_algo='sha256' (the same hash "
                             f"in every process and machine), got {config.hash_algo!r}")
        if not config.num_host_blocks:
            raise ValueError("a remote tier imports into host blocks: num_host_blocks is 0")
        layout = store.namespace.layout
        for name, storage in (("gpu", gpu), ("host", host)):
            if storage.layout != layout:
                raise ValueError(f"the store's namespace has layout {layout}, the {name} "
                                 f"storage {storage.layout}: their blocks would be misread")
        if layout.tokens_per_block != config.tokens_per_block:
            raise ValueError(f"the store's blocks hold {layout.tokens_per_block} tokens, the "
                             f"manager's {config.tokens_per_block}")
        self.fetch_deadline_s = check_number("fetch_deadline_s", fetch_deadline_s, 0.0, 3600.0)
        if write_policy not in WRITE_POLICIES:
            raise ValueError(f"write_policy must be one of {WRITE_POLICIES}, got {write_policy!r}")
        self.store = store
        self.write_policy = write_policy
        if write_policy == "write-back":
            manager.record_spills()
        self._pending: dict[str, _Fetch] = {}
        self._done: dict[str, dict[int, bytes]] = {}
        self._lock = threading.Lock()
        self._arrived = threading.Event()
        self.manager = manager
        self.gpu = gpu
        self.host = host
        self._hash_fn = get_hash_fn(config.hash_algo)
        self._tpb = config.tokens_per_block
        self.num_written_blocks = 0
        self.num_fetched_blocks = 0

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
        """Write the full blocks of computed ``tokens`` from their GPU slots (their bytes are
        copied now, the store is written on its I/O thread, or now with ``wait``); returns
        how many blocks were handed to the store."""
        hashes = self.block_hashes(tokens, salt, lora_id)
        items = {h: _to_bytes(self.gpu.block(slot))
                 for h, slot in zip(hashes, block_table, strict=False)}
        if not items:
            return 0
        if wait:
            written = self.store.put_many(items)
        else:
            written = len(items) if self.store.write_back(items) else 0
        self.num_written_blocks += written
        return written

    def write_spilled(self) -> int:
        """Write-back: hand the store the host blocks that left the cache since the last
        call, read from their slots now (call it before executing the step's plan, which
        may reuse them). Returns how many blocks were handed over."""
        items = {h: _to_bytes(self.host.block(slot)) for h, slot in self.manager.drain_spills()}
        if not items or not self.store.write_back(items):
            return 0
        self.num_written_blocks += len(items)
        return len(items)

    def fetch(self, tokens: list[int], salt: bytes | str | int | None = None,
              lora_id: int | None = None) -> int:
        """Fetch now (blocking) and import the blocks of ``tokens`` that the store has past
        the local tiers' prefix into host blocks; returns how many were imported."""
        hashes = self._reusable_hashes(tokens, salt, lora_id)
        wanted = hashes[self._num_local_blocks(tokens, salt, lora_id):]
        if not wanted:
            return 0
        fetch = _Fetch(list(tokens), salt, lora_id, hashes, time.monotonic())
        return self._import(fetch, self.store.get_many(wanted))

    def start_fetch(self, request_id: str, tokens: list[int],
                    salt: bytes | str | int | None = None, lora_id: int | None = None) -> bool:
        """Look the prompt's missing blocks up on the store's I/O thread; False when there
        is nothing to look up or the store refused the job (then don't wait for it)."""
        if request_id in self._pending:
            return False
        hashes = self._reusable_hashes(tokens, salt, lora_id)
        wanted = hashes[self._num_local_blocks(tokens, salt, lora_id):]
        if not wanted:
            return False

        def arrived(found: dict[int, bytes]) -> None:
            with self._lock:
                self._done[request_id] = found
            self._arrived.set()

        fetch = _Fetch(list(tokens), salt, lora_id, hashes, time.monotonic())
        self._pending[request_id] = fetch
        if not self.store.prefetch(wanted, arrived):
            del self._pending[request_id]
            return False
        return True

    def poll(self) -> list[str]:
        """Import what arrived; return the requests whose wait is over: fetch done, or past
        ``fetch_deadline_s`` (a late result is still imported when it comes)."""
        with self._lock:
            done, self._done = self._done, {}
        over = []
        for rid, found in done.items():
            fetch = self._pending.pop(rid)
            self._import(fetch, found)
            if not fetch.released:
                over.append(rid)
        now = time.monotonic()
        for rid, fetch in self._pending.items():
            if not fetch.released and now - fetch.started_s >= self.fetch_deadline_s:
                fetch.released = True
                over.append(rid)
        return over

    def wait(self, timeout_s: float) -> None:
        """Block until some fetch arrives or ``timeout_s`` passes (when nothing else can
        run)."""
        self._arrived.wait(timeout_s)
        self._arrived.clear()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until queued writes and fetches have run; False if ``timeout_s`` passed."""
        return self.store.flush(timeout_s)

    @property
    def num_waiting(self) -> int:
        """Fetches in flight whose requests are still held back. Pure."""
        return sum(not f.released for f in self._pending.values())

    def _import(self, fetch: _Fetch, found: dict[int, bytes]) -> int:
        manager = self.manager
        # The local tiers may have changed since the lookup: import from where they end now.
        wanted = fetch.hashes[self._num_local_blocks(fetch.tokens, fetch.salt, fetch.lora_id):]
        run = 0
        while run < len(wanted) and wanted[run] in found:
            run += 1
        if not run:
            return 0
        slots = manager.import_blocks(fetch.tokens, run, salt=fetch.salt, lora_id=fetch.lora_id)
        if self.write_policy == "write-back":
            self.write_spilled()  # the import may reuse their slots: read them first
        for h, slot in zip(wanted, slots, strict=False):
            _write_block(self.host, slot, found[h])
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
