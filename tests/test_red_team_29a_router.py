"""Red team 29a, the router and its event feed: per-instance state bounded by the live
instances, restarts seen without their seq 0, and fleet figures of what was served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtier import publisher
from kvtier.cli import main
from kvtier.config import CacheConfig
from kvtier.event_codec import encode_events
from kvtier.events import BlockStored
from kvtier.publisher import RedisStreamPublisher, RedisStreamSubscriber, Snapshot
from kvtier.router import PrefixIndex
from kvtier.scheduler import SchedulerConfig
from kvtier.sim.fleet import simulate_fleet
from kvtier.sim.fleet_report import format_fleet_report
from kvtier.sim.workload import TraceRequest
from kvtier.tier import Tier
from list_workload import ListWorkload

G = Tier.GPU

# ---- the fleet counts only what it served ------------------------------------------------------


def _fleet_workload() -> ListWorkload:
    """Ten requests, one every second; r1, r4 and r7 need more than the 8 GPU blocks of 4
    tokens an instance has (40 tokens: 10 blocks with their output)."""
    requests = []
    for k in range(10):
        size = 40 if k in (1, 4, 7) else 8
        requests.append(TraceRequest(f"r{k}", float(k), [1000 * k + t for t in range(size)], 2))
    return ListWorkload(requests)


def test_a_fleet_counts_skipped_requests_apart_from_those_it_routed() -> None:
    """Round robin over two instances: the three requests too large for any instance were
    routed first and skipped by the instance they reached: i0 read 5 routed and i1 5
    (3 of them skipped), the router's stats 10 routed. Now they are skipped before
    routing: 7 routed (4 and 3, in turn), 3 skipped, the router's stats 7."""
    cache = CacheConfig(tokens_per_block=4, num_gpu_blocks=8, num_host_blocks=0)
    report = simulate_fleet(_fleet_workload(), cache, 2, "round-robin",
                            SchedulerConfig(max_batch_size=4))
    assert [s.num_routed for s in report.instances] == [4, 3]
    assert [s.num_requests for s in report.instances] == [4, 3]
    assert report.num_requests == 7 and report.num_rejected_too_large == 3
    assert report.router_stats["num_routed"] == 7
    assert report.router_stats["per_instance"] == {"i0": 4, "i1": 3}
    assert report.requests_max_over_mean == 4 / 3.5
    lines = format_fleet_report(report)
    assert lines[1].startswith("requests    7 finished, 3 too large;")
    assert "requests max/mean 1.14" in lines[5]


def test_the_fleet_table_and_json_agree_on_what_was_served(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``kvtier replay --instances 2``: six requests, two of them past the 64 GPU blocks
    of 32 tokens (3,000 tokens): the table's routed column and the JSON's per-instance
    counts read 4 and 2 (3 and 3 before, skipped ones included), the router's stats 4."""
    path = tmp_path / "trace.csv"
    rows = [(100, 4), (3000, 4), (100, 4), (3000, 4), (100, 4), (100, 4)]
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:15:{10 + k:02d},{n},{m}\n" for k, (n, m) in enumerate(rows)))
    code, out, _ = _run_cli(capsys, "replay", str(path), "--no-progress", "--instances", "2",
                            "--router", "round-robin", "--gpu-blocks", "64", "--host-blocks", "0",
                            "--json", str(tmp_path / "report.json"))
    assert code == 0
    table = out.splitlines()
    assert table[1].startswith("requests    4 finished, 2 too large;")
    rows_out = [line.split()[:2] for line in table if line.startswith("i")
                and line.split()[0] in ("i0", "i1")]
    assert rows_out == [["i0", "2"], ["i1", "2"]]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["num_routed"] for s in report["instances"]] == [2, 2]
    assert report["num_rejected_too_large"] == 2 and report["num_requests"] == 4
    assert report["router_stats"]["num_routed"] == 4
    assert report["requests_max_over_mean"] == 1.0


def _run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- a Redis stream restart whose seq 0 was trimmed -----------------------------------------


