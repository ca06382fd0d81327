"""Copies described, not executed: what a step must move between tiers."""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Sequence
from enum import Enum
from typing import NamedTuple

from kvtier.reprs import shown
from kvtier.slots import SLOT_TYPECODE, extend_slots, slot_array
from kvtier.tier import Tier


class OpKind(str, Enum):
    OFFLOAD = "offload"  # GPU -> host, a whole block
    ONBOARD = "onboard"  # host -> GPU, a whole block
    COPY = "copy"  # the first num_tokens of a block into a new GPU block (partial reuse)


# A plan's kinds column holds each op's index here.
OP_KINDS = (OpKind.OFFLOAD, OpKind.ONBOARD, OpKind.COPY)
_KIND_INDEX = {kind: i for i, kind in enumerate(OP_KINDS)}
_TIERS = (Tier.GPU, Tier.HOST)
# One op's entry in a tier column ('q') and in the kinds column ('b'), as bytes.
_GPU_Q = array("q", [Tier.GPU]).tobytes()
_HOST_Q = array("q", [Tier.HOST]).tobytes()
_OFFLOAD_B = array("b", [_KIND_INDEX[OpKind.OFFLOAD]]).tobytes()
_ONBOARD_B = array("b", [_KIND_INDEX[OpKind.ONBOARD]]).tobytes()


class TransferOp(NamedTuple):
    """Copy the first ``num_tokens`` tokens of a block between two slots."""

    kind: OpKind
    src_tier: Tier
    src_slot: int
    dst_tier: Tier
    dst_slot: int
    num_tokens: int


class PlanColumns(NamedTuple):
    """A plan's ops as parallel int64 arrays, one per field but the kind: what an engine
    plans from with array operations, never touching the ops one by one (an engine turns
    them into tensors without a copy)."""

    src_tiers: array[int]
    src_slots: array[int]
    dst_tiers: array[int]
    dst_slots: array[int]
    num_tokens: array[int]

    @classmethod
    def of(cls, ops: Sequence[TransferOp]) -> PlanColumns:
        """The columns of ``ops``: one transposition (``zip``), each column read into an
        array at C speed. Pure."""
        if not ops:
            return cls(*(array("q") for _ in range(5)))
        return cls(*(array("q", column) for column in list(zip(*ops, strict=True))[1:]))

    def extend(self, src_tier: int, src_slots: Sequence[int], dst_tier: int,
               dst_slots: Sequence[int], num_tokens: int) -> None:
        """Append a run of ops that share tiers and token count (slot lists copied at C
        speed), the way a producer that already holds slot lists records them."""
        if len(src_slots) != len(dst_slots):
            raise ValueError(f"src_slots and dst_slots differ in length: {len(src_slots)} "
                             f"vs {len(dst_slots)}")
        n = len(src_slots)
        self.src_tiers.extend(array("q", [src_tier]) * n)
        extend_slots(self.src_slots, src_slots)
        self.dst_tiers.extend(array("q", [dst_tier]) * n)
        extend_slots(self.dst_slots, dst_slots)
        self.num_tokens.extend(array("q", [num_tokens]) * n)


def _swap_pattern(num_blocks: int) -> tuple[bytes, bytes, bytes]:
    """The source tier, destination tier and kind columns of one swap piece of
    ``num_blocks`` blocks (its offloads, then its onboards), as bytes. Pure."""
    return (_GPU_Q * num_blocks + _HOST_Q * num_blocks,
            _HOST_Q * num_blocks + _GPU_Q * num_blocks,
            _OFFLOAD_B * num_blocks + _ONBOARD_B * num_blocks)


def _num_even_pieces(piece_ends: Sequence[int]) -> int:
    """How many pieces from the first end at ``size, 2 size, 3 size, ...`` (``size`` the
    first end), all of them but the last, which ends at the path's end; 0 where they do
    not, or where there are few (a loop is as fast). Pure."""
    if type(piece_ends) is not list or len(piece_ends) < 4:
        return 0
    size = piece_ends[0]
    num = len(piece_ends) - 1
    if type(size) is not int or size <= 0 or piece_ends[num - 1] != size * num:
        return 0
    return num if piece_ends[:num] == list(range(size, size * num + 1, size)) else 0


def _interleaved(first: array[int], second: array[int], size: int, num: int) -> array[int]:
    """``first[0:size] + second[0:size] + first[size:2 size] + ...`` for ``num`` pieces of
    ``size`` (``array('q')``): by strided slices where pieces are small (``size`` rounds, not
    ``num``). Pure."""
    end = size * num
    out = array(SLOT_TYPECODE)
    if size > num:
        for start in range(0, end, size):
            out += first[start:start + size]
            out += second[start:start + size]
        return out
    out.frombytes(bytes(16 * end))
    step = 2 * size
    for j in range(size):
        out[j::step] = first[j:end:size]
        out[size + j::step] = second[j:end:size]
    return out


