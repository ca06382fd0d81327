"""``assert_exact``: a model engine's results against a cacheless recompute, for the tests
of the engine, its data plane and its remote tier."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvtier.model import ModelEngine


def assert_exact(engine: ModelEngine, tokens: bool = True) -> None:
    """Every logit row the engine recorded within 1e-4 of a cacheless recompute of the
    same tokens, and (with ``tokens``) every output token its row's argmax (greedy)."""
    for r in engine.results.values():
        seq = r.prompt + r.output
        ref = engine.model.full_recompute(seq[:-1])
        if tokens:
            assert r.output == ref[len(r.prompt) - 1:].argmax(-1).tolist(), r.request_id
        for pos, row in r.logits.items():
            assert (row - ref[pos]).abs().max().item() < 1e-4, (r.request_id, pos)
