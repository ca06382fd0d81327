"""vLLM's prefix-cache reset with running requests, mirrored against kvtier's scheduler.

vLLM's ``Scheduler.reset_prefix_cache(reset_running_requests=True)`` (RLHF flows call it
after a weight update: every cached KV is stale) preempts every running request, newest
first so the queue gets them back in order, clears the prefix cache, and lists them in the
next step's ``preempted_req_ids``; they recompute and finish with the output they would have
had. kvtier's ``Scheduler.reset_prefix_cache`` does the same over ``manager.reset_cache``.
"""

from __future__ import annotations

import pytest

from kvtier import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVCacheManager,
    Request,
    Scheduler,
    SchedulerConfig,
    SequenceSpec,
)
from peer_mirror.mirror_helpers import hit, make_manager

SYSTEM = list(range(100, 112))  # a 3-block prefix every request shares


def greedy(tokens: list[int]) -> int:
    """A deterministic stand-in for greedy sampling: the next token of a sequence."""
    return (sum(tokens) * 31 + len(tokens)) % 1000


def make_scheduler(mgr: KVCacheManager) -> Scheduler:
    """Chunks of at most 12 tokens a step: a reset meets prefills and decodes."""
    return Scheduler(mgr, SchedulerConfig(max_num_tokens=12,
                                          capacity_policy="max_utilization"))


def add_requests(sched: Scheduler) -> None:
    for i in range(3):
        sched.add_request(Request(f"r{i}", [*SYSTEM, *range(10 * i, 10 * i + 5 + i)],
                                  max_output_tokens=6))


def greedy_step(sched: Scheduler) -> list[Request]:
    """One step, each scheduled request sampling ``greedy`` of its tokens; the finished."""
    step = sched.step()
    ids = [*step.decode_request_ids, *(c.request_id for c in step.context_chunks)]
    reqs = {rid: sched.running[rid] for rid in ids}
    return sched.update(step, {rid: greedy([*r.prompt, *r.output]) for rid, r in reqs.items()})


def run(sched: Scheduler, reset_at: int | None = None,
        queue_r3_at: int | None = 2) -> tuple[dict[str, list[int]], list[tuple[str, ...]]]:
    """Run to the end, with a fourth request queued before step ``queue_r3_at`` and a reset
    (of running requests) before step ``reset_at``; the outputs, and each step's preempted
    requests."""
    outputs: dict[str, list[int]] = {}
    preempted: list[tuple[str, ...]] = []
    for i in range(60):
        if i == queue_r3_at:
            sched.add_request(Request("r3", [*SYSTEM, 7, 7], max_output_tokens=3))
        if i == reset_at:
            assert sched.running  # the reset meets running requests
            assert sched.reset_prefix_cache(reset_running_requests=True)
            sched.manager.check_invariants()
        step = sched.step()
        preempted.append(step.preempted_request_ids)
        ids = [*step.decode_request_ids, *(c.request_id for c in step.context_chunks)]
        reqs = {rid: sched.running[rid] for rid in ids}
        sampled = {rid: greedy([*r.prompt, *r.output]) for rid, r in reqs.items()}
        for req in sched.update(step, sampled):
            outputs[req.request_id] = req.output
        sched.manager.check_invariants()
        if not sched.has_unfinished():
            return outputs, preempted
    raise AssertionError("the requests did not finish in 60 steps")


def run_fresh(reset_at: int | None,
              mgr: KVCacheManager | None = None) -> tuple[dict[str, list[int]],
                                                          list[tuple[str, ...]]]:
    """The requests on a fresh scheduler (and manager, unless given)."""
    sched = make_scheduler(mgr if mgr is not None else make_manager(num_gpu_blocks=24))
    add_requests(sched)
    return run(sched, reset_at)


def test_a_reset_with_running_requests_recomputes_them_to_the_same_outputs() -> None:
    """Mirrors vllm tests/v1/e2e/test_reset_prefix_cache_e2e.py::test_reset_prefix_cache_e2e
    (greedy outputs are the same with a reset at step 10 as without) with the scheduler's
    side of it: before step 2 three requests run (two decoding, r2 mid-prefill) and r3
    waits; the reset drops every cached block (no block is stored for it) and requeues the
    three in admission order before r3; step 2 lists them preempted and starts r0 over from
    token 0 (nothing is cached, not even the shared prefix); every output equals the run's
    without reset."""
    truth, _ = run_fresh(None)
    mgr = make_manager(num_gpu_blocks=24, enable_events=True)
    sched = make_scheduler(mgr)
    add_requests(sched)
    for _ in range(2):
        greedy_step(sched)
    sched.add_request(Request("r3", [*SYSTEM, 7, 7], max_output_tokens=3))
    assert {rid: (r.num_computed_tokens, r.num_prefill_tokens, len(r.output))
            for rid, r in sched.running.items()} == {
        "r0": (17, 17, 1), "r1": (18, 18, 1), "r2": (13, 19, 0)}
    cached = {b.block_hash for b in mgr.cached_blocks()}
    mgr.drain_events()
    assert sched.reset_prefix_cache(reset_running_requests=True)
    mgr.check_invariants()
    events = mgr.drain_events()
    assert not any(isinstance(e, BlockStored) for e in events)
    assert {e.block_hash for e in events if isinstance(e, BlockRemoved)} == cached
    assert isinstance(events[-1], AllBlocksCleared) and len(events) == len(cached) + 1
    assert (mgr.cached_blocks(), mgr.num_sequences, sched.running) == ([], 0, {})
    assert [r.request_id for r in sched.waiting] == ["r0", "r1", "r2", "r3"]
    assert [(r.num_preemptions, r.num_computed_tokens) for r in sched.waiting] == [
        (1, 0), (1, 0), (1, 0), (0, 0)]
    step = sched.step()
    assert step.preempted_request_ids == ("r0", "r1", "r2")
    assert [(c.request_id, c.first_token, c.num_tokens, c.num_reused_tokens)
            for c in step.context_chunks] == [("r0", 0, 12, 0)]  # of 17 + 1 tokens
    reqs = {c.request_id: sched.running[c.request_id] for c in step.context_chunks}
    sched.update(step, {rid: greedy([*r.prompt, *r.output]) for rid, r in reqs.items()})
    outputs, preempted = run(sched, queue_r3_at=None)
    assert outputs == truth
    assert all(p == () for p in preempted)


