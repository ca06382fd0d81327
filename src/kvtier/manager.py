"""KVCacheManager: the public API over the block store.

``lookup`` answers what a prompt would reuse; ``add_sequence_batch`` admits a batch in two
phases (``kvtier.admission``) so that answer is exactly what each admitted request gets;
``schedule_prefill`` / ``append_tokens`` grow a request and store what it schedules;
``remove_sequence`` releases it tail first. The manager owns the live sequences; the
``BlockStore`` below it owns the tree, the tier pools and every move between them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from kvtier.admission import Admission, BatchAdmission, PrefixMatch, block_extras, promise_of
from kvtier.config import CacheConfig
from kvtier.events import AllBlocksCleared, Event
from kvtier.eviction import EvictionPolicy
from kvtier.hashing import chain_hashes, get_hash_fn, root_hash
from kvtier.metrics import CacheStats
from kvtier.radix import Match, Node, Root, match
from kvtier.recovery import fail_transfers
from kvtier.sequence import (
    LiveSequence,
    MultimodalItem,
    SequenceSpec,
    check_key,
    check_lora_id,
    check_mm_items,
    check_token,
    token_list,
)
from kvtier.store import BlockStore
from kvtier.transfer.engine import RecordingTransferEngine, TransferEngine
from kvtier.transfer.plan import TransferOp, TransferPlan

_NO_MATCH = Match([], None, 0, None)


class KVCacheManager:
    """A tiered, prefix-reusing KV block manager. See the module docstring for admission."""

    def __init__(
        self,
        config: CacheConfig,
        engine: TransferEngine | None = None,
        clock: Callable[[], float] = time.monotonic,
        policy: EvictionPolicy | None = None,
    ) -> None:
        self.config = config
        self.engine: TransferEngine = engine if engine is not None else RecordingTransferEngine()
        self._store = BlockStore(config, clock, policy)
        self._seqs: dict[str, LiveSequence] = {}
        self._tpb = config.tokens_per_block
        self._num_reserved = 0
        self._version = 0
        # Inside a step: the requests it touched (their pre-step tokens stay the valid
        # ones), and those with blocks to store at its end.
        self._deferred: dict[str, LiveSequence] | None = None
        self._pending_stores: dict[str, LiveSequence] = {}

    # ---- queries -------------------------------------------------------------------------

    @property
    def stats(self) -> CacheStats:
        return self._store.stats

    @property
    def num_free_gpu_blocks(self) -> int:
        """GPU blocks a new request can take now: free plus evictable, less what live
        requests have reserved for their growth. Pure."""
        return self._store.gpu.num_available - self._num_reserved

    @property
    def num_reserved_gpu_blocks(self) -> int:
        return self._num_reserved

    @property
    def version(self) -> int:
        """Changes whenever a mutating call may have changed what ``lookup`` answers; a
        caller can keep a lookup while the version stays the same. Pure."""
        return self._version

    @property
    def num_free_host_blocks(self) -> int:
        return self._store.host.num_available

    @property
    def num_sequences(self) -> int:
        return len(self._seqs)

    @property
    def num_key_spaces(self) -> int:
        """Key spaces (LoRA id and salt pairs) holding cached blocks or live requests: it
        does not grow with the salts ever seen. Pure."""
        return len(self._store.roots)

    def block_table(self, request_id: str) -> list[int]:
        """A copy of the GPU block table of a live request."""
        return list(self._seq(request_id).block_table)

    def lookup(
        self,
        tokens: Sequence[int],
        salt: bytes | str | int | None = None,
        lora_id: int | None = None,
        mm_items: Sequence[MultimodalItem] = (),
    ) -> PrefixMatch:
        """The reuse a request with these tokens would get if admitted now. Pure query.

        Arguments are checked exactly as ``SequenceSpec`` checks them (ValueError)."""
        token_ids = token_list(tokens, "tokens")
        check_key("salt", salt)
        check_lora_id(lora_id)
        items = check_mm_items(mm_items, len(token_ids), "lookup")
        return self._lookup(token_ids, salt, lora_id, items)

    def missing_block_hashes(
        self,
        tokens: list[int],
        salt: bytes | str | int | None = None,
        lora_id: int | None = None,
    ) -> list[int]:
        """Chained hashes of the prompt's reusable full blocks past what the tiers hold
        now, in order: what a remote tier could supply (``import_blocks``). Pure query."""
        tokens = token_list(tokens, "tokens")
        m = self.lookup(tokens, salt=salt, lora_id=lora_id)
        tpb = self._tpb
        hash_fn = get_hash_fn(self.config.hash_algo)
        reusable = tokens[: (len(tokens) - 1) // tpb * tpb]
        hashes = chain_hashes(hash_fn, root_hash(hash_fn, lora_id, salt), reusable, tpb, lora_id)
        return hashes[(m.num_tokens - m.num_partial_tokens) // tpb:]

    def lookup_spec(self, spec: SequenceSpec) -> PrefixMatch:
        """``lookup`` for a spec's prompt (validated when the spec was built). Pure query."""
        return self._lookup(list(spec.tokens), spec.salt, spec.lora_id, spec.mm_items)

    def _lookup(self, tokens: list[int], salt: object, lora_id: object,
                mm_items: Sequence[MultimodalItem]) -> PrefixMatch:
        root = self._store.root(lora_id, salt)
        m = self.match_tokens(root, tokens, block_extras(mm_items, len(tokens), self._tpb))
        return promise_of(m, self.config).match

    def match_tokens(self, root: Root | None, tokens: list[int],
                     extras: list[object] | None) -> Match:
        """Where ``tokens`` (validated) meet the tree under ``root``. Pure query."""
        if root is None or not self.config.enable_block_reuse:
            return _NO_MATCH
        return match(root, tokens, len(tokens) - 1, self._tpb, extras,
                     self.config.enable_partial_reuse)

    # ---- admission -----------------------------------------------------------------------

    def add_sequence(self, spec: SequenceSpec) -> Admission:
        """Admit one request now (the sequential path)."""
        return self.add_sequence_batch([spec])[0]

    def add_sequence_batch(self, specs: Iterable[SequenceSpec]) -> list[Admission]:
        """Admit a batch in two phases (see ``kvtier.admission``). Returns one admission
        per spec, in order. Raises (TypeError for an item that is no ``SequenceSpec``,
        ValueError on a duplicate or live request id, or a batch that could not fit even in
        an empty GPU pool) changing nothing: not even ``version``."""
        specs = self._check_batch(specs)
        return BatchAdmission(self).run(specs)

    # ---- growth and release --------------------------------------------------------------

    def schedule_prefill(self, request_id: str, num_tokens: int) -> None:
        """Mark the next ``num_tokens`` prompt tokens as scheduled (a later prefill chunk);
        full blocks they complete become reusable."""
        seq = self._seq(request_id)
        if type(num_tokens) is not int or num_tokens < 1:
            raise ValueError(f"num_tokens must be an int >= 1, got {num_tokens!r}")
        remaining = len(seq.tokens) - seq.num_scheduled_tokens
        if num_tokens > remaining:
            raise ValueError(
                f"{request_id!r} has {remaining} unscheduled prompt tokens, asked {num_tokens}")
        self._schedule(seq, seq.num_scheduled_tokens + num_tokens)
        self._version += 1
        self._store_blocks(seq)

    def num_unscheduled_tokens(self, request_id: str) -> int:
        """Prompt tokens of a live request not yet scheduled. Pure."""
        seq = self._seq(request_id)
        return len(seq.tokens) - seq.num_scheduled_tokens

    def num_blocks_to_append(self, request_id: str, num_tokens: int) -> int:
        """New GPU blocks ``append_tokens`` would need for ``num_tokens`` more tokens. Pure."""
        seq = self._seq(request_id)
        return max(0, -(-(len(seq.tokens) + num_tokens) // self._tpb) - len(seq.block_table))

    def append_tokens(self, request_id: str, tokens: Sequence[int]) -> list[int] | None:
        """Grow a request by decode tokens; returns the new block ids, or ``None`` (and
        changes nothing) if the GPU pool cannot supply them. Blocks that fill are stored."""
        seq = self._seq(request_id)
        tokens = token_list(tokens, f"tokens appended to {request_id!r}")
        self._check_prefilled(seq)
        return self._append(seq, tokens)

    def _check_prefilled(self, seq: LiveSequence) -> None:
        if seq.num_scheduled_tokens < len(seq.tokens):
            raise ValueError(
                f"{seq.request_id!r} still has {len(seq.tokens) - seq.num_scheduled_tokens} "
                "unscheduled prompt tokens; append only after its prefill")

    def _append(self, seq: LiveSequence, tokens: list[int]) -> list[int] | None:
        tpb = self._tpb
        num_tokens = len(seq.tokens) + len(tokens)
        need = -(-num_tokens // tpb) - len(seq.block_table)
        new: list[int] = []
        if need > 0:
            if need > self._store.gpu.num_available - (self._num_reserved - seq.num_reserved):
                return None
            self._version += 1
            ops: list[TransferOp] = []
            new = self._store.allocate_gpu(need, ops)
            used = min(need, seq.num_reserved)
            seq.num_reserved -= used
            self._num_reserved -= used
            seq.block_table += new
            if ops:
                self.engine.submit(TransferPlan(tuple(ops)))
        seq.tokens += tokens
        if seq.extras is not None:
            seq.extras += [None] * (-(-num_tokens // tpb) - len(seq.extras))
        self._schedule(seq, num_tokens)
        if num_tokens // tpb > seq.num_path_blocks:
            self._store_blocks(seq)
        return new

    def append_token_batch(self, items: Sequence[tuple[str, int]]) -> int:
        """``append_tokens(rid, [token])`` for each item in order, stopping at the first
        that finds no block: returns how many were applied (``len(items)`` if all were).
        Every item is checked before any is applied: a bad one raises, changing nothing.

        The decode path of a step: one call, and no allocation for the many requests whose
        next token fits their last block.
        """
        seqs = self._seqs
        batch: list[tuple[LiveSequence, int]] = []
        for i, item in enumerate(items):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"item {i} must be a (request_id, token) pair, got {item!r}")
            rid, token = item
            seq = seqs.get(rid) if type(rid) is str else None
            if seq is None:
                raise KeyError(f"item {i}: unknown request_id {rid!r}")
            check_token(token, f"item {i}: the token appended to {rid!r}")
            self._check_prefilled(seq)
            batch.append((seq, token))
        tpb = self._tpb
        deferred = self._deferred
        for i, (seq, token) in enumerate(batch):
            n = len(seq.tokens) + 1
            if n > len(seq.block_table) * tpb or n % tpb == 0:
                # The general path: allocation, storing a block that fills.
                if self._append(seq, [token]) is None:
                    return i
                continue
            seq.tokens.append(token)
            # Inline _schedule: this loop runs for every decoding request of every step.
            if deferred is None:
                seq.num_valid_tokens = n - 1
            elif seq.request_id not in deferred:
                seq.num_valid_tokens = n - 1
                deferred[seq.request_id] = seq
            seq.num_scheduled_tokens = n
        return len(batch)

    def import_blocks(
        self,
        tokens: list[int],
        num_blocks: int,
        salt: bytes | str | int | None = None,
        lora_id: int | None = None,
    ) -> list[int]:
        """Cache up to ``num_blocks`` full blocks of ``tokens`` past what the tiers already
        hold, as host blocks whose KV the caller fills from elsewhere (a remote store);
        returns their host slots, in order: fewer (or none) when the host has less room.

        For a request waiting in the queue: a later ``lookup`` counts these blocks as host
        hits, and admission onboards them like any other. The caller must write the slots
        before the next manager call that may read them (an admission's plan).
        """
        tokens = token_list(tokens, "tokens")
        if type(num_blocks) is not int or num_blocks < 0:
            raise ValueError(f"num_blocks must be an int >= 0, got {num_blocks!r}")
        check_key("salt", salt)
        check_lora_id(lora_id)
        if not self.config.enable_block_reuse or not self.config.num_host_blocks:
            return []
        store = self._store
        root = store.join_root(lora_id, salt)
        try:
            return self._import(root, tokens, num_blocks)
        finally:
            store.leave_root(root)

    def _import(self, root: Root, tokens: list[int], num_blocks: int) -> list[int]:
        store = self._store
        m = self.match_tokens(root, tokens, None)
        start = m.num_blocks
        end = min(start + num_blocks, (len(tokens) - 1) // self._tpb)
        if end <= start:
            return []
        parent: Node = m.path[-1] if m.path else root
        if m.tail is not None:
            parent = store.split(m.tail[0], m.tail[1])
        # The parent's run must not be evicted while room is made for its extension.
        store.ref_path(parent)
        tpb = self._tpb
        node = store.import_run(parent, tokens[start * tpb:end * tpb], end - start)
        store.unref_path(parent)
        if node is None:
            return []
        self._version += 1
        store.stats.num_imported_blocks += node.num_blocks
        return list(node.slots)

    def record_spills(self) -> None:
        """Start logging host blocks as they leave the cache, for a write-back remote tier:
        see ``drain_spills``."""
        if self._store.spill_log is None:
            self._store.spill_log = []

    def drain_spills(self) -> list[tuple[int, int]]:
        """(block hash, host slot) of each host block dropped since the last drain whose KV
        is still in its slot: read it before executing the transfer plans of those calls
        (they may reuse the slot). Blocks offloaded and dropped between two drains are not
        listed. Requires ``record_spills``."""
        if self._store.spill_log is None:
            raise RuntimeError("drain_spills() needs record_spills() first")
        return self._store.drain_spills()

    def remove_sequence(self, request_id: str, store_for_reuse: bool = True) -> None:
        """Release a request, tail first. Its full scheduled blocks stay cached for reuse
        (unless ``store_for_reuse`` is False: then only blocks already stored do)."""
        seq = self._seq(request_id)
        if type(store_for_reuse) is not bool:
            raise ValueError(f"store_for_reuse must be a bool, got {store_for_reuse!r}")
        self._version += 1
        if store_for_reuse:
            # Inside a step, what this request scheduled in the step is not computed yet.
            in_step = self._deferred is not None and request_id in self._deferred
            self._store_blocks(seq, now=True,
                               limit=seq.num_valid_tokens if in_step else None)
        del self._seqs[request_id]
        self._num_reserved -= seq.num_reserved
        store = self._store
        private = seq.own_slots()
        if private:
            store.free_gpu(private)
        store.unref_path(seq.last_node, seq.priority, seq.retention_s)
        store.leave_root(seq.root)

    def transfer_failed(self, plan: TransferPlan, failed_ops: Iterable[int]) -> list[str]:
        """Degrade failed copies to recompute; returns the requests that must recompute
        (see ``kvtier.recovery``)."""
        return fail_transfers(self, plan, failed_ops)

    def begin_step(self) -> None:
        """Until ``end_step``, blocks scheduled by admissions, prefill chunks and appends
        are not stored: no request of a step reuses blocks that the same step computes."""
        if self._deferred is not None:
            raise RuntimeError("begin_step() called twice without end_step()")
        self._deferred = {}

    def end_step(self) -> None:
        """Store the blocks scheduled since ``begin_step``."""
        if self._deferred is None:
            raise RuntimeError("end_step() called without begin_step()")
        self._deferred = None
        pending, self._pending_stores = self._pending_stores, {}
        for rid, seq in pending.items():
            if self._seqs.get(rid) is seq:
                self._store_blocks(seq)

    def _schedule(self, seq: LiveSequence, num_tokens: int) -> None:
        """Set ``seq``'s scheduled tokens. What was scheduled before stays valid (computed
        by the time a later step reads it); inside a step, only what was scheduled before
        the step began (a request may be touched twice in one step)."""
        deferred = self._deferred
        if deferred is None:
            seq.num_valid_tokens = seq.num_scheduled_tokens
        elif seq.request_id not in deferred:
            seq.num_valid_tokens = seq.num_scheduled_tokens
            deferred[seq.request_id] = seq
        seq.num_scheduled_tokens = num_tokens

    def _store_blocks(self, seq: LiveSequence, now: bool = False,
                      limit: int | None = None) -> None:
        """Store ``seq``'s full scheduled blocks (up to ``limit`` tokens) past its path;
        inside a step, only note that it has some, for ``end_step``."""
        if self._deferred is not None and not now:
            self._deferred[seq.request_id] = seq
            self._pending_stores[seq.request_id] = seq
            return
        if not self.config.enable_block_reuse:
            return
        tpb = self._tpb
        start = seq.num_path_blocks
        end = min(seq.num_scheduled_tokens, len(seq.tokens),
                  len(seq.tokens) if limit is None else limit) // tpb
        if end <= start:
            return
        extras = seq.extras[start:end] if seq.extras is not None else None
        run = self._store.insert_run(seq.last_node, seq.tokens[start * tpb:end * tpb],
                                     seq.block_table[start:end], extras)
        self._version += 1
        seq.last_node = run.node
        seq.private_slots += run.private_slots

    def reset_cache(self) -> bool:
        """Drop every cached block of every tier. Refused (returns False) while any request
        is live."""
        if self._seqs:
            return False
        self._version += 1
        store = self._store
        for root in list(store.roots.values()):
            for child in list(root.iter_children()):
                store.drop(child)
        store.roots.clear()
        if store.events is not None:
            store.events.append(AllBlocksCleared(store.events.next_seq()))
        return True

    def drain_events(self) -> list[Event]:
        """Events since the last drain, oldest first (empty unless ``enable_events``)."""
        return self._store.events.drain() if self._store.events is not None else []

    # ---- validation and invariants -------------------------------------------------------

    def _seq(self, request_id: str) -> LiveSequence:
        try:
            return self._seqs[request_id]
        except KeyError:
            raise KeyError(f"unknown request_id {request_id!r}") from None

    def _check_batch(self, specs: Iterable[SequenceSpec]) -> list[SequenceSpec]:
        if isinstance(specs, (SequenceSpec, str, bytes)) or not isinstance(specs, Iterable):
            raise TypeError(f"specs must be an iterable of SequenceSpec, got {specs!r}")
        specs = list(specs)
        seen: set[str] = set()
        for i, spec in enumerate(specs):
            if not isinstance(spec, SequenceSpec):
                raise TypeError(f"batch item {i} must be a SequenceSpec, got {spec!r}")
            rid = spec.request_id
            if rid in self._seqs:
                raise ValueError(f"request_id {rid!r} (batch item {i}) is already live")
            if rid in seen:
                raise ValueError(f"request_id {rid!r} appears twice in the batch (item {i})")
            seen.add(rid)
        return specs

    def check_invariants(self) -> None:
        """Recompute the books from scratch and assert they match. Pure."""
        from kvtier.invariants import check_manager

        check_manager(self)


