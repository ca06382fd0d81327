"""Red team 34e: the KV event streams' commands are bounded in time where one Redis node
cannot answer (a cluster node down while the others answer, a host that drops packets, a
server that accepts and never answers): a command costs a fraction of a second, counted
as a fault, never redis-py's seconds of retries and waits; a blocking poll still blocks."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial

import pytest
from remote_helpers import PrivateCluster, RedisServers

from kvtier.event_updates import InstanceLost
from kvtier.events import BlockStored
from kvtier.publisher import EventBatch, RedisStreamPublisher, RedisStreamSubscriber
from kvtier.stream_client import COMMAND_TIMEOUT_S, CONNECT_TIMEOUT_S
from kvtier.tier import Tier

redis = pytest.importorskip("redis")

G = Tier.GPU
SLACK_S = 0.25  # a loaded test machine's scheduling, on top of a bound


def stored(seq: int, h: int) -> BlockStored:
    """A BlockStored event of one 4-token block."""
    return BlockStored(seq, h, None, G, 4, None, (1, 2, 3, 4), None, None)


class Connects:
    """Counts socket connects while installed (``monkeypatch``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = socket.socket.connect

        def counted(sock: socket.socket, address: object) -> None:
            self.count += 1
            real(sock, address)  # type: ignore[arg-type]

        monkeypatch.setattr(socket.socket, "connect", counted)


def timed(call: Callable[[], object]) -> float:
    """The seconds ``call()`` took."""
    started = time.monotonic()
    call()
    return time.monotonic() - started


def test_one_cluster_node_down_costs_its_commands_one_refused_connect(
        redis_cluster: PrivateCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """One node of the private cluster killed, the others answering: 3 batches of a
    stream on its shard each fail (counted) in under a quarter second and 4 connects at
    most (the dead node's, and a slot-map refresh, one a node, at most once a second:
    0.001 s and 1 seen for a batch, 1-3 for a poll); a subscriber of a stream on a live shard whose
    ``<stream>:resync`` key is on the dead one polls a stale instance (its resync request
    failing) as fast; the live shard's stream is read as before. Before, each of those
    commands took about 4 s and 11 connects (redis-py's cluster retries: 10, backoff up
    to 1 s). The node killed is not the URL's (redis-py's default node, which resolves
    XREAD's keys: see the report)."""
    dead = redis_cluster.nodes[1]
    names = [f"s{i}" for i in range(200)]
    on_dead = next(s for s in names if redis_cluster.node_of(s) is dead)
    alive = next(s for s in names if redis_cluster.node_of(s) is not dead
                 and redis_cluster.node_of(f"{s}:resync") is dead)
    with RedisStreamPublisher(redis_cluster.url, on_dead, cluster=True) as pub, \
            RedisStreamPublisher(redis_cluster.url, alive, cluster=True) as live_pub, \
            RedisStreamSubscriber(redis_cluster.url, alive, cluster=True,
                                  resync_retry_s=0.0) as sub:
        pub.publish("a", [stored(0, 1)])
        live_pub.publish("b", [stored(0, 1)])
        assert sub.poll() == [EventBatch("b", [stored(0, 1)])]
        dead.kill()
        connects = Connects(monkeypatch)
        for seq in range(1, 4):
            before = connects.count
            assert timed(partial(pub.publish, "a", [stored(seq, seq + 1)])) < COMMAND_TIMEOUT_S
            assert connects.count - before <= 4
        assert pub.num_failed_batches == 3
        live_pub.publish("b", [stored(2, 3)])  # seq 1 missed: b is stale, asked for
        assert sub.poll() == [InstanceLost("b", 1, 2)]
        assert sub.tracker.stale_instances() == ["b"]
        for _ in range(3):
            before = connects.count
            assert timed(sub.poll) < COMMAND_TIMEOUT_S
            assert connects.count - before <= 4
        assert sub.num_resync_requests == 0  # every request fell on the dead shard
        monkeypatch.undo()
        assert live_pub.num_failed_batches == 0


@pytest.fixture
def blackholed_url() -> Iterator[str]:
    """The URL of a loopback port whose listener takes no connection (backlog 0, one
    connection queued): the kernel drops every further SYN, as a host gone does."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = socket.create_connection(("127.0.0.1", port))
    probe = socket.socket()
    probe.settimeout(0.2)
    with pytest.raises(TimeoutError):  # the listener drops SYNs on this kernel
        probe.connect(("127.0.0.1", port))
    probe.close()
    yield f"redis://127.0.0.1:{port}/0"
    queued.close()
    listener.close()


@pytest.fixture
def silent_url() -> Iterator[str]:
    """The URL of a loopback server that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.1)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    stop.set()
    thread.join(5)
    for sock in accepted:
        sock.close()
    listener.close()


def test_a_server_that_drops_packets_costs_a_command_the_connect_timeout(
        blackholed_url: str) -> None:
    """A standalone server whose host drops SYNs: a batch and a poll each fail (counted)
    within CONNECT_TIMEOUT_S (0.1 s; 0.105 s seen). Before, 5 s each (redis-py's connect
    timeout of a client made without one)."""
    with RedisStreamPublisher(blackholed_url, "ev") as pub, \
            RedisStreamSubscriber(blackholed_url, "ev") as sub:
        for seq in range(2):
            assert timed(partial(pub.publish, "a", [stored(seq, seq + 1)])) < \
                CONNECT_TIMEOUT_S + SLACK_S
            assert timed(sub.poll) < CONNECT_TIMEOUT_S + SLACK_S
        assert pub.num_failed_batches == 2


def test_a_server_that_never_answers_costs_a_command_the_command_timeout(
        silent_url: str) -> None:
    """A standalone server that accepts and never answers: a batch and a poll each fail
    (counted) within COMMAND_TIMEOUT_S (0.25 s; 0.251 s seen). Before, 5 s each."""
    with RedisStreamPublisher(silent_url, "ev") as pub, \
            RedisStreamSubscriber(silent_url, "ev") as sub:
        for seq in range(2):
            assert timed(partial(pub.publish, "a", [stored(seq, seq + 1)])) < \
                COMMAND_TIMEOUT_S + SLACK_S
            assert timed(sub.poll) < COMMAND_TIMEOUT_S + SLACK_S
        assert pub.num_failed_batches == 2


def test_a_poll_blocks_longer_than_the_command_timeout(redis_servers: RedisServers) -> None:
    """A poll of block_ms=2000 on the shared server, a batch published 0.6 s in: it is
    read by that poll (XREAD in blocks of BLOCK_SLICE_MS, each within the command
    timeout); a poll of block_ms=1000 on a quiet stream waits about 1 s, reading nothing.
    With the command timeout and one XREAD BLOCK 2000, the read timed out at 0.25 s (a
    fault) and the batch came at the next poll."""
    name = f"ev-{uuid.uuid4().hex}"
    with RedisStreamPublisher(redis_servers.url, name) as pub, \
            RedisStreamSubscriber(redis_servers.url, name) as sub:
        timer = threading.Timer(0.6, lambda: pub.publish("a", [stored(0, 1)]))
        timer.start()
        try:
            started = time.monotonic()
            assert sub.poll(block_ms=2000) == [EventBatch("a", [stored(0, 1)])]
            assert 0.5 < time.monotonic() - started < 2.0
        finally:
            timer.join()
        assert 0.9 < timed(lambda: sub.poll(block_ms=1000)) < 1.0 + SLACK_S + COMMAND_TIMEOUT_S
        assert pub.num_failed_batches == 0
