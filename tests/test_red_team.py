"""Red-team inputs that earlier suites missed: each test names the input, fails on the code
before its fix and asserts the exact refusal (or the exact state after it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bad_input_helpers import assert_one_line_refusal, run_cli
from kvtier import (
    CacheConfig,
    KVCacheManager,
    Request,
    Scheduler,
    SchedulerConfig,
    SequenceSpec,
)
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


# ---- the scheduler's step / update protocol -----------------------------------------------


def make_decoding() -> tuple[KVCacheManager, Scheduler]:
    """A scheduler whose request 'a' (5 prompt tokens, 3 to generate) sampled its first
    token, 7."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16))
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=16))
    sched.add_request(Request("a", [1, 2, 3, 4, 5], 3))
    sched.update(sched.step(), {"a": 7})
    return mgr, sched


def test_a_second_step_before_update_is_refused() -> None:
    """step(), step(): the second scheduled the same prefill chunk again and the manager
    counted its tokens twice (a later step raised 'has 2 unscheduled prompt tokens');
    now RuntimeError, and the first step still applies."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16))
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=4))
    sched.add_request(Request("a", list(range(1, 11)), 2))
    first = sched.step()
    with pytest.raises(RuntimeError, match="before update"):
        sched.step()
    assert mgr.num_unscheduled_tokens("a") == 6
    sched.update(first, {})
    chunks = []
    while sched.has_unfinished():
        step = sched.step()
        chunks += [(c.first_token, c.num_tokens) for c in step.context_chunks]
        sampled = {rid: 9 for rid in step.decode_request_ids}
        sampled.update({c.request_id: 8 for c in step.context_chunks
                        if c.first_token + c.num_tokens == 10})
        for req in sched.update(step, sampled):
            assert req.output == [8, 9]
        mgr.check_invariants()
    assert chunks == [(4, 4), (8, 2)]


def test_a_step_is_applied_once() -> None:
    """update() of a step already applied appended its tokens a second time ([7, 8, 8]);
    now RuntimeError, the output as it was."""
    mgr, sched = make_decoding()
    step = sched.step()
    sched.update(step, {"a": 8})
    with pytest.raises(RuntimeError, match="no step is waiting"):
        sched.update(step, {"a": 8})
    assert sched.running["a"].output == [7, 8]
    latest = sched.step()
    with pytest.raises(RuntimeError, match="another step is"):
        sched.update(step, {"a": 8})
    assert [r.output for r in sched.update(latest, {"a": 9})] == [[7, 8, 9]]
    mgr.check_invariants()


@pytest.mark.parametrize(("sampled", "stopped"), [
    ({"a": 8}, None), ({"a": 8}, "a"), ({"a": 8}, 5), (None, ()), ([("a", 8)], ()),
])
def test_update_with_a_bad_argument_changes_nothing(sampled: object, stopped: object) -> None:
    """update(step, {'a': 8}, stopped=None) appended 8 and then raised TypeError: now a
    TypeError naming the argument before anything changes; the step still applies."""
    _, sched = make_decoding()
    step = sched.step()
    with pytest.raises(TypeError, match=r"sampled|stopped"):
        sched.update(step, sampled, stopped)  # type: ignore[arg-type]
    assert sched.running["a"].output == [7]
    assert sched.update(step, {"a": 8}) == []
    assert sched.running["a"].output == [7, 8]


def test_requeue_of_a_request_still_live_is_refused() -> None:
    """requeue_failed(step, 'a') queued 'a' (a str is an iterable of ids) though the manager
    still held it: its next admission raised 'already live'. Now refused, changing nothing."""
    mgr, sched = make_decoding()
    step = sched.step()
    with pytest.raises(TypeError, match="request_ids"):
        sched.requeue_failed(step, "a")
    with pytest.raises(ValueError, match="still live in the manager"):
        sched.requeue_failed(step, ["a"])
    assert list(sched.running) == ["a"] and not sched.waiting
    sched.update(step, {"a": 8})
    mgr.check_invariants()


@pytest.mark.parametrize(("manager", "config"), [
    (None, None), ("mgr", None), (KVCacheManager(CacheConfig()), "claim"),
])
def test_scheduler_refuses_what_is_no_manager_or_config(manager: object, config: object,
                                                         ) -> None:
    """Scheduler(None) raised AttributeError deep inside; now TypeError naming it."""
    with pytest.raises(TypeError, match=r"manager|config"):
        Scheduler(manager, config)  # type: ignore[arg-type]


# ---- a consumer's fault -------------------------------------------------------------------


def test_a_snapshot_source_that_raises_loses_no_other_update() -> None:
    """A stale instance whose snapshot source raises (it is down): poll raised, the updates
    of every other instance polled with it were lost, and every later poll raised too. Now
    the instance stays stale, is asked again next poll, and resyncs once it answers."""
    from kvtier.publisher import EventBatch, InMemoryEventBus, InstanceLost, manager_snapshot

    def manager() -> KVCacheManager:
        return KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16,
                                          enable_events=True))

    down, healthy = manager(), manager()
    bus = InMemoryEventBus()
    subscriber = bus.subscribe(max_events=3)  # the 5 events of 'down' overflow: a gap
    up = False

    def source() -> object:
        if not up:
            raise ConnectionError("instance down")
        return manager_snapshot(down, "down", 5)

    bus.register_snapshot("down", source)  # type: ignore[arg-type]
    down.add_sequence(SequenceSpec("a", list(range(20))))
    bus.publish("down", down.drain_events())
    healthy.add_sequence(SequenceSpec("b", list(range(8))))
    bus.publish("healthy", healthy.drain_events())
    updates = subscriber.poll()
    assert [type(u) for u in updates] == [InstanceLost, EventBatch]
    batch = updates[1]
    assert isinstance(batch, EventBatch)
    assert batch.instance_id == "healthy" and len(batch.events) == 2
    assert subscriber.num_failed_snapshots == 1 and subscriber.tracker.stale_instances() == [
        "down"]
    up = True
    (snapshot,) = subscriber.poll()
    assert snapshot.instance_id == "down" and not subscriber.tracker.stale_instances()


def test_redis_publisher_with_redis_down_loses_the_batch_not_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RedisStreamPublisher.publish with Redis down raised redis' ConnectionError into the
    serving loop. Now the batch is counted lost; the next one goes out, its seq showing the
    hole to subscribers (which resync from a snapshot)."""
    redis = pytest.importorskip("redis")
    from kvtier import publisher, stream_client, stream_publisher
    from kvtier.event_codec import decode_events

    class Client:
        """Down for its first command, then takes every entry."""

        def __init__(self) -> None:
            self.entries: list[dict[str, object]] = []

        def xadd(self, stream: str, fields: dict[str, object], **options: object) -> bytes:
            if not self.entries and not hasattr(self, "was_down"):
                self.was_down = True
                raise redis.exceptions.ConnectionError("Connection refused")
            self.entries.append(fields)
            return f"{len(self.entries)}-0".encode()  # the entry id, as Redis answers

        def set(self, key: str, value: object, **options: object) -> None:
            pass  # the instance's claim, set with its first entry

        def delete(self, *keys: str) -> int:  # DEL of many keys: those of before hash tags
            return 0

        def eval(self, script: str, *args: object) -> int:
            if script == stream_publisher._SET_IF_CLAIMED:  # the snapshot's write
                raise redis.exceptions.TimeoutError("Timeout reading from socket")
            return 0  # the conditional delete of the snapshot key: none is stored

        def pipeline(self, transaction: bool = True) -> Pipeline:
            return Pipeline(self)

    class Pipeline:
        """Queues the commands of a first or seq-0 batch (the claim, the old snapshot's
        delete, the entry) and runs them on execute, as a MULTI/EXEC transaction does."""

        def eval(self, *args: object, **options: object) -> None:
            self.queued.append(("eval", args, options))

        def set(self, *args: object, **options: object) -> None:
            self.queued.append(("set", args, options))

        def __init__(self, client: Client) -> None:
            self.client = client
            self.queued: list[tuple[str, tuple[object, ...], dict[str, object]]] = []

        def delete(self, *args: object, **options: object) -> None:
            self.queued.append(("delete", args, options))

        def xadd(self, *args: object, **options: object) -> None:
            self.queued.append(("xadd", args, options))

        def execute(self) -> list[object]:
            return [getattr(self.client, name)(*args, **options)
                    for name, args, options in self.queued]

    client = Client()
    monkeypatch.setattr(stream_client, "connect", lambda url, **_: client)
    pub = publisher.RedisStreamPublisher("redis://unused")
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16, enable_events=True))
    mgr.add_sequence(SequenceSpec("a", list(range(8))))
    pub.publish("i0", mgr.drain_events())
    mgr.add_sequence(SequenceSpec("b", list(range(20, 24))))
    pub.publish("i0", mgr.drain_events())
    pub.publish_snapshot(publisher.manager_snapshot(mgr, "i0", 3))
    assert pub.num_failed_batches == 2
    (entry,) = client.entries
    assert [e.seq for e in decode_events(str(entry["e"]))] == [2]


