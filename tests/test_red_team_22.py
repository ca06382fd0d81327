"""Red team 22: the scheduler's step and update when anything inside them raises part way
(the caller's step timer, clock or policy, the manager, a fault after a manager call), and
the room a max-utilization preemption frees.

The engine of these tests runs every plan against the "physical memory" of
``test_faults`` and writes what each forward pass computes there, so a block served from
the cache is checked to hold its own prefix, and a step or update that raised is checked to
have left nothing half done: every request finishes with the output the model gives, once.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier import CacheConfig, KVCacheManager, SequenceSpec, Tier
from kvtier.hashing import get_hash_fn, prompt_block_hashes
from kvtier.scheduled_step import StepPhases
from kvtier.scheduler import Request, ScheduledStep, Scheduler, SchedulerConfig
from kvtier.sequence import TokenIds, short_repr
from kvtier.sim.probe import make_scheduler
from test_faults import Memory, check_cache_contents


class Injected(Exception):
    """The fault the tests inject."""


def next_token(tokens: list[int]) -> int:
    """The model: a deterministic function of the tokens so far (5 stops a request)."""
    return (sum(t * (i + 3) for i, t in enumerate(tokens)) + len(tokens)) % 5 + 1


def expected_output(prompt: list[int], max_output_tokens: int) -> list[int]:
    """What the model generates for ``prompt``, whatever the scheduling."""
    out: list[int] = []
    while len(out) < max_output_tokens:
        out.append(next_token(prompt + out))
        if out[-1] == 5:
            break
    return out


class Faults:
    """Counts the calls of every hook; the ``k``-th raises ``Injected`` (once)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.num_calls = 0
        self.fired: str | None = None

    def tick(self, where: str) -> None:
        self.num_calls += 1
        if self.num_calls == self.k:
            self.fired = where
            raise Injected(where)


class FaultyPhases(StepPhases):
    """A step timer whose every call is a hook."""

    def __init__(self, faults: Faults) -> None:
        super().__init__(lambda: 0.0)
        self.faults = faults

    def begin(self) -> None:
        self.faults.tick("phases.begin")
        super().begin()

    def resume(self) -> None:
        self.faults.tick("phases.resume")
        super().resume()

    def mark(self, phase: str) -> None:
        self.faults.tick(f"phases.mark({phase})")
        super().mark(phase)


class FaultyPolicy:
    """A caller's eviction policy (least recently released first, soft claims ranked
    higher) whose every call is a hook."""

    name = "faulty-lru"
    ranks_soft_claims = True
    num_queue_fields = 0

    def __init__(self, faults: Faults) -> None:
        self.faults = faults

    def key(self, node: Any, now: float, default_priority: int) -> tuple[float, ...]:
        self.faults.tick("policy.key")
        return (float(node.priority), float(node.soft_claimed), float(node.last_used))

    def rank(self, node: Any, now: float, default_priority: int) -> tuple[float, ...]:
        self.faults.tick("policy.rank")
        return self.key(node, now, default_priority)


# The manager's calls a scheduler makes in a step or update, each hooked before and after.
# NOTE: take_plan is hooked before only: a fault after it took the copies (before the
# step holds them) is the one window the scheduler cannot report them from.
HOOKED = ("begin_step", "end_step", "append_token_columns", "append_tokens",
          "reserve_lookahead", "schedule_prefill", "add_sequence_batch", "add_sequence",
          "remove_sequence",
          "hint_waiting", "lookup_spec")


def hook_manager(mgr: KVCacheManager, faults: Faults) -> None:
    """Patch the manager's methods (on the instance) to pass through ``faults``."""
    for name in (*HOOKED, "take_plan"):
        method = getattr(mgr, name)

        def hooked(*args: Any, _m: Callable[..., Any] = method, _n: str = name,
                   **kwargs: Any) -> Any:
            faults.tick(f"{_n} (before)")
            out = _m(*args, **kwargs)
            if _n != "take_plan":
                faults.tick(f"{_n} (after)")
            return out

        setattr(mgr, name, hooked)


