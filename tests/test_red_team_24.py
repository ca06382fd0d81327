"""Red team 24a: the core's counters and the scheduler around ``SequenceSpec.resumed``.

Each prompt is one query, counted at its first admission in every tier's books alike: a
request admitted by a step that failed part way, and left waiting, is not counted again
when admitted next; a prefix found on the host by two requests of one batch is a host hit
for both in the tokens as in the blocks."""

from __future__ import annotations

import os
import pickle
import re
from typing import Any

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from kvtier import CacheConfig, KVCacheManager, Request, Scheduler, SchedulerConfig, SequenceSpec
from kvtier.config import EVICTION_POLICIES

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8, 9]  # 2 full blocks of 4 and a last token
FILLER = list(range(20, 36))  # 4 full blocks


def make_manager(num_gpu_blocks: int = 8, num_host_blocks: int = 0,
                 **options: Any) -> KVCacheManager:
    return KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=num_gpu_blocks,
                                      num_host_blocks=num_host_blocks,
                                      eviction_policy="priority-lru", **options))


class Injected(Exception):
    """The fault the tests inject."""


def test_a_request_a_failed_step_admitted_and_left_waiting_is_one_query() -> None:
    """The manager admits a (counted: 9 prompt tokens, a query), then the step raises (a
    fault after add_sequence_batch, before the scheduler started it): the step fails
    whole, a leaves the manager and stays waiting. Its next admission is a recompute, not
    a second query: the queries' prompt tokens stay 9 (they read 18)."""
    mgr = make_manager()
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=64))
    real = mgr.add_sequence_batch
    calls: list[int] = []

    def faulty(specs: Any) -> Any:
        result = real(specs)
        calls.append(1)
        if len(calls) == 1:
            raise Injected("after add_sequence_batch")
        return result

    mgr.add_sequence_batch = faulty  # type: ignore[method-assign]
    sched.add_request(Request("a", PROMPT, 1))
    try:
        sched.step()
    except Injected:
        pass
    else:  # pragma: no cover
        raise AssertionError("the step did not raise")
    assert [r.request_id for r in sched.waiting] == ["a"] and not mgr.has_sequence("a")
    assert (mgr.stats.num_admitted, mgr.stats.num_prompt_tokens) == (1, 9)
    step = sched.step()
    sched.update(step, {"a": 0})
    assert not sched.has_unfinished()
    s = mgr.stats
    assert (s.num_admitted, s.num_prompt_tokens, s.num_resumed,
            s.num_resumed_prompt_tokens) == (2, 9, 1, 9)
    assert s.gpu.missed_blocks == 2  # the query's 2 full blocks, once
    sched.check_invariants()
    mgr.check_invariants()



def test_a_request_a_failed_step_admitted_onto_an_imported_block_is_one_query() -> None:
    """As above, but a's admission onboards a host block (imported): the failed step
    reports its copies failed first, which aborts a in the manager, and a was missed when
    the step's admitted requests were marked to recompute: its next admission was counted
    as a second query (10 prompt tokens for one prompt of 5)."""
    mgr = make_manager(num_gpu_blocks=6, num_host_blocks=2, enable_partial_reuse=False)
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=6, enable_chunked_prefill=False))
    sched.add_request(Request("a", [0, 1, 2, 3, 4], 1))
    assert mgr.import_blocks([0, 1, 2, 3, 4], 1) == [0]
    real = mgr.add_sequence_batch

    def faulty(specs: Any) -> Any:
        real(specs)
        raise Injected("after add_sequence_batch")

    mgr.add_sequence_batch = faulty  # type: ignore[method-assign]
    with pytest.raises(Injected):
        sched.step()
    del mgr.add_sequence_batch
    # Its 4 host tokens never onboarded: taken back, lost (red team 29b).
    assert (mgr.stats.num_prompt_tokens, mgr.stats.num_host_reused_tokens,
            mgr.stats.num_lost_reused_tokens) == (5, 0, 4)
    step = sched.step()
    sched.update(step, {"a": 0})
    assert not sched.has_unfinished()
    s = mgr.stats
    assert (s.num_admitted, s.num_prompt_tokens, s.num_reused_tokens, s.num_resumed,
            s.num_resumed_prompt_tokens) == (2, 5, 0, 1, 5)
    mgr.check_invariants()

