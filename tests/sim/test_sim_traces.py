"""Tests of the Mooncake and Azure trace readers."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from kvtier.sim import AzureTrace, MooncakeTrace, OracleRequest, TraceFormatError, Workload

MOONCAKE_OK = '{"timestamp": 1500, "input_length": 600, "output_length": 5, "hash_ids": [3, 9]}'
AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"
AZURE_OK = "2023-11-16 18:15:46.6805900,374,44"


def make_file(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / name
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    return path


def mooncake_line(**fields: object) -> str:
    record: dict[str, object] = {
        "timestamp": 2000, "input_length": 600, "output_length": 5, "hash_ids": [3, 9]
    }
    record.update(fields)
    return json.dumps({k: v for k, v in record.items() if v is not None})


def test_mooncake_prompt_tokens_follow_hash_ids(tmp_path: Path) -> None:
    """Hash id h stands for tokens h*512.., the last block cut to input_length."""
    path = make_file(tmp_path, "mc.jsonl", [MOONCAKE_OK, mooncake_line(hash_ids=[3, 10])])
    trace = MooncakeTrace(path)
    assert isinstance(trace, Workload)
    first, second = list(trace)
    # hash_ids [3      | 9        ]  input_length 600
    # tokens   [1536..2047 | 4608..4695]
    assert first.prompt == list(range(1536, 2048)) + list(range(4608, 4696))
    assert (first.request_id, first.arrival_s, first.output_length) == ("mc-0", 1.5, 5)
    assert first.session_id is None
    assert second.prompt[:512] == first.prompt[:512]
    assert second.prompt[512] == 10 * 512
    assert trace.describe()["num_prompt_tokens"] == 1200
    assert trace.unlimited_hit_rate() == 512 / 1200


def test_mooncake_oracle_requests_split_hash_blocks(tmp_path: Path) -> None:
    """Oracle keys are the hash ids at 512 tokens and (id, sub-block) pairs below."""
    path = make_file(tmp_path, "mc.jsonl", [MOONCAKE_OK])
    trace = MooncakeTrace(path, tokens_per_block=256)
    assert list(trace.oracle_requests(512)) == [OracleRequest((3, 9), 600)]
    assert list(trace.oracle_requests()) == [OracleRequest(((3, 0), (3, 1), (9, 0)), 600)]


def test_mooncake_limit_keeps_first_requests(tmp_path: Path) -> None:
    """limit keeps only the first requests and stops validating after them."""
    path = make_file(tmp_path, "mc.jsonl", [MOONCAKE_OK, MOONCAKE_OK, "not json"])
    assert len(MooncakeTrace(path, limit=2)) == 2


@pytest.mark.parametrize("tokens_per_block", [0, 48, 1024, "32"])
def test_mooncake_block_size_must_divide_512(tmp_path: Path, tokens_per_block: object) -> None:
    """tokens_per_block must divide 512."""
    path = make_file(tmp_path, "mc.jsonl", [MOONCAKE_OK])
    with pytest.raises(ValueError, match=f"tokens_per_block .*{re.escape(repr(tokens_per_block))}"):
        MooncakeTrace(path, tokens_per_block=tokens_per_block)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bad_line", "field"),
    [
        ('{"timestamp": 0, "input_length": 6', "<json>"),
        ("[1, 2]", "<json>"),
        (mooncake_line(timestamp=None), "timestamp"),
        (mooncake_line(input_length=None), "input_length"),
        (mooncake_line(output_length=None), "output_length"),
        (mooncake_line(hash_ids=None), "hash_ids"),
        (mooncake_line(timestamp="2000"), "timestamp"),
        (mooncake_line(input_length=600.0), "input_length"),
        (mooncake_line(output_length="5"), "output_length"),
        (mooncake_line(hash_ids="3,9"), "hash_ids"),
        (mooncake_line(hash_ids=[3, "9"]), "hash_ids"),
        (mooncake_line(input_length=-1), "input_length"),
        (mooncake_line(output_length=-1), "output_length"),
        (mooncake_line(hash_ids=[3]), "hash_ids"),
        (mooncake_line(hash_ids=[3, 9, 10]), "hash_ids"),
        (mooncake_line(timestamp=1000), "timestamp"),
    ],
)
def test_mooncake_errors_name_file_line_and_field(
    tmp_path: Path, bad_line: str, field: str
) -> None:
    """Every malformed line raises TraceFormatError naming file, 1-based line and field."""
    path = make_file(tmp_path, "mc.jsonl", [MOONCAKE_OK, MOONCAKE_OK, bad_line])
    with pytest.raises(TraceFormatError) as info:
        MooncakeTrace(path)
    assert str(info.value).startswith(f"{path}:3: field {field!r}: ")
    assert (info.value.path, info.value.line_number, info.value.field) == (path, 3, field)
    assert isinstance(info.value, ValueError)


def test_mooncake_unlimited_hit_rates_match_background(
    trace_file: Callable[[str], Path],
) -> None:
    """Unlimited-cache token hit rates: 37.4 % (conversation) and 65.1 % (synthetic)."""
    conversation = MooncakeTrace(trace_file("mooncake_conversation_trace.jsonl"))
    synthetic = MooncakeTrace(trace_file("mooncake_synthetic_trace.jsonl"))
    assert (len(conversation), len(synthetic)) == (12031, 3993)
    assert round(100 * conversation.unlimited_hit_rate(), 1) == 37.4
    assert round(100 * synthetic.unlimited_hit_rate(), 1) == 65.1


def test_mooncake_real_prompts_have_input_length(trace_file: Callable[[str], Path]) -> None:
    """Prompts of the real trace have input_length tokens; ids repeat exactly with hash ids."""
    trace = MooncakeTrace(trace_file("mooncake_conversation_trace.jsonl"), limit=50)
    requests = list(trace)
    oracle = list(trace.oracle_requests(512))
    assert [len(r.prompt) for r in requests] == [o.num_tokens for o in oracle]
    assert requests[0].prompt[:512] == requests[1].prompt[:512] == list(range(512))
    assert requests[0].arrival_s == 0.0


def test_azure_rows_become_requests_of_exact_length(tmp_path: Path) -> None:
    """Arrivals count from the first row; prompts have exactly ContextTokens tokens."""
    rows = [AZURE_HEADER, AZURE_OK, "2023-11-16 18:15:50.9951690,396,109",
            "2023-11-16 18:15:50.9951690,3,0"]
    trace = AzureTrace(make_file(tmp_path, "az.csv", rows))
    requests = list(trace)
    assert isinstance(trace, Workload)
    assert [r.arrival_s for r in requests] == [0.0, 4.314579, 4.314579]
    assert [len(r.prompt) for r in requests] == [374, 396, 3]
    assert [r.output_length for r in requests] == [44, 109, 0]
    assert [r.request_id for r in requests] == ["az-0", "az-1", "az-2"]
    assert trace.describe()["num_prompt_tokens"] == 773


@pytest.mark.parametrize(
    ("bad_row", "line", "field"),
    [
        ("2023-11-16 18:15:47,374", 3, "<row>"),
        ("2023-11-16 25:15:47.1,374,44", 3, "TIMESTAMP"),
        ("yesterday,374,44", 3, "TIMESTAMP"),
        ("2023-11-16 18:15:47.x,374,44", 3, "TIMESTAMP"),
        ("2023-11-16 18:15:40.0,374,44", 3, "TIMESTAMP"),
        ("2023-11-16 18:15:47.0,37.4,44", 3, "ContextTokens"),
        ("2023-11-16 18:15:47.0,0,44", 3, "ContextTokens"),
        ("2023-11-16 18:15:47.0,374,-1", 3, "GeneratedTokens"),
        ("2023-11-16 18:15:47.0,374,", 3, "GeneratedTokens"),
    ],
)
def test_azure_errors_name_file_line_and_field(
    tmp_path: Path, bad_row: str, line: int, field: str
) -> None:
    """Every malformed row raises TraceFormatError naming file, 1-based line and field."""
    path = make_file(tmp_path, "az.csv", [AZURE_HEADER, AZURE_OK, bad_row])
    with pytest.raises(TraceFormatError, match=f"^{path}:{line}: field {field!r}: "):
        AzureTrace(path)


def test_azure_bad_header_is_reported_on_line_1(tmp_path: Path) -> None:
    """A wrong header raises TraceFormatError on line 1."""
    path = make_file(tmp_path, "az.csv", ["time,ctx,gen", AZURE_OK])
    with pytest.raises(TraceFormatError, match=f"^{path}:1: field '<header>': "):
        AzureTrace(path)


def test_azure_prefix_model_is_deterministic_per_seed(trace_file: Callable[[str], Path]) -> None:
    """The same seed gives the same prompts; another seed gives other ones."""
    path = trace_file("azure_llm_2023_conv.csv")
    first = [(r.session_id, r.prompt) for r in AzureTrace(path, seed=7, limit=500)]
    again = [(r.session_id, r.prompt) for r in AzureTrace(path, seed=7, limit=500)]
    other = [(r.session_id, r.prompt) for r in AzureTrace(path, seed=8, limit=500)]
    assert first == again
    assert first != other


def test_azure_real_trace_lengths_and_follow_ups(trace_file: Callable[[str], Path]) -> None:
    """Real Azure rows keep their lengths; follow-ups extend their session's last prompt."""
    trace = AzureTrace(trace_file("azure_llm_2023_code.csv"), limit=2000)
    assert trace.describe()["num_requests"] == 2000
    last_prompt: dict[str | None, list[int]] = {}
    num_follow_ups = 0
    for request in trace:
        before = last_prompt.get(request.session_id)
        if before is not None:
            num_follow_ups += 1
            assert request.prompt[: len(before)] == before
        last_prompt[request.session_id] = request.prompt
    assert num_follow_ups > 200
    assert AzureTrace(trace_file("azure_llm_2023_code.csv")).describe()["num_requests"] == 8819
