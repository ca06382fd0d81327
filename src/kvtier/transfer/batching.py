"""Cut a plan into few large batches without breaking its order per slot. Pure Python.

An op joins the earliest *wave* after every earlier op it conflicts with::

    read after write    an earlier op writes its source
    write after write   an earlier op writes its destination
    write after read    an earlier op reads its destination

so ops of one wave never touch a slot that another op of the wave writes, and may run in
any order or at once. Each wave holds one batch per direction (GPU->host, host->GPU, ...);
waves run one after the other. A typical step's plan (offload victims, then onboard into
the freed GPU slots) is two waves of one batch each, whatever its number of ops::

    ops    off g1->h4   off g2->h5   on h1->g1   on h2->g2   copy g7->g3 (2 tokens)
    wave        0            0           1           1            0

NOTE: this runs once per op of every plan, so it is written for speed: one pass, slots
keyed as plain ints, slot lists built per group as the ops go by.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from kvtier.reprs import shown
from kvtier.tier import Tier
from kvtier.transfer.plan import TransferOp

_INT = frozenset((int,))
_TIER_VALUES = frozenset(int(t) for t in Tier)


class CopyGroup(NamedTuple):
    """Ops of one batch that copy the same number of tokens: ``src_slots[i]`` to
    ``dst_slots[i]``."""

    num_tokens: int
    src_slots: list[int]
    dst_slots: list[int]


class TransferBatch(NamedTuple):
    """The ops of one wave that go one way; ``positions`` are their indices in the plan."""

    wave: int
    src_tier: Tier
    dst_tier: Tier
    positions: list[int]
    groups: list[CopyGroup]


class Run(NamedTuple):
    """``num_blocks`` consecutive source slots copied to consecutive destination slots."""

    src_slot: int
    dst_slot: int
    num_blocks: int


def plan_waves(ops: Sequence[TransferOp]) -> list[int]:
    """The wave of each op (see the module docstring). Pure."""
    return [wave for wave, _ in _waves(ops)]


def _waves(ops: Sequence[TransferOp]) -> list[tuple[int, TransferOp]]:
    last_write: dict[int, int] = {}
    last_read: dict[int, int] = {}
    out = []
    for op in ops:
        _, src_tier, src_slot, dst_tier, dst_slot, _ = op
        src = 2 * src_slot + src_tier  # one int key per (tier, slot)
        dst = 2 * dst_slot + dst_tier
        wave = 0
        w = last_write.get(src)
        if w is not None:
            wave = w + 1
        w = last_write.get(dst)
        if w is not None and w >= wave:
            wave = w + 1
        w = last_read.get(dst)
        if w is not None and w >= wave:
            wave = w + 1
        last_write[dst] = wave
        w = last_read.get(src)
        if w is None or w < wave:
            last_read[src] = wave
        out.append((wave, op))
    return out


def plan_batches(ops: Sequence[TransferOp]) -> list[TransferBatch]:
    """Group ``ops`` into batches, in the order they must run (wave, then direction), each
    split into groups by token count. Pure."""
    batches: dict[tuple[int, int, int], TransferBatch] = {}
    groups: dict[tuple[int, int, int, int], CopyGroup] = {}
    for i, (wave, op) in enumerate(_waves(ops)):
        _, src_tier, src_slot, dst_tier, dst_slot, num_tokens = op
        key = (wave, src_tier, dst_tier)
        batch = batches.get(key)
        if batch is None:
            batch = batches[key] = TransferBatch(wave, src_tier, dst_tier, [], [])
        batch.positions.append(i)
        group_key = (wave, src_tier, dst_tier, num_tokens)
        group = groups.get(group_key)
        if group is None:
            group = groups[group_key] = CopyGroup(num_tokens, [], [])
            batch.groups.append(group)
        group.src_slots.append(src_slot)
        group.dst_slots.append(dst_slot)
    return [batches[key] for key in sorted(batches)]


def merge_runs(src_slots: Sequence[int], dst_slots: Sequence[int],
               max_runs: int | None = None) -> list[Run] | None:
    """Merge slot pairs, in the order given, into runs consecutive on both sides; ``None``
    once there would be more than ``max_runs``. Pure."""
    runs: list[Run] = []
    src_start = dst_start = length = 0
    for src, dst in zip(src_slots, dst_slots, strict=True):
        if length and src == src_start + length and dst == dst_start + length:
            length += 1
            continue
        if length:
            runs.append(Run(src_start, dst_start, length))
            if max_runs is not None and len(runs) >= max_runs:
                return None
        src_start, dst_start, length = src, dst, 1
    if length:
        runs.append(Run(src_start, dst_start, length))
    return runs


def check_batches(batches: Sequence[TransferBatch], ops: Sequence[TransferOp],
                  num_blocks: dict[Tier, int | None], tokens_per_block: int) -> None:
    """Raise ValueError naming an op that ``check_op`` refuses (a slot outside its tier,
    a token count not in 1..tokens_per_block, a slot copied onto itself, a field that is
    no int). Checks whole slot lists at C speed and looks for the op only on failure.
    Pure."""
    for batch in batches:
        num_src, num_dst = num_blocks.get(batch.src_tier), num_blocks.get(batch.dst_tier)
        for group in batch.groups:
            # NOTE: the types first: a slot of 1.5 passed the range test and the index
            # tensor truncated it (block 1 copied, silently), and a num_tokens of 2.5 or
            # True failed in torch as a copy that failed (a TransferError, not a refusal).
            if (num_src is None or num_dst is None or type(group.num_tokens) is not int
                    or not _INT.issuperset(map(type, group.src_slots))
                    or not _INT.issuperset(map(type, group.dst_slots))
                    or not 1 <= group.num_tokens <= tokens_per_block
                    or min(group.src_slots) < 0 or max(group.src_slots) >= num_src
                    or min(group.dst_slots) < 0 or max(group.dst_slots) >= num_dst
                    or (batch.src_tier is batch.dst_tier
                        and any(map(int.__eq__, group.src_slots, group.dst_slots)))):
                for i in batch.positions:
                    check_op(i, ops[i], num_blocks, tokens_per_block)


def check_ops(ops: Sequence[object], num_blocks: dict[Tier, int | None],
              tokens_per_block: int) -> None:
    """``check_op`` of every op of ``ops``, in order. Pure."""
    for i, op in enumerate(ops):
        check_op(i, op, num_blocks, tokens_per_block)


def check_op(i: int, op: object, num_blocks: dict[Tier, int | None],
             tokens_per_block: int) -> None:
    """Raise ValueError naming op ``i`` if it is invalid: no ``TransferOp`` (a tuple of
    six fields), a tier that is no ``Tier``, a slot or token count that is no int (bools
    refused), a slot outside its tier (``num_blocks[tier]``, ``None`` for a tier without
    storage), a token count not in 1..tokens_per_block, or a slot copied onto itself.
    Pure.

    NOTE: a tier of 2 raised AttributeError here (an int has no ``.name``), and passed the
    GPU paths' array check (``fused.check_arrays``) to be copied as another tier's slot."""
    if not (isinstance(op, tuple) and len(op) == len(TransferOp._fields)):
        raise ValueError(f"op {i} must be a TransferOp, got {shown(op):.80}")
    _, src_tier, src_slot, dst_tier, dst_slot, num_tokens = op
    tiers = []
    for field, tier in (("src_tier", src_tier), ("dst_tier", dst_tier)):
        if type(tier) not in (Tier, int) or tier not in _TIER_VALUES:
            raise ValueError(f"op {i}: {field} must be a Tier, got {shown(tier):.40}")
        tiers.append(Tier(tier))
    for field, slot in (("src_slot", src_slot), ("dst_slot", dst_slot),
                        ("num_tokens", num_tokens)):
        if type(slot) is not int:
            raise ValueError(f"op {i}: {field} must be an int, got {shown(slot):.40}")
    for tier, slot in ((tiers[0], src_slot), (tiers[1], dst_slot)):
        num = num_blocks.get(tier)
        if num is None:
            raise ValueError(f"op {i} {op} uses the {tier.name} tier, which has no storage")
        if not 0 <= slot < num:
            raise ValueError(f"op {i} {op}: slot {shown(slot)} outside the {num} {tier.name} "
                             f"blocks")
    if not 1 <= num_tokens <= tokens_per_block:
        raise ValueError(f"op {i} {op}: num_tokens must be in 1..{tokens_per_block}")
    if (tiers[0], src_slot) == (tiers[1], dst_slot):
        raise ValueError(f"op {i} {op} copies a slot onto itself")
