"""Red team 21b: the store's read path off the socket (``kvtier.remote.resp``, ``_mget``)
attacked through its public API by a misbehaving server speaking RESP2 over TCP, and a
unix socket's round trip through it."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from remote_helpers import make_blocks, make_namespace

from kvtier.remote import resp
from kvtier.remote.resp import (
    ErrorReply,
    ProtocolError,
    SocketReader,
    read_replies,
    read_values_reply,
)

pytest.importorskip("redis")

from kvtier.remote.redis_store import RedisRemoteStore

# A reply as pieces sent with a pause before each; None closes the connection at once.
Pieces = list[tuple[bytes, float]] | None
HONEST = object()  # a misreply's answer for "the honest reply"


def bulk(value: bytes | None) -> bytes:
    return b"$-1\r\n" if value is None else b"$%d\r\n%s\r\n" % (len(value), value)


class FakeRedis:
    """A loopback server speaking just enough RESP2 for redis-py's handshake (HELLO refused,
    CLIENT, INFO, SELECT, PING), then SET, EXISTS and MGET on a dict. ``misreply(keys, n)`` (n: the
    server's n-th MGET, from 1) may answer an MGET in its place: pieces, None to close the
    connection, or HONEST for the honest reply."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.misreply: Callable[[list[bytes], int], Pieces | object] | None = None
        self.num_mgets = 0
        self.num_connections = 0
        self.write_drip_s = 0.0  # the pause before each byte of a SET's reply
        self.info_drip_s = 0.0  # the pause before each byte of INFO's reply
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self._listener.getsockname()[1]}/0"
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()
        for sock in list(self._socks):
            sock.close()

    def honest(self, keys: list[bytes]) -> bytes:
        with self._lock:
            return b"*%d\r\n" % len(keys) + b"".join(bulk(self.data.get(k)) for k in keys)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.num_connections += 1
            self._socks.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        stream = sock.makefile("rb")
        try:
            while True:
                line = stream.readline()
                if not line:
                    return
                args = []
                for _ in range(int(line[1:])):
                    size = int(stream.readline()[1:])
                    arg = stream.read(size + 2)
                    if len(arg) != size + 2:  # the client closed part way: no command
                        return
                    args.append(arg[:-2])
                pieces = self._answer(args)
                if pieces is None:
                    sock.close()
                    return
                for data, pause in pieces:
                    if pause:
                        time.sleep(pause)
                    sock.sendall(data)
        except (OSError, ValueError):
            return

    def _answer(self, args: list[bytes]) -> Pieces:
        command = args[0].upper()
        simple = {b"HELLO": b"-ERR unknown command 'HELLO'\r\n", b"CLIENT": b"+OK\r\n",
                  b"SELECT": b"+OK\r\n", b"PING": b"+PONG\r\n",
                  b"INFO": bulk(b"# Server\r\nrun_id:fake-21b\r\n" + b"x" * 20)}
        if command == b"INFO" and self.info_drip_s:
            return [(simple[command][i:i + 1], self.info_drip_s)
                    for i in range(len(simple[command]))]
        if command in simple:
            return [(simple[command], 0.0)]
        if command == b"SET":
            with self._lock:
                self.data[args[1]] = args[2]
            return [(b"+OK\r\n"[i:i + 1], self.write_drip_s) for i in range(5)]
        if command == b"EXISTS":
            with self._lock:
                found = args[1] in self.data
            return [(b":%d\r\n" % found, 0.0)]
        if command == b"MGET":
            with self._lock:
                self.num_mgets += 1
                n = self.num_mgets
            if self.misreply is not None:
                got = self.misreply(args[1:], n)
                if got is not HONEST:
                    return got  # type: ignore[return-value]
            return [(self.honest(args[1:]), 0.0)]
        return [(b"-ERR unknown command\r\n", 0.0)]


