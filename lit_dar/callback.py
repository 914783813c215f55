"""``DeltaAttnResCallback``: Delta Attention Residuals in any Lightning training run.

Lightning runs ``Callback.setup`` → ``LightningModule.setup`` → ``configure_model`` → ``strategy.setup``
(wrap or shard, then ``configure_optimizers``) → ``on_fit_start``. The callback works in those gaps:

* ``setup``: patch every ``litgpt.GPT`` the module holds. Until the strategy has set the model up it also
  patches a GPT the moment it is assigned to the module, which is what the FSDP pattern needs: a GPT
  built in ``configure_model`` (on the meta device) and sharded right there gets its routing parameters
  *before* ``fully_shard`` (FSDP2 does not keep a parameter added after sharding in sync across ranks).
* ``on_fit_start``: move the routing parameters into their own optimizer param group (own LR, no
  weight decay), keeping any LR scheduler's shape for them.
* ``on_train_batch_start/end``: on logging steps only, record the routing weights and log statistics, a
  heatmap and a collapse flag (recording costs nothing on the other steps).
* ``state_dict`` / ``on_save_checkpoint``: the DAR config and the collapse window travel with the
  checkpoint, so a resumed run restores them and a model can be rebuilt from the checkpoint alone.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from litgpt.model import GPT
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from torch.optim import lr_scheduler as lrs
from typing_extensions import override

from lit_dar.config import DARConfig
from lit_dar.patch import (
    _check_unwrapped,
    check_config,
    dar_filter,
    enable_routing_stats,
    find_router,
    get_dar_config,
    patch_model,
    routing_parameters,
    routing_statistics,
)
from lit_dar.plotting import routed_point_labels, routing_heatmap, routing_matrix

ROUTING_GROUP = "dar_routing"
"""The ``name`` of the routing param group (``LearningRateMonitor`` logs its LR under this name)."""

_SHARDED_HINT = (
    "Routing parameters added after the strategy wrapped or sharded the model would not be kept in sync "
    "across ranks (FSDP2 keeps only the parameters it saw in fully_shard). Assign the GPT to the module "
    "before sharding it (e.g. `self.model = GPT(config)` in configure_model, then fully_shard) so the "
    "callback patches it on assignment, or patch it yourself before sharding with "
    "`lit_dar.patch_model(gpt, callback.dar_config)`: the callback accepts a model already patched with its config."
)

# LR schedulers whose per-group state is `base_lrs` (+ `lr_lambdas`): a new group can be appended to them.
_EXTENSIBLE_SCHEDULERS = (
    lrs.LambdaLR, lrs.MultiplicativeLR, lrs.StepLR, lrs.MultiStepLR, lrs.ConstantLR, lrs.LinearLR,
    lrs.ExponentialLR, lrs.PolynomialLR, lrs.CosineAnnealingLR, lrs.CosineAnnealingWarmRestarts,
    lrs.SequentialLR, lrs.ChainedScheduler, lrs.ReduceLROnPlateau,
)


# --------------------------------------------------------------------------------------------------
# Param groups
# --------------------------------------------------------------------------------------------------


def routing_param_groups(
    model: nn.Module, routing_lr: float, routing_weight_decay: float = 0.0, **base_group: Any
) -> list[dict[str, Any]]:
    """Optimizer param groups: the trainable base parameters, then the routing parameters on their own.

    For ``configure_optimizers`` (or plain PyTorch / Fabric)::

        optimizer = torch.optim.AdamW(routing_param_groups(self, routing_lr=5e-3), lr=5e-5, weight_decay=0.1)

    ``base_group`` (e.g. ``lr``, ``weight_decay``) goes into the base group; the routing group carries
    ``routing_lr``, ``routing_weight_decay`` and ``name="dar_routing"``. With a ``DeltaAttnResCallback``
    this is optional: the callback makes the same split itself (and checks it when already made).
    """
    routing = [p for p in routing_parameters(model) if p.requires_grad]
    routing_ids = {id(p) for p in routing}
    base = [p for n, p in model.named_parameters() if p.requires_grad and id(p) not in routing_ids]
    groups = [{"params": base, **base_group}] if base else []
    if routing:
        groups.append({"params": routing, "lr": routing_lr, "weight_decay": routing_weight_decay, "name": ROUTING_GROUP})
    return groups


def place_routing_parameters(
    routing: list[nn.Parameter],
    optimizers: list[Optimizer],
    schedulers: Iterable[Any],
    routing_lr: float,
    routing_weight_decay: float = 0.0,
) -> Optimizer | None:
    """Make the routing parameters one param group of their own, in place, and return its optimizer.

    A group that already holds exactly the routing parameters is kept (its LR and weight decay are
    checked). Otherwise the routing parameters are taken out of whichever groups hold them and appended
    as a new group that copies the hyperparameters of the group they came from (betas, eps, …) except
    ``lr=routing_lr`` and ``weight_decay=routing_weight_decay``. The optimizer's LR schedulers get a matching
    entry, so the routing LR follows the same schedule (warmup, cosine) scaled to its own peak.
    Call it after the optimizers exist and before the first step or any optimizer state is loaded.
    """
    if not routing or not optimizers:
        return None
    ids = {id(p) for p in routing}
    holders = [(opt, i, g) for opt in optimizers for i, g in enumerate(opt.param_groups)
               if any(id(p) in ids for p in g["params"])]
    if len(holders) == 1 and {id(p) for p in holders[0][2]["params"]} == ids:
        optimizer, index, group = holders[0]
        if group.get("name") == ROUTING_GROUP:  # made by routing_param_groups: the user chose its LR
            _check_existing_group(group, routing_lr, routing_weight_decay)
        else:  # e.g. freeze_base and an optimizer over the trainable parameters: adopt the group
            _set_group_lr(optimizer, index, _schedulers_of(optimizer, schedulers), routing_lr, routing_weight_decay)
        return optimizer
    owners = {id(opt): opt for opt, _, _ in holders}
    if len(owners) > 1:
        raise ValueError(
            f"The routing parameters are spread over {len(owners)} optimizers; put them all in one optimizer "
            "(or build its groups with lit_dar.routing_param_groups)."
        )
    if not owners and len(optimizers) > 1:
        raise ValueError(
            "None of the optimizers holds the routing parameters and there are several optimizers, so the "
            "callback cannot tell which one should train them. Add them with lit_dar.routing_param_groups."
        )
    optimizer = next(iter(owners.values())) if owners else optimizers[0]
    source = holders[0][2] if holders else optimizer.param_groups[0]
    opt_schedulers = _schedulers_of(optimizer, schedulers)

    for group in optimizer.param_groups:
        keep = [i for i, p in enumerate(group["params"]) if id(p) not in ids]
        if "param_names" in group:
            group["param_names"] = [group["param_names"][i] for i in keep]
        group["params"] = [group["params"][i] for i in keep]
    new_group = {k: v for k, v in source.items() if k not in ("params", "param_names", "initial_lr", "name")}
    new_group.update(params=list(routing), lr=routing_lr, weight_decay=routing_weight_decay, name=ROUTING_GROUP)
    if "initial_lr" in source:  # a scheduler already scaled the source group: start at the same point
        scale = source["lr"] / source["initial_lr"] if source["initial_lr"] else 1.0
        new_group.update(lr=routing_lr * scale, initial_lr=routing_lr)
    src_index = next(i for i, g in enumerate(optimizer.param_groups) if g is source)
    optimizer.add_param_group(new_group)
    for scheduler in opt_schedulers:
        _extend_scheduler(scheduler, src_index, routing_lr, new_group["lr"])
    return optimizer


def _set_group_lr(
    optimizer: Optimizer, index: int, schedulers: list[Any], routing_lr: float, routing_weight_decay: float
) -> None:
    group = optimizer.param_groups[index]
    if "initial_lr" in group:
        scale = group["lr"] / group["initial_lr"] if group["initial_lr"] else 1.0
        group.update(lr=routing_lr * scale, initial_lr=routing_lr)
    else:
        group["lr"] = routing_lr
    group.update(weight_decay=routing_weight_decay, name=ROUTING_GROUP)

    def update(scheduler: Any) -> None:
        for inner in getattr(scheduler, "_schedulers", ()):
            update(inner)
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs[index] = routing_lr
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr[index] = group["lr"]

    for scheduler in schedulers:
        update(scheduler)


def _check_existing_group(group: dict[str, Any], routing_lr: float, routing_weight_decay: float) -> None:
    lr = group.get("initial_lr", group["lr"])
    wd = group.get("weight_decay", 0.0)
    if not math.isclose(float(lr), routing_lr, rel_tol=1e-6) or not math.isclose(wd, routing_weight_decay):
        raise ValueError(
            f"configure_optimizers already puts the routing parameters in their own group with lr={lr}, "
            f"weight_decay={wd}, but the DeltaAttnResCallback has routing_lr={routing_lr}, "
            f"routing_weight_decay={routing_weight_decay}. Make them agree, or build the optimizer from all "
            "parameters and let the callback create the routing group."
        )


def _schedulers_of(optimizer: Optimizer, schedulers: Iterable[Any]) -> list[Any]:
    found = []
    for scheduler in schedulers:
        if getattr(scheduler, "optimizer", None) is not optimizer:
            continue
        if not isinstance(scheduler, _EXTENSIBLE_SCHEDULERS):
            raise ValueError(
                f"The DeltaAttnResCallback cannot add the routing param group to a {type(scheduler).__name__}, "
                "which keeps per-group settings of its own. Build the optimizer's param groups with "
                "lit_dar.routing_param_groups(...) in configure_optimizers instead."
            )
        found.append(scheduler)
    return found


def _extend_scheduler(scheduler: Any, src_index: int, routing_lr: float, current_lr: float) -> None:
    """Give a scheduler built for the old groups an entry for the appended routing group."""
    for inner in getattr(scheduler, "_schedulers", ()):  # SequentialLR, ChainedScheduler
        _extend_scheduler(inner, src_index, routing_lr, current_lr)
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs.append(routing_lr)
    if hasattr(scheduler, "lr_lambdas"):
        scheduler.lr_lambdas.append(scheduler.lr_lambdas[src_index])
    if hasattr(scheduler, "min_lrs"):
        scheduler.min_lrs.append(scheduler.min_lrs[src_index])
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr.append(current_lr)


def routing_group_lr(optimizers: Iterable[Optimizer]) -> float | None:
    """The current LR of the routing group, if an optimizer has one."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            if group.get("name") == ROUTING_GROUP:
                return float(group["lr"])
    return None


