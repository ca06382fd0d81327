"""Red team 27b: several engines on one shared remote tier (the fleet simulator's and the
engine's), faults on the wire, and what each fetch is charged."""

from __future__ import annotations

from kvtier.config import CacheConfig
from kvtier.sim.fleet import simulate_fleet
from kvtier.sim.timemodel import RemoteLink
from kvtier.sim.workload import TraceRequest
from list_workload import ListWorkload

PREFIX = list(range(1000, 1320))  # 10 full blocks of 32 tokens


def test_a_fleet_writes_through_only_the_blocks_an_instance_computes() -> None:
    """r0 computes the 10-block prefix on i0 and writes it through; r1 on i1 fetches those
    10 and computes 1 block of its own. The store takes 11 writes, as the engines' tiers
    make them: the imported blocks were written back to it (21), and a removed block written
    again, each write taking the store's queue ahead of the next fetch.

    ::

        i0   r0 | b0 .. b9 computed | -> store: 10 writes
        i1   r1 | b0 .. b9 fetched  | b10 computed | -> store: 1 write (not b0 .. b9 again)
    """
    workload = ListWorkload([TraceRequest("r0", 0.0, PREFIX + [1], 1),
                             TraceRequest("r1", 10.0, PREFIX + list(range(5, 38)), 1)])
    cache = CacheConfig(tokens_per_block=32, num_gpu_blocks=64, num_host_blocks=32)
    report = simulate_fleet(workload, cache, 2, "round-robin", remote="write-through",
                            remote_link=RemoteLink(latency_s=1e-3, bytes_per_s=32e9))
    remote = report.remote
    assert remote is not None
    assert (remote["num_fetched_blocks"], remote["num_imported_blocks"],
            remote["num_written_blocks"]) == (10, 10, 11)


def test_a_fleet_writing_through_never_writes_a_block_as_it_leaves() -> None:
    """Two-block GPU pools and no room to spare: r0's blocks leave i0 when r1 and r2 come,
    and nothing is written then (write-through wrote them when computed: 2 blocks of r0,
    2 of r1, 2 of r2); before, every removal was a second write of its block."""
    workload = ListWorkload([TraceRequest("r0", 0.0, list(range(65)), 1),
                             TraceRequest("r1", 1.0, list(range(100, 165)), 1),
                             TraceRequest("r2", 2.0, list(range(200, 265)), 1)])
    cache = CacheConfig(tokens_per_block=32, num_gpu_blocks=4, num_host_blocks=1)
    report = simulate_fleet(workload, cache, 1, "round-robin", remote="write-through",
                            remote_link=RemoteLink(latency_s=1e-3, bytes_per_s=32e9))
    remote = report.remote
    assert remote is not None
    assert report.events["num_published"] > 6  # blocks were stored and removed
    assert remote["num_written_blocks"] == 6

