"""benchmarks/bench_policy.py runs end to end in --smoke mode and ends with one JSON line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_policy_smoke_prints_a_table_then_json(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """``--smoke``: a row per capacity, every kvtier policy's hit rate, the JSON line last."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = __import__("bench_policy")
    assert module.main(["--smoke"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["benchmark"] == "bench_policy" and result["smoke"] is True
    assert result["peers"] == "smoke run" and lines[-2] == "vLLM columns skipped: smoke run"
    rows = result["rows"]
    assert len(rows) == 2 and [row["workload"] for row in rows] == ["chat", "chat"]
    for row in rows:
        for policy in ("priority-lru", "lru", "kvtier-predict"):
            assert 0.0 <= row[policy] <= row["unlimited"]
        assert row["lru gap"] == 0.0  # lru is the gap's own zero
        assert row["lru sim gap"] in (0.0, None)  # None: the clairvoyant within 1e-3 of lru
        assert row["lru"] <= row["clairvoyant"] <= row["unlimited"]


def test_bench_policy_audit_smoke(monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``--audit --smoke``: one held-out row, the default's draws over two time scales and
    their mean, the verdict against LRU, the JSON line last."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = __import__("bench_policy")
    assert module.main(["--audit", "--smoke", "--num-scales", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["benchmark"] == "bench_policy_audit" and result["peers"] == "skipped"
    assert lines[0].startswith("| row | tpb |") and "memoryless 3%" in lines[2]
    (row,) = result["rows"]
    draws = row["kvtier-predict-cost draws"]
    assert len(draws) == 2 and row["kvtier-predict-cost"] == pytest.approx(sum(draws) / 2)
    assert row["lru"] <= row["belady"] and isinstance(row["flags"], list)
    noise = max(0.0005, 2 * row["kvtier-predict-cost sd"])  # judge_audit_row's noise
    assert ("below LRU" in row["flags"]) == (row["kvtier-predict-cost"] < row["lru"] - noise)


def test_bench_policy_heldout_smoke(monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """``--heldout --smoke``: the audit's table on one kvtier.sim.heldout row (parallel
    sampling, 80 requests), its source named in the JSON line."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = __import__("bench_policy")
    assert module.main(["--heldout", "--smoke", "--num-scales", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["inputs"]["source"] == "kvtier.sim.heldout" and "parallel 3%" in lines[2]
    (row,) = result["rows"]
    assert row["num_requests"] == 80 and row["lru"] <= row["belady"]
    with pytest.raises(SystemExit):
        module.main(["--heldout", "--audit"])


def test_bench_policy_reads_trace_files(monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    """A ``--workloads`` entry ending in .jsonl or .csv is a trace file, keyed by its name;
    one that does not exist, or an unknown name, stops the run naming it."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = __import__("bench_policy")
    trace = tmp_path / "qwen.jsonl"
    trace.write_text(json.dumps({"chat_id": 1, "parent_chat_id": -1, "timestamp": 0.5,
                                 "input_length": 40, "output_length": 3, "type": "text",
                                 "turn": 1, "hash_ids": [10, 11, 12]}) + "\n")
    opened = module.workloads([str(trace)], 10)
    assert list(opened) == ["qwen"] and opened["qwen"].describe()["kind"] == "bailian"
    for name in (str(tmp_path / "missing.jsonl"), "no-such-workload"):
        with pytest.raises(SystemExit, match=name):
            module.workloads([name], 10)
