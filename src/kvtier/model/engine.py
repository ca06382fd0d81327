"""ModelEngine: the scheduler, the manager, real copies and the reference model, one step
at a time.

Each ``step()``::

    scheduler.step()          admit, chunk, grow, preempt; the manager records its copies
    transfer.submit(plan)     the step's copies (offload, onboard, partial copy), batched
    forward                   each context chunk, then each decode, through the block
                              tables; layer i first waits for layer i's copies (on CUDA a
                              stream wait: the CPU never blocks, later layers still copy)
    sample                    the last position of each sampling request: greedy, or the
                              request's own Sampler; a stop token or stop check ends it early
    scheduler.update          append the tokens, finish requests (first tokens stamped)
    write-through             with a remote tier: the full blocks of each prompt completed
                              in this step, read from their GPU slots now, off the TTFT
                              path but before the next step's plan may reuse those slots

The manager never executes copies: the scheduler takes the step's plan from it, and the
plan is executed here, once, as a whole.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import logging
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch

from kvtier.counts import as_integer
from kvtier.manager import KVCacheManager
from kvtier.model.llama import LlamaModel
from kvtier.model.sampling import Sampler
from kvtier.remote.tier import RemoteTier
from kvtier.reprs import shown
from kvtier.request import check_request
from kvtier.scheduler import Request, ScheduledStep, Scheduler
from kvtier.sequence import MultimodalItem
from kvtier.storage import KVLayout
from kvtier.transfer.engine import TransferError
from kvtier.transfer.torch_engine import TorchTransferEngine
from kvtier.wiring import Wired

# Whether a request's output so far (the newest token last) ends it.
StopFn = Callable[[Sequence[int]], bool]
StopReason = Literal["length", "stop_token", "stop", "abort", "error"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RequestResult:
    """What a request produced. ``logits`` maps each position the engine computed (prompt
    positions not reused, and every decode) to its logits, when recording is on.

    The prompt's first admission that ran (not a readmission after a preemption in its
    prefill, which reuses what it computed itself; but the readmission of one whose
    copies or forward pass failed in its admission's step, which got nothing), split by
    where its tokens came from (for a request queued with output, what it prefills: its
    prompt and that output)::

        prompt  [ reused from GPU | host | remote | computed ]
                                    '-- onboarded -'

    ``num_remote_tokens`` were fetched from the remote tier into host blocks for this
    request (then onboarded like the host's). ``added_s`` / ``first_token_s`` are
    ``time.perf_counter()`` readings: queued, and first token sampled.
    """

    request_id: str
    prompt: list[int]
    output: list[int] = field(default_factory=list)
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    num_preemptions: int = 0
    finished: bool = False
    stop_reason: StopReason | None = None
    num_gpu_tokens: int = 0
    num_host_tokens: int = 0
    num_remote_tokens: int = 0
    num_computed_tokens: int = 0
    added_s: float = 0.0
    first_token_s: float | None = None
    # Forward passes of this request that raised; at ``ModelEngine.max_forward_faults`` it
    # ends with ``stop_reason`` "error".
    num_forward_faults: int = 0
    # Why the request ended with ``stop_reason`` "error": its sampler or stop function
    # raised or gave no token of the model's vocabulary (``ModelEngine._sample``), or its
    # forward pass failed ``max_forward_faults`` times (``ModelEngine._forward_failed``).
    error: str | None = None

    @property
    def num_reused_tokens(self) -> int:
        return self.num_gpu_tokens + self.num_host_tokens + self.num_remote_tokens

    @property
    def num_onboarded_tokens(self) -> int:
        return self.num_host_tokens + self.num_remote_tokens

    @property
    def ttft_s(self) -> float | None:
        """Seconds from queueing to the first sampled token (``None``: none yet). Pure."""
        return None if self.first_token_s is None else self.first_token_s - self.added_s


class _Computed(NamedTuple):
    """A prompt computed to its end in this step, with the blocks that hold it; the first
    ``reused_blocks`` it reused (in the remote store already where the tier wrote or
    fetched them: ``RemoteTier.write``)."""

    request_id: str
    tokens: list[int]
    block_table: list[int]
    salt: bytes | str | int | None
    lora_id: int | None
    mm_items: tuple[MultimodalItem, ...]
    reused_blocks: int


class _Executed(NamedTuple):
    """A step's outcome up to the scheduler's update (``ModelEngine._execute``)."""

    step: ScheduledStep
    sampled: dict[str, int]
    stopped: set[str]
    given_up: dict[str, str]
    computed: list[_Computed]


def sampled_token(token: object) -> int:
    """What a sampler answered, as a token id: an integer scalar (an ``int``, a NumPy
    integer, a one-element integer tensor); TypeError naming it otherwise (a bool, a float,
    a float or bool tensor, a tensor of several values). Pure.

    NOTE: a NumPy integer (``np.argmax``'s answer, which every other entry takes as a
    token) ended the request with an error, while a tensor of any dtype went through
    ``int()``: 7.9 sampled token 7, True token 1, without a word."""
    if isinstance(token, torch.Tensor):
        if token.numel() == 1 and not (token.is_floating_point() or token.is_complex()
                                       or token.dtype == torch.bool):
            return int(token.item())
    elif isinstance(token, numbers.Integral) and not isinstance(token, bool):
        return int(token)
    raise TypeError(f"sample returned {shown(token)}, not an int")


def check_kv_layout(what: str, layout: KVLayout, model_layout: KVLayout) -> None:
    """ValueError naming ``what`` and both unless a storage of ``layout`` holds the blocks a
    model of ``model_layout`` reads and writes (``KVLayout.model_shape``, and the same
    tensor-parallel shard). Pure."""
    if (layout.model_shape != model_layout.model_shape
            or (layout.tp_rank, layout.tp_size) != (model_layout.tp_rank, model_layout.tp_size)):
        raise ValueError(f"{what} holds {_blocks(layout)}, the model computes "
                         f"{_blocks(model_layout)}")


def _blocks(layout: KVLayout) -> str:
    """What a block of ``layout`` holds, in words. Pure."""
    heads = layout.kv_head_slice
    held = f"{layout.num_kv_heads} KV heads"
    if layout.tp_size > 1:
        held = (f"KV heads {heads.start}..{heads.stop - 1} of {held} (rank {layout.tp_rank} "
                f"of {layout.tp_size})")
    return (f"{layout.num_layers} layers of {held} of head_dim {layout.head_dim} in "
            f"{layout.dtype}")


class ModelEngine(Wired):
    """Drives ``model`` with ``scheduler`` over the GPU storage of ``transfer``.

    A request whose forward pass raises ``max_forward_faults`` times ends with an error (a
    fault that repeats, such as a prompt no memory can hold, must not requeue it for ever;
    an int >= 1). NOTE: under tensor parallelism (``TensorParallelLeader``) a pass that
    fails on one rank leaves the ranks' collectives out of step: not recoverable there."""

    WIRED = frozenset({"model", "manager", "scheduler", "transfer", "kv", "remote"})

    def __init__(self, model: LlamaModel, manager: KVCacheManager, scheduler: Scheduler,
                 transfer: TorchTransferEngine, record_logits: bool = False,
                 remote: RemoteTier | None = None, max_forward_faults: int = 3) -> None:
        faults = as_integer(max_forward_faults)
        if faults is None or faults < 1:
            raise ValueError(f"max_forward_faults must be an int >= 1, got "
                             f"{shown(max_forward_faults)}")
        self.max_forward_faults = faults
        if scheduler.manager is not manager:
            raise ValueError("scheduler must run on the given manager")
        config = manager.config
        for name, storage, num_blocks in (("GPU", transfer.gpu, config.num_gpu_blocks),
                                          ("host", transfer.host, config.num_host_blocks)):
            # NOTE: a host storage short of the manager's host pool failed every plan that
            # offloaded past its end (each step's requests requeued); one of another model's
            # shape failed every forward pass.
            if not num_blocks:
                continue
            if storage is None:
                raise ValueError(f"the manager has {num_blocks} {name} blocks but the "
                                 f"transfer engine no {name} storage")
            layout = storage.layout
            if (layout.tokens_per_block != config.tokens_per_block
                    or storage.num_blocks < num_blocks):
                raise ValueError(f"{name} storage ({storage.num_blocks} blocks of "
                                 f"{layout.tokens_per_block} tokens) does not fit the "
                                 f"manager's {num_blocks} blocks of {config.tokens_per_block}")
            shape = (model.config.num_layers, model.config.head_dim)
            if (layout.num_layers, layout.head_dim) != shape:
                raise ValueError(f"{name} storage holds {layout.num_layers} layers of "
                                 f"head_dim {layout.head_dim}, the model {shape[0]} of "
                                 f"{shape[1]}")
            # NOTE: the KV heads and the dtype were not compared: a bfloat16 storage under a
            # float32 model failed every forward pass (each request ended with an error
            # after three), one of more heads than the model's took its K/V broadcast.
            check_kv_layout(f"{name} storage", layout, model.kv_layout(config.tokens_per_block))
        if remote is not None and remote.manager is not manager:
            raise ValueError("the remote tier must run on the given manager (it imports into "
                             "that manager's host tier)")
        if remote is not None and (remote.gpu is not transfer.gpu
                                   or remote.host is not transfer.host):
            # NOTE: a write stored the other storage's bytes under this prompt's hashes, for
            # every engine to fetch; a fetch filled host slots the engine never read.
            raise ValueError("the remote tier must move the transfer engine's own gpu and "
                             "host storages, not other tensors")
        self.model = model
        self.manager = manager
        self.scheduler = scheduler
        self.transfer = transfer
        self.kv = transfer.gpu
        self.record_logits = record_logits
        # A shared remote tier: waiting requests fetch their prefix from it, computed
        # prompts are written to it.
        self.remote = remote
        self._fetched: set[str] = set()
        self.results: dict[str, RequestResult] = {}
        self._samplers: dict[str, Sampler] = {}
        self._stops: dict[str, StopFn] = {}
        # Requests whose sampler or stop function faulted this step: they end at its update.
        self._faulted: dict[str, str] = {}
        # Per waiting request not admitted yet: the tokens its own remote fetch imported.
        self._admitted: set[str] = set()  # requests whose first admission is recorded
        self._remote_tokens: dict[str, int] = {}
        # Per running request in prefill: the full blocks its admission reused (with
        # write-through, the store has them: only the blocks after them are written).
        self._reused_blocks: dict[str, int] = {}
        self.num_steps = 0
        self.num_failed_steps = 0
        self.num_failed_forwards = 0  # forward passes that raised (``_forward_failed``)
        self.num_failed_writes = 0  # write-throughs that raised (``_write_through``)
        # CPU seconds of the last step's scheduling and transfer submission.
        self.last_step_seconds: dict[str, float] = {}
        self._wait_layer: Callable[[int], None] | None = None
        # Whether the last step submitted copies the CPU has not waited for (see ``step``).
        self._copies_unwaited = False

    def add_request(self, request: Request, sampler: Sampler | None = None,
                    stop: StopFn | None = None) -> None:
        """Queue ``request`` (see ``Scheduler.add_request``). Its tokens are greedy unless
        ``sampler`` picks them; it ends early at ``sampler``'s stop tokens or when ``stop``
        says so (else after ``max_output_tokens``). Raises ValueError or TypeError, queueing
        nothing, for what the scheduler refuses, a token id the model has no embedding for
        (past its ``vocab_size``), a prompt and ``max_output_tokens`` past the model's
        context (``_check_context``), a ``sampler`` that is no :class:`Sampler` or a ``stop``
        that is not callable."""
        # NOTE: checked before anything is queued: past this point each fails in the middle
        # of a step, between the scheduler's step and its update, and no later step runs.
        if sampler is not None and not isinstance(sampler, Sampler):
            raise TypeError(f"sampler must be a Sampler or None, got {type(sampler).__name__}")
        if stop is not None and not callable(stop):
            raise TypeError(f"stop must be a callable or None, got {type(stop).__name__}")
        if isinstance(request, Request):
            # The scheduler checks the request again; its token ids are ints from here.
            prompt, output, _ = check_request(request)
            self._check_vocab(request.request_id, prompt, output)
            self._check_context(request.request_id, len(prompt), request.max_output_tokens)
        self.scheduler.add_request(request)
        rid = request.request_id
        self.results[rid] = RequestResult(rid, list(request.prompt),
                                          added_s=time.perf_counter())
        if sampler is not None:
            self._samplers[rid] = sampler
        if stop is not None:
            self._stops[rid] = stop

    def abort(self, request_id: str) -> RequestResult | None:
        """Drop a queued or running request (``Scheduler.abort``): what its applied steps
        computed stays cached; its result is kept, finished with ``stop_reason`` "abort"
        and the output so far. None where no request of that id is queued or running. A
        remote fetch in flight for it lands in the cache for others. Raises TypeError for
        an id that is no str."""
        if type(request_id) is str and not self._owns(request_id):
            self._refuse_foreign(request_id)
        req = self.scheduler.abort(request_id)
        return None if req is None else self._finish(req, "abort")

    def _owns(self, request_id: str) -> bool:
        """Whether ``request_id`` is a request this engine queued and has not finished. Pure."""
        result = self.results.get(request_id)
        return result is not None and not result.finished

    def _refuse_foreign(self, request_id: str) -> None:
        """RuntimeError if the scheduler holds ``request_id`` (which this engine did not
        queue: ``_owns`` is False). Pure.

        NOTE: a request queued on the scheduler past the engine (a second engine over the
        same scheduler, ``Scheduler.add_request``) has no result here: a step ran it and
        raised KeyError after the scheduler's update, and so did every later step; an abort
        dropped it from the scheduler, then raised."""
        scheduler = self.scheduler
        if request_id in scheduler.running or any(
                r.request_id == request_id for r in scheduler.waiting):
            raise RuntimeError(f"request {shown(request_id)} is queued on this engine's scheduler "
                               "but was not added through this engine (ModelEngine."
                               "add_request): another engine's, or Scheduler.add_request's; "
                               "abort it there")

    def _finish(self, req: Request, reason: StopReason, error: str | None = None
                ) -> RequestResult:
        """``req`` is done (finished, aborted, given up): its result takes its output so
        far, ``reason`` (and ``error``); the engine forgets what it kept for it."""
        result = self.results[req.request_id]
        result.output = list(req.output)
        result.finished = True
        result.stop_reason = reason
        if error is not None:
            result.error = error
        self._forget(req.request_id)
        return result

    def _forget(self, request_id: str) -> None:
        """Drop what the engine keeps for a request that is done (finished or aborted): a
        finished id may be queued again, as a new request that fetches like any other."""
        for table in (self._samplers, self._stops, self._remote_tokens, self._reused_blocks):
            table.pop(request_id, None)
        self._fetched.discard(request_id)
        self._admitted.discard(request_id)
        if self.remote is not None:
            # NOTE: an aborted request's fetch in flight held nobody, yet counted as held
            # (``num_waiting``): the engine no longer waited for fetches when idle, it spun.
            self.remote.cancel_fetch(request_id)

    def _check_vocab(self, request_id: str, prompt: list[int], output: list[int]) -> None:
        """ValueError naming the request, the field and the index of the first token id
        outside the model's vocabulary. Pure."""
        vocab_size = self.model.config.vocab_size
        for name, tokens in (("prompt", prompt), ("output", output)):
            if tokens and max(tokens) >= vocab_size:
                bad = next(i for i, t in enumerate(tokens) if t >= vocab_size)
                raise ValueError(f"{name} of request {shown(request_id)}: token id {tokens[bad]} "
                                 f"at index {bad} is past the model's vocabulary of "
                                 f"{vocab_size}")

    def _check_context(self, request_id: str, num_prompt_tokens: int,
                       max_output_tokens: int) -> None:
        """ValueError naming the request and the numbers if its prompt and output would pass
        the model's context (``max_position_embeddings``): the last output token is sampled
        at position ``prompt + max_output_tokens - 2``. Pure.

        NOTE: such a request was queued: the forward pass that passed the context raised,
        the request recomputed its prompt and output twice more and then ended with
        stop_reason "error"; under tensor parallelism the same refusal ended every worker's
        ``serve``, and the leader's next command waited on ranks that were gone."""
        limit = self.model.config.max_position_embeddings
        num_positions = num_prompt_tokens + max_output_tokens - 1
        if limit is not None and num_positions > limit:
            raise ValueError(f"request {shown(request_id)}: a prompt of {num_prompt_tokens} "
                             f"tokens and max_output_tokens {max_output_tokens} need "
                             f"{num_positions} positions, past the model's maximum context "
                             f"of {limit}")

    def step(self) -> tuple[ScheduledStep, list[Request]]:
        """Run one forward pass; returns the schedule and the requests it finished. Raises
        RuntimeError, running nothing, while the scheduler holds a request this engine did
        not queue (``add_request``): it would have no result to fill."""
        scheduler = self.scheduler
        for req in itertools.chain(scheduler.waiting, scheduler.running.values()):
            if not self._owns(req.request_id):
                self._refuse_foreign(req.request_id)
        t0 = time.perf_counter()
        if self.remote is not None:
            if self._copies_unwaited:
                # NOTE: the remote tier reads host slots on the CPU (write-back spills,
                # whose offloads earlier plans ran) and writes them (imports, into slots an
                # earlier plan's onboards may have read). Only the GPU waited for the last
                # plan's copies (a forward pass, layer by layer); the CPU, only where it
                # read a result back (sampling) and never after a step whose passes all
                # failed or that ran none: on CUDA those copies could still be in flight,
                # and the store was handed half-written blocks, an onboard read an
                # imported block's bytes.
                self.transfer.synchronize_all()
                self._copies_unwaited = False
            self._fetch_remote()
        scheduled = self.scheduler.step()
        # NOTE: counted before the step runs: one given up (``_abandon``) has preempted them
        # too, and its requests' results counted nothing.
        for rid in scheduled.preempted_request_ids:
            self.results[rid].num_preemptions += 1
        step, sampled, stopped, given_up, computed = self._execute(scheduled, t0)
        finished = self.scheduler.update(step, sampled, stopped)
        now = time.perf_counter()
        for rid in sampled:
            result = self.results[rid]
            if result.first_token_s is None:
                result.first_token_s = now
        for req in finished:
            self._finish(req, self.results[req.request_id].stop_reason or "length")
        for rid, error in given_up.items():
            gone = self.scheduler.abort(rid)
            assert gone is not None  # requeued above
            self._finish(gone, "error", error)
            finished.append(gone)
        if computed:
            self._write_through(computed)
        self.num_steps += 1
        return step, finished

    def _execute(self, step: ScheduledStep, t0: float) -> _Executed:
        """The scheduler's ``step`` up to its update: its copies submitted, its forward
        passes run (those that raise degrade to recompute), its tokens sampled.

        NOTE: anything raised here (a KeyboardInterrupt in a forward pass, a caller's
        sampler or stop function raising a BaseException) left the step unapplied: every
        later step was refused ('step() called before update()'), the engine (a notebook's
        Generator) dead. The step is now given up first (``_abandon``), then it raises."""
        plan_done = False
        drawn: dict[str, Sampler] = {}  # each sampler as it was before this step drew
        try:
            t1 = time.perf_counter()
            if self.remote is not None and self.remote.write_policy == "write-back":
                self.remote.write_spilled()  # before the plan may overwrite their slots
            try:
                handle = self.transfer.submit(step.transfer_plan)
                self._wait_layer = functools.partial(self.transfer.wait, handle)
                self._copies_unwaited = len(step.transfer_plan) > 0
            except Exception as exc:
                # Degrade to recompute: the manager drops what the failed copies would have
                # filled and aborts the requests that needed it; they go back to the queue. A
                # TransferError names what failed; any other fault of an engine (a CUDA error,
                # a driver call refused, an OSError or a ValueError of a caller's engine)
                # leaves every op of the plan in doubt.
                plan = step.transfer_plan
                failed = (exc.failed_in(plan) if isinstance(exc, TransferError)
                          else list(range(len(plan))))
                aborted = self.manager.transfer_failed(plan, failed)
                step = self.scheduler.requeue_failed(step, aborted)
                self.num_failed_steps += 1
                self.transfer.synchronize_all()
                self._wait_layer = None
            plan_done = True
            self.last_step_seconds = {"schedule": t1 - t0,
                                      "submit": time.perf_counter() - t1}
            last_logits: dict[str, torch.Tensor] = {}
            running = self.scheduler.running
            computed: list[_Computed] = []  # prompts completed here, to write through
            writes_through = (self.remote is not None
                              and self.remote.write_policy == "write-through")
            broken: dict[str, Exception] = {}  # forward passes that raised
            tpb = self.manager.config.tokens_per_block
            for chunk in step.context_chunks:
                req = running[chunk.request_id]
                end = chunk.first_token + chunk.num_tokens
                if writes_through and chunk.first_token == chunk.num_reused_tokens:
                    # An admission's first chunk (a later chunk starts past a reuse of 0).
                    self._reused_blocks[req.request_id] = chunk.num_reused_tokens // tpb
                try:
                    logits = self._forward(req, req.tokens[chunk.first_token:end],
                                           chunk.first_token)
                except Exception as exc:
                    broken[req.request_id] = exc
                    continue
                if end == req.num_prefill_tokens:
                    last_logits[req.request_id] = logits[-1]
                    if writes_through:
                        # The block table as of now: update may finish the request and free
                        # it.
                        computed.append(_Computed(
                            req.request_id, req.tokens[:end],
                            self.manager.block_table(req.request_id), req.salt, req.lora_id,
                            req.mm_items, self._reused_blocks.pop(req.request_id, 0)))
            for rid in step.decode_request_ids:
                req = running[rid]
                tokens = req.tokens
                try:
                    last_logits[rid] = self._forward(req, tokens[-1:], len(tokens) - 1)[-1]
                except Exception as exc:
                    broken[rid] = exc
            given_up: dict[str, str] = {}
            if broken:
                step, given_up = self._forward_failed(step, broken)
                kept = set(step.decode_request_ids)
                kept.update(c.request_id for c in step.context_chunks)
                last_logits = {rid: x for rid, x in last_logits.items() if rid in kept}
                computed = [c for c in computed if c.request_id in kept]
            sampled = self._sample(last_logits, drawn)
            stopped = self._stopped(sampled)
        except BaseException:
            self._abandon(step, plan_done, drawn)
            raise
        # NOTE: once the step's failed copies and passes took their requests out of it:
        # noted as the step began, a request whose onboard failed kept its first
        # admission's promised split (8 reused, 4 from the host) though it recomputed,
        # and its readmission, the one that ran, was never noted.
        self._note_admissions(step)
        return _Executed(step, sampled, stopped, given_up, computed)

    def _abandon(self, step: ScheduledStep, plan_done: bool,
                 drawn: dict[str, Sampler]) -> None:
        """``step`` (the scheduler's latest, not applied) raised before its update: give it
        up so the next step can run. Its copies, if not all submitted (``plan_done``), are
        reported failed; its requests recompute as if their forward passes had failed
        (``compute_failed``: what they were to compute leaves the cache), back at the front
        of the queue; the step is applied without them, and the samplers that drew in it
        are put back as they were before (``drawn``). A fault in doing so is logged: the
        exception the step raised is the one the caller sees.

        NOTE: a seeded sampler kept the draw of the step given up: the recomputed position
        drew the next number, and every later token of the request was another than a run
        never interrupted gives."""
        for rid, sampler in drawn.items():
            if rid in self._samplers:
                self._samplers[rid] = sampler
        try:
            self._wait_layer = None
            self.transfer.synchronize_all()
            if not plan_done:
                plan = step.transfer_plan
                aborted = self.manager.transfer_failed(plan, list(range(len(plan))))
                step = self.scheduler.requeue_failed(step, aborted)
            ids = [c.request_id for c in step.context_chunks]
            ids += [rid for rid in step.decode_request_ids if rid not in ids]
            aborted = self.manager.compute_failed(ids)
            for rid in aborted:
                self._faulted.pop(rid, None)
            self.scheduler.update(self.scheduler.requeue_failed(step, aborted), {})
        except Exception:
            logger.exception("kvtier: a step that raised could not be given up; the "
                             "scheduler may refuse the next")

    def _forward_failed(self, step: ScheduledStep, failed: dict[str, Exception]
                        ) -> tuple[ScheduledStep, dict[str, str]]:
        """The forward passes of ``failed`` raised (a CUDA out-of-memory, a kernel fault):
        degrade them to recompute. The manager drops what they were to compute (stored for
        reuse at the step's end, never written) and the scheduler puts them back at the
        front of the queue; the others' work goes on. A request whose forward pass has now
        failed ``max_forward_faults`` times is given up: returns the step without the
        requeued requests' work, and the given-up ones with their error, to end."""
        given_up = {}
        for rid, exc in failed.items():
            result = self.results[rid]
            result.num_forward_faults += 1
            logger.error("kvtier: the forward pass of request %r raised %s: %s (fault %d of "
                         "%d: %s)", rid, type(exc).__name__, exc, result.num_forward_faults,
                         self.max_forward_faults,
                         "given up" if result.num_forward_faults >= self.max_forward_faults
                         else "it recomputes", exc_info=(type(exc), exc, exc.__traceback__))
            if result.num_forward_faults >= self.max_forward_faults:
                given_up[rid] = f"forward pass: {type(exc).__name__}: {exc}"
        aborted = self.manager.compute_failed(list(failed))
        self.num_failed_forwards += len(failed)
        return self.scheduler.requeue_failed(step, aborted), given_up

    def _write_through(self, computed: list[_Computed]) -> None:
        """Write the full blocks of the prompts this step completed to the remote tier,
        but for the blocks of the prefix each reused that the tier wrote when they were
        computed or fetched from the store (a shared system prompt is not written again by
        every request; a conversation's last answer, decoded and never written, is).

        NOTE: after the first tokens are stamped, so the copy out of the GPU is not part of
        TTFT. Their bytes are still the ones this step computed: a finished request's
        blocks were only freed in the books, and no copy or forward pass writes a slot
        before the next step's plan, which may hand them to others. The tier copies the
        bytes out now (the store is written on its I/O thread).

        A write that raises (reading a GPU block failed, a caller's store broke its
        contract) degrades to not writing: the blocks stay local, logged and counted in
        ``num_failed_writes``, and the other prompts are still written. It ran after the
        step was applied: raising here lost the step's finished requests to the caller."""
        assert self.remote is not None
        for c in computed:
            try:
                self.remote.write(c.tokens, c.block_table, salt=c.salt, lora_id=c.lora_id,
                                  mm_items=c.mm_items, reused_blocks=c.reused_blocks)
            except Exception as exc:
                self.num_failed_writes += 1
                logger.error("kvtier: writing a prompt's blocks through to the remote tier "
                             "raised %s: %s; they stay local", type(exc).__name__, exc,
                             exc_info=(type(exc), exc, exc.__traceback__))

    def _sample(self, last_logits: dict[str, torch.Tensor],
                drawn: dict[str, Sampler]) -> dict[str, int]:
        """One token per request: its sampler's, else greedy (in one batched argmax). A
        caller's sampler that raises or gives no token of the vocabulary ends its request
        (``_fault``) with the greedy token, which the step applies: a fault between the
        scheduler's step and its update would leave no later step able to run. Each sampler
        that may draw is copied into ``drawn`` first (a copy draws what it would have), for
        a step given up to put back (``_abandon``)."""
        greedy = [rid for rid in last_logits if rid not in self._samplers]
        argmax: dict[str, int] = {}
        if greedy:
            tokens_out = torch.stack([last_logits[r] for r in greedy]).argmax(-1).tolist()
            argmax = dict(zip(greedy, tokens_out, strict=True))
        out = {}
        vocab_size = self.model.config.vocab_size
        for rid, logits in last_logits.items():
            if rid in argmax:
                out[rid] = argmax[rid]
                continue
            sampler = self._samplers[rid]
            if type(sampler) is not Sampler or sampler.params.temperature:
                # A greedy Sampler draws nothing; a caller's that cannot be copied is only
                # not put back.
                with contextlib.suppress(Exception):
                    drawn[rid] = copy.copy(sampler)
            try:
                token = sampled_token(sampler.sample(logits))
                if not 0 <= token < vocab_size:
                    raise ValueError(f"sample returned {token}, outside the vocabulary of "
                                     f"{vocab_size}")
            except Exception as exc:
                self._fault(rid, "sampler", exc)
                token = int(logits.argmax().item())
            out[rid] = token
        return out

    def _fault(self, request_id: str, what: str, exc: Exception) -> None:
        """``request_id``'s ``what`` (a caller's code) raised: the request ends this step
        with ``stop_reason`` "error" (its output so far kept); the others go on."""
        self._faulted[request_id] = f"{what}: {type(exc).__name__}: {exc}"
        logger.error("kvtier: request %r ends: its %s raised %s: %s", request_id, what,
                     type(exc).__name__, exc, exc_info=(type(exc), exc, exc.__traceback__))

    def _stopped(self, sampled: dict[str, int]) -> set[str]:
        """The requests whose new token is a stop token or completes a stop string, and
        those whose sampler or stop function faulted (``_fault``)."""
        running = self.scheduler.running
        stopped = set()
        for rid, token in sampled.items():
            sampler, stop = self._samplers.get(rid), self._stops.get(rid)
            reason: StopReason | None = None
            if rid not in self._faulted:
                try:
                    if sampler is not None and sampler.stops_at(token):
                        reason = "stop_token"
                    elif stop is not None and stop([*running[rid].output, token]):
                        reason = "stop"
                except Exception as exc:
                    self._fault(rid, "stop check", exc)
            error = self._faulted.pop(rid, None)
            if error is not None:
                reason = "error"
                self.results[rid].error = error
            if reason is not None:
                self.results[rid].stop_reason = reason
                stopped.add(rid)
        return stopped

    def _note_admissions(self, step: ScheduledStep) -> None:
        """Record where the prefill of each request admitted by ``step`` (its first chunk
        ran) came from: the admission's own split (``KVCacheManager.admitted_reuse``), for
        the first admission of each request that ran.

        NOTE: the engine looked each waiting request up before the step and split the
        chunk's reuse by that lookup: the step's own evictions move blocks in between (b's
        second block, on the GPU at the lookup, offloaded by the step and onboarded back:
        it reported 8 GPU tokens where its admission reused 4 GPU + 4 host); and a
        request queued with output, or preempted in its prefill, needed cases of its own."""
        running = self.scheduler.running
        for chunk in step.context_chunks:
            rid = chunk.request_id
            if rid in self._admitted or chunk.first_token != chunk.num_reused_tokens:
                continue
            self._admitted.add(rid)
            result = self.results[rid]
            match = self.manager.admitted_reuse(rid)
            assert match.num_tokens == chunk.num_reused_tokens, (chunk, match)
            num_gpu, num_host = match.num_gpu_tokens, match.num_host_tokens
            remote = min(self._remote_tokens.pop(rid, 0), num_host)
            result.num_gpu_tokens = num_gpu
            result.num_host_tokens = num_host - remote
            result.num_remote_tokens = remote
            result.num_computed_tokens = running[rid].num_prefill_tokens - num_gpu - num_host

    def _fetch_remote(self) -> None:
        """Start a remote fetch for each newly waiting request and hold it back; release
        those whose fetch arrived or timed out. If nothing else can run, wait for one."""
        remote, scheduler = self.remote, self.scheduler
        assert remote is not None
        for req in scheduler.waiting:
            if req.request_id not in self._fetched:
                self._fetched.add(req.request_id)
                if req.skip_reading_prefix_cache:
                    continue  # it reuses nothing: a fetch would only fill the host
                if remote.start_fetch(req.request_id, req.tokens, req.salt, req.lora_id,
                                      req.mm_items):
                    scheduler.hold(req.request_id)
        self._poll_remote()
        if not scheduler.running and remote.num_waiting and remote.num_waiting == len(
                scheduler.waiting):
            remote.wait(remote.fetch_deadline_s)
            self._poll_remote()

    def _poll_remote(self) -> None:
        """Release the held requests whose fetch is over; what each one's own fetch
        imported counts as its remote tokens (``_note_admissions`` caps them by the host
        tokens its admission reuses).

        NOTE: the cache's growth during a fetch was counted: what another request's fetch
        imported (two prompts of one prefix each reported it fetched) or the host gained
        otherwise."""
        assert self.remote is not None
        polled = self.remote.poll_imports()
        tpb = self.manager.config.tokens_per_block
        for rid, num_blocks in polled.imported.items():
            if self._owns(rid):
                self._remote_tokens[rid] = self._remote_tokens.get(rid, 0) + num_blocks * tpb
        for rid in polled.released:
            self.scheduler.release(rid)

    def run(self, max_steps: int = 100_000) -> dict[str, RequestResult]:
        """Step until every request finished (and, with a remote tier, its writes landed);
        raises RuntimeError after ``max_steps`` (ValueError, running nothing, unless it is an
        int >= 0)."""
        steps = as_integer(max_steps)
        if steps is None or steps < 0:
            raise ValueError(f"max_steps must be an int >= 0, got {shown(max_steps)}")
        max_steps = steps
        # NOTE: one check more than steps: what the last step finished is done, not
        # "unfinished after max_steps steps".
        for num_steps in range(max_steps + 1):
            if not self.scheduler.has_unfinished():
                if self.remote is not None:
                    self.remote.flush(30.0)
                return self.results
            if num_steps == max_steps:
                break
            self.step()
        raise RuntimeError(f"requests still unfinished after {max_steps} steps")

    def _forward(self, req: Request, tokens: list[int], start_pos: int) -> torch.Tensor:
        table = self.manager.block_table(req.request_id)
        logits = self.model.forward_chunk(self.kv, table, tokens, start_pos, self._wait_layer)
        if self.record_logits:
            rows = logits.detach().cpu()
            store = self.results[req.request_id].logits
            for i in range(len(tokens)):
                store[start_pos + i] = rows[i]
        return logits
