"""Scheduler behaviour: budgets, chunking, exact credit (S4), preemption, no starvation."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier import CacheConfig, KVCacheManager, SequenceSpec
from kvtier.scheduled_step import STEP_PHASES, StepPhases
from kvtier.scheduler import ContextChunk, Request, ScheduledStep, Scheduler, SchedulerConfig
from kvtier.scheduler_config import AdmissionMode
from kvtier.sim.probe import ProbeScheduler
from kvtier.sim.probe import make_scheduler as scheduler_for


def make_scheduler(num_gpu_blocks: int = 16, num_host_blocks: int = 0,
                   **kw: Any) -> Scheduler:
    """A scheduler over a manager with 4-token blocks (the simulator's ProbeScheduler for
    ``admission="probe"``)."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=num_gpu_blocks,
                                     num_host_blocks=num_host_blocks,
                                     enable_partial_reuse=False))
    return scheduler_for(mgr, SchedulerConfig(**kw))


def finish_step(s: Scheduler, step: ScheduledStep, token: int = 900) -> list[str]:
    """Feed one sampled token to every request that samples this step."""
    sampled = {c.request_id: token for c in step.context_chunks}
    sampled.update({rid: token for rid in step.decode_request_ids})
    s.manager.check_invariants()
    return [r.request_id for r in s.update(step, sampled)]


