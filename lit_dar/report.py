"""The routing report of a trained model: run a batch with statistics on, save the heatmap PNG, print the table.

Used by ``lit-dar routing`` and at the end of every run (``out_dir/routing.png``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from lit_dar.patch import enable_routing_stats, find_router
from lit_dar.plotting import routing_heatmap
from lit_dar.rule import RoutingStatistics, RuleStatistics


def routing_report(model: torch.nn.Module, idx: torch.Tensor, png: Path, title: str = "") -> list[dict[str, float]]:
    """Run ``idx`` through ``model`` with statistics on, save the heatmap, print and return the table."""
    enable_routing_stats(model)
    with torch.no_grad():
        model(idx)
    stats = find_router(model).statistics()
    enable_routing_stats(model, False)
    png.parent.mkdir(parents=True, exist_ok=True)
    figure = routing_heatmap(stats.matrix(), null_source=stats.null_source, title=title) if isinstance(
        stats, RoutingStatistics) else _series_plot(stats, title)
    figure.savefig(png, dpi=120, bbox_inches="tight")
    rows = stats.rows()
    columns = list(rows[0])
    print("  ".join(f"{c:>10}" for c in columns))
    for row in rows:
        print("  ".join(f"{row[c]:10d}" if isinstance(row[c], int) else f"{row[c]:10.3f}" for c in columns))
    return rows


def _series_plot(stats: RuleStatistics, title: str) -> Figure:
    """Per-sublayer series of a rule without routing weights (DDL: β and |v − kᵀs|)."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    for name, values in sorted(stats.scalars().items()):
        ax.plot(values, marker="o", ms=3, label=name)
    ax.set_xlabel("sublayer")
    ax.set_title(title)
    ax.legend()
    return fig