# --------------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------------


class DeltaAttnResCallback(Callback):
    """Patch the LitGPT model(s) of a LightningModule with Delta Attention Residuals, train and monitor them.

    Args:
        dar: the routing to add (mode, blocks, gate, null source).
        routing_lr: peak LR of the routing parameters (the paper fine-tunes routing at 5e-3 against 5e-5
            for the base). It follows the base group's LR schedule, scaled to this peak.
        routing_weight_decay: weight decay of the routing parameters (0: decaying the pseudo-queries pulls
            the routing back to uniform).
        freeze_base: train the routing parameters only (everything else gets ``requires_grad=False``).
        log_interval: log routing statistics every this many optimizer steps; ``None`` follows the
            Trainer's ``log_every_n_steps``.
        image_interval: log the routing heatmap to TensorBoard every this many steps (0 disables it).
        collapse_threshold: routing counts as collapsed to uniform when the mean max weight is within this
            fraction of the way from uniform (1/n) to one-hot (1) ...
        collapse_window: ... on this many consecutive logged steps. Then the callback warns once and logs
            ``dar/collapsed = 1``.
    """

    def __init__(
        self,
        dar: DARConfig | None = None,
        routing_lr: float = 5e-3,
        routing_weight_decay: float = 0.0,
        freeze_base: bool = False,
        log_interval: int | None = None,
        image_interval: int = 500,
        collapse_threshold: float = 0.02,
        collapse_window: int = 10,
    ) -> None:
        dar = DARConfig() if dar is None else dar
        if isinstance(dar, dict):
            dar = DARConfig.from_dict(dar)
        if not isinstance(dar, DARConfig):
            raise TypeError(f"DeltaAttnResCallback expects a lit_dar.DARConfig, got {type(dar).__name__}.")
        if not isinstance(routing_lr, (int, float)) or not math.isfinite(routing_lr) or routing_lr <= 0:
            raise ValueError(
                f"routing_lr={routing_lr!r} must be a positive number (the paper uses 5e-3). To keep the routing "
                "fixed, freeze it instead: `model.dar.requires_grad_(False)`."
            )
        if not routing_weight_decay >= 0:
            raise ValueError(f"routing_weight_decay={routing_weight_decay!r} must be ≥ 0.")
        if log_interval is not None and (not isinstance(log_interval, int) or log_interval < 1):
            raise ValueError(f"log_interval={log_interval!r} must be a positive integer or None.")
        if not isinstance(image_interval, int) or image_interval < 0:
            raise ValueError(f"image_interval={image_interval!r} must be an integer ≥ 0 (0 disables the heatmap).")
        if not 0 < collapse_threshold < 1:
            raise ValueError(f"collapse_threshold={collapse_threshold!r} must lie in (0, 1).")
        if not isinstance(collapse_window, int) or collapse_window < 1:
            raise ValueError(f"collapse_window={collapse_window!r} must be a positive integer.")
        self.dar_config = dar
        self.routing_lr = float(routing_lr)
        self.routing_weight_decay = float(routing_weight_decay)
        self.freeze_base = freeze_base
        self.log_interval = log_interval
        self.image_interval = image_interval
        self.collapse_threshold = collapse_threshold
        self.collapse_window = collapse_window
        self.last_metrics: dict[str, float] = {}  # what was logged last, on every rank
        self._windows: dict[str, deque[bool]] = {}
        self._warned: set[str] = set()
        self._registration: Any = None
        self._stats_step: int | None = None
        self._logged_step: int | None = None
        self._gates: dict[str, Tensor] = {}
        self._hooks: list[Any] = []

    @property
    @override
    def state_key(self) -> str:
        # Keyed by the DAR config only, so a run resumes with other LRs or logging settings. (A second
        # callback with the same config is refused by the Trainer itself: state keys must be unique.)
        return self._generate_state_key(**self.dar_config.to_dict())

    # ---------------------------------------------------------------------------------------- setup

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        others = [cb for cb in trainer.callbacks if isinstance(cb, DeltaAttnResCallback) and cb is not self]
        if others:
            raise ValueError(
                f"The Trainer has {len(others) + 1} DeltaAttnResCallbacks; a model can be patched only once. "
                "Keep one callback (with one DARConfig)."
            )
        gpts = _find_gpts(pl_module)
        if not gpts and not is_overridden("configure_model", pl_module):
            raise self._no_gpt_error(pl_module)
        for name, gpt in gpts:  # check them all before patching any: nothing half-patched
            self._preflight(name, gpt)
        for name, gpt in gpts:
            self._patch(gpt)
        if gpts and self.freeze_base:
            _freeze_all_but_routing(pl_module)
        self._open_registration(pl_module)

    def _preflight(self, name: str, gpt: GPT) -> None:
        existing = get_dar_config(gpt)
        if existing is not None:
            if existing != self.dar_config:
                raise ValueError(
                    f"The GPT at {name!r} is already patched with {existing}, but the DeltaAttnResCallback has "
                    f"{self.dar_config}. Use one config: drop the callback or patch with the same one."
                )
            return
        try:
            _check_unwrapped(gpt)
        except (TypeError, ValueError) as err:
            reason = str(err).split(". ")[0]  # what is wrapped; the fix is ours to tell
            raise ValueError(f"DeltaAttnResCallback cannot patch the GPT at {name!r}: {reason}. {_SHARDED_HINT}") from None
        check_config(gpt.config, self.dar_config)

    def _patch(self, gpt: GPT) -> None:
        if get_dar_config(gpt) is None:
            patch_model(gpt, self.dar_config)

    def _open_registration(self, pl_module: LightningModule) -> None:
        """Patch a GPT when it is assigned into the module, until the strategy has set the model up."""
        self._close_registration()

        def on_registration(parent: nn.Module, name: str, child: nn.Module | None) -> None:
            if child is None or not (parent is pl_module or isinstance(child, GPT)):
                return  # cheap exit for the many registrations inside a model's own __init__
            if parent is not pl_module and not _contains(pl_module, parent):
                return
            gpts = [(f"{name}.{n}" if n else name, m) for n, m in child.named_modules() if isinstance(m, GPT)]
            for gpt_name, gpt in gpts:
                self._preflight(gpt_name, gpt)
            for _, gpt in gpts:
                self._patch(gpt)
            if self.freeze_base and (gpts or _find_gpts(pl_module)):
                _freeze_all_but_routing(pl_module, child)  # `child` is not in the module yet

        self._registration = nn.modules.module.register_module_module_registration_hook(on_registration)

    def _close_registration(self) -> None:
        if self._registration is not None:
            self._registration.remove()
            self._registration = None

    def _finish_setup(self, pl_module: LightningModule) -> list[tuple[str, GPT]]:
        """After the strategy set the model up: stop patching, check every GPT got patched."""
        self._close_registration()
        gpts = _find_gpts(pl_module)
        if not gpts:
            raise self._no_gpt_error(pl_module)
        unpatched = [name for name, gpt in gpts if find_router(gpt) is None]
        if unpatched:
            raise ValueError(
                f"The GPT(s) at {unpatched} were not patched before the strategy set the model up: the callback "
                f"patches GPTs that exist at setup or are assigned to the module in setup/configure_model. "
                f"{_SHARDED_HINT}"
            )
        return gpts

    def _no_gpt_error(self, pl_module: LightningModule) -> ValueError:
        need = " (freeze_base=True needs routing parameters to train)" if self.freeze_base else ""
        return ValueError(
            f"DeltaAttnResCallback found no litgpt.GPT in {type(pl_module).__name__}{need}: it looks for "
            "`litgpt.model.GPT` instances (subclasses included) among the module's submodules, created in "
            "__init__, setup or configure_model (e.g. `self.model = GPT(config)`)."
        )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish_setup(pl_module)
        routing = [p for p in routing_parameters(pl_module) if p.requires_grad]
        if self.freeze_base and not routing:
            raise ValueError(
                "freeze_base=True trains only the routing parameters, but the model has no trainable routing "
                "parameters (are they frozen with requires_grad=False?)."
            )
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        place_routing_parameters(routing, trainer.optimizers, schedulers, self.routing_lr, self.routing_weight_decay)
        _check_exactly_once(routing, trainer.optimizers)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != "fit":
            self._finish_setup(pl_module)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish_setup(pl_module)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish_setup(pl_module)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._close_registration()

    # ------------------------------------------------------------------------------------ statistics

    def _interval(self, trainer: Trainer) -> int:
        return self.log_interval or max(trainer.log_every_n_steps, 1)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # Lightning's logging step (as LearningRateMonitor uses it); +1 as in Trainer.should_update_logs.
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        wanted = (step + 1) % self._interval(trainer) == 0 or self._image_due(step)
        self._stats_step = step if wanted and step != self._logged_step else None
        if self._stats_step is None:
            return
        for name, gpt in _find_gpts(pl_module):
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

    def _image_due(self, step: int) -> bool:
        return self.image_interval > 0 and (step + 1) % self.image_interval == 0

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
        gpts = _find_gpts(pl_module)
        metrics: dict[str, float] = {}
        figures = {}
        for name, gpt in gpts:
            prefix = "dar" if len(gpts) == 1 else f"dar/{name}"
            if not find_router(gpt).last_weights:
                continue  # this GPT did not run forward in the step (e.g. a teacher used only in validation)
            stats = routing_statistics(gpt)
            if "max_weight" not in stats[0]:  # a rule without depth routing (Deep Delta Learning): its own scalars
                metrics.update(_rule_scalars(trainer, prefix, stats))
                continue
            max_weight, entropy, matrix = _reduce_stats(trainer, stats)
            metrics.update(self._scalars(prefix, stats, max_weight, entropy, self._gates.pop(name, None)))
            if self._image_due(step):
                figures[prefix] = (matrix, find_router(gpt).null is not None)
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

    def _scalars(
        self, prefix: str, stats: list[dict[str, Tensor]], max_weight: Tensor, entropy: Tensor, gate: Tensor | None
    ) -> dict[str, float]:
        n_sources = [int(s["n_sources"]) for s in stats]
        labels = routed_point_labels(len(stats))
        metrics: dict[str, float] = {}
        for k, (label, n) in enumerate(zip(labels, n_sources)):
            if n > 1:  # a point with one source always puts weight 1 on it: nothing to see
                metrics[f"{prefix}/max_weight/{label}"] = float(max_weight[k])
                metrics[f"{prefix}/entropy/{label}"] = float(entropy[k])
            if gate is not None:
                metrics[f"{prefix}/gate/{label}"] = float(gate[k])
        routed = [k for k, n in enumerate(n_sources) if n > 1]
        if routed:
            sharpness = float(max_weight[routed].mean())
            uniform = sum(1.0 / n_sources[k] for k in routed) / len(routed)
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

    # ---------------------------------------------------------------------------------- checkpoints

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "dar_config": self.dar_config.to_dict(),
            "collapse_windows": {prefix: list(window) for prefix, window in self._windows.items()},
            "collapse_warned": sorted(self._warned),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = DARConfig.from_dict(state_dict["dar_config"])
        if saved != self.dar_config:
            raise ValueError(
                f"The checkpoint was trained with {saved}, but this DeltaAttnResCallback has {self.dar_config}. "
                "Resume with the checkpoint's DAR config (it is in checkpoint['dar_config'])."
            )
        self._windows = {
            prefix: deque(window, maxlen=self.collapse_window)
            for prefix, window in state_dict.get("collapse_windows", {}).items()
        }
        self._warned = set(state_dict.get("collapse_warned", ()))

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Top level, beside the weights: enough to rebuild the model without the callback.
        checkpoint["dar_config"] = self.dar_config.to_dict()


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _find_gpts(module: nn.Module) -> list[tuple[str, GPT]]:
    return [(name or "<root>", m) for name, m in module.named_modules() if isinstance(m, GPT)]


