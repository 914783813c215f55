"""LitGPTModule, its metric and checkpoint helpers, on one CPU process."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from litgpt.model import GPT
from litgpt.pretrain import get_lr
from test_distributed import Sequences, pattern_data, tiny_config, val_loader

import lit_dar
from lit_dar import DARConfig, DeltaAttnResCallback, get_dar_config, routing_parameters
from lit_dar.metrics import TokenNLL, token_losses
from lit_dar.module import (
    LitGPTModule,
    convert_lightning_checkpoint,
    load_lightning_checkpoint,
    lr_factor,
    split_batch,
    throughput_monitor,
)


def trainer(tmp_path: Path, max_steps: int, callbacks=(), logger=False, **kwargs) -> L.Trainer:
    kwargs = {
        "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "num_sanity_val_steps": 0,
        "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False,
        "default_root_dir": tmp_path, "log_every_n_steps": 1, **kwargs,
    }
    return L.Trainer(callbacks=list(callbacks), logger=logger, **kwargs)


def train_loader(batch_size: int = 8):
    return torch.utils.data.DataLoader(Sequences(pattern_data(256, seed=0)), batch_size=batch_size, shuffle=True)


# --------------------------------------------------------------------------------------------------
# Batches, metric, schedule
# --------------------------------------------------------------------------------------------------


def test_split_batch_pretraining_and_sft_conventions() -> None:
    ids = torch.arange(10).view(2, 5)
    inputs, targets = split_batch(ids)
    assert inputs.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]] and targets.tolist() == [[1, 2, 3, 4], [6, 7, 8, 9]]
    labels = ids.clone()
    labels[:, :2] = -100  # the prompt is not scored
    inputs, targets = split_batch({"input_ids": ids, "labels": labels})
    assert inputs.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]] and targets.tolist() == [[-100, 2, 3, 4], [-100, 7, 8, 9]]


def test_token_nll_is_exact_token_weighted_and_batching_independent() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 7, 50) * 4
    targets = torch.randint(0, 50, (6, 7))
    targets[0, :5] = -100
    targets[3, :] = -100
    keep = targets != -100
    reference = F.cross_entropy(logits.double()[keep], targets[keep])  # fp64 mean over counted tokens

    whole = TokenNLL()
    whole.update(logits, targets)
    split = TokenNLL(chunk_rows=5)  # small chunks, uneven batches
    split.update(logits[:1], targets[:1])
    split.update(logits[1:], targets[1:])
    for metric in (whole, split):
        assert metric.compute().dtype == torch.float64
        torch.testing.assert_close(metric.compute(), reference, rtol=1e-6, atol=0)
    # the mean of per-batch means would weight the 2-token batch like the 35-token one
    batch_means = (token_losses(logits[:1], targets[:1]).mean() + token_losses(logits[1:], targets[1:]).mean()) / 2
    assert not math.isclose(float(batch_means), float(reference), rel_tol=1e-3)


def test_token_nll_on_bf16_logits_is_exact_for_those_logits() -> None:
    """fp32 inside: no second B·T·V softmax, no bf16 rounding of the loss (Perplexity is ~0.5 % off here)."""
    torch.manual_seed(0)
    logits = (torch.randn(4, 16, 1000) * 3).bfloat16()
    targets = torch.randint(0, 1000, (4, 16))
    metric = TokenNLL()
    metric.update(logits, targets)
    reference = F.cross_entropy(logits.double().flatten(0, 1), targets.flatten())
    assert abs(float(metric.compute().exp() / reference.exp()) - 1) < 1e-6


def test_token_nll_survives_meta_device_materialisation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sharded strategies materialise the module with ``to_empty()``, which torchmetrics applies to the metric's
    states and defaults: uninitialised memory, here made visible by filling every "empty" tensor with 7.
    Under FSDP2 this logged a perplexity of 1.0 or inf in about one validation in six."""
    from lightning.fabric.utilities.init import _materialize_distributed_module

    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kwargs: empty_like(t, **kwargs).fill_(7))
    module = LitGPTModule(tiny_config())
    with torch.device("meta"):
        module.model = GPT(tiny_config())
    _materialize_distributed_module(module, torch.device("cpu"))
    assert module.val_nll.weight == 0 and module.val_nll.mean_value == 0

    logits, targets = torch.randn(2, 5, 128), torch.randint(0, 128, (2, 5))
    for _ in range(2):  # the first epoch, and after a reset (which restores the defaults)
        module.val_nll.update(logits, targets)
        torch.testing.assert_close(module.val_nll.compute(), F.cross_entropy(logits.double().flatten(0, 1), targets.flatten()))
        module.val_nll.reset()