def test_config_errors_name_the_field() -> None:
    """Invalid scheduler settings raise ValueError naming field and value."""
    with pytest.raises(ValueError, match="max_num_tokens must be an integer >= 1, got 0"):
        SchedulerConfig(max_num_tokens=0)
    with pytest.raises(ValueError, match="capacity_policy must be one of"):
        SchedulerConfig(capacity_policy="yolo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="admission must be one of"):
        SchedulerConfig(admission="guess")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_output_tokens of 'r' must be"):
        Request("r", [1], 0)
    with pytest.raises(ValueError, match="max_wait_steps must be an integer >= 1, got True"):
        SchedulerConfig(max_wait_steps=True)


def test_each_admission_mode_has_its_class() -> None:
    """Scheduler admits by claim only; probe admission is the simulator's ProbeScheduler."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8))
    with pytest.raises(ValueError, match="Scheduler admits by 'claim', got admission='probe'"):
        Scheduler(mgr, SchedulerConfig(admission="probe"))
    with pytest.raises(ValueError, match="ProbeScheduler admits by 'probe', got "
                       "admission='claim'"):
        ProbeScheduler(mgr, SchedulerConfig())
    assert type(scheduler_for(mgr, SchedulerConfig(admission="probe"))) is ProbeScheduler


def test_add_request_refuses_duplicates_and_requests_that_never_fit() -> None:
    """A queued id can't be queued twice; a request bigger than the pool is refused."""
    s = make_scheduler(num_gpu_blocks=4)
    s.add_request(Request("a", [1, 2, 3], 1))
    with pytest.raises(ValueError, match="'a' is already queued or running"):
        s.add_request(Request("a", [1], 1))
    with pytest.raises(ValueError, match="'big' needs 5 blocks for 17 tokens"):
        s.add_request(Request("big", list(range(16)), 1))
    with pytest.raises(ValueError, match="token at index 1 must be an int"):
        s.add_request(Request("bad", [1, None], 1))  # type: ignore[list-item]


def test_chunked_prefill_then_decode_exact_steps() -> None:
    """MNT 8: a 10-token prompt is chunked 8 + 2, the next request fills the rest."""
    s = make_scheduler(max_num_tokens=8, max_batch_size=4)
    s.add_request(Request("a", list(range(10)), 2))
    s.add_request(Request("b", list(range(100, 106)), 1))
    st1 = s.step()
    assert st1.context_chunks == (ContextChunk("a", 0, 8, 0),)
    assert finish_step(s, st1) == []
    st2 = s.step()
    assert st2.context_chunks == (ContextChunk("a", 8, 2, 0), ContextChunk("b", 0, 6, 0))
    assert st2.num_scheduled_tokens == 8
    assert finish_step(s, st2) == ["b"]  # one output token: done after its prefill
    st3 = s.step()
    assert (st3.context_chunks, st3.decode_request_ids) == ((), ("a",))
    assert finish_step(s, st3) == ["a"]
    assert not s.has_unfinished() and s.manager.num_sequences == 0


def test_prefill_chunks_follow_running_order_past_decoding_requests() -> None:
    """Chunks continue the requests still in their prefill in running order, skipping the
    decoding ones between them, until the budget left after the decodes runs out."""
    s = make_scheduler(num_gpu_blocks=64, max_num_tokens=8, max_batch_size=8,
                       max_chunk_tokens=4)
    s.add_request(Request("a", list(range(3)), 6))
    s.add_request(Request("b", list(range(100, 120)), 2))
    s.add_request(Request("c", list(range(200, 203)), 6))
    s.add_request(Request("d", list(range(300, 320)), 2))
    for _ in range(2):
        finish_step(s, s.step())
    #   running  a (decodes)  b (prefill 8/20)  c (decodes)  d (prefill 1/20)
    #   budget   8 - 2 decodes = 6: b takes a chunk of 4 (the cap), d the 2 left
    chunks = []
    for _ in range(4):
        step = s.step()
        chunks.append((step.decode_request_ids,
                       [(c.request_id, c.first_token, c.num_tokens) for c in step.context_chunks]))
        finish_step(s, step)
    assert chunks == [
        (("a", "c"), [("b", 8, 4), ("d", 1, 2)]),
        (("a", "c"), [("b", 12, 4), ("d", 3, 2)]),
        (("a", "c"), [("b", 16, 4), ("d", 5, 2)]),
        (("a", "b", "c"), [("d", 7, 4)]),  # b decodes now; d alone takes its chunk
    ]


def test_step_phases_time_each_phase_only_when_turned_on() -> None:
    """The opt-in phase counter: each phase gets the clock's time since the last mark."""
    ticks = iter(range(100))
    s = make_scheduler(max_num_tokens=8, max_batch_size=4)
    assert s.phases is None  # off by default: a step reads no clock
    s.phases = StepPhases(clock=lambda: float(next(ticks)))
    s.add_request(Request("a", list(range(10)), 2))
    step = s.step()
    # begin 0, decode 1, prefill 2, lookup 3, admit 4, hint 5, store 6 (one tick each)
    assert s.phases.last == dict.fromkeys(STEP_PHASES[:-1], 1.0) | {"update": 0.0}
    finish_step(s, step)  # resume 7, update 8
    assert s.phases.last["update"] == 1.0
    s.step()  # no waiting request: the admit loop does not run, so no lookup or admit
    assert s.phases.last == {"decode": 1.0, "prefill": 1.0, "lookup": 0.0, "admit": 0.0,
                             "hint": 1.0, "store": 1.0, "update": 0.0}
    assert s.phases.total == {"decode": 2.0, "prefill": 2.0, "lookup": 1.0, "admit": 1.0,
                              "hint": 2.0, "store": 2.0, "update": 1.0}


def test_no_chunking_waits_for_room_but_does_not_block_smaller_requests() -> None:
    """Without chunked prefill a prompt larger than the budget left waits; a small one
    behind it goes first (no head-of-line blocking)."""
    s = make_scheduler(max_num_tokens=8, enable_chunked_prefill=False)
    s.add_request(Request("a", list(range(6)), 3))
    s.add_request(Request("big", list(range(10, 17)), 1))
    s.add_request(Request("small", [50, 51], 1))
    st1 = s.step()
    assert [c.request_id for c in st1.context_chunks] == ["a", "small"]
    finish_step(s, st1)
    st2 = s.step()  # a decodes one token; big's 7 tokens fit the 7 left
    assert st2.decode_request_ids == ("a",)
    assert st2.context_chunks == (ContextChunk("big", 0, 7, 0),)
    finish_step(s, st2)


def s4_setup(admission: str) -> tuple[Scheduler, ScheduledStep]:
    """S4 = S1 + a running chunked prefill. MNT 20: L's second chunk (4) + B (8) + C (8).

        GPU (12): L's 6 blocks (live) + 6 cached filler blocks     host (2): [C, B]
    """
    s = make_scheduler(num_gpu_blocks=12, num_host_blocks=2, max_num_tokens=20,
                       capacity_policy="max_utilization", admission=admission)
    mgr = s.manager
    s.add_request(Request("L", list(range(300, 324)), 1))
    st1 = s.step()
    assert st1.context_chunks == (ContextChunk("L", 0, 20, 0),)
    finish_step(s, st1)

    def cycle(rid: str, tokens: list[int], priority: int | None = None) -> None:
        mgr.add_sequence(SequenceSpec(rid, tokens, priority=priority))
        mgr.remove_sequence(rid)

    cycle("c", [1, 1, 1, 1, 9])
    cycle("f1", list(range(100, 124)), priority=0)  # pushes C to host
    cycle("b", [2, 2, 2, 2, 9])
    cycle("f2", list(range(200, 224)))  # pushes B to host
    s.add_request(Request("B", [2, 2, 2, 2, *range(50, 58)], 1))
    s.add_request(Request("C", [1, 1, 1, 1, *range(60, 68)], 1))
    return s, s.step()


def test_s4_claim_admission_keeps_the_budget_exact() -> None:
    """S4 in claim mode: both host prefixes are credited and obtained; 20 tokens == MNT."""
    s, step = s4_setup("claim")
    assert step.context_chunks == (ContextChunk("L", 20, 4, 0), ContextChunk("B", 4, 8, 4),
                                   ContextChunk("C", 4, 8, 4))
    assert (step.num_scheduled_tokens, step.num_overflow_tokens) == (20, 0)
    assert step.num_credited_tokens == step.num_reused_tokens == 8
    finish_step(s, step)


def test_s4_probe_admission_overflows() -> None:
    """S4 in probe mode: B's onboarding evicts C's host block; C computes 12, 24 > 20."""
    s, step = s4_setup("probe")
    assert step.context_chunks == (ContextChunk("L", 20, 4, 0), ContextChunk("B", 4, 8, 4),
                                   ContextChunk("C", 0, 12, 0))
    assert (step.num_scheduled_tokens, step.num_overflow_tokens) == (24, 4)
    assert (step.num_credited_tokens, step.num_reused_tokens) == (8, 4)
    finish_step(s, step)


def test_max_utilization_preempts_newest_and_resumes_from_cache() -> None:
    """When decode runs out of blocks the newest request is preempted; it resumes and
    reuses its own cached blocks."""
    s = make_scheduler(num_gpu_blocks=4, max_num_tokens=16,
                       capacity_policy="max_utilization")
    s.add_request(Request("old", [1, 2, 3, 4, 5, 6, 7], 6))
    s.add_request(Request("new", [9, 9, 9, 9, 8, 8, 8], 6))
    st1 = s.step()
    assert [c.request_id for c in st1.context_chunks] == ["old", "new"]
    finish_step(s, st1, token=11)
    st2 = s.step()  # both decode their 8th token: still 2 blocks each
    assert st2.decode_request_ids == ("old", "new")
    finish_step(s, st2, token=12)
    st3 = s.step()  # old needs a 3rd block: new is preempted
    assert st3.preempted_request_ids == ("new",) and st3.decode_request_ids == ("old",)
    finish_step(s, st3, token=13)
    resumed = None
    for _ in range(20):
        step = s.step()
        for c in step.context_chunks:
            if c.request_id == "new":
                resumed = c
        finish_step(s, step, token=13)
        if not s.has_unfinished():
            break
    assert not s.has_unfinished()
    assert resumed is not None and resumed.num_reused_tokens == 4  # its first full block
    # Its recompute is no query (vLLM's preempted stats): the hit rate counts each prompt
    # once, at its first admission (neither found anything); the resume is counted apart.
    stats = s.manager.stats
    assert (stats.num_admitted, stats.num_prompt_tokens, stats.num_reused_tokens) == (3, 14, 0)
    assert (stats.num_resumed, stats.num_resumed_prompt_tokens,
            stats.num_resumed_reused_tokens) == (1, 9, 4)  # prompt + 2 outputs, one block
    assert (stats.gpu.reused_blocks, stats.gpu.missed_blocks) == (0, 2)
    assert stats.token_hit_rate == 0.0


def test_guaranteed_no_evict_reserves_decode_blocks() -> None:
    """Under guaranteed_no_evict a request is admitted only with room to finish."""
    s = make_scheduler(num_gpu_blocks=4, max_num_tokens=16)
    s.add_request(Request("a", [1, 2, 3, 4, 5], 7))  # 12 tokens: 3 blocks reserved to finish
    s.add_request(Request("b", [7, 7, 7], 5))  # 8 tokens: 2 blocks; only 1 is left
    st1 = s.step()
    assert [c.request_id for c in st1.context_chunks] == ["a"]
    assert s.manager.num_reserved_blocks == 1
    steps = [st1]
    finish_step(s, st1)
    while s.has_unfinished():
        steps.append(s.step())
        assert steps[-1].preempted_request_ids == ()
        finish_step(s, steps[-1])
    # a: prefill + 6 decodes; b waits for a's blocks, then prefill + 4 decodes.
    first = [i for i, step in enumerate(steps) if step.context_chunks]
    assert len(steps) == 12 and first == [0, 7]


def test_starving_request_is_admitted_within_the_bound() -> None:
    """A large request that keeps being overtaken stops the overtaking after
    max_wait_steps and is admitted once room frees up."""
    s = make_scheduler(num_gpu_blocks=8, max_num_tokens=64, max_wait_steps=3,
                       capacity_policy="max_utilization")
    s.add_request(Request("hold", list(range(100, 112)), 8))  # 5 blocks while it decodes
    step = s.step()
    finish_step(s, step)
    s.add_request(Request("big", list(range(200, 220)), 1))  # 6 blocks: must wait for hold
    admitted_at = None
    for i in range(40):
        s.add_request(Request(f"s{i}", [7, i], 1))  # always fits, always behind big
        step = s.step()
        if any(c.request_id == "big" for c in step.context_chunks):
            admitted_at = i
            break
        finish_step(s, step)
    assert admitted_at is not None and admitted_at <= 3 + 8


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 2), st.lists(st.integers(0, 5), min_size=1,
                                                             max_size=9), st.integers(1, 8)),
        st.tuples(st.just("step"), st.integers(0, 5)),
    ),
    max_size=150,
)


