"""The residual-rule interface every ``model.dar`` implements, and the statistics a rule reports.

A residual rule decides what each sublayer of a patched LitGPT model reads and how the residual stream
grows: the patched forward calls ``state = rule.start(x0)``, then ``stream, state = rule.layer(...)`` once
per block, then ``rule.finish(stream, state)``. Depth routing (:class:`~lit_dar.routing.DepthRouter`) and
Deep Delta Learning (:class:`~lit_dar.ddl.DeepDeltaRule`) are the two rules. Pure torch.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

NOT_RECORDED = "No routing weights recorded: call enable_routing_stats(model) and run a forward first."


class RuleStatistics(ABC):
    """A rule's summary of its last recorded forward, one entry per routed point (sublayer).

    Subclasses are dataclasses whose tensor fields hold one row per routed point; consumers (the training
    monitor, the CLI, the study) use only the methods below, whichever rule made the statistics.
    """

    @abstractmethod
    def series(self) -> dict[str, Tensor]:
        """Named per-point series to log, each ``(points,)`` (e.g. max weight and entropy, or β)."""

    @abstractmethod
    def rows(self) -> list[dict[str, float]]:
        """One row per point for a printed table (the keys are its columns)."""

    @abstractmethod
    def per_point(self) -> list[dict[str, Tensor]]:
        """One dict of 0-dim (or per-source) tensors per point: what :func:`lit_dar.routing_statistics` returns."""

    def matrix(self) -> Tensor | None:
        """``(points, sources)`` mean weights for a heatmap, NaN where a point has fewer sources; ``None`` for a
        rule without routing weights."""
        return None

    def __len__(self) -> int:
        return len(next(iter(self.series().values())))

    def scalars(self) -> dict[str, list[float]]:
        """:meth:`series` as floats."""
        return {name: values.float().tolist() for name, values in self.series().items()}

    def reduced(self, reduce: Callable[[Tensor], Tensor]) -> RuleStatistics:
        """The same statistics with every tensor field passed through ``reduce`` as one flat fp32 vector, e.g.
        ``lambda x: strategy.reduce(x, reduce_op="mean")`` for a mean over ranks in one collective. NaN entries
        (sources a point does not see) are sent as 0 and stay NaN."""
        names = [f.name for f in dataclasses.fields(self) if torch.is_tensor(getattr(self, f.name))]
        tensors = [getattr(self, name).float() for name in names]
        flat = reduce(torch.cat([t.nan_to_num(0.0).flatten() for t in tensors]))
        out, offset = {}, 0
        for name, t in zip(names, tensors):
            value = flat[offset : offset + t.numel()].view_as(t).to(t.device)
            out[name] = value.masked_fill(t.isnan(), math.nan)
            offset += t.numel()
        return dataclasses.replace(self, **out)


class ResidualRule(nn.Module, ABC):
    """The rule a patched model runs: ``start → layer (per block) → finish``, statistics and its config check.

    Attributes:
        record_stats: record what the next forwards route (off by default: then nothing is kept).
        last_weights: per routed point, what the last recorded forward recorded (empty if none).
        config_dict: the DAR config that built this rule; saved with the weights as ``dar._extra_state`` and
            checked when weights are loaded.
    """

    def __init__(self) -> None:
        super().__init__()
        self.record_stats = False
        self.last_weights: list[Any] = []
        self.config_dict: dict = {}

    @abstractmethod
    def start(self, x0: Tensor) -> Any:
        """The state of a new forward, from the embedding ``x0``."""

    @abstractmethod
    def layer(self, layer: int, stream: Tensor, state: Any, attn: Callable, mlp: Callable) -> tuple[Tensor, Any]:
        """One transformer layer: feed its two sublayers (``attn``, ``mlp``), return the new stream and state."""

    @abstractmethod
    def finish(self, stream: Tensor, state: Any) -> Tensor:
        """The hidden state that goes to the final norm; keeps the recorded statistics, if any."""

    @abstractmethod
    def _summarize(self) -> RuleStatistics:
        """:meth:`statistics` of ``last_weights`` (not empty)."""

    def statistics(self) -> RuleStatistics:
        """The summary of the last recorded forward.

        Raises:
            ValueError: no forward was recorded (see ``record_stats``).
        """
        if not self.last_weights:
            raise ValueError(NOT_RECORDED)
        with torch.no_grad():
            return self._summarize()

    def get_extra_state(self) -> dict:
        return {"config": dict(self.config_dict)}

    def set_extra_state(self, state: dict) -> None:
        """Refuse weights made for another routing config: same shapes can still mean other sources."""
        saved = dict(state.get("config", {}))
        if saved != self.config_dict:
            diff = {k: (saved.get(k), self.config_dict.get(k)) for k in set(saved) | set(self.config_dict)
                    if saved.get(k) != self.config_dict.get(k)}
            raise ValueError(
                f"The checkpoint's routing config differs from this model's (field: (checkpoint, model)): {diff}. "
                "Patch the model with the checkpoint's config (lit_dar.load_model reads it from dar_config.yaml)."
            )


@dataclass(frozen=True)
class RoutingStatistics(RuleStatistics):
    """Depth routing's weights, averaged over tokens, per routed point.

    ``mean_weight`` is the heatmap: row ``k`` holds point ``k``'s mean weight per source (the null source
    first when there is one, then ``x0``, then the completed sources), NaN past its ``n_sources[k]``.
    """

    mean_weight: Tensor  # (points, max sources)
    max_weight: Tensor  # (points,): mean over tokens of the largest weight
    entropy: Tensor  # (points,): mean entropy of the weights, in nats
    n_sources: tuple[int, ...]  # per point, the null source included
    null_source: bool = False

    def uniform_max_weight(self) -> list[float]:
        return [1.0 / n for n in self.n_sources]

    def uniform_entropy(self) -> list[float]:
        return [math.log(n) for n in self.n_sources]

    def series(self) -> dict[str, Tensor]:
        return {"max_weight": self.max_weight, "entropy": self.entropy}

    def matrix(self) -> Tensor:
        return self.mean_weight

    def rows(self) -> list[dict[str, float]]:
        return [
            {"sublayer": k, "sources": n, "max_weight": s["max_weight"].item(),
             "uniform_max_weight": s["uniform_max_weight"].item(),
             "normalized_entropy": s["entropy"].item() / math.log(n) if n > 1 else 0.0}
            for k, (n, s) in enumerate(zip(self.n_sources, self.per_point()))
        ]

    def per_point(self) -> list[dict[str, Tensor]]:
        return [
            {"mean_weight": self.mean_weight[k, :n], "max_weight": self.max_weight[k], "entropy": self.entropy[k],
             "n_sources": torch.tensor(n), "uniform_max_weight": torch.tensor(1.0 / n),
             "uniform_entropy": torch.tensor(math.log(n))}
            for k, n in enumerate(self.n_sources)
        ]


@dataclass(frozen=True)
class DeltaRuleStatistics(RuleStatistics):
    """Deep Delta Learning per sublayer: mean β and mean ``|v − kᵀs|`` over tokens."""

    beta: Tensor  # (sublayers,)
    residual: Tensor  # (sublayers,)

    def series(self) -> dict[str, Tensor]:
        return {"beta": self.beta, "residual": self.residual}

    def rows(self) -> list[dict[str, float]]:
        return [{"sublayer": j, "beta": float(b), "residual": float(r)} for j, (b, r) in
                enumerate(zip(self.beta, self.residual))]

    def per_point(self) -> list[dict[str, Tensor]]:
        return [{"beta": b, "residual": r} for b, r in zip(self.beta, self.residual)]


__all__ = ["DeltaRuleStatistics", "ResidualRule", "RoutingStatistics", "RuleStatistics"]
