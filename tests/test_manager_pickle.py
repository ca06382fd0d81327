"""A manager pickled, or copied, carries no itertools counter, and a manager unpickled in
another process numbers its new nodes past the ones it brought.

Before: the cache's tick was an ``itertools.count``, which Python 3.12 pickles and copies
with a DeprecationWarning (an error under the test suite's settings) and 3.14 not at all.
And the nodes' uids come from the process's counter: unpickled in a fresh process, the
tree's nodes met new nodes of the same uids, which the pools key their books by.
"""

from __future__ import annotations

import copy
import io
import itertools
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from kvtier import CacheConfig, KVCacheManager, SequenceSpec
from kvtier.scheduler import Request, Scheduler, SchedulerConfig

SRC = Path(__file__).resolve().parents[1] / "src"


class _NoItertools(pickle.Pickler):
    """A pickler refusing any itertools object (Python 3.14 refuses them all)."""

    def reducer_override(self, obj: object) -> Any:
        if type(obj).__module__ == "itertools":
            raise AssertionError(f"an itertools object is pickled: {obj!r}")
        return NotImplemented


def busy_manager(policy: str = "kvtier-predict-cost") -> KVCacheManager:
    """A manager whose tree, pools and policy books all hold something."""
    manager = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=10,
                                         num_host_blocks=6, eviction_policy=policy))
    for i in range(12):
        prompt = [1, 2, 3, 4] + [10 + i % 4] * 4 + [i] * (4 + i % 5)
        assert manager.add_sequence(SequenceSpec(f"r{i}", prompt)).admitted
        manager.take_plan()
        manager.remove_sequence(f"r{i}")
    manager.check_invariants()
    return manager


def test_a_manager_pickles_and_copies_without_itertools_objects() -> None:
    manager = busy_manager()
    _NoItertools(io.BytesIO()).dump(manager)
    twin = copy.deepcopy(manager)
    for m in (manager, twin):  # both go on numbering ticks where the original was
        assert m.add_sequence(SequenceSpec("x", [1, 2, 3, 4, 10, 10, 10, 10, 7])).admitted
        m.remove_sequence("x")
        m.check_invariants()
    assert manager._cache.next_tick() == twin._cache.next_tick()  # the same tick on
    assert ([b.block_hash for b in manager.cached_blocks()]
            == [b.block_hash for b in twin.cached_blocks()])
    assert isinstance(manager._cache._tick, itertools.count)  # the original's, given back
    scheduler = Scheduler(busy_manager("priority-lru"), SchedulerConfig(max_num_tokens=16))
    scheduler.add_request(Request("q", list(range(30)), 3))
    scheduler.step()
    _NoItertools(io.BytesIO()).dump(scheduler)


def run_python(script: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_manager_unpickled_in_another_process_numbers_new_nodes_past_its_own(
        tmp_path: Path) -> None:
    """Saved by one fresh process, loaded by another: both number nodes from 1."""
    saved = tmp_path / "manager.pickle"
    run_python(f"""
        import pickle, sys
        sys.path[:0] = [{str(SRC)!r}, {str(Path(__file__).parent)!r}]
        from test_manager_pickle import busy_manager
        open({str(saved)!r}, "wb").write(pickle.dumps(busy_manager()))
    """)
    out = run_python(f"""
        import pickle, sys
        sys.path.insert(0, {str(SRC)!r})
        from kvtier import SequenceSpec
        from kvtier.radix import subtree
        manager = pickle.loads(open({str(saved)!r}, "rb").read())
        for i in range(20):  # new runs, splits and evictions in the new process
            prompt = [1, 2, 3, 4] + [10 + i % 4] * 2 + [50 + i] * 6
            assert manager.add_sequence(SequenceSpec(f"n{{i}}", prompt)).admitted
            manager.take_plan()
            uids = [n.uid for root in manager._cache.roots.values() for n in subtree(root)]
            assert len(uids) == len(set(uids)), (i, sorted(uids))
            manager.remove_sequence(f"n{{i}}")
            manager.check_invariants()
        print("ok", len(uids))
    """)
    assert out.startswith("ok")


def test_a_shallow_copy_of_a_manager_or_scheduler_is_refused() -> None:
    """``copy.copy`` gave a second manager (scheduler) sharing the original's tree, pools
    and live table (queue and running table) with counters of its own: each one's calls
    corrupted the other's books. Refused, naming deepcopy; the original works on."""
    manager = busy_manager()
    scheduler = Scheduler(manager, SchedulerConfig(max_num_tokens=16))
    scheduler.add_request(Request("q", list(range(30)), 3))
    with pytest.raises(TypeError, match=r"^a KVCacheManager cannot be copied shallowly .*"
                                        r"use copy\.deepcopy or pickle"):
        copy.copy(manager)
    with pytest.raises(TypeError, match=r"^a Scheduler cannot be copied shallowly .*"
                                        r"use copy\.deepcopy or pickle"):
        copy.copy(scheduler)
    twin = copy.deepcopy(scheduler)
    for s in (scheduler, twin):
        step = s.step()
        assert [c.request_id for c in step.context_chunks] == ["q"]
        s.manager.check_invariants()
    assert twin.manager is not manager
