"""The Redis client of the event streams (extra ``redis``, imported only when a client is
made): the connection (``connect``, to a server or a cluster, made at its first command:
``LazyCluster``), a command whose Redis fault is a gap, not an exception (``attempt``), a
Lua script run on a client or a pipeline (``run_script``), and the keys beside a stream
(``claim_key``, ``snapshot_key``, and the names of before: ``legacy_claim_key``,
``legacy_snapshot_key``).

The keys beside a stream share its hash slot, so that one script or transaction may touch
them with the stream on a Redis Cluster: ``{<stream>}:snapshot:<instance>`` hashes as the
stream ``<stream>`` does (a stream whose name has a hash tag of its own keeps
``<stream>:snapshot:<instance>``, which carries that tag).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kvtier.remote.redis_url import redact_url
from kvtier.reprs import shown
from kvtier.sequence import short_repr

__all__ = [
    "CLUSTER_RETRY_CAP_S",
    "CLUSTER_RETRY_FIRST_S",
    "COMMAND_TIMEOUT_S",
    "CONNECT_TIMEOUT_S",
    "LazyCluster",
    "attempt",
    "check_cluster",
    "check_stream",
    "claim_key",
    "client_options",
    "connect",
    "get_each",
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
    out, a cluster no node of which answers): a fault of the event stream is a gap a resync
    repairs, never an exception in the loop.

    NOTE: redis-py's cluster errors are no ``RedisError``: a ``RedisCluster`` whose every
    node went down raised ``RedisClusterUnreachableError`` out of the serving loop."""
    import redis
    from redis.exceptions import RedisClusterException

    try:
        return command(*args, **options)
    except (redis.RedisError, RedisClusterException, OSError):
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
    shard gone still serves the others' slots), made at its first command
    (:class:`LazyCluster`); ImportError naming the extra without redis-py, ValueError
    naming the URL (its password hidden) for one redis-py cannot use. Neither kind of
    client contacts Redis here: a server's connects at its first command too.

    NOTE: a plain client of a cluster node failed every command of a key another node
    serves (MOVED, a lost batch counted): 14 of 20 keys on the three-node test cluster."""
    try:
        import redis
    except ImportError:
        raise ImportError(
            "Redis event streams need redis-py: pip install 'kvtier[redis]'") from None
    if cluster:
        return LazyCluster(url)
    return redis.Redis.from_url(url, **client_options())


# Each command of the event streams runs in a serving loop (an engine's step, a router's
# poll), and a fault of theirs is a gap a resync repairs: a node that cannot answer must
# cost a command little, not the seconds redis-py's defaults wait. A connect is due
# within CONNECT_TIMEOUT_S (a connect in one data centre takes well under a millisecond
# to a few: 0.1 s is 20-100 times that; a host that drops packets costs that much a
# try), each socket read or write within COMMAND_TIMEOUT_S (the streams' commands are
# small and Redis answers them in well under a millisecond; a large reply, a snapshot of
# up to 32 MiB, is read as it comes, each read due within it; half the remote store's
# default ``timeout_s``: the store's misses cost a recompute, a stream's one step).
# A blocking read waits at most ``event_stream.BLOCK_SLICE_MS`` a command, below it.
CONNECT_TIMEOUT_S = 0.1
COMMAND_TIMEOUT_S = 0.25


def client_options() -> dict[str, Any]:
    """The options of redis-py's client (a server's, or a cluster's and each of its
    nodes'): the timeouts above, and no retry of redis-py's (one try a command: the
    loop's next command is the retry, after a cluster's slot map is read again where the
    fault asked for it; the remote store turns them off too, and retries on its own).

    NOTE: redis-py's defaults waited 5 s for a connect and for each read (a server that
    accepts and never answers, a host that drops packets: 5 s a command), and a
    ``RedisCluster`` retried a command 10 times with a backoff of up to 1 s: a command
    for the slots of one node down of three took about 4 s and 11 connects."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return dict(socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=COMMAND_TIMEOUT_S,
                retry=Retry(NoBackoff(), 0))


# The first wait of a cluster client after no node answered, doubled at each fault while
# it lasts up to the cap, and forgotten at the first command served (``LazyCluster``).
CLUSTER_RETRY_FIRST_S = 0.5
CLUSTER_RETRY_CAP_S = 8.0


