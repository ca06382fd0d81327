"""Tests of the hash-id (Mooncake, Qwen-Bailian) and Azure trace readers."""

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


@pytest.mark.parametrize("tokens_per_block", [0, -32, "32", 1.5, True])
def test_mooncake_block_size_must_be_a_positive_integer(tmp_path: Path,
                                                        tokens_per_block: object) -> None:
    path = make_file(tmp_path, "mc.jsonl", [MOONCAKE_OK])
    with pytest.raises(ValueError, match=f"tokens_per_block .*{re.escape(repr(tokens_per_block))}"):
        MooncakeTrace(path, tokens_per_block=tokens_per_block)  # type: ignore[arg-type]


@pytest.mark.parametrize("tokens_per_block", [48, 1024])
def test_mooncake_blocks_that_do_not_divide_512_are_keyed_by_prefix(
        tmp_path: Path, tokens_per_block: int) -> None:
    """Blocks across hash blocks are keyed by the prefix of ids they end in and where in
    its last hash block: two prompts share exactly the keys of the blocks they share."""
    path = make_file(tmp_path, "mc.jsonl", [MOONCAKE_OK, mooncake_line(hash_ids=[3, 10])])
    trace = MooncakeTrace(path, tokens_per_block=tokens_per_block)
    first, second = trace.oracle_requests()
    assert len(first.block_keys) == -(-600 // tokens_per_block)
    shared = 512 // tokens_per_block  # blocks that end within hash block 3
    assert first.block_keys[:shared] == second.block_keys[:shared]
    assert not set(first.block_keys[shared:]) & set(second.block_keys)
    assert len(set(first.block_keys)) == len(first.block_keys)


BAILIAN_ROWS = [
    # chat 159 opens, 160 continues it (its prompt holds 159's blocks first), 161 is new
    # and its partial last block has no id; 162 continues 160.
    '{"chat_id": 159, "parent_chat_id": -1, "timestamp": 61.114, "input_length": 40, '
    '"output_length": 13, "type": "text", "turn": 1, "hash_ids": [1089, 1090, 1091]}',
    '{"chat_id": 160, "parent_chat_id": 159, "timestamp": 62.5, "input_length": 70, '
    '"output_length": 4, "type": "text", "turn": 2, "hash_ids": [1089, 1090, 1091, 7, 8]}',
    '{"chat_id": 161, "parent_chat_id": -1, "timestamp": 62.5, "input_length": 20, '
    '"output_length": 1, "type": "search", "turn": 1, "hash_ids": [1091]}',
    '{"chat_id": 162, "parent_chat_id": 160, "timestamp": 70, "input_length": 16, '
    '"output_length": 0, "type": "text", "turn": 3, "hash_ids": [1090]}',
]


def test_bailian_rows_become_requests_of_16_token_blocks(tmp_path: Path) -> None:
    """A Qwen-Bailian trace: timestamps in seconds, 16-token blocks, sessions by chat
    ids; a partial last block without an id is the request's own tokens."""
    trace = MooncakeTrace(make_file(tmp_path, "qwen.jsonl", BAILIAN_ROWS))
    requests = list(trace)
    assert [r.arrival_s for r in requests] == [61.114, 62.5, 62.5, 70.0]
    assert [len(r.prompt) for r in requests] == [40, 70, 20, 16]
    assert [r.session_id for r in requests] == ["chat-159", "chat-159", "chat-161", "chat-159"]
    first, second, third, fourth = (r.prompt for r in requests)
    assert first == [*range(1089 * 16, 1092 * 16)][:40]
    assert second[:40] == first and second[48:64] == list(range(7 * 16, 8 * 16))
    # 1091's tokens, then 4 of its own past every id of the trace (1091): id 1092 + 2
    assert third == [*range(1091 * 16, 1092 * 16), *range(1094 * 16, 1094 * 16 + 4)]
    assert fourth == list(range(1090 * 16, 1091 * 16))
    described = trace.describe()
    assert (described["kind"], described["hash_block_tokens"]) == ("bailian", 16)
    assert described["span_s"] == pytest.approx(70 - 61.114)


def test_bailian_ids_are_block_content_not_prefix(tmp_path: Path) -> None:
    """Ids hash a block's own content: the same id after another prefix is another
    block, in the oracle's keys and in the unlimited hit rate alike."""
    trace = MooncakeTrace(make_file(tmp_path, "qwen.jsonl", BAILIAN_ROWS), tokens_per_block=16)
    keys = [r.block_keys for r in trace.oracle_requests()]
    # 160 continues 159: its three blocks, the partial third keyed as the whole one (the
    # oracles count it, as Mooncake's convention does: they stay upper bounds)
    assert keys[1][:3] == keys[0]
    assert not set(keys[2]) & (set(keys[0]) | set(keys[1]))  # 1091 after nothing
    assert not set(keys[3]) & set(keys[0])  # 1090 first: not 159's second block
    # 160 finds 159's two whole blocks (32 tokens, the trace's granularity: 159 had only 8
    # tokens of the third); 161 and 162 nothing.
    assert trace.unlimited_hit_rate() == 32 / (40 + 70 + 20 + 16)
    coarse = MooncakeTrace(trace.path, tokens_per_block=32)
    first, second = list(coarse.oracle_requests())[:2]
    assert second.block_keys[:1] == first.block_keys[:1]  # tokens 0..31: blocks 1089, 1090
    assert second.block_keys[1] != first.block_keys[1]  # 160's covers 1091 and 7, 159's 1091 alone


def test_a_trace_in_other_units_and_blocks(tmp_path: Path) -> None:
    """``block_tokens`` and ``time_unit_s`` read a trace whose blocks or clock are not its
    format's; a row that fits the format's blocks only is refused naming the way."""
    rows = [mooncake_line(timestamp=3, input_length=600, hash_ids=[1, 2, 3])]
    path = make_file(tmp_path, "mc.jsonl", rows)
    with pytest.raises(TraceFormatError, match=r"has 3 ids, expected ceil\(600/512\) = 2 .*"
                       "--trace-block-tokens"):
        MooncakeTrace(path)
    trace = MooncakeTrace(path, block_tokens=256, time_unit_s=1.0)
    (request,) = list(trace)
    assert request.arrival_s == 3.0
    assert request.prompt == [*range(256, 256 * 3), *range(768, 768 + 88)]
    with pytest.raises(TraceFormatError, match=r"has 3 ids, expected ceil\(600/128\) = 5$"):
        MooncakeTrace(path, block_tokens=128)
    for bad in (0, 3, 1024, "16", None):
        if bad is not None:
            with pytest.raises(ValueError, match="block_tokens"):
                MooncakeTrace(path, block_tokens=bad)  # type: ignore[arg-type]
    for bad_unit in (0, -1.0, float("nan"), "1", 1e9):
        with pytest.raises(ValueError, match="time_unit_s"):
            MooncakeTrace(path, time_unit_s=bad_unit)  # type: ignore[arg-type]


@pytest.mark.parametrize(("field", "value"), [("chat_id", "7"), ("chat_id", -2),
                                              ("parent_chat_id", 1.5), ("parent_chat_id", True)])
def test_bailian_ids_of_the_wrong_type_are_named(tmp_path: Path, field: str,
                                                 value: object) -> None:
    row = json.loads(BAILIAN_ROWS[1])
    row[field] = value
    path = make_file(tmp_path, "qwen.jsonl", [BAILIAN_ROWS[0], json.dumps(row)])
    with pytest.raises(TraceFormatError, match=f"^{path}:2: field {field!r}: expected an "
                       "integer id"):
        MooncakeTrace(path)


def test_a_hash_id_too_large_for_its_blocks_is_named(tmp_path: Path) -> None:
    """Token ids h*B.. stay below 2**63: a 16-token trace takes ids a 512-token one
    refuses, and an id past its own bound is refused naming its line."""
    big = (1 << 63) // 512 + 5  # past the 512-token bound, within the 16-token one
    row = json.loads(BAILIAN_ROWS[3])  # 16 tokens: one id at 16 and at 512 tokens a block
    row["hash_ids"] = [big]
    path = make_file(tmp_path, "qwen.jsonl", [BAILIAN_ROWS[0], json.dumps(row)])
    assert max(list(MooncakeTrace(path))[1].prompt) == big * 16 + 15
    row["input_length"] = 40  # the first row's 40 tokens take 3 ids at 16, 1 at 512
    path = make_file(tmp_path, "qwen.jsonl", [json.dumps(row | {"hash_ids": [1], "chat_id": 1}),
                                               json.dumps(row | {"hash_ids": [big]})])
    with pytest.raises(TraceFormatError, match=f"^{path}:2: field 'hash_ids': id {big} is too "
                       "large"):
        MooncakeTrace(path, block_tokens=512)


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


BURSTGPT_HEADER = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type"


def test_burstgpt_rows_become_requests(tmp_path: Path) -> None:
    """A BurstGPT CSV: arrivals in seconds from the first row, prompts of exactly
    ``Request tokens`` tokens (prefixes synthesised as for Azure), other columns read past."""
    rows = [BURSTGPT_HEADER, "5,ChatGPT,472,18,490,Conversation log",
            "5.75,GPT-4,1021,0,1021,API log", "45.0,ChatGPT,3,7,10,Conversation log"]
    trace = AzureTrace(make_file(tmp_path, "burst.csv", rows))
    requests = list(trace)
    assert [r.arrival_s for r in requests] == [0.0, 0.75, 40.0]
    assert [len(r.prompt) for r in requests] == [472, 1021, 3]
    assert [r.output_length for r in requests] == [18, 0, 7]
    assert trace.describe()["kind"] == "burstgpt"
    assert AzureTrace(make_file(tmp_path, "az.csv", [AZURE_HEADER, AZURE_OK])).describe()[
        "kind"] == "azure"


@pytest.mark.parametrize(("bad_row", "field"), [
    ("4,ChatGPT,472,18,490,Conversation log", "Timestamp"),  # earlier than the row before
    ("-6,ChatGPT,472,18,490,Conversation log", "Timestamp"),
    ("nan,ChatGPT,472,18,490,Conversation log", "Timestamp"),
    ("1e3,ChatGPT,472,18,490,Conversation log", "Timestamp"),
    ("6,ChatGPT,0,18,490,Conversation log", "Request tokens"),
    ("6,ChatGPT,47.2,18,490,Conversation log", "Request tokens"),
    ("6,ChatGPT,472,-1,490,Conversation log", "Response tokens"),
    ("6,ChatGPT,472,18,490", "<row>"),
])
def test_burstgpt_errors_name_line_and_column(tmp_path: Path, bad_row: str, field: str) -> None:
    path = make_file(tmp_path, "burst.csv",
                     [BURSTGPT_HEADER, "5,ChatGPT,472,18,490,Conversation log", bad_row])
    with pytest.raises(TraceFormatError, match=f"^{path}:3: field {field!r}: "):
        AzureTrace(path)


@pytest.mark.parametrize("header", ["Timestamp,Request tokens,Model", "time,ctx,gen",
                                    "Timestamp,Request tokens,Response tokens,Request tokens"])
def test_a_csv_header_of_neither_format_is_refused(tmp_path: Path, header: str) -> None:
    path = make_file(tmp_path, "x.csv", [header, "1,2,3"])
    with pytest.raises(TraceFormatError, match=f"^{path}:1: field '<header>': "):
        AzureTrace(path)
