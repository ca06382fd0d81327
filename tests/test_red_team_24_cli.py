"""Red team 24a, the simulator's and the command line's half: the figures of a report
against what the steps did (a preempted request's recompute is no query, yet it is work)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from kvtier import CacheConfig, Scheduler, SchedulerConfig
from kvtier.cli import main
from kvtier.sim import MixedWorkload, SyntheticChat
from kvtier.sim.fleet import simulate_fleet
from kvtier.sim.fleet_report import format_fleet_report
from kvtier.sim.race import RaceWorkload
from kvtier.sim.workload import TraceRequest


def test_a_fleets_prefill_tokens_count_a_preempted_requests_recompute(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Both instances preempt (max_utilization, 112 GPU blocks each). Their prefill tokens
    (the balance's measure of work) must sum to what the steps' prefill chunks computed:
    they were the queries' prompt less reuse, which since a resumed admission is no query
    left the recompute out (48,225 of 48,235)."""
    computed: list[int] = []
    update = Scheduler.update

    def counted(self: Scheduler, step: Any, sampled: Any, stopped: Any = ()) -> Any:
        computed.append(sum(c.num_tokens for c in step.context_chunks))
        return update(self, step, sampled, stopped)

    monkeypatch.setattr(Scheduler, "update", counted)
    report = simulate_fleet(SyntheticChat(num_requests=60, max_output_tokens=200),
                            CacheConfig(tokens_per_block=32, num_gpu_blocks=112,
                                        num_host_blocks=32), 2,
                            sched=SchedulerConfig(capacity_policy="max_utilization"))
    assert all(s.num_preemptions for s in report.instances)
    assert sum(s.num_prefill_tokens for s in report.instances) == sum(computed)


def test_a_fleet_reports_the_race_of_probe_admission() -> None:
    """Probe admission in a fleet (``kvtier replay --admission probe --instances N``): one
    instance's step lost 480 tokens of credited reuse and ran 480 past max_num_tokens,
    which is what probe admission is run to show, yet the fleet's table and JSON had no
    word of it (no reuse, overflow or preemption figure)."""
    cache = CacheConfig(num_gpu_blocks=1024, num_host_blocks=16)
    report = simulate_fleet(RaceWorkload(cache), cache, 1, policy="round-robin",
                            sched=SchedulerConfig(admission="probe"))
    figures = report.to_dict()
    assert (figures["num_credited_tokens"], figures["num_obtained_tokens"],
            figures["num_lost_reuse_tokens"]) == (512, 32, 480)
    assert (figures["num_overflow_steps"], figures["num_overflow_tokens"],
            figures["max_overflow_tokens"]) == (1, 480, 480)
    lines = format_fleet_report(report)
    assert "reuse       credited 512, obtained 32, lost 480 tokens" in lines
    assert "overflow    1 steps over max_num_tokens, 480 tokens, worst 480" in lines


def test_a_fleet_reports_its_preemptions_and_their_recompute() -> None:
    """Instances that preempt: the fleet's requests line and JSON count the preemptions and
    what they recomputed (in no hit rate), as one replay's do."""
    report = simulate_fleet(SyntheticChat(num_requests=60, max_output_tokens=200),
                            CacheConfig(tokens_per_block=32, num_gpu_blocks=112,
                                        num_host_blocks=32), 2,
                            sched=SchedulerConfig(capacity_policy="max_utilization"))
    assert report.num_preemptions == sum(s.num_preemptions for s in report.instances) > 0
    assert report.num_resumed_prompt_tokens >= report.num_resumed_reused_tokens > 0
    requests = format_fleet_report(report)[1]
    assert requests == (f"requests    {report.num_requests:,} finished, "
                        f"{report.num_rejected_too_large} too large; "
                        f"{report.num_preemptions:,} preemptions (recomputing "
                        f"{report.num_resumed_prompt_tokens:,} tokens, "
                        f"{report.num_resumed_reused_tokens:,} found cached: in no hit rate)")


class _Part:
    """A workload of two one-block requests, at 0 s and 1 s, with the given ids."""

    def __init__(self, name: str, ids: list[str]) -> None:
        self.name = name
        self.ids = ids

    def __iter__(self) -> Iterator[TraceRequest]:
        for i, rid in enumerate(self.ids):
            yield TraceRequest(rid, float(i), [1, 2, 3, 4, 5], 2, None)

    def describe(self) -> dict[str, object]:
        return {"name": self.name}


def test_a_mixed_workload_refuses_a_part_name_its_ids_could_not_tell_apart() -> None:
    """Parts named "a" and "a/b" (distinct names, so taken) gave their requests "b/c" and
    "c" one id, "a/b/c": the replay was refused at its second request, as a workload with
    an id twice. A name holding "/" is refused when the mix is made, naming it."""
    with pytest.raises(ValueError, match=r"^parts\[1\] has the name 'a/b': a part's name "
                       r"must be a non-empty string without '/' \(it prefixes its "
                       r"requests' ids, 'name/id'\)$"):
        MixedWorkload((_Part("a", ["b/c", "x"]), _Part("a/b", ["c", "y"])))
    mix = MixedWorkload((_Part("a", ["b/c", "x"]), _Part("b", ["c", "y"])))
    assert [r.request_id for r in mix] == ["a/b/c", "b/c", "a/x"]  # until a part ends


def test_a_sweep_of_probe_admission_shows_its_race(capsys: pytest.CaptureFixture[str]) -> None:
    """``kvtier sweep --workload race --admission probe``: each run lost credited reuse and
    ran a step past max_num_tokens (the JSON says so), yet the table, the sweep's human
    output, had no column for it. With a probe run it has both, each row its run's."""
    assert main(["sweep", "--workload", "race", "--gpu-blocks", "1024", "--host-blocks",
                 "16,32", "--admission", "probe", "--no-progress", "--no-oracle"]) == 0
    lines = capsys.readouterr().out.splitlines()
    runs = json.loads(lines[-1])["runs"]
    assert lines[0].split()[-5:] == ["tokens/s", "overflow", "steps", "lost", "reuse"]
    for row, run in zip(lines[1:3], runs, strict=True):
        assert run["num_overflow_steps"] == 1 and run["num_lost_reuse_tokens"] > 0
        assert row.split()[-2:] == [f"{run['num_overflow_steps']:,}",
                                    f"{run['num_lost_reuse_tokens']:,}"]
