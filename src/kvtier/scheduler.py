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

:class:`Scheduler` is one object built of parts, one module each, all over one set of
books (``scheduler_state.py``: what it keeps, the checks of its calls, ``check_invariants``):
``waiting_queue.py`` (queueing, holds, aborts, lookups, the queue hint), ``decode_batch.py``
(phase 1 and preemption), ``chunk_planner.py`` (phase 3: candidates within the budget, then
admission), ``step_recovery.py`` (failed steps, updates and aborted requests degraded to
recompute) and ``step_update.py`` (``update``). This module keeps the step itself and
``reset_prefix_cache``.
"""

from __future__ import annotations

from kvtier.chunk_planner import ChunkPlanner
from kvtier.decode_batch import DecodeBatch
from kvtier.request import Request, set_progress
from kvtier.scheduled_step import Candidate, ContextChunk, ScheduledStep
from kvtier.scheduler_config import (
    ADMISSIONS,
    CAPACITY_POLICIES,
    AdmissionMode,
    CapacityPolicy,
    SchedulerConfig,
)
from kvtier.sequence import short_repr
from kvtier.step_recovery import num_failures
from kvtier.step_update import StepUpdate

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


class Scheduler(StepUpdate, ChunkPlanner, DecodeBatch):
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
