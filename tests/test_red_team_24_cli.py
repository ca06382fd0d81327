"""Red team 24a, the simulator's and the command line's half: the figures of a report
against what the steps did (a preempted request's recompute is no query, yet it is work)."""

from __future__ import annotations

from typing import Any

import pytest

from kvtier import CacheConfig, Scheduler, SchedulerConfig
from kvtier.sim import SyntheticChat
from kvtier.sim.fleet import simulate_fleet


def test_a_fleets_prefill_tokens_count_a_preempted_requests_recompute(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Both instances preempt (max_utilization, 112 GPU blocks each). Their prefill tokens
    (the balance's measure of work) must sum to what the steps' prefill chunks computed:
    they were the queries' prompt less reuse, which since a resumed admission is no query
    left the recompute out (48,225 of 48,235)."""
    computed: list[int] = []
    update = Scheduler.update

    def counted(self: Scheduler, step: Any, sampled: Any, stopped: Any = ()) -> Any:
        computed.append(sum(c.num_tokens for c in step.context_chunks))
        return update(self, step, sampled, stopped)

    monkeypatch.setattr(Scheduler, "update", counted)
    report = simulate_fleet(SyntheticChat(num_requests=60, max_output_tokens=200),
                            CacheConfig(tokens_per_block=32, num_gpu_blocks=112,
                                        num_host_blocks=32), 2,
                            sched=SchedulerConfig(capacity_policy="max_utilization"))
    assert all(s.num_preemptions for s in report.instances)
    assert sum(s.num_prefill_tokens for s in report.instances) == sum(computed)