class LazyCluster:
    """A ``RedisCluster`` of ``url``, made at its first command rather than here: a command
    of a cluster no node of which answers fails as a server's that is down does (a
    redis-py error, which ``attempt`` takes for a gap). The URL is checked here:
    ValueError naming it for a scheme redis-py refuses, a ``unix://`` socket or a
    database other than 0 (a cluster has only 0).

    Where no node answers (the client could not be made, or a command or pipeline raised
    redis-py's ``RedisClusterException``), commands fail at once, a redis-py
    ``ConnectionError`` contacting nothing, until a wait on ``clock`` has passed:
    ``CLUSTER_RETRY_FIRST_S``, doubled at each fault up to ``CLUSTER_RETRY_CAP_S``; the
    first command served forgets it. A node down while others answer is no such fault
    (redis-py's ``ConnectionError``): the other shards' slots are served as before.

    NOTE: redis-py's ``RedisCluster`` reads the slot map when made: with no node of the
    cluster answering (down at start, or not up yet), making a publisher or subscriber
    raised ``RedisClusterUnreachableError``, where one of a standalone server that was
    down was made and counted its faults; the remote store made its client lazily.
    NOTE: without the wait, every command of a cluster gone down tried each node again,
    with redis-py's retries: 10 connection attempts and 1.2-1.4 s a command on the
    three-node test cluster, in the serving loop (a standalone server down costs one
    refused connection, well under a millisecond: it has no wait)."""

    def __init__(self, url: str, clock: Callable[[], float] = time.monotonic) -> None:
        from redis.connection import parse_url

        try:
            options = parse_url(url)  # type: ignore[no-untyped-call]
        except ValueError as exc:
            raise ValueError(f"url {shown(redact_url(url))} is no Redis URL: {exc}") from None
        if "path" in options:
            raise ValueError(f"a Redis Cluster is reached over TCP, not a unix:// socket: "
                             f"got {shown(redact_url(url))}")
        if options.get("db", 0) != 0:
            raise ValueError(f"a Redis Cluster has database 0 only, the url names database "
                             f"{options['db']}: {shown(redact_url(url))}")
        self._url = url
        self._clock = clock
        self._lock = threading.Lock()
        self._client: Any = None
        self._wait_s = 0.0  # the current wait (0: no node known down)
        self._retry_at_s = -math.inf  # on ``clock``: no command contacts Redis before it

    def client(self) -> Any:
        """The ``RedisCluster``, made now where none is (raising redis-py's error where no
        node answers, or a ``ConnectionError`` at once while the wait after that lasts:
        callers ``attempt`` their command)."""
        from redis.cluster import RedisCluster
        from redis.exceptions import ConnectionError as RedisConnectionError

        with self._lock:
            now = self._clock()
            if now < self._retry_at_s:
                raise RedisConnectionError(
                    f"no node of the Redis Cluster {redact_url(self._url)} answered: next "
                    f"try in {self._retry_at_s - now:.2f} s")
            if self._client is None:
                try:
                    self._client = RedisCluster.from_url(
                        self._url, require_full_coverage=False, **client_options())
                except Exception as exc:
                    self._fault(exc)
                    raise
            return self._client

    def _fault(self, exc: BaseException) -> None:
        """Start or lengthen the wait where ``exc`` says no node answers."""
        from redis.exceptions import RedisClusterException

        if isinstance(exc, RedisClusterException):
            self._wait_s = min(CLUSTER_RETRY_CAP_S, 2 * self._wait_s or CLUSTER_RETRY_FIRST_S)
            self._retry_at_s = self._clock() + self._wait_s

    def _served(self) -> None:
        self._wait_s, self._retry_at_s = 0.0, -math.inf

    def _guarded(self, method: Callable[..., Any]) -> Callable[..., Any]:
        """``method`` of the client, its faults starting the wait, a success ending it; a
        pipeline's ``execute`` guarded as well."""

        def call(*args: Any, **options: Any) -> Any:
            try:
                result = method(*args, **options)
            except Exception as exc:
                with self._lock:
                    self._fault(exc)
                raise
            if method.__name__ == "pipeline":
                result.execute = self._guarded(result.execute)
            else:
                with self._lock:
                    self._served()
            return result

        return call

    def __getattr__(self, name: str) -> Any:
        """The client's attribute ``name``; a method is one that makes the client when
        called where none is, and waits as ``client`` says (``getattr(client,
        "xinfo_stream", None)`` makes nothing)."""
        if name.startswith("_"):
            raise AttributeError(name)
        from redis.cluster import RedisCluster

        if not callable(getattr(RedisCluster, name)):  # AttributeError where it has none
            return getattr(self.client(), name)

        def call(*args: Any, **options: Any) -> Any:
            return self._guarded(getattr(self.client(), name))(*args, **options)

        return call

    def close(self) -> None:
        """Close the client's connections, where it was made (idempotent)."""
        with self._lock:
            made, self._client = self._client, None
        if made is not None:
            made.close()


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
    """``GET key``, or ``GET legacy``'s value where that found nothing (or failed) and
    there is one; None where neither answered (``get_each`` of one key: one round trip)."""
    return get_each(client, [(key, legacy)])[0]


def get_each(client: Any, keys: list[tuple[str, str | None]]) -> list[Any]:
    """For each ``(key, legacy)`` of ``keys``: ``key``'s value, or ``legacy``'s where that
    found nothing (or failed) and there is one; None where neither answered. Every GET in
    one pipeline (one round trip) where ``client`` pipelines, else one GET a key.

    NOTE: the old name was asked only after the new one missed, each GET a round trip of
    its own: a stale instance without a snapshot cost two a try, twice a poll (12 GETs a
    poll for three). Asked together, a poll's snapshot reads are one round trip, whatever
    the number of stale instances."""
    if not keys:
        return []
    make_pipeline = getattr(client, "pipeline", None)
    if make_pipeline is None:  # a client without pipelines: a GET each, as before
        values = [attempt(client.get, key) for key, _ in keys]
        return [attempt(client.get, legacy) if value is None and legacy is not None
                else value for value, (_, legacy) in zip(values, keys, strict=True)]

    def send() -> object:
        pipe = make_pipeline(transaction=False)
        for key, legacy in keys:
            pipe.get(key)
            if legacy is not None:
                pipe.get(legacy)
        return pipe.execute(raise_on_error=False)

    replies = attempt(send)
    num_replies = sum(1 if legacy is None else 2 for _, legacy in keys)
    if not isinstance(replies, list) or len(replies) != num_replies:
        return [None] * len(keys)  # Redis down: asked again at the next try
    found = iter(None if isinstance(reply, Exception) else reply for reply in replies)
    out = []
    for _, legacy in keys:
        value = next(found)
        old = None if legacy is None else next(found)
        out.append(old if value is None else value)
    return out