def test_lr_schedule_is_litgpts_get_lr() -> None:
    for step in [0, 1, 9, 10, 11, 50, 99, 100, 150]:
        assert lr_factor(step, 10, 100, 0.1) * 4e-4 == pytest.approx(get_lr(4e-4, step, 10, 100, 4e-5))
    assert lr_factor(0, 10, 100, 0.1) == 0 and lr_factor(10, 10, 100, 0.1) == 1


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def test_baseline_trains_without_the_callback_and_logs(tmp_path: Path) -> None:
    module = LitGPTModule(tiny_config(), learning_rate=3e-3, warmup_steps=2, max_steps=20, min_lr=3e-4)
    logger = CSVLogger(tmp_path, name="csv", version=0)
    fit = trainer(tmp_path, 20, [throughput_monitor(window_size=2)], logger=logger, val_check_interval=20,
                  check_val_every_n_epoch=None)
    fit.fit(module, train_loader(), val_loader())
    assert not routing_parameters(module) and get_dar_config(module.model) is None
    assert len(fit.optimizers[0].param_groups) == 1

    rows = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))
    column = lambda key: [float(r[key]) for r in rows if r.get(key)]  # noqa: E731
    losses = column("train_loss")
    assert len(losses) == 20 and sum(losses[-4:]) < 0.75 * sum(losses[:4])
    assert column("lr")[:3] == pytest.approx([0.0, 1.5e-3, 3e-3])
    assert len(column("train/device/items_per_sec")) > 10  # tokens/s from ThroughputMonitor
    assert column("train/device/flops_per_sec")  # MFU needs a known peak: GPUs only
    (val_loss,), (val_ppl,) = column("val_loss"), column("val_ppl")
    assert val_ppl == pytest.approx(math.exp(val_loss), rel=1e-6)


