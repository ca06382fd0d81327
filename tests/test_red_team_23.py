"""Red team 23a: the core under property-based attack.

A state machine drives the Scheduler and its KVCacheManager with random mixes of everything
at once, on tiny pools (1-8 GPU blocks, 0-8 host blocks) under every eviction policy:
partial reuse (in place and by copy), chunked prefill, decode growth, preemption, priorities
and per-range retention on a clock that moves, duplicate blocks within one prompt and
across a batch, aborts, failed copies and passes, LoRA ids and salts, speculative tokens,
multimodal items, and the pair pickled between calls. After every operation it checks the
books (``check_invariants``), that the reuse each step credited is the reuse its chunks got,
that the blocks in use and free add up to the pools, and a reference of which prefixes are
cached: every cached block's slot holds exactly the KV of its tokens in its key space (the
fake data plane of ``test_red_team_13b``), and ``lookup`` finds exactly the chain of cached
hashes of a prompt. ``RT23_EXAMPLES`` sets the machines' examples (thousands, to explore)."""

from __future__ import annotations

import copy
import os
import pickle
import tracemalloc
from array import array
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule, run_state_machine_as_test

from kvtier import CacheConfig, KVCacheManager, MultimodalItem, SequenceSpec
from kvtier.config import EVICTION_POLICIES
from kvtier.hashing import get_hash_fn, prompt_block_hashes
from kvtier.retention import Retention, RetentionRange
from kvtier.scheduled_step import StepPhases
from kvtier.scheduler import Request, Scheduler, SchedulerConfig
from kvtier.sequence import block_extras
from kvtier.tier import Tier
from kvtier.transfer.plan import OpKind
from test_red_team_13b import TPB, NewCallsUnderScheduling, cacheless_output

# An image's hash names its content, so its length too (as a real image's does).
IMAGES = {"A": 2, "B": 3}


class Clock:
    """The machine's one clock (retentions run out as it moves); pickled by name."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def __reduce__(self) -> str:
        return "CLOCK"


CLOCK = Clock()


def kv(key: tuple[Any, ...], tokens: list[int], position: int) -> tuple[object, ...]:
    """What the KV of ``position`` holds: the key space, every token up to it and the images
    that begin at or before it (``key``: salt, lora_id, items as (offset, length, hash))."""
    salt, lora, items = key
    seen = tuple(sorted(i for i in items if i[0] <= position))
    return ((salt, lora), tuple(tokens[:position + 1]), seen)


PROMPT = st.lists(st.sampled_from([1, 2, 3]), min_size=1, max_size=14)


STEMS = ([1, 2, 3, 1], [1, 2, 3, 1, 2, 2, 2, 2], [2, 2, 2, 2, 2, 2, 2, 2], [3, 1])


@st.composite
def prompts(draw: st.DrawFn) -> list[int]:
    """A prompt: a few shared stems (reuse, partial reuse), a block repeated (duplicate
    blocks within one prompt) or anything."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(PROMPT)
    if kind == 1:
        block = draw(st.lists(st.sampled_from([1, 2]), min_size=TPB, max_size=TPB))
        return block * draw(st.integers(1, 3)) + draw(
            st.lists(st.sampled_from([1, 2]), max_size=TPB))
    stem = draw(st.sampled_from(STEMS))
    return stem[:draw(st.sampled_from([1, len(stem) - 1, len(stem), len(stem)]))] + draw(
        st.lists(st.sampled_from([1, 2, 3]), min_size=0 if kind == 2 else 1, max_size=5))


@st.composite
def image_items(draw: st.DrawFn, n: int) -> tuple[MultimodalItem, ...]:
    items: list[MultimodalItem] = []
    end = 0
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        name = draw(st.sampled_from(sorted(IMAGES)))
        offset = draw(st.integers(end, end + 4))
        if offset + IMAGES[name] > n:
            break
        items.append(MultimodalItem(offset, IMAGES[name], name))
        end = offset + IMAGES[name]
    return tuple(draw(st.permutations(items)))


