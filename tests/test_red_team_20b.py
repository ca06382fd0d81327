"""Red team, pass 20b: the trace readers given files that mix their formats, timestamps in
a unit the reader was told or past the clock's precision, blocks an id names at two
lengths, chat ids that contradict; generated traces against a reference model of what
their prompts, keys, sessions and unlimited hit rate must be, and replayed end to end."""

from __future__ import annotations

import csv
import io
import itertools
import json
from pathlib import Path
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.blocks import cdiv
from kvtier.config import EVICTION_POLICIES, CacheConfig
from kvtier.scheduler import SchedulerConfig
from kvtier.sim import simulate
from kvtier.sim.traces import MooncakeTrace, TraceFormatError


def write_rows(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def row(timestamp: float = 0, input_length: int = 20, hash_ids: tuple[int, ...] = (1,),
        **extra: object) -> dict[str, object]:
    return {"timestamp": timestamp, "input_length": input_length, "output_length": 1,
            "hash_ids": list(hash_ids), **extra}


# ---- a file whose rows are of two formats -------------------------------------------------------

@pytest.mark.parametrize(("first", "second"), [
    # A Bailian row, then one without "chat_id": KeyError 'chat_id', naming no line.
    (row(chat_id=1), row(timestamp=1)),
    # A Mooncake row, then one with "chat_id": read as Mooncake's, its chat ids dropped.
    (row(), row(timestamp=1, chat_id=1)),
])
def test_a_row_of_the_other_format_than_the_first_is_refused_naming_its_line(
        tmp_path: Path, first: dict[str, object], second: dict[str, object]) -> None:
    """The first row tells the format; a later row of the other one (with or without a
    chat id) is a TraceFormatError naming its line and the key."""
    path = write_rows(tmp_path / "t.jsonl", [first, second])
    with pytest.raises(TraceFormatError) as refused:
        MooncakeTrace(path)
    assert refused.value.line_number == 2
    assert refused.value.field == "chat_id"


# ---- timestamps in the unit the reader was told -------------------------------------------------

@pytest.mark.parametrize(("unit_s", "timestamp", "arrival_s"), [
    # 1e15 us is 1e9 s, under the 1e10 s a trace may span: refused as "more than 1e13
    # (ms, or s in a Bailian trace)", whatever the unit.
    (1e-6, 10**15, 1e9),
    (1e-3, 9 * 10**12, 9e9),
])
def test_a_timestamp_is_bounded_in_the_unit_given(tmp_path: Path, unit_s: float,
                                                  timestamp: int, arrival_s: float) -> None:
    """A timestamp is bounded by the seconds it stands for in the trace's unit, not by
    the ms of Mooncake's."""
    path = write_rows(tmp_path / "t.jsonl", [row(timestamp=timestamp)])
    assert [r.arrival_s for r in MooncakeTrace(path, time_unit_s=unit_s)] == [arrival_s]


@pytest.mark.parametrize(("unit_s", "timestamp", "shown"), [
    (1e-6, 10**17, "1e+11 s"),
    (3600.0, 10**7, "3.6e+10 s"),
    (1e-9, 10**400, "expected a finite number >= 0"),  # past the float range
    (None, 2 * 10**13, "2e+10 s"),
])
def test_a_timestamp_past_the_span_names_its_seconds(tmp_path: Path, unit_s: float | None,
                                                      timestamp: int, shown: str) -> None:
    """Past the span, the refusal names the timestamp's seconds in the unit given."""
    path = write_rows(tmp_path / "t.jsonl", [row(timestamp=timestamp)])
    with pytest.raises(TraceFormatError, match="timestamp") as refused:
        MooncakeTrace(path, time_unit_s=unit_s)
    assert shown in str(refused.value)


# ---- Bailian conversations: chat ids and their parents -------------------------------------------

def chat_rows(*links: tuple[int, int]) -> list[dict[str, object]]:
    return [row(timestamp=line, chat_id=chat, parent_chat_id=parent)
            for line, (chat, parent) in enumerate(links)]


def test_a_parent_read_after_its_child_gives_them_one_session(tmp_path: Path) -> None:
    """Chat 2 names chat 1, which comes later and names chat 0: the three were sessions
    chat-1, chat-0, chat-0 (the parent not yet read taken as the conversation's root);
    now one conversation, chat-0's."""
    path = write_rows(tmp_path / "t.jsonl", chat_rows((2, 1), (1, 0), (0, -1), (5, 9)))
    sessions = [r.session_id for r in MooncakeTrace(path)]
    assert sessions == ["chat-0", "chat-0", "chat-0", "chat-9"]  # 9: before the trace


@pytest.mark.parametrize(("links", "line", "field", "shown"), [
    # The second chat 1 took the first's place as a parent, without a word.
    (((1, -1), (1, -1), (2, 1)), 2, "chat_id", "chat id 1 is given twice (first on line 1)"),
    # A chat that follows itself, or two that follow each other: sessions named by
    # whichever was read first.
    (((3, 3),), 1, "parent_chat_id", "chat 3 follows itself (lines 1)"),
    (((1, 2), (2, 1)), 1, "parent_chat_id", "chat 1 follows itself (lines 1, 2)"),
    # -1 is no parent: a chat -1 was session 'chat--1', no chat's parent.
    (((-1, -1),), 1, "chat_id", "expected an integer id >= 0, got -1"),
])
def test_chat_ids_that_contradict_are_refused_naming_the_line(
        tmp_path: Path, links: tuple[tuple[int, int], ...], line: int, field: str,
        shown: str) -> None:
    """A chat id given twice, a chain of parents that comes back to a chat, a chat id of
    -1: TraceFormatError naming the line and the field."""
    path = write_rows(tmp_path / "t.jsonl", chat_rows(*links))
    with pytest.raises(TraceFormatError) as refused:
        MooncakeTrace(path)
    assert (refused.value.line_number, refused.value.field) == (line, field)
    assert shown in str(refused.value)


# ---- a block an id names at two lengths ----------------------------------------------------------

@pytest.mark.parametrize("bailian", [False, True])
def test_a_partial_last_block_seen_is_no_hit_for_the_whole_block(tmp_path: Path,
                                                                  bailian: bool) -> None:
    """After a prompt of 100 tokens, one of 512 with the same id had counted 512 hits with
    an unlimited cache (0.84 for 100 + 512 tokens): only the first 100 were ever seen, and
    no prefix of 512 tokens, so none at the hash blocks' granularity. The reverse (the
    whole block first) hits the partial one."""
    chat = [{"chat_id": 0}, {"chat_id": 1}] if bailian else [{}, {}]
    path = write_rows(tmp_path / "t.jsonl", [row(0, 100, (5,), **chat[0]),
                                             row(1, 512, (5,), **chat[1])])
    assert MooncakeTrace(path, block_tokens=512).unlimited_hit_rate() == 0.0
    path = write_rows(tmp_path / "t.jsonl", [row(0, 512, (5,), **chat[0]),
                                             row(1, 100, (5,), **chat[1])])
    assert MooncakeTrace(path, block_tokens=512).unlimited_hit_rate() == 100 / 612


# ---- generated traces against a reference of what the prompts and keys must be ------------------

B = 4  # the generated traces' hash block (block_tokens)


@st.composite
def mooncake_rows(draw: st.DrawFn) -> list[dict[str, object]]:
    """Mooncake rows: prefix hash ids (each id always after the same id), ceil(L / B) ids,
    timestamps in ms, equal or increasing."""
    parents: dict[int, int | None] = {}
    children: dict[int | None, list[int]] = {}
    rows = []
    timestamp = 0
    for _ in range(draw(st.integers(1, 8))):
        ids: list[int] = []
        for _ in range(draw(st.integers(1, 4))):
            parent = ids[-1] if ids else None
            known = children.get(parent, [])
            reuse: bool = draw(st.booleans())
            if known and reuse:
                h = draw(st.sampled_from(known))
            else:
                h = len(parents) * 7 + draw(st.integers(0, 6))  # fresh, not dense
                parents[h] = parent
                children.setdefault(parent, []).append(h)
            ids.append(h)
        length = (len(ids) - 1) * B + draw(st.integers(1, B))
        timestamp += draw(st.integers(0, 3))
        rows.append(row(timestamp=timestamp, input_length=length, hash_ids=tuple(ids)))
    return rows


@st.composite
def bailian_rows(draw: st.DrawFn) -> list[dict[str, object]]:
    """Bailian rows: content hash ids from a small set (repeating anywhere), the partial
    last block with or without an id, chat ids whose parents form a forest (a parent
    before or after its child in the file, or none, or one before the trace's window)."""
    rows = []
    timestamp = 0.0
    num_chats = draw(st.integers(1, 8))
    for chat in draw(st.permutations(range(num_chats))):
        num_blocks = draw(st.integers(0, 4))
        tail = draw(st.integers(0, B - 1))
        length = num_blocks * B + tail
        if length == 0:
            length, tail = 1, 1
        num_ids = num_blocks + (1 if tail and draw(st.booleans()) else 0)
        ids = tuple(draw(st.lists(st.integers(0, 3), min_size=num_ids, max_size=num_ids)))
        parent = draw(st.sampled_from([-1, 100, *range(chat)]))
        timestamp += draw(st.sampled_from([0.0, 0.25, 1.0]))
        rows.append(row(timestamp=timestamp, input_length=length, hash_ids=ids,
                        chat_id=chat, parent_chat_id=parent))
    return rows


def brute_unlimited_hit_rate(prompts: list[list[int]]) -> float:
    """Per prompt, the longest prefix of min(k * B, L) tokens that an earlier prompt
    began with, over all prompts' tokens."""
    num_hits = 0
    for index, prompt in enumerate(prompts):
        ends = [min(k * B, len(prompt)) for k in range(cdiv(len(prompt), B) + 1)]
        num_hits += max(end for end in ends
                        if any(p[:end] == prompt[:end] and len(p) >= end
                               for p in prompts[:index]) or end == 0)
    return num_hits / sum(len(p) for p in prompts)


def check_against_reference(trace: MooncakeTrace, rows: list[dict[str, object]],
                            tokens_per_block: int) -> None:
    prompts = [r.prompt for r in trace]
    assert [len(p) for p in prompts] == [r["input_length"] for r in rows]
    ids = [cast("list[int]", r["hash_ids"]) for r in rows]
    for a, b in itertools.combinations(range(len(rows)), 2):
        for k in range(1, min(len(ids[a]), len(ids[b])) + 1):
            full = k * B <= min(len(prompts[a]), len(prompts[b]))
            if full:  # equal id prefixes <=> equal token prefixes, block by block
                assert (ids[a][:k] == ids[b][:k]) == (prompts[a][:k * B] == prompts[b][:k * B])
    # A partial last block without an id: its tokens are the request's own.
    for index, prompt in enumerate(prompts):
        own = prompt[len(ids[index]) * B:]
        others = {t for j, p in enumerate(prompts) if j != index for t in p}
        assert not set(own) & others
    # Oracle keys: distinct within a request; equal keys name equal token prefixes, but
    # for a partial last block, keyed as the whole one (the oracles' convention, a bound:
    # a cache reuses a prefix of a block it holds).
    keyed: dict[object, list[int]] = {}
    for request, prompt in zip(trace.oracle_requests(tokens_per_block), prompts, strict=True):
        keys = request.block_keys
        assert len(keys) == cdiv(len(prompt), tokens_per_block)
        assert len(set(keys)) == len(keys)
        for j, key in enumerate(keys):
            tokens = prompt[:min((j + 1) * tokens_per_block, len(prompt))]
            other = keyed.setdefault(key, tokens)
            shorter, longer = sorted((other, tokens), key=len)
            assert longer[:len(shorter)] == shorter, (key, j)
            assert len(shorter) == len(longer) or len(shorter) % tokens_per_block, (key, j)
    assert trace.unlimited_hit_rate() == pytest.approx(brute_unlimited_hit_rate(prompts))
    if trace.format.name == "bailian":  # a session is its conversation's first chat
        parent_of = {r["chat_id"]: r["parent_chat_id"] for r in rows}

        def root(chat: object) -> object:
            parent = parent_of[chat]
            return chat if parent == -1 else root(parent) if parent in parent_of else parent

        assert [r.session_id for r in trace] == [f"chat-{root(r['chat_id'])}" for r in rows]


@settings(max_examples=300, deadline=None)
@given(rows=st.one_of(mooncake_rows(), bailian_rows()), tokens_per_block=st.integers(1, 9))
def test_generated_traces_match_the_reference(tmp_path_factory: pytest.TempPathFactory,
                                              rows: list[dict[str, object]],
                                              tokens_per_block: int) -> None:
    """A generated Mooncake or Bailian trace: prompts share exactly what their ids share,
    tails are their own, oracle keys name their token prefixes, and the unlimited hit rate
    is the brute-force one over token prefixes at the hash blocks' granularity."""
    path = write_rows(tmp_path_factory.mktemp("gen") / "t.jsonl", rows)
    trace = MooncakeTrace(path, tokens_per_block=tokens_per_block, block_tokens=B)
    check_against_reference(trace, rows, tokens_per_block)


@settings(max_examples=60, deadline=None)
@given(rows=st.one_of(mooncake_rows(), bailian_rows()),
       sizes=st.sampled_from([(2, 16, 0), (2, 24, 8), (4, 12, 4), (1, 40, 0)]),
       policy=st.sampled_from(EVICTION_POLICIES))
def test_generated_traces_replay_without_lost_reuse(tmp_path_factory: pytest.TempPathFactory,
                                                    rows: list[dict[str, object]],
                                                    sizes: tuple[int, int, int],
                                                    policy: str) -> None:
    """Each generated trace replays through small caches, under every eviction policy,
    with the invariants checked at every step, and no reuse promised is lost."""
    tokens_per_block, num_gpu_blocks, num_host_blocks = sizes
    path = write_rows(tmp_path_factory.mktemp("gen") / "t.jsonl", rows)
    trace = MooncakeTrace(path, tokens_per_block=tokens_per_block, block_tokens=B)
    cache = CacheConfig(tokens_per_block=tokens_per_block, num_gpu_blocks=num_gpu_blocks,
                        num_host_blocks=num_host_blocks, eviction_policy=policy)
    report = simulate(trace, cache, SchedulerConfig(max_num_tokens=16), "tiny-test",
                      check_every=1)
    assert report.num_lost_reuse_tokens == 0
    assert report.num_requests + report.num_rejected_too_large == len(rows)


# ---- BurstGPT seconds past the clock's precision ------------------------------------------------

def test_a_burstgpt_timestamp_past_the_span_is_refused(tmp_path: Path) -> None:
    """Seconds of 21 digits were read as floats of 1e20, arrivals measured from the first
    row: rows 1 s and 0.5 s apart all arrived at 0.0, without a word. A timestamp is
    bounded as a JSONL trace's is: at most the 1e10 s a trace may span."""
    from kvtier.sim.traces import AzureTrace

    path = tmp_path / "b.csv"
    path.write_text("Timestamp,Request tokens,Response tokens\n"
                    f"{10**20},3,4\n{10**20}.5,3,4\n{10**20 + 1},3,4\n")
    with pytest.raises(TraceFormatError, match="1e\\+10 s") as refused:
        AzureTrace(path)
    assert (refused.value.line_number, refused.value.field) == (2, "Timestamp")
    path.write_text("Timestamp,Request tokens,Response tokens\n"
                    "1700000000.25,3,4\n1700000001,3,4\n")  # seconds since 1970 still read
    assert [r.arrival_s for r in AzureTrace(path)] == [0.0, 0.75]


Row = tuple[float, int, int]  # seconds, request and response tokens


@st.composite
def burstgpt_files(draw: st.DrawFn) -> tuple[str, list[Row]]:
    """A BurstGPT CSV (its columns in any order among extra ones with quotes, commas and
    line breaks; a byte order mark or not; CRLF or LF) and the rows it holds."""
    extra = draw(st.lists(st.sampled_from(["Model", "Total tokens", "Log Type", 'a "b", c']),
                          unique=True, max_size=3))
    header = draw(st.permutations(["Timestamp", "Request tokens", "Response tokens", *extra]))
    # NOTE: no lone CR: csv.writer leaves a cell with one unquoted under LF line ends.
    cell = st.lists(st.sampled_from(["a", "b", " ", ",", '"', "\n", "\r\n"]),
                    max_size=5).map("".join)
    rows = []
    seconds = 0.0
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        seconds += draw(st.sampled_from([0.0, 0.5, 1.25, 3.0]))
        lengths = (draw(st.integers(1, 40)), draw(st.integers(0, 9)))
        rows.append((seconds, *lengths))
        values = {"Timestamp": repr(seconds), "Request tokens": str(lengths[0]),
                  "Response tokens": str(lengths[1]), "Total tokens": str(sum(lengths))}
        lines.append([values.get(name) or draw(cell) for name in header])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=draw(st.sampled_from(["\n", "\r\n"])),
                        quoting=draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])))
    writer.writerows([header, *lines])
    return ("\ufeff" if draw(st.booleans()) else "") + out.getvalue(), rows


