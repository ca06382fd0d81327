"""TensorRT-LLM's priority and retention semantics at their edges, mirrored against kvtier.

Each test names the case of NVIDIA/TensorRT-LLM's
``cpp/tests/unit_tests/batch_manager/kvCacheManagerTest.cpp`` / ``evictionPolicyTest.cpp``
whose rule it pushes further: a priority (and a retention) overrides every eviction
policy, not only LRU's; a retention that runs out moves a block across
``offload_min_priority`` (TensorRT-LLM's ``refresh()`` re-files expired blocks at the
default before ``getFreeBlock`` decides to offload); a run shared by two requests takes the
per-range settings of the one that releases it last.
"""

from __future__ import annotations

import pytest

from fake_clock import FakeClock
from kvtier import OpKind, Retention, RetentionRange, Tier
from kvtier.config import EVICTION_POLICIES
from peer_mirror.mirror_helpers import admit, blocks_of, hit, make_manager, release


def _gpu_firsts(blocks: list[tuple[int, Tier]]) -> set[int]:
    """The first tokens of the GPU blocks among (first token, tier) pairs."""
    return {first for first, tier in blocks if tier is Tier.GPU}


@pytest.mark.parametrize("policy", [p for p in EVICTION_POLICIES if p != "lru"])
def test_priorities_and_expired_retentions_override_every_policy(policy: str) -> None:
    """Mirrors BlockManagerBlockPriorityTest and LRUPolicyTest.TimedBlockTest under every
    policy that honours priorities (all but the bare ``lru`` baseline): four one-block
    prompts released at 90, 10, 60-for-1-s and 35; 5 s later the 60 has fallen to the
    default. One-block fillers held at 100 then evict one block each: the 10 first, then
    the two 35s (the expired 60 among them; in release order under ``priority-lru``),
    the 90 last.

        GPU (8 blocks)  [a0 90][a1 10][a2 60->35][a3 35][ free x4 ]
        fillers f0..f3 take the free slots; f4..f7 evict a1, {a2, a3}, a0
    """
    clock = FakeClock()
    mgr = make_manager(num_gpu_blocks=8, clock=clock, eviction_policy=policy)
    settings: list[tuple[int, float | None]] = [(90, None), (10, None), (60, 1.0), (35, None)]
    for i, (priority, retention_s) in enumerate(settings):
        admit(mgr, f"a{i}", blocks_of(10 + i) + [1], priority=priority,
              retention_s=retention_s)
    for i in range(4):
        clock.now += 0.5
        release(mgr, f"a{i}")
    clock.now += 5.0
    assert [b.priority for b in mgr.cached_blocks()] == [90, 10, 35, 35]
    evicted: list[int] = []
    for k in range(8):
        before = _gpu_firsts([(b.tokens[0], b.tier) for b in mgr.cached_blocks()])
        admit(mgr, f"f{k}", [100 + k] * 3, priority=100)
        after = _gpu_firsts([(b.tokens[0], b.tier) for b in mgr.cached_blocks()])
        evicted += sorted(before - after)
        assert len(evicted) == max(0, k - 3), (k, evicted)
    assert evicted[0] == 11 and set(evicted[1:3]) == {12, 13} and evicted[3] == 10
    if policy == "priority-lru":
        assert evicted == [11, 12, 13, 10]


@pytest.mark.parametrize(("priority", "retention_s", "offload_min_priority", "wait_s",
                          "offloaded", "host_priority"), [
    (20, 5.0, 30, 0.0, False, None),   # 20 < 30: dropped
    (20, 5.0, 30, 10.0, True, 35),     # expired to 35 >= 30: offloaded
    (80, 1.0, 60, 0.0, True, 80),      # 80 >= 60: offloaded, keeps 80 on the host
    (80, 1.0, 60, 10.0, False, None),  # expired to 35 < 60: dropped
])
def test_an_expired_retention_moves_a_block_across_the_offload_threshold(
        priority: int, retention_s: float, offload_min_priority: int, wait_s: float,
        offloaded: bool, host_priority: int | None) -> None:
    """Mirrors KVCacheManagerLeafBlockWithDependentTest / LRUPolicyTest.PriorityTest on a
    moving clock: whether an evicted GPU block is offloaded is decided by the priority it
    has when evicted (TensorRT-LLM's ``refresh()`` re-files expired blocks at the default
    before ``getFreeBlock`` compares with ``secondary_offload_min_priority``), not by the
    one it was released with.

        GPU (3 blocks)  [a: 1][a: 2][-]   b (2 full blocks + 1 token) evicts both
        HOST (2 blocks) offloaded into host 0, 1 (in release order) or nothing
    """
    clock = FakeClock()
    mgr = make_manager(num_gpu_blocks=3, num_host_blocks=2, clock=clock,
                       offload_min_priority=offload_min_priority)
    admit(mgr, "a", blocks_of(1, 2) + [9], priority=priority, retention_s=retention_s)
    release(mgr, "a")
    mgr.take_plan()
    clock.now = wait_s
    admit(mgr, "b", blocks_of(5, 6) + [9])
    ops = [(op.kind, op.src_slot, op.dst_slot) for op in mgr.take_plan().ops]
    host = [(b.tokens[0], b.slot, b.priority) for b in mgr.cached_blocks()
            if b.tier is Tier.HOST]
    if offloaded:
        assert ops == [(OpKind.OFFLOAD, 0, 0), (OpKind.OFFLOAD, 1, 1)]
        assert host == [(1, 0, host_priority), (2, 1, host_priority)]
        assert hit(mgr, blocks_of(1, 2) + [9]) == 8
    else:
        assert ops == [] and host == []
        assert hit(mgr, blocks_of(1, 2) + [9]) == 0


@pytest.mark.parametrize(("order", "expected"), [
    (("b", "a"), [90, 10, 10]),  # a released last: its ranges cut the shared run
    (("a", "b"), [35, 35, 35]),  # b released last: its one priority for the whole run
])
def test_a_shared_run_takes_the_ranges_of_its_last_release(
        order: tuple[str, str], expected: list[int]) -> None:
    """Mirrors BlockManagerBlockPriorityTest's reuse half (a reused block takes the
    priority of the request that held it last) with per-range retention: ``a`` keeps its
    first block at 90 and the rest at 10, ``b`` shares all three blocks at the default.
    Released last, ``a`` cuts the shared run where its ranges change, and fillers evict
    the 10s tail first and never the 90.

        GPU (10 blocks)  [1 | 90][2 | 10][3 | 10]   (a released last)
    """
    mgr = make_manager(num_gpu_blocks=10)
    ret = Retention(ranges=(RetentionRange(0, 4, 90), RetentionRange(4, None, 10)))
    admit(mgr, "a", blocks_of(1, 2, 3) + [9], retention=ret)
    admit(mgr, "b", blocks_of(1, 2, 3) + [8])
    release(mgr, *order)
    assert [(b.tokens[0], b.slot, b.priority) for b in mgr.cached_blocks()] == [
        (1, 0, expected[0]), (2, 1, expected[1]), (3, 2, expected[2])]
    for k in range(9):  # 7 free blocks, then two evictions
        admit(mgr, f"f{k}", [100 + k] * 3, priority=100)
    left = [(b.tokens[0], b.priority) for b in mgr.cached_blocks() if b.tokens[0] < 100]
    assert left == ([(1, 90)] if order == ("b", "a") else [(1, 35)])
