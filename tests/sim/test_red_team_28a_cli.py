"""Red team round 28a: the figures of ``replay``, ``compare`` and ``sweep`` agree with each
other and with themselves (tables, JSON lines, ``--json`` files, plots)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvtier.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``kvtier ARGV``: its status, stdout and stderr."""
    code = main([*argv, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(out: str) -> Any:
    return json.loads(out.splitlines()[-1])


def write_trace(path: Path, rows: list[tuple[int, int, list[int]]]) -> Path:
    """A Mooncake-style trace of ``(timestamp ms, input length, hash ids)`` rows."""
    path.write_text("".join(json.dumps({"timestamp": t, "input_length": n, "output_length": 10,
                                        "hash_ids": ids}) + "\n" for t, n, ids in rows))
    return path


def mixed_trace(tmp_path: Path) -> Path:
    """Twelve requests, every third of 95 blocks (32 tokens each) and too large for 64 GPU
    blocks, the others of 32 blocks: what a run serves depends on its GPU size."""
    return write_trace(tmp_path / "mixed.jsonl", [
        (i * 100, 3000, [1, 2, 3, 4, 5, 6]) if i % 3 == 2 else (i * 100, 1000, [1, 2])
        for i in range(12)])


def plotted_lines(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[float], list[Any]]]:
    """Every ``Axes.plot`` call from now on, as (label, x, y)."""
    import matplotlib.axes

    lines: list[tuple[str, list[float], list[Any]]] = []
    original = matplotlib.axes.Axes.plot

    def spy(self: Any, x: Any, y: Any, *args: Any, **kwargs: Any) -> Any:
        lines.append((str(kwargs.get("label")), list(x), list(y)))
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    return lines


def test_sweep_plot_draws_every_runs_bounds_where_gpu_sizes_share_a_capacity(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """64 GPU + 64 host and 128 GPU + 0 are both 128 blocks, but the first skips the large
    requests, so their bounds differ (Belady 0.8750 and 0.8512): the plot kept one per
    capacity, dropping the other run's, and joined the two runs' hit rates by a vertical
    stroke. Every run's hit rate and bounds are now points of a line, no line has two
    points at one capacity, and every line of a split is labelled with its GPU size."""
    pytest.importorskip("matplotlib", reason="--plot needs the plot extra")
    lines = plotted_lines(monkeypatch)
    target = tmp_path / "sweep.png"
    code, out, err = run_cli(capsys, "sweep", str(mixed_trace(tmp_path)), "--gpu-blocks",
                             "64,128", "--host-blocks", "0,64", "--eviction-policy", "lru,arc",
                             "--plot", str(target))
    assert code == 0, err
    runs = last_json(out)["runs"]
    belady = {(r["cache_config"]["num_gpu_blocks"], r["oracle"]["belady_hit_rate"])
              for r in runs}
    assert len({b for _, b in belady}) == 2  # the premise: the bounds differ by GPU size
    for label, x, _ in lines:
        assert len(set(x)) == len(x), f"{label}: two points at one capacity, {x}"

    def drawn(prefix: str, capacity: int, value: float) -> bool:
        return any(label.startswith(prefix) and (capacity, value) in zip(x, y, strict=True)
                   for label, x, y in lines)

    for r in runs:
        cache, oracle = r["cache_config"], r["oracle"]
        capacity = cache["num_gpu_blocks"] + cache["num_host_blocks"]
        gpu = f"{cache['num_gpu_blocks']:,} GPU"
        policy = cache["eviction_policy"]
        assert drawn(f"kvtier {policy} {gpu}", capacity, r["token_hit_rate"])
        assert drawn(f"{policy} {gpu} p50", capacity, r["ttft_s"]["p50"])
        assert drawn(f"{policy} {gpu} p99", capacity, r["ttft_s"]["p99"])
        for prefix, key in (("Belady (offline", "belady_hit_rate"),
                            ("LRU (offline", "lru_hit_rate"), ("unlimited", "unlimited_hit_rate")):
            assert drawn(prefix, capacity, oracle[key]), (prefix, capacity)
            assert any(label.startswith(prefix) and gpu in label for label, _, _ in lines)


def test_sweep_table_shows_the_requests_a_run_skipped_as_too_large(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """At 64 GPU blocks a third of the requests are skipped, and the hit rate over the rest
    (0.8680) read better than 128 blocks serving all (0.8488), the table giving no sign of
    them: a last column counts them, equal to the JSON's."""
    code, out, err = run_cli(capsys, "sweep", str(mixed_trace(tmp_path)), "--gpu-blocks",
                             "64,128", "--host-blocks", "0")
    assert code == 0, err
    table, runs = out.splitlines()[:-1], last_json(out)["runs"]
    assert table[0].split()[-2:] == ["too", "large"]
    assert [int(row.split()[-1]) for row in table[1:]] == [
        r["num_rejected_too_large"] for r in runs] == [4, 0]


def test_sweep_table_has_no_too_large_column_where_nothing_was_skipped(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The column appears only where a run skipped a request."""
    code, out, err = run_cli(capsys, "sweep", str(mixed_trace(tmp_path)), "--gpu-blocks",
                             "128", "--host-blocks", "0,64")
    assert code == 0, err
    assert "too large" not in out.splitlines()[0]


def test_compare_table_shows_the_requests_skipped_as_too_large(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """compare's columns at 64 GPU blocks leave 4 of 12 requests out of their hit rates: a
    row says so, as the JSON does."""
    code, out, err = run_cli(capsys, "compare", str(mixed_trace(tmp_path)), "--gpu-blocks",
                             "64")
    assert code == 0, err
    rows = [line for line in out.splitlines()[:-1] if line.startswith("too large")]
    assert [row.split()[2:] for row in rows] == [["4", "4", "4", "4"]]
    assert [run["report"]["num_rejected_too_large"]
            for run in last_json(out)["runs"]] == [4, 4, 4, 4]


def served_alone_and_with_a_giant(tmp_path: Path, giant_at_ms: int) -> tuple[Path, Path]:
    """Forty requests of 32 blocks 10 ms apart from 600 s on, alone and with one of 95
    blocks (too large for 64 GPU blocks) arriving at ``giant_at_ms``."""
    served = [(600_000 + i * 10, 1000, [1, 2]) for i in range(40)]
    giant = (giant_at_ms, 3000, [1, 2, 3, 4, 5, 6])
    rows = sorted([*served, giant], key=lambda row: row[0])
    return (write_trace(tmp_path / "alone.jsonl", served),
            write_trace(tmp_path / "giant.jsonl", rows))


@pytest.mark.parametrize("giant_at_ms", [0, 1_200_000])
@pytest.mark.parametrize("instances", ["1", "2"])
def test_a_request_skipped_as_too_large_stretches_no_span(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, giant_at_ms: int,
        instances: str) -> None:
    """A request skipped as too large, 600 s before or after the forty served, counted in
    the arrival span and the makespan: the load read 0.02 x capacity for a replay 27 x over
    it, the throughput 79 tokens/s for 4,488. The figures now equal a replay of the
    served requests alone."""
    alone, giant = served_alone_and_with_a_giant(tmp_path, giant_at_ms)
    figures = []
    for trace in (alone, giant):
        code, out, err = run_cli(capsys, "replay", str(trace), "--gpu-blocks", "64",
                                 "--instances", instances)
        assert code == 0, err
        document = last_json(out)
        figures.append({key: document.get(key) for key in (
            "load", "makespan_s", "throughput_tokens_per_s", "requests_per_s", "ttft_s",
            "e2e_s")})  # a fleet's report has no throughput
        figures[-1]["load"] = {**document["load"], "busy_s": round(document["load"]["busy_s"],
                                                                    9)}
    assert figures[0]["load"]["overloaded"]
    assert figures[1] == figures[0]


def without_cpu(report: dict[str, Any]) -> dict[str, Any]:
    """A report's JSON less its real-time ``cpu`` group (every other field is virtual)."""
    return {key: value for key, value in report.items() if key != "cpu"}


def test_compare_and_sweep_runs_equal_the_replays_at_their_settings(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Each column of ``compare --oracle`` and each row of a sweep (two policies, two host
    sizes) is the report ``replay`` gives at its settings, oracle bounds included; the
    ``--json`` file holds what the last stdout line holds."""
    base = ["--limit", "60", "--gpu-blocks", "256"]
    json_path = tmp_path / "compare.json"
    code, out, err = run_cli(capsys, "compare", *base, "--host-blocks", "512", "--oracle",
                             "--json", str(json_path))
    assert code == 0, err
    document = last_json(out)
    assert json.loads(json_path.read_text()) == document
    for run in document["runs"]:
        admission, tier = run["label"].split(" ", 1)
        host = "512" if tier == "GPU+host" else "0"
        code, out, err = run_cli(capsys, "replay", *base, "--host-blocks", host,
                                 "--admission", admission)
        assert code == 0, err
        assert without_cpu(last_json(out)) == without_cpu(run["report"]), run["label"]
    code, out, err = run_cli(capsys, "sweep", *base, "--host-blocks", "0,512",
                             "--eviction-policy", "lru,s3fifo")
    assert code == 0, err
    rows = last_json(out)["runs"]
    settings = [(policy, host) for policy in ("lru", "s3fifo") for host in ("0", "512")]
    for row, (policy, host) in zip(rows, settings, strict=True):
        code, out, err = run_cli(capsys, "replay", *base, "--host-blocks", host,
                                 "--eviction-policy", policy)
        assert code == 0, err
        assert without_cpu(last_json(out)) == without_cpu(row), (policy, host)


def test_a_sweeps_figures_hold_together(capsys: pytest.CaptureFixture[str]) -> None:
    """Over host sizes at one GPU size: the offline bounds never fall as capacity grows,
    LRU <= Belady <= unlimited, the hit rate at most the unlimited one, GPU + host hit
    tokens the reused ones, percentiles ordered, finished + skipped the requests read;
    the table's hit rates and bounds are the JSON's, rounded."""
    code, out, err = run_cli(capsys, "sweep", "--limit", "80", "--gpu-blocks", "256",
                             "--host-blocks", "1024,0,128,512")  # unsorted on purpose
    assert code == 0, err
    table, runs = out.splitlines()[1:-1], last_json(out)["runs"]
    by_capacity = sorted(runs, key=lambda r: r["cache_config"]["num_host_blocks"])
    for key in ("lru_hit_rate", "belady_hit_rate", "unlimited_hit_rate"):
        values = [r["oracle"][key] for r in by_capacity]
        assert values == sorted(values), key
    for row, r in zip(table, runs, strict=True):
        oracle = r["oracle"]
        assert oracle["lru_hit_rate"] <= oracle["belady_hit_rate"] <= oracle[
            "unlimited_hit_rate"]
        assert r["token_hit_rate"] <= oracle["unlimited_hit_rate"]
        assert r["num_gpu_hit_tokens"] + r["num_host_hit_tokens"] == r["num_reused_tokens"]
        assert r["num_gpu_hit_tokens"] >= 0 and r["num_host_hit_tokens"] >= 0
        for summary in (r["ttft_s"], r["e2e_s"]):
            assert 0 < summary["p50"] <= summary["p90"] <= summary["p99"]
        assert r["ttft_s"]["p50"] <= r["e2e_s"]["p50"]
        assert r["num_requests"] + r["num_rejected_too_large"] == r["workload"][
            "num_requests"] == 80
        cells = row.split()
        assert cells[:2] == [f"{r['cache_config']['num_gpu_blocks']}",
                             f"{r['cache_config']['num_host_blocks']:,}"]
        assert cells[2:7] == [f"{value:.4f}" for value in (
            r["token_hit_rate"], r["host_token_hit_rate"], oracle["lru_hit_rate"],
            oracle["belady_hit_rate"], oracle["unlimited_hit_rate"])]
