"""Checks of a run's request that happen before anything is written: arguments, checkpoints, data.

Every check raises :class:`~lit_dar.usage.UsageError` (or a ``ValueError`` of the library) with one
line that names what is wrong and how to fix it, so a refused run leaves its ``out_dir`` untouched and
the corrected command can run in the same place.
"""

from __future__ import annotations

import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from litgpt import Config
from litgpt.args import EvalArgs, TrainArgs

from lit_dar.config import DARConfig
from lit_dar.module import read_lightning_checkpoint
from lit_dar.usage import UsageError

ADAMW_DEFAULTS: dict[str, Any] = {"lr": 3e-3, "weight_decay": 0.1, "betas": (0.9, 0.95)}


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        none = " or null" if allow_none else ""
        raise UsageError(f"{name}={value!r} must be a positive integer{none}.")


def check_train_args(train: TrainArgs, world_size: int) -> None:
    """Refuse impossible values and the ``TrainArgs`` fields lit-dar does not implement.

    Raises:
        UsageError: naming the field and the fix.
    """
    _positive_int("train.micro_batch_size", train.micro_batch_size)
    _positive_int("train.global_batch_size", train.global_batch_size)
    _positive_int("train.log_interval", train.log_interval)
    _positive_int("train.save_interval", train.save_interval, allow_none=True)
    _positive_int("train.max_seq_length", train.max_seq_length, allow_none=True)
    _positive_int("train.max_steps", train.max_steps, allow_none=True)
    _positive_int("train.max_tokens", train.max_tokens, allow_none=True)
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise UsageError(
            f"train.global_batch_size={train.global_batch_size} is not a multiple of train.micro_batch_size × "
            f"processes = {train.micro_batch_size} × {world_size}: set it to a multiple of {per_step}."
        )
    if train.max_steps is None and train.max_tokens is None:
        raise UsageError("Set train.max_steps or train.max_tokens: lit-dar pretraining streams endlessly.")
    if train.lr_warmup_steps is not None and (isinstance(train.lr_warmup_steps, bool) or train.lr_warmup_steps < 0):
        raise UsageError(f"train.lr_warmup_steps={train.lr_warmup_steps!r} must be an integer ≥ 0.")
    if train.max_time is not None and not (_number(train.max_time) and train.max_time > 0):
        raise UsageError(f"train.max_time={train.max_time!r} must be a positive number of seconds or null.")
    if train.max_norm is not None and not (_number(train.max_norm) and train.max_norm > 0):
        raise UsageError(f"train.max_norm={train.max_norm!r} must be a positive number, or null for no clipping.")
    if not (_number(train.min_lr) and train.min_lr >= 0):
        raise UsageError(f"train.min_lr={train.min_lr!r} must be a number ≥ 0.")
    unsupported = {
        "lr_warmup_fraction": "set train.lr_warmup_steps instead",
        "epochs": "lit-dar counts optimizer steps: set train.max_steps or train.max_tokens instead",
        "tie_embeddings": "lit-dar keeps the model's own head: leave it unset",
    }
    for name, fix in unsupported.items():
        if getattr(train, name):
            raise UsageError(f"train.{name}={getattr(train, name)!r} is not supported by lit-dar: {fix}.")


def check_eval_args(ev: EvalArgs) -> None:
    """Refuse impossible values and the ``EvalArgs`` fields lit-dar does not implement.

    Raises:
        UsageError: naming the field and the fix.
    """
    _positive_int("eval.interval", ev.interval)
    _positive_int("eval.max_iters", ev.max_iters)
    if ev.max_new_tokens is not None or ev.evaluate_example != "first":
        raise UsageError(
            "eval.max_new_tokens / eval.evaluate_example (sampling an instruction example during training) are not "
            "supported by lit-dar: leave them unset, and sample afterwards with `lit-dar generate`."
        )


