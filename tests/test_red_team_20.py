"""Red team, twentieth pass: input that contradicts itself or says one thing twice (a
`--jsonl` line with both forms or an unread key, a JSON object with a key twice, a sweep
size or profile constant given twice, Mooncake hash ids that name two prefixes), and
counts past any engine's that overflowed a float (the time model, the router's loads).
The model's half is in test_red_team_20_model.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from bad_input_helpers import assert_one_line_refusal, run_cli

# ---- kvtier generate --jsonl lines whose keys contradict or go unread --------------------------

@pytest.mark.parametrize(("line", "shown"), [
    # "prompt" was read when present, "turns" checked in its place: 5.encode(), an
    # internal error (status 70).
    ('{"prompt": 5, "turns": ["hi"]}', 'has both "prompt" and "turns"'),
    # The prompt was answered and the conversation dropped, without a word.
    ('{"prompt": "a", "turns": ["hi", "there"]}', 'has both "prompt" and "turns"'),
    # A misspelt key was ignored: the answer came without its system message.
    ('{"turns": ["hi"], "sytem": "be brief"}', "has a key kvtier does not read: 'sytem'"),
])
def test_a_prompts_line_whose_keys_contradict_or_go_unread_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str, shown: str) -> None:
    """A --jsonl line is one prompt or one conversation: one with both, or with a key no
    form has, is refused naming the line, before any model is looked for."""
    import kvtier.cli_generate

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(kvtier.cli_generate, "_load", never)
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ab"}\n' + line + "\n")
    code, err = run_cli(["generate", "--jsonl", str(path)])
    assert_one_line_refusal(code, err, f"{path} line 2 {shown}")


# ---- an option naming one thing twice -----------------------------------------------------------

@pytest.mark.parametrize(("argv", "shown"), [
    # Every run was made twice: two identical rows in the table, two points on the plot.
    (["sweep", "--gpu-blocks", "4096,2048,4096"],
     "argument --gpu-blocks: 4096 is given twice in '4096,2048,4096'"),
    (["sweep", "--host-blocks", "0,0"], "argument --host-blocks: 0 is given twice in '0,0'"),
    # The first value was dropped without a word.
    (["replay", "--set-profile", "pcie_bytes_per_s=1e9", "--set-profile",
      "pcie_bytes_per_s=2e9"],
     "--set-profile pcie_bytes_per_s is set twice ('1e9', then '2e9')"),
])
def test_an_option_naming_one_value_twice_is_refused_before_any_run(
        monkeypatch: pytest.MonkeyPatch, argv: list[str], shown: str) -> None:
    """A sweep's size list naming a size twice, or a profile constant set twice: refused
    in one line, before any run (as a policy named twice already was)."""
    import kvtier.cli

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the simulation ran")

    monkeypatch.setattr(kvtier.cli, "simulate", never)
    code, err = run_cli([*argv, "--limit", "2", "--no-progress"])
    assert_one_line_refusal(code, err, shown)


# ---- JSON objects with a key twice ---------------------------------------------------------------

def test_a_mooncake_line_with_a_key_twice_names_the_line_and_the_key(tmp_path: Path) -> None:
    """json.loads keeps the last of two values of one key: a line whose hash_ids were
    given twice replayed the second list, without a word. Now TraceFormatError naming the
    line and the key."""
    from kvtier.sim.traces import MooncakeTrace, TraceFormatError

    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 100, "output_length": 10, '
                    '"hash_ids": [1]}\n'
                    '{"timestamp": 5, "input_length": 100, "output_length": 10, '
                    '"hash_ids": [1], "hash_ids": [2]}\n')
    with pytest.raises(TraceFormatError) as refused:
        MooncakeTrace(path)
    assert str(refused.value) == f"{path}:2: field 'hash_ids': given twice in one object"


def test_a_prompts_line_with_a_key_twice_is_refused_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A --jsonl line with "prompt" twice answered the second, without a word."""
    import kvtier.cli_generate

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(kvtier.cli_generate, "_load", never)
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ab", "prompt": "cd"}\n')
    code, err = run_cli(["generate", "--jsonl", str(path)])
    assert_one_line_refusal(code, err, f"{path} line 1 has the key 'prompt' twice")


def test_a_snapshot_with_a_key_twice_is_malformed() -> None:
    """A snapshot {"i", "n", "n", "b"} resynced the router at the last next_seq."""
    from kvtier.event_codec import decode_snapshot

    with pytest.raises(ValueError) as refused:
        decode_snapshot('{"i": "a", "n": 0, "n": 7, "b": []}')
    assert str(refused.value) == ("malformed snapshot: the key 'n' is given twice in one "
                                  "object")


# ---- the time model's counts past any engine's -----------------------------------------------

