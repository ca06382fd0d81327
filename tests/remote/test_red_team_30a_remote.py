"""Red team 30a: the remote tier's fault handling on a cluster node that answers but cannot
serve (CLUSTERDOWN, LOADING, MASTERDOWN), one that answers TRYAGAIN while a slot moves, and
the breaker's half-open probe.

A reply that says the node cannot serve at all is the node's fault, as a connection's is:
its pipeline fails, and ``breaker_threshold`` of them in a row open that node's breaker::

    node a: GET k1..k4 ──> CLUSTERDOWN x4      a pipeline failed (1 of 3)
    node a: GET k1..k4 ──> CLUSTERDOWN x4      (2 of 3)
    node a: GET k1..k4 ──> CLUSTERDOWN x4      (3 of 3): a's breaker opens
    node a: -- short-circuited --              until its cooldown passes

One key's refusal among served ones (a slot no node serves) stays that key's miss
(test_red_team_29c_cluster).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from remote_helpers import PrivateCluster, PrivateRedis, make_blocks, make_namespace

pytest.importorskip("redis")

from test_red_team_29c_cluster import MigratingCluster, cluster_store

import kvtier.remote.redis_store as redis_store
from kvtier.remote.redis_store import RedisRemoteStore


@pytest.fixture
def fake_cluster(logged_cluster: MigratingCluster) -> MigratingCluster:
    """The fake cluster whose pipelines are logged (``conftest.logged_cluster``)."""
    return logged_cluster


def make_store(cluster: MigratingCluster, num_blocks: int = 4,
               **options: Any) -> tuple[RedisRemoteStore, dict[int, bytes]]:
    """A store whose client is ``cluster``, with ``num_blocks`` blocks on node a; no retries,
    a breaker of three failures and a 60 s cooldown unless ``options`` say otherwise."""
    return cluster_store(cluster, num_blocks, **options)


def refuse_all(cluster: MigratingCluster, store: RedisRemoteStore, hashes: range,
               line: bytes) -> None:
    """Node a answers ``line`` for every key of ``hashes``."""
    for h in hashes:
        cluster.faults[cluster.a, store.namespace.key(h)] = line


def reopen_after_cooldown(store: RedisRemoteStore) -> None:
    """Let the cooldown of every open breaker of ``store`` pass now."""
    store._breakers.end_cooldowns()


def test_clusterdown_for_a_whole_pipeline_trips_the_nodes_breaker(
        fake_cluster: MigratingCluster) -> None:
    """Node a answers CLUSTERDOWN to every GET (the cluster is down, as it sees it): each
    read's pipeline is a's fault, so three in a row open a's breaker and the next two
    reads are short-circuited: 3 pipelines, 3 errors (one a pipeline), 2 skipped. Once the
    fault passes and the cooldown ends, the next read hits all four. Before, every read
    sent its pipeline (5), each key an error (20), the breaker never opened."""
    store, blocks = make_store(fake_cluster)
    refuse_all(fake_cluster, store, range(1, 5), b"-CLUSTERDOWN The cluster is down\r\n")
    for _ in range(5):
        assert store.get_many(blocks) == {}
    a = fake_cluster.a.address
    assert fake_cluster.pipelines == [(a, ["GET"] * 4)] * 3
    stats = store.stats
    assert (stats.num_errors, stats.num_short_circuited, stats.num_misses) == (3, 2, 20)
    assert store.last_error is not None and "CLUSTERDOWN" in store.last_error
    fake_cluster.faults.clear()
    reopen_after_cooldown(store)
    assert sorted(store.get_many(blocks)) == [1, 2, 3, 4]
    store.close()


def test_clusterdown_on_one_node_leaves_the_other_nodes_serving(
        fake_cluster: MigratingCluster) -> None:
    """Blocks 3 and 4 live on node b (in the slot map too); a answers CLUSTERDOWN to all
    its keys. a's breaker opens after three reads, b's never does: blocks 3 and 4 hit in
    all five reads, and writes to b go on while writes to a are skipped."""
    store, blocks = make_store(fake_cluster)
    key = store.namespace.key
    for h in (3, 4):
        fake_cluster.owner[key(h)] = fake_cluster.slot_map[key(h)] = fake_cluster.b
        fake_cluster.b.data[key(h).encode()] = fake_cluster.a.data.pop(key(h).encode())
    refuse_all(fake_cluster, store, range(1, 3), b"-CLUSTERDOWN The cluster is down\r\n")
    for _ in range(5):
        assert sorted(store.get_many(blocks)) == [3, 4]
    a, b = fake_cluster.a.address, fake_cluster.b.address
    assert [p for p in fake_cluster.pipelines if p[0] == a] == [(a, ["GET"] * 2)] * 3
    assert [p for p in fake_cluster.pipelines if p[0] == b] == [(b, ["GET"] * 2)] * 5
    new = make_blocks(store.namespace, 2, first_hash=3, seed=1)
    assert store.put_many(new) == 2
    assert store.put_many(make_blocks(store.namespace, 2, first_hash=1, seed=1)) == 0
    stats = store.stats
    assert (stats.num_errors, stats.num_short_circuited, stats.num_failed_puts) == (3, 3, 2)
    store.close()


def tryagain_times(cluster: MigratingCluster, key: str, times: int | None) -> None:
    """Node a answers TRYAGAIN for ``key`` its first ``times`` times (None: always)."""
    line = b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n"
    refusal = cluster.refusal
    left = {"n": times}

    def answer(node: Any, asked: str, asking: bool) -> bytes | None:
        if node is cluster.a and asked == key and (left["n"] is None or left["n"] > 0):
            if left["n"] is not None:
                left["n"] -= 1
            return line
        return refusal(node, asked, asking)

    cluster.refusal = answer  # type: ignore[method-assign, assignment]


def test_tryagain_is_retried_once_within_the_deadline(
        fake_cluster: MigratingCluster) -> None:
    """Block 2's slot answers TRYAGAIN once (a resharding step), block 3's every time. The
    two are asked again once, in one pipeline after the backoff: block 2 hits, block 3
    misses, counted (one error: its second TRYAGAIN). The same for a write and a probe.
    Before, both missed (2 hits of 4), nothing was asked again."""
    store, blocks = make_store(fake_cluster, max_retries=1, backoff_s=0.001)
    key = store.namespace.key
    tryagain_times(fake_cluster, key(2), 1)
    tryagain_times(fake_cluster, key(3), None)
    assert sorted(store.get_many(blocks)) == [1, 2, 4], store.last_error
    a = fake_cluster.a.address
    assert fake_cluster.pipelines == [(a, ["GET"] * 4), (a, ["GET"] * 2)]
    stats = store.stats
    assert (stats.num_hits, stats.num_tryagain_retries, stats.num_errors,
            stats.num_short_circuited) == (3, 2, 1, 0)
    assert store.last_error is not None and "Multiple keys" in store.last_error
    tryagain_times(fake_cluster, key(5), 1)
    assert store.put_many(make_blocks(store.namespace, 2, first_hash=5)) == 2
    tryagain_times(fake_cluster, key(1), 1)
    assert store.contains_many(range(1, 7)) == {1, 2, 4, 5, 6}
    stats = store.stats
    assert (stats.num_tryagain_retries, stats.num_errors, stats.num_puts) == (5, 2, 2)
    store.close()


def test_tryagain_is_not_retried_past_the_deadline(fake_cluster: MigratingCluster) -> None:
    """With no retries (``max_blocking_s`` is one ``timeout_s``) a retry's worst case would
    pass the batch's deadline: block 2's TRYAGAIN is its miss, counted, one pipeline."""
    store, blocks = make_store(fake_cluster, max_retries=0)
    tryagain_times(fake_cluster, store.namespace.key(2), 1)
    assert sorted(store.get_many(blocks)) == [1, 3, 4]
    assert len(fake_cluster.pipelines) == 1
    stats = store.stats
    assert (stats.num_tryagain_retries, stats.num_errors) == (0, 1)
    assert store.last_error is not None and "TRYAGAIN" in store.last_error
    assert sorted(store.get_many(blocks)) == [1, 2, 3, 4]  # the slot settled
    store.close()


@pytest.mark.parametrize("line", [
    b"-LOADING Redis is loading the dataset in memory\r\n",
    b"-MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.\r\n",
])
def test_loading_or_masterdown_is_the_nodes_fault(fake_cluster: MigratingCluster,
                                                  line: bytes) -> None:
    """Node a answers every GET with LOADING (restarted, reading its data set) or
    MASTERDOWN (a replica cut off from its master): the node cannot serve any key, so each
    pipeline is its fault. LOADING is retried as a connection fault is (one retry: two
    errors a read), MASTERDOWN not (a refusal comes back the same); either way three
    failed reads open a's breaker and the fourth is short-circuited. Before, each key was
    its own error (16) and the breaker never opened."""
    store, blocks = make_store(fake_cluster, max_retries=1, backoff_s=0.001)
    refuse_all(fake_cluster, store, range(1, 5), line)
    for _ in range(4):
        assert store.get_many(blocks) == {}
    loading = line.startswith(b"-LOADING")
    stats = store.stats
    assert (stats.num_errors, stats.num_retries, stats.num_short_circuited) == (
        (6, 3, 1) if loading else (3, 0, 1))
    assert len(fake_cluster.pipelines) == (6 if loading else 3)
    fake_cluster.faults.clear()
    reopen_after_cooldown(store)
    assert sorted(store.get_many(blocks)) == [1, 2, 3, 4]
    store.close()


def test_one_loading_reply_fails_the_pipeline(fake_cluster: MigratingCluster) -> None:
    """LOADING for one key of four (a node answers it for every key while it loads; one
    reply of it is enough to know): the pipeline is a's fault, not three hits and one
    error; with no retries three reads open the breaker."""
    store, blocks = make_store(fake_cluster)
    refuse_all(fake_cluster, store, range(2, 3), b"-LOADING Redis is loading\r\n")
    for _ in range(4):
        assert store.get_many(blocks) == {}
    stats = store.stats
    assert (stats.num_errors, stats.num_short_circuited, stats.num_hits) == (3, 1, 0)
    store.close()


def test_loading_fails_a_standalone_servers_writes_as_a_fault() -> None:
    """A standalone server (node a of a fake cluster, alone) answers every SET with
    LOADING: each write is the server's fault, so the third opens its breaker and the
    fourth is skipped. Before, each SET was its own refusal: 16 errors, no breaker."""
    fake = MigratingCluster()
    ns = make_namespace()
    store = RedisRemoteStore(fake.a.url, ns, timeout_s=2.0, max_retries=0,
                             breaker_threshold=3, cooldown_s=60.0)
    blocks = make_blocks(ns, 4)
    refuse_all(fake, store, range(1, 5), b"-LOADING Redis is loading\r\n")
    for _ in range(4):
        assert store.put_many(blocks) == 0
    stats = store.stats
    assert (stats.num_errors, stats.num_short_circuited, stats.num_failed_puts) == (3, 1, 16)
    assert store.last_error is not None and "loading" in store.last_error
    store.close()
    fake.close()


def open_breaker_of_a(cluster: MigratingCluster, store: RedisRemoteStore,
                      blocks: dict[int, bytes]) -> None:
    """Three reads that node a fails (CLUSTERDOWN) open its breaker; then the fault and
    the cooldown pass (the breaker half-open) and the pipeline log is cleared."""
    refuse_all(cluster, store, range(1, len(blocks) + 1), b"-CLUSTERDOWN The cluster is down\r\n")
    for _ in range(3):
        assert store.get_many(blocks) == {}
    cluster.faults.clear()
    reopen_after_cooldown(store)
    cluster.pipelines.clear()


def hold_next_pipeline(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """The next pipeline sent waits for the second event; the first is set once it waits.
    Later pipelines run at once."""
    entered, release = threading.Event(), threading.Event()
    pipeline: Callable[..., list[Any]] = vars(redis_store)["pipeline"]  # as the fixture logs it
    held = threading.Lock()

    def holding(commands: list[tuple[Any, ...]], client: Any, *args: Any) -> list[Any]:
        if held.acquire(blocking=False):
            entered.set()
            assert release.wait(10)
        return pipeline(commands, client, *args)

    monkeypatch.setattr(redis_store, "pipeline", holding)
    return entered, release


def test_a_half_open_breaker_lets_one_batch_probe(fake_cluster: MigratingCluster,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """a's breaker is half-open (its cooldown passed). The first read probes a and is held
    there; three reads meanwhile are refused, counted as probes refused (not as
    short-circuited: the breaker is not open), and send nothing. The probe answers: the
    breaker closes, and the next read is served. Before, all four reads probed a (four
    pipelines) while it had not answered."""
    store, blocks = make_store(fake_cluster)
    open_breaker_of_a(fake_cluster, store, blocks)
    entered, release = hold_next_pipeline(monkeypatch)
    probe: list[dict[int, Any]] = []
    thread = threading.Thread(target=lambda: probe.append(store.get_many(blocks)))
    thread.start()
    assert entered.wait(10)
    for _ in range(3):
        assert store.get_many(blocks) == {}
    release.set()
    thread.join(10)
    assert sorted(probe[0]) == [1, 2, 3, 4]
    a = fake_cluster.a.address
    assert fake_cluster.pipelines == [(a, ["GET"] * 4)]
    stats = store.stats
    assert (stats.num_refused_probes, stats.num_short_circuited, stats.num_errors) == (3, 0, 3)
    assert sorted(store.get_many(blocks)) == [1, 2, 3, 4]
    assert len(fake_cluster.pipelines) == 2
    store.close()


def test_a_failed_probe_opens_the_breaker_again(fake_cluster: MigratingCluster,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe of a half-open breaker fails (a still down): the breaker opens for another
    cooldown (the next read short-circuited, not refused as a probe), and once that passes
    one batch probes again, and closes it."""
    store, blocks = make_store(fake_cluster)
    open_breaker_of_a(fake_cluster, store, blocks)
    refuse_all(fake_cluster, store, range(1, 5), b"-CLUSTERDOWN The cluster is down\r\n")
    assert store.get_many(blocks) == {}  # the probe
    assert store.get_many(blocks) == {}  # open again
    stats = store.stats
    assert (stats.num_errors, stats.num_short_circuited, stats.num_refused_probes) == (4, 1, 0)
    fake_cluster.faults.clear()
    reopen_after_cooldown(store)
    assert sorted(store.get_many(blocks)) == [1, 2, 3, 4]
    assert len(fake_cluster.pipelines) == 2
    store.close()


