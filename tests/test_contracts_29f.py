"""docs/contracts.md and the README's input contract, claim by claim: each test drives one
stated rule through the public API as a user would, with the exact exception and message
the docs promise and the manager's books unchanged after a refusal. These are the claims
no other test pinned when the docs were audited (red team 29f)."""

from __future__ import annotations

import copy
import math
import pickle
import re
from pathlib import Path

import pytest

from kvtier import CacheConfig, KVCacheManager, SequenceSpec
from kvtier.request import Request
from kvtier.scheduler import Scheduler
from kvtier.scheduler_config import SchedulerConfig


def make_manager(**kw: object) -> KVCacheManager:
    """A small manager: 4-token blocks, 8 GPU and 4 host blocks, events on."""
    args: dict[str, object] = {"tokens_per_block": 4, "num_gpu_blocks": 8,
                               "num_host_blocks": 4, "enable_events": True}
    args.update(kw)
    return KVCacheManager(CacheConfig(**args))  # type: ignore[arg-type]


def state_of(mgr: KVCacheManager) -> tuple[object, ...]:
    """What a refusal must leave as it was: version, stats, cached rows, a lookup."""
    mgr.check_invariants()
    return (mgr.version, repr(mgr.stats), mgr.cached_blocks(),
            mgr.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9]))


