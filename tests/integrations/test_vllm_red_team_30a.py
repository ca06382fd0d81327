"""Red team 30a: the vLLM store tier (``StoreTier``) across a store outage. A MISS that an
outage caused says nothing of the key: it is the asking request's (it computes), never a
verdict shared with later requests nor a mark that the key is bad::

    store:       up ────────── down ─────────────── up again
    request A:   HIT   load fails (outage)
    request B:                 RETRY, MISS (its probe failed: B computes)
    request C:                                     RETRY, HIT, load succeeds

Before, A's failed load marked the key bad (every later lookup a MISS until this engine
stored the key again), and B's outage MISS was every live request's answer.
"""

from __future__ import annotations

from integrations.test_vllm_store_tier import (
    fill,
    make_key,
    make_layout,
    make_tier,
    make_view,
    page_of,
    settle,
)
from kvtier.integrations.vllm.keys import fold_key
from kvtier.integrations.vllm.store_tier import StoreTier
from kvtier.remote import FaultyRemoteStore, InMemoryRemoteStore, RemoteNamespace
from kvtier.remote.store import RemoteStoreBase

PAGE = 64


def look(tier: StoreTier, i: int, request_id: str) -> str:
    """``tier``'s verdict on key ``i`` for ``request_id``, its books checked after."""
    verdict = tier.lookup(make_key(i), request_id)
    tier.check_invariants()
    return verdict


def probe(tier: StoreTier) -> None:
    """The end of a step: the probe sent and its answer in."""
    tier.flush()
    settle(tier)


def stored_store() -> tuple[InMemoryRemoteStore, FaultyRemoteStore]:
    """A store holding keys 1 and 2 (pages of 1s and 2s), and a faulty face of it."""
    inner = InMemoryRemoteStore(make_layout().namespace())
    inner.put_many({fold_key(make_key(i)): bytes([i]) * PAGE for i in (1, 2)})
    return inner, FaultyRemoteStore(inner)


def test_a_load_failed_by_an_outage_does_not_poison_its_keys() -> None:
    """Keys 1 and 2 HIT for A; the store goes down and A's loads of them fail: not a
    mark of bad keys. B, asking during the outage, probes again (RETRY) and MISSes (its
    probe failed too) and computes; once the store is back C's lookups HIT and its load
    brings the pages. Before, keys 1 and 2 were MISSes from the failed loads on, for
    every request, the store up or not."""
    inner, faulty = stored_store()
    view = make_view()
    tier = make_tier(faulty, view)
    assert [look(tier, i, "A") for i in (1, 2)] == ["retry", "retry"]
    probe(tier)
    assert [look(tier, i, "A") for i in (1, 2)] == ["hit", "hit"]
    faulty.down = True
    tier.submit_load(1, [make_key(1)], [0])
    tier.submit_load(2, [make_key(2)], [1])
    assert [o.success for o in settle(tier)] == [False, False]
    assert [look(tier, i, "A") for i in (1, 2)] == ["miss", "miss"]  # a failed load: MISS
    assert [look(tier, i, "B") for i in (1, 2)] == ["retry", "retry"]
    probe(tier)
    assert [look(tier, i, "B") for i in (1, 2)] == ["miss", "miss"]
    tier.request_finished("B")  # computed its pages
    faulty.down = False
    assert [look(tier, i, "C") for i in (1, 2)] == ["retry", "retry"]
    probe(tier)
    assert [look(tier, i, "C") for i in (1, 2)] == ["hit", "hit"]
    tier.submit_load(3, [make_key(1), make_key(2)], [3, 4])
    assert [o.success for o in settle(tier)] == [True]
    assert (page_of(view, 3), page_of(view, 4)) == (b"\x01" * PAGE, b"\x02" * PAGE)
    stats = tier.stats
    assert (stats.num_hits, stats.num_misses, stats.num_retries, stats.num_probe_batches,
            stats.num_failed_load_jobs, stats.num_loaded_pages) == (4, 4, 6, 3, 2, 2)
    tier.close()
    faulty.close()
    inner.close()


def test_a_corrupt_value_still_marks_its_key_bad() -> None:
    """No outage, a value that fails its checksum: the key is bad (a MISS for a new
    request, not probed again), as before: the outage rule takes nothing from it."""
    inner, faulty = stored_store()
    namespace: RemoteNamespace = inner.namespace
    key = namespace.key(fold_key(make_key(1)))
    inner.backend[key] = inner.backend[key][:-1] + bytes([inner.backend[key][-1] ^ 0xFF])
    tier = make_tier(faulty)
    tier.submit_load(1, [make_key(1)], [0])
    assert [o.success for o in settle(tier)] == [False]
    assert look(tier, 1, "B") == "miss"
    assert not tier.has_pending_work()  # nothing probed
    tier.close()
    faulty.close()
    inner.close()


def test_an_outage_miss_is_not_shared_with_later_requests() -> None:
    """The store is down when A's probe runs: A MISSes (it computes) and keeps that
    answer for its life. B asks while A lives, the store back up: B's key is probed again
    and HITs. Before, B got A's MISS (the probe's verdict, kept while A held it)."""
    inner, faulty = stored_store()
    tier = make_tier(faulty)
    faulty.down = True
    assert look(tier, 1, "A") == "retry"
    probe(tier)
    assert look(tier, 1, "A") == "miss"
    faulty.down = False
    assert look(tier, 1, "B") == "retry"
    probe(tier)
    assert (look(tier, 1, "B"), look(tier, 1, "A")) == ("hit", "miss")
    tier.request_finished("A")
    tier.request_finished("B")
    tier.check_invariants()
    stats = tier.stats
    assert (stats.num_hits, stats.num_misses, stats.num_probe_batches) == (1, 2, 2)
    tier.close()
    faulty.close()
    inner.close()


class HalfDown(InMemoryRemoteStore):
    """A store of two nodes, one down: keys of odd hash are never found, counted as the
    store counts a node's fault (one error per batch); the others are served."""

    def has_keys(self, keys: list[str]) -> list[bool]:
        self._count(num_errors=1)
        return [k in self.backend and int(k[-1], 16) % 2 == 0 for k in keys]


def test_keys_found_during_a_partial_outage_are_shared() -> None:
    """One node down: its keys are unknown (not shared: a later request probes them
    again), the others found are HITs for every request, as a probe's answer is."""
    store: RemoteStoreBase = HalfDown(make_layout().namespace())
    tier = make_tier(store)
    hashes = {i: fold_key(make_key(i)) for i in range(1, 7)}
    view = make_view()
    for i in hashes:
        fill(view, 0, i)
        store.put_many({hashes[i]: page_of(view, 0)})
    even = sorted(i for i, h in hashes.items() if h % 2 == 0)
    for i in hashes:
        look(tier, i, "A")
    probe(tier)
    assert sorted(i for i in hashes if look(tier, i, "A") == "hit") == even
    assert {i: look(tier, i, "B") for i in hashes} == {
        i: "hit" if i in even else "retry" for i in hashes}
    tier.close()
    store.close()
