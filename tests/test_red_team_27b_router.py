"""Red team 27b: several engines' KV events into one router's prefix index, through a bus
that loses, repeats and reorders them, and engines that restart."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from kvtier.config import CacheConfig
from kvtier.events import BlockRemoved, BlockStored, Event
from kvtier.manager import KVCacheManager
from kvtier.publisher import (
    InMemoryEventBus,
    InMemorySubscriber,
    InstanceLost,
    SeqTracker,
    Snapshot,
    Update,
    manager_snapshot,
)
from kvtier.router import PrefixHit, PrefixIndex
from kvtier.sequence import SequenceSpec
from kvtier.tier import Tier

TPB = 4


def make_manager() -> KVCacheManager:
    return KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=12,
                                      num_host_blocks=6, enable_events=True))


def held(manager: KVCacheManager) -> dict[int, Tier]:
    """What the manager holds now, as the index keeps it: hash -> tier."""
    return dict(manager_snapshot(manager, "x", 0).blocks)


def random_op(rng: random.Random, manager: KVCacheManager, live: list[str], step: int) -> None:
    """One call that stores, moves or drops blocks: admit, finish, drop a tenant, reset."""
    choice = rng.random()
    if choice < 0.5 or not live:
        salt = rng.choice([None, "t1"])
        tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 20))]
        rid = f"r{step}"
        admitted = manager.add_sequence_batch([SequenceSpec(rid, tokens, salt=salt)])
        if admitted and admitted[0].admitted:
            live.append(rid)
    elif choice < 0.85:
        manager.remove_sequence(live.pop(rng.randrange(len(live))))
    elif choice < 0.95:
        manager.drop_salt("t1")
    elif not live:
        manager.reset_cache()
    manager.take_plan()


@pytest.mark.parametrize("seed", range(6))
def test_the_index_holds_what_each_engine_holds_through_gaps_and_restarts(seed: int) -> None:
    """Three engines publish on one bus whose subscriber holds 7 events (it drops the
    oldest: gaps) and one engine restarts now and then (a new manager, seq from 0). After
    every poll the index holds, per engine, exactly what the engine holds, or nothing while
    it waits for a snapshot: never a block beyond what its events allow."""
    rng = random.Random(seed)
    bus = InMemoryEventBus()
    subscriber = bus.subscribe(max_events=7)
    index = PrefixIndex()
    managers = {iid: make_manager() for iid in ("a", "b", "c")}
    live: dict[str, list[str]] = {iid: [] for iid in managers}
    next_seq = dict.fromkeys(managers, 0)
    unseen: set[str] = set()  # restarted, nothing published since: no subscriber can know

    def source(iid: str) -> Callable[[], Snapshot]:
        return lambda: manager_snapshot(managers[iid], iid, next_seq[iid])

    for iid in managers:
        bus.register_snapshot(iid, source(iid))
    for step in range(300):
        iid = rng.choice(list(managers))
        if rng.random() < 0.03:
            managers[iid] = make_manager()  # a restart: an empty cache, seq from 0
            live[iid] = []
            next_seq[iid] = 0
            unseen.add(iid)
        random_op(rng, managers[iid], live[iid], step)
        events = managers[iid].drain_events()
        if events:
            next_seq[iid] = events[-1].seq + 1
            bus.publish(iid, events)
            unseen.discard(iid)
        if rng.random() < 0.4:
            index.apply_updates(subscriber.poll())
            index.check_invariants()
            stale = set(subscriber.tracker.stale_instances())
            for other, manager in managers.items():
                if other in stale:
                    assert index.blocks(other) == {}, (step, other)
                elif other in index.instances() and other not in unseen:
                    assert index.blocks(other) == held(manager), (step, other)
    assert subscriber.num_dropped > 0 and subscriber.tracker.num_gaps > 0


def stored(seq: int, block_hash: int) -> BlockStored:
    return BlockStored(seq, block_hash, None, Tier.GPU, TPB, None, (1,) * TPB, None, None)


def removed(seq: int, block_hash: int) -> BlockRemoved:
    return BlockRemoved(seq, block_hash, Tier.GPU)


def run(tracker: SeqTracker, index: PrefixIndex, batches: list[list[Event]]) -> list[Update]:
    """``batches`` of engine "e" through ``tracker`` into ``index``; the updates made."""
    out: list[Update] = []
    for events in batches:
        tracker.receive("e", events, out)
    index.apply_updates(out)
    return out


def test_a_repeated_batch_changes_nothing() -> None:
    """Batches of one engine redelivered (a consumer that read again from an older id):
    the events already applied are skipped, and a block removed stays removed. (A
    redelivered seq 0 reads as a restart: a resync, nothing wrong kept.)"""
    tracker, index = SeqTracker(), PrefixIndex()
    first: list[Event] = [stored(0, 10), stored(1, 11)]
    second: list[Event] = [removed(2, 11), stored(3, 12)]
    third: list[Event] = [removed(4, 10)]
    run(tracker, index, [first, second, third, second, third])
    assert index.blocks("e") == {12: Tier.GPU}
    assert (tracker.num_skipped, tracker.num_gaps, tracker.num_restarts) == (3, 0, 0)


def test_a_later_batch_first_makes_the_engine_stale_and_forgotten() -> None:
    """A batch that comes before the one ahead of it (a hole, to the subscriber): the
    engine's blocks are forgotten until a snapshot, and the late batch, then read, adds
    nothing (its removal can no longer be ordered against the later store)."""
    tracker, index = SeqTracker(), PrefixIndex()
    out = run(tracker, index, [[stored(0, 10)], [stored(2, 12)], [stored(1, 11)]])
    assert InstanceLost("e", 1, 2) in out
    assert index.blocks("e") == {} and tracker.stale_instances() == ["e"]


def test_a_removal_of_a_block_never_stored_is_counted_and_adds_nothing() -> None:
    """A BlockRemoved of a hash the index never had (its store lost before the subscriber
    joined, read from seq 0 on): counted as inconsistent, and nothing is routed to."""
    index = PrefixIndex()
    index.apply("e", [stored(0, 10), removed(1, 99)])
    assert index.blocks("e") == {10: Tier.GPU} and index.num_inconsistent == 1
    assert index.match([99]) == {}


def bus_of(snapshots: dict[str, Snapshot], max_events: int) -> tuple[InMemoryEventBus,
                                                                      InMemorySubscriber]:
    """A bus whose engines' snapshot sources answer ``snapshots[iid]`` (set by the test)."""
    bus = InMemoryEventBus()
    for iid in ("a", "b"):
        bus.register_snapshot(iid, lambda iid=iid: snapshots[iid])  # type: ignore[misc]
    return bus, bus.subscribe(max_events)


