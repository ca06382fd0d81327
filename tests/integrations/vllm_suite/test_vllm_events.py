"""kvtier's KV events as vLLM 0.33.0's KVEventBatch: through msgpack as vLLM's ZMQ publisher
sends them, a consumer that applies them the way vLLM's routers do sees exactly the blocks
the manager holds, per medium, after every operation; a lost event makes it start over."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest
from vllm.distributed.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
)

from kvtier import CacheConfig, KVCacheManager, MultimodalItem, SequenceSpec, Tier
from kvtier.hashing import encode_key
from kvtier.integrations.vllm.events import VllmEventTranslator

MEDIUM = {Tier.GPU: "GPU", Tier.HOST: "CPU"}
# Per medium, each block's parent hash and tokens, by its hash.
View = dict[str, dict[bytes | int, tuple[bytes | int | None, tuple[int, ...]]]]


def make_manager(**kw: int) -> KVCacheManager:
    cfg: dict[str, Any] = {"tokens_per_block": 4, "num_gpu_blocks": 4, "num_host_blocks": 4, **kw}
    return KVCacheManager(CacheConfig(enable_events=True, **cfg))


def wire(batch: KVEventBatch) -> KVEventBatch:
    """The batch after vLLM's ZmqEventPublisher packs it and a subscriber unpacks it."""
    decoded: KVEventBatch = msgspec.msgpack.Decoder(type=KVEventBatch).decode(
        msgspec.msgpack.Encoder().encode(batch))
    return decoded


class Consumer:
    """A router's view: the block hashes it believes each medium holds, with their tokens.
    ``strict``: a removal of a block it does not know fails (no event was lost)."""

    def __init__(self, strict: bool = True) -> None:
        self.strict = strict
        self.blocks: View = {"GPU": {}, "CPU": {}}

    def apply(self, batch: KVEventBatch) -> None:
        for e in batch.events:
            if isinstance(e, BlockStored):
                assert e.medium is not None
                n, parent = e.block_size, e.parent_block_hash
                for i, h in enumerate(e.block_hashes):
                    self.blocks[e.medium][h] = (parent, tuple(e.token_ids[i * n:(i + 1) * n]))
                    parent = h
            elif isinstance(e, BlockRemoved):
                assert e.medium is not None
                for h in e.block_hashes:
                    gone = self.blocks[e.medium].pop(h, None)
                    assert gone is not None or not self.strict, h
            else:
                assert isinstance(e, AllBlocksCleared)
                for medium in self.blocks.values():
                    medium.clear()

    def view(self) -> View:
        return {m: dict(b) for m, b in self.blocks.items()}


def truth(mgr: KVCacheManager) -> View:
    out: View = {"GPU": {}, "CPU": {}}
    for b in mgr.cached_blocks():
        parent = None if b.parent_hash is None else b.parent_hash.to_bytes(16, "big")
        out[MEDIUM[b.tier]][b.block_hash.to_bytes(16, "big")] = (parent, b.tokens)
    return out


def test_store_offload_onboard_and_removal_in_vllm_terms() -> None:
    """One chain of stored blocks is one vLLM BlockStored with every hash and token; a tier
    change is a removal from one medium and a store, fully described, in the other."""
    mgr = make_manager(num_gpu_blocks=3, num_host_blocks=1)
    tr = VllmEventTranslator(4, data_parallel_rank=3, clock=lambda: 12.5)
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 5, 6, 7, 8, 0]))
    batch = wire(tr.translate(mgr.drain_events()))
    (hash_a, hash_b), = [tuple(s.block_hashes) for s in batch.events]
    assert (batch.ts, batch.data_parallel_rank) == (12.5, 3)
    assert batch.events == [BlockStored(
        block_hashes=[hash_a, hash_b], parent_block_hash=None,
        token_ids=[1, 2, 3, 4, 5, 6, 7, 8], block_size=4, lora_id=None, medium="GPU",
        lora_name=None, extra_keys=None)]
    mgr.remove_sequence("a")
    mgr.add_sequence(SequenceSpec("b", [9, 9, 9, 9, 9]))  # [5..8] leaves the GPU for the host
    events = wire(tr.translate(mgr.drain_events())).events
    assert events[:2] == [
        BlockRemoved(block_hashes=[hash_b], medium="GPU"),
        BlockStored(block_hashes=[hash_b], parent_block_hash=hash_a,
                    token_ids=[5, 6, 7, 8], block_size=4, lora_id=None, medium="CPU",
                    lora_name=None, extra_keys=None)]
    assert isinstance(hash_a, bytes) and len(hash_a) == 16
    assert tr.num_resyncs == 0


