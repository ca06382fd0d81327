"""Red team, twelfth pass: the newest surfaces (events with tokens and keys as a caller builds
them, the lazy package ``__init__``), given what an adversary would. Each test fails on the
code before its fix and asserts the exact refusal and that nothing changed."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from kvtier import (
    CacheConfig,
    KVCacheManager,
    MultimodalItem,
    Retention,
    RetentionRange,
    SequenceSpec,
    TransferPlan,
)
from kvtier.event_codec import check_events, decode_events, encode_events
from kvtier.events import AllBlocksCleared, BlockRemoved, BlockStored, BlockTierChanged, Event
from kvtier.publisher import EventBatch, InMemoryEventBus
from kvtier.router import PrefixHit, PrefixIndex
from kvtier.tier import Tier

G, H = Tier.GPU, Tier.HOST
TOKENS = (1, 2, 3, 4)


def stored(seq: object, block_hash: object, **fields: object) -> BlockStored:
    """A stored block's event, any of its fields (even one of the wrong type) replaced."""
    values = {"seq": seq, "block_hash": block_hash, "parent_hash": None, "tier": G,
              "num_tokens": 4, "lora_id": None, "token_ids": TOKENS, "extra_key": None,
              "salt_key": None, **fields}
    return BlockStored._make(values[name] for name in BlockStored._fields)


# ---- events whose fields the wire format cannot carry ----------------------------------------

IDS = r"None or a tuple of num_tokens \(4\) ids in \[0, 2\*\*63\), "
# (the bad event at events[1], the field and the rule its message names)
BAD_EVENTS: list[tuple[Event, str, str]] = [
    (stored(1, 2, tier=7), "tier", "a Tier, got 7"),
    (stored(1, [2]), "block_hash", r"an int in \[0, 2\*\*128\), got \[2\]"),
    (stored(1, "x"), "block_hash", r"an int in \[0, 2\*\*128\), got 'x'"),
    (stored(1, -1), "block_hash", r"an int in \[0, 2\*\*128\), got -1"),
    (stored(1, 1 << 128), "block_hash", r"an int in \[0, 2\*\*128\), got an int of 129 bits"),
    (stored(1, True), "block_hash", r"an int in \[0, 2\*\*128\), got True"),
    (stored("1", 2), "seq", r"an int in \[0, 2\*\*63\), got '1'"),
    (stored(-1, 2), "seq", r"an int in \[0, 2\*\*63\), got -1"),
    (stored(1, 2, parent_hash=-3), "parent_hash", r"None or an int in \[0, 2\*\*128\), got -3"),
    (stored(1, 2, num_tokens=0), "num_tokens", r"an int in \[1, 2\*\*63\), got 0"),
    (stored(1, 2, lora_id=1.5), "lora_id", r"None or an int in \[-2\*\*63, 2\*\*63\), got 1.5"),
    (stored(1, 2, token_ids=(1, 2, 3)), "token_ids", IDS + r"got \(1, 2, 3\)"),
    (stored(1, 2, token_ids=[1, 2, 3, 4]), "token_ids", IDS + r"got \[1, 2, 3, 4\]"),
    (stored(1, 2, extra_key=b""), "extra_key", "None or non-empty bytes, got b''"),
    (stored(1, 2, salt_key="s"), "salt_key", "None or non-empty bytes, got 's'"),
    (BlockRemoved(1, 2, 1), "tier", "a Tier, got 1"),  # type: ignore[arg-type]
    (BlockRemoved(1, None, G), "block_hash",  # type: ignore[arg-type]
     r"an int in \[0, 2\*\*128\), got None"),
    (BlockTierChanged(1, 2, G, 5), "new_tier", "a Tier, got 5"),  # type: ignore[arg-type]
    (BlockTierChanged(1, 2, "gpu", H), "old_tier",  # type: ignore[arg-type]
     "a Tier, got 'gpu'"),
    (AllBlocksCleared(1 << 63), "seq", r"an int in \[0, 2\*\*63\), got 9223372036854775808"),
]

# Token ids that are no ids: refused where they are read (the wire, vLLM's events), left
# to those consumers by the in-memory bus and the router's index, which read none.
BAD_TOKEN_IDS = [(1, 2, 3, -4), (1, 2, 3, 4.0), (1, 2, 3, True), (1, 2, 3, 1 << 63)]


def message_of(field: str, rule: str) -> str:
    return rf"^events\[1\]\.{field} must be {rule}$"


