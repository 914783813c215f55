"""Real multi-process training on CPU (gloo): DDP and FSDP2 (``ModelParallelStrategy``), two processes each.

Lightning's DDP and ModelParallel launchers start the other ranks by re-running the main script, so
each run is this file executed as a script (``python tests/test_distributed.py STRATEGY OUT``) in a
subprocess; the worker leaves its checkpoint, probe logits and a JSON of measurements in OUT, and the
test checks them against a fresh single-process model.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DAR = {"mode": "delta_block", "num_blocks": 2, "gate": "scalar", "null_source": False, "eps": 1e-6}
STEPS = 30


def tiny_config():
    from litgpt import Config

    return Config(
        name="tiny-llama", n_layer=4, n_embd=64, n_head=4, head_size=16, n_query_groups=4, vocab_size=128,
        padded_vocab_size=128, block_size=32, intermediate_size=128, parallel_residual=False, bias=False,
        norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", rotary_percentage=1.0,
    )


def pattern_data(n: int, seed: int, length: int = 33) -> torch.Tensor:
    """Arithmetic sequences mod the vocabulary: learnable in a few dozen steps, so the loss visibly drops."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 128, (n, 1), generator=g)
    stride = torch.randint(1, 5, (n, 1), generator=g)
    return (start + stride * torch.arange(length)) % 128


class Sequences(torch.utils.data.Dataset):
    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


def val_loader(batch_size: int = 8):
    return torch.utils.data.DataLoader(Sequences(pattern_data(64, seed=1)), batch_size=batch_size)


PROBE = pattern_data(2, seed=2)[:, :-1]


# --------------------------------------------------------------------------------------------------
# The worker (runs in every rank)
# --------------------------------------------------------------------------------------------------


def worker(strategy_name: str, out: Path) -> None:
    import lightning as L
    import torch.distributed as dist
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor import DTensor

    from lit_dar import DARConfig, DeltaAttnResCallback, RoutingMonitor, routing_parameters
    from lit_dar.module import LitGPTModule

    class Probe(Callback):
        """Measures on every rank what the test checks: losses, routing gradients, cross-rank consistency."""

        def __init__(self) -> None:
            self.losses: list[float] = []
            self.grad_norms: list[float] = []
            self.grads_in_sync = True
            self.result: dict = {}

        def on_train_start(self, trainer, pl_module):
            self.result["groups"] = [
                {"name": g.get("name"), "lr": g["lr"], "weight_decay": g["weight_decay"], "n": len(g["params"])}
                for g in trainer.optimizers[0].param_groups
            ]
            self.result["routing_params"] = {  # before any forward: what the strategy made of them
                n: {"type": type(p).__name__, "placements": str(getattr(p, "placements", "")),
                    "local_shape": list((p.to_local() if isinstance(p, DTensor) else p).shape)}
                for n, p in pl_module.named_parameters() if n.startswith("model.dar.")
            }

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            norm_sq = 0.0
            for p in routing_parameters(pl_module):
                g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                norm_sq += float(g.norm() ** 2)
                self.grads_in_sync &= _same_on_all_ranks(g)
            self.grad_norms.append(math.sqrt(norm_sq))

        def on_train_end(self, trainer, pl_module):
            # The optimizer holds the parameters as the strategy keeps them (DTensor shards under FSDP2).
            routing = next(g for g in trainer.optimizers[0].param_groups if g.get("name") == "dar_routing")
            self.result["routing_in_sync"] = [
                _same_on_all_ranks(p.full_tensor() if isinstance(p, DTensor) else p) for p in routing["params"]
            ]

    def _same_on_all_ranks(t: torch.Tensor) -> bool:
        ref = t.detach().clone()
        dist.broadcast(ref, src=0)
        return bool(torch.equal(ref, t.detach()))

    L.seed_everything(0)
    strategy_name, compiled = strategy_name.removesuffix("-compile"), strategy_name.endswith("-compile")
    if strategy_name == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = "ddp"
    module = LitGPTModule(tiny_config(), learning_rate=3e-3, weight_decay=0.1, warmup_steps=3, max_steps=STEPS, min_lr=3e-4,
                          compile=compiled)
    monitor = RoutingMonitor(log_interval=5, image_interval=10)
    dar = DeltaAttnResCallback(DARConfig(**DAR), routing_lr=3e-2, monitor=monitor)
    probe = Probe()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=STEPS, val_check_interval=STEPS,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, log_every_n_steps=5, callbacks=[dar, probe],
        logger=TensorBoardLogger(out, name="tb", version=0), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    )
    train = torch.utils.data.DataLoader(Sequences(pattern_data(512, seed=0)), batch_size=8, shuffle=True)
    trainer.fit(module, train, val_loader())
    trainer.save_checkpoint(out / "final.ckpt")
    with torch.no_grad():
        logits = module.model(PROBE)  # every rank: FSDP2 all-gathers inside
    if trainer.is_global_zero:
        torch.save(logits, out / "logits.pt")
        probe.result.update(
            losses=probe.losses, grad_norms=probe.grad_norms, grads_in_sync=probe.grads_in_sync,
            val_ppl=float(trainer.callback_metrics["val_ppl"]), val_loss=float(trainer.callback_metrics["val_loss"]),
            dar_metrics=dar.monitor.last_metrics, world_size=trainer.world_size,
            compiled=module.model._compiled_call_impl is not None,
        )
        (out / "result.json").write_text(json.dumps(probe.result, indent=1))


