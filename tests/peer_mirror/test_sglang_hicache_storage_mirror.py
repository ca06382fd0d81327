"""SGLang's HiCache storage tests (an L3 store behind the device and host tiers), mirrored
against kvtier's remote tier: the write policies, the prefetch policies, and what a second
engine gets from the store.

Each test names the SGLang test it mirrors (sgl-project/sglang, ``test/srt/hicache/
test_hicache_storage.py`` and its variants, which run a server with
``--hicache-write-policy`` and ``--hicache-storage-prefetch-policy``, send a prompt, flush
the device and host caches and send it again, expecting the tokens back from storage).
SGLang's L3 storage is kvtier's ``RemoteTier`` over a shared store; an "instance" is an
``Engine`` below (a manager, NaN-poisoned GPU and host storages, a transfer engine, the
tier). Every block's KV is filled with its first token id, so what is served is checked
exactly. The mapping of the policies: SGLang's ``write_through`` backs a computed block up
at once (kvtier: ``write-through``, at the end of the step that computed it);
``write_back`` writes a block to the next tier only as it is evicted (kvtier: a GPU block
goes to the host when evicted, a host block to the store when it leaves the host,
``write-back``); the prefetch policies ``wait_complete`` and ``best_effort`` / ``timeout``
are ``RemoteTier.wait`` then ``poll``, and ``poll`` past ``fetch_deadline_s``. SGLang's
``write_through_selective`` (back a block up on its second hit) has no counterpart.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the remote tier moves real KV: needs torch")

from kvtier import CacheConfig, KVCacheManager, SequenceSpec, Tier  # noqa: E402
from kvtier.remote import InMemoryRemoteStore, RemoteNamespace  # noqa: E402
from kvtier.remote.store import FaultyRemoteStore, RemoteStoreBase  # noqa: E402
from kvtier.remote.tier import RemoteTier, WritePolicy  # noqa: E402
from kvtier.storage import KVLayout, KVStorage  # noqa: E402
from kvtier.transfer.torch_engine import TorchTransferEngine  # noqa: E402

TPB = 4
LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, tokens_per_block=TPB,
                  dtype="float32")
PROMPT = list(range(13))  # 3 full blocks and a token


class Engine:
    """One serving instance: its manager, storages, transfer engine and remote tier."""

    def __init__(self, backend: dict[str, bytes], policy: WritePolicy = "write-through",
                 num_gpu_blocks: int = 8, num_host_blocks: int = 4,
                 fetch_deadline_s: float = 1.0, delay_s: float = 0.0) -> None:
        self.manager = KVCacheManager(CacheConfig(
            tokens_per_block=TPB, num_gpu_blocks=num_gpu_blocks,
            num_host_blocks=num_host_blocks, hash_algo="sha256", enable_partial_reuse=False,
            eviction_policy="priority-lru"))
        self.gpu = KVStorage(LAYOUT, num_gpu_blocks)
        self.host = KVStorage(LAYOUT, num_host_blocks)
        self.gpu.fill_(float("nan"))
        self.host.fill_(float("nan"))
        store: RemoteStoreBase = InMemoryRemoteStore(RemoteNamespace("hicache", LAYOUT),
                                                     backend)
        if delay_s:
            faulty = FaultyRemoteStore(store)
            faulty.delay_s = delay_s
            store = faulty
        self.tier = RemoteTier(store, self.manager, self.gpu, self.host,
                               fetch_deadline_s=fetch_deadline_s, write_policy=policy)
        self.copies = TorchTransferEngine(self.gpu, self.host)

    def serve(self, rid: str, tokens: list[int]) -> tuple[int, int]:
        """Admit ``tokens``, run the plan, compute the blocks not reused (each block's KV
        its first token id), write through if so configured, release; check that every
        block of the table holds its KV. Returns (reused, onboarded) tokens."""
        adm = self.manager.add_sequence(SequenceSpec(rid, tokens))
        assert adm.admitted
        if self.tier.write_policy == "write-back":
            self.tier.write_spilled()  # before the plan may reuse the spilled slots
        self.copies.synchronize(self.copies.submit(self.manager.take_plan()))
        for i, slot in enumerate(adm.block_ids):
            if i * TPB >= adm.num_reused_tokens:
                for layer in range(LAYOUT.num_layers):
                    self.gpu.layer(layer)[slot].fill_(float(tokens[i * TPB]))
            assert bool((self.gpu.block(slot) == float(tokens[i * TPB])).all()), (rid, i)
        if self.tier.write_policy == "write-through":
            self.tier.write(tokens, list(adm.block_ids), wait=True,
                            reused_blocks=adm.num_reused_tokens // TPB)
        self.manager.remove_sequence(rid)
        self.manager.check_invariants()
        return adm.num_reused_tokens, adm.num_onboarded_tokens

    def host_tokens(self, tokens: list[int]) -> int:
        """The prompt tokens a lookup finds on the host tier."""
        return self.manager.lookup(tokens).num_host_tokens


def test_write_through_backs_every_computed_block_up_for_another_instance() -> None:
    """Mirrors test_hicache_storage.py's write-through run (a prompt served once is found
    in storage after the instance's caches are flushed): the 3 full blocks are in the store
    as soon as their step ends; a fresh instance imports all 3 into its host tier and its
    admission reuses and onboards 12 tokens with their exact KV."""
    backend: dict[str, bytes] = {}
    a = Engine(backend)
    assert a.serve("a", PROMPT) == (0, 0)
    assert len(backend) == 3 and a.tier.num_written_blocks == 3
    b = Engine(backend)
    assert b.tier.fetch(PROMPT) == 3 and b.host_tokens(PROMPT) == 12
    assert b.serve("b", PROMPT) == (12, 12)


def test_write_back_writes_a_block_only_when_it_leaves_the_host() -> None:
    """Mirrors test_hicache_storage.py's write_back variant (a block reaches the next tier
    only when evicted from its own): 4 GPU and 2 host blocks. Serving p writes nothing;
    q evicts p's blocks from the GPU, its head and middle to the host (the tail is dropped:
    no host slot was free when it went) and still nothing reaches the store; r pushes q's
    blocks to the host, so p's two host blocks leave it and are written. Another instance
    then fetches those 2 blocks (8 tokens): the tail was never backed up."""
    backend: dict[str, bytes] = {}
    a = Engine(backend, "write-back", num_gpu_blocks=4, num_host_blocks=2)
    a.serve("p", PROMPT)
    assert len(backend) == 0
    a.serve("q", list(range(100, 113)))
    assert len(backend) == 0
    assert sorted((b.tokens[0], b.tier) for b in a.manager.cached_blocks()) == [
        (0, Tier.HOST), (4, Tier.HOST), (100, Tier.GPU), (104, Tier.GPU), (108, Tier.GPU)]
    a.serve("r", list(range(200, 213)))
    assert a.tier.flush(5.0) and len(backend) == 2 and a.tier.num_written_blocks == 2
    b = Engine(backend, "write-back")
    assert b.tier.fetch([*PROMPT, 0]) == 2 and b.host_tokens([*PROMPT, 0]) == 8
    assert b.serve("b", [*PROMPT, 0]) == (8, 8)


def test_write_through_writes_each_block_once() -> None:
    """Mirrors test_hicache_storage.py's repeated requests under write-through (a prefix
    already backed up is not backed up again): serving the prompt extended by 8 tokens
    reuses its 3 blocks from the GPU and writes only the 2 new full blocks."""
    backend: dict[str, bytes] = {}
    a = Engine(backend)
    a.serve("a", PROMPT)
    assert a.serve("longer", [*PROMPT, *range(13, 21)]) == (12, 0)
    assert a.tier.num_written_blocks == 5 and len(backend) == 5


def test_wait_complete_prefetch_imports_the_whole_stored_prefix_before_admission() -> None:
    """Mirrors test_hicache_storage.py's ``wait_complete`` prefetch policy (a request waits
    until its prefetch from storage is done): the fetch started for the waiting request is
    done after ``wait``; ``poll`` releases it with its 3 blocks on the host, and its
    admission onboards all 12 tokens."""
    backend: dict[str, bytes] = {}
    Engine(backend).serve("a", PROMPT)
    b = Engine(backend)
    assert b.tier.start_fetch("b", PROMPT) and b.tier.num_waiting == 1
    b.tier.wait(5.0)
    assert b.tier.poll() == ["b"] and b.tier.num_waiting == 0
    assert b.host_tokens(PROMPT) == 12
    assert b.serve("b", PROMPT) == (12, 12)


def test_a_timed_out_prefetch_lets_the_request_go_and_lands_for_the_next() -> None:
    """Mirrors test_hicache_storage.py's ``timeout`` / ``best_effort`` prefetch policies (a
    request does not wait past the prefetch timeout; what arrives later is still cached):
    with a store that answers in 0.2 s and a deadline of 0, the first ``poll`` releases the
    request at once with nothing imported, so it computes its prompt. When the late
    answer lands, a later ``poll`` imports only what the tiers lack: nothing (the request's
    own blocks are cached by then). An instance that serves nothing meanwhile gets all 3
    from the late answer."""
    backend: dict[str, bytes] = {}
    Engine(backend).serve("a", PROMPT)
    b = Engine(backend, fetch_deadline_s=0.0, delay_s=0.2)
    assert b.tier.start_fetch("b", PROMPT)
    assert b.tier.poll() == ["b"] and b.host_tokens(PROMPT) == 0
    assert b.serve("b", PROMPT) == (0, 0)
    assert b.tier.flush(5.0)
    assert b.tier.poll() == [] and b.tier.num_fetched_blocks == 0
    c = Engine(backend, fetch_deadline_s=0.0, delay_s=0.2)
    assert c.tier.start_fetch("c", PROMPT) and c.tier.poll() == ["c"]
    assert c.tier.flush(5.0) and c.tier.poll() == []
    assert c.tier.num_fetched_blocks == 3 and c.host_tokens(PROMPT) == 12