@pytest.mark.parametrize(("call", "shown"), [
    (lambda tm: tm.compute_seconds(10**400, 0), "num_prefill_tokens"),
    (lambda tm: tm.compute_seconds(0, 10**400), "num_decode_seqs"),
    (lambda tm: tm.transfer_seconds(0, 10**400), "bytes_d2h"),
    (lambda tm: tm.step_seconds(0, 0, 10**400, 0), "bytes_h2d"),
    (lambda tm: tm.kv_bytes(2**63), "num_tokens"),
])
def test_time_model_counts_past_int64_name_the_field(call: object, shown: str) -> None:
    """A count past the float range raised OverflowError ("int too large to convert to
    float"), naming no field. Now ValueError naming it, for every count past 2**63 - 1."""
    from kvtier.sim import TimeModel, get_profile

    with pytest.raises(ValueError) as refused:
        call(TimeModel(get_profile("llama3-8b-h100")))  # type: ignore[operator]
    assert str(refused.value).startswith(f"{shown} must be an integer in 0..{2**63 - 1}, got")


def test_a_remote_links_bytes_past_int64_name_the_field() -> None:
    """The same for the fleet's remote link."""
    from kvtier.sim.timemodel import RemoteLink

    with pytest.raises(ValueError) as refused:
        RemoteLink().transfer_seconds(10**400)
    assert str(refused.value).startswith(f"num_bytes must be an integer in 0..{2**63 - 1}, got")


@pytest.mark.parametrize(("policy", "load", "shown"), [
    ("least-loaded", ("a", 10**400, 1), f"loads[0].queue_depth must be at most {2**63 - 1}"),
    ("cache-aware", ("a", 10**400, 1), f"loads[0].queue_depth must be at most {2**63 - 1}"),
    ("least-loaded", ("a", 1, 2**1100), f"loads[0].capacity must be at most {2**63 - 1}"),
])
def test_route_refuses_loads_past_int64_changing_no_stats(policy: str, load: tuple[str, int, int],
                                                          shown: str) -> None:
    """A queue depth (or capacity) past the float range was an OverflowError from inside
    the policy's division ("integer division result too large for a float"). Now refused
    with the other loads' checks, naming the load and the field; no stats counted."""
    from kvtier.router import InstanceLoad, Router, make_policy

    router = Router(make_policy(policy), 4)
    loads = [InstanceLoad(*load), InstanceLoad("b", 10**400, 1)]
    with pytest.raises(ValueError) as refused:
        router.route([1, 2, 3, 4, 5], loads)
    assert str(refused.value).startswith(shown)
    assert router.stats.num_routed == 0 and router.stats.per_instance == {}


# ---- Mooncake hash ids that contradict the prefixes they name -----------------------------------

@pytest.mark.parametrize(("rows", "shown"), [
    # One id twice in a prompt: the replay ran in full, then "cannot replay: block_keys must
    # be distinct within a request", naming neither the file, the line nor the field.
    (['[1, 1]'], "1: field 'hash_ids': hash id 1 at index 1 follows hash id 1, but it opens "
                 "the prompt before: a hash id names its whole prefix"),
    # One id after two different prefixes: the oracles counted a hit the cache could never
    # have (its tokens follow other tokens there).
    (['[7, 8]', '[8]'], "2: field 'hash_ids': hash id 8 at index 0 opens the prompt, but it "
                        "follows hash id 7 before: a hash id names its whole prefix"),
    (['[7, 8]', '[9, 8]'], "2: field 'hash_ids': hash id 8 at index 1 follows hash id 9, but "
                           "it follows hash id 7 before: a hash id names its whole prefix"),
])
def test_mooncake_hash_ids_that_contradict_their_prefixes_name_the_line(
        tmp_path: Path, rows: list[str], shown: str) -> None:
    """A Mooncake hash id names a whole prefix, so it always follows the same id (or opens
    the prompt). A trace where it does not is refused when read, naming the line and the id;
    the real traces keep the rule (their 226,714 ids)."""
    from kvtier.sim.traces import MooncakeTrace, TraceFormatError

    path = tmp_path / "t.jsonl"
    lines = [f'{{"timestamp": {i}, "input_length": {512 * row.count(",") + 100}, '
             f'"output_length": 4, "hash_ids": {row}}}' for i, row in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceFormatError) as refused:
        MooncakeTrace(path)
    assert str(refused.value) == f"{path}:{shown}"
    assert len(MooncakeTrace(path, limit=len(rows) - 1)) == len(rows) - 1  # read no further



# ---- options the rest of the line leaves without effect -----------------------------------------

