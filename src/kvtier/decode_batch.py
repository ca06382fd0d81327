"""The scheduler's decode batch: each step's running requests past their prefill grow by
one token (or, with speculative decoding, by the tokens the last update accepted, plus
draft slots), their blocks allocated before anything is admitted; on a shortage under
``max_utilization`` the newest running request is preempted and requeued.

:class:`DecodeBatch` is a part of :class:`~kvtier.scheduler.Scheduler` over its waiting
queue (:class:`~kvtier.waiting_queue.WaitingQueue`).
"""

from __future__ import annotations

from kvtier.reprs import shown
from kvtier.request import Request, set_progress
from kvtier.waiting_queue import WaitingQueue


class DecodeBatch(WaitingQueue):
    """The decode phase of a step, and preemption."""

    def _decode(self, budget: int, slots: int, decodes: list[str],
                preempted: list[str]) -> tuple[int, int]:
        """The decode phase: each running request past its prefill appends its last
        sampled token, as many as ``budget`` and ``slots`` take, its block allocated first;
        a request that finds no block preempts the newest running request (it may be
        itself). Fills ``decodes`` and ``preempted``; returns the budget and slots left."""
        ready = [req for req in self.running.values()
                 if req.num_computed_tokens >= req.num_prefill_tokens][:min(budget, slots)]
        rids = [req.request_id for req in ready]
        tokens = [req.output[-1] for req in ready]
        self._step_touched.extend(rids)
        while rids:
            # NOTE: two lists, not pairs: every value is checked, not the pairs' shape.
            done = self.manager.append_token_columns(rids, tokens)
            decodes += rids[:done]
            if done == len(rids):
                break
            # No block for rids[done]: preempt the newest running request.
            victim = self._preempt_newest(rids[done])
            preempted.append(victim)
            keep = [i for i in range(done, len(rids)) if rids[i] != victim]
            rids = [rids[i] for i in keep]
            tokens = [tokens[i] for i in keep]
        return budget - len(decodes), slots - len(decodes)

    def _decode_speculative(self, budget: int, slots: int, decodes: list[str],
                            drafts: list[int], preempted: list[str]) -> tuple[int, int]:
        """The decode phase with drafts: each running request past its prefill appends what
        the last update sampled (the accepted drafts and the token after them), then gets
        up to ``num_speculative_tokens`` draft slots, as the budget, its output length and
        the pool allow (none where the pool has no block for them: it still decodes).
        Fills ``decodes``, ``drafts`` and ``preempted``; returns the budget and slots left."""
        k = self.config.num_speculative_tokens
        manager = self.manager
        for req in list(self.running.values()):
            rid = req.request_id
            if budget == 0 or slots == 0:
                break
            if rid not in self.running or req.num_computed_tokens < req.num_prefill_tokens:
                continue  # preempted below, or still prefilling
            self._step_touched.append(rid)
            num_new = self._num_unappended.get(rid, 1)
            assert num_new >= 1, (rid, num_new)  # every decode's update samples
            new = req.output[len(req.output) - num_new:]
            while manager.append_tokens(rid, new) is None:
                victim = self._preempt_newest(rid)
                preempted.append(victim)
                if victim == rid:
                    break
            if rid not in self.running:
                continue
            self._num_unappended[rid] = 0
            num_drafts = max(0, min(k, budget - 1, req.max_output_tokens - len(req.output) - 1))
            if num_drafts and manager.reserve_lookahead(rid, num_drafts) is None:
                num_drafts = 0
            decodes.append(rid)
            drafts.append(num_drafts)
            budget -= 1 + num_drafts
            slots -= 1
        return budget, slots

    def _preempt_newest(self, request_id: str) -> str:
        """``request_id`` found no block: preempt the newest running request (under
        max_utilization; guaranteed_no_evict reserved every block it could need) and
        return its id."""
        assert self.config.capacity_policy == "max_utilization", (
            f"{shown(request_id)} ran out of reserved blocks")
        victim = next(reversed(self.running.values()))
        self._preempt(victim)
        return victim.request_id

    def _preempt(self, req: Request) -> None:
        """Release ``req`` (its computed blocks stay cached) and requeue it first."""
        # NOTE: the spec is built before anything changes, so a refusal leaves the request
        # running: a request is never in neither queue.
        spec = self._spec_of(req, resumed=True)
        # The token it was about to decode is not computed: keep it out of the cache.
        self.manager.remove_sequence(req.request_id)
        self._leave_running(req)
        set_progress(req, num_preemptions=req.num_preemptions + 1, num_computed_tokens=0,
                     num_prefill_tokens=0)
        self._enqueue(req, spec, first=True)