def test_a_host_prefix_two_requests_of_a_batch_find_is_a_host_hit_for_both() -> None:
    """a's 2 blocks are pushed to the host by x. b and c (one batch) both find them there:
    b's admission onboards them and c shares b's copies. The host's reused blocks count 2
    for each (4), and the host hit tokens must say the same, 16: they said 8, and the
    replay's GPU hit tokens (reused less host) read 8 where the GPU's reused blocks are 0."""
    mgr = make_manager(num_gpu_blocks=4, num_host_blocks=8, enable_partial_reuse=False)
    for rid, prompt in (("a", PROMPT), ("x", FILLER)):
        mgr.add_sequence(SequenceSpec(rid, prompt))
        mgr.remove_sequence(rid)
    assert tuple(mgr.lookup(PROMPT)) == (8, 0, 8, 0)
    b, c = mgr.add_sequence_batch([SequenceSpec("b", PROMPT),
                                   SequenceSpec("c", PROMPT[:8] + [77])])
    assert (b.num_reused_tokens, b.num_onboarded_tokens) == (8, 8)
    assert (c.num_reused_tokens, c.num_onboarded_tokens) == (8, 0)
    s = mgr.stats
    assert (s.gpu.reused_blocks, s.host.reused_blocks) == (0, 4)
    assert (s.num_reused_tokens, s.num_host_reused_tokens) == (16, 16)
    mgr.check_invariants()



@pytest.mark.parametrize("ids", [[b"b"], [1], [["b"]], ["b", None]])
def test_requeue_failed_refuses_an_id_that_is_no_str_naming_it(ids: list[object]) -> None:
    """b's onboard fails and the manager aborts it; requeue_failed given an id that is no
    str (b's bytes, an int: ignored without a word; a list: a bare "unhashable type") is
    refused naming its index and value, changing nothing: b still runs, the step waits."""
    mgr = make_manager(num_gpu_blocks=4, num_host_blocks=8)
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=64))
    for rid, prompt in (("a", PROMPT), ("x", FILLER[:12])):
        sched.add_request(Request(rid, prompt, 1))
        step = sched.step()
        sched.update(step, {rid: 0})
    sched.add_request(Request("b", PROMPT, 2))
    step = sched.step()
    assert mgr.transfer_failed(step.transfer_plan, range(len(step.transfer_plan))) == ["b"]
    index = len(ids) - 1
    with pytest.raises(TypeError, match=rf"^request_ids\[{index}\] must be a str \(a request "
                       rf"id\), got {re.escape(repr(ids[index]))}$"):
        sched.requeue_failed(step, ids)  # type: ignore[arg-type]
    assert list(sched.running) == ["b"] and not sched.waiting
    assert sched.unapplied_step is step
    sched.update(sched.requeue_failed(step, [np.str_("b")]), {})  # a str, as ever
    assert [r.request_id for r in sched.waiting] == ["b"]
    sched.check_invariants()



@pytest.mark.parametrize("stopped", [{b"a"}, [1], ("b", None)])
def test_update_refuses_a_stopped_id_that_is_no_str_naming_it(stopped: Any) -> None:
    """a samples its stop token, the caller names it in ``stopped`` by its bytes: the
    update took it, stopped nothing and a went on generating past its stop. Now refused
    naming the value, the step still waiting for its update."""
    mgr = make_manager()
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=64))
    sched.add_request(Request("a", PROMPT, 3))
    step = sched.step()
    with pytest.raises(TypeError, match=r"^stopped must be a collection of request ids "
                       r"\(str\), got (b'a'|1|None) in it$"):
        sched.update(step, {"a": 0}, stopped)
    assert sched.unapplied_step is step and sched.running["a"].output == []
    assert sched.update(step, {"a": 0}, {np.str_("a")})[0].output == [0]  # a str, as ever
    sched.check_invariants()
    mgr.check_invariants()


# ---- a machine: every prompt one query, whatever the scheduler does to it -----------------

