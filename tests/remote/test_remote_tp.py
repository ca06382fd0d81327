"""The remote tier under tensor parallelism, every rank in this process (``LocalRanks``):
each rank's shard is its own value under its rank's namespace, and a block is imported only
when every rank found its shard (the process-per-rank engine is tested end to end in
tests/tp/test_tp_exactness.py)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the remote tier tests move real KV: needs torch")

from remote_helpers import RedisServers  # noqa: E402

from kvtier import CacheConfig, KVCacheManager  # noqa: E402
from kvtier.remote import FaultyRemoteStore, InMemoryRemoteStore, RemoteNamespace  # noqa: E402
from kvtier.remote.ranks import LocalRanks, RemoteShard  # noqa: E402
from kvtier.remote.store import RemoteStore  # noqa: E402
from kvtier.remote.tier import RemoteTier  # noqa: E402
from kvtier.storage import KVLayout, KVStorage  # noqa: E402

TPB = 4
NUM_BLOCKS = 8
WHOLE = KVLayout(num_layers=2, num_kv_heads=4, head_dim=8, tokens_per_block=TPB,
                 dtype="float32")
PROMPT = list(range(1, 5 * TPB + 2))  # 5 reusable full blocks (the last token never is)


def make_namespace(tp_size: int, model_id: str = "m") -> list[RemoteNamespace]:
    """Every rank's namespace of one deployment at ``tp_size``."""
    whole = RemoteNamespace(model_id, WHOLE)
    return [whole] if tp_size == 1 else [whole.for_rank(r, tp_size) for r in range(tp_size)]


def make_ranks(tp_size: int, backend: dict[str, bytes], fill: float | None = None,
               model_id: str = "m", stores: list[RemoteStore] | None = None) -> LocalRanks:
    """``tp_size`` ranks over one shared ``backend``: each rank's GPU shard holds its heads
    of one seeded whole-model pool (or ``fill``), its host shard NaN."""
    gen = torch.Generator().manual_seed(0)
    whole = torch.randn((NUM_BLOCKS, WHOLE.num_layers, 2, TPB, 4, 8), generator=gen)
    shards = []
    for rank, namespace in enumerate(make_namespace(tp_size, model_id)):
        gpu, host = KVStorage(namespace.layout, NUM_BLOCKS), KVStorage(namespace.layout,
                                                                        NUM_BLOCKS)
        heads = namespace.layout.kv_head_slice
        for i in range(WHOLE.num_layers):
            if fill is None:
                gpu.layer(i).copy_(whole[:, i, ..., heads, :])
            else:
                gpu.layer(i).fill_(fill)
        host.fill_(float("nan"))
        store = InMemoryRemoteStore(namespace, backend) if stores is None else stores[rank]
        shards.append(RemoteShard(store, gpu, host))
    return LocalRanks(shards)


def make_tier(ranks: LocalRanks, **options: Any) -> RemoteTier:
    """A tier with a fresh manager over ``ranks``."""
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=NUM_BLOCKS,
                                         num_host_blocks=NUM_BLOCKS, hash_algo="sha256"))
    return RemoteTier(ranks, manager, **options)


def host_blocks(shard: RemoteShard) -> list[bytes]:
    """The bytes of each host slot that was written (not NaN), sorted."""
    return sorted(bytes(shard.host.block(s).numpy().tobytes()) for s in range(NUM_BLOCKS)
                  if not shard.host.block(s).isnan().any())


def gpu_blocks(shard: RemoteShard, num_blocks: int) -> list[bytes]:
    """The bytes of GPU slots ``0..num_blocks-1`` (the writer's block table), sorted."""
    return sorted(bytes(shard.gpu.block(s).numpy().tobytes()) for s in range(num_blocks))


def write_prompt(tp_size: int, backend: dict[str, bytes], model_id: str = "m") -> LocalRanks:
    """Engine A at ``tp_size`` writes PROMPT's 5 blocks from GPU slots 0..4, every rank."""
    ranks = make_ranks(tp_size, backend, model_id=model_id)
    tier = make_tier(ranks)
    assert tier.write(PROMPT[:5 * TPB], list(range(5)), wait=True) == 5
    return ranks


def test_every_rank_writes_its_shard_and_fetches_it_back_into_its_host_slots() -> None:
    """TP 2: two values a block (one a rank, under its own namespace); a fresh engine
    imports the 5 blocks once and every rank's host slots hold its own heads of them."""
    backend: dict[str, bytes] = {}
    a = write_prompt(2, backend)
    assert len(backend) == 2 * 5
    for rank, namespace in enumerate(make_namespace(2)):
        mine = [k for k in backend if k.startswith(f"kvtier:{namespace.fingerprint}:")]
        assert len(mine) == 5, rank
    b = make_ranks(2, backend, fill=0.0)
    tier = make_tier(b)
    assert tier.fetch(PROMPT) == 5
    assert tier.manager.lookup(PROMPT).num_host_tokens == 5 * TPB
    for rank in range(2):
        assert host_blocks(b.shards[rank]) == gpu_blocks(a.shards[rank], 5), rank
        assert b.shards[rank].num_unfilled == 0
    tier.manager.check_invariants()


