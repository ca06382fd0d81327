"""A step scheduler that budgets ``max_num_tokens`` with the reuse each request really gets.

Each ``step()`` fills one forward pass, in this order::

    1. decode    every running request past its prefill computes one token; its next block
                 is allocated first (guaranteed_no_evict: from its reservation; max_utilization:
                 on shortage the newest running request is preempted and requeued)
    2. prefill   requests part way through a chunked prefill get their next chunk
    3. admit     waiting requests, in arrival order, each credited with its lookup() reuse:
                 compute = min(prompt - reuse, chunk cap, budget left); then one two-phase
                 add_sequence_batch admits them (claim mode), so the credit is exact and
                 num_scheduled_tokens <= max_num_tokens on every step

``admission="probe"`` keeps the legacy loop (estimate every candidate with lookup, then
admit one by one) only to measure the race: reuse lost between estimate and admission is
computed anyway and counted as overflow, never hidden.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from kvtier.admission import PrefixMatch
from kvtier.config import check_priority
from kvtier.manager import KVCacheManager
from kvtier.sequence import SequenceSpec
from kvtier.transfer.engine import TransferEngine
from kvtier.transfer.plan import TransferOp, TransferPlan

CAPACITY_POLICIES = ("guaranteed_no_evict", "max_utilization")
ADMISSIONS = ("claim", "probe")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Budgets and policies of a :class:`Scheduler`.

    ``max_chunk_tokens`` caps one request's prefill chunk (``None``: the whole budget).
    A waiting request skipped for ``max_skipped_steps`` steps stops later requests from
    being admitted ahead of it, which bounds its wait.
    """

    max_num_tokens: int = 8192
    max_batch_size: int = 256
    enable_chunked_prefill: bool = True
    max_chunk_tokens: int | None = None
    capacity_policy: str = "guaranteed_no_evict"
    admission: str = "claim"
    max_skipped_steps: int = 64

    def __post_init__(self) -> None:
        for name in ("max_num_tokens", "max_batch_size", "max_skipped_steps"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        cap = self.max_chunk_tokens
        if cap is not None and (type(cap) is not int or cap < 1):
            raise ValueError(f"max_chunk_tokens must be an integer >= 1 or None, got {cap!r}")
        if self.capacity_policy not in CAPACITY_POLICIES:
            raise ValueError(f"capacity_policy must be one of {CAPACITY_POLICIES}, "
                             f"got {self.capacity_policy!r}")
        if self.admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {ADMISSIONS}, got {self.admission!r}")
        if type(self.enable_chunked_prefill) is not bool:
            raise ValueError(
                f"enable_chunked_prefill must be a bool, got {self.enable_chunked_prefill!r}")


MAX_TOKEN_ID = (1 << 63) - 1  # token ids are int64 (block hashing packs them)


@dataclass(slots=True)
class Request:
    """A request as the scheduler tracks it. ``output`` holds the tokens sampled so far.

    Every field is validated when the request is built and again by
    :meth:`Scheduler.add_request` (a dataclass can be changed in between): ``prompt`` is a
    non-empty sequence of token ids ``0 <= id < 2**63`` (any sequence but ``str``/``bytes``;
    the request keeps a list copy, so changing the caller's list later has no effect),
    ``max_output_tokens`` an int >= 1, ``arrival_s`` a finite number; ``salt``, ``lora_id``,
    ``priority`` and ``retention_s`` as :class:`SequenceSpec` takes them. ``bool`` is never
    taken for a number.
    """

    request_id: str
    prompt: list[int]
    max_output_tokens: int
    arrival_s: float = 0.0
    salt: bytes | str | int | None = None
    lora_id: int | None = None
    priority: int | None = None
    retention_s: float | None = None
    output: list[int] = field(default_factory=list)
    num_prefill_tokens: int = 0  # tokens its current admission prefills
    num_computed_tokens: int = 0
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        self.prompt, self.output = check_request(self)

    @property
    def tokens(self) -> list[int]:
        """The prompt and the output so far (a new list). After a preemption this is what
        the request prefills again."""
        return self.prompt + self.output

    @property
    def in_prefill(self) -> bool:
        return self.num_computed_tokens < self.num_prefill_tokens


def check_token_ids(tokens: object, what: str, allow_empty: bool = False) -> list[int]:
    """A new list of the token ids in ``tokens``; ValueError naming ``what`` and the first
    bad index unless it is a sequence (not ``str``/``bytes``) of ints in ``0..2**63-1``."""
    if isinstance(tokens, (str, bytes, bytearray)) or not isinstance(tokens, Sequence):
        raise ValueError(f"{what} must be a list of token ids, got {type(tokens).__name__}")
    ids: list[int] = list(tokens)
    if not ids:
        if allow_empty:
            return ids
        raise ValueError(f"{what} must not be empty")
    # NOTE: two C-level passes (types, then range) keep this cheap on long prompts; only a
    # list that fails them is scanned in Python to name the offending index.
    if set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) <= MAX_TOKEN_ID:
        return ids
    for index, token in enumerate(ids):
        if type(token) is not int:
            raise ValueError(f"{what}: token at index {index} must be an int, got {token!r}")
        if not 0 <= token <= MAX_TOKEN_ID:
            raise ValueError(f"{what}: token at index {index} must be in 0..2**63-1, "
                             f"got {token}")
    raise AssertionError("unreachable")  # pragma: no cover


