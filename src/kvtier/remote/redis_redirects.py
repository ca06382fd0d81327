"""A cluster's redirects of a batch's keys, and the replies of a chunk sorted by them.

A redirect is followed once per key, in the same call: a read, probe or write answered
MOVED (a resharded slot) is made again once the slot map is read again, one answered ASK
(its slot migrating) on the node the ASK names (one the slot map does not list too: a node
just added serves no slot yet), right after ``ASKING``, in one pipeline per node, the slot
map unchanged; one answered TRYAGAIN (its slot mid-resharding) is asked again once on its
node, after the backoff (on an ASK's target too, ``ASKING`` first)::

    GET k1 k2 k3 ──node A──> v1, ASK B (k2), MOVED C (k3)
    k2: ASKING, GET k2 ──node B──> v2          a redirect again: given up
    k3: slot map read again, GET k3 ──node C──> v3, or an ASK: followed as k2's;
                                                a MOVED again: given up

A redirect answered by another (an ASK answered MOVED or ASK, a MOVED again) is given up:
a miss, counted (``num_redirects_given_up``). The store follows them
(``kvtier.remote.redis_store``); this module only sorts. redis is imported lazily.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple


class Redirects(NamedTuple):
    """The keys of a batch (their indices) a cluster redirected: answered MOVED (their slot
    resharded), per node an ASK named, answered ASK (their slot migrating to it), and per
    node that answered it, TRYAGAIN (their slot mid-resharding: to be asked again)."""

    moved: list[int]
    asked: dict[str, list[int]]
    tryagain: dict[str, list[int]]

    @classmethod
    def none(cls) -> Redirects:
        """No redirect yet. Pure."""
        return cls([], {}, {})

    @classmethod
    def merged(cls, parts: Sequence[Redirects]) -> Redirects:
        """The redirects of ``parts`` (a batch's chunks) together. Pure."""
        whole = cls.none()
        for part in parts:
            whole.moved.extend(part.moved)
            for node, indices in part.asked.items():
                whole.asked.setdefault(node, []).extend(indices)
            for node, indices in part.tryagain.items():
                whole.tryagain.setdefault(node, []).extend(indices)
        whole.moved.sort()
        for indices in [*whole.asked.values(), *whole.tryagain.values()]:
            indices.sort()
        return whole


class Refusals(NamedTuple):
    """The replies of a chunk that answer nothing: refusals (the first to be described),
    of which ``num_given_up`` are redirects not followed."""

    refused: list[Exception]
    num_given_up: int


def take_replies(chunk: list[int], replies: Sequence[Any], answers: list[Any],
                 answer: Callable[[Any], Any], server: str, redirects: Redirects, *,
                 cluster: bool, follow_moved: bool, follow_ask: bool,
                 follow_tryagain: bool = False) -> Refusals:
    """Put the ``replies`` from ``server`` of the keys at ``chunk`` in ``answers``, as
    ``answer`` makes each, but note in ``redirects`` those to follow (on a ``cluster``: a
    MOVED with ``follow_moved``, an ASK with ``follow_ask``, a TRYAGAIN with
    ``follow_tryagain``). A refusal leaves its key's answer as it was and is returned; on a
    cluster a redirect not followed came in reply to a redirect already (none follows
    another of its kind; none follows an ASK): given up, counted in the result too. May
    change: ``answers`` and ``redirects`` only."""
    from redis.exceptions import AskError, MovedError, TryAgainError

    refused: list[Exception] = []
    num_given_up = 0
    for i, reply in zip(chunk, replies, strict=True):
        if not isinstance(reply, Exception):
            answers[i] = answer(reply)
            continue
        if follow_tryagain and isinstance(reply, TryAgainError):
            redirects.tryagain.setdefault(server, []).append(i)
            continue
        if cluster and isinstance(reply, AskError):  # MovedError is one too
            if isinstance(reply, MovedError) and follow_moved:
                redirects.moved.append(i)
                continue
            if not isinstance(reply, MovedError) and follow_ask:
                redirects.asked.setdefault(f"{reply.host}:{reply.port}", []).append(i)
                continue
            num_given_up += 1
        refused.append(reply)
    return Refusals(refused, num_given_up)