@pytest.mark.parametrize(("event", "field", "rule"), BAD_EVENTS)
def test_a_bad_event_is_refused_by_the_index_changing_nothing(event: Event, field: str,
                                                              rule: str) -> None:
    """PrefixIndex.apply checked only each event's type: a tier 7 was stored and raised
    IndexError from a later match; an unhashable hash raised TypeError with the batch's
    first event applied; a str hash matched a str. Now ValueError names the event, its
    field and value, and the index is as it was."""
    index = PrefixIndex()
    index.apply("a", [stored(0, 9)])
    with pytest.raises(ValueError, match=message_of(field, rule)):
        index.apply("a", [stored(1, 10), event])
    assert index.blocks("a") == {9: G}
    assert index.match([9, 10]) == {"a": PrefixHit(1, 0)}
    index.check_invariants()
    with pytest.raises(ValueError, match=message_of(field, rule)):
        index.apply_updates([EventBatch("b", [stored(0, 3)]), EventBatch("a", [stored(1, 10),
                                                                               event])])
    assert index.instances() == ["a"] and index.blocks("a") == {9: G}


@pytest.mark.parametrize(("event", "field", "rule"), BAD_EVENTS)
def test_a_bad_event_is_refused_when_published_and_loses_no_update(event: Event, field: str,
                                                                   rule: str) -> None:
    """InMemoryEventBus.publish took it: a str seq raised TypeError from the subscriber's
    next poll with its buffer drained (every instance's updates lost), the others reached
    every consumer. Now publish refuses the batch; the other updates still come."""
    bus = InMemoryEventBus()
    subscriber = bus.subscribe()
    bus.publish("a", [stored(0, 1)])
    with pytest.raises(ValueError, match=message_of(field, rule)):
        bus.publish("b", [stored(0, 2), event])
    assert bus.num_published == 1
    assert subscriber.poll() == [EventBatch("a", [stored(0, 1)])]


