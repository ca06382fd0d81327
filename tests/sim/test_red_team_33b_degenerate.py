"""Red team 33b: ``kvtier replay``, ``compare`` and ``sweep`` on degenerate workloads (one
request, identical requests, one-token prompts, one output token, every request refused,
nothing left after --limit, idle fleet instances, a time model that costs nothing): every
figure finite and of its documented type, exact where the time model fixes it, and a clear
refusal (status 2, no traceback) where nothing can run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from kvtier.cli import main

# llama3-8b-h100, the default profile: 5 ms a step, 40 us a prefill token.
STEP_S, PREFILL_S = 0.005, 4e-05


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_trace(path: Path, rows: list[tuple[int, int, int, list[int]]]) -> str:
    """A Mooncake trace of ``(timestamp ms, input length, output length, hash ids)``."""
    path.write_text("".join(json.dumps({"timestamp": t, "input_length": n, "output_length": o,
                                        "hash_ids": ids}) + "\n" for t, n, o, ids in rows))
    return str(path)


def non_finite(value: Any, path: str = "") -> list[str]:
    """Every path in ``value`` to a float that is NaN or infinite."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in non_finite(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in non_finite(v, f"{path}[{i}]")]
    return []


def report_of(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[list[str], dict[str, Any]]:
    """The text lines and the JSON line of a run that must succeed, every float checked."""
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    lines = out.splitlines()
    document = json.loads(lines[-1])
    assert non_finite(document) == []
    text = "\n".join(lines[:-1]).lower()
    assert "nan" not in text.replace("n/a", "") and "inf" not in text
    return lines[:-1], document


def summary(value: float) -> dict[str, float]:
    return {"mean": value, "p50": value, "p90": value, "p99": value}


def close(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-12) for k in a)


def test_one_request_of_one_output_token(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "one.jsonl", [(0, 512, 1, [1])])
    _, r = report_of(capsys, "replay", trace)
    assert (r["num_requests"], r["num_steps"], r["num_prompt_tokens"],
            r["num_output_tokens"]) == (1, 1, 512, 1)
    assert (r["token_hit_rate"], r["gpu_token_hit_rate"], r["host_token_hit_rate"]) == (0.0,) * 3
    assert (r["gpu"]["hit_rate"], r["host"]["hit_rate"]) == (0.0, 0.0)
    ttft = STEP_S + 512 * PREFILL_S  # one step computes the prompt and its only token
    assert close(r["ttft_s"], summary(ttft)) and close(r["e2e_s"], summary(ttft))
    assert math.isclose(r["throughput_tokens_per_s"], 513 / ttft)
    assert math.isclose(r["requests_per_s"], 1 / ttft)
    # Every request at once: no arrival span to divide by, the load stated as none.
    assert r["load"] == {"busy_s": pytest.approx(ttft), "arrival_span_s": 0.0,
                         "num_instances": 1, "utilization": None, "overloaded": False,
                         "sustainable_time_scale": None, "sustainable_instances": None}
    assert (r["cpu"]["us_per_full_step_mean"], r["cpu"]["us_per_full_step_p99"]) == (None, None)
    assert r["oracle"]["unlimited_hit_rate"] == 0.0


def test_identical_requests_reuse_all_but_their_last_token(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "same.jsonl", [(10 * i, 1024, 1, [1, 2]) for i in range(5)])
    _, r = report_of(capsys, "replay", trace)
    assert r["num_requests"] == 5
    assert r["num_reused_tokens"] == r["num_gpu_hit_tokens"] == 4 * 1023
    assert r["token_hit_rate"] == 4 * 1023 / 5120
    assert r["host_token_hit_rate"] == 0.0


def test_one_token_prompts_reuse_nothing(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "tiny.jsonl", [(10 * i, 1, 1, [7]) for i in range(3)])
    _, r = report_of(capsys, "replay", trace)
    assert (r["num_requests"], r["num_prompt_tokens"], r["num_reused_tokens"]) == (3, 3, 0)
    assert r["token_hit_rate"] == 0.0
    assert close(r["ttft_s"], summary(STEP_S + PREFILL_S))


