"""Synthetic prefix sharing: Zipf-popular system prompts and multi-turn sessions.

Traces without prefix information (Azure) and the built-in :class:`SyntheticChat` get their
token ids from a :class:`PrefixModel`. Token ids come from a counter, so distinct content
always has distinct ids and shared content (a system prompt, a session's history) has
equal ids.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import accumulate

from kvtier.reprs import shown, shown_int
from kvtier.sim._checks import check_float, check_int, keep_plain_ints
from kvtier.sim.workload import MAX_ARRIVAL_S, MAX_REQUEST_TOKENS, TraceRequest


@dataclass(frozen=True, slots=True)
class PrefixModel:
    """How requests share prefixes when the trace does not say.

    Each request is the first turn of a new session or a follow-up turn of an open one::

        first turn:  | system prompt s      | fresh user turn               |
        follow-up:   | previous prompt      | previous output | fresh user turn |
                     '---------- history of the session ---------'

    - ``num_system_prompts`` shared system prompts exist, each of a length drawn uniformly
      from ``min_system_prompt_tokens..max_system_prompt_tokens``; a new session picks
      prompt ``s`` (0-based) with probability proportional to ``1 / (s + 1) ** zipf_exponent``.
    - With probability ``follow_up_fraction`` a request is a follow-up of one of the open
      sessions whose history fits (picked uniformly); otherwise, or when none fits, it opens
      a new session. At most ``max_open_sessions`` sessions are open (the one idle longest
      closes first); a session closes after ``max_turns_per_session`` turns. Reuse distance
      is therefore about ``max_open_sessions / follow_up_fraction`` requests.
    - A user turn has at least ``min_user_turn_tokens`` tokens. The previous output is drawn
      as fresh tokens when the follow-up is built (the model's reply is new content).
    """

    num_system_prompts: int = 8
    min_system_prompt_tokens: int = 200
    max_system_prompt_tokens: int = 1000
    zipf_exponent: float = 1.0
    follow_up_fraction: float = 0.5
    max_open_sessions: int = 32
    max_turns_per_session: int = 8
    min_user_turn_tokens: int = 16

    def __post_init__(self) -> None:
        keep_plain_ints(self, "num_system_prompts", "min_system_prompt_tokens",
                        "max_system_prompt_tokens", "max_open_sessions",
                        "max_turns_per_session", "min_user_turn_tokens")
        check_int("num_system_prompts", self.num_system_prompts, 1)
        check_int("min_system_prompt_tokens", self.min_system_prompt_tokens, 1,
                  MAX_REQUEST_TOKENS)
        check_int("max_system_prompt_tokens", self.max_system_prompt_tokens, 1,
                  MAX_REQUEST_TOKENS)
        if self.max_system_prompt_tokens < self.min_system_prompt_tokens:
            raise ValueError(
                f"max_system_prompt_tokens must be >= min_system_prompt_tokens "
                f"({self.min_system_prompt_tokens}), got {self.max_system_prompt_tokens}"
            )
        check_held_tokens("num_system_prompts", self.num_system_prompts,
                          "min_system_prompt_tokens", self.min_system_prompt_tokens)
        check_float("zipf_exponent", self.zipf_exponent, 0.0, None)
        check_float("follow_up_fraction", self.follow_up_fraction, 0.0, 1.0)
        check_int("max_open_sessions", self.max_open_sessions, 1)
        check_int("max_turns_per_session", self.max_turns_per_session, 1)
        check_int("min_user_turn_tokens", self.min_user_turn_tokens, 1, MAX_REQUEST_TOKENS)


def check_held_tokens(count_field: str, count: int, tokens_field: str, tokens: int) -> None:
    """Raise ValueError naming both fields when ``count`` prompts of at least ``tokens``
    tokens each, built up front and held for the whole run, pass ``MAX_REQUEST_TOKENS``:
    building them would take minutes and gigabytes before the first request."""
    if count * tokens > MAX_REQUEST_TOKENS:
        raise ValueError(f"{count_field} x {tokens_field} must be at most "
                         f"{MAX_REQUEST_TOKENS:,} tokens (held for the whole run), got "
                         f"{shown_int(count)} x {shown_int(tokens)}")


def check_rate(field: str, rate: float) -> None:
    """Raise ValueError naming ``field`` unless ``rate`` (arrivals per second) is a finite
    number of at least one arrival per ``MAX_ARRIVAL_S`` seconds: a slower one drew gaps
    past any arrival a replay can time (an infinite gap below 1e-308, refused mid-run as the
    arrival_s of some request)."""
    check_float(field, rate, 0.0, None)
    if rate == 0:
        raise ValueError(f"{field} must be > 0, got {shown(rate)}")
    if rate < 1 / MAX_ARRIVAL_S:
        raise ValueError(f"{field} must be at least {1 / MAX_ARRIVAL_S:.0e} (one arrival per "
                         f"{MAX_ARRIVAL_S:.0e} s), got {shown(rate)}")


def zipf_weight(rank: int, exponent: float) -> float:
    """``1 / (rank + 1) ** exponent``: 0 where the power passes the float range (an exponent
    in the thousands), where that raised OverflowError. Pure."""
    try:
        return 1.0 / float((rank + 1) ** exponent)
    except OverflowError:
        return 0.0  # NOTE: rank 0 weighs 1, so a draw always has a prompt to pick


@dataclass(slots=True)
class _Session:
    session_id: str
    history: list[int]
    num_turns: int


MAX_HELD_TOKENS = MAX_REQUEST_TOKENS
"""The most tokens of history a :class:`SessionBuilder`'s open sessions hold together."""


class SessionBuilder:
    """Builds the prompts of a request stream under a :class:`PrefixModel`; deterministic.

    The same model, seed and sequence of calls give the same prompts. Memory is bounded by
    the open sessions' histories: at most ``max_open_sessions`` sessions, holding at most
    ``MAX_HELD_TOKENS`` tokens together (the sessions idle longest close first).
    """

    def __init__(self, model: PrefixModel, seed: int) -> None:
        self._model = model
        self._rng = random.Random(f"kvtier-prefix-model-{seed}")
        self._next_token = 0
        self._system_prompts = [
            self._fresh(
                self._rng.randint(model.min_system_prompt_tokens, model.max_system_prompt_tokens)
            )
            for _ in range(model.num_system_prompts)
        ]
        exponent = model.zipf_exponent
        weights = [zipf_weight(rank, exponent) for rank in range(model.num_system_prompts)]
        self._cum_weights = list(accumulate(weights))
        # NOTE: ordered by last activity, idle longest first, so closing pops the front.
        self._open: OrderedDict[str, _Session] = OrderedDict()
        self._num_sessions = 0
        # Tokens of history the open sessions hold, together at most MAX_HELD_TOKENS.
        self.num_held_tokens = 0

    def fixed_length_prompt(self, num_tokens: int, output_length: int) -> tuple[str, list[int]]:
        """Prompt of exactly ``num_tokens`` tokens (a trace's context length); returns session id.

        A follow-up needs ``len(history) + min_user_turn_tokens <= num_tokens`` and fills the
        rest with its user turn. A first turn keeps the leading
        ``min(len(system prompt), num_tokens - min_user_turn_tokens)`` tokens of its system
        prompt (all of it when it fits, a truncated prefix of it for short requests) and
        fills the rest with the user turn.
        """
        min_user = self._model.min_user_turn_tokens
        session = self._pick_follow_up(num_tokens - min_user)
        if session is not None:
            prompt = session.history + self._fresh(num_tokens - len(session.history))
        else:
            system = self._pick_system_prompt()
            num_system = min(len(system), max(0, num_tokens - min_user))
            prompt = system[:num_system] + self._fresh(num_tokens - num_system)
        return self._finish(session, prompt, output_length), prompt

    def natural_prompt(
        self, num_user_tokens: int, max_prompt_tokens: int, output_length: int
    ) -> tuple[str, list[int]]:
        """Prompt whose user turn has ``num_user_tokens`` tokens; returns session id and prompt.

        A follow-up needs ``len(history) + num_user_tokens <= max_prompt_tokens``; a first
        turn is its system prompt plus the user turn, cut to ``max_prompt_tokens``.
        """
        session = self._pick_follow_up(max_prompt_tokens - num_user_tokens)
        if session is not None:
            prompt = session.history + self._fresh(num_user_tokens)
        else:
            system = self._pick_system_prompt()
            num_user = max(1, min(num_user_tokens, max_prompt_tokens - len(system)))
            prompt = (system + self._fresh(num_user))[:max_prompt_tokens]
        return self._finish(session, prompt, output_length), prompt

    def _fresh(self, num_tokens: int) -> list[int]:
        tokens = list(range(self._next_token, self._next_token + num_tokens))
        self._next_token += num_tokens
        return tokens

    def _pick_system_prompt(self) -> list[int]:
        index = self._rng.choices(range(len(self._system_prompts)), cum_weights=self._cum_weights)
        return self._system_prompts[index[0]]

    def _pick_follow_up(self, max_history_tokens: int) -> _Session | None:
        # NOTE: draw the coin on every call so one request's fit never shifts later draws.
        if self._rng.random() >= self._model.follow_up_fraction:
            return None
        fits = [s for s in self._open.values() if len(s.history) <= max_history_tokens]
        return self._rng.choice(fits) if fits else None

    def _finish(self, session: _Session | None, prompt: list[int], output_length: int) -> str:
        if session is None:
            session = _Session(f"s{self._num_sessions}", [], 0)
            self._num_sessions += 1
            self._open[session.session_id] = session
            if len(self._open) > self._model.max_open_sessions:
                self._close(next(iter(self._open)))
        self.num_held_tokens -= len(session.history)
        session.history = prompt + self._fresh(output_length)
        self.num_held_tokens += len(session.history)
        session.num_turns += 1
        if session.num_turns >= self._model.max_turns_per_session:
            self._close(session.session_id)
        else:
            self._open.move_to_end(session.session_id)
        # NOTE: a trace of huge contexts (millions of tokens each) would otherwise keep
        # max_open_sessions of them: tens of gigabytes for requests a replay may skip.
        while self.num_held_tokens > MAX_HELD_TOKENS:
            self._close(next(iter(self._open)))
        return session.session_id

    def _close(self, session_id: str) -> None:
        self.num_held_tokens -= len(self._open.pop(session_id).history)


SYNTHETIC_CHAT_PREFIX_MODEL = PrefixModel(
    num_system_prompts=4,
    min_system_prompt_tokens=300,
    max_system_prompt_tokens=2000,
    zipf_exponent=1.0,
    follow_up_fraction=0.6,
    max_open_sessions=32,
    max_turns_per_session=8,
    min_user_turn_tokens=16,
)


@dataclass(frozen=True, slots=True)
class SyntheticChat:
    """The built-in chat workload: Zipf system prompts, multi-turn sessions, Poisson arrivals.

    Deterministic for a seed. User turns of ``min_user_turn_tokens..max_user_turn_tokens``
    and outputs of ``min_output_tokens..max_output_tokens`` tokens are drawn uniformly;
    sessions grow turn by turn until the next turn would pass ``max_prompt_tokens``. The
    defaults (2,000 requests, prompts of 500-8,000 tokens) replay in seconds and, with the
    default cache sizes, show both prefix reuse and eviction.
    """

    num_requests: int = 2000
    seed: int = 0
    prefix_model: PrefixModel = SYNTHETIC_CHAT_PREFIX_MODEL
    min_user_turn_tokens: int = 200
    max_user_turn_tokens: int = 1500
    min_output_tokens: int = 50
    max_output_tokens: int = 500
    max_prompt_tokens: int = 8000
    arrival_rate_per_s: float = 4.0
    name: str = "synthetic-chat"

    def __post_init__(self) -> None:
        keep_plain_ints(self, "num_requests", "seed", "min_user_turn_tokens",
                        "max_user_turn_tokens", "min_output_tokens", "max_output_tokens",
                        "max_prompt_tokens")
        check_int("num_requests", self.num_requests, 0)
        if type(self.seed) is not int:
            raise ValueError(f"seed must be an integer, got {shown(self.seed)}")
        if not isinstance(self.prefix_model, PrefixModel):
            raise ValueError(f"prefix_model must be a PrefixModel, got {shown(self.prefix_model)}")
        check_int("min_user_turn_tokens", self.min_user_turn_tokens, 1, MAX_REQUEST_TOKENS)
        check_int("max_user_turn_tokens", self.max_user_turn_tokens, self.min_user_turn_tokens,
                  MAX_REQUEST_TOKENS)
        check_int("min_output_tokens", self.min_output_tokens, 0, MAX_REQUEST_TOKENS)
        check_int("max_output_tokens", self.max_output_tokens, self.min_output_tokens,
                  MAX_REQUEST_TOKENS)
        longest_first_turn = self.prefix_model.max_system_prompt_tokens + self.max_user_turn_tokens
        check_int("max_prompt_tokens", self.max_prompt_tokens, longest_first_turn)
        check_rate("arrival_rate_per_s", self.arrival_rate_per_s)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {shown(self.name)}")

    def __iter__(self) -> Iterator[TraceRequest]:
        """Yield the requests in arrival order; each prompt is built when it is reached."""
        builder = SessionBuilder(self.prefix_model, self.seed)
        rng = random.Random(f"kvtier-synthetic-chat-{self.seed}")
        arrival_s = 0.0
        for index in range(self.num_requests):
            arrival_s += rng.expovariate(self.arrival_rate_per_s)
            num_user = rng.randint(self.min_user_turn_tokens, self.max_user_turn_tokens)
            output_length = rng.randint(self.min_output_tokens, self.max_output_tokens)
            session_id, prompt = builder.natural_prompt(
                num_user, self.max_prompt_tokens, output_length
            )
            yield TraceRequest(f"{self.name}-{index}", arrival_s, prompt, output_length, session_id)

    def describe(self) -> dict[str, object]:
        """JSON-ready parameters of this workload."""
        params = {k: v for k, v in asdict(self).items() if k not in ("prefix_model", "name")}
        return {
            "name": self.name,
            "kind": "synthetic-chat",
            **params,
            "prefix_model": asdict(self.prefix_model),
        }
