"""One training run from a recipe: the Trainer, the module, the DAR callback, data, checkpoints, outputs.

``lit_dar.cli`` turns a recipe into a :class:`~lit_dar.recipe.RunSpec`; :func:`fit` runs it. Kept apart from
the CLI so the study and tests can run recipes in-process.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from litgpt import Tokenizer
from litgpt.data import DataModule
from torch.utils.data import DataLoader, IterableDataset

from lit_dar.callback import DeltaAttnResCallback
from lit_dar.data import StdlibCorpus, ensure_tokenizer
from lit_dar.module import LitGPTModule, convert_lightning_checkpoint, throughput_monitor
from lit_dar.monitor import RoutingMonitor
from lit_dar.checkpoint import CHECKPOINT_FILE, check_state_dict, load_model, read_checkpoint
from lit_dar.patch import build_model
from lit_dar.preflight import (
    check_eval_args, check_resume_checkpoint, check_train_args, optimizer_args, prepare_data,
)
from lit_dar.recipe import RunSpec
from lit_dar.report import routing_report
from lit_dar.sampling import EvenShards, resumable_loader
from lit_dar.training import (
    accelerator_devices,
    build_strategy,
    check_out_dir,
    find_resume_checkpoint,
    resolve_devices,
    start_out_dir,
)
from lit_dar.usage import UsageError


class ResumableData(L.LightningDataModule):
    """A LitGPT data module whose training order is a function of (seed, step, rank), so resuming is exact.

    Map-style datasets get a :class:`~lit_dar.sampling.StepSampler` that starts at the restored
    ``global_step``; validation is split into equal shards per rank. Streaming (iterable) datasets keep
    their own loaders.
    """

    def __init__(self, data: DataModule, seed: int, accumulate: int) -> None:
        super().__init__()
        self.data, self.seed, self.accumulate = data, seed, accumulate

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: str) -> None:
        self.data.setup(stage)

    def train_dataloader(self) -> DataLoader:
        loader = self.data.train_dataloader()
        if isinstance(loader.dataset, IterableDataset):
            return loader
        t = self.trainer
        return resumable_loader(loader.dataset, loader.batch_size, self.seed, t.global_rank, t.world_size,
                                t.global_step, self.accumulate, loader.num_workers, loader.collate_fn)

    def val_dataloader(self) -> DataLoader:
        loader = self.data.val_dataloader()
        if isinstance(loader.dataset, IterableDataset):
            return loader
        sampler = EvenShards(len(loader.dataset), self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, collate_fn=loader.collate_fn,
                          num_workers=loader.num_workers)


def _is_rank_zero_launch() -> bool:
    """False in the processes Lightning's launcher starts for ranks > 0 (they re-run the command)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "generation_config.json")


def _tokenizer_dir(spec: RunSpec) -> Path | None:
    """The run's tokenizer files: ``tokenizer_dir``, or one trained on the offline corpus (once, then cached)."""
    if spec.tokenizer_dir is not None:
        path = Path(spec.tokenizer_dir)
        if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
            raise UsageError(f"tokenizer_dir {str(path)!r} has no tokenizer.json or tokenizer.model: point it at a "
                             "checkpoint dir with tokenizer files, or leave it unset to train one on the corpus.")
        return path
    if isinstance(spec.data, StdlibCorpus):
        vocab = spec.config.vocab_size
        path = spec.data.cache_dir / f"tokenizer-{vocab}"
        ensure_tokenizer(path, vocab_size=vocab, max_bytes=spec.data.max_bytes, val_fraction=spec.data.val_fraction,
                         root=spec.data.root)
        return path
    return None