class FakeRedis:
    """The commands of the event stream, in memory: XADD with an exact MAXLEN, XREAD
    (RESP2's shape), XINFO STREAM's first entry id, GET, SET, DEL and MULTI/EXEC; ``down``
    commands fail with a ConnectionError first."""

    def __init__(self) -> None:
        self.streams: dict[str, list[tuple[bytes, dict[bytes, bytes]]]] = {}
        self.keys: dict[str, bytes] = {}
        self.next_id = 1
        self.down = 0

    def _check(self) -> None:
        if self.down:
            import redis

            self.down -= 1
            raise redis.exceptions.ConnectionError("Connection refused")

    def xadd(self, stream: str, fields: dict[str, object], maxlen: int | None = None,
             approximate: bool = True) -> bytes:
        self._check()
        entry_id = f"{self.next_id}-0".encode()
        self.next_id += 1
        entries = self.streams.setdefault(stream, [])
        entries.append((entry_id, {k.encode(): (v if isinstance(v, bytes) else str(v).encode())
                                   for k, v in fields.items()}))
        if maxlen is not None:
            del entries[:max(0, len(entries) - maxlen)]
        return entry_id

    def xread(self, streams: dict[str, object], count: int | None = None,
              block: int | None = None) -> list[object]:
        self._check()
        reply: list[object] = []
        for name, after in streams.items():
            after_id = int(str(after.decode() if isinstance(after, bytes) else after)
                           .partition("-")[0])
            rows = [(i, f) for i, f in self.streams.get(name, [])
                    if int(i.decode().partition("-")[0]) > after_id][:count]
            if rows:
                reply.append([name.encode(), rows])
        return reply

    def xinfo_stream(self, stream: str) -> dict[str, object]:
        self._check()
        entries = self.streams.get(stream, [])
        return {"recorded-first-entry-id": entries[0][0] if entries else b"0-0"}

    def xtrim(self, stream: str, maxlen: int) -> None:
        entries = self.streams.get(stream, [])
        del entries[:max(0, len(entries) - maxlen)]

    def get(self, key: str) -> bytes | None:
        self._check()
        return self.keys.get(key)

    def set(self, key: str, value: object) -> bool:
        self._check()
        self.keys[key] = value if isinstance(value, bytes) else str(value).encode()
        return True

    def delete(self, *keys: str) -> int:
        self._check()
        return sum(self.keys.pop(k, None) is not None for k in keys)

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self)


class FakePipeline:
    """MULTI/EXEC: the queued commands run on execute, all or (Redis down) none."""

    def __init__(self, client: FakeRedis) -> None:
        self.client = client
        self.queued: list[tuple[str, tuple[object, ...], dict[str, object]]] = []

    def delete(self, *args: object, **options: object) -> None:
        self.queued.append(("delete", args, options))

    def xadd(self, *args: object, **options: object) -> None:
        self.queued.append(("xadd", args, options))

    def execute(self) -> list[object]:
        self.client._check()
        return [getattr(self.client, name)(*args, **options)
                for name, args, options in self.queued]


def stored(seq: int, h: int) -> BlockStored:
    """A BlockStored event of one 4-token block."""
    return BlockStored(seq, h, None, G, 4, None, (1, 2, 3, 4), None, None)


@pytest.fixture
def fake_redis(monkeypatch: pytest.MonkeyPatch) -> FakeRedis:
    pytest.importorskip("redis")  # the publisher catches its errors
    client = FakeRedis()
    monkeypatch.setattr(publisher, "_connect", lambda url: client)
    return client