@pytest.mark.parametrize("ids", BAD_TOKEN_IDS)
def test_token_ids_that_are_no_ids_are_refused_by_the_redis_publisher(
        ids: tuple[object, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    """RedisStreamPublisher.publish encoded them: a -4, a 4.0, a True or an id past 2**63
    made an entry no subscriber could decode (a hole in the stream, every subscriber
    resyncing). Now ValueError names the event, and nothing is sent."""
    from kvtier import publisher, stream_client

    class Client:
        def xadd(self, *args: object, **options: object) -> bytes:
            raise AssertionError("nothing is sent")

    monkeypatch.setattr(stream_client, "connect", lambda url, **_: Client())
    pub = publisher.RedisStreamPublisher("redis://unused")
    with pytest.raises(ValueError, match=message_of("token_ids", IDS + r"got \(1, 2, 3, .*\)")):
        pub.publish("a", [stored(0, 1), stored(1, 2, token_ids=ids)])
    assert pub.num_failed_batches == 0
    bus = InMemoryEventBus()
    bus.publish("a", [stored(0, 1), stored(1, 2, token_ids=ids)])  # read by no one here
    assert bus.num_published == 2


def test_an_event_that_passes_encodes_and_decodes_to_itself() -> None:
    """What check_events accepts is exactly what the wire carries: each field at its
    bounds survives encode and decode unchanged (so a Redis subscriber never sees a hole
    where a publisher accepted a batch)."""
    top = (1 << 128) - 1
    events: list[Event] = [
        stored(0, 0, parent_hash=top, num_tokens=1, token_ids=((1 << 63) - 1,),
               lora_id=-(1 << 63), extra_key=b"\x00", salt_key=b"s"),
        stored(1, top, lora_id=(1 << 63) - 1, token_ids=None),
        BlockRemoved(2, top, H), BlockTierChanged(3, 5, H, G),
        AllBlocksCleared((1 << 63) - 1)]
    check_events(events)
    assert decode_events(encode_events(events)) == events


def test_the_fast_check_and_the_naming_check_agree_on_random_events() -> None:
    """``check_events`` passes a batch on its fast path (``_event_ok``) or walks it with the
    check that names the field (``_event_problem``): the two state the rules twice, so over
    random events mixing good and bad values of every field they must agree: a batch of one
    event is refused exactly when the naming check finds a problem, and one that passes
    round-trips through the wire."""
    import random

    from kvtier.event_codec import _event_ok, _event_problem

    rng = random.Random(12)
    ints = [0, 1, 7, (1 << 63) - 1, 1 << 63, (1 << 128) - 1, 1 << 128, -1, True, 2.0, "3", None]
    tiers = [G, H, 0, 7, None]
    keys = [None, b"k", b"", "s", 5]
    ids_of = [None, (), (1, 2), (1, -2), (1, 2.0), (True, 1), [1, 2], ((1 << 63) - 1, 0)]

    def pick(values: list[Any]) -> Any:
        return rng.choice(values)

    for _ in range(4_000):
        kind = rng.randrange(4)
        event: Any
        if kind == 0:
            ids = pick(ids_of)
            event = BlockStored(pick(ints), pick(ints), pick([None, *ints]), pick(tiers),
                                len(ids) if isinstance(ids, (tuple, list)) and rng.random() < 0.8
                                else pick(ints), pick([None, *ints]), ids, pick(keys),
                                pick(keys))
        elif kind == 1:
            event = BlockRemoved(pick(ints), pick(ints), pick(tiers))
        elif kind == 2:
            event = BlockTierChanged(pick(ints), pick(ints), pick(tiers), pick(tiers))
        else:
            event = AllBlocksCleared(pick(ints))
        problem = _event_problem(event, True)
        if _event_ok(event):
            assert _event_problem(event, False) is None, event
        try:
            check_events([event])
        except ValueError:
            assert problem is not None, event
        else:
            assert problem is None, event
            assert decode_events(encode_events([event])) == [event]


def test_a_managers_events_pass_the_check() -> None:
    """Every event a manager emits (salted, LoRA, multimodal, offloaded, removed, cleared)
    passes: the check refuses only what no manager makes."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=4, num_host_blocks=2,
                                     enable_events=True), clock=lambda: 0.0)
    for i, (salt, lora, mm) in enumerate([(None, None, ()), ("t", 3, ()),
                                          (b"", None, (MultimodalItem(1, 2, b"img"),))]):
        mgr.add_sequence(SequenceSpec(f"r{i}", [i] * 9, salt=salt, lora_id=lora, mm_items=mm))
        mgr.remove_sequence(f"r{i}")
    mgr.reset_cache()
    events = mgr.drain_events()
    assert {type(e) for e in events} == {BlockStored, BlockTierChanged, BlockRemoved,
                                         AllBlocksCleared}
    check_events(events)
    assert decode_events(encode_events(events)) == events


# ---- the lazy package __init__ ------------------------------------------------------------


def run_child(code: str) -> list[str]:
    """``code`` in a new interpreter (nothing of kvtier imported yet); its stdout lines."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()


def test_submodules_are_attributes_of_the_package_as_before() -> None:
    """Before the lazy ``__init__``, ``import kvtier`` imported ``kvtier.manager``,
    ``kvtier.events``... and so made them attributes: ``kvtier.events.BlockStored`` after
    ``import kvtier`` raised AttributeError ("module 'kvtier' has no attribute 'events'")
    once the imports became lazy. Now a submodule is imported on its first use as an
    attribute (any of them: ``kvtier.sim`` too); a name that is none, or private, is still
    an AttributeError naming it, and imports nothing."""
    lines = run_child("""
        import sys
        import kvtier
        print(kvtier.events.BlockStored.__name__, kvtier.manager.KVCacheManager.__name__,
              kvtier.transfer.TransferPlan.__name__, kvtier.sim.__name__,
              "events" in dir(kvtier))
        for name in ("no_such_module", "_private", "__wrapped__"):
            try:
                getattr(kvtier, name)
            except AttributeError as exc:
                print(exc)
        print(sorted(m for m in sys.modules if "no_such" in m or "_private" in m))
    """)
    assert lines == [
        "BlockStored KVCacheManager TransferPlan kvtier.sim True",
        "module 'kvtier' has no attribute 'no_such_module'",
        "module 'kvtier' has no attribute '_private'",
        "module 'kvtier' has no attribute '__wrapped__'",
        "[]"]


@pytest.mark.parametrize(("argv", "shown"), [
    ("--version", "'--version'"), (b"replay", "b'replay'"), (123, "123"),
    (["replay", 1], r"\['replay', 1\]"), (iter(["--version"]), "<list_iterator"),
])
def test_the_launcher_refuses_an_argv_that_is_no_list_of_arguments(argv: object,
                                                                   shown: str) -> None:
    """main("--version") read the str as its characters ("invalid choice: '-'", status 2),
    main(123) and main(["replay", 1]) raised argparse's own TypeError from inside. Now
    TypeError names the argv, before anything runs."""
    from kvtier.launcher import main

    with pytest.raises(TypeError, match=f"^argv must be a sequence of str \\(the arguments\\) "
                                        f"or None, got {shown}"):
        main(argv)  # type: ignore[arg-type]


# ---- every newer call in random order, against a consumer of the events ------------------

RIDS = ["a", "b", "c"]
SALTS = [None, "t1", b"t2", 3]
LORAS = [None, 1]
RANGES = st.none() | st.builds(
    lambda start, length, priority: Retention((RetentionRange(start, start + length, priority),),
                                              decode_priority=priority),
    st.integers(0, 8), st.integers(1, 8), st.integers(0, 100))
REFUSED = (ValueError, TypeError, KeyError, RuntimeError)


class NewerCalls(RuleBasedStateMachine):
    """Random calls on a manager with events, salts, LoRA ids, multimodal items and
    retention ranges, mixing what the eleven passes' machines left out (append_token_columns,
    compute_failed, drop_key_space, hint_waiting, plans of another manager, spills) with the
    rest; many are refused (unknown ids, a second begin_step, bad counts), and a refused call
    changes nothing. After every call the books hold, and the reference model, a consumer
    that knows the cache only from the drained events (through the wire codec, each batch
    passing check_events, seqs gapless) and a router's index fed the same events, holds
    exactly the blocks and tiers the manager reports."""

    def __init__(self) -> None:
        super().__init__()
        config = CacheConfig(tokens_per_block=4, num_gpu_blocks=10, num_host_blocks=5,
                             enable_events=True)
        self.manager = KVCacheManager(config, clock=lambda: 0.0)
        self.other = KVCacheManager(config, clock=lambda: 0.0)
        self.plans: list[TransferPlan] = []
        self.view: dict[int, Tier] = {}
        self.index = PrefixIndex()
        self.next_seq = 0

    def state(self) -> tuple[object, ...]:
        m = self.manager
        return (m.version, m.num_free_gpu_blocks, m.num_reserved_blocks, m.num_free_host_blocks,
                sorted((b.block_hash, b.tier, b.slot) for b in m.cached_blocks()),
                {rid: (m.block_table(rid), m.num_unscheduled_tokens(rid))
                 for rid in RIDS if m.has_sequence(rid)})

    def call(self, op: Callable[[], object]) -> None:
        before = self.state()
        try:
            op()
        except REFUSED:
            assert self.state() == before

    @rule(items=st.lists(st.tuples(st.sampled_from(RIDS), st.lists(st.integers(0, 2), min_size=1,
                                                                   max_size=14),
                                   st.none() | st.integers(1, 14), st.integers(0, 3),
                                   st.sampled_from(SALTS), st.sampled_from(LORAS),
                                   st.booleans(), RANGES), max_size=3,
                         unique_by=lambda item: item[0]))
    def add(self, items: list[tuple[str, list[int], int | None, int, object, int | None, bool,
                                    Retention | None]]) -> None:
        specs = [SequenceSpec(rid, tokens, salt=salt, lora_id=lora,  # type: ignore[arg-type]
                              num_new_tokens=num_new, num_reserved_blocks=reserve,
                              mm_items=(MultimodalItem(0, min(2, len(tokens)), b"i"),) if mm
                              else (), retention=retention)
                 for rid, tokens, num_new, reserve, salt, lora, mm, retention in items]
        self.call(lambda: self.manager.add_sequence_batch(specs))

    def pick(self, data: st.DataObject) -> str:
        """A request id: mostly a live one (a call on it is not refused for that)."""
        live = [rid for rid in RIDS if self.manager.has_sequence(rid)]
        if data.draw(st.integers(0, 9)) and live:
            return data.draw(st.sampled_from(live))
        return data.draw(st.sampled_from([*RIDS, "gone"]))

    @rule(data=st.data(), n=st.integers(-1, 8))
    def prefill(self, data: st.DataObject, n: int) -> None:
        rid = self.pick(data)
        if n > 0 and self.manager.has_sequence(rid):
            n = min(n, max(1, self.manager.num_unscheduled_tokens(rid)))
        self.call(lambda: self.manager.schedule_prefill(rid, n))

    @rule(data=st.data(), tokens=st.lists(st.integers(0, 2), max_size=6))
    def append(self, data: st.DataObject, tokens: list[int]) -> None:
        rid = self.pick(data)
        self.call(lambda: self.manager.append_tokens(rid, tokens))

    @rule(data=st.data(), tokens=st.lists(st.integers(0, 2), max_size=4))
    def append_columns(self, data: st.DataObject, tokens: list[int]) -> None:
        ids = [self.pick(data) for _ in tokens]
        self.call(lambda: self.manager.append_token_columns(ids, tokens))

    @rule(data=st.data(), n=st.integers(-1, 9))
    def lookahead(self, data: st.DataObject, n: int) -> None:
        rid = self.pick(data)
        self.call(lambda: self.manager.reserve_lookahead(rid, n))

    @rule(data=st.data(), store=st.booleans())
    def remove(self, data: st.DataObject, store: bool) -> None:
        rid = self.pick(data)
        self.call(lambda: self.manager.remove_sequence(rid, store))

    @rule(begin=st.booleans())
    def step_bound(self, begin: bool) -> None:
        if begin:
            self.call(self.manager.begin_step)
        else:
            self.call(lambda: self.plans.append(self.manager.end_step()))

    @rule(data=st.data())
    def fail_a_plan(self, data: st.DataObject) -> None:
        self.plans += [self.manager.take_plan(), self.other.take_plan()]
        plan = data.draw(st.sampled_from(self.plans))
        if len(plan):
            failed = data.draw(st.lists(st.integers(-1, len(plan)), max_size=3))
            self.call(lambda: self.manager.transfer_failed(plan, failed))

    @rule(data=st.data(), n=st.integers(0, 2))
    def fail_passes(self, data: st.DataObject, n: int) -> None:
        ids = [self.pick(data) for _ in range(n)]
        self.call(lambda: self.manager.compute_failed(ids))

    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        """Mostly a key space that holds cached blocks, some of them held."""
        cached = sorted({(b.lora_id, b.salt) for b in self.manager.cached_blocks()}, key=repr)
        if data.draw(st.booleans()) and cached:
            lora, salt = data.draw(st.sampled_from(cached))
        else:
            lora, salt = data.draw(st.sampled_from(LORAS)), data.draw(st.sampled_from(SALTS))
        self.call(lambda: self.manager.drop_key_space(lora_id=lora, salt=salt))

    @rule()
    def reset(self) -> None:
        self.manager.reset_cache()

    @rule(tokens=st.lists(st.integers(0, 2), max_size=14), n=st.integers(0, 4),
          salt=st.sampled_from(SALTS))
    def import_blocks(self, tokens: list[int], n: int, salt: object) -> None:
        self.call(lambda: self.manager.import_blocks(tokens, n, salt=salt))  # type: ignore[arg-type]

    @rule(items=st.lists(st.tuples(st.sampled_from([*RIDS, "q"]),
                                   st.lists(st.integers(0, 2), min_size=1, max_size=14)),
                         max_size=3))
    def hint(self, items: list[tuple[str, list[int]]]) -> None:
        self.call(lambda: self.manager.hint_waiting([SequenceSpec(r, t) for r, t in items]))

    @rule()
    def spills(self) -> None:
        self.manager.record_spills()
        self.manager.drain_spills()

    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=14))
    def another_manager(self, tokens: list[int]) -> None:
        if self.other.has_sequence("x"):
            self.other.remove_sequence("x")
        else:
            self.other.add_sequence(SequenceSpec("x", tokens))

    @invariant()
    def books_and_events_hold(self) -> None:
        m = self.manager
        m.check_invariants()
        events = m.drain_events()
        check_events(events)
        events = decode_events(encode_events(events))
        self.index.apply("i", events)
        for e in events:
            assert e.seq == self.next_seq, (e, self.next_seq)
            self.next_seq += 1
            if isinstance(e, BlockStored):
                self.view[e.block_hash] = e.tier
            elif isinstance(e, BlockRemoved):
                assert self.view.pop(e.block_hash) is e.tier, e
            elif isinstance(e, BlockTierChanged):
                assert self.view[e.block_hash] is e.old_tier, e
                self.view[e.block_hash] = e.new_tier
            else:
                self.view.clear()
        held = {b.block_hash: b.tier for b in m.cached_blocks()}
        assert self.view == held == self.index.blocks("i")


