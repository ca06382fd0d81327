"""Red team, eleventh pass: the command line, given options an adversary would."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest

from bad_input_helpers import assert_one_line_refusal, run_cli
from kvtier.cli import main
from kvtier.cli_config import MAX_SWEEP_RUNS
from kvtier.sim.report import estimate_load
from kvtier.sim.workload import MAX_ARRIVAL_S, TraceRequest


def test_a_sweep_of_millions_of_runs_is_refused_before_any() -> None:
    """``sweep --gpu-blocks <3,000 sizes> --host-blocks <3,000 sizes>`` built 9 M run
    configurations (minutes, over a GB) before simulating anything. Now the number of runs
    is bounded and refused at once, naming the options and the product."""
    sizes = ",".join(str(n) for n in range(100, 3100))
    code, err = run_cli(["sweep", "--limit", "2", "--gpu-blocks", sizes, "--host-blocks", sizes,
                         "--no-progress"])
    assert_one_line_refusal(code, err, "--eviction-policy/--gpu-blocks/--host-blocks",
                            "1 x 3,000 x 3,000 = 9,000,000 runs",
                            f"the {MAX_SWEEP_RUNS:,} one sweep may make")


def test_a_sweep_at_the_bound_is_not_refused_for_its_size() -> None:
    """The bound refuses only what passes it: 2 policies x 512 x 1 sizes is allowed (it
    then fails on the one-block GPU tier, which proves it got past the check)."""
    sizes = ",".join(str(n) for n in range(1, 513))
    code, err = run_cli(["sweep", "--limit", "2", "--eviction-policy", "lru,arc",
                         "--gpu-blocks", sizes, "--host-blocks", "0", "--no-oracle",
                         "--no-progress"])
    assert_one_line_refusal(code, err, "too large for 1 GPU blocks")


@pytest.mark.parametrize(("argv", "option"), [
    (["replay", "--limit", "3"], "--json"),
    (["sweep", "--limit", "3", "--gpu-blocks", "1024", "--host-blocks", "0", "--no-oracle"],
     "--json"),
    (["sweep", "--limit", "3", "--gpu-blocks", "1024", "--host-blocks", "0", "--no-oracle"],
     "--plot"),
])
def test_an_output_that_fails_after_the_run_loses_no_result(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        argv: list[str], option: str) -> None:
    """The disk fills up during a run: the --json (or --plot) write failed with the table
    and the JSON line not printed yet, the run's results lost. Now the report is printed
    first (its JSON line last on stdout), then the write fails in one line, status 2."""
    if option == "--plot":
        pytest.importorskip("matplotlib", reason="--plot needs the plot extra")
        import kvtier.cli

        def disk_full(*args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(kvtier.cli, "plot_sweep", disk_full)
    else:
        real_write = Path.write_text

        def write_text(self: Path, *args: Any, **kwargs: Any) -> int:
            if self.name == "out" or self.name.startswith(".out."):  # or its temporary
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setenv("KVTIER_DEBUG", "1")
    target = tmp_path / ("out" if option == "--json" else "out.png")
    code = main([*argv, option, str(target), "--no-progress"])
    out, err = capsys.readouterr()
    assert_one_line_refusal(code, err, f"cannot write {target}: No space left on device "
                                       "(the report is on standard output)")
    document = json.loads(out.strip().splitlines()[-1])
    assert document.get("command", "replay") in ("replay", "sweep")
    assert "hit rate" in out.lower()  # the table came before it


def test_a_time_scale_that_packs_arrivals_into_no_time_is_every_request_at_once(
        capsys: pytest.CaptureFixture[str]) -> None:
    """``replay --time-scale 1e-308``: the arrivals spanned 1e-309 s, a busy time over it
    overflowed to inf and math.ceil(inf) raised OverflowError: status 70, the run lost.
    Now the load reads as for a span of 0: every request arrives at once."""
    code = main(["replay", "--limit", "5", "--time-scale", "1e-308", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "load        every request arrives at once" in out
    load = json.loads(out.splitlines()[-1])["load"]
    assert load["utilization"] is None and load["sustainable_instances"] is None


@pytest.mark.parametrize(("busy_s", "span_s", "time_scale", "instances"), [
    (2.0, 1e-309, 1e-308, 1), (1e308, 1e-10, 1.0, 4), (2.0, 1e-300, 1e300, 1),
])
def test_estimate_load_never_overflows(busy_s: float, span_s: float, time_scale: float,
                                       instances: int) -> None:
    """Quotients past the float range (OverflowError from math.ceil, or an inf that the
    JSON report refuses) read as every request arriving at once."""
    load = estimate_load(busy_s, span_s, time_scale, instances)
    assert load.utilization is None and not load.overloaded
    assert load.sustainable_time_scale is None and load.sustainable_instances is None


def test_a_fleet_whose_scaled_arrivals_pass_the_clock_is_refused_naming_the_request() -> None:
    """``replay --instances 2 --time-scale 1e300``: every arrival landed where the virtual
    clock, a float of seconds, loses whole steps: the report said TTFT 0.0 ms. Now refused
    in one line naming the request, its arrival and the scale (1e300 is past the option's
    range since red team 31b; its largest, 1e10, puts these arrivals past the clock)."""
    code, err = run_cli(["replay", "--workload", "agentic", "--limit", "5", "--instances", "2",
                         "--time-scale", "1e10", "--no-progress"])
    assert_one_line_refusal(code, err, "cannot replay: request 'agentic-0' arrives at",
                            "x time scale 1e+10", "lower the time scale")


def test_scaled_arrival_is_the_product_within_the_clock() -> None:
    """The bound is on the product: the latest arrival a workload may have, scaled by 1,
    is still fine; scaled past it (or to inf) it is refused."""
    request = TraceRequest("r", MAX_ARRIVAL_S, [1], 1)
    assert request.scaled_arrival_s(1.0) == MAX_ARRIVAL_S
    assert TraceRequest("r", 2.0, [1], 1).scaled_arrival_s(0.5) == 1.0
    for scale in (1.5, 1e308):
        with pytest.raises(ValueError, match=r"request 'r' arrives at 1e\+10 s"):
            request.scaled_arrival_s(scale)


def test_a_fleet_that_serves_no_request_says_why_in_one_line() -> None:
    """``replay --instances 2 --gpu-blocks 1``: every request too large, and the fleet's
    report of nothing came out with status 0 (one engine's replay refused it). Now the
    same one line, status 2."""
    code, err = run_cli(["replay", "--instances", "2", "--gpu-blocks", "1", "--limit", "5",
                         "--no-progress"])
    assert_one_line_refusal(code, err, "all 5 requests are too large for 1 GPU blocks of 32 "
                                       "tokens; raise --gpu-blocks")


def test_a_fleet_report_of_no_finished_request_has_no_negative_makespan() -> None:
    """With no request finished the last finish (0) came before the first arrival: the
    report said makespan_s -0.78. Now 0."""
    from kvtier.config import CacheConfig
    from kvtier.router import make_policy
    from kvtier.scheduler import SchedulerConfig
    from kvtier.sim import SyntheticChat, get_profile
    from kvtier.sim.fleet import simulate_fleet

    report = simulate_fleet(SyntheticChat(num_requests=5), CacheConfig(num_gpu_blocks=1), 2,
                            make_policy("round-robin"), SchedulerConfig(),
                            get_profile("llama3-8b-h100"))
    assert report.num_requests == 0 and report.num_rejected_too_large == 5
    assert report.makespan_s == 0.0


def test_a_single_replay_has_no_negative_makespan_nor_arrivals_past_the_clock() -> None:
    """simulate() with every request too large: makespan_s -0.78; with time_scale 1e300:
    every latency 0.0 (the clock lost whole steps), where the fleet now refuses."""
    from kvtier.config import CacheConfig
    from kvtier.scheduler import SchedulerConfig
    from kvtier.sim import SyntheticChat, get_profile, simulate

    profile = get_profile("llama3-8b-h100")
    report = simulate(SyntheticChat(num_requests=5), CacheConfig(num_gpu_blocks=1),
                      SchedulerConfig(), profile)
    assert report.makespan_s == 0.0
    with pytest.raises(ValueError, match=r"past the 1e\+10 s"):
        simulate(SyntheticChat(num_requests=5), CacheConfig(num_gpu_blocks=1024),
                 SchedulerConfig(), profile, 1e10)