class QueryBooks(RuleBasedStateMachine):
    """Scheduler + manager under admissions, chunked prefill, drafts, preemption, failed
    copies and passes, aborts, requests queued again and resets. A reference counts each
    admission from the steps (a first chunk): the first after ``add_request`` is the
    request's query, every later one a recompute; one a failed copy or pass (or a step
    failed whole) aborts in its own step obtained none of its reuse, which is taken back
    and counted lost (red team 29b). The manager's counters must say the same after
    every operation, and its tiers' blocks agree with its tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.mgr: KVCacheManager | None = None
        self.sched: Scheduler | None = None
        self.requests: dict[str, Request] = {}  # every request made, by id
        self.fresh: set[str] = set()  # queued and not admitted since
        self.num_query = self.num_resumed = self.num_resumed_tokens = self.num_reused = 0
        self.num_admitted = 0
        self.num_lost = 0
        # This step's admissions: request id -> (a query's?, its reuse).
        self.admitted_now: dict[str, tuple[bool, int]] = {}

    @initialize(num_gpu=st.integers(6, 12), num_host=st.sampled_from([0, 2, 8]),
                partial=st.booleans(), copy_partial=st.booleans(),
                policy=st.sampled_from(EVICTION_POLICIES),
                budget=st.integers(6, 40), chunked=st.booleans(),
                capacity=st.sampled_from(["guaranteed_no_evict", "max_utilization"]),
                drafts=st.sampled_from([0, 2]))
    def setup(self, num_gpu: int, num_host: int, partial: bool, copy_partial: bool,
              policy: str, budget: int, chunked: bool, capacity: Any, drafts: int) -> None:
        self.mgr = KVCacheManager(CacheConfig(
            tokens_per_block=4, num_gpu_blocks=num_gpu, num_host_blocks=num_host,
            enable_partial_reuse=partial, copy_on_partial_reuse=copy_partial,
            eviction_policy=policy))
        self.sched = Scheduler(self.mgr, SchedulerConfig(
            max_num_tokens=budget, enable_chunked_prefill=chunked, capacity_policy=capacity,
            num_speculative_tokens=drafts))

    @rule(n=st.integers(0, 7), prefix=st.integers(0, 2), length=st.integers(1, 14),
          max_output=st.integers(1, 5), salt=st.sampled_from([None, None, "t"]),
          lora_id=st.sampled_from([None, None, 1]),
          priority=st.sampled_from([None, None, 10, 90]),
          skip=st.sampled_from([False] * 5 + [True]))
    def add(self, n: int, prefix: int, length: int, max_output: int, salt: str | None,
            lora_id: int | None, priority: int | None, skip: bool) -> None:
        assert self.sched is not None
        rid = f"r{n}"
        req = self.requests.get(rid)
        if req is not None and req.held:
            return  # queued or running
        if req is None or len(req.output) >= req.max_output_tokens:
            req = Request(rid, [prefix * 100 + i for i in range(length)], max_output,
                          salt=salt, lora_id=lora_id, priority=priority,
                          skip_reading_prefix_cache=skip)
        # else: aborted part way, queued again (a new query of its prompt and output)
        try:
            self.sched.add_request(req)
        except ValueError:
            return  # too large, or finished already
        self.requests[rid] = req
        self.fresh.add(rid)

    @rule(n=st.integers(0, 7))
    def abort(self, n: int) -> None:
        assert self.sched is not None
        if self.sched.abort(f"r{n}") is not None:
            self.fresh.discard(f"r{n}")

    @rule(n=st.integers(0, 7), hold=st.booleans())
    def hold(self, n: int, hold: bool) -> None:
        assert self.sched is not None
        if hold:
            self.sched.hold(f"r{n}")
        else:
            self.sched.release(f"r{n}")

    @rule(salt=st.sampled_from([None, "t"]), lora_id=st.sampled_from([None, 1]))
    def drop_key_space(self, salt: str | None, lora_id: int | None) -> None:
        assert self.mgr is not None
        self.mgr.drop_key_space(salt=salt, lora_id=lora_id)

    @rule(prefix=st.integers(0, 2), length=st.integers(4, 14), num_blocks=st.integers(1, 3))
    def import_blocks(self, prefix: int, length: int, num_blocks: int) -> None:
        assert self.mgr is not None
        if self.mgr.config.num_host_blocks:
            self.mgr.import_blocks([prefix * 100 + i for i in range(length)], num_blocks)

    @precondition(lambda self: self.num_admitted % 4 == 3)
    @rule()
    def reset(self) -> None:
        assert self.sched is not None
        self.sched.reset_prefix_cache(reset_running_requests=True)

    @rule(num_steps=st.integers(1, 10), data=st.data())
    def run(self, num_steps: int, data: st.DataObject) -> None:
        for _ in range(num_steps):
            self.step(data.draw(st.integers(0, 9)) == 0, data.draw(st.integers(0, 9)) == 0,
                      data)

    def step(self, fail_copy: bool, fail_pass: bool, data: st.DataObject) -> None:
        sched, mgr = self.sched, self.mgr
        assert sched is not None and mgr is not None
        if not sched.has_unfinished():
            return
        # Admissions are counted where the manager makes them; with ``fault`` the step
        # raises right after one (a fault the scheduler fails the step for, whole).
        fault = data.draw(st.integers(0, 9)) == 0
        real = mgr.add_sequence_batch

        def counted(specs: Any) -> Any:
            specs = list(specs)
            admissions = real(specs)
            for spec, adm in zip(specs, admissions, strict=True):
                if adm.admitted:
                    self.count_admission(spec, adm.num_reused_tokens)
            if fault and any(adm.admitted for adm in admissions):
                raise Injected("after add_sequence_batch")
            return admissions

        mgr.add_sequence_batch = counted  # type: ignore[method-assign]
        self.admitted_now = {}
        try:
            step = sched.step()
        except Injected:
            self.take_back(list(self.admitted_now))  # none of its work ran
            return  # failed whole: its requests recompute
        finally:
            del mgr.add_sequence_batch
        if data.draw(st.integers(0, 9)) == 0:  # the pair copied between step and update
            sched = self.sched = pickle.loads(pickle.dumps(sched))
            mgr = self.mgr = sched.manager
            for req in (*sched.waiting, *sched.running.values()):
                self.requests[req.request_id] = req
            assert sched.unapplied_step is not None
            step = sched.unapplied_step
        plan = step.transfer_plan
        if fail_copy and len(plan):
            failed = data.draw(st.lists(st.integers(0, len(plan) - 1), min_size=1))
            aborted = mgr.transfer_failed(plan, failed)
            self.take_back(aborted)
            step = sched.requeue_failed(step, aborted)
        ids = [c.request_id for c in step.context_chunks] + list(step.decode_request_ids)
        if fail_pass and ids:
            gone = mgr.compute_failed(data.draw(st.lists(st.sampled_from(ids), min_size=1,
                                                         unique=True)))
            self.take_back(gone)
            step = sched.requeue_failed(step, gone)
        sampled = {rid: 7 for rid in [c.request_id for c in step.context_chunks]
                   + list(step.decode_request_ids)}
        if data.draw(st.integers(0, 9)):
            sched.update(step, sampled)
            return
        # The update fails where it first releases a request (once: the release that
        # recovers from it goes through): its step's requests recompute.
        release = mgr.remove_sequence
        faults: list[int] = []

        def faulty(*args: Any, **kwargs: Any) -> Any:
            if not faults:
                faults.append(1)
                raise Injected("remove_sequence")
            return release(*args, **kwargs)

        mgr.remove_sequence = faulty  # type: ignore[method-assign]
        try:
            sched.update(step, sampled)
        except Injected:
            pass
        finally:
            del mgr.remove_sequence
        assert mgr.remove_sequence == release

    def count_admission(self, spec: SequenceSpec, num_reused: int) -> None:
        """The reference: the first admission since ``add_request`` is the query."""
        rid = spec.request_id
        self.num_admitted += 1
        if self.requests[rid].skip_reading_prefix_cache:  # no query, no recompute
            self.fresh.discard(rid)
        elif rid in self.fresh:
            self.fresh.discard(rid)
            self.num_query += len(spec.token_array)
            self.num_reused += num_reused
            self.admitted_now[rid] = (True, num_reused)
        else:
            self.num_resumed += len(spec.token_array)
            self.num_resumed_tokens += num_reused
            self.admitted_now[rid] = (False, num_reused)

    def take_back(self, aborted: list[str]) -> None:
        """The reference: the requests of ``aborted`` admitted in this step never ran."""
        for rid in aborted:
            query, num_reused = self.admitted_now.pop(rid, (True, 0))
            if query:
                self.num_reused -= num_reused
            else:
                self.num_resumed_tokens -= num_reused
            self.num_lost += num_reused

    @invariant()
    def books_agree(self) -> None:
        mgr, sched = self.mgr, self.sched
        if mgr is None or sched is None:
            return
        sched.check_invariants()
        mgr.check_invariants()
        s = mgr.stats
        assert s.num_admitted == self.num_admitted
        assert (s.num_prompt_tokens, s.num_reused_tokens) == (self.num_query, self.num_reused)
        assert (s.num_resumed_prompt_tokens, s.num_resumed_reused_tokens,
                s.num_lost_reused_tokens) == (self.num_resumed, self.num_resumed_tokens,
                                              self.num_lost)
        tpb = mgr.config.tokens_per_block
        full = (s.gpu.reused_blocks + s.host.reused_blocks) * tpb
        assert full + s.num_partial_tokens == s.num_reused_tokens
        assert s.host.reused_blocks * tpb <= s.num_host_reused_tokens
        assert s.num_host_reused_tokens <= s.host.reused_blocks * tpb + s.num_partial_tokens


QueryBooks.TestCase.settings = settings(max_examples=int(os.environ.get("RT24_EXAMPLES", "150")),
                                        stateful_step_count=50, deadline=None)
test_every_prompt_is_one_query_and_the_tiers_agree = QueryBooks.TestCase
