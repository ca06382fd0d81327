"""benchmarks/bench_policy.py's bounds: kvtier's columns against the partial-reuse LRU and
Belady its replays count hits by, vLLM's against the whole-block LRU and Belady of the same
block stream, without vLLM (a fake peer)."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from types import ModuleType

import pytest

from kvtier.sim import TraceRequest
from kvtier.sim.oracle import (
    belady_hit_tokens,
    lru_hit_tokens,
    oracle_requests,
    unlimited_hit_tokens,
)
from kvtier.sim.report import OracleBounds
from list_workload import ListWorkload

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TPB = 4


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """benchmarks/bench_policy.py, imported as the smoke test imports it."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return __import__("bench_policy")


def make_workload(prompts: list[list[int]]) -> ListWorkload:
    """One request a prompt, a second apart, one output token each."""
    return ListWorkload([TraceRequest(f"r{i}", float(i), list(p), 1)
                         for i, p in enumerate(prompts)])


# Three one-block prompts, then the first two again: x y z x y (4 tokens each, 20 in all).
X, Y, Z = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
XYZXY = [X, Y, Z, X, Y]
# One three-block prompt twice: longer than a cache of 2 blocks.
W = list(range(1, 13))


def test_whole_block_and_partial_bounds_of_a_scan_differ(bench: ModuleType) -> None:
    """x y z x y at 2 blocks (1 GPU + 1 host). Whole blocks::

        LRU:    x y | z evicts x | x misses, evicts y | y misses        0 of 20 tokens
        Belady: x y | z evicts y (next use 4, x's 3)  | x hits | y      4 of 20

    With partial reuse a block missed that was seen whole counts its first 3 tokens
    (tokens_per_block - 1): LRU 3 + 3 = 6, Belady 4 + 3 = 7; unlimited 8 either way."""
    bounds, blocks = bench.row_bounds(make_workload(XYZXY), TPB, [(1, 1)])
    assert blocks == [OracleBounds(TPB, 2, 8 / 20, 4 / 20, 0 / 20, False)]
    assert bounds == [OracleBounds(TPB, 2, 8 / 20, 7 / 20, 6 / 20, True)]


def test_bounds_at_a_capacity_smaller_than_a_request(bench: ModuleType) -> None:
    """W (3 blocks) twice at 2 blocks: each keeps its first 2, so the second hits 8 of 12
    tokens as whole blocks, 8 + 3 with the head of the third; unlimited, all 12. LRU and
    Belady agree: no gap for any policy to close (n/a, not a division by zero)."""
    bounds, blocks = bench.row_bounds(make_workload([W, W]), TPB, [(1, 1), (2, 1)])
    assert blocks == [OracleBounds(TPB, 2, 12 / 24, 8 / 24, 8 / 24, False),
                      OracleBounds(TPB, 3, 12 / 24, 12 / 24, 12 / 24, False)]
    assert bounds[0] == OracleBounds(TPB, 2, 12 / 24, 11 / 24, 11 / 24, True)
    assert bench.peer_columns({"lru": 8 / 24}, blocks[0]) == {"vllm-lru": 8 / 24,
                                                               "vllm-lru gap": None}


def test_peer_gaps_are_against_the_whole_block_bounds(bench: ModuleType) -> None:
    """x y z x y at 2 blocks: a peer at the whole-block LRU (0.0) closes 0 of its gap, one
    at 0.1 half of it (Belady 0.2). Against the partial bounds (0.3, 0.35) the LRU itself
    would read -6.0; a peer that gave no hit rate is None, its gap too."""
    _, (block,) = bench.row_bounds(make_workload(XYZXY), TPB, [(1, 1)])
    assert bench.peer_columns({"lru": 0.0, "arc": 0.1, "x": None}, block) == {
        "vllm-lru": 0.0, "vllm-lru gap": 0.0, "vllm-arc": 0.1, "vllm-arc gap": 0.5,
        "vllm-x": None, "vllm-x gap": None}
    assert bench.gap(0.0, 0.3, 0.35) == pytest.approx(-6.0)


def test_gap_is_none_without_a_gap_or_a_result(bench: ModuleType) -> None:
    """LRU == Belady (or within 1e-3, or above it): None; no hit rate: None."""
    assert bench.gap(0.5, 0.25, 0.75) == 0.5
    assert [bench.gap(0.5, 0.4, 0.4), bench.gap(0.5, 0.4, 0.4009), bench.gap(0.5, 0.5, 0.4),
            bench.gap(None, 0.25, 0.75)] == [None, None, None, None]


# A cyclic scan of 70 one-block prompts, twice: at the benchmark's floor of 64 blocks
# (34 GPU + 30 host) whole-block LRU keeps none of the next 70 (0 of 560 tokens), Belady
# keeps s0..s62 and s69 (64 hits, 256 tokens); with partial reuse each miss of the second
# round counts 3 tokens more.
SCAN = [[1000 + 4 * i + j for j in range(4)] for i in range(70)] * 2


