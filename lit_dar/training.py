"""Pieces the `lit-dar` command adds around Lightning's Trainer: strategies, output directories, run checks.

Lightning already does the training loop, checkpointing (written atomically through an fsspec
transaction), logging and distributed launch. What a LitGPT-style recipe additionally needs is:

* a strategy from one word (``auto``, ``ddp``, ``fsdp``, ``fsdp2``) with LitGPT's FSDP settings;
* a sample order that is a pure function of (seed, step, rank) (:class:`lit_dar.sampling.StepSampler`), so a run
  killed at any point and resumed from its last checkpoint sees exactly the batches an uninterrupted run would
  have seen;
* early, one-line errors for impossible requests (more devices than exist, an unwritable out_dir, …).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from litgpt.model import Block

from lit_dar.usage import UsageError

StrategyName = Literal["auto", "ddp", "fsdp", "fsdp2"]



# --------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------


def accelerator_devices() -> tuple[str, int]:
    """``(accelerator, how many devices it has)``: CUDA GPUs if any, else CPU processes (one per core)."""
    if torch.cuda.is_available():
        return "gpu", torch.cuda.device_count()
    return "cpu", os.cpu_count() or 1


def resolve_devices(devices: int | str, num_nodes: int = 1) -> int:
    """Devices per node as an int, refusing more than this machine has."""
    accelerator, available = accelerator_devices()
    if devices in ("auto", -1):
        return available if accelerator == "gpu" else 1
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if not isinstance(devices, int) or devices < 1:
        raise UsageError(f"devices={devices!r} must be 'auto' or a positive integer.")
    if devices > available:
        kind = "CUDA GPUs" if accelerator == "gpu" else "CPU cores"
        raise UsageError(f"devices={devices} but this machine has {available} {kind}: use --devices {available} or fewer.")
    if num_nodes < 1:
        raise UsageError(f"num_nodes={num_nodes} must be ≥ 1.")
    return devices


def build_strategy(
    name: StrategyName, devices: int, num_nodes: int = 1, activation_checkpointing: bool = False
) -> Strategy | str:
    """A Lightning strategy for ``name``, configured as LitGPT configures its own FSDP runs.

    * ``fsdp``: FSDP1, one unit per ``Block``, optional activation checkpointing per ``Block``, full state
      dict checkpoints. Needs CUDA GPUs (Lightning's ``FSDPStrategy`` refuses the CPU).
    * ``fsdp2``: ``ModelParallelStrategy`` — FSDP2 ``fully_shard`` per ``Block`` (done by
      ``LitGPTModule.configure_model``), distributed checkpoints; runs on CPU with gloo too.
    """
    accelerator, _ = accelerator_devices()
    cpu_backend = {"process_group_backend": "gloo"} if accelerator == "cpu" else {}
    world = devices * num_nodes
    if name == "auto":
        return DDPStrategy(**cpu_backend) if world > 1 else "auto"
    if name == "ddp":
        return DDPStrategy(**cpu_backend)
    if name == "fsdp":
        if accelerator != "gpu":
            raise UsageError("strategy 'fsdp' (FSDP1) needs CUDA GPUs; on CPU use --strategy fsdp2 (FSDP2) or ddp.")
        return FSDPStrategy(
            auto_wrap_policy={Block},
            activation_checkpointing_policy={Block} if activation_checkpointing else None,
            state_dict_type="full",
            sharding_strategy="FULL_SHARD",
        )
    if name == "fsdp2":
        if activation_checkpointing:
            raise UsageError("activation_checkpointing is offered with strategy 'fsdp'; fsdp2 runs without it.")
        return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, **cpu_backend)
    raise UsageError(f"strategy={name!r} is unknown: choose one of auto, ddp, fsdp, fsdp2.")


# --------------------------------------------------------------------------------------------------
# Output directories
# --------------------------------------------------------------------------------------------------


RUN_OUTPUTS = ("checkpoints", "logs", "final", "routing.png")
"""What a run writes in its ``out_dir``: what ``--overwrite true`` clears, and nothing else."""


def check_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write into an existing run unless resuming or told to overwrite; check it can be written.

    Writes nothing: :func:`start_out_dir` creates (or clears) the directory once the whole run is checked.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"out_dir {str(out_dir)!r} is a file: choose a directory with --out_dir.")
    existing = out_dir.is_dir() and any(out_dir.iterdir())
    if existing and not (resume or overwrite):
        raise UsageError(
            f"out_dir {str(out_dir)!r} already holds a run: pass --resume auto to continue it, --overwrite true to "
            "write over it, or choose another --out_dir."
        )
    parent = out_dir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        why = "a file is in the way" if not parent.is_dir() else "permission denied"
        raise UsageError(f"out_dir {str(out_dir)!r} is not writable ({why} at {str(parent)!r}): choose another --out_dir.")


def start_out_dir(out_dir: Path, clear: bool) -> None:
    """Create ``out_dir``; with ``clear``, first remove an earlier run's outputs (:data:`RUN_OUTPUTS`) from it."""
    out_dir = Path(out_dir)
    for name in RUN_OUTPUTS if clear else ():
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def find_resume_checkpoint(out_dir: Path, resume: bool | str | Path) -> Path | None:
    """``resume``: False → none; 'auto' → the last checkpoint if any; True → the last one, required; a path → it."""
    if resume is False or resume is None:
        return None
    if isinstance(resume, (str, Path)) and str(resume) not in ("auto", "True", "true"):
        path = Path(resume)
        if not path.exists():
            raise UsageError(f"resume={str(path)!r} does not exist: pass a checkpoint written by lit-dar, or --resume auto.")
        return path
    last = Path(out_dir) / "checkpoints" / "last.ckpt"
    if last.exists():
        return last
    if resume is True or str(resume).lower() == "true":
        raise UsageError(f"--resume true but {str(last)!r} does not exist: use --resume auto to start fresh if none.")
    return None
