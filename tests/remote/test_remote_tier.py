"""Engines sharing KV through a remote store: the second reuses what the first computed,
and its logits stay those of a full recompute (fp32, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the remote tier tests move real KV: needs torch")

from remote_helpers import PrivateRedis, RedisServers  # noqa: E402

from exact_engine import assert_exact  # noqa: E402
from kvtier import (  # noqa: E402
    CacheConfig,
    KVCacheManager,
    MultimodalItem,
    Request,
    Scheduler,
    SchedulerConfig,
)
from kvtier.model import LlamaModel, ModelConfig, ModelEngine  # noqa: E402
from kvtier.remote import InMemoryRemoteStore, RemoteNamespace  # noqa: E402
from kvtier.remote.store import RemoteStore  # noqa: E402
from kvtier.remote.tier import RemoteTier, WritePolicy  # noqa: E402
from kvtier.storage import KVStorage  # noqa: E402
from kvtier.transfer.plan import OpKind  # noqa: E402
from kvtier.transfer.torch_engine import TorchTransferEngine  # noqa: E402

TPB = 4
SRC = Path(__file__).resolve().parents[2] / "src"
PREFIX = [(7 * i + 3) % 256 for i in range(22)]
FIRST = [PREFIX + [11, 12, 13], PREFIX[:13] + [40, 41]]
SECOND = [PREFIX + [90, 91, 92, 93], PREFIX[:17] + [5]]


def make_engine(store_for: object, num_gpu_blocks: int = 32, num_host_blocks: int = 16,
                write_policy: WritePolicy = "write-through") -> ModelEngine:
    """A model engine with its own manager and NaN-poisoned storages, over ``store_for``
    (a function of the namespace giving the RemoteStore)."""
    model = LlamaModel(ModelConfig(), "cpu")
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=num_gpu_blocks,
                                         num_host_blocks=num_host_blocks, hash_algo="sha256"))
    scheduler = Scheduler(manager, SchedulerConfig(max_num_tokens=64))
    layout = model.config.kv_layout(TPB)
    gpu, host = KVStorage(layout, num_gpu_blocks, "cpu"), KVStorage(layout, num_host_blocks)
    gpu.fill_(float("nan"))
    host.fill_(float("nan"))  # an imported slot nobody filled would poison the logits
    store: RemoteStore = store_for(RemoteNamespace("tiny-llama", layout))  # type: ignore[operator]
    remote = RemoteTier(store, manager, gpu, host, write_policy=write_policy)
    return ModelEngine(model, manager, scheduler, TorchTransferEngine(gpu, host),
                       record_logits=True, remote=remote)


def run(engine: ModelEngine, prompts: list[list[int]], tag: str) -> None:
    """Serve ``prompts`` to completion, 3 output tokens each."""
    for i, prompt in enumerate(prompts):
        engine.add_request(Request(f"{tag}{i}", prompt, 3))
    engine.run()
    engine.manager.check_invariants()


def test_second_engine_reuses_blocks_the_first_computed() -> None:
    """Engine B finds A's prefix blocks in the shared store, imports and onboards them."""
    backend: dict[str, bytes] = {}
    a = make_engine(lambda ns: InMemoryRemoteStore(ns, backend))
    run(a, FIRST, "a")
    assert a.remote is not None and a.remote.num_written_blocks >= len(PREFIX) // TPB
    b = make_engine(lambda ns: InMemoryRemoteStore(ns, backend))
    run(b, SECOND, "b")
    assert b.remote is not None and b.remote.num_fetched_blocks >= 4
    assert b.manager.stats.host.onboarded_blocks >= 4
    assert b.manager.stats.num_reused_tokens >= 16
    assert_exact(b, tokens=False)


