"""Choosing the next token: :class:`SamplingParams` (frozen, validated) and :class:`Sampler`
(greedy, or seeded temperature / top-p sampling, one generator per request)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvtier.counts import as_integer, check_count
from kvtier.reprs import shown
from kvtier.sequence import is_finite_number, short_repr

# The seeds that draw distinct streams: torch's CPU generator (mt19937) takes a 64-bit seed
# but keeps its low 32 bits (2**32 draws what 0 draws), as NumPy's RandomState takes
# 0..2**32-1 only.
MAX_SEED = 2**32 - 1


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How a request picks tokens and when it stops.

    ``temperature`` 0 is greedy (argmax); above 0, tokens are drawn from the softmax of
    ``logits / temperature`` cut to the smallest set whose probability reaches ``top_p``,
    with a generator seeded by ``seed`` (0..2**32-1, each its own stream; ``None``: 0), so a
    seeded run repeats exactly.
    A request stops after ``max_new_tokens``, at a token of ``stop_token_ids`` (kept in the
    output), or once its text contains one of ``stop`` (checked by the caller, who has
    the tokenizer)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # NOTE: counts and ids kept as the plain ints they are (``kvtier.counts``): a NumPy
        # max_new_tokens, seed or stop token was refused.
        object.__setattr__(self, "max_new_tokens",
                           check_count("max_new_tokens", self.max_new_tokens, 1))
        t = self.temperature
        # NOTE: is_finite_number, not math.isfinite: that raised OverflowError for an int
        # past the float range.
        if not is_finite_number(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {short_repr(t)}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {shown(p)}")
        seed = self.seed if self.seed is None else as_integer(self.seed)
        # NOTE: -2**63..2**64-1 was taken, and torch kept the low 32 bits of it: seed -1
        # drew what 2**64-1 and 2**32-1 drew, -2**63 and 2**32 what 0 drew. Each seed
        # of 0..MAX_SEED draws its own stream (past 2**64, Sampler() raised torch's
        # 'Overflow when unpacking long long', naming no field).
        if self.seed is not None and (seed is None or not 0 <= seed <= MAX_SEED):
            raise ValueError(f"seed must be an integer in 0..2**32-1 or None, got "
                             f"{short_repr(self.seed)}")
        object.__setattr__(self, "seed", seed)
        ids = self.stop_token_ids
        plain = ([as_integer(i) for i in ids] if isinstance(ids, frozenset)
                 else [None])
        if any(i is None or i < 0 for i in plain):
            raise ValueError(f"stop_token_ids must be a frozenset of integers >= 0, got "
                             f"{shown(ids)}")
        if any(type(i) is not int for i in ids):
            object.__setattr__(self, "stop_token_ids", frozenset(plain))
        if not isinstance(self.stop, tuple) or any(
                not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {shown(self.stop)}")
        for i, s in enumerate(self.stop):
            # NOTE: bytes that are no UTF-8 (a --stop of a terminal in another encoding)
            # arrive as lone surrogates, which no decoded text holds: the stop never
            # matched, without a word.
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"stop[{i}] is not valid Unicode text (character "
                                 f"{exc.start}: bytes that are not UTF-8?), so no answer "
                                 "could ever hold it") from None


class Sampler:
    """Picks one request's tokens under ``params``; holds that request's generator."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._generator = torch.Generator().manual_seed(params.seed or 0)

    def __copy__(self) -> Sampler:
        # NOTE: the shallow copy shared the original's generator: each one's draws moved
        # the other's on, so neither repeated its seeded run. A copy draws what the
        # original would draw from here on, on a generator of its own (as a deep copy, a
        # pickle, and ``copy.copy`` of a ``random.Random`` or a NumPy generator do).
        copied = object.__new__(type(self))
        copied.__dict__.update(self.__dict__)
        copied._generator = torch.Generator().set_state(self._generator.get_state())
        return copied

    def sample(self, logits: torch.Tensor) -> int:
        """The next token from ``logits`` [vocab]."""
        p = self.params
        if p.temperature == 0:
            return int(logits.argmax())
        # NOTE: on the CPU in float32, so a seed gives the same tokens on any device.
        probs = torch.softmax(logits.detach().float().cpu() / p.temperature, dim=-1)
        if not bool(torch.isfinite(probs).all()):
            # NOTE: logits holding NaN or inf (a model's numbers overflowed) have no
            # distribution to draw from, where multinomial raised in the middle of the
            # engine's step: the greedy token, NaN ranked lowest, +inf highest.
            finite = torch.nan_to_num(logits.detach().float().cpu(), nan=-torch.inf)
            return int(finite.argmax())
        if p.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # Keep a token while the mass before it is below top_p (the first always stays).
            keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p
            # NOTE: compared in float32, a top_p below its smallest number (1e-50) is 0 and
            # kept no token: multinomial raised 'invalid multinomial distribution' and the
            # request ended in an error for a top_p in (0, 1].
            keep[0] = True
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=self._generator))

    def stops_at(self, token: int) -> bool:
        """Whether ``token`` ends the request. Pure."""
        return token in self.params.stop_token_ids


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the first of ``stop`` starts in ``text`` (``None``: nowhere). Pure."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None
