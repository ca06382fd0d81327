"""Held-out workload families: principles of real serving traffic no policy was tuned on.

The eighth session's audit (``benchmarks/policy_lab/audit.py``) built seven families; these
are eight more, each from one principle the audit lacks. A policy that learns from the
stream must stay within noise of LRU where there is nothing to learn, and should not lose
where what it learns from (a run's class and age) means something else:

    tenants    multi-tenant LoRA: the same system prompts under eight adapters, each
               adapter salting its key space (same text, distinct blocks); each tenant's
               sessions have their own pace and chance to continue, one class for all
    rag        retrieval-augmented prompts: a system prompt, then 3-5 of 400 Zipf-popular
               documents in the order of that request's ranking, then a question; the same
               document is a hit only behind the same documents before it
    fewshot    few-shot prompts: a task's instruction, then 4 of its 12 examples, half the
               time in the task's template order, half drawn and shuffled
    book-qa    long single-shot contexts: questions on 24 books of 8k-48k tokens (Zipf),
               one reused run worth up to 1,500 blocks, a cache that holds a few
    bursty     flash crowds: sessions arrive in 30-second bursts (each burst on one new
               prompt 70 % of its sessions share, never used after) between idle gaps of
               about five minutes; ages in seconds run on through the silence
    parallel   parallel sampling and tree search: every prompt is sent as 4 branches at
               once; the best one or two branches go on a few seconds later, the rest end
    tiny       very short prompts: one-off requests of 4-40 tokens and short sessions
               whose turns add 5-30 tokens; most of every prompt is a partial block
    irm        the stationary control (independent reference model): each request one of
               200 fixed prompts by a fixed Zipf(0.8) law, Poisson arrivals, no sessions:
               nothing changes with time, so nothing is to be learned from age

Every family is deterministic for its seed and re-iterable (a ``Workload``); token ids come
from a counter (distinct content, distinct ids; a tenant's salt is a 2^40 offset). A
follow-up turn's prompt holds its predecessor's output as fresh tokens, as in
``kvtier.sim.SyntheticChat`` and the audit. Priorities and retention set by the caller
(TensorRT-LLM's semantics) are not a family: a replayed request carries none.
``benchmarks/bench_policy.py --heldout`` replays them.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from kvtier.reprs import shown
from kvtier.sim._checks import check_int, keep_plain_ints
from kvtier.sim.workload import TraceRequest

# A request as a generator makes it: (arrival s, prompt, output tokens, session id).
Made = tuple[float, list[int], int, "str | None"]
SALT_SHIFT = 40
"""A tenant's (adapter's) token ids are offset by ``tenant << SALT_SHIFT``: its own key space."""


class _Tokens:
    """Fresh token ids from a counter: distinct content has distinct ids."""

    def __init__(self) -> None:
        self._next = itertools.count(1)

    def fresh(self, num_tokens: int) -> list[int]:
        return list(itertools.islice(self._next, num_tokens))


def _zipf_table(num: int, exponent: float) -> list[float]:
    return list(itertools.accumulate(1.0 / (k + 1) ** exponent for k in range(num)))


def _pick(rng: random.Random, cum: list[float]) -> int:
    """An index drawn with the weights whose running sums ``cum`` holds."""
    return bisect.bisect_left(cum, rng.random() * cum[-1], 0, len(cum) - 1)


class _Sessions:
    """Turns that come back: a heap of (arrival, order, session id, prompt, output)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str, list[int], int]] = []
        self._order = itertools.count()

    def push(self, at_s: float, session: str, prompt: list[int], output: int) -> None:
        heapq.heappush(self._heap, (at_s, next(self._order), session, prompt, output))

    def due(self, before_s: float) -> bool:
        return bool(self._heap) and self._heap[0][0] <= before_s

    def pop(self) -> Made:
        t, _, session, prompt, output = heapq.heappop(self._heap)
        return t, prompt, output, session


def tenants(seed: int, n: int) -> Iterator[Made]:
    rng = random.Random(seed)
    tokens = _Tokens()
    num_tenants = 8
    # Each tenant's own pace (mean gap 5-120 s, log-uniform) and chance to continue.
    pace = [(5.0 * 24.0 ** rng.random(), rng.uniform(0.3, 0.85)) for _ in range(num_tenants)]
    tenant_cum = _zipf_table(num_tenants, 1.0)
    systems = [tokens.fresh(rng.randint(300, 1500)) for _ in range(4)]
    system_cum = _zipf_table(len(systems), 1.0)
    turns = _Sessions()
    t_new = rng.expovariate(0.5)
    for i in range(n):
        if turns.due(t_new):
            t, prompt, out, session = turns.pop()
            tenant = int(str(session).split("/")[0][1:])
        else:
            t, t_new = t_new, t_new + rng.expovariate(0.5)
            tenant = _pick(rng, tenant_cum)
            salt = tenant << SALT_SHIFT
            head = [x + salt for x in systems[_pick(rng, system_cum)]]
            prompt = head + [x + salt for x in tokens.fresh(rng.randint(100, 800))]
            out, session = rng.randint(50, 300), f"t{tenant}/s{i}"
        yield t, prompt, out, session
        gap_s, p_continue = pace[tenant]
        if rng.random() < p_continue:
            salt = tenant << SALT_SHIFT
            more = [x + salt for x in tokens.fresh(out + rng.randint(30, 300))]
            turns.push(t + rng.expovariate(1.0 / gap_s), str(session), prompt + more,
                       rng.randint(50, 300))


