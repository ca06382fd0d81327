"""The Redis client of the event streams (extra ``redis``, imported only when a client is
made): the connection (``connect``), a command whose Redis fault is a gap, not an exception
(``attempt``), and the keys beside a stream (``claim_key``, ``snapshot_key``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

from kvtier.sequence import short_repr

__all__ = ["attempt", "check_stream", "claim_key", "connect", "snapshot_key"]

_T = TypeVar("_T")


def attempt(command: Callable[..., _T], *args: Any, **options: Any) -> _T | None:
    """``command(*args, **options)`` of redis-py, or None where Redis failed (down, timed
    out): a fault of the event stream is a gap a resync repairs, never an exception in the
    loop."""
    import redis

    try:
        return command(*args, **options)
    except (redis.RedisError, OSError):
        return None


def check_stream(stream: object) -> None:
    """ValueError unless ``stream`` is a non-empty str."""
    if not isinstance(stream, str) or not stream:
        raise ValueError(f"stream must be a non-empty str, got {short_repr(stream)}")


def connect(url: str) -> Any:
    """A redis-py client of ``url``; ImportError naming the extra without redis-py."""
    try:
        import redis
    except ImportError:
        raise ImportError(
            "Redis event streams need redis-py: pip install 'kvtier[redis]'") from None
    return redis.Redis.from_url(url)


def close(client: Any) -> None:
    """Close ``client``'s connections (a client without ``close``, a test's fake, is left
    as it is); never raises: a connection already broken is closed as far as it can be."""
    closer = getattr(client, "close", None)
    if closer is not None:
        with contextlib.suppress(Exception):  # a broken socket is as closed as it gets
            closer()


def claim_key(stream: str, instance_id: str) -> str:
    """The key naming the incarnation that publishes ``instance_id`` on ``stream`` now
    (its claim: ``RedisStreamPublisher``). Pure."""
    return f"{stream}:incarnation:{instance_id}"


def snapshot_key(stream: str, instance_id: str) -> str:
    """The key of ``instance_id``'s snapshot on ``stream``. Pure."""
    return f"{stream}:snapshot:{instance_id}"
