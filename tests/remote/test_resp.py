"""The MGET reply read off the socket (``kvtier.remote.resp``) and the store's use of it."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from remote_helpers import make_namespace

from kvtier.remote.redis_pipeline import mget, pipeline
from kvtier.remote.redis_store import RedisRemoteStore
from kvtier.remote.resp import (
    MAX_BULK_BYTES,
    MAX_LINE_BYTES,
    ErrorReply,
    ProtocolError,
    SocketReader,
    read_get_replies,
    read_values_reply,
)

# The store's side (``mget``, ``pipeline``) maps refusals to redis-py's exceptions: those
# tests need the redis extra; the reader's own do not.
needs_redis = pytest.mark.skipif(importlib.util.find_spec("redis") is None,
                                 reason="the store's tests need the redis extra")

def encode(values: list[bytes | None], resp3_nulls: bool = False) -> bytes:
    """The RESP reply a server sends for an MGET of these values (the reference)."""
    out = [b"*%d\r\n" % len(values)]
    for v in values:
        if v is None:
            out.append(b"_\r\n" if resp3_nulls else b"$-1\r\n")
        else:
            out.append(b"$%d\r\n%s\r\n" % (len(v), v))
    return b"".join(out)


class ChunkSocket:
    """A socket that hands out ``data`` in the given chunk sizes (cycled), then EOF."""

    def __init__(self, data: bytes, chunks: list[int] | None = None) -> None:
        self.data = data
        self.pos = 0
        self.chunks = chunks or [len(data) or 1]
        self.num_calls = 0

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int:
        size = self.chunks[self.num_calls % len(self.chunks)]
        self.num_calls += 1
        n = min(len(buffer), size, len(self.data) - self.pos)
        buffer[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


values_st = st.lists(st.one_of(st.none(), st.binary(max_size=300),
                               st.sampled_from([b"", b"\r\n", b"$-1\r\n", b"*2\r\n\r\n"]),
                               st.integers(60_000, 140_000).map(lambda n: b"\r\n" * (n // 2))),
                     max_size=12)


@settings(max_examples=300, deadline=None)
@given(values=values_st, chunks=st.lists(st.integers(1, 70_000), min_size=1, max_size=6),
       resp3=st.booleans(), buffer_bytes=st.sampled_from([64, 1 << 16]))
def test_reply_read_as_the_reference_encodes_it(values: list[bytes | None], chunks: list[int],
                                                resp3: bool, buffer_bytes: int) -> None:
    """Any values, any split of the stream into reads: the values come back exactly, as
    ``bytes``, and nothing past the reply is left unread."""
    sock = ChunkSocket(encode(values, resp3), chunks)
    reader = SocketReader(sock, buffer_bytes)
    got = read_values_reply(reader, len(values))
    assert got == values
    assert all(v is None or type(v) is bytes for v in got)
    assert reader.drained and sock.pos == len(sock.data)


@pytest.mark.parametrize("cut", range(0, 40))
def test_a_reply_cut_anywhere_is_a_lost_connection(cut: int) -> None:
    """The server gone part way: ConnectionError, never values."""
    data = encode([b"abc", None, b"0123456789"])
    assert len(data) > 30
    reader = SocketReader(ChunkSocket(data[:cut], [3]), 64)
    if cut >= len(data):
        assert read_values_reply(reader, 3) == [b"abc", None, b"0123456789"]
        return
    with pytest.raises(ConnectionError):
        read_values_reply(reader, 3)


def test_an_error_line_is_the_command_refused_with_the_stream_in_step() -> None:
    reader = SocketReader(ChunkSocket(b"-NOPERM this user has no permissions to run 'mget'\r\n"))
    with pytest.raises(ErrorReply, match=r"^NOPERM this user has no permissions"):
        read_values_reply(reader, 2)
    assert reader.drained


@pytest.mark.parametrize(("data", "match"), [
    (b"+OK\r\n", "no array"),
    (b"*3\r\n$1\r\na\r\n", "3 values for 2 keys"),
    (b"*x\r\n", "no length"),
    (b"*\r\n", "no length"),
    (b"*2\r\n:5\r\n$1\r\na\r\n", "no bulk string"),
    (b"*2\r\n>2\r\n$1\r\na\r\n$1\r\nb\r\n", "no bulk string"),  # a RESP3 push
    (b"*2\r\n$-2\r\n", "bulk string of -2 bytes"),
    (b"*2\r\n$1x\r\n", "no length"),
    (b"*2\r\n$1\r\nab\r\n", "not followed by CRLF"),
    (b"*2\r\n$%d\r\n" % (MAX_BULK_BYTES + 1), f"bulk string of {MAX_BULK_BYTES + 1} bytes"),
    (b"*2\r\n$1234567890123\r\n", "no length"),
    (b"*" + b"1" * (MAX_LINE_BYTES + 5), "line longer"),
])
def test_bytes_that_are_no_mget_reply_are_refused(data: bytes, match: str) -> None:
    """A stream out of step: ProtocolError (a ConnectionError: the connection is closed and
    the batch retried), naming what was wrong; no huge buffer is allocated for a length."""
    reader = SocketReader(ChunkSocket(data + b"\r\n" * 4, [7]), 64)
    with pytest.raises(ProtocolError, match=match):
        read_values_reply(reader, 2)


def get_each(keys: list[str], client: Any) -> list[Any]:
    """The cluster read's pipeline: one GET per key, read as a GET's replies."""
    return pipeline([("GET", key) for key in keys], client, read_get_replies)


class FakeConnection:
    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self.sent: list[tuple[Any, ...]] = []
        self.packed: list[Any] = []
        self.disconnected = False

    def send_command(self, *args: Any) -> None:
        self.sent.append(args)

    def pack_commands(self, commands: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return commands

    def send_packed_command(self, packed: Any) -> None:
        self.packed.append(packed)

    def read_response(self) -> list[bytes | None]:
        return [b"from redis-py", None]

    def disconnect(self) -> None:
        self.disconnected = True


class FakePool:
    def __init__(self, conn: FakeConnection) -> None:
        self.conn = conn
        self.released = 0

    def get_connection(self) -> FakeConnection:
        return self.conn

    def release(self, conn: FakeConnection) -> None:
        assert conn is self.conn
        self.released += 1


class FakeClient:
    def __init__(self, sock: Any) -> None:
        self.connection_pool = FakePool(FakeConnection(sock))


@pytest.mark.parametrize(("data", "values", "disconnected"), [
    (encode([b"a", None]), [b"a", None], False),
    (encode([b"a", None]) + b"+PONG\r\n", [b"a", None], True),  # more than one reply
])
@needs_redis
def test_the_store_pools_a_connection_only_in_step(data: bytes, values: list[bytes | None],
                                                   disconnected: bool) -> None:
    client = FakeClient(ChunkSocket(data))
    assert mget(["k1", "k2"], client) == values
    conn = client.connection_pool.conn
    assert conn.packed == [[("MGET", "k1", "k2")]]
    assert conn.disconnected is disconnected
    assert client.connection_pool.released == 1


@pytest.mark.parametrize(("data", "error"), [
    (b"*2\r\n$5\r\nab", ConnectionError),  # closed mid value
    (b"*2\r\n:1\r\n", ProtocolError),
])
@needs_redis
def test_a_connection_that_failed_part_way_is_closed(data: bytes, error: type[Exception]) -> None:
    client = FakeClient(ChunkSocket(data))
    with pytest.raises(error):
        mget(["k1", "k2"], client)
    assert client.connection_pool.conn.disconnected
    assert client.connection_pool.released == 1


@needs_redis
def test_a_refusal_is_redis_pys_exception_and_keeps_the_connection() -> None:
    """An error line raises what redis-py's pipeline raised for it (the store's retries
    tell refusals from faults by it): NOPERM a refusal, LOADING a connection error."""
    from redis.exceptions import BusyLoadingError, NoPermissionError

    client = FakeClient(ChunkSocket(b"-NOPERM no mget for you\r\n"))
    with pytest.raises(NoPermissionError):
        mget(["k"], client)
    assert not client.connection_pool.conn.disconnected
    client = FakeClient(ChunkSocket(b"-LOADING Redis is loading the dataset in memory\r\n"))
    with pytest.raises(BusyLoadingError):
        mget(["k"], client)


@needs_redis
def test_a_connection_without_a_socket_is_read_by_redis_py() -> None:
    client = FakeClient(None)
    assert mget(["k1", "k2"], client) == [b"from redis-py", None]


@needs_redis
def test_values_of_every_size_round_trip_through_a_real_server(make_redis_server: Any) -> None:
    """Values of 0 bytes to past the reader's buffer, with CRLF inside, and keys that hold
    nothing or another type, read in one MGET each way, twice on the same connection."""
    server = make_redis_server()
    store = RedisRemoteStore(server.url, make_namespace())
    sizes = [0, 1, 2, 65_533, 65_536, 65_537, 3 << 20]
    values = {f"v{n}": (b"\r\n" + os.urandom(n))[:n] for n in sizes}
    with server.client() as client:
        client.mset(values)
        client.rpush("a-list", b"x")
    keys = [*values, "absent", "a-list"]
    for _ in range(2):
        assert store.read_values(keys) == [*values.values(), None, None]
    assert store.stats.num_errors == 0
    store.close()


def encode_gets(replies: list[bytes | str | None]) -> bytes:
    """The replies a server sends for pipelined GETs (a str is an error line)."""
    out = []
    for r in replies:
        if isinstance(r, str):
            out.append(b"-%s\r\n" % r.encode())
        else:
            out.append(encode([r])[4:])  # the element of a one-value array
    return b"".join(out)


@settings(max_examples=200, deadline=None)
@given(replies=st.lists(st.one_of(st.none(), st.binary(max_size=200),
                                  st.sampled_from(["WRONGTYPE Operation against a key",
                                                   "MOVED 3999 127.0.0.1:6381"])),
                        max_size=10),
       chunks=st.lists(st.integers(1, 300), min_size=1, max_size=4))
def test_pipelined_gets_read_as_the_reference_encodes_them(replies: list[bytes | str | None],
                                                           chunks: list[int]) -> None:
    """A key's error line is that key's reply alone; the rest come back exactly."""
    reader = SocketReader(ChunkSocket(encode_gets(replies), chunks), 64)
    got = read_get_replies(reader, len(replies))
    assert [str(g) if isinstance(g, ErrorReply) else g for g in got] == replies
    assert reader.drained


@needs_redis
def test_cluster_gets_map_each_refusal_to_redis_pys_exception() -> None:
    """What the cluster read path needs to tell a key's refusal (counted, that key misses)
    from the cluster's state (MOVED: the chunk fails and the slot map is read again)."""
    from redis.exceptions import MovedError, ResponseError

    client = FakeClient(ChunkSocket(encode_gets(
        [b"v", "WRONGTYPE Operation against a key holding the wrong kind of value",
         "MOVED 3999 127.0.0.1:6381", None])))
    got = get_each(["a", "b", "c", "d"], client)
    assert got[0] == b"v" and got[3] is None
    assert type(got[1]) is ResponseError and isinstance(got[2], MovedError)
    conn = client.connection_pool.conn
    assert conn.sent == [] and conn.packed == [[("GET", k) for k in "abcd"]]
    assert not conn.disconnected and client.connection_pool.released == 1


