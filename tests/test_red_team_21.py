"""Red team, twenty-first pass: the engine-facing core (manager, scheduler, plans, clock)
under calls an integrator makes out of the scheduler's own order, copies taken between a
step and its update, and readings of NumPy types at the boundary."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Collection, Iterator
from typing import Any

import numpy as np
import pytest

from kvtier import CacheConfig, KVCacheManager, SequenceSpec
from kvtier.scheduled_step import StepPhases
from kvtier.scheduler import Request, ScheduledStep, Scheduler, SchedulerConfig
from kvtier.transfer.plan import OpKind


def next_token(tokens: list[int]) -> int:
    """The model: a deterministic function of the tokens so far."""
    return (sum(t * (i + 3) for i, t in enumerate(tokens)) + len(tokens)) % 5 + 1


def sampled_for(sched: Scheduler, step: ScheduledStep) -> dict[str, int]:
    """What the model samples for every request of ``step`` that samples."""
    out = {}
    for chunk in step.context_chunks:
        req = sched.running[chunk.request_id]
        if chunk.first_token + chunk.num_tokens >= req.num_prefill_tokens:
            out[chunk.request_id] = next_token(req.tokens)
    for rid in step.decode_request_ids:
        out[rid] = next_token(sched.running[rid].tokens)
    return out


def drain(sched: Scheduler, max_steps: int = 100) -> dict[str, list[int]]:
    """Run ``sched`` until nothing is queued or running; the outputs of what finished."""
    done: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return done
        step = sched.step()
        for req in sched.update(step, sampled_for(sched, step)):
            done[req.request_id] = list(req.output)
        sched.check_invariants()
        sched.manager.check_invariants()
    raise AssertionError(f"unfinished after {max_steps} steps")


def cacheless(prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


# ---- a running request the manager dropped, met by a step whatever was admitted since ------


def two_decoding() -> tuple[KVCacheManager, Scheduler]:
    """'a' and 'b' past their prefills, decoding."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16))
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=32))
    sched.add_request(Request("a", [1, 2, 3, 4, 5], 4))
    sched.add_request(Request("b", [9, 2, 3, 4, 5], 4))
    step = sched.step()
    sched.update(step, sampled_for(sched, step))
    return mgr, sched


def test_a_request_dropped_between_steps_is_requeued_after_a_direct_admission() -> None:
    """``compute_failed`` between steps drops 'a' (allowed: the next step requeues it). The
    scheduler told a drop by the manager's live count: the engine's own request admitted
    directly after it left the count as it was, and every later step raised KeyError
    ("unknown request_id 'a'") decoding 'a', the scheduler stuck for good. Now a step
    requeues 'a', which recomputes, and both finish with a cacheless run's output."""
    mgr, sched = two_decoding()
    assert mgr.compute_failed(["a"]) == ["a"]
    assert mgr.add_sequence(SequenceSpec("side", [7, 7, 7])).admitted
    step = sched.step()
    assert step.decode_request_ids == ("b",)
    assert [(c.request_id, c.first_token, c.num_tokens) for c in step.context_chunks] == [
        ("a", 0, 5)]  # its prompt: what compute_failed dropped (the output token came
    # from the pass that failed, so it goes too, and is sampled again: red team 30c)
    sched.update(step, sampled_for(sched, step))
    assert drain(sched) == {"a": cacheless([1, 2, 3, 4, 5], 4),
                            "b": cacheless([9, 2, 3, 4, 5], 4)}
    mgr.remove_sequence("side")
    mgr.check_invariants()
    assert mgr.num_sequences == 0 and mgr.num_free_gpu_blocks == 16


