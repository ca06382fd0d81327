"""A connection to a Redis server or cluster as the store makes it: redis-py's client with
kvtier's options (its own retries off, RESP2, large reads, every new connection's server
run id read), and a client of a cluster node the slot map does not list.

Every new connection reads its server's run id (``INFO server``): redis-py reconnects a
pooled connection the server closed without raising, so a restart, which loses every
block written, shows only there. redis is imported lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvtier.remote.redis_pipeline import read_reply

SOCKET_READ_BYTES = 1 << 20


def connect(url: str, *, cluster: bool, timeout_s: float, ca_file: str | None,
            on_connect: Callable[[Any], None]) -> Any:
    """redis-py's client of ``url`` (a ``RedisCluster`` with ``cluster``), each socket
    operation due within ``timeout_s``, verifying the server against ``ca_file`` where
    given; ``on_connect`` runs on every new connection (``redis_connect_func``)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # NOTE: redis-py's own retries are off: the store retries, counts and backs off.
    # It reads 64 KiB per recv by default; a block value is often MiBs: larger reads
    # mean fewer calls into the parser (a few % of read throughput, bench_remote.py).
    # RESP2 (redis-py 8 asks for RESP3 by default): every batch's replies are read off
    # the socket by ``kvtier.remote.resp``, and the store uses nothing of RESP3 (no
    # push messages can then come between a command and its reply).
    options: dict[str, Any] = dict(socket_timeout=timeout_s,
                                   socket_connect_timeout=timeout_s,
                                   retry=Retry(NoBackoff(), 0),
                                   socket_read_size=SOCKET_READ_BYTES,
                                   redis_connect_func=on_connect,
                                   protocol=2)
    if ca_file is not None:
        options["ssl_ca_certs"] = ca_file  # verify the server against this CA
    if cluster:
        from redis.cluster import RedisCluster

        # NOTE: with full coverage required, a cluster with one shard gone (its slots
        # served by no node; ``cluster-require-full-coverage no`` keeps the others
        # serving) refused every client made afterwards: every key missed.
        return RedisCluster.from_url(url, require_full_coverage=False, **options)
    return redis.Redis.from_url(url, **options)


def read_run_id(connection: Any, *, cluster: bool) -> tuple[str, str] | None:
    """The name (``host:port`` on a ``cluster``, else ``""``) and run id of the server of
    ``connection``, a new one being set up (a standalone client's own setup,
    authentication and the database, run first here; a cluster runs its own before);
    None where the server refuses ``INFO`` (an ACL without it) or names no run id."""
    from redis.exceptions import ResponseError

    if not cluster:
        connection.on_connect()
    try:
        connection.send_command("INFO", "server")
        reply = read_reply(connection)
    except ResponseError:
        return None
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    for line in text.splitlines():
        if line.startswith("run_id:"):
            name = (f"{connection.host}:{connection.port}" if cluster
                    and hasattr(connection, "host") else "")
            return name, line[len("run_id:"):].strip()
    return None


def unlisted_client(client: Any, server: str) -> Any:
    """A client of the cluster node ``server`` (``host:port``) that the slot map of
    ``client`` (redis-py's ``RedisCluster``) does not list, made as redis-py makes each
    node's: the cluster's options (timeouts, auth, TLS, the store's connection hook)."""
    from redis.cluster import ClusterNode

    host, _, port = server.rpartition(":")
    node = ClusterNode(host, int(port))  # type: ignore[no-untyped-call]
    client.nodes_manager.create_redis_connections([node])
    return node.redis_connection
