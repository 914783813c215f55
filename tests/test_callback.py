"""DeltaAttnResCallback on one CPU process: patching, param groups, checkpoints, bad input.

The routing monitor it runs is tested in test_monitor.py, the param-group functions in test_param_groups.py.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from litgpt.model import GPT, Block
from test_distributed import Sequences, pattern_data, tiny_config

from lit_dar import DARConfig, get_dar_config, mark_only_routing_as_trainable, routing_parameters
from lit_dar.patch import find_router
from lit_dar.callback import DeltaAttnResCallback
from lit_dar.module import LitGPTModule, lr_factor
from lit_dar.monitor import RoutingMonitor
from lit_dar.param_groups import ROUTING_GROUP, routing_param_groups

DAR = DARConfig(mode="delta_block", num_blocks=2, gate="scalar")


def train_loader(n: int = 128, batch_size: int = 8):
    return torch.utils.data.DataLoader(Sequences(pattern_data(n, seed=0)), batch_size=batch_size, shuffle=True)


def make_trainer(tmp_path: Path, callbacks: list, max_steps: int = 6, logger=False, **kwargs) -> L.Trainer:
    kwargs = {
        "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "limit_val_batches": 0,
        "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
        "enable_checkpointing": False, "log_every_n_steps": 2, "default_root_dir": tmp_path, **kwargs,
    }
    return L.Trainer(callbacks=callbacks, logger=logger, **kwargs)


def lit_module(**kwargs) -> LitGPTModule:
    kwargs = {"learning_rate": 3e-3, "warmup_steps": 2, "max_steps": 20, "min_lr": 3e-4, **kwargs}
    return LitGPTModule(tiny_config(), **kwargs)


class EagerModule(L.LightningModule):
    """A foreign module: GPT built in ``__init__``, optimizer over ``self.parameters()``."""

    def __init__(self, n_gpts: int = 1, scheduler: str | None = None) -> None:
        super().__init__()
        self.model = GPT(tiny_config())
        self.teacher = GPT(tiny_config()) if n_gpts > 1 else None
        self.scheduler = scheduler

    def training_step(self, batch, batch_idx):
        logits = self.model(batch[:, :-1])
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        if self.scheduler == "cosine":
            return [optimizer], [torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)]
        if self.scheduler == "onecycle":
            return [optimizer], [torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)]
        return optimizer


# --------------------------------------------------------------------------------------------------
# Patching
# --------------------------------------------------------------------------------------------------


def test_patches_gpt_built_in_init_and_in_configure_model(tmp_path: Path) -> None:
    eager = EagerModule()
    make_trainer(tmp_path, [DeltaAttnResCallback(DAR)], max_steps=1).fit(eager, train_loader())
    assert get_dar_config(eager.model) == DAR and isinstance(eager.model, GPT)
    assert all(isinstance(b, Block) for b in eager.model.transformer.h)

    lazy = lit_module()  # builds its GPT in configure_model
    assert lazy.model is None
    make_trainer(tmp_path, [DeltaAttnResCallback(DAR)], max_steps=1).fit(lazy, train_loader())
    assert get_dar_config(lazy.model) == DAR


def test_a_second_fit_with_the_same_callback_keeps_the_patch(tmp_path: Path) -> None:
    module, callback = lit_module(), DeltaAttnResCallback(DAR)
    make_trainer(tmp_path, [callback], max_steps=1).fit(module, train_loader())
    router = find_router(module.model)
    make_trainer(tmp_path, [callback], max_steps=1).fit(module, train_loader())
    assert find_router(module.model) is router


@pytest.fixture
def process_group():
    """Tear down the (one-process, gloo) group that FSDP2 needs, whoever created it, and the environment
    variables Lightning sets for it (a leaked MASTER_PORT would be reused by later multi-process runs)."""
    import os

    import torch.distributed as dist

    environ = dict(os.environ)
    yield dist
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)


def fsdp2_trainer(tmp_path: Path, callbacks: list, max_steps: int = 2) -> L.Trainer:
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    return make_trainer(tmp_path, callbacks, max_steps=max_steps, strategy=strategy)


def test_patch_lands_before_fully_shard_in_configure_model(tmp_path: Path, process_group) -> None:
    """LitGPTModule builds on the meta device and shards in configure_model; the routing is sharded with it."""
    from torch.distributed.tensor import DTensor

    module = lit_module()
    fsdp2_trainer(tmp_path, [DeltaAttnResCallback(DAR)]).fit(module, train_loader())
    assert get_dar_config(module.model) == DAR
    routing = routing_parameters(module)
    assert len(routing) == 3 and all(isinstance(p, DTensor) for p in routing)
    assert torch.isfinite(routing[0].full_tensor()).all()  # materialised by reset_parameters


class ShardFirst(EagerModule):
    """Shards the GPT before the module (and so the callback) can see it."""

    def __init__(self) -> None:
        super().__init__()
        self.model = None

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        if self.model is None:
            gpt = GPT(tiny_config())
            fully_shard(gpt, mesh=self.device_mesh["data_parallel"])
            self.model = gpt


def test_sharded_before_the_callback_could_see_it_is_refused(tmp_path: Path, process_group) -> None:
    module = ShardFirst()
    with pytest.raises(ValueError, match="GPT at 'model': The model is already sharded.*Assign the GPT to the module before sharding"):
        fsdp2_trainer(tmp_path, [DeltaAttnResCallback(DAR)]).fit(module, train_loader())


def test_model_sharded_at_setup_is_refused_with_what_to_do(tmp_path: Path, process_group) -> None:
    from torch.distributed.fsdp import fully_shard

    process_group.init_process_group("gloo", store=process_group.HashStore(), rank=0, world_size=1)
    module = EagerModule()
    fully_shard(module.model)
    with pytest.raises(ValueError, match=r"at 'model': The model is already sharded by FSDP \(module '<root>'\)\. Routing parameters added .*lit_dar.patch_model\(gpt, callback.dar_config\)"):
        make_trainer(tmp_path, [DeltaAttnResCallback(DAR)], max_steps=1).fit(module, train_loader())
    assert find_router(module) is None


# --------------------------------------------------------------------------------------------------
# Param groups
# --------------------------------------------------------------------------------------------------


def test_routing_group_from_self_parameters_follows_the_lr_schedule(tmp_path: Path) -> None:
    """LitGPTModule builds AdamW from all parameters; the callback splits the group and extends LambdaLR."""
    seen: list[tuple[float, float]] = []

    class Spy(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            base, routing = trainer.optimizers[0].param_groups
            seen.append((base["lr"], routing["lr"]))

    module = lit_module(learning_rate=1e-3, warmup_steps=3, max_steps=8, min_lr=1e-4)
    callback = DeltaAttnResCallback(DAR, routing_lr=5e-2, routing_weight_decay=0.0)
    make_trainer(tmp_path, [callback, Spy()], max_steps=8).fit(module, train_loader())

    optimizer = module.trainer.optimizers[0]
    base, routing = optimizer.param_groups
    assert routing["name"] == ROUTING_GROUP and routing["weight_decay"] == 0.0 and base["weight_decay"] == 0.1
    assert {id(p) for p in routing["params"]} == {id(p) for p in routing_parameters(module)}
    assert not {id(p) for p in routing["params"]} & {id(p) for p in base["params"]}
    assert routing["betas"] == base["betas"]
    for step, (base_lr, routing_lr) in enumerate(seen):
        factor = lr_factor(step, 3, 8, 0.1)
        assert base_lr == pytest.approx(1e-3 * factor) and routing_lr == pytest.approx(5e-2 * factor)
    assert seen[3] == (pytest.approx(1e-3), pytest.approx(5e-2))  # peak after warmup


def test_explicit_routing_param_groups_are_kept_and_checked(tmp_path: Path) -> None:
    class Explicit(LitGPTModule):
        routing_lr = 5e-3

        def configure_optimizers(self):
            groups = routing_param_groups(self, routing_lr=self.routing_lr)
            return torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1)

    module = Explicit(tiny_config(), max_steps=5, warmup_steps=1)
    make_trainer(tmp_path, [DeltaAttnResCallback(DAR, routing_lr=5e-3)], max_steps=2).fit(module, train_loader())
    groups = module.trainer.optimizers[0].param_groups
    assert [g.get("name") for g in groups] == [None, ROUTING_GROUP] and groups[1]["lr"] == 5e-3

    module = Explicit(tiny_config(), max_steps=5, warmup_steps=1)
    with pytest.raises(ValueError, match="own group with lr=0.005.*routing_lr=0.01"):
        make_trainer(tmp_path, [DeltaAttnResCallback(DAR, routing_lr=1e-2)], max_steps=2).fit(module, train_loader())


def test_foreign_module_with_plain_sgd_gets_its_routing_group(tmp_path: Path) -> None:
    module = EagerModule(scheduler="cosine")
    make_trainer(tmp_path, [DeltaAttnResCallback(DAR, routing_lr=0.5)], max_steps=2).fit(module, train_loader())
    base, routing = module.trainer.optimizers[0].param_groups
    assert routing["momentum"] == 0.9 and routing["weight_decay"] == 0.0
    assert routing["lr"] / base["lr"] == pytest.approx(5.0)

    with pytest.raises(ValueError, match="OneCycleLR"):
        make_trainer(tmp_path, [DeltaAttnResCallback(DAR)], max_steps=2).fit(EagerModule(scheduler="onecycle"), train_loader())


def test_freeze_base_trains_routing_only(tmp_path: Path) -> None:
    module = lit_module()
    make_trainer(tmp_path, [DeltaAttnResCallback(DAR, freeze_base=True)], max_steps=1).fit(module, train_loader())
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"model.dar.query", "model.dar.key_gain", "model.dar.gate"}
    base_before = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    routing_before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    make_trainer(tmp_path, [DeltaAttnResCallback(DAR, freeze_base=True)], max_steps=4).fit(module, train_loader())
    assert all(torch.equal(p, base_before[n]) for n, p in module.named_parameters() if n in base_before)
    assert any(not torch.equal(p, routing_before[n]) for n, p in module.named_parameters() if n in routing_before)
    assert [g.get("name") for g in module.trainer.optimizers[0].param_groups] == [ROUTING_GROUP]


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def test_resume_restores_callback_state_and_routing_group(tmp_path: Path) -> None:
    monitor = RoutingMonitor(log_interval=1, image_interval=0, collapse_window=10)
    first = DeltaAttnResCallback(DAR, routing_lr=1e-12, monitor=monitor)
    trainer = make_trainer(tmp_path, [first], max_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(lit_module(max_steps=8), train_loader())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert checkpoint["dar_config"] == DAR.to_dict()
    assert checkpoint["callbacks"][first.state_key]["collapse_windows"] == {"dar": [True] * 4}

    # other logging settings, same DAR config: the state is found and restored
    monitor = RoutingMonitor(log_interval=1, image_interval=5, collapse_window=8)
    second = DeltaAttnResCallback(DAR, routing_lr=1e-12, monitor=monitor)
    module = lit_module(max_steps=8)
    trainer = make_trainer(tmp_path, [second], max_steps=8)
    with pytest.warns(UserWarning, match="collapsed"):  # 4 restored + 4 new uniform steps fill the window of 8
        trainer.fit(module, train_loader(), ckpt_path=tmp_path / "a.ckpt")
    assert len(second.monitor._windows["dar"]) == 8 and trainer.global_step == 8
    base, routing = trainer.optimizers[0].param_groups
    assert routing["name"] == ROUTING_GROUP and routing["initial_lr"] == 1e-12
    assert len(trainer.optimizers[0].state[routing["params"][0]]) > 0  # Adam state restored into the routing group


def test_checkpoint_with_another_dar_config_is_refused(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, [DeltaAttnResCallback(DAR)], max_steps=1)
    trainer.fit(lit_module(), train_loader())
    trainer.save_checkpoint(tmp_path / "a.ckpt")

    other = DARConfig(mode="delta_block", num_blocks=4, gate="scalar")
    with pytest.raises(ValueError, match="trained with DAR config .*num_blocks=2.*this run's model has.*num_blocks=4"):
        make_trainer(tmp_path, [DeltaAttnResCallback(other)], max_steps=2).fit(
            lit_module(), train_loader(), ckpt_path=tmp_path / "a.ckpt"
        )
    state = torch.load(tmp_path / "a.ckpt", weights_only=True)["callbacks"][DeltaAttnResCallback(DAR).state_key]
    with pytest.raises(ValueError, match="trained with .*num_blocks=2.*has .*num_blocks=4"):
        DeltaAttnResCallback(other).load_state_dict(state)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


class NoGPT(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def training_step(self, batch, batch_idx):
        return self.layer(batch.float()[:, :4]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NoGPTLazy(NoGPT):
    def configure_model(self):
        self.other = nn.Linear(4, 4)


@pytest.mark.parametrize("module_cls", [NoGPT, NoGPTLazy])
def test_module_without_gpt_is_refused(tmp_path: Path, module_cls) -> None:
    module = module_cls()
    with pytest.raises(ValueError, match=f"found no litgpt.GPT in {module_cls.__name__}: it looks for `litgpt.model.GPT`"):
        make_trainer(tmp_path, [DeltaAttnResCallback(DAR)], max_steps=1).fit(module, train_loader())
    assert not any(isinstance(m, nn.Module) and hasattr(m, "dar") for m in module.modules())


def test_freeze_base_without_routing_parameters_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"found no litgpt.GPT in NoGPT \(freeze_base=True needs routing parameters"):
        make_trainer(tmp_path, [DeltaAttnResCallback(DAR, freeze_base=True)], max_steps=1).fit(NoGPT(), train_loader())
    with pytest.raises(ValueError, match="no routing parameters: call lit_dar.patch_model first"):
        mark_only_routing_as_trainable(GPT(tiny_config()))

    module = EagerModule()
    module.model.requires_grad_(False)

    class FreezeRouting(Callback):
        def setup(self, trainer, pl_module, stage):
            pl_module.model.dar.requires_grad_(False)

    with pytest.raises(ValueError, match="freeze_base=True .* no trainable routing parameters"):
        make_trainer(tmp_path, [DeltaAttnResCallback(DAR, freeze_base=True), FreezeRouting()], max_steps=1).fit(
            module, train_loader()
        )


def test_two_dar_callbacks_are_refused(tmp_path: Path) -> None:
    module = EagerModule()
    callbacks = [DeltaAttnResCallback(DAR), DeltaAttnResCallback(DARConfig(mode="delta"))]
    with pytest.raises(ValueError, match="2 DeltaAttnResCallbacks; a model can be patched only once"):
        make_trainer(tmp_path, callbacks, max_steps=1).fit(module, train_loader())
    assert get_dar_config(module.model) is None
    # two with the same config do not even make a Trainer (Lightning: state keys must be unique)
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `DeltaAttnResCallback`"):
        make_trainer(tmp_path, [DeltaAttnResCallback(DAR), DeltaAttnResCallback(DAR)])


@pytest.mark.parametrize("lr", [0, -1e-3, math.nan, math.inf])
def test_non_positive_routing_lr_is_refused(lr: float) -> None:
    with pytest.raises(ValueError, match="routing_lr=.* must be a positive number"):
        DeltaAttnResCallback(DAR, routing_lr=lr)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"routing_weight_decay": -0.1}, "routing_weight_decay"),
    ],
)
def test_other_bad_options_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DeltaAttnResCallback(DAR, **kwargs)
    with pytest.raises(TypeError, match="monitor must be a lit_dar.RoutingMonitor or a bool, got dict"):
        DeltaAttnResCallback(DAR, monitor={"log_interval": 2})


def test_nothing_half_patched_when_one_gpt_cannot_be_patched(tmp_path: Path) -> None:
    module = EagerModule(n_gpts=2)
    from lit_dar import patch_model

    patch_model(module.teacher, DARConfig(mode="delta"))  # patched with another config
    with pytest.raises(ValueError, match="'teacher' is already patched with .*mode='delta'"):
        make_trainer(tmp_path, [DeltaAttnResCallback(DAR)], max_steps=1).fit(module, train_loader())
    assert get_dar_config(module.model) is None  # the first GPT was left alone

    module = EagerModule(n_gpts=2)
    with pytest.raises(ValueError, match="num_blocks=3"):
        make_trainer(tmp_path, [DeltaAttnResCallback(DARConfig(num_blocks=3))], max_steps=1).fit(module, train_loader())
    assert get_dar_config(module.model) is None and get_dar_config(module.teacher) is None