def test_update_refuses_a_step_whose_request_was_removed_while_another_was_admitted() -> None:
    """Between step and update, a request of the step removed directly and another admitted:
    the update applied the step blind (the count unchanged), 'a' kept running though the
    manager no longer held it, and every later step raised KeyError decoding it. Now
    refused naming 'a', changing nothing; requeued, the step applies."""
    mgr, sched = two_decoding()
    step = sched.step()
    mgr.remove_sequence("a")
    assert mgr.add_sequence(SequenceSpec("side", [7, 7, 7])).admitted
    output = list(sched.running["a"].output)
    with pytest.raises(RuntimeError, match=r"no longer holds \['a'\]"):
        sched.update(step, sampled_for(sched, step))
    assert sched.running["a"].output == output
    step = sched.requeue_failed(step, ["a"])
    sched.update(step, sampled_for(sched, step))
    assert [r.request_id for r in sched.waiting] == ["a"]
    assert drain(sched) == {"a": cacheless([1, 2, 3, 4, 5], 4),
                            "b": cacheless([9, 2, 3, 4, 5], 4)}


def test_two_schedulers_over_one_manager_each_find_their_dropped_request() -> None:
    """Two schedulers sharing a manager: a request of the second dropped by compute_failed,
    then a step of the first admitting one of its own. The second's next step raised
    KeyError (the manager's count was back where the second last saw it); now it requeues
    its request and both run to the end."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=32))
    first = Scheduler(mgr, SchedulerConfig(max_num_tokens=32))
    second = Scheduler(mgr, SchedulerConfig(max_num_tokens=32))
    first.add_request(Request("f1", [1, 1, 1], 3))
    second.add_request(Request("s1", [2, 2, 2], 3))
    for sched in (first, second):
        step = sched.step()
        sched.update(step, sampled_for(sched, step))
    assert mgr.compute_failed(["s1"]) == ["s1"]
    first.add_request(Request("f2", [3, 3, 3], 3))
    step = first.step()
    first.update(step, sampled_for(first, step))
    assert mgr.num_sequences == 2  # f1, f2: as many as second last saw (f1, s1)
    step = second.step()
    assert [c.request_id for c in step.context_chunks] == ["s1"]
    second.update(step, sampled_for(second, step))
    assert drain(first) == {"f1": cacheless([1, 1, 1], 3), "f2": cacheless([3, 3, 3], 3)}
    assert drain(second) == {"s1": cacheless([2, 2, 2], 3)}
    assert mgr.num_sequences == 0


def test_num_removed_sequences_counts_every_way_out() -> None:
    """The manager's count of requests that left it: a removal and a fault's abort each add
    one; a refused call adds none."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8))
    assert mgr.num_removed_sequences == 0
    mgr.add_sequence_batch([SequenceSpec("a", [1, 2, 3]), SequenceSpec("b", [4, 5, 6])])
    mgr.remove_sequence("a")
    with pytest.raises(KeyError):
        mgr.remove_sequence("a")
    assert mgr.num_removed_sequences == 1
    assert mgr.compute_failed(["b"]) == ["b"]
    assert mgr.num_removed_sequences == 2 and mgr.num_sequences == 0


# ---- a scheduler or manager copied between a step and its update -------------------------


