"""Text generation over the tiers: :class:`Generator` runs prompts and multi-turn
conversations of a real checkpoint through the scheduler, the manager and the transfer
engine, and reports for each turn where its prompt came from (:class:`TurnResult`).

One generator keeps its cache across calls, so a conversation's next turn reuses the last
one's prompt and answer; with small tiers, other conversations push it to the host tier
and it is onboarded back when the conversation returns::

    turn 2 prompt  [ turn 1 prompt | turn 1 answer | new message ]
                     reused (GPU, or host -> onboarded)  computed
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from kvtier.blocks import cdiv
from kvtier.config import CacheConfig, check_priority
from kvtier.manager import KVCacheManager
from kvtier.model.checkpoint import load_model
from kvtier.model.engine import ModelEngine, RequestResult
from kvtier.model.llama import LlamaModel
from kvtier.model.sampling import Sampler, SamplingParams, find_stop
from kvtier.model.tokenizer import Tokenizer, check_messages, load_tokenizer
from kvtier.request import Request, check_token_ids
from kvtier.retention import Retention, RetentionRange
from kvtier.scheduler import Scheduler, SchedulerConfig
from kvtier.sequence import check_retention_type
from kvtier.storage import KVStorage
from kvtier.transfer.torch_engine import TorchTransferEngine

Message = Mapping[str, str]
_DEFAULT_POLICY = CacheConfig().eviction_policy


@dataclass(frozen=True, slots=True)
class TierSizes:
    """The cache a :class:`Generator` runs on. Small by default, so that a second
    conversation already pushes the first to the host tier."""

    tokens_per_block: int = 16
    num_gpu_blocks: int = 64
    num_host_blocks: int = 1024
    max_num_tokens: int = 512
    eviction_policy: str = _DEFAULT_POLICY

    def __post_init__(self) -> None:
        # NOTE: kept as the plain ints the configs read them as (``kvtier.counts``): an
        # ``__index__`` size passed the checks and broke the generator's own arithmetic.
        config = self.cache_config()
        set_ = object.__setattr__
        set_(self, "tokens_per_block", config.tokens_per_block)
        set_(self, "num_gpu_blocks", config.num_gpu_blocks)
        set_(self, "num_host_blocks", config.num_host_blocks)
        set_(self, "max_num_tokens",
             SchedulerConfig(max_num_tokens=self.max_num_tokens).max_num_tokens)

    def cache_config(self) -> CacheConfig:
        """The manager's settings (ValueError naming a bad one). Pure."""
        return CacheConfig(self.tokens_per_block, self.num_gpu_blocks, self.num_host_blocks,
                           eviction_policy=self.eviction_policy)


class GenerationFailed(RuntimeError):
    """A prompt could not be answered: its forward pass failed every time it was tried
    (``ModelEngine.max_forward_faults``), e.g. out of device memory. ``index``: which of
    the call's prompts; ``error``: why, as the engine says."""

    def __init__(self, message: str, index: int = 0, error: str = "") -> None:
        super().__init__(message)
        self.index = index
        self.error = error


class TurnResult(NamedTuple):
    """One request's outcome: its text and tokens, why it stopped, where its prompt's
    tokens came from, and its time to first token."""

    text: str
    output_ids: list[int]
    stop_reason: str
    num_prompt_tokens: int
    num_gpu_tokens: int
    num_host_tokens: int
    num_remote_tokens: int
    num_onboarded_tokens: int
    num_computed_tokens: int
    ttft_s: float

    def summary(self) -> str:
        """The one line printed after each turn. Pure."""
        return (f"[prompt {self.num_prompt_tokens} tok: reused gpu {self.num_gpu_tokens} / "
                f"host {self.num_host_tokens} / remote {self.num_remote_tokens}, onboarded "
                f"{self.num_onboarded_tokens}, computed {self.num_computed_tokens} | "
                f"{len(self.output_ids)} new tok ({self.stop_reason}) | "
                f"TTFT {self.ttft_s * 1000:.1f} ms]")


