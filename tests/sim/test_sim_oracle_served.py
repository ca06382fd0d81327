"""The offline bounds a replay prints are bounds on the requests it served.

A request too large for the GPU pool is skipped (``num_rejected_too_large``). Before, the
oracle still replayed it, so its prefix made later requests "hit" in the bounds while the
replay could never have served it: LRU and Belady beside the hit rate were bounds on another,
more reusable stream.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvtier.cli import main
from kvtier.config import CacheConfig
from kvtier.scheduler import SchedulerConfig
from kvtier.sim import MooncakeTrace, oracle_bounds, simulate, too_large
from kvtier.sim.oracle import OracleRequest

# 512-token hash ids, 32-token blocks (16 per hash id; the partial last one counts):
#   r0  [1 | 2]  600 tokens, 5,000 output: 175 blocks, more than a 64-block GPU pool holds
#   r1  [1 | 3]  600 tokens: hits all of hash 1 (512 tokens) only if r0 was served
#   r2  [1]      300 tokens: hits its 10 blocks of hash 1 (300 tokens) behind r1 either way
RECORDS = [
    {"timestamp": 0, "input_length": 600, "output_length": 5000, "hash_ids": [1, 2]},
    {"timestamp": 10, "input_length": 600, "output_length": 5, "hash_ids": [1, 3]},
    {"timestamp": 20, "input_length": 300, "output_length": 5, "hash_ids": [1]},
]
SERVED = 300 / 900            # r1 misses, r2 hits 300 of its 300 tokens
WITH_SKIPPED = 812 / 1500     # r1 would hit 512 and r2 300, of 1,500 tokens


@pytest.fixture()
def trace(tmp_path: Path) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return path


def test_simulate_bounds_leave_out_the_requests_it_skipped(trace: Path) -> None:
    cache = CacheConfig(tokens_per_block=32, num_gpu_blocks=64)
    report = simulate(MooncakeTrace(trace), cache, oracle=True)
    assert report.num_rejected_too_large == 1 and report.num_requests == 2
    assert report.oracle is not None
    assert report.oracle.unlimited_hit_rate == pytest.approx(SERVED, abs=1e-12)
    assert report.oracle.belady_hit_rate == pytest.approx(SERVED, abs=1e-12)
    assert report.oracle.lru_hit_rate == pytest.approx(SERVED, abs=1e-12)
    # The bound holds for what was served: r2 reused 299 of its tokens (its last is computed).
    assert report.token_hit_rate == pytest.approx(299 / 900, abs=1e-12)
    assert report.token_hit_rate <= report.oracle.belady_hit_rate
    # The whole stream, as before, for a caller who asks for it.
    whole = oracle_bounds(MooncakeTrace(trace), 32, [64])[0]
    assert whole.unlimited_hit_rate == pytest.approx(WITH_SKIPPED, abs=1e-12)


def test_too_large_is_the_replays_rule(trace: Path) -> None:
    requests = list(MooncakeTrace(trace))
    small = CacheConfig(tokens_per_block=32, num_gpu_blocks=64)
    large = CacheConfig(tokens_per_block=32, num_gpu_blocks=256)
    assert [too_large(r, small, SchedulerConfig()) for r in requests] == [True, False, False]
    assert [too_large(r, large, SchedulerConfig()) for r in requests] == [False] * 3
    # Without chunked prefill a prompt past one step's budget is skipped too.
    unchunked = SchedulerConfig(max_num_tokens=512, enable_chunked_prefill=False)
    assert [too_large(r, large, unchunked) for r in requests] == [True, True, False]


def last_json(out: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(out.splitlines()[-1])
    return document


def test_sweep_bounds_each_capacity_on_what_it_served(
        trace: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVTIER_DEBUG", "1")
    assert main(["sweep", str(trace), "--gpu-blocks", "64,256", "--host-blocks", "0",
                 "--no-progress"]) == 0
    runs = last_json(capsys.readouterr().out)["runs"]
    assert [r["num_rejected_too_large"] for r in runs] == [1, 0]
    assert runs[0]["oracle"]["unlimited_hit_rate"] == pytest.approx(SERVED, abs=1e-12)
    assert runs[1]["oracle"]["unlimited_hit_rate"] == pytest.approx(WITH_SKIPPED, abs=1e-12)
    for run in runs:
        assert run["token_hit_rate"] <= run["oracle"]["belady_hit_rate"]


def test_replay_and_compare_print_bounds_on_what_they_served(
        trace: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVTIER_DEBUG", "1")
    assert main(["replay", str(trace), "--gpu-blocks", "64", "--no-progress"]) == 0
    report = last_json(capsys.readouterr().out)
    assert report["oracle"]["belady_hit_rate"] == pytest.approx(SERVED, abs=1e-12)
    assert main(["compare", str(trace), "--gpu-blocks", "64", "--host-blocks", "64", "--oracle",
                 "--no-progress"]) == 0
    runs = last_json(capsys.readouterr().out)["runs"]
    assert [r["report"]["oracle"]["unlimited_hit_rate"] for r in runs] == pytest.approx(
        [SERVED] * 4, abs=1e-12)


def test_the_bounds_never_hash_a_skipped_request(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A skipped request may be millions of tokens: the bounds leave it unread (before,
    every prompt was hashed, then the skipped ones dropped). A replay that served nothing
    reads the stream no second time."""
    import kvtier.sim.oracle as oracle
    from kvtier.sim import TraceRequest

    hashed: list[int] = []
    real = oracle.prefix_block_keys

    def counting(prompt: list[int], tokens_per_block: int) -> tuple[object, ...]:
        hashed.append(len(prompt))
        return real(prompt, tokens_per_block)

    monkeypatch.setattr(oracle, "prefix_block_keys", counting)
    class Stream:
        name = "stream"

        def __init__(self, *requests: TraceRequest) -> None:
            self.requests = requests

        def __iter__(self) -> Iterator[TraceRequest]:
            return iter(self.requests)

        def describe(self) -> dict[str, object]:
            return {"name": "stream"}

    giant = TraceRequest("giant", 0.0, list(range(5000)), 1)
    small = TraceRequest("small", 1.0, list(range(10_000, 10_040)), 1)
    cache = CacheConfig(tokens_per_block=16, num_gpu_blocks=64)
    report = simulate(Stream(giant, small), cache, oracle=True)
    assert (report.num_rejected_too_large, report.num_requests) == (1, 1)
    assert hashed == [40]
    hashed.clear()
    nothing = simulate(Stream(giant), cache, oracle=True)
    assert nothing.num_requests == 0 and hashed == []
    assert nothing.oracle is not None and nothing.oracle.belady_hit_rate == 0.0


