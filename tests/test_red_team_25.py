"""Red team 25a: the core, the scheduler and its config: each refusal names the problem and
changes nothing, and every count reported is what happened."""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvtier import CacheConfig, KVCacheManager, Request, Scheduler, SchedulerConfig, SequenceSpec
from kvtier.policies import get_policy
from kvtier.retention import Retention, RetentionRange
from kvtier.sequence import MultimodalItem
from kvtier.sim.probe import ProbeScheduler


def make_manager(num_gpu_blocks: int = 16, num_host_blocks: int = 0,
                 **options: Any) -> KVCacheManager:
    return KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=num_gpu_blocks,
                                      num_host_blocks=num_host_blocks,
                                      eviction_policy="priority-lru", **options))


def books(sched: Scheduler) -> tuple[object, ...]:
    """What a refused call must leave as it was: queues, progress, the manager's books."""
    mgr = sched.manager
    return ([r.request_id for r in sched.waiting], list(sched.running),
            [(r.request_id, r.num_computed_tokens, r.num_prefill_tokens, list(r.output))
             for r in (*sched.waiting, *sched.running.values())],
            mgr.version, mgr.num_sequences, mgr.num_free_gpu_blocks, mgr.stats.as_dict())


@pytest.mark.parametrize("cap", [1, 256])
def test_a_chunk_cap_without_chunked_prefill_is_refused_naming_both(cap: int) -> None:
    """max_chunk_tokens with chunked prefill off capped nothing (chunks of the whole budget
    ran under a config saying chunks <= cap): refused, as the CLI refuses the pair."""
    with pytest.raises(ValueError, match=re.escape(
            f"max_chunk_tokens={cap} caps a prefill chunk, and enable_chunked_prefill=False")):
        SchedulerConfig(enable_chunked_prefill=False, max_chunk_tokens=cap)
    assert SchedulerConfig(enable_chunked_prefill=False).max_chunk_tokens is None
    assert SchedulerConfig(max_chunk_tokens=cap).max_chunk_tokens == cap


@pytest.mark.parametrize("kind", [Scheduler, ProbeScheduler])
def test_the_admit_phase_called_between_steps_is_refused_changing_nothing(
        kind: type[Scheduler]) -> None:
    """admit() (and start(), a subclass's admit phase) between steps admitted in the
    manager a request whose first chunk no step ran: the next step scheduled it again and
    failed whole (a failed pass, a recompute), check_invariants failing in between."""
    sched = kind(make_manager(), SchedulerConfig(max_num_tokens=16, admission=kind.ADMISSION))
    sched.add_request(Request("a", list(range(10)), 3))
    before = books(sched)
    with pytest.raises(RuntimeError, match=re.escape(
            "Scheduler.admit() is the admit phase of step(): called outside one")):
        sched.admit(16, 4)
    (cand,) = sched.candidates(16, 4)
    with pytest.raises(RuntimeError, match=re.escape("Scheduler.start() is the admit phase")):
        sched.start(cand, 0, 10)
    assert books(sched) == before
    sched.check_invariants()
    sched.manager.check_invariants()
    step = sched.step()  # the request's one admission, a query
    assert step.context_chunks == (("a", 0, 10, 0),)
    sched.update(step, {"a": 7})
    s = sched.manager.stats
    assert (s.num_admitted, s.num_prompt_tokens, s.num_resumed, s.num_failed_computes) == (
        1, 10, 0, 0)


