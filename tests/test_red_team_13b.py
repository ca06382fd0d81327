"""Red team, thirteenth pass (b): this session's new calls (``reset_prefix_cache`` with and
without running requests, ``drop_lora`` / ``drop_salt``, ``skip_reading_prefix_cache``,
``import_blocks`` with multimodal items) mixed at random with everything else the scheduler
and the manager do: steps and updates under a small GPU pool with a host tier (preemption),
aborts, ``compute_failed``, ``transfer_failed`` of a step's plan, speculative decoding.

A fake data plane gives every KV slot the content it holds (the key space and the tokens up
to each position), runs each step's plan over it, checks that every position a request
computes from holds what a cacheless run would have put there, and writes what the step
computes (garbage where its forward pass failed, the drafter's guesses for drafts). The
model samples a deterministic function of the tokens so far, so every request must finish
with the output a cacheless run gives."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from event_view import replay
from kvtier import CacheConfig, KVCacheManager, MultimodalItem
from kvtier.scheduler import Request, ScheduledStep, Scheduler, SchedulerConfig
from kvtier.tier import Tier
from kvtier.transfer.plan import TransferOp
from plan_ops import apply_op

TPB = 4
GARBAGE = ("garbage",)


def next_token(tokens: list[int]) -> int:
    """The model: the token after ``tokens`` (a deterministic function of them)."""
    return (sum(t * (i + 3) for i, t in enumerate(tokens)) + len(tokens)) % 5 + 1


def cacheless_output(prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


def content(key: tuple[object, object], tokens: list[int], position: int) -> tuple[object, ...]:
    """What the KV of ``position`` holds: its key space and every token up to it."""
    return (key, tuple(tokens[:position + 1]))


PROMPTS = st.lists(st.sampled_from([1, 2, 3]), min_size=1, max_size=14)
SALTS = st.sampled_from([None, None, "t", 7])
LORAS = st.sampled_from([None, None, 1, 2])


class NewCallsUnderScheduling(RuleBasedStateMachine):
    """The scheduler and manager, every call at random, over the fake data plane."""

    def __init__(self) -> None:
        super().__init__()
        self.gpu: dict[int, list[object]] = {}
        self.host: dict[int, list[object]] = {}
        self.requests: dict[str, Request] = {}
        self.finished: dict[str, list[int]] = {}
        self.tiers: dict[int, Tier] = {}
        self.n = 0

    @initialize(drafts=st.sampled_from([0, 0, 2]), gpu=st.integers(8, 14),
                host=st.sampled_from([0, 6]), evict=st.booleans(), chunked=st.booleans())
    def build(self, drafts: int, gpu: int, host: int, evict: bool, chunked: bool) -> None:
        self.make(drafts, gpu, host, evict, chunked)

    def make(self, drafts: int, gpu: int, host: int, evict: bool, chunked: bool,
             clock: Any = None) -> None:
        """The manager, scheduler and fake data plane of a drawn setup."""
        config = CacheConfig(tokens_per_block=TPB, num_gpu_blocks=gpu, num_host_blocks=host,
                             enable_events=True)
        self.mgr = (KVCacheManager(config) if clock is None
                    else KVCacheManager(config, clock=clock))
        self.sched = Scheduler(self.mgr, SchedulerConfig(
            max_num_tokens=12 if chunked else 16, enable_chunked_prefill=chunked,
            capacity_policy="max_utilization" if evict else "guaranteed_no_evict",
            num_speculative_tokens=drafts))
        self.gpu = {s: [None] * TPB for s in range(gpu)}
        self.host = {s: [None] * TPB for s in range(host)}

    # ---- the data plane ----------------------------------------------------------------

    def run_plan(self, step: ScheduledStep, skip: set[int]) -> None:
        for i in range(len(step.transfer_plan)):
            if i not in skip:
                self.run_op(step.transfer_plan.op(i))

    def run_op(self, op: TransferOp) -> None:
        """One copy on the fake data plane."""
        apply_op(op, self.gpu, self.host)

    def work(self, step: ScheduledStep) -> dict[str, tuple[int, list[int], list[int], Any]]:
        """Per request of ``step``: the first position it computes and the tokens whose KV
        it computes from there on (drafts: the drafter's guesses)."""
        out: dict[str, tuple[int, list[int], list[int], Any]] = {}
        for chunk in step.context_chunks:
            req = self.sched.running[chunk.request_id]
            tokens = req.tokens[:chunk.first_token + chunk.num_tokens]
            out[chunk.request_id] = (chunk.first_token, tokens,
                                     self.mgr.block_table(chunk.request_id),
                                     (req.salt, req.lora_id))
        drafts = step.num_draft_tokens or (0,) * len(step.decode_request_ids)
        for rid, d in zip(step.decode_request_ids, drafts, strict=True):
            req = self.sched.running[rid]
            tokens = req.tokens
            truth = cacheless_output(tokens, d)
            good = self.guesses.get(rid, d)
            guess = truth[:good] + [(t % 5) + 1 for t in truth[good:]]  # wrong past good
            out[rid] = (len(tokens) - 1, tokens + guess, self.mgr.block_table(rid),
                        (req.salt, req.lora_id))
        return out

    def content_of(self, key: Any, tokens: list[int], p: int) -> Any:
        """The KV position ``p`` of ``tokens`` holds in the key space ``key``."""
        return content(key, tokens, p)

    def check_reads_and_write(self, work: dict[str, tuple[int, list[int], list[int], Any]],
                              failed: set[str]) -> None:
        for rid, (first, tokens, table, key) in work.items():
            if rid not in failed:
                for p in range(first):
                    held = self.gpu[table[p // TPB]][p % TPB]
                    assert held == self.content_of(key, tokens, p), (rid, p, held, tokens)
            for p in range(first, len(tokens)):
                self.gpu[table[p // TPB]][p % TPB] = (
                    GARBAGE if rid in failed else self.content_of(key, tokens, p))

    # ---- rules ---------------------------------------------------------------------------

    @rule(reqs=st.lists(st.tuples(PROMPTS, st.integers(1, 6), SALTS, LORAS, st.booleans(),
                                  st.sampled_from([None, 5.0])), min_size=1, max_size=3))
    def add(self, reqs: list[tuple[list[int], int, Any, int | None, bool, float | None]]
            ) -> None:
        for prompt, out, salt, lora, skip, retention in reqs:
            self.n += 1
            req = Request(f"r{self.n}", prompt, out, salt=salt, lora_id=lora,
                          retention_s=retention, priority=None if retention is None else 80,
                          skip_reading_prefix_cache=skip)
            try:
                self.sched.add_request(req)
            except ValueError as e:
                assert "needs" in str(e), e  # too long for the pool
                continue
            self.requests[req.request_id] = req

    @rule(data=st.data(), fail=st.sampled_from(["none", "none", "compute", "transfer"]))
    def step(self, data: st.DataObject, fail: str) -> None:
        sched, mgr = self.sched, self.mgr
        step = sched.step()
        # The reuse the chunks report is what the scheduler budgeted (claim admission's
        # exact credit); a request skipping the cache reuses nothing.
        assert sum(c.num_reused_tokens for c in step.context_chunks) == step.num_reused_tokens
        assert step.num_reused_tokens == step.num_credited_tokens, step
        assert step.num_scheduled_tokens <= sched.config.max_num_tokens, step
        for c in step.context_chunks:
            assert c.num_reused_tokens in (0, c.first_token), c
            if self.requests[c.request_id].skip_reading_prefix_cache:
                assert c.num_reused_tokens == 0, c
        drafts = step.num_draft_tokens or (0,) * len(step.decode_request_ids)
        self.guesses = {rid: data.draw(st.integers(0, d)) for rid, d in
                        zip(step.decode_request_ids, drafts, strict=True)}
        work = self.work(step)
        failed: set[str] = set()
        if fail == "transfer" and len(step.transfer_plan):
            n = len(step.transfer_plan)
            bad = set(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n)))
            self.run_plan(step, bad)
            gone = mgr.transfer_failed(step.transfer_plan, sorted(bad))
            step = sched.requeue_failed(step, gone)
            for rid in gone:
                work.pop(rid, None)
        else:
            self.run_plan(step, set())
        if fail == "compute" and work:
            chosen = data.draw(st.lists(st.sampled_from(sorted(work)), min_size=1,
                                        unique=True))
            failed = set(mgr.compute_failed(chosen))
            assert set(chosen) <= failed
        self.check_reads_and_write(work, failed)
        if failed:
            step = sched.requeue_failed(step, sorted(failed))
        self.apply(step)

    def apply(self, step: ScheduledStep) -> None:
        for req in self.sched.update(step, self.sampled_of(step)):
            self.finished[req.request_id] = list(req.output)

    def sampled_of(self, step: ScheduledStep) -> dict[str, Any]:
        """What the model samples in ``step``: the cacheless run's next token of every
        request whose prefill completes, and of every decode (its accepted drafts too)."""
        sched = self.sched
        sampled: dict[str, Any] = {}
        for chunk in step.context_chunks:
            req = sched.running[chunk.request_id]
            if chunk.first_token + chunk.num_tokens >= req.num_prefill_tokens:
                sampled[chunk.request_id] = next_token(req.tokens)
        drafts = step.num_draft_tokens or (0,) * len(step.decode_request_ids)
        for rid, d in zip(step.decode_request_ids, drafts, strict=True):
            req = sched.running[rid]
            good = self.guesses.get(rid, 0) if d else 0
            tokens = cacheless_output(req.tokens, good + 1)
            sampled[rid] = tokens if sched.config.num_speculative_tokens else tokens[0]
        return sampled

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.requests)))
        if self.sched.abort(rid) is not None:
            del self.requests[rid]

    @precondition(lambda self: self.sched.running)
    @rule(data=st.data())
    def fail_between_steps(self, data: st.DataObject) -> None:
        """compute_failed after the update (allowed between steps): the scheduler finds
        the requests it dropped at the next call."""
        live = [rid for rid in self.sched.running if self.mgr.has_sequence(rid)]
        if live:
            self.mgr.compute_failed([data.draw(st.sampled_from(live))])

    @rule(running=st.booleans())
    def reset(self, running: bool) -> None:
        sched = self.sched
        order = list(sched.running)
        waiting = [r.request_id for r in sched.waiting]
        done = sched.reset_prefix_cache(running)
        if order and not running:
            assert not done
            return
        assert done
        assert self.mgr.cached_blocks() == []
        assert [r.request_id for r in sched.waiting] == order + waiting
        assert not sched.running and self.mgr.num_sequences == 0

    @rule(which=st.sampled_from(["key_space", "lora", "salt"]), lora=st.sampled_from([1, 2]),
          salt=st.sampled_from(["t", 7]))
    def drop(self, which: str, lora: int, salt: object) -> None:
        held = set()
        for rid in self.sched.running:
            if self.mgr.has_sequence(rid):
                held.update(self.mgr.block_table(rid))
        if which == "key_space":
            self.mgr.drop_key_space(lora_id=lora, salt=salt)  # type: ignore[arg-type]
        elif which == "lora":
            self.mgr.drop_lora(lora)
        else:
            self.mgr.drop_salt(salt)  # type: ignore[arg-type]
        for b in self.mgr.cached_blocks():
            gone = ((b.lora_id, b.salt) == (lora, salt) if which == "key_space" else
                    b.lora_id == lora if which == "lora" else b.salt == salt)
            if gone and b.tier is Tier.GPU:
                assert b.priority is None or b.slot in held, b

    @rule(prompt=PROMPTS, n=st.integers(1, 3), salt=SALTS, lora=LORAS, image=st.booleans())
    def import_blocks(self, prompt: list[int], n: int, salt: object, lora: int | None,
                      image: bool) -> None:
        items = [MultimodalItem(0, min(len(prompt), 2), "img")] if image else []
        slots = self.mgr.import_blocks(prompt, n, salt, lora, mm_items=items)  # type: ignore[arg-type]
        parents = {b.block_hash: b.parent_hash for b in self.mgr.cached_blocks()}
        for b in self.mgr.cached_blocks():
            if b.tier is not Tier.HOST or b.slot not in slots:
                continue
            depth, parent = 0, b.parent_hash  # the block's index in the prompt
            while parent is not None:
                depth, parent = depth + 1, parents[parent]
            # Where an image keys the block, no text request may ever read it.
            self.host[b.slot] = [("image",) if image else content((salt, lora), prompt, p)
                                 for p in range(depth * TPB, (depth + 1) * TPB)]

    # ---- checks after every operation ----------------------------------------------------

    @invariant()
    def books_and_events_hold(self) -> None:
        if not hasattr(self, "mgr"):
            return
        self.mgr.check_invariants()
        replay(self.mgr.drain_events(), self.tiers)
        assert self.tiers == {b.block_hash: b.tier for b in self.mgr.cached_blocks()}

    def teardown(self) -> None:
        if not hasattr(self, "mgr") or self.sched._unapplied is not None:
            return  # a rule failed part way
        self.guesses = {}
        for _ in range(200):
            if not self.sched.has_unfinished():
                break
            self.step_plain()
        assert not self.sched.has_unfinished()
        for rid, req in self.requests.items():
            assert self.finished[rid] == cacheless_output(req.prompt, req.max_output_tokens), rid
        mgr = self.mgr
        mgr.check_invariants()
        assert mgr.num_sequences == 0
        assert mgr.num_free_gpu_blocks == mgr.config.num_gpu_blocks
        assert mgr.num_free_host_blocks == mgr.config.num_host_blocks
        assert all(b.priority is not None for b in mgr.cached_blocks())
        replay(mgr.drain_events(), self.tiers)
        assert self.tiers == {b.block_hash: b.tier for b in mgr.cached_blocks()}

    def step_plain(self) -> None:
        step = self.sched.step()
        self.guesses = {}
        work = self.work(step)
        self.run_plan(step, set())
        self.check_reads_and_write(work, set())
        self.apply(step)