def onboarding_step() -> tuple[Scheduler, ScheduledStep]:
    """A step whose plan onboards 'c''s cached prefix from the host (and offloads to make
    room), not yet applied."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=4, num_host_blocks=8,
                                     eviction_policy="lru", offload_min_priority=0))
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=64))
    for rid, prompt in (("a", list(range(1, 10))), ("b", list(range(100, 115)))):
        sched.add_request(Request(rid, prompt, 1))
        step = sched.step()
        sched.update(step, sampled_for(sched, step))
    sched.add_request(Request("c", list(range(1, 10)) + [50], 2))
    step = sched.step()
    assert step.transfer_plan.op(0).kind is OpKind.ONBOARD
    assert step.context_chunks[0].num_reused_tokens == 8
    return sched, step


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_scheduler_copied_between_step_and_update_goes_on(how: str) -> None:
    """A copy of a scheduler taken between step and update refused every step ('step()
    called before update()') and every update (the step it waits for is its own copy,
    which nobody held): wedged for good. And the copied step's plan had lost its issuer,
    so its manager refused the plan's failure as no plan of its own. Now the copy's
    ``unapplied_step`` goes on: the failure of its onboard aborts 'c', which recomputes,
    and the original, untouched, finishes as it would have."""
    sched, step = onboarding_step()
    twin = copy.deepcopy(sched) if how == "deepcopy" else pickle.loads(pickle.dumps(sched))
    with pytest.raises(RuntimeError, match="another step is"):
        twin.update(step, {"c": 1})  # the original's step: not the copy's
    pending = twin.unapplied_step
    assert pending is not None and pending == step and pending is not step
    assert twin.manager.transfer_failed(pending.transfer_plan, [0]) == ["c"]
    prefix = list(range(1, 10))
    assert twin.manager.lookup(prefix).num_tokens == 0  # the bad block and what follows it
    assert sched.manager.lookup(prefix).num_tokens == 8  # the original's: as it was
    pending = twin.requeue_failed(pending, ["c"])
    assert twin.update(pending, sampled_for(twin, pending)) == []
    assert twin.unapplied_step is None
    assert drain(twin) == {"c": cacheless(list(range(1, 10)) + [50], 2)}
    # The original: its plan ran, its step applies.
    assert sched.unapplied_step is step
    sched.update(step, sampled_for(sched, step))
    assert drain(sched) == {"c": cacheless(list(range(1, 10)) + [50], 2)}


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_plan_copied_with_its_manager_is_the_copys_latest(how: str) -> None:
    """A manager and its latest plan copied together: the copy refused the copied plan
    ('not handed out by this manager'). Now it takes it; a plan copied alone is still no
    manager's, and the original still takes only its own."""
    sched, step = onboarding_step()
    mgr, plan = sched.manager, step.transfer_plan
    both = (mgr, plan)
    mgr2, plan2 = (copy.deepcopy(both) if how == "deepcopy"
                   else pickle.loads(pickle.dumps(both)))
    alone = copy.deepcopy(plan) if how == "deepcopy" else pickle.loads(pickle.dumps(plan))
    for manager, other in ((mgr2, plan), (mgr2, alone), (mgr, plan2), (mgr, alone)):
        with pytest.raises(ValueError, match="not handed out by this manager"):
            manager.transfer_failed(other, [0])
    assert mgr2.transfer_failed(plan2, [0]) == ["c"]
    mgr2.check_invariants()
    assert mgr.has_sequence("c") and not mgr2.has_sequence("c")


# ---- readings and values of NumPy types ----------------------------------------------------


class NumpyClock:
    """A simulated clock kept as a NumPy scalar (of ``dtype``)."""

    def __init__(self, dtype: Any) -> None:
        self.dtype = dtype
        self.now = dtype(0)

    def __call__(self) -> Any:
        return self.now


@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.float16])
def test_a_clock_reading_numpy_scalars_runs(dtype: Any) -> None:
    """A clock answering a NumPy float32 or int64 (not a float subclass, as float64 is) was
    a fault at every reading: the cache's time stood at 0.0 for good, so a retention never
    ran out (the prompt kept priority 90 an hour later). Now read as the number it is."""
    clock = NumpyClock(dtype)
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8), clock=clock)
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 5], priority=90, retention_s=10.0))
    clock.now = dtype(5)
    mgr.remove_sequence("a")
    assert [b.priority for b in mgr.cached_blocks()] == [90]
    clock.now = dtype(1000)
    assert [b.priority for b in mgr.cached_blocks()] == [35]  # expired: the default
    assert mgr.clock.num_faults == 0 and mgr.clock.last == 1000.0