def test_corrupt_values_are_misses_and_recomputed() -> None:
    """A store whose values were tampered with serves nothing; B recomputes, exactly."""
    backend: dict[str, bytes] = {}
    a = make_engine(lambda ns: InMemoryRemoteStore(ns, backend))
    run(a, FIRST, "a")
    for key, value in backend.items():
        backend[key] = value[:-1] + bytes([value[-1] ^ 0xFF])
    b = make_engine(lambda ns: InMemoryRemoteStore(ns, backend))
    run(b, SECOND, "b")
    assert b.remote is not None and b.remote.num_fetched_blocks == 0
    assert b.remote.store.stats.num_bad_payloads > 0
    assert_exact(b, tokens=False)


def test_remote_tier_needs_sha256() -> None:
    """Hashes must agree across processes: xxh3 is refused with a sentence."""
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_host_blocks=4))
    layout = ModelConfig().kv_layout(TPB)
    with pytest.raises(ValueError, match="needs hash_algo='sha256'"):
        RemoteTier(InMemoryRemoteStore(RemoteNamespace("m", layout)), manager,
                   KVStorage(layout, 4, "cpu"), KVStorage(layout, 4))


WRITER = textwrap.dedent("""
    import json, sys
    sys.path[:0] = [{tests!r}, {shared!r}]  # this folder; tests/, its shared helpers
    from test_remote_tier import FIRST, make_engine, run
    from kvtier.remote import RedisRemoteStore
    engine = make_engine(lambda ns: RedisRemoteStore({url!r}, ns))
    run(engine, FIRST, "a")
    print(json.dumps({{"written": engine.remote.num_written_blocks,
                      "fetched": engine.remote.num_fetched_blocks}}))
""")


def test_two_processes_share_one_redis(redis_servers: RedisServers) -> None:
    """A separate process computes and writes through one Redis; this one reuses its blocks
    and its logits equal a full recompute."""
    from kvtier.remote import RedisRemoteStore

    here = Path(__file__).parent
    code = WRITER.format(tests=str(here), shared=str(here.parent), url=redis_servers.url)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True, env={"PYTHONPATH": str(SRC),
                                                      "PATH": "/usr/bin:/bin"})
    # Written, or found there already (a server a run before this one wrote to): a prompt
    # writes through only the blocks it computed.
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["written"] + counts["fetched"] >= len(PREFIX) // TPB
    b = make_engine(lambda ns: RedisRemoteStore(redis_servers.url, ns))
    run(b, SECOND, "b")
    assert b.remote is not None and b.remote.num_fetched_blocks >= 4
    assert_exact(b, tokens=False)


def test_store_down_or_losing_values_degrades_to_recompute() -> None:
    """With the store down, or dropping half its values, B serves every request exactly:
    what it can't fetch, it computes; no exception reaches the engine loop."""
    from kvtier.remote import FaultyRemoteStore

    backend: dict[str, bytes] = {}
    a = make_engine(lambda ns: InMemoryRemoteStore(ns, backend))
    run(a, FIRST, "a")
    stores: list[FaultyRemoteStore] = []

    def faulty(ns: RemoteNamespace) -> FaultyRemoteStore:
        stores.append(FaultyRemoteStore(InMemoryRemoteStore(ns, backend), seed=1))
        return stores[-1]

    b = make_engine(faulty)
    stores[0].down = True
    run(b, SECOND[:1], "down")
    assert b.remote is not None and b.remote.num_fetched_blocks == 0
    assert stores[0].stats.num_errors > 0
    stores[0].down = False
    stores[0].miss_rate = 0.5
    run(b, SECOND[1:], "lossy")
    assert_exact(b, tokens=False)


