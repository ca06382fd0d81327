"""Plots of simulator reports (extra ``plot``: matplotlib, imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvtier.sim.report import SimReport


def require_matplotlib() -> Any:
    """matplotlib's pyplot on the Agg backend; ImportError if the extra is missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(reports: list[SimReport], path: Path, file_format: str | None = None) -> None:
    """Hit rate (one line per eviction policy, with the oracle bounds) and TTFT against
    GPU + host capacity, as a PNG (or ``file_format``, else the one ``path`` names)."""
    plt = require_matplotlib()
    fig, (hits, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    by_policy: dict[str, list[SimReport]] = {}
    for r in reports:
        by_policy.setdefault(str(r.cache_config["eviction_policy"]), []).append(r)
    several = len(by_policy) > 1
    for policy, runs in by_policy.items():
        runs = sorted(runs, key=_capacity)
        label = f"kvtier {policy}" if several else "kvtier"
        capacity = [_capacity(r) for r in runs]
        hits.plot(capacity, [r.token_hit_rate for r in runs], "o-", label=label)
        for name in ("p50", "p99"):
            ttft.plot(capacity, [getattr(r.ttft_s, name) for r in runs], "o-",
                      label=f"{policy} {name}" if several else name)
    bounds = {_capacity(r): r.oracle for r in reports if r.oracle is not None}
    if bounds and all(r.oracle is not None for r in reports):
        capacity = sorted(bounds)
        hits.plot(capacity, [bounds[c].belady_hit_rate for c in capacity], "s--",
                  label="Belady (offline)")
        hits.plot(capacity, [bounds[c].lru_hit_rate for c in capacity], "x--",
                  label="LRU (offline)")
        hits.plot(capacity, [bounds[c].unlimited_hit_rate for c in capacity], ":",
                  label="unlimited")
    hits.set(xlabel="GPU + host blocks", ylabel="token hit rate", title="Hit rate")
    hits.legend()
    ttft.set(xlabel="GPU + host blocks", ylabel="TTFT (virtual s)", title="Time to first token")
    ttft.legend()
    fig.suptitle(str(reports[0].workload.get("name")))
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100, format=file_format)
    finally:
        plt.close(fig)


def _capacity(report: SimReport) -> int:
    return (int(str(report.cache_config["num_gpu_blocks"]))
            + int(str(report.cache_config["num_host_blocks"])))
