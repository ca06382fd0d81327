"""Red team 25b: the vLLM secondary tier (``StoreTier`` and ``KvtierRedisTier``, the latter
over a stand-in for vLLM's modules: this interpreter has no vLLM)."""

from __future__ import annotations

from kvtier.integrations.vllm.keys import EngineLayout
from kvtier.integrations.vllm.store_tier import JobOutcome, StoreTier
from kvtier.remote import InMemoryRemoteStore

PAGE = 64
NUM_PAGES = 8


def make_key(i: int) -> bytes:
    """A vLLM OffloadKey: a 32-byte hash and a 4-byte group."""
    return i.to_bytes(32, "big") + bytes(4)


def make_store() -> InMemoryRemoteStore:
    """An in-memory store of the namespace of 64-byte pages."""
    layout = EngineLayout(model="m", kv_dtype="float16", page_bytes=PAGE, tokens_per_hash=16,
                          blocks_per_chunk=1, groups=((16, 2),), tp_size=1, pp_size=1,
                          pcp_size=1, dcp_size=1, rank=0)
    return InMemoryRemoteStore(layout.namespace())


def test_a_job_ended_and_not_handed_back_is_pending_work() -> None:
    """A load that ended on the I/O thread, applied by the next ``lookup`` (or ``drain``),
    waited in the finished list for ``finished_jobs``, yet ``has_pending_work`` said False:
    an engine that steps while work is pending stopped, and the job (its CPU pages pinned
    by vLLM) was never reported. Now it is pending until handed back."""
    tier = StoreTier(make_store(), memoryview(bytearray(PAGE * NUM_PAGES)), PAGE)
    tier.submit_load(3, [make_key(1)], [2])
    tier.drain()
    assert tier.has_pending_work()
    assert [o.job_id for o in tier.finished_jobs()] == [3]
    assert not tier.has_pending_work()
    tier.check_invariants()
    tier.close()


def test_a_refused_job_is_pending_work_until_handed_back() -> None:
    """A job the closed tier refused is reported failed at once; it was not pending work,
    so an engine waiting on pending work never asked for its outcome."""
    tier = StoreTier(make_store(), memoryview(bytearray(PAGE * NUM_PAGES)), PAGE)
    tier.close()
    tier.submit_store(4, [make_key(1)], [0])
    assert tier.has_pending_work()
    assert tier.finished_jobs() == [JobOutcome(4, False, None, 0.0, 0)]
    assert not tier.has_pending_work()
    tier.check_invariants()


def test_keys_asked_for_and_never_sent_are_no_work_after_close() -> None:
    """A lookup's key waiting for the step's probe when the tier closed stayed unsent for
    ever: ``has_pending_work`` was True after ``close``, whatever the engine did. Now
    closing resolves them as misses: no pending work, the books whole."""
    tier = StoreTier(make_store(), memoryview(bytearray(PAGE * NUM_PAGES)), PAGE)
    assert tier.lookup(make_key(1), "r") == "retry"
    tier.close()
    assert not tier.has_pending_work()
    assert tier.lookup(make_key(1), "r") == "miss"
    tier.check_invariants()
