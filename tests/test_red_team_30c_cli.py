"""Red team 30c: every numeric option of every ``kvtier`` command refuses a value out of its
range naming the option and the value as typed, status 2, before anything runs.

The options are read from the parser itself: an option added later is walked too, and one
whose type declares no range (where the layers behind it have one) fails the walk."""

from __future__ import annotations

import argparse
import math
from dataclasses import fields

import pytest

from kvtier.cli import build_parser, main
from kvtier.cli_numbers import IntListRange, IntRange, NumberRange
from kvtier.sim import ModelProfile

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
    ["--temperature", "0"], ["--top-p", "1"], ["--seed", str(-(2**63))],
    ["--seed", str(2**64 - 1)], ["--tokens-per-block", "65536"],
])
def test_a_generate_bound_passes_the_sampling_and_tier_checks(
        capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    """generate checks its sampling and tier options before it looks for the model: a
    bound reaches the model lookup (a missing model), no refusal before it."""
    pytest.importorskip("torch", reason="the model commands need torch")
    assert main(["generate", "--model", "/nonexistent-30c.gguf", *args, "hi"]) == 2
    assert capsys.readouterr().err == (
        "kvtier: error: model path /nonexistent-30c.gguf does not exist\n")
