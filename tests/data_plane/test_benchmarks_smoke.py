"""The data-plane benchmarks run end to end in --smoke mode and end with one JSON line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the data-plane tests need torch: pip install 'kvtier[torch]'")

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("name", ["bench_transfer", "bench_ttft"])
def test_benchmark_smoke_prints_a_table_then_json(name: str, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``--smoke`` runs on whatever device is here; the last line parses as JSON."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = __import__(name)
    assert module.main(["--smoke"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) > 3
    result = json.loads(lines[-1])
    assert result["benchmark"] == name and result["smoke"] is True
    assert result["torch"]