class Engine:
    """Runs a scheduler's steps: each plan against the memory model, each forward pass
    writing what it computes, the model's tokens sampled."""

    def __init__(self, sched: Scheduler, tpb: int) -> None:
        self.sched, self.mgr, self.tpb = sched, sched.manager, tpb
        self.mem = Memory()

    def write(self, rid: str, tokens: list[int], first: int, end: int) -> None:
        """The pass of ``rid`` computes positions ``first..end-1`` of ``tokens``."""
        table, tpb = self.mgr.block_table(rid), self.tpb
        for b in range(first // tpb, (end - 1) // tpb + 1):
            self.mem.slots[(Tier.GPU, table[b])] = (None, tuple(tokens[:min((b + 1) * tpb, end)]))

    def run(self, step: ScheduledStep) -> tuple[dict[str, Any], set[str]]:
        """Execute ``step``: its plan, its reuse checked, its passes; what it samples."""
        assert not self.mem.apply(step.transfer_plan, set(), self.tpb)
        sched, tpb = self.sched, self.tpb
        sampled: dict[str, Any] = {}
        for chunk in step.context_chunks:
            req = sched.running[chunk.request_id]
            tokens = req.tokens
            table = self.mgr.block_table(chunk.request_id)
            for b in range(chunk.num_reused_tokens // tpb):  # what it reuses is its own
                assert self.mem.slots.get((Tier.GPU, table[b])) == (None, tuple(
                    tokens[:(b + 1) * tpb])), (chunk, b)
            end = chunk.first_token + chunk.num_tokens
            self.write(chunk.request_id, tokens, chunk.first_token, end)
            if end >= req.num_prefill_tokens:
                sampled[chunk.request_id] = next_token(tokens)
        drafts = step.num_draft_tokens or (0,) * len(step.decode_request_ids)
        for rid, num_drafts in zip(step.decode_request_ids, drafts, strict=True):
            req = sched.running[rid]
            tokens = list(req.tokens)
            # A perfect drafter: every draft is accepted, up to the request's end.
            new = [next_token(tokens)]
            for _ in range(num_drafts):
                if new[-1] == 5 or len(req.output) + len(new) >= req.max_output_tokens:
                    break
                new.append(next_token(tokens + new))
            self.write(rid, tokens + new[:-1], len(tokens) - 1, len(tokens) + len(new) - 1)
            sampled[rid] = new if step.num_draft_tokens else new[0]
        stopped = {rid for rid, value in sampled.items()
                   if 5 in (value if isinstance(value, list) else [value])}
        for rid, value in sampled.items():  # the tokens after a stop are not sampled
            if isinstance(value, list) and 5 in value:
                sampled[rid] = value[:value.index(5) + 1]
        return sampled, stopped


def check(sched: Scheduler, engine: Engine) -> None:
    sched.check_invariants()
    sched.manager.check_invariants()
    check_cache_contents(sched.manager, engine.mem, engine.tpb)


def drive(sched: Scheduler, engine: Engine, faults: Faults | None,
          max_steps: int = 400) -> dict[str, list[int]]:
    """Step ``sched`` to the end; a step or update that raised ``Injected`` is checked and
    the run goes on (an update that changed nothing is taken again). The finished outputs,
    each request's once."""
    done: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        try:
            step = sched.step()
        except Injected:
            assert sched.unapplied_step is None
            check(sched, engine)
            continue
        sampled, stopped = engine.run(step)
        try:
            finished = sched.update(step, sampled, stopped)
        except Injected:
            check(sched, engine)
            if sched.unapplied_step is None:
                continue
            finished = sched.update(step, sampled, stopped)  # it changed nothing
        for req in finished:
            assert req.request_id not in done, req
            done[req.request_id] = list(req.output)
        check(sched, engine)
    assert not sched.has_unfinished()
    return done


REQUEST = st.tuples(st.sampled_from([[1, 2, 3, 4, 1, 2], [4, 4, 3, 3], [2]]),
                    st.lists(st.integers(1, 4), max_size=6), st.integers(1, 6))


@settings(max_examples=300, deadline=None)
@given(
    capacity=st.sampled_from(["guaranteed_no_evict", "max_utilization"]),
    admission=st.sampled_from(["claim", "claim", "probe"]),
    num_gpu_blocks=st.integers(10, 24),
    num_host_blocks=st.sampled_from([0, 8]),
    max_num_tokens=st.sampled_from([4, 7, 32]),
    spec_tokens=st.sampled_from([0, 0, 2]),
    requests=st.lists(REQUEST, min_size=1, max_size=6),
    seed=st.integers(0, 10**6),
)
def test_a_fault_anywhere_in_a_step_or_update_leaves_nothing_half_done(
    capacity: Any, admission: Any, num_gpu_blocks: int, num_host_blocks: int, max_num_tokens: int,
    spec_tokens: int, requests: list[tuple[list[int], list[int], int]], seed: int,
) -> None:
    """The ``k``-th call of any hook (the step timer, the manager's clock and eviction
    policy, every manager call a step or update makes, before it or after it) raises. After
    it both books hold, every cached block holds its own prefix, every reused block too,
    and every request finishes once with the model's output; nothing leaks. The old code
    appended a step's decode tokens again after a step that raised past them (a token the
    request never had), dropped the copies the step had recorded (a host block cached with
    no KV), and lost or finished twice what an update that raised part way had applied.
    (``k`` is drawn uniformly from the calls of the run without the fault; the clock and
    the policy are read through the manager's guards, which take their faults.)"""
    counted = Faults(0)
    run_with_fault(capacity, admission, num_gpu_blocks, num_host_blocks, max_num_tokens,
                   spec_tokens, requests, counted)
    run_with_fault(capacity, admission, num_gpu_blocks, num_host_blocks, max_num_tokens,
                   spec_tokens, requests, Faults(1 + seed % counted.num_calls))


def run_with_fault(capacity: Any, admission: Any, num_gpu_blocks: int, num_host_blocks: int,
                   max_num_tokens: int, spec_tokens: int,
                   requests: list[tuple[list[int], list[int], int]], faults: Faults) -> None:
    """Run the requests to the end through ``faults``' hooks, checking every step."""

    def clock() -> float:
        faults.tick("clock")
        return 0.0

    mgr = KVCacheManager(CacheConfig(tokens_per_block=2, num_gpu_blocks=num_gpu_blocks,
                                     num_host_blocks=num_host_blocks), clock=clock,
                         policy=FaultyPolicy(faults))
    sched = make_scheduler(mgr, SchedulerConfig(max_num_tokens=max_num_tokens,
                                                capacity_policy=capacity, admission=admission,
                                                num_speculative_tokens=spec_tokens))
    sched.phases = FaultyPhases(faults)
    hook_manager(mgr, faults)
    engine = Engine(sched, 2)
    expected = {}
    for i, (prefix, tail, max_out) in enumerate(requests):
        prompt = prefix + tail
        sched.add_request(Request(f"r{i}", prompt, max_out))
        expected[f"r{i}"] = expected_output(prompt, max_out)
    assert drive(sched, engine, faults) == expected
    assert mgr.num_sequences == 0
    assert mgr.num_free_gpu_blocks == num_gpu_blocks  # nothing leaked


def two_decoding(capacity: Any = "guaranteed_no_evict") -> tuple[Scheduler, Engine, Faults]:
    """'a' and 'b' decoding, 'c' waiting (tpb 2, 16 GPU blocks, 8 host)."""
    faults = Faults(0)
    mgr = KVCacheManager(CacheConfig(tokens_per_block=2, num_gpu_blocks=16, num_host_blocks=8),
                         clock=lambda: 0.0)
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=32, capacity_policy=capacity))
    engine = Engine(sched, 2)
    sched.add_request(Request("a", [1, 2, 3, 4, 1], 6))
    sched.add_request(Request("b", [4, 4, 3, 3, 2], 6))
    step = sched.step()
    sched.update(step, *engine.run(step))
    sched.add_request(Request("c", [1, 2, 3, 4, 2, 2], 3))
    return sched, engine, faults