def wait_cluster_state(node: PrivateRedis, state: str) -> None:
    """Until ``node`` reports ``cluster_state:<state>``, at most 30 s."""
    deadline = time.monotonic() + 30
    while True:
        with node.client() as client:
            info = client.execute_command("CLUSTER", "INFO")
        if f"cluster_state:{state}" in str(info) or (
                isinstance(info, dict) and info.get("cluster_state") == state):
            return
        assert time.monotonic() < deadline, f"cluster_state never became {state}: {info}"
        time.sleep(0.1)


def test_a_real_cluster_down_opens_the_breaker_and_recovers(
        redis_cluster: PrivateCluster) -> None:
    """A real cluster that requires full coverage loses a master: the live masters answer
    CLUSTERDOWN to every command. Six blocks on node 0 miss in five reads; node 0's
    breaker opens after two failed pipelines (2 errors, 3 reads short-circuited). Before,
    each read sent its pipeline and counted six errors (30). The lost master restarts, the
    cluster is ok again: after the cooldown one read probes node 0 and every block hits."""
    for node in redis_cluster.nodes:
        with node.client() as client:
            client.config_set("cluster-require-full-coverage", "yes")
    ns = make_namespace()
    store = RedisRemoteStore(redis_cluster.url, ns, cluster=True, timeout_s=1.0,
                             max_retries=0, breaker_threshold=2, cooldown_s=60.0)
    home, victim = redis_cluster.nodes[0], redis_cluster.nodes[1]
    blocks = {h: b for h, b in make_blocks(ns, 40).items()
              if redis_cluster.node_of(ns.key(h)) is home}
    blocks = dict(list(blocks.items())[:6])
    assert len(blocks) == 6 and store.put_many(blocks) == 6, store.last_error
    victim.kill()
    wait_cluster_state(home, "fail")
    for _ in range(5):
        assert store.get_many(blocks) == {}
    stats = store.stats
    assert (stats.num_errors, stats.num_short_circuited) == (2, 3), store.last_error
    assert store.last_error is not None and "CLUSTERDOWN" in store.last_error
    victim.start()
    wait_cluster_state(home, "ok")
    reopen_after_cooldown(store)
    assert {h: bytes(v) for h, v in store.get_many(blocks).items()} == blocks, store.last_error
    store.close()


