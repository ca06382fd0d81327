"""Red team 25b: the vLLM secondary tier (``StoreTier`` and ``KvtierRedisTier``, the latter
over a stand-in for vLLM's modules: this interpreter has no vLLM)."""

from __future__ import annotations

import enum
import sys
import types
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

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


class FakeSecondaryTierManager:
    """vLLM's ``SecondaryTierManager`` as far as ``KvtierRedisTier`` uses it."""

    def __init__(self, offloading_spec: Any, primary_kv_view: memoryview, tier_type: str,
                 backpressure_detector: object = None) -> None:
        self.block_size_bytes = offloading_spec.block_size_bytes


@pytest.fixture
def tier_class(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``KvtierRedisTier`` imported over stand-ins for the vLLM modules it names (the
    module forgotten afterwards: no other test sees it bound to them)."""
    names = {"Locality": enum.Enum("Locality", {"LOCAL": "LOCAL", "REMOTE": "REMOTE"}),
             "LookupResult": enum.Enum("LookupResult", "HIT MISS RETRY"),
             "Medium": enum.Enum("Medium", "STORAGE"),
             "CacheHitSource": enum.Enum("CacheHitSource", "EXTERNAL_UNSPECIFIED"),
             "SecondaryTierManager": FakeSecondaryTierManager}
    for name in ("OffloadKey", "ReqContext", "RequestOffloadingContext",
                 "ScheduleEndContext", "JobResult", "TransferJob"):
        names[name] = type(name, (), {})
    for module in ("vllm", "vllm.v1", "vllm.v1.kv_offload", "vllm.v1.kv_offload.base",
                   "vllm.v1.kv_offload.tiering", "vllm.v1.kv_offload.tiering.base",
                   "vllm.v1.metrics", "vllm.v1.metrics.cache_hit_source"):
        fake = types.ModuleType(module)
        fake.__dict__.update(names)
        monkeypatch.setitem(sys.modules, module, fake)
    assert "kvtier.integrations.vllm.tier" not in sys.modules
    import kvtier.integrations.vllm as package
    from kvtier.integrations.vllm import tier

    monkeypatch.setattr(tier, "RedisRemoteStore", RecordingStore)
    yield tier.KvtierRedisTier
    del sys.modules["kvtier.integrations.vllm.tier"]
    package.__dict__.pop("tier", None)


class RecordingStore(InMemoryRemoteStore):
    """Stands in for ``RedisRemoteStore(url, namespace, **options)``; remembers each one."""

    made: ClassVar[list[RecordingStore]] = []

    def __init__(self, url: str, namespace: Any, **options: Any) -> None:
        super().__init__(namespace)
        RecordingStore.made.append(self)


def make_spec() -> Any:
    """The parts of vLLM's OffloadingSpec ``engine_layout`` reads, for 64-byte pages."""
    ns = types.SimpleNamespace
    config = ns(model=ns(name="m", dtype="float16"),
                cache=ns(tokens_per_hash=16, blocks_per_chunk=1),
                groups=[ns(tokens_per_block=16, layer_names=["a", "b"])],
                parallel=ns(tp_size=1, pp_size=1, pcp_size=1, dcp_size=1, rank=0),
                replicated_layout=False, kv_cache_layout=None, canonical_layout=False)
    return ns(config=config, block_size_bytes=PAGE)


@pytest.mark.parametrize(("option", "message"), [
    ({"max_lookup_wait_s": -1.0}, "max_lookup_wait_s"),
    ({"max_queued_jobs": 0}, "max_queued_jobs"),
])
def test_a_tier_refused_for_an_option_leaves_nothing_open(
        tier_class: Any, option: dict[str, Any], message: str) -> None:
    """A tier option refused after the store was opened from the url left that store open
    and the CPU tier's buffer exported (vLLM unlinks its file only when no view is left).
    Now ValueError naming the option, the store closed, the buffer free."""
    RecordingStore.made.clear()
    buffer = bytearray(PAGE * NUM_PAGES)
    primary = memoryview(buffer)
    with pytest.raises(ValueError, match=message):
        tier_class(make_spec(), primary, "kvtier", url="redis://localhost", **option)
    (store,) = RecordingStore.made
    assert store.closed
    primary.release()
    buffer.extend(b"x")  # BufferError while a view of it is exported


def test_a_sound_tier_still_opens_and_shuts_down(tier_class: Any) -> None:
    """Unchanged for good options: the store opened, closed at shutdown, the view freed."""
    RecordingStore.made.clear()
    buffer = bytearray(PAGE * NUM_PAGES)
    primary = memoryview(buffer)
    tier = tier_class(make_spec(), primary, "kvtier", url="redis://localhost")
    (store,) = RecordingStore.made
    assert not store.closed and not tier.has_pending_work()
    tier.shutdown()
    assert store.closed
    primary.release()
    buffer.extend(b"x")


@pytest.mark.parametrize("plan", ["x", None, [("offload", 0, 1, 1, 0, 4)]])
def test_the_recording_engine_refuses_what_is_no_plan_recording_nothing(plan: object) -> None:
    """``RecordingTransferEngine.submit`` kept a str (or None, a list of tuples) as a plan,
    then raised AttributeError ('ops'), its totals half counted. Now TypeError naming the
    type, as every engine refuses it; nothing recorded."""
    from kvtier.transfer.engine import RecordingTransferEngine

    engine = RecordingTransferEngine()
    with pytest.raises(TypeError, match=r"^plan must be a TransferPlan, got "):
        engine.submit(plan)  # type: ignore[arg-type]
    assert len(engine.plans) == 0 and not any(engine.num_ops.values())


@pytest.mark.parametrize(("max_plans", "shown"), [(-1, "-1"), (True, "True"), (2.0, "2.0"),
                                                  ("8", "'8'")])
def test_the_recording_engine_refuses_a_max_plans_that_is_no_count(max_plans: object,
                                                                  shown: str) -> None:
    """True kept one plan, -1 raised deque's 'maxlen must be non-negative', 2.0 'an integer
    is required': now ValueError naming the field and the value."""
    from kvtier.transfer.engine import RecordingTransferEngine

    with pytest.raises(ValueError, match=rf"^max_plans must be an int >= 0, got {shown}"):
        RecordingTransferEngine(max_plans)  # type: ignore[arg-type]
