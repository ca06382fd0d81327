"""Helpers of the bad-input suite: garbage strategies, a manager with history, a snapshot of
everything a refused call must leave unchanged."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from kvtier import CacheConfig, KVCacheManager, SequenceSpec

TPB = 4
MAX_TOKEN_ID = 2**63 - 1
# The errors bad input may raise; anything else (OverflowError, IndexError, AttributeError,
# RecursionError, MemoryError, AssertionError, ...) is a defect.
REFUSALS = (ValueError, TypeError, KeyError)

GOOD_TOKEN = st.integers(0, 7)
OUT_OF_RANGE_TOKEN = st.one_of(st.integers(max_value=-1), st.integers(min_value=MAX_TOKEN_ID + 1),
                               st.sampled_from([-1, 2**63, 2**64, 10**30, -(2**63), 2**1000]))
# NOTE: no bools: a bool is an int in Python, and a token id of True is the id 1 (checking
# every id's type would cost the manager a Python step per token).
NON_INT_TOKEN = st.one_of(
    st.floats(allow_nan=True), st.text(max_size=2), st.binary(max_size=2),
    st.none(), st.lists(GOOD_TOKEN, max_size=2), st.tuples(GOOD_TOKEN),
    st.sampled_from([1.0, 0.0, float("inf"), float("nan"), complex(1, 0)]))
BAD_TOKEN = st.one_of(OUT_OF_RANGE_TOKEN, NON_INT_TOKEN)
GOOD_TOKENS = st.lists(GOOD_TOKEN, min_size=1, max_size=12)


@st.composite
def bad_token_lists(draw: st.DrawFn) -> object:
    """A token container that must be refused: a list with one bad token anywhere, an
    empty list, or something that is no sequence of ints at all."""
    good = draw(GOOD_TOKENS)
    with_bad = list(good)
    with_bad.insert(draw(st.integers(0, len(good))), draw(BAD_TOKEN))
    return draw(st.sampled_from([
        with_bad, tuple(with_bad), [], (), "1234", b"\x01\x02", bytearray(b"\x01"), 7, 1.5,
        None, True, {1: 2}, {1, 2}, [good], iter(good), (t for t in good)]))


# NOTE: no None here: it is valid for the optional fields (priority, retention_s, ...).
NOT_A_NUMBER = st.one_of(st.text(max_size=2), st.lists(GOOD_TOKEN, max_size=1),
                         st.binary(max_size=1))
BAD_COUNT = st.one_of(st.integers(max_value=-1), st.booleans(), st.floats(), NOT_A_NUMBER)
BAD_SALT = st.one_of(st.booleans(), st.floats(), st.lists(GOOD_TOKEN, max_size=2),
                     st.dictionaries(GOOD_TOKEN, GOOD_TOKEN, max_size=1),
                     st.sampled_from([complex(1, 1), frozenset(), object()]))
BAD_LORA = st.one_of(st.booleans(), st.floats(), st.text(max_size=2), st.binary(max_size=1),
                     st.lists(GOOD_TOKEN, max_size=1), st.integers(max_value=-1),
                     st.integers(min_value=2**63))
BAD_PRIORITY = st.one_of(st.integers(max_value=-1), st.integers(min_value=101), st.booleans(),
                         st.floats(), NOT_A_NUMBER)
BAD_RETENTION = st.one_of(
    st.floats(max_value=-1e-300), st.sampled_from([float("inf"), float("nan"), -float("inf"),
                                                   10**400, -1, True, False]),
    st.integers(min_value=2**1024), NOT_A_NUMBER)


def probe_prompts() -> list[tuple[list[int], str | None, int | None]]:
    """Prompts (tokens, salt, lora_id) whose lookups reveal the cached tree."""
    base = [1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5]
    return [(base, None, None), (base[:6], None, None), ([7] * 13, None, None),
            (base, "tenant", None), (base, None, 3), ([1, 2, 3, 9, 9], None, None),
            ([5, 5, 5, 5, 5, 5, 5, 5, 6], None, None), (base + [9, 9, 9, 9], None, None)]


def make_manager(**options: Any) -> KVCacheManager:
    """A manager with events and a host tier, some cached history, a live request ``live``
    (decoding) and a live request ``chunked`` with unscheduled prompt tokens."""
    # Any: the options are CacheConfig's own fields, which it checks itself.
    config: dict[str, Any] = dict(tokens_per_block=TPB, num_gpu_blocks=16, num_host_blocks=8,
                                  enable_events=True)
    config.update(options)
    mgr = KVCacheManager(CacheConfig(**config), clock=lambda: 0.0)
    for i, (tokens, salt, lora_id) in enumerate(probe_prompts()[:5]):
        mgr.add_sequence(SequenceSpec(f"old{i}", tokens, salt=salt, lora_id=lora_id))
        mgr.remove_sequence(f"old{i}")
    assert mgr.add_sequence(SequenceSpec("live", [5, 5, 5, 5, 5, 5, 5])).admitted
    assert mgr.append_tokens("live", [5, 6]) is not None
    assert mgr.add_sequence(SequenceSpec("chunked", [8] * 10, num_new_tokens=4)).admitted
    mgr.check_invariants()
    mgr.take_plan()
    return mgr


def snapshot(mgr: KVCacheManager) -> tuple[object, ...]:
    """Everything a refused call must leave as it was (checking the invariants too)."""
    mgr.check_invariants()
    live = ("live", "chunked")
    return (
        [mgr.lookup(t, salt=s, lora_id=lo) for t, s, lo in probe_prompts()],
        dataclasses.asdict(mgr.stats),
        mgr.version,
        mgr.num_free_gpu_blocks,
        mgr.num_free_host_blocks,
        mgr.num_sequences,
        mgr.num_reserved_blocks,
        [mgr.block_table(rid) for rid in live],
        [mgr.num_unscheduled_tokens(rid) for rid in live],
        [mgr.num_blocks_to_append(rid, k) for rid in live for k in range(1, TPB + 1)],
        # NOTE: taking the plan drains it: a refused call must have added no copy.
        mgr.take_plan().ops,
    )


def check_refused(call: Callable[[], object], fields: tuple[str, ...],
                  mgr: KVCacheManager | None = None) -> BaseException:
    """``call`` must raise a refusal naming one of ``fields``, and (given ``mgr``) leave its
    state exactly as it was. Returns the exception."""
    before = snapshot(mgr) if mgr is not None else None
    try:
        result = call()
    except REFUSALS as exc:
        message = str(exc)
        assert any(f in message for f in fields), f"{exc!r} does not name any of {fields}"
        if mgr is not None:
            assert snapshot(mgr) == before, f"state changed by a refused call: {exc!r}"
        return exc
    raise AssertionError(f"accepted bad input: returned {result!r}")


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``kvtier.cli.main(argv)`` in process: (exit status, stderr)."""
    from kvtier.cli import main

    err, out = io.StringIO(), io.StringIO()
    # NOTE: with KVTIER_DEBUG=1 a defect (status 70 otherwise) raises with its traceback.
    saved = os.environ.get("KVTIER_DEBUG")
    os.environ["KVTIER_DEBUG"] = "1"
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    finally:
        if saved is None:
            del os.environ["KVTIER_DEBUG"]
        else:
            os.environ["KVTIER_DEBUG"] = saved
    return code, err.getvalue()


def assert_one_line_refusal(code: int, stderr: str, *fragments: str) -> None:
    """Status 2, one line on stderr, no traceback, naming every one of ``fragments``."""
    assert code == 2, (code, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert all(f in stderr for f in fragments), stderr
