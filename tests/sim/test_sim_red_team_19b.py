"""Red team 19b, simulator surfaces: the fleet table with extreme values."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import pytest

from kvtier.config import CacheConfig
from kvtier.scheduler import SchedulerConfig
from kvtier.sim import SyntheticChat
from kvtier.sim.fleet import simulate_fleet
from kvtier.sim.fleet_report import FleetReport, format_fleet_report
from kvtier.sim.replay import simulate
from kvtier.sim.report import Summary, estimate_load, format_columns, load_text
from kvtier.sim.timemodel import RemoteLink, get_profile


def make_fleet_report() -> FleetReport:
    """A 2-instance fleet over 20 chat requests (small pools of 32-token blocks)."""
    return simulate_fleet(SyntheticChat(num_requests=20, seed=1),
                          CacheConfig(tokens_per_block=32, num_gpu_blocks=256,
                                      num_host_blocks=64), 2)


def cells(line: str) -> list[str]:
    return re.split(r" {2,}", line.strip())


def test_fleet_table_columns_stay_apart_with_huge_values() -> None:
    """With a TTFT of 1.5e11 s (1.5e14 ms) and 10^12 prefill tokens, as an hours-long
    profile gives, each instance row still reads as 8 cells, each right under its header:
    the fixed widths ran them together (``1,504,851148582186414.0 ms298330283679.2 ms``).
    Times from 1e9 ms read in three digits."""
    report = make_fleet_report()
    huge = Summary(mean=1.5e11, p50=148582186414.0, p90=2e11, p99=298330283679.2)
    instances = [replace(s, ttft_s=huge, num_prefill_tokens=10**12 + i)
                 for i, s in enumerate(report.instances)]
    lines = format_fleet_report(replace(report, instances=instances))
    header, rows = lines[-3], lines[-2:]
    assert cells(header) == ["instance", "routed", "hit rate", "GPU", "host", "prefill tok",
                             "TTFT p50", "TTFT p99"]
    for row, s in zip(rows, instances, strict=True):
        assert cells(row) == [s.instance_id, f"{s.num_routed:,}", f"{s.token_hit_rate:.4f}",
                              f"{s.gpu_token_hit_rate:.4f}", f"{s.host_token_hit_rate:.4f}",
                              f"{s.num_prefill_tokens:,}", "1.49e+14 ms", "2.98e+14 ms"]
        assert len(row) == len(header)  # right-aligned numbers end under their headers


def test_format_columns_takes_widths_from_content() -> None:
    """Each column is as wide as its widest cell, two spaces apart; left columns first."""
    table = [("name", "n"), ("a", "12345"), ("longer", "7")]
    assert format_columns(table, num_left=1) == ["name        n",
                                                 "a       12345",
                                                 "longer      7"]
    assert format_columns(table) == ["  name      n", "     a  12345", "longer      7"]


def test_a_load_near_the_float_range_reads_in_a_few_digits() -> None:
    """Arrivals a --time-scale of 1e-300 packs into 1e-301 s: the utilization (6e301) and
    the instances it would need read in three digits, not 302 each; the estimate is
    unchanged (the JSON keeps every digit)."""
    load = estimate_load(busy_s=6.0, arrival_span_s=1e-301, time_scale=1e-300)
    assert load.utilization == 6.0 / 1e-301
    assert load.sustainable_instances == math.ceil(6.0 / 1e-301)
    assert load_text(load, 1e-300) == (
        "OVERLOADED: arrivals bring 6e+301 x what 1 instance can serve, so latencies are "
        "mostly queueing; sustainable from at least --time-scale 60 (now 1e-300) or "
        "--instances 6e+301")
    small = estimate_load(busy_s=30.0, arrival_span_s=10.0, time_scale=1.0, num_instances=2)
    assert load_text(small, 1.0).startswith("OVERLOADED: arrivals bring 1.50 x what 2 ")
    assert load_text(small, 1.0).endswith("--instances 3")


def test_fetch_costs_below_ten_megabytes_a_second_keep_their_digits() -> None:
    """A break-even of 5.12 B/s (blocks of hours to recompute) and a link of 1e-300 GB/s
    read in three digits (both read "0.00 GB/s", a link "above the break-even 0.00")."""
    report = simulate_fleet(SyntheticChat(num_requests=4, seed=1),
                            CacheConfig(tokens_per_block=32, num_gpu_blocks=256), 2,
                            remote="write-through")
    assert report.remote is not None
    remote = {**report.remote, "bytes_per_s": 0.25e9, "break_even_bytes_per_s": 5.12}
    text = "\n".join(format_fleet_report(replace(report, remote=remote)))
    assert "bytes at 0.25 GB/s, above the break-even 5.12e-09 GB/s;" in text
    remote = {**report.remote, "bytes_per_s": 1e-291, "break_even_bytes_per_s": 3.28e9}
    text = "\n".join(format_fleet_report(replace(report, remote=remote)))
    assert "bytes at 1e-300 GB/s, below the break-even 3.28 GB/s;" in text


def test_a_budget_past_the_float_range_replays() -> None:
    """max_num_tokens=10**400 was a valid budget and raised OverflowError after the first
    step (comparing each step with 0.9 x the budget as a float). Every count is bounded
    now (red team 33c: at most 2**48 tokens, kvtier.counts): 10**400 is refused naming the
    field, and the largest budget replays, no step counting as full."""
    with pytest.raises(ValueError, match=r"^max_num_tokens must be an integer in 1\.\.2\*\*48"):
        SchedulerConfig(max_num_tokens=10**400)
    report = simulate(SyntheticChat(num_requests=5, seed=1),
                      CacheConfig(tokens_per_block=32, num_gpu_blocks=512),
                      SchedulerConfig(max_num_tokens=2**48), profile="tiny-test")
    assert (report.num_requests, report.num_overflow_steps) == (5, 0)
    assert report.cpu["us_per_full_step_mean"] is None


def test_a_fleet_report_with_infinite_costs_is_json_ready() -> None:
    """Where prefill is free the break-even rate is infinite; on a link of 1e-320 GB/s a
    whole-prefix fetch never lands. Both are valid options: the JSON form has them as null
    (json.dumps refused them, and ``kvtier replay`` ended with an internal error, status
    70, after the table); the other numbers are kept."""
    profile = replace(get_profile("tiny-test"), prefill_s_per_token=0.0)
    report = simulate_fleet(SyntheticChat(num_requests=6, seed=1),
                            CacheConfig(tokens_per_block=32, num_gpu_blocks=256), 2,
                            profile=profile, remote="write-through")
    assert report.remote is not None and report.remote["break_even_bytes_per_s"] == math.inf
    document = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert document["remote"]["break_even_bytes_per_s"] is None
    assert document["remote"]["bytes_per_s"] == report.remote["bytes_per_s"]
    slow = simulate_fleet(SyntheticChat(num_requests=12, seed=1),
                          CacheConfig(tokens_per_block=32, num_gpu_blocks=256), 2,
                          profile="tiny-test", remote="write-through", fetch="whole-prefix",
                          remote_link=RemoteLink(bytes_per_s=1e-311))
    assert slow.remote is not None
    fetch_s = slow.remote["fetch_s"]
    assert isinstance(fetch_s, dict) and fetch_s["p99"] == math.inf
    document = json.loads(json.dumps(slow.to_dict(), allow_nan=False))
    assert document["remote"]["fetch_s"]["p99"] is None
    assert document["num_requests"] == slow.num_requests == 12


def test_times_and_rates_past_a_billion_read_in_three_digits() -> None:
    """A TTFT of 1.8e302 s (a fetch over a link of 1e-300 GB/s) and a break-even of 1e304
    GB/s (prefill at 1e-300 s a token) read in three digits, not 300; smaller ones as
    before."""
    report = simulate_fleet(SyntheticChat(num_requests=4, seed=1),
                            CacheConfig(tokens_per_block=32, num_gpu_blocks=256), 2,
                            remote="write-through")
    assert report.remote is not None
    remote = {**report.remote, "bytes_per_s": 2.5e8, "break_even_bytes_per_s": 1.024e303,
              "fetch_s": {"mean": 1.835e302, "p50": 1.835e302, "p90": 0.5, "p99": 2e-3}}
    text = "\n".join(format_fleet_report(replace(report, remote=remote)))
    assert ("bytes at 0.25 GB/s, below the break-even 1.02e+294 GB/s; fetch p50 1.83e+305 "
            "ms, p99 2.0 ms") in text
    load = estimate_load(busy_s=3e300, arrival_span_s=1e301, time_scale=1.0)
    assert load_text(load, 1.0) == ("0.30 x what 1 instance can serve (busy 3e+300 s over "
                                     "1e+301 s of arrivals)")
    load = estimate_load(busy_s=12.5, arrival_span_s=9.99e8, time_scale=1.0)
    assert load_text(load, 1.0).endswith("(busy 12.50 s over 999000000.00 s of arrivals)")
