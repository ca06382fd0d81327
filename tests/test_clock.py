"""The cache's clock (kvtier.clock.CacheClock): a caller's clock that raises, answers garbage
or runs backwards never reaches the cache's state."""

from __future__ import annotations

import logging
import math
import random

import pytest

from kvtier import CacheConfig, KVCacheManager, SequenceSpec
from kvtier.clock import CacheClock


class Script:
    """A clock answering a script of readings; an exception in it is raised."""

    def __init__(self, readings: list[object]) -> None:
        self.readings = list(readings)

    def __call__(self) -> object:
        r = self.readings.pop(0)
        if isinstance(r, Exception):
            raise r
        return r


@pytest.mark.parametrize("bad", [RuntimeError("broke"), None, "3.0", True, math.nan,
                                 math.inf, -math.inf, 10 ** 400, 1.0])
def test_a_bad_reading_gives_the_last_good_one_and_is_counted(bad: object) -> None:
    """Each fault (raised, not a real number, not finite, too large, or back in time:
    1.0 after 2.0) gives the last good reading; the clock then recovers."""
    clock = CacheClock(Script([2.0, bad, 5]))  # type: ignore[arg-type]
    assert clock() == 2.0
    assert clock() == 2.0 and clock.num_faults == 1 and clock.last_fault
    assert clock() == 5.0 and type(clock.last) is float  # an int of seconds, as a float
    assert clock.num_faults == 1


def test_the_first_reading_may_be_negative_and_faults_before_it_read_zero() -> None:
    clock = CacheClock(Script([None, -100.0, -99.5]))  # type: ignore[arg-type]
    assert clock() == 0.0 and clock.num_faults == 1
    assert clock() == -100.0 and clock() == -99.5


def test_a_fault_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = CacheClock(Script([1.0, None, None, 2.0]))  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="kvtier.clock"):
        for _ in range(4):
            clock()
    assert clock.num_faults == 2
    assert [r.getMessage() for r in caplog.records] == [
        "kvtier: the cache's clock returned None, not a number of seconds; the last good "
        "time, 1.0, stands until it recovers (logged once; CacheClock.num_faults counts)"]


def test_a_clock_that_is_no_callable_is_refused() -> None:
    with pytest.raises(TypeError, match="clock must be a callable"):
        CacheClock(3.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="clock must be a callable"):
        KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8), clock=3.0)  # type: ignore[arg-type]


class FaultyClock:
    """Half a second a reading; the readings numbered in ``faults`` fail as ``mode``."""

    def __init__(self, faults: set[int], mode: str) -> None:
        self.n = 0
        self.t = 0.0
        self.faults = faults
        self.mode = mode

    def __call__(self) -> float:
        self.n += 1
        self.t += 0.5
        if self.n in self.faults:
            if self.mode == "raise":
                raise RuntimeError("clock broke")
            if self.mode == "none":
                return None  # type: ignore[return-value]
            if self.mode == "nan":
                return math.nan
            return -1e9  # back in time
        return self.t


@pytest.mark.parametrize("policy", ["priority-lru", "kvtier-predict-cost"])
@pytest.mark.parametrize("mode", ["raise", "none", "nan", "back"])
def test_a_faulty_clock_never_fails_an_operation_or_the_books(mode: str, policy: str) -> None:
    """Admissions and releases under a clock that fails one reading in ~20 (raising,
    answering None or NaN, jumping back): every operation succeeds and the books hold
    after each (a raising clock left claims counted on half-admitted paths before)."""
    for seed in range(4):
        rng = random.Random(seed)
        clock = FaultyClock(set(rng.sample(range(1, 400), 20)), mode)
        manager = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=24,
                                             num_host_blocks=24, eviction_policy=policy),
                                 clock=clock)
        live: list[str] = []
        for i in range(120):
            if rng.random() < 0.5 or not live:
                tokens = ([rng.randrange(3)] * 4 * rng.randrange(1, 4)
                          + [rng.randrange(50) for _ in range(rng.randrange(1, 9))])
                if manager.add_sequence(SequenceSpec(f"r{i}", tokens)).admitted:
                    live.append(f"r{i}")
                manager.take_plan()
            else:
                manager.remove_sequence(live.pop(rng.randrange(len(live))))
            manager.check_invariants()
        assert manager.clock.num_faults > 0  # the faults were read, and counted