def test_slow_store_past_the_deadline_is_not_waited_for() -> None:
    """A fetch slower than fetch_deadline_s releases its request to compute without it:
    the engine loop never waits longer than the deadline, and stays exact."""
    import time

    from kvtier.remote import FaultyRemoteStore

    backend: dict[str, bytes] = {}
    a = make_engine(lambda ns: InMemoryRemoteStore(ns, backend))
    run(a, FIRST, "a")
    stores: list[FaultyRemoteStore] = []

    def slow(ns: RemoteNamespace) -> FaultyRemoteStore:
        stores.append(FaultyRemoteStore(InMemoryRemoteStore(ns, backend)))
        stores[-1].delay_s = 2.0
        return stores[-1]

    b = make_engine(slow)
    assert b.remote is not None
    b.remote.fetch_deadline_s = 0.05
    b.add_request(Request("b0", SECOND[0], 3))
    t0 = time.monotonic()
    step, _ = b.step()
    # Waited for the deadline, not for the store. NOTE: the bound is 3/4 of the store's delay,
    # not a few deadlines: on a loaded 2-core machine the step itself took 0.56 s once.
    assert time.monotonic() - t0 < 1.5
    assert [c.request_id for c in step.context_chunks] == ["b0"]
    assert step.context_chunks[0].num_reused_tokens == 0
    b.run()
    assert_exact(b, tokens=False)


def test_write_back_spills_blocks_leaving_the_host_and_they_serve_exactly() -> None:
    """Write-back: blocks leaving a 4-block host tier go to the store (read before the plan
    reuses their slots); another engine, and the same one, reuse them exactly."""
    backend: dict[str, bytes] = {}
    prompts = [[(13 * i + k) % 256 for i in range(18)] + [k] for k in range(6)]
    a = make_engine(lambda ns: InMemoryRemoteStore(ns, backend), 14, 4, "write-back")
    run(a, prompts, "a")
    assert a.remote is not None and a.remote.num_written_blocks > 0
    assert a.manager.stats.host.evicted_blocks > 0
    b = make_engine(lambda ns: InMemoryRemoteStore(ns, backend), 14, 4, "write-back")
    run(b, [p[:-1] + [200 + i] for i, p in enumerate(prompts)], "b")
    assert b.remote is not None and b.remote.num_fetched_blocks > 0
    assert_exact(a, tokens=False)
    assert_exact(b, tokens=False)
    with pytest.raises(ValueError, match="write_policy must be"):
        make_engine(lambda ns: InMemoryRemoteStore(ns, backend), 14, 4, "sometimes")  # type: ignore[arg-type]


def test_redis_killed_mid_replay_then_restarted(
    make_redis_server: Callable[[], PrivateRedis],
) -> None:
    """A real Redis killed while an engine serves, then restarted empty: the engine keeps
    serving (misses and errors counted, no exception), every output stays exact, and once
    the server is back its writes and reads work again."""
    from kvtier.remote import RedisRemoteStore

    server = make_redis_server()
    a = make_engine(lambda ns: RedisRemoteStore(server.url, ns, timeout_s=0.2, cooldown_s=0.1))
    run(a, FIRST, "a")
    b = make_engine(lambda ns: RedisRemoteStore(server.url, ns, timeout_s=0.2, cooldown_s=0.1))
    assert b.remote is not None
    run(b, SECOND[:1], "before")
    fetched = b.remote.num_fetched_blocks
    assert fetched > 0
    server.kill()
    run(b, [p[:-1] + [77] for p in FIRST], "down")  # nothing local: the store would serve
    assert b.remote.store.stats.num_errors + b.remote.store.stats.num_short_circuited > 0
    assert b.remote.num_fetched_blocks == fetched
    server.start()
    time.sleep(0.15)  # past the circuit breaker's cool-down
    run(b, SECOND[1:], "after")
    assert_exact(b, tokens=False)


def make_tier(store_layout: object = None, **options: object) -> RemoteTier:
    """A bare remote tier over a fresh manager and storages of the tiny model's layout."""
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=8,
                                         num_host_blocks=4, hash_algo="sha256"))
    layout = ModelConfig().kv_layout(TPB)
    namespace = RemoteNamespace("m", store_layout or layout)  # type: ignore[arg-type]
    return RemoteTier(InMemoryRemoteStore(namespace), manager, KVStorage(layout, 8, "cpu"),
                      KVStorage(layout, 4), **options)  # type: ignore[arg-type]


