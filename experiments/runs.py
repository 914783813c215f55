"""What every study run shares: the model and training size, one run (an ordinary ``lit-dar pretrain`` run,
stored as ``result.json`` and reused once finished), and a pool that runs several at a time.

Every run is an ordinary ``lit-dar pretrain`` run (same Trainer, callback, data and recipe defaults) on the offline
standard-library corpus with a fixed train/validation split; modes differ only in ``dar``, so each sees the same
tokens in the same order with the same hyperparameters for a given seed.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from litgpt import Config, Tokenizer
from litgpt.args import EvalArgs, TrainArgs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's lit_dar when run as a script

from lit_dar.checkpoint import load_model  # noqa: E402
from lit_dar.config import DARConfig  # noqa: E402
from lit_dar.data import StdlibCorpus, ensure_tokenizer  # noqa: E402
from lit_dar.patch import enable_routing_stats, find_router  # noqa: E402
from lit_dar.recipe import RoutingArgs, RunSpec, small_config  # noqa: E402
from lit_dar.rule import RoutingStatistics  # noqa: E402
from lit_dar.run import fit  # noqa: E402

MODES = ["baseline", "attnres_block", "attnres_full", "delta_block", "delta", "ddl"]


@dataclass(frozen=True)
class Scale:
    """Model and training size of one study run (the same for every mode)."""

    n_layer: int
    n_embd: int
    steps: int
    batch: int = 16
    seq: int = 128
    vocab: int = 4096
    lr: float = 3e-3
    warmup: int = 30
    eval_interval: int = 50
    eval_iters: int = 16
    num_blocks: int = 4
    max_bytes: int | None = 4_000_000

    def config(self) -> Config:
        return small_config(name=f"study-L{self.n_layer}-d{self.n_embd}", n_layer=self.n_layer, n_embd=self.n_embd,
                            n_head=self.n_embd // 32, head_size=32, vocab_size=self.vocab, block_size=self.seq)


SCALES = {
    "full": Scale(n_layer=12, n_embd=128, steps=250, batch=16, eval_interval=50, eval_iters=12, num_blocks=4),
    "quick": Scale(n_layer=4, n_embd=64, steps=60, batch=8, seq=64, eval_interval=20, eval_iters=4, num_blocks=2,
                   max_bytes=1_000_000),
}


def _dar(mode: str, scale: Scale, **overrides: Any) -> DARConfig | None:
    if mode == "baseline":
        return None
    return DARConfig(mode=mode, num_blocks=overrides.pop("num_blocks", scale.num_blocks), **overrides)


def train_run(
    name: str, out: Path, scale: Scale, dar: DARConfig | None, seed: int, cache: Path,
    initial_checkpoint_dir: Path | None = None, steps: int | None = None, freeze_base: bool = False,
) -> dict[str, Any]:
    """One pretraining (or continued-training) run, or its stored result if it already finished.

    Arguments:
        name: The run's directory under ``out`` (its seed's directory below it).
        scale: Model and training size; ``steps`` overrides its step count (the schedule's warmup stays).
        dar: The routing, or None for the unpatched baseline.
        cache: Where the tokenizer and token caches go (shared by runs).
        initial_checkpoint_dir: Continue from this checkpoint instead of random weights.
        freeze_base: Train the routing parameters only.
    """
    done = stored(out, name, seed)
    run_dir = done.parent
    if done.is_file():
        return json.loads(done.read_text())
    steps = steps or scale.steps
    spec = RunSpec(
        config=scale.config(), out_dir=run_dir, precision=None, initial_checkpoint_dir=initial_checkpoint_dir,
        resume=False, data=StdlibCorpus(cache_dir=cache, max_bytes=scale.max_bytes, seed=seed),
        train=TrainArgs(save_interval=steps, log_interval=10, global_batch_size=scale.batch,
                        micro_batch_size=scale.batch, lr_warmup_steps=scale.warmup, max_steps=steps,
                        max_seq_length=scale.seq, max_norm=1.0, min_lr=scale.lr / 10),
        eval=EvalArgs(interval=scale.eval_interval, max_iters=scale.eval_iters, final_validation=True),
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": scale.lr, "weight_decay": 0.1}},
        devices=1, num_nodes=1, tokenizer_dir=None, logger_name="csv", seed=seed, dar=dar,
        routing=RoutingArgs(image_interval=0, log_interval=50, freeze_base=freeze_base), strategy="auto",
        activation_checkpointing=False, overwrite=True, init_weights=initial_checkpoint_dir is None, enable_progress_bar=False,
    )
    started = time.perf_counter()
    result = fit(spec)
    record = {
        "name": name, "seed": seed, "mode": "baseline" if dar is None else dar.mode,
        "dar": None if dar is None else dar.to_dict(), "steps": steps, "lr": scale.lr,
        "tokens": steps * scale.batch * scale.seq, "freeze_base": freeze_base,
        "val_loss": result["val_loss"], "val_ppl": result["val_ppl"], "seconds": time.perf_counter() - started,
        "curve": _val_curve(run_dir), "routing": _routing_rows(run_dir / "final", spec) if dar is not None else None,
    }
    done.write_text(json.dumps(record, indent=1))
    return record


def stored(out: Path, name: str, seed: int) -> Path:
    """Where a run's record goes once it has finished."""
    return out / name / f"seed{seed}" / "result.json"


def _val_curve(run_dir: Path) -> list[tuple[int, float]]:
    rows = csv.DictReader((run_dir / "logs" / "metrics.csv").open())
    return [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]


def _routing_rows(final: Path, spec: Any) -> list[dict[str, float]]:
    """Per routed point, over the first validation batches: mean max weight, entropy, and uniform references
    (for a rule without routing weights, its own per-sublayer scalars on the first batch)."""
    model = load_model(final).eval()
    rule = find_router(model)
    enable_routing_stats(model)
    recorded = []
    with torch.no_grad():
        for batch in spec.data.val_dataloader():
            model(batch[:, :-1])
            recorded.append(rule.statistics())
            if len(recorded) == 4 or not isinstance(recorded[0], RoutingStatistics):
                break
    if not isinstance(recorded[0], RoutingStatistics):
        return [{k: float(v) for k, v in point.items()} for point in recorded[0].per_point()]
    rows = []
    for k, n in enumerate(recorded[0].n_sources):  # the null source included, if any
        max_weight, entropy, mean_weight = 0.0, 0.0, torch.zeros(n)
        for stats in recorded:
            max_weight += stats.max_weight[k].item()
            entropy += stats.entropy[k].item()
            mean_weight += stats.mean_weight[k, :n]
        batches = len(recorded)
        rows.append({
            "n_sources": n, "max_weight": max_weight / batches, "uniform_max_weight": 1.0 / n,
            "normalized_entropy": (entropy / batches) / math.log(n) if n > 1 else 0.0,
            "mean_weight": (mean_weight / batches).tolist(),
        })
    return rows


def corpus(scale: Scale, cache: Path) -> StdlibCorpus:
    """The study corpus, connected to the tokenizer in ``cache`` (trained there first if missing)."""
    vocab = scale.config().vocab_size
    tokenizer_dir = cache / f"tokenizer-{vocab}"
    ensure_tokenizer(tokenizer_dir, vocab_size=vocab, max_bytes=scale.max_bytes)
    data = StdlibCorpus(cache_dir=cache, max_bytes=scale.max_bytes)
    data.connect(Tokenizer(tokenizer_dir), batch_size=scale.batch, max_seq_length=scale.seq)
    return data


def prepare_data(scale: Scale, cache: Path) -> None:
    """Train the tokenizer and tokenize both splits once, before runs share the cache."""
    corpus(scale, cache).prepare_data()


def _train_job(job: dict[str, Any]) -> dict[str, Any]:
    return train_run(**job)


def _one_thread() -> None:
    torch.set_num_threads(1)


def run_all(jobs: list[Any], workers: int = 1, run: Any = None) -> list[Any]:
    """``run(job)`` for every job (default ``train_run(**job)``), in order, ``workers`` at a time, each worker on
    one thread.

    Several single-threaded runs use a few CPU cores better than one run over all of them, because a study
    model's matrix products are too small to split well. Returns the records in the order of ``jobs``.
    """
    run = run or _train_job
    if workers <= 1:
        return [run(job) for job in jobs]
    context = multiprocessing.get_context("spawn")  # fork would copy the parent's OpenMP state
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_one_thread, max_tasks_per_child=1) as pool:
        return list(pool.map(run, jobs))


def write_section(report: Path, tag: str, text: str) -> None:
    """Replace the ``<!-- study:TAG -->`` section of ``report`` (created if missing); the rest stays as written."""
    begin, end = f"<!-- study:{tag} -->", f"<!-- /study:{tag} -->"
    block = f"{begin}\n{text}\n{end}"
    old = report.read_text() if report.is_file() else "# Results\n"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(new)
