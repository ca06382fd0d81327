"""The replay loop: exact credit on real traces, the probe race, clock, latency and policies."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvtier import CacheConfig
from kvtier.scheduled_step import STEP_PHASES
from kvtier.scheduler import SchedulerConfig
from kvtier.sim import (
    MooncakeTrace,
    SimReport,
    SyntheticChat,
    TraceRequest,
    Workload,
    format_report,
    oracle_bounds,
    percentile,
    simulate,
)
from list_workload import ListWorkload


class CappedOutputs:
    """``workload`` with every output cut to ``cap`` tokens (fewer decode steps, same prompts)."""

    def __init__(self, workload: Workload, cap: int) -> None:
        self.workload = workload
        self.cap = cap
        self.name = workload.name

    def __iter__(self) -> Iterator[TraceRequest]:
        for request in self.workload:
            yield dataclasses.replace(request, output_length=min(request.output_length, self.cap))

    def describe(self) -> dict[str, object]:
        return {**self.workload.describe(), "output_cap": self.cap}


def make_tokens(start: int, num_tokens: int) -> list[int]:
    """``num_tokens`` consecutive token ids from ``start``."""
    return list(range(start, start + num_tokens))


def without_cpu(report: SimReport) -> dict[str, object]:
    """The report less its real-time figures."""
    out = report.to_dict()
    del out["cpu"]
    return out


def assert_exact_credit(report: SimReport) -> None:
    """Claim admission: never over budget, every credited token obtained."""
    assert report.num_overflow_steps == report.num_overflow_tokens == 0
    assert report.max_overflow_tokens == 0
    assert report.num_credited_tokens == report.num_obtained_tokens
    assert report.num_lost_reuse_tokens == 0


def test_percentile_is_nearest_rank() -> None:
    """p50 of 1..10 is 5, p90 is 9, p99 and p100 are 10; an empty sample has none."""
    values = [float(v) for v in range(1, 11)]
    assert [percentile(values, q) for q in (50, 90, 99, 100)] == [5.0, 9.0, 10.0, 10.0]
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="q must be in"):
        percentile(values, 0)


def test_clock_follows_the_time_model_exactly() -> None:
    """One request at t=5: TTFT is its prefill step, E2E adds two decode steps (tiny-test).

        t=5 ──prefill 10 tokens──► first token ──decode──► ──decode──► done (3 tokens)
            0.125 + 10/1024 s          0.125 + 1/64 s each
    """
    workload = ListWorkload([TraceRequest("r", 5.0, make_tokens(0, 10), 3)])
    report = simulate(workload, CacheConfig(tokens_per_block=4, num_gpu_blocks=8),
                      SchedulerConfig(max_num_tokens=64), "tiny-test")
    prefill_s = 0.125 + 10 / 1024
    decode_s = 0.125 + 1 / 64
    assert (report.num_steps, report.num_requests, report.num_output_tokens) == (3, 1, 3)
    assert report.ttft_s.p50 == report.ttft_s.p99 == prefill_s
    assert report.e2e_s.p50 == prefill_s + 2 * decode_s
    assert report.makespan_s == prefill_s + 2 * decode_s
    assert report.num_scheduled_tokens == 12


def test_synthetic_chat_claim_is_exact_and_latencies_are_ordered() -> None:
    """A small chat workload with host offload: exact credit, ordered percentiles."""
    report = simulate(SyntheticChat(num_requests=60, arrival_rate_per_s=20.0),
                      CacheConfig(num_gpu_blocks=400, num_host_blocks=1600),
                      SchedulerConfig(max_num_tokens=2048), check_every=100)
    assert_exact_credit(report)
    assert report.num_requests == 60 and report.num_rejected_too_large == 0
    assert report.num_host_hit_tokens > 0 and report.num_onboarded_blocks > 0
    assert report.num_gpu_hit_tokens + report.num_host_hit_tokens == report.num_reused_tokens
    for summary in (report.ttft_s, report.e2e_s):
        assert summary.p50 is not None and summary.p90 is not None and summary.p99 is not None
        assert 0 < summary.p50 <= summary.p90 <= summary.p99
    # Each request's TTFT <= its E2E, so every order statistic is ordered too.
    for q in ("p50", "p90", "p99"):
        assert getattr(report.ttft_s, q) <= getattr(report.e2e_s, q)


def test_phases_report_where_full_steps_go() -> None:
    """With ``phases``, the report splits the full steps' CPU time by phase; the phases
    lie inside the timed step, so they never sum past it. Off, there is no breakdown."""
    workload = SyntheticChat(num_requests=40, arrival_rate_per_s=20.0)
    cache = CacheConfig(num_gpu_blocks=400, num_host_blocks=1600)
    sched = SchedulerConfig(max_num_tokens=2048)
    report = simulate(workload, cache, sched, phases=True)
    assert report.step_phases_us is not None
    assert set(report.step_phases_us) == {"all", "slowest_1pct"}
    for means in report.step_phases_us.values():
        assert list(means) == ["step", *STEP_PHASES]
        assert all(us >= 0 for us in means.values())
        assert sum(means[p] for p in STEP_PHASES) <= means["step"]
        assert means["admit"] > 0 and means["store"] > 0
    plain = simulate(workload, cache, sched)
    assert plain.step_phases_us is None
    assert dataclasses.replace(report, cpu={}, step_phases_us=None) == dataclasses.replace(
        plain, cpu={})  # timing changes nothing but the timings


@pytest.mark.parametrize(
    ("name", "num_requests", "num_host_blocks"),
    [("mooncake_conversation_trace.jsonl", 300, 32768),
     ("mooncake_synthetic_trace.jsonl", 300, 8192)],
)
def test_real_trace_prefix_claim_is_exact(
    trace_file: Callable[[str], Path], name: str, num_requests: int, num_host_blocks: int
) -> None:
    """A Mooncake prefix through 2,048 GPU blocks: host onboarding and evictions happen, and
    claim admission never overflows the budget nor loses credited reuse."""
    trace = MooncakeTrace(trace_file(name), tokens_per_block=32, limit=num_requests)
    report = simulate(CappedOutputs(trace, 16),
                      CacheConfig(tokens_per_block=32, num_gpu_blocks=2048,
                                  num_host_blocks=num_host_blocks),
                      SchedulerConfig(max_num_tokens=2048), check_every=500)
    assert_exact_credit(report)
    assert report.num_requests + report.num_rejected_too_large == num_requests
    assert report.num_host_hit_tokens > 0 and report.num_onboarded_blocks > 0
    assert report.num_offloaded_blocks > 0 and report.num_evicted_host_blocks > 0
    assert report.bytes_h2d == report.num_host_hit_tokens * 128 * 1024


def race_workload(num_prefixes: int = 8, num_new_tokens: int = 8) -> ListWorkload:
    """S1 at scale: the host tier holds exactly the cached prefixes, the GPU only fillers,
    and every prefix's follow-up arrives in the same step.

        t = 0..70    p_i   = P_i + 1 token      P_i (one 4-token block) cached on GPU
        t = 80..     fillers (32 GPU blocks)    push P_1..P_8 to host: host [P_1 .. P_8] full
        t = T        q_i   = P_i + 8 new tokens, all at once; MNT = 8 x 8 = credited exactly
    """
    requests = []
    prefixes = [make_tokens(10_000 + 4 * i, 4) for i in range(num_prefixes)]
    next_token = 20_000
    t = 0.0
    for i, prefix in enumerate(prefixes):
        requests.append(TraceRequest(f"p{i}", t, prefix + [next_token], 1))
        next_token += 1
        t += 10
    num_filler_blocks = num_prefixes * (num_new_tokens // 4 + 2)  # the whole GPU pool
    for j in range(num_filler_blocks // 8):
        requests.append(TraceRequest(f"f{j}", t, make_tokens(next_token, 32), 1))
        next_token += 32
        t += 10
    for i, prefix in enumerate(prefixes):
        requests.append(TraceRequest(f"q{i}", t, prefix + make_tokens(next_token, num_new_tokens),
                                     1))
        next_token += num_new_tokens
    return ListWorkload(requests)


RACE_CACHE = CacheConfig(tokens_per_block=4, num_gpu_blocks=32, num_host_blocks=8,
                         enable_partial_reuse=False)


def test_race_overflows_in_probe_mode_only() -> None:
    """Probe admission loses host prefixes to offloads of its own step and overflows the
    budget; claim admission gets all eight prefixes from the host and stays within it."""
    reports = {
        admission: simulate(race_workload(), RACE_CACHE,
                            SchedulerConfig(max_num_tokens=64, admission=admission),
                            "tiny-test", check_every=1)
        for admission in ("claim", "probe")
    }
    claim, probe = reports["claim"], reports["probe"]
    assert_exact_credit(claim)
    assert claim.num_host_hit_tokens == claim.num_credited_tokens == 8 * 4
    assert claim.bytes_h2d == 8 * 4 * 1024  # tiny-test: 1 KiB of KV per token
    assert probe.num_overflow_steps > 0 and probe.max_overflow_tokens > 0
    assert probe.num_lost_reuse_tokens == probe.num_overflow_tokens > 0
    assert probe.num_credited_tokens == claim.num_credited_tokens
    assert probe.num_obtained_tokens < probe.num_credited_tokens


def test_same_seed_same_report() -> None:
    """Two runs of one seeded workload agree on everything but real CPU time."""
    def run(seed: int) -> SimReport:
        return simulate(SyntheticChat(num_requests=25, seed=seed, arrival_rate_per_s=20.0),
                        CacheConfig(num_gpu_blocks=300, num_host_blocks=600),
                        SchedulerConfig(max_num_tokens=1024, capacity_policy="max_utilization"))
    first = run(3)
    assert without_cpu(first) == without_cpu(run(3))
    assert without_cpu(first) != without_cpu(run(4))


def test_preemption_only_under_max_utilization() -> None:
    """A tight pool: max_utilization preempts (and still finishes everyone);
    guaranteed_no_evict reserves decode blocks up front and never does."""
    workload = SyntheticChat(num_requests=60, arrival_rate_per_s=50.0)
    cache = CacheConfig(num_gpu_blocks=400)
    reports = {
        policy: simulate(workload, cache, SchedulerConfig(capacity_policy=policy),
                         check_every=200)
        for policy in ("guaranteed_no_evict", "max_utilization")
    }
    assert reports["guaranteed_no_evict"].num_preemptions == 0
    assert reports["max_utilization"].num_preemptions > 0
    for report in reports.values():
        assert report.num_requests == 60
        assert_exact_credit(report)


def test_preempted_recomputes_are_no_queries() -> None:
    """A preempted request's recompute finds its own blocks again: counted as a query it
    inflated the hit rate (Mooncake conversation, 3,000 requests, 2,048 + 8,192 blocks:
    0.0873 reported, 0.0633 over first admissions). Each prompt is one query, at its first
    admission; the host hits are those of the queries (the plans' onboards, less the
    resumes'); with no preemption they are every onboard of the plans."""
    workload = SyntheticChat(num_requests=60, arrival_rate_per_s=50.0)
    prompts = sum(r.num_prompt_tokens for r in workload)
    reports = [simulate(workload, CacheConfig(num_gpu_blocks=400, num_host_blocks=400),
                        SchedulerConfig(capacity_policy=policy), check_every=50)
               for policy in ("max_utilization", "guaranteed_no_evict")]
    preempted, calm = reports
    assert preempted.num_preemptions > 0 and calm.num_preemptions == 0
    kv = preempted.profile["kv_bytes_per_token"]
    assert isinstance(kv, int)
    for report in reports:
        resumed = report.num_preemptions > 0
        assert report.num_prompt_tokens == prompts
        assert report.token_hit_rate == report.num_reused_tokens / prompts
        assert (report.num_gpu_hit_tokens + report.num_host_hit_tokens
                == report.num_reused_tokens)
        onboarded = report.bytes_h2d // kv
        assert (report.num_host_hit_tokens < onboarded if resumed
                else report.num_host_hit_tokens == onboarded)
        assert_exact_credit(report)


def test_requests_too_large_are_skipped_and_counted() -> None:
    """A request needing more blocks than the GPU pool is counted, not run; others run."""
    workload = ListWorkload([
        TraceRequest("small", 0.0, make_tokens(0, 10), 2),
        TraceRequest("huge", 0.5, make_tokens(100, 40), 2),  # 11 blocks > 8
        TraceRequest("small2", 1.0, make_tokens(200, 10), 2),
    ])
    calls: list[int] = []
    report = simulate(workload, CacheConfig(tokens_per_block=4, num_gpu_blocks=8),
                      SchedulerConfig(max_num_tokens=16), "tiny-test", progress=calls.append)
    assert (report.num_requests, report.num_rejected_too_large) == (2, 1)
    assert calls == [1, 1, 1]


def test_without_chunked_prefill_prompts_past_the_budget_are_skipped_and_counted() -> None:
    """Without chunked prefill a prompt longer than a step's budget can never be prefilled
    (the scheduler refuses it): counted as too large, not a replay that stalls or stops;
    the others run, and the report's line says what "too large" meant."""
    workload = ListWorkload([
        TraceRequest("small", 0.0, make_tokens(0, 10), 2),
        TraceRequest("long", 0.5, make_tokens(100, 17), 2),  # 17 tokens > 16, 5 blocks
        TraceRequest("small2", 1.0, make_tokens(200, 16), 2),
    ])
    report = simulate(workload, CacheConfig(tokens_per_block=4, num_gpu_blocks=8),
                      SchedulerConfig(max_num_tokens=16, enable_chunked_prefill=False),
                      "tiny-test")
    assert (report.num_requests, report.num_rejected_too_large) == (2, 1)
    assert any("1 too large for the GPU pool or a step's 16 tokens;" in line
               for line in format_report(report))


@pytest.mark.parametrize("seed", range(8))
def test_without_chunked_prefill_a_preempted_request_longer_than_a_step_resumes(
    seed: int,
) -> None:
    """Under max_utilization a preempted request recomputes its prompt and output so far:
    without chunked prefill that could be more than any step holds, so it waited for ever
    and, past max_wait_steps, held up everyone behind it (a stalled replay: 29 of 40 random
    runs like these). It is chunked; every request finishes, credit exact."""
    import random

    rng = random.Random(seed)
    requests = []
    for i in range(12):
        prompt = [rng.randrange(1000) for _ in range(rng.randint(8, 16))]
        requests.append(TraceRequest(f"r{i}", i * 0.001, prompt, rng.randint(4, 20)))
    report = simulate(ListWorkload(requests),
                      CacheConfig(tokens_per_block=4, num_gpu_blocks=rng.randint(8, 14)),
                      SchedulerConfig(max_num_tokens=16, enable_chunked_prefill=False,
                                      capacity_policy="max_utilization", max_wait_steps=2),
                      "tiny-test")
    assert (report.num_requests, report.num_rejected_too_large) == (12, 0)
    assert_exact_credit(report)


def test_oracle_bounds_at_gpu_plus_host_capacity() -> None:
    """oracle=True attaches unlimited and Belady hit rates at GPU + host blocks."""
    workload = SyntheticChat(num_requests=30)
    report = simulate(workload, CacheConfig(num_gpu_blocks=300, num_host_blocks=200),
                      oracle=True)
    assert report.oracle is not None
    # Under the cache's partial reuse rule (on by default): test_red_team_26b_sim.
    assert report.oracle == oracle_bounds(workload, 32, [500], partial_reuse=True)[0]
    assert report.oracle.num_capacity_blocks == 500
    assert 0 < report.oracle.belady_hit_rate <= report.oracle.unlimited_hit_rate


def test_simulate_never_prints(capsys: pytest.CaptureFixture[str]) -> None:
    """The library reports through its return value only."""
    simulate(SyntheticChat(num_requests=5), CacheConfig())
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"time_scale": 0}, r"time_scale must be a finite number in \(0, 1e\+10\], got 0"),
     ({"check_every": 0}, "check_every must be an integer >= 1 or None, got 0"),
     ({"profile": "nope"}, "unknown model profile 'nope'")],
)
def test_simulate_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    """Bad arguments raise ValueError naming the argument and the value."""
    with pytest.raises(ValueError, match=message):
        simulate(SyntheticChat(num_requests=1), CacheConfig(), **kwargs)  # type: ignore[arg-type]


