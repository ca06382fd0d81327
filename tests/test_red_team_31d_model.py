"""Red team 31d, the state machine: test_manager_model's physical-memory machine with the
operations it never combined: speculative lookahead (its slots written with draft KV that
must never be cached), failed forward passes (``compute_failed``, their blocks garbage),
``reset_cache`` (refused while requests live), ``drop_key_space``, a manager pickled and
restored in the middle of anything (a step included), request ids reused after removal,
decodes as ``append_token_columns``, and host tiers of 0 and 1 blocks. Every check of the
base machine holds after every step."""

from __future__ import annotations

import itertools
import pickle
from unittest import mock

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, precondition, rule, run_state_machine_as_test

from kvtier import KVCacheManager, Retention, RetentionRange, SequenceSpec, Tier
from kvtier.config import EVICTION_POLICIES
from plan_caller import PlanCaller
from test_manager_model import (
    ALPHABET,
    GARBAGE,
    NAMESPACES,
    PRIORITIES,
    RETENTIONS,
    ManagerModel,
    PhysicalMemory,
    cached_blocks,
    ceil_div,
)


class ModelClock:
    """The manager's clock, one for every copy: a pickled manager reads this same clock."""

    now = 0.0

    def __call__(self) -> float:
        return self.now

    def __reduce__(self) -> str:
        return "CLOCK"


CLOCK = ModelClock()


