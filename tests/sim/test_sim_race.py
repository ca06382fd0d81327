"""The built-in race workload provokes the admission race at any size: probe admission
overflows the step budget, claim admission never does."""

from __future__ import annotations

import pytest

from kvtier import CacheConfig
from kvtier.scheduler import SchedulerConfig
from kvtier.sim import RaceWorkload, simulate


@pytest.mark.parametrize(("tpb", "gpu", "host", "mnt"),
                         [(4, 64, 16, 64), (32, 1024, 256, 8192), (16, 2048, 8192, 4096)])
def test_race_workload_overflows_only_in_probe_mode(tpb: int, gpu: int, host: int,
                                                    mnt: int) -> None:
    """Each follow-up is credited one host block; sequential admission loses some of them
    to its own offloads and computes past max_num_tokens; two-phase admission keeps all."""
    cache = CacheConfig(tokens_per_block=tpb, num_gpu_blocks=gpu, num_host_blocks=host)
    workload = RaceWorkload(cache, max_num_tokens=mnt)
    n = workload.num_prefixes
    reports = {adm: simulate(workload, cache, SchedulerConfig(max_num_tokens=mnt, admission=adm),
                             "tiny-test", check_every=50)
               for adm in ("claim", "probe")}
    claim, probe = reports["claim"], reports["probe"]
    assert claim.num_credited_tokens == claim.num_obtained_tokens == n * tpb
    assert claim.num_overflow_steps == 0 and claim.num_rejected_too_large == 0
    assert probe.num_credited_tokens == n * tpb
    assert probe.num_lost_reuse_tokens > 0
    assert probe.num_overflow_steps == 1
    assert probe.max_overflow_tokens == probe.num_lost_reuse_tokens


def test_race_workload_checks_its_fields() -> None:
    """Bad sizes name the field."""
    with pytest.raises(ValueError, match="max_num_tokens must be an integer >= 1, got 0"):
        RaceWorkload(CacheConfig(), max_num_tokens=0)
