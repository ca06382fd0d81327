"""benchmarks/steppair.py pairs two checkouts' steps and ends with one JSON line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_steppair_of_a_checkout_against_itself_pairs_every_step(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A/A on a short loaded replay: the same steps on both sides, full steps found, a
    table of both versions and the JSON line last."""
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import steppair

    steppair.main([str(REPO), str(REPO), "--limit", "30", "--max-num-tokens", "256"])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["bench"] == "steppair" and result["replay_args"][-1] == "256"
    assert 0 < result["num_full_steps"] <= result["num_steps"]
    for version in ("before", "after"):
        assert result[version]["mean_us"] > 0 and result[version]["p99_us"] > 0
    assert result["median_ratio"] > 0 and result["sum_ratio"] > 0
    assert [line.split()[0] for line in lines[1:4]] == ["version", "before", "after"]
    assert sys.modules.get("kvtier_before") is not None  # the copies loaded as their own packages


def test_steppair_refuses_versions_that_schedule_differently(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps that scheduled different token counts are no speed comparison: named by step."""
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import steppair

    lock = steppair.Lockstep()
    lock.budget["before"] = 100
    lock.tokens["before"], lock.tokens["after"] = [100, 95, 40], [100, 95, 41]
    with pytest.raises(SystemExit, match="differ from step 2"):
        steppair.full_steps(lock)
    lock.tokens["after"] = [100, 95, 40]
    assert steppair.full_steps(lock) == [0, 1]
