"""The serving simulator: workloads (trace readers, synthetic chat, agentic tool loops), a
step time model, oracles, the replay loop (:func:`simulate`, :class:`ReplayLoop`) and its
report."""

from __future__ import annotations

from kvtier.sim.agentic import AgenticWorkload
from kvtier.sim.mixed import MixedWorkload
from kvtier.sim.oracle import (
    OracleRequest,
    OracleResult,
    belady_hit_tokens,
    lru_hit_tokens,
    oracle_bounds,
    oracle_requests,
    prefix_block_keys,
    unlimited_hit_tokens,
)
from kvtier.sim.probe import ProbeScheduler, make_scheduler
from kvtier.sim.race import RaceWorkload
from kvtier.sim.replay import (
    ReplayLoop,
    SimulationStalled,
    simulate,
    too_large,
)
from kvtier.sim.report import (
    LoadEstimate,
    OracleBounds,
    SimReport,
    Summary,
    format_report,
    format_side_by_side,
    format_sweep,
    percentile,
)
from kvtier.sim.synthetic import PrefixModel, SessionBuilder, SyntheticChat
from kvtier.sim.timemodel import PROFILES, ModelProfile, TimeModel, get_profile
from kvtier.sim.traces import AzureTrace, MooncakeTrace, TraceFormatError
from kvtier.sim.workload import SAMPLED_TOKEN_BASE, TraceRequest, Workload

__all__ = [
    "PROFILES",
    "SAMPLED_TOKEN_BASE",
    "AgenticWorkload",
    "AzureTrace",
    "LoadEstimate",
    "MixedWorkload",
    "ModelProfile",
    "MooncakeTrace",
    "OracleBounds",
    "OracleRequest",
    "OracleResult",
    "PrefixModel",
    "ProbeScheduler",
    "RaceWorkload",
    "ReplayLoop",
    "SessionBuilder",
    "SimReport",
    "SimulationStalled",
    "Summary",
    "SyntheticChat",
    "TimeModel",
    "TraceFormatError",
    "TraceRequest",
    "Workload",
    "belady_hit_tokens",
    "format_report",
    "format_side_by_side",
    "format_sweep",
    "get_profile",
    "lru_hit_tokens",
    "make_scheduler",
    "oracle_bounds",
    "oracle_requests",
    "percentile",
    "prefix_block_keys",
    "simulate",
    "too_large",
    "unlimited_hit_tokens",
]