@pytest.mark.parametrize(("args", "error", "message"), [
    ((float("nan"), 4), ValueError, "budget must be an integer >= 0, got nan"),
    ((None, 4), ValueError, "budget must be an integer >= 0, got None"),
    ((-1, 4), ValueError, "budget must be an integer >= 0, got -1"),
    ((True, 4), ValueError, "budget must be an integer >= 0, got True"),
    ((16, -1), ValueError, "slots must be an integer >= 0, got -1"),
    ((16, 1.5), ValueError, "slots must be an integer >= 0, got 1.5"),
    ((16, 4, "ab"), TypeError, "exclude must be a collection of request ids, got 'ab'"),
    ((16, 4, 3), TypeError, "exclude must be a collection of request ids, got 3"),
])
def test_candidates_refuse_a_budget_slots_or_exclude_of_the_wrong_kind(
        args: tuple[Any, ...], error: type[Exception], message: str) -> None:
    """candidates() offered a request for a NaN budget or slots of -1 (past any budget or
    batch), excluded 'a' for an exclude of 'ab', and raised bare TypeErrors for None."""
    sched = Scheduler(make_manager(), SchedulerConfig(max_num_tokens=16))
    sched.add_request(Request("a", list(range(10)), 3))
    before = books(sched)
    with pytest.raises(error, match=re.escape(message)):
        sched.candidates(*args)
    assert books(sched) == before
    assert [c.request.request_id for c in sched.candidates(16, 4, ["b"])] == ["a"]
    assert sched.candidates(16, 4, {"a"}) == [] and sched.candidates(0, 4) == []


# ---- an int past Python's 4,300 digits, shown in a refusal --------------------------------

HUGE = 10**5000
BITS = f"an int of {HUGE.bit_length()} bits"


def huge_calls() -> list[tuple[str, Any, str]]:
    """(name, call on a manager with 'a' admitted part way, what the refusal says)."""
    return [
        # NOTE: every count is bounded now (red team 33c: at most 2**48 tokens, 2**32
        # blocks, kvtier.counts), so such an int is refused at its field, shown as it is.
        ("schedule_prefill", lambda m: m.schedule_prefill("a", HUGE),
         f"num_tokens must be an integer in 1..2**48, got {BITS}"),
        ("num_reserved_blocks", lambda m: m.add_sequence(
            SequenceSpec("b", list(range(10)), num_reserved_blocks=HUGE)),
         f"num_reserved_blocks must be an integer in 0..4294967296, got {BITS}"),
        ("decode_start", lambda m: m.add_sequence(
            SequenceSpec("b", [1, 2], retention=Retention(decode_start=HUGE))),
         f"decode_start must be an integer in 1..2**48, got {BITS}"),
        ("mm offset", lambda m: m.lookup([1, 2], mm_items=[MultimodalItem(HUGE, 1, 7)]),
         f"MultimodalItem.offset must be an integer in 0..2**48, got {BITS}"),
        ("mm length", lambda m: m.lookup([1, 2], mm_items=[MultimodalItem(0, HUGE, 7)]),
         f"MultimodalItem.length must be an integer in 1..2**48, got {BITS}"),
        ("max_output_tokens", lambda m: Scheduler(m).add_request(Request("b", [1], HUGE)),
         f"max_output_tokens of 'b' must be an integer in 1..2**48, got {BITS}"),
        ("range start", lambda m: RetentionRange(HUGE, None, 5),
         f"start of a retention range must be an integer in 0..2**48, got {BITS}"),
        ("range end", lambda m: RetentionRange(3, HUGE, 5),
         f"end of the retention range starting at 3 must be None or an integer in 4..2**48, "
         f"got {BITS}"),
        ("range priority", lambda m: RetentionRange(3, None, HUGE),
         f"priority of the retention range at 3 must be an integer in 0..100, got {BITS}"),
    ]


@pytest.mark.parametrize(("name", "call", "message"), huge_calls(),
                         ids=[c[0] for c in huge_calls()])
def test_a_refusal_of_an_int_past_4300_digits_names_it(name: str, call: Any,
                                                       message: str) -> None:
    """A refusal showing a caller's int of more than 4,300 digits with {value} raised a
    bare 'Exceeds the limit (4300 digits) for integer string conversion', naming no field
    (a retention range starting there could not be made at all: its messages are built
    for every range); each is shown as reprs.shown shows it, nothing changed."""
    mgr = make_manager()
    mgr.add_sequence(SequenceSpec("a", list(range(10)), num_new_tokens=4))
    before = (mgr.version, mgr.num_sequences, mgr.num_free_gpu_blocks, mgr.stats.as_dict())
    with pytest.raises(ValueError, match=re.escape(message)):
        call(mgr)
    assert (mgr.version, mgr.num_sequences, mgr.num_free_gpu_blocks,
            mgr.stats.as_dict()) == before
    mgr.check_invariants()


