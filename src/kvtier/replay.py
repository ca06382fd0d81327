"""Manager-level replay: a workload's requests admitted and released through the manager alone.

There is no step scheduler and no time model here: each request is admitted whole, in
arrival order, and released ``in_flight`` requests later. The report says how much of the
prompts the cache served, what moved between tiers, and what the manager's calls cost::

    request    0   1   2  ...  k      k+1  ...
    admit      A0  A1  A2 ...  Ak     Ak+1
    release                    R(k-N) R(k-N+1)     (N = in_flight; the rest at the end)

This is the loop of ``benchmarks/bench_manager.py``, so both report the same hit rates.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

from kvtier.config import CacheConfig
from kvtier.manager import KVCacheManager
from kvtier.sequence import SequenceSpec
from kvtier.sim.workload import Workload
from kvtier.transfer import RecordingTransferEngine


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """What one manager-level replay did. ``to_dict`` gives the JSON-ready form.

    ``manager_s`` times only the manager's calls (admission and release), not building the
    prompts; ``manager_us_per_block`` divides it by the blocks of the admitted prompts and is
    ``None`` when no block was admitted. ``num_early_releases`` counts requests released
    before their turn because the GPU pool could not admit the next one otherwise.
    """

    workload: dict[str, object]
    config: dict[str, object]
    in_flight: int
    num_requests: int
    num_prompt_tokens: int
    num_reused_tokens: int
    token_hit_rate: float
    num_admitted_blocks: int
    num_early_releases: int
    gpu: dict[str, object]
    host: dict[str, object]
    transfers: dict[str, dict[str, int]]
    wall_s: float
    manager_s: float
    manager_us_per_block: float | None

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready copy of the report. Pure."""
        return asdict(self)


def replay_manager(
    workload: Workload,
    config: CacheConfig,
    in_flight: int = 16,
    progress: Callable[[int], object] | None = None,
) -> ReplayReport:
    """Replay ``workload`` through a fresh manager built from ``config``; see the module doc.

    ``progress`` is called with 1 after each request (a tqdm bar's ``update`` fits). Raises
    ValueError if ``in_flight`` is not an integer >= 1, and passes on the manager's
    ValueError for a request that cannot fit even in an empty GPU pool.
    """
    if type(in_flight) is not int or in_flight < 1:
        raise ValueError(f"in_flight must be an integer >= 1, got {in_flight!r}")
    engine = RecordingTransferEngine(max_plans=1)
    mgr = KVCacheManager(config, engine)
    clock = time.perf_counter
    live: deque[str] = deque()
    num_requests = num_admitted_blocks = num_early_releases = 0
    manager_s = 0.0
    start_s = clock()
    for request in workload:
        spec = SequenceSpec(request.request_id, request.prompt)
        t0 = clock()
        admission = mgr.add_sequence(spec)
        while not admission.admitted:
            # NOTE: live requests pin their blocks; releasing the oldest one frees room, and
            # an empty manager always admits (the manager raised for a request too large).
            assert live, f"{request.request_id!r} rejected by an idle manager"
            mgr.remove_sequence(live.popleft())
            num_early_releases += 1
            admission = mgr.add_sequence(spec)
        live.append(request.request_id)
        if len(live) > in_flight:
            mgr.remove_sequence(live.popleft())
        manager_s += clock() - t0
        num_requests += 1
        num_admitted_blocks += len(admission.block_ids)
        if progress is not None:
            progress(1)
    t0 = clock()
    while live:
        mgr.remove_sequence(live.popleft())
    manager_s += clock() - t0
    wall_s = clock() - start_s
    mgr.check_invariants()

    stats = mgr.stats.as_dict()
    transfers = {
        kind.value: {"num_ops": engine.num_ops[kind], "num_tokens": engine.num_tokens[kind]}
        for kind in engine.num_ops
    }
    us_per_block = manager_s / num_admitted_blocks * 1e6 if num_admitted_blocks else None
    return ReplayReport(
        workload=workload.describe(),
        config=asdict(config),
        in_flight=in_flight,
        num_requests=num_requests,
        num_prompt_tokens=mgr.stats.num_prompt_tokens,
        num_reused_tokens=mgr.stats.num_reused_tokens,
        token_hit_rate=mgr.stats.token_hit_rate,
        num_admitted_blocks=num_admitted_blocks,
        num_early_releases=num_early_releases,
        gpu=_tier_dict(stats["gpu"]),
        host=_tier_dict(stats["host"]),
        transfers=transfers,
        wall_s=wall_s,
        manager_s=manager_s,
        manager_us_per_block=us_per_block,
    )


def _tier_dict(value: object) -> dict[str, object]:
    assert isinstance(value, dict), value
    return dict(value)