@settings(max_examples=60, deadline=None)
@given(num_gpu_blocks=st.integers(12, 40), num_host_blocks=st.sampled_from([0, 4, 16]),
       partial=st.booleans(), mnt=st.sampled_from([8, 16, 32]),
       batch=st.sampled_from([2, 4, 8]), chunk=st.sampled_from([None, 4, 8]),
       policy=st.sampled_from(["guaranteed_no_evict", "max_utilization"]),
       prefixes=st.lists(st.lists(st.integers(0, 5), min_size=2, max_size=12),
                         min_size=3, max_size=3),
       ops=OPS)
def test_claim_mode_never_overflows_and_never_loses_credit(
        num_gpu_blocks: int, num_host_blocks: int, partial: bool, mnt: int, batch: int,
        chunk: int | None, policy: str, prefixes: list[list[int]],
        ops: list[tuple[Any, ...]]) -> None:
    """Random arrivals, shared prefixes, host offload, chunking, decode growth and
    preemption: the work the manager really scheduled fits MNT on every step, each chunk
    says exactly what the manager scheduled, and every credited token is obtained."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=num_gpu_blocks,
                                     num_host_blocks=num_host_blocks,
                                     enable_partial_reuse=partial))
    s = Scheduler(mgr, SchedulerConfig(max_num_tokens=mnt, max_batch_size=batch,
                                       capacity_policy=policy,  # type: ignore[arg-type]
                                       max_chunk_tokens=chunk))
    for n, op in enumerate(ops):
        if op[0] == "add":
            _, prefix, suffix, max_output = op
            with contextlib.suppress(ValueError):  # too large for the pool: refused
                s.add_request(Request(f"r{n}", prefixes[prefix] + suffix, max_output))
            continue
        step = s.step()
        # Recounted from the chunks and from the manager, not from the scheduler's books:
        # each chunk ends where the manager's schedule for its request ends.
        for c in step.context_chunks:
            tokens = s.running[c.request_id].tokens
            assert len(tokens) - mgr.num_unscheduled_tokens(c.request_id) == (
                c.first_token + c.num_tokens)
        work = len(step.decode_request_ids) + sum(c.num_tokens for c in step.context_chunks)
        assert work == step.num_scheduled_tokens <= mnt
        assert step.num_credited_tokens == step.num_reused_tokens
        finish_step(s, step, token=op[1])


def test_copy_source_counts_as_room_when_the_request_fills_the_pool() -> None:
    """A request needing the whole pool, with a partial copy from a cached block, is
    admitted: the source is released after its copy (this used to livelock)."""
    s = Scheduler(KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=4)))
    s.add_request(Request("a", list(range(1, 14)), 1))
    finish_step(s, s.step())
    s.add_request(Request("b", [1, 2, 3, 4, 5, 6] + [0] * 9, 1))  # 16 tokens to finish
    step = s.step()
    assert step.context_chunks == (ContextChunk("b", 6, 9, 6),)
    finish_step(s, step)


def test_held_requests_wait_without_blocking_others() -> None:
    """A held request (its prefix being fetched) is skipped until released; others go."""
    s = make_scheduler()
    s.add_request(Request("held", [1, 2, 3], 1))
    s.add_request(Request("free", [4, 5, 6], 1))
    s.hold("held")
    step = s.step()
    assert [c.request_id for c in step.context_chunks] == ["free"]
    finish_step(s, step)
    s.release("held")
    step = s.step()
    assert [c.request_id for c in step.context_chunks] == ["held"]
    finish_step(s, step)


def run_preemption(prompt: Sequence[int]) -> tuple[Scheduler, ScheduledStep]:
    """old and new decode until old needs a third block of four: new is preempted."""
    s = make_scheduler(num_gpu_blocks=4, max_num_tokens=16, capacity_policy="max_utilization")
    s.add_request(Request("old", [1, 2, 3, 4, 5, 6, 7], 6))
    s.add_request(Request("new", prompt, 6))  # type: ignore[arg-type]
    for token in (11, 12):
        finish_step(s, s.step(), token=token)
    return s, s.step()


@pytest.mark.parametrize("kind", [list, tuple])
def test_any_sequence_prompt_is_preempted_like_a_list(kind: Any) -> None:
    """A tuple prompt behaves exactly as a list: preempted, it waits at the queue front
    (it used to raise in step() and be in neither queue)."""
    s, step = run_preemption(kind([9, 9, 9, 9, 8, 8, 8]))
    assert step.preempted_request_ids == ("new",) and step.decode_request_ids == ("old",)
    #   running: old     waiting: [new]  (prompt + the two tokens it sampled)
    assert list(s.running) == ["old"] and [r.request_id for r in s.waiting] == ["new"]
    assert s.waiting[0].tokens == [9, 9, 9, 9, 8, 8, 8, 11, 12]
    assert type(s.waiting[0].prompt) is list


def test_prompt_is_copied_when_queued() -> None:
    """Changing the caller's list after add_request changes nothing the scheduler admits."""
    s = make_scheduler()
    prompt = [1, 2, 3, 4, 5]
    s.add_request(Request("a", prompt, 1))
    prompt.clear()
    prompt.append(-1)
    step = s.step()
    assert step.context_chunks == (ContextChunk("a", 0, 5, 0),)
    assert s.running["a"].prompt == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": []}, "prompt of request 'r' must not be empty"),
        ({"prompt": "abc"}, r"prompt of request 'r' must be a sequence of ints .* got str"),
        ({"prompt": 5}, r"prompt of request 'r' must be a sequence of ints .* got int"),
        ({"prompt": [1, None]}, r"prompt of request 'r': token at index 1 must be an int"),
        ({"prompt": [1, 2.0]}, r"prompt of request 'r': token at index 1 must be an int"),
        ({"prompt": [1, -1]}, r"token at index 1 must be an int in 0\.\.2\*\*63-1, got -1 \(int\)"),
        ({"prompt": [2**63]},
         r"token at index 0 must be an int in 0\.\.2\*\*63-1, got 9223372036854775808"),
        ({"max_output_tokens": True}, "max_output_tokens of 'r' must be an integer >= 1"),
        ({"max_output_tokens": 0}, "max_output_tokens of 'r' must be an integer >= 1, got 0"),
        ({"arrival_s": float("nan")}, "arrival_s of request 'r' must be a finite number"),
        ({"arrival_s": True}, "arrival_s of request 'r' must be a finite number, got True"),
        ({"salt": True}, "salt of request 'r' must be bytes, str, int or None, got True"),
        ({"salt": 1.5}, r"salt of request 'r' must be bytes, str, int or None, got 1\.5"),
        ({"salt": 2**128}, r"salt of request 'r' must be an int of magnitude below 2\*\*128"),
        ({"salt": "s" * 4097}, "salt of request 'r' must be at most 4096 long, got 4097"),
        ({"lora_id": True}, r"lora_id of request 'r' must be an int in 0\.\.2\*\*63-1 or None"),
        ({"lora_id": -1}, r"lora_id of request 'r' must be an int in 0\.\.2\*\*63-1 or None"),
        ({"priority": 101}, r"priority of request 'r' must be an integer in 0\.\.100"),
        ({"priority": False}, r"priority of request 'r' must be an integer in 0\.\.100"),
        ({"retention_s": 10**400}, "retention_s of request 'r' must be a finite number of"),
        ({"retention_s": -1.0}, "retention_s of request 'r' must be a finite number of"),
        ({"retention_s": 1e10}, r"in 0\.\.1e\+09, or None for no expiry, got 10000000000\.0"),
        ({"retention_s": True}, "retention_s of request 'r' must be a finite number of"),
        ({"request_id": ""}, "request_id must be a non-empty str, got ''"),
    ],
)
def test_every_request_field_is_validated(fields: dict[str, Any], message: str) -> None:
    """A bad field is refused when the Request is built, and again by add_request if it was
    changed after: the message names the field, nothing is queued."""
    good = {"request_id": "r", "prompt": [1, 2, 3], "max_output_tokens": 2}
    with pytest.raises(ValueError, match=message):
        Request(**{**good, **fields})
    s = make_scheduler()
    req = Request(**good)  # type: ignore[arg-type]
    for name, value in fields.items():
        setattr(req, name, value)
    with pytest.raises(ValueError, match=message):
        s.add_request(req)
    assert not s.has_unfinished() and s.step().num_scheduled_tokens == 0