def test_a_retention_range_starting_past_any_prompt_is_made_and_admitted() -> None:
    """A range past any prompt is valid (it keeps no block): one starting at 2**48, the
    bound of every count (red team 33c; one past 4,300 digits could not be made, its
    checks' messages raising as they were built)."""
    assert RetentionRange(2**48, None, 5).start == 2**48
    mgr = make_manager()
    spec = SequenceSpec("b", [1, 2, 3, 4, 5],
                        retention=Retention((RetentionRange(2**48, None, 5),)))
    assert mgr.add_sequence(spec).admitted
    mgr.remove_sequence("b")
    mgr.check_invariants()


# ---- a machine: each tier's hit tokens are what lookup promised, batch by batch ------------

class TierBooks(RuleBasedStateMachine):
    """The manager alone under batches of queries, recomputes (``resumed``) and requests
    that skip the cache, with partial reuse, host offload, imports, failed copies, key-space
    drops and resets. A reference takes each spec's ``lookup_spec`` just before its batch
    (what the admission promises, tier by tier) and counts the admitted ones as the stats
    must: a query's reuse split GPU / host, a recompute's apart, a skip in neither; a
    request a failed copy aborts computed nothing since its admission (no call here grows
    one), so its reuse is taken back and counted lost (red team 29b). After every
    operation the stats equal the reference exactly, and the tokens agree with the
    blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.mgr = make_manager()
        self.num = 0
        self.ref = dict.fromkeys(("prompt", "reused", "host", "partial", "resumed_prompt",
                                  "resumed_reused", "admitted", "gpu_blocks", "host_blocks",
                                  "lost"), 0)
        # Per live request that looked the cache up: what its admission counted.
        self.counted: dict[str, dict[str, int]] = {}

    @initialize(num_gpu=st.integers(4, 12), num_host=st.sampled_from([0, 3, 8]),
                partial=st.booleans(), copy_partial=st.booleans(),
                policy=st.sampled_from(["priority-lru", "lru", "kvtier-predict-cost"]))
    def setup(self, num_gpu: int, num_host: int, partial: bool, copy_partial: bool,
              policy: str) -> None:
        self.mgr = KVCacheManager(CacheConfig(
            tokens_per_block=4, num_gpu_blocks=num_gpu, num_host_blocks=num_host,
            enable_partial_reuse=partial, copy_on_partial_reuse=copy_partial,
            eviction_policy=policy))

    @rule(data=st.data(), size=st.integers(1, 3))
    def batch(self, data: st.DataObject, size: int) -> None:
        mgr = self.mgr
        specs = []
        for _ in range(size):
            self.num += 1
            prefix = data.draw(st.integers(0, 2))
            length = data.draw(st.integers(1, 14))
            specs.append(SequenceSpec(
                f"r{self.num}", [prefix * 100 + i for i in range(length)],
                salt=data.draw(st.sampled_from([None, None, "t"])),
                num_new_tokens=data.draw(st.sampled_from([None, None, 1, 3])),
                resumed=data.draw(st.booleans()),
                skip_reading_prefix_cache=data.draw(st.sampled_from([False] * 4 + [True]))))
        promised = [mgr.lookup_spec(spec) for spec in specs]
        try:
            admissions = mgr.add_sequence_batch(specs)
        except ValueError:
            return  # a batch no empty pool holds: refused, nothing changed
        tpb = mgr.config.tokens_per_block
        for spec, m, adm in zip(specs, promised, admissions, strict=True):
            if not adm.admitted:
                continue
            self.ref["admitted"] += 1
            assert adm.num_reused_tokens == (0 if spec.skip_reading_prefix_cache
                                             else m.num_tokens), (spec, m, adm)
            if spec.skip_reading_prefix_cache:
                continue
            self.ref["prompt" if not spec.resumed else "resumed_prompt"] += len(
                spec.token_array)
            if spec.resumed:
                counted = {"resumed_reused": m.num_tokens}
            else:
                partial_gpu = m.num_partial_tokens if m.num_gpu_tokens % tpb else 0
                counted = {"reused": m.num_tokens, "host": m.num_host_tokens,
                           "partial": m.num_partial_tokens,
                           "gpu_blocks": (m.num_gpu_tokens - partial_gpu) // tpb,
                           "host_blocks": (m.num_host_tokens - (
                               m.num_partial_tokens - partial_gpu)) // tpb}
            for name, n in counted.items():
                self.ref[name] += n
            self.counted[spec.request_id] = counted
        if data.draw(st.booleans()):
            plan = mgr.take_plan()
            if len(plan) and data.draw(st.booleans()):
                aborted = mgr.transfer_failed(plan, [data.draw(st.integers(0, len(plan) - 1))])
                for rid in aborted:
                    counted = self.counted.pop(rid, {})
                    for name, n in counted.items():
                        self.ref[name] -= n
                    self.ref["lost"] += counted.get("reused", counted.get("resumed_reused", 0))

    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        mgr = self.mgr
        live = [f"r{i}" for i in range(1, self.num + 1) if mgr.has_sequence(f"r{i}")]
        if live:
            rid = data.draw(st.sampled_from(live))
            while mgr.num_unscheduled_tokens(rid):
                mgr.schedule_prefill(rid, mgr.num_unscheduled_tokens(rid))
            mgr.remove_sequence(rid)
            self.counted.pop(rid, None)

    @rule(prefix=st.integers(0, 2), length=st.integers(4, 14), num_blocks=st.integers(1, 3))
    def import_blocks(self, prefix: int, length: int, num_blocks: int) -> None:
        self.mgr.import_blocks([prefix * 100 + i for i in range(length)], num_blocks)

    @rule(salt=st.sampled_from([None, "t"]))
    def drop(self, salt: str | None) -> None:
        self.mgr.drop_key_space(salt=salt)

    @rule()
    def reset(self) -> None:
        self.mgr.reset_cache()

    @invariant()
    def books_agree(self) -> None:
        mgr = self.mgr
        mgr.check_invariants()
        s, ref = mgr.stats, self.ref
        assert (s.num_admitted, s.num_prompt_tokens, s.num_reused_tokens,
                s.num_host_reused_tokens, s.num_partial_tokens) == (
            ref["admitted"], ref["prompt"], ref["reused"], ref["host"], ref["partial"])
        assert (s.num_resumed_prompt_tokens, s.num_resumed_reused_tokens) == (
            ref["resumed_prompt"], ref["resumed_reused"])
        assert (s.gpu.reused_blocks, s.host.reused_blocks, s.num_lost_reused_tokens) == (
            ref["gpu_blocks"], ref["host_blocks"], ref["lost"])
        tpb = mgr.config.tokens_per_block
        assert (s.gpu.reused_blocks + s.host.reused_blocks) * tpb + s.num_partial_tokens == \
            s.num_reused_tokens


TierBooks.TestCase.settings = settings(max_examples=int(os.environ.get("RT25_EXAMPLES", "150")),
                                       stateful_step_count=40, deadline=None)
test_each_tiers_hit_tokens_are_what_lookup_promised = TierBooks.TestCase


@pytest.mark.parametrize("rid", [np.str_("a"), type("Sub", (str,), {})("a"), ["a"], b"a", None])
def test_has_sequence_answers_as_every_call_naming_a_live_request(rid: Any) -> None:
    """has_sequence said True for NumPy's str_('a') while 'a' was live, and the calls
    naming it (remove_sequence, block_table, num_unscheduled_tokens) raised KeyError
    'unknown request_id' for it: a caller that checked first was refused anyway. Now
    (red team 33c) a str subclass names its str's request in every call, as the
    scheduler's; what is no str names none."""
    mgr = make_manager()
    mgr.add_sequence(SequenceSpec("a", list(range(10))))
    assert mgr.has_sequence("a")
    if isinstance(rid, str):
        assert mgr.has_sequence(rid)
        assert mgr.block_table(rid) == mgr.block_table("a")
        assert mgr.num_unscheduled_tokens(rid) == 0
        mgr.remove_sequence(rid)
        assert not mgr.has_sequence("a") and mgr.num_sequences == 0
        return
    assert not mgr.has_sequence(rid)
    for call in (mgr.block_table, mgr.num_unscheduled_tokens, mgr.remove_sequence):
        with pytest.raises(KeyError, match="unknown request_id"):
            call(rid)
    assert mgr.has_sequence("a") and mgr.num_sequences == 1


