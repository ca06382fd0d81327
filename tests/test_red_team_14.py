"""Red team, fourteenth pass: the library as an engine developer calls it (calls out of
order or twice, values of the right type and the wrong meaning, the remote tier's faults).
Each test fails on the code before its fix and asserts the exact refusal (or the exact
state after it) and that nothing else changed."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import rule, run_state_machine_as_test

from kvtier import (
    CacheConfig,
    KVCacheManager,
    OpKind,
    Request,
    ScheduledStep,
    Scheduler,
    SchedulerConfig,
    SequenceSpec,
    Tier,
    TransferPlan,
)
from test_red_team_13b import PROMPTS, TPB, NewCallsUnderScheduling

PROMPT = list(range(9))  # two full blocks and one token
ONBOARD_0 = 2


def onboarding_manager() -> tuple[KVCacheManager, TransferPlan]:
    """A manager whose request ``q`` has just been admitted onboarding its prompt's two
    blocks from the host, and the plan of those onboards (taken): its op ``ONBOARD_0``
    fills q's first block."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=4,
                                     num_host_blocks=4), clock=lambda: 0.0)
    mgr.add_sequence(SequenceSpec("a", PROMPT, priority=50))
    mgr.remove_sequence("a")
    mgr.add_sequence(SequenceSpec("big", list(range(200, 216))))  # pushes a's to the host
    mgr.remove_sequence("big")
    mgr.take_plan()
    assert mgr.lookup(PROMPT).num_host_tokens == 8
    assert mgr.add_sequence(SequenceSpec("q", PROMPT)).admitted
    plan = mgr.take_plan()
    # Two offloads make room, two onboards (ops 2, 3) fill q's blocks, one more offload.
    assert [op.kind for op in plan.ops][2:4] == [OpKind.ONBOARD, OpKind.ONBOARD]
    return mgr, plan


def snapshot(mgr: KVCacheManager) -> tuple[object, ...]:
    """Everything a refused call must leave as it was (checking the invariants too)."""
    mgr.check_invariants()
    live = [rid for rid in ("a", "b", "q", "r", "big") if mgr.has_sequence(rid)]
    return ([mgr.lookup(p) for p in (PROMPT, list(range(200, 216)), list(range(300, 306)))],
            dataclasses.asdict(mgr.stats), mgr.version, mgr.num_free_gpu_blocks,
            mgr.num_free_host_blocks, [(rid, mgr.block_table(rid)) for rid in live],
            mgr.cached_blocks(), mgr.take_plan().ops)


def refused_changing_nothing(mgr: KVCacheManager, plan: TransferPlan, message: str) -> None:
    before = snapshot(mgr)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        mgr.transfer_failed(plan, [ONBOARD_0])
    assert snapshot(mgr) == before


# ---- transfer_failed: only the latest plan this manager handed out, once -----------------


def test_a_plan_of_another_manager_is_refused() -> None:
    """``transfer_failed`` took any plan: another manager's failed onboard (same slot
    numbers, another pool) aborted this manager's ``q`` and dropped its cached prefix,
    which held good KV. Now refused, naming the plan, with nothing changed."""
    mgr, _ = onboarding_manager()
    _, foreign = onboarding_manager()
    refused_changing_nothing(
        mgr, foreign, "transfer_failed: plan was not handed out by this manager (its "
        "take_plan, end_step or a scheduler step over it): its slots name another pool's "
        "blocks")
    assert mgr.has_sequence("q") and mgr.lookup(PROMPT).num_gpu_tokens == 8


def test_a_plan_built_by_hand_or_copied_is_not_the_managers() -> None:
    """A plan rebuilt from the ops (a copy, an unpickled one) is no plan this manager
    handed out: refused as another manager's; an empty one changes nothing either way."""
    mgr, plan = onboarding_manager()
    message = ("transfer_failed: plan was not handed out by this manager (its take_plan, "
               "end_step or a scheduler step over it): its slots name another pool's blocks")
    refused_changing_nothing(mgr, TransferPlan(plan.ops), message)
    assert mgr.transfer_failed(TransferPlan(()), []) == []
    assert mgr.transfer_failed(plan, [ONBOARD_0]) == ["q"]  # the plan itself still is