@pytest.mark.parametrize("reset_at", [1, 2, 3, 5, 7])
def test_outputs_are_the_same_whenever_the_reset_comes(reset_at: int) -> None:
    """Mirrors vllm test_reset_prefix_cache_e2e at several points of the run: whichever
    requests run, the outputs are those of the run without reset, and exactly the
    requests that were running are listed preempted, in the step after the reset only."""
    truth, _ = run_fresh(None)
    mgr = make_manager(num_gpu_blocks=24)
    outputs, preempted = run_fresh(reset_at, mgr)
    assert outputs == truth
    assert all(p == () for i, p in enumerate(preempted) if i != reset_at)
    assert preempted[reset_at] != () and mgr.num_sequences == 0


def test_without_reset_running_requests_a_live_request_refuses_the_reset() -> None:
    """Mirrors vllm test_prefix_caching.py::test_reset_prefix_cache through the scheduler
    (``reset_prefix_cache()`` returns False while blocks are in use, and leaves the cache
    as it was): with a request running, the plain reset changes nothing; once it finished,
    the reset drops its cached blocks."""
    mgr = make_manager(num_gpu_blocks=24)
    sched = make_scheduler(mgr)
    prompt = [*SYSTEM[:8], 1]  # one step's prefill
    sched.add_request(Request("a", prompt, max_output_tokens=2))
    step = sched.step()
    sched.update(step, {"a": 7})
    version = mgr.version
    assert not sched.reset_prefix_cache()
    assert (mgr.version, list(sched.running), hit(mgr, prompt)) == (version, ["a"], 8)
    step = sched.step()
    assert (step.decode_request_ids, step.preempted_request_ids) == (("a",), ())
    sched.update(step, {"a": 8})
    assert not sched.has_unfinished() and hit(mgr, prompt) == 8
    assert sched.reset_prefix_cache() and mgr.cached_blocks() == []


def test_a_reset_is_refused_between_step_and_update_and_for_foreign_requests() -> None:
    """The step's blocks are stored before its forward pass: a reset between ``step`` and
    ``update`` raises (apply the step first), and a request admitted to the manager
    directly, which the scheduler cannot preempt, makes the reset return False; neither
    changes anything."""
    mgr = make_manager(num_gpu_blocks=24)
    sched = make_scheduler(mgr)
    sched.add_request(Request("a", [*SYSTEM, 1], max_output_tokens=2))
    step = sched.step()
    with pytest.raises(RuntimeError, match="apply the step first"):
        sched.reset_prefix_cache(reset_running_requests=True)
    with pytest.raises(TypeError, match="reset_running_requests must be a bool"):
        sched.reset_prefix_cache(reset_running_requests=1)  # type: ignore[arg-type]
    sched.update(step, {"a": 7})
    assert mgr.add_sequence(SequenceSpec("direct", [5, 5, 5, 5, 5])).admitted
    version = mgr.version
    assert not sched.reset_prefix_cache(reset_running_requests=True)
    assert (mgr.version, list(sched.running), mgr.num_sequences) == (version, ["a"], 2)
    mgr.check_invariants()


def test_a_running_request_the_manager_already_dropped_is_requeued_by_the_reset() -> None:
    """A running request whose forward pass failed after its step was applied
    (``manager.compute_failed``: the manager no longer holds it) does not stop the reset:
    the other running request is preempted, both are requeued in admission order, and
    the next step lists both and starts the first over."""
    mgr = make_manager(num_gpu_blocks=24)
    sched = make_scheduler(mgr)
    add_requests(sched)
    for _ in range(2):
        greedy_step(sched)
    assert list(sched.running) == ["r0", "r1", "r2"]
    assert mgr.compute_failed(["r1"]) == ["r1"]
    assert sched.reset_prefix_cache(reset_running_requests=True)
    mgr.check_invariants()
    assert [r.request_id for r in sched.waiting] == ["r0", "r1", "r2"]
    assert (mgr.num_sequences, mgr.cached_blocks()) == (0, [])
    step = sched.step()
    assert step.preempted_request_ids == ("r0", "r1", "r2")
    assert [c.request_id for c in step.context_chunks] == ["r0"]
