"""Lab request streams from the traces and the built-in generators.

Mooncake traces already carry 512-token prefix ids (the lab uses them as they are, as
``kvtier.sim.oracle`` does, partial last block included). Every other workload yields
token lists (``kvtier.sim.workload.TraceRequest``); their full blocks are keyed with
``kvtier.sim.oracle.prefix_block_keys`` and the keys interned to small integers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from benchmarks.policy_lab.replay import LabRequest

from kvtier.sim.oracle import prefix_block_keys
from kvtier.sim.synthetic import SyntheticChat
from kvtier.sim.traces import AzureTrace
from kvtier.sim.workload import TraceRequest

TRACES = Path(os.environ.get("KVTIER_TRACES", Path(__file__).resolve().parents[3]
                             / "shared" / "data" / "traces"))
MOONCAKE_BLOCK_TOKENS = 512


def mooncake(path: Path, limit: int | None = None) -> list[LabRequest]:
    """A Mooncake JSONL trace as lab requests (512-token blocks, ids as keys)."""
    # NOTE: MooncakeTrace builds token lists to expose arrivals; the lab needs only the
    # three fields, so it reads them directly (the file was validated by kvtier's reader).
    requests: list[LabRequest] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(requests) >= limit:
                break
            if not line.strip():
                continue
            obj = json.loads(line)
            requests.append(LabRequest(len(requests), obj["timestamp"] / 1000.0,
                                       tuple(obj["hash_ids"]), obj["input_length"]))
    return requests


def from_workload(workload: Iterable[TraceRequest], tokens_per_block: int) -> list[LabRequest]:
    """Token-list requests as lab requests: full blocks keyed by their chained hash."""
    ids: dict[bytes, int] = {}
    requests: list[LabRequest] = []
    for request in workload:
        keys = prefix_block_keys(request.prompt, tokens_per_block)
        if not keys:
            keys_int: tuple[int, ...] = ()
        else:
            keys_int = tuple(ids.setdefault(key, len(ids)) for key in keys)
        requests.append(LabRequest(len(requests), request.arrival_s, keys_int,
                                   len(request.prompt)))
    return requests


def azure(name: str, tokens_per_block: int, limit: int | None = None) -> list[LabRequest]:
    """An Azure 2023 CSV with kvtier's default synthetic prefix model (seed 0)."""
    return from_workload(AzureTrace(TRACES / f"azure_llm_2023_{name}.csv", limit=limit),
                         tokens_per_block)


def synthetic_chat(tokens_per_block: int, num_requests: int = 2000) -> list[LabRequest]:
    """The built-in synthetic chat (``kvtier replay``'s embedded default workload)."""
    return from_workload(SyntheticChat(num_requests=num_requests), tokens_per_block)
