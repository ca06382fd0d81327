"""A Redis server's replies (to MGET, pipelined GETs, SETs, EXISTS, ASKING) read straight off
the socket.

redis-py's parser reads a reply into its own buffer and copies every value out of it
again (hiredis builds each value anew as well): with values of a KV block each (64 KiB to
MiBs), that second pass over the bytes was about half of a read's time on the store's
benchmark (``benchmarks/results/remote.md``). Here a value's bytes go from the socket
into a buffer of the value's own size (``recv_into``), then once into the ``bytes`` the
store hands out (a value must be immutable once its checksum is checked). The header lines
between values go through a small buffer of the reader's own.

The store's connections speak RESP2 (``RedisRemoteStore`` asks for it): an array of bulk
strings, ``$-1`` for a key that holds nothing (or another type: ``MGET`` answers nil
there), or one error line for the whole command. RESP3's null (``_``) is read as nil too;
anything else (a push message, another type) is a :class:`ProtocolError`. The replies of
pipelined writes and ``EXISTS`` (simple strings, integers) are read here too
(``read_replies``), so that every batch's replies are due within the store's timeout.
"""

from __future__ import annotations

import contextlib
from functools import partial
from time import monotonic
from typing import Protocol

# The longest header line read (``*<count>`` or ``$<length>``: a few digits); a longer one
# is no reply of a server speaking RESP.
MAX_LINE_BYTES = 1 << 10
# The longest bulk string a Redis server sends (its ``proto-max-bulk-len`` default): a
# longer length is a stream out of step, not a value.
MAX_BULK_BYTES = 512 << 20
# A reply's bytes that buy it another ``timeout_s`` (``SocketReader``): 1 MiB per timeout
# (2 MB/s at 0.5 s) is a slow link still streaming, not a server stalled or dripping.
PROGRESS_BYTES = 1 << 20
# The largest value given a buffer of its whole size before its bytes come: a longer one
# (no KV block is near it) takes memory as its bytes arrive, in pieces of this size.
DIRECT_BULK_BYTES = 64 << 20


class ProtocolError(ConnectionError):
    """The bytes read are not the reply expected: the connection is out of step and must be
    closed (a ``ConnectionError``, so the store's retries treat it as a lost connection)."""


class ErrorReply(Exception):
    """The server refused the whole command with an error line (its text, without ``-``)."""


class _Socket(Protocol):
    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int: ...