def test_newer_calls_in_random_order_keep_the_books_and_the_events_exact() -> None:
    """See ``NewerCalls``."""
    run_state_machine_as_test(NewerCalls, settings=settings(
        max_examples=30, stateful_step_count=40, deadline=None))


# ---- a clock or eviction policy that calls back into the manager it serves ------------------

REENTRANT_CALLS: dict[str, Callable[[KVCacheManager], object]] = {
    "add_sequence_batch": lambda m: m.add_sequence(SequenceSpec("z", [9] * 9)),
    "drop_key_space": lambda m: m.drop_key_space(),
    "remove_sequence": lambda m: m.remove_sequence("a"),
    "take_plan": lambda m: m.take_plan(),
    "reset_cache": lambda m: m.reset_cache(),
}


def reentrant_manager(call: Callable[[KVCacheManager], object],
                      via: str) -> tuple[KVCacheManager, list[Exception]]:
    """A manager with cached history and a live request ``a``, whose eviction policy's
    ``key`` (via "policy") or clock (via "clock") makes ``call`` on it once armed; the
    exceptions the call raised are collected."""
    from kvtier.policies import PriorityLRU

    box: dict[str, KVCacheManager] = {}
    raised: list[Exception] = []

    def call_back() -> None:
        manager = box.pop("armed", None)
        if manager is not None:
            try:
                call(manager)
            except Exception as exc:
                raised.append(exc)
                raise

    class CallingBack(PriorityLRU):
        def key(self, *args: Any) -> Any:
            if via == "policy":
                call_back()
            return super().key(*args)

    def clock() -> float:
        if via == "clock":
            call_back()
        return 0.0

    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8, num_host_blocks=4),
                         policy=CallingBack(), clock=clock)
    for i in range(3):
        mgr.add_sequence(SequenceSpec(f"old{i}", [i] * 9))
        mgr.remove_sequence(f"old{i}")
    mgr.add_sequence(SequenceSpec("a", [7] * 5))
    mgr.take_plan()
    box["armed"] = mgr
    return mgr, raised


