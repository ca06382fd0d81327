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