def test_a_vllm_consumer_sees_what_the_manager_holds_after_every_operation() -> None:
    """Random admissions, growth, releases, offloads, onboards, resets, drained after one or
    several: a consumer of the translated, msgpack-carried batches then holds exactly
    cached_blocks() per medium, with each block's parent and tokens."""
    rng = random.Random(7)
    mgr = make_manager(num_gpu_blocks=6, num_host_blocks=5)
    tr, consumer = VllmEventTranslator(4), Consumer()
    live: list[str] = []
    for step in range(600):
        op = rng.random()
        if op < 0.45 and len(live) < 3:
            rid = f"r{step}"
            prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 14))]
            if mgr.add_sequence(SequenceSpec(rid, prompt)).admitted:
                live.append(rid)
        elif op < 0.7 and live:
            mgr.append_tokens(rng.choice(live), [rng.randrange(3) for _ in range(3)])
        elif op < 0.97 and live:
            mgr.remove_sequence(live.pop(rng.randrange(len(live))))
        elif not live:
            mgr.reset_cache()
        if rng.random() < 0.4:  # several operations' events in one batch, at times
            continue
        mgr.take_plan()
        consumer.apply(wire(tr.translate(mgr.drain_events())))
        assert consumer.view() == truth(mgr), step
    assert tr.num_resyncs == 0


def test_lost_events_make_the_consumer_start_over_never_overclaim() -> None:
    """With a 3-event buffer events are dropped: the next batch starts with
    AllBlocksCleared, and the consumer never believes in a block the manager lacks."""
    rng = random.Random(3)
    mgr = make_manager(num_gpu_blocks=6, num_host_blocks=5, max_events=3)
    tr, consumer = VllmEventTranslator(4), Consumer(strict=False)
    for step in range(200):
        rid = f"r{step}"
        prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 14))]
        mgr.add_sequence(SequenceSpec(rid, prompt))
        mgr.remove_sequence(rid)
        consumer.apply(wire(tr.translate(mgr.drain_events())))
        held = truth(mgr)
        for medium, blocks in consumer.view().items():
            assert blocks.keys() <= held[medium].keys(), step
            # A block the translator forgot in a resync moves as vLLM's placeholder.
            assert all(b in ((None, ()), held[medium][h]) for h, b in blocks.items()), step
    assert tr.num_resyncs > 0


def test_lora_extra_keys_placeholders_and_int_hashes() -> None:
    """The salt (on the chain's root block) and a block's extra key travel as vLLM's
    per-block extra keys; a block stored before the translator existed moves as vLLM's
    placeholder; int hashes are the low 64 bits."""
    mgr = make_manager(num_gpu_blocks=3, num_host_blocks=2)
    img = (MultimodalItem(4, 2, b"cat"),)
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], lora_id=5, mm_items=img,
                                  salt="tenant"))
    mgr.remove_sequence("a")
    stored = mgr.drain_events()
    tr = VllmEventTranslator(4, int_hashes=True)
    (event,) = wire(tr.translate(stored)).events
    assert isinstance(event, BlockStored) and event.lora_id == 5
    # (msgpack carries each (name, bytes) pair as an array.)
    assert event.extra_keys == [(["salt", encode_key("tenant")],),
                                (["extra", encode_key(((b"cat", 0),))],)]
    assert all(type(h) is int and 0 <= h < 1 << 64 for h in event.block_hashes)
    late = VllmEventTranslator(4)
    late.translate([])
    mgr.add_sequence(SequenceSpec("b", [7, 7, 7, 7, 7]))  # offloads a's blocks
    moved = [e for e in wire(late.translate(mgr.drain_events())).events
             if isinstance(e, BlockStored) and e.medium == "CPU"]
    assert moved and all(e.token_ids == [] and e.block_size == 0 for e in moved)
    assert late.num_resyncs == 0


def test_a_block_size_that_is_no_positive_int_is_refused() -> None:
    """The translator refuses a block size it could not describe blocks with."""
    for bad in (0, -4, True, 4.0, "4"):
        with pytest.raises(ValueError, match="block_size must be a positive int"):
            VllmEventTranslator(bad)  # type: ignore[arg-type]