def test_store_of_another_layout_with_the_same_block_size_is_refused() -> None:
    """A namespace whose blocks have the storages' byte size but another shape, dtype or
    memory layout would write and serve misread KV: refused, naming both layouts."""
    from dataclasses import replace

    layout = ModelConfig().kv_layout(TPB)
    same_size = [
        replace(layout, num_layers=1, num_kv_heads=layout.num_kv_heads * layout.num_layers),
        replace(layout, head_dim=layout.head_dim // 2, num_kv_heads=layout.num_kv_heads * 2),
        replace(layout, dtype="float16", head_dim=layout.head_dim * 2),
        replace(layout, layout="layer_major" if layout.layout == "block_major" else
                "block_major"),
    ]
    for other in same_size:
        assert other != layout and other.bytes_per_block == layout.bytes_per_block
        with pytest.raises(ValueError, match=r"the store's namespace has layout .* the gpu "
                                             r"storage .*: their blocks would be misread"):
            make_tier(other)


@pytest.mark.parametrize("value", [True, float("nan"), float("inf"), -1, 1e300, "1"],
                         ids=repr)
def test_fetch_deadline_is_checked(value: object) -> None:
    """fetch_deadline_s is a finite number in [0, 3600], never a bool."""
    with pytest.raises(ValueError, match=r"^fetch_deadline_s must be a finite number"):
        make_tier(fetch_deadline_s=value)


def test_a_fetch_hashes_the_prompt_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """start_fetch then the import in poll compute the prompt's hash chain once."""
    import kvtier.remote.tier as tier_module
    from kvtier.hashing import prompt_block_hashes

    backend: dict[str, bytes] = {}
    a = make_engine(lambda ns: InMemoryRemoteStore(ns, backend))
    run(a, FIRST, "a")
    b = make_engine(lambda ns: InMemoryRemoteStore(ns, backend))
    assert b.remote is not None
    calls: list[int] = []
    real = prompt_block_hashes  # what kvtier.remote.tier imported

    def counting(*args: Any, **kwargs: Any) -> list[int]:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tier_module, "prompt_block_hashes", counting)
    assert b.remote.start_fetch("r", SECOND[0])
    assert b.remote.flush(5)
    assert b.remote.poll() == ["r"]
    assert len(calls) == 1 and b.remote.num_fetched_blocks >= 4


def spy_on_writes(engine: ModelEngine) -> list[tuple[float, list[int]]]:
    """Record each write-through call of ``engine``'s tier: (perf_counter, block table)."""
    remote = engine.remote
    assert remote is not None
    calls: list[tuple[float, list[int]]] = []
    real = remote.write

    def write(tokens: list[int], block_table: list[int], *args: Any, **kwargs: Any) -> int:
        calls.append((time.perf_counter(), list(block_table)))
        return real(tokens, block_table, *args, **kwargs)

    remote.write = write  # type: ignore[method-assign]
    return calls


def test_write_through_is_off_the_ttft_path() -> None:
    """A computed prompt is written through after its first token is stamped: the copy out
    of the GPU is not part of its TTFT."""
    engine = make_engine(lambda ns: InMemoryRemoteStore(ns))
    calls = spy_on_writes(engine)
    engine.add_request(Request("a", FIRST[0], 3))
    engine.step()
    first_token_s = engine.results["a"].first_token_s
    assert len(calls) == 1 and first_token_s is not None
    assert first_token_s <= calls[0][0]