def test_a_paused_server_does_not_poison_the_vllm_tiers_keys(
        make_redis_server: Callable[[], PrivateRedis]) -> None:
    """The vLLM store tier on a real server that is paused (SIGSTOP) while A loads two
    keys it was told HIT: the load times out and fails; B, asking during the pause, is
    told RETRY, then MISS (its probe timed out: it computes); the server resumes
    (SIGCONT) and C's lookups HIT, its load bringing the pages. Before, the failed load
    marked both keys bad: C's lookups were MISSes, the values in the store."""
    from kvtier.integrations.vllm.keys import EngineLayout
    from kvtier.integrations.vllm.store_tier import StoreTier

    page = 64
    layout = EngineLayout(model="m", kv_dtype="float16", page_bytes=page, tokens_per_hash=16,
                          blocks_per_chunk=1, groups=((16, 2),), tp_size=1, pp_size=1,
                          pcp_size=1, dcp_size=1, rank=0)
    server = make_redis_server()
    store = RedisRemoteStore(server.url, layout.namespace(), timeout_s=0.2, max_retries=0,
                             breaker_threshold=10)  # C's probe is not short-circuited
    view = memoryview(bytearray(page * 8))
    tier = StoreTier(store, view, page, max_lookup_wait_s=60.0)
    keys = [i.to_bytes(32, "big") + bytes(4) for i in (1, 2)]
    view[:2 * page] = b"\x01" * page + b"\x02" * page
    tier.submit_store(1, keys, [0, 1])

    def step(request_id: str) -> list[str]:
        verdicts: list[str] = [tier.lookup(k, request_id) for k in keys]
        tier.flush()
        tier.drain()
        tier.check_invariants()
        return verdicts

    assert step("A") == ["retry", "retry"]
    assert [tier.lookup(k, "A") for k in keys] == ["hit", "hit"]
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    try:
        tier.submit_load(2, keys[:1], [2])
        tier.submit_load(3, keys[1:], [3])
        tier.drain()  # both time out
        assert step("B") == ["retry", "retry"]
        assert [tier.lookup(k, "B") for k in keys] == ["miss", "miss"]
    finally:
        server.proc.send_signal(signal.SIGCONT)
    assert [(o.job_id, o.success) for o in tier.finished_jobs()] == [
        (1, True), (2, False), (3, False)]
    assert step("C") == ["retry", "retry"]
    assert [tier.lookup(k, "C") for k in keys] == ["hit", "hit"]
    tier.submit_load(4, keys, [4, 5])
    tier.drain()
    assert [o.success for o in tier.finished_jobs()] == [True]
    assert bytes(view[4 * page:6 * page]) == b"\x01" * page + b"\x02" * page
    assert store.stats.num_timeouts == 3
    tier.close()
    store.close()