def _is_finite(value: object) -> bool:
    """A finite int or float, never a bool (an int too large for a float is not finite)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_request(req: Request) -> tuple[list[int], list[int]]:
    """Validate every field of ``req``; return copies of its prompt and output. Pure."""
    rid = req.request_id
    if type(rid) is not str or not rid:
        raise ValueError(f"request_id must be a non-empty str, got {rid!r}")
    what = f"request {rid!r}"
    prompt = check_token_ids(req.prompt, f"prompt of {what}")
    output = check_token_ids(req.output, f"output of {what}", allow_empty=True)
    n = req.max_output_tokens
    if type(n) is not int or n < 1:
        raise ValueError(f"max_output_tokens of {rid!r} must be an integer >= 1, got {n!r}")
    if not _is_finite(req.arrival_s):
        raise ValueError(f"arrival_s of {what} must be a finite number, got {req.arrival_s!r}")
    if req.salt is not None and (isinstance(req.salt, bool)
                                 or not isinstance(req.salt, (bytes, str, int))):
        raise ValueError(f"salt of {what} must be bytes, str, int or None, got {req.salt!r}")
    if req.lora_id is not None and type(req.lora_id) is not int:
        raise ValueError(f"lora_id of {what} must be an int or None, got {req.lora_id!r}")
    if req.priority is not None:
        check_priority(f"priority of {what}", req.priority)
    r = req.retention_s
    if r is not None and (not _is_finite(r) or r < 0):
        raise ValueError(f"retention_s of {what} must be a finite number >= 0 or None, "
                         f"got {r!r}")
    for name in ("num_prefill_tokens", "num_computed_tokens", "num_preemptions"):
        value = getattr(req, name)
        if type(value) is not int or value < 0:
            raise ValueError(f"{name} of {what} must be an integer >= 0, got {value!r}")
    return prompt, output


class ContextChunk(NamedTuple):
    """``num_tokens`` prompt tokens from ``first_token`` are computed this step;
    ``num_reused_tokens`` (first chunk only) came from the cache."""

    request_id: str
    first_token: int
    num_tokens: int
    num_reused_tokens: int


class ScheduledStep(NamedTuple):
    """One forward pass: what to compute, and the copies to run before it."""

    context_chunks: tuple[ContextChunk, ...]
    decode_request_ids: tuple[str, ...]
    num_scheduled_tokens: int
    transfer_plan: TransferPlan
    preempted_request_ids: tuple[str, ...]
    num_credited_tokens: int  # reuse promised at admission, by lookup
    num_reused_tokens: int  # reuse the admissions got
    num_overflow_tokens: int  # tokens past max_num_tokens (probe mode only)


class _StepCollector:
    """Sits between the manager and the real engine; keeps this step's ops."""

    def __init__(self, inner: TransferEngine) -> None:
        self.inner = inner
        self.ops: list[TransferOp] = []

    def submit(self, plan: TransferPlan) -> None:
        self.ops.extend(plan.ops)
        self.inner.submit(plan)

    def take(self) -> TransferPlan:
        plan = TransferPlan(tuple(self.ops))
        self.ops = []
        return plan


