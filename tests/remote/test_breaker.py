"""The per-server circuit breaker (``kvtier.remote.breaker``), on a clock the test moves."""

from __future__ import annotations

import pytest

from kvtier.remote.breaker import Breakers, BreakerState

CLOSED, OPEN = BreakerState.CLOSED, BreakerState.OPEN
HALF_OPEN, PROBING = BreakerState.HALF_OPEN, BreakerState.PROBING


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def make_breakers(threshold: int = 3, cooldown_s: float = 1.0) -> tuple[Breakers, Clock]:
    """Breakers of ``threshold`` failures and ``cooldown_s``, on a clock of their own."""
    clock = Clock()
    return Breakers(threshold, cooldown_s, clock=clock), clock


def fail(breakers: Breakers, server: str, times: int) -> None:
    """``times`` failed batches of ``server``, each admitted first."""
    for _ in range(times):
        assert breakers.admit(server) is CLOSED
        breakers.record_failure(server)
        breakers.check_invariants()


def test_a_breaker_opens_at_the_threshold_of_failures_in_a_row() -> None:
    """Closed for threshold - 1 failures; the threshold-th opens it: batches refused."""
    breakers, _ = make_breakers(threshold=3)
    fail(breakers, "a", 2)
    assert (breakers.state("a"), breakers.num_failures_in_row("a")) == (CLOSED, 2)
    fail(breakers, "a", 1)
    assert (breakers.state("a"), breakers.num_failures_in_row("a")) == (OPEN, 3)
    assert breakers.admit("a") is OPEN  # short-circuited, books unchanged
    assert breakers.state("a") is OPEN
    breakers.check_invariants()


def test_a_success_resets_the_failures_in_a_row() -> None:
    """Two failures, a success, two failures: never three in a row, never open."""
    breakers, _ = make_breakers(threshold=3)
    fail(breakers, "a", 2)
    breakers.record_success("a")
    assert breakers.num_failures_in_row("a") == 0
    fail(breakers, "a", 2)
    assert (breakers.state("a"), breakers.num_failures_in_row("a")) == (CLOSED, 2)


def test_half_open_after_the_cooldown_lets_one_probe_out() -> None:
    """Open until cooldown_s passed; then the first batch probes, the others are refused.

        t=100 open ──(t=100.999)── open ──(t=101)── half-open: admit -> probe out
                                                    admit again -> PROBING (refused)
    """
    breakers, clock = make_breakers(threshold=2, cooldown_s=1.0)
    fail(breakers, "a", 2)
    clock.now_s = 100.999
    assert breakers.admit("a") is OPEN
    clock.now_s = 101.0
    assert breakers.state("a") is HALF_OPEN
    assert breakers.admit("a") is HALF_OPEN  # this batch is the probe
    assert breakers.state("a") is PROBING
    assert breakers.admit("a") is PROBING  # the others are refused while it is out
    assert breakers.admit("a") is PROBING
    breakers.check_invariants()


def test_a_probe_that_succeeds_closes_the_breaker() -> None:
    """open -> half-open -> probe succeeds -> closed, failures in a row back to 0."""
    breakers, clock = make_breakers(threshold=2, cooldown_s=1.0)
    fail(breakers, "a", 2)
    clock.now_s += 1.0
    assert breakers.admit("a") is HALF_OPEN
    breakers.record_success("a")
    breakers.end_probe("a")
    assert (breakers.state("a"), breakers.num_failures_in_row("a")) == (CLOSED, 0)
    assert breakers.admit("a") is CLOSED
    breakers.check_invariants()


def test_a_probe_that_fails_opens_the_breaker_again_at_once() -> None:
    """open -> half-open -> probe fails -> open for another cooldown_s from then."""
    breakers, clock = make_breakers(threshold=3, cooldown_s=1.0)
    fail(breakers, "a", 3)
    clock.now_s = 101.5
    assert breakers.admit("a") is HALF_OPEN
    breakers.record_failure("a")  # one failure past the threshold: open again
    breakers.end_probe("a")
    assert (breakers.state("a"), breakers.num_failures_in_row("a")) == (OPEN, 4)
    clock.now_s = 102.4
    assert breakers.admit("a") is OPEN
    clock.now_s = 102.5
    assert breakers.admit("a") is HALF_OPEN  # the next probe
    breakers.check_invariants()


def test_each_server_has_its_own_breaker() -> None:
    """Node a open leaves node b and the whole (``""``) closed."""
    breakers, _ = make_breakers(threshold=1)
    fail(breakers, "a", 1)
    assert [breakers.state(s) for s in ("a", "b", "")] == [OPEN, CLOSED, CLOSED]
    assert breakers.admit("b") is CLOSED


def test_end_cooldowns_makes_every_open_breaker_half_open() -> None:
    """Open breakers turn half-open at once; a closed one stays closed."""
    breakers, _ = make_breakers(threshold=1, cooldown_s=60.0)
    fail(breakers, "a", 1)
    fail(breakers, "b", 1)
    breakers.end_cooldowns()
    assert [breakers.state(s) for s in ("a", "b", "c")] == [HALF_OPEN, HALF_OPEN, CLOSED]
    breakers.check_invariants()


def test_a_zero_cooldown_is_half_open_as_soon_as_it_opens() -> None:
    """cooldown_s 0: the failure that opens it leaves it half-open, its next batch a probe."""
    breakers, _ = make_breakers(threshold=1, cooldown_s=0.0)
    fail(breakers, "a", 1)
    assert breakers.admit("a") is HALF_OPEN


@pytest.mark.parametrize("threshold, cooldown_s", [(0, 1.0), (True, 1.0), (1, -1.0),
                                                   (1, float("nan"))])
def test_bad_settings_are_refused(threshold: int, cooldown_s: float) -> None:
    """A threshold below 1 (or a bool), a cooldown below 0 (or NaN): ValueError."""
    with pytest.raises(ValueError):
        Breakers(threshold, cooldown_s)