def test_a_plan_older_than_the_latest_is_refused() -> None:
    """A failure reported for a plan after the next plan was taken: that plan may have read
    the garbage (here: nothing reads it, but the manager cannot know), so its damage was
    not followed. Now refused, naming both plans' numbers."""
    mgr, plan = onboarding_manager()
    mgr.remove_sequence("q")
    assert mgr.add_sequence(SequenceSpec("r", list(range(200, 216)))).admitted
    assert mgr.take_plan().ops  # big's blocks come back, q's go to the host
    refused_changing_nothing(
        mgr, plan, "transfer_failed: plan 2 is not the latest this manager handed out (3): "
        "report a plan's failed copies before taking the next (a later plan may have read "
        "what it failed to write)")


def test_an_empty_take_in_between_keeps_the_plan_reportable() -> None:
    """Taking an empty plan (a call that moved nothing) leaves the last plan the latest."""
    mgr, plan = onboarding_manager()
    assert mgr.take_plan().ops == ()
    assert mgr.transfer_failed(plan, [ONBOARD_0]) == ["q"]
    mgr.check_invariants()


def test_a_plan_reported_twice_is_refused_the_second_time() -> None:
    """The second report of one plan's failure dropped whatever the bad slots held by then
    (after the first report freed them): a request given one since was aborted for
    nothing. Now the second report is refused."""
    mgr, plan = onboarding_manager()
    assert mgr.transfer_failed(plan, [ONBOARD_0]) == ["q"]
    assert mgr.add_sequence(SequenceSpec("q", PROMPT)).admitted  # requeued: recomputes
    refused_changing_nothing(
        mgr, plan, "transfer_failed: plan 2 had its failed copies reported already")
    assert mgr.has_sequence("q")


def test_a_plan_taken_before_a_reset_is_refused() -> None:
    """A plan taken before ``reset_cache``: its slots hold other blocks since. Reporting it
    dropped a block cached after the reset. Now refused."""
    mgr, plan = onboarding_manager()
    mgr.remove_sequence("q")
    assert mgr.reset_cache()
    mgr.add_sequence(SequenceSpec("b", PROMPT))
    mgr.remove_sequence("b")
    assert mgr.take_plan().ops == ()
    refused_changing_nothing(
        mgr, plan, "transfer_failed: plan 2 was taken before reset_cache() dropped every "
        "block: its slots hold other blocks now")
    assert mgr.lookup(PROMPT).num_gpu_tokens == 8


# ---- calls out of order, at random, among everything the scheduler and manager do --------