class Generator:
    """A model and its tokenizer serving requests through a tiered KV cache."""

    def __init__(self, model: LlamaModel, tokenizer: Tokenizer,
                 tiers: TierSizes | None = None) -> None:
        tiers = tiers or TierSizes()
        self.model = model
        self.tokenizer = tokenizer
        self.tiers = tiers
        manager = KVCacheManager(tiers.cache_config())
        scheduler = Scheduler(manager, SchedulerConfig(max_num_tokens=tiers.max_num_tokens))
        layout = model.config.kv_layout(tiers.tokens_per_block)
        gpu = KVStorage(layout, tiers.num_gpu_blocks, model.device)
        host = KVStorage(layout, tiers.num_host_blocks) if tiers.num_host_blocks else None
        self.engine = ModelEngine(model, manager, scheduler, TorchTransferEngine(gpu, host))
        self._ids = itertools.count()

    @classmethod
    def load(cls, path: str | Path, tiers: TierSizes | None = None, dtype: str = "float32",
             device: str | torch.device = "cpu") -> Generator:
        """Model and tokenizer from the checkpoint at ``path``."""
        tokenizer = load_tokenizer(path)
        return cls(load_model(path, dtype, device), tokenizer, tiers)

    @property
    def max_context(self) -> int:
        """The most tokens one request may hold: the model's context, and the GPU pool. Pure."""
        pool = self.tiers.num_gpu_blocks * self.tiers.tokens_per_block
        limit = self.model.config.max_position_embeddings
        return pool if limit is None else min(pool, limit)

    def default_params(self, **overrides: object) -> SamplingParams:
        """Sampling parameters that stop at the tokenizer's EOS ids."""
        fields: dict[str, object] = {"stop_token_ids": self.tokenizer.eos_token_ids}
        fields.update(overrides)
        return SamplingParams(**fields)  # type: ignore[arg-type]

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 retentions: Sequence[Retention | None] | None = None) -> list[TurnResult]:
        """Run the token prompts together until each stops; results in prompt order.
        ``retentions`` (one per prompt, or None) keep parts of a prompt's blocks at other
        priorities (:class:`~kvtier.retention.Retention`). ValueError (nothing queued) if a
        prompt is empty, does not fit ``max_context`` or holds a token id that is no id of
        the model's vocabulary, or if ``retentions`` does not match the prompts (or one a
        prompt cannot take, e.g. a ``decode_start`` past it). A call that raises later (a
        KeyboardInterrupt) leaves none of its prompts queued either."""
        check_params(params)
        if retentions is not None:
            if len(retentions) != len(prompts):
                raise ValueError(f"retentions has {len(retentions)} items for "
                                 f"{len(prompts)} prompts")
            for i, retention in enumerate(retentions):
                if retention is not None:
                    check_retention_type(retention, f"retentions[{i}]")
        limit = self.max_context
        vocab_size = self.model.config.vocab_size
        # NOTE: every prompt is checked before any is queued: the engine refuses a bad one
        # too, but prompts queued before it would stay queued, run by the next call.
        checked = [check_token_ids(ids, f"prompt {i}", allow_empty=True)
                   for i, ids in enumerate(prompts)]
        for i, ids in enumerate(checked):
            if not ids:
                raise ValueError(f"prompt {i} is empty: no token to answer")
            if len(ids) >= limit:
                raise ValueError(f"a prompt of {len(ids)} tokens does not fit the maximum "
                                 f"context of {limit} tokens (model context, GPU pool)")
            if max(ids) >= vocab_size:
                raise ValueError(f"prompt {i} holds token id {max(ids)}, past the model's "
                                 f"vocabulary of {vocab_size}")
        prompts = checked
        engine = self.engine
        rids: list[str] = []
        try:
            for i, ids in enumerate(prompts):
                rid = f"req-{next(self._ids)}"
                # The answer may use what is left of the context, no more.
                max_new = min(params.max_new_tokens, limit - len(ids))
                stop = self._stop_fn(params.stop) if params.stop else None
                retention = retentions[i] if retentions is not None else None
                try:
                    engine.add_request(Request(rid, list(ids), max_new, retention=retention),
                                       Sampler(params), stop)
                except ValueError as exc:  # a retention its prompt cannot take
                    raise ValueError(f"prompt {i}: {exc}") from None
                rids.append(rid)
            engine.run()
        except BaseException:
            # NOTE: a call refused halfway (a retention whose decode_start lies past its
            # prompt) or interrupted (a KeyboardInterrupt in a notebook) left the requests
            # it had queued: the next call ran them too and their results stayed in the
            # engine. They are aborted, and the call changes no queue.
            for rid in rids:
                with contextlib.suppress(RuntimeError):  # a step the engine could not give up
                    engine.abort(rid)
                engine.results.pop(rid, None)
            raise
        results = [engine.results.pop(rid) for rid in rids]
        for i, r in enumerate(results):
            if r.stop_reason == "error":  # its forward pass kept failing (a CUDA OOM)
                raise GenerationFailed(f"prompt {i} could not be answered: {r.error}", i,
                                       r.error or "")
        return [self._result(r, params) for r in results]

    def chat(self, conversations: Sequence[Sequence[Message]], params: SamplingParams,
             system_priority: int | None = None) -> list[TurnResult]:
        """The assistant's next turn in each conversation (run together). With
        ``system_priority`` (0..100) the blocks a conversation's system message fills are
        kept at that priority (e.g. 90: they stay while other blocks at the default 35
        go), the rest of the prompt at the default."""
        check_params(params)
        conversations = check_conversations(conversations)
        prompts = [self.tokenizer.encode_chat(c) for c in conversations]
        if system_priority is None:
            return self.generate(prompts, params)
        system_priority = check_priority("system_priority", system_priority)
        return self.generate(prompts, params, [
            self._system_retention(c, ids, system_priority)
            for c, ids in zip(conversations, prompts, strict=True)])

    def _system_retention(self, conversation: Sequence[Message], ids: Sequence[int],
                          priority: int) -> Retention | None:
        """``priority`` for the tokens of ``conversation``'s system message, as its chat
        template writes them ahead of the rest (the longest prefix the encoding of the
        system message alone shares with ``ids``). None without a system message. Pure."""
        if not conversation or conversation[0].get("role") != "system":
            return None
        # NOTE: without the generation prompt: with it, the system message alone ended in
        # "<|im_start|>assistant", whose first token the next turn's "<|im_start|>user"
        # shares, so the range took one token of the user's turn (and, where the system
        # message filled whole blocks, the first block of the user's turn at its priority).
        alone = self.tokenizer.encode_chat(conversation[:1], add_generation_prompt=False)
        n = 0
        for a, b in zip(alone, ids, strict=False):
            if a != b:
                break
            n += 1
        return Retention((RetentionRange(0, n, priority),)) if n else None

    def _stop_fn(self, stop: Sequence[str]) -> StopCheck:
        return StopCheck(self.tokenizer, tuple(stop))

    def _result(self, r: RequestResult, params: SamplingParams) -> TurnResult:
        output = list(r.output)
        text = (_before_stop(self.tokenizer, output, params.stop) if r.stop_reason == "stop"
                else self.tokenizer.decode(output))
        assert r.ttft_s is not None
        return TurnResult(text, output, r.stop_reason or "length", len(r.prompt),
                          r.num_gpu_tokens, r.num_host_tokens, r.num_remote_tokens,
                          r.num_onboarded_tokens, r.num_computed_tokens, r.ttft_s)

    def num_blocks(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.tiers.tokens_per_block)


