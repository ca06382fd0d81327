"""The reference for the copy paths' tests: a plan executed one op at a time, in order."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from kvtier.tier import Tier
from kvtier.transfer.plan import TransferOp

if TYPE_CHECKING:
    from torch import Tensor

    from kvtier.storage import KVStorage


def in_order(storages: Mapping[Tier, KVStorage], ops: Iterable[TransferOp],
             num_layers: int) -> dict[Tier, list[Tensor]]:
    """Per tier, each layer's blocks after copying the first ``num_tokens`` of every op's
    source into its destination, in plan order, with plain indexing (the storages are not
    touched)."""
    expected = {t: [s.layer(i).clone() for i in range(num_layers)] for t, s in storages.items()}
    for op in ops:
        for i in range(num_layers):
            n = op.num_tokens
            expected[op.dst_tier][i][op.dst_slot, :, :n] = \
                expected[op.src_tier][i][op.src_slot, :, :n]
    return expected


def assert_matches(storages: Mapping[Tier, KVStorage], expected: Mapping[Tier, list[Tensor]],
                   context: object) -> None:
    """Every layer of every tier holds exactly what ``in_order`` gave; ``context`` (the
    trial, the ops) goes into the failure message."""
    import torch  # the copy paths' tests run only where torch is installed

    for tier, s in storages.items():
        for i, layer in enumerate(expected[tier]):
            assert torch.equal(s.layer(i), layer), (context, tier, i)
