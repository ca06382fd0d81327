"""Red team 34a: one rule for integers at every edge (``kvtier.counts``).

Salts and content hashes that are integers of another kind (NumPy, a caller's
``__index__`` class) name exactly the blocks of the plain int they equal, at every entry
that takes a salt; the router and the vLLM chunk policy use the plain int their checks
return, not the caller's value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from integer_kinds import Index, integer_kinds
from kvtier import (
    CacheConfig,
    KVCacheManager,
    MultimodalItem,
    Request,
    Scheduler,
    SchedulerConfig,
    SequenceSpec,
)
from kvtier.hashing import get_hash_fn, prompt_block_hashes
from kvtier.tier import Tier

PROMPT = list(range(9))  # two full blocks of 4 and one token


def make_manager(num_host_blocks: int = 0) -> KVCacheManager:
    """A manager of 4-token blocks, 16 GPU blocks."""
    return KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16,
                                      num_host_blocks=num_host_blocks), clock=lambda: 0.0)


def stored_under(salt: Any) -> KVCacheManager:
    """A manager holding PROMPT's two full blocks under ``salt`` (admitted, released)."""
    mgr = make_manager()
    assert mgr.add_sequence(SequenceSpec("a", PROMPT, salt=salt)).admitted
    mgr.remove_sequence("a")
    return mgr


# ---- 1. salts of any integer kind ---------------------------------------------------------


@pytest.mark.parametrize("salt", integer_kinds(5), ids=repr)
def test_an_integer_salt_of_any_kind_hits_the_plain_ints_blocks(salt: Any) -> None:
    """Blocks stored under salt 5 are hit by salt np.int64(5) (or an ``__index__`` 5) and
    the other way round, by admission and by lookup; the spec keeps the plain int (a NumPy
    salt was 'salt must be bytes, str, int or None')."""
    spec = SequenceSpec("b", PROMPT, salt=salt)
    assert type(spec.salt) is int and spec.salt == 5
    for stored, asked in ((5, salt), (salt, 5)):
        mgr = stored_under(stored)
        assert mgr.lookup(PROMPT, salt=asked).num_tokens == 8
        assert mgr.lookup(PROMPT, salt=6).num_tokens == 0  # another tenant: no hit
        assert mgr.add_sequence(SequenceSpec("b", PROMPT, salt=asked)).num_reused_tokens == 8
        assert mgr.missing_block_hashes(PROMPT, salt=asked) == []
        assert mgr.num_key_spaces == 1  # one tenant, whichever kind named it
        mgr.check_invariants()


@pytest.mark.parametrize("salt", integer_kinds(5), ids=repr)
def test_a_requests_integer_salt_is_the_plain_int(salt: Any) -> None:
    """A Request keeps its NumPy salt as the plain int; through a scheduler it reuses the
    blocks stored under 5."""
    req = Request("r", PROMPT, 1, salt=salt)
    assert type(req.salt) is int and req.salt == 5
    sched = Scheduler(stored_under(5), SchedulerConfig(max_num_tokens=32))
    sched.add_request(req)
    step = sched.step()
    assert [(c.request_id, c.num_reused_tokens) for c in step.context_chunks] == [("r", 8)]
    sched.check_invariants()


@pytest.mark.parametrize("salt", integer_kinds(5), ids=repr)
def test_hashes_imports_and_drops_read_an_integer_salt_as_its_int(salt: Any) -> None:
    """prompt_block_hashes (the router's, the remote tier's), import_blocks, drop_key_space
    and drop_salt read np.int64(5) as 5."""
    fn = get_hash_fn("xxh3_128")
    assert prompt_block_hashes(fn, PROMPT, 4, salt=salt) == prompt_block_hashes(fn, PROMPT, 4,
                                                                               salt=5)
    mgr = make_manager(num_host_blocks=4)
    assert len(mgr.import_blocks(PROMPT, 2, salt=salt)) == 2
    assert mgr.lookup(PROMPT, salt=5).num_host_tokens == 8
    assert all(b.tier is Tier.HOST for b in mgr.cached_blocks())
    mgr.check_invariants()
    assert stored_under(5).drop_key_space(salt=salt) == 2
    assert stored_under(5).drop_salt(salt) == 2
    assert stored_under(salt).drop_salt(5) == 2


@pytest.mark.parametrize("content_hash", integer_kinds(7), ids=repr)
def test_an_integer_content_hash_of_any_kind_is_the_plain_int(content_hash: Any) -> None:
    """A MultimodalItem's content hash follows the salt's rule: kept as the plain int, so
    its blocks are the ones keyed by 7."""
    item = MultimodalItem(0, 4, content_hash)
    assert type(item.content_hash) is int and item.content_hash == 7
    mgr = make_manager()
    assert mgr.add_sequence(SequenceSpec("a", PROMPT, mm_items=(MultimodalItem(0, 4, 7),)))
    mgr.remove_sequence("a")
    assert mgr.lookup(PROMPT, mm_items=(item,)).num_tokens == 8


