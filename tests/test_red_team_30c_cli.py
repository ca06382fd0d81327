"""Red team 30c: every numeric option of every ``kvtier`` command refuses a value out of its
range naming the option and the value as typed, status 2, before anything runs.

The options are read from the parser itself: an option added later is walked too, and one
whose type declares no range (where the layers behind it have one) fails the walk."""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from kvtier import cli
from kvtier.cli import build_parser, main
from kvtier.cli_numbers import IntListRange, IntRange, NumberRange
from kvtier.sim import ModelProfile, SimReport, simulate

NUMERIC = (IntRange, IntListRange, NumberRange)
SIM_COMMANDS = ("replay", "compare", "sweep")


def numeric_options() -> list[tuple[str, str, IntRange | IntListRange | NumberRange]]:
    """(command, option, its type) for every option of every command that reads numbers."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for command, sub in commands.choices.items():
        for action in sub._actions:
            assert action.type not in (int, float), (command, action.option_strings)
            if isinstance(action.type, NUMERIC):
                out.append((command, action.option_strings[0], action.type))
    return out


def out_of_range(kind: IntRange | IntListRange | NumberRange) -> list[str]:
    """Texts just past each finite bound of ``kind`` (and a non-power of two in range for a
    power-of-two option): what it must refuse. Pure."""
    if isinstance(kind, IntRange):
        texts = [str(kind.minimum - 1)] if kind.minimum is not None else []
        if kind.maximum is not None:
            texts.append(str(kind.maximum + 1))
        if kind.power_of_two:
            texts.append(str(3 * max(1, kind.minimum or 1)))
        return texts
    if isinstance(kind, IntListRange):
        texts = [f"{kind.minimum + 1},{kind.minimum - 1}"]
        if kind.maximum is not None:
            texts.append(str(kind.maximum + 1))
        return texts
    texts = []
    if math.isfinite(kind.low):
        texts.append(f"{kind.low:g}" if kind.low_open else f"{kind.low - 1:g}")
    if math.isfinite(kind.high):
        texts.append(f"{kind.high * 2 + 1:g}")
    return texts


PROBES = [(command, option, text) for command, option, kind in numeric_options()
          for text in out_of_range(kind)]


def test_every_numeric_option_declares_its_range() -> None:
    """Only the simulator's --seed (any integer seeds it) and --trace-block-tokens (its
    choices bound it) take every integer; every other numeric option has a range, walked
    below. Before, --tokens-per-block, --offload-min-priority, --max-num-tokens,
    --max-batch-size, --max-chunk-tokens, --temperature, --top-p, generate's --seed and
    --router-alpha declared none and the config behind them refused with its own field
    name ("invalid configuration: max_num_tokens must be an integer >= 1, got 0")."""
    unbounded = {(command, option) for command, option, kind in numeric_options()
                 if not out_of_range(kind)}
    assert unbounded == {(c, o) for c in SIM_COMMANDS
                         for o in ("--seed", "--trace-block-tokens")}


@pytest.mark.parametrize(("command", "option", "text"), PROBES)
def test_an_out_of_range_value_names_the_option_and_the_value_as_typed(
        capsys: pytest.CaptureFixture[str], command: str, option: str, text: str) -> None:
    """One line, status 2: ``argument OPTION: must be ..., got TEXT``."""
    assert main([command, option, text]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"kvtier: error: argument {option}: "), err
    assert "must be" in err, err
    assert err.endswith(f", got {text} (see 'kvtier {command} --help')\n"), err
    assert err.count("\n") == 1


PROFILE_FIELDS = [f.name for f in fields(ModelProfile) if f.type in ("int", "float")]


@pytest.mark.parametrize("text", ["-1", "1e300"])
@pytest.mark.parametrize("key", PROFILE_FIELDS)
def test_a_set_profile_value_out_of_range_names_the_assignment_as_typed(
        capsys: pytest.CaptureFixture[str], key: str, text: str) -> None:
    """--set-profile pcie_bytes_per_s=-1 said "invalid profile: pcie_bytes_per_s must be a
    finite number in [1.0, 1000000000000000.0], got -1.0": the value as the profile
    held it. Now the assignment as typed, and the value."""
    assert main(["replay", "--no-progress", "--limit", "1", "--set-profile",
                 f"{key}={text}"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"kvtier: error: --set-profile {key}={text}: must be "), err
    assert err.endswith(f", got {text}\n") and err.count("\n") == 1, err


def test_the_profile_fields_walked() -> None:
    """Every number constant of a profile is walked (overlap_transfers is a bool)."""
    assert sorted(PROFILE_FIELDS) == ["decode_s_per_seq", "kv_bytes_per_token",
                                      "pcie_bytes_per_s", "pcie_duplex", "prefill_s_per_token",
                                      "step_overhead_s"]


@pytest.mark.parametrize("args", [
    ["--tokens-per-block", "1"], ["--tokens-per-block", "65536"],
    ["--host-blocks", "8", "--offload-min-priority", "0"],
    ["--host-blocks", "8", "--offload-min-priority", "100"],
    ["--max-num-tokens", "1"], ["--max-batch-size", "1"], ["--max-chunk-tokens", "1"],
    ["--instances", "2", "--router-alpha", "0"], ["--instances", "2", "--router-alpha", "1e6"],
])
def test_a_bound_itself_is_taken(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    """A declared range is no wider than the configs behind it: its bounds run."""
    assert main(["replay", "--no-progress", "--no-oracle", "--limit", "2", "--gpu-blocks",
                 "16384", *args]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["--temperature", "0"], ["--top-p", "1"], ["--seed", "0"],
    ["--seed", str(2**32 - 1)], ["--tokens-per-block", "65536"],
])
def test_a_generate_bound_passes_the_sampling_and_tier_checks(
        capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    """generate checks its sampling and tier options before it looks for the model: a
    bound reaches the model lookup (a missing model), no refusal before it."""
    pytest.importorskip("torch", reason="the model commands need torch")
    assert main(["generate", "--model", "/nonexistent-30c.gguf", *args, "hi"]) == 2
    assert capsys.readouterr().err == (
        "kvtier: error: model path /nonexistent-30c.gguf does not exist\n")


# ---- red team 31b: the extremes a range takes run, or are refused in one line, quickly ----

LARGEST_INT = "9" * 4300  # the largest integer the command line reads (Python's digit limit)
COMPANIONS = {  # what an option needs beside it to take effect
    "--draft-acceptance": ["--num-speculative-tokens", "1"],
    "--offload-min-priority": ["--host-blocks", "8"],
    "--router-alpha": ["--instances", "2"],
    **{option: ["--instances", "2", "--remote", "write-back", "--host-blocks", "8"]
       for option in ("--remote-latency-ms", "--remote-bandwidth-gb-s", "--remote-deadline-ms")},
}
CSV_TRACE = ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.0,600,4\n"
             "2023-11-16 18:15:46.5,700,4\n2023-11-16 18:15:47.0,650,4\n")
JSONL_TRACE = "".join(f'{{"timestamp": {t}, "input_length": 1000, "output_length": 4, '
                      f'"hash_ids": [1, {t + 2}]}}\n' for t in (0, 500, 1000))


def accepted_extremes(kind: IntRange | IntListRange | NumberRange,
                      choices: object) -> list[str]:
    """The largest and the smallest text ``kind`` takes (an integer of 4,300 digits where
    it has no bound, the smallest positive float above an open 0). Pure."""
    if choices is not None:
        values = sorted(choices)  # type: ignore[call-overload]
        return [str(values[-1]), str(values[0])]
    if isinstance(kind, IntRange):
        low = "-" + LARGEST_INT if kind.minimum is None else str(kind.minimum)
        return [LARGEST_INT if kind.maximum is None else str(kind.maximum), low]
    if isinstance(kind, IntListRange):
        return [LARGEST_INT if kind.maximum is None else str(kind.maximum), str(kind.minimum)]
    high = repr(kind.high) if math.isfinite(kind.high) else repr(sys.float_info.max)
    if not math.isfinite(kind.low):
        return [high, repr(-sys.float_info.max)]
    return [high, repr(math.ulp(0.0)) if kind.low_open and kind.low == 0 else repr(kind.low)]


def sim_actions() -> Iterator[tuple[str, argparse.Action]]:
    """(command, option's action) for every numeric option of the simulator's commands."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in SIM_COMMANDS:
        for action in commands.choices[command]._actions:
            if isinstance(action.type, NUMERIC):
                yield command, action


EXTREMES = [(command, action.option_strings[0], text) for command, action in sim_actions()
            for text in accepted_extremes(action.type, action.choices)]  # type: ignore[arg-type]


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail the test (TimeoutError) if the block runs past ``seconds``."""
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"ran past {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(("command", "option", "text"), EXTREMES)
def test_the_extremes_of_every_numeric_option_run_or_are_refused_quickly(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, option: str,
        text: str) -> None:
    """Red team 31b: ``--time-scale 1e300`` was taken, and the replay refused its requests
    one by one as it reached them (``--time-scale 3e7``: 1,379 requests simulated for 12 s,
    then all refused). Every numeric option's largest and smallest value now either runs to
    a report with finite numbers or is refused in one line, well within a minute, on a
    three-request trace."""
    trace = tmp_path / ("t.jsonl" if option == "--trace-block-tokens" else "t.csv")
    trace.write_text(JSONL_TRACE if trace.suffix == ".jsonl" else CSV_TRACE)
    argv = [command, str(trace), "--no-progress", option, text, *COMPANIONS.get(option, [])]
    if command == "sweep" and option != "--host-blocks":
        argv += ["--host-blocks", "8"]
    with deadline(60):
        code = main(argv)
    out, err = capsys.readouterr()
    if code == 0:
        json.loads(out.splitlines()[-1], parse_constant=lambda word: pytest.fail(word))
        assert err == ""
    else:
        assert code == 2 and out == "", (code, err)
        assert err.startswith("kvtier: error: ") and err.count("\n") == 1, err


def test_a_time_scale_that_puts_a_late_arrival_past_the_clock_is_refused_before_the_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Red team 31b: the first request fit the clock, the last did not: the replay ran the
    first two before it refused the third (on a long trace, hours). Refused before the run
    now, naming the request."""
    trace = tmp_path / "t.csv"
    trace.write_text(CSV_TRACE.replace("18:15:47.0", "18:15:48.0"))  # at 0, 0.5 and 2 s
    calls: list[object] = []

    def counted(*args: Any, **kwargs: Any) -> SimReport:
        calls.append(args)
        return simulate(*args, **kwargs)

    monkeypatch.setattr(cli, "simulate", counted)
    assert main(["replay", str(trace), "--no-progress", "--time-scale", "6e9"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and calls == []
    assert err == ("kvtier: error: cannot replay: request 't-2' arrives at 2 s x time "
                   "scale 6e+09 = 1.2e+10 s, past the 1e+10 s a replay's virtual clock tells "
                   "microseconds apart; lower the time scale\n")