def test_redis_subscriber_with_redis_down_returns_what_it_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RedisStreamSubscriber.poll raised redis' errors; where the read succeeded and the
    resync request then failed, the updates read were lost (``last_id`` had moved past
    them). Now poll returns them, and asks for the resync again at the next poll."""
    redis = pytest.importorskip("redis")
    from kvtier import publisher, stream_client
    from kvtier.event_codec import encode_events
    from kvtier.publisher import EventBatch, InstanceLost

    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16, enable_events=True))
    mgr.add_sequence(SequenceSpec("a", list(range(12))))
    events = mgr.drain_events()  # seq 0, 1, 2: the subscriber reads 0 and 2, a gap

    class Client:
        def __init__(self) -> None:
            self.up = False
            self.resyncs: list[object] = []

        def xread(self, streams: object, **options: object) -> object:
            if not self.up:
                raise redis.exceptions.ConnectionError("Connection refused")
            self.up = False  # down again right after this read
            rows = [(b"1-0", {b"i": b"i0", b"e": encode_events(events[:1]).encode()}),
                    (b"2-0", {b"i": b"i0", b"e": encode_events(events[2:]).encode()})]
            return [(b"kvtier:events", rows)]

        def xadd(self, stream: str, fields: object, **options: object) -> bytes:
            if not self.up:
                raise redis.exceptions.TimeoutError("Timeout writing to socket")
            self.resyncs.append(fields)
            return b"1-0"

        def get(self, key: str) -> None:
            if not self.up:
                raise redis.exceptions.ConnectionError("Connection refused")

    client = Client()
    monkeypatch.setattr(stream_client, "connect", lambda url, **_: client)
    subscriber = publisher.RedisStreamSubscriber("redis://unused")
    assert subscriber.poll() == []  # down
    client.up = True
    updates = subscriber.poll()
    assert [type(u) for u in updates] == [EventBatch, InstanceLost]
    assert subscriber.last_id == b"2-0" and client.resyncs == []
    client.up = True
    client.xread = lambda streams, **options: []  # type: ignore[method-assign]
    assert subscriber.poll() == [] and client.resyncs == [{"i": "i0"}]


@pytest.mark.parametrize(("hash_ids", "shown"), [
    ("[1, -2]", "got -2 at index 1"), ('[1, "2"]', "got '2' at index 1"),
    ("[true, 2]", "got True at index 0"), ('"12"', "got '12'"),
])
def test_mooncake_hash_ids_name_the_bad_value(tmp_path: Path, hash_ids: str, shown: str,
                                              ) -> None:
    """A bad hash id is named with its index (the message named only the field)."""
    path = tmp_path / "t.jsonl"
    path.write_text(GOOD_ROW.replace("[1, 2]", hash_ids) + "\n")
    with pytest.raises(TraceFormatError, match=f"{path}:1: field 'hash_ids': .*{shown}"):
        MooncakeTrace(path)


@pytest.mark.parametrize("assignment", [
    "step_overhead_s=1e300", "prefill_s_per_token=1e306", "decode_s_per_seq=1e200",
    "pcie_bytes_per_s=1e-300", "kv_bytes_per_token=99999999999999999999999999999",
])
def test_profile_constants_that_overflow_the_clock_are_refused(assignment: str) -> None:
    """Finite but absurd profile constants overflowed the virtual clock to inf and the
    replay died in OverflowError (status 70); now refused by field before it runs."""
    code, stderr = run_cli(["replay", "--no-progress", "--limit", "20",
                            "--set-profile", assignment])
    assert_one_line_refusal(code, stderr, "--set-profile", assignment)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_byte_order_mark_is_skipped(tmp_path: Path, suffix: str) -> None:
    """A UTF-8 byte order mark (as Windows tools write) made line 1 malformed JSON or an
    unknown CSV header; it is skipped, and the trace reads as without it."""
    text = f"{GOOD_ROW}\n" if suffix == ".jsonl" else f"{AZURE_HEADER}{AZURE_ROW}"
    plain, marked = tmp_path / f"plain{suffix}", tmp_path / f"marked{suffix}"
    plain.write_text(text)
    marked.write_bytes(b"\xef\xbb\xbf" + text.encode())
    read = MooncakeTrace if suffix == ".jsonl" else AzureTrace
    assert [r.prompt for r in read(marked)] == [r.prompt for r in read(plain)]
    assert len(read(marked)) == 1


def test_add_request_refuses_an_id_the_manager_holds() -> None:
    """A request admitted to the manager directly, then queued with the scheduler under the
    same id: every step raised 'already live' and nothing was admitted again. Now
    add_request refuses it, and the other requests run."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16))
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=64))
    mgr.add_sequence(SequenceSpec("x", [1, 2, 3]))
    with pytest.raises(ValueError, match="'x' is live in the manager"):
        sched.add_request(Request("x", [4, 5, 6], 2))
    sched.add_request(Request("y", [4, 5, 6], 1))
    step = sched.step()
    assert [c.request_id for c in step.context_chunks] == ["y"]
    assert [r.request_id for r in sched.update(step, {"y": 9})] == ["y"]
    mgr.check_invariants()


@pytest.mark.parametrize(("line", "problem"), [
    ("[" * 100_000 + "]" * 100_000, "is nested too deeply"),
    ('{"prompt": "hi", "n": 1' + "0" * 5000 + "}", "holds a number too long to read"),
])
def test_generate_jsonl_json_errors_beyond_decode_errors(tmp_path: Path, line: str,
                                                          problem: str) -> None:
    """kvtier generate --jsonl caught only JSONDecodeError: deep nesting (RecursionError) and
    a 5,000-digit number (a bare ValueError) ended as internal errors (status 70). Now one
    line naming the line, before any model is loaded."""
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hello"}\n' + line + "\n")
    code, stderr = run_cli(["generate", "--jsonl", str(path)])
    assert_one_line_refusal(code, stderr, f"{path} line 2 {problem}")
