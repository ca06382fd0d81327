"""Red team round 29d: every row of ``kvtier sweep`` replays the same requests (the race,
sized from the cache, included); a size where nothing fits is refused before any run; the
race's requests fit a small step budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvtier import CacheConfig, cli
from kvtier.cli import main
from kvtier.scheduler import SchedulerConfig
from kvtier.sim import RaceWorkload, simulate

# The race sized for 200 GPU + 50 host blocks (32-token blocks, a step of 8,192 tokens):
# 50 prefixes of one block, fillers, then 50 follow-ups; 104 requests, 12,850 prompt
# tokens, of which the follow-ups can reuse 50 x 32 = 1,600.
RACE_200_50 = {"name": "race", "kind": "race", "num_prefixes": 50, "max_num_tokens": 8192,
               "chunked_prefill": True,
               "num_gpu_blocks": 200, "num_host_blocks": 50}
REUSABLE = 1600 / 12850


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``kvtier ARGV --no-progress``: its status, stdout and stderr."""
    code = main([*argv, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def runs_of(out: str) -> list[dict[str, Any]]:
    """The runs of a sweep's JSON line (the last line)."""
    runs: list[dict[str, Any]] = json.loads(out.splitlines()[-1])["runs"]
    return runs


def test_a_race_sweep_replays_one_race_on_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    """Each row replayed a race sized for its own cache: at 200 GPU blocks, 104 requests
    and hit rate 0.1245 with 50 host blocks, 135 and 0.1208 with 200, at 400 + 50 0.0661,
    so a larger cache read as a worse one. Now one race, sized for the smallest GPU and the
    smallest host tier above 0 (in whatever order they are given), runs on every row: the
    hit rate never falls as the cache grows, and 0 host blocks lose the race's reuse."""
    code, out, _ = run_cli(capsys, "sweep", "--workload", "race", "--gpu-blocks", "400,200",
                           "--host-blocks", "200,0,50")
    assert code == 0
    runs = runs_of(out)
    sizes = [(r["cache_config"]["num_gpu_blocks"], r["cache_config"]["num_host_blocks"])
             for r in runs]
    assert sizes == [(400, 200), (400, 0), (400, 50), (200, 200), (200, 0), (200, 50)]
    assert all(r["workload"] == RACE_200_50 for r in runs)
    assert [(r["num_requests"], r["num_prompt_tokens"]) for r in runs] == [(104, 12850)] * 6
    assert [r["token_hit_rate"] for r in runs] == [REUSABLE] * 4 + [0.0, REUSABLE]
    # 400 GPU blocks keep every prefix on the GPU; 200 + 200 keep them on the host.
    assert [r["host_token_hit_rate"] for r in runs] == [0.0] * 3 + [REUSABLE, 0.0, REUSABLE]
    assert {r["oracle"]["unlimited_hit_rate"] for r in runs} == {REUSABLE}
    table = out.splitlines()[1:7]
    assert [line.split()[:3] for line in table] == [
        ["400", "200", "0.1245"], ["400", "0", "0.1245"], ["400", "50", "0.1245"],
        ["200", "200", "0.1245"], ["200", "0", "0.0000"], ["200", "50", "0.1245"]]


def test_the_race_sweeps_sizing_row_is_kvtier_replay(capsys: pytest.CaptureFixture[str]) -> None:
    """The row the race is sized for is the replay at its settings, bounds included."""
    code, out, _ = run_cli(capsys, "sweep", "--workload", "race", "--gpu-blocks", "300,200",
                           "--host-blocks", "50")
    assert code == 0
    sweep = runs_of(out)[1]
    code, out, _ = run_cli(capsys, "replay", "--workload", "race", "--gpu-blocks", "200",
                           "--host-blocks", "50")
    assert code == 0
    replay = json.loads(out.splitlines()[-1])
    assert {k: v for k, v in sweep.items() if k != "cpu"} == {
        k: v for k, v in replay.items() if k != "cpu"}


def test_a_probe_sweep_of_the_race_shows_what_capacity_does_to_it(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Probe admission on the race sized for 200 + 50: at that size it loses 1,568 credited
    tokens (hit rate 32 / 12,850); a host tier of 200 holds every prefix, so the same
    requests lose none. Sized per row, the 200 row was another race (64 prefixes, 2,016
    tokens lost), so the rows compared two workloads."""
    code, out, _ = run_cli(capsys, "sweep", "--workload", "race", "--gpu-blocks", "200",
                           "--host-blocks", "200,50", "--admission", "probe", "--no-oracle")
    assert code == 0
    runs = runs_of(out)
    assert [r["num_lost_reuse_tokens"] for r in runs] == [0, 1568]
    assert [r["token_hit_rate"] for r in runs] == [REUSABLE, 32 / 12850]
    assert all(r["workload"] == RACE_200_50 for r in runs)


@pytest.mark.parametrize("chunked", [False, True])
def test_the_race_fits_a_small_step_budget(chunked: bool) -> None:
    """A step of 1,024 tokens without chunked prefill skipped the race's fillers (8,192
    tokens each) as too large: 4 of 132 requests, nothing offloaded, no follow-up onboarded,
    and probe admission lost nothing (hit rate 0.3951, all of it on the GPU). Each filler
    is now within the step: probe loses 2,016 of the 2,048 credited tokens and overflows,
    claim obtains them all; with chunked prefill the outcome is what it was."""
    cache = CacheConfig(num_gpu_blocks=1024, num_host_blocks=64)
    workload = RaceWorkload(cache, max_num_tokens=1024)
    assert max(len(r.prompt) for r in workload) == 1024
    runs = {adm: simulate(workload, cache, SchedulerConfig(
        max_num_tokens=1024, enable_chunked_prefill=chunked, admission=adm), check_every=50)
        for adm in ("claim", "probe")}
    claim, probe = runs["claim"], runs["probe"]
    assert (claim.num_requests, claim.num_rejected_too_large) == (160, 0)
    assert claim.num_credited_tokens == claim.num_obtained_tokens == 2048
    assert claim.num_host_hit_tokens == 2048 and claim.num_overflow_steps == 0
    assert (probe.num_credited_tokens, probe.num_obtained_tokens) == (2048, 32)
    assert (probe.num_lost_reuse_tokens, probe.num_overflow_steps) == (2016, 1)


def test_a_sweep_refuses_a_size_that_fits_nothing_before_any_run(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """Twelve requests of 32 and 95 blocks, none within 16 GPU blocks: ``--gpu-blocks
    128,16`` ran the 128 row, then refused the whole sweep for the 16 one. Now refused
    before the first run, naming the size; 128,64 runs both rows (4 skipped at 64)."""
    trace = tmp_path / "mixed.jsonl"
    trace.write_text("".join(json.dumps({
        "timestamp": i * 100, "input_length": 3000 if i % 3 == 2 else 1000,
        "output_length": 10, "hash_ids": [1, 2, 3, 4, 5, 6] if i % 3 == 2 else [1, 2]}) + "\n"
        for i in range(12)))
    calls: list[int] = []

    def counted(workload: object, cache: CacheConfig, *args: Any, **kwargs: Any) -> Any:
        calls.append(cache.num_gpu_blocks)
        return simulate(workload, cache, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cli, "simulate", counted)
    code, out, err = run_cli(capsys, "sweep", str(trace), "--gpu-blocks", "128,16",
                             "--host-blocks", "0")
    assert (code, out, calls) == (2, "", [])
    assert err == ("kvtier: error: all 12 requests are too large for 16 GPU blocks of 32 "
                   "tokens; raise --gpu-blocks\n")
    code, out, _ = run_cli(capsys, "sweep", str(trace), "--gpu-blocks", "128,64",
                           "--host-blocks", "0")
    assert (code, calls) == (0, [128, 64])
    assert [r["num_rejected_too_large"] for r in runs_of(out)] == [0, 4]