class SocketReader:
    """Reads a RESP reply from ``sock``: header lines through a small buffer, values
    straight into buffers of their own. Never reads past the reply it is asked for except
    into its own buffer, whose rest must be empty once the reply is read (``drained``).

    With ``timeout_s``, the reply must come within that many seconds of the reader's making,
    and ``timeout_s`` more for every ``PROGRESS_BYTES`` of it that came (a ``TimeoutError``
    past that): the socket's own timeout bounds one ``recv`` only, and a server that sent a
    byte now and then held a read for ever, while a large reply over a slow link (32 MiB at
    15 MB/s) goes on as long as it keeps coming. The socket's timeout is lowered to the time
    left before each ``recv``; ``restore`` puts it back."""

    __slots__ = ("_buf", "_end", "_received", "_sock", "_sock_timeout", "_start", "_started",
                 "_timeout_s", "_view")

    def __init__(self, sock: _Socket, buffer_bytes: int = 1 << 16, *,
                 timeout_s: float | None = None) -> None:
        self._sock = sock
        self._buf = bytearray(buffer_bytes)
        self._view = memoryview(self._buf)
        self._start = 0  # the unread bytes are _buf[_start:_end]
        self._end = 0
        self._timeout_s = timeout_s
        self._started = monotonic() if timeout_s is not None else 0.0
        self._received = 0  # bytes read off the socket
        gettimeout = getattr(sock, "gettimeout", None)
        self._sock_timeout = gettimeout() if gettimeout is not None else None

    def restore(self) -> None:
        """Give the socket back its timeout (a closed socket's is left alone)."""
        settimeout = getattr(self._sock, "settimeout", None)
        if self._timeout_s is not None and settimeout is not None:
            with contextlib.suppress(OSError):
                settimeout(self._sock_timeout)

    def _recv_into(self, view: memoryview) -> int:
        """``sock.recv_into(view)`` within the reply's deadline."""
        timeout_s = self._timeout_s
        if timeout_s is not None:
            allowed = timeout_s * (1 + self._received // PROGRESS_BYTES)
            left = self._started + allowed - monotonic()
            if left <= 0:
                raise TimeoutError(f"the reply took longer than {allowed:g} s (timeout_s "
                                   f"{timeout_s:g} s, and as much again per MiB that came)")
            settimeout = getattr(self._sock, "settimeout", None)
            if settimeout is not None:
                settimeout(left)
        n = self._sock.recv_into(view)
        self._received += n
        return n

    @property
    def drained(self) -> bool:
        """Whether every byte read from the socket was taken (the connection is in step for
        the next command). Pure."""
        return self._start == self._end

    def _fill(self) -> None:
        """Read more from the socket after the unread bytes (moved to the front first)."""
        start, end = self._start, self._end
        if start:
            self._buf[:end - start] = self._buf[start:end]
            self._start, self._end = 0, end - start
        if self._end == len(self._buf):
            raise ProtocolError(f"a reply line longer than {MAX_LINE_BYTES} bytes")
        n = self._recv_into(self._view[self._end:])
        if not n:
            raise ConnectionError("the server closed the connection in the middle of a reply")
        self._end += n

    def line(self) -> bytes:
        """The next line, without its CRLF."""
        while True:
            j = self._buf.find(b"\r\n", self._start, self._end)
            if j >= 0:
                out = bytes(self._buf[self._start:j])
                self._start = j + 2
                return out
            if self._end - self._start > MAX_LINE_BYTES:
                raise ProtocolError(f"a reply line longer than {MAX_LINE_BYTES} bytes")
            self._fill()

    def exactly(self, num_bytes: int) -> bytes:
        """The next ``num_bytes`` bytes: what the buffer holds of them, the rest read from
        the socket straight into the value's own buffer.

        NOTE: a length past ``DIRECT_BULK_BYTES`` is only the server's word: its buffer
        was allocated whole before a byte came (512 MiB for a length and a stall, per
        connection and attempt), so such a value is read in pieces of that size."""
        have = min(self._end - self._start, num_bytes)
        if have == num_bytes:  # a short value, all in the buffer already
            out = bytes(self._buf[self._start:self._start + have])
            self._start += have
            return out
        if num_bytes > DIRECT_BULK_BYTES:
            parts = []
            left = num_bytes
            while left:
                size = min(left, DIRECT_BULK_BYTES)
                parts.append(self.exactly(size))
                left -= size
            return b"".join(parts)
        value = bytearray(num_bytes)
        value[:have] = self._view[self._start:self._start + have]
        self._start += have
        view = memoryview(value)
        while have < num_bytes:
            n = self._recv_into(view[have:])
            if not n:
                raise ConnectionError("the server closed the connection in the middle of a "
                                      "value")
            have += n
        view.release()
        return bytes(value)

    def crlf(self) -> None:
        """The CRLF that ends a value."""
        while self._end - self._start < 2:
            self._fill()
        if self._buf[self._start:self._start + 2] != b"\r\n":
            raise ProtocolError("a value not followed by CRLF")
        self._start += 2


def _length(line: bytes, what: str) -> int:
    """The integer after a header line's type byte; ProtocolError naming ``what`` if it is
    none."""
    digits = line[1:]
    negative = digits.startswith(b"-")
    body = digits[1:] if negative else digits
    if not body or not body.isdigit() or len(body) > 12:
        raise ProtocolError(f"{what} {line[:40]!r} is no length")
    return -int(body) if negative else int(body)


def read_values_reply(reader: SocketReader, num_values: int) -> list[bytes | None]:
    """The values of an ``MGET`` of ``num_values`` keys (None where a key holds none).
    Raises :class:`ErrorReply` where the server refused the command (the reply read whole:
    the connection stays in step), :class:`ProtocolError` where the bytes are not such a
    reply, ``ConnectionError`` or ``TimeoutError`` where the socket fails; after any of
    the last three the connection is out of step."""
    head = reader.line()
    kind = head[:1]
    if kind == b"-":
        raise ErrorReply(head[1:].decode("utf-8", "replace"))
    if kind != b"*":
        raise ProtocolError(f"an MGET reply that is no array: {head[:40]!r}")
    count = _length(head, "array header")
    if count != num_values:
        raise ProtocolError(f"an MGET reply of {count} values for {num_values} keys")
    values: list[bytes | None] = []
    for _ in range(count):
        line = reader.line()
        if line[:1] == b"-":  # no element of an MGET reply is an error
            raise ProtocolError(f"an MGET value that is no bulk string: {line[:40]!r}")
        values.append(_value(reader, line, "an MGET value"))
    return values


def read_replies(reader: SocketReader, num_replies: int, *,
                 scalars: bool = True) -> list[bytes | int | ErrorReply | None]:
    """The replies of ``num_replies`` pipelined commands, in order: a value, None where the
    key holds none, the :class:`ErrorReply` that refused that command alone (a key of
    another type, a slot served elsewhere, a write out of memory), and with ``scalars`` a
    simple string (its bytes: ``b"OK"``) or an integer (``SET``, ``EXISTS``). Raises as
    ``read_values_reply`` for bytes that are no such replies or a socket that fails."""
    replies: list[bytes | int | ErrorReply | None] = []
    for _ in range(num_replies):
        line = reader.line()
        kind = line[:1]
        if kind == b"-":
            replies.append(ErrorReply(line[1:].decode("utf-8", "replace")))
        elif scalars and kind == b"+":
            replies.append(line[1:])
        elif scalars and kind == b":":
            replies.append(_length(line, "integer reply"))
        else:
            replies.append(_value(reader, line, "a reply"))
    return replies


# The replies of pipelined ``GET`` commands: values, nils and error lines only.
read_get_replies = partial(read_replies, scalars=False)


def read_asking_replies(reader: SocketReader, num_replies: int, *,
                        scalars: bool = True) -> list[bytes | int | ErrorReply | None]:
    """The replies of ``num_replies`` pipelined commands sent in pairs, ``ASKING`` then a
    command (a cluster's ASK followed): per pair ``ASKING``'s (``b"OK"``, or the
    :class:`ErrorReply` that refused it) then the command's, as ``read_replies`` reads it
    (``scalars`` False for ``GET``). Raises as ``read_replies``, and ``ProtocolError`` for
    an ``ASKING`` reply that is neither ``+OK`` nor an error line."""
    assert num_replies % 2 == 0, num_replies
    replies: list[bytes | int | ErrorReply | None] = []
    for _ in range(num_replies // 2):
        line = reader.line()
        if line[:1] == b"-":
            replies.append(ErrorReply(line[1:].decode("utf-8", "replace")))
        elif line == b"+OK":
            replies.append(b"OK")
        else:
            raise ProtocolError(f"an ASKING reply that is no +OK: {line[:40]!r}")
        replies += read_replies(reader, 1, scalars=scalars)
    return replies


def _value(reader: SocketReader, line: bytes, what: str) -> bytes | None:
    """The bulk string (or nil) whose header ``line`` was just read."""
    if line == b"_":  # RESP3's null
        return None
    if line[:1] != b"$":
        raise ProtocolError(f"{what} that is no bulk string: {line[:40]!r}")
    size = _length(line, "bulk header")
    if size == -1:
        return None
    if not 0 <= size <= MAX_BULK_BYTES:
        raise ProtocolError(f"a bulk string of {size} bytes")
    value = reader.exactly(size)
    reader.crlf()
    return value