def test_new_calls_in_random_order_keep_outputs_blocks_and_events_exact() -> None:
    run_state_machine_as_test(NewCallsUnderScheduling, settings=settings(
        max_examples=100, stateful_step_count=30, deadline=None,
        suppress_health_check=list(HealthCheck)))


# ---- defects the state machine found: a running request the manager dropped between steps --


def dropped_between_steps() -> tuple[KVCacheManager, Scheduler]:
    """Two requests decoding; then ``compute_failed`` (allowed between steps) drops 'a'."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16))
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=32))
    sched.add_request(Request("a", [1, 2, 3, 4, 5], 3))
    sched.add_request(Request("b", [1, 2, 3, 5, 9], 3))  # not a's first block: no wait
    sched.update(sched.step(), {"a": 6, "b": 6})
    assert mgr.compute_failed(["a"]) == ["a"]
    return mgr, sched


def test_abort_of_a_request_the_manager_dropped_returns_it() -> None:
    """abort('a') took 'a' out of ``running``, then the manager's remove_sequence raised
    KeyError ("unknown request_id 'a'"): the caller saw the abort fail, yet 'a' was in
    neither queue and never finished. Now the abort returns it, as for any running request,
    and 'b' runs to its end with every block released."""
    mgr, sched = dropped_between_steps()
    req = sched.abort("a")
    assert req is not None and req.request_id == "a" and req.output == [6]
    assert list(sched.running) == ["b"] and not sched.waiting
    step = sched.step()
    assert step.decode_request_ids == ("b",) and step.context_chunks == ()
    sched.update(step, {"b": 7})
    assert [r.output for r in sched.update(sched.step(), {"b": 8})] == [[6, 7, 8]]
    mgr.check_invariants()
    assert mgr.num_sequences == 0 and mgr.num_free_gpu_blocks == 16


def test_a_plain_reset_is_refused_while_a_dropped_request_still_runs() -> None:
    """reset_prefix_cache() without reset_running_requests is refused while a request runs
    (vLLM's rule), but asked the manager only: with 'a' dropped by the manager and 'b'
    aborted, it cleared the cache under the running 'a'. Now it is refused (False, the
    cache kept); with the flag 'a' is requeued and recomputes."""
    mgr, sched = dropped_between_steps()
    sched.abort("b")
    cached = mgr.cached_blocks()
    assert [b.tokens for b in cached] == [(1, 2, 3, 5)]  # b's full block, released
    assert sched.reset_prefix_cache() is False
    assert mgr.cached_blocks() == cached and list(sched.running) == ["a"]
    assert sched.reset_prefix_cache(True) is True
    assert mgr.cached_blocks() == [] and [r.request_id for r in sched.waiting] == ["a"]
    step = sched.step()
    assert step.preempted_request_ids == ("a",)
    assert [(c.request_id, c.first_token, c.num_tokens) for c in step.context_chunks] == [
        ("a", 0, 6)]
