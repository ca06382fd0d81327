"""N instances behind a router: cache-aware routing against the baselines, the load bound,
resync under a lossy event bus, and determinism."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvtier.config import CacheConfig
from kvtier.remote.store import FaultyRemoteStore, InMemoryRemoteStore
from kvtier.router import CacheAware
from kvtier.sim import SyntheticChat
from kvtier.sim.fleet import simulate_fleet, stand_in_namespace
from kvtier.sim.fleet_report import FleetReport, format_fleet_report
from kvtier.sim.timemodel import RemoteLink
from kvtier.sim.workload import TraceRequest
from list_workload import ListWorkload

NUM_INSTANCES = 4


def make_workload() -> SyntheticChat:
    """300 chat requests with shared system prompts and multi-turn sessions, 8 per second."""
    return SyntheticChat(num_requests=300, seed=3, arrival_rate_per_s=8.0)


def make_cache() -> CacheConfig:
    """Small pools: 768 GPU + 256 host blocks of 32 tokens per instance."""
    return CacheConfig(tokens_per_block=32, num_gpu_blocks=768, num_host_blocks=256)


def run(policy: str | CacheAware, **kw: Any) -> FleetReport:
    return simulate_fleet(make_workload(), make_cache(), NUM_INSTANCES, policy, **kw)


@pytest.fixture(scope="module")
def reports() -> dict[str, FleetReport]:
    return {name: run(name, check_every=25)
            for name in ("round-robin", "least-loaded", "cache-aware")}


def test_every_request_finishes_on_some_instance(reports: dict[str, FleetReport]) -> None:
    """Each policy serves all requests; per-instance counts add up to the total."""
    for report in reports.values():
        assert report.num_requests + report.num_rejected_too_large == 300
        assert sum(s.num_routed for s in report.instances) == 300
        assert sum(s.num_prompt_tokens for s in report.instances) == report.num_prompt_tokens
        assert report.events["num_gaps"] == 0 and report.events["num_index_inconsistent"] == 0


def test_cache_aware_beats_round_robin_within_the_load_bound(
        reports: dict[str, FleetReport]) -> None:
    """Cache-aware routing has a clearly higher hit rate than round-robin and least-loaded,
    never exceeds its load bound, and keeps requests within 1.5x of the mean."""
    aware, rr, ll = reports["cache-aware"], reports["round-robin"], reports["least-loaded"]
    assert aware.token_hit_rate > rr.token_hit_rate + 0.1
    assert aware.token_hit_rate > ll.token_hit_rate + 0.1
    assert aware.num_over_load_bound == 0
    assert aware.requests_max_over_mean <= 1.5
    assert aware.ttft_s.p50 is not None and rr.ttft_s.p50 is not None
    assert aware.ttft_s.p50 <= rr.ttft_s.p50
    stats = aware.router_stats
    assert stats["num_best_prefix"] > 0.9 * stats["num_with_prefix"]  # type: ignore[operator]


def test_round_robin_spreads_requests_evenly(reports: dict[str, FleetReport]) -> None:
    """Round-robin routes exactly 75 requests to each of 4 instances."""
    assert [s.num_routed for s in reports["round-robin"].instances] == [75] * 4


def test_lossy_bus_resyncs_and_keeps_routing_well(reports: dict[str, FleetReport]) -> None:
    """A 64-event subscriber buffer forces gaps; snapshots repair the index and the hit rate
    stays well above round-robin."""
    lossy = run("cache-aware", max_bus_events=64)
    assert lossy.events["num_gaps"] > 0 and lossy.events["num_resyncs"] > 0
    assert lossy.token_hit_rate > reports["round-robin"].token_hit_rate + 0.1
    assert lossy.num_over_load_bound == 0


def test_fleet_is_deterministic(reports: dict[str, FleetReport]) -> None:
    """The same inputs give the same report, but for wall time."""
    again = run("cache-aware").to_dict()
    first = reports["cache-aware"].to_dict()
    again.pop("wall_s")
    first.pop("wall_s")
    assert again == first
    json.dumps(first)  # JSON-ready


def test_table_names_every_instance(reports: dict[str, FleetReport]) -> None:
    """The human table has a row per instance and the router's name."""
    lines = format_fleet_report(reports["cache-aware"])
    assert "router cache-aware" in lines[0]
    assert [line.split()[0] for line in lines[-NUM_INSTANCES:]] == ["i0", "i1", "i2", "i3"]