class Scheduler:
    """Admits, chunks, grows and preempts requests on top of a :class:`KVCacheManager`."""

    def __init__(self, manager: KVCacheManager, config: SchedulerConfig | None = None) -> None:
        self.manager = manager
        self.config = config if config is not None else SchedulerConfig()
        self._collector = _StepCollector(manager.engine)
        manager.engine = self._collector
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}  # admission order: newest last
        # Per waiting request: what it prefills when admitted (the prompt, and after a
        # preemption the output so far), validated once; and since when it waits.
        self._specs: dict[str, SequenceSpec] = {}
        self._queued_at: dict[str, int] = {}
        self._held: set[str] = set()  # waiting requests not to admit yet (see hold)
        self._num_steps = 0
        self._lookups: dict[str, tuple[int, PrefixMatch]] = {}
        self._tpb = manager.config.tokens_per_block
        self.num_lookups = 0

    # ---- queries ---------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _chunk_cap(self) -> int:
        cfg = self.config
        if not cfg.enable_chunked_prefill:
            return 1 << 62
        return cfg.max_chunk_tokens or cfg.max_num_tokens

    def _lookup(self, spec: SequenceSpec) -> PrefixMatch:
        """``manager.lookup``, kept while the manager's version says nothing changed."""
        version = self.manager.version
        cached = self._lookups.get(spec.request_id)
        if cached is not None and cached[0] == version:
            return cached[1]
        self.num_lookups += 1
        m = self.manager.lookup_spec(spec)
        self._lookups[spec.request_id] = (version, m)
        return m

    def hold(self, request_id: str) -> None:
        """Keep a waiting request out of admission until ``release`` (e.g. while its prefix
        is fetched from a remote tier)."""
        if request_id in self._specs:
            self._held.add(request_id)

    def release(self, request_id: str) -> None:
        """Let a held request be admitted again."""
        self._held.discard(request_id)

    def _spec_of(self, req: Request) -> SequenceSpec:
        """What ``req`` prefills when admitted: its prompt, and after a preemption the
        output so far. Raises ValueError (nothing changed) if the manager refuses it."""
        tokens = req.tokens if req.output else req.prompt
        return SequenceSpec(req.request_id, tokens, salt=req.salt, lora_id=req.lora_id,
                            priority=req.priority, retention_s=req.retention_s)

    def _enqueue(self, req: Request, spec: SequenceSpec, first: bool) -> None:
        self._specs[req.request_id] = spec
        self._queued_at[req.request_id] = self._num_steps
        if first:
            self.waiting.appendleft(req)
        else:
            self.waiting.append(req)

    # ---- commands --------------------------------------------------------------------

    def add_request(self, req: Request) -> None:
        """Queue a request; raises ValueError, queueing nothing, if a field is invalid (see
        :class:`Request`), its id is already queued or running, or it could never fit the
        GPU pool."""
        prompt, output = check_request(req)
        rid = req.request_id
        if rid in self.running or rid in self._specs:
            raise ValueError(f"request_id {rid!r} is already queued or running")
        total = len(prompt) + req.max_output_tokens
        blocks = -(-total // self._tpb)
        capacity = self.manager.config.num_gpu_blocks
        if blocks > capacity:
            raise ValueError(f"request {rid!r} needs {blocks} blocks for {total} tokens, "
                             f"num_gpu_blocks is {capacity}")
        req.prompt, req.output = prompt, output  # private copies: the caller's lists may change
        spec = self._spec_of(req)
        self._enqueue(req, spec, first=False)

    def step(self) -> ScheduledStep:
        """Schedule one forward pass."""
        self.manager.begin_step()
        try:
            return self._step()
        finally:
            self.manager.end_step()

    def _step(self) -> ScheduledStep:
        cfg = self.config
        self._num_steps += 1
        budget = cfg.max_num_tokens
        slots = cfg.max_batch_size
        preempted: list[str] = []
        decodes: list[str] = []
        chunks: list[ContextChunk] = []

        # 1. Decode: one token each, its block allocated before anything is admitted.
        todo = [(req.request_id, req.output[-1]) for req in self.running.values()
                if req.num_computed_tokens >= req.num_prefill_tokens][:min(budget, slots)]
        while todo:
            done = self.manager.append_token_batch(todo)
            decodes += [rid for rid, _ in todo[:done]]
            todo = todo[done:]
            if todo:  # no block for todo[0]: preempt the newest running request
                assert cfg.capacity_policy == "max_utilization", (
                    f"{todo[0][0]!r} ran out of reserved blocks")
                victim = next(reversed(self.running.values()))
                self._preempt(victim)
                preempted.append(victim.request_id)
                todo = [item for item in todo if item[0] != victim.request_id]
        budget -= len(decodes)
        slots -= len(decodes)

        # 2. Continue chunked prefills.
        cap = self._chunk_cap()
        for req in self.running.values():
            if budget == 0 or slots == 0:
                break
            remaining = req.num_prefill_tokens - req.num_computed_tokens
            if remaining <= 0:
                continue
            n = min(remaining, cap, budget)
            self.manager.schedule_prefill(req.request_id, n)
            chunks.append(ContextChunk(req.request_id, req.num_computed_tokens, n, 0))
            budget -= n
            slots -= 1

        # 3. Admit waiting requests.
        credited = reused = overflow = 0
        if budget and slots and self.waiting:
            admit = self._admit_claim if cfg.admission == "claim" else self._admit_probe
            new_chunks, credited, reused, overflow = admit(budget, slots)
            chunks += new_chunks
        num_tokens = len(decodes) + sum(c.num_tokens for c in chunks)
        if cfg.admission == "claim":
            assert num_tokens <= cfg.max_num_tokens, (num_tokens, cfg.max_num_tokens)
        else:
            overflow = max(0, num_tokens - cfg.max_num_tokens)
        return ScheduledStep(tuple(chunks), tuple(decodes), num_tokens, self._collector.take(),
                             tuple(preempted), credited, reused, overflow)

    def _preempt(self, req: Request) -> None:
        """Release ``req`` (its computed blocks stay cached) and requeue it first."""
        # NOTE: the spec is built before anything changes, so a refusal leaves the request
        # running: a request is never in neither queue.
        spec = self._spec_of(req)
        # The token it was about to decode is not computed: keep it out of the cache.
        self.manager.remove_sequence(req.request_id)
        del self.running[req.request_id]
        req.num_preemptions += 1
        req.num_computed_tokens = req.num_prefill_tokens = 0
        self._enqueue(req, spec, first=True)

    def _candidates(self, budget: int, slots: int) -> list[tuple[Request, list[int], int, int]]:
        """Waiting requests to try, in order, with their credited reuse and first chunk.

        A request that fits no budget left is skipped, not waited on (no head-of-line
        blocking), unless it was skipped ``max_skipped_steps`` times: then nothing behind it
        is tried until it is admitted.
        """
        cap = self._chunk_cap()
        tpb = self._tpb
        # A batch must fit an empty pool (else the manager refuses it); and there is no use
        # in asking for more blocks than are free or evictable now.
        footprint = self.manager.config.num_gpu_blocks
        free = self.manager.num_free_gpu_blocks
        out = []
        held = self._held
        for req in self.waiting:
            if budget == 0 or slots == 0:
                break
            if held and req.request_id in held:
                continue
            spec = self._specs[req.request_id]
            tokens = spec.tokens
            m = self._lookup(spec)
            compute = len(tokens) - m.num_tokens
            n = min(compute, cap, budget)
            if n < compute and not self.config.enable_chunked_prefill:
                n = 0
            blocks = -(-len(tokens) // tpb)
            need = blocks - m.num_gpu_tokens // tpb + self._reserve(req, tokens)
            if n > 0 and blocks <= footprint and need <= free:
                out.append((req, tokens, m.num_tokens, n))
                budget -= n
                slots -= 1
                footprint -= blocks
                free -= need
            if self._num_steps - self._queued_at[req.request_id] > self.config.max_skipped_steps:
                break  # it has waited long enough: nobody behind it goes first
        return out

    def _reserve(self, req: Request, tokens: list[int]) -> int:
        """Blocks to set aside for ``req``'s decode (guaranteed_no_evict only)."""
        if self.config.capacity_policy != "guaranteed_no_evict":
            return 0
        final = len(req.prompt) + req.max_output_tokens
        return -(-final // self._tpb) - -(-len(tokens) // self._tpb)

    def _spec(self, req: Request, tokens: list[int], num_new: int) -> SequenceSpec:
        return self._specs[req.request_id].with_schedule(num_new, self._reserve(req, tokens))

    def _admit_claim(self, budget: int,
                     slots: int) -> tuple[list[ContextChunk], int, int, int]:
        """Admit with exact credit: lookups, then one two-phase batch. Budget that a
        rejected request leaves (no blocks for it) goes to the next candidates, for a few
        rounds."""
        chunks: list[ContextChunk] = []
        credited = reused = 0
        rejected: set[str] = set()
        for _ in range(4):
            candidates = [c for c in self._candidates(budget, slots)
                          if c[0].request_id not in rejected]
            if not candidates:
                break
            specs = [self._spec(req, tokens, n) for req, tokens, _, n in candidates]
            admissions = self.manager.add_sequence_batch(specs)
            for (req, tokens, credit, n), adm in zip(candidates, admissions):
                if not adm.admitted:
                    rejected.add(req.request_id)
                    continue
                credited += credit
                reused += adm.num_reused_tokens
                chunks.append(self._start(req, len(tokens), adm.num_reused_tokens, n))
                budget -= n
                slots -= 1
            if not rejected or budget == 0 or slots == 0:
                break
        return chunks, credited, reused, 0

    def _admit_probe(self, budget: int,
                     slots: int) -> tuple[list[ContextChunk], int, int, int]:
        candidates = self._candidates(budget, slots)
        chunks: list[ContextChunk] = []
        credited = reused = 0
        for req, tokens, credit, n in candidates:
            # Reuse lost since the estimate must be computed now: the chunk grows. (The
            # manager admits one request exactly; the race is between these calls.)
            now = self.manager.lookup_spec(self._specs[req.request_id]).num_tokens
            n_actual = max(1, min(len(tokens) - now, n + credit - now))
            adm = self.manager.add_sequence(self._spec(req, tokens, n_actual))
            if not adm.admitted:
                continue
            assert adm.num_reused_tokens == now
            credited += credit
            reused += adm.num_reused_tokens
            chunks.append(self._start(req, len(tokens), now, n_actual))
        return chunks, credited, reused, 0

    def _start(self, req: Request, num_prefill: int, num_reused: int,
               num_tokens: int) -> ContextChunk:
        self.waiting.remove(req)
        self._lookups.pop(req.request_id, None)
        del self._specs[req.request_id]
        del self._queued_at[req.request_id]
        self._held.discard(req.request_id)
        self.running[req.request_id] = req
        req.num_prefill_tokens = num_prefill
        req.num_computed_tokens = num_reused
        return ContextChunk(req.request_id, num_reused, num_tokens, num_reused)

    def update(self, step: ScheduledStep, sampled: dict[str, int]) -> list[Request]:
        """Apply a finished forward pass: advance prefills, record sampled tokens (for every
        decode and every completed prefill), finish requests that reached their output
        length. Returns the finished requests. Raises ValueError, changing nothing, if a
        request that samples has no valid token in ``sampled``."""
        running = self.running
        samplers = [rid for rid in step.decode_request_ids if rid in running]
        for chunk in step.context_chunks:
            req = running.get(chunk.request_id)
            if req is not None and chunk.first_token + chunk.num_tokens >= req.num_prefill_tokens:
                samplers.append(chunk.request_id)
        for rid in samplers:
            token = sampled.get(rid)
            if type(token) is not int or not 0 <= token <= MAX_TOKEN_ID:
                raise ValueError(f"sampled token of {rid!r} must be an int in 0..2**63-1, "
                                 f"got {token!r}")
        finished = []
        for chunk in step.context_chunks:
            req = running.get(chunk.request_id)
            if req is None:
                continue
            req.num_computed_tokens = chunk.first_token + chunk.num_tokens
            if not req.in_prefill:
                req.output.append(sampled[req.request_id])
                if len(req.output) >= req.max_output_tokens:
                    finished.append(req)
        for rid in step.decode_request_ids:
            req = running.get(rid)
            if req is None:
                continue
            output = req.output
            output.append(sampled[rid])
            if len(output) >= req.max_output_tokens:
                finished.append(req)
        for req in finished:
            self.manager.remove_sequence(req.request_id)
            del self.running[req.request_id]
        return finished

    def requeue_failed(self, step: ScheduledStep, request_ids: Iterable[str]) -> ScheduledStep:
        """After ``manager.transfer_failed`` aborted ``request_ids``: put them back at the
        front of the queue, in the order they were admitted, to recompute, and return
        ``step`` without their work."""
        gone = set(request_ids)
        # NOTE: ordered by the running table (admission order), never by the set, whose
        # order depends on PYTHONHASHSEED: the queue order decides what is admitted next.
        requeued = [req for rid, req in self.running.items() if rid in gone]
        specs = [self._spec_of(req) for req in requeued]  # may raise: nothing changed yet
        for req, spec in zip(reversed(requeued), reversed(specs)):
            del self.running[req.request_id]
            req.num_computed_tokens = req.num_prefill_tokens = 0
            self._enqueue(req, spec, first=True)
        chunks = tuple(c for c in step.context_chunks if c.request_id not in gone)
        decodes = tuple(r for r in step.decode_request_ids if r not in gone)
        num = len(decodes) + sum(c.num_tokens for c in chunks)
        return step._replace(context_chunks=chunks, decode_request_ids=decodes,
                             num_scheduled_tokens=num)

    def abort(self, request_ids: Iterable[str]) -> None:
        """Drop requests wherever they are; their computed blocks stay cached."""
        for rid in request_ids:
            if rid in self.running:
                self.manager.remove_sequence(rid)
                del self.running[rid]
            elif rid in self._specs:
                self.waiting = deque(r for r in self.waiting if r.request_id != rid)
                del self._specs[rid]
                del self._queued_at[rid]
                self._held.discard(rid)
            self._lookups.pop(rid, None)