class OutOfOrderCalls(NewCallsUnderScheduling):
    """``test_red_team_13b``'s machine (steps with failed copies and passes, aborts,
    resets, drops, imports, speculative decoding over a fake data plane that checks every
    KV position read), plus calls out of order: a failure reported for an older plan or
    another manager's, a second ``step`` before ``update``, an ``update`` of a step
    applied already, a finished request's id reused, a running one's added again, an
    abort of an id nobody knows. Each refused call changes nothing; the outputs stay a
    cacheless run's."""

    def __init__(self) -> None:
        super().__init__()
        self.plans: list[TransferPlan] = []
        self.last_applied: ScheduledStep | None = None
        other = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=2,
                                           num_host_blocks=2))
        other.add_sequence(SequenceSpec("x", [1, 2, 3, 4, 5]))
        other.remove_sequence("x")
        other.add_sequence(SequenceSpec("y", [6, 7, 8, 9, 5]))
        self.foreign = other.take_plan()  # x's block offloaded: [OFFLOAD GPU 0 -> host 0]
        assert len(self.foreign) == 1

    def state(self) -> tuple[object, ...]:
        mgr = self.mgr
        return (mgr.version, mgr.cached_blocks(), mgr.num_sequences, mgr.num_free_gpu_blocks,
                mgr.num_free_host_blocks, dataclasses.asdict(mgr.stats),
                {rid: mgr.block_table(rid) for rid in self.sched.running
                 if mgr.has_sequence(rid)},
                [r.request_id for r in self.sched.waiting], list(self.sched.running))

    def run_plan(self, step: ScheduledStep, skip: set[int]) -> None:
        if len(step.transfer_plan):
            self.plans.append(step.transfer_plan)
        super().run_plan(step, skip)

    def apply(self, step: ScheduledStep) -> None:
        super().apply(step)
        self.last_applied = step

    @rule(data=st.data(), foreign=st.booleans())
    def report_a_stale_plan(self, data: st.DataObject, foreign: bool) -> None:
        if not foreign and len(self.plans) < 2:
            return
        plan = self.foreign if foreign else data.draw(st.sampled_from(self.plans[:-1]))
        before = self.state()
        with pytest.raises(ValueError, match=r"^transfer_failed: plan "):
            self.mgr.transfer_failed(plan, [data.draw(st.integers(0, len(plan) - 1))])
        assert self.state() == before

    @rule()
    def step_twice_and_update_the_old(self) -> None:
        sched = self.sched
        step = sched.step()
        before = self.state()
        with pytest.raises(RuntimeError, match=r"step\(\) called before update\(\)"):
            sched.step()
        if self.last_applied is not None:
            with pytest.raises(RuntimeError, match=r"another step is"):
                sched.update(self.last_applied, {})
        assert self.state() == before
        self.guesses = {}
        work = self.work(step)
        self.run_plan(step, set())
        self.check_reads_and_write(work, set())
        self.apply(step)
        with pytest.raises(RuntimeError, match=r"no step is waiting"):
            sched.update(step, {})

    @rule(data=st.data(), prompt=PROMPTS, out=st.integers(1, 4))
    def reuse_an_id(self, data: st.DataObject, prompt: list[int], out: int) -> None:
        sched = self.sched
        if not self.requests:
            return
        rid = data.draw(st.sampled_from(sorted(self.requests)))
        busy = rid in sched.running or any(r.request_id == rid for r in sched.waiting)
        before = self.state()
        if busy:
            with pytest.raises(ValueError, match=f"request_id '{rid}' is already queued or "
                                                 f"running"):
                sched.add_request(Request(rid, prompt, out))
            assert self.state() == before
            return
        try:
            sched.add_request(Request(rid, prompt, out))
        except ValueError as e:
            assert "needs" in str(e), e  # too long for the pool
            return
        self.requests[rid] = sched.waiting[-1]
        self.finished.pop(rid, None)

    @rule()
    def abort_an_unknown_id(self) -> None:
        before = self.state()
        assert self.sched.abort("nobody") is None
        assert self.state() == before


def test_calls_out_of_order_are_refused_and_outputs_stay_exact() -> None:
    run_state_machine_as_test(OutOfOrderCalls, settings=settings(
        max_examples=40, stateful_step_count=25, deadline=None,
        suppress_health_check=list(HealthCheck)))


# ---- a block a failed copy left garbage is never spilled to a write-back remote tier -----