def test_whole_conversation_trace_is_overloaded(trace_file: Callable[[str], Path]) -> None:
    """The whole Mooncake conversation trace at time scale 1 is more than one instance
    serves (TTFT p50 of minutes): its load says so from the first 2,000 requests on."""
    report = simulate(MooncakeTrace(trace_file("mooncake_conversation_trace.jsonl"),
                                    limit=2000),
                      CacheConfig(num_gpu_blocks=16384), SchedulerConfig())
    assert report.load.overloaded and report.load.sustainable_instances is not None
    assert report.load.sustainable_time_scale is not None
    assert report.load.sustainable_time_scale > 1


def replay_json(hash_seed: str, *args: str) -> dict[str, object]:
    """``kvtier replay args`` in a fresh interpreter with ``PYTHONHASHSEED``; its JSON line
    without the real-time fields (``cpu``, ``wall_s``)."""
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    done = subprocess.run([sys.executable, "-m", "kvtier", "replay", "--no-progress", *args],
                          capture_output=True, text=True, check=True, timeout=300, env=env)
    document: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    document.pop("cpu", None)
    document.pop("wall_s", None)
    return document


@pytest.mark.parametrize("args", [
    ("--limit", "80", "--gpu-blocks", "384", "--host-blocks", "256", "--capacity-policy",
     "max_utilization", "--max-num-tokens", "2048"),
    ("--limit", "80", "--gpu-blocks", "512", "--host-blocks", "256", "--instances", "3",
     "--remote", "write-back", "--hash-algo", "sha256"),
])
def test_results_do_not_depend_on_the_hash_seed(args: tuple[str, ...]) -> None:
    """Two interpreters with different PYTHONHASHSEED give the same report, field by field
    (set or dict iteration in hash order must never decide a result)."""
    first, second = replay_json("0", *args), replay_json("4242", *args)
    assert first == second


def test_a_busy_but_well_served_stream_is_not_called_overloaded() -> None:
    """A serving loop steps whenever anything is in flight: busy time a little past the
    arrival span (the last requests' drain) is no overload; well past it is."""
    from kvtier.sim.report import OVERLOAD_UTILIZATION, estimate_load

    calm = estimate_load(busy_s=486.85, arrival_span_s=485.84, time_scale=1.0)
    assert calm.utilization is not None and calm.utilization > 1.0 and not calm.overloaded
    hot = estimate_load(busy_s=600.0, arrival_span_s=485.84, time_scale=1.0)
    assert hot.overloaded and hot.sustainable_instances == 2
    assert hot.sustainable_time_scale == pytest.approx(600.0 / 485.84)
    assert 1.0 < OVERLOAD_UTILIZATION < 1.1