def scan_bounds(partial: bool) -> tuple[float, float]:
    """LRU and Belady of SCAN at 64 blocks, from the oracle's functions."""
    stream = list(oracle_requests(make_workload(SCAN), TPB, partial))
    return (lru_hit_tokens(stream, 64, TPB).hit_rate,
            belady_hit_tokens(stream, 64, TPB).hit_rate)


def run_main(bench: ModuleType, monkeypatch: pytest.MonkeyPatch,
             capsys: pytest.CaptureFixture[str], tmp_path: Path,
             hits: dict[str, float | None] | None, args: tuple[str, ...] = ()
             ) -> tuple[list[str], dict[str, object], list[tuple[int, str]]]:
    """main() on SCAN (``hits``: each fake peer's hit rate; None: no peers): the table's
    lines, the row of the JSON line, and the (capacity, policy) each peer was run at."""
    monkeypatch.setattr(bench, "workloads", lambda names, limit: {"scan": make_workload(SCAN)})
    calls: list[tuple[int, str]] = []
    if hits is not None:
        peer_python = tmp_path / "python"
        peer_python.write_text("")
        monkeypatch.setattr(bench, "PEER_PYTHON", peer_python)

        def fake_peer(stream: list[object], tpb: int, capacity: int, policy: str
                      ) -> float | None:
            assert stream == list(oracle_requests(make_workload(SCAN), TPB)) and tpb == TPB
            calls.append((capacity, policy))
            return hits[policy]

        monkeypatch.setattr(bench, "run_peer", fake_peer)
    argv = ["--workloads", "scan", "--tokens-per-block", str(TPB), "--fractions", "0.5", *args]
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    (row,) = json.loads(lines[-1])["rows"]
    return lines, row, calls


def test_main_reports_the_whole_block_bounds_without_peers(
        bench: ModuleType, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--no-peers: the row's block_lru / block_belady are the whole-block bounds (0 and
    256/560), where they held the partial ones (LRU 210/560 = 0.375) under those names;
    kvtier's gaps are against the partial Belady."""
    lines, row, _ = run_main(bench, monkeypatch, capsys, tmp_path, None, ("--no-peers",))
    lru, belady = scan_bounds(partial=True)
    assert scan_bounds(partial=False) == (0.0, 256 / 560) and (lru, belady) == (
        210 / 560, 274 / 560)
    assert (row["gpu_blocks"], row["host_blocks"]) == (34, 30)
    assert (row["block_lru"], row["block_belady"], row["belady"]) == (0.0, 256 / 560, belady)
    assert row["unlimited"] == unlimited_hit_tokens(
        list(oracle_requests(make_workload(SCAN), TPB, True)), TPB).hit_rate == 280 / 560
    sim_lru = row["lru"]
    assert isinstance(sim_lru, float)
    for policy in ("lru", "priority-lru", "kvtier-predict"):
        p = row[policy]
        assert isinstance(p, float) and row[f"{policy} gap"] == (p - sim_lru) / (belady - sim_lru)
    assert "vllm-lru" not in row and lines[-2] == "vLLM columns skipped: not asked for"
    assert "block LRU/Belady" not in lines[0]


