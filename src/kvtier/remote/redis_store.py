"""The remote tier on Redis or Valkey through redis-py, standalone or Redis Cluster.

Every batch is one pipelined round trip per chunk (MGET on a standalone server; on a cluster,
commands grouped by node). A fault (server down, slow, out of memory, auth) costs at most::

    (1 + max_retries) * timeout_s  +  backoff_s * (1 + 2 + ... + 2**(max_retries - 1))

per chunk, is counted in ``stats`` and turns into misses or failed puts; after
``breaker_threshold`` failed batches in a row the circuit breaker opens and batches are
skipped (counted as short-circuited) for ``cooldown_s``, then one batch probes the server.
redis is imported lazily: ``import kvtier.remote`` works without it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from kvtier.remote.codec import RemoteNamespace
from kvtier.remote.store import BlockStoreBase

T = TypeVar("T")

URL_SCHEMES = ("redis", "rediss", "unix")


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``. Pure."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisRemoteStore(BlockStoreBase):
    """A :class:`~kvtier.remote.store.RemoteStore` on one Redis server or cluster at ``url``
    (``redis://[user][:password]@host:port/db``, ``rediss://`` for TLS, or ``unix://``)."""

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
    ) -> None:
        super().__init__(namespace, max_inflight=max_inflight)
        scheme = urlsplit(url).scheme
        if scheme not in URL_SCHEMES:
            raise ValueError(f"url must start with one of {URL_SCHEMES}, got {redact_url(url)!r}")
        for name, value, minimum in (("timeout_s", timeout_s, 0.0), ("backoff_s", backoff_s, 0.0),
                                     ("cooldown_s", cooldown_s, 0.0)):
            if not isinstance(value, int | float) or value < minimum:
                raise ValueError(f"{name} must be a number >= {minimum}, got {value!r}")
        if timeout_s == 0:
            raise ValueError("timeout_s must be > 0, got 0")
        for name, count, least in (("max_retries", max_retries, 0),
                                   ("breaker_threshold", breaker_threshold, 1),
                                   ("max_batch_keys", max_batch_keys, 1),
                                   ("max_batch_bytes", max_batch_bytes, 1)):
            if type(count) is not int or count < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {count!r}")
        if ttl_s is not None and (not isinstance(ttl_s, int | float) or ttl_s <= 0):
            raise ValueError(f"ttl_s must be None or a number > 0, got {ttl_s!r}")
        if ca_file is not None and scheme != "rediss":
            raise ValueError(f"ca_file is for TLS: the url must start with rediss://, got "
                             f"{redact_url(url)!r}")
        self.url = url
        self.ca_file = ca_file
        self.cluster = cluster
        self.timeout_s = float(timeout_s)
        self.max_retries = max_retries
        self.backoff_s = float(backoff_s)
        self.ttl_ms = None if ttl_s is None else max(1, round(ttl_s * 1000))
        self.breaker_threshold = breaker_threshold
        self.cooldown_s = float(cooldown_s)
        self.max_batch_keys = max_batch_keys
        self.max_batch_bytes = max_batch_bytes
        self.last_error: str | None = None
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._num_failures_in_row = 0
        self._open_until = 0.0

    @property
    def max_blocking_s(self) -> float:
        """The longest one chunk of a batch can take when the server misbehaves."""
        backoff = self.backoff_s * float(2**self.max_retries - 1)
        return (1 + self.max_retries) * self.timeout_s + backoff

    # -- connection ----------------------------------------------------------------------
    def _connect(self) -> Any:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # NOTE: redis-py's own retries are off: this class retries, counts and backs off.
        options: dict[str, Any] = dict(socket_timeout=self.timeout_s,
                                       socket_connect_timeout=self.timeout_s,
                                       retry=Retry(NoBackoff(), 0))
        if self.ca_file is not None:
            options["ssl_ca_certs"] = self.ca_file  # verify the server against this CA
        if self.cluster:
            from redis.cluster import RedisCluster

            return RedisCluster.from_url(self.url, **options)
        return redis.Redis.from_url(self.url, **options)

    def _get_client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _drop_client(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def check_connection(self) -> str | None:
        """None when the server answers PING, else one sentence saying why not. Never raises."""
        ok = self._attempt(lambda client: client.ping(), retry=False)
        return None if ok is not None else self.last_error

    # -- fault handling ------------------------------------------------------------------
    def _describe(self, exc: BaseException) -> str:
        from redis.exceptions import AuthenticationError, OutOfMemoryError, ResponseError

        where = f"redis at {redact_url(self.url)}"
        if isinstance(exc, AuthenticationError) or "WRONGPASS" in str(exc) or "NOAUTH" in str(exc):
            return f"{where}: authentication failed ({exc})."
        if isinstance(exc, OutOfMemoryError):
            return f"{where}: out of memory, the server refused a write ({exc})."
        if isinstance(exc, ResponseError):
            return f"{where}: the server refused the command ({exc})."
        return f"{where}: {type(exc).__name__}: {exc}."

    def _attempt(self, op: Callable[[Any], T], *, retry: bool = True) -> T | None:
        """``op(client)`` with retries and backoff; None (counted) if it failed or the
        breaker is open."""
        from redis.exceptions import AuthenticationError, ResponseError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        if time.monotonic() < self._open_until:
            self._count(num_short_circuited=1)
            return None
        num_attempts = 1 + (self.max_retries if retry else 0)
        for attempt in range(num_attempts):
            if attempt > 0:
                self._count(num_retries=1)
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                result = op(self._get_client())
            except Exception as exc:
                self.last_error = self._describe(exc)
                timed_out = isinstance(exc, RedisTimeoutError | TimeoutError)
                self._count(num_errors=1, num_timeouts=int(timed_out))
                # Auth errors and refusals come back the same on a retry.
                if isinstance(exc, AuthenticationError | ResponseError):
                    break
                self._drop_client()
                continue
            self._num_failures_in_row = 0
            return result
        self._num_failures_in_row += 1
        if self._num_failures_in_row >= self.breaker_threshold:
            self._open_until = time.monotonic() + self.cooldown_s
        return None

    def _chunks(self, sizes: list[int]) -> Iterator[slice]:
        """Slices of at most ``max_batch_keys`` items and about ``max_batch_bytes``. Pure."""
        start, num_bytes = 0, 0
        for i, size in enumerate(sizes):
            if i > start and (i - start >= self.max_batch_keys
                              or num_bytes + size > self.max_batch_bytes):
                yield slice(start, i)
                start, num_bytes = i, 0
            num_bytes += size
        if start < len(sizes):
            yield slice(start, len(sizes))

    # -- backend -------------------------------------------------------------------------
    def _pipeline(self, client: Any) -> Any:
        # A cluster pipeline splits the commands by node itself and takes no transaction flag.
        return client.pipeline() if self.cluster else client.pipeline(transaction=False)

    def _fetch(self, keys: list[str]) -> list[bytes | None] | None:
        # NOTE: a chunk's reply size is unknown up front; assume a block per key.
        sizes = [self.namespace.layout.bytes_per_block] * len(keys)
        values: list[bytes | None] = []
        for part in self._chunks(sizes):
            chunk = keys[part]

            def mget(client: Any, chunk: list[str] = chunk) -> list[bytes | None]:
                if self.cluster:
                    return list(client.mget_nonatomic(chunk))
                return list(client.mget(chunk))

            got = self._attempt(mget)
            values.extend(got if got is not None else [None] * len(chunk))
        return values

    def _store(self, pairs: list[tuple[str, bytes]]) -> list[bool] | None:
        results: list[bool] = []
        for part in self._chunks([len(v) for _, v in pairs]):
            chunk = pairs[part]

            def mset(client: Any, chunk: list[tuple[str, bytes]] = chunk) -> list[Any]:
                pipe = self._pipeline(client)
                for key, value in chunk:
                    pipe.set(key, value, px=self.ttl_ms)
                return list(pipe.execute(raise_on_error=False))

            replies = self._attempt(mset)
            if replies is None:
                results.extend([False] * len(chunk))
                continue
            refused = [r for r in replies if isinstance(r, Exception)]
            if refused:  # e.g. OOM under maxmemory with noeviction
                self.last_error = self._describe(refused[0])
                self._count(num_errors=len(refused))
            results.extend(not isinstance(r, Exception) and bool(r) for r in replies)
        return results

    def _exists(self, keys: list[str]) -> list[bool] | None:
        present: list[bool] = []
        for part in self._chunks([1] * len(keys)):
            chunk = keys[part]

            def exists(client: Any, chunk: list[str] = chunk) -> list[Any]:
                pipe = self._pipeline(client)
                for key in chunk:
                    pipe.exists(key)
                return list(pipe.execute())

            got = self._attempt(exists)
            if got is None:
                present.extend([False] * len(chunk))
            else:
                present.extend(bool(n) for n in got)
        return present

    def _close_backend(self) -> None:
        self._drop_client()
