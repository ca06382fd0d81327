"""Red team 25a, simulator: every figure a replay reports is what the trace and the
replay hold."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvtier import CacheConfig, SchedulerConfig
from kvtier.reprs import shown
from kvtier.sim import simulate
from kvtier.sim.fleet import simulate_fleet
from kvtier.sim.mixed import MixedWorkload
from kvtier.sim.trace_file import TraceFormatError
from kvtier.sim.traces import AzureTrace, MooncakeTrace
from kvtier.sim.workload import SAMPLED_TOKEN_BASE, TraceRequest
from list_workload import ListWorkload


def test_a_request_of_no_output_is_its_prefill_and_counts_no_output_token() -> None:
    """A trace row of 0 output tokens is served as its prefill: the one token the step
    samples to end it was counted as output (2 where the trace holds 1), and the output
    throughput with it."""
    workload = ListWorkload([TraceRequest("none", 0.0, list(range(10)), 0),
                             TraceRequest("one", 0.0, list(range(100, 110)), 1)])
    report = simulate(workload, CacheConfig(tokens_per_block=4, num_gpu_blocks=16),
                      SchedulerConfig(max_num_tokens=64), "tiny-test")
    # One step prefills both (20 tokens); each ends with it.
    assert (report.num_requests, report.num_steps, report.num_scheduled_tokens) == (2, 1, 20)
    assert report.num_output_tokens == 1
    assert report.output_tokens_per_s == 1 / report.makespan_s
    assert report.throughput_tokens_per_s == 21 / report.makespan_s


BURSTGPT_HEADER = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type"


@pytest.mark.parametrize(("total", "shown"), [("489", "'489'"), ("18", "'18'"), ("", "''"),
                                               ("4.9e2", "'4.9e2'")])
def test_a_burstgpt_total_other_than_request_and_response_is_refused(
        tmp_path: Path, total: str, shown: str) -> None:
    """BurstGPT's Total tokens is the request and response tokens summed: a row whose total
    says otherwise (columns mixed up or cut) was replayed with lengths its own total
    contradicts; refused naming the line, the field and the numbers."""
    path = tmp_path / "burst.csv"
    path.write_text(f"{BURSTGPT_HEADER}\n5,ChatGPT,10,0,10,API log\n"
                    f"6,ChatGPT,472,18,{total},Conversation log\n")
    with pytest.raises(TraceFormatError, match=re.escape(
            f"{path}:3: field 'Total tokens': must be the request and response tokens summed, "
            f"472 + 18 = 490, got {shown}")):
        AzureTrace(path)
    path.write_text(f"{BURSTGPT_HEADER}\n5,ChatGPT,10,0,10,API log\n"
                    "6,ChatGPT,472,18, 490 ,Conversation log\n")
    assert [(len(r.prompt), r.output_length) for r in AzureTrace(path)] == [(10, 0), (472, 18)]


def test_a_mixed_part_holding_an_id_past_4300_digits_is_refused_naming_it() -> None:
    """A part's token id of more than 4,300 digits raised a bare 'Exceeds the limit (4300
    digits)' from the refusal's own message; it names the request, the part and the id."""
    huge = 10**5000
    mixed = MixedWorkload((ListWorkload([TraceRequest("r", 0.0, [huge], 1)]),
                           NamedList("other", [TraceRequest("s", 0.0, [1], 1)])))
    with pytest.raises(ValueError, match=re.escape(
            f"request 'r' of part 'list' holds token id an int of {huge.bit_length()} bits: "
            "past what 2 parts can share")):
        list(mixed)


class NamedList(ListWorkload):
    """A list workload of another name."""

    def __init__(self, name: str, requests: list[TraceRequest]) -> None:
        super().__init__(requests)
        self.name = name


@pytest.mark.parametrize("scale", [10**400, 2**1024, 10**5000], ids=["e400", "2p1024", "e5000"])
@pytest.mark.parametrize("fleet", [False, True])
def test_a_time_scale_past_the_float_range_is_refused_naming_it(scale: int, fleet: bool) -> None:
    """An int time scale past the float range passed the check (0 < scale < inf) and the
    replay failed at its first arrival with a bare OverflowError naming nothing."""
    workload = ListWorkload([TraceRequest("a", 0.0, [1, 2, 3], 2),
                             TraceRequest("b", 1.0, [1, 2, 3, 4], 2)])
    cache = CacheConfig(tokens_per_block=4, num_gpu_blocks=8)
    with pytest.raises(ValueError, match=re.escape("time_scale must be a finite number in "
                                                   f"(0, 1e+10], got {shown(scale)}")):
        if fleet:
            simulate_fleet(workload, cache, 2, time_scale=scale)
        else:
            simulate(workload, cache, time_scale=scale)
    assert simulate(workload, cache, time_scale=10**3).time_scale == 1000.0  # an int, as ever


def test_a_prompt_holding_a_sampled_token_id_is_refused_naming_it() -> None:
    """A replay samples output tokens from 2**62 up: a workload's prompt holding such ids
    reused another request's output as its own prefix (8 of 9 tokens hit, 4 of them on
    'a''s output), hits no trace holds. Refused, naming the request and the id."""
    base = SAMPLED_TOKEN_BASE
    workload = ListWorkload([TraceRequest("a", 0.0, [1, 2, 3, 4, 5], 9),
                             TraceRequest("b", 100.0, [1, 2, 3, 4, 5, base, base + 1,
                                                       base + 2, 9], 1)])
    with pytest.raises(ValueError, match=re.escape(
            f"request 1 of the workload ('b') holds token id {base + 2}: a workload's ids stay "
            "below 2**62, where a replay's sampled tokens begin")):
        simulate(workload, CacheConfig(tokens_per_block=4, num_gpu_blocks=16), None,
                 "tiny-test")


def test_a_hash_trace_whose_ids_reach_the_sampled_tokens_is_refused(tmp_path: Path) -> None:
    """A hash trace's token ids h*B.. were bounded by 2**63 only: ids from 2**62 are the
    replay's sampled tokens. Refused naming the line, as a larger id was."""
    big = SAMPLED_TOKEN_BASE // 512  # h*512 == 2**62
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 1024, "output_length": 5, '
                    f'"hash_ids": [1, {big}]}}\n')
    with pytest.raises(TraceFormatError, match=re.escape(
            f"{path}:1: field 'hash_ids': id {big} is too large: token ids h*512.. must stay "
            "below 2**62, where a replay's sampled tokens begin")):
        MooncakeTrace(path)
    path.write_text('{"timestamp": 0, "input_length": 1024, "output_length": 5, '
                    f'"hash_ids": [1, {big - 2}]}}\n')
    assert max(next(iter(MooncakeTrace(path))).prompt) < SAMPLED_TOKEN_BASE
