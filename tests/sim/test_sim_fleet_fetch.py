"""The fleet simulator charges every remote fetch: a request waits for its blocks, only the
blocks whose fetch beats their recompute are read, and writes land when the store has
moved them. Two instances, round-robin, llama3-8b-h100 (4 MiB blocks of 32 tokens)."""

from __future__ import annotations

from typing import Any

import pytest

from kvtier.config import CacheConfig
from kvtier.sim.fleet import simulate_fleet
from kvtier.sim.fleet_report import FleetReport, format_fleet_report
from kvtier.sim.timemodel import RemoteLink, TimeModel, get_profile
from kvtier.sim.workload import TraceRequest
from list_workload import ListWorkload

MODEL = TimeModel(get_profile("llama3-8b-h100"))
BLOCK_BYTES = 32 * MODEL.profile.kv_bytes_per_token  # 4 MiB
PREFIX = list(range(1000, 1320))  # 10 full blocks
SECOND_AT_S = 10.0


def make_workload(second_at_s: float = SECOND_AT_S) -> ListWorkload:
    """r0 at 0 s computes the 10-block prefix on i0 (written through to the store); r1
    arrives at ``second_at_s`` on i1 with the prefix and 33 new tokens.

    ::

        r1 on i1   | prefix: 10 blocks, in the store, not local | 33 new tokens |
                   |<------------- fetched or recomputed ------>|<- computed ->|
    """
    return ListWorkload([TraceRequest("r0", 0.0, PREFIX + [1], 1),
                         TraceRequest("r1", second_at_s, PREFIX + list(range(5, 38)), 1)])


def run(link: RemoteLink, **kw: Any) -> FleetReport:
    cache = CacheConfig(tokens_per_block=32, num_gpu_blocks=64, num_host_blocks=32)
    return simulate_fleet(kw.pop("workload", make_workload()), cache, 2, "round-robin",
                          remote="write-through", remote_link=link, **kw)


def remote_of(report: FleetReport) -> dict[str, Any]:
    """The report's remote-tier figures (there is always a shared tier here)."""
    assert report.remote is not None
    return report.remote


def second_ttft(report: FleetReport) -> float:
    ttft = report.instances[1].ttft_s.p50
    assert ttft is not None and report.instances[1].num_requests == 1
    return ttft


def test_a_fast_fetch_is_charged_before_the_request_computes() -> None:
    """32 GB/s beats the 3.3 GB/s break-even: r1 waits for its 10 blocks (1 ms + 40 MiB at
    32 GB/s), then one step prefills 33 tokens and onboards them: its TTFT is exactly that,
    never less than the fetch."""
    link = RemoteLink(latency_s=1e-3, bytes_per_s=32e9)
    report = run(link)
    remote = remote_of(report)
    assert (remote["num_hit_blocks"], remote["num_fetched_blocks"],
            remote["num_imported_blocks"], remote["num_skipped_blocks"]) == (10, 10, 10, 0)
    fetch_s = (SECOND_AT_S + link.transfer_seconds(10 * BLOCK_BYTES)) + 1e-3 - SECOND_AT_S
    step_s = MODEL.step_seconds(33, 0, 10 * BLOCK_BYTES, 0)
    # r0's fetch found nothing (the store was empty) and cost one latency, like the engine's.
    assert remote["num_fetches"] == 2
    assert remote["fetch_s"]["mean"] == (1e-3 + fetch_s) / 2
    assert second_ttft(report) == pytest.approx(fetch_s + step_s, rel=1e-12)
    assert second_ttft(report) > fetch_s


def test_a_slow_store_is_not_read_and_costs_nothing() -> None:
    """At the measured 0.25 GB/s, below the break-even, r1 recomputes its prefix: no fetch,
    10 found blocks left, and its TTFT is the prefill of all 353 tokens."""
    report = run(RemoteLink())
    remote = remote_of(report)
    assert (remote["num_hit_blocks"], remote["num_fetches"], remote["num_skipped_blocks"],
            remote["num_imported_blocks"]) == (10, 0, 10, 0)
    assert second_ttft(report) == pytest.approx(MODEL.step_seconds(353, 0, 0, 0), rel=1e-12)
    assert remote["break_even_bytes_per_s"] == 131072 / 40e-6
    text = "\n".join(format_fleet_report(report))
    assert "0.25 GB/s, below the break-even 3.28 GB/s" in text


def test_fetching_the_whole_prefix_from_a_slow_store_costs_more_than_recompute() -> None:
    """fetch='whole-prefix' reads the 10 blocks anyway: 168 ms of transfer, charged, so r1's
    TTFT is worse than recomputing (what the beats-recompute rule avoids)."""
    link = RemoteLink()
    report = run(link, fetch="whole-prefix")
    fetch_s = (SECOND_AT_S + link.transfer_seconds(10 * BLOCK_BYTES)) + link.latency_s \
        - SECOND_AT_S
    assert second_ttft(report) == pytest.approx(
        fetch_s + MODEL.step_seconds(33, 0, 10 * BLOCK_BYTES, 0), rel=1e-12)
    assert second_ttft(report) > MODEL.step_seconds(353, 0, 0, 0)


