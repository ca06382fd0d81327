"""Red team 22b: the fleet's shared tier and the command line, at their bounds."""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from bad_input_helpers import assert_one_line_refusal, run_cli
from kvtier.cli import main
from kvtier.config import CacheConfig
from kvtier.remote.store import InMemoryRemoteStore
from kvtier.remote.tier import num_blocks_worth_fetching
from kvtier.router import CacheAware, InstanceLoad, PrefixHit
from kvtier.sim import SyntheticChat
from kvtier.sim.fleet import simulate_fleet, stand_in_namespace


@pytest.mark.parametrize(("mode", "bandwidth"), [
    ("write-through", "1e-315"),  # a block's fetch: an infinite time
    ("write-through", "1e-310"),  # a write's queue ahead of a fetch: an infinite time
    ("write-back", "1e-315"),
])
def test_a_link_too_slow_for_any_fetch_replays_fetching_nothing(mode: str,
                                                                 bandwidth: str) -> None:
    """Every rate of (0, 1e6] GB/s is a valid --remote-bandwidth-gb-s; on one so slow that a
    block's transfer, or the store's queue ahead of a fetch, is an infinite time, no fetch
    is worth it: the replay runs and fetches nothing. On the old code it ended with
    "cannot replay: fetch_s_per_block (or latency_s) must be a finite number", status 2,
    naming no option the user gave."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["replay", "--no-progress", "--limit", "40", "--instances", "2",
                     "--remote", mode, "--remote-bandwidth-gb-s", bandwidth])
    assert code == 0, err.getvalue()
    remote = json.loads(out.getvalue().splitlines()[-1])["remote"]
    assert (remote["num_fetched_blocks"], remote["num_imported_blocks"]) == (0, 0)
    assert remote["num_lookups"] == 40


def test_an_infinite_fetch_cost_fetches_nothing() -> None:
    """A fetch that never lands (an infinite latency or cost per block) is worth no block,
    with a deadline or without; NaN and negative infinity are still refused, naming the
    cost."""
    costs = dict(latency_s=1e-3, fetch_s_per_block=1e-3, recompute_s_per_block=4e-3)
    assert num_blocks_worth_fetching(10, **costs) == 10
    for field in ("latency_s", "fetch_s_per_block"):
        for wait in (None, 1.0):
            assert num_blocks_worth_fetching(10, **{**costs, field: math.inf},
                                             max_wait_s=wait) == 0
        for bad in (math.nan, -math.inf):
            with pytest.raises(ValueError, match=f"^{field} must be a finite number"):
                num_blocks_worth_fetching(10, **{**costs, field: bad})
    with pytest.raises(ValueError, match=r"^recompute_s_per_block must be a finite number"):
        num_blocks_worth_fetching(10, **{**costs, "recompute_s_per_block": math.inf})


class HalfStore(InMemoryRemoteStore):
    """Writes every other block of a batch (the rest refused, as a server out of memory)."""

    def write_values(self, pairs: list[tuple[str, bytes]]) -> list[bool]:
        taken = pairs[::2]
        self.backend.update(taken)
        return [i % 2 == 0 for i in range(len(pairs))]


def test_a_fleet_counts_the_blocks_its_store_wrote_not_those_it_was_given() -> None:
    """A store that refuses half of each write: the report's written blocks are the
    store's puts (its failed puts reported beside them). On the old code every block of a
    batch the store took any of was counted written: 766 for the store's 416."""
    cache = CacheConfig(num_gpu_blocks=768, num_host_blocks=256)
    store = HalfStore(stand_in_namespace(cache.tokens_per_block))
    report = simulate_fleet(SyntheticChat(num_requests=40, seed=0), cache, 2, "round-robin",
                            remote="write-through", remote_store=store)
    assert report.remote is not None
    stats = store.stats
    assert stats.num_failed_puts > 0
    assert report.remote["num_written_blocks"] == stats.num_puts
    assert report.remote["num_failed_puts"] == stats.num_failed_puts


@pytest.mark.parametrize("stamp", ["1e308", "+5", "1e3", "inf", "-1", "0x10"])
def test_a_burstgpt_timestamp_not_written_plainly_is_refused_saying_so(
        tmp_path: Path, stamp: str) -> None:
    """BurstGPT's seconds are read as plain decimals only: the refusal names the field,
    the value and the line, and says how it must be written (the old one said "expected a
    number of seconds >= 0", which 1e308 and +5 are)."""
    trace = tmp_path / "burst.csv"
    trace.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                     "0,ChatGPT,10,20,30,Conversation log\n"
                     f"{stamp},ChatGPT,10,20,30,Conversation log\n")
    code, err = run_cli(["replay", "--no-progress", str(trace)])
    assert_one_line_refusal(code, err, f"{trace}:3: field 'Timestamp': {stamp!r}",
                            "written plainly (digits and a point: no sign, exponent or inf)")


@pytest.mark.parametrize(("name", "value"), [
    ("alpha", math.nan), ("alpha", -1.0), ("alpha", math.inf), ("host_weight", "x"),
    ("host_weight", 1.5), ("load_factor", 0.5), ("load_factor", True), ("load_slack", -5),
    ("load_slack", 2.0), ("load_slack", 1 << 40),
])
def test_a_cache_aware_option_set_later_is_checked_as_when_made(name: str,
                                                                value: object) -> None:
    """Each field of the cache-aware policy set after it was made: refused naming it, the
    policy unchanged and still routing to the cached instance. On the old code the value
    was taken: NaN alpha made every score NaN and a negative slack left no instance within
    the bound, the router a silent round robin over the cache (or a TypeError in it)."""
    policy = CacheAware()
    before = repr(policy)
    with pytest.raises(ValueError, match=f"^{name} must be a"):
        setattr(policy, name, value)
    assert repr(policy) == before
    loads = [InstanceLoad("a", 0, 8), InstanceLoad("b", 0, 8)]
    assert [policy.choose(loads, {"b": PrefixHit(3, 1)}, 4) for _ in range(4)] == ["b"] * 4


@pytest.mark.parametrize("error", [SystemExit(3), KeyboardInterrupt(), GeneratorExit()])
def test_a_callback_raising_a_base_exception_leaves_the_io_thread_running(
        error: BaseException) -> None:
    """A prefetch callback (and a write's ``on_lost``) raising what is no Exception: counted
    as an error, and every later job runs, ``close()`` included. On the old code it ended
    the I/O thread: later jobs were accepted and never run, ``flush`` timed out (without a
    timeout it waited for ever) and nothing was counted."""
    store = InMemoryRemoteStore(stand_in_namespace(4))
    size = store.namespace.layout.bytes_per_block

    def fail(*args: object) -> None:
        raise error

    got: list[set[int]] = []
    assert store.prefetch([1], fail)
    assert store.put_many({2: bytes(size)}) == 1
    assert store.prefetch([2], lambda found: got.append(set(found)))
    assert store.flush(timeout=10)
    assert got == [{2}] and store.stats.num_errors == 1
    store.backend.clear()

    class Refusing(InMemoryRemoteStore):
        def write_values(self, pairs: list[tuple[str, bytes]]) -> list[bool]:
            return [False] * len(pairs)

    refusing = Refusing(stand_in_namespace(4))
    assert refusing.write_back({3: bytes(size)}, on_lost=fail)
    assert refusing.prefetch([3], lambda found: got.append(set(found)))
    refusing.close()  # runs the accepted jobs
    assert got == [{2}, set()] and refusing.stats.num_errors == 1
    store.close()
