"""Red team 22b: the Redis store's connections under a fault of one of them (the others in
flight complete), attacked through its public API by the misbehaving RESP2 server of
``test_red_team_21b_remote``."""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from remote_helpers import make_blocks, make_namespace

pytest.importorskip("redis")

from test_red_team_21b_remote import HONEST, FakeRedis, Pieces

from kvtier.remote.redis_store import RedisRemoteStore
from kvtier.remote.resp import ProtocolError, SocketReader, read_get_replies, read_replies


class Cut(bytes):
    """A reply's first bytes, the connection closed after them."""


class AfterHeld(bytes):
    """A reply sent once ``num_held`` held commands arrived; the held ones are let go a
    moment after the client closed this connection."""

    num_held = 3


class HoldingRedis(FakeRedis):
    """``FakeRedis`` that holds its reply to a command on a key of ``held`` until ``release``
    is set (each arrival counted on ``arrived``), and answers a command on a key of
    ``faults`` with that reply (pieces, None to close the connection, or a ``Cut``)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: set[bytes] = set()
        self.faults: dict[bytes, Pieces | Cut | AfterHeld] = {}
        self.release = threading.Event()
        self.arrived = threading.Semaphore(0)
        self._local = threading.local()

    def _serve(self, sock: socket.socket) -> None:
        self._local.sock = sock
        super()._serve(sock)

    def _answer(self, args: list[bytes]) -> Pieces:
        key = args[1] if len(args) > 1 else b""
        fault = self.faults.get(key, HONEST)
        if isinstance(fault, Cut):
            self._local.sock.sendall(fault)
            return None
        if isinstance(fault, AfterHeld):
            for _ in range(fault.num_held):
                assert self.arrived.acquire(timeout=10)
            sock = self._local.sock
            sock.sendall(fault)
            while sock.recv(1 << 16):  # until the client closes it
                pass
            # NOTE: a moment for a client that would close the others too (the old code):
            # the new code needs no wait, the held replies are right whenever they come.
            threading.Event().wait(0.2)
            self.release.set()
            return None
        if fault is not HONEST:
            return fault  # type: ignore[return-value]
        if key in self.held:
            self.arrived.release()
            self.release.wait(30)
        return super()._answer(args)


@pytest.fixture
def holding() -> Iterator[HoldingRedis]:
    server = HoldingRedis()
    yield server
    server.release.set()
    server.close()


# Each fault of one connection, as the server gives it.
FAULTS: dict[str, Pieces | Cut] = {
    "a reset": None,
    "garbage": [(b"hello world\r\n", 0.0)],
    "a cut mid value": Cut(b"*1\r\n$100\r\nabc"),
    "a refusal": [(b"-NOPERM this user has no permissions to run the 'mget' command\r\n", 0.0)],
    "a stall": [(b"*1\r\n", 0.0), (b"", 30.0)],
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_one_connections_fault_leaves_the_others_in_flight_alone(
        holding: HoldingRedis, fault: str) -> None:
    """Two reads (on the caller's threads) and a write (on the I/O thread) in flight on
    their own connections while a fourth read's connection faults: exactly that read
    misses; the others return their exact values and the write lands. On the old code the
    fault closed the shared client, every connection of its pool with it: the reads in
    flight missed and the write failed."""
    ns = make_namespace()
    # NOTE: a stall's read must time out before the held ones are let go, and each held one
    # answered within its own timeout after: the held ones start 0.5 s after it.
    timeout_s = 1.0 if fault == "a stall" else 5.0
    store = RedisRemoteStore(holding.url, ns, timeout_s=timeout_s, max_retries=0,
                             backoff_s=0.0, num_connections=4, breaker_threshold=100)
    blocks = make_blocks(ns, 5)
    assert store.put_many({h: v for h, v in blocks.items() if h <= 4}) == 4
    holding.faults[ns.key(1).encode()] = FAULTS[fault]
    holding.held = {ns.key(h).encode() for h in (2, 3, 5)}
    got: dict[str, Any] = {}
    lost: list[list[int]] = []

    def faulted() -> None:
        got["faulted"] = store.get_many([1])

    stalled = threading.Thread(target=faulted)
    if fault == "a stall":  # it reads first: its deadline comes before the others'
        stalled.start()
        threading.Event().wait(0.5)
    readers = [threading.Thread(target=lambda: got.update(values=store.read_values([ns.key(2)]))),
               threading.Thread(target=lambda: got.update(found=store.get_many([3])))]
    for t in readers:
        t.start()
    assert store.write_back({5: blocks[5]}, on_lost=lost.append)
    for _ in range(3):  # the two reads and the write are on the server, their replies held
        assert holding.arrived.acquire(timeout=10)
    if fault == "a stall":
        stalled.join(timeout=10)
    else:
        faulted()
    holding.release.set()
    for t in readers:
        t.join(timeout=10)
    assert store.flush(timeout=10)
    assert got["faulted"] == {}
    assert got["values"] == [ns.encode(2, blocks[2])]
    assert {h: bytes(v) for h, v in got["found"].items()} == {3: blocks[3]}
    assert lost == []
    stats = store.stats
    assert (stats.num_errors, stats.num_failed_puts, stats.num_puts) == (1, 0, 5)
    assert stats.num_timeouts == (fault == "a stall")
    # The faulted read's connection was dropped alone; the store reads on.
    holding.faults.clear()
    found = store.get_many(list(blocks))
    assert {h: bytes(v) for h, v in found.items()} == blocks
    store.close()


@pytest.mark.parametrize("fault", [b"hello world\r\n", b"*2\r\n:1\r\n:2\r\n"])
def test_one_chunks_fault_leaves_the_batchs_other_chunks_alone(holding: HoldingRedis,
                                                               fault: bytes) -> None:
    """One read of eight blocks over four connections (chunks of two): the first chunk's
    reply is garbage (or integers), sent while the other three are on the server; exactly its two
    blocks miss and the other six come back exact. On the old code its fault closed the
    other chunks' connections: the whole read missed."""
    ns = make_namespace()
    store = RedisRemoteStore(holding.url, ns, timeout_s=5.0, max_retries=0, backoff_s=0.0,
                             num_connections=4, breaker_threshold=100)
    blocks = make_blocks(ns, 8)
    assert store.put_many(blocks) == 8
    holding.faults[ns.key(1).encode()] = AfterHeld(fault)
    holding.held = {ns.key(h).encode() for h in (3, 5, 7)}
    found = store.get_many(list(blocks))
    assert {h: bytes(v) for h, v in found.items()} == {h: v for h, v in blocks.items() if h > 2}
    assert (store.stats.num_errors, store.stats.num_misses) == (1, 2)
    store.close()


class MarkedRedis(FakeRedis):
    """``FakeRedis`` whose ``MGET`` naming a key of ``faults`` gets that fault in place of
    its reply (a key no block is written under marks one read)."""

    def __init__(self) -> None:
        super().__init__()
        self.faults: dict[bytes, Pieces] = {}

    def _answer(self, args: list[bytes]) -> Pieces:
        if args[0].upper() == b"MGET":
            for key in args[1:]:
                if key in self.faults:
                    return self.faults[key]
        return super()._answer(args)


def test_readers_and_a_writer_under_faults_lose_only_the_faulted_reads() -> None:
    """Four threads each making 30 reads of four blocks (and one marker key, never
    written), one MGET each on a connection of its own, while the I/O thread writes 24 more
    blocks; every fourth read's reply is garbage, a reset or a refusal. Exactly those reads
    miss, every other read gets its exact blocks and every write lands. On the old code
    each fault closed the connections of the reads and writes in flight beside it: they
    missed or failed too."""
    server = MarkedRedis()
    ns = make_namespace()
    store = RedisRemoteStore(server.url, ns, timeout_s=5.0, max_retries=0, backoff_s=0.0,
                             breaker_threshold=10_000)
    blocks = make_blocks(ns, 48)
    first = {h: v for h, v in blocks.items() if h <= 24}
    assert store.put_many(first) == 24
    kinds: list[Pieces] = [[(b"hello world\r\n", 0.0)], None,
                           [(b"-NOPERM no permissions to run the 'mget' command\r\n", 0.0)]]
    faulted = {1000 + i for i in range(120) if i % 4 == 0}
    server.faults = {ns.key(m).encode(): kinds[m % 3] for m in faulted}
    wrong: list[tuple[int, dict[int, bytes]]] = []

    def read(thread: int) -> None:
        rnd = random.Random(thread)
        for k in range(30):
            marker = 1000 + thread * 30 + k
            want = rnd.sample(sorted(first), 4)
            got = {h: bytes(v) for h, v in store.get_many([*want, marker]).items()}
            expected = {} if marker in faulted else {h: first[h] for h in want}
            if got != expected:
                wrong.append((marker, got))

    threads = [threading.Thread(target=read, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for h in range(25, 49):
        assert store.write_back({h: blocks[h]})
    for t in threads:
        t.join(timeout=60)
    assert store.flush(timeout=30)
    assert wrong == []
    stats = store.stats
    assert (stats.num_errors, stats.num_failed_puts, stats.num_puts) == (len(faulted), 0, 48)
    server.faults.clear()
    assert {h: bytes(v) for h, v in store.get_many(list(blocks)).items()} == blocks
    store.close()
    server.close()


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:99999/0", "redis://127.0.0.1:abc/0", "redis://127.0.0.1:-1/0",
    "rediss://h:65536", "redis://h:1:2/0", "redis://:secret@127.0.0.1:0/0", "redis://h:00/0",
    "redis://127.0.0.1:/0", "unix://",
])
def test_a_url_whose_port_or_path_is_none_is_refused_when_made(url: str) -> None:
    """A port out of range or no number, port 0 (redis-py connected to 6379 in its place:
    another server than the url names) and a unix:// url without a path: refused at
    construction, naming the url without its password. On the old code the store was made
    and every batch failed for ever as a fault ("ValueError: Port out of range 0-65535."),
    or went to port 6379."""
    with pytest.raises(ValueError, match=r"url port must be an integer in 1\.\.65535|a unix:// "
                                         r"url needs the socket's path") as info:
        RedisRemoteStore(url, make_namespace())
    assert "secret" not in str(info.value)


@pytest.mark.parametrize("url", ["redis://h:6379/0", "redis://h:1", "redis://h:65535/0",
                                 "redis:///0", "redis://[::1]:6379/0", "redis://[::1]/0",
                                 "redis://u:p@h/0", "unix:///tmp/kvtier-22b.sock"])
def test_a_url_with_a_port_in_range_or_none_is_made(url: str) -> None:
    """What redis-py reads as the url says (no port: 6379) is made as before."""
    RedisRemoteStore(url, make_namespace()).close()


def test_a_fault_is_one_sentence_with_one_period() -> None:
    """A server that refuses connections: the fault reads "... Connection refused." (the
    old text doubled redis-py's own period: "Connection refused..")."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = RedisRemoteStore(f"redis://127.0.0.1:{port}/0", make_namespace(), timeout_s=0.5,
                             max_retries=0)
    problem = store.check_connection()
    assert problem is not None and problem.startswith(f"redis at redis://127.0.0.1:{port}/0: "
                                                      "ConnectionError: Error 111 connecting")
    assert problem.endswith("Connection refused.") and not problem.endswith("..")
    store.close()


@pytest.mark.parametrize("reply", [b"+OK\r\n", b":1\r\n", b"*1\r\n$1\r\na\r\n", b"%0\r\n"])
def test_a_get_reply_is_a_value_a_nil_or_an_error_line_only(reply: bytes) -> None:
    """``read_get_replies`` is ``read_replies`` without simple strings and integers: a GET
    answered by one of those (or any other type) is out of step, where ``read_replies``
    reads the first two as a write's or an EXISTS's reply."""
    class Once:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int:
            n = min(len(buffer), len(self.data))
            buffer[:n], self.data = self.data[:n], self.data[n:]
            return n

    with pytest.raises(ProtocolError, match="a reply that is no bulk string"):
        read_get_replies(SocketReader(Once(b"$1\r\nv\r\n" + reply)), 2)
    if reply[:1] in b"+:":
        got = read_replies(SocketReader(Once(b"$1\r\nv\r\n" + reply)), 2)
        assert got == [b"v", b"OK" if reply[:1] == b"+" else 1]
