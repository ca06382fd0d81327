"""Red team 34a, the model's side: ``Generator`` (behind ``kvtier generate``) keeps the
plain ints its checks read, not the caller's integer objects (``kvtier.counts``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch", reason="the model tests need torch")


class Index:
    """A caller's integer type: only ``__index__``, as ``operator.index`` reads it."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def index(value: int) -> Any:
    """``Index(value)``, typed as what the API's ``int`` parameters take."""
    return Index(value)


def test_tier_sizes_keep_plain_ints() -> None:
    """TierSizes checked its sizes through CacheConfig and kept the caller's objects: the
    Generator's own arithmetic (``num_gpu_blocks * tokens_per_block``) then raised."""
    from kvtier.model.generate import TierSizes

    sizes = TierSizes(index(16), np.int64(16), index(0), max_num_tokens=np.int32(512))
    assert [(type(v), v) for v in (sizes.tokens_per_block, sizes.num_gpu_blocks,
                                   sizes.num_host_blocks, sizes.max_num_tokens)] == [
        (int, 16), (int, 16), (int, 0), (int, 512)]
    for bad in (True, 16.0):
        with pytest.raises(ValueError, match="tokens_per_block"):
            TierSizes(bad)  # type: ignore[arg-type]


def test_a_generator_over_index_sizes_and_priority_runs(smollm2_path: Path) -> None:
    """End to end: a Generator over ``__index__`` sizes answers a chat whose system
    message is kept at an ``__index__`` priority of 90 (the generator could not be built
    before); a bool priority is refused naming it."""
    from kvtier.model.checkpoint import load_model
    from kvtier.model.generate import Generator, TierSizes
    from kvtier.model.tokenizer import load_tokenizer

    gen = Generator(load_model(smollm2_path), load_tokenizer(smollm2_path),
                    TierSizes(index(16), index(16), index(0), eviction_policy="priority-lru"))
    system = {"role": "system", "content": "You are a terse assistant for a small family "
              "bakery in Lyon. Answer in at most ten words, and never discuss the prices."}
    user = {"role": "user", "content": "Which of your breads keeps best for a long week of "
            "hiking in the mountains?"}
    params = gen.default_params(max_new_tokens=1)
    with pytest.raises(ValueError, match=r"^system_priority must be an integer in 0\.\.100"):
        gen.chat([[system, user]], params, True)
    gen.chat([[system, user]], params, index(90))
    held = [b.priority for b in gen.engine.manager.cached_blocks()]
    assert held[:3] == [90, 90, 35]
