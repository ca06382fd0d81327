"""A step scheduler that budgets ``max_num_tokens`` with the reuse each request really gets.

Each ``step()`` fills one forward pass, in this order::

    1. decode    every running request past its prefill computes one token; its next block
                 is allocated first (guaranteed_no_evict: from its reservation; max_utilization:
                 on shortage the newest running request is preempted and requeued, and
                 the step admits nobody)
    2. prefill   requests part way through a chunked prefill get their next chunk
    3. admit     waiting requests, in arrival order, each credited with its lookup() reuse:
                 compute = min(prompt - reuse, chunk cap, budget left); then one two-phase
                 add_sequence_batch admits them, so the credit is exact and
                 num_scheduled_tokens <= max_num_tokens on every step

The legacy estimate-then-admit loop (``admission="probe"``) exists only to measure the race
and lives in the simulator (:class:`kvtier.sim.probe.ProbeScheduler`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from operator import attrgetter
from typing import cast

from kvtier.chunk_planner import ChunkPlanner
from kvtier.decode_batch import DecodeBatch
from kvtier.reprs import shown
from kvtier.request import Request, set_progress
from kvtier.scheduled_step import Candidate, ContextChunk, ScheduledStep
from kvtier.scheduler_config import (
    ADMISSIONS,
    CAPACITY_POLICIES,
    AdmissionMode,
    CapacityPolicy,
    SchedulerConfig,
)
from kvtier.sequence import MAX_TOKEN_ID, check_token, short_repr
from kvtier.step_recovery import StepRecovery, num_failures

__all__ = [
    "ADMISSIONS",
    "CAPACITY_POLICIES",
    "AdmissionMode",
    "Candidate",
    "CapacityPolicy",
    "ContextChunk",
    "Request",
    "ScheduledStep",
    "Scheduler",
    "SchedulerConfig",
]

# The one type a sampled token may have (a bool is refused, as ``check_token`` refuses it).
_INT_TYPE = frozenset({int})
_request_id = attrgetter("request_id")
_output = attrgetter("output")





class Scheduler(StepRecovery, ChunkPlanner, DecodeBatch):
    """Admits, chunks, grows and preempts requests on top of a :class:`KVCacheManager`.

    Contract: the scheduler owns ``waiting`` and ``running`` and each queued
    :class:`Request`'s progress fields (``output``, ``num_*``); callers read them and change
    them only through ``add_request``, ``update``, ``requeue_failed``, ``hold``/``release``.
    Its other fields are read as it runs (``max_output_tokens`` sizes its reservation under
    ``guaranteed_no_evict``): from ``add_request`` until it finishes or is aborted the
    request refuses any assignment (AttributeError), and its prompt is the one queued (a
    change in place to the list is not seen). Of the manager it
    calls only the public admission, growth and release API, between ``begin_step`` and
    ``end_step``. A request is always in exactly one of ``waiting`` and
    ``running`` until it finishes; a call refused leaves both unchanged, and a ``step`` or
    ``update`` that raises part way is failed whole (its requests recompute, see each). A
    call that changes it made from inside one of its own (the manager's clock or eviction
    policy calling back) is refused (RuntimeError), as the manager refuses such calls.
    """

    # ---- commands --------------------------------------------------------------------

    def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """Drop every cached block of every tier (``manager.reset_cache``), as vLLM's
        ``Scheduler.reset_prefix_cache`` does after a weight update has made all cached KV
        stale. Without ``reset_running_requests`` it is refused (False, nothing changed)
        while any request is live. With it, every running request is preempted first,
        newest first, so that the queue gets them back at its front in admission order; each
        recomputes its prompt and output from scratch (its blocks are not stored for reuse)
        and the next step lists it in ``preempted_request_ids``. Returns False, changing
        nothing, where the manager holds requests this scheduler does not run (admitted
        there directly). A remote store keeps its blocks (``KVCacheManager.reset_cache``).
        Raises, changing nothing, between ``step`` and ``update``
        (RuntimeError: apply the step first) or for a flag that is no bool (TypeError)."""
        if type(reset_running_requests) is not bool:
            raise TypeError(f"reset_running_requests must be a bool, got "
                            f"{short_repr(reset_running_requests)}")
        self._check_not_in_call("reset_prefix_cache")
        if self._unapplied is not None:
            raise RuntimeError("reset_prefix_cache() between step() and update(): apply the "
                               "step first")
        self._in_call = "reset_prefix_cache"
        try:
            return self._reset_prefix_cache(reset_running_requests)
        finally:
            self._in_call = None

    def _reset_prefix_cache(self, reset_running_requests: bool) -> bool:
        """``reset_prefix_cache``, its argument checked."""
        manager = self.manager
        if not reset_running_requests and self.running:
            # NOTE: by the scheduler's books, not the manager's: a running request the
            # manager dropped (compute_failed between steps) still runs here.
            return False
        if not self.running:
            return manager.reset_cache()
        running = list(self.running.values())
        live = [req for req in running if manager.has_sequence(req.request_id)]
        if manager.num_sequences != len(live):
            return False  # another caller's requests hold blocks: nothing to preempt them
        # May raise: nothing changed yet.
        specs = [self._spec_of(req, resumed=True) for req in running]
        for req in live:
            manager.remove_sequence(req.request_id, store_for_reuse=False)
        for req, spec in zip(reversed(running), reversed(specs), strict=True):
            self._leave_running(req)
            set_progress(req, num_preemptions=req.num_preemptions + 1, num_computed_tokens=0,
                         num_prefill_tokens=0)
            self._enqueue(req, spec, first=True)
        self._unlisted_preempted += [req.request_id for req in running]
        self._num_removed = manager.num_removed_sequences
        done = manager.reset_cache()
        assert done, "no request is live, yet the manager refused to reset"
        return done

    def step(self) -> ScheduledStep:
        """Schedule one forward pass. Raises RuntimeError, changing nothing, while the last
        step has not been applied by ``update``. A step that raises part way (anything it
        calls: the step timer, the manager, its clock or policy) is failed whole before the
        exception goes on (``_fail_step``): its requests recompute, nothing is half done."""
        self._check_not_in_call("step")
        if self._unapplied is not None:
            raise RuntimeError("step() called before update() applied the previous step")
        self._in_call = "step"
        try:
            return self._schedule()
        finally:
            self._in_call = None

    def _schedule(self) -> ScheduledStep:
        """``step``, once it may run."""
        lost = self._lost()
        if lost:
            # Aborted in the manager outside a step (``compute_failed`` after ``update``, a
            # direct ``remove_sequence``): no step could decode them (a KeyError from the
            # manager at every step, the scheduler stuck). They recompute, as requeued.
            reqs = [self.running[rid] for rid in lost]
            if num_failures(self.manager) != self._num_failures_at_update:
                # NOTE: the tokens the last update appended came from the pass that failed:
                # kept, the request recomputed with a token its model never sampled (its
                # chunk prefilled 2 tokens past its 8 reused where 1 is right).
                before = dict(zip((r.request_id for r in self._appended[0]),
                                  self._appended[1], strict=True))
                for req in reqs:
                    num = len(req.output) - before.get(req.request_id, len(req.output))
                    if num > 0:
                        del req.output[-num:]
            self._requeue(reqs)
        self._appended = ([], [])
        phases = self.phases
        if phases is not None:
            phases.begin()
        manager = self.manager
        self._step_touched = []
        self._step_started = []
        self._step_candidates = []
        step = None
        try:
            manager.begin_step()
            step = self._step()
            manager.end_step()
            if phases is not None:
                phases.mark("store")
        except BaseException:
            self._fail_step(step)
            raise
        finally:
            self._step_touched = []
            self._step_started = []
            self._step_candidates = []
            self._computing.clear()  # a query between steps waits on no step's chunks
            self._num_removed = manager.num_removed_sequences
        self._unlisted_preempted = []  # the step lists them
        lost_now = manager.stats.num_lost_reused_tokens
        step = step._replace(num_lost_reused_tokens=lost_now - self._num_lost_seen)
        self._num_lost_seen = lost_now
        self._unapplied = step
        return step

    def _step(self) -> ScheduledStep:
        cfg = self.config
        self._num_steps += 1
        budget = cfg.max_num_tokens
        slots = cfg.max_batch_size
        preempted = self._unlisted_preempted  # this step's preemptions join them
        num_unlisted = len(preempted)
        touched = self._step_touched
        decodes: list[str] = []
        chunks: list[ContextChunk] = []

        # 1. Decode: one token each, its block allocated before anything is admitted.
        drafts: list[int] = []
        if cfg.num_speculative_tokens:
            budget, slots = self._decode_speculative(budget, slots, decodes, drafts, preempted)
        else:
            budget, slots = self._decode(budget, slots, decodes, preempted)
        phases = self.phases
        if phases is not None:
            phases.mark("decode")

        # 2. Continue chunked prefills.
        cap = self._chunk_cap()
        # NOTE: the requests still in their prefill picked out at C speed, in running order
        # (a loop over every running request here, most of them decoding, was ~1.4 % of
        # the slowest steps by sampling); nothing below changes who is running or where.
        prefilling = [req for req in self.running.values()
                      if req.num_prefill_tokens > req.num_computed_tokens]
        computing = self._computing
        computing.clear()
        for req in prefilling:
            if budget == 0 or slots == 0:
                break
            remaining = req.num_prefill_tokens - req.num_computed_tokens
            n = min(remaining, cap, budget)
            touched.append(req.request_id)
            self.manager.schedule_prefill(req.request_id, n)
            chunks.append(ContextChunk(req.request_id, req.num_computed_tokens, n, 0))
            spec = self._prefill_specs.get(req.request_id)
            if spec is not None:
                self._note_computing(computing, spec, req.num_computed_tokens, n)
            budget -= n
            slots -= 1

        if phases is not None:
            phases.mark("prefill")
        # 3. Admit waiting requests, unless the decodes preempted (max_utilization).
        # NOTE: the room a preemption frees is for the running requests it was made for:
        # admitted into it, a request queued after the victim took its blocks (its cached
        # prefix evicted) in the very step that requeued it. vLLM's scheduler admits nothing
        # in a step that preempted, nor does this one.
        credited = reused = 0
        try:
            if budget and slots and self.waiting and len(preempted) == num_unlisted:
                admitted = self.admit(budget, slots)
                chunks += admitted.chunks
                credited, reused = admitted.num_credited_tokens, admitted.num_reused_tokens
        finally:
            computing.clear()  # a query between steps waits on no step's chunks
        num_tokens = len(decodes) + sum(drafts) + sum(c.num_tokens for c in chunks)
        overflow = max(0, num_tokens - cfg.max_num_tokens)
        # Exact credit (claim admission) never overflows; probe admission counts it.
        assert not overflow or self.ADMISSION == "probe", (num_tokens, cfg.max_num_tokens)
        self._hint_queue()
        if phases is not None:
            phases.mark("hint")
        # The step's copies; stores at end_step add none.
        # NOTE: taken last: a step that raises before it leaves its copies with the manager,
        # for ``_fail_step`` to report failed (the hint records none).
        plan = self.manager.take_plan()
        return ScheduledStep(tuple(chunks), tuple(decodes), num_tokens, plan,
                             tuple(preempted), credited, reused, overflow, tuple(drafts))

    def update(self, step: ScheduledStep, sampled: Mapping[str, int | Sequence[int]],
               stopped: Collection[str] = ()) -> list[Request]:
        """Apply a finished forward pass: advance prefills, record sampled tokens (for every
        decode and every completed prefill; with speculative decoding a decode's accepted
        drafts and the token after them, see ``_apply_speculative``), finish requests that
        reached their output length or whose sampled token ends them (``stopped``: an EOS or
        a stop string, the token itself is kept). A token or a stop for a request that
        samples nothing in this step (mid-prefill, not in the step, unknown) is ignored, as
        vLLM discards a partial prefill's sample. Returns the finished requests. Raises,
        changing nothing, for a step that is not the last one ``step`` (or
        ``requeue_failed``) returned or was already applied (RuntimeError), a ``sampled``
        that is no mapping or a ``stopped`` that is no collection of str (TypeError), or a
        request that samples with no valid token in ``sampled`` (ValueError). An update that raises
        once it began to apply the step (the step timer, the manager releasing a finished
        request, anything) fails it whole before the exception goes on (``_fail_update``):
        the step's requests recompute its tokens, and the step is applied."""
        self._check_not_in_call("update")
        self._check_unapplied(step, "update")
        self._in_call = "update"
        try:
            return self._update(step, sampled, stopped)
        finally:
            self._in_call = None

    def _update(self, step: ScheduledStep, sampled: Mapping[str, int | Sequence[int]],
                stopped: Collection[str]) -> list[Request]:
        """``update`` of the step waiting for it."""
        lost = self._lost()
        if lost:
            # NOTE: applied, the step appended their tokens, then removing a finished one
            # raised KeyError halfway (the step never marked applied: the scheduler stuck).
            raise RuntimeError(
                f"update(): the manager no longer holds {shown(lost)} (transfer_failed or "
                f"compute_failed aborted them): call requeue_failed(step, {shown(lost)}) first and "
                "update the step it returns")
        if not isinstance(sampled, Mapping):
            raise TypeError(f"sampled must be a mapping of request id to token, got "
                            f"{type(sampled).__name__}")
        if not isinstance(stopped, Collection) or isinstance(stopped, (str, bytes)):
            raise TypeError(f"stopped must be a collection of request ids, got "
                            f"{type(stopped).__name__}")
        # NOTE: read once, before anything changes: a caller's collection asked request by
        # request raised half way through the step's requests (their chunks advanced and
        # tokens appended, the step not applied), and the update taken again appended them
        # twice.
        if type(stopped) is not frozenset:
            try:
                stopped = frozenset(stopped)
            except Exception as exc:
                raise TypeError(f"stopped must be a collection of request ids: reading it "
                                f"raised {type(exc).__name__}: {exc}") from exc
        # NOTE: an id that is no str (the bytes of one) stopped nothing, without a word:
        # its request went on generating past its stop. (A str of a subclass, NumPy's, is
        # equal to its str and stops it.)
        if stopped and not all(isinstance(rid, str) for rid in stopped):
            bad = next(rid for rid in stopped if not isinstance(rid, str))
            raise TypeError(f"stopped must be a collection of request ids (str), got "
                            f"{short_repr(bad)} in it")
        # The step's requests and their output lengths before it, for ``_fail_update``.
        running = self.running
        decoding = [req for req in map(running.get, step.decode_request_ids) if req is not None]
        reqs = decoding + [req for req in map(running.get, map(_request_id, step.context_chunks))
                           if req is not None]
        lengths = list(map(len, map(_output, reqs)))
        self._update_started = False
        try:
            phases = self.phases
            if phases is not None:
                phases.resume()
            if self.config.num_speculative_tokens:
                finished = self._apply_speculative(step, decoding, sampled, stopped)
            else:
                finished = self._apply(step, decoding, sampled, stopped)
            for req in finished:
                self.manager.remove_sequence(req.request_id)
                self._leave_running(req)
            if phases is not None:
                phases.mark("update")
        except BaseException:
            if self._update_started:
                self._fail_update(reqs, lengths)
            raise  # else nothing changed: the step still waits for its update
        finally:
            self._num_removed = self.manager.num_removed_sequences
        for req in finished:
            self._release_request(req)
        self._unapplied = None
        self._appended = (reqs, lengths)
        self._num_failures_at_update = num_failures(self.manager)
        return finished

    def _apply(self, step: ScheduledStep, decoding: list[Request],
               sampled: Mapping[str, object], stopped: Collection[str]) -> list[Request]:
        """``update``'s tokens, one a sampler: every token checked before any is applied;
        returns the requests that finish. ``decoding``: the step's decodes still running."""
        running = self.running
        samplers = [req.request_id for req in decoding]
        for chunk in step.context_chunks:
            req = running.get(chunk.request_id)
            if req is not None and chunk.first_token + chunk.num_tokens >= req.num_prefill_tokens:
                samplers.append(chunk.request_id)
        tokens: list[object] = list(map(sampled.get, samplers))
        ints = cast("list[int]", tokens)  # read as ints only once their types are checked
        # NOTE: the step's tokens checked at C speed; only a bad batch is walked, to name
        # the first bad token (each message built only then).
        if not (set(map(type, tokens)) <= _INT_TYPE
                and (not ints or (min(ints) >= 0 and max(ints) <= MAX_TOKEN_ID))):
            ints = [check_token(token, f"sampled token of {shown(rid)}")  # NumPy ints: ints
                    for rid, token in zip(samplers, tokens, strict=True)]
        # The decoders' tokens come first in ``ints``, the completed prefills' after them.
        firsts = dict(zip(samplers[len(decoding):], ints[len(decoding):], strict=True))
        self._update_started = True  # every token checked: the step applies from here
        finished = self._advance_chunks(step, stopped, lambda rid: [firsts[rid]])
        for req, token in zip(decoding, ints, strict=False):
            output = req.output
            output.append(token)
            if len(output) >= req.max_output_tokens or req.request_id in stopped:
                finished.append(req)
        return finished

    def _apply_speculative(self, step: ScheduledStep, decoding: list[Request],
                           sampled: Mapping[str, object],
                           stopped: Collection[str]) -> list[Request]:
        """``update`` with drafts: a decoding request's value in ``sampled`` is its accepted
        drafts and the token sampled after them (a token, or a list of 1 to its drafts + 1
        tokens); a request completing its prefill samples one token. Every value is checked
        before any is applied; output past ``max_output_tokens`` is dropped. Returns the
        requests that finish."""
        running = self.running
        num_drafts = dict(zip(step.decode_request_ids, step.num_draft_tokens, strict=True))
        completing = [chunk.request_id for chunk in step.context_chunks
                      if chunk.request_id in running and chunk.first_token + chunk.num_tokens
                      >= running[chunk.request_id].num_prefill_tokens]
        new: dict[str, list[int]] = {}
        for rid, most in [(req.request_id, 1 + num_drafts[req.request_id])
                          for req in decoding] + [(rid, 1) for rid in completing]:
            value = sampled.get(rid)
            # One token, unless a list: checked by check_token as every token is.
            tokens = value if value is None or isinstance(value, (list, tuple)) else [value]
            if not isinstance(tokens, (list, tuple)) or not 1 <= len(tokens) <= most:
                raise ValueError(
                    f"sampled tokens of {shown(rid)} must be a token or a list of 1..{most} "
                    f"(accepted drafts, then the token sampled after them), got {shown(value):.60}")
            new[rid] = [check_token(t, f"sampled token of {shown(rid)}") for t in tokens]
        # A completed prefill's one token is unappended, as a request absent from
        # ``_num_unappended`` is taken to have (its entry left at its admission).
        self._update_started = True  # every token checked: the step applies from here
        finished = self._advance_chunks(step, stopped, new.__getitem__)
        for req in decoding:
            tokens = new[req.request_id][:req.max_output_tokens - len(req.output)]
            req.output.extend(tokens)
            self._num_unappended[req.request_id] = len(tokens)
            if len(req.output) >= req.max_output_tokens or req.request_id in stopped:
                finished.append(req)
        return finished

    def _advance_chunks(self, step: ScheduledStep, stopped: Collection[str],
                        first_tokens: Callable[[str], list[int]]) -> list[Request]:
        """Advance the step's prefill chunks; a request whose prefill completed takes its
        first output, ``first_tokens(request_id)`` (checked). Returns the requests that
        finish with it."""
        finished = []
        running = self.running
        for chunk in step.context_chunks:
            req = running.get(chunk.request_id)
            if req is None:
                continue
            set_progress(req, num_computed_tokens=chunk.first_token + chunk.num_tokens)
            if not req.in_prefill:
                self._prefill_specs.pop(req.request_id, None)
                req.output.extend(first_tokens(req.request_id))
                if len(req.output) >= req.max_output_tokens or req.request_id in stopped:
                    finished.append(req)
        return finished
