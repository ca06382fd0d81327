"""LMCache's own cache-engine tests (chunked storage and prefix lookup), mirrored against
kvtier's remote tier.

Each test names the test it mirrors (LMCache/LMCache, ``tests/test_cache_engine.py``).
LMCache's ``store(tokens, kv)`` is an engine computing a prompt and ``RemoteTier.write``-ing
its blocks; ``retrieve(tokens)`` is another engine's ``RemoteTier.fetch``, which imports the
blocks into its host tier (an LMCache chunk is a kvtier block, keyed by the prompt's chained
hash). The KV bytes are checked exactly: every block is filled with a value of its own.
Two differences by design run through them: kvtier stores full blocks only (LMCache also a
prompt's last partial chunk), and never fetches the block that ends with the prompt's last
token (its logits are computed anyway: ``lookup`` would not reuse it).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the remote tier moves real KV: needs torch")

from kvtier import CacheConfig, KVCacheManager, SequenceSpec, Tier  # noqa: E402
from kvtier.remote import InMemoryRemoteStore, RemoteNamespace  # noqa: E402
from kvtier.remote.tier import RemoteTier  # noqa: E402
from kvtier.storage import KVLayout, KVStorage  # noqa: E402

TPB = 4
LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, tokens_per_block=TPB,
                  dtype="float32")
PROMPT = [(7 * i + 3) % 251 for i in range(41)]  # 10 full blocks and 1 token
NEW = [500 + i for i in range(30)]  # 7 full blocks and 2 tokens


class Engine:
    """One engine's manager, GPU and host storages (poisoned with NaN) and remote tier."""

    def __init__(self, backend: dict[str, bytes]) -> None:
        self.manager = KVCacheManager(CacheConfig(
            tokens_per_block=TPB, num_gpu_blocks=32, num_host_blocks=32, hash_algo="sha256",
            enable_partial_reuse=False, eviction_policy="priority-lru"))
        self.gpu = KVStorage(LAYOUT, 32)
        self.host = KVStorage(LAYOUT, 32)
        self.gpu.fill_(float("nan"))
        self.host.fill_(float("nan"))
        store = InMemoryRemoteStore(RemoteNamespace("lmcache-mirror", LAYOUT), backend)
        self.tier = RemoteTier(store, self.manager, self.gpu, self.host)

    def store(self, rid: str, tokens: list[int], first_block: int = 0,
              skip_reused: bool = False, wait: bool = True) -> int:
        """Compute ``tokens`` (each block's KV is its first token id; blocks reused from
        the local tiers keep theirs) and write its blocks from ``first_block`` on (with
        ``skip_reused``, naming the reused prefix to the tier); returns how many were
        handed to the store."""
        adm = self.manager.add_sequence(SequenceSpec(rid, tokens))
        assert adm.admitted
        for i, slot in enumerate(adm.block_ids):
            if i * TPB >= adm.num_reused_tokens:
                for layer in range(LAYOUT.num_layers):
                    self.gpu.layer(layer)[slot].fill_(float(tokens[i * TPB]))
        reused = adm.num_reused_tokens // TPB if skip_reused else 0
        written = self.tier.write(tokens, list(adm.block_ids), wait=wait,
                                  first_block=first_block, reused_blocks=reused)
        self.manager.remove_sequence(rid)
        return written

    def retrieve(self, tokens: list[int]) -> int:
        """Fetch ``tokens``' blocks into the host tier; check their bytes; return how many
        tokens they hold."""
        num_blocks = self.tier.fetch(tokens)
        m = self.manager.lookup(tokens)
        assert (m.num_tokens, m.num_host_tokens) == (num_blocks * TPB, num_blocks * TPB)
        host = {b.tokens: b.slot for b in self.manager.cached_blocks() if b.tier is Tier.HOST}
        for i in range(num_blocks):
            block = tuple(tokens[i * TPB:(i + 1) * TPB])
            assert bool((self.host.block(host[block]) == float(block[0])).all()), i
        self.manager.check_invariants()
        return num_blocks * TPB


def test_a_stored_prompt_is_retrieved_by_another_engine() -> None:
    """Mirrors tests/test_cache_engine.py::test_same_retrieve_store: an empty store
    retrieves nothing; after one engine stores a prompt another retrieves it with its exact
    KV. Differs by design: it retrieves 40 of the 41 tokens, the 10 full blocks (LMCache:
    all 41, its partial chunk too)."""
    backend: dict[str, bytes] = {}
    assert Engine(backend).retrieve(PROMPT) == 0
    assert Engine(backend).store("a", PROMPT) == 10 and len(backend) == 10
    assert Engine(backend).retrieve(PROMPT) == 40


def test_a_longer_prompt_retrieves_the_stored_prefix_s_full_blocks() -> None:
    """Mirrors tests/test_cache_engine.py::test_retrieve_prefix: after storing a prompt,
    the prompt followed by new tokens retrieves the stored full blocks, ``num_tokens //
    chunk_size * chunk_size`` tokens (40 of 41)."""
    backend: dict[str, bytes] = {}
    Engine(backend).store("a", PROMPT)
    assert Engine(backend).retrieve(PROMPT + NEW) == len(PROMPT) // TPB * TPB


def test_chunks_are_chained_a_suffix_stored_alone_is_not_found_after_a_prefix() -> None:
    """Mirrors tests/test_cache_engine.py::test_mixed_retrieve: with the prompt and the new
    tokens stored separately, the two together retrieve the prompt's full blocks only (the
    new tokens' blocks are keyed by their own prefix); the new tokens alone retrieve theirs
    (28 of 30: kvtier's last-token rule); after storing the concatenation, it is retrieved
    whole but for its last, partial block (68 of 71)."""
    backend: dict[str, bytes] = {}
    Engine(backend).store("a", PROMPT)
    Engine(backend).store("n", NEW)
    assert Engine(backend).retrieve(PROMPT + NEW) == 40
    assert Engine(backend).retrieve(NEW) == 28
    assert Engine(backend).store("an", PROMPT + NEW) == 17  # every full block, again
    assert Engine(backend).retrieve(PROMPT + NEW) == 68


