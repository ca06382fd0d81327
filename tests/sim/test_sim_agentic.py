"""Tests of the built-in agentic workload (long tool loops over shared tool specs)."""

from __future__ import annotations

from collections import defaultdict
from itertools import pairwise
from typing import Any

import pytest

from kvtier.sim.agentic import AgenticWorkload
from kvtier.sim.workload import TraceRequest, Workload


def make_agentic(num_requests: int = 400, seed: int = 0, **kwargs: Any) -> AgenticWorkload:
    return AgenticWorkload(num_requests=num_requests, seed=seed, **kwargs)


def fingerprint(workload: AgenticWorkload) -> list[tuple[str, float, int, str | None, int]]:
    return [(r.request_id, r.arrival_s, r.output_length, r.session_id, hash(tuple(r.prompt)))
            for r in workload]


def test_agentic_is_a_workload_and_describes_itself() -> None:
    """AgenticWorkload meets the Workload protocol; describe() names its kind and seed."""
    workload = make_agentic(seed=3)
    assert isinstance(workload, Workload)
    summary = workload.describe()
    assert summary["kind"] == "agentic"
    assert summary["seed"] == 3
    assert summary["num_requests"] == 400


def test_agentic_is_deterministic_per_seed() -> None:
    """The same seed gives the same requests on every pass; another seed differs."""
    first = fingerprint(make_agentic(seed=7))
    assert len(first) == 400
    assert fingerprint(make_agentic(seed=7)) == first
    assert fingerprint(make_agentic(seed=8)) != first


def test_agentic_arrivals_never_decrease() -> None:
    """Steps of all sessions come out in arrival order."""
    arrivals = [r.arrival_s for r in make_agentic()]
    assert arrivals == sorted(arrivals)
    assert arrivals[0] > 0


def test_agentic_prompts_grow_within_a_session() -> None:
    """Each step's prompt extends the previous one by its tool call and the tool's output."""
    by_session: dict[str | None, list[TraceRequest]] = defaultdict(list)
    workload = make_agentic()
    for request in workload:
        by_session[request.session_id].append(request)
    long_sessions = [steps for steps in by_session.values() if len(steps) >= 10]
    assert long_sessions, "some sessions run tens of steps"
    for steps in by_session.values():
        for before, after in pairwise(steps):
            grown = len(before.prompt) + before.output_length + workload.min_tool_output_tokens
            assert after.prompt[: len(before.prompt)] == before.prompt
            assert len(after.prompt) >= grown
            assert workload.min_step_gap_s <= after.arrival_s - before.arrival_s
            assert after.arrival_s - before.arrival_s <= workload.max_step_gap_s


def test_agentic_tool_spec_is_shared_by_sessions_of_a_type() -> None:
    """Sessions of one agent type start with the same tool-spec tokens; types differ."""
    workload = make_agentic()
    first_prompt: dict[str, list[int]] = {}
    for request in workload:
        assert request.session_id is not None
        agent_type = request.session_id.split("-")[0]
        first_prompt.setdefault(agent_type, request.prompt)
        spec = first_prompt[agent_type]
        # strict=False: prompts differ in length; only their common prefix is compared.
        shared = next((i for i, (a, b) in enumerate(zip(spec, request.prompt, strict=False))
                       if a != b),
                      min(len(spec), len(request.prompt)))
        assert shared >= workload.min_tool_spec_tokens
    assert len(first_prompt) == workload.num_agent_types
    heads = {tuple(p[: workload.min_tool_spec_tokens]) for p in first_prompt.values()}
    assert len(heads) == workload.num_agent_types


def test_agentic_sessions_end() -> None:
    """Sessions end: at most max_steps steps each, and new sessions keep arriving."""
    counts: dict[str | None, int] = defaultdict(int)
    for request in make_agentic(num_requests=1500):
        counts[request.session_id] += 1
    assert max(counts.values()) <= 40
    assert len(counts) > 50


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("num_requests", -1, r"num_requests must be an integer >= 0, got -1"),
        ("max_steps", 5, r"max_steps must be an integer >= 10, got 5"),
        ("max_step_gap_s", 0.5, r"max_step_gap_s must be a finite number >= 1\.0, got 0\.5"),
        ("session_rate_per_s", 0.0, r"session_rate_per_s must be > 0, got 0\.0"),
        ("max_prompt_tokens", 100, r"max_prompt_tokens must be an integer >= 8500, got 100"),
        ("seed", "x", r"seed must be an integer, got 'x'"),
    ],
)
def test_agentic_rejects_bad_fields(field: str, value: object, pattern: str) -> None:
    """Bad parameters raise ValueError naming the field and the value."""
    with pytest.raises(ValueError, match=pattern):
        make_agentic(**{field: value})  # type: ignore[arg-type]


def test_agentic_is_exported_by_the_simulator() -> None:
    """kvtier.sim exports the agentic workload beside the other built-in workloads."""
    import kvtier.sim

    assert kvtier.sim.AgenticWorkload is AgenticWorkload
    assert "AgenticWorkload" in kvtier.sim.__all__
