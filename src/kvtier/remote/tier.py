"""The remote tier of one engine: its KV blocks shared with other engines through a store.

::

    write    a request's prompt is computed: its full blocks' KV goes to the store, keyed by
             the chained block hash (write-through)
    fetch    a request waits: the blocks of its prompt past what the local tiers hold are
             looked up in the store; the consecutive run found is imported into host blocks
             (``KVCacheManager.import_blocks``) and their KV written there, so admission
             onboards them like any host hit, with exact credit

Keys are content hashes under a namespace that fingerprints model and layout, and a value
is refused unless its header matches: another model, layout or a corrupt value is a miss.
Store faults are misses too (the store never raises): the request recomputes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvtier.hashing import chain_hashes, get_hash_fn, root_hash
from kvtier.remote.store import RemoteStore

if TYPE_CHECKING:
    import torch

    from kvtier.manager import KVCacheManager
    from kvtier.storage import KVStorage


class RemoteTier:
    """Moves whole blocks between ``manager``'s storages and a shared ``store``."""

    def __init__(self, store: RemoteStore, manager: KVCacheManager, gpu: KVStorage,
                 host: KVStorage) -> None:
        config = manager.config
        if config.hash_algo != "sha256":
            raise ValueError("a shared remote tier needs hash_algo='sha256' (the same hash "
                             f"in every process and machine), got {config.hash_algo!r}")
        if not config.num_host_blocks:
            raise ValueError("a remote tier imports into host blocks: num_host_blocks is 0")
        self.store = store
        self.manager = manager
        self.gpu = gpu
        self.host = host
        self._hash_fn = get_hash_fn(config.hash_algo)
        self._tpb = config.tokens_per_block
        self.num_written_blocks = 0
        self.num_fetched_blocks = 0

    def block_hashes(self, tokens: list[int], salt: object, lora_id: int | None) -> list[int]:
        """The chained hashes of the full blocks of ``tokens``, as the manager names them."""
        parent = root_hash(self._hash_fn, lora_id, salt)
        return chain_hashes(self._hash_fn, parent, tokens, self._tpb, lora_id)

    def write(self, tokens: list[int], block_table: list[int], salt: object = None,
              lora_id: int | None = None) -> int:
        """Write the full blocks of computed ``tokens`` from their GPU slots; returns how many
        the store took."""
        hashes = self.block_hashes(tokens, salt, lora_id)
        items = {h: _to_bytes(self.gpu.block(slot)) for h, slot in zip(hashes, block_table)}
        written = self.store.put_many(items) if items else 0
        self.num_written_blocks += written
        return written

    def fetch(self, tokens: list[int], salt: bytes | str | int | None = None,
              lora_id: int | None = None) -> int:
        """Import the blocks of ``tokens`` that the store has past the local tiers' prefix
        into host blocks; returns how many were imported."""
        manager = self.manager
        local = manager.lookup(tokens, salt=salt, lora_id=lora_id)
        first = (local.num_tokens - local.num_partial_tokens) // self._tpb
        hashes = self.block_hashes(tokens, salt, lora_id)[: (len(tokens) - 1) // self._tpb]
        wanted = hashes[first:]
        if not wanted:
            return 0
        found = self.store.get_many(wanted)
        run = 0
        while run < len(wanted) and wanted[run] in found:
            run += 1
        if not run:
            return 0
        slots = manager.import_blocks(tokens, run, salt=salt, lora_id=lora_id)
        for h, slot in zip(wanted, slots):
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
