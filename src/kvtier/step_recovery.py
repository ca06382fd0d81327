"""The scheduler's recovery of failed steps: a step or update that raised part way, and
requests the manager aborted (``transfer_failed``, ``compute_failed``), degrade to
recompute; they go back to the front of the queue, in admission order, and what the step
reported reused is what was obtained.

:class:`StepRecovery` is a part of :class:`~kvtier.scheduler.Scheduler` over its waiting
queue (:class:`~kvtier.waiting_queue.WaitingQueue`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from kvtier.manager import KVCacheManager
from kvtier.reprs import shown
from kvtier.request import Request, set_progress
from kvtier.scheduled_step import ContextChunk, ScheduledStep
from kvtier.sequence import short_repr
from kvtier.waiting_queue import WaitingQueue


def _num_obtained(chunks: Iterable[ContextChunk]) -> int:
    """The reuse the admissions of ``chunks`` get: each first chunk's (a later chunk's is
    0). Pure.

    NOTE: a step's reuse is its chunks', not its admissions' promises: a request that
    ``requeue_failed`` took out of the step (its onboard or its pass failed) got nothing
    of what it was credited, yet the step still reported it reused (its credit read as
    obtained: no reuse lost)."""
    return sum(c.num_reused_tokens for c in chunks)


def num_failures(manager: KVCacheManager) -> int:
    """The copies and forward passes the manager was told failed, so far. Pure."""
    stats = manager.stats
    return stats.num_failed_transfers + stats.num_failed_computes


class StepRecovery(WaitingQueue):
    """Failed steps and updates undone by recompute; aborted requests requeued."""

    def _fail_step(self, step: ScheduledStep | None) -> None:
        """Undo a step that raised part way (the caller's clock, policy or step timer, the
        manager, anything): the engine never saw it, so it is a step whose copies and
        forward pass failed. The copies it recorded are reported failed
        (``transfer_failed``: what they were to fill leaves the cache) and every request it
        touched that the manager still holds is reported as a failed pass
        (``compute_failed``: what the step scheduled leaves the cache, what earlier steps
        computed stays); the running requests the manager dropped go back to the front of
        the queue, in admission order, to recompute, and the next step lists those the
        engine ran (and the step's own preemptions) as preempted. A waiting request the
        step admitted in the manager and had not started yet stays waiting, resumed (its
        admission was counted as its query).

        NOTE: degrade to recompute rather than undo: the manager's moves (evictions,
        offloads, onboards, stores) have no inverse, while the recovery above is the one
        the engine's own failures take, tested as it is. The cost is recomputing the
        requests one failed step touched."""
        manager = self.manager
        lost_before = manager.stats.num_lost_reused_tokens
        # The waiting requests this step admitted in the manager (``candidates`` offers
        # none the manager held), before the failed copies below abort any of them: each
        # admission was counted as its query, so its next one is a recompute.
        # NOTE: one left out (aborted by its failed onboard, or dropped below) counted its
        # prompt twice in the hit rate.
        admitted = [rid for rid in dict.fromkeys(self._step_candidates)
                    if rid in self._specs and manager.has_sequence(rid)]
        plan = step.transfer_plan if step is not None else None
        if manager.in_step:
            # Its stores and copies not taken yet: taken here, the engine never runs them.
            rest = manager.end_step()
            if len(rest) or plan is None:
                plan = rest
        elif plan is None:
            plan = manager.take_plan()
        if len(plan):
            manager.transfer_failed(plan, range(len(plan)))
        # (A candidate the manager holds was admitted there by this step: ``candidates``
        # offers none the manager held; those it started are listed too, for an ``admit``
        # of a subclass that names none.)
        # NOTE: not every waiting request the manager holds: one the caller admitted in the
        # manager directly, under the id of a request it had queued, is the caller's own
        # sequence (it was dropped, under the caller's feet).
        touched = [rid for rid in dict.fromkeys(
            [*self._step_touched, *self._step_started, *self._step_candidates])
            if manager.has_sequence(rid)]
        if touched:
            manager.compute_failed(touched)
        for rid in admitted:
            spec = self._specs[rid]
            if not spec.resumed:
                self._specs[rid] = replace(spec, resumed=True)
        lost = [req for rid, req in self.running.items() if not manager.has_sequence(rid)]
        self._requeue(lost)
        unlisted = set(self._unlisted_preempted).union(self._step_started)
        self._unlisted_preempted += [req.request_id for req in lost
                                     if req.request_id not in unlisted]
        # NOTE: the step was never returned: the reuse it takes back was reported by no
        # step (its own admissions'), so no later step reports it lost either.
        self._num_lost_seen += manager.stats.num_lost_reused_tokens - lost_before

    def _lost(self) -> list[str]:
        """The running requests the manager no longer holds, in admission order. Pure.

        NOTE: walked only where requests left the manager since the scheduler last changed
        it (a step or update compares two ints)."""
        manager = self.manager
        if manager.num_removed_sequences == self._num_removed:
            return []
        return [rid for rid in self.running if not manager.has_sequence(rid)]

    def _fail_update(self, reqs: list[Request], lengths: list[int]) -> None:
        """Undo an update that raised after it began to apply its step (the caller's step
        timer, the manager releasing a finished request, anything): the caller never got
        its finished requests, so the step is taken as lost. Each of its requests (``reqs``)
        gets back its output as before it (``lengths``) and returns to the front of the
        queue, to recompute the step's tokens: those the manager holds leave it, what the
        step's pass computed staying cached (the pass ran). The step is applied (it is
        gone); the next step lists the requests as preempted.

        NOTE: degrade rather than finish the update: a finished request the manager failed
        to release could be neither returned nor kept running past its end."""
        manager = self.manager
        for req, num_tokens in zip(reqs, lengths, strict=True):
            del req.output[num_tokens:]
        for req in reqs:
            rid = req.request_id
            if manager.has_sequence(rid):
                manager.remove_sequence(rid)
            if rid in self.running:
                self._leave_running(req)
        specs = [self._spec_of(req, resumed=True) for req in reqs]
        for req, spec in zip(reversed(reqs), reversed(specs), strict=True):
            set_progress(req, num_computed_tokens=0, num_prefill_tokens=0)
            self._enqueue(req, spec, first=True)
        self._unlisted_preempted += [req.request_id for req in reqs]
        self._unapplied = None

    def requeue_failed(self, step: ScheduledStep, request_ids: Iterable[str]) -> ScheduledStep:
        """After ``manager.transfer_failed`` aborted ``request_ids``: put them back at the
        front of the queue, in the order they were admitted, to recompute, and return
        ``step`` without their work: the step ``update`` then applies. Raises, changing
        nothing, for a step that is not the last one returned (RuntimeError), ids that are
        no iterable of str (TypeError, naming the first that is none) or name a request the
        manager still holds (ValueError). An id of no running request is ignored."""
        self._check_not_in_call("requeue_failed")
        self._check_unapplied(step, "requeue_failed")
        if isinstance(request_ids, (str, bytes)) or not isinstance(request_ids, Iterable):
            raise TypeError(f"request_ids must be an iterable of request ids, got "
                            f"{type(request_ids).__name__}")
        # NOTE: each id checked: one that is no str (an int, the bytes of an id) was
        # ignored without a word, and an unhashable one raised a bare "unhashable type".
        ids = list(request_ids)
        for i, rid in enumerate(ids):
            if not isinstance(rid, str):  # NumPy's str_ is one, equal to its str
                raise TypeError(f"request_ids[{i}] must be a str (a request id), got "
                                f"{short_repr(rid)}")
        gone = set(ids)
        # NOTE: ordered by the running table (admission order), never by the set, whose
        # order depends on PYTHONHASHSEED: the queue order decides what is admitted next.
        requeued = [req for rid, req in self.running.items() if rid in gone]
        for req in requeued:
            if self.manager.has_sequence(req.request_id):
                # Queued while the manager still holds it, it could never be admitted again.
                raise ValueError(f"request {shown(req.request_id)} is still live in the manager: "
                                 "requeue only what transfer_failed aborted")
        # NOTE: the count is not taken here: a request the caller left out of
        # ``request_ids`` that the manager dropped too is still found by ``update``.
        self._requeue(requeued)  # may raise (a spec the manager refuses): nothing changed
        chunks = tuple(c for c in step.context_chunks if c.request_id not in gone)
        decodes = tuple(r for r in step.decode_request_ids if r not in gone)
        drafts = step.num_draft_tokens
        if drafts:  # with speculative decoding: one per decode
            drafts = tuple(d for r, d in zip(step.decode_request_ids, drafts, strict=True)
                           if r not in gone)
        num = len(decodes) + sum(drafts) + sum(c.num_tokens for c in chunks)
        num_reused = _num_obtained(chunks)
        # The reuse taken out of this step was never reported obtained: the manager's
        # loss of it is accounted for here, not reported lost by the next step.
        self._num_lost_seen += step.num_reused_tokens - num_reused
        self._unapplied = step._replace(context_chunks=chunks, decode_request_ids=decodes,
                                        num_scheduled_tokens=num, num_draft_tokens=drafts,
                                        num_reused_tokens=num_reused)
        return self._unapplied

    def _requeue(self, requeued: list[Request]) -> None:
        """Put running requests the manager no longer holds back at the front of the queue,
        in their order, to recompute. Raises ValueError, changing nothing, for a request
        whose spec the manager refuses."""
        # May raise: nothing changed yet.
        specs = [self._spec_of(req, resumed=True) for req in requeued]
        for req, spec in zip(reversed(requeued), reversed(specs), strict=True):
            self._leave_running(req)
            set_progress(req, num_computed_tokens=0, num_prefill_tokens=0)
            self._enqueue(req, spec, first=True)
