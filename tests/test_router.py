"""The prefix index, event bus gap handling, routing policies, salt isolation and the
Redis stream transport (when KVTIER_REDIS_URL is set)."""

from __future__ import annotations

from typing import Any

import pytest

from kvtier import CacheConfig, KVCacheManager, SequenceSpec
from kvtier.events import AllBlocksCleared, BlockRemoved, BlockStored, BlockTierChanged, Event
from kvtier.publisher import (
    EventBatch,
    InMemoryEventBus,
    InstanceLost,
    SeqTracker,
    Snapshot,
    Update,
    decode_events,
    decode_snapshot,
    encode_events,
    encode_snapshot,
    manager_snapshot,
)
from kvtier.router import (
    CacheAware,
    InstanceLoad,
    LeastLoaded,
    PrefixHit,
    PrefixIndex,
    RoundRobin,
    Router,
    make_policy,
)
from kvtier.tier import Tier

G, H = Tier.GPU, Tier.HOST


def stored(seq: int, h: int, tier: Tier = G, parent: int | None = None) -> BlockStored:
    return BlockStored(seq, h, parent, tier, 4, None, (1, 2, 3, 4), None, None)


def make_manager(**kw: Any) -> KVCacheManager:
    """A manager with 4-token blocks, 8 GPU blocks and events on unless told otherwise."""
    # Any: the options are CacheConfig's own fields, which it checks itself.
    cfg: dict[str, Any] = {"tokens_per_block": 4, "num_gpu_blocks": 8, "enable_events": True,
                           **kw}
    return KVCacheManager(CacheConfig(**cfg))


def loads(*depths: int, capacity: int = 10) -> list[InstanceLoad]:
    return [InstanceLoad(f"i{k}", d, capacity) for k, d in enumerate(depths)]


# ---- the index ----------------------------------------------------------------------------------


def test_index_applies_store_move_remove_clear_exactly() -> None:
    """Stored adds, tier change moves, removed drops, cleared forgets one instance only."""
    index = PrefixIndex()
    index.apply("a", [stored(0, 10), stored(1, 11, parent=10), stored(2, 12, parent=11)])
    index.apply("b", [stored(0, 10)])
    index.apply("a", [BlockTierChanged(3, 12, G, H), BlockRemoved(4, 11, G)])
    index.check_invariants()
    # a: 10 G, 12 H (11 removed)    b: 10 G
    assert index.blocks("a") == {10: G, 12: H}
    assert index.blocks("b") == {10: G}
    index.apply("a", [AllBlocksCleared(5)])
    index.check_invariants()
    assert index.blocks("a") == {} and index.blocks("b") == {10: G}
    # a cleared instance is forgotten entirely: no entry left (red team 29a)
    assert index.instances() == ["b"] and index.num_inconsistent == 0
    index.apply("b", [BlockRemoved(1, 99, G)])
    assert index.num_inconsistent == 1


def test_match_counts_longest_chained_prefix_per_instance() -> None:
    """Each instance's match stops at its first missing hash; tiers are counted apart."""
    index = PrefixIndex()
    # request:  1  2  3  4  5
    # a:        G  G  H  -  G   → (2, 1)
    # b:        -  G  G  G  G   → absent (first block missing)
    # c:        H               → (0, 1)
    index.apply("a", [stored(0, 1), stored(1, 2), stored(2, 3, H), stored(3, 5)])
    index.apply("b", [stored(0, 2), stored(1, 3), stored(2, 4), stored(3, 5)])
    index.apply("c", [stored(0, 1, H)])
    assert index.match([1, 2, 3, 4, 5]) == {"a": PrefixHit(2, 1), "c": PrefixHit(0, 1)}
    assert index.match([2, 3, 4]) == {"a": PrefixHit(1, 1), "b": PrefixHit(3, 0)}
    assert index.match([7]) == {} and index.match([]) == {}


@pytest.mark.parametrize("bad", ["abc", b"ab", None, 5, {1, 2}])
def test_match_refuses_what_is_no_sequence_of_hashes(bad: object) -> None:
    """A str, bytes, None or a set matched nothing before, as an uncached prompt does (a
    caller's bug read as a cold cache); now TypeError naming the type."""
    index = PrefixIndex()
    index.apply("a", [stored(0, 1)])
    with pytest.raises(TypeError, match=r"^block_hashes must be a sequence of block hashes, "
                                        rf"got {type(bad).__name__}$"):
        index.match(bad)  # type: ignore[arg-type]
    assert index.match((1,)) == {"a": PrefixHit(1, 0)}


