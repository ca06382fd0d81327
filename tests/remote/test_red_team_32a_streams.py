"""Red team 32a: the KV event streams on a real Redis Cluster (``cluster=True``): every key
of a stream in its hash slot, so each script and transaction runs on one node::

    kvtier:events                       slot of "kvtier:events"
    {kvtier:events}:snapshot:<id>       the same slot (the hash tag "kvtier:events")
    {kvtier:events}:incarnation:<id>    the same slot
"""

from __future__ import annotations

import uuid

import pytest
from remote_helpers import RedisServers

from kvtier import stream_client
from kvtier.events import BlockRemoved, BlockStored
from kvtier.publisher import RedisStreamPublisher, RedisStreamSubscriber, Snapshot
from kvtier.router import PrefixIndex
from kvtier.tier import Tier

redis = pytest.importorskip("redis")

G = Tier.GPU


def stored(seq: int, h: int) -> BlockStored:
    """A BlockStored event of one 4-token block."""
    return BlockStored(seq, h, None, G, 4, None, (1, 2, 3, 4), None, None)


def test_streams_publish_snapshot_claim_and_subscribe_on_a_real_cluster(
        redis_servers: RedisServers) -> None:
    """Eight streams (their slots spread over the three nodes), each: instance a publishes
    seq 0..1, is trimmed away, resyncs from a snapshot, restarts (a new claim), a late
    snapshot of its old incarnation is refused, and it retires (goodbye, snapshot and
    claim deleted). Every batch, snapshot and forget is taken (0 failed): before, there
    was no ``cluster`` option, and a plain client failed every command of a stream on
    another node (MOVED), and each script CROSSSLOT where it was not."""
    url = redis_servers.cluster_url
    raw = redis.RedisCluster.from_url(url)
    nodes = set()
    streams = [f"kvtier:test:{uuid.uuid4().hex}" for _ in range(8)]
    try:
        for stream in streams:
            nodes.add(raw.get_node_from_key(stream).name)
            pub = RedisStreamPublisher(url, stream, snapshot_ttl_s=60, cluster=True)
            late = RedisStreamPublisher(url, stream, incarnation="old", cluster=True)
            sub = RedisStreamSubscriber(url, stream, cluster=True)
            index = PrefixIndex()
            pub.publish("a", [stored(0, 1), stored(1, 2)])
            index.apply_updates(sub.poll())
            assert index.blocks("a") == {1: G, 2: G}
            assert raw.get(f"{{{stream}}}:incarnation:a") == pub.incarnation.encode()
            raw.xtrim(stream, maxlen=0, approximate=False)
            pub.publish("a", [stored(2, 3)])
            pub.publish("a", [stored(3, 4)])
            raw.xtrim(stream, maxlen=1, approximate=False)
            index.apply_updates(sub.poll())
            assert sub.tracker.stale_instances() == ["a"]
            assert pub.resync_requests() == {"a"}
            pub.publish_snapshot(Snapshot("a", 4, frozenset({(1, G), (2, G), (3, G), (4, G)})))
            pub.publish("a", [BlockRemoved(4, 1, G)])
            index.apply_updates(sub.poll())
            assert index.blocks("a") == {2: G, 3: G, 4: G}
            pub.publish("a", [stored(0, 9)])  # the manager restarted: a new claim
            late.publish_snapshot(Snapshot("a", 1, frozenset({(7, G)})))
            assert late.num_refused_snapshots == 1
            index.apply_updates(sub.poll())
            assert index.blocks("a") == {9: G}
            pub.forget("a")
            index.apply_updates(sub.poll())
            assert index.instances() == []
            assert raw.exists(f"{{{stream}}}:snapshot:a", f"{{{stream}}}:incarnation:a") == 0
            assert (pub.num_failed_batches, pub.num_failed_reads, sub.num_malformed_entries,
                    sub.tracker.num_gaps, sub.tracker.num_resyncs) == (0, 0, 0, 1, 1)
            for client in (pub, late, sub):
                client.close()
        assert len(nodes) >= 2  # the streams were not all on one node
    finally:
        for stream in streams:
            for key in (stream, f"{stream}:resync", f"{{{stream}}}:snapshot:a",
                        f"{{{stream}}}:incarnation:a"):
                raw.delete(key)
        raw.close()


def test_a_stream_named_with_a_hash_tag_keeps_its_key_names() -> None:
    """A stream whose name carries a tag shares it with its keys unchanged; one with a
    '}' and no tag cannot (``{a}b}`` hashes "a"): refused with ``cluster=True``, naming the
    stream, before any connection; standalone keeps the names of before. Pure."""
    assert stream_client.snapshot_key("{fleet}:events", "a") == "{fleet}:events:snapshot:a"
    assert stream_client.legacy_snapshot_key("{fleet}:events", "a") is None
    assert stream_client.claim_key("ev", "a") == "{ev}:incarnation:a"
    assert stream_client.legacy_claim_key("ev", "a") == "ev:incarnation:a"
    assert stream_client.snapshot_key("a{}b", "x") == "a{}b:snapshot:x"
    assert stream_client.snapshot_key("}{x}", "a") == "}{x}:snapshot:a"  # tagged "x"
    for name in ("a}b", "a{}b"):
        with pytest.raises(ValueError, match=f"stream '{name}' has a '}}' but no hash tag"):
            RedisStreamSubscriber("redis://127.0.0.1:1", name, cluster=True)
    with pytest.raises(ValueError, match="cluster must be a bool, got 'yes'"):
        RedisStreamPublisher("redis://127.0.0.1:1", "ev", cluster="yes")  # type: ignore[arg-type]