@pytest.mark.parametrize("lost_rank", [0, 1])
@pytest.mark.parametrize("fault", ["missing", "corrupt"])
def test_a_shard_lost_on_one_rank_is_a_miss_on_every_rank(lost_rank: int, fault: str) -> None:
    """Block 2's shard missing or corrupt on one rank: blocks 0 and 1 are imported on both
    ranks; block 2 (found on the other rank) and every later block on neither::

        block        0   1   2   3   4
        rank r       ok  ok  --  ok  ok
        other rank   ok  ok  ok  ok  ok
        imported     0   1              (both ranks' host slots hold exactly these two)
    """
    backend: dict[str, bytes] = {}
    a = write_prompt(2, backend)
    b = make_ranks(2, backend, fill=0.0)
    tier = make_tier(b)
    key = make_namespace(2)[lost_rank].key(tier.block_hashes(PROMPT, None, None)[2])
    if fault == "missing":
        del backend[key]
    else:
        backend[key] = backend[key][:-1] + bytes([backend[key][-1] ^ 1])
    assert tier.fetch(PROMPT) == 2
    assert tier.manager.lookup(PROMPT).num_host_tokens == 2 * TPB
    for rank in range(2):
        assert host_blocks(b.shards[rank]) == gpu_blocks(a.shards[rank], 2), rank
    stats = [s.store.stats for s in b.shards]
    assert [s.num_bad_payloads for s in stats] == [
        int(fault == "corrupt" and r == lost_rank) for r in range(2)]
    assert stats[lost_rank].num_hits == 4 and stats[1 - lost_rank].num_hits == 5


def test_tp2_never_reads_the_values_of_tp4_or_of_one_device() -> None:
    """TP 4 and TP 1 deployments of the same model write to the same store: their keys are
    disjoint from TP 2's, and a TP-2 engine finds none of their blocks."""
    backend: dict[str, bytes] = {}
    write_prompt(4, backend)
    write_prompt(1, backend)
    assert len(backend) == 4 * 5 + 5
    b = make_ranks(2, backend)
    tier = make_tier(b)
    assert tier.fetch(PROMPT) == 0
    assert [s.store.stats.num_hits for s in b.shards] == [0, 0]
    assert [s.store.stats.num_bad_payloads for s in b.shards] == [0, 0]
    write_prompt(2, backend)
    assert len(backend) == 4 * 5 + 5 + 2 * 5  # nothing overwritten


def test_a_rank_whose_store_is_down_makes_the_async_fetch_a_miss() -> None:
    """start_fetch / poll at TP 2 with rank 1's store down: the fetch completes on both
    ranks, imports nothing, releases the request, and leaves no payload behind."""
    backend: dict[str, bytes] = {}
    write_prompt(2, backend)
    namespaces = make_namespace(2)
    down = FaultyRemoteStore(InMemoryRemoteStore(namespaces[1], backend))
    down.down = True
    b = make_ranks(2, backend, stores=[InMemoryRemoteStore(namespaces[0], backend), down])
    tier = make_tier(b)
    assert tier.start_fetch("r", PROMPT)
    assert tier.num_waiting == 1
    tier.wait(5.0)
    assert tier.poll() == ["r"]
    assert tier.num_fetched_blocks == 0 and tier.num_waiting == 0
    assert [s.num_unfilled for s in b.shards] == [0, 0]
    assert b.shards[0].store.stats.num_hits == 5 and down.stats.num_errors == 1


def test_tp2_over_redis(redis_servers: RedisServers) -> None:
    """The same at TP 2 through one real Redis: 10 values written, 5 blocks imported."""
    from kvtier.remote import RedisRemoteStore

    model_id = f"tp-{uuid.uuid4().hex}"
    namespaces = make_namespace(2, model_id)

    def redis_ranks(fill: float | None) -> LocalRanks:
        stores: list[RemoteStore] = [RedisRemoteStore(redis_servers.url, ns)
                                     for ns in namespaces]
        return make_ranks(2, {}, fill=fill, model_id=model_id, stores=stores)

    a = redis_ranks(None)
    assert make_tier(a).write(PROMPT[:5 * TPB], list(range(5)), wait=True) == 5
    b = redis_ranks(0.0)
    tier = make_tier(b)
    assert tier.fetch(PROMPT) == 5
    for rank in range(2):
        assert host_blocks(b.shards[rank]) == gpu_blocks(a.shards[rank], 5), rank
    for ranks in (a, b):
        for shard in ranks.shards:
            shard.store.close()


def test_ranks_must_be_one_deployment_in_rank_order() -> None:
    """Shards out of order, of another model, another TP size or another pool size, and
    storages passed twice, are refused with the rank and the namespace named."""
    backend: dict[str, bytes] = {}
    shards = make_ranks(2, backend).shards
    with pytest.raises(ValueError, match="rank 0's store has namespace"):
        LocalRanks(shards[::-1])
    other = make_ranks(2, backend, model_id="other").shards
    with pytest.raises(ValueError, match="rank 1's store has namespace"):
        LocalRanks([shards[0], other[1]])
    with pytest.raises(ValueError, match="2 ranks' stores, but the first store's namespace "
                                         "is rank 0 of 4"):
        LocalRanks(make_ranks(4, backend).shards[:2])
    small = RemoteShard(shards[1].store, KVStorage(shards[1].gpu.layout, 2),
                        KVStorage(shards[1].host.layout, 2))
    with pytest.raises(ValueError, match="pools of the same size"):
        LocalRanks([shards[0], small])
    with pytest.raises(ValueError, match="layout"):
        RemoteShard(shards[0].store, shards[1].gpu, shards[0].host)
    ranks = LocalRanks(shards)
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_host_blocks=NUM_BLOCKS,
                                         hash_algo="sha256"))
    with pytest.raises(ValueError, match="leave gpu and host out"):
        RemoteTier(ranks, manager, shards[0].gpu, shards[0].host)
    with pytest.raises(ValueError, match="needs the gpu and host storages"):
        RemoteTier(shards[0].store, manager)