def test_router_hashes_equal_manager_event_hashes() -> None:
    """The router's block hashes of a prompt are the hashes the manager's events carry."""
    mgr = make_manager()
    mgr.add_sequence(SequenceSpec("a", list(range(10))))
    mgr.remove_sequence("a")
    index = PrefixIndex()
    index.apply("i0", mgr.drain_events())
    router = Router(RoundRobin(), tokens_per_block=4, index=index)
    hashes = router.block_hashes(list(range(10)))
    assert len(hashes) == 2 and set(index.blocks("i0")) == set(hashes)
    assert index.match(router.block_hashes(list(range(8)) + [99] * 4)) == {"i0": PrefixHit(2, 0)}


def test_salts_never_match_each_other() -> None:
    """Blocks stored under one salt match that salt only, never another salt or none."""
    mgr = make_manager()
    prompt = list(range(16))
    mgr.add_sequence(SequenceSpec("a", prompt, salt="tenant-a"))
    mgr.remove_sequence("a")
    router = Router(LeastLoaded(), tokens_per_block=4)
    router.index.apply("i0", mgr.drain_events())
    assert router.index.match(router.block_hashes(prompt, salt="tenant-a")) == {
        "i0": PrefixHit(4, 0)}
    assert router.index.match(router.block_hashes(prompt, salt="tenant-b")) == {}
    assert router.index.match(router.block_hashes(prompt)) == {}
    assert router.index.match(router.block_hashes(prompt, salt="tenant-a", lora_id=3)) == {}


def test_hash_algo_must_match_the_managers() -> None:
    """A router with another hash algorithm finds nothing: hash_algo must match."""
    mgr = make_manager(hash_algo="sha256")
    mgr.add_sequence(SequenceSpec("a", list(range(8))))
    mgr.remove_sequence("a")
    events = mgr.drain_events()
    for algo, expected in (("sha256", {"i0": PrefixHit(2, 0)}), ("xxh3_128", {})):
        router = Router(RoundRobin(), 4, hash_algo=algo)
        router.index.apply("i0", events)
        assert router.index.match(router.block_hashes(list(range(8)))) == expected


# ---- gaps and resync ----------------------------------------------------------------------------


def test_subscriber_passes_contiguous_events_through() -> None:
    """Without loss, a poll yields one batch per instance run and no resync."""
    bus = InMemoryEventBus()
    sub = bus.subscribe()
    bus.publish("a", [stored(0, 1), stored(1, 2)])
    bus.publish("b", [stored(0, 7)])
    bus.publish("a", [BlockRemoved(2, 1, G)])
    assert sub.poll() == [EventBatch("a", [stored(0, 1), stored(1, 2)]),
                          EventBatch("b", [stored(0, 7)]),
                          EventBatch("a", [BlockRemoved(2, 1, G)])]
    assert sub.tracker.num_gaps == 0 and sub.poll() == []


def test_gap_from_full_buffer_resyncs_from_snapshot() -> None:
    """Events dropped by a full buffer show as a gap; the index is rebuilt from a snapshot."""
    bus = InMemoryEventBus()
    sub = bus.subscribe(max_events=2)
    truth = PrefixIndex()
    batch: list[Event] = [stored(0, 1), stored(1, 2), stored(2, 3), BlockRemoved(3, 1, G)]
    truth.apply("a", batch)
    bus.register_snapshot("a", lambda: Snapshot("a", 4, frozenset(truth.blocks("a").items())))
    bus.publish("a", batch)  # buffer keeps seq 2, 3 only
    updates = sub.poll()
    assert sub.num_dropped == 2
    assert updates == [InstanceLost("a", 0, 2), Snapshot("a", 4, frozenset({(2, G), (3, G)}))]
    index = PrefixIndex()
    index.apply_updates(updates)
    assert index.blocks("a") == {2: G, 3: G}
    bus.publish("a", [stored(4, 9)])  # continues after the snapshot
    index.apply_updates(sub.poll())
    assert index.blocks("a") == {2: G, 3: G, 9: G}
    assert (sub.tracker.num_gaps, sub.tracker.num_resyncs) == (1, 1)
    index.check_invariants()


