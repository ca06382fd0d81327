"""Following a cluster's redirects of a batch's keys: :class:`RedirectFollower`, the part of
:class:`~kvtier.remote.redis_store.RedisRemoteStore` that makes again the keys a chunk's
replies redirected (``kvtier.remote.redis_redirects`` sorts them), within the batch's
deadline::

    TRYAGAIN (node A) ── backoff ──> the command again on A, once  (_retry_tryagain)
    ASK B               ── ASKING, the command on B, once           (_follow_asks)
    MOVED               ── slot map read again, the batch redone    (_redo_moved)

A redirect answered by another is given up: a miss (or a failed write), counted. A mixin
of the store: it reads the store's client, options and counters, and sends through its
pipelines (``_run``); it owns no state. redis is imported lazily.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from kvtier.remote.redis_pipeline import Read
from kvtier.remote.redis_redirects import Redirects, take_replies
from kvtier.remote.redis_url import redact_url
from kvtier.remote.resp import read_asking_replies, read_replies

if TYPE_CHECKING:
    from kvtier.remote.redis_clients import RedisClients

__all__ = ["RedirectFollower"]


class RedirectFollower:
    """The redirect-following methods of ``RedisRemoteStore`` (a mixin: what it reads of
    the store is declared below). May change: the answers it is handed, the store's
    ``last_error`` and counters, and its slot map (``_redo_moved``)."""

    if TYPE_CHECKING:
        cluster: bool
        url: str
        timeout_s: float
        backoff_s: float
        last_error: str | None
        _clients: RedisClients

        def _describe(self, exc: BaseException, where: str = ...) -> str: ...

        def _count(self, **deltas: int) -> None: ...

        def _chunks(self, sizes: list[int], min_chunks: int = 1) -> Iterator[slice]: ...

        def _run(self, server: str, commands: list[tuple[Any, ...]], *,
                 raise_on_error: bool = True, read: Read = read_replies,
                 asked: bool = False, retry: bool = True) -> list[Any] | None: ...

    def _take(self, chunk: list[int], replies: Sequence[Any], answers: list[Any],
              answer: Callable[[Any], Any], server: str, redirects: Redirects, *,
              follow_moved: bool, follow_ask: bool, follow_tryagain: bool = False) -> None:
        """``take_replies`` (``kvtier.remote.redis_redirects``), its refusals counted as
        errors (the first described in ``last_error``) and its redirects given up in
        ``num_redirects_given_up``."""
        refused, num_given_up = take_replies(
            chunk, replies, answers, answer, server, redirects, cluster=self.cluster,
            follow_moved=follow_moved, follow_ask=follow_ask, follow_tryagain=follow_tryagain)
        if refused:
            description = self._describe(refused[0], server)
            if num_given_up:
                description = (f"{description.removesuffix('.')}; {num_given_up} keys "
                               f"redirected again after a redirect: given up.")
            self.last_error = description
            self._count(num_errors=len(refused), num_redirects_given_up=num_given_up)

    def _follow_asks(self, asked: dict[str, list[int]], answers: list[Any],
                     command: Callable[[int], tuple[Any, ...]], answer: Callable[[Any], Any],
                     sizes: list[int], deadline_s: float, *, scalars: bool = True) -> None:
        """The keys at ``asked`` (per node an ASK named: their slot migrating to it) made
        there, each ``command`` right after an ``ASKING`` (which lets a node serve the
        next command on a key of a slot it is importing), in one pipeline per node and
        chunk (of ``sizes``); their answers put in ``answers`` as ``_take`` puts them; those
        the target answered TRYAGAIN asked there once more, ``ASKING`` first, as
        ``_retry_tryagain`` asks them (within ``deadline_s``).

        NOTE: the slot map is left as it is (the slot is still its source's until the
        migration ends: a MOVED tells then). Each key is asked once: a redirect in reply
        (MOVED back to the source, another ASK) is given up, a miss or not written,
        counted, never followed round a loop. A node the slot map does not list (one just
        added, its first slot migrating to it) is asked all the same (``RedisClients.node``); a
        node down fails its own pipelines (its own breaker). A TRYAGAIN from the target
        (its side of the slot mid-resharding) was its key's error at once, though the
        MOVED and plain paths ask it again: a hit lost."""
        read = partial(read_asking_replies, scalars=scalars)
        tryagain = Redirects.none()
        for target, indices in asked.items():
            self._count(num_asked=len(indices))
            for part in self._chunks([sizes[i] for i in indices]):
                chunk = indices[part]
                commands = [c for i in chunk for c in (("ASKING",), command(i))]
                replies = self._run(target, commands, raise_on_error=False, read=read,
                                    asked=True)
                if replies is None or len(replies) != len(commands):
                    continue
                # replies[0::2] are ASKING's: one refused leaves its command answered MOVED
                self._take(chunk, replies[1::2], answers, answer, target, tryagain,
                           follow_moved=False, follow_ask=False, follow_tryagain=True)
        self._retry_tryagain(tryagain.tryagain, answers, command, answer, sizes, deadline_s,
                             read=read, asked=True)

    def _retry_tryagain(self, tryagain: dict[str, list[int]], answers: list[Any],
                        command: Callable[[int], tuple[Any, ...]],
                        answer: Callable[[Any], Any], sizes: list[int], deadline_s: float,
                        *, read: Read = read_replies, asked: bool = False) -> None:
        """The keys at ``tryagain`` (per node that answered TRYAGAIN: their slot being
        resharded) made there once more, each ``command``, after the backoff, their
        answers put in ``answers`` as ``_take`` puts them, one pipeline each, never sent
        again; a pipeline whose worst case (a reply's ``timeout_s``, after the backoff)
        would end past ``deadline_s`` (the batch's start and ``max_blocking_s``) is not
        sent: each of its keys a miss (or failed write), counted. With ``asked`` (the keys
        an ASK sent to ``server``) each command follows an ``ASKING``, as
        ``_follow_asks`` sends them.

        NOTE: TRYAGAIN was each key's miss at once, though the node answers it for the
        moment a slot's keys are split between two nodes: a value in the cluster lost to
        a recompute. Once only: a TRYAGAIN again (or a redirect) is that key's refusal."""
        if not tryagain:
            return
        slept = False
        for server, indices in tryagain.items():
            for part in self._chunks([sizes[i] for i in indices]):
                chunk = indices[part]
                backoff_s = 0.0 if slept else self.backoff_s
                if time.monotonic() + backoff_s + self.timeout_s > deadline_s:
                    self.last_error = (
                        f"redis at {redact_url(self.url)} (node {server}): {len(chunk)} keys "
                        f"answered TRYAGAIN (their slot being resharded) and the batch had "
                        f"no time left to ask again: they miss.")
                    self._count(num_errors=len(chunk))
                    continue
                if not slept:
                    time.sleep(self.backoff_s)
                    slept = True
                self._count(num_tryagain_retries=len(chunk))
                commands = [c for i in chunk
                            for c in ((("ASKING",), command(i)) if asked else (command(i),))]
                replies = self._run(server, commands, raise_on_error=False, read=read,
                                    asked=asked, retry=False)
                if replies is None or len(replies) != len(commands):
                    continue
                self._take(chunk, replies[1::2] if asked else replies, answers, answer,
                           server, Redirects.none(), follow_moved=False, follow_ask=False)

    def _redo_moved(self, moved: list[int], answers: list[Any], deadline_s: float,
                    redo: Callable[[list[int]], list[Any] | None]) -> bool:
        """The keys at ``moved`` (answered MOVED: their slot resharded) made again by
        ``redo`` once the cluster's slot map is read again, their new answers put in
        ``answers``; False, changing nothing, where ``redo`` failed as a whole (None). A
        redo due once ``deadline_s`` (the batch's) has passed is not made: each key a miss
        (or failed write), counted, True; one made spends what is left (its pipelines,
        each due within ``timeout_s``, never sent again).

        NOTE: the redo was a batch of its own, due within a fresh ``max_blocking_s``: a
        batch whose slow node answered MOVED late took up to twice ``max_blocking_s``."""
        if time.monotonic() >= deadline_s:
            self.last_error = (
                f"redis at {redact_url(self.url)}: {len(moved)} keys answered MOVED (their "
                f"slot resharded) and the batch had no time left to ask again: they miss.")
            self._count(num_errors=len(moved))
            return True
        self._clients.reload_slots()
        again = redo(moved)
        if again is None:
            return False
        for i, answer in zip(moved, again, strict=True):
            answers[i] = answer
        return True