def test_main_gives_each_peer_its_gap_against_the_block_bounds(
        bench: ModuleType, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Fake peers at 0.0 (the whole-block LRU: gap 0) and 0.2 (0.2 / (256/560) = +0.44);
    the table shows each vLLM cell with that gap and the block bounds it is against,
    beside kvtier's Belady."""
    lines, row, calls = run_main(bench, monkeypatch, capsys, tmp_path,
                                 {"lru": 0.0, "arc": 0.2})
    assert calls == [(64, "lru"), (64, "arc")]
    assert (row["vllm-lru"], row["vllm-lru gap"]) == (0.0, 0.0)
    assert (row["vllm-arc"], row["vllm-arc gap"]) == (0.2, 0.2 / (256 / 560))
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = dict(zip(header, (c.strip() for c in lines[2].strip("|").split("|")),
                     strict=True))
    assert (cells["vllm-lru"], cells["vllm-arc"]) == ("0.0000 (+0.00)", "0.2000 (+0.44)")
    assert (cells["belady"], cells["block LRU/Belady"]) == ("0.4893", "0.0000/0.4571")


def test_main_shows_a_peer_without_a_result_as_skipped(
        bench: ModuleType, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A peer that gave no hit rate: null in the JSON line, its gap too; "skipped" in the
    table, the other peer's cell as it was."""
    lines, row, _ = run_main(bench, monkeypatch, capsys, tmp_path, {"lru": 0.0, "arc": None})
    assert (row["vllm-arc"], row["vllm-arc gap"], row["vllm-lru gap"]) == (None, None, 0.0)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = dict(zip(header, (c.strip() for c in lines[2].strip("|").split("|")),
                     strict=True))
    assert (cells["vllm-arc"], cells["vllm-lru"]) == ("skipped", "0.0000 (+0.00)")


def fake_peer_python(tmp_path: Path, body: str) -> Path:
    """An executable standing in for .venv-peers' python: ``$2`` is the stream file."""
    path = tmp_path / "peer-python"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_run_peer_sends_the_block_stream_and_reads_the_hit_rate(
        bench: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The peer gets the stream's prefix keys as ids interned in order (x y z x y: 0 1 2 0
    1) and each prompt's length; its last line's hit_rate comes back."""
    captured = tmp_path / "stream.json"
    monkeypatch.setattr(bench, "PEER_PYTHON", fake_peer_python(
        tmp_path, f'cat "$2" > {captured}\necho log\necho \'{{"hit_rate": 0.25}}\''))
    stream = list(oracle_requests(make_workload(XYZXY), TPB))
    assert bench.run_peer(stream, TPB, 2, "lru") == 0.25
    assert json.loads(captured.read_text()) == {
        "tokens_per_block": TPB, "requests": [[4, [0]], [4, [1]], [4, [2]], [4, [0]], [4, [1]]]}


def test_run_peer_that_fails_gives_none_and_says_why(
        bench: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A peer that exits with an error (a CalledProcessError that lost every row before)
    or prints no hit rate: None, and one line on stderr naming it, its capacity and why."""
    stream = list(oracle_requests(make_workload(XYZXY), TPB))
    monkeypatch.setattr(bench, "PEER_PYTHON",
                        fake_peer_python(tmp_path, "echo 'vllm: out of memory' >&2; exit 3"))
    assert bench.run_peer(stream, TPB, 2, "arc") is None
    assert capsys.readouterr().err == ("vllm-arc at 2 blocks gave no hit rate (status 3): "
                                       "vllm: out of memory\n")
    monkeypatch.setattr(bench, "PEER_PYTHON", fake_peer_python(tmp_path, "echo '{}'"))
    assert bench.run_peer(stream, TPB, 2, "lru") is None
    assert capsys.readouterr().err == ("vllm-lru at 2 blocks gave no hit rate (status 0): "
                                       "no output\n")


def audit_row(**peers: float | None) -> dict[str, object]:
    """An audit row: the default at gap 0.5 of (0.4, 0.6), whole-block bounds (0.3, 0.5)."""
    return {"kvtier-predict-cost": 0.5, "kvtier-predict-cost sd": 0.0, "lru": 0.4,
            "belady": 0.6, "block_lru": 0.3, "block_belady": 0.5, **peers}


def test_the_audit_judges_against_the_peers_that_gave_a_result(bench: ModuleType) -> None:
    """vLLM's ARC at 0.45 closes 0.75 of the whole-block gap, the default 0.5 of its own:
    flagged, whether vLLM's LRU gave None (a ValueError before) or is absent (ARC was
    then never looked at); no peer with a result: no verdict against vLLM."""
    for peers in ({"vllm-lru": None, "vllm-arc": 0.45}, {"vllm-arc": 0.45}):
        row = audit_row(**peers)
        bench.judge_audit_row(row)
        assert row["flags"] == ["below vLLM's best"] and row["default gap"] == pytest.approx(0.5)
    row = audit_row(**{"vllm-lru": None, "vllm-arc": None})
    bench.judge_audit_row(row)
    assert row["flags"] == []


def test_the_audit_table_shows_a_peer_without_a_result_as_skipped(
        bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    """print_audit: "skipped" in a peer's cell where it gave None (a ValueError before)."""
    row = audit_row(**{"vllm-lru": None, "vllm-arc": 0.45})
    row.update({"label": "scan", "fraction": 0.03, "tokens_per_block": 4, "gpu_blocks": 34,
                "host_blocks": 30, "time_scale": 1.0})
    bench.judge_audit_row(row)
    bench.print_audit([row], [], True)
    cells = [c.strip() for c in capsys.readouterr().out.splitlines()[2].strip("|").split("|")]
    assert cells == ["scan 3%", "4", "34+30", "1.0", "0.5000 (sd 0.0000)", "skipped", "0.4500",
                     "0.6000", "+0.500", "below vLLM's best"]


def test_the_gpu_tier_serves_a_request_of_a_long_output(
        bench: ModuleType, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """x, y and a request of 4 prompt tokens and 400 output tokens: 101 blocks, past the
    floor of twice the largest prompt (2 x (1 + 16) = 34 GPU blocks), so every replay
    skipped it while the bounds counted it. The GPU tier is now at least those 101."""
    long_output = TraceRequest("long", 2.0, [21, 22, 23, 24], 400)
    workload = ListWorkload([*make_workload([X, Y]).requests, long_output])
    monkeypatch.setattr(bench, "workloads", lambda names, limit: {"long": workload})
    argv = ["--workloads", "long", "--tokens-per-block", str(TPB), "--fractions", "0.5",
            "--no-peers"]
    assert bench.main(argv) == 0
    (row,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert (row["gpu_blocks"], row["host_blocks"], row["num_requests"]) == (101, 0, 3)
    assert bench.blocks_to_serve(workload, TPB) == 101
