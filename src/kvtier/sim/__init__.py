"""Simulator inputs: workloads (trace readers, synthetic chat), a step time model, oracles."""

from __future__ import annotations

from kvtier.sim.oracle import (
    OracleRequest,
    OracleResult,
    belady_hit_tokens,
    lru_hit_tokens,
    oracle_requests,
    prefix_block_keys,
    unlimited_hit_tokens,
)
from kvtier.sim.synthetic import PrefixModel, SessionBuilder, SyntheticChat
from kvtier.sim.timemodel import PROFILES, ModelProfile, TimeModel, get_profile
from kvtier.sim.traces import AzureTrace, MooncakeTrace, TraceFormatError
from kvtier.sim.workload import TraceRequest, Workload

__all__ = [
    "PROFILES",
    "AzureTrace",
    "ModelProfile",
    "MooncakeTrace",
    "OracleRequest",
    "OracleResult",
    "PrefixModel",
    "SessionBuilder",
    "SyntheticChat",
    "TimeModel",
    "TraceFormatError",
    "TraceRequest",
    "Workload",
    "belady_hit_tokens",
    "get_profile",
    "lru_hit_tokens",
    "oracle_requests",
    "prefix_block_keys",
    "unlimited_hit_tokens",
]