@settings(max_examples=200, deadline=None)
@given(generated=burstgpt_files())
def test_generated_burstgpt_files_read_their_rows(tmp_path_factory: pytest.TempPathFactory,
                                                  generated: tuple[str, list[Row]]) -> None:
    """Every row of a generated BurstGPT file is read: arrivals from the first row's,
    prompts of exactly the request tokens, outputs of the response tokens."""
    from kvtier.sim.traces import AzureTrace

    text, rows = generated
    path = tmp_path_factory.mktemp("gen") / "b.csv"
    path.write_bytes(text.encode("utf-8"))
    trace = AzureTrace(path)
    assert trace.format.name == "burstgpt"
    got = [(r.arrival_s, len(r.prompt), r.output_length) for r in trace]
    first = rows[0][0] if rows else 0.0
    assert got == [(s - first, prompt, output) for s, prompt, output in rows]


def test_a_csv_header_with_both_formats_columns_is_refused(tmp_path: Path) -> None:
    """A header with Azure's columns and BurstGPT's was read as Azure's, the BurstGPT
    lengths dropped without a word; which the file is, it does not say: refused naming
    the header."""
    from kvtier.sim.traces import AzureTrace

    path = tmp_path / "both.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens,Timestamp,Request tokens,"
                    "Response tokens\n2023-11-16 18:15:46,3,4,0,5,6\n")
    with pytest.raises(TraceFormatError, match="both azure and burstgpt") as refused:
        AzureTrace(path)
    assert (refused.value.line_number, refused.value.field) == (1, "<header>")


