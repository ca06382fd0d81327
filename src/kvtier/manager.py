"""KVCacheManager: lookup, two-phase batch admission, growth and release of sequences.

How a batch is admitted (``add_sequence_batch``)::

    phase 1  for every request: match the tree and claim (reference) every reusable run,
             then claim every partial-reuse source.      Nothing is allocated or copied.
    check    in batch order, admit a request if its new and onboarded blocks fit in what is
             free or evictable now; roll back the claims of those that don't.
    phase 2  for every admitted request: onboard its host runs, allocate its new blocks,
             issue its partial copy, release the copy's source. Eviction sees only
             unreferenced blocks, and every claimed block is referenced, so each admitted
             request gets exactly the reuse ``lookup`` promised it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from kvtier.config import CacheConfig
from kvtier.events import AllBlocksCleared, Event
from kvtier.eviction import EvictionPolicy
from kvtier.metrics import CacheStats
from kvtier.radix import Match, Node, PartialMatch, Root, Tier, match, path_to_root
from kvtier.sequence import MultimodalItem, SequenceSpec, check_tokens
from kvtier.store import BlockStore
from kvtier.transfer.engine import RecordingTransferEngine, TransferEngine
from kvtier.transfer.plan import OpKind, TransferOp, TransferPlan

_NO_MATCH = Match([], None, 0, None)


class PrefixMatch(NamedTuple):
    """What ``lookup`` promises: the reusable tokens of a prompt, split by the tier they come
    from (a partially reused block counts in its source's tier)."""

    num_tokens: int
    num_gpu_tokens: int
    num_host_tokens: int
    num_partial_tokens: int


class Admission(NamedTuple):
    """The outcome of one request of a batch. ``block_ids`` is its block table (GPU slots)."""

    request_id: str
    admitted: bool
    num_reused_tokens: int
    num_onboarded_tokens: int
    block_ids: tuple[int, ...]
    reason: str | None = None


class _Seq:
    """A live request: its claimed path (``last_node`` and up) and its private blocks."""

    __slots__ = (
        "block_table",
        "can_store",
        "extras",
        "last_node",
        "num_reserved",
        "num_scheduled_tokens",
        "owns_tokens",
        "priority",
        "request_id",
        "retention_s",
        "root",
        "tokens",
    )

    def __init__(self, spec: SequenceSpec, root: Root, extras: list[object] | None,
                 priority: int) -> None:
        self.request_id = spec.request_id
        self.tokens = spec.tokens
        self.owns_tokens = False
        self.root = root
        self.extras = extras
        self.priority = priority
        self.retention_s = spec.retention_s
        self.num_reserved = 0
        self.last_node: Node = root
        self.block_table: list[int] = []
        self.num_scheduled_tokens = 0
        self.can_store = True

    @property
    def num_path_blocks(self) -> int:
        node = self.last_node
        return node.start_block + len(node.slots)


class _Promise(NamedTuple):
    """A lookup's answer with the detail admission needs."""

    match: PrefixMatch
    num_gpu_blocks: int
    num_host_blocks: int
    partial_mode: str | None  # "in_place", "copy" or None
    num_partial_tokens: int


class _Pending(NamedTuple):
    """Phase-1 state of one request of a batch."""

    spec: SequenceSpec
    seq: _Seq
    promise: _Promise
    partial: PartialMatch | None
    partial_mode: str | None


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
        self._seqs: dict[str, _Seq] = {}
        self._tpb = config.tokens_per_block
        self._num_reserved = 0
        self._version = 0
        self._deferred: dict[str, _Seq] | None = None

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

    def block_table(self, request_id: str) -> list[int]:
        """A copy of the GPU block table of a live request."""
        return list(self._seq(request_id).block_table)

    def lookup(
        self,
        tokens: list[int],
        salt: bytes | str | int | None = None,
        lora_id: int | None = None,
        mm_items: Sequence[MultimodalItem] = (),
    ) -> PrefixMatch:
        """The reuse a request with these tokens would get if admitted now. Pure query."""
        check_tokens(tokens, "tokens")
        root = self._store.root(lora_id, salt)
        if root is None:
            return PrefixMatch(0, 0, 0, 0)
        m = self._match(root, tokens, _block_extras(mm_items, len(tokens), self._tpb))
        return self._promise(m).match

    def _match(self, root: Root, tokens: list[int], extras: list[object] | None) -> Match:
        if not self.config.enable_block_reuse:
            return _NO_MATCH
        return match(root, tokens, len(tokens) - 1, self._tpb, extras,
                     self.config.enable_partial_reuse)

    def _partial_mode(self, partial: PartialMatch | None) -> str | None:
        if partial is None:
            return None
        node = partial.node
        if (node.tier is Tier.GPU and not node.ref_count and not node.children
                and partial.block_index == node.num_blocks - 1):
            return "in_place"
        return "copy" if self.config.copy_on_partial_reuse else None

    def _promise(self, m: Match) -> _Promise:
        tpb = self._tpb
        host_blocks = sum(n.num_blocks for n in m.path if n.tier is Tier.HOST)
        if m.tail is not None and m.tail[0].tier is Tier.HOST:
            host_blocks += m.tail[1]
        gpu_blocks = m.num_blocks - host_blocks
        gpu_tokens = gpu_blocks * tpb
        host_tokens = host_blocks * tpb
        mode = self._partial_mode(m.partial)
        partial = 0
        if mode is not None and m.partial is not None:
            partial = m.partial.num_tokens
            if m.partial.node.tier is Tier.GPU:
                gpu_tokens += partial
            else:
                host_tokens += partial
        prefix = PrefixMatch(gpu_tokens + host_tokens, gpu_tokens, host_tokens, partial)
        return _Promise(prefix, gpu_blocks, host_blocks, mode, partial)

    # ---- admission -----------------------------------------------------------------------

    def add_sequence(self, spec: SequenceSpec) -> Admission:
        """Admit one request now (the sequential path)."""
        return self.add_sequence_batch([spec])[0]

    def add_sequence_batch(self, specs: Sequence[SequenceSpec]) -> list[Admission]:
        """Admit a batch in two phases; see the module docstring. Returns one admission per
        spec, in order. Raises ValueError, changing nothing, on a duplicate or live request
        id, or a batch that could not fit even in an empty GPU pool."""
        self._check_batch(specs)
        self._version += 1
        store = self._store
        tpb = self._tpb
        roots = [store.new_root(s.lora_id, s.salt) for s in specs]
        extras_of = [_block_extras(s.mm_items, len(s.tokens), tpb) for s in specs]
        # The promises, on the untouched tree: exactly what lookup() reports.
        matches = [self._match(r, s.tokens, e) for r, s, e in zip(roots, specs, extras_of)]
        self._check_footprint(specs, matches)
        promises = [self._promise(m) for m in matches]

        # Phase 1a: claim every full-block match. A claim splits runs but never changes
        # what a match finds, so each request is matched again against the current tree.
        pending: list[_Pending] = []
        for i, spec in enumerate(specs):
            m = matches[i] if i == 0 else self._match(roots[i], spec.tokens, extras_of[i])
            seq = _Seq(spec, roots[i], extras_of[i], self.config.default_priority
                       if spec.priority is None else spec.priority)
            self._claim_path(seq, m)
            pending.append(_Pending(spec, seq, promises[i], None, promises[i].partial_mode))
        # Phase 1b: claim partial-reuse sources, found again below each claimed path. A
        # source stays reusable in place only if no other request of the batch claimed it.
        for i, p in enumerate(pending):
            if p.partial_mode is not None:
                pending[i] = self._claim_partial(p)
        for i, p in enumerate(pending):
            if p.partial_mode == "in_place" and p.partial is not None and (
                    p.partial.node.ref_count != 1 or p.partial.node.children
                    or p.partial.node.num_blocks != 1):
                # NOTE: another request of this batch reuses the block too, so it can't be
                # overwritten; copying keeps the promise even when copy_on_partial_reuse is off.
                pending[i] = p._replace(partial_mode="copy")

        # Check: admit in batch order while new and onboarded blocks fit; roll back the rest.
        consumed = 0
        onboarding: set[int] = set()
        admitted: list[bool] = []
        for p in pending:
            host_runs = [n for n in path_to_root(p.seq.last_node)
                         if n.tier is Tier.HOST and n.uid not in onboarding]
            need = (-(-len(p.spec.tokens) // tpb) - p.seq.num_path_blocks
                    - (p.partial_mode == "in_place") + sum(n.num_blocks for n in host_runs)
                    + p.spec.num_reserved_blocks)
            if need <= store.gpu.num_available - self._num_reserved - consumed:
                consumed += need
                onboarding.update(n.uid for n in host_runs)
                admitted.append(True)
            else:
                self._release_claims(p)
                admitted.append(False)

        # Phase 2: onboard, allocate, copy. Evictions see only unreferenced blocks.
        ops: list[TransferOp] = []
        results = []
        for p, ok in zip(pending, admitted):
            if ok:
                results.append(self._admit(p, ops))
            else:
                store.stats.num_rejected += 1
                results.append(Admission(p.spec.request_id, False, 0, 0, (),
                                         "not enough free or evictable GPU blocks"))
        if ops:
            self.engine.submit(TransferPlan(tuple(ops)))
        return results

    def _claim_partial(self, p: _Pending) -> _Pending:
        """Claim the source block of ``p``'s partial reuse, cut to start its run."""
        tpb = self._tpb
        tokens = p.spec.tokens
        m = match(p.seq.root, tokens, len(tokens) - 1, tpb, p.seq.extras, True)
        assert m.num_blocks == p.seq.num_path_blocks and m.partial is not None, (m, p)
        partial = m.partial
        if partial.block_index:
            self._store.split(partial.node, partial.block_index)
            partial = PartialMatch(partial.node, 0, partial.num_tokens)
        if partial.node.num_blocks > 1:
            # Claim the source block alone, not the run behind it.
            partial = PartialMatch(self._store.split(partial.node, 1), 0, partial.num_tokens)
        assert partial.num_tokens == p.promise.num_partial_tokens
        self._store.ref_path(partial.node)
        return p._replace(partial=partial)

    def _claim_path(self, seq: _Seq, m: Match) -> None:
        last: Node = seq.root
        if m.path:
            last = m.path[-1]
        if m.tail is not None:
            node, k = m.tail
            last = self._store.split(node, k)
        seq.last_node = last
        self._store.ref_path(last)

    def _release_claims(self, p: _Pending) -> None:
        store = self._store
        if p.partial is not None and p.partial_mode is not None:
            store.unref_path(p.partial.node)
        store.unref_path(p.seq.last_node)

    def _admit(self, p: _Pending, ops: list[TransferOp]) -> Admission:
        store = self._store
        seq = p.seq
        tpb = self._tpb
        # Onboard the claimed host runs (the deepest part of the path), top down.
        host_nodes = [n for n in path_to_root(seq.last_node) if n.tier is Tier.HOST]
        num_onboarded = 0
        for node in reversed(host_nodes):
            num_onboarded += store.onboard(node, ops) * tpb
        table: list[int] = []
        for node in reversed(list(path_to_root(seq.last_node))):
            table += node.slots
        num_partial = 0
        partial = p.partial
        num_blocks = -(-len(seq.tokens) // tpb)
        if partial is not None and p.partial_mode == "in_place":
            table.append(store.detach_leaf_block(partial.node))
            partial.node.ref_count = 0
            store.unref_path(seq.last_node)  # the source's claim on its ancestors: our path
            num_partial = partial.num_tokens
            store.stats.num_partial_in_place += 1
        table += store.allocate_gpu(num_blocks - len(table), ops)
        if partial is not None and p.partial_mode == "copy":
            src = partial.node
            dst = table[seq.num_path_blocks]
            ops.append(TransferOp(OpKind.COPY, src.tier, src.slots[0], Tier.GPU, dst,
                                  partial.num_tokens))
            store.unref_path(src)
            num_partial = partial.num_tokens
            store.stats.num_partial_copies += 1
            if src.tier is Tier.HOST:
                num_onboarded += partial.num_tokens
        seq.block_table = table
        num_reused = seq.num_path_blocks * tpb + num_partial
        promise = p.promise
        assert num_reused == promise.match.num_tokens, (seq.request_id, num_reused, promise)
        new = p.spec.num_new_tokens
        seq.num_scheduled_tokens = len(seq.tokens) if new is None else min(
            len(seq.tokens), num_reused + new)
        self._seqs[seq.request_id] = seq
        seq.num_reserved = p.spec.num_reserved_blocks
        self._num_reserved += seq.num_reserved
        self._record_admission(seq, promise)
        self._store_blocks(seq)
        return Admission(seq.request_id, True, num_reused, num_onboarded, tuple(table))

    def _record_admission(self, seq: _Seq, promise: _Promise) -> None:
        stats = self._store.stats
        num_full = len(seq.tokens) // self._tpb
        gpu_blocks, host_blocks = promise.num_gpu_blocks, promise.num_host_blocks
        stats.gpu.reused_blocks += gpu_blocks
        stats.gpu.missed_blocks += num_full - gpu_blocks
        stats.host.reused_blocks += host_blocks
        stats.host.missed_blocks += num_full - gpu_blocks - host_blocks
        stats.num_admitted += 1
        stats.num_prompt_tokens += len(seq.tokens)
        stats.num_reused_tokens += promise.match.num_tokens
        stats.num_partial_tokens += promise.num_partial_tokens

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
        seq.num_scheduled_tokens += num_tokens
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

    def append_tokens(self, request_id: str, tokens: list[int]) -> list[int] | None:
        """Grow a request by decode tokens; returns the new block ids, or ``None`` (and
        changes nothing) if the GPU pool cannot supply them. Blocks that fill are stored."""
        seq = self._seq(request_id)
        check_tokens(tokens, f"tokens appended to {request_id!r}")
        if seq.num_scheduled_tokens < len(seq.tokens):
            raise ValueError(
                f"{request_id!r} still has {len(seq.tokens) - seq.num_scheduled_tokens} "
                "unscheduled prompt tokens; append only after its prefill")
        need = self.num_blocks_to_append(request_id, len(tokens))
        if need > self._store.gpu.num_available - (self._num_reserved - seq.num_reserved):
            return None
        self._version += 1
        ops: list[TransferOp] = []
        new = self._store.allocate_gpu(need, ops)
        used = min(need, seq.num_reserved)
        seq.num_reserved -= used
        self._num_reserved -= used
        seq.block_table += new
        if not seq.owns_tokens:
            seq.tokens = list(seq.tokens)
            seq.owns_tokens = True
        seq.tokens += tokens
        if seq.extras is not None:
            seq.extras += [None] * (-(-len(seq.tokens) // self._tpb) - len(seq.extras))
        seq.num_scheduled_tokens = len(seq.tokens)
        self._store_blocks(seq)
        if ops:
            self.engine.submit(TransferPlan(tuple(ops)))
        return new

    def remove_sequence(self, request_id: str, store_for_reuse: bool = True) -> None:
        """Release a request, tail first. Its full scheduled blocks stay cached for reuse
        (unless ``store_for_reuse`` is False: then only blocks already stored do)."""
        seq = self._seq(request_id)
        self._version += 1
        if store_for_reuse:
            self._store_blocks(seq, now=True)
        del self._seqs[request_id]
        self._num_reserved -= seq.num_reserved
        store = self._store
        private = seq.block_table[seq.num_path_blocks:]
        if private:
            store.free_gpu(private)
        store.unref_path(seq.last_node, seq.priority, seq.retention_s)

    def begin_step(self) -> None:
        """Until ``end_step``, blocks scheduled by admissions, prefill chunks and appends
        are not stored: no request of a step reuses blocks that the same step computes."""
        if self._deferred is not None:
            raise RuntimeError("begin_step() called twice without end_step()")
        self._deferred = {}

    def end_step(self) -> None:
        """Store the blocks scheduled since ``begin_step``."""
        deferred, self._deferred = self._deferred, None
        if deferred is None:
            raise RuntimeError("end_step() called without begin_step()")
        for rid, seq in deferred.items():
            if self._seqs.get(rid) is seq:
                self._store_blocks(seq)
        if deferred:
            self._version += 1

    def _store_blocks(self, seq: _Seq, now: bool = False) -> None:
        if self._deferred is not None and not now:
            self._deferred[seq.request_id] = seq
            return
        if not seq.can_store or not self.config.enable_block_reuse:
            return
        tpb = self._tpb
        start = seq.num_path_blocks
        end = min(seq.num_scheduled_tokens, len(seq.tokens)) // tpb
        if end <= start:
            return
        extras = seq.extras[start:end] if seq.extras is not None else None
        node = self._store.insert_run(seq.last_node, seq.tokens[start * tpb:end * tpb],
                                      seq.block_table[start:end], extras)
        if node is None:
            seq.can_store = False
        else:
            seq.last_node = node

    def reset_cache(self) -> bool:
        """Drop every cached block of every tier. Refused (returns False) while any request
        is live."""
        if self._seqs:
            return False
        self._version += 1
        store = self._store
        for root in store.roots.values():
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

    def _seq(self, request_id: str) -> _Seq:
        try:
            return self._seqs[request_id]
        except KeyError:
            raise KeyError(f"unknown request_id {request_id!r}") from None

    def _check_batch(self, specs: Sequence[SequenceSpec]) -> None:
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

    def _check_footprint(self, specs: Sequence[SequenceSpec], matches: list[Match]) -> None:
        """Raise if the batch could not fit even in an empty GPU pool. Pure."""
        tpb = self._tpb
        capacity = self.config.num_gpu_blocks
        total = 0
        shared: dict[int, int] = {}
        for spec, m in zip(specs, matches):
            num_blocks = -(-len(spec.tokens) // tpb)
            if num_blocks > capacity:
                raise ValueError(
                    f"request {spec.request_id!r} needs {num_blocks} blocks "
                    f"({len(spec.tokens)} tokens / {tpb}) but num_gpu_blocks is {capacity}")
            total += num_blocks - m.num_blocks
            for node in m.path:
                shared[node.uid] = node.num_blocks
            if m.tail is not None:
                node, k = m.tail
                shared[node.uid] = max(shared.get(node.uid, 0), k)
        total += sum(shared.values())
        if total > capacity:
            raise ValueError(
                f"the batch of {len(specs)} requests needs {total} GPU blocks at once but "
                f"num_gpu_blocks is {capacity}")

    def check_invariants(self) -> None:
        """Recompute the books from scratch and assert they match. Pure."""
        from kvtier.invariants import check_manager

        check_manager(self)


def _block_extras(
    mm_items: Sequence[MultimodalItem], num_tokens: int, tpb: int
) -> list[object] | None:
    """Per block, the multimodal hashes (with offsets) of the items overlapping it."""
    if not mm_items:
        return None
    per_block: list[list[tuple[object, int]]] = [[] for _ in range(-(-num_tokens // tpb))]
    for item in mm_items:
        for b in range(item.offset // tpb, (item.offset + item.length - 1) // tpb + 1):
            per_block[b].append((item.content_hash, item.offset - b * tpb))
    return [tuple(x) if x else None for x in per_block]
