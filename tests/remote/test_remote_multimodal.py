"""Multimodal prompts across engines: the remote tier, the importer and the router name a
block holding part of an image by the image's hash too, as admission does.

Before, ``RemoteTier.write``/``fetch``, ``KVCacheManager.import_blocks`` and
``missing_block_hashes`` and ``Router.route`` knew the prompt's tokens only. An image
prompt written through was stored under its placeholder tokens' hashes: any prompt of the
same token ids without that image (a text prompt, where the placeholder id is an ordinary
token) would be served its KV. A fetch imported blocks under text keys that admission of
the image prompt never matches (a wasted fetch and wasted host room: no remote reuse for
image prompts at all), and the router, whose index holds the cache's own (image-keyed)
hashes, predicted no hit for them.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

torch = pytest.importorskip("torch", reason="the remote tier moves real KV: needs torch")

from kvtier import CacheConfig, KVCacheManager, MultimodalItem, SequenceSpec, Tier  # noqa: E402
from kvtier.events import BlockStored, Event  # noqa: E402
from kvtier.remote import InMemoryRemoteStore, RemoteNamespace  # noqa: E402
from kvtier.remote.tier import RemoteTier  # noqa: E402
from kvtier.router import CacheAware, InstanceLoad, Router  # noqa: E402
from kvtier.storage import KVLayout, KVStorage  # noqa: E402

TPB = 4
LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, tokens_per_block=TPB,
                  dtype="float32")
IMAGE_PAD = 9  # the placeholder token an image's positions hold
# 2 text blocks, an image over blocks 2..4 (tokens 8..19), 2 text blocks, and a last token.
PROMPT = [1, 2, 3, 4, 5, 6, 7, 8] + [IMAGE_PAD] * 12 + [30, 31, 32, 33, 34, 35, 36, 37, 38]
CAT = (MultimodalItem(8, 12, "sha256:cat"),)
DOG = (MultimodalItem(8, 12, "sha256:dog"),)
NUM_FULL = len(PROMPT) // TPB  # 7 full blocks, all reusable (the last token is past them)


class Engine:
    """One engine's manager (events on), NaN-poisoned GPU and host storages and remote
    tier over the shared ``backend``."""

    def __init__(self, backend: dict[str, bytes]) -> None:
        self.manager = KVCacheManager(CacheConfig(
            tokens_per_block=TPB, num_gpu_blocks=32, num_host_blocks=32, hash_algo="sha256",
            enable_events=True))
        self.gpu = KVStorage(LAYOUT, 32)
        self.host = KVStorage(LAYOUT, 32)
        self.gpu.fill_(float("nan"))
        self.host.fill_(float("nan"))
        store = InMemoryRemoteStore(RemoteNamespace("mm", LAYOUT), backend)
        self.tier = RemoteTier(store, self.manager, self.gpu, self.host)

    def compute_and_write(self, rid: str, items: tuple[MultimodalItem, ...],
                          value: float) -> list[int]:
        """Admit the prompt with ``items``, fill each block's KV with ``value + block``,
        write it through and release it; returns the stored blocks' hashes (events)."""
        adm = self.manager.add_sequence(SequenceSpec(rid, PROMPT, mm_items=items))
        assert adm.admitted and adm.num_reused_tokens == 0
        for i, slot in enumerate(adm.block_ids):
            for layer in range(LAYOUT.num_layers):
                self.gpu.layer(layer)[slot].fill_(value + i)
        assert self.tier.write(PROMPT, list(adm.block_ids), wait=True, mm_items=items) == 7
        self.manager.remove_sequence(rid)
        return [e.block_hash for e in self.manager.drain_events()
                if isinstance(e, BlockStored)]

    def host_values(self, items: tuple[MultimodalItem, ...]) -> list[float]:
        """The first value of each host block the prompt with ``items`` would reuse."""
        m = self.manager.lookup(PROMPT, mm_items=items)
        assert m.num_tokens == m.num_host_tokens
        by_hash = {b.block_hash: b.slot for b in self.manager.cached_blocks()
                   if b.tier is Tier.HOST}
        hashes = self.tier.block_hashes(PROMPT, None, None, items)[:m.num_tokens // TPB]
        return [float(self.host.block(by_hash[h]).flatten()[0]) for h in hashes]


def test_written_hashes_are_the_ones_admission_stored() -> None:
    """The remote tier names an image prompt's blocks as the cache did (its events): the
    text blocks before the image alike for every image, the image's and all after it not."""
    engine = Engine({})
    stored = engine.compute_and_write("a", CAT, 100.0)
    assert engine.tier.block_hashes(PROMPT, None, None, CAT) == stored and len(stored) == 7
    dog = engine.tier.block_hashes(PROMPT, None, None, DOG)
    text = engine.tier.block_hashes(PROMPT, None, None)
    assert dog[:2] == stored[:2] == text[:2]
    assert all(d != s and t != s for d, s, t in zip(dog[2:], stored[2:], text[2:], strict=True))


def test_another_image_behind_the_same_placeholders_is_not_served() -> None:
    """An engine fetching the prompt with another image gets only the 2 text blocks before
    it; with no image named, the same; with the image written, all 7 blocks with their
    exact KV. Before, a fetch with the dog image imported the cat's 7 blocks."""
    backend: dict[str, bytes] = {}
    Engine(backend).compute_and_write("a", CAT, 100.0)
    dog = Engine(backend)
    assert dog.tier.fetch(PROMPT, mm_items=DOG) == 2
    assert dog.host_values(DOG) == [100.0, 101.0]
    assert dog.manager.lookup(PROMPT, mm_items=CAT).num_tokens == 2 * TPB
    dog.manager.check_invariants()
    text = Engine(backend)
    assert text.tier.fetch(PROMPT) == 2
    cat = Engine(backend)
    assert cat.tier.fetch(PROMPT, mm_items=CAT) == NUM_FULL
    assert cat.host_values(CAT) == [100.0 + i for i in range(NUM_FULL)]
    assert cat.manager.lookup(PROMPT, mm_items=CAT).num_tokens == NUM_FULL * TPB
    cat.manager.check_invariants()


def test_start_fetch_and_poll_carry_the_items() -> None:
    """The asynchronous fetch imports under the same keys as the blocking one."""
    backend: dict[str, bytes] = {}
    Engine(backend).compute_and_write("a", CAT, 7.0)
    engine = Engine(backend)
    assert engine.tier.start_fetch("r", PROMPT, mm_items=CAT)
    assert engine.tier.flush(5)
    assert engine.tier.poll() == ["r"]
    assert engine.host_values(CAT) == [7.0 + i for i in range(NUM_FULL)]
    assert engine.manager.lookup(PROMPT, mm_items=DOG).num_tokens == 2 * TPB


def test_missing_hashes_and_import_blocks_key_the_image() -> None:
    """``missing_block_hashes`` lists the image's own names; ``import_blocks`` caches the
    blocks under them: a lookup with that image hits them, one with another does not."""
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=8,
                                         num_host_blocks=8, hash_algo="sha256"))
    tier_hashes = Engine({}).tier.block_hashes(PROMPT, None, None, CAT)
    assert manager.missing_block_hashes(PROMPT, mm_items=CAT) == tier_hashes
    slots = manager.import_blocks(PROMPT, NUM_FULL, mm_items=CAT)
    assert slots == [0, 1, 2, 3, 4, 5, 6]
    assert manager.lookup(PROMPT, mm_items=CAT).num_host_tokens == NUM_FULL * TPB
    assert manager.lookup(PROMPT, mm_items=DOG).num_host_tokens == 2 * TPB
    assert manager.missing_block_hashes(PROMPT, mm_items=CAT) == []
    assert manager.missing_block_hashes(PROMPT, mm_items=DOG) == (
        Engine({}).tier.block_hashes(PROMPT, None, None, DOG)[2:])
    manager.check_invariants()