def test_write_through_reads_the_blocks_before_the_next_plan_reuses_their_slots() -> None:
    """The blocks of a request that finishes in its prefill step are written as computed,
    although the very next step's plan onboards other blocks into every one of its slots.

    6 GPU slots, 6-block prompts (5 full blocks + 1 token), one output token each::

        step   request   GPU slots 0..5                     plan
        1      p: X      X X X X X x                        -
        2      a: Y      Y Y Y Y Y y  (a finishes; written) offload X's full blocks
        3      b: X'     X X X X X b                        onboard X's blocks into a's slots

    a's values in the store equal those of an engine that computed Y with room to spare.
    """
    x = [(5 * i + 1) % 256 for i in range(21)]
    y = [(11 * i + 7) % 256 for i in range(21)]
    backend: dict[str, bytes] = {}
    engine = make_engine(lambda ns: InMemoryRemoteStore(ns, backend), num_gpu_blocks=6,
                         num_host_blocks=12)
    engine.add_request(Request("p", x, 1))
    engine.run()
    calls = spy_on_writes(engine)
    engine.add_request(Request("a", y, 1))
    _, finished = engine.step()
    assert [r.request_id for r in finished] == ["a"] and len(calls) == 1
    a_slots = set(calls[0][1])
    engine.add_request(Request("b", x[:20] + [99], 1))
    step, _ = engine.step()
    onboarded = {op.dst_slot for op in step.transfer_plan.ops if op.kind is OpKind.ONBOARD}
    assert len(onboarded) == 5 and onboarded <= a_slots  # the plan overwrites a's slots
    engine.run()
    reference: dict[str, bytes] = {}
    roomy = make_engine(lambda ns: InMemoryRemoteStore(ns, reference))
    run(roomy, [y], "a")
    assert len(reference) == 5
    assert [key for key, value in reference.items() if backend.get(key) != value] == []


def test_write_through_skips_the_prefix_a_request_reused() -> None:
    """A prompt's blocks are written once, when computed: a second request sharing 22
    tokens with the first (5 full blocks reused from the GPU, 2 tokens of the sixth by a
    partial copy) writes its sixth block alone, and a third with the first's prompt writes
    nothing. Before, every completed prompt wrote all its full blocks again (the shared
    prefix copied out of the GPU and rewritten by every request); LMCache's store and
    vLLM's offloading store skip what they hold."""
    backend: dict[str, bytes] = {}
    engine = make_engine(lambda ns: InMemoryRemoteStore(ns, backend))
    calls = spy_on_writes(engine)
    assert engine.remote is not None
    for rid, prompt in (("a", PREFIX + [11, 12, 13]), ("b", PREFIX + [90, 91, 92, 93]),
                        ("c", PREFIX + [11, 12, 13])):
        engine.add_request(Request(rid, prompt, 3))
        engine.run()
    assert [len(table) for _, table in calls] == [7, 7, 7]  # the tables as computed
    assert engine.remote.num_written_blocks == 6 + 1 + 0
    assert len(backend) == 7
    reused = [engine.results[r].num_reused_tokens for r in "abc"]
    assert reused == [0, 22, 24]
    engine.manager.check_invariants()
    assert_exact(engine, tokens=False)


def test_write_through_writes_a_reused_answer_it_never_wrote() -> None:
    """A conversation's second turn reuses its first answer's blocks (decoded, never
    written through) from the GPU: they are written with the turn's new blocks, so another
    engine fetches the whole second prompt (6 blocks). Writing only the blocks past the
    reused prefix left the answer's 2 blocks out of the store and cut the chain there: the
    other engine fetched 3. The first turn's prompt blocks, which the tier wrote, are not
    written again."""
    backend: dict[str, bytes] = {}
    a = make_engine(lambda ns: InMemoryRemoteStore(ns, backend))
    assert a.remote is not None
    first = PREFIX[:13]  # 3 full blocks and a token
    a.add_request(Request("t1", first, 8))
    a.run()
    answer = a.results["t1"].output
    assert len(answer) == 8 and a.remote.num_written_blocks == 3
    second = first + answer + [61, 62, 63, 64, 65, 66]  # 27 tokens: 6 full blocks
    a.add_request(Request("t2", second, 2))
    a.run()
    assert a.results["t2"].num_reused_tokens == 20  # blocks 0-4: the prompt's and the answer's
    assert a.remote.num_written_blocks == 3 + 3 and len(backend) == 6  # blocks 3, 4 and 5
    b = make_engine(lambda ns: InMemoryRemoteStore(ns, backend))
    assert b.remote is not None
    assert b.remote.fetch(second + a.results["t2"].output + [70]) == 6
    run(b, [second + [71, 72]], "b")
    assert b.results["b0"].num_reused_tokens == 24
    assert_exact(a, tokens=False)
    assert_exact(b, tokens=False)


