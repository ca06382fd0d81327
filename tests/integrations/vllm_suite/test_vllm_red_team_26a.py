"""Red team 26a: kvtier's Redis tier and policies driven through vLLM 0.33.0's own
TieringOffloadingManager (configured as a user's ``--kv-transfer-config`` configures it),
over a real redis-server, in the call orders vLLM's connector uses. Each test fails on the
code before its fix."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from remote_helpers import RedisServers
from vllm.v1.kv_offload.base import OffloadKey, ReqContext, ScheduleEndContext, make_offload_key

from integrations.vllm_suite.engine_harness import kv_transfer_config, make_scheduler
from kvtier.integrations.vllm.tier import KvtierRedisTier

END = ScheduleEndContext(new_req_ids=[], preempted_req_ids=())
_SCHEDULERS: list[Any] = []


@pytest.fixture(autouse=True)
def shut_schedulers_down() -> Iterator[None]:
    """Every scheduler a test made is shut down (its CPU tier's file unlinked)."""
    yield
    while _SCHEDULERS:
        _SCHEDULERS.pop().shutdown()


def make_manager(url: str, cpu_chunks: int = 4, **options: Any) -> tuple[Any, KvtierRedisTier]:
    """vLLM's tiering manager with one KvtierRedisTier, in a namespace of its own."""
    tier = {"type": "KvtierRedisTier", "module_path": "kvtier.integrations.vllm", "url": url,
            "tenant": f"test-{uuid.uuid4().hex}", "max_lookup_wait_s": 5.0, **options}
    scheduler = make_scheduler(kv_transfer_config(cpu_chunks, tiers=[tier]))
    _SCHEDULERS.append(scheduler)
    manager = scheduler.connector.connector_scheduler.manager
    [redis_tier] = manager.secondary_tiers
    assert isinstance(redis_tier, KvtierRedisTier)
    return manager, redis_tier


def keys(*ints: int) -> list[OffloadKey]:
    return [make_offload_key(i.to_bytes(32, "big"), 0) for i in ints]


def settle(manager: Any) -> None:
    """End steps until the tier's probes and jobs are done and handed back."""
    for _ in range(500):
        manager.on_schedule_end(END)
        if not manager.has_pending_work():
            return
        time.sleep(0.01)
    raise AssertionError("the tiering manager still has pending work after 500 steps")


def look(manager: Any, ks: list[OffloadKey], ctx: ReqContext) -> list[str]:
    return [manager.lookup(k, ctx).name for k in ks]


def test_pages_stored_while_the_request_that_missed_them_lives_are_found(
        redis_servers: RedisServers) -> None:
    """A's lookups miss keys 1-4 (Redis lacks them); A computes and stores them, and the
    cascade writes them to Redis; B's store evicts them from the 4-chunk CPU tier. C asks
    while A still decodes: before, the MISS A's probe learnt was C's answer too, and C
    recomputed 4 pages Redis held. Now C's lookups find them (RETRY is the CPU tier's
    promotion starting, HIT_PENDING it in flight), and C loads all 4."""
    manager, tier = make_manager(redis_servers.url)
    a, b, c = (ReqContext(req_id=r) for r in "ABC")
    for ctx in (a, b, c):
        manager.on_new_request(ctx)
    assert look(manager, keys(1, 2, 3, 4), a) == ["RETRY"] * 4
    settle(manager)
    assert look(manager, keys(1, 2, 3, 4), a) == ["MISS"] * 4
    manager.prepare_store(keys(1, 2, 3, 4), a)
    manager.complete_store(keys(1, 2, 3, 4), a)
    settle(manager)
    out = manager.prepare_store(keys(5, 6, 7, 8), b)
    assert sorted(out.evicted_keys) == keys(1, 2, 3, 4)
    manager.complete_store(keys(5, 6, 7, 8), b)
    manager.on_request_finished(b)
    settle(manager)
    assert look(manager, keys(1, 2, 3, 4), c) == ["HIT_PENDING"] * 4
    settle(manager)
    assert look(manager, keys(1, 2, 3, 4), c) == ["HIT"] * 4
    stats = tier.stats
    assert (stats.num_stored_pages, stats.num_load_jobs, stats.num_loaded_pages,
            stats.num_failed_load_jobs) == (8, 1, 4, 0)
    for ctx in (a, c):
        manager.on_request_finished(ctx)
    settle(manager)
    tier.tier.check_invariants()
    assert tier.tier._probes == {} and tier.tier._keys_of_request == {}


def make_tier_config(**options: Any) -> dict[str, Any]:
    """A ``--kv-transfer-config`` with one KvtierRedisTier of ``options``."""
    tier = {"type": "KvtierRedisTier", "module_path": "kvtier.integrations.vllm", **options}
    return kv_transfer_config(4, tiers=[tier])


def test_a_refused_tier_config_never_shows_the_urls_password() -> None:
    """A tier's JSON object with both a url and a store was refused with the url whole in
    the message, password included, for vLLM to log and raise to the operator. The url is
    now shown redacted and the store by its type."""
    url = "redis://kvtier:s3cret-pw@127.0.0.1:6379/0"
    with pytest.raises(ValueError) as refused:
        make_scheduler(make_tier_config(url=url, store={"password": "s3cret-pw"}))
    message = str(refused.value)
    assert message == ("KvtierRedisTier needs exactly one of url (a redis:// URL) and store, "
                       "got url='redis://kvtier:***@127.0.0.1:6379/0' and store=dict")
    assert "s3cret" not in message


def test_a_store_that_is_no_remote_store_is_refused_naming_the_option() -> None:
    """``"store"`` in the tier's JSON object (a dict; a store is Python only) raised
    AttributeError ('dict' object has no attribute 'namespace'), naming no option. Now
    ValueError naming ``store`` and what it got."""
    with pytest.raises(ValueError, match=r"^store must be a kvtier RemoteStore \(Python only; "
                                         r"a JSON config names a url\), got dict$"):
        make_scheduler(make_tier_config(store={"url": "redis://127.0.0.1:6379/0"}))


def test_an_unknown_tier_option_is_refused_naming_it_and_the_options() -> None:
    """A misspelt option (``ttl`` for ``ttl_s``) was a TypeError from RedisRemoteStore's
    signature ("got an unexpected keyword argument 'ttl'"), naming none of the tier's
    options. Now ValueError naming it and every option the tier takes."""
    with pytest.raises(ValueError) as refused:
        make_scheduler(make_tier_config(url="redis://127.0.0.1:6379/0", ttl=60))
    message = str(refused.value)
    assert message.startswith("unknown KvtierRedisTier option(s) ['ttl']; the options are [")
    for option in ("backoff_s", "ca_file", "cluster", "locality", "max_lookup_wait_s",
                   "max_queued_jobs", "tenant", "timeout_s", "ttl_s", "url"):
        assert repr(option) in message


def test_an_unknown_kvtier_policy_is_refused_naming_the_policies() -> None:
    """``"eviction_policy": "kvtier-lfu"`` reached the operator as vLLM's import of an
    attribute the module lacks ("no attribute 'kvtier-lfu'"), naming none of kvtier's
    policies. The refusal now lists them (still an AttributeError: vLLM's getattr)."""
    from kvtier.config import EVICTION_POLICIES
    from kvtier.integrations.vllm.chunk_policy import vllm_policy_name

    known = sorted(vllm_policy_name(p) for p in EVICTION_POLICIES)
    with pytest.raises(AttributeError) as refused:
        make_scheduler(kv_transfer_config(4, eviction_policy="kvtier-lfu"))
    assert str(refused.value) == (
        "module 'kvtier.integrations.vllm' has no attribute 'kvtier-lfu': eviction_policy "
        f"must be one of {known} for kvtier")
    assert "kvtier-predict" in known and "kvtier-lru" in known


def test_events_of_another_block_size_are_refused_changing_nothing() -> None:
    """A translator made with block_size 16 for a manager of 4-token blocks published a
    block as 4 tokens of block_size 4 when stored, and as the same 4 tokens of block_size
    16 when it moved to the CPU: one block, two sizes for a router (which slices a
    BlockStored's tokens by its block_size). Now ValueError naming the event and both
    sizes; the translator's next batch is what it would have been."""
    import msgspec

    from kvtier import events as kv
    from kvtier.integrations.vllm.events import VllmEventTranslator
    from kvtier.tier import Tier

    stored = kv.BlockStored(0, 9, None, Tier.GPU, 4, None, (1, 2, 3, 4), None, None)
    moved = kv.BlockTierChanged(1, 9, Tier.GPU, Tier.HOST)
    translator = VllmEventTranslator(16, clock=lambda: 0.0)
    with pytest.raises(ValueError, match=r"^events\[0\]\.num_tokens must be the translator's "
                                         r"block_size 16, got 4$"):
        translator.translate([stored, moved])
    good = stored._replace(num_tokens=16, token_ids=tuple(range(16)))
    fresh = VllmEventTranslator(16, clock=lambda: 0.0)
    assert (msgspec.msgpack.encode(translator.translate([good, moved]))
            == msgspec.msgpack.encode(fresh.translate([good, moved])))
    assert translator.num_resyncs == 0


def test_blocks_without_tokens_are_published_as_vllms_placeholder() -> None:
    """A stored block whose event carries no tokens (decoded from a publisher older than
    token ids) was published as block_size 4 with no token ids, stored or moved: a router
    slicing 4 ids per block read none, one checking the sizes refused the event. Such a
    block is now vLLM's placeholder, block size 0 and no tokens, as the translator already
    publishes a block stored before it existed."""
    from kvtier import events as kv
    from kvtier.integrations.vllm.events import VllmEventTranslator
    from kvtier.tier import Tier

    stored = [kv.BlockStored(i, 9 + i, 8 + i if i else None, Tier.GPU, 4, None, None, None,
                             None) for i in range(2)]
    moved = kv.BlockTierChanged(2, 10, Tier.GPU, Tier.HOST)
    batch = VllmEventTranslator(4, clock=lambda: 0.0).translate([*stored, moved])
    published = [(type(e).__name__, e.medium, getattr(e, "block_size", None),
                  getattr(e, "token_ids", None)) for e in batch.events]
    assert published == [("BlockStored", "GPU", 0, []), ("BlockRemoved", "GPU", None, None),
                         ("BlockStored", "CPU", 0, [])]
    assert batch.events[2].parent_block_hash == (9).to_bytes(16, "big")


def test_a_bad_kv_transfer_param_is_logged_once_per_request(
        caplog: pytest.LogCaptureFixture) -> None:
    """A request's bad ``kvtier_priority`` was logged at every chunk its store inserted and
    again at its finish: 9 warnings for 8 chunks, a thousand for a long prompt, for every
    request a client sent so. Now once per request; the request keeps the default
    priority, and a good request logs nothing."""
    import logging

    from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager

    manager = CPUOffloadingManager(num_chunks=16, cache_policy="kvtier-priority-lru",
                                   cache_policy_module_path="kvtier.integrations.vllm")
    bad = ReqContext(req_id="bad", kv_transfer_params={"kvtier_priority": "high"})
    good = ReqContext(req_id="good", kv_transfer_params={"kvtier_priority": 90})
    with caplog.at_level(logging.WARNING, logger="kvtier.integrations.vllm.policy"):
        for ctx, first in ((bad, 1), (good, 20)):
            manager.on_new_request(ctx)
            for part in (keys(*range(first, first + 4)), keys(*range(first + 4, first + 8))):
                assert manager.prepare_store(part, ctx) is not None
                manager.complete_store(part, ctx)
            manager.on_request_finished(ctx)
    assert [r.getMessage() for r in caplog.records
            if r.name == "kvtier.integrations.vllm.policy"] == [
        "request bad: kvtier_priority must be an int in 0..100, got 'high'; ignored"]
    chunks = manager._policy.chunks
    assert [chunks.node(k).priority for k in keys(1, 8, 20, 27)] == [35, 35, 90, 90]


def test_an_engine_hashing_with_xxhash_stores_and_loads_through_redis(
        redis_servers: RedisServers) -> None:
    """vLLM's xxhash block hashes are 16 bytes, so its offload keys are 20 (sha256's are
    36). The tier took only 36-byte keys: the first lookup of an engine started with
    ``--prefix-caching-hash-algo xxhash`` raised ValueError into vLLM's step (every
    request failed), though docs/vllm.md names xxhash. Now both sizes fold; engine 2 loads
    engine 1's 4 blocks from Redis and computes only its own 16 tokens."""
    from vllm import SamplingParams
    from vllm.utils.hashing import xxhash
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher
    from vllm.v1.request import Request

    from integrations.vllm_suite.engine_harness import BLOCK_SIZE, EOS, Engine

    def xxhash_request(request_id: str, tokens: list[int]) -> Request:
        params = SamplingParams(max_tokens=1)
        params.update_from_generation_config({}, EOS)
        return Request(request_id=request_id, prompt_token_ids=tokens, sampling_params=params,
                       pooling_params=None,
                       block_hasher=get_request_block_hasher(BLOCK_SIZE, xxhash))

    tier = {"type": "KvtierRedisTier", "module_path": "kvtier.integrations.vllm",
            "url": redis_servers.url, "tenant": f"test-{uuid.uuid4().hex}",
            "max_lookup_wait_s": 5.0}
    engines = [Engine(make_scheduler(kv_transfer_config(16, tiers=[tier]))) for _ in range(2)]
    _SCHEDULERS.extend(e.scheduler for e in engines)
    prompt = list(range(1000, 1000 + 4 * BLOCK_SIZE))
    first = xxhash_request("A", prompt)
    assert len(first.block_hashes[0]) == 16
    engines[0].scheduler.add_request(first)
    engines[0].run()
    engines[1].scheduler.add_request(xxhash_request("B", prompt + list(range(5000, 5016))))
    engines[1].run()
    assert [step["B"] for step in engines[1].scheduled if "B" in step] == [16]
    stats = [e.manager.secondary_tiers[0].stats for e in engines]
    assert (stats[0].num_stored_pages, stats[1].num_loaded_pages,
            stats[1].num_failed_load_jobs) == (4, 4, 0)