def test_hold_release_and_abort_take_an_id_of_a_str_subclass_as_requeue_failed_does() -> None:
    """hold, release and abort refused NumPy's str_('a') as 'no str' (TypeError "must be a
    str, got str_"), while requeue_failed and update's stopped take it as the str it
    equals; passed on as it is, the manager would not find the request it names."""
    sched = Scheduler(make_manager(), SchedulerConfig(max_num_tokens=16))
    sched.add_request(Request("a", list(range(10)), 3))
    sched.add_request(Request("b", list(range(20, 30)), 3))
    sched.hold(np.str_("a"))
    step = sched.step()  # 'a' held: 'b' alone
    assert [c.request_id for c in step.context_chunks] == ["b"]
    sched.update(step, {"b": 7})
    sched.release(np.str_("a"))
    step = sched.step()
    assert [c.request_id for c in step.context_chunks] == ["a"]
    sched.update(step, {"a": 7, "b": 7})
    aborted = sched.abort(np.str_("a"))
    assert aborted is not None and aborted.request_id == "a"
    assert list(sched.running) == ["b"] and not sched.manager.has_sequence("a")
    assert sched.manager.num_sequences == 1
    sched.check_invariants()
    sched.manager.check_invariants()
    with pytest.raises(TypeError, match=re.escape("request_id must be a str, got b'b'")):
        sched.hold(b"b")  # type: ignore[arg-type]