@pytest.mark.parametrize(("known", "rewritten"), [(1 << 16, 0), (3, 2)])
def test_a_reused_prefix_is_skipped_only_where_the_tier_remembers_it(
        monkeypatch: pytest.MonkeyPatch, known: int, rewritten: int) -> None:
    """The tier remembers the newest ``KNOWN_BLOCKS`` blocks it wrote or fetched: a prompt
    of 5 full blocks written, a write of the same blocks as reused skips all 5, or, with
    room for 3 names, writes the 2 it forgot (the oldest)."""
    import kvtier.remote.tier as tier_module

    monkeypatch.setattr(tier_module, "KNOWN_BLOCKS", known)
    engine = make_engine(lambda ns: InMemoryRemoteStore(ns))
    prompt = PREFIX + [1]  # 23 tokens: 5 full blocks
    run(engine, [prompt], "a")
    assert engine.remote is not None and engine.remote.num_written_blocks == 5
    assert engine.remote.write(prompt, [0, 1, 2, 3, 4], wait=True, reused_blocks=5) == (
        rewritten)
    assert engine.remote.write(prompt, [0, 1, 2, 3, 4], wait=True, reused_blocks=5) == (
        0 if known > 5 else 2)


def test_a_write_the_store_refused_is_not_remembered() -> None:
    """With the store down a write hands it nothing, and the tier does not count those
    blocks as held: once the store is back, a write of them as reused writes them all.
    Before, the refused write was remembered and the reused blocks were never written."""
    from kvtier.remote import FaultyRemoteStore

    backend: dict[str, bytes] = {}
    stores: list[FaultyRemoteStore] = []

    def faulty(ns: RemoteNamespace) -> FaultyRemoteStore:
        stores.append(FaultyRemoteStore(InMemoryRemoteStore(ns, backend)))
        return stores[-1]

    engine = make_engine(faulty)
    assert engine.remote is not None
    prompt = PREFIX + [1]  # 23 tokens: 5 full blocks
    stores[0].down = True
    assert engine.remote.write(prompt, [0, 1, 2, 3, 4], wait=True) == 0
    stores[0].down = False
    assert engine.remote.write(prompt, [0, 1, 2, 3, 4], wait=True, reused_blocks=5) == 5
    assert len(backend) == 5
    assert engine.remote.write(prompt, [0, 1, 2, 3, 4], wait=True, reused_blocks=5) == 0


def test_a_request_that_skips_reading_reports_no_reuse() -> None:
    """A request with ``skip_reading_prefix_cache`` computes its whole prompt although the
    prompt is cached: its result says 0 tokens reused and all 23 computed, and its logits
    are a full recompute's. Before, the engine's promise was the plain lookup's, and the
    result claimed the 20 cached tokens as GPU hits."""
    engine = make_engine(lambda ns: InMemoryRemoteStore(ns))
    prompt = PREFIX + [1]
    run(engine, [prompt], "a")
    engine.add_request(Request("b", prompt, 2, skip_reading_prefix_cache=True))
    engine.run()
    result = engine.results["b"]
    assert (result.num_reused_tokens, result.num_computed_tokens) == (0, 23)
    assert_exact(engine, tokens=False)


def test_an_image_prompt_is_written_and_fetched_under_its_image() -> None:
    """Engine A writes through a prompt whose block 2 holds an image (placeholder tokens 8..11,
    image A): 6 full blocks. Engine B serves the same tokens with image B and fetches only
    the 2 blocks before the image (8 tokens reused); engine C with image A fetches all 6.
    Before, a request carried no items: A wrote its blocks under the tokens' keys, B was
    served A's image's KV for its own image and C's image admission matched nothing A
    wrote."""
    backend: dict[str, bytes] = {}
    prompt = PREFIX + [11, 12, 13]

    def serve(tag: str, image: str) -> ModelEngine:
        engine = make_engine(lambda ns: InMemoryRemoteStore(ns, backend))
        engine.add_request(Request(tag, prompt, 3, mm_items=(MultimodalItem(8, 4, image),)))
        engine.run()
        engine.manager.check_invariants()
        assert_exact(engine, tokens=False)
        return engine

    a = serve("a", "image-a")
    assert a.remote is not None and a.remote.num_written_blocks == 6
    b, c = serve("b", "image-b"), serve("c", "image-a")
    assert b.remote is not None and c.remote is not None
    assert (b.remote.num_fetched_blocks, b.results["b"].num_reused_tokens) == (2, 8)
    assert (c.remote.num_fetched_blocks, c.results["c"].num_reused_tokens) == (6, 24)


