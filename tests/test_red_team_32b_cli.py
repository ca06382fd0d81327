"""Red team 32b: ``--json`` checked by doing what the write will do (no run wasted on a
report that cannot be written), and what ``kvtier replay`` prints for degenerate
workloads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bad_input_helpers import assert_one_line_refusal, run_cli
from kvtier.cli import main

SMALL = ["--limit", "2", "--no-progress"]


def no_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvtier.cli

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the simulation ran")

    monkeypatch.setattr(kvtier.cli, "simulate", never)


@pytest.mark.parametrize(("path", "why"), [("/dev/full", os.strerror(28)),
                                           ("/proc/version", None)])
def test_json_to_a_file_that_refuses_writes_is_refused_before_the_run(
        monkeypatch: pytest.MonkeyPatch, path: str, why: str | None) -> None:
    """``--json /dev/full`` and ``/proc/version`` passed the permission check and failed
    after the whole run; now refused in one line before anything is simulated."""
    if not Path(path).exists():
        pytest.skip(f"no {path} here")
    no_simulation(monkeypatch)
    code, err = run_cli(["replay", "--json", path, *SMALL])
    assert_one_line_refusal(code, err, f"--json {path}: cannot write it (",
                            *([why] if why else []))


@pytest.mark.parametrize("name", ["new.json", "old.json"])
def test_json_to_a_plain_file_is_written_and_the_check_leaves_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    """The check makes a temporary file and removes it: the folder holds the report
    alone, and it is the JSON line printed last."""
    path = tmp_path / name
    if name == "old.json":
        path.write_text("old")
    assert main(["replay", "--json", str(path), *SMALL]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    assert json.loads(path.read_text()) == json.loads(out.splitlines()[-1])


def test_json_to_dev_null_still_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """/dev/null takes writes (zero bytes too): not refused."""
    assert main(["replay", "--json", os.devnull, *SMALL]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["num_requests"] == 2


def test_probe_output_changes_no_existing_file(tmp_path: Path) -> None:
    """The probe of a file written in place (here: one with a second hard link) opens it
    without truncating and writes nothing."""
    from kvtier.cli_output import probe_output

    path = tmp_path / "linked.json"
    path.write_text("keep me")
    os.link(path, tmp_path / "other-name.json")
    assert probe_output(path) is None
    assert path.read_text() == "keep me"
    assert probe_output(tmp_path / "absent.json") is None
    assert not (tmp_path / "absent.json").exists()


def test_a_report_that_cannot_be_written_after_the_run_is_still_printed(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Where the write fails anyway (the probe passed: the disk filled during the run),
    the report is on standard output and the error says so."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    import kvtier.cli_workload

    monkeypatch.setattr(kvtier.cli_workload, "probe_output", lambda path: None)
    code = main(["replay", "--json", "/dev/full", *SMALL])
    out, err = capsys.readouterr()
    assert code == 2
    assert "the report is on standard output" in err
    assert json.loads(out.splitlines()[-1])["num_requests"] == 2