TWO_DECODING_OUTPUTS = {"a": expected_output([1, 2, 3, 4, 1], 6),
                        "b": expected_output([4, 4, 3, 3, 2], 6),
                        "c": expected_output([1, 2, 3, 4, 2, 2], 3)}


def test_a_step_that_raises_after_its_decodes_appends_no_token_twice() -> None:
    """The step timer raises at "prefill", after 'a' and 'b' appended their tokens in the
    manager. The step fails whole: both go back to the front of the queue (admission
    order) and the next step lists them as preempted and recomputes them, reusing the
    blocks the earlier steps computed (their first two, [1 2] [3 4] and [4 4] [3 3]);
    their outputs stay as they were. Before, the manager kept the appended tokens and the
    next step appended them again: 'a' held 7 tokens of its 6."""
    sched, engine, faults = two_decoding()
    a, b = sched.running["a"], sched.running["b"]
    outputs = (list(a.output), list(b.output))
    sched.phases = FaultyPhases(faults)
    faults.k = faults.num_calls + 3  # begin, mark(decode), mark(prefill)
    with pytest.raises(Injected, match=r"phases.mark\(prefill\)"):
        sched.step()
    check(sched, engine)
    assert [r.request_id for r in sched.waiting] == ["a", "b", "c"]
    assert not sched.running and sched.unapplied_step is None
    assert (a.output, b.output) == outputs
    step = sched.step()
    assert step.preempted_request_ids == ("a", "b")
    assert [(c.request_id, c.first_token, c.num_tokens, c.num_reused_tokens)
            for c in step.context_chunks] == [("a", 4, 2, 4), ("b", 4, 2, 4), ("c", 4, 2, 4)]
    done = {req.request_id: req.output for req in sched.update(step, *engine.run(step))}
    check(sched, engine)
    assert done | drive(sched, engine, None) == {
        rid: expected_output(prompt, n)
        for rid, prompt, n in [("a", [1, 2, 3, 4, 1], 6), ("b", [4, 4, 3, 3, 2], 6),
                               ("c", [1, 2, 3, 4, 2, 2], 3)]
    }


