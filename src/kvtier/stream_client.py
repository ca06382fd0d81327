"""The Redis client of the event streams (extra ``redis``, imported only when a client is
made): the connection (``connect``, to a server or a cluster), a command whose Redis fault
is a gap, not an exception (``attempt``), a Lua script run on a client or a pipeline
(``run_script``), and the keys beside a stream (``claim_key``, ``snapshot_key``, and the
names of before: ``legacy_claim_key``, ``legacy_snapshot_key``).

The keys beside a stream share its hash slot, so that one script or transaction may touch
them with the stream on a Redis Cluster: ``{<stream>}:snapshot:<instance>`` hashes as the
stream ``<stream>`` does (a stream whose name has a hash tag of its own keeps
``<stream>:snapshot:<instance>``, which carries that tag).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

from kvtier.sequence import short_repr

__all__ = [
    "attempt",
    "check_cluster",
    "check_stream",
    "claim_key",
    "connect",
    "get_either",
    "key_prefix",
    "legacy_claim_key",
    "legacy_snapshot_key",
    "run_script",
    "snapshot_key",
]

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


def check_cluster(stream: str, cluster: object) -> None:
    """ValueError unless ``cluster`` is a bool, or where it is True and the keys beside
    ``stream`` cannot share its slot (``key_prefix``). Pure."""
    if type(cluster) is not bool:
        raise ValueError(f"cluster must be a bool, got {short_repr(cluster)}")
    if cluster and key_prefix(stream) is None:
        raise ValueError(f"stream {short_repr(stream)} has a '}}' but no hash tag: its "
                         f"snapshot and claim keys cannot share its slot on a cluster; "
                         f"name it without '}}', or with a tag ('{{tag}}...')")


def connect(url: str, cluster: bool = False) -> Any:
    """A redis-py client of ``url``: a ``RedisCluster`` with ``cluster`` (a cluster with a
    shard gone still serves the others' slots); ImportError naming the extra without
    redis-py. NOTE: a ``RedisCluster`` reads the slot map when made: where no node of
    ``url`` answers, redis-py's error is raised here, at construction (a server's client
    connects at its first command).

    NOTE: a plain client of a cluster node failed every command of a key another node
    serves (MOVED, a lost batch counted): 14 of 20 keys on the three-node test cluster."""
    try:
        import redis
    except ImportError:
        raise ImportError(
            "Redis event streams need redis-py: pip install 'kvtier[redis]'") from None
    if cluster:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(url, require_full_coverage=False)
    return redis.Redis.from_url(url)


def run_script(client: Any, script: str, numkeys: int, *keys_and_args: str) -> Any:
    """``EVAL script numkeys *keys_and_args`` on ``client``, a connection or a pipeline
    (where it is queued). Raises what redis-py raises: callers ``attempt`` it.

    NOTE: redis-py's cluster pipeline has no ``eval`` (it raises); the command itself
    goes to the slot of its keys."""
    if type(client).__name__ == "ClusterPipeline":
        return client.execute_command("EVAL", script, numkeys, *keys_and_args)
    return client.eval(script, numkeys, *keys_and_args)


def close(client: Any) -> None:
    """Close ``client``'s connections (a client without ``close``, a test's fake, is left
    as it is); never raises: a connection already broken is closed as far as it can be."""
    closer = getattr(client, "close", None)
    if closer is not None:
        with contextlib.suppress(Exception):  # a broken socket is as closed as it gets
            closer()


def _has_hash_tag(key: str) -> bool:
    """Whether Redis Cluster hashes ``key`` by a tag: a ``{`` followed, later, by a ``}``
    with something between the first two. Pure."""
    start = key.find("{")
    return start >= 0 and key.find("}", start + 1) > start + 1


def key_prefix(stream: str) -> str | None:
    """The prefix of the keys beside ``stream`` that hashes to its slot: ``{<stream>}``,
    or ``stream`` itself where it has a hash tag; None where neither does (a ``}`` and
    no tag: ``{a}b}`` hashes ``a``, not ``a}b``). Pure."""
    if _has_hash_tag(stream):
        return stream
    return None if "}" in stream else f"{{{stream}}}"


def claim_key(stream: str, instance_id: str) -> str:
    """The key naming the incarnation that publishes ``instance_id`` on ``stream`` now
    (its claim: ``RedisStreamPublisher``), in the stream's slot (``key_prefix``). Pure."""
    return _side_key(stream, "incarnation", instance_id)


def snapshot_key(stream: str, instance_id: str) -> str:
    """The key of ``instance_id``'s snapshot on ``stream``, in the stream's slot
    (``key_prefix``). Pure."""
    return _side_key(stream, "snapshot", instance_id)


def legacy_claim_key(stream: str, instance_id: str) -> str | None:
    """The claim's key as publishers before hash tags named it, where it differs from
    ``claim_key``; subscribers read it where the new one is missing. Pure."""
    return _legacy_key(stream, "incarnation", instance_id)


def legacy_snapshot_key(stream: str, instance_id: str) -> str | None:
    """The snapshot's key as publishers before hash tags named it, where it differs from
    ``snapshot_key``; subscribers read it where the new one is missing. Pure."""
    return _legacy_key(stream, "snapshot", instance_id)


def _side_key(stream: str, kind: str, instance_id: str) -> str:
    """The ``kind`` key of ``instance_id`` beside ``stream``, in its slot. Pure."""
    return f"{key_prefix(stream) or stream}:{kind}:{instance_id}"


def _legacy_key(stream: str, kind: str, instance_id: str) -> str | None:
    """The ``kind`` key of ``instance_id`` as named before hash tags, where it differs from
    :func:`_side_key`'s. Pure."""
    old = f"{stream}:{kind}:{instance_id}"
    return None if old == _side_key(stream, kind, instance_id) else old


def get_either(client: Any, key: str, legacy: str | None) -> Any:
    """``GET key``, or ``GET legacy`` where that found nothing (or failed) and there is
    one; None where neither answered."""
    value = attempt(client.get, key)
    if value is None and legacy is not None:
        value = attempt(client.get, legacy)
    return value