def rag(seed: int, n: int) -> Iterator[Made]:
    rng = random.Random(seed)
    tokens = _Tokens()
    systems = [tokens.fresh(rng.randint(200, 400)) for _ in range(2)]
    docs: dict[int, list[int]] = {}
    doc_cum = _zipf_table(400, 0.9)
    turns = _Sessions()
    t_new = rng.expovariate(1.0)
    for i in range(n):
        if turns.due(t_new):
            t, prompt, out, session = turns.pop()
        else:
            t, t_new = t_new, t_new + rng.expovariate(1.0)
            picked: list[int] = []
            while len(picked) < rng.randint(3, 5):  # a ranking: distinct, in its order
                d = _pick(rng, doc_cum)
                if d not in picked:
                    picked.append(d)
            prompt = list(systems[i % 2])
            for d in picked:
                if d not in docs:
                    docs[d] = tokens.fresh(rng.randint(300, 800))
                prompt += docs[d]
            prompt += tokens.fresh(rng.randint(20, 100))
            out, session = rng.randint(50, 300), f"s{i}"
        yield t, prompt, out, session
        if rng.random() < 0.3:  # a follow-up question on the same retrieved context
            turns.push(t + rng.expovariate(1.0 / 40.0), str(session),
                       prompt + tokens.fresh(out + rng.randint(20, 100)), rng.randint(50, 300))


def fewshot(seed: int, n: int) -> Iterator[Made]:
    rng = random.Random(seed)
    tokens = _Tokens()
    num_tasks, num_examples, num_shots = 6, 12, 4
    instructions = [tokens.fresh(rng.randint(100, 300)) for _ in range(num_tasks)]
    examples = [[tokens.fresh(rng.randint(80, 250)) for _ in range(num_examples)]
                for _ in range(num_tasks)]
    task_cum = _zipf_table(num_tasks, 1.0)
    t = 0.0
    for _ in range(n):
        t += rng.expovariate(1.0)
        task = _pick(rng, task_cum)
        if rng.random() < 0.5:  # the task's template: its first examples in order
            shots = list(range(num_shots))
        else:
            shots = rng.sample(range(num_examples), num_shots)
        prompt = list(instructions[task])
        for k in shots:
            prompt += examples[task][k]
        yield t, prompt + tokens.fresh(rng.randint(20, 200)), rng.randint(20, 200), None


def book_qa(seed: int, n: int) -> Iterator[Made]:
    rng = random.Random(seed)
    tokens = _Tokens()
    books: dict[int, list[int]] = {}
    sizes = [rng.randint(8000, 48000) for _ in range(24)]
    book_cum = _zipf_table(len(sizes), 1.0)
    turns = _Sessions()
    t_new = rng.expovariate(0.2)
    for i in range(n):
        if turns.due(t_new):
            t, prompt, out, session = turns.pop()
        else:
            t, t_new = t_new, t_new + rng.expovariate(0.2)
            b = _pick(rng, book_cum)
            if b not in books:
                books[b] = tokens.fresh(sizes[b])
            prompt = books[b] + tokens.fresh(rng.randint(20, 200))
            out, session = rng.randint(50, 300), f"s{i}"
        yield t, prompt, out, session
        if rng.random() < 0.4:
            turns.push(t + rng.expovariate(1.0 / 60.0), str(session),
                       prompt + tokens.fresh(out + rng.randint(20, 200)), rng.randint(50, 300))


def bursty(seed: int, n: int) -> Iterator[Made]:
    rng = random.Random(seed)
    tokens = _Tokens()
    systems = [tokens.fresh(rng.randint(300, 1500)) for _ in range(4)]
    system_cum = _zipf_table(len(systems), 1.0)
    turns = _Sessions()
    burst_end = 30.0
    crowd = tokens.fresh(rng.randint(500, 2000))  # the prompt of the burst t_new is in
    t_new = rng.expovariate(2.0)
    for i in range(n):
        if turns.due(t_new):
            t, prompt, out, session = turns.pop()
        else:
            t = t_new
            head = crowd if rng.random() < 0.7 else systems[_pick(rng, system_cum)]
            prompt = head + tokens.fresh(rng.randint(50, 400))
            out, session = rng.randint(50, 300), f"s{i}"
            t_new = t + rng.expovariate(2.0)
            if t_new > burst_end:  # silence, then the next burst on a prompt of its own
                t_new = burst_end + rng.expovariate(1.0 / 300.0)
                burst_end = t_new + 30.0
                crowd = tokens.fresh(rng.randint(500, 2000))
        yield t, prompt, out, session
        if rng.random() < 0.6:
            turns.push(t + rng.expovariate(1.0 / 30.0), str(session),
                       prompt + tokens.fresh(out + rng.randint(30, 300)), rng.randint(50, 300))


