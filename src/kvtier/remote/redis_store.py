"""The remote tier on Redis or Valkey through redis-py, standalone or Redis Cluster.

Every batch is one pipelined round trip per chunk: MGET on a standalone server; on a
cluster, the keys are grouped by the node that owns their slot and each node gets its own
pipeline, retries and circuit breaker, so a dead node costs only the keys of its slots::

    keys ──group by slot owner──> node A: GET k1 k4 ...   ok      -> values
                                  node B: GET k2 ...      down    -> misses (B's breaker)
                                  node C: GET k3 k5 ...   ok      -> values

With ``num_connections`` > 1 a read's chunks run at once, one connection each (a batch of
at least that many keys is cut into at least that many chunks; a cluster's nodes are read
at once too), so the server streams values while the client parses others::

    get_many(32 blocks), num_connections=4 ──> conn 1: MGET k1..k8    ┐
                                               conn 2: MGET k9..k16   │ in parallel,
                                               conn 3: MGET k17..k24  │ results in order
                                               conn 4: MGET k25..k32  ┘

A fault (server down, slow, out of memory, auth) costs at most :attr:`max_blocking_s` per
chunk and node (a reply is due within ``timeout_s``, and as much again per MiB that came),
is counted in ``stats`` and turns into misses or failed puts of that chunk alone (a
connection that failed is closed, and the idle ones; another thread's batch in flight
completes on its own); after ``breaker_threshold`` failed batches in a row to one server
its breaker opens for ``cooldown_s``, then lets one batch probe.
On a cluster a key's own fault stays that key's: a value of another type under it, a slot
that no node serves (a shard gone, with ``cluster-require-full-coverage no``), TRYAGAIN or
CLUSTERDOWN, is its miss (or failed write), never its chunk's or its node's breaker's (a
TRYAGAIN is asked again once first, after the backoff, where the batch's ``max_blocking_s``
leaves time for it: ``num_tryagain_retries``); but CLUSTERDOWN for every command of a
pipeline (the cluster down, as the node sees it) is the node's fault, as a connection's
is: its breaker counts it; so is one LOADING or MASTERDOWN reply, on any server (it cannot
serve any key). A redirect (MOVED, ASK) is followed once per key, in the same call
(``kvtier.remote.redis_redirects``); one answered by another is given up:
a miss, counted (``num_redirects_given_up``). The URL's query may not set what the options
here check (redis-py lets it win).
redis is imported lazily: ``import kvtier.remote`` works without it. The store's parts,
one module each under ``kvtier.remote``::

    redis_url.py         the URL checked at construction, and shown without its secrets
    redis_connection.py  redis-py's client with kvtier's options; a server's run id
    redis_clients.py     the client held, each node's, idle connections closed on a fault
    redis_pipeline.py    one pipeline's round trip, its replies read off the socket (resp.py)
    redis_faults.py      whose a fault is (a key's or the node's), and its sentence
    redis_redirects.py   a chunk's replies sorted: answers, refusals, redirects to follow
    redis_follow.py      the redirects followed: TRYAGAIN, ASK, MOVED (a mixin)
    breaker.py           a circuit breaker per server or node: closed, open, half-open
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

from kvtier.remote.breaker import Breakers, BreakerState
from kvtier.remote.codec import RemoteNamespace
from kvtier.remote.options import check_count, check_number
from kvtier.remote.redis_clients import WHOLE, RedisClients
from kvtier.remote.redis_connection import connect, read_run_id
from kvtier.remote.redis_faults import describe_fault, node_fault
from kvtier.remote.redis_follow import RedirectFollower
from kvtier.remote.redis_pipeline import (
    Read,
    exists_answer,
    get_answer,
    mget,
    pipeline,
    set_answer,
)
from kvtier.remote.redis_redirects import Redirects
from kvtier.remote.redis_url import URL_SCHEMES, check_url_query, redact_url
from kvtier.remote.resp import read_get_replies, read_replies
from kvtier.remote.store import RemoteStoreBase
from kvtier.reprs import shown

T = TypeVar("T")

MAX_TIMEOUT_S = 3600.0
MAX_BACKOFF_S = 60.0  # also the cap of one retry's sleep, whatever the doubling gives
MAX_COOLDOWN_S = 86400.0
MAX_TTL_S = 10 * 365 * 86400.0
MAX_RETRIES = 100
MAX_COUNT = 1 << 20
MAX_BATCH_BYTES = 1 << 40
MAX_CONNECTIONS = 64


class RedisRemoteStore(RedirectFollower, RemoteStoreBase):
    """A :class:`~kvtier.remote.store.RemoteStore` on one Redis server or cluster at ``url``
    (``redis://[user][:password]@host:port/db``, ``rediss://`` for TLS, or ``unix://``).

    Every numeric option is checked here (finite, in range, never a bool). May change: the
    server's keys of its namespace, its stats, its client and breakers. Thread-safe: the
    caller's thread and the I/O thread share the client and breakers under locks.
    """

    def __init__(
        self,
        url: str,
        namespace: RemoteNamespace,
        *,
        cluster: bool = False,
        timeout_s: float = 0.5,
        max_retries: int = 2,
        backoff_s: float = 0.01,
        ttl_s: float | None = None,
        max_inflight: int = 64,
        breaker_threshold: int = 3,
        cooldown_s: float = 1.0,
        max_batch_keys: int = 256,
        max_batch_bytes: int = 32 << 20,
        ca_file: str | None = None,
        num_connections: int = 1,
    ) -> None:
        if not isinstance(url, str):
            raise ValueError(f"url must be a str, got {type(url).__name__}")
        scheme = urlsplit(url).scheme
        if scheme not in URL_SCHEMES:
            raise ValueError(f"url must start with one of {URL_SCHEMES}, got "
                             f"{shown(redact_url(url))}")
        if type(cluster) is not bool:
            raise ValueError(f"cluster must be a bool, got {shown(cluster)}")
        check_url_query(url, cluster)
        self.timeout_s = check_number("timeout_s", timeout_s, 0.0, MAX_TIMEOUT_S, low_open=True)
        self.max_retries = check_count("max_retries", max_retries, 0, MAX_RETRIES)
        self.backoff_s = check_number("backoff_s", backoff_s, 0.0, MAX_BACKOFF_S)
        self.cooldown_s = check_number("cooldown_s", cooldown_s, 0.0, MAX_COOLDOWN_S)
        self.ttl_ms = None
        if ttl_s is not None:
            ttl = check_number("ttl_s", ttl_s, 0.0, MAX_TTL_S, low_open=True)
            self.ttl_ms = max(1, round(ttl * 1000))
        self.breaker_threshold = check_count("breaker_threshold", breaker_threshold, 1,
                                             MAX_COUNT)
        self.max_batch_keys = check_count("max_batch_keys", max_batch_keys, 1, MAX_COUNT)
        self.max_batch_bytes = check_count("max_batch_bytes", max_batch_bytes, 1,
                                           MAX_BATCH_BYTES)
        self.num_connections = check_count("num_connections", num_connections, 1,
                                           MAX_CONNECTIONS)
        if ca_file is not None and not isinstance(ca_file, str):
            raise ValueError(f"ca_file must be None or a path, got {shown(ca_file)}")
        if ca_file is not None and scheme != "rediss":
            raise ValueError(f"ca_file is for TLS: the url must start with rediss://, got "
                             f"{shown(redact_url(url))}")
        super().__init__(namespace, max_inflight=max_inflight)
        self.url = url
        self.ca_file = ca_file
        self.cluster = cluster
        self.last_error: str | None = None
        self._clients = RedisClients(self._connect, lambda: self.closed)
        self._breakers = Breakers(self.breaker_threshold, self.cooldown_s)
        self._readers_lock = threading.Lock()  # guards the two below
        self._readers: ThreadPoolExecutor | None = None  # num_connections > 1, lazily
        self._readers_pid: int | None = None  # the process that made them

    def _backoff(self, attempt: int) -> float:
        """The sleep before retry ``attempt`` (1-based): doubling, capped. Pure."""
        return min(self.backoff_s * 2.0 ** (attempt - 1), MAX_BACKOFF_S)

    @property
    def max_blocking_s(self) -> float:
        """The longest one chunk of a batch can take when the server misbehaves."""
        backoff = sum(self._backoff(a) for a in range(1, self.max_retries + 1))
        return (1 + self.max_retries) * self.timeout_s + backoff

    # -- connection ----------------------------------------------------------------------
    def _connect(self) -> Any:
        return connect(self.url, cluster=self.cluster, timeout_s=self.timeout_s,
                       ca_file=self.ca_file, on_connect=self._on_connect)

    def check_connection(self) -> str | None:
        """None when the server answers PING, else one sentence saying why not. Never raises."""
        ok = self._attempt(lambda client: client.ping(), retry=False)
        return None if ok is not None else self.last_error

    # -- fault handling ------------------------------------------------------------------
    def _describe(self, exc: BaseException, where: str = WHOLE) -> str:
        """``describe_fault`` of ``exc`` at this store's url (``where``: a node). Pure."""
        return describe_fault(exc, redact_url(self.url), where)

    def _attempt(self, op: Callable[[Any], T], *, retry: bool = True,
                 server: str = WHOLE) -> T | None:
        """``op(client)`` with retries and backoff; None (counted) if it failed, or the
        breaker of ``server`` (a cluster node's name, or the whole: ``kvtier.remote.breaker``)
        is open (``num_short_circuited``), or half-open with its one probe out
        (``num_refused_probes``)."""
        state = self._breakers.admit(server)
        if state is BreakerState.OPEN:
            self._count(num_short_circuited=1)
            return None
        if state is BreakerState.PROBING:
            self._count(num_refused_probes=1)
            return None
        try:
            return self._attempt_closed(op, retry=retry, server=server)
        finally:
            if state is BreakerState.HALF_OPEN:
                self._breakers.end_probe(server)

    def _attempt_closed(self, op: Callable[[Any], T], *, retry: bool,
                        server: str) -> T | None:
        """``_attempt`` past its breaker: ``op(client)`` with retries and backoff, the
        breaker closed when it succeeds, and opened at ``breaker_threshold`` failures in
        a row (again at once where it was half-open)."""
        from redis.exceptions import AuthenticationError, ResponseError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        num_attempts = 1 + (self.max_retries if retry else 0)
        for attempt in range(num_attempts):
            if attempt > 0:
                self._count(num_retries=1)
                time.sleep(self._backoff(attempt))
            try:
                result = op(self._clients.get())
            except Exception as exc:
                self.last_error = self._describe(exc, server)
                timed_out = isinstance(exc, RedisTimeoutError | TimeoutError)
                self._count(num_errors=1, num_timeouts=int(timed_out))
                if self.closed:
                    break
                if self.cluster and server != WHOLE:
                    self._refresh_topology(exc)
                elif self.cluster:
                    self._clients.drop()  # the slot map: read again with a new client
                # Auth errors and refusals come back the same on a retry.
                if isinstance(exc, AuthenticationError | ResponseError):
                    break
                self._clients.drop_idle(server)
                continue
            self._breakers.record_success(server)
            return result
        self._breakers.record_failure(server)
        return None

    def _on_connect(self, connection: Any) -> None:
        """redis-py's hook for every new connection (``redis_connect_func``): read the
        server's run id (``INFO server``) and tell the base class (``_note_backend``): a
        server restarted since the last connection to it lost every block written to it,
        and the remote tier must not go on skipping them as held.

        NOTE: redis-py reconnects a pooled connection the server closed without raising,
        so a restart shows as no fault: a new connection is the one place it can be seen.
        A standalone client's hook replaces its own setup (authentication, the database),
        run first here; a cluster runs its own before this. A server that refuses INFO (an
        ACL without it) is never known to restart."""
        found = read_run_id(connection, cluster=self.cluster)
        if found is not None:
            name, run_id = found
            self._note_backend({name: run_id})

    def _refresh_topology(self, exc: BaseException) -> None:
        """After a node's error: slots that moved (MOVED, CLUSTERDOWN) are looked up again;
        a node that is down keeps its slots, so the other nodes go on. (An ASK changes no
        slot's owner: ``_follow_asks``.)"""
        from redis.exceptions import ClusterDownError, MovedError

        if isinstance(exc, MovedError | ClusterDownError):
            self._clients.reload_slots()

    def _chunks(self, sizes: list[int], min_chunks: int = 1) -> Iterator[slice]:
        """Slices of at most ``max_batch_keys`` items and about ``max_batch_bytes``, and at
        least ``min_chunks`` of them where there are that many items. Pure."""
        max_keys = min(self.max_batch_keys, -(-len(sizes) // min_chunks)) if sizes else 1
        start, num_bytes = 0, 0
        for i, size in enumerate(sizes):
            if i > start and (i - start >= max_keys
                              or num_bytes + size > self.max_batch_bytes):
                yield slice(start, i)
                start, num_bytes = i, 0
            num_bytes += size
        if start < len(sizes):
            yield slice(start, len(sizes))

    def _by_server(self, keys: list[str]) -> list[tuple[str, list[int]]] | None:
        """The indices of ``keys`` per server: one group on a standalone server, one per
        slot owner on a cluster (None if the cluster's topology is unknown)."""
        if not self.cluster:
            return [(WHOLE, list(range(len(keys))))]

        from redis.exceptions import SlotNotCoveredError

        def group(client: Any) -> list[tuple[str, list[int]]]:
            groups: dict[str, list[int]] = {}
            num_uncovered = 0
            for i, key in enumerate(keys):
                try:
                    node = client.get_node_from_key(key)
                except SlotNotCoveredError:  # its shard is gone: this key misses alone
                    num_uncovered += 1
                    continue
                groups.setdefault(node.name, []).append(i)
            if num_uncovered:
                self.last_error = (f"redis at {redact_url(self.url)}: {num_uncovered} of "
                                   f"{len(keys)} keys are in slots no node of the cluster "
                                   f"serves (a shard gone): they miss.")
                self._count(num_errors=1)
            return list(groups.items())

        return self._attempt(group)

    def _run(self, server: str, commands: list[tuple[Any, ...]], *,
             raise_on_error: bool = True, read: Read = read_replies,
             asked: bool = False, retry: bool = True) -> list[Any] | None:
        """One pipeline of ``commands`` on ``server`` (with ``asked``, a node an ASK named,
        listed in the slot map or not), its replies read by ``read`` (as ``pipeline``
        gives them), or None; without ``retry``, a failed pipeline is not sent again.
        Without ``raise_on_error``, a command's refusal is its reply."""

        def execute(client: Any) -> list[Any]:
            replies = pipeline(commands, self._clients.node(client, server, asked=asked),
                               read)
            fault = node_fault(replies[1::2] if asked else replies)
            if fault is not None:
                raise fault  # the node's, as a connection's: retried, its breaker counts
            if raise_on_error:
                for reply in replies:
                    if isinstance(reply, Exception):
                        raise reply  # the replies were read whole: the connection in step
            return replies

        return self._attempt(execute, retry=retry, server=server)

    # -- backend -------------------------------------------------------------------------
    def read_values(self, keys: list[str]) -> list[bytes | None] | None:
        return self._read(keys, follow_moved=self.cluster)

    def _read(self, keys: list[str], *, follow_moved: bool,
              deadline_s: float | None = None) -> list[bytes | None] | None:
        """``read_values``; on a cluster the keys answered ASK are read on the node it
        named (``_follow_asks``), and with ``follow_moved`` those answered MOVED once more
        after the slot map is read again (as ``_write`` writes them). ``deadline_s``: the
        batch's, of a MOVED redo (its pipelines never sent again); None: a batch of its
        own, due within ``max_blocking_s``."""
        redo = deadline_s is not None
        if deadline_s is None:
            deadline_s = time.monotonic() + self.max_blocking_s
        groups = self._by_server(keys)
        if groups is None:
            return None
        values: list[bytes | None] = [None] * len(keys)
        # NOTE: a chunk's reply size is unknown up front; assume a block per key.
        block = self.namespace.layout.bytes_per_block
        chunks = [(server, indices[part]) for server, indices in groups
                  for part in self._chunks([block] * len(indices), self.num_connections)]

        def read(server: str, chunk: list[int]) -> Redirects:
            # NOTE: on a cluster, a GET per key (MGET across slots is refused). A key's own
            # refusal (WRONGTYPE: another client's hash or list under the key) raised for
            # the whole pipeline: on a cluster every key of the chunk missed and the node's
            # breaker opened, failing its puts too. It is that key's miss, counted, as MGET
            # on a standalone server answers nil for it (a refused MGET, NOPERM say, still
            # raises: a failed batch, as before). So are TRYAGAIN (a slot mid-migration)
            # and CLUSTERDOWN (a slot no node serves, a cluster down): they failed the
            # chunk, every key of it missed, and three in a row opened the node's breaker
            # for its cooldown, past the fault, while the node answered at once. A redirect
            # is its key's: MOVED (its slot resharded) is read again once the slot map is,
            # ASK (its slot migrating) on the node it names. Before, either failed the
            # chunk, then ASK missed alone: a hit lost, the value in the cluster.
            # Either way the replies are read off the socket (``pipeline``).
            replies: list[Any] | None
            if self.cluster:
                replies = self._run(server, [("GET", keys[i]) for i in chunk],
                                    raise_on_error=False, read=read_get_replies,
                                    retry=not redo)
            else:
                replies = self._attempt(partial(mget, [keys[i] for i in chunk]),
                                        server=server)
            redirects = Redirects.none()
            if replies is not None and len(replies) == len(chunk):  # else misses
                # each chunk writes its own indices
                self._take(chunk, replies, values, get_answer, server, redirects,
                           follow_moved=follow_moved, follow_ask=self.cluster,
                           follow_tryagain=self.cluster)
            return redirects

        # NOTE: a node whose breaker is not closed gets its first chunk sent first, the
        # probe (beside the chunks of closed nodes), and its other chunks once that
        # answered (sent where it closed the breaker, short-circuited where it opened it
        # again). Read at once, they asked the breaker while the probe was out and were
        # refused: misses of blocks the node held.
        first: list[tuple[str, list[int]]] = []
        held: list[tuple[str, list[int]]] = []
        probing: set[str] = set()
        for server_chunk in chunks:
            server = server_chunk[0]
            if self._breakers.state(server) is BreakerState.CLOSED:
                first.append(server_chunk)
            elif server in probing:
                held.append(server_chunk)
            else:
                probing.add(server)
                first.append(server_chunk)
        parts = [*self._read_chunks(read, first), *self._read_chunks(read, held)]
        redirects = Redirects.merged(parts)
        self._retry_tryagain(redirects.tryagain, values, lambda i: ("GET", keys[i]),
                             get_answer, [block] * len(keys), deadline_s,
                             read=read_get_replies)
        self._follow_asks(redirects.asked, values, lambda i: ("GET", keys[i]), get_answer,
                          [block] * len(keys), deadline_s, scalars=False)
        if redirects.moved:
            self._redo_moved(redirects.moved, values, deadline_s,
                             lambda idx: self._read([keys[i] for i in idx],
                                                    follow_moved=False,
                                                    deadline_s=deadline_s))
        return values

    def _read_chunks(self, read: Callable[[str, list[int]], Redirects],
                     chunks: list[tuple[str, list[int]]]) -> list[Redirects]:
        """``read`` of each of ``chunks`` (a server, the indices of its keys), at once
        where there are several and several connections; the redirects of each."""
        readers = self._reader_pool() if len(chunks) > 1 else None
        if readers is None:
            return [read(server, chunk) for server, chunk in chunks]
        # Every chunk runs, even if one raised: a fault is a miss, never a crash.
        return [future.result() for future in
                [readers.submit(read, server, chunk) for server, chunk in chunks]]

    def _reader_pool(self) -> ThreadPoolExecutor | None:
        """The threads that read chunks at once (None with one connection, or closed)."""
        if self.num_connections == 1:
            return None
        with self._readers_lock:
            if self.closed:
                return None
            # NOTE: a pool made before this process forked has no threads here (none but
            # the forking one carries over) and makes no more once it made them all: every
            # read of several chunks waited for ever on its first chunk.
            if self._readers is None or self._readers_pid != os.getpid():
                self._readers = ThreadPoolExecutor(self.num_connections,
                                                   thread_name_prefix="kvtier-redis-read")
                self._readers_pid = os.getpid()
            return self._readers

    def write_values(self, pairs: list[tuple[str, bytes]]) -> list[bool] | None:
        return self._write(pairs, follow_moved=self.cluster)

    def _write(self, pairs: list[tuple[str, bytes]], *, follow_moved: bool,
               deadline_s: float | None = None) -> list[bool] | None:
        """``write_values``; on a cluster the keys answered ASK (a slot migrating: a new
        key goes to the target) are written on the node it named, and with
        ``follow_moved`` those answered MOVED once more after the slot map is read again.

        NOTE: a MOVED reply (a slot resharded to another node) was counted as a refusal and
        the slot map was never read again on writes: every later write of the slot's keys
        failed the same way, for as long as no read refreshed it. An ASK was counted as a
        refusal too: the block was not written, and the tier wrote it again later.
        ``deadline_s``: as ``_read``'s."""
        redo = deadline_s is not None
        if deadline_s is None:
            deadline_s = time.monotonic() + self.max_blocking_s
        groups = self._by_server([k for k, _ in pairs])
        if groups is None:
            return None
        results = [False] * len(pairs)
        redirects = Redirects.none()
        ttl = ("PX", self.ttl_ms) if self.ttl_ms is not None else ()
        sizes = [len(value) for _, value in pairs]
        for server, indices in groups:
            for part in self._chunks([sizes[i] for i in indices]):
                chunk = indices[part]
                replies = self._run(server, [("SET", *pairs[i], *ttl) for i in chunk],
                                    raise_on_error=False, retry=not redo)
                if replies is None or len(replies) != len(chunk):
                    continue
                # e.g. OOM, noeviction, TRYAGAIN, CLUSTERDOWN: that key's
                self._take(chunk, replies, results, set_answer, server, redirects,
                           follow_moved=follow_moved, follow_ask=self.cluster,
                           follow_tryagain=self.cluster)
        self._retry_tryagain(redirects.tryagain, results, lambda i: ("SET", *pairs[i], *ttl),
                             set_answer, sizes, deadline_s)
        self._follow_asks(redirects.asked, results, lambda i: ("SET", *pairs[i], *ttl),
                          set_answer, sizes, deadline_s)
        moved = redirects.moved
        if moved and not self._redo_moved(
                moved, results, deadline_s,
                lambda idx: self._write([pairs[i] for i in idx], follow_moved=False,
                                        deadline_s=deadline_s)):
            self._count(num_errors=len(moved))
        return results

    def has_keys(self, keys: list[str]) -> list[bool] | None:
        return self._has(keys, follow_moved=self.cluster)

    def _has(self, keys: list[str], *, follow_moved: bool,
             deadline_s: float | None = None) -> list[bool] | None:
        """``has_keys``; on a cluster a redirect is its key's, as in ``_read``: a key
        answered ASK is asked on the node it named, one answered MOVED again once the slot
        map is read again (with ``follow_moved``); TRYAGAIN or CLUSTERDOWN, absent.

        NOTE: each failed the chunk, never retried: every key of it absent, and the node's
        breaker counting it; then an ASK was absent alone, though the key was held.
        ``deadline_s``: as ``_read``'s."""
        redo = deadline_s is not None
        if deadline_s is None:
            deadline_s = time.monotonic() + self.max_blocking_s
        groups = self._by_server(keys)
        if groups is None:
            return None
        present = [False] * len(keys)
        redirects = Redirects.none()
        for server, indices in groups:
            for part in self._chunks([1] * len(indices)):
                chunk = indices[part]
                got = self._run(server, [("EXISTS", keys[i]) for i in chunk],
                                raise_on_error=not self.cluster, retry=not redo)
                if got is None or len(got) != len(chunk):
                    continue
                self._take(chunk, got, present, exists_answer, server, redirects,
                           follow_moved=follow_moved, follow_ask=self.cluster,
                           follow_tryagain=self.cluster)
        self._retry_tryagain(redirects.tryagain, present, lambda i: ("EXISTS", keys[i]),
                             exists_answer, [1] * len(keys), deadline_s)
        self._follow_asks(redirects.asked, present, lambda i: ("EXISTS", keys[i]),
                          exists_answer, [1] * len(keys), deadline_s)
        if redirects.moved:
            self._redo_moved(redirects.moved, present, deadline_s,
                             lambda idx: self._has([keys[i] for i in idx],
                                                   follow_moved=False,
                                                   deadline_s=deadline_s))
        return present

    def _close_backend(self) -> None:
        with self._readers_lock:
            readers, self._readers = self._readers, None
        if readers is not None:
            readers.shutdown(wait=True)
        self._clients.drop()