@pytest.mark.parametrize(("data", "disconnected"), [
    (encode_gets([b"v"]) + b"$1\r\nx\r\n", True),  # a reply more than asked for
    (b"$5\r\nab", None),  # closed mid value: raises
])
@needs_redis
def test_cluster_gets_pool_a_connection_only_in_step(data: bytes,
                                                     disconnected: bool | None) -> None:
    client = FakeClient(ChunkSocket(data))
    if disconnected is None:
        with pytest.raises(ConnectionError):
            get_each(["a"], client)
        assert client.connection_pool.conn.disconnected
    else:
        assert get_each(["a"], client) == [b"v"]
        assert client.connection_pool.conn.disconnected is disconnected
    assert client.connection_pool.released == 1


@needs_redis
def test_values_round_trip_through_a_real_cluster(redis_cluster: Any) -> None:
    """Values of 0 bytes to past the reader's buffer on every node, keys of another type
    and absent ones: each key's own answer, on every node's connection."""
    store = RedisRemoteStore(redis_cluster.url, make_namespace(), cluster=True)
    sizes = [0, 1, 65_536, 65_537, 1 << 20]
    values = {f"v{n}-{i}": (b"\r\n" + os.urandom(n))[:n] for n in sizes for i in range(4)}
    for key, value in values.items():
        with redis_cluster.node_of(key).client() as client:
            client.set(key, value)
    with redis_cluster.node_of("a-list").client() as client:
        client.rpush("a-list", b"x")
    keys = [*values, "absent", "a-list"]
    for _ in range(2):
        assert store.read_values(keys) == [*values.values(), None, None]
    assert store.stats.num_errors == 2  # the list's WRONGTYPE, once a read
    store.close()


