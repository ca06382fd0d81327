"""The scheduler's chunk planner: which waiting requests a step admits within its token
budget and batch slots, each credited with exactly the reuse its lookup promises, and the
first chunk each computes; the same-step waits (a request whose first uncached block a
chunk of this step computes waits a step to reuse it); then one two-phase
``add_sequence_batch`` admits them.

:class:`ChunkPlanner` is a part of :class:`~kvtier.scheduler.Scheduler` over its waiting
queue (:class:`~kvtier.waiting_queue.WaitingQueue`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from kvtier.blocks import cdiv
from kvtier.counts import check_count
from kvtier.request import Request, set_progress
from kvtier.scheduled_step import Admitted, Candidate, ContextChunk
from kvtier.sequence import SequenceSpec, items_before, short_repr
from kvtier.waiting_queue import WaitingQueue


class ChunkPlanner(WaitingQueue):
    """The prefill chunk cap and the admit phase of a step: candidates, then admission."""

    def _chunk_cap(self) -> int:
        cfg = self.config
        if not cfg.enable_chunked_prefill:
            return 1 << 62
        return cfg.max_chunk_tokens or cfg.max_num_tokens

    def _block_key(self, spec: SequenceSpec, end: int) -> tuple[object, ...]:
        """The key of ``spec``'s block that ends at token ``end``: its key space, the
        images keying the blocks up to it (as the cache keys them: not the order they were
        listed in, nor the items past ``end``), its end and own ids (a slice of one
        block). Pure."""
        items = items_before(spec.mm_items, end, self._tpb) if spec.mm_items else ()
        return (spec.salt, spec.lora_id, items, end,
                spec.token_array[end - self._tpb:end].tobytes())

    def _note_computing(self, computing: dict[tuple[object, ...], list[Sequence[int]]],
                        spec: SequenceSpec, start: int, num_tokens: int) -> None:
        """Enter in ``computing`` the first block a chunk of ``num_tokens`` tokens from
        ``start`` completes, if it completes one (it ends at most at the prompt's end)."""
        end = start - start % self._tpb + self._tpb
        if start + num_tokens >= end:
            computing.setdefault(self._block_key(spec, end), []).append(spec.token_array)

    def candidates(self, budget: int, slots: int,
                   exclude: Collection[str] = ()) -> list[Candidate]:
        """Waiting requests to try this step, in order, with their credited reuse and first
        chunk; those in ``exclude`` are counted where they would be, not returned. A query of
        the queue (it only refreshes the cached lookups).

        A request that fits no budget left is skipped, not waited on (no head-of-line
        blocking), unless it has waited ``max_wait_steps`` steps: then nothing behind it is
        tried until it is admitted. A request whose first block not cached a chunk of this
        step computes (a running request's prefill, one admitted, or a candidate ahead of
        it: the same prefix, to the end of that block) waits for the next step, where it
        reuses that block (with block reuse on: else nothing is stored to reuse).

        Raises, changing nothing, for a ``budget`` or ``slots`` that is no int >= 0
        (ValueError) or an ``exclude`` that is no collection of ids (TypeError).
        """
        # NOTE: unchecked, a budget of NaN or slots of -1 offered candidates past any
        # budget or batch, and an ``exclude`` given as one id's str excluded every id
        # found in it ("ab" excluded "a").
        budget = check_count("budget", budget)
        slots = check_count("slots", slots)
        if isinstance(exclude, (str, bytes)) or not isinstance(exclude, Collection):
            raise TypeError(f"exclude must be a collection of request ids, got "
                            f"{short_repr(exclude)}")
        cap = self._chunk_cap()
        tpb = self._tpb
        # A batch must fit an empty pool (else the manager refuses it); and there is no use
        # in asking for more blocks than are free or evictable now.
        footprint = self.manager.config.num_gpu_blocks
        free = self.manager.num_free_gpu_blocks
        out = []
        held = self._held
        # The first block each chunk computes this step, by its whole prefix (and key
        # space): a request that would compute that block too waits one step and reuses it,
        # as it would had it come a step later. Parallel sampling's branches of one prompt
        # (or a burst of one prompt) arrive at once, and each computed the whole prompt; a
        # branch arriving during another's chunked prefill computed the rest of it.
        # Keyed by the block's own ids and end (a slice of one block per chunk); the
        # prompts under a key are compared up to that end only where the key is met. The
        # step's running chunks are in ``self._computing``, the candidates ahead here.
        in_step = self._computing
        computing: dict[tuple[object, ...], list[Sequence[int]]] = {}
        # NOTE: without block reuse nothing computed is stored: a request that waited would
        # reuse nothing a step later (TensorRT-LLM skips no request then either).
        reuses = self.manager.config.enable_block_reuse
        for req in self.waiting:
            if budget == 0 or slots == 0:
                break
            rid = req.request_id
            if held and rid in held:
                continue
            spec = self._specs[rid]
            tokens = spec.token_array
            m = self._lookup(spec)
            compute = len(tokens) - m.num_tokens
            end = m.num_tokens - m.num_tokens % tpb + tpb  # its first block not cached whole
            # NOTE: a block ending with the prompt's last token is never reused, and a
            # request that reads no cache would not reuse it: neither waits.
            if ((in_step or computing) and reuses and end < len(tokens)
                    and not spec.skip_reading_prefix_cache):
                key = self._block_key(spec, end)
                if any(ahead[:end] == tokens[:end] for chunks in (in_step, computing)
                       for ahead in chunks.get(key, ())):
                    continue
            n = min(compute, cap, budget)
            if (n < compute and not self.config.enable_chunked_prefill
                    and compute <= self.config.max_num_tokens):
                # It fits one step: it waits for one with room for all of it. What no step
                # could hold (a preempted request's prompt and output, recomputed; a prompt
                # that long is refused when queued) is chunked, or it would wait for ever
                # and hold up everything behind it.
                n = 0
            blocks = cdiv(len(tokens), tpb)
            reserve = self._reserve(req, tokens)
            need = blocks - m.num_gpu_tokens // tpb + reserve
            if n > 0 and blocks <= footprint and need <= free:
                if self.manager.has_sequence(rid):
                    # The caller admitted a sequence of its own under this id in the
                    # manager after queueing the request: it waits until the id is free
                    # (admitted, the batch raised and the step failed whole).
                    continue
                # NOTE: one in ``exclude`` (rejected this step) keeps its place: the room
                # it needs is not given to the requests behind it, though it computes
                # nothing this step. (Given to them, agentic LRU lost 0.0034 of hit rate:
                # more admitted at once into a full pool.)
                if not (exclude and rid in exclude):
                    out.append(Candidate(req, spec.with_schedule(n, reserve), m.num_tokens, n))
                    self._note_computing(computing, spec, m.num_tokens, n)
                    self._step_candidates.append(rid)
                budget -= n
                slots -= 1
                footprint -= blocks
                free -= need
            if self._num_steps - self._queued_at[rid] > self.config.max_wait_steps:
                break  # it has waited long enough: nobody behind it goes first
        return out

    def _reserve(self, req: Request, tokens: Sequence[int]) -> int:
        """Blocks to set aside for ``req``'s decode (guaranteed_no_evict only)."""
        if self.config.capacity_policy != "guaranteed_no_evict":
            return 0
        final = len(self._prompts[req.request_id]) + req.max_output_tokens
        return cdiv(final, self._tpb) - cdiv(len(tokens), self._tpb)

    def admit(self, budget: int, slots: int) -> Admitted:
        """Admit waiting requests within ``budget`` tokens and ``slots`` sequences, with
        exact credit: lookups, then one two-phase batch. Budget that a rejected request
        leaves (no blocks for it) goes to the next candidates, for a few rounds. Raises
        RuntimeError, changing nothing, outside a ``step`` (``check_in_step``)."""
        self.check_in_step("admit")
        chunks: list[ContextChunk] = []
        credited = reused = 0
        rejected: set[str] = set()
        phases = self.phases
        for _ in range(4):
            candidates = self.candidates(budget, slots, rejected)
            if phases is not None:
                phases.mark("lookup")
            if not candidates:
                break
            self._step_touched += [c.spec.request_id for c in candidates]
            admissions = self.manager.add_sequence_batch([c.spec for c in candidates])
            for cand, adm in zip(candidates, admissions, strict=True):
                if not adm.admitted:
                    rejected.add(cand.request.request_id)
                    continue
                credited += cand.num_credited_tokens
                reused += adm.num_reused_tokens
                chunks.append(self.start(cand, adm.num_reused_tokens, cand.num_new_tokens))
                # A later round's candidates wait on what it computes, as on a running chunk.
                self._note_computing(self._computing, cand.spec, adm.num_reused_tokens,
                                     cand.num_new_tokens)
                budget -= cand.num_new_tokens
                slots -= 1
            if phases is not None:
                phases.mark("admit")
            if not rejected or budget == 0 or slots == 0:
                break
        return Admitted(chunks, credited, reused)

    def start(self, cand: Candidate, num_reused: int, num_tokens: int) -> ContextChunk:
        """Move an admitted candidate from ``waiting`` to ``running``: its first chunk
        computes ``num_tokens`` tokens past the ``num_reused`` the admission reused. Raises
        RuntimeError, changing nothing, outside a ``step`` (``check_in_step``)."""
        self.check_in_step("start")
        req = cand.request
        self._step_started.append(req.request_id)
        self._dequeue(req)
        self.running[req.request_id] = req
        self._prefill_specs[req.request_id] = cand.spec
        set_progress(req, num_prefill_tokens=len(cand.spec.token_array),
                     num_computed_tokens=num_reused)
        return ContextChunk(req.request_id, num_reused, num_tokens, num_reused)