class _CountingTrace(MooncakeTrace):
    """A trace that counts how often it is opened: a refused call must not read it."""

    opened = 0

    def oracle_requests(self, tokens_per_block: int | None = None) -> Iterator[OracleRequest]:
        type(self).opened += 1
        return super().oracle_requests(tokens_per_block)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"skip": 5}, "skip must be a collection of request positions (ints), got 5"),
    ({"skip": "01"}, "skip must be a collection of request positions (ints), got '01'"),
    ({"skip": {1.0}}, "skip must be a collection of request positions (ints), got {1.0}"),
    ({"capacities": 64}, "capacities must be an iterable of block counts, got 64"),
    ({"capacities": [64, 0]}, "capacities[1] must be a block count >= 1, got 0"),
    ({"capacities": [True]}, "capacities[0] must be a block count >= 1, got True"),
    ({"capacities": [64.0]}, "capacities[0] must be a block count >= 1, got 64.0"),
    ({"tokens_per_block": 0}, "tokens_per_block must be an integer >= 1, got 0"),
])
def test_oracle_bounds_refuses_bad_arguments_before_reading_the_workload(
        trace: Path, kwargs: dict[str, Any], message: str) -> None:
    """Before: ``skip=5`` was a TypeError from ``in`` once the trace was open, and a bad
    capacity was found only after the whole workload had been hashed."""
    args: dict[str, Any] = {"tokens_per_block": 32, "capacities": [64]} | kwargs
    _CountingTrace.opened = 0
    with pytest.raises(ValueError) as info:
        oracle_bounds(_CountingTrace(trace), **args)
    assert str(info.value) == message
    assert _CountingTrace.opened == 0


def test_oracle_bounds_takes_capacities_from_a_generator(trace: Path) -> None:
    """Before, a generator was read once to fill the tables and then found empty: no
    bounds at all."""
    from_list = oracle_bounds(MooncakeTrace(trace), 32, [64, 8])
    from_generator = oracle_bounds(MooncakeTrace(trace), 32, (c for c in (64, 8)))
    assert len(from_list) == 2 and from_generator == from_list
    assert [b.num_capacity_blocks for b in from_list] == [64, 8]