def test_only_the_blocks_that_arrive_before_the_deadline_are_fetched() -> None:
    """A 1 ms latency and a deadline of 1 ms + 4.5 blocks' transfer: the first 4 blocks are
    fetched, the other 6 recomputed with the new tokens."""
    link = RemoteLink(latency_s=1e-3, bytes_per_s=32e9)
    deadline_s = 1e-3 + 4.5 * link.transfer_seconds(BLOCK_BYTES)
    report = run(link, fetch_deadline_s=deadline_s)
    remote = remote_of(report)
    assert (remote["num_fetched_blocks"], remote["num_imported_blocks"],
            remote["num_skipped_blocks"]) == (4, 4, 6)
    fetch_s = (SECOND_AT_S + link.transfer_seconds(4 * BLOCK_BYTES)) + 1e-3 - SECOND_AT_S
    assert second_ttft(report) == pytest.approx(
        fetch_s + MODEL.step_seconds(353 - 128, 0, 4 * BLOCK_BYTES, 0), rel=1e-12)


def test_a_block_is_found_only_once_its_write_is_done() -> None:
    """At 4 MB/s the 10-block write takes about 10.5 s: r1 at 10 s finds nothing, at 20 s
    all 10. A store further behind than max_backlog_s drops the write."""
    slow = RemoteLink(bytes_per_s=4e6, max_backlog_s=3600.0)
    assert remote_of(run(slow))["num_hit_blocks"] == 0
    later = run(slow, workload=make_workload(20.0))
    assert remote_of(later)["num_hit_blocks"] == 10
    assert remote_of(later)["num_dropped_writes"] == 0
    behind = run(RemoteLink(bytes_per_s=4e6, max_backlog_s=0.0),
                 workload=ListWorkload([TraceRequest("a", 0.0, PREFIX + [1], 1),
                                        TraceRequest("b", 0.0, [7] * 321, 1),
                                        TraceRequest("c", 30.0, PREFIX + [2], 1)]))
    assert remote_of(behind)["num_dropped_writes"] > 0


@pytest.mark.parametrize(("kw", "message"), [
    ({"fetch": "sometimes"}, "fetch must be one of"),
    ({"fetch_deadline_s": -1.0}, "fetch_deadline_s must be a number in"),
    ({"remote_link": 5.0}, "remote_link must be a RemoteLink or None"),
])
def test_bad_fetch_arguments_are_refused(kw: dict[str, object], message: str) -> None:
    """fetch, fetch_deadline_s and remote_link are checked, naming the argument."""
    cache = CacheConfig(tokens_per_block=32, num_gpu_blocks=64, num_host_blocks=32)
    with pytest.raises(ValueError, match=message):
        simulate_fleet(make_workload(), cache, 2, remote="write-back", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kw", "message"), [
    ({"latency_s": -1.0}, "latency_s must be a finite number"),
    ({"bytes_per_s": 0.0}, "bytes_per_s must be > 0"),
    ({"bytes_per_s": float("inf")}, "bytes_per_s must be a finite number"),
    ({"max_backlog_s": True}, "max_backlog_s must be a finite number"),
])
def test_remote_link_validates_its_fields(kw: dict[str, object], message: str) -> None:
    """A RemoteLink refuses a bad field, naming it and the value."""
    with pytest.raises(ValueError, match=message):
        RemoteLink(**kw)  # type: ignore[arg-type]


def test_break_even_is_kv_bytes_over_prefill_seconds() -> None:
    """131,072 B / 40 us = 3.28 GB/s; free prefill never pays a fetch back."""
    assert MODEL.break_even_bytes_per_s == 131072 / 40e-6
    free = TimeModel(get_profile("llama3-8b-h100", prefill_s_per_token=0.0))
    assert free.break_even_bytes_per_s == float("inf")


def test_writes_reach_the_store_in_time_order() -> None:
    """i0 decodes 2,000 tokens (about 10 s, writing a block every 32) while i1 prefills at
    1 ms: i1's write comes first on the store's queue, so a store kept under 0.5 s behind
    drops nothing (stepping i0 to the next arrival first once made i1's write look 10 s
    late, and dropped it)."""
    cache = CacheConfig(tokens_per_block=32, num_gpu_blocks=128, num_host_blocks=32)
    workload = ListWorkload([TraceRequest("r0", 0.0, list(range(64)), 2000),
                             TraceRequest("r1", 0.001, PREFIX + [1], 1),
                             TraceRequest("r2", 20.0, [3] * 40, 1)])
    report = simulate_fleet(workload, cache, 2, "round-robin", remote="write-through",
                            remote_link=RemoteLink(bytes_per_s=25e9, max_backlog_s=0.5))
    remote = remote_of(report)
    assert remote["num_dropped_writes"] == 0
    assert remote["num_written_blocks"] == 2 + 62 + 10 + 1