@pytest.mark.parametrize("junk", [None, "q", ("q", [1, 2], 2)])
def test_add_request_takes_a_request_only(junk: object) -> None:
    """Anything but a Request is a TypeError naming what was given; nothing is queued."""
    s = make_scheduler()
    with pytest.raises(TypeError, match=f"add_request takes a Request, got {type(junk).__name__}"):
        s.add_request(junk)  # type: ignore[arg-type]
    assert not s.has_unfinished()


def test_stopped_requests_finish_with_their_token() -> None:
    """A request named in ``stopped`` (an EOS, a stop string) finishes in that update with
    the token kept, after its prefill or while decoding; the others go on; its blocks stay
    cached."""
    s = make_scheduler()
    s.add_request(Request("a", [1, 2, 3, 4, 5], 10))
    s.add_request(Request("b", [6, 7, 8, 9, 10], 10))
    step = s.step()
    done = s.update(step, {"a": 11, "b": 12}, stopped={"b"})
    assert [r.request_id for r in done] == ["b"] and done[0].output == [12]
    assert list(s.running) == ["a"] and s.manager.num_sequences == 1
    step = s.step()
    assert step.decode_request_ids == ("a",)
    done = s.update(step, {"a": 13}, stopped={"a", "gone"})
    assert [r.output for r in done] == [[11, 13]] and not s.has_unfinished()
    assert s.manager.lookup([6, 7, 8, 9, 10, 0]).num_tokens == 4


