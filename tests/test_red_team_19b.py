"""Red team 19b: the scheduler's public calls between steps (add, abort, hold/release,
preemption, resets), mixed at random with parallel sampling's bursts of one prompt, requests
that skip reading the cache, short ``max_wait_steps``, steps without chunked prefill, tiny
budgets and speculative drafts, over test_red_team_13b's fake data plane (every KV position a
step reads checked against a cacheless run). After every call the scheduler's own books hold
(``Scheduler.check_invariants``: each request in exactly one of its queues, nothing kept for
one that left); at the end every request finishes within a bound of steps, with a cacheless
run's output."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule, run_state_machine_as_test

from kvtier import CacheConfig, KVCacheManager
from kvtier.scheduler import Request, Scheduler, SchedulerConfig
from test_red_team_13b import PROMPTS, TPB, NewCallsUnderScheduling

# Steps to finish what is queued at the end: a 1-token budget takes one a token.
MAX_DRAIN_STEPS = 5000


class SchedulerCallsBetweenSteps(NewCallsUnderScheduling):
    """13b's machine with hold/release, bursts of one prompt and more scheduler shapes."""

    @initialize(drafts=st.sampled_from([0, 0, 2]), gpu=st.integers(8, 14),
                host=st.sampled_from([0, 6]), evict=st.booleans(), chunked=st.booleans(),
                budget=st.sampled_from([1, 3, 12, 16]), wait=st.sampled_from([1, 2, 64]),
                chunk=st.sampled_from([None, 2, 5]), batch=st.sampled_from([1, 2, 256]))
    def build(self, drafts: int, gpu: int, host: int, evict: bool, chunked: bool,
              budget: int, wait: int, chunk: int | None, batch: int) -> None:
        if not chunked:
            budget = max(budget, 16)  # a prompt past the budget is refused when queued
        self.mgr = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=gpu,
                                              num_host_blocks=host, enable_events=True))
        self.sched = Scheduler(self.mgr, SchedulerConfig(
            max_num_tokens=budget, enable_chunked_prefill=chunked,
            max_chunk_tokens=chunk if chunked else None, max_batch_size=batch,
            capacity_policy="max_utilization" if evict else "guaranteed_no_evict",
            max_wait_steps=wait, num_speculative_tokens=drafts))
        self.gpu = {s: [None] * TPB for s in range(gpu)}
        self.host = {s: [None] * TPB for s in range(host)}

    @rule(prompt=PROMPTS, n=st.integers(2, 4), out=st.integers(1, 5),
          skip=st.lists(st.booleans(), min_size=4, max_size=4))
    def burst(self, prompt: list[int], n: int, out: int, skip: list[bool]) -> None:
        """Parallel sampling: ``n`` branches of one prompt queued at once, some of them
        skipping the cache."""
        for i in range(n):
            self.n += 1
            req = Request(f"r{self.n}", prompt, out, skip_reading_prefix_cache=skip[i])
            try:
                self.sched.add_request(req)
            except ValueError as e:
                assert "needs" in str(e), e
                continue
            self.requests[req.request_id] = req

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), release=st.booleans())
    def hold_or_release(self, data: st.DataObject, release: bool) -> None:
        rid = data.draw(st.sampled_from(sorted(self.requests)))
        if release:
            self.sched.release(rid)
        else:
            self.sched.hold(rid)

    @invariant()
    def scheduler_books_hold(self) -> None:
        if hasattr(self, "sched") and self.sched._unapplied is None:
            self.sched.check_invariants()

    def teardown(self) -> None:
        if not hasattr(self, "sched") or self.sched._unapplied is not None:
            return  # a rule failed part way
        for rid in list(self.requests):
            self.sched.release(rid)
        for _ in range(MAX_DRAIN_STEPS):
            if not self.sched.has_unfinished():
                break
            self.step_plain()
        super().teardown()


def test_scheduler_calls_between_steps_keep_books_and_every_request_finishes() -> None:
    run_state_machine_as_test(SchedulerCallsBetweenSteps, settings=settings(
        max_examples=150, stateful_step_count=30, deadline=None,
        suppress_health_check=list(HealthCheck)))


def make_scheduler(**kw: Any) -> Scheduler:
    """A scheduler over 16 GPU blocks of 4 tokens (no host tier)."""
    return Scheduler(KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=16,
                                                num_host_blocks=0)), SchedulerConfig(**kw))


def test_a_request_aborted_after_a_reset_preempted_it_is_not_listed_as_preempted() -> None:
    """reset_prefix_cache(True) preempts A and B for the next step to list; A is aborted
    before that step and a new request takes its id. The step lists only B: it listed A
    too, a request no longer queued (the engine then counted a preemption on the new A's
    result, the simulator one more preemption)."""
    s = make_scheduler()
    s.add_request(Request("A", [1, 2, 3, 4, 5], 3))
    s.add_request(Request("B", [6, 7, 8, 9, 10], 3))
    step = s.step()
    s.update(step, {"A": 11, "B": 12})
    assert s.reset_prefix_cache(True)
    assert [r.request_id for r in s.waiting] == ["A", "B"]
    aborted = s.abort("A")
    assert aborted is not None and aborted.num_preemptions == 1
    s.check_invariants()
    s.add_request(Request("A", [1, 2, 3], 2))
    step = s.step()
    assert step.preempted_request_ids == ("B",)
    #   B recomputes its prompt and output (6 tokens); the new A its 3-token prompt.
    assert [(c.request_id, c.first_token, c.num_tokens) for c in step.context_chunks] == [
        ("B", 0, 6), ("A", 0, 3)]
    s.update(step, {"A": 13, "B": 14})
    s.check_invariants()
    s.manager.check_invariants()
