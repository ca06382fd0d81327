"""The scheduler's waiting queue: requests queued (``add_request``), held, released,
aborted, each with the spec it prefills when admitted and its cached lookup; the hint of
the queue's head that the manager's policy ranks by.

:class:`WaitingQueue` is a part of :class:`~kvtier.scheduler.Scheduler` over its books
(:class:`~kvtier.scheduler_state.SchedulerState`).
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Sequence
from dataclasses import replace
from operator import attrgetter, eq
from typing import ClassVar

from kvtier.admission import PrefixMatch
from kvtier.blocks import cdiv
from kvtier.reprs import shown
from kvtier.request import Request, check_request, hold_request
from kvtier.scheduler_state import SchedulerState
from kvtier.sequence import SequenceSpec, TokenIds, request_id_of, short_repr

_request_id = attrgetter("request_id")


def _as_id(request_id: object) -> str:
    """``request_id`` as the plain str of a request id (``request_id_of``: a str
    subclass's, NumPy's ``str_``, names its str's request, as in the manager); TypeError
    naming it unless a str."""
    rid = request_id_of(request_id)
    if rid is None:
        raise TypeError(f"request_id must be a str, got {short_repr(request_id)}")
    return rid


class WaitingQueue(SchedulerState):
    """Queues, holds, aborts and looks up waiting requests; hints the queue's head."""

    # How many waiting requests, from the head of the queue, the queue hint names.
    MAX_HINTED: ClassVar[int] = 64

    def _lookup(self, spec: SequenceSpec) -> PrefixMatch:
        """``manager.lookup``, kept while the manager's version says nothing changed."""
        version = self.manager.version
        cached = self._lookups.get(spec.request_id)
        if cached is not None and cached[0] == version:
            return cached[1]
        self.num_lookups += 1
        m = self.manager.lookup_spec(spec)
        self._lookups[spec.request_id] = (version, m)
        return m

    def hold(self, request_id: str) -> None:
        """Keep a waiting request out of admission until ``release`` (e.g. while its prefix
        is fetched from a remote tier); an id queued nowhere is ignored. TypeError for an id
        that is no str (one of a subclass, NumPy's ``str_``, names its str's request)."""
        self._check_not_in_call("hold")
        request_id = _as_id(request_id)
        if request_id in self._specs:
            self._held.add(request_id)

    def release(self, request_id: str) -> None:
        """Let a held request be admitted again. TypeError for an id that is no str (one of
        a subclass names its str's request)."""
        self._check_not_in_call("release")
        self._held.discard(_as_id(request_id))

    def _spec_of(self, req: Request, resumed: bool = False) -> SequenceSpec:
        """What ``req`` prefills when admitted: its prompt, and after a preemption the
        output so far; ``resumed`` for one admitted before (its recompute is no query).
        Raises ValueError (nothing changed) if the manager refuses it."""
        prompt = self._prompts.get(req.request_id)
        tokens: Sequence[int]
        if prompt is None:  # being queued: its prompt was just checked
            tokens = req.tokens if req.output else req.prompt
            num_prompt = len(req.prompt)
        else:
            try:
                tokens = TokenIds.of_array(prompt + array("Q", req.output) if req.output
                                           else prompt)
            except (TypeError, OverflowError):  # its output changed in place: named below
                tokens = [*prompt, *req.output]
            num_prompt = len(prompt)
        retention = req.retention
        if retention is not None and req.output:  # its output stays decoded blocks
            retention = replace(retention, decode_start=num_prompt)
        return SequenceSpec(req.request_id, tokens, salt=req.salt, lora_id=req.lora_id,
                            priority=req.priority, retention_s=req.retention_s,
                            retention=retention,
                            skip_reading_prefix_cache=req.skip_reading_prefix_cache,
                            mm_items=req.mm_items, resumed=resumed)

    def _dequeue(self, req: Request) -> None:
        """Take the waiting ``req`` out of the queue and forget what was kept for it there
        (``_enqueue``'s undo)."""
        rid = req.request_id
        self.waiting.remove(req)
        self._lookups.pop(rid, None)
        del self._specs[rid], self._queued_at[rid]
        self._held.discard(rid)

    def _release_request(self, req: Request) -> None:
        """``req`` leaves the scheduler (finished or aborted): the caller's again."""
        del self._prompts[req.request_id]
        hold_request(req, False)

    def _leave_running(self, req: Request) -> None:
        """Take ``req`` out of ``running`` and forget what was kept for it there."""
        rid = req.request_id
        del self.running[rid]
        self._num_unappended.pop(rid, None)
        self._prefill_specs.pop(rid, None)

    def _enqueue(self, req: Request, spec: SequenceSpec, first: bool) -> None:
        self._specs[req.request_id] = spec
        self._queued_at[req.request_id] = self._num_steps
        if first:
            self.waiting.appendleft(req)
        else:
            self.waiting.append(req)

    def add_request(self, req: Request) -> None:
        """Queue a request; raises ValueError, queueing nothing, if a field is invalid (see
        :class:`Request`), its id is already queued, running or live in the manager, or it
        could never fit the GPU pool, or chunked prefill is off and its prompt and output
        (what it prefills) pass ``max_num_tokens``, or its ``output`` already holds its
        ``max_output_tokens`` (a finished request queued again: it sampled past them). A
        request queued again (aborted, or finished by a stop) keeps its output, which it
        prefills with its prompt, and starts its progress fields (``num_*_tokens``) at 0."""
        self._check_not_in_call("add_request")
        if not isinstance(req, Request):
            raise TypeError(f"add_request takes a Request, got {type(req).__name__}")
        if req.held:
            raise ValueError(f"request {shown(req.request_id)} is queued or running already (in "
                             "this scheduler or another): one Request object is one request")
        prompt, output, mm_items = check_request(req)
        rid = req.request_id
        if len(output) >= req.max_output_tokens:
            raise ValueError(f"request {shown(rid)} already holds {len(output)} output tokens, its "
                             f"max_output_tokens is {req.max_output_tokens}: nothing to "
                             f"generate (a finished request queued again?)")
        if rid in self.running or rid in self._specs:
            raise ValueError(f"request_id {shown(rid)} is already queued or running")
        if self.manager.has_sequence(rid):
            # Queued, its admission would raise at every step: no request admitted again.
            raise ValueError(f"request_id {shown(rid)} is live in the manager (admitted there "
                             "directly); remove it first")
        total = len(prompt) + req.max_output_tokens
        blocks = cdiv(total, self._tpb)
        capacity = self.manager.config.num_gpu_blocks
        if blocks > capacity:
            raise ValueError(f"request {shown(rid)} needs {shown(blocks)} blocks for "
                             f"{shown(total)} tokens, num_gpu_blocks is {capacity}")
        budget = self.config.max_num_tokens
        if not self.config.enable_chunked_prefill and len(prompt) + len(output) > budget:
            # No step could ever prefill it whole (a cached prefix is not promised), and
            # once it has waited max_wait_steps nothing behind it is admitted either: every
            # request would wait for ever. vLLM refuses this shape at its config.
            # NOTE: its output too, which it prefills with its prompt (a conversation
            # resumed, a request queued again): counting the prompt alone, such a request
            # was admitted and chunked, chunks an engine that turned them off cannot run.
            held = f" and {len(output)} output tokens to prefill" if output else ""
            raise ValueError(f"request {shown(rid)} has {len(prompt)} prompt tokens{held} but "
                             f"max_num_tokens is {budget} and chunked prefill is off")
        # Private copies: the caller's lists may change.
        req.prompt, req.output, req.mm_items = prompt, output, mm_items
        spec = self._spec_of(req)
        # NOTE: a request queued has computed nothing of its next admission: one aborted
        # part way and queued again kept the last one's progress while it waited (its
        # num_computed_tokens read 4 of 9, and check_invariants failed on it).
        req.num_prefill_tokens = req.num_computed_tokens = 0
        # The prompt as it was queued (the request's list may be changed in place).
        self._prompts[rid] = spec.token_array[:len(prompt)]
        self._enqueue(req, spec, first=False)
        hold_request(req, True)

    def abort(self, request_id: str) -> Request | None:
        """Drop a queued or running request (a client gone): a running one leaves the
        manager as a finished one does (the blocks its applied steps computed stay cached
        for others), a queued one leaves the queue. Returns it, or None where no request of
        that id is queued or running (already finished, never added). Raises, changing
        nothing, between ``step`` and ``update`` (RuntimeError: the step's blocks are
        cached already and only its forward pass fills them; apply it, then abort) or for
        an id that is no str (TypeError; one of a subclass, NumPy's ``str_``, names its
        str's request)."""
        self._check_not_in_call("abort")
        request_id = _as_id(request_id)
        if self._unapplied is not None:
            raise RuntimeError(f"abort({shown(request_id)}) between step() and update(): apply "
                               "the step first")
        self._in_call = "abort"
        try:
            return self._abort(request_id)
        finally:
            self._in_call = None

    def _abort(self, request_id: str) -> Request | None:
        """``abort``, its arguments checked."""
        req = self.running.get(request_id)
        if req is not None:
            self._leave_running(req)
            try:
                # NOTE: one the manager dropped already (compute_failed between steps) has
                # nothing to release there: removing it raised KeyError with the request out
                # of ``running`` and in no queue.
                if self.manager.has_sequence(request_id):
                    self._num_removed += 1  # this one, not the count now: that may hide a lost one
                    self.manager.remove_sequence(request_id)
            finally:
                # NOTE: also where the removal raised as it returned (a Ctrl-C its clock
                # took, held until it completed): the request had left the manager and
                # ``running``, yet the scheduler kept its prompt.
                self._release_request(req)
                self._forget_appended((req,))
            return req
        if request_id not in self._specs:
            return None
        req = next(r for r in self.waiting if r.request_id == request_id)
        self._dequeue(req)
        # NOTE: one a reset preempted is no longer the next step's to list (it listed a
        # request gone, or a new one queued under its id, as preempted).
        if request_id in self._unlisted_preempted:
            self._unlisted_preempted.remove(request_id)
        self._release_request(req)
        return req

    def _hint_queue(self) -> None:
        """Tell the manager the head of the waiting queue, if its policy ranks the queue's
        prefixes and the queue or the cache changed since the last hint."""
        manager = self.manager
        if not manager.ranks_soft_claims:
            return
        specs = self._specs
        head = [specs[req.request_id] for req in itertools.islice(self.waiting, self.MAX_HINTED)]
        version = manager.version
        hinted = self._hinted
        # NOTE: the head's ids are compared only where the version is the last hint's (most
        # steps change it: then the hint is due whatever the queue holds).
        if (hinted is not None and hinted[0] == version and len(head) == len(hinted[1])
                and all(map(eq, map(_request_id, head), map(_request_id, hinted[1])))):
            return
        self._hinted = (version, head)
        manager.hint_waiting(head)
