"""The routing param group: built up front, or placed into an existing optimizer and its LR schedulers."""

from __future__ import annotations

import pytest
import torch
from litgpt.model import GPT
from test_callback import DAR
from test_distributed import tiny_config

from lit_dar import routing_parameters
from lit_dar.param_groups import ROUTING_GROUP, place_routing_parameters, routing_group_lr, routing_param_groups


def test_place_routing_parameters_extends_torch_schedulers() -> None:
    model = GPT(tiny_config())
    from lit_dar import patch_model

    patch_model(model, DAR)
    routing = routing_parameters(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.1)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=2)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[2])
    place_routing_parameters(routing, [optimizer], [scheduler], routing_lr=10.0)
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["lr"] == pytest.approx(5.0)
    assert scheduler.get_last_lr() == pytest.approx([0.5, 5.0])  # one entry per group before the first step
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        base, rout = (g["lr"] for g in optimizer.param_groups)
        assert rout == pytest.approx(10 * base)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
    with pytest.raises(ValueError, match="OneCycleLR.*routing_param_groups"):
        place_routing_parameters(routing, [optimizer], [one_cycle], routing_lr=1.0)
    assert len(optimizer.param_groups) == 1  # untouched


def test_adopted_group_keeps_get_last_lr_in_step() -> None:
    """With freeze_base the optimizer may hold the routing parameters alone: the group is adopted, not split."""
    model = GPT(tiny_config())
    from lit_dar import patch_model

    patch_model(model, DAR)
    routing = routing_parameters(model)
    optimizer = torch.optim.AdamW(routing, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    place_routing_parameters(routing, [optimizer], [scheduler], routing_lr=4.0, routing_weight_decay=0.0)
    (group,) = optimizer.param_groups
    assert group["name"] == ROUTING_GROUP and group["lr"] == 4.0 and group["weight_decay"] == 0.0
    assert scheduler.get_last_lr() == [4.0] and routing_group_lr([optimizer]) == 4.0
    optimizer.step()
    scheduler.step()
    assert group["lr"] == pytest.approx(2.0) and scheduler.get_last_lr() == pytest.approx([2.0])


def test_routing_param_groups_puts_routing_last_with_its_own_settings() -> None:
    model = GPT(tiny_config())
    assert [g.get("name") for g in routing_param_groups(model, routing_lr=1.0)] == [None]  # nothing routed yet
    from lit_dar import patch_model

    patch_model(model, DAR)
    base, routing = routing_param_groups(model, routing_lr=5e-3, lr=1e-3)
    assert base["lr"] == 1e-3 and "name" not in base
    assert routing == {"params": routing_parameters(model), "lr": 5e-3, "weight_decay": 0.0, "name": ROUTING_GROUP}