def test_update_with_a_missing_token_changes_nothing() -> None:
    """A sampled dict that lacks a sampling request is refused before anything is applied."""
    s = make_scheduler()
    s.add_request(Request("a", [1, 2, 3], 2))
    s.add_request(Request("b", [4, 5, 6], 2))
    step = s.step()
    with pytest.raises(ValueError, match="sampled token of 'b' must be an int"):
        s.update(step, {"a": 7})
    assert (s.running["a"].output, s.running["a"].num_computed_tokens) == ([], 0)
    with pytest.raises(ValueError, match=r"sampled token of 'a' must be an int in 0\.\.2\*\*63-1"):
        s.update(step, {"a": -3, "b": 7})
    assert finish_step(s, step) == []
    assert s.running["a"].output == s.running["b"].output == [900]


@pytest.mark.parametrize("bad", [True, 2**63, 1.0])
def test_update_names_the_first_bad_token_of_a_batch(bad: object) -> None:
    """A step's tokens are checked as one batch: a bool, an id past 2**63-1 or a float
    among good ones is refused naming its request, and nothing is applied."""
    s = make_scheduler()
    for rid in ("a", "b", "c"):
        s.add_request(Request(rid, [ord(rid), 1, 2], 2))
    step = s.step()
    with pytest.raises(ValueError, match=r"sampled token of 'b' must be an int in 0\.\.2\*\*63-1"):
        s.update(step, {"a": 7, "b": bad, "c": 8})  # type: ignore[dict-item]
    assert [s.running[r].output for r in ("a", "b", "c")] == [[], [], []]
    assert finish_step(s, step) == []