def parallel(seed: int, n: int) -> Iterator[Made]:
    rng = random.Random(seed)
    tokens = _Tokens()
    num_branches = 4
    systems = [tokens.fresh(rng.randint(300, 1500)) for _ in range(4)]
    system_cum = _zipf_table(len(systems), 1.0)
    # (arrival, order, tree id, depth, prompt): a node of a tree sent as its branches.
    nodes: list[tuple[float, int, str, int, list[int]]] = []
    order = itertools.count()
    t_new = rng.expovariate(0.25)
    made = 0
    while made < n:
        if nodes and nodes[0][0] <= t_new:
            t, _, tree, depth, prompt = heapq.heappop(nodes)
        else:
            t, tree, depth = t_new, f"s{made}", 1
            t_new += rng.expovariate(0.25)
            prompt = systems[_pick(rng, system_cum)] + tokens.fresh(rng.randint(100, 800))
        outs = [rng.randint(50, 300) for _ in range(num_branches)]
        for out in outs[:n - made]:
            yield t, prompt, out, tree
            made += 1
        if depth < 4 and rng.random() < 0.6:  # the best one or two branches go on
            for out in outs[:rng.randint(1, 2)]:
                heapq.heappush(nodes, (t + rng.uniform(2.0, 10.0), next(order), tree,
                                       depth + 1,
                                       prompt + tokens.fresh(out + rng.randint(30, 200))))


def tiny(seed: int, n: int) -> Iterator[Made]:
    rng = random.Random(seed)
    tokens = _Tokens()
    systems = [tokens.fresh(rng.randint(20, 60)) for _ in range(3)]
    turns = _Sessions()
    t_new = rng.expovariate(2.0)
    for i in range(n):
        if turns.due(t_new):
            t, prompt, out, session = turns.pop()
        else:
            t, t_new = t_new, t_new + rng.expovariate(2.0)
            if rng.random() < 0.7:  # a one-off below a block or about one
                yield t, tokens.fresh(rng.randint(4, 40)), rng.randint(5, 60), None
                continue
            prompt = systems[rng.randrange(3)] + tokens.fresh(rng.randint(5, 30))
            out, session = rng.randint(5, 40), f"s{i}"
        yield t, prompt, out, session
        if rng.random() < 0.7:
            turns.push(t + rng.expovariate(1.0 / 20.0), str(session),
                       prompt + tokens.fresh(out + rng.randint(5, 30)), rng.randint(5, 40))


def irm(seed: int, n: int) -> Iterator[Made]:
    rng = random.Random(seed)
    tokens = _Tokens()
    prompts = [tokens.fresh(rng.randint(200, 2000)) for _ in range(200)]
    cum = _zipf_table(len(prompts), 0.8)
    t = 0.0
    for _ in range(n):
        t += rng.expovariate(1.0)
        yield t, prompts[_pick(rng, cum)], rng.randint(20, 200), None


FAMILIES: dict[str, Callable[[int, int], Iterator[Made]]] = {
    "tenants": tenants, "rag": rag, "fewshot": fewshot, "book-qa": book_qa,
    "bursty": bursty, "parallel": parallel, "tiny": tiny, "irm": irm,
}


@dataclass(frozen=True, slots=True)
class HeldOutWorkload:
    """One held-out family at one seed, ``num_requests`` long: a re-iterable ``Workload``."""

    family: str
    seed: int = 0
    num_requests: int = 1500
    _make: Callable[[int, int], Iterator[Made]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # NOTE: a str first: a list was a TypeError (unhashable) naming no field.
        if not isinstance(self.family, str) or self.family not in FAMILIES:
            raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {shown(self.family)}")
        keep_plain_ints(self, "seed", "num_requests")
        check_int("seed", self.seed, 0)
        check_int("num_requests", self.num_requests, 1)
        object.__setattr__(self, "_make", FAMILIES[self.family])

    @property
    def name(self) -> str:
        return f"{self.family}#{self.seed}"

    def describe(self) -> dict[str, object]:
        """JSON-ready: the family, its seed and length."""
        return {"name": self.name, "kind": "heldout", "family": self.family,
                "seed": self.seed, "num_requests": self.num_requests}

    def __iter__(self) -> Iterator[TraceRequest]:
        made = self._make(self.seed, self.num_requests)
        for i, (t, prompt, out, session) in enumerate(itertools.islice(made, self.num_requests)):
            yield TraceRequest(f"{self.name}-{i}", t, prompt, out, session)