def test_stale_instance_waits_for_a_snapshot_covering_what_was_read() -> None:
    """A snapshot older than the events already read is refused; events while stale are
    skipped; a newer snapshot resyncs and later events apply."""
    tracker = SeqTracker()
    out: list[Update] = []
    tracker.receive("a", [stored(0, 1), stored(2, 3), stored(3, 4)], out)  # seq 1 lost
    assert out == [EventBatch("a", [stored(0, 1)]), InstanceLost("a", 1, 2)]
    assert tracker.stale_instances() == ["a"]
    assert not tracker.offer(Snapshot("a", 3, frozenset()), [])  # seq 3 already read
    assert tracker.offer(Snapshot("a", 4, frozenset({(1, G)})), [])
    after: list[Update] = []
    tracker.receive("a", [stored(3, 4), stored(4, 5)], after)  # 3 is covered: skipped
    assert after == [EventBatch("a", [stored(4, 5)])]
    assert tracker.num_skipped == 3 and tracker.stale_instances() == []


def test_late_subscriber_resyncs_from_a_manager_snapshot() -> None:
    """A subscriber that missed an instance's first events rebuilds it from the manager."""
    mgr = make_manager(num_host_blocks=4)
    bus = InMemoryEventBus()
    mgr.add_sequence(SequenceSpec("a", list(range(12))))
    mgr.remove_sequence("a")
    bus.publish("i0", mgr.drain_events())  # nobody listens yet
    sub = bus.subscribe()
    next_seq = {"i0": 3}
    bus.register_snapshot("i0", lambda: manager_snapshot(mgr, "i0", next_seq["i0"]))
    mgr.add_sequence(SequenceSpec("b", [50] * 28))  # offloads some of a's blocks
    mgr.remove_sequence("b")
    events = mgr.drain_events()
    next_seq["i0"] = events[-1].seq + 1
    bus.publish("i0", events)
    index = PrefixIndex()
    index.apply_updates(sub.poll())
    assert sub.tracker.num_resyncs == 1
    reference = PrefixIndex()
    reference.resync(manager_snapshot(mgr, "i0", 0))
    assert index.blocks("i0") == reference.blocks("i0")
    assert H in set(index.blocks("i0").values())


def test_wire_format_round_trips() -> None:
    """Events and snapshots survive encode/decode; malformed text raises ValueError."""
    big = (1 << 128) - 1
    events: list[Event] = [BlockStored(0, big, None, G, 2, None, (0, (1 << 63) - 1), None,
                                       b"s\x01"),
                           BlockStored(1, 5, big, H, 2, 7, (3, 4), b"t\x00\xff", None),
                           BlockStored(2, 6, 5, H, 2, None, None, None, None),
                           BlockTierChanged(3, 5, H, G), BlockRemoved(4, 5, G),
                           AllBlocksCleared(5)]
    assert decode_events(encode_events(events)) == events
    # A publisher older than the tokens and extra keys sent 7 values: still read.
    legacy = f'[["S",0,"{big:032x}",null,0,2,null]]'
    assert decode_events(legacy) == [BlockStored(0, big, None, G, 2, None, None, None, None)]
    for tokens, extra, what in [("[1]", "null", "token ids"), ("[1,-1]", "null", "token id"),
                                ("[1,true]", "null", "token id"), ('"ab"', "null", "token ids"),
                                ("[1,2]", '"abc"', "extra key"), ("[1,2]", '""', "extra key"),
                                ("[1,2]", "7", "extra key")]:
        row = f'[["S",0,"{big:032x}",null,0,2,null,{tokens},{extra},null]]'
        with pytest.raises(ValueError, match=f"malformed event batch: {what}"):
            decode_events(row)
    with pytest.raises(ValueError, match="malformed event batch: salt key"):
        decode_events(f'[["S",0,"{big:032x}",null,0,2,null,[1,2],null,"x"]]')
    with pytest.raises(ValueError, match="array of 10 values"):
        decode_events(f'[["S",0,"{big:032x}",null,0,2,null,[1,2],null]]')
    snap = Snapshot("i3", 9, frozenset({(big, G), (1, H)}))
    assert decode_snapshot(encode_snapshot(snap)) == snap
    with pytest.raises(ValueError, match="malformed"):
        decode_events('[["X", 1]]')
    with pytest.raises(ValueError, match="malformed"):
        decode_snapshot("{}")


# ---- policies -----------------------------------------------------------------------------------