@pytest.mark.parametrize("order", [["a", "b", "c"], ["c", "b", "a"], ["b", "c", "a"]])
def test_requeue_failed_keeps_admission_order(order: list[str]) -> None:
    """Aborted requests go back to the queue front in admission order, whatever order (or
    set iteration order) they are named in."""
    s = make_scheduler()
    for rid in ("a", "b", "c"):
        s.add_request(Request(rid, [ord(rid), 1, 2], 3))
    step = s.step()
    s.add_request(Request("d", [9, 9], 1))
    for rid in order:
        s.manager.remove_sequence(rid)  # what transfer_failed does to the aborted ones
    rest = s.requeue_failed(step, iter(order))
    #   waiting: [a, b, c, d]   running: {}
    assert [r.request_id for r in s.waiting] == ["a", "b", "c", "d"] and not s.running
    assert rest.context_chunks == () and rest.num_scheduled_tokens == 0


# ---- abort --------------------------------------------------------------------------------

def test_abort_a_queued_request_leaves_the_queue_and_nothing_else() -> None:
    """A queued request aborted is gone (never admitted); the others run as before, and its
    id may be queued again."""
    s = make_scheduler(max_num_tokens=8)
    s.add_request(Request("a", list(range(1, 9)), 2))
    s.add_request(Request("b", list(range(20, 28)), 2))
    gone = s.abort("b")
    assert gone is not None and gone.request_id == "b"
    assert [r.request_id for r in s.waiting] == ["a"]
    step = s.step()
    assert [c.request_id for c in step.context_chunks] == ["a"]
    finish_step(s, step)
    assert s.abort("b") is None  # no longer queued
    s.add_request(Request("b", list(range(20, 28)), 1))
    assert [r.request_id for r in s.waiting] == ["b"]


def test_abort_a_running_request_keeps_what_it_computed_cached() -> None:
    """A request aborted mid-prefill (chunks of 4 tokens) leaves the manager; the blocks of
    the chunks already applied stay cached, exactly those, and nothing more is held."""
    s = make_scheduler(num_gpu_blocks=8, max_num_tokens=4)
    prompt = list(range(1, 14))  # 13 tokens: 4 chunks of at most 4
    s.add_request(Request("a", prompt, 3))
    for _ in range(2):
        finish_step(s, s.step())
    assert s.running["a"].num_computed_tokens == 8
    gone = s.abort("a")
    assert gone is not None and not s.has_unfinished()
    assert not s.manager.has_sequence("a")
    s.manager.check_invariants()
    assert s.manager.lookup(prompt).num_tokens == 8  # the two computed blocks, no more
    assert len(s.manager.cached_blocks()) == 2  # nothing else held or cached


def test_abort_a_decoding_request_then_the_rest_run() -> None:
    """Aborted while it decodes: its prompt's blocks stay cached for the next request with
    the same prefix, which reuses exactly them."""
    s = make_scheduler(num_gpu_blocks=8, max_num_tokens=16)
    prompt = list(range(1, 10))  # 2 full blocks and a partial one
    s.add_request(Request("a", prompt, 5))
    finish_step(s, s.step())  # prefill and the first token
    finish_step(s, s.step())  # one decode
    assert s.abort("a") is not None
    s.manager.check_invariants()
    s.add_request(Request("b", prompt + [50], 1))
    step = s.step()
    assert [(c.request_id, c.num_reused_tokens) for c in step.context_chunks] == [("b", 8)]
    finish_step(s, step)
    assert not s.has_unfinished()


def test_abort_is_refused_between_step_and_update_and_names_bad_ids() -> None:
    """Between step and update the step's blocks are cached but not filled: refused,
    nothing changed; an id that is no str is a TypeError; an unknown id is None."""
    s = make_scheduler(max_num_tokens=8)
    s.add_request(Request("a", list(range(1, 9)), 2))
    step = s.step()
    with pytest.raises(RuntimeError, match=r"abort\('a'\) between step\(\) and update\(\)"):
        s.abort("a")
    assert "a" in s.running and s.manager.has_sequence("a")
    finish_step(s, step)
    with pytest.raises(TypeError, match="request_id must be a str, got 7"):  # as hold's
        s.abort(7)  # type: ignore[arg-type]
    assert s.abort("nobody") is None
    assert s.abort("a") is not None and not s.has_unfinished()
    s.manager.check_invariants()