def test_sft_dict_batches_score_only_labelled_tokens(tmp_path: Path) -> None:
    ids = pattern_data(16, seed=4)
    labels = ids.clone()
    labels[:, :20] = -100

    class SFT(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": labels[i]}

    module = LitGPTModule(tiny_config(), warmup_steps=1, max_steps=2)
    loader = torch.utils.data.DataLoader(SFT(), batch_size=8)
    trainer(tmp_path, 2).fit(module, loader, loader)
    reference = TokenNLL()
    with torch.no_grad():
        reference.update(module.model(ids[:, :-1]), labels[:, 1:])
    assert float(module.trainer.callback_metrics["val_loss"]) == pytest.approx(float(reference.compute()), rel=1e-6)


@pytest.mark.slow
def test_compiled_training_matches_eager_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    """``compile=True`` compiles the patched GPT in place: the same losses as eager (routing then runs the
    plain math), the plain GPT's parameter names, and a checkpoint that rebuilds the model."""
    losses, modules = {}, {}
    for compiled in (False, True):
        torch.manual_seed(0)
        module = LitGPTModule(tiny_config(), learning_rate=3e-3, warmup_steps=1, max_steps=4, compile=compiled)
        logger = CSVLogger(tmp_path, name=f"compile_{compiled}", version=0)
        fit = trainer(tmp_path, 4, [DeltaAttnResCallback(DARConfig(mode="delta", gate="scalar"))], logger=logger)
        loader = torch.utils.data.DataLoader(Sequences(pattern_data(64, seed=0)), batch_size=8)
        fit.fit(module, loader)
        rows = csv.DictReader((tmp_path / f"compile_{compiled}" / "version_0" / "metrics.csv").open())
        losses[compiled] = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
        modules[compiled] = module
    assert len(losses[True]) == 4 and losses[True] != losses[True][:1] * 4
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    model = modules[True].model
    assert model._compiled_call_impl is not None and modules[False].model._compiled_call_impl is None
    assert model.state_dict().keys() == modules[False].model.state_dict().keys()
    modules[True].trainer.save_checkpoint(tmp_path / "compiled.ckpt")
    probe = pattern_data(2, seed=5)[:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(load_lightning_checkpoint(tmp_path / "compiled.ckpt")(probe), model(probe))


def test_bad_schedule_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="warmup_steps < max_steps"):
        trainer(tmp_path, 2).fit(LitGPTModule(tiny_config(), warmup_steps=5, max_steps=5), train_loader())
    with pytest.raises(ValueError, match="min_lr"):
        LitGPTModule(tiny_config(), learning_rate=1e-4, min_lr=1e-3)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def test_fine_tune_from_plain_litgpt_checkpoint_starts_at_the_plain_model(tmp_path: Path) -> None:
    """A zero scalar gate makes the freshly patched model compute exactly the pretrained one."""
    torch.manual_seed(0)
    pretrained = GPT(tiny_config())
    lit_dar.save_checkpoint(pretrained, tmp_path / "base")
    probe = pattern_data(2, seed=5)[:, :-1]
    with torch.no_grad():
        expected = pretrained(probe)

    module = LitGPTModule(tiny_config(), warmup_steps=1, max_steps=5, initial_checkpoint_dir=str(tmp_path / "base"))
    callback = DeltaAttnResCallback(DARConfig(mode="delta", gate="scalar"))
    with pytest.warns(UserWarning, match="keep their initialisation"):
        trainer(tmp_path, 1, [callback]).fit(module, train_loader())  # step 0 has LR 0 (warmup)
    with torch.no_grad():
        assert torch.equal(module.model(probe), expected)


def test_lightning_checkpoint_rebuilds_the_model_alone(tmp_path: Path) -> None:
    module = LitGPTModule(tiny_config(), warmup_steps=1, max_steps=5)
    fit = trainer(tmp_path, 3, [DeltaAttnResCallback(DARConfig(mode="attnres_block", num_blocks=2))])
    fit.fit(module, train_loader())
    fit.save_checkpoint(tmp_path / "run.ckpt")
    probe = pattern_data(2, seed=5)[:, :-1]
    with torch.no_grad():
        expected = module.model(probe)

    model = load_lightning_checkpoint(tmp_path / "run.ckpt")
    assert get_dar_config(model) == DARConfig(mode="attnres_block", num_blocks=2)
    with torch.no_grad():
        assert torch.equal(model(probe), expected)

    out = convert_lightning_checkpoint(tmp_path / "run.ckpt", tmp_path / "litgpt")
    assert {p.name for p in out.parent.iterdir()} >= {"lit_model.pth", "model_config.yaml", "dar_config.yaml"}
    with torch.no_grad():
        assert torch.equal(lit_dar.load_model(tmp_path / "litgpt")(probe), expected)


def test_resuming_a_dar_checkpoint_without_the_callback_is_refused(tmp_path: Path) -> None:
    fit = trainer(tmp_path, 1, [DeltaAttnResCallback(DARConfig(num_blocks=2))])
    fit.fit(LitGPTModule(tiny_config(), warmup_steps=1, max_steps=5), train_loader())
    fit.save_checkpoint(tmp_path / "dar.ckpt")
    with pytest.raises(ValueError, match="trained with DAR config DARConfig.*this run's model has None"):
        trainer(tmp_path, 2).fit(LitGPTModule(tiny_config(), warmup_steps=1, max_steps=5), train_loader(),
                                 ckpt_path=tmp_path / "dar.ckpt")
