"""Red team 32a: the remote store's MOVED redo within the batch's deadline, on the fake
cluster of red team 29c (``MigratingCluster``) with slow nodes::

    GET k1..k4 ──node a, 0.3 s + 0.3 s──> v1, v2, -MOVED b (k3), v4   0.6 s of 0.4 s
    slot map read again; GET k3 ──node b──> ...                  not sent: none left
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("redis")

from test_red_team_29c_cluster import MigratingCluster
from test_red_team_31a_remote import make_store


@pytest.fixture
def cluster(logged_cluster: MigratingCluster) -> MigratingCluster:
    """The fake cluster whose pipelines are logged (``conftest.logged_cluster``)."""
    return logged_cluster


def slow(monkeypatch: pytest.MonkeyPatch, node: Any, key: str, pause_s: float) -> None:
    """``node`` waits ``pause_s`` before its reply to a command of ``key``."""
    answer = node._answer

    def slowly(args: list[bytes]) -> Any:
        pieces = answer(args)
        if pieces is None or len(args) < 2 or args[1] != key.encode():
            return pieces
        return [(data, pause_s if i == 0 else pause) for i, (data, pause) in enumerate(pieces)]

    monkeypatch.setattr(node, "_answer", slowly)


@pytest.mark.parametrize("op", ["get", "contains", "put"])
def test_a_moved_redo_spends_only_what_is_left_of_the_batch(
        cluster: MigratingCluster, monkeypatch: pytest.MonkeyPatch, op: str) -> None:
    """Node a answers blocks 1 and 2 0.3 s late each (each reply within its 0.4 s
    timeout), b block 3 0.3 s late; block 3's slot moved to b (MOVED). ``max_blocking_s``
    is 0.4 s (no retry): after a's 0.6 s none is left, so the redo is not sent: block 3
    misses (or is not written), counted, said in ``last_error``, and b is sent nothing.
    Before, the redo was a batch of its own with a fresh 0.4 s: b was asked (0.9 s a
    batch)."""
    store, blocks = make_store(cluster, timeout_s=0.4, max_retries=0)
    assert store.max_blocking_s == pytest.approx(0.4)
    key = store.namespace.key(3)
    cluster.owner[key] = cluster.b
    cluster.b.data[key.encode()] = cluster.a.data.pop(key.encode())
    for h in (1, 2):
        slow(monkeypatch, cluster.a, store.namespace.key(h), 0.3)
    slow(monkeypatch, cluster.b, key, 0.3)
    errors = store.stats.num_errors
    if op == "get":
        assert sorted(store.get_many(blocks)) == [1, 2, 4]
    elif op == "contains":
        assert store.contains_many(range(1, 5)) == {1, 2, 4}
    else:
        assert store.put_many(blocks) == 3
    assert [node for node, _ in cluster.pipelines] == [cluster.a.address]
    assert store.stats.num_errors - errors == 1
    assert "1 keys answered MOVED" in (store.last_error or "")
    store.close()


def test_a_moved_redo_with_time_left_is_made_once_never_retried(
        cluster: MigratingCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above with 1.5 s of timeout (and one retry): the redo fits, b is asked once and
    block 3 hits; b closing the connection on the redo is not sent again (the retry is
    the batch's, not the redo's): block 3 misses, b's pipelines 1, not 2."""
    store, blocks = make_store(cluster, timeout_s=1.5, max_retries=1)
    key = store.namespace.key(3)
    cluster.owner[key] = cluster.b
    cluster.b.data[key.encode()] = cluster.a.data.pop(key.encode())
    slow(monkeypatch, cluster.a, store.namespace.key(1), 0.2)
    assert sorted(store.get_many(blocks)) == [1, 2, 3, 4], store.last_error
    assert [node for node, _ in cluster.pipelines] == [cluster.a.address, cluster.b.address]
    cluster.pipelines.clear()
    cluster.slot_map.clear()  # the client's map says a again: MOVED again
    cluster.b.down = True
    assert sorted(store.get_many(blocks)) == [1, 2, 4]
    assert [node for node, _ in cluster.pipelines] == [cluster.a.address, cluster.b.address]
    store.close()
