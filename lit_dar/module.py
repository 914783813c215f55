"""``LitGPTModule``: causal-LM pretraining and fine-tuning of a LitGPT ``GPT`` in Lightning, as LitGPT does it.

The module knows nothing about routing: add a :class:`~lit_dar.DeltaAttnResCallback` to the Trainer to
train a Delta Attention Residuals model, leave it out to train the plain LitGPT baseline. The callback
patches the GPT when ``configure_model`` assigns it (before any sharding) and gives the routing
parameters their own param group; this module just builds from ``self.parameters()``.

Batches follow LitGPT: a ``(B, T+1)`` LongTensor of token ids (inputs ``[:, :-1]``, targets ``[:, 1:]``), or
a dict with ``input_ids`` and ``labels`` (``-100`` = not scored) as LitGPT's SFT data yields.
"""

from __future__ import annotations

import math
import tempfile
from contextlib import nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from litgpt import Config
from litgpt.model import GPT, CausalSelfAttention, LLaMAMLP
from litgpt.pretrain import get_lr
from litgpt.utils import chunked_cross_entropy, flops_per_param, num_parameters, reset_parameters
from torch import Tensor
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from typing_extensions import override

from lit_dar.config import DARConfig
from lit_dar.metrics import TokenNLL
from lit_dar.checkpoint import CHECKPOINT_FILE, check_state_dict, load_checkpoint, read_checkpoint, save_checkpoint
from lit_dar.patch import build_model, get_dar_config

IGNORE_INDEX = -100


