"""Copies described, not executed: what a step must move between tiers."""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

from kvtier.tier import Tier


class OpKind(str, Enum):
    OFFLOAD = "offload"  # GPU -> host, a whole block
    ONBOARD = "onboard"  # host -> GPU, a whole block
    COPY = "copy"  # the first num_tokens of a block into a new GPU block (partial reuse)


class TransferOp(NamedTuple):
    """Copy the first ``num_tokens`` tokens of a block between two slots."""

    kind: OpKind
    src_tier: Tier
    src_slot: int
    dst_tier: Tier
    dst_slot: int
    num_tokens: int


class TransferPlan(NamedTuple):
    """The copies of one manager call, in program order.

    Executing the ops in order is always correct: the manager hands a slot to a new owner
    only after recording every op that reads its old content, so an op never overwrites a
    slot that an earlier op still has to read, and never reads a slot before the op that
    fills it. An engine that reorders or overlaps ops must keep that order per slot.
    """

    ops: tuple[TransferOp, ...]
