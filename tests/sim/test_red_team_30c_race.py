"""Red team 30c: the race workload is sized for the scheduler it runs on, chunked prefill
or not, and says which in its report."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest

from kvtier import CacheConfig
from kvtier.scheduler import SchedulerConfig
from kvtier.sim import RaceWorkload, simulate
from kvtier.sim.replay import too_large

# 2 x 3 x 3 x 3 = 54 caches and budgets, each run without chunked prefill.
GRID = list(itertools.product((4, 16), (16, 64, 256), (1, 4, 64), (32, 64, 256)))


def test_no_race_request_is_too_large_without_chunked_prefill() -> None:
    """Sized as for chunked prefill, 14 of the 54 races skipped a request as too large
    for one step (a follow-up of its block and a whole budget of new tokens, with one
    prefix): their reports said nothing of a race. Sized for it, none is."""
    skipping = []
    for tpb, gpu, host, mnt in GRID:
        cache = CacheConfig(tokens_per_block=tpb, num_gpu_blocks=gpu, num_host_blocks=host)
        sched = SchedulerConfig(max_num_tokens=mnt, enable_chunked_prefill=False)
        workload = RaceWorkload(cache, max_num_tokens=mnt, chunked_prefill=False)
        if any(too_large(r, cache, sched) for r in workload):
            skipping.append((tpb, gpu, host, mnt))
    assert skipping == []


def test_with_chunked_prefill_the_race_is_as_before() -> None:
    """chunked_prefill=True (the default) sizes the follow-ups as before: one prefix takes
    the whole budget of new tokens."""
    cache = CacheConfig(tokens_per_block=4, num_gpu_blocks=64, num_host_blocks=1)
    chunked = RaceWorkload(cache, max_num_tokens=64)
    unchunked = RaceWorkload(cache, max_num_tokens=64, chunked_prefill=False)
    assert chunked.num_prefixes == unchunked.num_prefixes == 1
    assert [len(r.prompt) for r in chunked if r.request_id == "q0"] == [4 + 64]
    assert [len(r.prompt) for r in unchunked if r.request_id == "q0"] == [64]


def test_the_race_without_chunked_prefill_still_overflows_only_in_probe_mode() -> None:
    """tpb 4, GPU 64, host 16, 64 tokens a step, no chunking: 16 prefixes, each follow-up
    credited a block; probe admission overflows once, claim admission never, and no
    request is skipped."""
    cache = CacheConfig(tokens_per_block=4, num_gpu_blocks=64, num_host_blocks=16)
    workload = RaceWorkload(cache, max_num_tokens=64, chunked_prefill=False)
    reports = {adm: simulate(workload, cache, SchedulerConfig(
        max_num_tokens=64, admission=adm, enable_chunked_prefill=False), "tiny-test",
        check_every=50) for adm in ("claim", "probe")}
    n = workload.num_prefixes
    assert n == 16
    claim, probe = reports["claim"], reports["probe"]
    assert claim.num_rejected_too_large == probe.num_rejected_too_large == 0
    assert claim.num_credited_tokens == claim.num_obtained_tokens == n * 4
    assert claim.num_overflow_steps == 0
    assert probe.num_overflow_steps == 1 and probe.num_lost_reuse_tokens > 0


def test_the_workload_states_chunked_prefill_and_checks_it() -> None:
    """describe() names chunked_prefill; a non-bool, or a budget no prefix request fits in
    one step, is refused naming the field and the value."""
    cache = CacheConfig(tokens_per_block=16, num_gpu_blocks=64, num_host_blocks=16)
    assert RaceWorkload(cache, max_num_tokens=64).describe()["chunked_prefill"] is True
    assert RaceWorkload(cache, max_num_tokens=64,
                        chunked_prefill=False).describe()["chunked_prefill"] is False
    with pytest.raises(ValueError, match="chunked_prefill must be a bool, got 1"):
        RaceWorkload(cache, chunked_prefill=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"max_num_tokens must be > tokens_per_block \(16\).*"
                                         r"got 16"):
        RaceWorkload(cache, max_num_tokens=16, chunked_prefill=False)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvtier", *args], capture_output=True,
                          text=True, timeout=300, check=False)


def test_the_cli_race_report_states_chunked_prefill() -> None:
    """kvtier replay --workload race --no-chunked-prefill: the JSON's workload says
    chunked_prefill false, and no request was skipped."""
    out = run_cli("replay", "--workload", "race", "--gpu-blocks", "64", "--host-blocks", "16",
                  "--tokens-per-block", "4", "--max-num-tokens", "64", "--no-chunked-prefill",
                  "--no-progress", "--no-oracle")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["workload"]["chunked_prefill"] is False
    assert report["num_rejected_too_large"] == 0


def test_the_cli_refuses_a_race_no_step_can_prefill() -> None:
    """--no-chunked-prefill with --max-num-tokens 16 of 16-token blocks: refused, naming
    the options, exit 2."""
    out = run_cli("replay", "--workload", "race", "--gpu-blocks", "64", "--host-blocks", "16",
                  "--tokens-per-block", "16", "--max-num-tokens", "16", "--no-chunked-prefill",
                  "--no-progress")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "kvtier: error: --workload race with --no-chunked-prefill needs --max-num-tokens > "
        "--tokens-per-block (16): each prefix request, a block and a token, is prefilled in "
        "one step; got 16")