def test_an_update_whose_release_raises_loses_no_finished_request() -> None:
    """'a' is stopped; the manager raises releasing it. The update fails whole: 'a', 'b'
    and 'c' (its prefill completed in the step) get their outputs back as before the step
    and go back to the queue; the next step lists the three as preempted; each finishes
    later, once, with the model's output.
    Before, the step stayed unapplied with 'a''s token appended: the update taken again
    appended every token a second time."""
    sched, engine, _ = two_decoding()
    a, b = sched.running["a"], sched.running["b"]
    outputs = (list(a.output), list(b.output))
    step = sched.step()
    sampled, _ = engine.run(step)
    remove = sched.manager.remove_sequence

    def broken(request_id: str, store_for_reuse: bool = True) -> None:
        sched.manager.remove_sequence = remove  # type: ignore[method-assign]
        raise Injected("release")  # once

    sched.manager.remove_sequence = broken  # type: ignore[method-assign]
    with pytest.raises(Injected):
        sched.update(step, sampled, {"a"})
    check(sched, engine)
    assert sched.unapplied_step is None
    assert (a.output, b.output) == outputs
    assert [r.request_id for r in sched.waiting] == ["a", "b", "c"]
    assert [r.output for r in sched.waiting][2] == []
    step = sched.step()
    assert step.preempted_request_ids == ("a", "b", "c")
    done = {req.request_id: req.output for req in sched.update(step, *engine.run(step))}
    assert done | drive(sched, engine, None) == {
        "a": expected_output([1, 2, 3, 4, 1], 6), "b": expected_output([4, 4, 3, 3, 2], 6),
        "c": expected_output([1, 2, 3, 4, 2, 2], 3)}


