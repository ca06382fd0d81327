"""kvtier's KV events in vLLM 0.33.0's wire types, for the consumers of vLLM's KV events
(KV-aware routers and indexers that subscribe to ``ZmqEventPublisher``'s msgpack stream).

``VllmEventTranslator.translate`` turns what ``KVCacheManager.drain_events`` returned into
one ``KVEventBatch``, which any of vLLM's ``EventPublisher`` classes publishes::

    kvtier event                          vLLM event(s)
    BlockStored x n, one chain, one tier  BlockStored(block_hashes=[n], token_ids=n * B, medium)
    BlockRemoved x n, one tier            BlockRemoved(block_hashes=[n], medium)
    BlockTierChanged(h, old, new)         BlockRemoved([h], old) + BlockStored([h], new)
    AllBlocksCleared                      AllBlocksCleared

A block's ``extra_keys`` entry names its kvtier keys, each as a (name, bytes) pair of the
bytes its hash covers (``hashing.encode_key``): ``("salt", ...)`` on a block whose parent
is the root (where vLLM puts ``cache_salt``), then ``("extra", ...)`` for its extra key
(multimodal items); ``None`` where it has neither. Media: ``Tier.GPU`` is
vLLM's ``"GPU"``, ``Tier.HOST`` its ``"CPU"``. A block that changes
tier is described again (its parent, tokens, LoRA id and extra key) from what the
translator kept of its ``BlockStored``, as vLLM's own offloading events are; one stored
before the translator existed gets vLLM's placeholder (no parent, no tokens, block size 0);
a block whose event carried no tokens has block size 0 too.
Hashes are kvtier's 128-bit chained hashes as 16 big-endian bytes, or (``int_hashes``, as
vLLM's ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``) their low 64 bits as an int.

A hole in kvtier's sequence numbers (its bounded event buffer dropped some) means the
consumer's view can no longer be repaired block by block: the batch starts with
``AllBlocksCleared`` and the translator forgets what it kept, so a router under-reports
this instance's cache rather than routing to blocks that are gone.

Contract: ``translate`` changes only the translator's own record of the blocks it has seen
stored and its ``num_resyncs``; it raises only for events that are no well-formed event
list (``event_codec.check_events``) or hold a block of another size, changing nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

from vllm.distributed.kv_events import (
    MEDIUM_CPU,
    MEDIUM_GPU,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVCacheEvent,
    KVEventBatch,
)

from kvtier import events as kv
from kvtier.clock import CacheClock
from kvtier.counts import as_integer
from kvtier.event_codec import check_events
from kvtier.reprs import shown
from kvtier.sequence import short_repr
from kvtier.tier import Tier

_MEDIUM = {Tier.GPU: MEDIUM_GPU, Tier.HOST: MEDIUM_CPU}
_LOW_64 = (1 << 64) - 1
_Run = TypeVar("_Run", kv.BlockStored, kv.BlockRemoved)


class _Stored(NamedTuple):
    """What a ``BlockStored`` said of a block, to describe it again when it moves."""

    parent_hash: int | None
    token_ids: tuple[int, ...] | None
    lora_id: int | None
    keys: tuple[tuple[str, bytes], ...] | None  # its vLLM extra keys


def _keys(e: kv.BlockStored) -> tuple[tuple[str, bytes], ...] | None:
    """A stored block's vLLM extra keys (see the module's docstring). Pure."""
    keys = []
    if e.salt_key is not None and e.parent_hash is None:
        keys.append(("salt", e.salt_key))
    if e.extra_key is not None:
        keys.append(("extra", e.extra_key))
    return tuple(keys) or None


class VllmEventTranslator:
    """kvtier's events of one manager as vLLM ``KVEventBatch`` es (see the module's table).

    ``block_size`` is the manager's ``tokens_per_block``; ``data_parallel_rank`` goes into
    every batch as vLLM's engines set it; ``clock`` stamps the batches (``time.time``;
    read as ``CacheClock`` reads a cache's clock: a reading that raises or is no finite
    number stamps the last good time).
    """

    def __init__(self, block_size: int, *, int_hashes: bool = False,
                 data_parallel_rank: int | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        # NOTE: the plain ints they are (``kvtier.counts``): NumPy ones were refused.
        size = as_integer(block_size)
        if size is None or size < 1:
            raise ValueError(f"block_size must be a positive int, got {shown(block_size)}")
        if type(int_hashes) is not bool:
            raise ValueError(f"int_hashes must be a bool, got {short_repr(int_hashes)}")
        rank = None if data_parallel_rank is None else as_integer(data_parallel_rank)
        if data_parallel_rank is not None and (rank is None or not 0 <= rank < 1 << 31):
            raise ValueError(f"data_parallel_rank must be None or an int in [0, 2**31), got "
                             f"{short_repr(data_parallel_rank)}")
        self.block_size = size
        self.int_hashes = int_hashes
        self.data_parallel_rank = rank
        # NOTE: read through CacheClock, before the batch changes anything: a clock that
        # raised after the loop lost the batch's events with the translator's record moved
        # on (no resync followed), and one that answered None sent ts=None to the routers.
        self._clock = CacheClock(clock)
        self._stored: dict[int, _Stored] = {}
        self._next_seq: int | None = None
        # How many times a hole in the sequence numbers made a batch start over.
        self.num_resyncs = 0

    def translate(self, events: Sequence[kv.Event]) -> KVEventBatch:
        """The vLLM batch that says what ``events`` (oldest first) say. Raises TypeError or
        ValueError, changing nothing, for events ``event_codec.check_events`` refuses and
        for a stored block of another size than ``block_size``."""
        check_events(events)
        for i, e in enumerate(events):
            if isinstance(e, kv.BlockStored) and e.num_tokens != self.block_size:
                # NOTE: taken, the block was published with its own size when stored and
                # with the translator's when it moved: one block, two sizes for a router.
                raise ValueError(f"events[{i}].num_tokens must be the translator's "
                                 f"block_size {self.block_size}, got {e.num_tokens}")
        ts = self._clock()
        out: list[KVCacheEvent] = []
        i = 0
        while i < len(events):
            e = events[i]
            if self._next_seq is not None and e.seq != self._next_seq:
                self._resync(out)
            if isinstance(e, kv.BlockStored):
                stored = self._run(events, i, kv.BlockStored)
                out.append(self._stored_event(stored))
                i += len(stored)
            elif isinstance(e, kv.BlockRemoved):
                removed = self._run(events, i, kv.BlockRemoved)
                for r in removed:
                    self._stored.pop(r.block_hash, None)
                out.append(BlockRemoved(block_hashes=[self._hash(r.block_hash) for r in removed],
                                        medium=_MEDIUM[e.tier]))
                i += len(removed)
            elif isinstance(e, kv.BlockTierChanged):
                out.append(BlockRemoved(block_hashes=[self._hash(e.block_hash)],
                                        medium=_MEDIUM[e.old_tier]))
                out.append(self._moved_event(e))
                i += 1
            else:
                self._stored.clear()
                out.append(AllBlocksCleared())
                i += 1
            self._next_seq = events[i - 1].seq + 1
        return KVEventBatch(ts=ts, events=out,
                            data_parallel_rank=self.data_parallel_rank)

    def _resync(self, out: list[KVCacheEvent]) -> None:
        self.num_resyncs += 1
        self._stored.clear()
        out.append(AllBlocksCleared())

    @staticmethod
    def _run(events: Sequence[kv.Event], i: int, kind: type[_Run]) -> list[_Run]:
        """The events of ``kind`` from ``events[i]`` that vLLM states as one: gapless
        sequence numbers, one tier, and for stored blocks one chain (each the child of the
        one before) under one LoRA id and block size."""
        first = events[i]
        assert isinstance(first, kind)
        run = [first]
        for e in events[i + 1:]:
            prev = run[-1]
            if not (isinstance(e, kind) and e.seq == prev.seq + 1 and e.tier is first.tier):
                break
            if isinstance(e, kv.BlockStored):
                assert isinstance(prev, kv.BlockStored) and isinstance(first, kv.BlockStored)
                if not (e.parent_hash == prev.block_hash and e.lora_id == first.lora_id
                        and e.num_tokens == first.num_tokens
                        and (e.token_ids is None) == (first.token_ids is None)):
                    break
            run.append(e)
        return run

    def _stored_event(self, run: list[kv.BlockStored]) -> BlockStored:
        first = run[0]
        tokens: list[int] = []
        extra_keys: list[tuple[Any, ...] | None] = []
        for e in run:
            keys = _keys(e)
            self._stored[e.block_hash] = _Stored(e.parent_hash, e.token_ids, e.lora_id, keys)
            tokens += e.token_ids or ()
            extra_keys.append(keys)
        # NOTE: no tokens (an event from a publisher older than token ids) is vLLM's
        # placeholder, block size 0: a size with no ids read as blocks of no tokens.
        block_size = 0 if first.token_ids is None else first.num_tokens
        return self._vllm_stored([e.block_hash for e in run], first.parent_hash, tokens,
                                 block_size, first.lora_id, extra_keys, first.tier)

    def _moved_event(self, e: kv.BlockTierChanged) -> BlockStored:
        known = self._stored.get(e.block_hash)
        if known is None:  # stored before this translator: vLLM's placeholder
            return self._vllm_stored([e.block_hash], None, [], 0, None, [None], e.new_tier)
        block_size = 0 if known.token_ids is None else self.block_size
        return self._vllm_stored([e.block_hash], known.parent_hash, list(known.token_ids or ()),
                                 block_size, known.lora_id, [known.keys], e.new_tier)

    def _vllm_stored(self, hashes: list[int], parent: int | None, tokens: list[int],
                     block_size: int, lora_id: int | None,
                     extra_keys: list[tuple[Any, ...] | None], tier: Tier) -> BlockStored:
        return BlockStored(
            block_hashes=[self._hash(h) for h in hashes],
            parent_block_hash=None if parent is None else self._hash(parent),
            token_ids=tokens, block_size=block_size, lora_id=lora_id,
            medium=_MEDIUM[tier], lora_name=None,
            extra_keys=extra_keys if any(k is not None for k in extra_keys) else None)

    def _hash(self, h: int) -> bytes | int:
        return h & _LOW_64 if self.int_hashes else h.to_bytes(16, "big")