def test_a_clock_reading_a_numpy_bool_or_nan_is_still_a_fault() -> None:
    """What is no number of seconds stays a fault, whatever its type."""
    readings: list[Any] = [np.bool_(True), np.float32("nan"), np.float64("inf")]
    for reading in readings:
        clock = NumpyClock(np.float32)
        clock.now = reading
        mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8), clock=clock)
        assert mgr.clock() == 0.0 and mgr.clock.num_faults == 1


def test_tokens_per_block_of_a_numpy_int_is_named_as_one() -> None:
    """CacheConfig(tokens_per_block=np.int64(4)) said 'got 4': a valid value, as read. A
    NumPy integer is an integer now (red team 33c, kvtier.counts), kept as a plain int; a
    NumPy float is named as one."""
    config = CacheConfig(tokens_per_block=np.int64(4))
    assert config.tokens_per_block == 4 and type(config.tokens_per_block) is int
    with pytest.raises(ValueError, match=r"power of two in 1\.\.65536, got np\.float64\(4\.0\)$"):
        CacheConfig(tokens_per_block=np.float64(4.0))
    with pytest.raises(ValueError, match=r"got 'x'$"):
        CacheConfig(tokens_per_block="x")  # type: ignore[arg-type]


# ---- a call back into the scheduler from the manager's clock or eviction policy -----------


class HookedClock:
    """A clock that runs ``hook`` (once) at its next reading: the caller's code, called
    from inside the manager's operations; what the hook raised is kept."""

    def __init__(self) -> None:
        self.now = 0.0
        self.hook: Any = None
        self.raised: list[Exception] = []

    def __call__(self) -> float:
        hook, self.hook = self.hook, None
        if hook is not None:
            try:
                hook()
            except Exception as exc:
                self.raised.append(exc)
                raise
        return self.now


def hooked_pair() -> tuple[HookedClock, KVCacheManager, Scheduler]:
    """'a' and 'b' decoding (4 tokens each), 'c' waiting, over a hooked clock."""
    clock = HookedClock()
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16), clock=clock)
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=32))
    sched.add_request(Request("a", [1, 2, 3, 4, 5], 2))
    sched.add_request(Request("b", [9, 2, 3, 4, 5], 4))
    step = sched.step()
    sched.update(step, sampled_for(sched, step))
    sched.add_request(Request("c", [5, 5, 5, 5, 5, 5], 2))
    return clock, mgr, sched


def test_an_abort_from_inside_a_step_is_refused() -> None:
    """The manager's clock (or eviction policy) aborting a running request in the middle of
    a step: the scheduler took 'a' out of ``running``, then the manager refused to release
    it (a call back into the manager): 'a' stayed live in the manager for ever, in neither
    queue, its blocks never freed. Now the scheduler refuses the call first, changing
    nothing, and every request finishes."""
    clock, mgr, sched = hooked_pair()
    clock.hook = lambda: sched.abort("a")
    step = sched.step()
    assert [str(e) for e in clock.raised] == [
        "Scheduler.abort() called from inside its own step() (from the manager's clock or "
        "eviction policy, or another thread): refused (the scheduler serves one call at a "
        "time; they must not call back into it)"]
    assert step.decode_request_ids == ("a", "b") and list(sched.running) == ["a", "b", "c"]
    done = {r.request_id: r.output for r in sched.update(step, sampled_for(sched, step))}
    assert done | drain(sched) == {"a": cacheless([1, 2, 3, 4, 5], 2),
                            "b": cacheless([9, 2, 3, 4, 5], 4),
                            "c": cacheless([5, 5, 5, 5, 5, 5], 2)}
    assert mgr.num_sequences == 0 and mgr.num_free_gpu_blocks == 16


