"""redis-py's clients of one Redis server or cluster, as the store holds them: the client,
made on first use and dropped after a fault that may have moved the cluster's slots, and a
client per node an ASK named that the slot map does not list (a node just added).

A batch takes the client (:meth:`RedisClients.get`), then a node's (:meth:`RedisClients.node`);
a fault closes that node's idle connections (:meth:`RedisClients.drop_idle`), never those
another thread has a batch in flight on. redis is imported lazily.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

from kvtier.remote.redis_connection import unlisted_client

WHOLE = ""  # the name of a standalone server, and of a cluster's topology (not a node)
# The most nodes ASK may name that the slot map does not list (each a client kept): past
# it, a server naming a new address at every reply would be a new client each time.
MAX_UNLISTED_NODES = 16


class RedisClients:
    """The client ``connect`` makes, kept until dropped, and the clients of unlisted nodes.
    May change: its own clients only. Thread-safe: one lock guards both books."""

    def __init__(self, connect: Callable[[], Any], is_closed: Callable[[], bool]) -> None:
        self._connect = connect
        self._is_closed = is_closed  # a pure query of the store's
        self._lock = threading.Lock()
        self._client: Any = None
        self._unlisted: dict[str, Any] = {}  # clients of ASK targets the slot map lacks

    def get(self) -> Any:
        """The client, made now where there is none; ConnectionError once the store is
        closed."""
        with self._lock:
            if self._is_closed():
                raise ConnectionError("the store is closed")
            if self._client is None:
                self._client = self._connect()
            return self._client

    def current(self) -> Any:
        """The client, or None where none is made. Pure."""
        with self._lock:
            return self._client

    def drop(self) -> None:
        """Close the client and every unlisted node's; the next :meth:`get` makes a new
        one (a cluster's slot map read again)."""
        with self._lock:
            client, self._client = self._client, None
            unlisted, self._unlisted = self._unlisted, {}
        for dropped in [client, *unlisted.values()]:
            if dropped is not None:
                with contextlib.suppress(Exception):
                    dropped.close()

    def node(self, client: Any, server: str, *, asked: bool = False) -> Any:
        """The client of ``server``: the standalone ``client`` itself, or a cluster node's;
        with ``asked`` (a node an ASK named) one the slot map does not list too, made once
        and kept until the cluster's client is dropped. ConnectionError for another node
        the slot map no longer lists.

        NOTE: redis-py's slot map lists the nodes that serve a slot (``CLUSTER SLOTS``): a
        node just added, to which its first slot is migrating, serves none yet, and every
        key of that slot gone to it missed."""
        if server == WHOLE:
            return client
        node = client.get_node(node_name=server)
        if node is not None:
            return client.get_redis_connection(node)
        with self._lock:
            made = self._unlisted.get(server)
            if made is None and asked and len(self._unlisted) < MAX_UNLISTED_NODES:
                made = self._unlisted[server] = unlisted_client(client, server)
        if made is None:
            raise ConnectionError(f"cluster node {server} is not in the slot map")
        return made

    def drop_idle(self, server: str) -> None:
        """After a fault of one of ``server``'s connections (that one closed by
        ``pipeline``, or by redis-py): close its idle pooled connections too, which
        reconnect when next taken. Those in use by other threads are left to complete.

        NOTE: the whole client was dropped here, its pool's connections in use closed with
        it: one reader's fault (a reset, garbage, a timeout, even a refusal, which leaves
        its connection in step) failed the reads and writes other threads had in flight on
        connections that were sound. A server restarted or gone is found by each
        connection on its own; the idle ones, which may be stale alike (a host gone
        without closing them), are closed so that a retry does not wait on each."""
        client = self.current()
        if client is not None:
            with contextlib.suppress(Exception):
                self.node(client, server).connection_pool.disconnect(inuse_connections=False)

    def reload_slots(self) -> None:
        """Read the cluster's slot map again (a failure leaves the old one)."""
        client = self.current()
        if client is not None:
            with contextlib.suppress(Exception):
                client.nodes_manager.initialize()
