"""``KVCacheManager.drop_key_space``: one tenant's (salt's) or one LoRA adapter's blocks leave
every tier, reported removed and never spilled; held blocks stay; no other key space is
touched."""

from __future__ import annotations

import random
from typing import Any

import pytest

from kvtier import BlockRemoved, BlockStored, CacheConfig, KVCacheManager, SequenceSpec, Tier


def make_manager(**kw: Any) -> KVCacheManager:
    cfg: dict[str, Any] = {"tokens_per_block": 4, "num_gpu_blocks": 6, "num_host_blocks": 6,
                           "enable_events": True, **kw}
    return KVCacheManager(CacheConfig(**cfg))


def blocks_of(mgr: KVCacheManager) -> list[tuple[object, object, Tier, tuple[int, ...]]]:
    return [(b.salt, b.lora_id, b.tier, b.tokens) for b in mgr.cached_blocks()]


def test_a_tenants_blocks_leave_every_tier_and_nobody_elses() -> None:
    """Tenants a and b cache the same prompt; a second prompt of a's pushed one of its
    blocks to the host. Dropping a's key space removes its 4 blocks (3 GPU, 1 host),
    reports each removed, and leaves b's blocks and hits exactly as they were."""
    mgr = make_manager()
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    for rid, salt in (("a1", "a"), ("b1", "b")):
        mgr.add_sequence(SequenceSpec(rid, prompt, salt=salt))
        mgr.remove_sequence(rid)
    mgr.add_sequence(SequenceSpec("a2", [7] * 9, salt="a"))  # one of a1's to the host
    mgr.remove_sequence("a2")
    mgr.take_plan()
    assert sorted((s, t.name) for s, _, t, _ in blocks_of(mgr)) == [
        ("a", "GPU"), ("a", "GPU"), ("a", "GPU"), ("a", "HOST"), ("b", "GPU"), ("b", "GPU")]
    before_b = [b for b in blocks_of(mgr) if b[0] == "b"]
    a_hashes = {b.block_hash for b in mgr.cached_blocks() if b.salt == "a"}
    mgr.drain_events()
    version = mgr.version
    assert mgr.drop_key_space(salt="a") == 4
    assert [b for b in blocks_of(mgr) if b[0] == "a"] == []
    assert [b for b in blocks_of(mgr) if b[0] == "b"] == before_b
    events = mgr.drain_events()
    assert all(isinstance(e, BlockRemoved) for e in events)
    assert {e.block_hash for e in events if isinstance(e, BlockRemoved)} == a_hashes
    assert mgr.lookup(prompt, salt="a").num_tokens == 0
    assert mgr.lookup(prompt, salt="b").num_tokens == 8
    assert (mgr.version > version, mgr.num_key_spaces) == (True, 1)
    assert (mgr.num_free_gpu_blocks, mgr.num_free_host_blocks) == (6, 6)
    assert mgr.drop_key_space(salt="a") == 0 and mgr.drop_key_space(salt="nobody") == 0
    mgr.check_invariants()


def test_held_blocks_stay_until_their_request_leaves() -> None:
    """A live request's path stays; the unheld runs below it go. Released, its blocks are
    cached as usual, and a second call drops them."""
    mgr = make_manager(num_gpu_blocks=8)
    mgr.add_sequence(SequenceSpec("x", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], lora_id=3))
    mgr.remove_sequence("x")
    mgr.add_sequence(SequenceSpec("y", [1, 2, 3, 4, 0], lora_id=3))  # holds the first block
    assert mgr.drop_key_space(lora_id=3) == 2  # blocks 2 and 3 of x's prompt
    assert [tokens for *_, tokens in blocks_of(mgr)] == [(1, 2, 3, 4)]
    mgr.check_invariants()
    mgr.remove_sequence("y")
    assert mgr.drop_key_space(lora_id=3) == 1 and mgr.cached_blocks() == []
    mgr.check_invariants()


def test_dropped_host_blocks_are_never_spilled() -> None:
    """With a write-back remote tier recording spills, an evicted host block is spilled but a
    dropped key space's are not."""
    managers = []
    for _ in range(2):
        mgr = make_manager(num_gpu_blocks=3, num_host_blocks=2)
        mgr.record_spills()
        mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 5, 6, 7, 8, 0], salt="t"))
        mgr.remove_sequence("a")
        mgr.add_sequence(SequenceSpec("b", [9] * 9))  # a's two blocks to the host
        mgr.remove_sequence("b")
        mgr.take_plan()
        assert mgr.drain_spills() == []
        assert sorted(t.name for _, _, t, _ in blocks_of(mgr)) == ["GPU", "GPU", "HOST", "HOST"]
        managers.append(mgr)
    dropped, evicted = managers
    assert dropped.drop_key_space(salt="t") == 2
    assert dropped.drain_spills() == []
    evicted.add_sequence(SequenceSpec("c", [8] * 9))  # b's blocks to the host: a's evicted
    assert len(evicted.drain_spills()) == 2
    for mgr in managers:
        mgr.check_invariants()


@pytest.mark.parametrize(("kw", "message"), [
    ({"salt": True}, "salt"), ({"salt": 1.5}, "salt"), ({"lora_id": -1}, "lora_id"),
    ({"lora_id": "3"}, "lora_id"), ({"salt": "x" * 5000}, "salt")])
def test_a_key_no_request_could_carry_is_refused_changing_nothing(kw: dict[str, Any],
                                                                    message: str) -> None:
    """ValueError naming the field; every block stays."""
    mgr = make_manager()
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 5]))
    mgr.remove_sequence("a")
    before = (blocks_of(mgr), mgr.version)
    with pytest.raises(ValueError, match=message):
        mgr.drop_key_space(**kw)
    assert (blocks_of(mgr), mgr.version) == before


