"""ModelEngine: the scheduler, the manager, real copies and the reference model, one step
at a time.

Each ``step()``::

    scheduler.step()          admit, chunk, grow, preempt; the manager records its copies
    transfer.submit(plan)     the step's copies (offload, onboard, partial copy), batched
    forward                   each context chunk, then each decode, through the block
                              tables; layer i first waits for layer i's copies (on CUDA a
                              stream wait: the CPU never blocks, later layers still copy)
    scheduler.update          greedy tokens from the last position of each sampling request

The manager never executes copies: the scheduler takes the step's plan from it, and the
plan is executed here, once, as a whole.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvtier.manager import KVCacheManager
from kvtier.model.llama import LlamaModel
from kvtier.remote.tier import RemoteTier
from kvtier.scheduler import Request, ScheduledStep, Scheduler
from kvtier.transfer.engine import TransferError
from kvtier.transfer.torch_engine import TorchTransferEngine


@dataclass(slots=True)
class RequestResult:
    """What a request produced. ``logits`` maps each position the engine computed (prompt
    positions not reused, and every decode) to its logits, when recording is on."""

    request_id: str
    prompt: list[int]
    output: list[int] = field(default_factory=list)
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    num_preemptions: int = 0
    finished: bool = False


class ModelEngine:
    """Drives ``model`` with ``scheduler`` over the GPU storage of ``transfer``."""

    def __init__(self, model: LlamaModel, manager: KVCacheManager, scheduler: Scheduler,
                 transfer: TorchTransferEngine, record_logits: bool = False,
                 remote: RemoteTier | None = None) -> None:
        if scheduler.manager is not manager:
            raise ValueError("scheduler must run on the given manager")
        layout = transfer.gpu.layout
        if (layout.tokens_per_block != manager.config.tokens_per_block
                or transfer.gpu.num_blocks < manager.config.num_gpu_blocks):
            raise ValueError(f"GPU storage ({transfer.gpu.num_blocks} blocks of "
                             f"{layout.tokens_per_block} tokens) does not fit the manager's "
                             f"{manager.config.num_gpu_blocks} blocks of "
                             f"{manager.config.tokens_per_block}")
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
        self.num_steps = 0
        self.num_failed_steps = 0
        # CPU seconds of the last step's scheduling and transfer submission.
        self.last_step_seconds: dict[str, float] = {}
        self._wait_layer: Callable[[int], None] | None = None

    def add_request(self, request: Request) -> None:
        """Queue ``request`` (see ``Scheduler.add_request``)."""
        self.scheduler.add_request(request)
        self.results[request.request_id] = RequestResult(request.request_id,
                                                         list(request.prompt))

    def step(self) -> tuple[ScheduledStep, list[Request]]:
        """Run one forward pass; returns the schedule and the requests it finished."""
        t0 = time.perf_counter()
        if self.remote is not None:
            self._fetch_remote()
        step = self.scheduler.step()
        t1 = time.perf_counter()
        if self.remote is not None and self.remote.write_policy == "write-back":
            self.remote.write_spilled()  # before the plan may overwrite their slots
        try:
            handle = self.transfer.submit(step.transfer_plan)
            self._wait_layer = functools.partial(self.transfer.wait, handle)
        except TransferError as exc:
            # Degrade to recompute: the manager drops what the failed copies would have
            # filled and aborts the requests that needed it; they go back to the queue.
            aborted = self.manager.transfer_failed(step.transfer_plan, exc.failed_indices)
            step = self.scheduler.requeue_failed(step, aborted)
            self.num_failed_steps += 1
            self.transfer.synchronize_all()
            self._wait_layer = None
        self.last_step_seconds = {"schedule": t1 - t0, "submit": time.perf_counter() - t1}
        last_logits: dict[str, torch.Tensor] = {}
        running = self.scheduler.running
        for chunk in step.context_chunks:
            req = running[chunk.request_id]
            end = chunk.first_token + chunk.num_tokens
            logits = self._forward(req, req.tokens[chunk.first_token:end], chunk.first_token)
            if end == req.num_prefill_tokens:
                last_logits[req.request_id] = logits[-1]
                if self.remote is not None and self.remote.write_policy == "write-through":
                    self.remote.write(req.tokens[:end],
                                      self.manager.block_table(req.request_id),
                                      salt=req.salt, lora_id=req.lora_id)
        for rid in step.decode_request_ids:
            req = running[rid]
            tokens = req.tokens
            last_logits[rid] = self._forward(req, tokens[-1:], len(tokens) - 1)[-1]
        sampled: dict[str, int] = {}
        if last_logits:
            ids = list(last_logits)
            tokens_out = torch.stack([last_logits[r] for r in ids]).argmax(-1).tolist()
            sampled = dict(zip(ids, tokens_out, strict=True))
        for rid in step.preempted_request_ids:
            self.results[rid].num_preemptions += 1
        finished = self.scheduler.update(step, sampled)
        for req in finished:
            result = self.results[req.request_id]
            result.output = list(req.output)
            result.finished = True
        self.num_steps += 1
        return step, finished

    def _fetch_remote(self) -> None:
        """Start a remote fetch for each newly waiting request and hold it back; release
        those whose fetch arrived or timed out. If nothing else can run, wait for one."""
        remote, scheduler = self.remote, self.scheduler
        assert remote is not None
        for req in scheduler.waiting:
            if req.request_id not in self._fetched:
                self._fetched.add(req.request_id)
                if remote.start_fetch(req.request_id, req.tokens, req.salt, req.lora_id):
                    scheduler.hold(req.request_id)
        for rid in remote.poll():
            scheduler.release(rid)
        if not scheduler.running and remote.num_waiting and remote.num_waiting == len(
                scheduler.waiting):
            remote.wait(remote.fetch_deadline_s)
            for rid in remote.poll():
                scheduler.release(rid)

    def run(self, max_steps: int = 100_000) -> dict[str, RequestResult]:
        """Step until every request finished (and, with a remote tier, its writes landed);
        raises RuntimeError after ``max_steps``."""
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished():
                if self.remote is not None:
                    self.remote.flush(30.0)
                return self.results
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
