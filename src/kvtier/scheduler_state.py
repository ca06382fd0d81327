"""The scheduler's books: what a :class:`~kvtier.scheduler.Scheduler` keeps per request and
per step, the checks every call makes first, and ``check_invariants`` over them.

:class:`SchedulerState` builds the books; the parts of the scheduler (``waiting_queue.py``,
``decode_batch.py``, ``chunk_planner.py``, ``step_recovery.py``, ``step_update.py``) are its
subclasses, and :class:`~kvtier.scheduler.Scheduler` is all of them: one object, one owner of
these books (see its docstring for the contract).
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Collection, Sequence
from typing import ClassVar, NoReturn

from kvtier.admission import PrefixMatch
from kvtier.manager import KVCacheManager
from kvtier.reprs import shown
from kvtier.request import Request, hold_request
from kvtier.scheduled_step import ScheduledStep, StepPhases
from kvtier.scheduler_config import AdmissionMode, SchedulerConfig
from kvtier.sequence import SequenceSpec


class SchedulerState:
    """The books of a :class:`~kvtier.scheduler.Scheduler`, the checks of its calls and
    its queries; the scheduler's parts build on it."""

    # The admission mode this class implements; SchedulerConfig.admission must match.
    ADMISSION: ClassVar[AdmissionMode] = "claim"

    def __copy__(self) -> NoReturn:
        # NOTE: ``copy.copy`` made a second scheduler sharing the original's queue, running
        # table and manager: a step of either admitted the other's requests.
        raise TypeError("a Scheduler cannot be copied shallowly (the copy would share its "
                        "queue, running requests and manager with the original): use "
                        "copy.deepcopy or pickle for an independent copy")

    def __setstate__(self, state: dict[str, object]) -> None:
        # A copy (deepcopy, pickle) holds its own copies of its requests, which a copy of
        # a request alone is not (``Request.__getstate__``).
        self.__dict__.update(state)
        for req in (*self.running.values(), *self.waiting):
            hold_request(req, True)

    # NOTE: the manager and config are read-only: replacing either afterwards left the
    # requests running on the old manager and the checks made at construction behind.
    @property
    def manager(self) -> KVCacheManager:
        """The manager this scheduler admits into (fixed at construction)."""
        return self._manager

    @property
    def config(self) -> SchedulerConfig:
        """The scheduler's settings (fixed at construction)."""
        return self._config

    def __init__(self, manager: KVCacheManager, config: SchedulerConfig | None = None) -> None:
        if not isinstance(manager, KVCacheManager):
            raise TypeError(f"manager must be a KVCacheManager, got {type(manager).__name__}")
        config = config if config is not None else SchedulerConfig()
        if not isinstance(config, SchedulerConfig):
            raise TypeError(f"config must be a SchedulerConfig or None, got "
                            f"{type(config).__name__}")
        if config.admission != self.ADMISSION:
            raise ValueError(f"{type(self).__name__} admits by {shown(self.ADMISSION)}, got "
                             f"admission={shown(config.admission)} (probe admission is "
                             "kvtier.sim.probe.ProbeScheduler)")
        self._manager = manager
        self._config = config
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}  # admission order: newest last
        # Per waiting request: what it prefills when admitted (the prompt, and after a
        # preemption the output so far), validated once; and since when it waits.
        self._specs: dict[str, SequenceSpec] = {}
        # Per request queued or running: its prompt as it was queued.
        self._prompts: dict[str, array[int]] = {}
        self._queued_at: dict[str, int] = {}
        self._held: set[str] = set()  # waiting requests not to admit yet (see hold)
        self._num_steps = 0
        self._lookups: dict[str, tuple[int, PrefixMatch]] = {}
        self._tpb = manager.config.tokens_per_block
        self.num_lookups = 0
        # What the manager was last told of the waiting queue: (manager version, the specs
        # of its head).
        self._hinted: tuple[int, list[SequenceSpec]] | None = None
        self._phases: StepPhases | None = None
        # The step returned and not yet applied by ``update``: the next step is planned from
        # what the last one computed, so a second step before it, or an update of another
        # step, would schedule the same tokens twice or apply tokens twice.
        self._unapplied: ScheduledStep | None = None
        # With speculative decoding: per running request past its prefill, how many of its
        # output tokens the manager does not hold yet (those the last update sampled; one
        # where absent). Without it that is always one, ``output[-1]``.
        self._num_unappended: dict[str, int] = {}
        # The requests the manager had released when the scheduler last changed it (a step,
        # an update, an abort, a reset): where more have left since, the caller may have
        # aborted or removed running requests (``_lost``), which a step or update must not
        # meet blind.
        # NOTE: not the live count: a request the caller admitted directly (or another
        # scheduler over the manager) after one of these was dropped left the count as it
        # was, and every later step raised KeyError decoding the dropped one.
        self._num_removed = manager.num_removed_sequences
        # Requests preempted and not yet listed in a step's ``preempted_request_ids`` (by
        # ``reset_prefix_cache``, or by a step that raised part way), for the next step to
        # list; during a step, its own preemptions join them.
        self._unlisted_preempted: list[str] = []
        # During a step: the requests it has asked the manager to change (to decode, to
        # prefill or to admit), in order; what a step that raises part way fails.
        self._step_touched: list[str] = []
        self._step_started: list[str] = []  # and those it admitted (the engine never ran)
        self._step_candidates: list[str] = []  # and the waiting ones it may have admitted
        # Per running request still in its prefill: the spec it was admitted with (what its
        # chunks compute). And during a step's admission, the first block each chunk of the
        # step completes, by ``_block_key`` (see ``candidates``).
        self._prefill_specs: dict[str, SequenceSpec] = {}
        self._computing: dict[tuple[object, ...], list[Sequence[int]]] = {}
        # The call of this scheduler in flight (step, update, abort, reset_prefix_cache),
        # which calls the manager, and so its clock and eviction policy: a call back into
        # the scheduler from there is refused (``_check_not_in_call``).
        self._in_call: str | None = None
        # Whether the update in flight has begun to apply its step (``_fail_update``).
        self._update_started = False
        # The manager's lost reuse (``CacheStats.num_lost_reused_tokens``) that steps have
        # accounted for: reported lost by a step, or never reported obtained (a request
        # ``requeue_failed`` took out of its admission's step). The rest is the next step's
        # ``num_lost_reused_tokens``.
        self._num_lost_seen = manager.stats.num_lost_reused_tokens
        # The last update's requests and their output lengths before it (what it appended
        # is the difference, worked out only where needed: no work an update), and the
        # manager's failed copies and passes then. A request the manager drops after that
        # update, for a failure (``compute_failed``, ``transfer_failed``), got its appended
        # tokens from a failed pass. Only requests still running: one that left (finished,
        # aborted) is the caller's, and no step may requeue it (``_forget_appended``).
        self._appended: tuple[list[Request], list[int]] = ([], [])
        self._num_failures_at_update = 0

    @property
    def phases(self) -> StepPhases | None:
        """A :class:`StepPhases` timing each phase of a step (a debug counter); off: None."""
        return self._phases

    @phases.setter
    def phases(self, phases: StepPhases | None) -> None:
        # NOTE: it is called in the middle of a step; an object of another kind that raised
        # there failed the step after its decodes were appended (see StepPhases).
        if phases is not None and not isinstance(phases, StepPhases):
            raise TypeError(f"phases must be a StepPhases or None, got {type(phases).__name__}")
        self._phases = phases

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def unapplied_step(self) -> ScheduledStep | None:
        """The step ``step`` (or ``requeue_failed``) returned that ``update`` has not applied
        yet; None between steps. A copy of the scheduler made in between (``copy.deepcopy``,
        pickle) holds its own copy of that step, whose plan is its manager's: the copy goes
        on with ``update(copy.unapplied_step, ...)`` (it refuses the original's step)."""
        return self._unapplied

    def _check_not_in_call(self, method: str) -> None:
        """RuntimeError, changing nothing, while a call of this scheduler is in flight: the
        manager's clock or eviction policy called back into it (or another thread called it:
        the scheduler is not thread-safe). Pure.

        NOTE: unchecked, an ``abort`` from there took a request out of ``running`` before
        the manager refused its release: live in the manager for ever, in no queue."""
        if self._in_call is not None:
            raise RuntimeError(
                f"Scheduler.{method}() called from inside its own {self._in_call}() (from the "
                f"manager's clock or eviction policy, or another thread): refused (the "
                f"scheduler serves one call at a time; they must not call back into it)")

    def check_in_step(self, method: str) -> None:
        """RuntimeError, changing nothing, unless a ``step`` is in flight: ``admit`` and
        ``start`` (a subclass's admit phase) run inside one. Pure.

        NOTE: called between steps, ``admit`` admitted in the manager requests whose first
        chunks no step returned: the next step scheduled them again and failed whole (a
        failed pass counted, the request recomputed), and ``check_invariants`` failed on the
        same-step waits it left behind."""
        if self._in_call != "step":
            raise RuntimeError(f"Scheduler.{method}() is the admit phase of step(): called "
                               "outside one it starts requests no step runs; call step()")

    def check_invariants(self) -> None:
        """Recount the scheduler's books from its queues and assert they hold (between
        steps): each request in exactly one of ``waiting`` and ``running``, nothing kept
        for one that left, no same-step wait outliving its step. Pure. The manager's own
        books are ``manager.check_invariants``."""
        waiting = [r.request_id for r in self.waiting]
        running = set(self.running)
        assert len(set(waiting)) == len(waiting), f"queued twice: {waiting}"
        assert not running.intersection(waiting), f"waiting and running: {waiting}"
        assert set(self._specs) == set(waiting) == set(self._queued_at), \
            "a waiting request's spec or queue time is missing or outlived it"
        assert self._held <= set(waiting), f"held but not waiting: {self._held}"
        # Preempted by a reset, for the next step to list: each still waits.
        assert set(self._unlisted_preempted) <= set(waiting), \
            f"listed as preempted but not waiting: {self._unlisted_preempted}"
        assert set(self._lookups) <= set(waiting) | running, "a lookup kept for one gone"
        assert not self._computing, "a step's same-step waits outlived its admission"
        prefilling = {rid for rid, r in self.running.items()
                      if r.num_computed_tokens < r.num_prefill_tokens}
        assert prefilling <= set(self._prefill_specs) <= running, \
            "a prefill spec missing, or kept for a request not running"
        assert set(self._num_unappended) <= running, "unappended tokens of one not running"
        assert set(self._prompts) == set(waiting) | running, "a prompt kept for one gone"
        for r in self.waiting:
            assert r.num_computed_tokens == r.num_prefill_tokens == 0, r
            assert self._queued_at[r.request_id] <= self._num_steps, r

    def _forget_appended(self, gone: Collection[Request]) -> None:
        """Keep no reference to the requests ``gone`` (they left: finished or aborted) in
        what the last update appended.

        NOTE: kept there, the last reference to a finished request freed its prompt's
        ~64k int objects at the next step's start, inside that step (up to 1.3 ms of a full
        step, the Mooncake replay's slowest; issue 13)."""
        ids = {id(req) for req in gone}
        reqs, lengths = self._appended
        kept = [i for i, req in enumerate(reqs) if id(req) not in ids]
        if len(kept) < len(reqs):
            self._appended = ([reqs[i] for i in kept], [lengths[i] for i in kept])

    def _check_unapplied(self, step: object, caller: str) -> None:
        """Raise RuntimeError unless ``step`` is the step waiting for ``update``. Pure."""
        if step is None or step is not self._unapplied:
            what = "no step is waiting" if self._unapplied is None else "another step is"
            raise RuntimeError(f"{caller}() takes the step the last step() returned, not yet "
                               f"applied; {what}")