def test_a_step_that_preempts_admits_no_one_into_the_room_it_freed() -> None:
    """max_utilization, tpb 2, 6 GPU blocks. 'a' (5 tokens) and 'b' (4) prefill, then
    decode; 'c' (1 token) arrives after 'b'. In step 2 'a' needs a block and none is free:
    'b', the newest, is preempted; its partial block (GPU 5) goes to 'a'; its full blocks
    [5 6] [7 8] (GPU 3, 4) stay cached::

        GPU   0    1    2    3    4    5
        a   [1 2][3 4][1 1]           [1 1]     step 2: a = [0 1 2 5]
        b                  [5 6][7 8]           cached, b waiting first, then c

    The step admits nobody (vLLM's rule): 'c', queued after 'b', took GPU 4 in that very
    step before, evicting 'b''s cached [7 8] as 'b' was requeued to reuse it."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=2, num_gpu_blocks=6, num_host_blocks=0),
                         clock=lambda: 0.0)
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=32, capacity_policy="max_utilization"))
    sched.add_request(Request("a", [1, 2, 3, 4, 1], 6))
    sched.add_request(Request("b", [5, 6, 7, 8], 6))

    def run(step: ScheduledStep) -> None:
        sched.update(step, dict.fromkeys(
            [*step.decode_request_ids, *(c.request_id for c in step.context_chunks)], 1))

    run(sched.step())
    assert (mgr.block_table("a"), mgr.block_table("b")) == ([0, 1, 2], [3, 4])
    run(sched.step())
    assert mgr.block_table("b") == [3, 4, 5]
    sched.add_request(Request("c", [7], 1))
    step = sched.step()
    assert (step.decode_request_ids, step.preempted_request_ids, step.context_chunks) == (
        ("a",), ("b",), ())
    assert mgr.block_table("a") == [0, 1, 2, 5]
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    assert mgr.lookup([5, 6, 7, 8, 1, 1]).num_gpu_tokens == 4
    assert sorted(b.slot for b in mgr.cached_blocks() if b.tokens in ((5, 6), (7, 8))) == [3, 4]
    run(step)
    sched.check_invariants()
    mgr.check_invariants()


# ---- every entry that takes token ids takes the same values -----------------------------

def manager_with_live() -> KVCacheManager:
    """tpb 4; 'live' = [1 2 3] admitted and computed."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8, num_host_blocks=4),
                         clock=lambda: 0.0)
    mgr.add_sequence(SequenceSpec("live", [1, 2, 3]))
    return mgr


