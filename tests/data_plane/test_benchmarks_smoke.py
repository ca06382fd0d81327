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


@pytest.mark.parametrize("host_run", [1, 8, 12, 16])
def test_bench_transfer_host_runs_stay_inside_the_pool(host_run: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Host slots in runs of any length (12 does not divide the blocks) stay below the
    pool's 2 * num_blocks slots, each used once, in runs of ``host_run`` consecutive
    slots."""
    import random

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench = __import__("bench_transfer")
    for direction in ("d2h", "h2d", "both", "step"):
        ops = bench.make_ops(direction, 1000, 1, random.Random(0), host_run)
        host = [op.dst_slot if direction == "d2h" or (direction in ("both", "step")
                                                        and i < 500) else op.src_slot
                for i, op in enumerate(ops)]
        assert max(host) < 2000 and len(set(host)) == len(host)
        if direction == "d2h":
            assert all(host[i + 1] == host[i] + 1 for i in range(len(host) - 1)
                       if (i + 1) % host_run)