# --------------------------------------------------------------------------------------------------
# The tests (the parent process)
# --------------------------------------------------------------------------------------------------


_DIST_ENV = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"}


def launch(strategy: str, out: Path, timeout: float = 300) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}  # the launcher picks its own port
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), strategy, str(out)],
        cwd=out, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"{strategy} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """Each strategy runs once (lazily) and is shared by the tests that inspect it."""
    cache: dict[str, tuple[dict, Path]] = {}

    def get(strategy: str) -> tuple[dict, Path]:
        if strategy not in cache:
            out = tmp_path_factory.mktemp(strategy)
            cache[strategy] = launch(strategy, out), out
        return cache[strategy]

    return get


def single_process_perplexity(model) -> float:
    from lit_dar.metrics import TokenNLL
    from lit_dar.module import split_batch

    nll = TokenNLL(sync_on_compute=False)  # a single-process reference, also while a run's process group is up
    with torch.no_grad():
        for batch in val_loader(batch_size=16):  # other batching than the run: the metric is token-weighted
            inputs, targets = split_batch(batch)
            nll.update(model(inputs), targets)
    return float(nll.compute().exp())


def two_processes(test):
    return pytest.mark.slow(pytest.mark.multiprocess(test))


@two_processes
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_train_loss_goes_down(runs, strategy: str) -> None:
    result, _ = runs(strategy)
    assert result["world_size"] == 2
    losses = result["losses"]
    assert len(losses) == STEPS
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses


@two_processes
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_routing_gets_gradients_and_stays_consistent(runs, strategy: str) -> None:
    result, _ = runs(strategy)
    groups = {g["name"]: g for g in result["groups"]}
    assert set(groups) == {None, "dar_routing"}
    assert groups["dar_routing"]["weight_decay"] == 0.0 and groups["dar_routing"]["n"] == 3  # query, key_gain, gate
    assert groups[None]["weight_decay"] == 0.1
    assert all(n > 0 for n in result["grad_norms"]), result["grad_norms"]
    assert result["grads_in_sync"]  # gradients all-reduced (DDP) / gathered shards equal (FSDP2)
    assert all(result["routing_in_sync"])
    for name, info in result["routing_params"].items():
        if strategy == "fsdp2":  # properly sharded: a DTensor split along dim 0 over the two ranks
            assert info["type"] == "DTensor" and "Shard(dim=0)" in info["placements"], (name, info)
            assert info["local_shape"][0] == 4, (name, info)  # 8 routed points / 2 ranks
        else:  # replicated
            assert info["type"] == "Parameter" and info["local_shape"][0] == 8, (name, info)
    assert 0.5 < result["dar_metrics"]["dar/sharpness"] <= 1.0


@two_processes
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_checkpoint_reloads_single_process(runs, strategy: str) -> None:
    from lit_dar import DARConfig, get_dar_config
    from lit_dar.module import load_lightning_checkpoint

    result, out = runs(strategy)
    checkpoint = out / "final.ckpt"
    assert checkpoint.is_dir() if strategy == "fsdp2" else checkpoint.is_file()  # DCP shards vs. one file
    model = load_lightning_checkpoint(checkpoint)
    assert get_dar_config(model) == DARConfig(**DAR)
    with torch.no_grad():
        logits = model(PROBE)
    assert torch.equal(logits, torch.load(out / "logits.pt"))


@two_processes
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_perplexity_equals_single_process(runs, strategy: str) -> None:
    from lit_dar.module import load_lightning_checkpoint

    result, out = runs(strategy)
    ppl = single_process_perplexity(load_lightning_checkpoint(out / "final.ckpt"))
    assert abs(result["val_ppl"] - ppl) / ppl <= 1e-5, (result["val_ppl"], ppl)


@two_processes
def test_compiled_fsdp2_run_matches_the_eager_one(runs) -> None:
    """``compile=True`` under FSDP2 (the GPT compiled in place after ``fully_shard``): the same training as
    eager, and the routing parameters still in sync across ranks."""
    eager, _ = runs("fsdp2")
    compiled, _ = runs("fsdp2-compile")
    assert compiled["compiled"] and not eager["compiled"]
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-3)
    assert compiled["val_ppl"] == pytest.approx(eager["val_ppl"], rel=1e-3)
    assert compiled["grads_in_sync"] and all(compiled["routing_in_sync"])


@two_processes
def test_fsdp2_run_logs_routing_to_tensorboard(runs) -> None:
    """Rank 0 wrote the routing scalars and heatmap (gates read from the sharded router)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = runs("fsdp2")
    events = EventAccumulator(str(out / "tb" / "version_0"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"dar/sharpness", "dar/gate/0.attn", "dar/max_weight/3.mlp", "dar/collapsed", "val_ppl"} <= scalars
    assert [e.step for e in events.Scalars("dar/sharpness")] == [4, 9, 14, 19, 24, 29]
    assert [e.step for e in events.Images("dar/routing")] == [9, 19, 29]


# --------------------------------------------------------------------------------------------------
# Lightning's FSDPStrategy (FSDP1): CUDA only
# --------------------------------------------------------------------------------------------------


def fsdp1_strategy():
    """The FSDP1 configuration the docs recommend: one FSDP unit and one checkpointed region per Block
    (patched blocks stay ``Block`` instances), original parameters kept (so the routing parameters keep
    their names and get their own param group), and a full, single-file state dict."""
    from lightning.pytorch.strategies import FSDPStrategy
    from litgpt.model import Block

    return FSDPStrategy(
        auto_wrap_policy={Block}, activation_checkpointing_policy={Block}, state_dict_type="full",
        use_orig_params=True,
    )


def test_fsdp1_refuses_the_cpu() -> None:
    import lightning as L

    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        L.Trainer(accelerator="cpu", devices=1, strategy=fsdp1_strategy())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDPStrategy needs CUDA")
def test_fsdp1_on_gpu_trains_and_checkpoints(tmp_path: Path) -> None:
    import lightning as L

    from lit_dar import DARConfig, DeltaAttnResCallback, RoutingMonitor, get_dar_config
    from lit_dar.module import LitGPTModule, load_lightning_checkpoint

    L.seed_everything(0)
    module = LitGPTModule(tiny_config(), learning_rate=3e-3, warmup_steps=3, max_steps=STEPS, min_lr=3e-4)
    monitor = RoutingMonitor(log_interval=5, image_interval=10)
    dar = DeltaAttnResCallback(DARConfig(**DAR), routing_lr=3e-2, monitor=monitor)
    trainer = L.Trainer(
        accelerator="cuda", devices=1, strategy=fsdp1_strategy(), max_steps=STEPS, val_check_interval=STEPS,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, callbacks=[dar], logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    train = torch.utils.data.DataLoader(Sequences(pattern_data(512, seed=0)), batch_size=8, shuffle=True)
    trainer.fit(module, train, val_loader())
    groups = trainer.optimizers[0].param_groups
    assert [g.get("name") for g in groups] == [None, "dar_routing"] and len(groups[1]["params"]) == 3
    assert "dar/gate/0.attn" in dar.monitor.last_metrics and dar.monitor.last_metrics["dar/sharpness"] > 0.5

    trainer.save_checkpoint(tmp_path / "fsdp1.ckpt")
    assert (tmp_path / "fsdp1.ckpt").is_file()  # full state dict: one file
    model = load_lightning_checkpoint(tmp_path / "fsdp1.ckpt")
    assert get_dar_config(model) == DARConfig(**DAR)
    # CPU reference against the run's CUDA validation: kernels differ, so a looser bound than on CPU
    ppl = single_process_perplexity(model)
    assert abs(float(trainer.callback_metrics["val_ppl"]) - ppl) / ppl <= 1e-4


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