def test_round_robin_cycles_in_order() -> None:
    """Round-robin takes each instance in turn whatever the load and cache."""
    policy = RoundRobin()
    hits = {"i2": PrefixHit(9, 0)}
    assert [policy.choose(loads(0, 5, 0), hits, 9) for _ in range(4)] == ["i0", "i1", "i2", "i0"]


def test_least_loaded_picks_lowest_load_first_on_ties() -> None:
    """Least-loaded takes the lowest queue depth / capacity; the first wins a tie."""
    policy = LeastLoaded()
    assert policy.choose(loads(3, 1, 2), {"i0": PrefixHit(9, 0)}, 9) == "i1"
    assert policy.choose(loads(2, 1, 1), {}, 9) == "i1"
    mixed = [InstanceLoad("i0", 4, 8), InstanceLoad("i1", 3, 4)]  # 0.5 vs 0.75
    assert policy.choose(mixed, {}, 1) == "i0"


def test_cache_aware_prefers_longest_gpu_prefix() -> None:
    """With equal loads the longest prefix wins, and a GPU block outweighs a host block."""
    policy = CacheAware(alpha=1.0, host_weight=0.5)
    hits = {"i0": PrefixHit(2, 0), "i1": PrefixHit(6, 0), "i2": PrefixHit(1, 4)}
    assert policy.choose(loads(2, 2, 2), hits, 10) == "i1"
    # i2: 0 GPU + 4 host (score 0.2) vs i0: 3 GPU (0.3)
    assert policy.choose(loads(2, 2, 2), {"i0": PrefixHit(3, 0), "i2": PrefixHit(0, 4)}, 10) == "i0"


def test_cache_aware_trades_prefix_against_load() -> None:
    """alpha decides whether a longer prefix is worth a longer queue."""
    hits = {"i0": PrefixHit(5, 0)}  # half the prompt cached on i0
    # i0 load 0.4, i1 load 0.0: score 0.5 - alpha x 0.4 against 0
    assert CacheAware(alpha=1.0, load_slack=10).choose(loads(4, 0), hits, 10) == "i0"
    assert CacheAware(alpha=2.0, load_slack=10).choose(loads(4, 0), hits, 10) == "i1"


def test_cache_aware_never_exceeds_the_load_bound() -> None:
    """An instance deeper than load_factor x least depth + load_slack is never chosen."""
    policy = CacheAware(alpha=0.0, load_factor=1.5, load_slack=2)
    hits = {"i0": PrefixHit(10, 0)}
    # bound = 1.5 x 4 + 2 = 8
    assert policy.bound(loads(9, 4, 5)) == 8.0
    assert policy.choose(loads(9, 4, 5), hits, 10) != "i0"
    assert policy.choose(loads(8, 4, 5), hits, 10) == "i0"


def test_cache_aware_rotates_cold_requests_over_equal_instances() -> None:
    """Requests with no cached prefix spread over equally loaded instances."""
    policy = CacheAware()
    assert [policy.choose(loads(1, 1, 1), {}, 4) for _ in range(3)] == ["i0", "i1", "i2"]


def test_router_records_decisions() -> None:
    """route() hashes, matches and counts best-prefix decisions; bad names are refused."""
    router = Router(make_policy("cache-aware"), tokens_per_block=4)
    hashes = router.block_hashes(list(range(8)))
    router.index.apply("i1", [stored(0, hashes[0]), stored(1, hashes[1])])
    decision = router.route(list(range(9)), loads(0, 0))
    assert decision.instance_id == "i1" and decision.hit == PrefixHit(2, 0)
    assert router.stats.num_best_prefix == 1 and router.stats.per_instance == {"i1": 1}
    with pytest.raises(ValueError, match="router must be one of"):
        make_policy("random")
    with pytest.raises(ValueError, match="load_factor must be"):
        CacheAware(load_factor=0.5)


@pytest.mark.parametrize(("field", "value"), [
    ("alpha", True), ("alpha", float("nan")), ("alpha", float("inf")), ("alpha", -1),
    ("host_weight", True), ("host_weight", 1.5), ("host_weight", float("nan")),
    ("load_factor", False), ("load_factor", 0.5), ("load_factor", 10**400),
    ("load_slack", True), ("load_slack", -1), ("load_slack", 1.0),
])
def test_cache_aware_options_are_checked(field: str, value: object) -> None:
    """Every option is a finite number in range, never a bool: ValueError naming it."""
    with pytest.raises(ValueError, match=f"^{field} must be"):
        CacheAware(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, True, 4.0, "4", 3, 2**17], ids=repr)
