"""Red team 26b, simulator: every figure a replay reports holds against a hand computation
on a workload small enough to work out."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import pytest

from kvtier import CacheConfig, SchedulerConfig
from kvtier.remote.store import InMemoryRemoteStore
from kvtier.sim import oracle_bounds, replay, simulate
from kvtier.sim.fleet import simulate_fleet, stand_in_namespace
from kvtier.sim.heldout import HeldOutWorkload
from kvtier.sim.oracle import OracleRequest, unlimited_hit_tokens
from kvtier.sim.replay import ReplayLoop, as_time_model
from kvtier.sim.report import format_report
from kvtier.sim.trace_file import TraceFormatError
from kvtier.sim.traces import MooncakeTrace
from kvtier.sim.workload import TraceRequest
from list_workload import ListWorkload

# 4-token blocks: b shares a's first block and the head [5, 6, 7] of its second one.
#   a  [1 2 3 4 | 5 6 7 8 | 9]
#   b  [1 2 3 4 | 5 6 7 99 | 98]   reuses 4 whole + 3 partial = 7 of its 9 tokens
PARTIAL = [TraceRequest("a", 0.0, [1, 2, 3, 4, 5, 6, 7, 8, 9], 1),
           TraceRequest("b", 10.0, [1, 2, 3, 4, 5, 6, 7, 99, 98], 1)]


def test_bounds_follow_the_replays_partial_reuse() -> None:
    """A replay with partial reuse never reads above its unlimited (or Belady) bound."""
    workload = ListWorkload(PARTIAL)
    report = simulate(workload, CacheConfig(tokens_per_block=4, num_gpu_blocks=16),
                      profile="tiny-test", oracle=True)
    assert report.num_reused_tokens == 7 and report.num_prompt_tokens == 18
    assert report.oracle is not None
    # Before: whole blocks only, 4 / 18, below the replay's 7 / 18.
    assert report.oracle.unlimited_hit_rate == 7 / 18
    assert report.oracle.belady_hit_rate == 7 / 18
    assert report.oracle.lru_hit_rate == 7 / 18
    # Without partial reuse the replay reuses the whole block alone, and so do the bounds.
    whole = simulate(workload, CacheConfig(tokens_per_block=4, num_gpu_blocks=16,
                                           enable_partial_reuse=False),
                     profile="tiny-test", oracle=True)
    assert whole.num_reused_tokens == 4
    assert whole.oracle is not None and whole.oracle.unlimited_hit_rate == 4 / 18
    assert oracle_bounds(workload, 4, [16])[0].unlimited_hit_rate == 4 / 18


def test_the_report_says_which_rule_its_bounds_count_by() -> None:
    """The oracle line said "full 4-token blocks" for bounds that count a block's head
    too; the bounds now carry their rule (``partial_reuse``), in the JSON and the line."""
    workload = ListWorkload(PARTIAL)
    for partial, text in ((True, "offline, 4-token blocks and the heads partial reuse takes,"),
                          (False, "offline, full 4-token blocks,")):
        report = simulate(workload, CacheConfig(tokens_per_block=4, num_gpu_blocks=16,
                                                enable_partial_reuse=partial),
                          profile="tiny-test", oracle=True)
        assert report.oracle is not None and report.oracle.partial_reuse is partial
        assert report.to_dict()["oracle"]["partial_reuse"] is partial  # type: ignore[index]
        [line] = [x for x in format_report(report) if x.startswith("oracle")]
        assert text in line, line


def _reference_unlimited(prompts: list[list[int]], tokens_per_block: int) -> int:
    """Hit tokens of an unlimited cache with partial reuse, by hand: each prompt's longest
    common head with any earlier prompt."""
    num_hit = 0
    for i, prompt in enumerate(prompts):
        best = 0
        for earlier in prompts[:i]:
            n = 0
            while n < min(len(prompt), len(earlier)) and prompt[n] == earlier[n]:
                n += 1
            best = max(best, n)
        num_hit += min(best, len(prompt))
    return num_hit


@pytest.mark.parametrize("family", ["tiny", "fewshot", "parallel"])
def test_unlimited_with_partial_reuse_is_the_longest_common_head(family: str) -> None:
    """The unlimited bound with partial reuse equals a brute-force longest common head."""
    workload = HeldOutWorkload(family, 0, 60)
    prompts = [r.prompt for r in workload]
    num_tokens = sum(map(len, prompts))
    bound = oracle_bounds(workload, 16, [4096], partial_reuse=True)[0]
    assert bound.unlimited_hit_rate == _reference_unlimited(prompts, 16) / num_tokens


@pytest.mark.parametrize("family", ["tiny", "fewshot", "parallel", "bursty"])
def test_replay_stays_below_its_bounds_on_held_out_families(family: str) -> None:
    """On the held-out families (partial reuse on, the default) a replay's hit rate stays
    at or below the unlimited and Belady bounds beside it."""
    workload = HeldOutWorkload(family, 0, 200)
    report = simulate(workload, CacheConfig(tokens_per_block=16, num_gpu_blocks=4096),
                      profile="tiny-test", oracle=True)
    assert report.oracle is not None
    assert report.token_hit_rate <= report.oracle.belady_hit_rate
    assert report.oracle.belady_hit_rate <= report.oracle.unlimited_hit_rate


def test_partial_tokens_are_checked() -> None:
    """An oracle request whose partial counts are past a block is refused, naming them."""
    bad = OracleRequest((b"k",), 6, (0, 5))
    with pytest.raises(ValueError, match=r"partial_tokens must be a tuple .* in 0\.\.4, "
                                         r"got \(0, 5\)"):
        unlimited_hit_tokens([bad], 4)
    with pytest.raises(ValueError, match="partial_reuse must be a bool, got 'yes'"):
        oracle_bounds(ListWorkload(PARTIAL), 4, [16], partial_reuse="yes")  # type: ignore[arg-type]


class AnsweringStore(InMemoryRemoteStore):
    """A caller's store whose ``put_many`` / ``get_many`` answer ``put`` / ``get`` (a
    callable of the batch) after doing their work, or raise."""

    def __init__(self, put: Callable[[int], object], get: Callable[[object], object]) -> None:
        super().__init__(stand_in_namespace(16))
        self.put, self.get = put, get
        self.num_taken = 0

    def put_many(self, items: Mapping[int, bytes]) -> int:
        self.num_taken += super().put_many(items)
        return self.put(len(items))  # type: ignore[return-value]

    def get_many(self, hashes: Iterable[int]) -> dict[int, memoryview]:
        return self.get(super().get_many(hashes))  # type: ignore[return-value]


def _raise(_: object) -> object:
    raise RuntimeError("backend down")


# Two sessions' turns on two instances, round robin: each turn's history is on the other.
FLEET = [TraceRequest(f"r{i}", i * 1.0, list(range(64 + 16 * i)), 4) for i in range(6)]


@pytest.mark.parametrize("put", [lambda n: None, lambda n: 99, lambda n: 2.0, lambda n: True,
                                 lambda n: "2", lambda n: -1, _raise])
def test_fleet_counts_only_the_writes_a_store_answers_for(put: Callable[[int], object]) -> None:
    """A store's put_many that answers no count of the blocks written (None, 99 for 2,
    2.0, True, a str, -1) or raises wrote nothing the fleet counts or fetches; the
    simulation goes on."""
    store = AnsweringStore(put, lambda found: found)
    report = simulate_fleet(ListWorkload(FLEET), CacheConfig(tokens_per_block=16,
                                                             num_gpu_blocks=64),
                            2, "round-robin", profile="tiny-test", remote="write-through",
                            remote_store=store)
    assert report.num_requests == 6 and report.remote is not None
    assert report.remote["num_written_blocks"] == 0
    assert report.remote["num_fetched_blocks"] == 0
    assert report.remote["num_imported_blocks"] == 0


def test_fleet_counts_the_writes_of_a_store_that_answers_right() -> None:
    """The same fleet with a store answering its true count: the written blocks counted,
    fetched by the other instance (the reference for the test above)."""
    store = AnsweringStore(lambda n: n, lambda found: found)
    report = simulate_fleet(ListWorkload(FLEET), CacheConfig(tokens_per_block=16,
                                                             num_gpu_blocks=64),
                            2, "round-robin", profile="tiny-test", remote="write-through",
                            remote_store=store)
    assert report.remote is not None
    assert report.remote["num_written_blocks"] == store.num_taken > 0
    assert int(report.remote["num_fetched_blocks"]) > 0  # type: ignore[call-overload]


@pytest.mark.parametrize("get", [_raise, lambda found: None, lambda found: {**found, 7: b""},
                                 lambda found: 5])
def test_fleet_reads_only_what_a_store_answers_for(get: Callable[[object], object]) -> None:
    """A store's get_many that raises, answers no mapping or adds a block not asked for:
    a miss (or the blocks asked for alone), never a crash, never a block charged that was
    not asked for."""
    store = AnsweringStore(lambda n: n, get)
    report = simulate_fleet(ListWorkload(FLEET), CacheConfig(tokens_per_block=16,
                                                             num_gpu_blocks=64),
                            2, "round-robin", profile="tiny-test", remote="write-through",
                            remote_store=store)
    assert report.num_requests == 6 and report.remote is not None
    fetched = report.remote["num_fetched_blocks"]
    assert isinstance(fetched, int)
    assert fetched <= int(report.remote["num_hit_blocks"])  # type: ignore[call-overload]


BAILIAN_ROWS = [
    {"chat_id": 1, "parent_chat_id": -1, "timestamp": 1.0, "input_length": 32,
     "output_length": 4, "type": "text", "turn": 1, "hash_ids": [10, 11]},
    {"chat_id": 2, "parent_chat_id": 1, "timestamp": 2.0, "input_length": 48,
     "output_length": 4, "type": "text", "turn": 2, "hash_ids": [10, 11, 12]},
]


@pytest.mark.parametrize(("key", "meant"), [
    ("parent_chatid", "parent_chat_id"), ("parentChatId", "parent_chat_id"),
    ("Parent_Chat_ID", "parent_chat_id"), ("hash_id", "hash_ids"),
    ("time_stamp", "timestamp"), ("chat_ids", "chat_id")])
def test_a_misspelt_trace_key_is_refused(tmp_path: Path, key: str, meant: str) -> None:
    """A row whose key is one letter (or case and separators) off a key the reader takes:
    before, ignored, so a misspelt parent_chat_id split a conversation without a word;
    now TraceFormatError naming the line, the key and the key it misses."""
    rows = [dict(row) for row in BAILIAN_ROWS]
    rows[1][key] = rows[1].get(meant, 1)
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(TraceFormatError, match=re.escape(
            f"{path}:2: field {key!r}: unknown key; did you mean {meant!r}? (a misspelt key "
            "would be ignored)")):
        MooncakeTrace(path)


def test_keys_no_reader_takes_are_still_ignored(tmp_path: Path) -> None:
    """Other keys (far from any the reader takes) are ignored as before, and the two
    sessions of the Bailian rows stay one conversation."""
    rows = [{**row, "user": "u1", "session": 3, "turns": 1} for row in BAILIAN_ROWS]
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert [r.session_id for r in MooncakeTrace(path)] == ["chat-1", "chat-1"]


@pytest.mark.parametrize("name", ["mooncake_conversation_trace.jsonl",
                                  "mooncake_synthetic_trace.jsonl"])
def test_the_public_traces_still_read(trace_file: Callable[[str], Path], name: str) -> None:
    """Every public trace passes the key rule."""
    assert len(MooncakeTrace(trace_file(name))) > 0


def test_cpu_per_step_counts_the_steps_that_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scheduler call that scheduled nothing (its one request held) is no step: its CPU
    counts in scheduler_s, not in the per-step mean, which such cheap polls pulled down."""
    now = [0.0]
    tick = [0.25]  # CPU seconds between two readings: a poll is cheap

    def clock() -> float:
        now[0] += tick[0]
        return now[0]

    monkeypatch.setattr(replay, "_cpu_clock", clock)
    loop = ReplayLoop(CacheConfig(tokens_per_block=4, num_gpu_blocks=16), SchedulerConfig(),
                      as_time_model("tiny-test"), 1.0, None, None)
    loop.arrive(TraceRequest("a", 0.0, [1, 2, 3, 4, 5], 2))
    loop.scheduler.hold("a")
    assert not loop.step()  # nothing to run: 0.5 s of CPU, no step
    loop.scheduler.release("a")
    tick[0] = 1.0  # a step that runs costs 2 s
    loop.run(iter(()))
    report = loop.report(ListWorkload([]), 0.0)
    assert report.num_steps == 2 and len(loop.step_cpu_s) == 2
    assert report.cpu["scheduler_s"] == 4.5  # the poll's 0.5 s and two steps of 2 s
    assert report.cpu["us_per_step_mean"] == 2e6  # before: 1.5e6, the poll among them
