"""Two-phase admission of one batch: claim everything first, then onboard and allocate.

::

    promise  match every spec on the untouched tree: exactly what lookup() answers
    phase 1a claim: match each spec again and reference its path (split at its end)
    phase 1b claim each partial-reuse source block; a source claimed by two requests of
             the batch is copied by both instead of reused in place
    check    in batch order, admit a request if its new blocks, its host blocks not yet
             onboarded and its reservation fit in what is free or evictable now; roll back
             the claims of the others
    phase 2  per admitted request: onboard its host runs, reuse in place or allocate and
             copy its partial block, allocate the new blocks of its scheduled tokens
             (reserving the rest of its prompt), store what it schedules (a request
             that skips reading the cache: after the whole batch)

Phase 2 evicts only unreferenced blocks and every claimed block is referenced from phase 1
on, so each admitted request gets exactly the reuse ``lookup`` promised it.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

from kvtier.blocks import cdiv
from kvtier.cache import BlockCache
from kvtier.config import CacheConfig
from kvtier.live import LiveTable
from kvtier.matching import Match, PartialMatch, match
from kvtier.metrics import CountedReuse
from kvtier.radix import Node, path_to_root
from kvtier.reprs import shown
from kvtier.sequence import LiveSequence, SequenceSpec, block_extras
from kvtier.slots import SLOT_TYPECODE, BlockIds
from kvtier.tier import Tier
from kvtier.transfer.plan import OpKind, PlanRecorder

_NO_BLOCK_IDS = BlockIds()  # a refused request's (a snapshot: one serves all)

PartialMode = Literal["in_place", "copy"]
"""How a partial match is reused: the source block itself (an unclaimed GPU leaf), or a
copy of its matching tokens into a new block."""


class PrefixMatch(NamedTuple):
    """What ``lookup`` promises: the reusable tokens of a prompt, split by the tier they come
    from (a partially reused block counts in its source's tier)."""

    num_tokens: int
    num_gpu_tokens: int
    num_host_tokens: int
    num_partial_tokens: int


class Admission(NamedTuple):
    """The outcome of one request of a batch. ``block_ids`` is its block table (GPU slots)
    for the tokens scheduled now, read like a tuple (``kvtier.slots.BlockIds``: kept
    packed, an int made per slot only when read); the rest of the prompt's blocks are
    reserved and join the table as later chunks are scheduled
    (``KVCacheManager.schedule_prefill``)."""

    request_id: str
    admitted: bool
    num_reused_tokens: int
    num_onboarded_tokens: int
    block_ids: Sequence[int]  # a BlockIds
    reason: str | None = None


class Promise(NamedTuple):
    """A lookup's answer with the detail admission needs."""

    match: PrefixMatch
    num_gpu_blocks: int
    num_host_blocks: int
    partial_mode: PartialMode | None
    num_partial_tokens: int


class Pending(NamedTuple):
    """Phase-1 state of one request of a batch."""

    spec: SequenceSpec
    seq: LiveSequence
    promise: Promise
    partial: PartialMatch | None
    partial_mode: PartialMode | None


def partial_mode(partial: PartialMatch | None, config: CacheConfig) -> PartialMode | None:
    """How a partial match would be reused now: in place, by copy, or not at all. Pure."""
    if partial is None:
        return None
    node = partial.node
    if (node.tier is Tier.GPU and not node.ref_count and not node.children
            and partial.block_index == node.num_blocks - 1):
        return "in_place"
    return "copy" if config.copy_on_partial_reuse else None


def promise_of(m: Match, config: CacheConfig) -> Promise:
    """What admitting the request of ``m`` now would reuse, by tier. Pure."""
    tpb = config.tokens_per_block
    host_blocks = sum(len(n.slots) for n in m.path if n.tier is Tier.HOST)
    if m.tail is not None and m.tail[0].tier is Tier.HOST:
        host_blocks += m.tail[1]
    gpu_blocks = m.num_blocks - host_blocks
    gpu_tokens = gpu_blocks * tpb
    host_tokens = host_blocks * tpb
    mode = partial_mode(m.partial, config)
    partial = 0
    if mode is not None and m.partial is not None:
        partial = m.partial.num_tokens
        if m.partial.node.tier is Tier.GPU:
            gpu_tokens += partial
        else:
            host_tokens += partial
    prefix = PrefixMatch(gpu_tokens + host_tokens, gpu_tokens, host_tokens, partial)
    return Promise(prefix, gpu_blocks, host_blocks, mode, partial)


class BatchAdmission:
    """Admits one batch; used once, by ``KVCacheManager.add_sequence_batch``.

    Contract: claims and releases paths and allocates through ``cache``; adds the admitted
    requests to ``live``; hands each admitted request to ``store_blocks`` (which stores what
    it schedules: a request that skips reading the cache only once the whole batch is
    admitted); changes nothing else. A request that is not admitted leaves no claim.
    """

    def __init__(self, cache: BlockCache, live: LiveTable, config: CacheConfig,
                 store_blocks: Callable[[LiveSequence], None]) -> None:
        self.config = config
        self._cache = cache
        self._live = live
        self._store_blocks = store_blocks
        self._tpb = config.tokens_per_block

    def run(self, specs: Sequence[SequenceSpec], ops: PlanRecorder) -> list[Admission]:
        """Admit ``specs`` (already checked for ids) and return one admission each; the
        copies this needs are appended to ``ops``, in program order."""
        cache = self._cache
        tpb = self._tpb
        extras_of = [block_extras(s.mm_items, len(s.token_array), tpb) for s in specs]
        # The promises, on the untouched tree: exactly what lookup() reports.
        matches = [cache.match_spec(cache.root(s.lora_id, s.salt), s, e)
                   for s, e in zip(specs, extras_of, strict=True)]
        self._check_footprint(specs, matches)
        promises = [promise_of(m, self.config) for m in matches]

        # Phase 1a: claim every full-block match. A claim splits runs but never changes
        # what a match finds, so each request is matched again against the current tree.
        pending: list[Pending] = []
        for i, spec in enumerate(specs):
            root = cache.join_root(spec.lora_id, spec.salt)
            m = matches[i] if i == 0 else cache.match_spec(root, spec, extras_of[i])
            priority = self.config.default_priority if spec.priority is None else spec.priority
            seq = LiveSequence(spec, root, extras_of[i], priority)
            self._claim_path(seq, m)
            pending.append(Pending(spec, seq, promises[i], None, promises[i].partial_mode))
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
            num_onboard = sum(len(n.slots) for n in host_runs)
            need = (cdiv(len(p.spec.token_array), tpb) - p.seq.num_path_blocks
                    - (p.partial_mode == "in_place") + num_onboard + p.spec.num_reserved_blocks)
            # A GPU copy source that only this request holds is released right after its
            # copy, before the rest is allocated: it counts as room for that rest.
            credit = int(p.partial_mode == "copy" and p.partial is not None
                         and p.partial.node.tier is Tier.GPU and p.partial.node.ref_count == 1)
            available = cache.gpu.num_available - self._live.num_reserved_blocks - consumed
            if need - credit <= available and num_onboard + credit <= available:
                consumed += need - credit
                onboarding.update(n.uid for n in host_runs)
                admitted.append(True)
            else:
                self._release_claims(p)
                admitted.append(False)

        # Phase 2: onboard, allocate, copy. Evictions see only unreferenced blocks.
        results = []
        skipped: list[LiveSequence] = []
        for p, ok in zip(pending, admitted, strict=True):
            if ok:
                results.append(self._admit(p, ops))
                if p.spec.skip_reading_prefix_cache:
                    skipped.append(p.seq)
                else:
                    self._store_blocks(p.seq)
            else:
                cache.stats.num_rejected += 1
                results.append(Admission(p.spec.request_id, False, 0, 0, _NO_BLOCK_IDS,
                                         "not enough free or evictable GPU blocks"))
        # NOTE: a request that skipped reading the cache claimed nothing, so its store
        # walks the cached runs it ignored: before the batch is admitted it would join the
        # claims of requests still in phase 2 (a partial source about to be reused in
        # place grew its blocks below it, or a second holder). Its blocks are stored once
        # every request of the batch has what phase 1 claimed for it.
        for seq in skipped:
            self._store_blocks(seq)
        return results

    def _claim_partial(self, p: Pending) -> Pending:
        """Claim the source block of ``p``'s partial reuse, cut to start its run."""
        tpb = self._tpb
        tokens = p.seq.tokens
        m = match(p.seq.root, tokens, len(tokens) - 1, tpb, p.seq.extras, True)
        assert m.num_blocks == p.seq.num_path_blocks and m.partial is not None, (m, p)
        partial = m.partial
        if partial.block_index:
            self._cache.split(partial.node, partial.block_index)
            partial = PartialMatch(partial.node, 0, partial.num_tokens)
        if partial.node.num_blocks > 1:
            # Claim the source block alone, not the run behind it.
            partial = PartialMatch(self._cache.split(partial.node, 1), 0, partial.num_tokens)
        assert partial.num_tokens == p.promise.num_partial_tokens
        self._cache.ref_path(partial.node)
        return p._replace(partial=partial)

    def _claim_path(self, seq: LiveSequence, m: Match) -> None:
        last: Node = seq.root
        if m.path:
            last = m.path[-1]
        if m.tail is not None:
            node, k = m.tail
            last = self._cache.split(node, k)
        seq.last_node = last
        cache = self._cache
        cache.ref_path(last)
        # What eviction learns from: the session's turn, the reuse, the prompt's size.
        seq.num_hit_blocks = seq.num_path_blocks
        seq.num_prompt_blocks = len(seq.tokens) // self._tpb
        seq.turn = cache.turn(last, seq.num_hit_blocks)

    def _release_claims(self, p: Pending) -> None:
        cache = self._cache
        if p.partial is not None and p.partial_mode is not None:
            cache.unref_path(p.partial.node)
        cache.unref_path(p.seq.last_node)
        cache.leave_root(p.seq.root)

    def _admit(self, p: Pending, ops: PlanRecorder) -> Admission:
        cache = self._cache
        seq = p.seq
        cache.note_reuse(seq)
        tpb = self._tpb
        # Onboard the claimed host runs (the deepest part of the path), top down.
        host_nodes = [n for n in path_to_root(seq.last_node) if n.tier is Tier.HOST]
        num_onboarded = cache.onboard_path(host_nodes[::-1], ops) * tpb if host_nodes else 0
        table = array(SLOT_TYPECODE)  # NOTE: each run's slots joined by memcpy
        for node in reversed(list(path_to_root(seq.last_node))):
            table += node.slots
        num_partial = 0
        partial = p.partial
        num_blocks = cdiv(len(seq.tokens), tpb)
        if partial is not None and p.partial_mode == "in_place":
            table.append(cache.detach_leaf_block(partial.node))
            partial.node.ref_count = 0
            cache.unref_path(seq.last_node)  # the source's claim on its ancestors: our path
            num_partial = partial.num_tokens
            cache.stats.num_partial_in_place += 1
        if partial is not None and p.partial_mode == "copy":
            # Copy first, then release the source: the rest may evict it.
            src = partial.node
            table += cache.allocate_gpu(1, ops)
            ops.record_run(OpKind.COPY, src.tier, [src.slots[0]], Tier.GPU, [table[-1]],
                           partial.num_tokens)
            cache.unref_path(src)
            num_partial = partial.num_tokens
            cache.stats.num_partial_copies += 1
            if src.tier is Tier.HOST:
                num_onboarded += partial.num_tokens
        num_reused = seq.num_path_blocks * tpb + num_partial
        new = p.spec.num_new_tokens
        num_scheduled = len(seq.tokens) if new is None else min(len(seq.tokens), num_reused + new)
        num_now = cdiv(num_scheduled, tpb)
        table += cache.allocate_gpu(num_now - len(table), ops)
        seq.block_table = table
        promise = p.promise
        assert num_reused == promise.match.num_tokens, (seq.request_id, num_reused, promise)
        seq.num_valid_tokens = num_reused
        seq.num_scheduled_tokens = num_scheduled
        seq.num_reserved_blocks = p.spec.num_reserved_blocks + num_blocks - num_now
        self._live.add(seq)
        self._record_admission(seq, promise, p.spec)
        # NOTE: a copy of memory, no int a block (the table grows in place later).
        return Admission(seq.request_id, True, num_reused, num_onboarded,
                         BlockIds.of_array(table[:]))

    def _record_admission(self, seq: LiveSequence, promise: Promise,
                          spec: SequenceSpec) -> None:
        """Count an admission; a request that skipped the cache lookup is no query (vLLM's
        rule): its prompt counts neither as queried nor as missed. A resumed one is counted
        apart (vLLM's preempted stats): what it finds again is mostly what it computed
        before its preemption, no hit a fresh request would get. Every figure is the
        promise's, tier by tier, as the tiers' blocks are counted.

        NOTE: host hits are what the lookup found on the host, not what this admission
        onboarded: a host prefix two requests of the batch reuse is onboarded by the first
        alone, and the second's host blocks counted as GPU hit tokens (the GPU's reused
        blocks said 0 where its hit tokens said 8)."""
        stats = self._cache.stats
        stats.num_admitted += 1
        if spec.skip_reading_prefix_cache:
            return
        # Kept for a failure that aborts it before its work runs (``CacheStats.take_back``).
        seq.counted = CountedReuse(spec.resumed, promise.match.num_tokens,
                                   promise.num_partial_tokens, promise.match.num_host_tokens,
                                   promise.num_gpu_blocks, promise.num_host_blocks)
        if spec.resumed:
            stats.num_resumed += 1
            stats.num_resumed_prompt_tokens += len(seq.tokens)
            stats.num_resumed_reused_tokens += promise.match.num_tokens
            return
        num_full = len(seq.tokens) // self._tpb
        gpu_blocks, host_blocks = promise.num_gpu_blocks, promise.num_host_blocks
        stats.gpu.reused_blocks += gpu_blocks
        stats.gpu.missed_blocks += num_full - gpu_blocks
        stats.host.reused_blocks += host_blocks
        stats.host.missed_blocks += num_full - gpu_blocks - host_blocks
        stats.num_prompt_tokens += len(seq.tokens)
        stats.num_reused_tokens += promise.match.num_tokens
        stats.num_partial_tokens += promise.num_partial_tokens
        stats.num_host_reused_tokens += promise.match.num_host_tokens

    def _check_footprint(self, specs: Sequence[SequenceSpec], matches: list[Match]) -> None:
        """Raise if the batch could not fit even in an empty GPU pool. Pure."""
        tpb = self._tpb
        capacity = self.config.num_gpu_blocks
        # NOTE: one request's footprint is its own blocks, checked in the loop: the batch's
        # sum (a walk of every matched run) only where there are two or more.
        batch = len(specs) > 1
        total = 0
        shared: dict[int, int] = {}
        for spec, m in zip(specs, matches, strict=True):
            num_blocks = cdiv(len(spec.token_array), tpb)
            # A reservation is held beside the prompt's blocks: one that can never fit
            # beside them is no shortage to wait out (the request would wait for ever).
            if num_blocks + spec.num_reserved_blocks > capacity:
                reserved = (f" + {shown(spec.num_reserved_blocks)} reserved"
                            if spec.num_reserved_blocks else "")
                raise ValueError(
                    f"request {shown(spec.request_id)} needs {num_blocks} blocks "
                    f"({len(spec.tokens)} tokens / {tpb}){reserved} but num_gpu_blocks is "
                    f"{capacity}")
            if not batch:
                return
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
