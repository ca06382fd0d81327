"""The parts an object is built from and checked against are fixed at construction.

Replacing one afterwards bypassed the checks and stranded what was held on the old part:
a scheduler's running requests on the old manager, a manager's pools sized by the old
config, a transfer engine's copiers and slot bounds built from the old storages. Each is
refused with AttributeError, and the object still works.
"""

from __future__ import annotations

import pytest

from kvtier import CacheConfig, KVCacheManager, SequenceSpec
from kvtier.scheduler import Request, Scheduler, SchedulerConfig


def make() -> tuple[KVCacheManager, Scheduler]:
    manager = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8))
    return manager, Scheduler(manager, SchedulerConfig(max_num_tokens=64))


@pytest.mark.parametrize("name", ["manager", "config"])
def test_a_schedulers_manager_and_config_cannot_be_replaced(name: str) -> None:
    _, scheduler = make()
    _, other = make()
    before = getattr(scheduler, name)
    scheduler.add_request(Request("r", list(range(10)), 2))
    step = scheduler.step()
    with pytest.raises(AttributeError, match=name):
        setattr(scheduler, name, getattr(other, name))
    with pytest.raises(AttributeError, match=name):
        delattr(scheduler, name)
    assert getattr(scheduler, name) is before
    scheduler.update(step, {"r": 1})
    assert scheduler.manager.num_sequences == 1  # still running on its own manager


def test_a_managers_config_cannot_be_replaced() -> None:
    manager, _ = make()
    before = manager.config
    with pytest.raises(AttributeError, match="config"):
        manager.config = CacheConfig(tokens_per_block=16, num_gpu_blocks=2)  # type: ignore[misc]
    assert manager.config is before
    adm = manager.add_sequence_batch([SequenceSpec("a", list(range(9)))])[0]
    assert adm.admitted and len(adm.block_ids) == 3  # 4-token blocks, as built
    manager.check_invariants()


def test_a_transfer_engines_storages_cannot_be_replaced() -> None:
    pytest.importorskip("torch", reason="the transfer engine needs torch")
    from kvtier.storage import KVLayout, KVStorage
    from kvtier.transfer.torch_engine import TorchTransferEngine

    layout = KVLayout(1, 1, 2, 4, "float32", "block_major")
    gpu, host = KVStorage(layout, 2, "cpu"), KVStorage(layout, 2)
    engine = TorchTransferEngine(gpu, host)
    for name in ("gpu", "host"):
        with pytest.raises(AttributeError, match=name):
            setattr(engine, name, KVStorage(layout, 64, "cpu"))
    assert engine.gpu is gpu and engine.host is host
