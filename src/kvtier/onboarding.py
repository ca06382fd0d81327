"""The host blocks of a path being onboarded: copied in path order into GPU slots as they
come free, or swapped with a GPU victim's blocks a piece at a time (``Onboarding.swap_in``).
"""

from __future__ import annotations

from array import array
from typing import NamedTuple

from kvtier.pool import TierPool
from kvtier.slots import SLOT_TYPECODE
from kvtier.tier import Tier
from kvtier.transfer.plan import OpKind, PlanRecorder


class Onboarding:
    """The host blocks of a path being onboarded (``BlockCache.onboard_path``): copied in
    path order into GPU slots as they come free; each copy frees its host slots at once
    (the plan orders a later write into them after the copy)."""

    def __init__(self, host_slots: array[int], ops: PlanRecorder, gpu: TierPool,
                 host: TierPool, tokens_per_block: int) -> None:
        self.host_slots = host_slots
        self.gpu_slots: array[int] = array(SLOT_TYPECODE)
        self._ops = ops
        self._gpu = gpu
        self._host = host
        self._tpb = tokens_per_block

    @property
    def num_left(self) -> int:
        """Blocks still on the host. Pure."""
        return len(self.host_slots) - len(self.gpu_slots)

    def copy_in(self, gpu_slots: array[int]) -> None:
        """Copy the path's next ``len(gpu_slots)`` blocks into ``gpu_slots`` (taken from
        the free list or from a victim: referenced from now on)."""
        src = self.take_in(gpu_slots)
        self._ops.record_run(OpKind.ONBOARD, Tier.HOST, src, Tier.GPU, gpu_slots, self._tpb)

    def take_in(self, gpu_slots: array[int]) -> array[int]:
        """``copy_in`` less the recording: the caller records the copies from the host
        slots returned before the plan's next op (their host slots are free from now on)."""
        src = self._claim(gpu_slots)
        self._host.give_back(src)
        return src

    def _claim(self, gpu_slots: array[int]) -> array[int]:
        """The path's next ``len(gpu_slots)`` blocks go to ``gpu_slots``: return their host
        slots, which the caller gives back."""
        start = len(self.gpu_slots)
        src = self.host_slots[start:start + len(gpu_slots)]
        self._gpu.num_referenced += len(gpu_slots)
        self._host.num_referenced -= len(src)
        self.gpu_slots += gpu_slots
        return src

    def swap_in(self, victim_slots: array[int]) -> Swap:
        """Swap the path's next ``len(victim_slots)`` blocks with a GPU victim's blocks in
        those slots, a piece as large as the host's free room ``r`` at a time: piece 1
        leaves into ``r`` free host slots, the path's first ``r`` blocks take its GPU slots
        and give their host slots back, piece 2 takes exactly those (the free list hands the
        slots given back last out first), and so on. Done in closed form, with the free
        list left as the piece-by-piece loop leaves it::

            piece ends   r, 2r, ..., n            (n = len(victim_slots))
            victim host  [first r free] + path[0 : n - r]
            free list    ... + path[(m-2)r + a : (m-1)r] + path[(m-1)r : n]   (top last)
                         (m pieces, the last of a blocks)
        """
        host = self._host
        num = len(victim_slots)
        room = host.num_free
        assert room > 0, "a swap needs host room for a piece"
        first = host.take(min(room, num))
        path = self._claim(victim_slots)
        if num > room:
            last_start = (num - 1) // room * room
            # What the last piece left of the one before it lies under what it gave back.
            host.give_back(path[last_start - room + (num - last_start):last_start])
            host.give_back(path[last_start:])
            piece_ends = list(range(room, num, room))
            piece_ends.append(num)
        else:
            host.give_back(path)
            piece_ends = [num]
        return Swap(first + path[:num - len(first)], path, piece_ends)


class Swap(NamedTuple):
    """What ``Onboarding.swap_in`` did: the victim's blocks went to ``host_slots``, the
    path's came from ``path_slots``, in pieces ending at ``piece_ends``."""

    host_slots: array[int]
    path_slots: array[int]
    piece_ends: list[int]
