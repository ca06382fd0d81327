"""The built-in agentic workload: many concurrent tool loops over large shared tool specs.

Each session is one agent working through a task in a loop of tool calls::

    step 1:  | tool spec of agent type a | task |
    step 2:  | tool spec of agent type a | task | call 1 | tool output 1 |
    step s:  | ------------------ prompt of step s-1 -------------- | call s-1 | output s-1 |
             '-- shared by every session of type a --'

The tool spec (system prompt plus tool schemas) is the same token ids for every session of
an agent type; each step's prompt is the previous one plus the model's tool call (its
output, ``output_length`` tokens) and the tool's output. Steps follow each other within
seconds (the model's turn plus the tool's run), so unlike chat turns, minutes apart, the
whole history comes back almost at once.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import accumulate

from kvtier.reprs import shown
from kvtier.sim._checks import check_float, check_int, keep_plain_ints
from kvtier.sim.synthetic import check_held_tokens, check_rate
from kvtier.sim.workload import MAX_ARRIVAL_S, MAX_REQUEST_TOKENS, TraceRequest


@dataclass(slots=True)
class _AgentSession:
    session_id: str
    history: list[int]
    num_steps_left: int


_INT_FIELDS = ("num_requests", "seed", "num_agent_types", "min_tool_spec_tokens",
               "max_tool_spec_tokens", "min_task_tokens", "max_task_tokens", "min_steps",
               "max_steps", "min_output_tokens", "max_output_tokens", "min_tool_output_tokens",
               "max_tool_output_tokens", "max_prompt_tokens")


@dataclass(frozen=True, slots=True)
class AgenticWorkload:
    """Agent sessions arriving as a Poisson process, each a loop of tool-calling steps.

    Deterministic for a seed. ``num_agent_types`` tool specs of
    ``min_tool_spec_tokens..max_tool_spec_tokens`` tokens; a new session picks type ``a``
    (0-based) with probability proportional to ``1 / (a + 1)``, gets a task of
    ``min_task_tokens..max_task_tokens`` fresh tokens and runs
    ``min_steps..max_steps`` steps, or fewer if its prompt would pass
    ``max_prompt_tokens``. Between one step's arrival and the next,
    ``min_step_gap_s..max_step_gap_s`` seconds pass. Tool calls have
    ``min_output_tokens..max_output_tokens`` tokens and tool outputs
    ``min_tool_output_tokens..max_tool_output_tokens``; all drawn uniformly.
    """

    num_requests: int = 2000
    seed: int = 0
    num_agent_types: int = 3
    min_tool_spec_tokens: int = 3000
    max_tool_spec_tokens: int = 8000
    min_task_tokens: int = 50
    max_task_tokens: int = 500
    min_steps: int = 10
    max_steps: int = 40
    min_step_gap_s: float = 1.0
    max_step_gap_s: float = 8.0
    min_output_tokens: int = 20
    max_output_tokens: int = 200
    min_tool_output_tokens: int = 50
    max_tool_output_tokens: int = 1500
    max_prompt_tokens: int = 48000
    session_rate_per_s: float = 0.25
    name: str = "agentic"

    def __post_init__(self) -> None:
        keep_plain_ints(self, *_INT_FIELDS)
        check_int("num_requests", self.num_requests, 0)
        if type(self.seed) is not int:
            raise ValueError(f"seed must be an integer, got {shown(self.seed)}")
        check_int("num_agent_types", self.num_agent_types, 1)
        for low, high in (("min_tool_spec_tokens", "max_tool_spec_tokens"),
                          ("min_task_tokens", "max_task_tokens"),
                          ("min_steps", "max_steps"),
                          ("min_output_tokens", "max_output_tokens"),
                          ("min_tool_output_tokens", "max_tool_output_tokens")):
            check_int(low, getattr(self, low), 0 if "output" in low else 1,
                      None if low == "min_steps" else MAX_REQUEST_TOKENS)
            check_int(high, getattr(self, high), getattr(self, low),
                      None if high == "max_steps" else MAX_REQUEST_TOKENS)
        check_held_tokens("num_agent_types", self.num_agent_types, "min_tool_spec_tokens",
                          self.min_tool_spec_tokens)
        check_float("min_step_gap_s", self.min_step_gap_s, 0.0, None)
        check_float("max_step_gap_s", self.max_step_gap_s, self.min_step_gap_s, None)
        if self.max_step_gap_s > MAX_ARRIVAL_S:  # a session's next step would arrive past it
            raise ValueError(f"max_step_gap_s must be at most {MAX_ARRIVAL_S:.0e} s, got "
                             f"{shown(self.max_step_gap_s)}")
        longest_first_step = self.max_tool_spec_tokens + self.max_task_tokens
        check_int("max_prompt_tokens", self.max_prompt_tokens, longest_first_step)
        check_rate("session_rate_per_s", self.session_rate_per_s)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {shown(self.name)}")

    def __iter__(self) -> Iterator[TraceRequest]:
        """Yield the steps of all sessions in arrival order; each prompt built when reached."""
        rng = random.Random(f"kvtier-agentic-{self.seed}")
        next_token = 0

        def fresh(num_tokens: int) -> list[int]:
            nonlocal next_token
            next_token += num_tokens
            return list(range(next_token - num_tokens, next_token))

        specs = [fresh(rng.randint(self.min_tool_spec_tokens, self.max_tool_spec_tokens))
                 for _ in range(self.num_agent_types)]
        cum_weights = list(accumulate(1.0 / (a + 1) for a in range(self.num_agent_types)))
        # (arrival of the session's next step, order of scheduling, session): the order
        # breaks ties so equal times keep a fixed, seed-determined order.
        pending: list[tuple[float, int, _AgentSession]] = []
        num_sessions = num_scheduled = 0
        next_session_s = rng.expovariate(self.session_rate_per_s)
        for index in range(self.num_requests):
            if not pending or next_session_s <= pending[0][0]:
                agent_type = rng.choices(range(self.num_agent_types), cum_weights=cum_weights)[0]
                task = fresh(rng.randint(self.min_task_tokens, self.max_task_tokens))
                session = _AgentSession(f"a{agent_type}-s{num_sessions}",
                                        specs[agent_type] + task,
                                        rng.randint(self.min_steps, self.max_steps))
                num_sessions += 1
                heapq.heappush(pending, (next_session_s, num_scheduled, session))
                num_scheduled += 1
                next_session_s += rng.expovariate(self.session_rate_per_s)
            arrival_s, _, session = heapq.heappop(pending)
            output_length = rng.randint(self.min_output_tokens, self.max_output_tokens)
            yield TraceRequest(f"{self.name}-{index}", arrival_s, list(session.history),
                               output_length, session.session_id)
            session.num_steps_left -= 1
            tool_output = rng.randint(self.min_tool_output_tokens, self.max_tool_output_tokens)
            session.history += fresh(output_length) + fresh(tool_output)
            if session.num_steps_left > 0 and len(session.history) <= self.max_prompt_tokens:
                gap_s = rng.uniform(self.min_step_gap_s, self.max_step_gap_s)
                heapq.heappush(pending, (arrival_s + gap_s, num_scheduled, session))
                num_scheduled += 1

    def describe(self) -> dict[str, object]:
        """JSON-ready parameters of this workload."""
        params = {k: v for k, v in asdict(self).items() if k != "name"}
        return {"name": self.name, "kind": "agentic", **params}
