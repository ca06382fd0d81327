"""Red team, seventeenth pass, over the model path's objects (extra ``model``): a
sampler copied the way a caller copies one."""

from __future__ import annotations

import copy
import pickle
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch", reason="the sampler needs torch")

from kvtier.model.sampling import Sampler, SamplingParams

LOGITS = torch.zeros(50)


def draws(sampler: Sampler, num: int = 4) -> list[int]:
    return [sampler.sample(LOGITS) for _ in range(num)]


def test_a_shallow_copy_of_a_sampler_draws_on_a_generator_of_its_own() -> None:
    """``copy.copy(sampler)`` shared its generator: the copy's draws moved the original's
    on (the original, seeded, no longer repeated its run). Now a copy draws exactly what
    the original draws from the point it was copied, and neither moves the other: as a
    deep copy and a pickle already did."""
    want = draws(Sampler(SamplingParams(temperature=1.0, seed=7)), 8)
    original = Sampler(SamplingParams(temperature=1.0, seed=7))
    assert draws(original, 2) == want[:2]
    for copied in (copy.copy(original), copy.deepcopy(original),
                   pickle.loads(pickle.dumps(original))):
        assert type(copied) is Sampler and copied.params == original.params
        assert draws(copied, 6) == want[2:]
    assert draws(original, 6) == want[2:]  # untouched by its copies' draws


def test_a_copy_of_a_sampler_subclass_keeps_its_class_and_fields() -> None:
    """A caller's subclass (a scripted sampler, as tests write) copies as itself, with its
    own fields, and its generator is its own too."""

    class Counting(Sampler):
        def __init__(self, params: SamplingParams) -> None:
            super().__init__(params)
            self.num_draws = 0

        def sample(self, logits: torch.Tensor) -> int:
            self.num_draws += 1
            return super().sample(logits)

    original = Counting(SamplingParams(temperature=1.0, seed=3))
    draws(original, 1)
    copied = copy.copy(original)
    assert type(copied) is Counting and copied.num_draws == 1
    assert draws(copied, 3) == draws(original, 3)
    assert (original.num_draws, copied.num_draws) == (4, 4)
