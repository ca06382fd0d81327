"""Red-team inputs that earlier suites missed: each test names the input, fails on the code
before its fix and asserts the exact refusal (or the exact state after it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bad_input_helpers import assert_one_line_refusal, run_cli
from kvtier import CacheConfig
from kvtier.cli_workload import num_requests, open_workload
from kvtier.sim import AgenticWorkload, AzureTrace, MooncakeTrace, TraceFormatError
from kvtier.sim.workload import TraceRequest

SMALL = ["--limit", "3", "--no-progress", "--gpu-blocks", "64", "--tokens-per-block", "16"]
GOOD_ROW = '{"timestamp": 0, "input_length": 600, "output_length": 4, "hash_ids": [1, 2]}'
AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
AZURE_ROW = "2023-11-16 18:15:46.6805900,10,5\n"

# ---- numbers too large for a float, or for Python's int parser -----------------------------


@pytest.mark.parametrize(("row", "field"), [
    # An int timestamp past float range: math.isfinite raised OverflowError (status 70).
    (GOOD_ROW.replace('"timestamp": 0', '"timestamp": 1' + "0" * 400), "timestamp"),
    # A number of more than 4,300 digits: json.loads raised a bare ValueError, reported as
    # "invalid option for trace" without the line.
    (GOOD_ROW.replace('"output_length": 4', '"output_length": 1' + "0" * 5000), "<json>"),
])
def test_mooncake_numbers_past_float_or_int_parsing_name_the_line(
    tmp_path: Path, row: str, field: str,
) -> None:
    """Huge numbers in a Mooncake line: TraceFormatError naming file:line and the field; the
    command exits 2 in one short line."""
    path = tmp_path / "t.jsonl"
    path.write_text(f"{GOOD_ROW}\n{row}\n")
    with pytest.raises(TraceFormatError) as info:
        MooncakeTrace(path)
    assert info.value.line_number == 2 and info.value.field == field
    code, stderr = run_cli(["replay", str(path), *SMALL])
    assert_one_line_refusal(code, stderr, f"{path}:2", repr(field))
    assert len(stderr) < 300, stderr


@pytest.mark.parametrize("text", ["1_000", "١٢", "１２", " 1 2", "0x10", "9" * 5000])
def test_azure_lengths_are_ascii_integers(tmp_path: Path, text: str) -> None:
    """int() takes '1_000' and non-ASCII digits; an Azure length must be plain ASCII digits,
    refused by line and column (a 5,000-digit value shown cut short)."""
    path = tmp_path / "t.csv"
    path.write_text(f"{AZURE_HEADER}{AZURE_ROW}2023-11-16 18:15:47,{text},5\n")
    with pytest.raises(TraceFormatError) as info:
        AzureTrace(path)
    assert info.value.line_number == 3 and info.value.field == "ContextTokens"
    assert len(str(info.value)) < 300


def test_azure_lengths_with_a_sign_or_spaces_still_read(tmp_path: Path) -> None:
    """The strict check keeps what the reader took before: spaces around, a '+' sign."""
    path = tmp_path / "t.csv"
    path.write_text(f"{AZURE_HEADER}{AZURE_ROW}2023-11-16 18:15:47, +12 ,0\n")
    assert [(r.num_prompt_tokens, r.output_length) for r in AzureTrace(path)][1] == (12, 0)


@pytest.mark.parametrize(("field", "build"), [
    ("arrival_s", lambda: TraceRequest("r", 10**400, [1], 1)),
    ("session_rate_per_s", lambda: AgenticWorkload(session_rate_per_s=10**400)),
    ("min_step_gap_s", lambda: AgenticWorkload(min_step_gap_s=-(10**400))),
])
def test_an_int_past_float_range_is_a_value_error(field: str, build: Callable[[], object],
                                                  ) -> None:
    """The simulator's number checks refuse an int too large for a float with ValueError
    naming the field (they raised OverflowError)."""
    with pytest.raises(ValueError, match=field):
        build()


# ---- options that size work or are silently ignored ---------------------------------------


@pytest.mark.parametrize("workload", ["synthetic-chat", "agentic"])
def test_limit_past_a_built_in_workload_keeps_its_requests(workload: str) -> None:
    """--limit N is the first N requests: past the built-in workload's 2,000 it keeps them
    (it built a workload of N requests: --limit 10**20 never ended)."""
    cache = CacheConfig(tokens_per_block=16, num_gpu_blocks=64)
    for limit, expected in ((10**20, 2000), (2001, 2000), (7, 7)):
        opened = open_workload(None, workload, seed=0, limit=limit, cache=cache,
                               max_num_tokens=8192)
        assert num_requests(opened) == expected


def test_limit_with_the_race_workload_is_refused() -> None:
    """The race workload is sized from the cache: a --limit it would ignore is refused."""
    code, stderr = run_cli(["replay", "--workload", "race", "--limit", "3", "--no-progress",
                            "--gpu-blocks", "64", "--host-blocks", "64"])
    assert_one_line_refusal(code, stderr, "--limit does not apply to --workload race")