def test_branches_of_one_prompt_queued_at_once_compute_it_once() -> None:
    """Parallel sampling's branches (one prompt queued 4 times at once): the first computes
    the prompt, the others wait one step and reuse its 2 full blocks, as they would had they
    come a step later. Before, all four computed the whole prompt in the first step (40
    tokens, 0 reused). A prompt that shares no block with them is not held back."""
    s = make_scheduler(num_gpu_blocks=32, max_num_tokens=64)
    prompt = list(range(1, 11))  # 10 tokens: 2 full blocks and 2 tokens
    for i in range(4):
        s.add_request(Request(f"b{i}", prompt, 2))
    s.add_request(Request("other", [50, *prompt[1:]], 2))  # another first block
    step = s.step()
    assert [(c.request_id, c.first_token, c.num_tokens) for c in step.context_chunks] == [
        ("b0", 0, 10), ("other", 0, 10)]
    assert (step.num_credited_tokens, step.num_reused_tokens) == (0, 0)
    finish_step(s, step)
    step = s.step()
    assert [(c.request_id, c.first_token, c.num_tokens, c.num_reused_tokens)
            for c in step.context_chunks] == [(f"b{i}", 8, 2, 8) for i in (1, 2, 3)]
    assert (step.num_credited_tokens, step.num_reused_tokens) == (24, 24)
    assert s.manager.stats.token_hit_rate == 24 / 50


def test_a_branch_queued_during_a_chunked_prefill_waits_for_its_blocks() -> None:
    """A request queued while another computes the same prompt chunk by chunk waits while
    each step's chunk completes its next block, then reuses the whole prompt. Before, it
    reused the 8 tokens stored so far and computed the other 12 beside the first."""
    s = make_scheduler(num_gpu_blocks=32, max_num_tokens=64, max_chunk_tokens=8)
    prompt = list(range(1, 21))  # 20 tokens: 5 blocks
    s.add_request(Request("a", prompt, 2))
    step = s.step()
    assert [(c.request_id, c.first_token, c.num_tokens) for c in step.context_chunks] == [
        ("a", 0, 8)]
    finish_step(s, step)
    s.add_request(Request("b", [*prompt, 77, 78], 2))  # the prompt and a question of its own
    s.add_request(Request("other", [50, *prompt[1:]], 2))  # another first block: no wait
    step = s.step()
    # b would reuse 8 and compute from token 8: a's chunk completes that block now.
    assert [(c.request_id, c.first_token, c.num_tokens, c.num_reused_tokens)
            for c in step.context_chunks] == [("a", 8, 8, 0), ("other", 0, 8, 0)]
    finish_step(s, step)
    step = s.step()  # a's last chunk completes the block b computes from: b waits again
    assert [(c.request_id, c.first_token, c.num_tokens, c.num_reused_tokens)
            for c in step.context_chunks] == [("a", 16, 4, 0), ("other", 8, 8, 0)]
    finish_step(s, step)
    step = s.step()
    assert [(c.request_id, c.first_token, c.num_tokens, c.num_reused_tokens)
            for c in step.context_chunks] == [("other", 16, 4, 0), ("b", 20, 2, 20)]
    assert (step.num_credited_tokens, step.num_reused_tokens) == (20, 20)


def test_a_waiter_waits_on_a_candidate_admitted_in_an_earlier_round() -> None:
    """Admission tries again for the budget a rejected candidate left; a request that
    waited on a candidate admitted in the first round still waits in the next, and reuses
    its block a step later (before, the next round admitted it to compute that block too).
    Pool: 16 blocks of 4 tokens, 4 held by d, X's 4 cached. a (2 blocks) and r (7) fit the
    12 free and evictable blocks as counted, but b's claim on X pins 4 of them: r, the
    one past what is left, is rejected; b is admitted."""
    s = make_scheduler(num_gpu_blocks=16, max_num_tokens=64, capacity_policy="max_utilization")
    x = list(range(100, 116))
    s.add_request(Request("x", x, 1))
    s.add_request(Request("d", list(range(300, 313)), 50))  # decodes on, holding 4 blocks
    finish_step(s, s.step())
    assert list(s.running) == ["d"] and s.manager.num_free_gpu_blocks == 12
    s.add_request(Request("a", [1, 2, 3, 4, 5, 6, 7, 8], 1))
    s.add_request(Request("r", list(range(200, 228)), 1))
    s.add_request(Request("b", [*x, 9], 1))
    s.add_request(Request("c", [1, 2, 3, 4, 70], 1))  # a's first block: it waits on a
    step = s.step()
    assert [(c.request_id, c.first_token, c.num_tokens, c.num_reused_tokens)
            for c in step.context_chunks] == [("a", 0, 8, 0), ("b", 16, 1, 16)]
    assert [r.request_id for r in s.waiting] == ["r", "c"]
    finish_step(s, step)
    step = s.step()
    assert [(c.request_id, c.num_tokens, c.num_reused_tokens)
            for c in step.context_chunks if c.request_id == "c"] == [("c", 1, 4)]