def check_params(params: object) -> None:
    """TypeError unless ``params`` is a :class:`SamplingParams`. Pure.

    NOTE: a dict or None was read as one: AttributeError ('dict' object has no attribute
    'max_new_tokens') out of the middle of ``generate``."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")


def check_conversations(conversations: object) -> list[list[Mapping[str, str]]]:
    """``conversations`` as lists of messages (``check_messages``); ValueError naming the
    conversation, the message and the key of the first that is none. Pure."""
    if isinstance(conversations, str | bytes | Mapping) or not isinstance(conversations,
                                                                         Iterable):
        raise ValueError(f"conversations must be a sequence of conversations (each a sequence "
                         f"of messages), got {type(conversations).__name__}")
    return [check_messages(c, f"conversation {i}") for i, c in enumerate(conversations)]


def _before_stop(tokenizer: Tokenizer, output: list[int], stop: Sequence[str]) -> str:
    """The text of ``output`` up to where its first stop string starts (read as
    :class:`StopCheck` reads it: in the text, else with special tokens written). Pure."""
    text = tokenizer.decode(output)
    cut = find_stop(text, stop)
    if cut is not None:
        return text[:cut]
    full = tokenizer.decode(output, skip_special_tokens=False)
    cut = find_stop(full, stop)
    if cut is None:
        return text
    # The stop starts in token k: the text of the tokens before it, and of token k's
    # characters before the stop where token k is no special token.
    for k in range(len(output), -1, -1):
        head = tokenizer.decode(output[:k], skip_special_tokens=False)
        if len(head) <= cut and full.startswith(head):
            rest = full[len(head):cut]
            special = k < len(output) and tokenizer.decode(output[k:k + 1]) == ""
            return tokenizer.decode(output[:k]) + ("" if special else rest)
    return ""


class StopCheck:
    """Whether the text of an output so far contains a stop string (decoding only the
    tail that a new stop could end in).

    NOTE: a stop that holds a special token's text (``<|eot_id|>``, ``<|im_end|>``) is
    looked for with special tokens written too: the text skips them, so a model that ended
    its turn with such a token where it is none of the checkpoint's EOS ids ran on to
    ``max_new_tokens``."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        # Tokens of text that may hold a stop: a token that decodes to text holds at least
        # one of its UTF-8 bytes. NOTE: counted in characters, the window was too short for
        # a stop of Cyrillic, CJK or emoji, which a byte-level vocabulary writes with up to
        # four tokens a character: such a stop never ended an answer.
        self.window = max(len(s.encode("utf-8", "surrogatepass")) for s in stop) + 8
        specials: tuple[str, ...] = getattr(tokenizer, "special_texts", ())  # a stand-in's: none
        self.with_specials = any(t in s for s in stop for t in specials)

    def __call__(self, output: Sequence[int]) -> bool:
        tail = list(output[-self.window:])
        if find_stop(self.tokenizer.decode(tail), self.stop) is not None:
            return True
        return self.with_specials and find_stop(
            self.tokenizer.decode(tail, skip_special_tokens=False), self.stop) is not None