def _freeze_all_but_routing(*modules: nn.Module) -> None:
    """``freeze_base``: only routing parameters keep ``requires_grad`` (done before any wrapping)."""
    for module in modules:
        for name, param in module.named_parameters():
            param.requires_grad = dar_filter(name)


def _contains(root: nn.Module, module: nn.Module) -> bool:
    return any(m is module for m in root.modules())


def _rule_scalars(trainer: Trainer, prefix: str, stats: list[dict[str, Tensor]]) -> dict[str, float]:
    """Per-sublayer scalars of a rule's statistics (DDL: mean β, mean |v − kᵀs|), averaged over ranks."""
    keys = sorted(stats[0])
    flat = torch.stack([s[k].float().reshape(()) for s in stats for k in keys]).to(trainer.strategy.root_device)
    flat = trainer.strategy.reduce(flat, reduce_op="mean").cpu().view(len(stats), len(keys))
    labels = routed_point_labels(len(stats))
    metrics = {f"{prefix}/{k}/{label}": float(flat[j, i]) for j, label in enumerate(labels) for i, k in enumerate(keys)}
    metrics.update({f"{prefix}/{k}_mean": float(flat[:, i].mean()) for i, k in enumerate(keys)})
    return metrics


def _reduce_stats(trainer: Trainer, stats: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """Per routed point max weight and entropy, and the weight matrix, averaged over all ranks.

    Every rank records the weights of its own micro-batch; equal batch sizes make the mean of the
    ranks' means the mean over the global batch. One small all-reduce per logging step.
    """
    max_weight = torch.stack([s["max_weight"] for s in stats]).float()
    entropy = torch.stack([s["entropy"] for s in stats]).float()
    matrix = routing_matrix(stats)
    mask = matrix.isnan()
    device = trainer.strategy.root_device
    flat = torch.cat([max_weight.cpu(), entropy.cpu(), matrix.nan_to_num(0.0).flatten()]).to(device)
    flat = trainer.strategy.reduce(flat, reduce_op="mean").cpu()
    n = len(stats)
    return flat[:n], flat[n : 2 * n], flat[2 * n :].view_as(matrix).masked_fill(mask, math.nan)


def _check_exactly_once(routing: list[nn.Parameter], optimizers: list[Optimizer]) -> None:
    counts = {id(p): 0 for p in routing}
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in counts:
                    counts[id(p)] += 1
    wrong = [c for c in counts.values() if c != 1]
    if optimizers and wrong:
        raise RuntimeError(f"Routing parameters must be in exactly one param group; found counts {sorted(set(wrong))}.")


__all__ = ["ROUTING_GROUP", "DeltaAttnResCallback", "place_routing_parameters", "routing_group_lr", "routing_param_groups"]