def test_a_host_block_a_failed_offload_left_garbage_is_not_spilled() -> None:
    """An offload to the host failed: the host block holds garbage and leaves the cache.
    It went to the spill log of a write-back remote tier like any evicted host block, so
    the tier (which drains the log before each plan runs, then again at the next step)
    wrote the garbage to the shared store under the block's hash, for every engine to
    fetch. Now a block dropped for a failure is never spilled; an evicted one still is."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=2, num_gpu_blocks=2, num_host_blocks=1),
                         clock=lambda: 0.0)
    mgr.record_spills()
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3]))
    mgr.remove_sequence("a")
    assert mgr.add_sequence(SequenceSpec("b", [5, 6, 7])).admitted  # [1 2] to host 0
    plan = mgr.take_plan()
    assert [(op.kind, op.dst_slot) for op in plan.ops] == [(OpKind.OFFLOAD, 0)]
    assert mgr.drain_spills() == []  # the engine's, before it submits the plan
    assert mgr.transfer_failed(plan, [0]) == []
    assert mgr.drain_spills() == []
    assert mgr.lookup([1, 2, 3]).num_tokens == 0 and mgr.num_free_host_blocks == 1
    mgr.check_invariants()
    # A good block offloaded to host 0, then evicted from there: spilled.
    mgr.remove_sequence("b")
    mgr.add_sequence(SequenceSpec("c", [1, 2, 3]))  # [5 6] to host 0
    mgr.remove_sequence("c")
    assert mgr.take_plan().ops and mgr.drain_spills() == []
    (hash56,) = [b.block_hash for b in mgr.cached_blocks() if b.tokens == (5, 6)]
    mgr.add_sequence(SequenceSpec("d", [8, 9, 3]))  # [1 2] to host 0: [5 6] evicted
    assert mgr.take_plan().ops
    assert mgr.drain_spills() == [(hash56, 0)]
    mgr.check_invariants()


def test_a_reset_spills_nothing_to_a_write_back_remote_tier() -> None:
    """``reset_cache`` (after a weight update: every cached KV stale) put every host block
    in the spill log, and so a write-back remote tier wrote that stale KV to the shared
    store at the next step (under the new weights' namespace, where the caller had given
    the tier one as the docs ask). Now a reset spills nothing, and drops with the blocks
    the spills not drained yet (KV of before it): here [4 5]'s host block and the pending
    spill of [1 2], pushed off the host by the last admission."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=2, num_gpu_blocks=2, num_host_blocks=2),
                         clock=lambda: 0.0)
    mgr.record_spills()
    for i, prompt in enumerate(([1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12])):
        mgr.add_sequence(SequenceSpec(f"r{i}", prompt))
        mgr.remove_sequence(f"r{i}")
        assert len(mgr.take_plan()) == (i > 0)  # each pushes the last block to the host
        if i < 3:
            assert mgr.drain_spills() == []  # the engine drains before each plan runs
    assert [(b.tokens, b.tier, b.slot) for b in mgr.cached_blocks()] == [
        ((4, 5), Tier.HOST, 1), ((7, 8), Tier.HOST, 0), ((10, 11), Tier.GPU, 0)]
    assert mgr.reset_cache()
    assert mgr.drain_spills() == []
    mgr.check_invariants()


def test_a_finished_request_queued_again_is_refused() -> None:
    """The same Request object queued again once finished (its output at its 2 tokens):
    accepted, prefilled again and given a third token, past its max_output_tokens. Now
    refused naming both counts; its id with a new Request is queued as any other."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=16))
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=32))
    req = Request("a", [1, 2, 3, 4, 5], 2)
    sched.add_request(req)
    sched.update(sched.step(), {"a": 7})
    assert [r.output for r in sched.update(sched.step(), {"a": 8})] == [[7, 8]]
    with pytest.raises(ValueError, match=r"^request 'a' already holds 2 output tokens, its "
                                         r"max_output_tokens is 2: nothing to generate"):
        sched.add_request(req)
    assert not sched.has_unfinished() and mgr.num_sequences == 0
    sched.add_request(Request("a", [1, 2, 3, 4, 5], 2, output=[7]))  # resumed: 1 to go
    step = sched.step()
    assert [(c.first_token, c.num_tokens) for c in step.context_chunks] == [(4, 2)]
    assert [r.output for r in sched.update(step, {"a": 8})] == [[7, 8]]