def test_router_tokens_per_block_is_checked(value: object) -> None:
    """tokens_per_block is a block size a cache takes (``CacheConfig``'s rule: a power of
    two in 1..65536, never a bool): 3 made a router whose hashes matched no instance's."""
    with pytest.raises(ValueError, match=r"^tokens_per_block must be a power of two"):
        Router(RoundRobin(), value)  # type: ignore[arg-type]


def test_router_hashes_like_the_manager_with_one_helper() -> None:
    """Router.block_hashes is prompt_block_hashes: the manager's events name the same blocks."""
    from kvtier.hashing import get_hash_fn, prompt_block_hashes

    router = Router(RoundRobin(), 4)
    prompt = list(range(13))
    assert router.block_hashes(prompt, salt="s", lora_id=2) == prompt_block_hashes(
        get_hash_fn("xxh3_128"), prompt, 4, 2, "s")
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8, enable_events=True))
    mgr.add_sequence(SequenceSpec("r", prompt, salt="s", lora_id=2))
    stored = [e.block_hash for e in mgr.drain_events() if isinstance(e, BlockStored)]
    assert stored == router.block_hashes(prompt, salt="s", lora_id=2)


def test_a_restarted_instance_is_forgotten_and_read_again_from_seq_0() -> None:
    """An instance whose manager restarts counts from seq 0 again: its old blocks are
    lost (InstanceLost with got_seq 0) and the new stream applies from 0, events and
    snapshot alike. Before, seq 0..4 were skipped as already read (the router kept the
    old incarnation's blocks and never learnt the new ones), and the new incarnation's
    snapshot was refused as older than the events read."""
    tracker = SeqTracker()
    out: list[Update] = []
    tracker.receive("a", [stored(0, 1), stored(1, 2), stored(2, 3), stored(3, 4),
                          stored(4, 5), stored(5, 6)], out)
    tracker.receive("a", [stored(0, 7), stored(1, 8)], out)  # the restart
    assert out[1:] == [InstanceLost("a", 6, 0), EventBatch("a", [stored(0, 7), stored(1, 8)])]
    assert (tracker.num_restarts, tracker.num_gaps, tracker.num_skipped) == (1, 0, 0)
    index = PrefixIndex()
    index.apply_updates(out)
    assert index.blocks("a") == {7: G, 8: G}
    # a gap in the new stream is repaired by the new incarnation's snapshot
    late: list[Update] = []
    tracker.receive("a", [stored(3, 9)], late)
    assert late == [InstanceLost("a", 2, 3)]
    assert tracker.offer(Snapshot("a", 4, frozenset({(7, G), (8, G), (9, G)})), late)
    index.apply_updates(late)
    assert index.blocks("a") == {7: G, 8: G, 9: G}
    index.check_invariants()


def test_a_restart_in_the_middle_of_a_batch_applies_both_halves() -> None:
    """seq 0 after seq 3 in one batch: the old incarnation's events apply, then it is
    lost, then the new one's apply; a stale instance restarting is no longer stale."""
    tracker = SeqTracker()
    out: list[Update] = []
    tracker.receive("a", [stored(0, 1), stored(2, 2)], out)  # a gap: stale
    assert tracker.stale_instances() == ["a"]
    out.clear()
    tracker.receive("a", [stored(3, 3), stored(0, 4), stored(1, 5)], out)
    assert out == [InstanceLost("a", 1, 0), EventBatch("a", [stored(0, 4), stored(1, 5)])]
    assert tracker.stale_instances() == [] and tracker.num_skipped == 2
    fresh = SeqTracker()
    both: list[Update] = []
    fresh.receive("b", [stored(0, 1), stored(1, 2), stored(0, 3)], both)
    assert both == [EventBatch("b", [stored(0, 1), stored(1, 2)]), InstanceLost("b", 2, 0),
                    EventBatch("b", [stored(0, 3)])]


def test_seq_0_after_a_snapshot_at_0_is_the_first_event_not_a_restart() -> None:
    tracker = SeqTracker()
    out: list[Update] = []
    assert tracker.offer(Snapshot("a", 0, frozenset()), out)
    tracker.receive("a", [stored(0, 1)], out)
    assert out[1:] == [EventBatch("a", [stored(0, 1)])] and tracker.num_restarts == 0
