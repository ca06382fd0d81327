"""bench_tp's bandwidth part runs end to end in --smoke mode and ends with one JSON line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the tensor-parallel tests need torch: "
                                    "pip install 'kvtier[torch]'")

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_bench_tp_smoke_prints_a_table_then_json(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Per-rank and aggregate rows each way, then JSON with both ranks' figures (the TTFT
    part spawns ranks like the exactness test and is left to it)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = __import__("bench_tp")
    assert module.main(["--smoke", "--no-ttft"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sum(line.split()[:2] in (["d2h", "all"], ["h2d", "all"]) for line in lines) == 2
    result = json.loads(lines[-1])
    assert result["benchmark"] == "bench_tp" and result["smoke"] is True
    for direction in ("d2h", "h2d"):
        figures = result["bandwidth"][direction]
        assert len(figures["together_GBps"]) == len(figures["alone_GBps"]) == 2
        assert figures["aggregate_GBps"] > 0 and figures["ceiling_aggregate_GBps"] > 0
