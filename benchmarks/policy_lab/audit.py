"""The audit: workload families no policy was tuned on, to check that a policy generalises.

Seven sessions tuned kvtier's default order on the same nine rows (Mooncake conversation
and synthetic, Azure conversation and code, the built-in chat, agentic and mixed). The
families here are built to test one principle each, most of them where there is nothing to
learn (an online order can only lose there, so it must stay within noise of LRU):

    memoryless    sessions whose continuation is a coin of fixed bias and whose gaps are
                  exponential: every cached run's future is the same at every age and turn
    scan-hot      one-shot prompts (never reused) mixed with a small hot set of prompts
    zipf-system   Zipf-popular shared system prompts, each request a one-off suffix
    doc-qa        one long shared document (and two shorter), many short questions on
                  it, over one-shot background traffic
    heavy-tail    sessions whose inter-turn gaps are Pareto (some come back after hours)
    phase-shift   sessions that continue for the first half; in the second half no session
                  continues and shared system prompts are reused instead: the class that
                  was reused stops being reused
    flip          the same two regimes alternating every few hundred requests: adversarial
                  for a learner that remembers

Every family is deterministic for its seed and re-iterable (``Workload``); token ids come
from a counter (distinct content, distinct ids), outputs are fresh tokens as in
``kvtier.sim.SyntheticChat``. ``bench_policy.py --audit`` replays them (and windows and
seeds of the real traces that no earlier session used) at 1 %, 3 %, 10 % and 30 % of the
distinct blocks, 16, 32 and 512 tokens a block.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from kvtier.sim.workload import TraceRequest, Workload

# A request as a family's generator makes it: (arrival s, prompt, output tokens, session).
Made = tuple[float, list[int], int, "str | None"]


class _Tokens:
    """Fresh token ids from a counter: distinct content has distinct ids."""

    def __init__(self) -> None:
        self._next = itertools.count(1)

    def fresh(self, num_tokens: int) -> list[int]:
        return list(itertools.islice(self._next, num_tokens))


@dataclass
class _Session:
    session_id: str
    history: list[int]
    turn: int = 1


@dataclass(frozen=True, slots=True)
class SessionRegime:
    """How sessions behave while this regime holds: each finished turn continues with
    ``p_continue`` (``continue_at``: per turn, overriding it), after a gap drawn by
    ``gap``; a new session starts on one of ``num_system_prompts`` shared prompts (Zipf,
    ``zipf``; 0: a private prompt of its own)."""

    p_continue: float
    gap: Callable[[random.Random], float]
    num_system_prompts: int = 0
    zipf: float = 1.0
    max_turns: int = 16


def _zipf_pick(rng: random.Random, cum: list[float]) -> int:
    """An index drawn with the weights whose running sums ``cum`` holds."""
    return bisect.bisect_left(cum, rng.random() * cum[-1], 0, len(cum) - 1)


def _sessions(seed: int, num_requests: int, rate_per_s: float,
              regime_at: Callable[[int], SessionRegime],
              first_tokens: tuple[int, int] = (200, 1200),
              turn_tokens: tuple[int, int] = (50, 400),
              output_tokens: tuple[int, int] = (50, 300),
              system_tokens: tuple[int, int] = (300, 1500)) -> Iterator[Made]:
    """New sessions arrive as a Poisson process; a session's next turn comes after its
    regime's gap with its regime's chance (the regime of the request count at the time the
    turn is decided)."""
    rng = random.Random(seed)
    tokens = _Tokens()
    systems: dict[int, list[int]] = {}
    pending: list[tuple[float, int, _Session, int]] = []  # (arrival, order, session, output)
    order = itertools.count()
    next_new = rng.expovariate(rate_per_s)
    made = 0
    while made < num_requests:
        if pending and pending[0][0] <= next_new:
            t, _, session, out = heapq.heappop(pending)
            prompt = session.history
        else:
            t = next_new
            next_new += rng.expovariate(rate_per_s)
            regime = regime_at(made)
            if regime.num_system_prompts:
                cum = list(itertools.accumulate(
                    1.0 / (k + 1) ** regime.zipf for k in range(regime.num_system_prompts)))
                s = _zipf_pick(rng, cum)
                if s not in systems:
                    systems[s] = tokens.fresh(rng.randint(*system_tokens))
                head = systems[s]
            else:
                head = tokens.fresh(rng.randint(*system_tokens))
            session = _Session(f"s{made}", head + tokens.fresh(rng.randint(*first_tokens)))
            prompt = session.history
            out = rng.randint(*output_tokens)
        yield t, prompt, out, session.session_id
        made += 1
        regime = regime_at(made)
        if session.turn < regime.max_turns and rng.random() < regime.p_continue:
            session.history = prompt + tokens.fresh(out) + tokens.fresh(rng.randint(*turn_tokens))
            session.turn += 1
            heapq.heappush(pending, (t + regime.gap(rng), next(order), session,
                                     rng.randint(*output_tokens)))


def _one_shots(seed: int, num_requests: int, rate_per_s: float, share_hot: float,
               num_hot: int, hot_tokens: tuple[int, int], suffix_tokens: tuple[int, int],
               cold_tokens: tuple[int, int], zipf: float = 1.0) -> Iterator[Made]:
    """Requests with no sessions: with ``share_hot`` a hot prompt (Zipf over ``num_hot``)
    with a one-off suffix, else a one-off prompt never seen again (a scan)."""
    rng = random.Random(seed)
    tokens = _Tokens()
    hot: dict[int, list[int]] = {}
    cum = list(itertools.accumulate(1.0 / (k + 1) ** zipf for k in range(max(1, num_hot))))
    t = 0.0
    for _ in range(num_requests):
        t += rng.expovariate(rate_per_s)
        if num_hot and rng.random() < share_hot:
            k = _zipf_pick(rng, cum)
            if k not in hot:
                hot[k] = tokens.fresh(rng.randint(*hot_tokens))
            prompt = hot[k] + tokens.fresh(rng.randint(*suffix_tokens))
        else:
            prompt = tokens.fresh(rng.randint(*cold_tokens))
        yield t, prompt, rng.randint(20, 200), None


def _merge(*streams: Iterator[Made]) -> Iterator[Made]:
    """Streams merged by arrival, each in its own token space (ids offset apart)."""
    tagged = [((t, p, o, s, k) for t, p, o, s in stream) for k, stream in enumerate(streams)]
    for t, p, o, s, k in heapq.merge(*tagged, key=lambda m: m[0]):
        yield t, [x + (k << 40) for x in p], o, s


@dataclass(frozen=True)
class AuditWorkload:
    """One audit family at one seed: a re-iterable ``Workload`` over ``make(seed)``."""

    family: str
    seed: int
    num_requests: int
    make: Callable[[int, int], Iterator[Made]] = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        return f"{self.family}#{self.seed}"

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "family": self.family, "seed": self.seed,
                "num_requests": self.num_requests, "source": "benchmarks/policy_lab/audit.py"}

    def __iter__(self) -> Iterator[TraceRequest]:
        for i, (t, prompt, out, session) in enumerate(self.make(self.seed, self.num_requests)):
            if i >= self.num_requests:
                return
            yield TraceRequest(f"{self.name}-{i}", t, prompt, out, session)


def _exp(mean_s: float) -> Callable[[random.Random], float]:
    return lambda rng: rng.expovariate(1.0 / mean_s)


def _pareto(scale_s: float, alpha: float, cap_s: float) -> Callable[[random.Random], float]:
    return lambda rng: min(cap_s, scale_s * rng.paretovariate(alpha))


# Regimes of the phase-shift and flip families: sessions that go on (private prompts), or
# single-turn requests on shared system prompts.
_CHATTY = SessionRegime(p_continue=0.8, gap=_exp(20.0), max_turns=8)
_SHARED = SessionRegime(p_continue=0.0, gap=_exp(20.0), num_system_prompts=40, zipf=1.1)


def memoryless(seed: int, n: int) -> Iterator[Made]:
    regime = SessionRegime(p_continue=0.6, gap=_exp(30.0), num_system_prompts=4, max_turns=10**6)
    return _sessions(seed, n, 0.5, lambda _: regime)


def heavy_tail(seed: int, n: int) -> Iterator[Made]:
    regime = SessionRegime(p_continue=0.75, gap=_pareto(5.0, 1.1, 6 * 3600.0),
                           num_system_prompts=4)
    return _sessions(seed, n, 0.5, lambda _: regime)


def phase_shift(seed: int, n: int) -> Iterator[Made]:
    return _sessions(seed, n, 0.5, lambda made: _CHATTY if made < n // 2 else _SHARED)


def flip(seed: int, n: int) -> Iterator[Made]:
    epoch = 300
    return _sessions(seed, n, 0.5, lambda made: _CHATTY if (made // epoch) % 2 == 0 else _SHARED)


def scan_hot(seed: int, n: int) -> Iterator[Made]:
    return _one_shots(seed, n, 1.0, share_hot=0.3, num_hot=12, hot_tokens=(500, 2000),
                      suffix_tokens=(1, 32), cold_tokens=(500, 3000))


def zipf_system(seed: int, n: int) -> Iterator[Made]:
    return _one_shots(seed, n, 1.0, share_hot=1.0, num_hot=300, hot_tokens=(300, 2000),
                      suffix_tokens=(50, 400), cold_tokens=(1, 1), zipf=1.1)


def doc_qa(seed: int, n: int) -> Iterator[Made]:
    # Questions on one 16k-token document and two of 4k (shares 0.6 / 0.2 / 0.2, a one-off
    # question of 16-100 tokens each), half the traffic, over one-shot background prompts.
    rng = random.Random(seed)
    docs = [(16000, 0.6), (4000, 0.2), (4000, 0.2)]
    tokens = _Tokens()
    texts = [tokens.fresh(size) for size, _ in docs]
    cum = list(itertools.accumulate(share for _, share in docs))

    def questions(_: int, m: int) -> Iterator[Made]:
        t = 0.0
        for _ in range(m):
            t += rng.expovariate(0.5)
            k = _zipf_pick(rng, cum)
            yield t, texts[k] + tokens.fresh(rng.randint(16, 100)), rng.randint(20, 200), None

    return _merge(questions(seed, n),
                  _one_shots(seed + 1, n, 0.5, share_hot=0.0, num_hot=0, hot_tokens=(1, 1),
                             suffix_tokens=(1, 1), cold_tokens=(500, 4000)))


FAMILIES: dict[str, Callable[[int, int], Iterator[Made]]] = {
    "memoryless": memoryless, "scan-hot": scan_hot, "zipf-system": zipf_system,
    "doc-qa": doc_qa, "heavy-tail": heavy_tail, "phase-shift": phase_shift, "flip": flip,
}


def family(name: str, seed: int = 0, num_requests: int = 1500) -> AuditWorkload:
    """The audit family ``name`` at ``seed``. Raises ValueError naming a family it lacks."""
    try:
        make = FAMILIES[name]
    except KeyError:
        raise ValueError(f"audit family must be one of {sorted(FAMILIES)}, got {name!r}") from None
    return AuditWorkload(name, seed, num_requests, make)


class Window:
    """Requests ``start .. start + num_requests`` of a workload, arrivals from 0."""

    def __init__(self, inner: Workload, start: int, num_requests: int) -> None:
        self.inner, self.start, self.num_requests = inner, start, num_requests

    @property
    def name(self) -> str:
        return f"{self.inner.name}@{self.start}"

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "inner": self.inner.describe(), "start": self.start,
                "num_requests": self.num_requests}

    def __iter__(self) -> Iterator[TraceRequest]:
        first: float | None = None
        for r in itertools.islice(iter(self.inner), self.start, self.start + self.num_requests):
            if first is None:
                first = r.arrival_s
            yield replace(r, arrival_s=r.arrival_s - first)