@pytest.mark.parametrize("name", ["remote", "manager", "scheduler", "transfer", "kv", "model"])
def test_an_engines_parts_cannot_be_replaced(name: str) -> None:
    """Before, ``engine.remote = other`` was taken: requests held for the old tier's
    fetches stayed held (released only by a poll of the old tier), and the new tier,
    never checked against the engine's storages and manager, was written from them. Every
    part the engine was built from and checked against is now refused, changing nothing;
    the engine still serves exactly."""
    engine = make_engine(lambda ns: InMemoryRemoteStore(ns))
    other = make_engine(lambda ns: InMemoryRemoteStore(ns))
    before = getattr(engine, name)
    with pytest.raises(AttributeError, match=rf"^ModelEngine\.{name} is a part it was built "
                                             r"from and checked against"):
        setattr(engine, name, getattr(other, name))
    with pytest.raises(AttributeError, match=rf"^ModelEngine\.{name} is a part"):
        delattr(engine, name)
    assert getattr(engine, name) is before
    engine.record_logits = True  # other attributes are as usual
    run(engine, FIRST, "a")
    assert_exact(engine, tokens=False)


@pytest.mark.parametrize("name", ["store", "ranks", "gpu", "host", "manager"])
def test_a_remote_tiers_parts_cannot_be_replaced(name: str) -> None:
    tier, other = make_tier(), make_tier()
    before = getattr(tier, name)
    with pytest.raises(AttributeError, match=rf"^RemoteTier\.{name} is a part"):
        setattr(tier, name, getattr(other, name))
    assert getattr(tier, name) is before
    tier.fetch_deadline_s = 0.5  # a setting, not a part
    assert tier.fetch_deadline_s == 0.5


def test_a_restarted_redis_gets_a_reused_prefix_written_again(
    make_redis_server: Callable[[], PrivateRedis],
) -> None:
    """A Redis restarted empty (another run id) lost every block the tier wrote to it:
    the tier forgets them (``STORE_RESET``) and writes a reused prefix again. Before, it
    skipped those 5 blocks as held for as long as it remembered them, so no engine of the
    fleet found them again."""
    from kvtier.remote import RedisRemoteStore

    server = make_redis_server()
    engine = make_engine(lambda ns: RedisRemoteStore(server.url, ns, timeout_s=0.2,
                                                     cooldown_s=0.1))
    remote = engine.remote
    assert remote is not None
    prompt = PREFIX + [1]  # 23 tokens: 5 full blocks
    run(engine, [prompt], "a")
    assert remote.num_written_blocks == 5
    assert remote.write(prompt, [0, 1, 2, 3, 4], wait=True, reused_blocks=5) == 0
    server.kill()
    server.start()  # no persistence: it comes back empty, with a new run id
    time.sleep(0.15)  # past the circuit breaker's cool-down
    # A write of only held blocks reaches no server: the restart is not seen yet.
    assert remote.write(prompt, [0, 1, 2, 3, 4], wait=True, reused_blocks=5) == 0
    assert remote.store.stats.num_resets == 0
    # The next request's new blocks find the server anew (a fault, then its run id).
    run(engine, [[200 + t for t in range(9)]], "b")
    assert remote.store.stats.num_resets == 1
    assert remote.write(prompt, [0, 1, 2, 3, 4], wait=True, reused_blocks=5) == 5
    assert remote.write(prompt, [0, 1, 2, 3, 4], wait=True, reused_blocks=5) == 0
    assert len(remote.store.contains_many(remote.block_hashes(prompt, None, None))) == 5


