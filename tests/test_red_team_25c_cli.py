"""Red team 25c: the ``kvtier`` command line.

Standard output writes what its encoding cannot hold, and on a terminal control characters,
as backslash escapes, for every command (only ``generate`` and ``chat`` did: ``replay`` of a
trace whose name is not ASCII ended in an internal error, status 70, under an ASCII
standard output); the command's lines on standard error escape control characters on a
terminal too.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kvtier
from kvtier.cli import main

SRC = str(Path(kvtier.__file__).resolve().parents[1])  # the sources under test
TRACE = ('{"timestamp": 0, "input_length": 100, "output_length": 4, "hash_ids": [0]}\n'
         '{"timestamp": 5, "input_length": 100, "output_length": 4, "hash_ids": [0]}\n')


pytest_plugins = ["shared_fixtures"]
# A defect (an unexpected exception) raises with its traceback instead of exit 70.
pytestmark = pytest.mark.usefixtures("debug_mode")


def make_trace(folder: Path, name: str) -> Path:
    """A two-request Mooncake trace named ``name``."""
    path = folder / name
    path.write_text(TRACE, encoding="utf-8")
    return path


def run_ascii(*args: str, encoding: str = "ascii") -> subprocess.CompletedProcess[str]:
    """``kvtier args...`` in a child whose standard streams are ``encoding``."""
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONIOENCODING": encoding}
    return subprocess.run([sys.executable, "-m", "kvtier", *args], env=env, capture_output=True,
                          text=True, encoding="utf-8", timeout=300, check=False)


@pytest.mark.parametrize(("command", "named"), [
    (["replay"], True), (["replay", "--instances", "2"], True),
    (["compare", "--gpu-blocks", "64", "--host-blocks", "64"], False),
    (["sweep", "--gpu-blocks", "64", "--host-blocks", "0"], False)])
def test_every_simulator_command_escapes_what_an_ascii_stdout_cannot_hold(
        tmp_path: Path, command: list[str], named: bool) -> None:
    """A trace named ``tr\u00e9\U0001f600.jsonl``: a replay's report names it, and under an
    ASCII standard output its first table row ended the command in an internal error,
    status 70, the report lost. Now the name is written escaped, and the JSON line is
    whole, for every command."""
    trace = make_trace(tmp_path, "tr\u00e9\U0001f600.jsonl")
    done = run_ascii(*command, str(trace), "--no-progress")
    assert (done.returncode, done.stderr) == (0, "")
    assert ("tr\\xe9\\U0001f600" in done.stdout) is named
    assert "\u00e9" not in done.stdout
    json.loads(done.stdout.splitlines()[-1])


def test_a_file_name_that_is_no_utf8_is_escaped_under_a_utf8_stdout(tmp_path: Path) -> None:
    """A trace whose name holds a byte that is no UTF-8 reaches Python as a lone surrogate,
    which a UTF-8 standard output refused: status 70. Now it is written as its escape."""
    raw = os.fsencode(tmp_path) + b"/t\xff.jsonl"
    Path(os.fsdecode(raw)).write_text(TRACE, encoding="utf-8")
    done = run_ascii("replay", os.fsdecode(raw), "--no-progress", encoding="utf-8")
    assert (done.returncode, done.stderr) == (0, "")
    assert "t\\udcff.jsonl" in done.stdout.splitlines()[0]


def test_help_under_an_ascii_stdout_is_whole() -> None:
    """``--help`` of every command, and ``--version``, under an ASCII standard output."""
    for args in (["--help"], ["--version"], ["replay", "--help"], ["compare", "--help"],
                 ["sweep", "--help"], ["generate", "--help"], ["chat", "--help"]):
        done = run_ascii(*args)
        assert (done.returncode, done.stderr) == (0, ""), args
        assert done.stdout


class _Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


def test_control_characters_reach_a_terminal_escaped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trace named with an escape sequence (``ESC ]0;owned BEL`` retitles the window,
    ``ESC [2J`` clears it): its name went to the terminal as it was, and drove it. Now
    every control character but newline and tab is written as its ``\\xNN`` escape; to a
    file or a pipe the report is as before."""
    trace = make_trace(tmp_path, "t\x1b]0;owned\x07\x1b[2J\x9b.jsonl")
    out = _Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["replay", str(trace), "--no-progress"]) == 0
    text = out.getvalue()
    assert "t\\x1b]0;owned\\x07\\x1b[2J\\x9b.jsonl" in text
    assert not any(c in text for c in "\x1b\x07\x9b\r")
    assert text.count("\n") == len(text.splitlines())  # newlines kept
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stdout", piped)
    assert main(["replay", str(trace), "--no-progress"]) == 0
    assert f"path {trace}" in piped.getvalue()  # a file gets the name as it is


