"""lit-dar checkpoints: LitGPT's ``lit_model.pth`` + ``model_config.yaml`` beside ``dar_config.yaml``.

One reader (:func:`read_checkpoint`) and one set of key rules (:func:`check_state_dict`) serve every load:
:func:`load_checkpoint`, :func:`load_model`, the Lightning module and the checks a run makes before it writes.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from litgpt import Config
from litgpt.model import GPT
from litgpt.utils import save_config
from torch import Tensor

from lit_dar.config import DAR_CONFIG_FILE, DARConfig
from lit_dar.patch import build_model, dar_filter, get_dar_config

CHECKPOINT_FILE = "lit_model.pth"


def routing_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the routing weights (as LitGPT saves only LoRA's), keyed as in the full state dict."""
    return {k: v for k, v in model.state_dict().items() if dar_filter(k)}


def read_checkpoint(path: str | Path, mmap: bool = True) -> dict[str, Any]:
    """``torch.load`` a weights file (memory-mapped, tensors only) on the CPU.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: the file is not a readable PyTorch checkpoint (truncated or corrupt).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {str(path)!r}.")
    try:
        return torch.load(path, mmap=mmap, weights_only=True, map_location="cpu")
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        reason = " ".join(str(err).split())[:120]
        raise ValueError(
            f"{str(path)!r} is not a readable PyTorch checkpoint, truncated or corrupt ({reason}): write it again, "
            "e.g. re-run the conversion or training that made it."
        ) from None


def check_state_dict(model: nn.Module, state_dict: dict[str, Any]) -> list[str]:
    """Check a LitGPT or lit-dar state dict against a (patched) model, meta device included, without loading it.

    Returns:
        The routing keys the state dict lacks (a plain LitGPT checkpoint lacks exactly those).

    Raises:
        ValueError: shapes that differ, a missing or unexpected base-model key, part of the routing only.
    """
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
             if k in own and torch.is_tensor(v) and v.shape != own[k].shape]
    if wrong:
        raise ValueError(
            f"Checkpoint shapes do not match the model (checkpoint vs model): {wrong[:3]}{'…' if len(wrong) > 3 else ''}. "
            "Is it a checkpoint of another architecture? Use the model_config.yaml that was saved with it."
        )
    for key, extra in state_dict.items():  # another routing config is named as such, before any key it lacks
        if key in own and dar_filter(key) and key.endswith("._extra_state"):
            model.get_submodule(key.rsplit(".", 1)[0]).set_extra_state(extra)
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    other_missing = [k for k in missing if not dar_filter(k)]
    if other_missing or unexpected:
        raise ValueError(
            f"Checkpoint does not match the model: missing {other_missing[:5]}{'…' if len(other_missing) > 5 else ''},"
            f" unexpected {unexpected[:5]}. Is it a checkpoint of another architecture or DAR mode?"
        )
    # the config entry (`dar._extra_state`) is naturally absent from a plain checkpoint: report weights only
    routing_missing = [k for k in missing if not k.endswith("._extra_state")]
    if routing_missing and any(dar_filter(k) for k in state_dict):
        raise ValueError(f"Checkpoint has only part of the routing weights; missing {routing_missing}.")
    return routing_missing


def load_checkpoint(model: nn.Module, checkpoint: str | Path | dict[str, Any]) -> list[str]:
    """Load a LitGPT or lit-dar state dict into a patched model; return the routing keys left at init.

    A plain LitGPT checkpoint lacks exactly the routing keys: they keep their identity-friendly init and
    are returned (and warned about). Any other missing or unexpected key is an error, and so is a DAR
    checkpoint made with another DAR config.
    """
    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint)
        checkpoint = read_checkpoint(path / CHECKPOINT_FILE if path.is_dir() else path)
    state_dict = checkpoint.get("model", checkpoint)
    routing_missing = check_state_dict(model, state_dict)
    model.load_state_dict(state_dict, strict=False)
    if routing_missing:
        warnings.warn(
            f"Loaded a checkpoint without routing weights: {len(routing_missing)} routing keys keep their "
            "initialisation (expected when converting a plain LitGPT checkpoint).",
            stacklevel=2,
        )
    return routing_missing


def save_checkpoint(model: GPT, checkpoint_dir: str | Path) -> Path:
    """Write ``lit_model.pth``, LitGPT's ``model_config.yaml`` and, for a patched model, ``dar_config.yaml``."""
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_dir / CHECKPOINT_FILE
    tmp = path.with_suffix(".pth.tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)  # a crash never leaves a half-written checkpoint under the real name
    save_config(model.config, checkpoint_dir)
    dar = get_dar_config(model)
    if dar is not None:
        dar.save(checkpoint_dir)
    return path


def load_model(checkpoint_dir: str | Path, device: torch.device | str | None = None) -> GPT:
    """Rebuild a model from a checkpoint directory alone: LitGPT config, DAR config if present, weights."""
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "model_config.yaml").is_file():
        raise FileNotFoundError(f"{str(checkpoint_dir)!r} has no model_config.yaml: is it a LitGPT checkpoint dir?")
    config = Config.from_file(checkpoint_dir / "model_config.yaml")
    dar = DARConfig.from_file(checkpoint_dir) if (checkpoint_dir / DAR_CONFIG_FILE).is_file() else None
    model = build_model(config, dar, device="meta")
    model = model.to_empty(device=device or "cpu")
    model.reset_parameters()  # rope caches; weights come from the checkpoint
    if dar is not None:
        model.dar.reset_parameters()
    load_checkpoint(model, checkpoint_dir)
    return model