def test_bad_arguments_are_refused() -> None:
    """num_instances and the policy name are validated."""
    with pytest.raises(ValueError, match="num_instances must be an integer >= 1, got 0"):
        simulate_fleet(make_workload(), make_cache(), 0)
    with pytest.raises(ValueError, match="router must be one of"):
        simulate_fleet(make_workload(), make_cache(), 2, "random")


def test_shared_remote_tier_lifts_round_robin() -> None:
    """On a link above the break-even (25 GB/s), a write-through remote tier shared by the
    fleet lets round-robin reuse prefixes another instance computed: its hit rate rises to
    cache-aware routing's, through host imports; write-back shares only what instances
    evict, and still helps."""
    workload = SyntheticChat(num_requests=300, seed=0)
    cache = CacheConfig(num_gpu_blocks=768, num_host_blocks=256)
    fast = RemoteLink(bytes_per_s=25e9)
    alone = simulate_fleet(workload, cache, 4, "round-robin")
    back = simulate_fleet(workload, cache, 4, "round-robin", remote="write-back",
                          remote_link=fast)
    through = simulate_fleet(workload, cache, 4, "round-robin", remote="write-through",
                             check_every=25, remote_link=fast)
    aware = simulate_fleet(workload, cache, 4, "cache-aware")
    assert alone.remote is None
    assert through.remote is not None and back.remote is not None
    assert int(through.remote["num_imported_blocks"]) > 0  # type: ignore[call-overload]
    assert alone.token_hit_rate < back.token_hit_rate < through.token_hit_rate
    assert through.token_hit_rate >= aware.token_hit_rate - 0.01
    assert through.host_token_hit_rate > alone.host_token_hit_rate
    with pytest.raises(ValueError, match="remote must be None or one of"):
        simulate_fleet(workload, cache, 2, remote="sometimes")  # type: ignore[arg-type]


def test_store_dying_mid_run_is_reported() -> None:
    """A shared store that goes down half way: the fleet keeps serving (lookups miss,
    writes fail) and the report counts the store's errors, in the table and the JSON."""
    workload = SyntheticChat(num_requests=120, seed=0)
    cache = CacheConfig(num_gpu_blocks=768, num_host_blocks=256)
    store = FaultyRemoteStore(InMemoryRemoteStore(stand_in_namespace(cache.tokens_per_block)))
    finished = []

    def progress(n: int) -> None:
        finished.append(n)
        if len(finished) == 60:
            store.down = True  # the server dies

    report = simulate_fleet(workload, cache, 2, "round-robin", progress=progress,
                            remote="write-through", remote_store=store)
    assert report.num_requests == 120
    assert report.remote is not None
    errors = report.remote["num_store_errors"]
    assert isinstance(errors, int) and errors > 0
    assert errors == store.stats.num_errors
    assert report.remote["num_failed_puts"] == store.stats.num_failed_puts > 0
    assert json.loads(json.dumps(report.to_dict()))["remote"]["num_store_errors"] == errors
    row = next(r for r in format_fleet_report(report) if r.startswith("store"))
    assert row.startswith(f"store       {errors:,} errors, 0 timeouts, "
                          f"{store.stats.num_failed_puts:,} failed writes")


def test_in_memory_shared_tier_reports_no_store_errors() -> None:
    """The in-memory set has no store to fail: its error counters are 0, no store row."""
    report = simulate_fleet(SyntheticChat(num_requests=20, seed=0),
                            CacheConfig(num_gpu_blocks=768, num_host_blocks=256), 2,
                            "round-robin", remote="write-back")
    assert report.remote is not None
    assert [report.remote[k] for k in ("num_store_errors", "num_store_timeouts",
                                       "num_failed_puts", "num_short_circuited")] == [0] * 4
    assert not any(r.startswith("store") for r in format_fleet_report(report))


def test_an_instance_that_served_nothing_shows_no_hit_rate() -> None:
    """One request on two instances: the idle one's table row says n/a for its hit rates
    (it read 0.0000, a cache that missed everything), its JSON keeps 0.0 and routed 0."""
    workload = ListWorkload([TraceRequest("r0", 0.0, list(range(100)), 4)])
    report = simulate_fleet(workload, make_cache(), 2, "round-robin")
    served, idle = report.instances
    assert (served.num_routed, idle.num_routed) == (1, 0)
    assert (idle.num_prompt_tokens, idle.token_hit_rate) == (0, 0.0)
    rows = {line.split()[0]: line.split() for line in format_fleet_report(report)
            if line.startswith(("i0 ", "i1 "))}
    assert rows[idle.instance_id][2:5] == ["n/a", "n/a", "n/a"]
    assert rows[served.instance_id][2:5] == ["0.0000", "0.0000", "0.0000"]
