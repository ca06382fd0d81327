"""KVCacheManager: the public API over the block cache.

``lookup`` answers what a prompt would reuse; ``add_sequence_batch`` admits a batch in two
phases (``kvtier.admission``) so that answer is exactly what each admitted request gets;
``schedule_prefill`` / ``append_tokens`` grow a request and store what it schedules;
``remove_sequence`` releases it tail first. The manager never copies bytes: the copies its
calls need pile up, in program order, until the caller takes them as one ``TransferPlan``
(``take_plan``, or ``end_step`` for a step) and submits it to a transfer engine, once.

Contract: the manager owns a ``BlockCache`` (the tree, the tier pools and every move
between them) and a ``LiveTable`` (the live requests); nothing outside it changes either.
One thread owns a manager, as a serving engine's scheduler loop owns vLLM's or SGLang's:
calls are not locked against each other, and an eviction policy (or clock) must not call
back into the manager it serves: a call that would change it is refused then (RuntimeError,
which the policy's guard or the clock's reader takes as the fault it is). Share one across
threads behind the caller's own lock.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from typing import Any, NoReturn, TypeVar, cast

from kvtier.admission import Admission, BatchAdmission, PrefixMatch, promise_of
from kvtier.blocks import cdiv
from kvtier.cache import BlockCache
from kvtier.clock import CacheClock, CallerCode
from kvtier.config import MAX_BLOCKS, CacheConfig
from kvtier.counts import check_count
from kvtier.events import Event
from kvtier.eviction import EvictionPolicy
from kvtier.hashing import get_hash_fn, prompt_block_hashes
from kvtier.importer import import_prefix
from kvtier.invariants import check_books
from kvtier.journal import CachedBlock
from kvtier.live import LiveTable
from kvtier.matching import match_prompt
from kvtier.metrics import CacheStats
from kvtier.policy_guard import PolicyGuard
from kvtier.recovery import check_failed_indices, fail_computes, fail_transfers
from kvtier.reprs import shown
from kvtier.sequence import (
    LiveSequence,
    MultimodalItem,
    SequenceSpec,
    as_token_sequence,
    block_extras,
    check_key,
    check_lora_id,
    check_mm_items,
    check_spec,
    checked_token_array,
    request_id_of,
    token_list,
)
from kvtier.tier import Tier
from kvtier.transfer.plan import PlanIssuer, PlanRecorder, TransferPlan

_NO_COPIES = TransferPlan(())

_Method = TypeVar("_Method", bound=Callable[..., Any])


def _operation(method: _Method) -> _Method:
    """``method`` as one operation of the manager: an exception that is no ``Exception``
    (a ``KeyboardInterrupt``, ``SystemExit``) raised inside it by the caller's clock or
    eviction policy is held until it has completed, then raised
    (``clock.CallerCode.defer``): the operation is never left half done.

    NOTE: raised where it came, a Ctrl-C in the clock in the middle of an admission left a
    key space's user counted for a request never made live (a book check failed at every
    later step), and one in a release left a path half released."""

    @functools.wraps(method)
    def run(self: KVCacheManager, *args: Any, **kwargs: Any) -> Any:
        calls = self._caller_code
        calls.num_operations += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            calls.num_operations -= 1
            if calls.deferred is not None:
                calls.raise_deferred()

    return cast(_Method, run)


def _reentered(method: str) -> RuntimeError:
    """The error of a call back into a manager from its clock or eviction policy."""
    return RuntimeError(f"KVCacheManager.{method}() called from inside the manager's own "
                        "clock or eviction policy, while an operation is in flight: refused "
                        "(they must not call back into the manager they serve)")


class KVCacheManager:
    """A tiered, prefix-reusing KV block manager. See the module docstring."""

    def __copy__(self) -> NoReturn:
        # NOTE: ``copy.copy`` made a second manager over the same tree, pools and live
        # table with counters of its own: each one's calls corrupted the other's books.
        raise TypeError("a KVCacheManager cannot be copied shallowly (the copy would share "
                        "its blocks and requests with the original): use copy.deepcopy or "
                        "pickle for an independent copy")

    @property
    def config(self) -> CacheConfig:
        """The configuration the manager was built with (read-only: its pools, hashing and
        plans follow from it; assigning another left them behind)."""
        return self._config

    def __init__(
        self,
        config: CacheConfig,
        clock: Callable[[], float] = time.monotonic,
        policy: EvictionPolicy | None = None,
    ) -> None:
        if not isinstance(config, CacheConfig):
            raise TypeError(f"config must be a CacheConfig, got {shown(config)}")
        self._config = config
        # The caller's code (clock, eviction policy) running inside an operation: a call
        # back into this manager then is refused (``_reentered``), never applied.
        self._caller_code = CallerCode()
        # Read through ``CacheClock``: a clock that raises or answers garbage mid-operation
        # gives the last good time, never a half-done admission or release.
        self.clock = CacheClock(clock, self._caller_code)
        self._cache = BlockCache(config, self.clock, policy)
        guard = self._cache.evictor.policy
        if isinstance(guard, PolicyGuard):
            guard.calls = self._caller_code
        self._live = LiveTable()
        self._tpb = config.tokens_per_block
        self._version = 0
        self._ops = PlanRecorder()
        # ``transfer_failed`` takes only the latest plan handed out: its ``issuer`` names this
        # manager (``_plan_key``) and its number (``_num_plans``); ``_plan_closed`` says why
        # that plan can no longer be reported (None while it can).
        self._plan_key = PlanIssuer()
        self._num_plans = 0
        self._plan_closed: str | None = None

    # ---- queries -------------------------------------------------------------------------

    @property
    def stats(self) -> CacheStats:
        return self._cache.stats

    @property
    def num_free_gpu_blocks(self) -> int:
        """GPU blocks a new request can take now: free plus evictable, less what live
        requests have reserved for their growth. Pure."""
        return self._cache.gpu.num_available - self._live.num_reserved_blocks

    @property
    def num_reserved_blocks(self) -> int:
        """GPU blocks live requests have reserved for their growth: decode reservations and
        the prompt blocks of chunked prefills not scheduled yet. Pure."""
        return self._live.num_reserved_blocks

    @property
    def version(self) -> int:
        """Changes whenever a mutating call may have changed what ``lookup`` answers; a
        caller can keep a lookup while the version stays the same. Pure."""
        return self._version

    @property
    def num_free_host_blocks(self) -> int:
        return self._cache.host.num_available

    @property
    def num_sequences(self) -> int:
        return len(self._live)

    @property
    def num_removed_sequences(self) -> int:
        """How many requests have left the manager since it was built (``remove_sequence``,
        or aborted by ``transfer_failed`` / ``compute_failed``); it only grows. A caller
        holding requests (a scheduler) compares it with its last reading to learn whether
        any of them may be gone, whatever was admitted since. Pure."""
        return self._live.num_discarded

    @property
    def in_step(self) -> bool:
        """Whether a step is open: ``begin_step`` called, its ``end_step`` not yet. Pure."""
        return self._live.in_step

    def has_sequence(self, request_id: str) -> bool:
        """Whether ``request_id`` is live (admitted and not removed or aborted): a str (one
        of a subclass, NumPy's ``str_``, names its str's request), as every call naming a
        live request takes it. Pure."""
        rid = request_id_of(request_id)
        return rid is not None and rid in self._live

    @property
    def num_key_spaces(self) -> int:
        """Key spaces (LoRA id and salt pairs) holding cached blocks or live requests: it
        does not grow with the salts ever seen. Pure."""
        return len(self._cache.roots)

    def block_table(self, request_id: str) -> list[int]:
        """A copy of the GPU block table of a live request."""
        return self._live.get(request_id).block_table.tolist()

    def admitted_reuse(self, request_id: str) -> PrefixMatch:
        """The reuse the admission of a live request got, split by tier as that admission
        found it (the figures its counters took: a host block is one it onboarded, or one
        another request of its batch onboarded); nothing for one that skipped reading the
        cache. KeyError naming an id of no live request. Pure."""
        counted = self._live.get(request_id).counted
        if counted is None:
            return PrefixMatch(0, 0, 0, 0)
        n, host = counted.num_reused_tokens, counted.num_host_reused_tokens
        return PrefixMatch(n, n - host, host, counted.num_partial_tokens)

    def num_common_prefix_blocks(self) -> int:
        """How many leading blocks every live request's block table shares, the same ids in
        the same places: the prefix cascade attention computes once for the whole batch
        (vLLM's ``get_num_common_prefix_blocks``). 0 with no live request. Pure.

        ::

            a  [ 3 ][ 8 ][ 5 ][ 9 ]
            b  [ 3 ][ 8 ][ 5 ][ 2 ][ 7 ]      -> 2 (c's own copy of block 2 differs)
            c  [ 3 ][ 8 ][ 6 ]
        """
        tables = [seq.block_table for seq in self._live]
        if not tables:
            return 0
        first = tables[0]
        n = len(first)
        for table in tables[1:]:
            n = min(n, len(table))
            if table[:n] != first[:n]:
                # The longest equal prefix, by bisection over C-level slice compares.
                low, high = 0, n - 1  # table[:low] == first[:low]; table[:n] differs
                while low < high:
                    mid = (low + high + 1) // 2
                    if table[:mid] == first[:mid]:
                        low = mid
                    else:
                        high = mid - 1
                n = low
            if n == 0:
                break
        return n

    @_operation
    def cached_blocks(self) -> list[CachedBlock]:
        """Every cached block with its chained hash, its parent's, its tier and slot, its
        key space, its tokens and its priority now; parents before children. Pure (hashes
        are computed once, lazily)."""
        cache = self._cache
        return cache.journal.report(cache.nodes(), cache.evictor.priority)

    def lookup(
        self,
        tokens: Sequence[int],
        salt: bytes | str | int | None = None,
        lora_id: int | None = None,
        mm_items: Sequence[MultimodalItem] = (),
    ) -> PrefixMatch:
        """The reuse a request with these tokens would get if admitted now. Pure query.

        Arguments are checked exactly as ``SequenceSpec`` checks them (ValueError)."""
        token_ids = checked_token_array(as_token_sequence(tokens, "tokens"), "tokens")
        salt = check_key("salt", salt)
        lora_id = check_lora_id(lora_id)
        items = check_mm_items(mm_items, len(token_ids), "lookup")
        return self._lookup(token_ids, salt, lora_id, items)

    def lookup_spec(self, spec: SequenceSpec) -> PrefixMatch:
        """``lookup`` for a spec's prompt (validated when the spec was built). Pure query."""
        check_spec(spec, "spec")
        cache = self._cache
        extras = block_extras(spec.mm_items, len(spec.token_array), self._tpb)
        m = cache.match_spec(cache.root(spec.lora_id, spec.salt), spec, extras)
        return promise_of(m, self.config).match

    def _lookup(self, tokens: Sequence[int], salt: object, lora_id: object,
                mm_items: Sequence[MultimodalItem]) -> PrefixMatch:
        root = self._cache.root(lora_id, salt)
        extras = block_extras(mm_items, len(tokens), self._tpb)
        return promise_of(match_prompt(root, tokens, extras, self.config), self.config).match

    def missing_block_hashes(
        self,
        tokens: Sequence[int],
        salt: bytes | str | int | None = None,
        lora_id: int | None = None,
        mm_items: Sequence[MultimodalItem] = (),
    ) -> list[int]:
        """Chained hashes of the prompt's reusable full blocks past what the tiers hold
        now, in order: what a remote tier could supply (``import_blocks``); a block holding
        part of a multimodal item is named by the item's hash too, as the cache names it.
        Pure query."""
        token_ids = token_list(tokens, "tokens")
        salt = check_key("salt", salt)
        lora_id = check_lora_id(lora_id)
        items = check_mm_items(mm_items, len(token_ids), "missing_block_hashes")
        m = self._lookup(token_ids, salt, lora_id, items)
        hashes = prompt_block_hashes(get_hash_fn(self.config.hash_algo), token_ids, self._tpb,
                                     lora_id, salt,
                                     block_extras(items, len(token_ids), self._tpb),
                                     num_blocks=(len(token_ids) - 1) // self._tpb)
        return hashes[(m.num_tokens - m.num_partial_tokens) // self._tpb:]

    @property
    def eviction_policy_name(self) -> str:
        """The name of the eviction policy in use (``config.eviction_policy`` unless the
        manager was given another policy). Pure."""
        return self._cache.evictor.policy.name

    @property
    def num_policy_faults(self) -> int:
        """Faults of a caller's eviction policy (0 or 1): a call that raised or answered
        something unusable, after which the cache evicts by priority, then least recently
        released (``kvtier.policy_guard``; logged once at ERROR). Always 0 for kvtier's own
        policies. Pure."""
        policy = self._cache.evictor.policy
        return policy.num_faults if isinstance(policy, PolicyGuard) else 0

    @property
    def policy_fault(self) -> Exception | None:
        """The eviction policy's fault, if it had one (see ``num_policy_faults``). Pure."""
        policy = self._cache.evictor.policy
        return policy.first_fault if isinstance(policy, PolicyGuard) else None

    @property
    def ranks_soft_claims(self) -> bool:
        """Whether the eviction policy keeps the waiting queue's prefixes longer, so a
        scheduler should call ``hint_waiting``. Pure."""
        return self._cache.evictor.policy.ranks_soft_claims

    @_operation
    def hint_waiting(self, specs: Sequence[SequenceSpec]) -> None:
        """The requests waiting to be admitted, first first (replacing the last hint):
        their cached prefixes are soft-claimed, ranked above the rest of their priority by a
        policy that ``ranks_soft_claims``, yet still evictable, so they yield before a
        request is refused. Changes no lookup (``version`` stays). Raises TypeError, changing
        nothing, unless ``specs`` is a sequence of ``SequenceSpec``."""
        if self._caller_code.depth:
            raise _reentered("hint_waiting")
        if type(specs) is not list and (  # a list, at once (not an ABC check a step)
                not isinstance(specs, Sequence) or isinstance(specs, (str, bytes))):
            raise TypeError(f"specs must be a sequence of SequenceSpec, got "
                            f"{type(specs).__name__}")
        # NOTE: checked at C speed (a scheduler hints its queue's head at every step);
        # only a queue holding something else is walked, to name it.
        if not all(map(isinstance, specs, repeat(SequenceSpec))):
            for i, spec in enumerate(specs):
                check_spec(spec, f"specs[{i}]")
        if self.ranks_soft_claims:
            self._cache.set_soft_claims(specs)

    # ---- transfer plans ------------------------------------------------------------------

    def take_plan(self) -> TransferPlan:
        """The copies of every call since the last take, in program order, as one plan;
        the caller submits it to a transfer engine before it reads the blocks involved
        (before the next forward pass). Empty when the calls moved nothing."""
        if self._caller_code.depth:
            raise _reentered("take_plan")
        if not self._ops:
            return _NO_COPIES  # NOTE: most calls move nothing: no allocation for them
        plan = self._ops.take()
        self._cache.journal.plan_taken()
        self._num_plans += 1
        plan.issuer = (self._plan_key, self._num_plans)
        self._plan_closed = None
        return plan

    # ---- admission -----------------------------------------------------------------------

    def add_sequence(self, spec: SequenceSpec) -> Admission:
        """Admit one request now (the sequential path)."""
        return self.add_sequence_batch([spec])[0]

    @_operation
    def add_sequence_batch(self, specs: Iterable[SequenceSpec]) -> list[Admission]:
        """Admit a batch in two phases (see ``kvtier.admission``). Returns one admission
        per spec, in order. Raises (TypeError for an item that is no ``SequenceSpec``,
        ValueError on a duplicate or live request id, or a batch that could not fit even in
        an empty GPU pool) changing nothing: not even ``version``."""
        if self._caller_code.depth:
            raise _reentered("add_sequence_batch")
        batch = self._live.new_batch(specs)
        admission = BatchAdmission(self._cache, self._live, self.config, self._store_blocks)
        results = admission.run(batch, self._ops)
        for r in results:  # NOTE: no generator for ``any`` (a call per request admitted)
            if r.admitted:
                self._version += 1
                break
        return results

    # ---- growth and release --------------------------------------------------------------

    @_operation
    def schedule_prefill(self, request_id: str, num_tokens: int) -> None:
        """Mark the next ``num_tokens`` prompt tokens as scheduled (a later prefill chunk);
        full blocks they complete become reusable. Their new blocks come from the request's
        reservation (allocating them may evict, never fails)."""
        if self._caller_code.depth:
            raise _reentered("schedule_prefill")
        seq = self._live.get(request_id)
        num_tokens = check_count("num_tokens", num_tokens, 1)
        remaining = len(seq.tokens) - seq.num_scheduled_tokens
        if num_tokens > remaining:
            raise ValueError(
                f"{shown(request_id)} has {remaining} unscheduled prompt tokens, asked "
                f"{shown(num_tokens)}")
        num_scheduled = seq.num_scheduled_tokens + num_tokens
        need = cdiv(num_scheduled, self._tpb) - len(seq.block_table)
        if need > 0:
            self._live.use_reserved(seq, need)
            seq.block_table += self._cache.allocate_gpu(need, self._ops)
        self._live.schedule(seq, num_scheduled)
        self._version += 1
        self._store_blocks(seq)

    def num_unscheduled_tokens(self, request_id: str) -> int:
        """Prompt tokens of a live request not yet scheduled. Pure."""
        seq = self._live.get(request_id)
        return len(seq.tokens) - seq.num_scheduled_tokens

    def num_blocks_to_append(self, request_id: str, num_tokens: int) -> int:
        """New GPU blocks ``append_tokens`` would need for ``num_tokens`` more tokens. Pure."""
        seq = self._live.get(request_id)
        num_tokens = check_count("num_tokens", num_tokens)
        return max(0, cdiv(len(seq.tokens) + num_tokens, self._tpb) - len(seq.block_table))

    @_operation
    def append_tokens(self, request_id: str, tokens: Sequence[int]) -> list[int] | None:
        """Grow a request by decode tokens; returns the new block ids, or ``None`` (and
        changes nothing) if the GPU pool cannot supply them. Blocks that fill are stored."""
        if self._caller_code.depth:
            raise _reentered("append_tokens")
        seq = self._live.get(request_id)
        token_ids = token_list(tokens, f"tokens appended to {shown(request_id)}")
        seq.check_prefilled()
        return self._append(seq, token_ids)

    @_operation
    def reserve_lookahead(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Make a decoding request's block table cover ``num_tokens`` slots past its tokens:
        where a speculative step writes its draft tokens' KV (vLLM's lookahead slots).
        Returns the new block ids (``[]`` if the table already covers them), or ``None``,
        changing nothing, if the GPU pool cannot supply them.

        ::

            tokens   |t t t t|t t . .|. . . .|
            table    [ 17    ][ 4    ][ 9    ]    reserve_lookahead(rid, 5): block 9 added
                              len(tokens)=6 ^ ^ ^ ^ ^ drafts' slots

        The blocks are the request's own. Only tokens that ``append_tokens`` adds (the
        accepted drafts) fill them, and a block they fill is stored as any other: a
        rejected draft's KV is never cached. Blocks no accepted token reached are freed
        with the request.
        """
        if self._caller_code.depth:
            raise _reentered("reserve_lookahead")
        seq = self._live.get(request_id)
        num_tokens = check_count("num_tokens", num_tokens)
        seq.check_prefilled()
        end = len(seq.tokens) + num_tokens
        new = self._grow_table(seq, end)
        if new is not None:
            seq.lookahead_end = max(seq.lookahead_end, end)
        return new

    def _grow_table(self, seq: LiveSequence, num_tokens: int) -> list[int] | None:
        """Allocate the blocks ``seq``'s table lacks for ``num_tokens`` tokens (from its
        reservation first); ``None``, changing nothing, if the pool cannot supply them."""
        need = cdiv(num_tokens, self._tpb) - len(seq.block_table)
        if need <= 0:
            return []
        live = self._live
        others = live.num_reserved_blocks - seq.num_reserved_blocks
        if need > self._cache.gpu.num_available - others:
            return None
        self._version += 1
        new = self._cache.allocate_gpu(need, self._ops)
        live.use_reserved(seq, need)
        seq.block_table += new
        return new.tolist()

    def _append(self, seq: LiveSequence, tokens: list[int]) -> list[int] | None:
        tpb = self._tpb
        num_tokens = len(seq.tokens) + len(tokens)
        new = self._grow_table(seq, num_tokens)
        if new is None:
            return None
        seq.grow_tokens(tokens)
        if seq.extras is not None:
            seq.extras += [None] * (cdiv(num_tokens, tpb) - len(seq.extras))
        self._live.schedule(seq, num_tokens)
        if num_tokens // tpb > seq.num_path_blocks:
            self._store_blocks(seq)
        return new

    @_operation
    def append_token_batch(self, items: Sequence[tuple[str, int]]) -> int:
        """``append_tokens(rid, [token])`` for each item in order, stopping at the first
        that finds no block: returns how many were applied (``len(items)`` if all were).
        Every item is checked before any is applied: a bad one raises, changing nothing.

        The decode path of a step: one call, and no allocation for the many requests whose
        next token fits their last block.
        """
        if self._caller_code.depth:
            raise _reentered("append_token_batch")
        batch = self._live.decode_items(items)
        return self._append_each(batch, len(batch))

    @_operation
    def append_token_columns(self, request_ids: list[str], tokens: list[int]) -> int:
        """``append_token_batch`` for a batch given as two lists of equal length (the ids,
        and the token each request sampled last), the form a scheduler builds from its
        running table: the same checks of every value and the same errors (a bad value
        raises, changing nothing), the same count returned.

        NOTE: two lists skip the checks of the pairs' shape, most of ``decode_items``'s
        cost on a step's batch; every value is still checked at C speed
        (``LiveTable.decode_columns``). Anything else goes the pairs' checked way.
        """
        if self._caller_code.depth:
            raise _reentered("append_token_columns")
        seqs = None
        if type(request_ids) is list and type(tokens) is list:
            try:
                seqs = self._live.decode_columns(request_ids, tokens)
            except TypeError:  # an unhashable id: the checked path below names it
                seqs = None
        if seqs is None:  # a bad value or shape: the checked path names it (and raises)
            pairs = LiveTable.column_pairs(request_ids, tokens)  # values checked there
            return self.append_token_batch(cast("list[tuple[str, int]]", pairs))
        return self._append_each(zip(seqs, tokens, strict=True), len(seqs))

    def _append_each(self, batch: Iterable[tuple[LiveSequence, int]], num_items: int) -> int:
        """Append each checked (request, token) of ``batch`` (``num_items`` of them) in
        order, stopping at the first that finds no block; return how many were applied."""
        live = self._live
        tpb = self._tpb
        touched = live.touched
        for i, (seq, token) in enumerate(batch):
            n = len(seq.tokens) + 1
            if n > len(seq.block_table) * tpb or n % tpb == 0 or not seq.owns_tokens:
                # The general path: allocation, storing a block that fills.
                if self._append(seq, [token]) is None:
                    return i
                continue
            seq.tokens.append(token)
            # Inline LiveTable.schedule: this loop runs for every decoding request.
            if touched is None:
                seq.num_valid_tokens = n - 1
            elif seq.request_id not in touched:
                seq.num_valid_tokens = n - 1
                touched[seq.request_id] = seq
            seq.num_scheduled_tokens = n
        return num_items

    @_operation
    def import_blocks(
        self,
        tokens: Sequence[int],
        num_blocks: int,
        salt: bytes | str | int | None = None,
        lora_id: int | None = None,
        mm_items: Sequence[MultimodalItem] = (),
    ) -> list[int]:
        """Cache up to ``num_blocks`` full blocks of ``tokens`` past what the tiers already
        hold, as host blocks whose KV the caller fills from elsewhere (a remote store);
        returns their host slots, in order: fewer (or none) when the host has less room.
        ``mm_items`` are the prompt's multimodal items, keying its blocks as admission keys
        them (without them, the blocks of an image prompt would be cached as text).

        For a request waiting in the queue: a later ``lookup`` counts these blocks as host
        hits, and admission onboards them like any other. The caller must write the slots
        before the next manager call that may read them (an admission's plan). No slot that
        a copy recorded and not yet taken reads or writes is handed out (fewer come back):
        that copy runs after the caller's write.
        """
        if self._caller_code.depth:
            raise _reentered("import_blocks")
        token_ids = token_list(tokens, "tokens")
        num_blocks = check_count("num_blocks", num_blocks, 0, MAX_BLOCKS)
        salt = check_key("salt", salt)
        lora_id = check_lora_id(lora_id)
        items = check_mm_items(mm_items, len(token_ids), "import_blocks")
        # The host slots the copies recorded and not yet taken read or write: the caller
        # writes the imported slots now, before those copies run.
        c = self._ops.columns
        pending = ({slot for tier, slot in zip(c.src_tiers, c.src_slots, strict=True)
                    if tier == Tier.HOST}
                   | {slot for tier, slot in zip(c.dst_tiers, c.dst_slots, strict=True)
                      if tier == Tier.HOST}) if len(self._ops) else set()
        slots = import_prefix(self._cache, token_ids, num_blocks, lora_id, salt,
                              block_extras(items, len(token_ids), self._tpb), pending)
        if slots:
            self._version += 1
        return slots

    def record_spills(self) -> None:
        """Start logging host blocks as they leave the cache, for a write-back remote tier:
        see ``drain_spills``."""
        if self._caller_code.depth:
            raise _reentered("record_spills")
        journal = self._cache.journal
        if journal.spill_log is None:
            journal.spill_log = []

    def drain_spills(self) -> list[tuple[int, int]]:
        """(block hash, host slot) of each host block dropped since the last drain whose KV
        is still in its slot: read it before executing the plan holding those calls'
        copies (it may reuse the slot). Blocks offloaded and dropped between two drains are
        not listed. Requires ``record_spills``."""
        if self._caller_code.depth:
            raise _reentered("drain_spills")
        journal = self._cache.journal
        if journal.spill_log is None:
            raise RuntimeError("drain_spills() needs record_spills() first")
        return journal.drain_spills()

    @_operation
    def remove_sequence(self, request_id: str, store_for_reuse: bool = True) -> None:
        """Release a request, tail first. Its full scheduled blocks stay cached for reuse
        (unless ``store_for_reuse`` is False: then only blocks already stored do)."""
        if self._caller_code.depth:
            raise _reentered("remove_sequence")
        seq = self._live.get(request_id)
        if type(store_for_reuse) is not bool:
            raise ValueError(f"store_for_reuse must be a bool, got {shown(store_for_reuse)}")
        self._version += 1
        if store_for_reuse:
            # Inside a step, what this request scheduled in the step is not computed yet.
            in_step = self._live.touched_in_step(request_id)
            self._store_blocks(seq, now=True,
                               limit=seq.num_valid_tokens if in_step else None)
        self._live.discard(seq)
        cache = self._cache
        private = seq.own_slots()
        if private:
            cache.free_gpu(private)
        cache.unref_path(seq.last_node, seq)
        cache.leave_root(seq.root)

    @_operation
    def transfer_failed(self, plan: TransferPlan, failed_indices: Iterable[int]) -> list[str]:
        """The ops at ``failed_indices`` of ``plan`` did not complete: degrade them to
        recompute (see ``kvtier.recovery``). Returns the requests that must recompute, in
        admission order. ``plan`` must be the latest plan this manager handed out
        (``take_plan``, ``end_step``, a scheduler step's), reported once, before the next
        one is taken and not across a ``reset_cache``: its slots name this pool's blocks as
        they are now, and no later plan read what it failed to write. The copies recorded
        since it was taken (not taken yet) run after it: one reading a slot it left garbage
        spreads the damage (a request onboarding a bad host block is aborted too). Raises,
        changing nothing, for any other plan with ops (ValueError naming it) or a bad
        index."""
        if self._caller_code.depth:
            raise _reentered("transfer_failed")
        failed = check_failed_indices(plan, failed_indices)
        if len(plan):
            self._check_latest_plan(plan)
        aborted = fail_transfers(self._cache, self._live, plan, failed, self._ops.columns)
        if failed:
            self._version += 1
            self._plan_closed = "had its failed copies reported already"
        return aborted

    def _check_latest_plan(self, plan: TransferPlan) -> None:
        """ValueError unless ``plan`` is the latest plan handed out and still open. Pure."""
        issuer = plan.issuer
        if issuer is None or issuer[0] is not self._plan_key:
            raise ValueError("transfer_failed: plan was not handed out by this manager (its "
                             "take_plan, end_step or a scheduler step over it): its slots name "
                             "another pool's blocks")
        number = issuer[1]
        if number != self._num_plans:
            raise ValueError(f"transfer_failed: plan {number} is not the latest this manager "
                             f"handed out ({self._num_plans}): report a plan's failed copies "
                             f"before taking the next (a later plan may have read what it "
                             f"failed to write)")
        if self._plan_closed is not None:
            raise ValueError(f"transfer_failed: plan {number} {self._plan_closed}")

    @_operation
    def compute_failed(self, request_ids: Iterable[str]) -> list[str]:
        """The forward passes of ``request_ids`` (live requests) in the step just scheduled
        failed: degrade them to recompute (``kvtier.recovery.fail_computes``). What they
        scheduled and did not compute leaves the cache; what earlier steps computed stays.
        Returns the requests that must recompute (those, and any reading their garbage),
        in admission order. Raises, changing nothing, for ids that are no iterable of str
        (TypeError) or name no live request (KeyError)."""
        if self._caller_code.depth:
            raise _reentered("compute_failed")
        if isinstance(request_ids, (str, bytes)) or not isinstance(request_ids, Iterable):
            raise TypeError(f"request_ids must be an iterable of request ids, got "
                            f"{shown(request_ids)}")
        ids: list[str] = []
        for given in list(request_ids):
            rid = request_id_of(given)
            if rid is None:
                raise TypeError(f"request id {shown(given)} is not a str")
            self._live.get(rid)  # KeyError naming it
            ids.append(rid)
        if self._live.in_step:
            raise RuntimeError("compute_failed() is for the step ended, not one in progress")
        aborted = fail_computes(self._cache, self._live, ids, self._ops.columns)
        if aborted:
            self._version += 1
        return aborted

    @_operation
    def begin_step(self) -> None:
        """Until ``end_step``, blocks scheduled by admissions, prefill chunks and appends
        are not stored: no request of a step reuses blocks that the same step computes."""
        if self._caller_code.depth:
            raise _reentered("begin_step")
        self._live.begin_step()

    @_operation
    def end_step(self) -> TransferPlan:
        """Store the blocks scheduled since ``begin_step``; return the step's plan (every
        copy not yet taken, see ``take_plan``)."""
        if self._caller_code.depth:
            raise _reentered("end_step")
        for seq in self._live.end_step():
            self._store_blocks(seq)
        return self.take_plan()

    def _store_blocks(self, seq: LiveSequence, now: bool = False,
                      limit: int | None = None) -> None:
        """Store ``seq``'s full scheduled blocks (up to ``limit`` tokens) past its path;
        inside a step, only note that it has some, for ``end_step``."""
        if not now and self._live.defer_store(seq):
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
        run = self._cache.insert_run(seq.last_node, seq.tokens[start * tpb:end * tpb],
                                     seq.block_table[start:end], extras,
                                     seq.turn, seq.num_prompt_blocks)
        self._version += 1
        seq.last_node = run.node
        if run.private_slots:
            seq.private_slots = seq.private_slots + run.private_slots

    @_operation
    def reset_cache(self) -> bool:
        """Drop every cached block of every tier. Refused (returns False) while any request
        is live (``Scheduler.reset_prefix_cache`` preempts them first). A remote store is
        not a tier of this cache and keeps its blocks: after a weight update, give the
        remote tier a new ``RemoteNamespace`` (its name), or the store serves the old KV.
        Nothing is spilled to a write-back remote tier (the spills not drained yet are
        dropped too): the KV is stale."""
        if self._caller_code.depth:
            raise _reentered("reset_cache")
        if len(self._live):
            return False
        self._version += 1
        self._cache.clear()
        self._plan_closed = ("was taken before reset_cache() dropped every block: its slots "
                             "hold other blocks now")
        return True

    @_operation
    def drop_key_space(self, *, lora_id: int | None = None,
                       salt: bytes | str | int | None = None) -> int:
        """Drop every cached block of one key space (a tenant's ``salt``, a ``lora_id``
        whose adapter is unloaded) on every tier; return how many blocks left (counted as
        evicted). Blocks a live request holds stay, cached as usual when it is released:
        call again after. The dropped blocks are reported removed (KV events) and never
        spilled to a write-back remote tier; copies already in a remote store are the
        store's to delete. Raises ValueError, changing nothing, for a salt or LoRA id no
        request could carry. Another key space is never touched."""
        if self._caller_code.depth:
            raise _reentered("drop_key_space")
        salt = check_key("salt", salt)
        lora_id = check_lora_id(lora_id)
        return self._drop_key_spaces([(lora_id, salt)])

    @_operation
    def drop_lora(self, lora_id: int) -> int:
        """``drop_key_space`` for every key space of the LoRA adapter ``lora_id``, whatever
        its salt: what unloading (or reloading new weights under) an adapter needs, where
        ``drop_key_space(lora_id=k)`` drops only the unsalted tenants' blocks of it.
        Raises ValueError, changing nothing, for an id that is no adapter's (``None``
        included: the base model's blocks are every tenant's; see ``reset_cache``)."""
        if self._caller_code.depth:
            raise _reentered("drop_lora")
        if lora_id is None:
            raise ValueError("drop_lora needs an adapter's lora_id, got None (the base model's "
                             "blocks: drop_key_space per salt, or reset_cache)")
        adapter = check_lora_id(lora_id)
        return self._drop_key_spaces([key for key in self._cache.roots if key[0] == adapter])

    @_operation
    def drop_salt(self, salt: bytes | str | int) -> int:
        """``drop_key_space`` for every key space of the tenant ``salt``, whatever its LoRA
        adapter (``drop_key_space(salt=s)`` drops only its base-model blocks). Raises
        ValueError, changing nothing, for a salt no request could carry (``None``
        included: the unsalted blocks are no one tenant's)."""
        if self._caller_code.depth:
            raise _reentered("drop_salt")
        tenant = check_key("salt", salt, allow_none=False)
        return self._drop_key_spaces([key for key in self._cache.roots if key[1] == tenant])

    def _drop_key_spaces(self, keys: list[tuple[object, object]]) -> int:
        """Drop the key spaces ``keys`` (checked); how many blocks left."""
        num_blocks = sum(self._cache.drop_key_space(lora_id, salt) for lora_id, salt in keys)
        if num_blocks:
            self._version += 1
        return num_blocks

    def drain_events(self) -> list[Event]:
        """Events since the last drain, oldest first (empty unless ``enable_events``)."""
        if self._caller_code.depth:
            raise _reentered("drain_events")
        events = self._cache.journal.events
        return events.drain() if events is not None else []

    # ---- validation and invariants -------------------------------------------------------

    def check_invariants(self) -> None:
        """Recompute the books from scratch and assert they match. Pure."""
        check_books(self._cache, self._live)