@pytest.mark.parametrize("via", ["policy", "clock"])
@pytest.mark.parametrize("name", sorted(REENTRANT_CALLS))
def test_a_call_back_from_the_policy_or_clock_is_refused_and_the_operation_completes(
        name: str, via: str) -> None:
    """A policy's key() or a clock that called add_sequence or drop_key_space on the
    manager mid-eviction broke its books (AssertionError "blocks short of eviction
    candidates", a run with users recorded and none holding it); take_plan handed the
    operation's copies to the callback; remove_sequence released a request under the
    admission in flight. Now the call is refused (RuntimeError naming it), which the
    policy's guard takes as its fault (the fallback evicts) and the clock's reader as a
    bad reading (the last good time): the admission in flight completes, the books hold,
    and the live request is untouched."""
    mgr, raised = reentrant_manager(REENTRANT_CALLS[name], via)
    admission = mgr.add_sequence(SequenceSpec("b", [8] * 17))
    assert [str(e) for e in raised] == [
        f"KVCacheManager.{name}() called from inside the manager's own clock or eviction "
        "policy, while an operation is in flight: refused (they must not call back into the "
        "manager they serve)"]
    assert admission.admitted and mgr.block_table("a") and not mgr.has_sequence("z")
    assert mgr.num_policy_faults == (via == "policy")
    assert mgr.clock.num_faults == (via == "clock")
    # The admission's copies are all in the caller's plan, exactly those of a manager whose
    # policy and clock never called back (the fallback evicts in PriorityLRU's order).
    calm, _ = reentrant_manager(REENTRANT_CALLS[name], "neither")
    assert calm.add_sequence(SequenceSpec("b", [8] * 17)) == admission
    assert mgr.take_plan().ops == calm.take_plan().ops
    assert mgr.cached_blocks() == calm.cached_blocks()
    mgr.check_invariants()
    mgr.remove_sequence("b")
    mgr.remove_sequence("a")
    mgr.check_invariants()


