"""The LRU witness: whether an LRU cache of the same size would have hit, from the stream alone.

An LRU cache holds the most recently released blocks that fit. Which blocks those are
depends only on when requests released them and on the room the cache has, never on what
any other cache chose to keep (Mattson et al., 1970: LRU's hits follow from the stream). So
while kvtier evicts in another order, it can tell at every admission whether LRU would have
hit the same blocks:

::

    a hit on a run LRU would have dropped        kvtier's order won those blocks
    a miss on a run kvtier dropped, which LRU    LRU would have won them
    would still hold (a ghost recalled)

``lead`` is blocks won less blocks lost and ``volume`` the sum of the squares of the runs
won and lost, both halved every ``window_blocks`` prompt blocks admitted (twice the
capacity: two turnovers), so they follow the stream as it changes. The cache evicts by LRU
(``lru_ahead``) while LRU is ahead beyond chance: ``lead < -Z * sqrt(volume)`` (a sign
test over runs: an order no better than LRU wins and loses runs alike, and its lead strays
about ``sqrt(volume)``). Else by what it learned. While it evicts by LRU, the cache
matches LRU and the evidence only fades, so the learned order is tried again once it has
faded below chance: an order that learned late gets its chance, one that keeps losing is
back to LRU soon. On a stream where the learned order does not pay, kvtier does what the
peers do, but for those trials.

Released blocks are counted by release tick (``Node.last_used``). LRU drops the oldest
first, so what it dropped is everything released before a *mark* that only moves forward:
at each admission the mark moves past the oldest ticks until the blocks counted from it on
fit in the room the cache has for blocks no request uses (the same for LRU: what live
requests hold or reserve is not its to choose). A run LRU would hold is one released at
or after the mark. A run kvtier dropped stays counted under its tick (LRU would still hold
it, taking room from older runs) until a request comes back for it or the mark passes it.

O(1) per release and per reused or recalled run, amortised O(1) per tick for the mark.
"""

from __future__ import annotations

# How far behind, in standard deviations of a fair coin's lead, the learned order must be.
Z = 1.0


class LruWitness:
    """What an LRU cache of ``capacity`` blocks would hold, kept from the cache's events."""

    def __init__(self, capacity: int, window_blocks: int | None = None) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.window_blocks = window_blocks if window_blocks is not None else 2 * capacity
        self.clear()

    def clear(self) -> None:
        """Forget every count (the cache was cleared)."""
        self.lead = 0.0    # blocks won less blocks lost, fading
        self.volume = 0.0  # the squares of the runs won and lost, fading alike
        self.num_won = 0   # blocks hit that LRU would have missed, in all
        self.num_lost = 0  # blocks missed that LRU would have hit, in all
        self.lru_ahead = False  # whether the cache evicts by LRU's order now
        self.num_switches = 0   # to LRU's order, in all
        self._traffic = 0       # prompt blocks admitted since the last fade
        self._blocks: dict[int, int] = {}  # release tick -> blocks counted under it
        self._mark = 0     # LRU dropped every block released before this tick
        self._held = 0     # blocks counted, all at or after the mark (there: a head)

    def _add(self, tick: int, num_blocks: int) -> None:
        if tick < self._mark:
            return  # LRU dropped it long ago; nothing there counts
        blocks = self._blocks
        left = blocks.get(tick, 0) + num_blocks
        if left <= 0:
            # Never count a negative: a block may have left a run in place (a detached
            # leaf block), so a run can take back more than was counted under its tick.
            num_blocks -= left
            blocks.pop(tick, None)
        else:
            blocks[tick] = left
        self._held += num_blocks

    def released(self, old_tick: int, new_tick: int, num_blocks: int) -> None:
        """A run of ``num_blocks`` blocks was released at ``new_tick``; it was counted
        under ``old_tick`` until now (0: nowhere, it was new or in use)."""
        if old_tick:
            self._add(old_tick, -num_blocks)
        # NOTE: ``_add`` of the new tick written out (the same steps): a release comes
        # with every run a request leaves.
        if new_tick < self._mark:
            return
        blocks = self._blocks
        left = blocks.get(new_tick, 0) + num_blocks
        if left <= 0:
            num_blocks -= left
            blocks.pop(new_tick, None)
        else:
            blocks[new_tick] = left
        self._held += num_blocks

    def holds(self, tick: int) -> bool:
        """Whether LRU would hold (at least the head of) a run released at ``tick``. Pure."""
        return self._num_held(tick, 1) == 1

    def _num_held(self, tick: int, num_blocks: int) -> int:
        """How many of the first ``num_blocks`` blocks of a run released at ``tick`` LRU
        would hold now (at the mark, the run's head: LRU cuts runs from the tail). Pure."""
        if tick > self._mark:
            return num_blocks
        if tick < self._mark:
            return 0
        return min(num_blocks, self._blocks.get(tick, 0))

    def admitted(self, num_prompt_blocks: int, runs: list[tuple[int, int]], room: int) -> None:
        """A request of ``num_prompt_blocks`` was admitted on cached ``runs``, ``(release
        tick, blocks)`` each; they are in use until released again, and the cache holds
        ``room`` blocks that no request uses (as LRU's cache would: what is reserved or in
        use is not its to choose)."""
        if runs:
            # Judged as the cache stood just before, when the runs were in its room.
            reused = 0
            for _, num_blocks in runs:
                reused += num_blocks
            self.settle(room + reused)
            for tick, num_blocks in runs:
                won = num_blocks - self._num_held(tick, num_blocks)
                if won:
                    self.num_won += won
                    self._count(won)
            for tick, num_blocks in runs:
                self._add(tick, -num_blocks)
        # NOTE: most admissions reuse no released run (a fresh prompt, or one whose prefix
        # is in use): then the two settles are one, and the second finds nothing to do.
        if self._held > room:
            self.settle(room)
        self._traffic += num_prompt_blocks
        if self._traffic >= self.window_blocks:
            self._traffic = 0
            self.lead /= 2
            self.volume /= 2
            self._judge()

    def recalled(self, tick: int, num_blocks: int) -> None:
        """A request missed a run that was released at ``tick`` and dropped since; it will
        store the blocks again, under a new tick."""
        if not tick:
            return
        # At the mark only a run's head is counted; what was dropped there is a tail.
        if tick > self._mark:
            self.num_lost += num_blocks
            self._count(-num_blocks)
            self._add(tick, -num_blocks)

    def _count(self, won: int) -> None:
        self.lead += won
        self.volume += won * won
        self._judge()

    def _judge(self) -> None:
        ahead = self.lead < -Z * self.volume ** 0.5
        if ahead and not self.lru_ahead:
            self.num_switches += 1
        self.lru_ahead = ahead

    def settle(self, room: int) -> None:
        """Move the mark past the oldest ticks until what is counted fits in ``room``."""
        # NOTE: the mark and the count in locals, stored once: a settle comes with every
        # admission and passes a tick or two each time.
        held = self._held
        if held <= room:
            return
        blocks = self._blocks
        mark = self._mark
        while held > room:
            n = blocks.get(mark, 0)
            excess = held - room
            if n > excess:
                # LRU cuts the run from its tail: only its head is counted from now on.
                blocks[mark] = n - excess
                held = room
                break
            held -= n
            blocks.pop(mark, None)
            mark += 1
        self._held = held
        self._mark = mark
