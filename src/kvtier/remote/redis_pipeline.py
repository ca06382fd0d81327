"""One pipeline's round trip to a Redis server or cluster node, and what its replies mean.

The commands go out packed on one of redis-py's pooled connections; their replies are read
off the connection's socket by ``kvtier.remote.resp`` (the whole due within the socket
timeout, not each ``recv``; redis-py, hiredis when it is installed, parses only a
connection's handshake), each error line made redis-py's exception for it::

    pipeline([GET k1, GET k2], client) ──send──> node ──replies──> SocketReader
        -> [b"v1", MovedError(...)]     a connection that failed part way is closed

redis is imported lazily: ``import kvtier.remote`` works without it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from kvtier.remote.resp import (
    ErrorReply,
    ProtocolError,
    SocketReader,
    read_replies,
    read_values_reply,
)

# How ``pipeline`` reads the replies of its commands off the socket (``kvtier.remote.resp``).
Read = Callable[[SocketReader, int], Sequence[object]]


def pipeline(commands: list[tuple[Any, ...]], client: Any,
             read: Read = read_replies) -> list[Any]:
    """``commands`` pipelined on ``client``; per command its reply (a simple string's bytes,
    ``b"OK"``, an integer, a value or None: as ``read`` reads them off the socket) or
    redis-py's exception for the error line that refused it (by redis-py where the
    connection has no socket). The replies are due within the socket timeout as a whole,
    as a read's; a connection that failed part way is closed, never pooled again.

    NOTE: redis-py's pipeline bounded each ``recv`` only: a server answering a byte every
    0.08 s held a write of four blocks 1.8 s, past ``max_blocking_s`` (0.2 s)."""
    from redis.exceptions import ResponseError

    pool = client.connection_pool
    conn = _pool_connection(pool)
    try:
        conn.send_packed_command(conn.pack_commands(commands))
        sock = getattr(conn, "_sock", None)
        if sock is None or not hasattr(sock, "recv_into"):
            out: list[Any] = []
            for _ in commands:
                try:
                    out.append(conn.read_response())
                except ResponseError as exc:  # that command's refusal, read whole
                    out.append(exc)
            return out
        reader = _socket_reader(conn, sock)
        try:
            replies = read(reader, len(commands))
        finally:
            reader.restore()
        if not reader.drained:  # bytes past the replies: the stream is out of step
            conn.disconnect()
        return [_refusal(str(r)) if isinstance(r, ErrorReply) else r for r in replies]
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)


def mget(keys: list[str], client: Any) -> list[bytes | None]:
    """The values of ``keys`` on a standalone server (None where absent): one ``MGET``
    through ``pipeline``; redis-py's exception for the error line that refused it."""
    (values,) = pipeline([("MGET", *keys)], client, partial(_read_mget, num_keys=len(keys)))
    if isinstance(values, Exception):
        raise values
    return list(values)


def _read_mget(reader: SocketReader, num_commands: int,
               num_keys: int) -> list[list[bytes | None] | ErrorReply]:
    """``pipeline``'s ``read`` of one ``MGET`` of ``num_keys`` keys: its values, or the
    error line that refused the whole command (read whole: the connection stays in step)."""
    assert num_commands == 1, num_commands
    try:
        return [read_values_reply(reader, num_keys)]
    except ErrorReply as exc:
        return [exc]


def read_reply(conn: Any) -> Any:
    """The reply of the one command just sent on ``conn`` (a connection being set up:
    ``read_run_id``'s ``INFO``), due within its socket timeout as a batch's are; redis-py's
    exception for an error line. A reply that fails part way closes the connection.

    NOTE: read by redis-py, a server sending its ``INFO`` reply (some 2 KiB) a byte at a
    time, each inside the timeout, held every new connection, and so a batch, for minutes."""
    sock = getattr(conn, "_sock", None)
    if sock is None or not hasattr(sock, "recv_into"):
        return conn.read_response()
    try:
        reader = _socket_reader(conn, sock)
        try:
            (reply,) = read_replies(reader, 1)
        finally:
            reader.restore()
        if not reader.drained:
            raise ProtocolError("bytes past the reply of a connection's setup")
    except BaseException:
        conn.disconnect()  # redis-py closes one on its own errors only, not on these
        raise
    if isinstance(reply, ErrorReply):
        raise _refusal(str(reply))
    return reply


def get_answer(reply: bytes | None) -> bytes | None:
    """A read's answer for a GET's (or MGET's) reply: the value, or None. Pure."""
    return reply


def exists_answer(reply: object) -> bool:
    """A probe's answer for an EXISTS reply. Pure."""
    return reply == 1


def set_answer(reply: object) -> bool:
    """A write's answer for a SET reply. Pure."""
    return reply == b"OK"


# Per connection pool class: whether its ``get_connection`` needs a command name (redis-py
# before 5.3; from then on it warns at one).
_NEEDS_COMMAND_NAME: dict[type, bool] = {}

def _pool_connection(pool: Any) -> Any:
    """A connection of redis-py's ``pool``."""
    kind = type(pool)
    needs = _NEEDS_COMMAND_NAME.get(kind)
    if needs is None:
        param = inspect.signature(pool.get_connection).parameters.get("command_name")
        needs = _NEEDS_COMMAND_NAME[kind] = (param is not None
                                             and param.default is inspect.Parameter.empty)
    return pool.get_connection("GET") if needs else pool.get_connection()


def _refusal(text: str) -> Exception:
    """redis-py's exception for the error line ``text`` (as its pipeline raises it: a
    ``LOADING`` server is a connection error, retried; ``NOPERM`` a refusal, not), or a
    plain refusal where redis-py cannot make one of it.

    NOTE: redis-py makes an ASK's or MOVED's exception by splitting its text into a slot
    and a ``host:port``: a line without them (``-ASK nonsense``) raised ValueError here,
    which failed the whole pipeline as a fault (every key of it missed, the node's breaker
    counting it). It is that command's refusal."""
    from redis.exceptions import ResponseError

    try:
        from redis._parsers.base import BaseParser
    except ImportError:  # another layout of redis-py: every error line is a refusal
        return ResponseError(text)
    try:
        exc: Exception = BaseParser.parse_error(text)  # type: ignore[no-untyped-call]
    except Exception:
        return ResponseError(text)
    return exc


def _socket_reader(conn: Any, sock: Any) -> SocketReader:
    """A reader of ``conn``'s reply off ``sock``, the whole reply due within the
    connection's socket timeout (the store's ``timeout_s``).

    NOTE: redis-py's parser bounds each ``recv`` by the socket timeout only: a server that
    sent a few bytes now and then (a byte every 0.15 s, ``timeout_s`` 0.2) held one read
    100 s, past ``max_blocking_s`` (0.4 s) many times over."""
    return SocketReader(sock, timeout_s=getattr(conn, "socket_timeout", None))