@pytest.fixture
def fake() -> Iterator[FakeRedis]:
    server = FakeRedis()
    yield server
    server.close()


def store_on(server: FakeRedis, **options: Any) -> tuple[RedisRemoteStore, dict[int, bytes]]:
    """A store on ``server`` holding four blocks (written honestly)."""
    ns = make_namespace()
    store = RedisRemoteStore(server.url, ns, **{"timeout_s": 0.2, "max_retries": 0,
                                               "backoff_s": 0.0, **options})
    blocks = make_blocks(ns, 4)
    assert store.put_many(blocks) == 4, store.last_error
    return store, blocks


def test_a_server_dripping_a_reply_is_cut_at_the_timeout(fake: FakeRedis) -> None:
    """A byte now and then, each inside the socket's timeout: the reply as a whole is due
    within ``timeout_s``. On the old code the read took every piece (2 s here, 100 s in a
    probe) past ``max_blocking_s`` (0.2 s) and returned the values."""
    store, blocks = store_on(fake)

    def drip(keys: list[bytes], n: int) -> Pieces | object:
        if n > 1:
            return HONEST
        reply = fake.honest(keys)
        step = -(-len(reply) // 20)
        return [(reply[i:i + step], 0.1) for i in range(0, len(reply), step)]

    fake.misreply = drip
    t0 = time.monotonic()
    assert store.get_many(list(blocks)) == {}
    elapsed = time.monotonic() - t0
    assert store.stats.num_timeouts == 1 and store.stats.num_errors == 1
    assert elapsed < 1.5  # generous: the old code's read took the 2 s the drip lasts
    # The next read, on a new connection, is whole and right.
    assert {h: bytes(v) for h, v in store.get_many(list(blocks)).items()} == blocks
    store.close()


def test_a_server_dripping_write_replies_is_cut_at_the_timeout(fake: FakeRedis) -> None:
    """The write's pipeline too: a SET's ``+OK`` a byte every 0.06 s (four blocks, 1.2 s)
    is a timeout at 0.2 s, the blocks counted as not written; on the old code (redis-py's
    pipeline, each recv bounded alone) the write took the whole drip and succeeded."""
    store, blocks = store_on(fake)
    fake.write_drip_s = 0.06
    more = make_blocks(store.namespace, 4, first_hash=10)
    t0 = time.monotonic()
    assert store.put_many(more) == 0
    elapsed = time.monotonic() - t0
    assert store.stats.num_timeouts == 1 and store.stats.num_failed_puts == 4
    assert elapsed < 1.0  # generous: the old code's write took the 1.2 s of the drip
    fake.write_drip_s = 0.0
    assert store.put_many(more) == 4
    assert store.contains_many([*blocks, *more, 99]) == {*blocks, *more}
    store.close()


def test_a_server_dripping_its_info_reply_is_cut_at_the_timeout(fake: FakeRedis) -> None:
    """A new connection's setup reads the server's INFO (its run id): dripped a byte every
    0.03 s (1.6 s for the reply), the connection fails at the timeout (0.2 s), a
    fault counted, and the next batch connects anew; on the old code (redis-py's read) the
    read waited out the drip and succeeded."""
    ns = make_namespace()
    store = RedisRemoteStore(fake.url, ns, timeout_s=0.2, max_retries=0, backoff_s=0.0)
    fake.info_drip_s = 0.03
    t0 = time.monotonic()
    assert store.put_many(make_blocks(ns, 2)) == 0
    assert time.monotonic() - t0 < 1.2  # generous: the old code waited out the 1.6 s drip
    assert store.stats.num_timeouts == 1
    fake.info_drip_s = 0.0
    assert store.put_many(make_blocks(ns, 2)) == 2
    assert store.stats.num_errors == 1
    store.close()


def test_write_and_exists_replies_are_read_whole() -> None:
    """``read_replies``: simple strings, integers, values, nils and error lines, in order,
    in any split of the stream; a type of none of those is out of step."""
    data = b"+OK\r\n:1\r\n:0\r\n$3\r\nabc\r\n$-1\r\n-OOM command not allowed\r\n+OK\r\n"
    for piece in (1, 4, 64):
        replies = read_replies(SocketReader(ClockSocket(data, piece, 0.0, [0.0]), 32), 7)
        assert [str(r) if isinstance(r, ErrorReply) else r for r in replies] == [
            b"OK", 1, 0, b"abc", None, "OOM command not allowed", b"OK"]
    with pytest.raises(ProtocolError, match="no bulk string"):
        read_replies(SocketReader(ClockSocket(b"*1\r\n:1\r\n", 64, 0.0, [0.0])), 1)


@pytest.mark.parametrize(("name", "misreply", "timeouts"), [
    ("closed at once", lambda s, k: None, 0),
    ("closed mid value", lambda s, k: [(s.honest(k)[:300], 0.0), (b"", 0.0)], 1),
    ("garbage", lambda s, k: [(b"hello world\r\n", 0.0)], 0),
    ("a bulk length past 512 MiB", lambda s, k: [(b"*4\r\n$%d\r\n" % (600 << 20), 0.0)], 0),
    ("a RESP3 map", lambda s, k: [(b"%1\r\n+a\r\n+b\r\n", 0.0)], 0),
    ("a RESP3 push first", lambda s, k: [(b">2\r\n$1\r\nm\r\n$1\r\nx\r\n" + s.honest(k), 0.0)],
     0),
    ("an error line mid array", lambda s, k: [(s.honest(k)[:4] + b"$-1\r\n-ERR x\r\n", 0.0)], 0),
    ("one value short", lambda s, k: [(s.honest(k[:-1]), 0.0)], 0),
    ("one value more", lambda s, k: [(s.honest([*k, k[0]]), 0.0)], 0),
    ("a nil array", lambda s, k: [(b"*-1\r\n", 0.0)], 0),
    ("a stall", lambda s, k: [(s.honest(k)[:100], 0.0), (s.honest(k)[100:], 1.0)], 1),
])
def test_a_broken_reply_is_a_counted_miss_and_the_next_read_works(
        fake: FakeRedis, name: str, misreply: Callable[[FakeRedis, list[bytes]], Pieces],
        timeouts: int) -> None:
    """Each broken reply: no value, one error counted (a timeout where the server stalled),
    the connection dropped (the next read makes a new one) and the next read right."""
    store, blocks = store_on(fake)
    fake.misreply = lambda keys, n: misreply(fake, keys) if n == 1 else HONEST
    assert store.get_many(list(blocks)) == {}, name
    assert (store.stats.num_errors, store.stats.num_timeouts) == (1, timeouts), name
    before = fake.num_connections
    assert {h: bytes(v) for h, v in store.get_many(list(blocks)).items()} == blocks
    assert fake.num_connections == before + 1  # the connection out of step was not pooled
    assert store.stats.num_errors == 1 and store.stats.num_bad_payloads == 0
    store.close()


def test_a_reply_past_its_own_is_never_read_as_the_next_one(fake: FakeRedis) -> None:
    """A server answering twice (at once, or a moment later, so it lands after the reply
    was read and the connection pooled): the next MGET, of other keys with as many values,
    never gets the stale reply; no value for the wrong key, even before the codec."""
    ns = make_namespace()
    store = RedisRemoteStore(fake.url, ns, timeout_s=0.5, max_retries=0)
    blocks = make_blocks(ns, 8)
    assert store.put_many(blocks) == 8
    first, second = list(blocks)[:4], list(blocks)[4:]
    for pause in (0.0, 0.05):
        fake.misreply = lambda keys, n, pause=pause: [(fake.honest(keys), 0.0),
                                                      (fake.honest(keys), pause)]
        assert store.read_values([ns.key(h) for h in first]) == [
            fake.data[ns.key(h).encode()] for h in first]
        fake.misreply = None
        time.sleep(pause * 2)  # the stale reply has landed on the pooled connection
        assert store.read_values([ns.key(h) for h in second]) == [
            fake.data[ns.key(h).encode()] for h in second]
    assert store.stats.num_errors == 0
    store.close()


def test_readers_on_several_connections_and_the_io_thread_writing(fake: FakeRedis) -> None:
    """Four threads reading on four connections while the I/O thread writes, the server
    answering every 7th MGET twice and every 11th with an integer: no read ever gets a
    value of another key (read_values checked against the server's data, not the codec)."""
    ns = make_namespace()
    store = RedisRemoteStore(fake.url, ns, timeout_s=2.0, num_connections=4,
                             max_batch_keys=3, max_retries=1, backoff_s=0.0,
                             breaker_threshold=1000)
    blocks = make_blocks(ns, 48)
    written = {h: v for h, v in blocks.items() if h <= 24}
    assert store.put_many(written) == 24

    def misreply(keys: list[bytes], n: int) -> Pieces | object:
        if n % 7 == 0:
            return [(fake.honest(keys) * 2, 0.0)]
        if n % 11 == 0:  # an integer where a value belongs
            return [(b"*%d\r\n:1\r\n" % len(keys), 0.0)]
        return HONEST

    fake.misreply = misreply
    wrong: list[int] = []

    def read(seed: int) -> None:
        rnd = random.Random(seed)
        for _ in range(25):
            want = rnd.sample(sorted(blocks), 9)
            for h, v in store.get_many(want).items():
                if bytes(v) != blocks[h]:
                    wrong.append(h)
            values = store.read_values([ns.key(h) for h in want])
            for h, raw in zip(want, values or [], strict=False):
                if raw is not None and raw != ns.encode(h, blocks[h]):
                    wrong.append(h)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for h, v in blocks.items():
        if h > 24:
            assert store.write_back({h: v})
    for t in threads:
        t.join()
    assert store.flush(timeout=30)
    assert wrong == [] and store.stats.num_bad_payloads == 0
    assert fake.num_mgets > 100 and store.stats.num_errors > 0
    fake.misreply = None
    # A reader's fault closes its own connection only: every write landed (test_red_team_22b).
    got = {h: bytes(v) for h, v in store.get_many(list(blocks)).items()}
    assert got == blocks and store.stats.num_failed_puts == 0
    store.close()


class ClockSocket:
    """Hands out ``data`` ``piece`` bytes a call, each call taking ``seconds`` of a fake
    clock; keeps the timeouts it is given."""

    def __init__(self, data: bytes, piece: int, seconds: float, clock: list[float]) -> None:
        self.data, self.piece, self.seconds, self.clock = data, piece, seconds, clock
        self.pos = 0
        self.timeout: float | None = 0.5
        self.timeouts: list[float | None] = []

    def gettimeout(self) -> float | None:
        return self.timeout

    def settimeout(self, value: float | None) -> None:
        self.timeout = value
        self.timeouts.append(value)

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int:
        self.clock[0] += self.seconds
        n = min(len(buffer), self.piece, len(self.data) - self.pos)
        buffer[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def test_the_reader_holds_a_reply_to_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic (a fake clock): each recv is given the time left, and the reply is a
    TimeoutError once the deadline passed; a reply within it is read whole and the socket's
    own timeout is given back."""
    clock = [100.0]
    monkeypatch.setattr(resp, "monotonic", lambda: clock[0])
    data = b"*2\r\n$10\r\n0123456789\r\n$-1\r\n"
    slow = ClockSocket(data, 3, 0.1, clock)
    reader = SocketReader(slow, 64, timeout_s=0.5)
    with pytest.raises(TimeoutError, match=r"took longer than 0\.5 s"):
        read_values_reply(reader, 2)
    assert slow.timeouts[0] == pytest.approx(0.5) and slow.timeouts[1] == pytest.approx(0.4)
    reader.restore()
    assert slow.timeout == 0.5
    fast = ClockSocket(data, 64, 0.1, clock)
    reader = SocketReader(fast, 64, timeout_s=0.5)
    assert read_values_reply(reader, 2) == [b"0123456789", None]
    reader.restore()
    assert fast.timeout == 0.5


def test_a_large_reply_still_streaming_over_a_slow_link_is_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The deadline grows by ``timeout_s`` per MiB that came: a 4 MiB value at 256 KiB per
    0.1 s (a slow link, 1.8 s in all, timeout 0.5 s) is read whole; the same link
    stalling for a timeout between two pieces is a TimeoutError."""
    clock = [0.0]
    monkeypatch.setattr(resp, "monotonic", lambda: clock[0])
    value = bytes(range(256)) * (4 << 12)
    data = b"*1\r\n" + bulk(value)
    assert read_values_reply(SocketReader(ClockSocket(data, 256 << 10, 0.1, clock),
                                          timeout_s=0.5), 1) == [value]
    assert clock[0] == pytest.approx(1.8)  # 18 reads: 64 KiB, then 256 KiB each

    class Stalling(ClockSocket):
        def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int:
            if self.pos > (2 << 20):
                self.clock[0] += 1.0  # the server stalls part way: past any allowance
            return super().recv_into(buffer, nbytes)

    with pytest.raises(TimeoutError, match=r"took longer than 1\.5 s"):
        read_values_reply(SocketReader(Stalling(data, 256 << 10, 0.1, clock), timeout_s=0.5), 1)


def test_a_huge_length_takes_memory_only_as_its_bytes_come() -> None:
    """A length of 200 MiB and 1 KiB of it, then the end: a lost connection, without a
    200 MiB buffer allocated first (the old reader's peak was the whole length)."""
    data = b"*1\r\n$%d\r\n" % (200 << 20) + b"x" * 1024

    class Once:
        def __init__(self) -> None:
            self.pos = 0

        def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int:
            n = min(len(buffer), len(data) - self.pos)
            buffer[:n] = data[self.pos:self.pos + n]
            self.pos += n
            return n

    tracemalloc.start()
    try:
        with pytest.raises(ConnectionError, match="middle of a value"):
            read_values_reply(SocketReader(Once(), 64), 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < resp.DIRECT_BULK_BYTES + (8 << 20)


def test_values_past_the_direct_size_are_read_in_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Values longer than ``DIRECT_BULK_BYTES`` (made small here) come back exactly."""
    monkeypatch.setattr(resp, "DIRECT_BULK_BYTES", 7)
    values: list[bytes | None] = [b"", b"abc", b"0123456", b"01234567", bytes(range(50)), None]
    data = b"*%d\r\n" % len(values) + b"".join(bulk(v) for v in values)
    for piece in (1, 5, 64):
        clock = [0.0]
        assert read_values_reply(SocketReader(ClockSocket(data, piece, 0.0, clock), 16),
                                 len(values)) == values


def test_a_unix_socket_round_trips_through_the_socket_read(tmp_path: Path) -> None:
    """unix:// : blocks written and read back through ``_mget``'s read off the socket."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    path = tmp_path / "redis.sock"
    proc = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(path),
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ns = make_namespace()
        store = RedisRemoteStore(f"unix://{path}", ns, timeout_s=2.0)
        deadline = time.monotonic() + 10
        while store.check_connection() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        errors = store.stats.num_errors  # refused connections while the server started
        blocks = make_blocks(ns, 5)
        assert store.put_many(blocks) == 5
        for _ in range(2):
            assert {h: bytes(v) for h, v in store.get_many([*blocks, 99]).items()} == blocks
        assert store.stats.num_errors == errors
        store.close()
    finally:
        proc.kill()
        proc.wait()
