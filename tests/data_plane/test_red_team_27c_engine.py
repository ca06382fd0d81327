"""Red team 27c, the model engine's remote tier on the CPU: a second engine that fetches a
prefix from the store, some of whose values come back corrupt, computes what a cacheless
model computes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the data-plane tests need torch: "
                                            "pip install 'kvtier[torch]'")

from exact_engine import assert_exact  # noqa: E402
from kvtier import CacheConfig, KVCacheManager, Request, Scheduler, SchedulerConfig  # noqa: E402
from kvtier.model import LlamaModel, ModelConfig, ModelEngine  # noqa: E402
from kvtier.remote import InMemoryRemoteStore, RemoteNamespace  # noqa: E402
from kvtier.remote.store import PrefetchCallback  # noqa: E402
from kvtier.remote.tier import RemoteTier  # noqa: E402
from kvtier.storage import KVStorage  # noqa: E402
from kvtier.transfer.torch_engine import TorchTransferEngine  # noqa: E402

TPB = 4
MODEL = LlamaModel(ModelConfig(), "cpu")
# Two prefixes of 21 and 14 tokens (no multiple of the block), prompts cut from them.
PREFIXES = ([(7 * i + 3) % 256 for i in range(21)], [(11 * i + 5) % 256 for i in range(14)])
PROMPTS = [PREFIXES[0] + [1, 2], PREFIXES[1][:13] + [9], PREFIXES[0][:18] + [4, 4, 4],
           PREFIXES[1] + [200, 201, 202], PREFIXES[0][:9]]


class CorruptingStore(InMemoryRemoteStore):
    """Lookups answered at once in the caller's thread; the values of the hashes in
    ``corrupt`` come back with one byte of their payload flipped."""

    corrupt: frozenset[int] = frozenset()

    def prefetch(self, hashes: object, callback: PrefetchCallback) -> bool:
        callback(self.get_many(hashes))  # type: ignore[arg-type]
        return True

    def read_values(self, keys: list[str]) -> list[bytes | None]:
        values = super().read_values(keys)
        out: list[bytes | None] = []
        for key, value in zip(keys, values, strict=True):
            if value is not None and any(key == self._key(h) for h in self.corrupt):
                flipped = bytearray(value)
                flipped[-1] ^= 0x5A
                value = bytes(flipped)
            out.append(value)
        return out


def make_engine(backend: dict[str, bytes], corrupt: frozenset[int] = frozenset(),
                num_gpu_blocks: int = 12) -> ModelEngine:
    """An engine over NaN-poisoned pools and a :class:`CorruptingStore` on ``backend``."""
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=num_gpu_blocks,
                                         num_host_blocks=16, hash_algo="sha256"))
    scheduler = Scheduler(manager, SchedulerConfig(max_num_tokens=16, max_chunk_tokens=TPB + 1))
    layout = MODEL.config.kv_layout(TPB)
    gpu, host = KVStorage(layout, num_gpu_blocks, "cpu"), KVStorage(layout, 16)
    gpu.fill_(float("nan"))
    host.fill_(float("nan"))
    store = CorruptingStore(RemoteNamespace("tiny-llama", layout), backend)
    store.corrupt = corrupt
    remote = RemoteTier(store, manager, gpu, host)
    return ModelEngine(MODEL, manager, scheduler, TorchTransferEngine(gpu, host),
                       record_logits=True, remote=remote)


@pytest.mark.parametrize("corrupt_block", [None, 0, 2])
def test_a_second_engine_fetching_a_prefix_computes_what_a_cacheless_model_does(
        corrupt_block: int | None) -> None:
    """Engine a writes its prompts through; engine b, fresh, fetches them from the store,
    its GPU pool too small to hold them all (blocks offloaded to the host). With the
    value of one block of the first prefix corrupt, that block and the ones after it are
    a miss (recomputed), never served: b's answers are a cacheless model's, and b fetched
    fewer blocks."""
    backend: dict[str, bytes] = {}
    a = make_engine(backend, num_gpu_blocks=32)
    for i, prompt in enumerate(PROMPTS):
        a.add_request(Request(f"a{i}", prompt, 3))
    a.run()
    assert a.remote is not None and a.remote.num_written_blocks > 0
    corrupt: set[int] = set()
    if corrupt_block is not None:
        corrupt.add(a.remote.block_hashes(PREFIXES[0], None, None, ())[corrupt_block])
    b = make_engine(backend, frozenset(corrupt))
    for i, prompt in enumerate(PROMPTS[::-1]):
        b.add_request(Request(f"b{i}", prompt, 4))
    b.run()
    b.manager.check_invariants()
    assert b.manager.num_sequences == 0
    assert b.manager.stats.gpu.offloaded_blocks > 0
    assert_exact(b)
    assert b.remote is not None
    fetched = b.remote.num_fetched_blocks
    remote_tokens = sum(r.num_remote_tokens for r in b.results.values())
    assert 0 < remote_tokens <= fetched * TPB
    bad = b.remote.ranks.leader.store.stats.num_bad_payloads
    # The full blocks before each prompt's last token, past what b holds by then:
    # 2 + 4 + 3 (blocks 2..4) + 0 + 1 (block 4).
    if corrupt_block is None:
        assert (bad, fetched) == (0, 10)
    else:
        assert bad > 0 and fetched < 10
