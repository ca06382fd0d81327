"""Red team 21, the torch transfer engine's half: what it records of the plans it ran
(``TorchTransferEngine``'s run-once rule) when plans come to it copied, as a worker fed
pickled plans gets them, and when they come with a copy of their manager."""

from __future__ import annotations

import copy
import gc
import pickle

import pytest

pytest.importorskip("torch", reason="the data-plane tests need torch: pip install 'kvtier[torch]'")

from kvtier import CacheConfig, KVCacheManager, SequenceSpec
from kvtier.storage import KVLayout, KVStorage
from kvtier.transfer.plan import TransferPlan
from kvtier.transfer.torch_engine import TorchTransferEngine

TPB = 4


def engine_and_manager() -> tuple[TorchTransferEngine, KVCacheManager]:
    layout = KVLayout(2, 2, 8, TPB, "float32", "block_major")
    engine = TorchTransferEngine(KVStorage(layout, 4, "cpu"), KVStorage(layout, 4))
    return engine, KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=4,
                                              num_host_blocks=4, eviction_policy="lru",
                                              offload_min_priority=0))


def plan_with_copies(mgr: KVCacheManager, first: int) -> TransferPlan:
    """A plan with ops: a prompt admitted and released, then one that evicts it."""
    for rid, start in ((f"x{first}", first), (f"y{first}", first + 1000)):
        mgr.add_sequence(SequenceSpec(rid, list(range(start, start + 13))))
        mgr.remove_sequence(rid)
    plan = mgr.take_plan()
    assert len(plan)
    return plan


def test_plans_unpickled_alone_leave_no_record_behind() -> None:
    """A plan copied alone names an issuer of its own (it keeps its issuer now, so that a
    manager copied with it takes it): the engine's record of issuers held each one for
    ever, one per plan a worker ran. Now the record goes with the plan."""
    engine, mgr = engine_and_manager()
    for i in range(20):
        plan = pickle.loads(pickle.dumps(plan_with_copies(mgr, 100 * i)))
        assert plan.issuer is not None
        engine.submit(plan)
        engine.synchronize_all()
    del plan
    gc.collect()
    assert len(engine._submitted) == 0


def test_a_plan_copied_with_its_manager_runs_once_there_too() -> None:
    """The run-once rule holds for a copy's plan as for the original's: each is its own
    manager's latest plan, run once on an engine."""
    engine, mgr = engine_and_manager()
    plan = plan_with_copies(mgr, 0)
    mgr2, plan2 = copy.deepcopy((mgr, plan))
    engine.submit(plan)
    engine.submit(plan2)
    engine.synchronize_all()
    for again in (plan, plan2):
        with pytest.raises(ValueError, match="submitted to this engine already"):
            engine.submit(again)
    assert len(engine._submitted) == 2
    del mgr2, plan2, again
    gc.collect()
    assert len(engine._submitted) == 1  # the copy's record went with it