class PlanIssuer:
    """The key a manager's plans name it by (``TransferPlan.issuer``): compared by identity,
    and weakly referable, so that what an engine records of it (``TorchTransferEngine``'s
    plans run) goes with the last manager or plan holding it. A copy of it (``deepcopy``,
    pickle) is another issuer."""

    __slots__ = ("__weakref__",)


class TransferPlan:
    """The copies of one manager call, in program order.

    Executing the ops in order is always correct: the manager hands a slot to a new owner
    only after recording every op that reads its old content, so an op never overwrites a
    slot that an earlier op still has to read, and never reads a slot before the op that
    fills it. An engine that reorders or overlaps ops must keep that order per slot.

    ``columns``, where the producer gives them, are the same ops as arrays (an engine then
    plans without reading ``ops``); they must describe exactly ``ops``. A plan the manager
    hands out is recorded as columns only (``of_columns``): its ``ops`` are built from them
    on first use, so a consumer that reads the columns (the simulator, the copy paths) never
    pays for a Python object per block. ``len(plan)`` and ``plan.op(i)`` read the columns.

    ``issuer`` is set by the manager that hands the plan out (which manager, which of its
    plans), for ``KVCacheManager.transfer_failed`` to tell its own latest plan from another
    manager's, an older one or a copy; None for a plan built by hand. A copy of a plan
    (``copy.deepcopy``, pickle) names a copy of its issuer: made together with its manager
    (one ``deepcopy`` or ``pickle.dumps`` of both, or of a scheduler and its step), it is
    the copied manager's plan, as the original is the original's; made alone, no manager's.
    """

    __slots__ = ("_kinds", "_ops", "columns", "issuer")

    def __init__(self, ops: Sequence[TransferOp] = (), columns: PlanColumns | None = None
                 ) -> None:
        self._ops: tuple[TransferOp, ...] | None = tuple(ops)
        self._kinds: array[int] | None = None
        self.columns = columns
        self.issuer: tuple[object, int] | None = None

    @classmethod
    def of_columns(cls, kinds: array[int], columns: PlanColumns) -> TransferPlan:
        """The plan whose ops are ``columns`` with kinds ``kinds`` (``OP_KINDS`` indices),
        read lazily. The arrays are the plan's: the caller hands them over."""
        if len(kinds) != len(columns.src_slots):
            raise ValueError(f"kinds hold {len(kinds)} ops, the columns "
                             f"{len(columns.src_slots)}")
        plan = cls((), columns)
        plan._ops = None
        plan._kinds = kinds
        return plan

    @property
    def ops(self) -> tuple[TransferOp, ...]:
        """The ops, in program order (built from the columns once, on first use)."""
        ops = self._ops
        if ops is None:
            assert self._kinds is not None and self.columns is not None
            c = self.columns
            ops = self._ops = tuple(map(
                TransferOp._make,
                zip(map(OP_KINDS.__getitem__, self._kinds), map(_TIERS.__getitem__, c.src_tiers),
                    c.src_slots, map(_TIERS.__getitem__, c.dst_tiers), c.dst_slots,
                    c.num_tokens, strict=True)))
        return ops

    @property
    def kinds(self) -> array[int]:
        """Each op's kind, as its index in ``OP_KINDS``: a column beside ``columns``."""
        kinds = self._kinds
        if kinds is None:
            assert self._ops is not None
            kinds = self._kinds = array("b", [_KIND_INDEX[op.kind] for op in self._ops])
        return kinds

    def __len__(self) -> int:
        """How many ops the plan holds (without building them). Pure."""
        return len(self._ops) if self._ops is not None else len(self.kinds)

    def op(self, index: int) -> TransferOp:
        """The op at ``index`` (without building the others). Pure."""
        if self._ops is not None:
            return self._ops[index]
        assert self._kinds is not None and self.columns is not None
        c = self.columns
        return TransferOp(OP_KINDS[self._kinds[index]], _TIERS[c.src_tiers[index]],
                          c.src_slots[index], _TIERS[c.dst_tiers[index]], c.dst_slots[index],
                          c.num_tokens[index])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TransferPlan):
            return NotImplemented
        return self.ops == other.ops and self.columns == other.columns

    def __hash__(self) -> int:
        return hash(self.ops)

    def __repr__(self) -> str:
        return f"TransferPlan(ops={shown(self.ops)}, columns={shown(self.columns)})"

    def __reduce__(self) -> tuple[type[TransferPlan], tuple[tuple[TransferOp, ...],
                                                             PlanColumns | None],
                                  tuple[None, dict[str, object]]]:
        # NOTE: the issuer travels too (its key copied as any object is, once per copy): a
        # manager copied with its latest plan (a scheduler copied between step and update)
        # refused that plan's transfer_failed as no plan of its own, for good.
        return (TransferPlan, (self.ops, self.columns), (None, {"issuer": self.issuer}))