class Tenant(str):
    """A caller's str subclass (as NumPy's ``str_`` is one)."""


@pytest.mark.parametrize("salt", [np.str_("t"), Tenant("t"), np.bytes_(b"t")], ids=repr)
def test_a_str_or_bytes_subclass_salt_is_the_plain_value(salt: Any) -> None:
    """A salt of a str (bytes) subclass is the str (bytes) it equals, as a request id is:
    was refused as 'salt must be bytes, str, int or None, got 't' (str_)'."""
    plain = b"t" if isinstance(salt, bytes) else "t"
    spec = SequenceSpec("b", PROMPT, salt=salt)
    assert type(spec.salt) is type(plain) and spec.salt == plain
    assert stored_under(plain).lookup(PROMPT, salt=salt).num_tokens == 8


@pytest.mark.parametrize("bad", [True, np.True_, 5.0, np.float64(5.0), [5], Index(2**128)],
                         ids=repr)
def test_a_bool_or_float_salt_is_refused_as_before(bad: Any) -> None:
    """A bool (NumPy's too) or a float (even 5.0) is no salt: the same message as before
    at every entry, nothing changed."""
    mgr = stored_under(5)
    before = mgr.cached_blocks()
    pattern = (r"^salt must be an int of magnitude below 2\*\*128" if isinstance(bad, Index)
               else r"^salt must be bytes, str, int or None, got .* \((bool|bool_|float|"
                    r"float64|list)\)$")
    calls: list[Callable[[], object]] = [lambda: SequenceSpec("b", PROMPT, salt=bad),
             lambda: mgr.lookup(PROMPT, salt=bad),
             lambda: mgr.import_blocks(PROMPT, 2, salt=bad),
             lambda: mgr.drop_key_space(salt=bad),
             lambda: prompt_block_hashes(get_hash_fn("xxh3_128"), PROMPT, 4, salt=bad)]
    for call in calls:
        with pytest.raises(ValueError, match=pattern):
            call()
    with pytest.raises(ValueError, match=r"^salt of request 'r' must be "):
        Request("r", PROMPT, 1, salt=bad)
    assert mgr.cached_blocks() == before
    mgr.check_invariants()


# ---- 2. the router and the vLLM chunk policy use the int their checks return ----------------


class Recording:
    """A routing policy that records what it is handed and picks the first instance."""

    name = "recording"

    def __init__(self) -> None:
        self.seen: list[tuple[object, ...]] = []

    def choose(self, loads: Any, hits: Any, num_prompt_blocks: int) -> str:
        self.seen = [(type(x.queue_depth), type(x.capacity), x.queue_depth, x.capacity)
                     for x in loads]
        return str(loads[0].instance_id)


@pytest.mark.parametrize("make", [np.int64, Index], ids=["numpy", "index"])
def test_the_router_keeps_its_checked_block_size_and_loads(make: Any) -> None:
    """Router(tokens_per_block=Index(4)) routed with the caller's object (``len // Index``:
    TypeError); loads of NumPy or ``__index__`` depths were refused ('must be an int'):
    now every one is the plain int its check read, as the policy sees them."""
    from kvtier.router import CacheAware, InstanceLoad, Router

    policy = Recording()
    router = Router(policy, tokens_per_block=make(4))
    assert type(router.tokens_per_block) is int and router.tokens_per_block == 4
    loads = [InstanceLoad("a", make(2), make(8)), InstanceLoad("b", make(0), make(8))]
    decision = router.route(PROMPT, loads, salt=make(5))
    assert (decision.instance_id, decision.num_prompt_blocks) == ("a", 2)
    assert policy.seen == [(int, int, 2, 8), (int, int, 0, 8)]
    assert router.block_hashes(PROMPT, salt=make(5)) == Router(
        Recording(), 4).block_hashes(PROMPT, salt=5)
    aware = CacheAware(load_slack=make(3))
    assert type(aware.load_slack) is int and aware.load_slack == 3
    assert Router(aware, 4).route(PROMPT, loads).instance_id in ("a", "b")


