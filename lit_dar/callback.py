"""``DeltaAttnResCallback``: Delta Attention Residuals in any Lightning training run.

Lightning runs ``Callback.setup`` → ``LightningModule.setup`` → ``configure_model`` → ``strategy.setup``
(wrap or shard, then ``configure_optimizers``) → ``on_fit_start``. The callback works in those gaps:

* ``setup``: patch every ``litgpt.GPT`` the module holds. Until the strategy has set the model up it also
  patches a GPT the moment it is assigned to the module, which is what the FSDP pattern needs: a GPT
  built in ``configure_model`` (on the meta device) and sharded right there gets its routing parameters
  *before* ``fully_shard`` (FSDP2 does not keep a parameter added after sharding in sync across ranks).
* ``on_fit_start``: move the routing parameters into their own optimizer param group (own LR, no
  weight decay), keeping any LR scheduler's shape for them (``lit_dar.param_groups``).
* ``state_dict`` / ``on_save_checkpoint``: the DAR config (and the monitor's collapse window) travel with the
  checkpoint, so a resumed run restores them and a model can be rebuilt from the checkpoint alone.

Monitoring is ``lit_dar.monitor.RoutingMonitor``; the callback runs one by default, so one callback gives DAR
with monitoring.
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn as nn
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from litgpt.model import GPT
from typing_extensions import override

from lit_dar.config import DARConfig
from lit_dar.monitor import RoutingMonitor
from lit_dar.param_groups import check_exactly_once, place_routing_parameters
from lit_dar.patch import (
    _check_unwrapped,
    check_config,
    dar_filter,
    find_router,
    get_dar_config,
    patch_model,
    routing_parameters,
)

_SHARDED_HINT = (
    "Routing parameters added after the strategy wrapped or sharded the model would not be kept in sync "
    "across ranks (FSDP2 keeps only the parameters it saw in fully_shard). Assign the GPT to the module "
    "before sharding it (e.g. `self.model = GPT(config)` in configure_model, then fully_shard) so the "
    "callback patches it on assignment, or patch it yourself before sharding with "
    "`lit_dar.patch_model(gpt, callback.dar_config)`: the callback accepts a model already patched with its config."
)


class DeltaAttnResCallback(Callback):
    """Patch the LitGPT model(s) of a LightningModule with Delta Attention Residuals and train them.

    The routing parameters get their own optimizer param group, and the DAR config goes into every checkpoint.
    A ``RoutingMonitor`` logs what the routing does: the callback runs one by default, so adding this one
    callback gives DAR with monitoring. Pass ``monitor=RoutingMonitor(...)`` to set its logging, or
    ``monitor=False`` to train without it.

    Args:
        dar: the routing to add (mode, blocks, gate, null source).
        routing_lr: peak LR of the routing parameters (the paper fine-tunes routing at 5e-3 against 5e-5
            for the base). It follows the base group's LR schedule, scaled to this peak.
        routing_weight_decay: weight decay of the routing parameters (0: decaying the pseudo-queries pulls
            the routing back to uniform).
        freeze_base: train the routing parameters only (everything else gets ``requires_grad=False``).
        monitor: the ``RoutingMonitor`` to run; ``True`` runs one with its defaults, ``False`` none. Its
            collapse window is saved with this callback's state.

    Raises:
        TypeError: if ``dar`` or ``monitor`` has the wrong type.
        ValueError: if ``routing_lr`` or ``routing_weight_decay`` is out of range.
    """

    def __init__(
        self,
        dar: DARConfig | None = None,
        routing_lr: float = 5e-3,
        routing_weight_decay: float = 0.0,
        freeze_base: bool = False,
        monitor: RoutingMonitor | bool = True,
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
        if monitor is True:
            monitor = RoutingMonitor()
        elif monitor is False:
            monitor = None
        elif not isinstance(monitor, RoutingMonitor):
            raise TypeError(f"monitor must be a lit_dar.RoutingMonitor or a bool, got {type(monitor).__name__}.")
        self.dar_config = dar
        self.routing_lr = float(routing_lr)
        self.routing_weight_decay = float(routing_weight_decay)
        self.freeze_base = freeze_base
        self.monitor: RoutingMonitor | None = monitor
        self._registration: Any = None

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
        if self.monitor is not None and any(isinstance(cb, RoutingMonitor) for cb in trainer.callbacks):
            raise ValueError(
                "The Trainer has a RoutingMonitor and the DeltaAttnResCallback runs one of its own: pass yours as "
                "DeltaAttnResCallback(..., monitor=RoutingMonitor(...)), or set monitor=False."
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
            message = f"DeltaAttnResCallback cannot patch the GPT at {name!r}: {reason}. {_SHARDED_HINT}"
            raise ValueError(message) from None
        check_config(gpt.config, self.dar_config)

    def _patch(self, gpt: GPT) -> None:
        if get_dar_config(gpt) is None:
            patch_model(gpt, self.dar_config)

    def _open_registration(self, pl_module: LightningModule) -> None:
        """Patch a GPT when it is assigned into the module, until the strategy has set the model up."""
        # Why a process-wide hook: a module that builds its GPT in `configure_model` usually shards it there too
        # (FSDP2's fully_shard), and Lightning calls no callback hook inside `configure_model`: the next one,
        # `on_fit_start`, comes after `strategy.setup` has wrapped the model. torch offers child registration
        # hooks only process-wide (`register_module_module_registration_hook`), so the callback holds one from
        # `setup` until the strategy is done (`_finish_setup`, `teardown`) and ignores modules outside pl_module.
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
        check_exactly_once(routing, trainer.optimizers)

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

    # ------------------------------------------------------------------------------------ monitoring
    # The monitor is not in `trainer.callbacks` (Lightning has no public way for a callback to add another to
    # a Trainer), so its hooks run from here, and its state is saved under this callback's state key.

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.on_train_start(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.monitor is not None:
            self.monitor.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.monitor is not None:
            self.monitor.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    # ---------------------------------------------------------------------------------- checkpoints

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"dar_config": self.dar_config.to_dict()}
        if self.monitor is not None:
            state.update(self.monitor.state_dict())  # collapse_windows, collapse_warned
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = DARConfig.from_dict(state_dict["dar_config"])
        if saved != self.dar_config:
            raise ValueError(
                f"The checkpoint was trained with {saved}, but this DeltaAttnResCallback has {self.dar_config}. "
                "Resume with the checkpoint's DAR config (it is in checkpoint['dar_config'])."
            )
        if self.monitor is not None:
            self.monitor.load_state_dict(state_dict)

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


__all__ = ["DeltaAttnResCallback"]
