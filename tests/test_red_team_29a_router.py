"""Red team 29a, the router and its event feed: per-instance state bounded by the live
instances, restarts seen without their seq 0, and fleet figures of what was served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtier.cli import main
from kvtier.config import CacheConfig
from kvtier.scheduler import SchedulerConfig
from kvtier.sim.fleet import simulate_fleet
from kvtier.sim.fleet_report import format_fleet_report
from kvtier.sim.workload import TraceRequest
from list_workload import ListWorkload

# ---- the fleet counts only what it served ------------------------------------------------------


def _fleet_workload() -> ListWorkload:
    """Ten requests, one every second; r1, r4 and r7 need more than the 8 GPU blocks of 4
    tokens an instance has (40 tokens: 10 blocks with their output)."""
    requests = []
    for k in range(10):
        size = 40 if k in (1, 4, 7) else 8
        requests.append(TraceRequest(f"r{k}", float(k), [1000 * k + t for t in range(size)], 2))
    return ListWorkload(requests)


def test_a_fleet_counts_skipped_requests_apart_from_those_it_routed() -> None:
    """Round robin over two instances: the three requests too large for any instance were
    routed first and skipped by the instance they reached: i0 read 5 routed and i1 5
    (3 of them skipped), the router's stats 10 routed. Now they are skipped before
    routing: 7 routed (4 and 3, in turn), 3 skipped, the router's stats 7."""
    cache = CacheConfig(tokens_per_block=4, num_gpu_blocks=8, num_host_blocks=0)
    report = simulate_fleet(_fleet_workload(), cache, 2, "round-robin",
                            SchedulerConfig(max_batch_size=4))
    assert [s.num_routed for s in report.instances] == [4, 3]
    assert [s.num_requests for s in report.instances] == [4, 3]
    assert report.num_requests == 7 and report.num_rejected_too_large == 3
    assert report.router_stats["num_routed"] == 7
    assert report.router_stats["per_instance"] == {"i0": 4, "i1": 3}
    assert report.requests_max_over_mean == 4 / 3.5
    lines = format_fleet_report(report)
    assert lines[1].startswith("requests    7 finished, 3 too large;")
    assert "requests max/mean 1.14" in lines[5]


def test_the_fleet_table_and_json_agree_on_what_was_served(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``kvtier replay --instances 2``: six requests, two of them past the 64 GPU blocks
    of 32 tokens (3,000 tokens): the table's routed column and the JSON's per-instance
    counts read 4 and 2 (3 and 3 before, skipped ones included), the router's stats 4."""
    path = tmp_path / "trace.csv"
    rows = [(100, 4), (3000, 4), (100, 4), (3000, 4), (100, 4), (100, 4)]
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:15:{10 + k:02d},{n},{m}\n" for k, (n, m) in enumerate(rows)))
    code, out, _ = _run_cli(capsys, "replay", str(path), "--no-progress", "--instances", "2",
                            "--router", "round-robin", "--gpu-blocks", "64", "--host-blocks", "0",
                            "--json", str(tmp_path / "report.json"))
    assert code == 0
    table = out.splitlines()
    assert table[1].startswith("requests    4 finished, 2 too large;")
    rows_out = [line.split()[:2] for line in table if line.startswith("i")
                and line.split()[0] in ("i0", "i1")]
    assert rows_out == [["i0", "2"], ["i1", "2"]]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["num_routed"] for s in report["instances"]] == [2, 2]
    assert report["num_rejected_too_large"] == 2 and report["num_requests"] == 4
    assert report["router_stats"]["num_routed"] == 4
    assert report["requests_max_over_mean"] == 1.0


def _run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