def test_a_requeue_from_inside_an_update_is_refused() -> None:
    """The clock requeueing 'a' while ``update`` released it (finished): the requeue moved
    'a' to the queue, then the update raised KeyError taking it out of ``running``, the
    step half applied. Now refused; the update finishes 'a'."""
    clock, mgr, sched = hooked_pair()
    step = sched.step()
    clock.hook = lambda: sched.requeue_failed(step, ["a"])
    finished = sched.update(step, sampled_for(sched, step))
    assert [(r.request_id, r.output) for r in finished] == [
        ("a", cacheless([1, 2, 3, 4, 5], 2))]
    assert [type(e) for e in clock.raised] == [RuntimeError]
    assert "requeue_failed() called from inside its own update()" in str(clock.raised[0])
    sched.check_invariants()
    mgr.check_invariants()
    assert drain(sched)["b"] == cacheless([9, 2, 3, 4, 5], 4)
    assert mgr.num_sequences == 0


@pytest.mark.parametrize("call", ["step", "update", "add_request", "hold", "release",
                                  "reset_prefix_cache"])
def test_every_scheduler_call_from_inside_its_step_is_refused(call: str) -> None:
    """Whatever the callback calls back, it is refused, the step goes on as without it."""
    clock, mgr, sched = hooked_pair()
    step: ScheduledStep | None = None  # not returned yet when the update is called back
    calls = {"step": sched.step, "update": lambda: sched.update(step, {}),  # type: ignore[arg-type]
             "add_request": lambda: sched.add_request(Request("x", [3, 3], 2)),
             "hold": lambda: sched.hold("c"), "release": lambda: sched.release("c"),
             "reset_prefix_cache": lambda: sched.reset_prefix_cache(True)}
    clock.hook = calls[call]
    step = sched.step()
    assert [f"Scheduler.{call}() called from inside its own step()" in str(e)
            for e in clock.raised] == [True]
    assert step.decode_request_ids == ("a", "b")
    assert [c.request_id for c in step.context_chunks] == ["c"]
    assert not sched.waiting and list(sched.running) == ["a", "b", "c"]
    sched.update(step, sampled_for(sched, step))
    drain(sched)
    assert mgr.num_sequences == 0


# ---- a request queued again -----------------------------------------------------------------


def test_a_request_aborted_mid_prefill_and_queued_again_waits_with_no_progress() -> None:
    """The Request ``abort`` returns, queued again (an engine moving it): it waited with its
    last admission's progress (4 of 9 tokens computed), which the scheduler's own books
    refuse for a waiting request (check_invariants raised). Now queued with none; its
    admission reuses the block it computed and it finishes as a cacheless run."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16))
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=4))
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    req = Request("a", prompt, 3)
    sched.add_request(req)
    step = sched.step()
    sched.update(step, sampled_for(sched, step))
    assert (req.num_computed_tokens, req.num_prefill_tokens) == (4, 9)
    assert sched.abort("a") is req
    sched.add_request(req)
    assert (req.num_computed_tokens, req.num_prefill_tokens) == (0, 0)
    sched.check_invariants()
    step = sched.step()
    assert [(c.first_token, c.num_tokens, c.num_reused_tokens) for c in step.context_chunks] == [
        (4, 4, 4)]
    sched.update(step, sampled_for(sched, step))
    assert drain(sched) == {"a": cacheless(prompt, 3)}
    assert mgr.num_sequences == 0


# ---- the step timer's clock ------------------------------------------------------------------


class FailingTimer:
    """A timer clock counting seconds that raises (or answers None) at reading ``fail_at``."""

    def __init__(self, fault: str) -> None:
        self.n = 0
        self.fail_at = 0
        self.fault = fault

    def __call__(self) -> Any:
        self.n += 1
        if self.n == self.fail_at:
            if self.fault == "raise":
                raise OSError("clock_gettime failed")
            return None
        return float(self.n)


@pytest.mark.parametrize("fault", ["raise", "none"])
def test_a_step_timer_whose_clock_fails_never_fails_the_step(fault: str) -> None:
    """``Scheduler.phases`` (a StepPhases over the caller's clock) marks the phases in the
    middle of a step: a clock that raised there (or answered None) failed the step after
    its decodes were appended, and the next step appended each decode's token again (the
    manager held 1 2 3 4 5 7 7 for a request whose tokens were 1 2 3 4 5 7 8). Now the
    reading counts as the last good one, and the step goes on."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16))
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=32))
    timer = FailingTimer(fault)
    sched.phases = StepPhases(timer)
    prompt = [1, 2, 3, 4, 5]
    sched.add_request(Request("a", prompt, 4))
    step = sched.step()
    sched.update(step, sampled_for(sched, step))
    timer.fail_at = timer.n + 2  # the step's begin reads, then its decode mark fails
    step = sched.step()
    assert step.decode_request_ids == ("a",)
    assert sched.phases is not None and sched.phases.last["decode"] == 0.0
    sched.update(step, sampled_for(sched, step))
    assert drain(sched) == {"a": cacheless(prompt, 4)}
    # What the manager cached is the request's own tokens (the last one sampled, never
    # computed, aside), not a decode token twice.
    tokens = prompt + cacheless(prompt, 4)
    assert [b.tokens for b in mgr.cached_blocks()] == [tuple(tokens[:4]), tuple(tokens[4:8])]