def test_random_drops_leave_exactly_the_other_and_the_held_blocks() -> None:
    """Random admissions under three tenants and two adapters, releases and drops: after a
    drop no unheld block of that key space is cached, every other key space's blocks are
    unchanged, and the books hold."""
    rng = random.Random(11)
    mgr = make_manager(num_gpu_blocks=10, num_host_blocks=8)
    spaces = [(lora, salt) for lora in (None, 1) for salt in ("a", "b", None)]
    live: dict[str, tuple[int | None, str | None]] = {}
    for step in range(400):
        op = rng.random()
        if op < 0.5 and len(live) < 3:
            lora, salt = rng.choice(spaces)
            prompt = [rng.randrange(2) for _ in range(rng.randrange(1, 13))]
            rid = f"r{step}"
            if mgr.add_sequence(SequenceSpec(rid, prompt, salt=salt, lora_id=lora)).admitted:
                live[rid] = (lora, salt)
        elif op < 0.85 and live:
            mgr.remove_sequence(rng.choice(sorted(live)))
            live = {r: k for r, k in live.items() if mgr.has_sequence(r)}
        else:
            lora, salt = rng.choice(spaces)
            others = [b for b in mgr.cached_blocks() if (b.lora_id, b.salt) != (lora, salt)]
            held_spaces = set(live.values())
            mgr.drop_key_space(lora_id=lora, salt=salt)
            left = [b for b in mgr.cached_blocks() if (b.lora_id, b.salt) == (lora, salt)]
            assert all(b.priority is None for b in left), step  # only held blocks stay
            assert not left or (lora, salt) in held_spaces, step
            assert [b for b in mgr.cached_blocks() if (b.lora_id, b.salt) != (lora, salt)] == (
                others), step
        mgr.take_plan()
        mgr.check_invariants()
    assert any(isinstance(e, BlockStored) for e in mgr.drain_events())


def cache_under(mgr: KVCacheManager, spaces: list[tuple[int | None, str | None]],
                prompt: list[int]) -> None:
    """Cache ``prompt`` (2 full blocks) under each (lora_id, salt) of ``spaces``."""
    for i, (lora, salt) in enumerate(spaces):
        assert mgr.add_sequence(SequenceSpec(f"r{i}", prompt, salt=salt, lora_id=lora)).admitted
        mgr.remove_sequence(f"r{i}")


SPACES: list[tuple[int | None, str | None]] = [
    (None, None), (None, "a"), (7, None), (7, "a"), (7, "b"), (8, "a")]


def test_drop_lora_takes_the_adapter_under_every_salt_and_nothing_else() -> None:
    """An adapter unloaded (or reloaded with new weights under its id) must leave no block
    of it under any tenant: drop_key_space(lora_id=7) takes only the unsalted ones (2
    blocks), drop_lora(7) the salted ones too (4 more); the base model's and adapter 8's
    stay exactly."""
    mgr = make_manager(num_gpu_blocks=16, num_host_blocks=0)
    cache_under(mgr, SPACES, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    keep = [b for b in blocks_of(mgr) if b[1] != 7]
    assert mgr.drop_key_space(lora_id=7) == 2
    assert sorted({(b[1], b[0]) for b in blocks_of(mgr)}, key=repr) == sorted(
        [(None, None), (None, "a"), (7, "a"), (7, "b"), (8, "a")], key=repr)
    version = mgr.version
    assert mgr.drop_lora(7) == 4 and mgr.version > version
    assert blocks_of(mgr) == keep
    assert mgr.drop_lora(7) == 0 and mgr.drop_lora(99) == 0
    for lora, salt in SPACES:
        assert mgr.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9], salt=salt, lora_id=lora).num_tokens == (
            0 if lora == 7 else 8)
    mgr.check_invariants()


def test_drop_salt_takes_the_tenant_under_every_adapter_and_nothing_else() -> None:
    """A tenant expired leaves no block under any adapter: drop_salt("a") takes its
    base-model, adapter-7 and adapter-8 blocks (6), not "b"'s nor the unsalted ones."""
    mgr = make_manager(num_gpu_blocks=16, num_host_blocks=0)
    cache_under(mgr, SPACES, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    keep = [b for b in blocks_of(mgr) if b[0] != "a"]
    mgr.drain_events()
    assert mgr.drop_salt("a") == 6
    assert blocks_of(mgr) == keep
    assert len([e for e in mgr.drain_events() if isinstance(e, BlockRemoved)]) == 6
    assert mgr.drop_salt("a") == 0 and mgr.drop_salt(b"a") == 0
    mgr.check_invariants()


@pytest.mark.parametrize(("call", "message"), [
    (lambda m: m.drop_lora(None), "drop_lora needs an adapter's lora_id, got None"),
    (lambda m: m.drop_lora(-1), "lora_id must be an int"),
    (lambda m: m.drop_lora(True), "lora_id must be an int"),
    (lambda m: m.drop_salt(None), "salt"),
    (lambda m: m.drop_salt(1.5), "salt"),
    (lambda m: m.drop_salt(True), "salt")])
def test_drop_lora_and_salt_refuse_what_no_request_could_carry(call: Any, message: str) -> None:
    """ValueError naming the field; every block stays, the version too."""
    mgr = make_manager(num_gpu_blocks=16, num_host_blocks=0)
    cache_under(mgr, SPACES, [1, 2, 3, 4, 5])
    before = (blocks_of(mgr), mgr.version)
    with pytest.raises(ValueError, match=message):
        call(mgr)
    assert (blocks_of(mgr), mgr.version) == before
