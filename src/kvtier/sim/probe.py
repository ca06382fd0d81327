"""Probe admission: the legacy estimate-then-admit loop, kept only to measure the race.

Every candidate is credited with a ``lookup`` and then admitted one request at a time. An
admission may evict or onboard blocks that a later candidate was credited with; that
request then computes the lost reuse in the same step, so the step can run past
``max_num_tokens``. :class:`ProbeScheduler` counts the excess as overflow (and the lost
credit shows as credited > reused), never hides it. The real scheduler admits the whole
batch in two phases and never races (:class:`kvtier.scheduler.Scheduler`).
"""

from __future__ import annotations

from typing import ClassVar

from kvtier.manager import KVCacheManager
from kvtier.scheduled_step import Admitted, ContextChunk
from kvtier.scheduler import AdmissionMode, Scheduler, SchedulerConfig


class ProbeScheduler(Scheduler):
    """A :class:`Scheduler` whose admit phase estimates, then admits one by one.

    Contract: as :class:`Scheduler`; only ``admit`` differs, and through the same public
    ``candidates`` and ``start``.
    """

    ADMISSION: ClassVar[AdmissionMode] = "probe"

    def admit(self, budget: int, slots: int) -> Admitted:
        self.check_in_step("admit")
        manager = self.manager
        chunks: list[ContextChunk] = []
        credited = reused = 0
        for cand in self.candidates(budget, slots):
            spec = cand.spec
            # Reuse lost since the estimate must be computed now: the chunk grows. (The
            # manager admits one request exactly; the race is between these calls.)
            now = manager.lookup_spec(spec).num_tokens
            n = max(1, min(len(spec.tokens) - now,
                           cand.num_new_tokens + cand.num_credited_tokens - now))
            adm = manager.add_sequence(spec.with_schedule(n, spec.num_reserved_blocks))
            if not adm.admitted:
                continue
            assert adm.num_reused_tokens == now
            credited += cand.num_credited_tokens
            reused += adm.num_reused_tokens
            chunks.append(self.start(cand, now, n))
        return Admitted(chunks, credited, reused)


SCHEDULERS: dict[AdmissionMode, type[Scheduler]] = {"claim": Scheduler, "probe": ProbeScheduler}


def make_scheduler(manager: KVCacheManager, config: SchedulerConfig) -> Scheduler:
    """The scheduler class that implements ``config.admission``, over ``manager``."""
    return SCHEDULERS[config.admission](manager, config)
