"""The routing parameters' own optimizer param group, and the LR schedulers that scale it.

``routing_param_groups`` builds the groups up front (for ``configure_optimizers``, plain PyTorch or Fabric).
``place_routing_parameters`` makes the same split in an optimizer that already exists, which is what
``DeltaAttnResCallback`` does after ``configure_optimizers``: it moves the routing parameters into a group of
their own and gives each LR scheduler of that optimizer an entry for it, so the routing LR follows the schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch.nn as nn
from torch.optim import Optimizer
from torch.optim import lr_scheduler as lrs

from lit_dar.patch import routing_parameters

ROUTING_GROUP = "dar_routing"
"""The ``name`` of the routing param group (``LearningRateMonitor`` logs its LR under this name)."""

# LR schedulers whose per-group state is `base_lrs` (+ `lr_lambdas`): a new group can be appended to them.
_EXTENSIBLE_SCHEDULERS = (
    lrs.LambdaLR, lrs.MultiplicativeLR, lrs.StepLR, lrs.MultiStepLR, lrs.ConstantLR, lrs.LinearLR,
    lrs.ExponentialLR, lrs.PolynomialLR, lrs.CosineAnnealingLR, lrs.CosineAnnealingWarmRestarts,
    lrs.SequentialLR, lrs.ChainedScheduler, lrs.ReduceLROnPlateau,
)


def routing_param_groups(
    model: nn.Module, routing_lr: float, routing_weight_decay: float = 0.0, **base_group: Any
) -> list[dict[str, Any]]:
    """Optimizer param groups: the trainable base parameters, then the routing parameters on their own.

    For ``configure_optimizers`` (or plain PyTorch / Fabric)::

        optimizer = torch.optim.AdamW(routing_param_groups(self, routing_lr=5e-3), lr=5e-5, weight_decay=0.1)

    With a ``DeltaAttnResCallback`` this is optional: the callback makes the same split itself (and checks it
    when already made).

    Args:
        model: the module holding the patched GPT(s).
        routing_lr: LR of the routing group.
        routing_weight_decay: weight decay of the routing group.
        **base_group: settings of the base group (e.g. ``lr``, ``weight_decay``).

    Returns:
        ``[base group, routing group]``; the routing group is named ``"dar_routing"``. A group with no
        parameters is left out.
    """
    routing = [p for p in routing_parameters(model) if p.requires_grad]
    routing_ids = {id(p) for p in routing}
    base = [p for n, p in model.named_parameters() if p.requires_grad and id(p) not in routing_ids]
    groups = [{"params": base, **base_group}] if base else []
    if routing:
        groups.append(
            {"params": routing, "lr": routing_lr, "weight_decay": routing_weight_decay, "name": ROUTING_GROUP}
        )
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

    Args:
        routing: the trainable routing parameters.
        optimizers: the run's optimizers.
        schedulers: the run's LR schedulers; those of the chosen optimizer get an entry for the new group.
        routing_lr: peak LR of the routing group.
        routing_weight_decay: weight decay of the routing group.

    Raises:
        ValueError: if the routing parameters are spread over several optimizers, none of several optimizers
            holds them, an explicit routing group disagrees with ``routing_lr``/``routing_weight_decay``, or a
            scheduler keeps per-group settings that cannot be extended (``OneCycleLR``, ``CyclicLR``).
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


def check_exactly_once(routing: list[nn.Parameter], optimizers: list[Optimizer]) -> None:
    """Check that each routing parameter sits in exactly one param group of the optimizers.

    Raises:
        RuntimeError: if one is missing or appears more than once.
    """
    counts = {id(p): 0 for p in routing}
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in counts:
                    counts[id(p)] += 1
    wrong = [c for c in counts.values() if c != 1]
    if optimizers and wrong:
        raise RuntimeError(f"Routing parameters must be in exactly one param group; found counts {sorted(set(wrong))}.")


def routing_group_lr(optimizers: Iterable[Optimizer]) -> float | None:
    """The current LR of the routing group, if an optimizer has one."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            if group.get("name") == ROUTING_GROUP:
                return float(group["lr"])
    return None


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
        for inner in _inner_schedulers(scheduler):
            update(inner)
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs[index] = routing_lr
        _update_last_lr(scheduler, lambda last: [*last[:index], group["lr"], *last[index + 1 :]])

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
    for inner in _inner_schedulers(scheduler):
        _extend_scheduler(inner, src_index, routing_lr, current_lr)
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs.append(routing_lr)
    if hasattr(scheduler, "lr_lambdas"):
        scheduler.lr_lambdas.append(scheduler.lr_lambdas[src_index])
    if hasattr(scheduler, "min_lrs"):
        scheduler.min_lrs.append(scheduler.min_lrs[src_index])
    _update_last_lr(scheduler, lambda last: [*last, current_lr])


def _inner_schedulers(scheduler: Any) -> list[Any]:
    # SequentialLR and ChainedScheduler expose the schedulers they wrap only as `_schedulers` (their state_dict
    # holds copies, and no `lr_lambdas`). Each inner scheduler needs an entry for the new group, because
    # `step()` zips its per-group values with the optimizer's param groups, so this read has no public route.
    if isinstance(scheduler, (lrs.SequentialLR, lrs.ChainedScheduler)):
        return list(scheduler._schedulers)
    return []


def _update_last_lr(scheduler: Any, update: Callable[[list[Any]], list[Any]]) -> None:
    """Keep ``get_last_lr()`` listing one LR per param group until the next ``step()`` rebuilds it.

    torch has no setter for the value ``get_last_lr()`` reports; the scheduler's ``state_dict`` /
    ``load_state_dict`` is its public way to set scheduler state, so the list is replaced through it.
    """
    state = scheduler.state_dict()
    if "_last_lr" in state:
        scheduler.load_state_dict({**state, "_last_lr": update(list(state["_last_lr"]))})


__all__ = [
    "ROUTING_GROUP", "check_exactly_once", "place_routing_parameters", "routing_group_lr", "routing_param_groups",
]
