"""Model-based tests of KVCacheManager against a reference of what every slot physically holds.

The reference ("physical memory") keeps, per GPU and host slot, the KV it holds: the request's
salt and LoRA id and its tokens from position 0 through the block's last filled token::

    request  |t0 t1 t2 t3|t4 t5 t6 t7|t8 t9|       tokens_per_block 4
    block 1  holds (salt, lora, (t0 .. t7))
    block 2  holds (salt, lora, (t0 .. t9))       a partially filled block

Every op of every submitted plan is executed on it in order (some made to fail, leaving
garbage, then reported with ``transfer_failed``); then the forward pass writes what each live
request scheduled: at once, or at ``end_step`` inside a step. A reused block must already hold
the right KV, and so must every computed block of every live request and every cached block of
the tree, in its tier, after every operation.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from unittest import mock

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kvtier import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    BlockTierChanged,
    CacheConfig,
    Event,
    KVCacheManager,
    OpKind,
    PrefixMatch,
    RecordingTransferEngine,
    SequenceSpec,
    Tier,
    TransferEngine,
    TransferOp,
    TransferPlan,
)
from kvtier.config import EVICTION_POLICIES
from plan_caller import PlanCaller

Salt = bytes | str | int | None
Content = tuple[Salt, int | None, tuple[int, ...]]  # (salt, lora_id, tokens 0 .. end of block)
GARBAGE: Content = ("garbage", None, ())  # what a failed copy leaves in its destination

SALTS = (None, "tenant-a", 7)
LORA_IDS = (None, 1, 2)
NAMESPACES = [(None, None)] * 4 + [("tenant-a", None), (None, 1), (7, 2), ("tenant-a", 2)]
PRIORITIES = (None, 0, 20, 35, 60, 100)
RETENTIONS = (None, 0.0, 1.0, 5.0)
ALPHABET = st.integers(0, 2)
MAX_PROMPT_TOKENS = 24
MAX_TOKENS = 40
MAX_LIVE_REQUESTS = 5


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class PhysicalMemory:
    """A transfer engine that executes each plan, op by op, on a model of slot contents."""

    def __init__(self, config: CacheConfig) -> None:
        self.tpb = config.tokens_per_block
        self.capacity = {Tier.GPU: config.num_gpu_blocks, Tier.HOST: config.num_host_blocks}
        self.slots: dict[Tier, dict[int, Content]] = {Tier.GPU: {}, Tier.HOST: {}}
        self.plans: list[TransferPlan] = []
        self.fail_next: frozenset[int] = frozenset()  # op indices the next plan fails
        self.failed: list[tuple[TransferPlan, list[int]]] = []

    def submit(self, plan: TransferPlan) -> None:
        assert plan.ops, "an empty plan was submitted"
        self.plans.append(plan)
        failed = sorted(i for i in self.fail_next if i < len(plan.ops))
        self.fail_next = frozenset()
        if failed:
            self.failed.append((plan, failed))
        for i, op in enumerate(plan.ops):
            if i in failed:
                self.slots[op.dst_tier][op.dst_slot] = GARBAGE
            else:
                self._execute(op)

    def _execute(self, op: TransferOp) -> None:
        tpb = self.tpb
        for tier, slot in ((op.src_tier, op.src_slot), (op.dst_tier, op.dst_slot)):
            assert 0 <= slot < self.capacity[tier], f"{op}: slot outside the {tier.name} pool"
        assert (op.src_tier, op.src_slot) != (op.dst_tier, op.dst_slot), op
        if op.kind is OpKind.COPY:
            assert op.dst_tier is Tier.GPU and 0 < op.num_tokens < tpb, op
        else:
            tiers = (Tier.GPU, Tier.HOST) if op.kind is OpKind.OFFLOAD else (Tier.HOST, Tier.GPU)
            assert (op.src_tier, op.dst_tier) == tiers and op.num_tokens == tpb, op
        src = self.slots[op.src_tier].get(op.src_slot)
        assert src is not None, f"{op} reads a slot that never held KV"
        if src is GARBAGE:
            self.slots[op.dst_tier][op.dst_slot] = GARBAGE
            return
        salt, lora_id, tokens = src
        if op.kind is OpKind.COPY:
            start = (len(tokens) - 1) // tpb * tpb
            assert start + op.num_tokens <= len(tokens), f"{op} copies unfilled tokens of {src}"
            src = (salt, lora_id, tokens[: start + op.num_tokens])
        else:
            assert len(tokens) % tpb == 0, f"{op} moves a block that is not full: {src}"
        self.slots[op.dst_tier][op.dst_slot] = src

    def ops_since(self, num_plans: int) -> list[TransferOp]:
        return [op for plan in self.plans[num_plans:] for op in plan.ops]


@dataclass
class CachedBlock:
    content: Content
    tier: Tier
    slot: int
    block_hash: int | None


def cached_blocks(mgr: KVCacheManager | PlanCaller[TransferEngine],
                  with_hashes: bool = False) -> list[CachedBlock]:
    """Every cached block with the content its key says it holds (from the manager's public
    query: each block's tokens, chained to its prefix by the parent hash)."""
    prefixes: dict[int, tuple[int, ...]] = {}
    out = []
    for b in mgr.cached_blocks():
        tokens = (prefixes[b.parent_hash] if b.parent_hash is not None else ()) + b.tokens
        prefixes[b.block_hash] = tokens
        out.append(CachedBlock((b.salt, b.lora_id, tokens), b.tier, b.slot,
                               b.block_hash if with_hashes else None))
    return out


def replay_events(events: list[Event], tiers: dict[int, Tier], next_seq: int) -> int:
    """Apply ``events`` to ``tiers`` (hash -> tier), checking each; returns the next seq."""
    for event in events:
        assert event.seq == next_seq, f"event seq {event.seq}, expected {next_seq}"
        next_seq += 1
        if isinstance(event, BlockStored):
            assert event.block_hash not in tiers, f"{event}: stored twice"
            assert event.parent_hash is None or event.parent_hash in tiers, event
            tiers[event.block_hash] = event.tier
        elif isinstance(event, BlockRemoved):
            assert tiers.pop(event.block_hash, None) is event.tier, event
        elif isinstance(event, BlockTierChanged):
            assert tiers.get(event.block_hash) is event.old_tier, event
            assert event.new_tier is not event.old_tier, event
            tiers[event.block_hash] = event.new_tier
        elif isinstance(event, AllBlocksCleared):
            tiers.clear()
        else:
            raise AssertionError(f"unexpected event {event}")
    return next_seq


def expected_match(
    cached: dict[Content, Tier], spec: SequenceSpec, tpb: int
) -> tuple[int, int, int]:
    """A flat-dict matcher: (full blocks found, those on host, best partial tokens)."""
    key = (spec.salt, spec.lora_id)
    tokens = list(spec.tokens)
    reusable = len(tokens) - 1
    k = 0
    num_host = 0
    while (k + 1) * tpb <= reusable:
        tier = cached.get((*key, tuple(tokens[: (k + 1) * tpb])))
        if tier is None:
            break
        num_host += tier is Tier.HOST
        k += 1
    best = 0
    start = k * tpb
    want = tokens[start:reusable][:tpb]
    for salt, lora_id, have in cached:
        if (salt, lora_id) == key and len(have) == start + tpb and list(have[:start]) == tokens[
                :start]:
            n = 0
            while n < len(want) and have[start + n] == want[n]:
                n += 1
            best = max(best, n)
    return k, num_host, best


@dataclass
class LiveRequest:
    """A live request as the model sees it: scheduled tokens are computed by the next
    forward pass (at once outside a step, at ``end_step`` inside one)."""

    salt: Salt
    lora_id: int | None
    tokens: list[int]
    block_ids: list[int]
    num_scheduled: int
    num_computed: int = 0
    num_reserved_blocks: int = 0

    def content(self, index: int, tpb: int, upto: int | None = None) -> Content:
        """What block ``index`` holds once the first ``upto`` tokens are computed."""
        end = min((index + 1) * tpb, len(self.tokens) if upto is None else upto)
        return (self.salt, self.lora_id, tuple(self.tokens[:end]))


class ManagerModel(RuleBasedStateMachine):
    """Random batches, prefill chunks, appends, removals, steps and clock ticks against the
    physical model."""

    columns = False  # decode batches also as append_token_columns (a subclass turns it on)

    @initialize(
        tpb=st.sampled_from([1, 2, 4]),
        num_gpu_blocks=st.integers(4, 24),
        num_host_blocks=st.integers(0, 16),
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
        self.config = CacheConfig(
            tokens_per_block=tpb, num_gpu_blocks=num_gpu_blocks,
            num_host_blocks=num_host_blocks, enable_partial_reuse=partial,
            copy_on_partial_reuse=copy, enable_events=events, eviction_policy=policy)
        self.tpb = tpb
        self.now = 0.0
        self.memory = PhysicalMemory(self.config)
        # Victims in batches of up to 4 blocks (tiers this small cut exactly otherwise).
        with mock.patch("kvtier.cache_state.eviction_batch", lambda capacity: batch):
            manager = KVCacheManager(self.config, clock=lambda: self.now)
        self.mgr = PlanCaller(manager, self.memory)
        self.prefixes = [(p, None, None) for p in prefixes]
        self.history: list[tuple[list[int], Salt, int | None]] = []
        self.requests: dict[str, LiveRequest] = {}
        self.stored: set[Content] = set()  # every full block ever computed: a dict with losses
        self.num_ids = 0
        self.in_step = False
        self.event_tiers: dict[int, Tier] = {}
        self.next_seq = 0
        self.failures = failures
        self.seen_version = -1
        self.seen_lookups: list[PrefixMatch] = []

    # ---- helpers -------------------------------------------------------------------------

    def draw_prompt(self, data: st.DataObject,
                    max_len: int) -> tuple[list[int], Salt, int | None]:
        """Tokens, salt and LoRA id: mostly a seed prefix, an earlier prompt or a prefix now
        on host, in its namespace, extended by a few random tokens."""
        on_host = sorted({b.content for b in cached_blocks(self.mgr) if b.tier is Tier.HOST},
                         key=repr)
        if len(on_host) > 0 and data.draw(st.booleans()):
            salt, lora_id, host_tokens = data.draw(st.sampled_from(on_host))
            base, cut = list(host_tokens), len(host_tokens)
        else:
            base, salt, lora_id = data.draw(st.sampled_from(self.prefixes + self.history[-6:]))
            if data.draw(st.booleans()):
                salt, lora_id = data.draw(st.sampled_from(NAMESPACES))
            cut = data.draw(st.one_of(st.just(len(base)), st.integers(0, len(base))))
        suffix = data.draw(st.lists(ALPHABET, max_size=6))
        return (base[:cut] + suffix)[:max_len] or [0], salt, lora_id

    def run_forward_pass(self) -> None:
        """Every live request computes its scheduled tokens into its blocks."""
        for rid, req in self.requests.items():
            if req.num_computed == req.num_scheduled:
                continue
            tpb = self.tpb
            first, end = req.num_computed, req.num_scheduled
            written = []
            for i in range(first // tpb, ceil_div(end, tpb)):
                self.memory.slots[Tier.GPU][req.block_ids[i]] = req.content(i, tpb, end)
                written.append(req.block_ids[i])
            for k in range(1, end // tpb + 1):
                self.stored.add(req.content(k - 1, tpb))
            req.num_computed = end
            holders = Counter(s for r in self.requests.values() for s in set(r.block_ids))
            for slot in written:
                assert holders[slot] == 1, f"{rid} computes into GPU slot {slot}, shared"

    def after_call(self) -> None:
        if not self.in_step:
            self.run_forward_pass()

    def arm_failures(self, data: st.DataObject) -> None:
        """Maybe make some copies of the next plan fail."""
        if self.failures and data.draw(st.sampled_from([False, False, True])):
            self.memory.fail_next = data.draw(st.frozensets(st.integers(0, 5), min_size=1,
                                                            max_size=2))

    def recover(self) -> set[str]:
        """Report the failed copies of the call just made; returns the requests aborted."""
        self.memory.fail_next = frozenset()
        aborted: set[str] = set()
        for plan, failed in self.memory.failed:
            aborted.update(self.mgr.transfer_failed(plan, failed))
        self.memory.failed.clear()
        for rid in aborted:
            self.requests.pop(rid, None)
        return aborted

    def check_lookup(self, spec: SequenceSpec, found: PrefixMatch,
                     cached: dict[Content, Tier]) -> None:
        tpb = self.tpb
        assert 0 <= found.num_tokens <= len(spec.tokens) - 1, (spec, found)
        assert found.num_tokens == found.num_gpu_tokens + found.num_host_tokens, found
        assert 0 <= found.num_partial_tokens < tpb, found
        if not self.config.enable_partial_reuse:
            assert found.num_partial_tokens == 0, found
        num_full = found.num_tokens - found.num_partial_tokens
        assert num_full % tpb == 0, found
        key = (spec.salt, spec.lora_id)
        if num_full:
            assert (*key, tuple(spec.tokens[:num_full])) in self.stored, (spec, found)
        r = found.num_partial_tokens
        if r:
            want = list(spec.tokens[: num_full + r])
            assert any(c[:2] == key and len(c[2]) == num_full + tpb and list(c[2][: len(want)])
                       == want for c in self.stored), (spec, found)
        # The radix match agrees with a flat dict of what the tree caches.
        k, num_host, best = expected_match(cached, spec, tpb)
        assert num_full == k * tpb, (spec, found, k)
        assert found.num_host_tokens - num_host * tpb in (0, r), (spec, found, num_host)
        if not self.config.enable_partial_reuse:
            return
        if self.config.copy_on_partial_reuse:
            assert r == best, (spec, found, best)
        else:
            assert r in (0, best), (spec, found, best)

    def check_reused_kv(self, req: LiveRequest, num_reused: int) -> None:
        """The blocks an admitted request reuses already hold its KV."""
        tpb = self.tpb
        gpu = self.memory.slots[Tier.GPU]
        for i in range(num_reused // tpb):
            got = gpu.get(req.block_ids[i])
            assert got == req.content(i, tpb), f"reused block {i}: {got} != {req.content(i, tpb)}"
        if num_reused % tpb:
            i = num_reused // tpb
            got = gpu.get(req.block_ids[i])
            want = tuple(req.tokens[:num_reused])
            assert got is not None and got[:2] == (req.salt, req.lora_id) and got[2][
                :num_reused] == want, f"partially reused block {i}: {got} lacks {want}"

    def num_live_blocks(self) -> int:
        return len({s for req in self.requests.values() for s in req.block_ids})

    def admit(self, specs: list[SequenceSpec]) -> None:
        mgr, tpb = self.mgr, self.tpb
        capacity = self.config.num_gpu_blocks
        cached = {b.content: b.tier for b in cached_blocks(mgr)}
        lookups = [mgr.lookup(s.tokens, salt=s.salt, lora_id=s.lora_id) for s in specs]
        for spec, found in zip(specs, lookups, strict=True):
            self.check_lookup(spec, found, cached)
        assert lookups == [mgr.lookup(s.tokens, salt=s.salt, lora_id=s.lora_id) for s in specs]
        num_free = mgr.num_free_gpu_blocks
        num_plans = len(self.memory.plans)
        num_blocks = sum(ceil_div(len(s.tokens), tpb) for s in specs)
        try:
            admissions = mgr.add_sequence_batch(specs)
        except ValueError as exc:
            # Refused only when the batch (shared prefixes counted once) outgrows the pool.
            assert num_blocks > capacity, exc
            assert f"num_gpu_blocks is {capacity}" in str(exc), exc
            assert mgr.num_free_gpu_blocks == num_free and len(self.memory.plans) == num_plans
            assert lookups == [mgr.lookup(s.tokens, salt=s.salt, lora_id=s.lora_id)
                               for s in specs]
            return
        assert len(self.memory.plans) - num_plans <= 1
        aborted = self.recover()
        if num_blocks + sum(1 + s.num_reserved_blocks for s in specs) <= num_free:
            assert all(a.admitted for a in admissions), (num_free, admissions)
        ops = self.memory.ops_since(num_plans)
        num_onboarded = sum(op.num_tokens for op in ops if op.src_tier is Tier.HOST)
        assert sum(a.num_onboarded_tokens for a in admissions) == num_onboarded, (admissions, ops)
        for spec, found, adm in zip(specs, lookups, admissions, strict=True):
            assert adm.request_id == spec.request_id
            if not adm.admitted:
                assert adm.block_ids == () and adm.num_reused_tokens == 0 and adm.reason
                continue
            if adm.request_id in aborted:
                continue
            assert adm.num_reused_tokens == found.num_tokens, (spec, found, adm)
            assert adm.num_onboarded_tokens <= found.num_host_tokens, (found, adm)
            num_scheduled = len(spec.tokens)
            if spec.num_new_tokens is not None:
                num_scheduled = min(num_scheduled, found.num_tokens + spec.num_new_tokens)
            # The table covers the scheduled tokens; the rest of the prompt is reserved.
            assert len(adm.block_ids) == ceil_div(num_scheduled, tpb), adm
            assert len(set(adm.block_ids)) == len(adm.block_ids), adm
            req = LiveRequest(spec.salt, spec.lora_id, list(spec.tokens), list(adm.block_ids),
                              num_scheduled, found.num_tokens, spec.num_reserved_blocks)
            self.check_reused_kv(req, adm.num_reused_tokens)
            self.requests[spec.request_id] = req
        self.after_call()

    # ---- rules ---------------------------------------------------------------------------

    @precondition(lambda self: len(self.requests) < MAX_LIVE_REQUESTS
                  and self.num_live_blocks() <= self.config.num_gpu_blocks // 2)
    @rule(data=st.data())
    def admit_batch(self, data: st.DataObject) -> None:
        tpb = self.tpb
        capacity = self.config.num_gpu_blocks
        max_len = min(MAX_PROMPT_TOKENS, max(capacity // 2, 2) * tpb)
        specs = []
        for _ in range(data.draw(st.integers(1, 4))):
            tokens, salt, lora_id = self.draw_prompt(data, max_len)
            specs.append(SequenceSpec(
                f"r{self.num_ids}", tokens, salt=salt, lora_id=lora_id,
                priority=data.draw(st.sampled_from(PRIORITIES)),
                retention_s=data.draw(st.sampled_from(RETENTIONS)),
                num_new_tokens=data.draw(st.one_of(st.none(), st.integers(1, len(tokens)))),
                num_reserved_blocks=data.draw(st.sampled_from([0, 0, 1, 2]))))
            self.num_ids += 1
        if not data.draw(st.booleans()):  # mostly batches that fit an empty pool
            while len(specs) > 1 and sum(ceil_div(len(s.tokens), tpb) for s in specs) > capacity:
                specs.pop()
        self.arm_failures(data)
        self.admit(specs)
        self.history += [(list(s.tokens), s.salt, s.lora_id) for s in specs
                         if s.request_id in self.requests]

    @precondition(lambda self: not self.in_step)
    @rule(data=st.data())
    def flush_with_filler(self, data: st.DataObject) -> None:
        """Admit and release a request of fresh tokens that pushes cached prefixes to host."""
        num_free = self.mgr.num_free_gpu_blocks
        if not num_free:
            return
        num_blocks = data.draw(st.integers((num_free + 1) // 2, num_free))
        rid = f"r{self.num_ids}"
        self.num_ids += 1
        tokens = [10 + self.num_ids] * (num_blocks * self.tpb)
        # Mostly below offload_min_priority: the filler itself is dropped, not offloaded.
        priority = data.draw(st.sampled_from([0, 20, None, 0]))
        self.arm_failures(data)
        self.admit([SequenceSpec(rid, tokens, priority=priority)])
        if rid in self.requests:
            self.mgr.remove_sequence(rid)
            del self.requests[rid]

    @precondition(lambda self: any(r.num_scheduled < len(r.tokens)
                                   for r in self.requests.values()))
    @rule(data=st.data())
    def schedule_prefill(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(
            rid for rid, r in self.requests.items() if r.num_scheduled < len(r.tokens))))
        req = self.requests[rid]
        remaining = len(req.tokens) - req.num_scheduled
        assert self.mgr.num_unscheduled_tokens(rid) == remaining
        num_tokens = data.draw(st.integers(1, remaining))
        num_plans = len(self.memory.plans)
        num_free = self.mgr.num_free_gpu_blocks
        self.arm_failures(data)
        self.mgr.schedule_prefill(rid, num_tokens)
        if rid in self.recover():
            return
        # The chunk's blocks come from the request's reservation: they never fail, take
        # nothing others may use, and their eviction only moves blocks off the GPU.
        assert self.mgr.num_free_gpu_blocks == num_free
        assert len(self.memory.plans) - num_plans <= 1
        assert not any(op.dst_tier is Tier.GPU for op in self.memory.ops_since(num_plans))
        table = self.mgr.block_table(rid)
        req.num_scheduled += num_tokens
        assert table[:len(req.block_ids)] == req.block_ids, (rid, table, req.block_ids)
        assert len(table) == ceil_div(req.num_scheduled, self.tpb), (rid, table)
        assert not set(table[len(req.block_ids):]) & {
            s for r in self.requests.values() for s in r.block_ids}, (rid, table)
        req.block_ids = table
        self.after_call()

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def append(self, data: st.DataObject) -> None:
        mgr, tpb = self.mgr, self.tpb
        rid = data.draw(st.sampled_from(sorted(self.requests)))
        req = self.requests[rid]
        room = MAX_TOKENS - len(req.tokens)
        if room < 1:
            return
        tokens = data.draw(st.lists(ALPHABET, min_size=1, max_size=min(room, 2 * tpb + 1)))
        num_free = mgr.num_free_gpu_blocks
        num_plans = len(self.memory.plans)
        if req.num_scheduled < len(req.tokens):
            with pytest.raises(ValueError, match="unscheduled"):
                mgr.append_tokens(rid, tokens)
            assert mgr.num_free_gpu_blocks == num_free and len(self.memory.plans) == num_plans
            return
        need = mgr.num_blocks_to_append(rid, len(tokens))
        # max: a table grown by reserve_lookahead may cover the tokens already.
        assert need == max(0, ceil_div(len(req.tokens) + len(tokens), tpb) - len(req.block_ids))
        self.arm_failures(data)
        new = mgr.append_tokens(rid, tokens)
        if rid in self.recover():
            return
        if need > num_free + req.num_reserved_blocks:
            assert new is None
            assert mgr.num_free_gpu_blocks == num_free and len(self.memory.plans) == num_plans
            assert mgr.block_table(rid) == req.block_ids
            return
        assert new is not None and len(new) == need, (need, new)
        assert len(self.memory.plans) - num_plans <= 1
        assert not any(op.dst_tier is Tier.GPU for op in self.memory.ops_since(num_plans))
        req.tokens += tokens
        req.block_ids += new
        req.num_scheduled = len(req.tokens)
        req.num_reserved_blocks -= min(need, req.num_reserved_blocks)
        self.after_call()

    @precondition(lambda self: any(r.num_scheduled == len(r.tokens) < MAX_TOKENS
                                   for r in self.requests.values()))
    @rule(data=st.data())
    def decode_batch(self, data: st.DataObject) -> None:
        """One token for each of some decoding requests, in one ``append_token_batch``."""
        ready = sorted(rid for rid, r in self.requests.items()
                       if r.num_scheduled == len(r.tokens) < MAX_TOKENS)
        rids = data.draw(st.lists(st.sampled_from(ready), min_size=1, unique=True))
        items = [(rid, data.draw(ALPHABET)) for rid in rids]
        # The model's answer: tokens apply in order until one finds no block.
        num_free = self.mgr.num_free_gpu_blocks
        expected = len(items)
        for i, (rid, _) in enumerate(items):
            req = self.requests[rid]
            need = max(0, ceil_div(len(req.tokens) + 1, self.tpb) - len(req.block_ids))
            if need > num_free + req.num_reserved_blocks:
                expected = i
                break
            num_free -= need - min(need, req.num_reserved_blocks)
        self.arm_failures(data)
        if self.columns and data.draw(st.booleans()):
            num_applied = self.mgr.append_token_columns([r for r, _ in items],
                                                        [t for _, t in items])
        else:
            num_applied = self.mgr.append_token_batch(items)
        aborted = self.recover()
        assert num_applied == expected, (items, num_applied, expected)
        for rid, token in items[:num_applied]:
            if rid in aborted:
                continue
            req = self.requests[rid]
            table = self.mgr.block_table(rid)
            need = max(0, ceil_div(len(req.tokens) + 1, self.tpb) - len(req.block_ids))
            assert table[: len(req.block_ids)] == req.block_ids and len(table) == len(
                req.block_ids) + need, (rid, table, req.block_ids)
            req.tokens.append(token)
            req.block_ids = table
            req.num_scheduled = len(req.tokens)
            req.num_reserved_blocks -= min(need, req.num_reserved_blocks)
        self.after_call()

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), store_for_reuse=st.booleans())
    def remove(self, data: st.DataObject, store_for_reuse: bool) -> None:
        rid = data.draw(st.sampled_from(sorted(self.requests)))
        num_plans = len(self.memory.plans)
        self.mgr.remove_sequence(rid, store_for_reuse=store_for_reuse)
        assert len(self.memory.plans) == num_plans
        del self.requests[rid]

    @rule()
    def step_boundary(self) -> None:
        """Open a step, or close it: the step's forward pass runs, its blocks are stored."""
        if self.in_step:
            self.mgr.end_step()
            self.in_step = False
            self.run_forward_pass()
        else:
            self.mgr.begin_step()
            self.in_step = True

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0, 10.0]))
    def advance_clock(self, seconds: float) -> None:
        self.now += seconds

    # ---- invariants ----------------------------------------------------------------------

    @invariant()
    def books_balance(self) -> None:
        self.mgr.check_invariants()
        # Each request's own reservation, and its prompt's blocks past its table.
        reserved = sum(r.num_reserved_blocks + max(0, ceil_div(len(r.tokens), self.tpb)
                                                   - len(r.block_ids))
                       for r in self.requests.values())
        assert self.mgr.num_reserved_blocks == reserved

    @invariant()
    def live_blocks_hold_their_kv(self) -> None:
        gpu = self.memory.slots[Tier.GPU]
        assert self.mgr.num_sequences == len(self.requests)
        for rid, req in self.requests.items():
            assert self.mgr.block_table(rid) == req.block_ids, rid
            assert self.mgr.num_unscheduled_tokens(rid) == len(req.tokens) - req.num_scheduled
            n = req.num_computed
            for i in range(ceil_div(n, self.tpb)):
                want = req.content(i, self.tpb, n)
                got = gpu.get(req.block_ids[i])
                if (i + 1) * self.tpb > n and got is not None:
                    # A block computed only in part may still hold the tail of its source.
                    got = (*got[:2], got[2][:n])
                assert got == want, (rid, i, req.block_ids[i], got, want)

    @invariant()
    def cached_blocks_hold_their_kv(self) -> None:
        events = self.config.enable_events
        blocks = cached_blocks(self.mgr, with_hashes=events)
        for b in blocks:
            got = self.memory.slots[b.tier].get(b.slot)
            assert got == b.content, f"{b.tier.name} slot {b.slot} holds {got}, tree: {b.content}"
            assert b.content in self.stored, b
        if events:
            self.next_seq = replay_events(self.mgr.drain_events(), self.event_tiers,
                                          self.next_seq)
            assert self.event_tiers == {b.block_hash: b.tier for b in blocks}

    @invariant()
    def lookups_hold_while_version_holds(self) -> None:
        probes = self.prefixes + self.history[-4:]
        lookups = [self.mgr.lookup(t or [0], salt=s, lora_id=lo)
                   for t, s, lo in probes]
        if self.mgr.version == self.seen_version:
            assert lookups[: len(self.seen_lookups)] == self.seen_lookups
        self.seen_version = self.mgr.version
        self.seen_lookups = lookups

    def teardown(self) -> None:
        if getattr(self, "in_step", False):
            self.mgr.end_step()


def test_manager_matches_physical_model() -> None:
    """Random operations keep every reused, live and cached block's KV exact."""
    run_state_machine_as_test(ManagerModel, settings=settings(
        max_examples=400, stateful_step_count=50, deadline=None))


# ---- focused properties ------------------------------------------------------------------

def make_manager(tpb: int, num_gpu_blocks: int, num_host_blocks: int = 0, *,
                 enable_partial_reuse: bool = True, copy_on_partial_reuse: bool = True,
                 enable_events: bool = False) -> PlanCaller[RecordingTransferEngine]:
    config = CacheConfig(tokens_per_block=tpb, num_gpu_blocks=num_gpu_blocks,
                         num_host_blocks=num_host_blocks,
                         enable_partial_reuse=enable_partial_reuse,
                         copy_on_partial_reuse=copy_on_partial_reuse, enable_events=enable_events)
    return PlanCaller(KVCacheManager(config, clock=lambda: 0.0), RecordingTransferEngine())


def admit(mgr: KVCacheManager | PlanCaller[TransferEngine], rid: str, tokens: list[int]) -> None:
    adm = mgr.add_sequence_batch([SequenceSpec(rid, tokens)])[0]
    assert adm.admitted, adm


@settings(max_examples=200, deadline=None)
@given(
    tpb=st.sampled_from([1, 2, 4]),
    num_prefix_blocks=st.integers(1, 3),
    data=st.data(),
    to_host=st.booleans(),
    partial=st.booleans(),
    copy=st.booleans(),
)
def test_shared_prefix_in_one_batch_is_claimed_once(
    tpb: int, num_prefix_blocks: int, data: st.DataObject, to_host: bool, partial: bool,
    copy: bool,
) -> None:
    """Two requests of one batch reuse a cached prefix they share; it is claimed once."""
    k = num_prefix_blocks
    prefix = data.draw(st.lists(ALPHABET, min_size=k * tpb, max_size=k * tpb))
    suffixes = data.draw(st.lists(st.lists(ALPHABET, min_size=1, max_size=2 * tpb),
                                  min_size=2, max_size=2))
    num_gpu = 2 * (k + 3)
    mgr = make_manager(tpb, num_gpu, k + 2 if to_host else 0, enable_partial_reuse=partial,
                       copy_on_partial_reuse=copy)
    engine = mgr.engine
    assert isinstance(engine, RecordingTransferEngine)
    admit(mgr, "seed", [*prefix, 3])  # token 3 is outside ALPHABET: nothing past the prefix
    mgr.remove_sequence("seed")
    if to_host:  # a filler of the whole pool pushes the prefix to the host tier
        admit(mgr, "filler", [9] * (num_gpu * tpb))
        mgr.remove_sequence("filler")
    specs = [SequenceSpec(f"r{i}", prefix + s) for i, s in enumerate(suffixes)]
    lookups = [mgr.lookup(s.tokens) for s in specs]
    for found in lookups:
        assert found.num_tokens >= k * tpb, found
        assert found.num_host_tokens >= (k * tpb if to_host else 0), found
    num_free = mgr.num_free_gpu_blocks
    num_plans = len(engine.plans)
    a, b = mgr.add_sequence_batch(specs)
    mgr.check_invariants()
    assert a.admitted and b.admitted, (a, b)
    assert [a.num_reused_tokens, b.num_reused_tokens] == [f.num_tokens for f in lookups]
    assert a.block_ids[:k] == b.block_ids[:k]
    num_blocks = sum(len(x.block_ids) for x in (a, b))
    assert num_free - mgr.num_free_gpu_blocks == num_blocks - k
    ops = [op for plan in list(engine.plans)[num_plans:] for op in plan.ops]
    assert sum(op.kind is OpKind.ONBOARD for op in ops) == (k if to_host else 0), ops
    mgr.remove_sequence("r0")
    mgr.remove_sequence("r1")
    mgr.check_invariants()
    assert mgr.num_free_gpu_blocks == num_gpu


def reuse_counters(mgr: KVCacheManager | PlanCaller[TransferEngine]) -> tuple[object, ...]:
    s = mgr.stats
    return (s.gpu.reused_blocks, s.gpu.missed_blocks, s.host.reused_blocks,
            s.host.missed_blocks, s.num_admitted, s.num_prompt_tokens, s.num_reused_tokens,
            s.num_partial_tokens, s.num_partial_copies, s.num_partial_in_place)


@settings(max_examples=200, deadline=None)
@given(
    tpb=st.sampled_from([1, 2, 4]),
    num_gpu_blocks=st.integers(4, 12),
    num_host_blocks=st.integers(0, 8),
    partial=st.booleans(),
    copy=st.booleans(),
    prompts=st.lists(st.lists(ALPHABET, min_size=1, max_size=12), min_size=1, max_size=4),
    num_hog_blocks=st.integers(1, 4),
    data=st.data(),
)
def test_rejected_request_leaves_no_trace(
    tpb: int, num_gpu_blocks: int, num_host_blocks: int, partial: bool, copy: bool,
    prompts: list[list[int]], num_hog_blocks: int, data: st.DataObject,
) -> None:
    """A request rejected for lack of GPU blocks changes no count, claim or later outcome."""
    prompts = [p[: num_gpu_blocks * tpb] for p in prompts]
    twins = [make_manager(tpb, num_gpu_blocks, num_host_blocks, enable_partial_reuse=partial,
                          copy_on_partial_reuse=copy) for _ in range(2)]
    hog = [5] * (min(num_hog_blocks, num_gpu_blocks - 1) * tpb)
    for mgr in twins:
        for i, prompt in enumerate(prompts):
            admit(mgr, f"warm{i}", prompt)
            mgr.remove_sequence(f"warm{i}")
        admit(mgr, "hog", hog)
    mgr, twin = twins
    base = data.draw(st.sampled_from(prompts))
    cut = data.draw(st.integers(0, len(base)))
    tokens = (base[:cut] + [4] * (num_gpu_blocks * tpb))[: num_gpu_blocks * tpb]
    before = (mgr.num_free_gpu_blocks, mgr.num_free_host_blocks, reuse_counters(mgr),
              [mgr.lookup(p) for p in prompts], len(mgr.engine.plans))
    adm = mgr.add_sequence_batch([SequenceSpec("big", tokens)])[0]
    assume(not adm.admitted)
    mgr.check_invariants()
    after = (mgr.num_free_gpu_blocks, mgr.num_free_host_blocks, reuse_counters(mgr),
             [mgr.lookup(p) for p in prompts], len(mgr.engine.plans))
    assert after == before
    assert mgr.stats.num_rejected == twin.stats.num_rejected + 1
    tree = sorted((b.content, b.tier, b.slot) for b in cached_blocks(mgr))
    assert tree == sorted((b.content, b.tier, b.slot) for b in cached_blocks(twin))
    # The rolled-back claims leave no trace in what happens next.
    for m in twins:
        m.remove_sequence("hog")
    for m in twins:
        admit(m, "filler", [6] * (num_gpu_blocks * tpb))
        m.remove_sequence("filler")
    outcomes = []
    for m in twins:
        got = []
        for i, prompt in enumerate(prompts):  # kept live: the pool fills, eviction runs
            a = m.add_sequence_batch([SequenceSpec(f"again{i}", prompt)])[0]
            got.append((a.admitted, a.num_reused_tokens))
        m.check_invariants()
        outcomes.append(got)
    # NOTE: slots and copies may differ: a rolled-back claim leaves a run split in two, and
    # two host runs onboard one after the other, freeing host room for offloads in between.
    assert outcomes[0] == outcomes[1]


def test_evicting_a_prefix_uses_the_host_room_its_extension_frees() -> None:
    """A prefix evicted from the GPU takes the host slots its own offloaded tail held."""
    # tpb 1, GPU 3, host 2.  a=[0 1 2] cached: GPU [0 1 2]; b=[5] evicts the tail:
    #   GPU [0 1] -> host [2]          (one key: cut from one run)
    # c=[6 6] evicts [0 1]: the host has 1 free slot and [2] hangs below [1], worth nothing
    # once [1] goes. Expected: host [0 1] (2 tokens reusable). The bug: [1] dropped with
    # [2], host [0] and one slot left empty.
    mgr = make_manager(1, 3, 2)
    admit(mgr, "a", [0, 1, 2])
    mgr.remove_sequence("a")
    admit(mgr, "b", [5])
    assert mgr.lookup([0, 1, 2, 9]) == PrefixMatch(3, 2, 1, 0)
    admit(mgr, "c", [6, 6])
    mgr.check_invariants()
    assert mgr.lookup([0, 1, 2, 9]) == PrefixMatch(2, 0, 2, 0)


def test_evicting_a_prefix_drops_its_host_extension_tail_first() -> None:
    """A prefix evicted into a host full of its own extension drops only that extension's tail."""
    # tpb 1, GPU 4, host 3.  a=[0 1 2 3] cached; b=[5] and c=[6 6] (live) evict tails:
    #   GPU [0] -> host [1 2] -> host [3]                 (one key: cut from one run)
    # d=[7] evicts [0]: it needs 1 host slot; dropping [3] gives it. Expected: host [0 1 2]
    # (3 tokens reusable). The bug: [1 2] is dropped with [3], host [0] and 2 slots empty.
    mgr = make_manager(1, 4, 3)
    admit(mgr, "a", [0, 1, 2, 3])
    mgr.remove_sequence("a")
    admit(mgr, "b", [5])
    admit(mgr, "c", [6, 6])
    assert mgr.lookup([0, 1, 2, 3, 9]) == PrefixMatch(4, 1, 3, 0)
    admit(mgr, "d", [7])
    mgr.check_invariants()
    assert mgr.lookup([0, 1, 2, 3, 9]) == PrefixMatch(3, 0, 3, 0)


def test_append_that_stores_a_block_changes_the_version() -> None:
    """An append that makes a block reusable changes the version (lookup answers change)."""
    mgr = make_manager(4, 4)
    admit(mgr, "a", [0] * 7)  # block 1 holds 3 of 4 tokens
    version, before = mgr.version, mgr.lookup([0] * 9)
    mgr.append_tokens("a", [0])  # fills block 1 in place and stores it
    assert mgr.lookup([0] * 9) != before
    assert mgr.version != version


EVENT_OPS = st.lists(
    st.tuples(st.sampled_from(["admit", "append", "remove"]),
              st.lists(ALPHABET, min_size=1, max_size=10), st.sampled_from(SALTS),
              st.sampled_from(LORA_IDS)),
    min_size=1, max_size=25)


@settings(max_examples=200, deadline=None)
@given(
    tpb=st.sampled_from([1, 2, 4]),
    num_gpu_blocks=st.integers(4, 12),
    num_host_blocks=st.integers(0, 8),
    partial=st.booleans(),
    copy=st.booleans(),
    ops=EVENT_OPS,
)
def test_events_replay_to_the_cached_tree(
    tpb: int, num_gpu_blocks: int, num_host_blocks: int, partial: bool, copy: bool,
    ops: list[tuple[str, list[int], Salt, int | None]],
) -> None:
    """Replaying events into hash -> tier gives exactly the tree's blocks and tiers."""
    mgr = make_manager(tpb, num_gpu_blocks, num_host_blocks, enable_partial_reuse=partial,
                       copy_on_partial_reuse=copy, enable_events=True)
    tiers: dict[int, Tier] = {}
    next_seq = 0
    live: list[str] = []
    for i, (kind, tokens, salt, lora_id) in enumerate(ops):
        if kind == "admit" or not live:
            spec = SequenceSpec(f"r{i}", tokens[: num_gpu_blocks * tpb], salt=salt,
                                lora_id=lora_id)
            if mgr.add_sequence_batch([spec])[0].admitted:
                live.append(spec.request_id)
        elif kind == "append":
            mgr.append_tokens(live[len(tokens) % len(live)], tokens)
        else:
            mgr.remove_sequence(live.pop(len(tokens) % len(live)), store_for_reuse=bool(salt))
        next_seq = replay_events(mgr.drain_events(), tiers, next_seq)
        assert tiers == {b.block_hash: b.tier for b in cached_blocks(mgr, with_hashes=True)}