# ---- bench_policy --workloads ---------------------------------------------------------------

@pytest.mark.parametrize("names", [
    # Two traces of one name in two folders: the second replaced the first, one row set.
    ["{a}/t.jsonl", "{b}/t.jsonl"],
    # A trace named as a built-in workload: the built-in one was dropped.
    ["chat", "{a}/chat.jsonl"],
    ["chat", "chat"],
])
def test_bench_policy_refuses_two_workloads_of_one_name(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, names: list[str]) -> None:
    """Workloads are keyed by name: two of one name stop the run naming both, where one
    was replaced by the other without a word."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    module = __import__("bench_policy")
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for stem in ("t", "chat"):
            write_rows(tmp_path / folder / f"{stem}.jsonl", [row()])
    paths = [n.format(a=tmp_path / "a", b=tmp_path / "b") for n in names]
    with pytest.raises(SystemExit, match="given twice"):
        module.workloads(paths, 10)


def test_bench_policy_names_a_malformed_trace(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    """A malformed trace stops the run in one line naming the file and line (it was a
    TraceFormatError traceback)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    module = __import__("bench_policy")
    path = write_rows(tmp_path / "t.jsonl", [row(hash_ids=()) | {"hash_ids": "x"}])
    with pytest.raises(SystemExit, match=f"malformed trace: {path}:1: field 'hash_ids'"):
        module.workloads([str(path)], 10)