@pytest.mark.parametrize("bad", [True, np.True_, 4.0], ids=repr)
def test_the_router_refuses_bools_and_floats(bad: Any) -> None:
    """A bool (NumPy's too) or a float is no block size, depth, capacity or slack."""
    from kvtier.router import CacheAware, InstanceLoad, RoundRobin, Router

    with pytest.raises(ValueError, match="tokens_per_block"):
        Router(RoundRobin(), tokens_per_block=bad)
    router = Router(RoundRobin(), 4)
    with pytest.raises(ValueError, match=r"^loads\[0\]\.queue_depth must be an int >= 0"):
        router.route(PROMPT, [InstanceLoad("a", bad, 1)])
    with pytest.raises(ValueError, match=r"^loads\[0\]\.capacity must be an int >= 1"):
        router.route(PROMPT, [InstanceLoad("a", 0, bad)])
    assert router.stats.num_routed == 0
    aware = CacheAware()
    with pytest.raises(ValueError, match=r"^load_slack must be an integer in \[0, 2\*\*31\]"):
        aware.load_slack = bad
    assert aware.load_slack == 4


@pytest.mark.parametrize("make", [np.int64, Index], ids=["numpy", "index"])
def test_the_chunk_policy_keeps_its_checked_capacity_and_priority(make: Any) -> None:
    """PolicyChunks took an ``__index__`` default priority as given (its keys' arithmetic
    then raised at the first eviction) and refused a NumPy capacity: both are plain ints."""
    from kvtier.integrations.vllm.chunk_policy import PolicyChunks

    chunks: PolicyChunks[str] = PolicyChunks("priority-lru", make(4),
                                             default_priority=make(50), clock=lambda: 1.0)
    for i in range(4):
        chunks.insert(bytes([i]) * 8, f"c{i}", evictable=True, depth=16 * (i + 1))
    chunks.release([bytes([i]) * 8 for i in range(4)], reused=set())
    node = chunks.node(bytes([0]) * 8)
    assert node is not None and type(node.priority) is int and node.priority == 50
    assert [c for _, c in chunks.evict(2, set()) or []] == ["c3", "c2"]
    chunks.check_invariants()


@pytest.mark.parametrize("bad", [True, np.True_, 4.0], ids=repr)
def test_the_chunk_policy_refuses_bools_and_floats(bad: Any) -> None:
    """A bool or a float capacity or default priority is refused naming the field."""
    from kvtier.integrations.vllm.chunk_policy import PolicyChunks

    with pytest.raises(ValueError, match=r"^capacity must be an integer in 0\.\.4294967296"):
        PolicyChunks("priority-lru", bad)
    with pytest.raises(ValueError, match=r"^default_priority must be an integer in 0\.\.100"):
        PolicyChunks("priority-lru", 4, default_priority=bad)


# ---- 3. the simulator's and the data plane's own int checks ---------------------------------


@pytest.mark.parametrize("make", [np.int64, Index], ids=["numpy", "index"])
def test_the_time_model_reads_any_integer_as_its_plain_int(make: Any) -> None:
    """TimeModel's counts were refused unless plain ints ('must be an integer'); kept as
    given, a NumPy count times the bytes per token would wrap in int64 (2**47 tokens of
    320 KiB is 2**65.3 bytes): now exact, as the plain int's."""
    from kvtier.sim.timemodel import ModelProfile, RemoteLink, TimeModel, get_profile

    model = TimeModel(get_profile("llama3-70b-h100x4"))
    big = model.kv_bytes(make(2**47))
    assert type(big) is int and big == 2**47 * 320 * 1024
    assert model.step_seconds(make(3), make(2), make(4096), make(0)) == model.step_seconds(
        3, 2, 4096, 0)
    assert RemoteLink().transfer_seconds(make(10**9)) == RemoteLink().transfer_seconds(10**9)
    profile = get_profile("tiny-test", kv_bytes_per_token=make(2048))
    assert type(profile.kv_bytes_per_token) is int and profile == get_profile(
        "tiny-test", kv_bytes_per_token=2048)
    assert type(ModelProfile("p", make(8), 0.0, 0.0, 0.0, 1.0).kv_bytes_per_token) is int


@pytest.mark.parametrize("bad", [True, np.True_, 3.0], ids=repr)
def test_the_time_model_refuses_bools_and_floats(bad: Any) -> None:
    """A bool or a float count is refused naming its field, as before."""
    from kvtier.sim.timemodel import TimeModel, get_profile

    model = TimeModel(get_profile("tiny-test"))
    with pytest.raises(ValueError, match=r"^num_tokens must be an integer in 0\.\."):
        model.kv_bytes(bad)
    with pytest.raises(ValueError, match=r"^bytes_d2h must be an integer in 0\.\."):
        model.transfer_seconds(0, bad)
    with pytest.raises(ValueError, match=r"^kv_bytes_per_token must be an integer in 1\.\."):
        get_profile("tiny-test", kv_bytes_per_token=bad)