@pytest.mark.parametrize("request_id", [["h"], None, 5, b"h"])
@pytest.mark.parametrize("method", ["hold", "release"])
def test_hold_and_release_refuse_an_id_that_is_no_str(method: str, request_id: object) -> None:
    """hold(['h']) raised set's own TypeError ("unhashable type: 'list'"); hold(None),
    hold(5) and hold(b'h') were silently ignored, the request the caller meant never held.
    Now TypeError names the id, as abort does; the queue is as it was."""
    from kvtier import Request, Scheduler

    sched = Scheduler(KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8)))
    sched.add_request(Request("h", [1, 2, 3], 2))
    sched.hold("h")
    with pytest.raises(TypeError, match=rf"^request_id must be a str, got {request_id!r}$"
                       .replace("[", r"\[").replace("]", r"\]")):
        getattr(sched, method)(request_id)
    step = sched.step()
    assert step.context_chunks == ()  # still held
    sched.update(step, {})
    sched.release("h")
    assert [c.request_id for c in sched.step().context_chunks] == ["h"]


# ---- prompts given to the router and the remote tier as what is no sequence of ids ----------

NOT_A_PROMPT = [
    ({i: 0 for i in range(9)}, "dict"), (set(range(9)), "set"), (iter(range(9)), "range_iterator"),
    (None, "NoneType"), (bytes(range(9)), "bytes"), (bytearray(range(9)), "bytearray"),
    (memoryview(bytes(range(9))), "memoryview"),
]