def test_zero_output_tokens_and_a_free_time_model(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    """A time model that costs nothing: a makespan of 0 s, throughputs 0, not x / 0."""
    trace = write_trace(tmp_path / "free.jsonl", [(0, 512, 0, [1])])
    _, r = report_of(capsys, "replay", trace, "--set-profile", "step_overhead_s=0",
                     "--set-profile", "prefill_s_per_token=0",
                     "--set-profile", "decode_s_per_seq=0")
    assert r["makespan_s"] == 0.0
    assert (r["throughput_tokens_per_s"], r["output_tokens_per_s"],
            r["requests_per_s"]) == (0.0, 0.0, 0.0)
    assert r["ttft_s"] == summary(0.0)


def test_idle_fleet_instances_have_no_percentiles(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "one.jsonl", [(0, 512, 1, [1])])
    lines, r = report_of(capsys, "replay", trace, "--instances", "4")
    idle = [i for i in r["instances"] if i["num_routed"] == 0]
    assert len(idle) == 3
    for instance in idle:
        assert (instance["token_hit_rate"], instance["gpu_token_hit_rate"],
                instance["host_token_hit_rate"]) == (0.0, 0.0, 0.0)
        assert instance["ttft_s"] == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert r["requests_max_over_mean"] == 4.0
    assert sum(line.split()[2:] == ["n/a"] * 3 + ["0", "n/a", "n/a"] for line in lines) == 3


@pytest.mark.parametrize("command", ["replay", "compare", "sweep"])
def test_every_request_refused_is_a_usage_error(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path, command: str) -> None:
    trace = write_trace(tmp_path / "huge.jsonl",
                        [(10 * i, 512 * 200, 5, list(range(200))) for i in range(3)])
    code, out, err = run_cli(capsys, command, trace, "--gpu-blocks", "16")
    assert code == 2
    assert out == ""
    assert err.strip().splitlines()[-1] == (
        "kvtier: error: all 3 requests are too large for 16 GPU blocks of 32 tokens; raise "
        "--gpu-blocks")


@pytest.mark.parametrize("command", ["replay", "compare", "sweep"])
def test_no_requests_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                      command: str) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    code, out, err = run_cli(capsys, command, str(empty))
    assert (code, out) == (2, "")
    assert err.strip() == f"kvtier: error: no requests in {empty}"
    code, out, err = run_cli(capsys, command, "--limit", "0")
    assert (code, out) == (2, "")
    assert "argument --limit: must be an integer >= 1, got 0" in err


def test_compare_and_sweep_of_one_request(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "one.jsonl", [(0, 512, 1, [1])])
    _, compared = report_of(capsys, "compare", trace)
    _, swept = report_of(capsys, "sweep", trace)
    reports = [run["report"] for run in compared["runs"]] + swept["runs"]
    assert len(reports) == 7
    for r in reports:
        assert (r["num_requests"], r["token_hit_rate"]) == (1, 0.0)
        assert close(r["ttft_s"], summary(STEP_S + 512 * PREFILL_S))


def test_a_free_prefill_and_a_fetch_that_never_lands_read_as_words(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Where prefill costs nothing the break-even rate is infinite, and on a link of
    1e-311 B/s a whole-prefix fetch never lands (p99 infinite): the JSON line has them as
    null, and the table said 'below the break-even inf GB/s' and 'p99 inf ms'."""
    trace = write_trace(tmp_path / "same.jsonl", [(10 * i, 1024, 1, [1, 2]) for i in range(5)])
    lines, r = report_of(capsys, "replay", trace, "--instances", "2", "--remote",
                         "write-back", "--host-blocks", "64",
                         "--set-profile", "prefill_s_per_token=0")
    assert r["remote"]["break_even_bytes_per_s"] is None
    [fetch_cost] = [line for line in lines if line.startswith("fetch cost")]
    assert fetch_cost.startswith("fetch cost  0.1 ms + bytes at 0.25 GB/s, never worth "
                                 "fetching (prefill costs nothing); fetch p50 n/a, p99 n/a")

    from dataclasses import replace

    from kvtier.config import CacheConfig
    from kvtier.sim import SyntheticChat
    from kvtier.sim.fleet import simulate_fleet
    from kvtier.sim.fleet_report import format_fleet_report
    from kvtier.sim.timemodel import RemoteLink, get_profile

    slow = simulate_fleet(SyntheticChat(num_requests=12, seed=1),
                          CacheConfig(tokens_per_block=32, num_gpu_blocks=256), 2,
                          profile="tiny-test", remote="write-through", fetch="whole-prefix",
                          remote_link=RemoteLink(bytes_per_s=1e-311))
    assert slow.remote is not None
    fetch_s = slow.remote["fetch_s"]
    assert isinstance(fetch_s, dict) and fetch_s["p99"] == math.inf
    text = "\n".join(format_fleet_report(slow))
    assert "inf" not in text.replace("info", "")
    assert ", p99 never (from arrival" in text
    free = simulate_fleet(SyntheticChat(num_requests=6, seed=1),
                          CacheConfig(tokens_per_block=32, num_gpu_blocks=256), 2,
                          profile=replace(get_profile("tiny-test"), prefill_s_per_token=0.0),
                          remote="write-through")
    assert "inf" not in "\n".join(format_fleet_report(free)).replace("info", "")