def test_lookup_counts_the_contiguous_prefix_of_stored_chunks() -> None:
    """Mirrors tests/test_cache_engine.py::test_lookup: the stored prompt's chunks are all
    found, a prefix of it finds its own, and the prompt with new tokens finds the stored
    ones, as a contiguous prefix; a chunk missing from the store (evicted there) stops the
    retrieval at the chunk before it."""
    backend: dict[str, bytes] = {}
    engine = Engine(backend)
    engine.store("a", PROMPT)
    store = engine.tier.store

    def found(tokens: list[int]) -> int:
        hashes = engine.tier.block_hashes(tokens, None, None)
        present = store.contains_many(hashes)
        return next((i for i, h in enumerate(hashes) if h not in present), len(hashes))

    assert found(PROMPT) == 10
    assert found(PROMPT[:20]) == 5
    assert found(PROMPT + NEW) == 10
    fourth = engine.tier.block_hashes(PROMPT, None, None)[3]
    (key,) = [k for k in backend if k.endswith(f"{fourth:032x}")]
    del backend[key]
    assert found(PROMPT) == 3
    assert Engine(backend).retrieve(PROMPT) == 12


def test_a_store_past_a_stored_prefix_writes_only_the_new_chunks() -> None:
    """Mirrors tests/test_cache_engine.py::test_store_kv_tensors_mask: after a prefix of 20
    tokens (5 blocks) is stored, storing the whole prompt with the stored prefix masked out
    (``first_block=5``) writes the 5 new full blocks only, leaves the prefix's values as
    they were, and the whole is retrieved, its prefix included; without the mask (block
    0 on) all 10 are written again."""
    backend: dict[str, bytes] = {}
    assert Engine(backend).store("a", PROMPT[:20]) == 5
    before = dict(backend)
    assert Engine(backend).store("b", PROMPT, first_block=5) == 5
    assert len(backend) == 10 and all(backend[k] == v for k, v in before.items())
    assert Engine(backend).retrieve(PROMPT) == 40
    assert Engine(backend).store("c", PROMPT) == 10


def test_a_store_that_skips_existing_chunks_writes_only_the_new_ones() -> None:
    """Mirrors tests/test_cache_engine.py::test_skipping (two engines store a prompt, then
    the prompt with new tokens, one with ``skip_existing=True``): the engine that stored
    the prompt and skips its reused prefix writes the 7 new full blocks only; the engine
    that does not skip writes all 17. Differs by design: kvtier skips what its tier wrote
    or fetched lately, not what the store holds (LMCache asks the store), so an engine
    that reused the prefix from its own cache without writing or fetching it writes all
    17 even when it skips."""
    backend: dict[str, bytes] = {}
    first, second = Engine(backend), Engine(backend)
    assert first.store("a", PROMPT) == 10 and second.store("a", PROMPT) == 10
    assert first.store("aa", PROMPT + NEW, skip_reused=True) == 7
    assert second.store("aa", PROMPT + NEW) == 17
    third = Engine(backend)
    third.manager.add_sequence(SequenceSpec("local", PROMPT))  # computed, never written
    third.manager.remove_sequence("local")
    assert third.store("aa", PROMPT + NEW, skip_reused=True) == 17  # all 17 are stored
    assert len(backend) == 17


def test_a_store_of_another_chunk_size_is_refused() -> None:
    """Mirrors tests/test_cache_engine.py::test_builder (an engine config of another
    chunk size for the same instance raises ValueError): a tier over a store of 8-token
    blocks refuses storages of 4-token blocks, naming both layouts."""
    layout8 = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, tokens_per_block=8,
                       dtype="float32")
    engine = Engine({})
    store = InMemoryRemoteStore(RemoteNamespace("lmcache-mirror", layout8), {})
    with pytest.raises(ValueError, match=r"tokens_per_block=8, .* tokens_per_block=4, .*misread"):
        RemoteTier(store, engine.manager, engine.gpu, engine.host)


def test_the_local_tiers_prefix_is_not_fetched_again() -> None:
    """Mirrors LMCache's hybrid backend (tests/data/test_creation_from_file/hybrid.yaml: a
    local cache in front of the remote one; a retrieve takes what the local cache holds and
    reads only the rest remotely): an engine holding the first 5 blocks on its GPU fetches
    the other 5 from the store, and then holds all 10."""
    backend: dict[str, bytes] = {}
    Engine(backend).store("a", PROMPT)
    engine = Engine(backend)
    engine.store("half", PROMPT[:21])  # 5 full blocks computed locally
    assert engine.tier.fetch(PROMPT) == 5 and engine.tier.num_fetched_blocks == 5
    m = engine.manager.lookup(PROMPT)
    assert (m.num_tokens, m.num_gpu_tokens, m.num_host_tokens) == (40, 20, 20)


def test_a_nonblocking_store_lands_once_flushed() -> None:
    """Mirrors tests/test_backends.py::test_nonblocking_put (a put that does not wait is
    found after the engine's pending writes are done): a write without ``wait`` hands 10
    blocks to the store's I/O thread; after ``flush`` all 10 are there and another engine
    retrieves them."""
    backend: dict[str, bytes] = {}
    engine = Engine(backend)
    assert engine.store("a", PROMPT, wait=False) == 10
    assert engine.tier.flush(5.0) and len(backend) == 10
    assert Engine(backend).retrieve(PROMPT) == 40
