"""Red team 24b: the data tiers without a Redis server: an event stream a subscriber knew
only from a snapshot when its instance restarts (and a reference model of a consumer's
view through drops, unreadable entries, restarts and snapshots), a router's index given an
InstanceLost of no instance id, a remote store client whose write answers no count.

Every refusal here is checked to name the field and value and to change nothing.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping

import pytest

from kvtier.events import BlockRemoved, BlockStored, Event
from kvtier.publisher import EventBatch, InstanceLost, SeqTracker, Snapshot, Update
from kvtier.router import PrefixIndex
from kvtier.tier import Tier

G = Tier.GPU
TPB = 4


def stored(seq: int, h: int) -> BlockStored:
    """A BlockStored event of one 4-token block."""
    return BlockStored(seq, h, None, G, TPB, None, (1, 2, 3, 4), None, None)


def _batch(instance_id: str, events: list[BlockStored]) -> list[Update]:
    return [EventBatch(instance_id, list[Event](events))]


# ---- an event stream known only from a snapshot, whose instance restarts -----------------


def test_a_stream_known_from_a_snapshot_sees_its_instances_restart() -> None:
    """A subscriber that bootstraps from a snapshot (next_seq 5: the events 0..4 applied)
    and then reads the stream: the instance restarts (seq 0 again, an empty cache). The
    snapshot's events were not counted as seen, so seq 0 and 1 were skipped as covered by
    it, and the consumer kept the old incarnation's blocks (routing to blocks that are
    gone) and never learnt the new ones until the new counter passed 5. Now the restart is
    seen: the old blocks are forgotten, the new events applied."""
    tracker = SeqTracker()
    index = PrefixIndex()
    out: list[Update] = []
    assert tracker.offer(Snapshot("a", 5, frozenset((100 + s, G) for s in range(5))), out)
    tracker.receive("a", [stored(0, 1), stored(1, 2)], out)
    assert out[1:] == [InstanceLost("a", 5, 0), *_batch("a", [stored(0, 1), stored(1, 2)])]
    assert tracker.num_restarts == 1 and tracker.num_skipped == 0
    index.apply_updates(out)
    assert index.blocks("a") == {1: G, 2: G}
    out.clear()
    tracker.receive("a", [stored(2, 3)], out)
    assert out == _batch("a", [stored(2, 3)])


def test_an_unreadable_entry_then_a_snapshot_then_a_restart() -> None:
    """The same through ``lose`` (an entry of the instance that could not be read: no seq
    is known): stale, resynced from a snapshot (next_seq 5), then the instance restarts.
    Its seq 0 was skipped as covered by the snapshot."""
    tracker = SeqTracker()
    out: list[Update] = []
    tracker.lose("a", out)
    assert out == [InstanceLost("a", 0, None)] and tracker.stale_instances() == ["a"]
    out.clear()
    assert tracker.offer(Snapshot("a", 5, frozenset({(105, G)})), out)
    out.clear()
    tracker.receive("a", [stored(0, 1)], out)
    assert out == [InstanceLost("a", 5, 0), *_batch("a", [stored(0, 1)])]


def test_a_snapshot_still_skips_what_it_covers_and_takes_what_follows() -> None:
    """Valid streams unchanged: after a snapshot of next_seq 5 a redelivered seq 3 is
    skipped (covered), seq 5 applied, and an older snapshot (next_seq 4) is refused."""
    tracker = SeqTracker()
    out: list[Update] = []
    assert tracker.offer(Snapshot("a", 5, frozenset()), out)
    out.clear()
    tracker.receive("a", [stored(3, 3), stored(4, 4), stored(5, 5)], out)
    assert out == _batch("a", [stored(5, 5)]) and tracker.num_skipped == 2
    assert not tracker.offer(Snapshot("a", 4, frozenset()), out)
    assert tracker.num_restarts == 0


def test_a_consumers_view_is_its_instances_after_drops_losses_restarts_and_snapshots() -> None:
    """A reference model: an instance's blocks (the truth) and the index a subscriber feeds
    from its tracker, through batches delivered, dropped (a trimmed stream) or unreadable
    (``lose``), restarts (seq 0 again, an empty cache), snapshots of the truth offered while
    stale or unasked. Once a last batch is delivered and a stale tracker offered a
    snapshot, the index holds exactly the truth (a restart whose own seq 0 batch was lost
    is left out: documented as unseen until the new counter passes the old). The old rule
    failed here: a restart after a snapshot taken before any event was read."""
    rng = random.Random(24)
    for _ in range(3000):
        tracker, index, truth = SeqTracker(), PrefixIndex(), set[int]()
        seq, next_hash, restarted, restart_unseen = 0, 1000, False, False
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.1:
                truth, seq, restarted = set(), 0, True
            batch: list[Event] = []
            for _ in range(rng.randint(1, 3)):
                if truth and rng.random() < 0.3:
                    h = rng.choice(sorted(truth))
                    truth.discard(h)
                    batch.append(BlockRemoved(seq, h, G))
                else:
                    next_hash += 1
                    truth.add(next_hash)
                    batch.append(stored(seq, next_hash))
                seq += 1
            fate = rng.random()
            out: list[Update] = []
            if fate < 0.25:  # dropped, or read as an unreadable entry
                restart_unseen |= restarted and batch[0].seq == 0
                if fate >= 0.15:
                    tracker.lose("a", out)
            else:
                tracker.receive("a", batch, out)
            if (tracker.stale_instances() and rng.random() < 0.3) or rng.random() < 0.1:
                tracker.offer(Snapshot("a", seq, frozenset((h, G) for h in truth)), out)
            index.apply_updates(out)
        if restart_unseen:
            continue
        out = []
        tracker.receive("a", [stored(seq, next_hash + 1)], out)
        truth.add(next_hash + 1)
        if tracker.stale_instances():
            tracker.offer(Snapshot("a", seq + 1, frozenset((h, G) for h in truth)), out)
        index.apply_updates(out)
        assert tracker.stale_instances() == [] and set(index.blocks("a")) == truth


# ---- a router's index given an InstanceLost of no instance id ------------------------------


def test_an_instance_lost_of_no_str_id_is_refused_changing_nothing() -> None:
    """``apply_updates`` checked every EventBatch before applying any update, but not an
    InstanceLost's id: a list raised TypeError from the dict after the updates before it
    were applied (instance "a" cleared), and an int made an instance no batch could name
    (listed by ``instances()`` for good). Now TypeError naming it, the index unchanged."""
    from kvtier.sequence import short_repr

    index = PrefixIndex()
    index.apply_updates([EventBatch("a", [stored(0, 5)])])
    for bad in (["a"], 7, None):
        with pytest.raises(TypeError, match=r"an InstanceLost's instance_id must be a str, "
                                            rf"got {re.escape(short_repr(bad))}"):
            index.apply_updates([InstanceLost("a", 1, 0), InstanceLost(bad, 0, None)])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"instance_id must be a str"):
            index.clear(bad)  # type: ignore[arg-type]
    assert index.instances() == ["a"] and index.blocks("a") == {5: G}
    index.check_invariants()


# ---- a remote store client whose write answers no count --------------------------------------


@pytest.mark.parametrize("answer", [None, "2", 2.0, -1, 99, True])
def test_a_store_whose_write_answers_no_count_is_a_write_that_failed(answer: object) -> None:
    """A caller's store client (a subclass past the contract) whose ``put_many`` answers
    what is no count of the blocks written: ``RemoteTier.write(wait=True)`` took it as
    written: None or "2" raised TypeError from the tier's count (out of the engine's step),
    2.0 made ``num_written_blocks`` a float, 99 counted 99 blocks for 2, -1 took one off,
    and True passed as 1. Now it is a write that failed: 0 written, nothing remembered as
    held (a later write of the prompt as a reused prefix writes its blocks again)."""
    pytest.importorskip("torch", reason="the remote tier moves real KV")
    from kvtier import CacheConfig, KVCacheManager
    from kvtier.remote import InMemoryRemoteStore, RemoteNamespace
    from kvtier.remote.tier import RemoteTier
    from kvtier.storage import KVLayout, KVStorage

    class OddCount(InMemoryRemoteStore):
        answer: object = None

        def put_many(self, items: Mapping[int, bytes]) -> int:
            super().put_many(items)
            return self.answer  # type: ignore[return-value]

    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=2, tokens_per_block=2)
    store = OddCount(RemoteNamespace("rt24b", layout))
    manager = KVCacheManager(CacheConfig(tokens_per_block=2, num_gpu_blocks=4,
                                         num_host_blocks=4, hash_algo="sha256"))
    tier = RemoteTier(store, manager, KVStorage(layout, 4), KVStorage(layout, 4))
    prompt = [1, 2, 3, 4, 5]  # two full blocks
    store.answer = answer
    assert tier.write(prompt, [0, 1, 2], wait=True) == 0
    assert type(tier.num_written_blocks) is int and tier.num_written_blocks == 0
    store.answer = 2
    assert tier.write(prompt, [0, 1, 2], wait=True, reused_blocks=2) == 2
    assert tier.num_written_blocks == 2
    assert tier.write(prompt, [0, 1, 2], wait=True, reused_blocks=2) == 0  # known now
