r"""``RoutingMonitor``: log what the depth routing of a DAR model does during training.

On logging steps only it records the routing weights, then logs per-sublayer statistics, a routing heatmap
(TensorBoard) and a collapse flag; the other steps record nothing and cost nothing.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch.nn as nn
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from litgpt.model import GPT
from torch import Tensor
from torch.distributed.tensor import DTensor
from typing_extensions import override

from lit_dar.param_groups import routing_group_lr
from lit_dar.patch import enable_routing_stats, find_router
from lit_dar.plotting import routed_point_labels, routing_heatmap
from lit_dar.rule import RoutingStatistics, RuleStatistics


class RoutingMonitor(Callback):
    r"""Log routing statistics, a routing heatmap and a collapse flag of the DAR-patched GPT(s) of the module.

    ``DeltaAttnResCallback`` runs one by default (its ``monitor`` argument), so one callback gives DAR with
    monitoring. Add a ``RoutingMonitor`` to the Trainer yourself only for a model you patched without the
    callback (``lit_dar.patch_model``).

    Every ``log_interval``-th step each logger gets ``dar/max_weight/<point>``, ``dar/entropy/<point>``,
    ``dar/gate/<point>`` (scalar gates), ``dar/sharpness``, ``dar/sharpness_uniform``, ``dar/collapsed`` and
    ``dar/lr`` (the routing group's LR); a rule without depth routing (Deep Delta Learning) logs its own
    per-sublayer scalars and their means. With several GPTs the prefix is ``dar/<module name>``. Every
    ``image_interval``-th step each ``TensorBoardLogger`` gets the heatmap ``dar/routing``.

    Args:
        log_interval: log every this many optimizer steps; ``None`` follows the Trainer's ``log_every_n_steps``.
        image_interval: log the routing heatmap to TensorBoard every this many steps (0 disables it).
        collapse_threshold: routing counts as collapsed to uniform when the mean max weight is within this
            fraction of the way from uniform (1/n) to one-hot (1) ...
        collapse_window: ... on this many consecutive logged steps. Then the monitor warns once and logs
            ``dar/collapsed = 1``.

    Raises:
        ValueError: if an argument is out of range, or (at ``on_train_start``) the module holds no GPT patched
            with DAR.
    """

    def __init__(
        self,
        log_interval: int | None = None,
        image_interval: int = 500,
        collapse_threshold: float = 0.02,
        collapse_window: int = 10,
    ) -> None:
        if log_interval is not None and (not isinstance(log_interval, int) or log_interval < 1):
            raise ValueError(f"log_interval={log_interval!r} must be a positive integer or None.")
        if not isinstance(image_interval, int) or image_interval < 0:
            raise ValueError(f"image_interval={image_interval!r} must be an integer ≥ 0 (0 disables the heatmap).")
        if not 0 < collapse_threshold < 1:
            raise ValueError(f"collapse_threshold={collapse_threshold!r} must lie in (0, 1).")
        if not isinstance(collapse_window, int) or collapse_window < 1:
            raise ValueError(f"collapse_window={collapse_window!r} must be a positive integer.")
        self.log_interval = log_interval
        self.image_interval = image_interval
        self.collapse_threshold = collapse_threshold
        self.collapse_window = collapse_window
        self.last_metrics: dict[str, float] = {}  # what was logged last, on every rank
        self._windows: dict[str, deque[bool]] = {}
        self._warned: set[str] = set()
        self._stats_step: int | None = None
        self._logged_step: int | None = None
        self._gates: dict[str, Tensor] = {}
        self._hooks: list[Any] = []

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not _routed_gpts(pl_module):
            raise ValueError(
                f"RoutingMonitor found no GPT patched with DAR in {type(pl_module).__name__}: add a "
                "DeltaAttnResCallback (which monitors by default) or patch the GPT with lit_dar.patch_model."
            )

    def _interval(self, trainer: Trainer) -> int:
        return self.log_interval or max(trainer.log_every_n_steps, 1)

    def _image_due(self, step: int) -> bool:
        return self.image_interval > 0 and (step + 1) % self.image_interval == 0

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # Lightning's logging step (as LearningRateMonitor uses it); +1 as in Trainer.should_update_logs.
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        wanted = (step + 1) % self._interval(trainer) == 0 or self._image_due(step)
        self._stats_step = step if wanted and step != self._logged_step else None
        if self._stats_step is None:
            return
        for name, gpt in _routed_gpts(pl_module):
            enable_routing_stats(gpt, True)
            router = find_router(gpt)
            if getattr(router, "gate", None) is not None:
                # Read the gates inside the forward, where every strategy holds them unsharded (FSDP1/2
                # reshard right after); prepend=True runs this before FSDP's own post-forward hook.
                def capture(module: nn.Module, args: Any, output: Any, name: str = name, router: Any = router) -> None:
                    gate = router.gate.detach()
                    if isinstance(gate, DTensor):  # still sharded (e.g. a root FSDP2 unit resharded early)
                        gate = gate.full_tensor()  # collective: every rank runs this forward
                    self._gates[name] = gate.float().cpu().clone()

                self._hooks.append(gpt.register_forward_hook(capture, prepend=True))

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step, self._stats_step = self._stats_step, None
        if step is None:
            return
        self._logged_step = step  # once per optimizer step, also with gradient accumulation
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        gpts = _routed_gpts(pl_module)
        metrics: dict[str, float] = {}
        figures = {}
        for name, gpt in gpts:
            prefix = "dar" if len(gpts) == 1 else f"dar/{name}"
            rule = find_router(gpt)
            if not rule.last_weights:
                continue  # this GPT did not run forward in the step (e.g. a teacher used only in validation)
            stats = _mean_over_ranks(trainer, rule.statistics())
            if not isinstance(stats, RoutingStatistics):  # a rule without routing weights: its own scalars
                metrics.update(_rule_scalars(prefix, stats))
                continue
            metrics.update(self._scalars(prefix, stats, self._gates.pop(name, None)))
            if self._image_due(step):
                figures[prefix] = (stats.matrix(), stats.null_source)
        for _, gpt in gpts:
            enable_routing_stats(gpt, False)
        self._gates.clear()
        lr = routing_group_lr(trainer.optimizers)
        if lr is not None:
            metrics["dar/lr"] = lr
        self.last_metrics = metrics
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            for prefix, (matrix, null) in figures.items():
                self._log_heatmap(trainer, f"{prefix}/routing", matrix, null, step)

    def _scalars(self, prefix: str, stats: RoutingStatistics, gate: Tensor | None) -> dict[str, float]:
        labels = routed_point_labels(len(stats))
        metrics: dict[str, float] = {}
        for k, (label, n) in enumerate(zip(labels, stats.n_sources)):
            if n > 1:  # a point with one source always puts weight 1 on it: nothing to see
                metrics[f"{prefix}/max_weight/{label}"] = float(stats.max_weight[k])
                metrics[f"{prefix}/entropy/{label}"] = float(stats.entropy[k])
            if gate is not None:
                metrics[f"{prefix}/gate/{label}"] = float(gate[k])
        routed = [k for k, n in enumerate(stats.n_sources) if n > 1]
        if routed:
            sharpness = float(stats.max_weight[routed].mean())
            uniform = sum(1.0 / stats.n_sources[k] for k in routed) / len(routed)
            collapsed = self._update_collapse(prefix, sharpness, uniform)
            metrics.update({
                f"{prefix}/sharpness": sharpness,
                f"{prefix}/sharpness_uniform": uniform,
                f"{prefix}/collapsed": float(collapsed),
            })
        return metrics

    def _update_collapse(self, prefix: str, sharpness: float, uniform: float) -> bool:
        """Collapsed: mean max weight stayed within ``collapse_threshold`` of uniform for a whole window."""
        window = self._windows.setdefault(prefix, deque(maxlen=self.collapse_window))
        window.append((sharpness - uniform) / (1.0 - uniform) < self.collapse_threshold)
        collapsed = len(window) == self.collapse_window and all(window)
        if collapsed and prefix not in self._warned:
            self._warned.add(prefix)
            rank_zero_warn(
                f"DAR routing has collapsed to uniform ({prefix}): the mean max routing weight {sharpness:.4f} stayed "
                f"within {self.collapse_threshold:.0%} of uniform ({uniform:.4f}) for {self.collapse_window} logged "
                "steps. The routing is not learning: check routing_lr, that the routing parameters are in the "
                "optimizer, and (with gate='scalar') that the gates open."
            )
        elif not collapsed:
            self._warned.discard(prefix)
        return collapsed

    def _log_heatmap(self, trainer: Trainer, tag: str, matrix: Tensor, null_source: bool, step: int) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        figure = routing_heatmap(matrix, null_source=null_source, title=f"Depth routing weights, step {step}")
        for logger in loggers:
            logger.experiment.add_figure(tag, figure, global_step=step, close=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "collapse_windows": {prefix: list(window) for prefix, window in self._windows.items()},
            "collapse_warned": sorted(self._warned),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._windows = {
            prefix: deque(window, maxlen=self.collapse_window)
            for prefix, window in state_dict.get("collapse_windows", {}).items()
        }
        self._warned = set(state_dict.get("collapse_warned", ()))


def _routed_gpts(module: nn.Module) -> list[tuple[str, GPT]]:
    """The GPTs in ``module`` that carry DAR routing, by module name."""
    return [
        (name or "<root>", m) for name, m in module.named_modules() if isinstance(m, GPT) and find_router(m) is not None
    ]


def _mean_over_ranks(trainer: Trainer, stats: RuleStatistics) -> RuleStatistics:
    """Every rank records its own micro-batch; equal batch sizes make the mean of the ranks' means the mean over
    the global batch. One small all-reduce per logging step."""
    device = trainer.strategy.root_device
    return stats.reduced(lambda flat: trainer.strategy.reduce(flat.to(device), reduce_op="mean").cpu())


def _rule_scalars(prefix: str, stats: RuleStatistics) -> dict[str, float]:
    """Per-sublayer scalars of a rule without routing weights (DDL: mean β, mean |v − kᵀs|) and their means."""
    labels = routed_point_labels(len(stats))
    metrics = {}
    for key, values in sorted(stats.series().items()):
        metrics.update({f"{prefix}/{key}/{label}": float(v) for label, v in zip(labels, values.float())})
        metrics[f"{prefix}/{key}_mean"] = float(values.float().mean())
    return metrics


__all__ = ["RoutingMonitor"]