def test_a_request_whose_decode_start_lies_past_its_tokens_is_refused_when_built() -> None:
    """A Request took a retention whose decode_start lies past its prompt, and add_request
    refused it only when building its spec, after replacing the request's prompt, output
    and mm_items by copies (a refused call changed the caller's request)."""
    with pytest.raises(ValueError, match=re.escape(
            "retention of request 'a': decode_start 50 lies past the 5 tokens admitted")):
        Request("a", [1, 2, 3, 4, 5], 3, retention=Retention(decode_start=50))
    prompt = [1, 2, 3, 4, 5]
    items: Any = [MultimodalItem(0, 2, 7)]  # a list, as a caller may give it
    req = Request("a", [1, 2, 3, 4, 5], 3, mm_items=items)
    req.prompt, req.mm_items = prompt, items
    req.retention = Retention(decode_start=50)
    sched = Scheduler(make_manager())
    with pytest.raises(ValueError, match=re.escape("decode_start 50 lies past the 5 tokens")):
        sched.add_request(req)
    assert req.prompt is prompt and req.mm_items is items and not req.held
    assert not sched.waiting and not sched.has_unfinished()
    req.retention = Retention(decode_start=5)
    sched.add_request(req)
    assert [r.request_id for r in sched.waiting] == ["a"]


@pytest.mark.parametrize("name", ["kvtier-predict-cost", "kvtier-predict", "arc", "s3fifo"])
def test_a_learning_policy_handed_to_a_second_manager_is_refused(name: str) -> None:
    """A policy object serves one cache: handed to a second manager, a learner was bound
    again (ghost bounds and LRU witness resized to the second cache, both caches' releases
    learned as one stream), the first manager's eviction changed under it without a word.
    Refused, naming the policy; the first manager's policy is as it was."""
    policy = get_policy(name)
    first = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8), policy=policy)
    before = (policy.ghosts.max_blocks, getattr(policy, "witness", None))  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=re.escape(
            f"this {name} policy object serves a cache already")):
        KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=64, num_host_blocks=64),
                       policy=policy)
    assert (policy.ghosts.max_blocks, getattr(policy, "witness", None)) == before  # type: ignore[attr-defined]
    assert first.add_sequence(SequenceSpec("a", list(range(9)))).admitted
    first.check_invariants()
    second = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=64),
                            policy=get_policy(name))
    assert second.eviction_policy_name == name
