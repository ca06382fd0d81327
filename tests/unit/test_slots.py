"""Unit tests of ``kvtier.slots``: slot lists as ``array('q')``, and the pool's free list
held as one (its order against a list model)."""

from __future__ import annotations

import pickle
import random
from array import array

import pytest

from kvtier import CacheConfig, KVCacheManager, SequenceSpec
from kvtier.pool import TierPool
from kvtier.slots import BlockIds, packed_slots, slot_array, slot_range
from kvtier.tier import Tier
from kvtier.transfer.plan import PlanRecorder


@pytest.mark.parametrize("slots", [[], [7], list(range(5, 16)), list(range(100, 140)),
                                   (3, 1, 2), range(2, 40), array("Q", [9, 8])])
def test_slot_array_holds_the_slots_in_order(slots: list[int]) -> None:
    """Lists short and long (packed), tuples, ranges and other arrays give the same
    ``array('q')``; an ``array('q')`` is taken as it is (no copy)."""
    got = slot_array(slots)
    assert type(got) is array and got.typecode == "q" and got.tolist() == list(slots)
    assert slot_array(got) is got


@pytest.mark.parametrize("bad, error", [("x", TypeError), (1.5, TypeError),
                                        (None, TypeError), (2**63, OverflowError)])
@pytest.mark.parametrize("n", [2, 40])
def test_a_bad_slot_raises_as_array_raises_it(bad: object, error: type, n: int) -> None:
    """A value that is no int64 raises ``array('q')``'s error, packed (40 slots) or not."""
    slots = [*range(n - 1), bad]
    with pytest.raises(error):
        array("q", slots)
    with pytest.raises(error):
        slot_array(slots)
    if n > 16:
        with pytest.raises(error):
            packed_slots(slots)


def test_slot_range_is_range_across_growth() -> None:
    """``slot_range(a, b)`` equals ``range(a, b)`` for ranges past the shared copy's end
    (it grows) and inside it, and is a copy: changing it changes no later range."""
    rng = random.Random(5)
    for _ in range(200):
        a = rng.randrange(0, 6000)
        b = a + rng.randrange(0, 3000)
        got = slot_range(a, b)
        assert got.typecode == "q" and got.tolist() == list(range(a, b)), (a, b)
        if got:
            got[0] = -1
    assert slot_range(0, 3).tolist() == [0, 1, 2]


@pytest.mark.parametrize("seed", range(6))
def test_the_free_list_hands_slots_out_as_a_list_stack_does(seed: int) -> None:
    """Random takes and give-backs (arrays and lists, any length) hand out exactly the
    slots, in exactly the order, of the free list written as a Python list: given back
    last, first; the first of a give-back first; then never-used slots lowest first."""
    rng = random.Random(seed)
    capacity = 300
    pool = TierPool(Tier.GPU, capacity)
    model_back: list[int] = []
    model_fresh = 0
    held: list[int] = []
    for _ in range(400):
        if held and rng.random() < 0.5:
            k = rng.randrange(1, len(held) + 1)
            rng.shuffle(held)
            out, held = held[:k], held[k:]
            pool.give_back(out if rng.random() < 0.5 else array("q", out))
            model_back.extend(reversed(out))
        else:
            n = rng.randrange(0, pool.num_free + 1)
            got = pool.take(n)
            k = min(n, len(model_back))
            want = model_back[len(model_back) - k:][::-1]
            del model_back[len(model_back) - k:]
            want += range(model_fresh, model_fresh + n - k)
            model_fresh += n - k
            assert type(got) is array and got.tolist() == want
            held += want
        assert pool.num_free == capacity - len(held)
        assert sorted(pool.free_slots()) == sorted(set(range(capacity)) - set(held))


def test_a_swap_of_arrays_records_what_a_swap_of_lists_records() -> None:
    """``record_swap`` given the cache's arrays records the columns it records for the
    same slots as lists (pieces of one size, and uneven ones)."""
    rng = random.Random(3)
    for _ in range(50):
        n = rng.randrange(1, 120)
        num_swap = rng.randrange(1, n + 1)
        gpu = rng.sample(range(1000), n)
        host = rng.sample(range(1000, 2000), n)
        path = rng.sample(range(2000, 3000), num_swap)
        size = rng.randrange(1, num_swap + 1)
        ends = [*range(size, num_swap, size), num_swap]
        if rng.random() < 0.3:
            ends = sorted({*rng.sample(range(1, num_swap + 1), min(3, num_swap)), num_swap})
        plans = []
        for convert in (list, lambda s: array("q", s)):
            rec = PlanRecorder()
            rec.record_swap(convert(gpu), convert(host), convert(path), ends, 16)
            plans.append((rec.kinds.tolist(), [c.tolist() for c in rec.columns]))
        assert plans[0] == plans[1]


@pytest.mark.parametrize("slots", [(), (7,), (3, 1, 2, 1), tuple(range(100, 140))])
def test_block_ids_read_as_the_tuple_of_their_slots(slots: tuple[int, ...]) -> None:
    """``BlockIds`` answers every read a tuple answers, with the tuple's values: length,
    truth, indexes (negative too), slices (tuples), iteration, ``in``, ``count``,
    ``index``, ``+`` on either side, equality (a tuple, not a list), hash, repr, pickle."""
    ids = BlockIds(list(slots))
    packed = BlockIds.of_array(array("q", slots))
    for got in (ids, packed):
        assert len(got) == len(slots) and bool(got) == bool(slots)
        assert [got[i] for i in range(-len(slots), len(slots))] == [
            slots[i] for i in range(-len(slots), len(slots))]
        for cut in (slice(None), slice(1, None), slice(None, -1), slice(None, None, -2)):
            assert got[cut] == slots[cut] and type(got[cut]) is tuple
        assert list(got) == list(slots) and tuple(reversed(got)) == slots[::-1]
        for value in (1, 7, 120, 999):
            assert (value in got) == (value in slots)
            assert got.count(value) == slots.count(value)
        if slots:
            assert got.index(slots[-1]) == slots.index(slots[-1])
        with pytest.raises(ValueError):
            got.index(-5)
        assert got == slots and slots == got and got != list(slots) and got != (*slots, 0)
        assert got == ids and hash(got) == hash(slots) and repr(got) == repr(slots)
        assert got + (5,) == (*slots, 5) and (5,) + got == (5, *slots)
        assert got + got == slots + slots
        assert pickle.loads(pickle.dumps(got)) == slots


def test_an_admissions_block_ids_stay_what_they_were() -> None:
    """``Admission.block_ids`` is a snapshot: the request's table growing in place (a later
    prefill chunk) leaves the ids the admission gave unchanged."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16))
    a = mgr.add_sequence(SequenceSpec("a", list(range(20)), num_new_tokens=8))
    assert a.block_ids == (0, 1) and mgr.block_table("a") == [0, 1]
    mgr.schedule_prefill("a", 12)
    assert mgr.block_table("a") == [0, 1, 2, 3, 4]
    assert a.block_ids == (0, 1) and len(a.block_ids) == 2