@st.composite
def retentions(draw: st.DrawFn, n: int) -> Retention | None:
    if draw(st.booleans()):
        return None
    cut = draw(st.integers(1, max(1, n)))
    ranges = [RetentionRange(0, cut, draw(st.integers(0, 100)),
                             draw(st.sampled_from([None, 1.0, 30.0])))]
    if draw(st.booleans()):
        ranges.append(RetentionRange(cut, None, draw(st.integers(0, 100))))
    decode = draw(st.sampled_from([None, 0, 60, 100]))
    return Retention(tuple(ranges), decode_priority=decode,
                     decode_retention_s=None if decode is None else draw(
                         st.sampled_from([None, 2.0])))


@st.composite
def requests(draw: st.DrawFn) -> tuple[Any, ...]:
    prompt = draw(prompts())
    return (prompt, draw(st.integers(1, 4)), draw(st.sampled_from([None, None, None, "t", 7])),
            draw(st.sampled_from([None, None, None, 1])), draw(st.integers(0, 5)) == 0,
            draw(st.sampled_from([None, 0, 35, 90])), draw(st.sampled_from([None, 1.0, 9.0])),
            draw(retentions(len(prompt))), draw(image_items(len(prompt))))


class CoreUnderAttack(NewCallsUnderScheduling):
    """13b's machine on tiny pools under every policy, with everything a request can be."""

    @initialize(drafts=st.sampled_from([0, 0, 1, 2]), gpu=st.one_of(st.integers(1, 8),
                                                                     st.integers(5, 8)),
                host=st.one_of(st.integers(0, 8), st.integers(4, 8)), evict=st.booleans(),
                chunked=st.booleans(), policy=st.sampled_from(EVICTION_POLICIES),
                partial=st.booleans(), copy=st.booleans(), mnt=st.sampled_from([4, 8, 12, 16]),
                batch=st.sampled_from([1, 2, 256]), offload_min=st.sampled_from([0, 30, 100]),
                chunk=st.sampled_from([None, None, 1, 3]), wait=st.sampled_from([1, 64]),
                reuse=st.sampled_from([True, True, True, False]))
    def build(self, drafts: int, gpu: int, host: int, evict: bool, chunked: bool,
              policy: str, partial: bool, copy: bool, mnt: int, batch: int,
              offload_min: int, chunk: int | None, wait: int, reuse: bool) -> None:
        self.setup(drafts, gpu, host, evict, chunked, policy, partial, copy, mnt, batch,
                   offload_min, chunk, wait, reuse)

    def setup(self, drafts: int, gpu: int, host: int, evict: bool, chunked: bool,
              policy: str, partial: bool, copy: bool, mnt: int, batch: int,
              offload_min: int, chunk: int | None, wait: int, reuse: bool = True) -> None:
        """The manager, scheduler and fake data plane of a drawn setup."""
        CLOCK.now = 0.0
        config = CacheConfig(tokens_per_block=TPB, num_gpu_blocks=gpu, num_host_blocks=host,
                             enable_events=True, eviction_policy=policy,
                             enable_block_reuse=reuse,
                             enable_partial_reuse=partial, copy_on_partial_reuse=copy,
                             offload_min_priority=offload_min)
        self.mgr = KVCacheManager(config, clock=CLOCK)
        self.mgr.record_spills()  # as a write-back remote tier does
        self.known: dict[int, list[object]] = {}  # a cached block's hash -> its KV
        self.sched = Scheduler(self.mgr, SchedulerConfig(
            max_num_tokens=max(mnt, drafts + 1), enable_chunked_prefill=chunked,
            max_batch_size=batch, max_chunk_tokens=chunk if chunked else None,
            max_wait_steps=wait,
            capacity_policy="max_utilization" if evict else "guaranteed_no_evict",
            num_speculative_tokens=drafts))
        self.gpu = {s: [None] * TPB for s in range(gpu)}
        self.host = {s: [None] * TPB for s in range(host)}
        self.keys: dict[str, tuple[Any, ...]] = {}
        self.sides: list[str] = []  # the engine's own sequences, in the manager only
        self.holds: set[str] = set()  # waiting requests held back

    # ---- the fake data plane, keyed by images too ----------------------------------------

    def work(self, step: Any) -> dict[str, tuple[int, list[int], list[int], Any]]:
        out = super().work(step)
        return {rid: (first, tokens, table, self.keys[rid])
                for rid, (first, tokens, table, _) in out.items()}

    def content_of(self, key: Any, tokens: list[int], p: int) -> Any:
        return kv(key, tokens, p)  # keyed by images too

    # ---- rules ---------------------------------------------------------------------------

    @rule(reqs=st.lists(requests(), min_size=1, max_size=3), dup=st.booleans())
    def add(self, reqs: list[tuple[Any, ...]], dup: bool) -> None:
        if dup:  # the batch's first prompt twice: duplicate blocks across a batch
            reqs = reqs + reqs[:1]
        for prompt, out, salt, lora, skip, priority, ret_s, retention, items in reqs:
            self.n += 1
            req = Request(f"r{self.n}", prompt, out, salt=salt, lora_id=lora,
                          priority=priority, retention_s=None if priority is None else ret_s,
                          retention=retention, skip_reading_prefix_cache=skip,
                          mm_items=items)
            self.queue(req, (salt, lora, tuple(
                (i.offset, i.length, i.content_hash) for i in items)))

    def queue(self, req: Request, keys: tuple[Any, ...]) -> None:
        """Queue ``req`` (one too large for the pool is refused, and left out) and note
        the key space and images its blocks are keyed by."""
        try:
            self.sched.add_request(req)
        except ValueError as e:
            assert "needs" in str(e) or "prompt tokens but" in str(e), e
            return
        self.requests[req.request_id] = req
        self.keys[req.request_id] = keys

    @rule(data=st.data(), fail=st.sampled_from(["none", "none", "compute", "transfer"]))
    def step(self, data: st.DataObject, fail: str) -> None:
        self.before = self.figures()
        self.data: st.DataObject | None = data
        super().step(data, fail)
        self.data = None

    def apply(self, step: Any) -> None:
        """The step's update, some of its sampling requests stopped at random (an EOS):
        a stopped request finishes at once with the model's output so far."""
        data = getattr(self, "data", None)
        sampling = sorted({c.request_id for c in step.context_chunks
                           if c.first_token + c.num_tokens
                           >= self.sched.running[c.request_id].num_prefill_tokens}
                          | set(step.decode_request_ids))
        stopped = (set(data.draw(st.lists(st.sampled_from(sampling), unique=True,
                                          max_size=1)))
                   if data is not None and sampling else set())
        sampled = self.sampled_of(step)
        for req in self.sched.update(step, sampled, stopped):
            rid = req.request_id
            self.finished[rid] = list(req.output)
            if rid in stopped:  # finished early, with the model's tokens so far
                assert req.output == cacheless_output(req.prompt, len(req.output)), rid
                assert req.output[-1:] == [sampled[rid] if isinstance(sampled[rid], int)
                                           else sampled[rid][-1]], (rid, req.output)
                del self.requests[rid]


    def step_plain(self) -> None:
        self.before = self.figures()
        super().step_plain()
        self.cached_blocks_hold_their_kv()

    def figures(self) -> tuple[int, ...]:
        """The stats a step moves (its plan's ops and its admissions' reuse, a resumed
        request's counted apart from the queries')."""
        stats = self.mgr.stats
        return (stats.gpu.offloaded_blocks, stats.host.onboarded_blocks,
                stats.num_partial_copies,
                stats.num_reused_tokens + stats.num_resumed_reused_tokens)

    def run_plan(self, step: Any, skip: set[int]) -> None:
        """The step's figures are its plan's and its chunks': onboards and offloads
        counted are those the plan holds, the reuse counted is the reuse its admissions
        got (a request skipping the cache reuses nothing, counts nothing)."""
        self.check_spills()
        kinds = [step.transfer_plan.op(i).kind for i in range(len(step.transfer_plan))]
        after = self.figures()
        delta = [a - b for a, b in zip(after, self.before, strict=True)]
        assert delta[0] == kinds.count(OpKind.OFFLOAD), (delta, kinds)
        assert delta[1] == kinds.count(OpKind.ONBOARD), (delta, kinds)
        assert delta[2] == kinds.count(OpKind.COPY), (delta, kinds)
        assert delta[3] == step.num_reused_tokens, (delta, step)
        # The step's own books: its tokens, its batch, its chunks.
        config = self.sched.config
        drafts = step.num_draft_tokens or (0,) * len(step.decode_request_ids)
        assert step.num_scheduled_tokens == (sum(c.num_tokens for c in step.context_chunks)
                                             + len(step.decode_request_ids) + sum(drafts)), step
        assert step.num_overflow_tokens == 0, step
        assert len(step.context_chunks) + len(step.decode_request_ids) <= config.max_batch_size
        ids = [c.request_id for c in step.context_chunks] + list(step.decode_request_ids)
        assert len(set(ids)) == len(ids), step
        # A request listed preempted (by this step, or by a reset or fault before it) is
        # scheduled again only as a new admission, from what it reuses.
        chunks = {c.request_id: c for c in step.context_chunks}
        for rid in step.preempted_request_ids:
            assert rid not in step.decode_request_ids, step
            assert rid not in chunks or chunks[rid].first_token == chunks[rid].num_reused_tokens
        for c in step.context_chunks:
            assert c.num_tokens >= 1, c
            req = self.sched.running[c.request_id]
            assert c.first_token + c.num_tokens <= req.num_prefill_tokens, (c, req)
        super().run_plan(step, skip)

    @rule(seconds=st.sampled_from([0.5, 1.5, 5.0, 40.0]))
    def time_passes(self, seconds: float) -> None:
        CLOCK.now += seconds

    @rule(prompt=PROMPT, steal=st.booleans())
    def side_admission(self, prompt: list[int], steal: bool) -> None:
        """A sequence of the engine's own, admitted in the manager directly and computed at
        once; at times under the id of a request it queued in the scheduler (which waits
        until the id is free)."""
        waiting = [r.request_id for r in self.sched.waiting
                   if not self.mgr.has_sequence(r.request_id)]
        self.n += 1
        rid = waiting[0] if steal and waiting else f"side{self.n}"
        try:
            adm = self.mgr.add_sequence(SequenceSpec(rid, prompt))
        except ValueError as e:
            assert "needs" in str(e), e  # too long for the pool
            return
        self.run_ops()
        if not adm.admitted:
            return
        key = (None, None, ())
        table = self.mgr.block_table(rid)
        for p in range(adm.num_reused_tokens):  # what it reuses holds its KV
            assert self.gpu[table[p // TPB]][p % TPB] == kv(key, prompt, p), (rid, p)
        for p in range(adm.num_reused_tokens, len(prompt)):
            self.gpu[table[p // TPB]][p % TPB] = kv(key, prompt, p)
        self.sides.append(rid)

    @precondition(lambda self: self.sides)
    @rule(data=st.data())
    def side_release(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(self.sides))
        self.mgr.remove_sequence(rid)
        self.run_ops()
        self.sides.remove(rid)

    @precondition(lambda self: self.sched.waiting)
    @rule(data=st.data())
    def hold(self, data: st.DataObject) -> None:
        """A waiting request held back (its prefix fetched from a remote tier, say)."""
        rid = data.draw(st.sampled_from([r.request_id for r in self.sched.waiting]))
        self.sched.hold(rid)
        self.holds.add(rid)

    @precondition(lambda self: self.holds)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.holds)))
        self.sched.release(rid)
        self.holds.discard(rid)

    @rule(running=st.booleans())
    def reset(self, running: bool) -> None:
        """A reset with the engine's own sequences live is refused, changing nothing."""
        if not self.sides:
            super().reset(running)
            return
        cached, order = self.mgr.cached_blocks(), list(self.sched.running)
        assert self.sched.reset_prefix_cache(running) is False
        assert self.mgr.cached_blocks() == cached and list(self.sched.running) == order

    def run_ops(self) -> None:
        """Execute a plan taken outside a step (the spills read first)."""
        plan = self.mgr.take_plan()
        self.check_spills()
        for op in plan.ops:
            self.run_op(op)

    @rule()
    def pickled(self) -> None:
        """The scheduler and its manager pickled and read back between calls."""
        self.mgr, self.sched = pickle.loads(pickle.dumps((self.mgr, self.sched)))

    @rule(prompt=PROMPT, n=st.integers(1, 3), salt=st.sampled_from([None, "t"]),
          lora=st.sampled_from([None, 1]))
    def import_blocks(self, prompt: list[int], n: int, salt: object,
                      lora: int | None) -> None:
        slots = self.mgr.import_blocks(prompt, n, salt, lora)  # type: ignore[arg-type]
        self.check_spills()  # read before the import's KV is written over them
        if not slots:
            return
        hashes = prompt_block_hashes(get_hash_fn(self.mgr.config.hash_algo), prompt, TPB,
                                     lora, salt)
        by_hash = {b.block_hash: b for b in self.mgr.cached_blocks()}
        for i, h in enumerate(hashes):
            b = by_hash.get(h)
            if b is not None and b.tier is Tier.HOST and b.slot in slots:
                self.host[b.slot] = [kv((salt, lora, ()), prompt, p)
                                     for p in range(i * TPB, (i + 1) * TPB)]

    def teardown(self) -> None:
        if hasattr(self, "mgr") and self.sched.unapplied_step is None:
            for rid in self.sides:
                self.mgr.remove_sequence(rid)
                self.run_ops()
            self.sides = []
            for rid in self.holds:
                self.sched.release(rid)
            self.holds = set()
            for _ in range(3000):  # tiny pools, batches of one: many steps a request
                if not self.sched.has_unfinished():
                    break
                self.guesses = {}
                self.step_plain()
        super().teardown()

    # ---- checks after every operation ----------------------------------------------------

    def check_spills(self) -> None:
        """Each host block the cache dropped since the last drain is listed once, with a
        slot that still holds its KV (read before the plan that may reuse the slot runs)."""
        spills = self.mgr.drain_spills()
        assert len({h for h, _ in spills}) == len(spills), spills
        for h, slot in spills:
            assert h in self.known, (h, slot)
            assert self.host[slot] == self.known[h], (h, slot, self.host[slot], self.known[h])

    @invariant()
    def cached_blocks_hold_their_kv(self) -> None:
        """Every cached block's slot holds the KV of its own tokens in its key space and
        images (its hash recomputed from what the slot holds), and the pools add up."""
        if not hasattr(self, "mgr"):
            return
        self.sched.check_invariants()
        self.check_spills()
        mgr = self.mgr
        chains: dict[int, list[int]] = {}
        cached = mgr.cached_blocks()
        for b in cached:
            chain = (chains[b.parent_hash] if b.parent_hash is not None else []) + list(b.tokens)
            chains[b.block_hash] = chain
            assert len(b.tokens) == TPB, b
            held = (self.gpu if b.tier is Tier.GPU else self.host)[b.slot]
            for i, value in enumerate(held):
                p = len(chain) - TPB + i
                assert isinstance(value, tuple) and len(value) == 3, (b, p, held)
                assert value[0] == (b.salt, b.lora_id) and value[1] == tuple(chain[:p + 1]), (
                    b, p, held)
            last = held[-1]
            assert isinstance(last, tuple)
            items: tuple[tuple[int, int, str], ...] = last[2]
            mm = [MultimodalItem(o, n, h) for o, n, h in items]
            extras = block_extras(mm, max([len(chain)] + [o + n for o, n, _ in items]), TPB)
            nb = len(chain) // TPB
            hashes = prompt_block_hashes(get_hash_fn(mgr.config.hash_algo), chain, TPB,
                                         b.lora_id, b.salt,
                                         None if extras is None else extras[:nb])
            assert hashes[-1] == b.block_hash, (b, items)  # its images, as the cache keys it
            self.known[b.block_hash] = list(held)
        # Blocks in use and free add up to the pools: a GPU slot is in a live request's
        # table or a cached block one holds (a request holding its own copy of a block
        # another stored first holds both), reserved for one's growth, or free for a new
        # request (free, or cached and evictable); no host block is held between calls.
        used = {b.slot for b in cached if b.tier is Tier.GPU and b.priority is None}
        for rid in [*self.sched.running, *self.sides]:
            if mgr.has_sequence(rid):
                used.update(mgr.block_table(rid))
        assert (len(used) + mgr.num_reserved_blocks + mgr.num_free_gpu_blocks
                == mgr.config.num_gpu_blocks), (used, mgr.num_reserved_blocks,
                                                mgr.num_free_gpu_blocks)
        assert mgr.num_free_host_blocks == mgr.config.num_host_blocks

    @invariant()
    def lookup_finds_the_cached_chain(self) -> None:
        """A lookup of a request's prompt reuses exactly its leading cached hashes."""
        if not hasattr(self, "mgr"):
            return
        mgr = self.mgr
        present = {b.block_hash for b in mgr.cached_blocks()}
        for rid, req in list(self.requests.items())[-4:]:
            salt, lora, items = self.keys[rid]
            mm = [MultimodalItem(o, n, h) for o, n, h in items]
            m = mgr.lookup(req.prompt, salt, lora, mm)
            hashes = prompt_block_hashes(get_hash_fn(mgr.config.hash_algo), req.prompt, TPB,
                                         lora, salt, block_extras(mm, len(req.prompt), TPB),
                                         num_blocks=(len(req.prompt) - 1) // TPB)
            n = 0
            while n < len(hashes) and hashes[n] in present:
                n += 1
            assert m.num_tokens - m.num_partial_tokens == n * TPB, (rid, m, n)
            if not mgr.config.enable_partial_reuse:
                assert m.num_partial_tokens == 0, m
            assert m.num_tokens <= len(req.prompt) - 1, m


class HostHeavy(CoreUnderAttack):
    """The same machine where blocks go to the host and come back most: small GPU pools
    beside larger host ones, every block offloadable, prompts from the shared stems."""

    @initialize(drafts=st.sampled_from([0, 1]), gpu=st.integers(3, 6), host=st.integers(3, 8),
                evict=st.booleans(), chunked=st.booleans(),
                policy=st.sampled_from(EVICTION_POLICIES), partial=st.booleans(),
                copy=st.booleans(), mnt=st.sampled_from([8, 16]))
    def build(self, drafts: int, gpu: int, host: int, evict: bool, chunked: bool,
              policy: str, partial: bool, copy: bool, mnt: int) -> None:
        self.setup(drafts, gpu, host, evict, chunked, policy, partial, copy, mnt, 256, 0,
                   None, 64)

    @rule(reqs=st.lists(st.tuples(st.sampled_from(STEMS), st.lists(
        st.sampled_from([1, 2, 3]), max_size=3), st.integers(1, 3),
        st.sampled_from([None, 10, 90])), min_size=1, max_size=3))
    def add_stems(self, reqs: list[tuple[list[int], list[int], int, int | None]]) -> None:
        """Requests of the shared stems in one key space: their prefixes come back from
        the host."""
        for stem, tail, out, priority in reqs:
            self.n += 1
            self.queue(Request(f"r{self.n}", stem + tail, out, priority=priority),
                       (None, None, ()))


def test_core_under_attack_keeps_reuse_blocks_and_kv_exact() -> None:
    run_state_machine_as_test(CoreUnderAttack, settings=settings(
        max_examples=int(os.environ.get("RT23_EXAMPLES", "400")), stateful_step_count=30,
        deadline=None, suppress_health_check=list(HealthCheck)))


def test_host_tier_under_attack_keeps_reuse_blocks_and_kv_exact() -> None:
    run_state_machine_as_test(HostHeavy, settings=settings(
        max_examples=int(os.environ.get("RT23_EXAMPLES", "200")), stateful_step_count=30,
        deadline=None, suppress_health_check=list(HealthCheck)))


# ---- check_invariants on a large pool -----------------------------------------------------


def big_manager() -> KVCacheManager:
    """1 Mi GPU and 1 Mi host blocks (pools are built lazily): one cached block."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=1 << 20,
                                     num_host_blocks=1 << 20))
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 5]))
    mgr.remove_sequence("a")
    return mgr


def test_check_invariants_costs_the_slots_in_use_not_the_capacity() -> None:
    """check_invariants recounted every free slot one by one, the never-used ones too: on
    a pool built lazily (the config allows 2**32 blocks a tier) it cost O(capacity), 17 s
    for an empty manager of 1 Mi + 4 Mi blocks, and MemoryError at 2**32. Now the
    never-used slots are checked as one range: the check of 1 Mi + 1 Mi blocks allocates
    next to nothing."""
    mgr = big_manager()
    tracemalloc.start()
    try:
        mgr.check_invariants()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


def test_check_invariants_still_finds_a_lost_or_doubly_held_slot() -> None:
    """The range check still names a slot that no book holds (taken from the free list
    behind the cache's back) and a never-used slot that a cached block claims to hold."""
    mgr = big_manager()
    cache = mgr._cache
    cache.gpu._num_fresh += 1  # a slot gone from the free list, held by nobody
    with pytest.raises(AssertionError, match=r"GPU: 1048575 slots accounted for"):
        mgr.check_invariants()
    mgr = big_manager()
    cache = mgr._cache
    (node,) = cache.nodes()
    node.slots = array("q", [(1 << 20) - 1])  # never handed out, yet held
    with pytest.raises(AssertionError, match=r"GPU slot 1048575 held by both the free "
                                             r"list \(never used\) and node"):
        mgr.check_invariants()


# ---- a request queued under an id the caller then admitted in the manager itself ------------


class RaisingPhases(StepPhases):
    """A step timer that raises at the mark after admission (the step fails whole)."""

    def mark(self, phase: str) -> None:
        if phase == "admit":
            raise RuntimeError("timer fault")
        super().mark(phase)


def engine_holds_a_queued_id(first: str | None = None
                             ) -> tuple[KVCacheManager, Scheduler, list[int]]:
    """'x' queued in the scheduler (behind ``first``, one request a step), then a sequence
    of the engine's own admitted in the manager directly under the same id (add_request
    refuses the other order)."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8))
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=16, max_batch_size=1))
    if first is not None:
        sched.add_request(Request(first, [5, 6, 7], 2))
    sched.add_request(Request("x", [1, 2, 3, 4, 5], 2))
    adm = mgr.add_sequence(SequenceSpec("x", [9, 9, 9, 9, 9, 9]))
    return mgr, sched, list(adm.block_ids)


def test_a_queued_request_whose_id_the_engine_holds_waits_for_it() -> None:
    """The step put 'x' in its admission batch, the manager refused the live id
    (ValueError) and the step failed whole, its recovery calling compute_failed on every
    waiting id the manager held: the engine's own 'x' was dropped under its feet (its
    blocks freed), and the scheduler's 'x' admitted in its place. Now the request waits
    while the id is taken (the engine's sequence untouched) and runs once it is free."""
    mgr, sched, table = engine_holds_a_queued_id()
    step = sched.step()
    assert step.context_chunks == () and step.decode_request_ids == ()
    assert sched.update(step, {}) == []
    assert mgr.has_sequence("x") and mgr.block_table("x") == table
    assert [r.request_id for r in sched.waiting] == ["x"] and not sched.running
    sched.check_invariants()
    mgr.check_invariants()
    mgr.remove_sequence("x")  # the engine is done with its own
    step = sched.step()
    assert [(c.request_id, c.first_token, c.num_tokens) for c in step.context_chunks] == [
        ("x", 0, 5)]
    sched.update(step, {"x": 6})
    (done,) = sched.update(sched.step(), {"x": 7})
    assert done.output == [6, 7]
    assert mgr.num_sequences == 0 and mgr.num_free_gpu_blocks == 8


def test_a_failed_step_fails_only_what_it_admitted() -> None:
    """A step failing for any reason (here its timer) failed every waiting request the
    manager held, as if the step had admitted it: the engine's own 'x' was dropped. Now it
    fails what its admission offered ('y', admitted, then failed and first in the queue
    again; 'x' was no candidate, one request a step); the engine's 'x' keeps its
    blocks."""
    mgr, sched, table = engine_holds_a_queued_id(first="y")
    sched.phases = RaisingPhases(lambda: 0.0)
    with pytest.raises(RuntimeError, match="timer fault"):
        sched.step()
    assert mgr.has_sequence("x") and mgr.block_table("x") == table
    assert not mgr.has_sequence("y")
    assert [r.request_id for r in sched.waiting] == ["y", "x"] and not sched.running
    sched.check_invariants()
    mgr.check_invariants()


# ---- a copy of a request a scheduler holds ----------------------------------------------------


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "copy"])
def test_a_copy_of_a_held_request_is_held_by_no_scheduler(how: str) -> None:
    """A Request copied alone (an engine snapshotting it, or sending it to another
    process) while a scheduler held it kept the scheduler's hold: the copy refused every
    field assignment and every scheduler ('queued or running already (in this scheduler
    or another)'), for good, though nothing held it. Now the copy is the caller's; the
    original stays held."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8))
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=16))
    req = Request("x", [1, 2, 3, 4, 5], 2)
    sched.add_request(req)
    copied = {"pickle": lambda r: pickle.loads(pickle.dumps(r)),
              "deepcopy": copy.deepcopy, "copy": copy.copy}[how](req)
    assert req.held and not copied.held
    copied.priority = 90
    other = Scheduler(KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8)))
    other.add_request(copied)
    assert copied.held and [r.request_id for r in other.waiting] == ["x"]
    with pytest.raises(AttributeError, match="priority of request 'x' cannot change"):
        req.priority = 90
    assert req.priority is None
    sched.check_invariants()
    other.check_invariants()


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_copied_scheduler_holds_its_copies_of_its_requests(how: str) -> None:
    """A scheduler copied with its requests (between steps or mid-step) still holds its
    copies, waiting and running: their fields refuse to change, and each is the caller's
    again once it finishes."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8))
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=8, enable_chunked_prefill=False))
    sched.add_request(Request("x", [1, 2, 3, 4, 5], 2))
    sched.add_request(Request("y", [7, 8, 9, 9, 9], 1))
    sched.step()  # 'x' runs, 'y' waits (the budget)
    twin = (pickle.loads(pickle.dumps(sched)) if how == "pickle" else copy.deepcopy(sched))
    running, waiting = twin.running["x"], twin.waiting[0]
    assert running.held and waiting.held
    with pytest.raises(AttributeError, match="max_output_tokens of request 'y' cannot"):
        waiting.max_output_tokens = 9
    unapplied = twin.unapplied_step
    assert unapplied is not None
    twin.update(unapplied, {"x": 6})
    done: list[Request] = []
    for _ in range(3):
        step = twin.step()
        sampled = {c.request_id: 6 for c in step.context_chunks}
        done += twin.update(step, sampled | dict.fromkeys(step.decode_request_ids, 7))
    assert sorted(r.request_id for r in done) == ["x", "y"]
    assert not running.held and not waiting.held
    twin.check_invariants()
    twin.manager.check_invariants()