@pytest.mark.parametrize("make", [np.int64, Index], ids=["numpy", "index"])
def test_the_workloads_keep_plain_ints(make: Any) -> None:
    """The built-in workloads took NumPy counts and seeds as given or refused them: each is
    the plain int, and draws exactly the requests of the plain ints."""
    from kvtier.sim.agentic import AgenticWorkload
    from kvtier.sim.heldout import HeldOutWorkload
    from kvtier.sim.mixed import MixedWorkload
    from kvtier.sim.synthetic import PrefixModel, SyntheticChat

    pairs: list[tuple[Any, Any]] = [
        (SyntheticChat(num_requests=make(6), seed=make(3),
                       prefix_model=PrefixModel(num_system_prompts=make(2))),
         SyntheticChat(num_requests=6, seed=3, prefix_model=PrefixModel(num_system_prompts=2))),
        (AgenticWorkload(num_requests=make(6), seed=make(3), min_steps=make(2)),
         AgenticWorkload(num_requests=6, seed=3, min_steps=2)),
        (HeldOutWorkload("rag", seed=make(3), num_requests=make(6)),
         HeldOutWorkload("rag", seed=3, num_requests=6)),
    ]
    for given, plain in pairs:
        assert given == plain and list(given) == list(plain)
    mixed = MixedWorkload((SyntheticChat(num_requests=4, name="a"),
                           SyntheticChat(num_requests=4, name="b")), limit=make(3))
    assert type(mixed.limit) is int and len(list(mixed)) == 3


@pytest.mark.parametrize("bad", [True, 3.0], ids=repr)
def test_the_workloads_refuse_bools_and_floats(bad: Any) -> None:
    """A bool or a float count or seed is refused naming its field, as before."""
    from kvtier.sim.agentic import AgenticWorkload
    from kvtier.sim.synthetic import SyntheticChat

    with pytest.raises(ValueError, match=r"^num_requests must be an integer >= 0"):
        SyntheticChat(num_requests=bad)
    with pytest.raises(ValueError, match=r"^seed must be an integer"):
        AgenticWorkload(seed=bad)


@pytest.mark.parametrize("make", [np.int64, Index], ids=["numpy", "index"])
def test_the_data_plane_reads_any_integer_as_its_plain_int(make: Any) -> None:
    """A NumPy failed index failed every op of its plan (now only its op); the recording
    engine's max_plans and the torch engine's sizes were refused unless plain ints."""
    from kvtier.transfer.engine import RecordingTransferEngine, TransferError
    from kvtier.transfer.plan import TransferPlan

    mgr = make_manager(num_host_blocks=4)
    assert mgr.add_sequence(SequenceSpec("a", PROMPT)).admitted
    mgr.remove_sequence("a")
    assert len(mgr.import_blocks([7] * 9, 2)) == 2
    mgr.take_plan()
    assert mgr.add_sequence(SequenceSpec("b", [7] * 9)).admitted  # onboards two blocks
    plan = mgr.take_plan()
    assert isinstance(plan, TransferPlan) and len(plan) == 2
    assert TransferError("x", [], [make(1)]).failed_in(plan) == [1]
    assert TransferError("x", [], [make(2)]).failed_in(plan) == [0, 1]  # past the plan: all
    recorder = RecordingTransferEngine(make(1))
    recorder.submit(plan)
    recorder.submit(plan)
    assert recorder.plans.maxlen == 1 and len(recorder.plans) == 1
    with pytest.raises(ValueError, match=r"^max_plans must be an int >= 0, got True"):
        RecordingTransferEngine(True)


@pytest.mark.parametrize("make", [np.int64, Index], ids=["numpy", "index"])
def test_the_torch_engine_keeps_plain_int_settings(make: Any) -> None:
    """TorchTransferEngine refused NumPy sizes ('must be an int >= 0'): each is the plain
    int; a bool is refused as before; wait takes an integer layer of any kind."""
    pytest.importorskip("torch")
    from kvtier.storage import KVLayout, KVStorage
    from kvtier.transfer.torch_engine import TorchTransferEngine

    layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, tokens_per_block=4)
    engine = TorchTransferEngine(KVStorage(layout, 4, "cpu"), KVStorage(layout, 4, "cpu"),
                                 min_dma_copy_bytes=make(4096), min_batch_copy_bytes=make(0),
                                 gather_streams=make(1), staging_bytes=make(1 << 20),
                                 heap_pad_bytes=make(0))
    assert type(engine.min_dma_copy_bytes) is int and engine.min_dma_copy_bytes == 4096
    engine.min_batch_copy_bytes = make(8)
    assert type(engine.min_batch_copy_bytes) is int and engine.min_batch_copy_bytes == 8
    with pytest.raises(ValueError, match=r"^min_dma_copy_bytes must be an int >= 0, got True"):
        engine.min_dma_copy_bytes = True
    with pytest.raises(ValueError, match=r"^staging_bytes must be an int >= 1, got 2\.0"):
        TorchTransferEngine(KVStorage(layout, 4, "cpu"), None,
                            staging_bytes=2.0)  # type: ignore[arg-type]
