"""Red team 21: test_red_team_13b's machine (every scheduler and manager call at random over
a fake data plane that checks every KV position a step reads) with what an engine does
around the scheduler's back: its own requests admitted and released directly in the
manager, running requests removed there between steps, a scheduler deep-copied or pickled
between a step and its update (the copy goes on with its ``unapplied_step``, its plan's
copies failing at random), and the manager's clock calling back into the scheduler in the
middle of a step or an update (refused, changing nothing). At the end every request has a
cacheless run's output and every block is free."""

from __future__ import annotations

import copy
import pickle

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, precondition, rule, run_state_machine_as_test

from kvtier import SequenceSpec
from kvtier.scheduler import Request
from kvtier.transfer.plan import TransferPlan
from test_red_team_13b import PROMPTS, TPB, NewCallsUnderScheduling, content
from test_red_team_21 import HookedClock


class Clock(HookedClock):
    """The manager's clock: runs ``hook`` (once) at its next reading, keeping what it
    raised. One instance for every manager and copy (``CLOCK``): a copy of a manager
    reads the same clock, so a hook armed after a copy reaches it."""

    def __reduce__(self) -> str:
        return "CLOCK"  # copied and pickled as the module's one clock


CLOCK = Clock()


class AroundTheScheduler(NewCallsUnderScheduling):
    """13b's machine with direct manager calls, copies mid-step and calls back."""

    @initialize(drafts=st.sampled_from([0, 0, 2]), gpu=st.integers(10, 16),
                host=st.sampled_from([0, 6]), evict=st.booleans(), chunked=st.booleans())
    def build(self, drafts: int, gpu: int, host: int, evict: bool, chunked: bool) -> None:
        CLOCK.now, CLOCK.hook, CLOCK.raised = 0.0, None, []
        self.make(drafts, gpu, host, evict, chunked, clock=CLOCK)
        self.sides: dict[str, tuple[list[int], int]] = {}  # the engine's own requests

    def run_ops(self, plan: TransferPlan) -> None:
        """Execute a plan taken outside a step on the data plane."""
        for op in plan.ops:
            self.run_op(op)

    # ---- the engine's own calls on the manager, between steps ----------------------------

    @rule(prompt=PROMPTS)
    def side_admission(self, prompt: list[int]) -> None:
        """A request of the engine's own, admitted directly and computed at once."""
        self.n += 1
        rid = f"side{self.n}"
        adm = self.mgr.add_sequence(SequenceSpec(rid, prompt))
        self.run_ops(self.mgr.take_plan())
        if not adm.admitted:
            return
        table = self.mgr.block_table(rid)
        for p in range(adm.num_reused_tokens):  # what it reuses holds its KV
            assert self.gpu[table[p // TPB]][p % TPB] == content((None, None), prompt, p)
        for p in range(adm.num_reused_tokens, len(prompt)):
            self.gpu[table[p // TPB]][p % TPB] = content((None, None), prompt, p)
        self.sides[rid] = (prompt, adm.num_reused_tokens)

    @precondition(lambda self: self.sides)
    @rule(data=st.data())
    def side_release(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.sides)))
        self.mgr.remove_sequence(rid)
        self.run_ops(self.mgr.take_plan())
        del self.sides[rid]

    @precondition(lambda self: self.sched.running)
    @rule(data=st.data())
    def remove_running_directly(self, data: st.DataObject) -> None:
        """A running request removed in the manager between steps: the next step requeues
        it (it recomputes what it had not stored), whatever was admitted since."""
        live = [rid for rid in self.sched.running if self.mgr.has_sequence(rid)]
        if live:
            self.mgr.remove_sequence(data.draw(st.sampled_from(live)))
            self.run_ops(self.mgr.take_plan())

    # ---- a copy between step and update ------------------------------------------------

    @rule(data=st.data(), how=st.sampled_from(["deepcopy", "pickle"]), fail=st.booleans())
    def step_on_a_copy(self, data: st.DataObject, how: str, fail: bool) -> None:
        """Step, copy the scheduler (and its manager) before the step's plan runs, go on
        with the copy: the original is dropped, as a restarted engine drops it."""
        step = self.sched.step()
        twin = (copy.deepcopy(self.sched) if how == "deepcopy"
                else pickle.loads(pickle.dumps(self.sched)))
        assert twin.unapplied_step == step
        self.sched, self.mgr = twin, twin.manager
        step = twin.unapplied_step
        assert step is not None
        self.guesses = {}
        work = self.work(step)
        n = len(step.transfer_plan)
        if fail and n:
            bad = set(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n)))
            self.run_plan(step, bad)
            gone = self.mgr.transfer_failed(step.transfer_plan, sorted(bad))
            step = twin.requeue_failed(step, gone)
            for rid in gone:
                work.pop(rid, None)
        else:
            self.run_plan(step, set())
        self.check_reads_and_write(work, set())
        self.apply(step)

    # ---- the clock calling back into the scheduler ---------------------------------------

    @rule(data=st.data(), call=st.sampled_from(
        ["step", "update", "abort", "add_request", "hold", "release", "reset_prefix_cache"]))
    def call_back_in_a_step(self, data: st.DataObject, call: str) -> None:
        """A step whose clock calls back into the scheduler: refused, nothing changed (the
        step's reads and the outputs at the end check it)."""
        sched = self.sched
        rid = data.draw(st.sampled_from(sorted(sched.running) or ["none"]))
        calls = {"step": sched.step, "update": lambda: sched.update(None, {}),  # type: ignore[arg-type]
                 "abort": lambda: sched.abort(rid),
                 "add_request": lambda: sched.add_request(Request("late", [1, 2], 1)),
                 "hold": lambda: sched.hold(rid), "release": lambda: sched.release(rid),
                 "reset_prefix_cache": lambda: sched.reset_prefix_cache(True)}
        CLOCK.raised = []
        CLOCK.hook = calls[call]
        step = sched.step()
        called = CLOCK.hook is None  # the clock was read in the step
        CLOCK.hook = None
        if called:
            assert [str(e) for e in CLOCK.raised] == [
                f"Scheduler.{call}() called from inside its own step() (from the manager's "
                "clock or eviction policy, or another thread): refused (the scheduler serves "
                "one call at a time; they must not call back into it)"]
        assert "late" not in sched._specs
        self.guesses = {}
        work = self.work(step)
        self.run_plan(step, set())
        self.check_reads_and_write(work, set())
        self.apply(step)

    @rule(running=st.booleans())
    def reset(self, running: bool) -> None:
        """13b's reset; refused (False, nothing changed) while the engine's own requests
        are live in the manager."""
        if not self.sides:
            super().reset(running)
            return
        blocks = self.mgr.cached_blocks()
        assert self.sched.reset_prefix_cache(running) is False
        assert self.mgr.cached_blocks() == blocks

    def teardown(self) -> None:
        if not hasattr(self, "mgr") or self.sched._unapplied is not None:
            return  # a rule failed part way
        for rid in list(self.sides):
            self.mgr.remove_sequence(rid)
            self.run_ops(self.mgr.take_plan())
        self.sides.clear()
        super().teardown()


def test_calls_around_the_scheduler_keep_outputs_and_blocks_exact() -> None:
    run_state_machine_as_test(AroundTheScheduler, settings=settings(
        max_examples=100, stateful_step_count=30, deadline=None,
        suppress_health_check=list(HealthCheck)))