def test_phases_takes_only_a_step_timer() -> None:
    """Another object there was called in the middle of every step; refused when set."""
    sched = Scheduler(KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16)))
    with pytest.raises(TypeError, match="phases must be a StepPhases or None, got object"):
        sched.phases = object()  # type: ignore[assignment]
    assert sched.phases is None
    with pytest.raises(TypeError, match="clock must be a callable"):
        StepPhases(None)  # type: ignore[arg-type]


# ---- a caller's collection of stopped requests ---------------------------------------------


class AskedStops(Collection[str]):
    """The engine's stop states, asked request by request: raises for an id it never saw."""

    def __init__(self, ids: list[str], fail: str = "contains") -> None:
        self.ids = ids
        self.fail = fail

    def __contains__(self, rid: object) -> bool:
        if self.fail == "contains" and rid not in self.ids:
            raise KeyError(f"no stop state for {rid!r}")
        return rid in self.ids

    def __iter__(self) -> Iterator[str]:
        if self.fail == "iter":
            raise OSError("the stop states are gone")
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def test_a_stopped_collection_is_read_once_before_anything_changes() -> None:
    """``update`` asked ``stopped`` request by request while applying the step: a caller's
    collection that raised for 'b' left 'a''s and 'b''s tokens appended and the step
    unapplied; the update taken again appended them twice (outputs [7, 7] for one
    sampled token). Now it is read whole first: asked nothing per request, applied once."""
    mgr, sched = two_decoding()
    step = sched.step()
    outputs = {rid: list(r.output) for rid, r in sched.running.items()}
    finished = sched.update(step, {"a": 7, "b": 7}, AskedStops(["a"]))
    assert [(r.request_id, r.output) for r in finished] == [("a", outputs["a"] + [7])]
    assert {rid: r.output for rid, r in sched.running.items()} == {"b": outputs["b"] + [7]}
    assert not mgr.has_sequence("a")


def test_a_stopped_collection_that_cannot_be_read_changes_nothing() -> None:
    """A collection whose reading raises, or that holds an unhashable item, is a
    TypeError naming ``stopped`` before anything changes (the first raised half way); the
    step then applies once."""
    _, sched = two_decoding()
    step = sched.step()
    outputs = {rid: list(r.output) for rid, r in sched.running.items()}
    for stopped in (AskedStops([], fail="iter"), [["a"]]):
        with pytest.raises(TypeError, match="stopped must be a collection of request ids: "
                                            "reading it raised"):
            sched.update(step, {"a": 7, "b": 7}, stopped)  # type: ignore[arg-type]
        assert {rid: r.output for rid, r in sched.running.items()} == outputs
    assert sched.update(step, {"a": 7, "b": 7}) == []
    assert {rid: r.output for rid, r in sched.running.items()} == {
        rid: out + [7] for rid, out in outputs.items()}