@pytest.mark.parametrize(("tokens", "kind"), NOT_A_PROMPT)
def test_the_router_refuses_a_prompt_that_is_no_sequence_of_ids(tokens: object,
                                                                 kind: str) -> None:
    """Router.route and block_hashes hashed a dict's keys and a set's members as a prompt,
    and bytes or a bytearray as raw memory (hashes of blocks no instance holds, routed on);
    an iterator or None raised TypeError ("has no len()", "not iterable"). Now the prompt
    is checked as the manager checks it (ValueError naming it), and the router's stats do
    not move."""
    from kvtier.router import InstanceLoad, Router, make_policy

    router = Router(make_policy("cache-aware"), 4)
    with pytest.raises(ValueError, match=rf"^tokens must be a sequence of ints \(a list or "
                                         rf"tuple\), got {kind}$"):
        router.route(tokens, [InstanceLoad("a", 0, 1)])  # type: ignore[arg-type]
    assert router.stats.num_routed == 0 and router.stats.per_instance == {}


@pytest.mark.parametrize(("tokens", "kind"), NOT_A_PROMPT)
@pytest.mark.parametrize("call", ["write", "fetch", "start_fetch"])
def test_the_remote_tier_refuses_a_prompt_that_is_no_sequence_of_ids(
        call: str, tokens: object, kind: str) -> None:
    """RemoteTier.write wrote KV under the hashes of a dict's keys, a set or raw bytes
    (entries no manager could match, in a store the fleet shares); fetch and start_fetch
    raised TypeError from inside for a dict, a set, None or an iterator ("unhashable type:
    'slice'", "has no len()"; bytes they refused already). Now ValueError names the
    prompt, and nothing is written or fetched."""
    from test_red_team_remote import make_tier

    tier = make_tier()
    with pytest.raises(ValueError, match=rf"^tokens must be a sequence of ints \(a list or "
                                         rf"tuple\), got {kind}$"):
        if call == "write":
            tier.write(tokens, [0, 1], wait=True)  # type: ignore[arg-type]
        else:
            getattr(tier, call)(*(["r"] if call == "start_fetch" else []), tokens)
    assert tier.flush(10.0)
    assert (tier.num_written_blocks, tier.num_fetched_blocks, tier.num_waiting) == (0, 0, 0)


@pytest.mark.parametrize("answer", ["zzz", None, 5, ["a"], "A"])
def test_a_routing_policy_choosing_no_instance_offered_is_refused(answer: object) -> None:
    """A caller's RoutingPolicy answering None, 5 or an unknown id had it returned as the
    decision (the request sent nowhere) and counted in the stats as an instance; a list
    raised 'unhashable type'. Now ValueError names the policy's answer and the instances,
    and the stats do not move."""
    from kvtier.router import InstanceLoad, Router

    class Answers:
        def choose(self, *args: object) -> object:
            return answer

        def __repr__(self) -> str:
            return "Answers()"

    router = Router(Answers(), 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"^routing policy Answers\(\) chose "
                                         rf"{re.escape(repr(answer))}, none of the instances "
                                         rf"offered \('a', 'b'\)$"):
        router.route([1] * 8, [InstanceLoad("a", 0, 1), InstanceLoad("b", 0, 1)])
    assert router.stats.num_routed == 0 and router.stats.per_instance == {}


# ---- a scheduler whose running requests the manager dropped behind its back -------------------


def decoding_scheduler(num_speculative_tokens: int) -> tuple[KVCacheManager, Any]:
    """A scheduler with ``a`` (2 output tokens) and ``b`` (5) both decoding."""
    from kvtier import Request, Scheduler, SchedulerConfig

    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16))
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=32,
                                           num_speculative_tokens=num_speculative_tokens))
    sched.add_request(Request("a", [1, 2, 3, 4, 5], 2))
    sched.add_request(Request("b", [1, 2, 3, 5, 9], 5))  # not a's first block: no wait
    sched.update(sched.step(), {"a": 6, "b": 6})
    return mgr, sched