def test_an_error_line_reaches_a_terminal_escaped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command's one line on standard error names the file or argument as given:
    ``cannot read trace <name>``, argparse's ``unrecognized arguments: <arg>``; an escape
    sequence in it drove the terminal. Now it is escaped there, as on standard output."""
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    missing = tmp_path / "m\x1b[2J.jsonl"
    assert main(["replay", str(missing), "--no-progress"]) == 2
    assert err.getvalue() == (f"kvtier: error: cannot read trace {tmp_path}/m\\x1b[2J.jsonl: "
                              "No such file or directory\n")
    err.seek(0)
    err.truncate()
    assert main(["replay", "--no-progress", "--x\x1b]0;t\x07"]) == 2
    assert err.getvalue() == ("kvtier: error: unrecognized arguments: --x\\x1b]0;t\\x07 (see "
                              "'kvtier --help')\n")


# ---- numbers on the command line -------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    # int() took each of these for 1,000, 512, 5 or 16.
    (["replay", "--limit", "1_000"], "argument --limit: expected an integer, got '1_000'"),
    (["replay", "--max-num-tokens", " 512"],
     "argument --max-num-tokens: expected an integer, got ' 512'"),
    (["replay", "--max-num-tokens", "512\n"],
     "argument --max-num-tokens: expected an integer, got '512\\n'"),
    (["replay", "--seed", "+5"], "argument --seed: expected an integer, got '+5'"),
    (["replay", "--max-batch-size", "\u0665"],
     "argument --max-batch-size: expected an integer, got '\u0665'"),
    (["replay", "--tokens-per-block", "\uff11\uff16"],
     "argument --tokens-per-block: expected an integer, got '\uff11\uff16'"),
    (["replay", "--trace-block-tokens", "+16"],
     "argument --trace-block-tokens: expected an integer, got '+16'"),
    (["replay", "--offload-min-priority", "3_0"],
     "argument --offload-min-priority: expected an integer, got '3_0'"),
    (["replay", "--max-chunk-tokens", "1_024"],
     "argument --max-chunk-tokens: expected an integer, got '1_024'"),
    (["replay", "--instances", "0x2"], "argument --instances: expected an integer, got '0x2'"),
    (["sweep", "--gpu-blocks", "1_0,20"],
     "argument --gpu-blocks: expected comma-separated integers, got '1_0,20'"),
    (["sweep", "--host-blocks", "0, 20"],
     "argument --host-blocks: expected comma-separated integers, got '0, 20'"),
    # float() took these.
    (["replay", "--time-scale", "1_0"], "argument --time-scale: expected a number, got '1_0'"),
    (["replay", "--time-scale", "nan"],
     "argument --time-scale: must be a finite number in (0, 1e+10], got nan"),
    (["replay", "--time-scale", "\u0661.5"],
     "argument --time-scale: expected a number, got '\u0661.5'"),
    (["replay", "--router-alpha", "+inf", "--instances", "2"],
     "argument --router-alpha: must be a finite number in [0, 1e+06], got +inf"),
    (["replay", "--remote-latency-ms", "1_0", "--instances", "2", "--remote", "write-back"],
     "argument --remote-latency-ms: expected a number, got '1_0'"),
    (["replay", "--remote-deadline-ms", " 5"],
     "argument --remote-deadline-ms: expected a number, got ' 5'"),
    (["replay", "--draft-acceptance", "0_5"],
     "argument --draft-acceptance: expected a number, got '0_5'"),
    (["generate", "--seed", "1_0", "x"], "argument --seed: expected an integer, got '1_0'"),
    (["generate", "--max-new-tokens", "\u0665", "x"],
     "argument --max-new-tokens: expected an integer, got '\u0665'"),
    (["generate", "--temperature", "0_5", "x"],
     "argument --temperature: expected a number, got '0_5'"),
    (["chat", "--top-p", "Infinity"],
     "argument --top-p: must be a finite number in (0, 1], got Infinity"),
])
def test_a_number_option_takes_plain_ascii_digits_only(
        capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    """An integer option takes ASCII digits with an optional leading -, a number option a
    finite decimal: what else ``int()`` or ``float()`` took (``1_000``, spaces, ``+5``,
    digits of other scripts, ``nan``) is refused naming the option and the value, before
    anything runs."""
    code = main([*args, "--no-progress"] if args[0] != "generate" and args[0] != "chat"
                else args)
    captured = capsys.readouterr()
    assert (code, captured.out) == (2, "")
    assert captured.err == f"kvtier: error: {message} (see 'kvtier {args[0]} --help')\n"


@pytest.mark.parametrize(("assignment", "message"), [
    ("pcie_bytes_per_s=2_5e10", "expected a number, got '2_5e10'"),
    ("kv_bytes_per_token=+5", "expected an integer, got '+5'"),
    ("kv_bytes_per_token=\u0665", "expected an integer, got '\u0665'"),
    ("pcie_bytes_per_s=NaN", "expected a finite number, got 'NaN'"),
])
def test_a_profile_constant_takes_the_same_numbers(
        capsys: pytest.CaptureFixture[str], assignment: str, message: str) -> None:
    """``--set-profile KEY=VALUE`` reads its value by the same rule."""
    code = main(["replay", "--no-progress", "--limit", "1", "--set-profile", assignment])
    captured = capsys.readouterr()
    assert (code, captured.out) == (2, "")
    key = assignment.partition("=")[0]
    assert captured.err == f"kvtier: error: --set-profile {key}: {message}\n"


def test_numbers_written_plainly_still_read(capsys: pytest.CaptureFixture[str]) -> None:
    """Negative integers, fractions, exponents, and an integer constant written as a float."""
    code = main(["replay", "--no-progress", "--limit", "5", "--seed", "-3", "--time-scale",
                 ".5e1", "--set-profile", "kv_bytes_per_token=1.31072e5",
                 "--set-profile", "pcie_bytes_per_s=5.", "--max-num-tokens", "0512"])
    captured = capsys.readouterr()
    assert (code, captured.err) == (0, "")
    report = json.loads(captured.out.splitlines()[-1])
    assert report["time_scale"] == 5.0
    assert report["profile"]["kv_bytes_per_token"] == 131072
    assert report["scheduler_config"]["max_num_tokens"] == 512


# ---- Azure's timestamps --------------------------------------------------------------------------

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def make_azure(folder: Path, times: list[str]) -> Path:
    """An Azure CSV trace of one row per time, each of 100 prompt and 4 output tokens."""
    path = folder / "azure.csv"
    path.write_text(AZURE_HEADER + "".join(f"{t},100,4\n" for t in times), encoding="utf-8")
    return path


def test_an_azure_2024_trace_with_utc_offsets_is_read(tmp_path: Path) -> None:
    """Azure's 2024 traces write ``2024-05-10 00:00:00.009930+00:00`` (a UTC offset, the
    fraction left out at whole seconds): the first row was refused as "bad fractional
    seconds '009930+00:00'", the whole trace with it, though the reader names 2024's
    traces. Now the offset is read: arrivals are measured in UTC."""
    from kvtier.sim import AzureTrace

    path = make_azure(tmp_path, ["2024-05-10 00:00:00.009930+00:00", "2024-05-10 00:00:01+00:00",
                                 "2024-05-10 02:00:02.5+02:00", "2024-05-09 22:00:03-02:00"])
    trace = AzureTrace(path)
    assert [round(r.arrival_s, 6) for r in trace] == [0.0, 0.99007, 2.49007, 2.99007]


@pytest.mark.parametrize(("times", "line", "problem"), [
    # strptime took digits of other scripts, and one-digit fields.
    (["2023-11-16 18:15:46.1", "\u0662\u0660\u0662\u0663-11-16 18:15:47"], 3,
     "'\u0662\u0660\u0662\u0663-11-16 18:15:47': expected YYYY-MM-DD HH:MM:SS, an optional "
     "fraction of a second and an optional UTC offset (+HH:MM)"),
    (["2023-11-16 18:15:46.\u0663"], 2,
     "'2023-11-16 18:15:46.\u0663': expected YYYY-MM-DD HH:MM:SS, an optional fraction of a "
     "second and an optional UTC offset (+HH:MM)"),
    (["2023-1-6 1:2:3"], 2, "'2023-1-6 1:2:3': expected YYYY-MM-DD HH:MM:SS, an optional "
     "fraction of a second and an optional UTC offset (+HH:MM)"),
    (["2023-13-16 18:15:46"], 2, "'2023-13-16 18:15:46': month must be in 1..12"),
    (["2024-05-10 00:00:00+24:00"], 2, "'2024-05-10 00:00:00+24:00': UTC offset +24:00 is "
     "no offset"),
    (["0001-01-01 00:00:00+01:00"], 2, "'0001-01-01 00:00:00+01:00': out of the range of "
     "dates"),
    # UTC beside local time: which came first cannot be told.
    (["2024-05-10 00:00:00+00:00", "2024-05-10 00:00:01"], 3,
     "'2024-05-10 00:00:01': gives no UTC offset, where the first row does"),
    (["2024-05-10 00:00:00", "2024-05-10 00:00:01+00:00"], 3,
     "'2024-05-10 00:00:01+00:00': gives UTC offset, where the first row does not"),
])
def test_an_azure_timestamp_not_written_as_the_traces_write_it_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], times: list[str], line: int,
        problem: str) -> None:
    """A TIMESTAMP is read by the one pattern of Azure's files, ASCII digits, each field
    its width; else refused naming the file, the line and the column."""
    path = make_azure(tmp_path, times)
    code = main(["replay", str(path), "--no-progress"])
    captured = capsys.readouterr()
    assert (code, captured.out) == (2, "")
    assert captured.err == (f"kvtier: error: malformed trace: {path}:{line}: field "
                            f"'TIMESTAMP': {problem}\n")


# ---- the readers' arguments ----------------------------------------------------------------------

@pytest.mark.parametrize("path", [None, 5, b"t.jsonl", ["t.jsonl"]])
def test_a_trace_path_of_the_wrong_type_is_refused_naming_it(path: object) -> None:
    """pathlib's TypeError ("expected str, bytes or os.PathLike object, not NoneType")
    named neither the argument nor the reader. Now ValueError naming ``path``."""
    from kvtier.reprs import shown
    from kvtier.sim import AzureTrace, MooncakeTrace

    for reader in (MooncakeTrace, AzureTrace):
        with pytest.raises(ValueError) as refused:
            reader(path)  # type: ignore[arg-type]
        assert str(refused.value) == ("path must be a str or os.PathLike naming the trace "
                                      f"file, got {shown(path)}")


def test_a_held_out_family_of_the_wrong_type_is_refused_naming_it() -> None:
    """``HeldOutWorkload(["rag"])`` raised TypeError (unhashable type: 'list')."""
    from kvtier.sim.heldout import FAMILIES, HeldOutWorkload

    with pytest.raises(ValueError) as refused:
        HeldOutWorkload(["rag"])  # type: ignore[arg-type]
    assert str(refused.value) == f"family must be one of {sorted(FAMILIES)}, got ['rag']"


def test_a_stream_that_writes_lone_surrogates_as_bytes_gets_the_file_names_bytes(
        tmp_path: Path) -> None:
    """Under the C locale standard output writes a lone surrogate as the byte it came from
    (``surrogateescape``): a file name that is no UTF-8 is written back as it is, not
    escaped, where it is no terminal."""
    raw = os.fsencode(tmp_path) + b"/t\xff.jsonl"
    Path(os.fsdecode(raw)).write_text(TRACE, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONIOENCODING": "utf-8:surrogateescape"}
    done = subprocess.run([sys.executable, "-m", "kvtier", "replay", os.fsdecode(raw),
                           "--no-progress"], env=env, capture_output=True, timeout=300,
                          check=False)
    assert (done.returncode, done.stderr) == (0, b"")
    assert b"t\xff.jsonl" in done.stdout.splitlines()[0]