def optimizer_args(optimizer: str | dict) -> dict[str, Any]:
    """AdamW's ``lr``, ``weight_decay`` and ``betas`` from a recipe's ``optimizer`` value.

    Accepts ``"AdamW"``, ``{"class_path": "torch.optim.AdamW", "init_args": {...}}`` and the flat form the
    command line produces (``--optimizer.lr 0.01`` and ``--optimizer.init_args.lr 0.01`` both give
    ``{"lr": "0.01"}``); numbers given as strings are converted.

    Raises:
        UsageError: another optimizer, an unknown key, or a value out of range.
    """
    if isinstance(optimizer, str):
        if optimizer not in ("AdamW", "torch.optim.AdamW"):
            raise UsageError(f"optimizer={optimizer!r}: lit-dar trains with AdamW (set its lr, weight_decay, betas).")
        return dict(ADAMW_DEFAULTS)
    if not isinstance(optimizer, dict):
        raise UsageError(f"optimizer must be 'AdamW' or a mapping, got {optimizer!r}.")
    optimizer = dict(optimizer)
    class_path = optimizer.pop("class_path", "torch.optim.AdamW")
    if class_path not in ("AdamW", "torch.optim.AdamW"):
        raise UsageError(f"optimizer class_path={class_path!r}: lit-dar trains with torch.optim.AdamW.")
    args = {**(optimizer.pop("init_args", None) or {}), **optimizer}
    unknown = sorted(set(args) - set(ADAMW_DEFAULTS))
    if unknown:
        raise UsageError(f"optimizer key(s) {unknown} are not supported: use {sorted(ADAMW_DEFAULTS)}.")
    out = dict(ADAMW_DEFAULTS)
    for key, value in args.items():
        try:
            out[key] = tuple(float(b) for b in value) if key == "betas" else float(value)
        except (TypeError, ValueError):
            raise UsageError(f"optimizer.{key}={value!r} is not a number.") from None
    if not (math.isfinite(out["lr"]) and out["lr"] > 0):
        raise UsageError(f"optimizer.lr={out['lr']!r} must be a positive number.")
    if not out["weight_decay"] >= 0:
        raise UsageError(f"optimizer.weight_decay={out['weight_decay']!r} must be ≥ 0.")
    if len(out["betas"]) != 2 or not all(0 <= b < 1 for b in out["betas"]):
        raise UsageError(f"optimizer.betas={out['betas']!r} must be two numbers in [0, 1).")
    return out


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def check_resume_checkpoint(path: Path, config: Config, dar: DARConfig | None) -> None:
    """A checkpoint to resume from must be readable and of this run's model and routing.

    Raises:
        UsageError: a corrupt file, or another architecture or DAR config than the run's.
    """
    checkpoint = read_lightning_checkpoint(path)
    saved = checkpoint.get("model_config")
    if saved is not None and _config_fields(saved) != _config_fields(asdict(config)):
        diff = sorted(k for k in _config_fields(asdict(config)) if saved.get(k) != asdict(config).get(k))
        raise UsageError(
            f"resume checkpoint {str(path)!r} is of another architecture (differs in {diff[:5]}): resume with the "
            "recipe that wrote it, or pass --overwrite true to start afresh."
        )
    saved_dar = checkpoint.get("dar_config")
    saved_dar = None if saved_dar is None else DARConfig.from_dict(saved_dar)
    if saved_dar != dar:
        shown = "none (the baseline)" if saved_dar is None else saved_dar.to_dict()
        raise UsageError(
            f"resume checkpoint {str(path)!r} was trained with dar {shown}: resume with that dar config, or pass "
            "--overwrite true to start afresh."
        )


def _config_fields(data: dict[str, Any]) -> dict[str, Any]:
    """A LitGPT config's init fields (the ones that define the architecture)."""
    names = {f.name for f in fields(Config) if f.init}
    return {k: v for k, v in data.items() if k in names}


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def prepare_data(data: Any) -> None:
    """Run the data module's ``prepare_data`` and ``setup`` now, turning their failures into one line.

    Raises:
        UsageError: a missing optional dependency (with the extra to install) or data that cannot be prepared
            here (e.g. a download on a machine without network access).
    """
    name = type(data).__name__
    try:
        data.prepare_data()
        data.setup("fit")
    except (UsageError, ValueError, FileNotFoundError) as err:
        raise UsageError(f"data {name}: {' '.join(str(err).split())}") from None
    except ModuleNotFoundError as err:
        raise UsageError(
            f"data {name} needs the package {err.name!r}: install it with `pip install 'lit-dar[data]'`."
        ) from None
    except Exception as err:  # downloads: requests, urllib and huggingface_hub each raise their own errors
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise UsageError(
            f"data {name} could not be prepared here ({type(err).__name__}: {reason}). Prepare it once on a "
            "machine with network access (docs/recipes.md, 'Data for the paper-scale recipes'), then copy its "
            "data_path here."
        ) from None