def warm(mgr: KVCacheManager) -> None:
    """Caches two blocks of [1..8] and leaves nothing live."""
    mgr.add_sequence(SequenceSpec("w", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    mgr.remove_sequence("w")


# ---- json_text.py ------------------------------------------------------------------------

def test_json_loads_refuses_a_key_given_twice_naming_it() -> None:
    """`loads`: an object giving a key twice is a DuplicateKeyError, a ValueError naming
    the key, where json.loads kept the last value."""
    from kvtier.json_text import DuplicateKeyError, loads

    with pytest.raises(DuplicateKeyError, match="the key 'hash_ids' is given twice") as info:
        loads('{"hash_ids": [1], "timestamp": 0, "hash_ids": [2]}')
    assert isinstance(info.value, ValueError)
    assert info.value.key == "hash_ids"
    assert loads('{"a": {"b": 1}, "c": 2}') == {"a": {"b": 1}, "c": 2}
    with pytest.raises(DuplicateKeyError, match="'b'"):
        loads('[{"a": {"b": 1, "b": 1}}]')


# ---- remote/options.py -------------------------------------------------------------------

def test_check_timeout_reads_infinity_as_no_limit_and_refuses_nan() -> None:
    """`check_timeout`: a wait's infinity is no limit (None), NaN refused naming the
    field."""
    from kvtier.remote.options import check_timeout

    assert check_timeout("timeout_s", math.inf) is None
    assert check_timeout("timeout_s", None) is None
    assert check_timeout("timeout_s", 2) == 2.0
    with pytest.raises(ValueError, match=r"timeout_s must be a number of seconds >= 0 or "
                                         r"None, got nan"):
        check_timeout("timeout_s", math.nan)
    with pytest.raises(ValueError, match=r"max_blocking_s.*got True"):
        check_timeout("max_blocking_s", True)


# ---- reprs.py ----------------------------------------------------------------------------

def test_a_refusal_of_an_int_past_the_digit_limit_names_its_field() -> None:
    """`shown`: an int whose repr raises is described by its size, and the refusal names
    its field rather than raising from the message."""
    huge = 10 ** 5000
    with pytest.raises(ValueError, match=r"max_events.*an int of 16610 bits"):
        CacheConfig(tokens_per_block=4, num_gpu_blocks=8, max_events=huge)


# ---- cli.py ------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", ["replay", b"replay", ("replay", 5), 7])
def test_cli_main_refuses_an_argv_that_is_no_sequence_of_str(argv: object) -> None:
    """`cli.main` refuses an argv that is no sequence of str (TypeError) before it
    parses."""
    from kvtier.cli import main

    with pytest.raises(TypeError, match="argv must be a sequence of str"):
        main(argv)  # type: ignore[arg-type]


# ---- wiring.py ---------------------------------------------------------------------------

def test_a_shallow_copy_of_a_manager_or_scheduler_is_refused() -> None:
    """A shallow `copy.copy` of a manager or a scheduler is refused (it would share their
    books); deepcopy and pickle give independent copies that decide as the original."""
    mgr = make_manager()
    warm(mgr)
    sched = Scheduler(mgr)
    with pytest.raises(TypeError):
        copy.copy(mgr)
    with pytest.raises(TypeError):
        copy.copy(sched)
    twin = pickle.loads(pickle.dumps(mgr))
    deep = copy.deepcopy(mgr)
    for other in (twin, deep):
        a = other.add_sequence(SequenceSpec("x", [1, 2, 3, 4, 5, 6, 7, 8, 0]))
        assert a.num_reused_tokens == 8
        other.check_invariants()
    assert not mgr.has_sequence("x")
    assert mgr.lookup([1, 2, 3, 4, 5, 6, 7, 8, 0]).num_tokens == 8


def test_the_managers_and_schedulers_parts_are_read_only() -> None:
    """A scheduler's `manager` and `config` and a manager's `config` are read-only
    properties: replacing one is refused."""
    mgr = make_manager()
    sched = Scheduler(mgr)
    with pytest.raises(AttributeError):
        mgr.config = CacheConfig(tokens_per_block=4, num_gpu_blocks=8)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        sched.manager = make_manager()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        sched.config = SchedulerConfig()  # type: ignore[misc]
    assert sched.manager is mgr and mgr.config.num_gpu_blocks == 8


# ---- manager.py: transfer_failed ----------------------------------------------------------

def _plan_with_an_onboard(mgr: KVCacheManager):  # type: ignore[no-untyped-def]
    """A plan holding copies: fill the GPU so [1..8] goes to the host, then onboard it."""
    warm(mgr)
    mgr.take_plan()
    for i in range(8):
        mgr.add_sequence(SequenceSpec(f"f{i}", [100 + 4 * i + k for k in range(4)]))
    for i in range(8):
        mgr.remove_sequence(f"f{i}")
    mgr.add_sequence(SequenceSpec("r", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    plan = mgr.take_plan()
    assert len(plan) > 0
    return plan


def test_transfer_failed_refuses_another_managers_plan_changing_nothing() -> None:
    """`transfer_failed` with another manager's plan (with ops) is refused (ValueError
    naming it), changing nothing."""
    a, b = make_manager(), make_manager()
    plan = _plan_with_an_onboard(a)
    _plan_with_an_onboard(b)
    before = state_of(b)
    with pytest.raises(ValueError, match="plan was not handed out by this manager"):
        b.transfer_failed(plan, [0])
    assert state_of(b) == before
    assert b.has_sequence("r")


def test_transfer_failed_refuses_an_older_plan_and_one_reported_twice() -> None:
    """The plan must be the latest this manager handed out, reported once: an older one,
    or the same reported again, is refused, changing nothing."""
    mgr = make_manager()
    warm(mgr)
    mgr.take_plan()
    for i in range(8):  # evicts [1..8] to the host: offloads
        mgr.add_sequence(SequenceSpec(f"f{i}", [100 + 4 * i + k for k in range(4)]))
    older = mgr.take_plan()
    assert len(older) > 0
    for i in range(8):
        mgr.remove_sequence(f"f{i}")
    mgr.add_sequence(SequenceSpec("r", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert len(mgr.take_plan()) > 0  # the onboard: a newer plan with copies
    before = state_of(mgr)
    with pytest.raises(ValueError, match="is not the latest this manager handed out"):
        mgr.transfer_failed(older, [0])
    assert state_of(mgr) == before

    mgr2 = make_manager()
    plan2 = _plan_with_an_onboard(mgr2)
    assert mgr2.transfer_failed(plan2, [0]) == ["r"]
    assert not mgr2.has_sequence("r")
    mgr2.check_invariants()
    before = state_of(mgr2)
    with pytest.raises(ValueError, match="had its failed copies reported already"):
        mgr2.transfer_failed(plan2, [0])
    assert state_of(mgr2) == before


def test_transfer_failed_refuses_a_plan_taken_before_reset_cache() -> None:
    """A plan taken before `reset_cache` names slots of the old cache: refused."""
    mgr = make_manager()
    plan = _plan_with_an_onboard(mgr)
    mgr.remove_sequence("r")
    mgr.reset_cache()
    before = state_of(mgr)
    with pytest.raises(ValueError, match="transfer_failed"):
        mgr.transfer_failed(plan, [0])
    assert state_of(mgr) == before


# ---- scheduler.py ------------------------------------------------------------------------

def make_scheduler() -> Scheduler:
    """A scheduler over a small manager with 16-token steps."""
    return Scheduler(make_manager(num_gpu_blocks=16),
                     SchedulerConfig(max_num_tokens=16, max_batch_size=4))


def test_admit_and_start_are_refused_outside_a_step() -> None:
    """`admit` / `start`, the admit phase a subclass may replace, are refused outside a
    `step` (RuntimeError), changing nothing."""
    sched = make_scheduler()
    sched.add_request(Request("a", [1, 2, 3, 4, 5], max_output_tokens=2))
    before = (list(sched.waiting), dict(sched.running), sched.manager.version)
    with pytest.raises(RuntimeError, match="admit"):
        sched.admit(16, 4)
    assert (list(sched.waiting), dict(sched.running), sched.manager.version) == before
    sched.check_invariants()


def test_a_second_step_before_update_and_a_replayed_update_are_refused() -> None:
    """`step` and `update` alternate: a second `step` before `update`, or an `update` of a
    step already applied, is refused (RuntimeError), changing nothing."""
    sched = make_scheduler()
    sched.add_request(Request("a", [1, 2, 3, 4, 5], max_output_tokens=3))
    step = sched.step()
    version = sched.manager.version
    with pytest.raises(RuntimeError):
        sched.step()
    assert sched.manager.version == version and sched.unapplied_step is step
    sched.update(step, {"a": 7}, set())
    out = list(sched.running["a"].output)
    with pytest.raises(RuntimeError):
        sched.update(step, {"a": 8}, set())
    assert sched.running["a"].output == out == [7]
    sched.check_invariants()


@pytest.mark.parametrize("bad", [1, b"a", None])
def test_hold_and_release_take_only_a_str_id(bad: object) -> None:
    """`hold` / `release` take only a str id: TypeError otherwise, nothing held."""
    sched = make_scheduler()
    sched.add_request(Request("a", [1, 2, 3, 4, 5], max_output_tokens=2))
    with pytest.raises(TypeError):
        sched.hold(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        sched.release(bad)  # type: ignore[arg-type]
    step = sched.step()
    assert [c.request_id for c in step.context_chunks] == ["a"]


def test_reset_prefix_cache_is_refused_while_a_request_runs() -> None:
    """`reset_prefix_cache` is refused (False) while a request runs, changing nothing;
    with `reset_running_requests` it preempts them and drops every block."""
    sched = make_scheduler()
    sched.add_request(Request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], max_output_tokens=3))
    sched.update(sched.step(), {"a": 7}, set())
    mgr = sched.manager
    before = state_of(mgr)
    assert sched.reset_prefix_cache() is False
    assert state_of(mgr) == before and list(sched.running) == ["a"]
    assert sched.reset_prefix_cache(reset_running_requests=True) is True
    assert list(sched.running) == [] and [r.request_id for r in sched.waiting] == ["a"]
    assert mgr.cached_blocks() == []
    sched.check_invariants()
    mgr.check_invariants()
    assert "a" in sched.step().preempted_request_ids


def test_a_held_requests_fields_refuse_assignment_naming_it() -> None:
    """A `Request` the scheduler holds refuses any assignment to a field (AttributeError
    naming it), and another scheduler refuses it."""
    sched = make_scheduler()
    req = Request("a", [1, 2, 3, 4, 5], max_output_tokens=2)
    sched.add_request(req)
    with pytest.raises(AttributeError, match="max_output_tokens"):
        req.max_output_tokens = 100
    assert req.max_output_tokens == 2
    other = make_scheduler()
    with pytest.raises(ValueError):
        other.add_request(req)
    assert list(other.waiting) == []


# ---- cli: every option's help ------------------------------------------------------------

# Options whose absence is "off", so they have no default to state.
OFF_WHEN_ABSENT = {"--json", "--plot", "--remote", "--remote-url", "--jsonl", "--system"}


def test_every_valued_option_states_its_default_in_its_help() -> None:
    """`kvtier <cmd> --help`: each option that takes a value states its default (or is off
    when absent); `--dtype` had no help at all, `--limit` and the trace options none."""
    import argparse

    from kvtier.cli import build_parser

    sub = next(a for a in build_parser()._actions
               if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if (not action.option_strings or action.nargs == 0
                    or isinstance(action, argparse._AppendAction)
                    or action.option_strings[0] in OFF_WHEN_ABSENT):
                continue
            if "default" not in (action.help or ""):
                missing.append(f"{name} {action.option_strings[0]}")
    assert missing == []


def test_the_model_guides_option_defaults_are_the_parsers() -> None:
    """docs/models.md gives `generate` / `chat` defaults in parentheses (`--tokens-per-block`
    (16), ...): each is the parser's default, for both commands."""
    import argparse

    from kvtier.cli import build_parser

    text = " ".join((Path(__file__).resolve().parents[1] / "docs" / "models.md")
                    .read_text().split())
    stated = dict(re.findall(r"`(--[a-z-]+)` \((\d+)\)", text))
    assert stated == {"--tokens-per-block": "16", "--gpu-blocks": "64", "--host-blocks": "1024"}
    sub = next(a for a in build_parser()._actions
               if isinstance(a, argparse._SubParsersAction))
    for command in ("generate", "chat"):
        defaults = {a.option_strings[0]: a.default for a in sub.choices[command]._actions
                    if a.option_strings}
        assert {opt: str(defaults[opt]) for opt in stated} == stated, command


# ---- hashing.py --------------------------------------------------------------------------

@pytest.mark.parametrize("tokens_per_block", [3, 12, 1 << 17])
def test_a_prompts_hash_chain_refuses_a_block_size_no_cache_takes(
        tokens_per_block: int) -> None:
    """`prompt_block_hashes` checks the block size for every caller as the manager does (a
    power of two in 1..65536): a block size of 3 hashed a chain no cache could hold."""
    from kvtier.hashing import get_hash_fn, prompt_block_hashes

    with pytest.raises(ValueError, match=rf"tokens_per_block must be a power of two in "
                                         rf"1\.\.65536, got {tokens_per_block}$"):
        prompt_block_hashes(get_hash_fn("xxh3_128"), list(range(1, 40)), tokens_per_block)
    with pytest.raises(ValueError, match="tokens_per_block must be a power of two"):
        CacheConfig(tokens_per_block=tokens_per_block, num_gpu_blocks=8)
    assert len(prompt_block_hashes(get_hash_fn("xxh3_128"), list(range(1, 40)), 4)) == 9


# ---- router.py (helper A's file: pinned as xfail until fixed there) -----------------------

def test_route_refuses_an_empty_prompt_changing_no_stats() -> None:
    """`route` checks its prompt first (a non-empty sequence of ids, as every entry point
    takes one): an empty prompt is refused, ValueError naming the tokens, no stats
    changed. It was routed, its hit PrefixHit(-1, 0), the stats counting -1 blocks."""
    from kvtier.router import InstanceLoad, Router, make_policy

    router = Router(make_policy("cache-aware"), 4)
    loads = [InstanceLoad("i0", 0, 4), InstanceLoad("i1", 0, 4)]
    before = router.stats.to_dict()
    with pytest.raises(ValueError, match=r"tokens.*empty"):
        router.route([], loads)
    assert router.stats.to_dict() == before


# ---- cli_numbers.py / cli_profile.py -----------------------------------------------------

@pytest.mark.parametrize("value", [" 5", "5 ", "5\n", "\t2.5e10"])
def test_a_set_profile_number_with_spaces_is_refused(value: str) -> None:
    """`--set-profile` values follow the command line's one rule for numbers: spaces
    around one are refused naming the option and the value (they were stripped, so
    `pcie_bytes_per_s= 5` set 5 bytes/s where `--time-scale ' 5'` is refused)."""
    from kvtier.cli_error import CLIError
    from kvtier.cli_profile import make_profile

    with pytest.raises(CLIError, match=rf"^--set-profile pcie_bytes_per_s: expected a number, "
                                       rf"got {re.escape(repr(value))}$"):
        make_profile("llama3-8b-h100", [f"pcie_bytes_per_s={value}"])
    assert make_profile("llama3-8b-h100", ["pcie_bytes_per_s=5"]).pcie_bytes_per_s == 5.0


# ---- manager.py / recovery.py: compute_failed ---------------------------------------------

def test_compute_failed_refusals_change_nothing() -> None:
    """`compute_failed` raises, changing nothing, for ids that are no iterable of str
    (TypeError) or name no live request (KeyError), and during a step (RuntimeError)."""
    mgr = make_manager()
    warm(mgr)
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    before = state_of(mgr)
    with pytest.raises(TypeError, match="request_ids must be an iterable of request ids, "
                                        "got 'a'"):
        mgr.compute_failed("a")
    with pytest.raises(TypeError, match="request id 1 is not a str"):
        mgr.compute_failed(["a", 1])  # type: ignore[list-item]
    with pytest.raises(KeyError, match="unknown request_id 'zz'"):
        mgr.compute_failed(["a", "zz"])
    assert state_of(mgr) == before and mgr.has_sequence("a")
    mgr.begin_step()
    with pytest.raises(RuntimeError, match=r"compute_failed\(\) is for the step ended"):
        mgr.compute_failed(["a"])
    mgr.end_step()
    assert mgr.has_sequence("a")
    assert mgr.compute_failed(["a"]) == ["a"]
    assert not mgr.has_sequence("a") and mgr.num_removed_sequences == 2
    mgr.check_invariants()


def test_compute_failed_drops_what_the_failed_step_stored_and_keeps_earlier_chunks() -> None:
    """`fail_computes`: the blocks a step stored for reuse that its failed passes were to
    compute leave the cache; what earlier steps computed stays.

        step 1: |1 2 3 4|           chunk 1 computed: block [1..4] stored
        step 2: |1 2 3 4|5 6 7 8|9  chunk 2 fails: [5..8] leaves, [1..4] stays
    """
    mgr = make_manager()
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    mgr.begin_step()
    mgr.add_sequence(SequenceSpec("a", prompt, num_new_tokens=4))
    mgr.end_step()
    mgr.begin_step()
    mgr.schedule_prefill("a", 5)
    mgr.end_step()
    assert mgr.lookup(prompt).num_tokens == 8
    assert mgr.compute_failed(["a"]) == ["a"]
    assert mgr.lookup(prompt).num_tokens == 4
    assert mgr.stats.num_failed_computes == 1
    mgr.check_invariants()


# ---- sim/trace_file.py, sim/hash_trace.py ------------------------------------------------

@pytest.mark.parametrize(("name", "content", "message"), [
    ("bailian.jsonl", b'{"chat_id": 1, "parent_chat_id": -1, "timestamp": 1.0, '
     b'"input_length": 32, "output_length": 5, "type": "te\xffxt", "turn": 1, '
     b'"hash_ids": [1, 2]}\n', ":1: field '<text>': not UTF-8 text: not a JSONL trace line$"),
    ("burst.csv", b"Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
     b"5,ChatGPT,1\x00,1,2,Conversation log\n",
     ":2: field '<text>': contains a NUL byte: not a CSV trace$"),
])
def test_a_trace_line_refused_as_text_names_no_other_format(
        tmp_path: Path, name: str, content: bytes, message: str) -> None:
    """A line refused before it is parsed (not UTF-8, a NUL) names no format the file is
    not: a Bailian row was 'not a Mooncake JSONL line', a BurstGPT one 'not an Azure CSV
    trace'."""
    from kvtier.sim.hash_trace import MooncakeTrace
    from kvtier.sim.length_trace import AzureTrace
    from kvtier.sim.trace_file import TraceFormatError

    path = tmp_path / name
    path.write_bytes(content)
    reader = MooncakeTrace if name.endswith(".jsonl") else AzureTrace
    with pytest.raises(TraceFormatError, match=message):
        list(reader(path))


# ---- journal.py: cached_blocks ------------------------------------------------------------

def test_cached_blocks_rank_each_block_by_now_and_none_while_held() -> None:
    """`cached_blocks()` rows carry the priority eviction ranks each block by now: `None`
    while a request holds it, the request's priority once released, the default once its
    retention expired (TensorRT-LLM's semantics)."""
    now = [0.0]
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8),
                         clock=lambda: now[0])
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], priority=80,
                                  retention_s=10.0))
    assert [(b.tokens, b.priority) for b in mgr.cached_blocks()] == [
        ((1, 2, 3, 4), None), ((5, 6, 7, 8), None)]
    mgr.remove_sequence("a")
    assert [b.priority for b in mgr.cached_blocks()] == [80, 80]
    now[0] = 10.5
    assert [b.priority for b in mgr.cached_blocks()] == [35, 35]
    mgr.check_invariants()


def test_replays_oracle_help_says_a_fleet_refuses_it(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`kvtier replay --help` says what `--oracle` does with `--instances > 1` (refused),
    where it read 'default: on for one instance', as if a fleet took it."""
    from kvtier.cli import main

    assert main(["replay", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: on; one instance only: --instances > 1 refuses --oracle)" in help_text
    assert main(["replay", "--instances", "2", "--oracle", "--limit", "2",
                 "--no-progress"]) == 2
    assert "--oracle is not supported with --instances > 1" in capsys.readouterr().err


def test_transfer_failed_aborts_exactly_the_requests_holding_a_bad_block() -> None:
    """`transfer_failed(plan, failed_indices)` aborts exactly the requests whose block
    tables hold a bad block: the one onboarding the failed copy, not a live request beside
    it; nothing leaks."""
    mgr = make_manager(num_gpu_blocks=10)
    mgr.add_sequence(SequenceSpec("s", [300, 301, 302, 303, 304]))
    plan = _plan_with_an_onboard(mgr)
    onboard = next(i for i, op in enumerate(plan.ops) if op.kind.value == "onboard")
    assert mgr.transfer_failed(plan, [onboard]) == ["r"]
    assert not mgr.has_sequence("r") and mgr.has_sequence("s")
    assert mgr.stats.num_failed_transfers == 1
    mgr.check_invariants()
    mgr.remove_sequence("s")
    mgr.check_invariants()


@pytest.mark.parametrize("algo", ["xxh3_128", "sha256"])
def test_block_hashes_agree_across_processes(algo: str) -> None:
    """Both hash algorithms name a block alike in every process (the README said sha256
    was the one 'to agree across processes'): a fresh interpreter, with another
    PYTHONHASHSEED, gives the same chain."""
    import os
    import subprocess
    import sys

    from kvtier.hashing import get_hash_fn, prompt_block_hashes

    code = ("from kvtier.hashing import get_hash_fn, prompt_block_hashes; "
            f"print(prompt_block_hashes(get_hash_fn({algo!r}), [1, 2, 3, 4, 5, 6, 7, 8], 4, "
            "salt='t', lora_id=3))")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": src}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    here = prompt_block_hashes(get_hash_fn(algo), [1, 2, 3, 4, 5, 6, 7, 8], 4, salt="t",
                               lora_id=3)
    assert out == str(here)