@needs_redis
def test_the_socket_read_is_the_one_the_command_went_out_on() -> None:
    """redis-py may reconnect inside ``send_packed_command`` (a failed health check): the reply is
    read from the new socket, not the one the pooled connection had before."""
    client = FakeClient(ChunkSocket(b""))  # the old socket: closed, nothing to read
    conn = client.connection_pool.conn
    new = ChunkSocket(encode([b"a"]))

    def reconnecting_send(packed: Any) -> None:
        conn._sock = new
        conn.packed.append(packed)

    conn.send_packed_command = reconnecting_send  # type: ignore[method-assign]
    assert mget(["k"], client) == [b"a"]
    assert not conn.disconnected


@needs_redis
def test_a_pool_that_needs_a_command_name_gets_one() -> None:
    """redis-py before 5.3 takes a command name in ``get_connection``; later ones warn at
    one, so it is passed only where it is needed."""
    from kvtier.remote.redis_pipeline import _pool_connection

    class OldPool:
        def get_connection(self, command_name: str, *keys: Any) -> str:
            return f"conn for {command_name}"

    class NewPool:
        def get_connection(self, command_name: str | None = None, *keys: Any) -> str:
            assert command_name is None
            return "conn"

    assert _pool_connection(OldPool()) == "conn for GET"
    assert _pool_connection(NewPool()) == "conn"
