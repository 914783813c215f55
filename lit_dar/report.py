"""The routing report of a trained model: run a batch with statistics on, save the heatmap PNG, print the table.

Used by ``lit-dar routing`` and at the end of every run (``out_dir/routing.png``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from matplotlib.figure import Figure

from lit_dar.patch import enable_routing_stats, find_router, routing_statistics
from lit_dar.plotting import routing_heatmap, routing_matrix


def routing_report(model: torch.nn.Module, idx: torch.Tensor, png: Path, title: str = "") -> list[dict[str, float]]:
    """Run ``idx`` through ``model`` with statistics on, save the heatmap, print and return the table."""
    enable_routing_stats(model)
    with torch.no_grad():
        model(idx)
    stats = routing_statistics(model)
    enable_routing_stats(model, False)
    png.parent.mkdir(parents=True, exist_ok=True)
    if "max_weight" not in stats[0]:  # Deep Delta Learning: no routing weights, its own per-sublayer scalars
        return _rule_report(stats, png, title)
    fig = routing_heatmap(routing_matrix(stats), null_source=find_router(model).null is not None, title=title)
    fig.savefig(png, dpi=120, bbox_inches="tight")
    rows = []
    print("sublayer  sources  max weight  uniform  entropy/log n")
    for j, s in enumerate(stats):
        n = int(s["n_sources"])
        row = {
            "sublayer": j, "sources": n, "max_weight": s["max_weight"].item(),
            "uniform_max_weight": s["uniform_max_weight"].item(),
            "normalized_entropy": s["entropy"].item() / math.log(n) if n > 1 else 0.0,
        }
        rows.append(row)
        print(f"{j:8d}  {n:7d}  {row['max_weight']:10.3f}  {row['uniform_max_weight']:7.3f}  "
              f"{row['normalized_entropy']:13.3f}")
    return rows


def _rule_report(stats: list[dict[str, torch.Tensor]], png: Path, title: str) -> list[dict[str, float]]:
    """Per-sublayer scalars of a rule without routing weights (DDL: β and |v − kᵀs|): plot, print, return."""
    keys = sorted(stats[0])
    rows = [{"sublayer": j, **{k: float(s[k]) for k in keys}} for j, s in enumerate(stats)]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    for k in keys:
        ax.plot([r[k] for r in rows], marker="o", ms=3, label=k)
    ax.set_xlabel("sublayer")
    ax.set_title(title)
    ax.legend()
    fig.savefig(png, dpi=120, bbox_inches="tight")
    print("sublayer  " + "  ".join(f"{k:>10}" for k in keys))
    for r in rows:
        print(f"{r['sublayer']:8d}  " + "  ".join(f"{r[k]:10.3f}" for k in keys))
    return rows