def test_a_fetch_that_misses_a_known_block_forgets_it() -> None:
    """Blocks the tier wrote but the store no longer holds (evicted by the server, a TTL,
    a flush): a fetch that looks them up and misses them forgets them, and the next write
    of the prompt as a reused prefix writes them again. Before, the tier kept skipping
    them for as long as it remembered them."""
    backend: dict[str, bytes] = {}
    a = make_engine(lambda ns: InMemoryRemoteStore(ns, backend))
    remote = a.remote
    assert remote is not None
    prompt = PREFIX + [1]  # 23 tokens: 5 full blocks
    run(a, [prompt], "a")
    assert remote.num_written_blocks == 5 and len(backend) == 5
    hashes = remote.block_hashes(prompt, None, None)
    keys = [remote.store._key(h) for h in hashes]  # type: ignore[attr-defined]
    del backend[keys[1]], backend[keys[3]]  # the server drops two of them
    a.manager.reset_cache()  # nothing local: a fetch looks all 5 up
    assert remote.fetch(prompt) == 1  # the run found from the first block: block 0
    assert remote.write(prompt, [0, 1, 2, 3, 4], wait=True, reused_blocks=5) == 2
    assert sorted(backend) == sorted(keys)
    assert remote.write(prompt, [0, 1, 2, 3, 4], wait=True, reused_blocks=5) == 0


def test_the_cpu_waits_for_the_last_plans_copies_before_the_tier_touches_host_slots() -> None:
    """The remote tier reads host slots on the CPU (write-back spills) and writes them
    (imports). The last plan's copies were waited for only by the GPU (a forward pass,
    layer by layer) and by the CPU only where it read a result back: after a step whose
    passes all failed, on CUDA, a spill read a block its offload had not finished writing.
    Now a step that follows one that submitted copies synchronizes the transfer engine
    before the tier runs (every such step here), and one that follows a plan without
    copies does not."""
    backend: dict[str, bytes] = {}
    prompts = [[(13 * i + k) % 256 for i in range(18)] + [k] for k in range(6)]
    engine = make_engine(lambda ns: InMemoryRemoteStore(ns, backend), 14, 4, "write-back")
    events: list[str] = []
    sync, fetch, submit = (engine.transfer.synchronize_all, engine._fetch_remote,
                           engine.transfer.submit)

    def logged_submit(plan: Any) -> Any:
        events.append(f"submit {len(plan)}")
        return submit(plan)

    def logged_sync() -> None:
        events.append("sync")
        sync()

    def logged_fetch() -> None:
        events.append("fetch")
        fetch()

    engine.transfer.synchronize_all = logged_sync  # type: ignore[method-assign]
    engine._fetch_remote = logged_fetch  # type: ignore[method-assign]
    engine.transfer.submit = logged_submit  # type: ignore[method-assign]
    run(engine, prompts, "a")
    assert engine.remote is not None and engine.remote.num_written_blocks > 0
    assert_exact(engine, tokens=False)
    fetches = [i for i, e in enumerate(events) if e == "fetch"]
    for i in fetches[1:]:
        last_submit = max(j for j in range(i) if events[j].startswith("submit"))
        copied = events[last_submit] != "submit 0"
        assert (events[i - 1] == "sync") is copied, events[last_submit:i + 1]
    assert any(events[i - 1] == "sync" for i in fetches)


def test_an_empty_prompt_is_refused_naming_the_tier() -> None:
    """The remote tier names a prompt's blocks as the manager does, and refuses an empty
    prompt as the manager and the router do (the router routed one with -1 blocks)."""
    tier = make_tier()
    for call in (lambda: tier.fetch([]), lambda: tier.start_fetch("r", []),
                 lambda: tier.block_hashes([], None, None)):
        with pytest.raises(ValueError, match=r"^remote tier: tokens must not be empty$"):
            call()
    assert tier.num_waiting == 0
