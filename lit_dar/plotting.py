"""The routing heatmap: one row per routed point (sublayer), one column per source, as in the Kimi paper.

Built on ``matplotlib.figure.Figure`` without pyplot, so it needs no GUI backend, keeps no global figure
state and is safe to call from a training loop. The figure goes to TensorBoard (``add_figure``) or to a
PNG (``fig.savefig(path)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import Tensor


def routing_matrix(stats: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """``(routed points, sources)`` mean routing weights, NaN where a row has fewer sources.

    ``stats`` is what :func:`lit_dar.routing_statistics` returns (one dict per routed point).
    """
    width = max(int(s["mean_weight"].numel()) for s in stats)
    matrix = torch.full((len(stats), width), math.nan)
    for row, s in enumerate(stats):
        weights = s["mean_weight"].detach().float().cpu()
        matrix[row, : weights.numel()] = weights
    return matrix


def routed_point_labels(n_routes: int) -> list[str]:
    """``0.attn, 0.mlp, 1.attn, …`` and ``final`` for the routed final state of the AttnRes modes.

    Layer numbers are zero-padded to a common width (``07.mlp`` … ``27.mlp``) so they sort in TensorBoard.
    """
    n_sublayers = n_routes - n_routes % 2
    width = len(str(max(n_sublayers // 2 - 1, 0)))
    labels = [f"{j // 2:0{width}d}.{'mlp' if j % 2 else 'attn'}" for j in range(n_sublayers)]
    return labels + ["final"] * (n_routes % 2)


def source_labels(n_sources: int, null_source: bool = False) -> list[str]:
    """``x0`` (the embedding) then the completed sources in order; ``null`` first when there is one."""
    labels = ["null"] if null_source else []
    return labels + ["x0"] + [str(i) for i in range(1, n_sources - len(labels))]


def routing_heatmap(
    weights: Sequence[Mapping[str, Tensor]] | Tensor,
    null_source: bool = False,
    title: str | None = "Depth routing weights",
    annotate: bool | None = None,
) -> Figure:
    """A heatmap of mean routing weights: rows are routed points, columns are sources.

    Args:
        weights: the list from :func:`lit_dar.routing_statistics`, or a matrix from :func:`routing_matrix`.
        null_source: the model has a null source (then column 0 is ``null``).
        title: figure title (e.g. with the step).
        annotate: print the weight in each cell; by default only when the matrix is small enough to read.

    Returns:
        A matplotlib ``Figure``; ``fig.savefig("routing.png")`` writes it to a file.
    """
    matrix = weights if isinstance(weights, Tensor) else routing_matrix(weights)
    rows, cols = matrix.shape
    fig = Figure(figsize=(min(2.2 + 0.42 * cols, 14.0), min(1.4 + 0.26 * rows, 20.0)), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="#eeeeee")  # sources a row cannot see: light grey
    image = ax.imshow(np.ma.masked_invalid(matrix.numpy()), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(cols), source_labels(cols, null_source), fontsize=7)
    ax.set_yticks(range(rows), routed_point_labels(rows), fontsize=7)
    ax.set_xlabel("source")
    ax.set_ylabel("sublayer (routed point)")
    if title:
        ax.set_title(title, fontsize=9)
    if annotate is None:
        annotate = rows <= 40 and cols <= 16
    if annotate:
        for (r, c), value in zip(torch.cartesian_prod(torch.arange(rows), torch.arange(cols)).tolist(), matrix.flatten()):
            if not math.isnan(value):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=5.5,
                        color="black" if value > 0.6 else "white")
    fig.colorbar(image, ax=ax, label="mean weight", shrink=0.8)
    return fig


__all__ = ["routed_point_labels", "routing_heatmap", "routing_matrix", "source_labels"]