def pending_update(num_speculative_tokens: int = 0) -> tuple[Scheduler, ScheduledStep]:
    """A scheduler whose step (decoding 'a') waits for its update."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8), clock=lambda: 0.0)
    sched = Scheduler(mgr, SchedulerConfig(num_speculative_tokens=num_speculative_tokens))
    sched.add_request(Request("a", [1, 2, 3], 4))
    step = sched.step()
    sched.update(step, {"a": 4})
    return sched, sched.step()


def state_of(obj: KVCacheManager | Scheduler) -> object:
    """What an entry that refuses a token must leave as it was."""
    mgr = obj if isinstance(obj, KVCacheManager) else obj.manager
    sched = obj if isinstance(obj, Scheduler) else None
    return (mgr.version, mgr.num_sequences, mgr.cached_blocks(),
            [(r.request_id, list(r.output)) for r in sched.running.values()]
            if sched is not None else None)


def entry_request_prompt(v: object) -> object:
    return Request("r", [1, v], 3).prompt  # type: ignore[list-item]


def entry_request_output(v: object) -> object:
    return Request("r", [1, 2], 3, output=[v]).output  # type: ignore[list-item]


def entry_add_request(v: object) -> object:
    sched = Scheduler(KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8)))
    req = Request("r", [1, 2], 3)
    req.prompt.append(v)  # type: ignore[arg-type]
    sched.add_request(req)
    return sched._specs["r"].tokens


def entry_spec(v: object) -> object:
    return SequenceSpec("r", [1, v]).tokens  # type: ignore[list-item]


def entry_token_ids(v: object) -> object:
    return TokenIds([1, v])  # type: ignore[list-item]


def entry_hashes(v: object) -> object:
    return prompt_block_hashes(get_hash_fn("xxh3_128"), [1, 2, 3, v], 4)  # type: ignore[list-item]


def cached_tokens(mgr: KVCacheManager) -> list[int]:
    """The tokens of every cached block, as the manager keeps them."""
    return [t for b in mgr.cached_blocks() for t in b.tokens]


def on_manager(call: Callable[[KVCacheManager, object], object]) -> Callable[[object], object]:
    def entry(v: object) -> object:
        mgr = manager_with_live()
        before = state_of(mgr)
        try:
            return call(mgr, v)
        except ValueError:
            assert state_of(mgr) == before  # a refusal changes nothing
            raise
        finally:
            mgr.check_invariants()
    return entry


def on_update(num_speculative_tokens: int, wrap: Callable[[object], object]
              ) -> Callable[[object], object]:
    def entry(v: object) -> object:
        sched, step = pending_update(num_speculative_tokens)
        before = state_of(sched)
        try:
            sched.update(step, {"a": wrap(v)})  # type: ignore[dict-item]
        except ValueError:
            assert state_of(sched) == before and sched.unapplied_step is step
            raise
        return sched.running["a"].output[-1:]
    return entry


ENTRIES: dict[str, Callable[[object], object]] = {
    "Request prompt": entry_request_prompt,
    "Request output": entry_request_output,
    "add_request": entry_add_request,
    "SequenceSpec": entry_spec,
    "TokenIds": entry_token_ids,
    "prompt_block_hashes": entry_hashes,
    "lookup": on_manager(lambda mgr, v: mgr.lookup([1, 2, 3, v]).num_tokens),  # type: ignore[list-item]
    "missing_block_hashes": on_manager(
        lambda mgr, v: mgr.missing_block_hashes([1, 2, 3, v])),  # type: ignore[list-item]
    "import_blocks": on_manager(lambda mgr, v: mgr.import_blocks([5, 6, 7, v], 1)),  # type: ignore[list-item]
    # What the manager keeps: the block the token fills, [1 2 3 v], is cached.
    "append_tokens": on_manager(lambda mgr, v: (mgr.append_tokens("live", [v]),  # type: ignore[list-item]
                                                cached_tokens(mgr))),
    "append_token_batch": on_manager(lambda mgr, v: (mgr.append_token_batch([("live", v)]),  # type: ignore[list-item]
                                                     cached_tokens(mgr))),
    "append_token_columns": on_manager(lambda mgr, v: (
        mgr.append_token_columns(["live"], [v]), cached_tokens(mgr))),  # type: ignore[list-item]
    "update": on_update(0, lambda v: v),
    "update, speculative, one": on_update(2, lambda v: v),
    "update, speculative, list": on_update(2, lambda v: [v]),
}

ACCEPTED = [5, np.int64(5), np.int32(5), np.uint8(5), np.uint64(5)]
REFUSED = [True, False, np.bool_(True), -1, np.int64(-1), 2**63, np.uint64(2**63), 1.0,
           np.float64(5.0), "5", 10**30]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("value", ACCEPTED, ids=repr)
def test_every_token_entry_takes_integer_scalars_as_the_int_they_are(
        entry: str, value: object) -> None:
    """An int or a NumPy integer scalar: each entry answers as it does for the int 5, and
    what it keeps is an int. Before, a sampled token, a decode batch's token or a
    speculative one refused a NumPy int that every prompt took (and append_tokens kept it,
    NumPy type and all, in the manager's tokens)."""
    got, want = ENTRIES[entry](value), ENTRIES[entry](5)
    assert got == want
    kept = got[1] if isinstance(got, tuple) else got
    if isinstance(kept, list) and entry != "Request prompt":  # kept as given (see there)
        assert {type(t) for t in kept} <= {int}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("value", REFUSED, ids=repr)
def test_every_token_entry_refuses_the_same_values_by_name(entry: str, value: object) -> None:
    """A bool (Python's or NumPy's), a negative id, one past 2**63-1, a float, a str: each
    entry refuses it with one message naming the value and its type, and changes nothing.
    Before, a prompt took True as id 1 where a sampled token refused it, and the lists'
    messages and the single tokens' differed."""
    shown = re.escape(short_repr(value))
    with pytest.raises(ValueError, match=rf"must be an int in 0\.\.2\*\*63-1, got {shown} "
                                         rf"\({type(value).__name__}\)"):
        ENTRIES[entry](value)


# ---- a request's fields while a scheduler holds it ---------------------------------------

FIELD_VALUES: dict[str, object] = {
    "request_id": "other", "prompt": [9, 9, 9], "max_output_tokens": 50, "arrival_s": 1.0,
    "salt": "tenant", "lora_id": 3, "priority": 90, "retention_s": 5.0, "output": [],
    "num_prefill_tokens": 0, "num_computed_tokens": 0, "num_preemptions": 7,
    "retention": None, "skip_reading_prefix_cache": True, "mm_items": (),
}


def test_every_field_of_the_request_is_listed() -> None:
    """The table below covers every field of Request."""
    assert set(FIELD_VALUES) == {f.name for f in dataclasses.fields(Request)} - {"_held"}


@pytest.mark.parametrize("name", FIELD_VALUES)
def test_no_field_of_a_held_request_changes(name: str) -> None:
    """While queued and while running, assigning any field is refused (AttributeError
    naming it) and changes nothing; the request finishes with the model's output; then it
    is the caller's again. Before, each was taken: a max_output_tokens raised past the
    blocks guaranteed_no_evict reserved failed an assertion at the decode past them, a new
    request_id raised KeyError when the request finished, a new salt or priority
    recomputed it under another key."""
    sched, engine, _ = two_decoding()
    waiting = sched.waiting[0]
    running = sched.running["a"]
    for req in (waiting, running):
        before = getattr(req, name)
        with pytest.raises(AttributeError, match=f"{name} of request '{req.request_id}' cannot "
                                                 "change while a scheduler holds it"):
            setattr(req, name, FIELD_VALUES[name])
        assert getattr(req, name) == before
    check(sched, engine)
    assert drive(sched, engine, None) == TWO_DECODING_OUTPUTS
    setattr(running, name, FIELD_VALUES[name])  # finished: the caller's again
    assert getattr(running, name) == FIELD_VALUES[name]


def test_a_prompt_changed_in_place_is_not_what_the_request_recomputes() -> None:
    """'a''s prompt list is changed in place while it runs; a reset preempts it: its
    recompute prefills the prompt it was queued with and its output, 5 + 1 tokens, and
    finishes with the model's output for that prompt. Before, it recomputed the changed
    prompt, 8 tokens: another request's KV under its id."""
    sched, engine, _ = two_decoding()
    a = sched.running["a"]
    a.prompt.extend([3, 3])  # in place: no assignment to refuse
    assert sched.reset_prefix_cache(reset_running_requests=True)
    step = sched.step()
    assert [(c.request_id, c.first_token, c.num_tokens) for c in step.context_chunks][:1] == [
        ("a", 0, 6)]
    del a.prompt[5:]  # the engine of these tests reads the request's own lists
    done = {req.request_id: req.output for req in sched.update(step, *engine.run(step))}
    assert done | drive(sched, engine, None) == TWO_DECODING_OUTPUTS


def test_one_request_object_is_queued_once() -> None:
    """A Request a scheduler holds is refused by another (they would share its output
    list), and by the same one (as before, by its id)."""
    sched, _, _ = two_decoding()
    other = Scheduler(KVCacheManager(CacheConfig(tokens_per_block=2, num_gpu_blocks=16)))
    with pytest.raises(ValueError, match="'a' is queued or running already"):
        other.add_request(sched.running["a"])
    assert not other.has_unfinished()
    a = sched.running["a"]
    assert sched.abort("a") is a
    other.add_request(a)  # given back: it may be queued again
    assert [r.request_id for r in other.waiting] == ["a"]


def test_a_step_timer_calling_back_into_the_scheduler_fails_the_step_whole() -> None:
    """The step timer aborts 'b' from inside the step, after the decodes were appended:
    the call back is refused (RuntimeError), and the step fails whole, as for any fault:
    'a' and 'b' recompute, each finishes once with the model's output, 'b' included."""
    sched, engine, _ = two_decoding()

    class Reentrant(StepPhases):
        def mark(self, phase: str) -> None:
            if phase == "prefill":
                sched.abort("b")
            super().mark(phase)

    sched.phases = Reentrant(lambda: 0.0)
    with pytest.raises(RuntimeError, match=r"abort\(\) called from inside its own step\(\)"):
        sched.step()
    sched.phases = None
    check(sched, engine)
    assert [r.request_id for r in sched.waiting] == ["a", "b", "c"]
    assert drive(sched, engine, None) == TWO_DECODING_OUTPUTS