@pytest.mark.parametrize(("argv", "shown"), [
    # The round-robin and least-loaded routers never read alpha.
    (["replay", "--instances", "2", "--router", "least-loaded", "--router-alpha", "2"],
     "--router-alpha weighs load in the cache-aware router; --router least-loaded does not "
     "read it"),
    # Nothing is reused from a partial block at all.
    (["replay", "--no-partial-reuse", "--no-copy-on-partial-reuse"],
     "--no-copy-on-partial-reuse says how a partial block is reused, and --no-partial-reuse "
     "reuses none"),
    # A trace's replay has no host tier unless --host-blocks gives one: no block offloaded.
    (["replay", "{trace}", "--offload-min-priority", "50"],
     "--offload-min-priority picks the evicted GPU blocks that go to the host tier, and "
     "there is none (--host-blocks 0)"),
    (["sweep", "--host-blocks", "0", "--offload-min-priority", "50"],
     "--offload-min-priority picks the evicted GPU blocks that go to the host tier, and "
     "there is none (--host-blocks 0)"),
])
def test_an_option_left_without_effect_is_refused_before_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], shown: str) -> None:
    """Siblings of the options test_red_team_13 refuses when the rest of the line leaves
    them without effect: each was ignored without a word. Now one line naming why."""
    import kvtier.cli

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the run started")

    monkeypatch.setattr(kvtier.cli, "simulate", never)
    monkeypatch.setattr(kvtier.cli, "simulate_fleet", never)
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 600, "output_length": 4, '
                     '"hash_ids": [1, 2]}\n')
    code, err = run_cli([*(a.format(trace=trace) for a in argv), "--limit", "2",
                         "--no-progress"])
    assert_one_line_refusal(code, err, shown)


@pytest.mark.parametrize("argv", [
    ["sweep", "--host-blocks", "0,64", "--offload-min-priority", "50"],  # the 64 run uses it
    ["replay", "--offload-min-priority", "50"],  # the built-in chat has a host tier
    ["compare", "--offload-min-priority", "50"],  # the GPU + host run uses it
    ["replay", "--instances", "2", "--router-alpha", "2"],  # cache-aware, the default
])
def test_the_same_options_with_an_effect_still_run(monkeypatch: pytest.MonkeyPatch,
                                                   argv: list[str]) -> None:
    """Where the option has an effect, the run starts (and is stopped here)."""
    import kvtier.cli

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the run started")

    monkeypatch.setattr(kvtier.cli, "simulate", never)
    monkeypatch.setattr(kvtier.cli, "simulate_fleet", never)
    with pytest.raises(AssertionError, match="the run started"):
        run_cli([*argv, "--limit", "2", "--no-progress"])


# ---- refusals whose own message failed on an int past 4,300 digits -----------------------------

HUGE = 10**5000  # repr() of it raises ValueError: Python's limit on int-to-str conversion


def default_constructible_dataclasses() -> list[tuple[type, str]]:
    """(class, field) for every init field of kvtier's dataclasses that build with their
    defaults (the modules an extra's absence keeps out are left out)."""
    import dataclasses
    import importlib
    import inspect
    import pkgutil

    import kvtier

    found = []
    for info in pkgutil.walk_packages(kvtier.__path__, "kvtier."):
        if any(part in info.name for part in ("vllm", "launcher", "__main__")):
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:
            continue
        for cls in vars(module).values():
            if not (inspect.isclass(cls) and dataclasses.is_dataclass(cls)
                    and cls.__module__ == module.__name__):
                continue
            fields = [f for f in dataclasses.fields(cls) if f.init]
            if all(f.default is not dataclasses.MISSING
                   or f.default_factory is not dataclasses.MISSING for f in fields):
                found += [(cls, f.name) for f in fields]
    return found


def test_every_config_refuses_an_int_past_4300_digits_naming_a_field() -> None:
    """A refusal showed the bad value with {value!r} (or {value:,}, or str()): for an int
    past 4,300 digits the message itself raised ValueError ("Exceeds the limit (4300
    digits) for integer string conversion"), naming no field: CacheConfig(max_events=...),
    SchedulerConfig, ModelConfig, SamplingParams, the router's CacheAware, the simulator's
    workloads (50 fields). Now each is refused (or taken) with a message naming a field and
    saying what the value is (kvtier.reprs.shown), in every message that shows a value."""
    fields = default_constructible_dataclasses()
    assert len(fields) > 150  # the walk found kvtier's configs
    for cls, name in fields:
        try:
            cls(**{name: HUGE})
        except (ValueError, TypeError) as exc:
            message = str(exc)
            assert "Exceeds the limit" not in message, (cls.__name__, name, message)
            assert any(f.name in message for f in dataclasses.fields(cls)), (
                cls.__name__, name, message)


def import_blocks_of_huge() -> object:
    from kvtier import CacheConfig, KVCacheManager

    return KVCacheManager(CacheConfig(num_gpu_blocks=8)).import_blocks([1, 2, 3], -HUGE)


def router_of_huge() -> object:
    from kvtier.router import RoundRobin, Router

    return Router(RoundRobin(), -HUGE)


def request_of_huge() -> object:
    from kvtier.sim.workload import TraceRequest

    return TraceRequest("r", 0.0, [1], -HUGE)


@pytest.mark.parametrize(("call", "shown"), [
    (import_blocks_of_huge, "num_blocks must be an integer in 0..4294967296"),
    (router_of_huge, "tokens_per_block must be a power of two in 1..65536"),
    (request_of_huge, "output_length must be an integer >= 0"),
])
def test_a_call_refusing_an_int_past_4300_digits_names_its_field(
        call: Callable[[], object], shown: str) -> None:
    """The same for the arguments of calls."""
    with pytest.raises(ValueError) as refused:
        call()
    assert str(refused.value).startswith(shown) and "an int of 16610 bits" in str(refused.value)