class LitGPTModule(LightningModule):
    """A LitGPT ``GPT`` trained for next-token prediction with AdamW, linear warmup and cosine decay.

    Args:
        config: a ``litgpt.Config`` or the name of one (``Config.from_name``).
        learning_rate: peak LR of the base model.
        weight_decay: AdamW weight decay of the base model (the routing group has its own, see the callback).
        betas: AdamW betas.
        warmup_steps: linear warmup from 0, in optimizer steps.
        max_steps: end of the cosine decay; ``None``: ``trainer.estimated_stepping_batches``.
        min_lr: LR at the end of the decay (the schedule is ``litgpt.pretrain.get_lr``).
        initial_checkpoint_dir: LitGPT checkpoint to fine-tune from (``lit_model.pth``; a plain LitGPT
            checkpoint leaves the routing at its identity-friendly init). Loaded when fitting starts.
        max_seq_length: shorten the model's context (RoPE cache) to the training length.
        init_weights: GPT-NeoX init as in ``litgpt/pretrain.py`` (else PyTorch's default init).
        compile: ``torch.compile`` the GPT, as ``litgpt/pretrain.py`` does; in place (``nn.Module.compile``),
            so its parameter names and checkpoints stay those of the plain GPT. Routing then runs the plain
            math, which inductor fuses: for Delta the fastest path (``docs/performance.md``).
    """

    def __init__(
        self,
        config: Config | str,
        learning_rate: float = 4e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 2000,
        max_steps: int | None = None,
        min_lr: float = 4e-5,
        initial_checkpoint_dir: str | None = None,
        max_seq_length: int | None = None,
        init_weights: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.config = Config.from_name(config) if isinstance(config, str) else config
        if not isinstance(self.config, Config):
            raise TypeError(f"config must be a litgpt.Config or a model name, got {type(config).__name__}.")
        if learning_rate <= 0 or min_lr < 0 or min_lr > learning_rate:
            raise ValueError(f"Need 0 ≤ min_lr ≤ learning_rate and learning_rate > 0, got {min_lr=}, {learning_rate=}.")
        self.save_hyperparameters(ignore=["config"])
        self.hparams["model_name"] = self.config.name
        self.model: GPT | None = None
        self.val_nll = TokenNLL(ignore_index=IGNORE_INDEX)
        self._initial_loaded = False
        self._param_counts = (0, 0)

    # ----------------------------------------------------------------------------------------- model

    @override
    def configure_model(self) -> None:
        """Build the GPT; on the meta device for sharded strategies, which materialise it with ``reset_parameters``."""
        if self.model is not None:
            return
        meta = self._sharded_strategy()
        with torch.device("meta") if meta else nullcontext():
            model = GPT(self.config)
        if self.hparams.max_seq_length:
            model.max_seq_length = self.hparams.max_seq_length
        self.model = model  # the DeltaAttnResCallback patches it here, before sharding
        if self.hparams.init_weights:
            set_litgpt_init(self.model)
        if not meta:
            reset_parameters(self.model)
        # counted now, before a strategy shards them (FSDP1 leaves each rank only its shard's numel)
        self._param_counts = (num_parameters(model, requires_grad=True), num_parameters(model, requires_grad=False))
        if self.device_mesh is not None:
            self._shard(self.device_mesh)
        if self.hparams.compile:  # after patching and sharding; compiled lazily, at the first forward
            self.model.compile()

    def _sharded_strategy(self) -> bool:
        return self._trainer is not None and isinstance(self.trainer.strategy, (FSDPStrategy, ModelParallelStrategy))

    def _shard(self, mesh: Any) -> None:
        """FSDP2 under ``ModelParallelStrategy``: one unit per block, then the rest (embeddings, head, routing)."""
        if mesh["tensor_parallel"].size() != 1:
            raise NotImplementedError("LitGPTModule shards with FSDP2 only: use tensor_parallel_size=1.")
        dp_mesh = mesh["data_parallel"]
        for block in self.model.transformer.h:
            fully_shard(block, mesh=dp_mesh)
        fully_shard(self.model, mesh=dp_mesh)

    @override
    def on_fit_start(self) -> None:
        self._load_initial_checkpoint()

    @override
    def on_validation_start(self) -> None:
        self._load_initial_checkpoint()  # a validation before fitting (``eval.initial_validation``) sees those weights

    def _load_initial_checkpoint(self) -> None:
        if self.hparams.initial_checkpoint_dir is None or self._initial_loaded:
            return
        path = Path(self.hparams.initial_checkpoint_dir)
        state = read_checkpoint(path / CHECKPOINT_FILE if path.is_dir() else path)
        state = state.get("model", state)
        if any(_is_dtensor(p) for p in self.model.parameters()):
            check_state_dict(self.model, state)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            load_checkpoint(self.model, state)
        self._initial_loaded = True

    # ------------------------------------------------------------------------------------------ steps

    @override
    def training_step(self, batch: Tensor | dict[str, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = split_batch(batch)
        logits = self.model(inputs)
        loss = chunked_cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
        self.flops_per_batch = self._flops(inputs)  # read by ThroughputMonitor
        self.log("train_loss", loss, prog_bar=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    @override
    def validation_step(self, batch: Tensor | dict[str, Tensor], batch_idx: int) -> None:
        inputs, targets = split_batch(batch)
        self.val_nll.update(self.model(inputs), targets)

    @override
    def on_validation_epoch_end(self) -> None:
        nll = self.val_nll.compute()  # token-weighted mean over all ranks (synced inside)
        self.val_nll.reset()
        # Already equal on every rank; sync_dist averages identical values, which leaves them exact.
        self.log("val_loss", nll.float(), sync_dist=True)
        self.log("val_ppl", nll.exp().float(), sync_dist=True, prog_bar=True)

    def _flops(self, inputs: Tensor) -> int:
        """Training FLOPs of this batch on this device, as ``litgpt.utils.estimate_flops`` counts them."""
        B, T = inputs.shape
        if not any(self._param_counts):  # a model given from outside, not built by configure_model
            self._param_counts = (num_parameters(self.model, True), num_parameters(self.model, False))
        cfg, (n_trainable, n_frozen) = self.config, self._param_counts
        trainable = flops_per_param(T, cfg.n_layer, cfg.n_embd, n_trainable)
        frozen = flops_per_param(T, cfg.n_layer, cfg.n_embd, n_frozen)
        return B * (3 * trainable + 2 * frozen)

    # -------------------------------------------------------------------------------------- optimizer

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over all trainable parameters and LitGPT's warmup + cosine schedule, per optimizer step.

        With a ``DeltaAttnResCallback`` the routing parameters are split into their own group in
        ``on_fit_start``; the scheduler then scales their LR by the same factor.
        """
        hp = self.hparams
        max_steps = hp.max_steps or self.trainer.estimated_stepping_batches
        if not math.isfinite(max_steps) or hp.warmup_steps >= max_steps:
            raise ValueError(f"Need warmup_steps < max_steps, got warmup_steps={hp.warmup_steps}, max_steps={max_steps}.")
        params = [p for p in self.parameters() if p.requires_grad]
        fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay, betas=hp.betas, fused=fused)
        factor = partial(lr_factor, warmup_steps=hp.warmup_steps, max_steps=int(max_steps), min_ratio=hp.min_lr / hp.learning_rate)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------ checkpoints

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["model_config"] = asdict(self.config)  # with `dar_config` (callback): the model, rebuildable

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, before any weight is copied, a checkpoint trained with another routing than this run's."""
        if self.model is None:
            return
        saved = checkpoint.get("dar_config")
        saved = None if saved is None else DARConfig.from_dict(saved)
        current = get_dar_config(self.model)
        if saved != current:
            raise ValueError(
                f"The checkpoint was trained with DAR config {saved}, but this run's model has {current} "
                "(the DeltaAttnResCallback's config). Resume with the checkpoint's config; to add routing to a "
                "plain checkpoint, fine-tune from it with initial_checkpoint_dir instead of resuming."
            )


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def split_batch(batch: Tensor | dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` for next-token prediction from a LitGPT pretraining or SFT batch."""
    if isinstance(batch, dict):
        return batch["input_ids"][:, :-1], batch["labels"][:, 1:]
    if isinstance(batch, (list, tuple)) and len(batch) == 1:
        batch = batch[0]
    return batch[:, :-1], batch[:, 1:]


def batch_size(batch: Tensor | dict[str, Tensor]) -> int:
    return split_batch(batch)[0].size(0)


def batch_tokens(batch: Tensor | dict[str, Tensor]) -> int:
    return split_batch(batch)[0].numel()


def throughput_monitor(window_size: int = 50, **kwargs: Any) -> ThroughputMonitor:
    """Lightning's ``ThroughputMonitor`` for these batches: samples/s, tokens/s (``items_per_sec``), FLOPs and MFU.

    MFU needs a known peak (CUDA GPUs); on CPU the monitor logs throughput only.
    """
    return ThroughputMonitor(batch_size_fn=batch_size, length_fn=batch_tokens, window_size=window_size, **kwargs)


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """``litgpt.pretrain.get_lr`` as a multiplier of each param group's peak LR (for ``LambdaLR``)."""
    return get_lr(1.0, step, warmup_steps, max_steps, min_ratio)


def set_litgpt_init(model: GPT) -> None:
    """GPT-NeoX init as ``litgpt.pretrain.initialize_weights``: through ``reset_parameters``, so it also runs
    when a sharded strategy materialises a meta-device model."""

    def init_weights(module: nn.Module, std: float) -> None:
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)

    n_embd, n_layer = model.config.n_embd, model.config.n_layer
    for mod in model.modules():
        if isinstance(mod, (nn.Embedding, nn.Linear)):
            mod.reset_parameters = partial(init_weights, mod, std=math.sqrt(2.0 / 5 / n_embd))
    for mod in model.modules():
        if isinstance(mod, (LLaMAMLP, CausalSelfAttention)):
            mod.proj.reset_parameters = partial(init_weights, mod.proj, std=(1 / math.sqrt(n_embd) / n_layer))


def _is_dtensor(t: Tensor) -> bool:
    return isinstance(t, DTensor)


# --------------------------------------------------------------------------------------------------
# Lightning checkpoints → a model
# --------------------------------------------------------------------------------------------------


def read_lightning_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint as one dict on CPU: a ``.ckpt`` file, or the directory a sharded strategy
    (``ModelParallelStrategy``, FSDP with ``state_dict_type="sharded"``) writes, consolidated with
    ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` (no process group needed)."""
    path = Path(path)
    if path.is_file():
        return read_checkpoint(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{str(path)!r} is neither a checkpoint file nor a distributed checkpoint directory.")
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, Path(tmp) / "consolidated.pt")
        checkpoint = torch.load(Path(tmp) / "consolidated.pt", map_location="cpu", weights_only=True)
    if (path / "meta.pt").is_file():  # everything but weights and optimizer states (Lightning's layout)
        checkpoint.update(torch.load(path / "meta.pt", map_location="cpu", weights_only=True))
    return checkpoint


def load_lightning_checkpoint(path: str | Path, prefix: str = "model.", device: str | torch.device = "cpu") -> GPT:
    """Rebuild the GPT of a ``LitGPTModule`` checkpoint from the checkpoint alone: LitGPT config, DAR config
    (routing) and weights, whichever strategy wrote it."""
    checkpoint = read_lightning_checkpoint(path)
    if "model_config" not in checkpoint:
        raise ValueError(f"{str(path)!r} has no 'model_config': was it written by lit_dar.LitGPTModule?")
    dar = checkpoint.get("dar_config")
    model = build_model(Config(**checkpoint["model_config"]), None if dar is None else DARConfig.from_dict(dar), device="meta")
    model = model.to_empty(device=device)
    reset_parameters(model)  # RoPE caches; the weights come from the checkpoint
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    load_checkpoint(model, state)
    return model


def convert_lightning_checkpoint(path: str | Path, out_dir: str | Path, prefix: str = "model.") -> Path:
    """Write a LitGPT checkpoint directory (``lit_model.pth``, ``model_config.yaml``, ``dar_config.yaml``) that
    ``lit_dar.load_model`` and LitGPT's tools read."""
    return save_checkpoint(load_lightning_checkpoint(path, prefix), out_dir)


__all__ = [
    "LitGPTModule",
    "batch_size",
    "batch_tokens",
    "convert_lightning_checkpoint",
    "load_lightning_checkpoint",
    "lr_factor",
    "read_lightning_checkpoint",
    "set_litgpt_init",
    "split_batch",
    "throughput_monitor",
]
