"""The scheduler's update: a finished forward pass applied to its step's requests
(prefills advanced, sampled tokens appended, with speculative decoding the accepted drafts
and the token after them), requests that reached their output length or a stop finished
and released. Every token is checked before any is applied; an update that raises once it
began to apply fails its step whole (``StepRecovery._fail_update``).

:class:`StepUpdate` is a part of :class:`~kvtier.scheduler.Scheduler` over its recovery
(:class:`~kvtier.step_recovery.StepRecovery`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from operator import attrgetter
from typing import cast

from kvtier.reprs import shown
from kvtier.request import Request, set_progress
from kvtier.scheduled_step import ScheduledStep
from kvtier.sequence import MAX_TOKEN_ID, check_token, short_repr
from kvtier.step_recovery import StepRecovery, num_failures

# The one type a sampled token may have (a bool is refused, as ``check_token`` refuses it).
_INT_TYPE = frozenset({int})

_request_id = attrgetter("request_id")
_output = attrgetter("output")


class StepUpdate(StepRecovery):
    """``update``: a step's sampled tokens applied, its finished requests released."""

    def update(self, step: ScheduledStep, sampled: Mapping[str, int | Sequence[int]],
               stopped: Collection[str] = ()) -> list[Request]:
        """Apply a finished forward pass: advance prefills, record sampled tokens (for every
        decode and every completed prefill; with speculative decoding a decode's accepted
        drafts and the token after them, see ``_apply_speculative``), finish requests that
        reached their output length or whose sampled token ends them (``stopped``: an EOS or
        a stop string, the token itself is kept). A token or a stop for a request that
        samples nothing in this step (mid-prefill, not in the step, unknown) is ignored, as
        vLLM discards a partial prefill's sample. Returns the finished requests, of which
        the scheduler keeps none (they are freed where the caller drops them). Raises,
        changing nothing, for a step that is not the last one ``step`` (or
        ``requeue_failed``) returned or was already applied (RuntimeError), a ``sampled``
        that is no mapping or a ``stopped`` that is no collection of str (TypeError), or a
        request that samples with no valid token in ``sampled`` (ValueError). An update that raises
        once it began to apply the step (the step timer, the manager releasing a finished
        request, anything) fails it whole before the exception goes on (``_fail_update``):
        the step's requests recompute its tokens, and the step is applied."""
        self._check_not_in_call("update")
        self._check_unapplied(step, "update")
        self._in_call = "update"
        try:
            return self._update(step, sampled, stopped)
        finally:
            self._in_call = None

    def _update(self, step: ScheduledStep, sampled: Mapping[str, int | Sequence[int]],
                stopped: Collection[str]) -> list[Request]:
        """``update`` of the step waiting for it."""
        lost = self._lost()
        if lost:
            # NOTE: applied, the step appended their tokens, then removing a finished one
            # raised KeyError halfway (the step never marked applied: the scheduler stuck).
            raise RuntimeError(
                f"update(): the manager no longer holds {shown(lost)} (transfer_failed or "
                f"compute_failed aborted them): call requeue_failed(step, {shown(lost)}) first and "
                "update the step it returns")
        if not isinstance(sampled, Mapping):
            raise TypeError(f"sampled must be a mapping of request id to token, got "
                            f"{type(sampled).__name__}")
        if not isinstance(stopped, Collection) or isinstance(stopped, (str, bytes)):
            raise TypeError(f"stopped must be a collection of request ids, got "
                            f"{type(stopped).__name__}")
        # NOTE: read once, before anything changes: a caller's collection asked request by
        # request raised half way through the step's requests (their chunks advanced and
        # tokens appended, the step not applied), and the update taken again appended them
        # twice.
        if type(stopped) is not frozenset:
            try:
                stopped = frozenset(stopped)
            except Exception as exc:
                raise TypeError(f"stopped must be a collection of request ids: reading it "
                                f"raised {type(exc).__name__}: {exc}") from exc
        # NOTE: an id that is no str (the bytes of one) stopped nothing, without a word:
        # its request went on generating past its stop. (A str of a subclass, NumPy's, is
        # equal to its str and stops it.)
        if stopped and not all(isinstance(rid, str) for rid in stopped):
            bad = next(rid for rid in stopped if not isinstance(rid, str))
            raise TypeError(f"stopped must be a collection of request ids (str), got "
                            f"{short_repr(bad)} in it")
        # The step's requests and their output lengths before it, for ``_fail_update``.
        running = self.running
        decoding = [req for req in map(running.get, step.decode_request_ids) if req is not None]
        reqs = decoding + [req for req in map(running.get, map(_request_id, step.context_chunks))
                           if req is not None]
        lengths = list(map(len, map(_output, reqs)))
        self._update_started = False
        try:
            phases = self.phases
            if phases is not None:
                phases.resume()
            if self.config.num_speculative_tokens:
                finished = self._apply_speculative(step, decoding, sampled, stopped)
            else:
                finished = self._apply(step, decoding, sampled, stopped)
            for req in finished:
                self.manager.remove_sequence(req.request_id)
                self._leave_running(req)
            if phases is not None:
                phases.mark("update")
        except BaseException:
            if self._update_started:
                self._fail_update(reqs, lengths)
            raise  # else nothing changed: the step still waits for its update
        finally:
            self._num_removed = self.manager.num_removed_sequences
        for req in finished:
            self._release_request(req)
        self._unapplied = None
        self._appended = (reqs, lengths)
        if finished:
            self._forget_appended(finished)
        self._num_failures_at_update = num_failures(self.manager)
        return finished

    def _apply(self, step: ScheduledStep, decoding: list[Request],
               sampled: Mapping[str, object], stopped: Collection[str]) -> list[Request]:
        """``update``'s tokens, one a sampler: every token checked before any is applied;
        returns the requests that finish. ``decoding``: the step's decodes still running."""
        running = self.running
        samplers = [req.request_id for req in decoding]
        for chunk in step.context_chunks:
            req = running.get(chunk.request_id)
            if req is not None and chunk.first_token + chunk.num_tokens >= req.num_prefill_tokens:
                samplers.append(chunk.request_id)
        tokens: list[object] = list(map(sampled.get, samplers))
        ints = cast("list[int]", tokens)  # read as ints only once their types are checked
        # NOTE: the step's tokens checked at C speed; only a bad batch is walked, to name
        # the first bad token (each message built only then).
        if not (set(map(type, tokens)) <= _INT_TYPE
                and (not ints or (min(ints) >= 0 and max(ints) <= MAX_TOKEN_ID))):
            ints = [check_token(token, f"sampled token of {shown(rid)}")  # NumPy ints: ints
                    for rid, token in zip(samplers, tokens, strict=True)]
        # The decoders' tokens come first in ``ints``, the completed prefills' after them.
        firsts = dict(zip(samplers[len(decoding):], ints[len(decoding):], strict=True))
        self._update_started = True  # every token checked: the step applies from here
        finished = self._advance_chunks(step, stopped, lambda rid: [firsts[rid]])
        for req, token in zip(decoding, ints, strict=False):
            output = req.output
            output.append(token)
            if len(output) >= req.max_output_tokens or req.request_id in stopped:
                finished.append(req)
        return finished

    def _apply_speculative(self, step: ScheduledStep, decoding: list[Request],
                           sampled: Mapping[str, object],
                           stopped: Collection[str]) -> list[Request]:
        """``update`` with drafts: a decoding request's value in ``sampled`` is its accepted
        drafts and the token sampled after them (a token, or a list of 1 to its drafts + 1
        tokens); a request completing its prefill samples one token. Every value is checked
        before any is applied; output past ``max_output_tokens`` is dropped. Returns the
        requests that finish."""
        running = self.running
        num_drafts = dict(zip(step.decode_request_ids, step.num_draft_tokens, strict=True))
        completing = [chunk.request_id for chunk in step.context_chunks
                      if chunk.request_id in running and chunk.first_token + chunk.num_tokens
                      >= running[chunk.request_id].num_prefill_tokens]
        new: dict[str, list[int]] = {}
        for rid, most in [(req.request_id, 1 + num_drafts[req.request_id])
                          for req in decoding] + [(rid, 1) for rid in completing]:
            value = sampled.get(rid)
            # One token, unless a list: checked by check_token as every token is.
            tokens = value if value is None or isinstance(value, (list, tuple)) else [value]
            if not isinstance(tokens, (list, tuple)) or not 1 <= len(tokens) <= most:
                raise ValueError(
                    f"sampled tokens of {shown(rid)} must be a token or a list of 1..{most} "
                    f"(accepted drafts, then the token sampled after them), got {shown(value):.60}")
            new[rid] = [check_token(t, f"sampled token of {shown(rid)}") for t in tokens]
        # A completed prefill's one token is unappended, as a request absent from
        # ``_num_unappended`` is taken to have (its entry left at its admission).
        self._update_started = True  # every token checked: the step applies from here
        finished = self._advance_chunks(step, stopped, new.__getitem__)
        for req in decoding:
            tokens = new[req.request_id][:req.max_output_tokens - len(req.output)]
            req.output.extend(tokens)
            self._num_unappended[req.request_id] = len(tokens)
            if len(req.output) >= req.max_output_tokens or req.request_id in stopped:
                finished.append(req)
        return finished

    def _advance_chunks(self, step: ScheduledStep, stopped: Collection[str],
                        first_tokens: Callable[[str], list[int]]) -> list[Request]:
        """Advance the step's prefill chunks; a request whose prefill completed takes its
        first output, ``first_tokens(request_id)`` (checked). Returns the requests that
        finish with it."""
        finished = []
        running = self.running
        for chunk in step.context_chunks:
            req = running.get(chunk.request_id)
            if req is None:
                continue
            set_progress(req, num_computed_tokens=chunk.first_token + chunk.num_tokens)
            if not req.in_prefill:
                self._prefill_specs.pop(req.request_id, None)
                req.output.extend(first_tokens(req.request_id))
                if len(req.output) >= req.max_output_tokens or req.request_id in stopped:
                    finished.append(req)
        return finished