def run_to_the_end(sched: Any) -> None:
    while sched.has_unfinished():
        step = sched.step()
        sched.update(step, {rid: 7 for rid in [*step.decode_request_ids,
                                               *(c.request_id for c in step.context_chunks)]})


@pytest.mark.parametrize("drafts", [0, 2])
def test_update_of_a_step_the_manager_aborted_a_request_of_is_refused_changing_nothing(
        drafts: int) -> None:
    """After compute_failed (or transfer_failed) aborted a request, an update without
    requeue_failed appended every sampled token, then removing the finished request raised
    KeyError ("unknown request_id 'a'") with the step never marked applied: a second update
    appended the tokens twice, and every step() was refused. Now update refuses first,
    naming the requests and requeue_failed, changing nothing; after requeue_failed the run
    finishes with every request's output."""
    mgr, sched = decoding_scheduler(drafts)
    step = sched.step()
    assert mgr.compute_failed(["a"]) == ["a"]
    before = ([(r.request_id, list(r.output), r.num_computed_tokens)
               for r in sched.running.values()], mgr.num_sequences)
    with pytest.raises(RuntimeError, match=re.escape(
            "update(): the manager no longer holds ['a'] (transfer_failed or compute_failed "
            "aborted them): call requeue_failed(step, ['a']) first and update the step it "
            "returns")):
        sched.update(step, {"a": 7, "b": 7})
    assert ([(r.request_id, list(r.output), r.num_computed_tokens)
             for r in sched.running.values()], mgr.num_sequences) == before
    sched.update(sched.requeue_failed(step, ["a"]), {"b": 7})
    assert [r.request_id for r in sched.waiting] == ["a"]
    run_to_the_end(sched)
    mgr.check_invariants()
    assert mgr.num_sequences == 0


@pytest.mark.parametrize("drafts", [0, 2])
@pytest.mark.parametrize("how", ["compute_failed", "remove_sequence"])
def test_a_request_the_manager_dropped_between_steps_recomputes(drafts: int, how: str) -> None:
    """compute_failed called after update (the manager allows it between steps), or a
    direct manager.remove_sequence of a running request: every later step() raised KeyError
    from the manager's decode ("unknown request_id 'a'"; with drafts, after the requests
    before it had appended), and no call could requeue it. Now the next step puts it back
    at the front of the queue to recompute (its output so far kept), and the run ends."""
    mgr, sched = decoding_scheduler(drafts)
    getattr(mgr, how)(["a"] if how == "compute_failed" else "a")
    step = sched.step()
    assert step.decode_request_ids == ("b",)
    # Its prompt and its one output token, past what the cache still holds of them,
    # recomputed: removed, its first block (computed in the last step) stays cached; failed,
    # that step's blocks are garbage and leave, 3 tokens are found in b's first block, and
    # the output token sampled from the failed pass is dropped (red team 30c).
    assert [(c.request_id, c.first_token, c.num_tokens) for c in step.context_chunks] == [
        ("a", 4, 2) if how == "remove_sequence" else ("a", 3, 2)]
    sched.update(step, {"a": 7, "b": [7] if drafts else 7})
    run_to_the_end(sched)
    mgr.check_invariants()
    assert mgr.num_sequences == 0


def test_a_dropped_request_is_found_past_a_partial_requeue_or_an_abort() -> None:
    """The check follows the manager's live count: requeue_failed of only some of the
    requests compute_failed aborted, or an abort of another request, must not make the
    scheduler take the count as its own and miss the rest."""
    from kvtier import Request

    mgr, sched = decoding_scheduler(0)
    sched.add_request(Request("c", [3, 3, 3, 3, 3], 5))
    sched.update(sched.step(), {"a": 6, "b": 6, "c": 6})  # a finishes
    step = sched.step()
    assert mgr.compute_failed(["b", "c"]) == ["b", "c"]
    step = sched.requeue_failed(step, ["b"])
    with pytest.raises(RuntimeError, match=re.escape("the manager no longer holds ['c']")):
        sched.update(step, {})
    sched.update(sched.requeue_failed(step, ["c"]), {})
    step = sched.step()
    assert [c.request_id for c in step.context_chunks] == ["c", "b"]  # each to the front
    sched.update(step, {"b": 7, "c": 7})
    mgr.remove_sequence("b")  # behind the scheduler's back, then an abort of another
    assert sched.abort("c") is not None
    assert [c.request_id for c in sched.step().context_chunks] == ["b"]
