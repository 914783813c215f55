"""Checks before a run writes anything: arguments, optimizer values, checkpoints."""

from __future__ import annotations

from dataclasses import replace

import pytest
from litgpt.args import EvalArgs, TrainArgs

from lit_dar.preflight import check_eval_args, check_train_args, optimizer_args
from lit_dar.usage import UsageError

TRAIN = TrainArgs(global_batch_size=16, micro_batch_size=4, max_steps=10, lr_warmup_steps=1)


@pytest.mark.parametrize(
    ("change", "world", "expected"),
    [
        ({"max_steps": -5}, 1, "train.max_steps=-5 must be a positive integer"),
        ({"micro_batch_size": 0}, 1, "train.micro_batch_size=0 must be a positive integer"),
        ({"global_batch_size": 10, "micro_batch_size": 16}, 1, "set it to a multiple of 16"),
        ({"global_batch_size": 12}, 2, "micro_batch_size × processes = 4 × 2"),
        ({"max_seq_length": 0}, 1, "train.max_seq_length=0"),
        ({"max_steps": None}, 1, "Set train.max_steps or train.max_tokens"),
        ({"max_time": -1.0}, 1, "train.max_time=-1.0"),
        ({"log_interval": 0}, 1, "train.log_interval=0"),
        ({"save_interval": 0}, 1, "train.save_interval=0"),
        ({"lr_warmup_steps": -1}, 1, "train.lr_warmup_steps=-1"),
        ({"max_norm": 0.0}, 1, "train.max_norm=0.0"),
        ({"min_lr": -1e-4}, 1, "train.min_lr=-0.0001"),
        ({"epochs": 2}, 1, "train.epochs=2 is not supported"),
        ({"lr_warmup_steps": None, "lr_warmup_fraction": 0.1}, 1, "set train.lr_warmup_steps instead"),
        ({"tie_embeddings": True}, 1, "train.tie_embeddings=True is not supported"),
    ],
)
def test_train_args_refused(change: dict, world: int, expected: str) -> None:
    with pytest.raises(UsageError) as err:
        check_train_args(replace(TRAIN, **change), world)
    assert expected in str(err.value)


def test_train_args_accepted() -> None:
    check_train_args(TRAIN, 1)
    check_train_args(replace(TRAIN, max_steps=None, max_tokens=1000, max_time=5.0, max_norm=None), 4)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"interval": 0}, "eval.interval=0"),
        ({"max_iters": 0}, "eval.max_iters=0"),
        ({"max_new_tokens": 5}, "lit-dar generate"),
        ({"evaluate_example": 3}, "lit-dar generate"),
    ],
)
def test_eval_args_refused(change: dict, expected: str) -> None:
    with pytest.raises(UsageError) as err:
        check_eval_args(replace(EvalArgs(), **change))
    assert expected in str(err.value)
    check_eval_args(EvalArgs(initial_validation=True, final_validation=False))


@pytest.mark.parametrize(
    "optimizer",
    [
        {"lr": "0.05"},  # `--optimizer.lr 0.05` and `--optimizer.init_args.lr 0.05` both parse to this
        {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.05}},
        {"class_path": "AdamW", "init_args": {"lr": "5e-2"}},
    ],
)
def test_optimizer_lr_takes_effect(optimizer: dict) -> None:
    args = optimizer_args(optimizer)
    assert args["lr"] == 0.05 and args["weight_decay"] == 0.1 and args["betas"] == (0.9, 0.95)


@pytest.mark.parametrize(
    ("optimizer", "expected"),
    [
        ("SGD", "lit-dar trains with AdamW"),
        ({"class_path": "torch.optim.SGD"}, "torch.optim.AdamW"),
        ({"momentum": 0.9}, "['momentum'] are not supported"),
        ({"lr": "fast"}, "optimizer.lr='fast' is not a number"),
        ({"lr": -1}, "optimizer.lr=-1.0 must be a positive number"),
        ({"weight_decay": -0.1}, "optimizer.weight_decay=-0.1"),
        ({"betas": [0.9, 1.5]}, "optimizer.betas"),
    ],
)
def test_optimizer_refused(optimizer, expected: str) -> None:
    with pytest.raises(UsageError) as err:
        optimizer_args(optimizer)
    assert expected in str(err.value) and "min_lr" not in str(err.value)