def test_a_quiet_engines_dropped_removal_is_never_routed_to() -> None:
    """Engine a removes block 10 and goes quiet; engine b's events push that removal out
    of the subscriber's buffer (2 events). The subscriber knows it dropped an event of a:
    a is stale at once and resynced (it holds nothing). Before, a's hole showed only at its
    next event: block 10 stayed in the index and was routed to for as long as a was quiet.

    ::

        bus      a:0 stored 10 | poll | a:1 removed 10, b:0 stored 20, b:1 stored 21 | poll
        buffer                         [dropped]       [kept ......................]
    """
    snapshots: dict[str, Snapshot] = {}
    bus, subscriber = bus_of(snapshots, 2)
    index = PrefixIndex()
    bus.publish("a", [stored(0, 10)])
    index.apply_updates(subscriber.poll())
    assert index.match([10]) == {"a": PrefixHit(1, 0)}
    bus.publish("a", [removed(1, 10)])
    bus.publish("b", [stored(0, 20), stored(1, 21)])
    snapshots["a"] = Snapshot("a", 2, frozenset())
    index.apply_updates(subscriber.poll())
    assert index.match([10]) == {}
    assert index.blocks("b") == {20: Tier.GPU, 21: Tier.GPU}
    assert subscriber.tracker.stale_instances() == []


def test_a_restart_whose_seq_0_was_dropped_is_seen() -> None:
    """Engine a restarts (its seq counts from 0 again, its cache empty) and its new seq 0
    is pushed out of the buffer by b's events. The dropped seq 0 is its restart: its old
    blocks are forgotten and the new incarnation's snapshot applied. Before, its seq 1 read
    as an event already applied (skipped), the old blocks 10..12 were kept and routed to,
    and every snapshot of the new incarnation was refused as older than the events read."""
    snapshots: dict[str, Snapshot] = {}
    bus, subscriber = bus_of(snapshots, 3)
    index = PrefixIndex()
    bus.publish("a", [stored(0, 10), stored(1, 11), stored(2, 12)])
    index.apply_updates(subscriber.poll())
    bus.publish("a", [stored(0, 90)])  # the new incarnation
    bus.publish("b", [stored(0, 20), stored(1, 21)])
    bus.publish("a", [stored(1, 91)])
    snapshots["a"] = Snapshot("a", 2, frozenset({(90, Tier.GPU), (91, Tier.GPU)}))
    out = subscriber.poll()
    index.apply_updates(out)
    assert InstanceLost("a", 3, 0) in out
    assert index.blocks("a") == {90: Tier.GPU, 91: Tier.GPU}
    assert subscriber.tracker.num_restarts == 1