@pytest.mark.parametrize(("second", "admitted"), [
    ([1, 2, 3, 4, 9, 9, 9, 9, 9], ["a"]),  # the same first block: it waits
    ([1, 2, 3, 5, 9, 9, 9, 9, 9], ["a", "b"]),  # another first block
    ([1, 2, 3, 4], ["a", "b"]),  # that block ends its prompt: never reused, so no wait
])
def test_only_a_request_that_would_reuse_the_block_waits(second: list[int],
                                                         admitted: list[str]) -> None:
    """A request waits only for a block it would reuse: the same prefix to the end of the
    first block a request ahead computes this step, not ending its own prompt."""
    s = make_scheduler(num_gpu_blocks=32, max_num_tokens=64)
    s.add_request(Request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], 2))
    s.add_request(Request("b", second, 2))
    assert [c.request_id for c in s.step().context_chunks] == admitted


def test_check_invariants_holds_through_steps_and_names_a_broken_queue() -> None:
    """The scheduler's books hold between the steps of a run, and a request put in both
    queues (a caller editing ``waiting`` by hand) is caught, naming it."""
    s = make_scheduler(max_num_tokens=8)
    s.add_request(Request("a", list(range(10)), max_output_tokens=2))
    s.add_request(Request("b", list(range(10)), max_output_tokens=2))
    s.check_invariants()
    step = s.step()
    finish_step(s, step)
    s.check_invariants()
    running = next(iter(s.running.values()))
    s.waiting.append(running)
    with pytest.raises(AssertionError, match="waiting and running"):
        s.check_invariants()


@pytest.mark.parametrize("admission", ["claim", "probe"])
def test_without_block_reuse_no_request_waits_for_another_s_block(
        admission: AdmissionMode) -> None:
    """With block reuse off nothing computed is stored, so a request whose first block
    another request computes this step does not wait a step for it (it would reuse nothing):
    both branches of one prompt are admitted at once, under either admission. Before, the
    second waited a step and then computed the whole prompt anyway."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16,
                                     enable_block_reuse=False))
    s = scheduler_for(mgr, SchedulerConfig(max_num_tokens=64, admission=admission))
    prompt = list(range(1, 11))
    s.add_request(Request("b0", prompt, 2))
    s.add_request(Request("b1", prompt, 2))
    step = s.step()
    assert [(c.request_id, c.first_token, c.num_tokens) for c in step.context_chunks] == [
        ("b0", 0, 10), ("b1", 0, 10)]
    assert step.num_scheduled_tokens == 20


class _Watched(Request):
    """A request a weak reference can follow (``Request`` has slots and no ``__weakref__``)."""

    __slots__ = ("__weakref__",)


def test_a_finished_request_is_freed_when_its_caller_lets_go() -> None:
    """``update`` hands a finished request back and keeps no reference to it: dropping the
    caller's last one frees it there (its prompt's int objects with it), not at the start of
    the next ``step``, which paid up to 1.3 ms for it on the Mooncake replay. A request still
    running is kept for ``step``'s recovery of a failed pass, and it still works."""
    s = make_scheduler(num_gpu_blocks=32, max_num_tokens=64)
    done = _Watched("done", list(range(1000, 1012)), 1)
    going = _Watched("going", list(range(2000, 2012)), 4)
    gone, kept = weakref.ref(done), weakref.ref(going)
    s.add_request(done)
    s.add_request(going)
    del done, going
    finished = s.update(s.step(), {"done": 7, "going": 8})
    assert [r.request_id for r in finished] == ["done"]
    del finished
    assert gone() is None, "the scheduler still holds the finished request"
    assert kept() is not None and kept().output == [8]  # type: ignore[union-attr]
    # The running one's pass fails after its update: the next step recomputes it without
    # the token that pass sampled (the recovery reads what ``update`` kept of it).
    s.manager.compute_failed(["going"])
    step = s.step()
    assert s.running["going"].output == []
    assert [(c.request_id, c.first_token, c.num_tokens) for c in step.context_chunks] == [
        ("going", 0, 12)]
    s.manager.check_invariants()


def test_an_aborted_request_is_freed_when_its_caller_lets_go() -> None:
    """``abort`` of a running request hands it back and keeps no reference to it either
    (the last update listed it among its requests)."""
    s = make_scheduler(num_gpu_blocks=32, max_num_tokens=64)
    req = _Watched("r", list(range(1000, 1012)), 4)
    ref = weakref.ref(req)
    s.add_request(req)
    del req
    s.update(s.step(), {"r": 7})
    aborted = s.abort("r")
    assert aborted is not None and aborted.output == [7]
    del aborted
    assert ref() is None, "the scheduler still holds the aborted request"
    assert s.step().num_scheduled_tokens == 0
    s.manager.check_invariants()