class ManagerModel31d(ManagerModel):
    """The base machine, plus lookahead, failed passes, resets, key-space drops, pickling
    and reused ids."""

    columns = True

    @initialize(
        tpb=st.sampled_from([1, 2, 4]),
        num_gpu_blocks=st.integers(4, 24),
        num_host_blocks=st.one_of(st.sampled_from([0, 1]), st.integers(0, 16)),
        partial=st.booleans(),
        copy=st.booleans(),
        events=st.booleans(),
        policy=st.sampled_from(EVICTION_POLICIES),
        prefixes=st.lists(st.lists(ALPHABET, max_size=12), min_size=1, max_size=3),
        failures=st.booleans(),
        batch=st.integers(1, 4),
    )
    def setup(self, tpb: int, num_gpu_blocks: int, num_host_blocks: int, partial: bool,
              copy: bool, events: bool, policy: str, prefixes: list[list[int]],
              failures: bool, batch: int = 1) -> None:
        super().setup(tpb, num_gpu_blocks, num_host_blocks, partial, copy, events, policy,
                      prefixes, failures, batch)
        CLOCK.now = 0.0
        with mock.patch("kvtier.cache_state.eviction_batch", lambda capacity: batch):
            manager = KVCacheManager(self.config, clock=CLOCK)
        self.memory = PhysicalMemory(self.config)
        self.mgr = PlanCaller(manager, self.memory)
        self.removed_ids: list[str] = []
        self.hinted: list[SequenceSpec] = []

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0, 10.0]))
    def advance_clock(self, seconds: float) -> None:
        self.now += seconds
        CLOCK.now = self.now

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), store_for_reuse=st.booleans())
    def remove(self, data: st.DataObject, store_for_reuse: bool) -> None:
        rid = data.draw(st.sampled_from(sorted(self.requests)))
        num_plans = len(self.memory.plans)
        self.mgr.remove_sequence(rid, store_for_reuse=store_for_reuse)
        assert len(self.memory.plans) == num_plans
        del self.requests[rid]
        self.removed_ids.append(rid)

    # ---- the operations the base machine never made -----------------------------------

    @precondition(lambda self: any(r.num_scheduled == len(r.tokens) == r.num_computed
                                   for r in self.requests.values()))
    @rule(data=st.data())
    def lookahead(self, data: st.DataObject) -> None:
        """Reserve draft slots; outside a step, write draft KV into them at once (a
        speculative pass): none of it may ever be cached or read as a reused block."""
        tpb = self.tpb
        ready = sorted(rid for rid, r in self.requests.items()
                       if r.num_scheduled == len(r.tokens) == r.num_computed)
        rid = data.draw(st.sampled_from(ready))
        req = self.requests[rid]
        n = data.draw(st.integers(0, 2 * tpb + 1))
        need = max(0, ceil_div(len(req.tokens) + n, tpb) - len(req.block_ids))
        num_free = self.mgr.num_free_gpu_blocks
        self.arm_failures(data)
        new = self.mgr.reserve_lookahead(rid, n)
        if rid in self.recover():
            return
        if need > num_free + req.num_reserved_blocks:
            assert new is None, (need, num_free, new)
            assert self.mgr.block_table(rid) == req.block_ids
            return
        assert new is not None and len(new) == need, (need, new)
        req.block_ids += new
        req.num_reserved_blocks -= min(need, req.num_reserved_blocks)
        assert self.mgr.block_table(rid) == req.block_ids
        if not self.in_step and n:
            drafts = tuple(data.draw(st.lists(ALPHABET, min_size=n, max_size=n)))
            written = (*req.tokens, *drafts)
            gpu = self.memory.slots[Tier.GPU]
            for i in range(len(req.tokens) // tpb, ceil_div(len(written), tpb)):
                gpu[req.block_ids[i]] = ("draft", req.lora_id, written[: (i + 1) * tpb])
            # The draft KV of the last computed block: the tokens it already held stay.
            i = len(req.tokens) // tpb
            if len(req.tokens) % tpb:
                gpu[req.block_ids[i]] = (req.salt, req.lora_id, written[: (i + 1) * tpb])

    @precondition(lambda self: self.in_step and self.requests)
    @rule(data=st.data())
    def step_with_failed_passes(self, data: st.DataObject) -> None:
        """End the step; some requests' forward passes fail (their new KV is garbage), the
        rest compute; report the failed ones with ``compute_failed``."""
        failed = data.draw(st.lists(st.sampled_from(sorted(self.requests)), min_size=1,
                                    unique=True))
        self.mgr.end_step()
        self.in_step = False
        self.recover()
        failed = [rid for rid in failed if rid in self.requests]
        gpu = self.memory.slots[Tier.GPU]
        held = {rid: self.requests.pop(rid) for rid in failed}
        for req in held.values():
            for i in range(req.num_computed // self.tpb,
                           ceil_div(req.num_scheduled, self.tpb)):
                gpu[req.block_ids[i]] = GARBAGE
        self.run_forward_pass()
        self.requests.update(held)
        aborted = self.mgr.compute_failed(failed)
        assert set(failed) <= set(aborted), (failed, aborted)
        for rid in aborted:
            assert not self.mgr.has_sequence(rid), rid
            del self.requests[rid]
        self.recover()

    @rule()
    def reset(self) -> None:
        """``reset_cache``: refused with requests live, else every block free again."""
        num_free = self.mgr.num_free_gpu_blocks
        version = self.mgr.version
        done = self.mgr.reset_cache()
        if self.requests:
            assert not done
            assert self.mgr.num_free_gpu_blocks == num_free and self.mgr.version == version
            return
        assert done
        assert self.mgr.cached_blocks() == []
        assert self.mgr.num_free_gpu_blocks == self.config.num_gpu_blocks
        assert self.mgr.num_free_host_blocks == self.config.num_host_blocks

    @rule(key=st.sampled_from(NAMESPACES))
    def drop_key_space(self, key: tuple[object, int | None]) -> None:
        """Drop one tenant's cached blocks: theirs leave (except what live requests hold),
        every other key space keeps every block."""
        salt, lora_id = key
        before = cached_blocks(self.mgr)
        num_dropped = self.mgr.drop_key_space(lora_id=lora_id, salt=salt)
        after = cached_blocks(self.mgr)
        others = [(b.content, b.tier, b.slot) for b in before if b.content[:2] != key]
        assert [(b.content, b.tier, b.slot) for b in after if b.content[:2] != key] == others
        mine = [b for b in after if b.content[:2] == key]
        assert num_dropped == sum(b.content[:2] == key for b in before) - len(mine)
        # What stays is on a live request's path (its table may hold a private copy).
        assert all(b.tier is Tier.GPU for b in mine), mine
        if not self.requests:
            assert not mine, mine

    @rule(how=st.sampled_from(["pickle", "deepcopy"]))
    def restore_a_copy(self, how: str) -> None:
        """Go on with a pickled (or deep-copied) manager, mid-step or not: it has the same
        books, lookups and tables, and the original is dropped."""
        import copy
        manager = self.mgr.manager
        version = manager.version
        tables = {rid: manager.block_table(rid) for rid in self.requests}
        blocks = manager.cached_blocks()
        clone = (pickle.loads(pickle.dumps(manager)) if how == "pickle"
                 else copy.deepcopy(manager))
        clone.check_invariants()
        assert clone.version == version and clone.in_step == self.in_step
        assert {rid: clone.block_table(rid) for rid in self.requests} == tables
        assert clone.cached_blocks() == blocks
        assert clone.num_free_gpu_blocks == manager.num_free_gpu_blocks
        assert clone.num_reserved_blocks == manager.num_reserved_blocks
        self.mgr = PlanCaller(clone, self.memory)

    @precondition(lambda self: self.removed_ids and len(self.requests) < 5
                  and self.num_live_blocks() <= self.config.num_gpu_blocks // 2)
    @rule(data=st.data())
    def admit_a_reused_id(self, data: st.DataObject) -> None:
        """A request id admitted again after its removal is a new request."""
        rid = data.draw(st.sampled_from(self.removed_ids))
        tpb = self.tpb
        max_len = min(24, max(self.config.num_gpu_blocks // 2, 2) * tpb)
        tokens, salt, lora_id = self.draw_prompt(data, max_len)
        self.removed_ids.remove(rid)
        self.arm_failures(data)
        self.admit([SequenceSpec(rid, tokens, salt=salt, lora_id=lora_id)])
        if rid in self.requests:
            self.history.append((list(tokens), salt, lora_id))
        else:
            self.removed_ids.append(rid)


    @rule(data=st.data())
    def hint(self, data: st.DataObject) -> None:
        """Hint a waiting queue (often the last one again, or it less its head plus a new
        request): lookups and the version stay as they were."""
        how = data.draw(st.sampled_from(["same", "shift", "fresh"]))
        if how == "fresh" or not self.hinted:
            specs = []
            for _ in range(data.draw(st.integers(0, 4))):
                tokens, salt, lora_id = self.draw_prompt(data, 24)
                specs.append(SequenceSpec(f"w{self.num_ids}", tokens, salt=salt,
                                          lora_id=lora_id))
                self.num_ids += 1
        elif how == "shift":
            tokens, salt, lora_id = self.draw_prompt(data, 24)
            specs = [*self.hinted[1:], SequenceSpec(f"w{self.num_ids}", tokens, salt=salt,
                                                    lora_id=lora_id)]
            self.num_ids += 1
        else:
            specs = self.hinted
        probes = [(list(s.tokens), s.salt, s.lora_id) for s in specs] + self.history[-4:]
        version = self.mgr.version
        lookups = [self.mgr.lookup(t, salt=s, lora_id=lo) for t, s, lo in probes]
        self.mgr.hint_waiting(specs)
        assert self.mgr.version == version
        assert [self.mgr.lookup(t, salt=s, lora_id=lo) for t, s, lo in probes] == lookups
        self.hinted = specs


    @precondition(lambda self: len(self.requests) < 5
                  and self.num_live_blocks() <= self.config.num_gpu_blocks // 2)
    @rule(data=st.data())
    def admit_with_retention(self, data: st.DataObject) -> None:
        """A request whose token ranges carry priorities and retentions of their own (and
        its decoded blocks another): its blocks are cut where they change."""
        tpb = self.tpb
        max_len = min(24, max(self.config.num_gpu_blocks // 2, 2) * tpb)
        tokens, salt, lora_id = self.draw_prompt(data, max_len)
        edges = sorted(set(data.draw(st.lists(st.integers(0, len(tokens)), max_size=4))))
        ranges = [RetentionRange(a, b if b < len(tokens) or data.draw(st.booleans())
                                 else None, data.draw(st.sampled_from(PRIORITIES[1:])),
                                 data.draw(st.sampled_from(RETENTIONS)))
                  for a, b in itertools.pairwise(edges)]
        decode = data.draw(st.sampled_from([None, 0, 50, 100]))
        retention = Retention(
            tuple(ranges), decode_priority=decode,
            decode_retention_s=None if decode is None else data.draw(
                st.sampled_from(RETENTIONS)))
        spec = SequenceSpec(f"r{self.num_ids}", tokens, salt=salt, lora_id=lora_id,
                            priority=data.draw(st.sampled_from(PRIORITIES)),
                            retention=retention,
                            num_new_tokens=data.draw(st.one_of(
                                st.none(), st.integers(1, len(tokens)))))
        self.num_ids += 1
        self.arm_failures(data)
        self.admit([spec])
        if spec.request_id in self.requests:
            self.history.append((list(tokens), salt, lora_id))

    @precondition(lambda self: self.config.num_host_blocks > 0)
    @rule(data=st.data())
    def import_from_remote(self, data: st.DataObject) -> None:
        """Blocks fetched from elsewhere cached as host blocks (the caller writes their
        slots at once): a later lookup counts them, admission onboards them."""
        tokens, salt, lora_id = self.draw_prompt(data, 24)
        num_blocks = data.draw(st.integers(0, 4))
        before = {(b.content, b.tier, b.slot) for b in cached_blocks(self.mgr)}
        slots = self.mgr.import_blocks(tokens, num_blocks, salt=salt, lora_id=lora_id)
        assert len(slots) <= num_blocks
        new = [b for b in cached_blocks(self.mgr) if (b.content, b.tier, b.slot) not in before]
        assert sorted(b.slot for b in new) == sorted(slots), (new, slots)
        host = self.memory.slots[Tier.HOST]
        for b in new:
            assert b.tier is Tier.HOST and b.content[:2] == (salt, lora_id), b
            assert list(b.content[2]) == tokens[: len(b.content[2])], (b, tokens)
            host[b.slot] = b.content
            self.stored.add(b.content)


def test_red_team_31d_machine() -> None:
    """Lookahead, failed passes, resets, drops, copies and reused ids keep every block
    exact."""
    run_state_machine_as_test(ManagerModel31d, settings=settings(
        max_examples=150, stateful_step_count=50, deadline=None))