class PlanRecorder:
    """Where a producer records its copies in program order, as columns (and a kinds
    column): recording a run costs one C-speed array extend per field, and no Python
    object per op; the plan it hands out builds ``ops`` only if a consumer reads them."""

    __slots__ = ("columns", "kinds")

    def __init__(self) -> None:
        self.kinds: array[int] = array("b")
        self.columns = PlanColumns.of(())

    def __len__(self) -> int:
        return len(self.kinds)

    def record_run(self, kind: OpKind, src_tier: Tier, src_slots: Sequence[int],
                   dst_tier: Tier, dst_slots: Sequence[int], num_tokens: int) -> None:
        """Record ``src_slots[i] -> dst_slots[i]`` for every ``i``, in order."""
        self.columns.extend(src_tier, src_slots, dst_tier, dst_slots, num_tokens)
        self.kinds.extend(array("b", [_KIND_INDEX[kind]]) * len(src_slots))

    def record_swap(self, gpu_slots: Sequence[int], host_slots: Sequence[int],
                    path_slots: Sequence[int], piece_ends: Sequence[int],
                    num_tokens: int) -> None:
        """Record a GPU run swapped out a piece at a time for a path's host blocks coming in,
        in one call: for each piece ``[start, end)`` (``piece_ends``, increasing, the last
        ``len(path_slots)``), its offload, then the path's onboard into the slots it left;
        then the offload of the rest of the run::

            for each piece:  offload gpu_slots[start:end] -> host_slots[start:end]
                             onboard path_slots[start:end] -> gpu_slots[start:end]
            then:            offload gpu_slots[len(path_slots):] -> host_slots[len(path_slots):]

        The same ops, in the same order, as a ``record_run`` per piece and kind: a piece's
        onboard writes the GPU slots its offload reads, and the next piece's offload may
        write the host slots this onboard reads (the order the hazards need)."""
        num_swap = len(path_slots)
        if len(gpu_slots) != len(host_slots) or num_swap > len(gpu_slots):
            raise ValueError(f"a swap takes as many host slots as GPU slots and at most as "
                             f"many path slots: {len(gpu_slots)} GPU, {len(host_slots)} host, "
                             f"{num_swap} path")
        # NOTE: the slot columns are built as ``array('q')`` (the cache's slot lists are:
        # slices and concatenations are copies) before anything is recorded (a slot that is
        # no int raises, as packing raises it, with the recorder as it was); the tier and
        # kind columns are repeated byte patterns, one per piece size, joined once: no
        # Python object per op. The cache's pieces
        # are all as large as the host's room but the last (``swap_in``): those are
        # interleaved by strided slices, not a piece at a time (a full host gives pieces
        # of a few blocks: a run of 100 blocks in 50 pieces).
        gpu_slots = slot_array(gpu_slots)
        host_slots = slot_array(host_slots)
        path_slots = slot_array(path_slots)
        num_even = _num_even_pieces(piece_ends)
        start = 0
        src_tiers: list[bytes]
        dst_tiers: list[bytes]
        kinds: list[bytes]
        if num_even:
            size = piece_ends[0]
            start = size * num_even
            src = _interleaved(gpu_slots, path_slots, size, num_even)
            dst = _interleaved(host_slots, gpu_slots, size, num_even)
            src_tier, dst_tier, kind = _swap_pattern(size)
            src_tiers = [src_tier * num_even]
            dst_tiers = [dst_tier * num_even]
            kinds = [kind * num_even]
        else:
            src, dst, src_tiers, dst_tiers, kinds = (
                array(SLOT_TYPECODE), array(SLOT_TYPECODE), [], [], [])
        increasing = True
        for end in itertools.islice(piece_ends, num_even, None):
            n = end - start
            if n <= 0:
                increasing = False
                break
            piece = gpu_slots[start:end]
            src += piece
            src += path_slots[start:end]
            dst += host_slots[start:end]
            dst += piece
            src_tier, dst_tier, kind = _swap_pattern(n)
            src_tiers.append(src_tier)
            dst_tiers.append(dst_tier)
            kinds.append(kind)
            start = end
        if not increasing or start != num_swap or not piece_ends:
            raise ValueError(f"piece ends must increase to the path's {num_swap} slots, got "
                             f"{shown(list(piece_ends))}")
        n = len(gpu_slots) - num_swap
        if n:
            src += gpu_slots[num_swap:]
            dst += host_slots[num_swap:]
            src_tiers.append(_GPU_Q * n)
            dst_tiers.append(_HOST_Q * n)
            kinds.append(_OFFLOAD_B * n)
        c = self.columns
        c.src_slots.extend(src)
        c.dst_slots.extend(dst)
        c.src_tiers.frombytes(b"".join(src_tiers))
        c.dst_tiers.frombytes(b"".join(dst_tiers))
        c.num_tokens.extend(array("q", [num_tokens]) * len(src))
        self.kinds.frombytes(b"".join(kinds))

    def take(self) -> TransferPlan:
        """The ops recorded since the last take, as one plan; the recorder starts empty."""
        plan = TransferPlan.of_columns(self.kinds, self.columns)
        self.kinds = array("b")
        self.columns = PlanColumns.of(())
        return plan