@pytest.mark.parametrize("call", ["write", "fetch", "start_fetch", "import", "missing",
                                  "route"])
def test_items_past_the_prompt_are_refused_changing_nothing(call: str) -> None:
    """An item reaching past the prompt is refused as admission refuses it (ValueError
    naming mm_items), nothing written, imported or counted."""
    backend: dict[str, bytes] = {}
    engine = Engine(backend)
    router = Router(CacheAware(), TPB, hash_algo="sha256")
    bad = (MultimodalItem(20, 12, "sha256:cat"),)
    calls: dict[str, Callable[[], object]] = {
        "write": lambda: engine.tier.write(PROMPT, list(range(7)), wait=True, mm_items=bad),
        "fetch": lambda: engine.tier.fetch(PROMPT, mm_items=bad),
        "start_fetch": lambda: engine.tier.start_fetch("r", PROMPT, mm_items=bad),
        "import": lambda: engine.manager.import_blocks(PROMPT, 6, mm_items=bad),
        "missing": lambda: engine.manager.missing_block_hashes(PROMPT, mm_items=bad),
        "route": lambda: router.route(PROMPT, [InstanceLoad("i", 0, 8)], mm_items=bad),
    }
    with pytest.raises(ValueError, match="MultimodalItem at offset 20 with length 12 runs past "
                                         "the 29 tokens"):
        calls[call]()
    assert backend == {} and engine.tier.num_waiting == 0
    assert engine.manager.cached_blocks() == [] and router.stats.num_routed == 0
    engine.manager.check_invariants()


def test_the_router_predicts_no_hit_for_another_image() -> None:
    """A router fed an instance's events predicts the cat prompt's 7 blocks there, and for
    the dog prompt (or the placeholders alone) only the 2 text blocks before the image."""
    router = Router(CacheAware(), TPB, hash_algo="sha256")
    router.index.apply("i", _replayed_events(CAT))
    loads = [InstanceLoad("i", 0, 8), InstanceLoad("j", 0, 8)]
    cat = router.route(PROMPT, loads, mm_items=CAT)
    assert (cat.instance_id, cat.best_hit_blocks, cat.num_prompt_blocks) == ("i", 7, 7)
    assert router.route(PROMPT, loads, mm_items=DOG).best_hit_blocks == 2
    assert router.route(PROMPT, loads).best_hit_blocks == 2


def _replayed_events(items: tuple[MultimodalItem, ...]) -> list[Event]:
    """The events of a fresh engine computing the prompt with ``items``."""
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=32,
                                         hash_algo="sha256", enable_events=True))
    adm = manager.add_sequence(SequenceSpec("a", PROMPT, mm_items=items))
    assert adm.admitted
    manager.remove_sequence("a")
    return list(manager.drain_events())