def test_a_tryagain_retry_is_one_pipeline_whatever_befalls_it(
        fake_cluster: MigratingCluster) -> None:
    """Block 4 (last of the pipeline) is answered TRYAGAIN, then node a goes down: the
    retry's pipeline fails, and is not retried in turn (with two retries, each up to
    ``timeout_s`` more, it would end past the deadline the retry was checked against):
    two pipelines, no retry counted, block 4 a miss. Before, the retry was retried twice:
    four pipelines."""
    store, blocks = make_store(fake_cluster, max_retries=2, backoff_s=0.001)
    line = b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n"
    refusal = fake_cluster.refusal
    key4 = store.namespace.key(4)

    def answer(node: Any, asked: str, asking: bool) -> bytes | None:
        if node is fake_cluster.a and asked == key4:
            node.down = True  # from the next command on
            return line
        return refusal(node, asked, asking)

    fake_cluster.refusal = answer  # type: ignore[method-assign, assignment]
    assert sorted(store.get_many(blocks)) == [1, 2, 3]
    a = fake_cluster.a.address
    assert fake_cluster.pipelines == [(a, ["GET"] * 4), (a, ["GET"])]
    stats = store.stats
    assert (stats.num_tryagain_retries, stats.num_retries, stats.num_errors) == (1, 0, 1)
    store.close()
