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


def plot_sweep(reports: list[SimReport], path: Path) -> None:
    """Hit rate (with the oracle bounds) and TTFT against GPU + host capacity, as a PNG."""
    plt = require_matplotlib()
    capacity = [int(str(r.cache_config["num_gpu_blocks"]))
                + int(str(r.cache_config["num_host_blocks"])) for r in reports]
    fig, (hits, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    hits.plot(capacity, [r.token_hit_rate for r in reports], "o-", label="kvtier")
    if all(r.oracle is not None for r in reports):
        hits.plot(capacity, [r.oracle.belady_hit_rate for r in reports if r.oracle is not None],
                  "s--", label="Belady (full blocks)")
        hits.plot(capacity, [r.oracle.unlimited_hit_rate for r in reports
                             if r.oracle is not None], ":", label="unlimited")
    hits.set(xlabel="GPU + host blocks", ylabel="token hit rate", title="Hit rate")
    hits.legend()
    for name, key in (("p50", "p50"), ("p99", "p99")):
        ttft.plot(capacity, [getattr(r.ttft_s, key) for r in reports], "o-", label=name)
    ttft.set(xlabel="GPU + host blocks", ylabel="TTFT (virtual s)", title="Time to first token")
    ttft.legend()
    fig.suptitle(str(reports[0].workload.get("name")))
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
