"""A Redis fault: whose it is (a key's, or the node's) and the sentence that says what it
was, for ``last_error``. Pure; redis is imported lazily."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def describe_fault(exc: BaseException, shown_url: str, where: str = "") -> str:
    """One sentence saying what ``exc`` was, at the server of ``shown_url`` (redacted), on
    node ``where`` where given. Pure."""
    from redis.exceptions import (
        AskError,
        AuthenticationError,
        ClusterDownError,
        MasterDownError,
        MovedError,
        OutOfMemoryError,
        ResponseError,
    )

    where = f"redis at {shown_url}" + (f" (node {where})" if where else "")
    if isinstance(exc, AskError):  # MOVED too: slot, then the node that serves it
        kind = "MOVED" if isinstance(exc, MovedError) else "ASK"
        return f"{where}: a key's slot is served elsewhere ({kind} {exc})."
    if isinstance(exc, AuthenticationError) or "WRONGPASS" in str(exc) or "NOAUTH" in str(exc):
        return f"{where}: authentication failed ({exc})."
    if isinstance(exc, ClusterDownError):  # MASTERDOWN too
        kind = "MASTERDOWN" if isinstance(exc, MasterDownError) else "CLUSTERDOWN"
        return f"{where}: the node cannot serve ({kind} {exc})."
    if isinstance(exc, OutOfMemoryError):
        return f"{where}: out of memory, the server refused a write ({exc})."
    if isinstance(exc, ResponseError):
        return f"{where}: the server refused the command ({exc})."
    # NOTE: redis-py's texts end with a period of their own ("Connection refused.").
    return f"{where}: {type(exc).__name__}: {str(exc).rstrip('.')}."


def node_fault(replies: Sequence[Any]) -> Exception | None:
    """The refusal that says the node of ``replies`` (a pipeline's, ASKING's left out)
    cannot serve at all, or None where they are each their own key's. Pure.

    NOTE: CLUSTERDOWN for every command of a pipeline (the cluster down, as the node
    sees it) was each key's miss: the node's breaker never opened, and every batch sent
    it a pipeline, for as long as the cluster was down. One key's CLUSTERDOWN among
    served ones (its slot served by no node) is still that key's. LOADING (a server
    reading its data set after a restart) and MASTERDOWN (a replica cut off from its
    master) say so of the node whatever the key: one such reply fails the pipeline (on a
    standalone server too, whose writes took them as refusals, key by key)."""
    from redis.exceptions import BusyLoadingError, ClusterDownError, MasterDownError

    for reply in replies:
        if isinstance(reply, BusyLoadingError | MasterDownError):
            return reply
    faults = [r for r in replies if isinstance(r, ClusterDownError)]
    return faults[0] if faults and len(faults) == len(replies) else None