def fit(spec: RunSpec) -> dict[str, Any]:
    """Train, validate, save ``out_dir/final`` (a lit-dar checkpoint dir) and the routing heatmap; print where.

    Everything the request names (arguments, model and routing, checkpoints, tokenizer, data) is checked before
    the first file is written in ``out_dir``; only then does ``--overwrite true`` clear an earlier run.
    """
    started = time.perf_counter()
    train, ev = spec.train, spec.eval
    devices = resolve_devices(spec.devices, spec.num_nodes)
    world = devices * spec.num_nodes
    strategy = build_strategy(spec.strategy, devices, spec.num_nodes, spec.activation_checkpointing)
    check_train_args(train, world)
    check_eval_args(ev)
    opt = optimizer_args(spec.optimizer)
    if spec.routing.freeze_base and spec.dar is None:
        raise UsageError("routing.freeze_base needs routing: set a dar: config (it is null, the plain baseline).")
    state = None
    if spec.initial_checkpoint_dir is not None:  # memory-mapped: checked, not loaded
        path = Path(spec.initial_checkpoint_dir)
        state = read_checkpoint(path / CHECKPOINT_FILE if path.is_dir() else path)
    model = build_model(spec.config, spec.dar, device="meta")  # the block count and routing, checked on no memory
    if state is not None:
        check_state_dict(model, state.get("model", state))
        del state
    rank_zero = _is_rank_zero_launch()
    resume_path = find_resume_checkpoint(spec.out_dir, spec.resume)
    if rank_zero:
        check_out_dir(spec.out_dir, resume=spec.resume not in (False, None), overwrite=spec.overwrite)
    if resume_path is not None:
        check_resume_checkpoint(resume_path, spec.config, spec.dar)

    # as LitGPT does: never train on windows longer than the model's context
    max_seq_length = min(train.max_seq_length or spec.config.block_size, spec.config.block_size)
    tokenizer_dir = _tokenizer_dir(spec)
    tokenizer = None if tokenizer_dir is None else Tokenizer(tokenizer_dir)
    if tokenizer is not None and tokenizer.vocab_size > spec.config.padded_vocab_size:
        raise UsageError(f"The tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{spec.config.padded_vocab_size}: set model_config.vocab_size/padded_vocab_size to match.")
    accumulate = train.gradient_accumulation_iters(world, 1)
    spec.data.connect(tokenizer=tokenizer, batch_size=train.micro_batch_size, max_seq_length=max_seq_length)
    if rank_zero:
        prepare_data(spec.data)
    if train.max_steps is not None:
        max_steps = train.max_steps
    else:
        max_steps = max(1, train.max_tokens // (train.global_batch_size * max_seq_length))
    if rank_zero:  # everything is checked: from here on the run writes
        start_out_dir(spec.out_dir, clear=spec.overwrite and resume_path is None)

    L.seed_everything(spec.seed, verbose=False)
    module = LitGPTModule(
        spec.config, learning_rate=opt["lr"], weight_decay=opt["weight_decay"], betas=opt["betas"],
        warmup_steps=min(train.lr_warmup_steps or 0, max_steps - 1), max_steps=max_steps, min_lr=min(train.min_lr, opt["lr"]),
        initial_checkpoint_dir=None if spec.initial_checkpoint_dir is None else str(spec.initial_checkpoint_dir),
        max_seq_length=max_seq_length, init_weights=spec.init_weights, compile=spec.compile,
    )
    callbacks: list[Any] = [
        # one run per out_dir: `last.ckpt` is always this run's newest checkpoint, never `last-v1.ckpt`
        ModelCheckpoint(dirpath=spec.out_dir / "checkpoints", every_n_train_steps=train.save_interval or max_steps,
                        save_last=True, save_top_k=0, enable_version_counter=False),
        LearningRateMonitor(logging_interval="step"),
        throughput_monitor(window_size=max(2, min(50, train.log_interval * 2))),
    ]
    if spec.enable_progress_bar:  # no epoch total: a run is bounded by steps, and Rich's bar would show "0/-2"
        callbacks.append(TQDMProgressBar())
    if spec.dar is not None:
        r = spec.routing
        monitor = RoutingMonitor(log_interval=r.log_interval, image_interval=r.image_interval,
                                 collapse_threshold=r.collapse_threshold)
        callbacks.append(DeltaAttnResCallback(
            spec.dar, routing_lr=r.lr or opt["lr"], routing_weight_decay=r.weight_decay, freeze_base=r.freeze_base,
            monitor=monitor,
        ))
    logger_cls = TensorBoardLogger if spec.logger_name == "tensorboard" else CSVLogger
    logger = logger_cls(save_dir=str(spec.out_dir), name="logs", version="")
    accelerator, _ = accelerator_devices()
    precision = spec.precision or ("bf16-mixed" if accelerator == "gpu" and torch.cuda.is_bf16_supported() else "32-true")
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, num_nodes=spec.num_nodes, strategy=strategy, precision=precision,
        max_steps=max_steps, max_time=None if train.max_time is None else timedelta(seconds=train.max_time),
        accumulate_grad_batches=accumulate, gradient_clip_val=train.max_norm,
        val_check_interval=ev.interval * accumulate, check_val_every_n_epoch=None, limit_val_batches=ev.max_iters,
        num_sanity_val_steps=0, logger=logger, callbacks=callbacks, log_every_n_steps=train.log_interval,
        use_distributed_sampler=False, default_root_dir=str(spec.out_dir), enable_model_summary=False,
        enable_progress_bar=spec.enable_progress_bar,
    )
    data = ResumableData(spec.data, spec.seed, accumulate)
    if ev.initial_validation and resume_path is None:
        trainer.validate(module, datamodule=data, verbose=False)
    trainer.fit(module, datamodule=data, ckpt_path=None if resume_path is None else str(resume_path))
    if ev.final_validation:
        trainer.validate(module, datamodule=data, verbose=False)
    final_ckpt = spec.out_dir / "checkpoints" / "final.ckpt"
    trainer.save_checkpoint(final_ckpt)
    trainer.strategy.barrier()

    result: dict[str, Any] = {"out_dir": spec.out_dir, "steps": trainer.global_step}
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    result.update(val_loss=metrics.get("val_loss"), val_ppl=metrics.get("val_ppl"), train_loss=metrics.get("train_loss"))
    if trainer.is_global_zero:
        final = spec.out_dir / "final"
        convert_lightning_checkpoint(final_ckpt, final)
        for name in TOKENIZER_FILES if tokenizer_dir is not None else ():
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, final / name)
        result["final"] = final
        if spec.dar is not None:
            result["routing_png"] = _routing_png(final, spec, trainer.global_step)
        result["seconds"] = time.perf_counter() - started
        _print_summary(result, spec)
    return result


def _routing_png(final: Path, spec: RunSpec, steps: int) -> Path:
    model = load_model(final).eval()
    batch = next(iter(spec.data.val_dataloader()))
    idx = (batch["input_ids"] if isinstance(batch, dict) else batch)[:1, :-1]
    png = spec.out_dir / "routing.png"
    routing_report(model, idx, png, title=f"{spec.dar.mode} routing after {steps} steps")
    return png


def _print_summary(result: dict[str, Any], spec: RunSpec) -> None:
    ppl = result.get("val_ppl")
    lines = [
        "",
        f"Done in {result['seconds']:.0f} s, {result['steps']} steps ({spec.dar.mode if spec.dar else 'baseline, no routing'}).",
        f"Validation perplexity: {ppl:.2f}" if ppl is not None and math.isfinite(ppl) else "Validation perplexity: n/a",
        f"Final model (lit-dar checkpoint dir): {result['final']}",
        f"Lightning checkpoints: {spec.out_dir / 'checkpoints'}",
        f"TensorBoard logs: tensorboard --logdir {spec.out_dir / 'logs'}",
    ]
    if "routing_png" in result:
        lines.append(f"Routing heatmap: {result['routing_png']}")
    print("\n".join(lines))