@pytest.mark.parametrize("with_xinfo", [True, False])
def test_a_restart_whose_seq_0_was_trimmed_is_resynced(
        fake_redis: FakeRedis, monkeypatch: pytest.MonkeyPatch, with_xinfo: bool) -> None:
    """Instance a published seq 0..9 (blocks 100..109), then its process restarted and
    published seq 0..4 (blocks 1..5), one entry each, on a stream of MAXLEN 3: the
    subscriber never read the new seq 0 or 1. It read seq 2..4 as already applied
    (skipped; without XINFO, no word at all) or, seeing the trim, went stale and then
    refused the new incarnation's snapshot (next_seq 5 <= 9 read): the index held the old
    blocks, or none, until the new counter passed 9. Now each entry names its publisher's
    incarnation: the restart is seen at seq 2, the snapshot applied."""
    if not with_xinfo:
        monkeypatch.delattr(FakeRedis, "xinfo_stream")
    old = RedisStreamPublisher("redis://fake", maxlen=100)
    sub = RedisStreamSubscriber("redis://fake")
    index = PrefixIndex()
    for seq in range(10):
        old.publish("a", [stored(seq, 100 + seq)])
    index.apply_updates(sub.poll())
    assert index.blocks("a") == {100 + seq: G for seq in range(10)}
    new = RedisStreamPublisher("redis://fake", maxlen=3)  # the restarted process
    for seq in range(5):
        new.publish("a", [stored(seq, 1 + seq)])
    index.apply_updates(sub.poll())
    assert sub.tracker.num_restarts == 1
    assert index.blocks("a") == {} and sub.tracker.stale_instances() == ["a"]
    assert new.resync_requests() == {"a"}
    new.publish_snapshot(Snapshot("a", 5, frozenset((h, G) for h in range(1, 6))))
    new.publish("a", [stored(5, 6)])
    index.apply_updates(sub.poll())
    assert index.blocks("a") == {h: G for h in range(1, 7)}
    assert sub.tracker.stale_instances() == [] and sub.tracker.num_resyncs == 1


def test_a_restart_whose_seq_0_batch_failed_never_resyncs_from_the_old_snapshot(
        fake_redis: FakeRedis) -> None:
    """The restarted process's seq 0 batch failed (Redis down), and with it the delete of
    the old incarnation's snapshot (next_seq 10, blocks 100..109). The subscriber sees the
    restart at seq 1 by its incarnation and goes stale: the old snapshot covered seq 1, so
    it was applied (blocks gone with the old process routed to) and seq 1..9 skipped.
    Now the delete goes with the instance's next batch sent."""
    old = RedisStreamPublisher("redis://fake")
    sub = RedisStreamSubscriber("redis://fake")
    index = PrefixIndex()
    old.publish("a", [stored(seq, 100 + seq) for seq in range(10)])
    old.publish_snapshot(Snapshot("a", 10, frozenset((100 + seq, G) for seq in range(10))))
    index.apply_updates(sub.poll())
    new = RedisStreamPublisher("redis://fake")
    fake_redis.down = 1
    new.publish("a", [stored(0, 1)])
    assert new.num_failed_batches == 1
    new.publish("a", [stored(1, 2)])
    index.apply_updates(sub.poll())
    assert index.blocks("a") == {} and sub.tracker.stale_instances() == ["a"]
    assert "kvtier:events:snapshot:a" not in fake_redis.keys
    new.publish_snapshot(Snapshot("a", 2, frozenset([(1, G), (2, G)])))
    new.publish("a", [stored(2, 3)])
    index.apply_updates(sub.poll())
    assert index.blocks("a") == {1: G, 2: G, 3: G}


def test_entries_without_an_incarnation_are_read_by_their_seq_as_before(
        fake_redis: FakeRedis) -> None:
    """An entry of an earlier publisher (no ``n`` field) decodes as before: in seq order
    applied, a seq 0 after others a restart, a later seq (2 after the new 0) a gap."""
    sub = RedisStreamSubscriber("redis://fake")
    index = PrefixIndex()
    for seq, h in ((0, 1), (1, 2), (0, 7), (2, 8)):
        fake_redis.xadd("kvtier:events", {"i": "a", "e": encode_events([stored(seq, h)])})
    updates = sub.poll()
    index.apply_updates(updates)
    assert [type(u).__name__ for u in updates] == [
        "EventBatch", "EventBatch", "InstanceLost", "EventBatch", "InstanceLost"]
    assert sub.tracker.num_restarts == 1 and sub.tracker.num_gaps == 1
    assert index.blocks("a") == {}  # forgotten at the gap, stale until a snapshot
    assert sub.tracker.stale_instances() == ["a"]


def test_a_publisher_refuses_an_incarnation_it_cannot_send(fake_redis: FakeRedis) -> None:
    with pytest.raises(ValueError, match=r"incarnation must be None or a str of 1\.\.64 "
                                         r"characters, got ''"):
        RedisStreamPublisher("redis://fake", incarnation="")
