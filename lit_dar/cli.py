"""The ``lit-dar`` command: LitGPT-style recipes run through the Lightning Trainer.

``lit-dar pretrain --config recipe.yaml`` reads the keys of LitGPT's ``config_hub`` recipes plus a ``dar:``
block (``null`` trains the unpatched baseline) and a ``strategy``. With no arguments it trains the tiny
offline default of ``recipes/pretrain/tiny.yaml`` (its values are this file's defaults).
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import torch
from litgpt import Config
from litgpt.args import EvalArgs, TrainArgs
from litgpt.data import DataModule

from lit_dar.config import DAR_CONFIG_FILE, DARConfig
from lit_dar.data import StdlibCorpus
from lit_dar.training import StrategyName, UsageError

TINY_MODEL = Config(
    name="lit-dar-tiny",
    block_size=128,
    vocab_size=4096,
    padded_vocab_size=4096,
    n_layer=6,
    n_head=4,
    n_query_groups=2,
    n_embd=128,
    head_size=32,
    rotary_percentage=1.0,
    parallel_residual=False,
    bias=False,
    norm_class_name="RMSNorm",
    mlp_class_name="LLaMAMLP",
    intermediate_size=384,
)


FINETUNE_DAR = DARConfig(mode="delta_block", num_blocks=4, gate="scalar")


@dataclass
class RoutingArgs:
    """How the routing parameters train and are monitored (``DeltaAttnResCallback``'s options)."""

    lr: float | None = None
    """Peak LR of the routing parameters; None: the base optimizer's LR (the paper fine-tunes at 5e-3)."""
    weight_decay: float = 0.0
    """Weight decay of the routing parameters."""
    freeze_base: bool = False
    """Train the routing parameters only."""
    log_interval: int | None = None
    """Log routing statistics every this many steps (None: every train.log_interval steps)."""
    image_interval: int = 100
    """Log the routing heatmap every this many steps (0: never)."""
    collapse_threshold: float = 0.02
    """Flag collapse when the mean max weight stays this close (as a fraction of the way to one-hot) to uniform."""


# --------------------------------------------------------------------------------------------------
# pretrain / finetune
# --------------------------------------------------------------------------------------------------


def pretrain(
    model_name: str | None = None,
    model_config: Config = TINY_MODEL,
    out_dir: Path = Path("out/lit-dar/tiny"),
    precision: Literal["bf16-true", "bf16-mixed", "16-mixed", "32-true"] | None = None,
    initial_checkpoint_dir: Path | None = None,
    resume: bool | Literal["auto"] | Path = False,
    data: DataModule = StdlibCorpus(),
    train: TrainArgs = TrainArgs(
        save_interval=100, log_interval=10, global_batch_size=16, micro_batch_size=16, lr_warmup_steps=30,
        max_steps=300, max_seq_length=128, max_norm=1.0, min_lr=3e-4,
    ),
    eval: EvalArgs = EvalArgs(interval=100, max_iters=20, final_validation=True),
    optimizer: str | dict = "AdamW",
    devices: int | str = 1,
    num_nodes: int = 1,
    tokenizer_dir: Path | None = None,
    logger_name: Literal["tensorboard", "csv"] = "tensorboard",
    seed: int = 42,
    dar: DARConfig | None = DARConfig(mode="delta_block", num_blocks=3),
    routing: RoutingArgs = RoutingArgs(),
    strategy: StrategyName = "auto",
    activation_checkpointing: bool = False,
    compile: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Pretrain a (Delta Attention Residuals) LitGPT model from scratch.

    Arguments:
        model_name: A name from ``litgpt.config`` (e.g. ``Qwen3-0.6B``); also the first positional argument,
            as in ``litgpt pretrain``: ``lit-dar pretrain Qwen3-0.6B``.
        model_config: The architecture, a ``litgpt.Config``; the default is the tiny offline model. Each field
            given (``--model_config.n_layer 4``) changes that field only, on top of ``model_name``'s config
            when one is named, else on top of this default.
        out_dir: Where checkpoints, logs, the final model and the routing heatmap go.
        precision: Lightning precision; default ``bf16-mixed`` on GPUs that support it, else ``32-true``.
        initial_checkpoint_dir: A LitGPT checkpoint dir to start from (continued pretraining).
        resume: ``auto`` continues from ``out_dir/checkpoints/last.ckpt`` if present; ``true`` requires it;
            or a checkpoint path.
        data: A ``litgpt.data`` data module or ``lit_dar.data.StdlibCorpus`` (the default, offline).
        train: LitGPT's training arguments.
        eval: LitGPT's evaluation arguments.
        optimizer: ``AdamW`` or ``{"class_path": "torch.optim.AdamW", "init_args": {...}}`` (lr, weight_decay, betas).
        devices: Devices per node (GPUs, or CPU processes).
        num_nodes: Number of nodes.
        tokenizer_dir: Tokenizer files; default: a BPE tokenizer trained on the offline corpus.
        logger_name: ``tensorboard`` or ``csv``.
        seed: Random seed (weights and data order).
        dar: The Delta Attention Residuals config; ``null`` trains the unpatched baseline. Its keys:
            ``--dar.mode`` (delta, delta_block, attnres_full, attnres_block, ddl), ``--dar.num_blocks``,
            ``--dar.gate`` (none, scalar), ``--dar.null_source``, ``--dar.eps``, and for ``ddl``
            ``--dar.ddl_value``, ``--dar.ddl_value_init``, ``--dar.ddl_beta_init`` (see ``lit_dar.DARConfig``).
        routing: Routing LR, weight decay, monitoring.
        strategy: ``auto``, ``ddp``, ``fsdp`` (FSDP1, GPUs) or ``fsdp2`` (``ModelParallelStrategy``).
        activation_checkpointing: Checkpoint each ``Block`` (with ``fsdp``).
        compile: ``torch.compile`` the model, as ``litgpt pretrain`` does (the fastest path for Delta; the first
            steps pay the compilation).
        overwrite: Allow writing into a non-empty ``out_dir`` without resuming.
    """
    from lit_dar.run import RunSpec, fit

    config = _model_config(model_name, model_config)
    spec = RunSpec(
        config=config, out_dir=Path(out_dir), precision=precision, initial_checkpoint_dir=initial_checkpoint_dir,
        resume=resume, data=data, train=train, eval=eval, optimizer=optimizer,
        devices=devices, num_nodes=num_nodes, tokenizer_dir=tokenizer_dir, logger_name=logger_name, seed=seed,
        dar=dar, routing=routing, strategy=strategy, activation_checkpointing=activation_checkpointing,
        overwrite=overwrite, init_weights=True, compile=compile,
    )
    return fit(spec)


def finetune(
    checkpoint_dir: Path,
    out_dir: Path = Path("out/lit-dar/finetune"),
    precision: Literal["bf16-true", "bf16-mixed", "16-mixed", "32-true"] | None = None,
    resume: bool | Literal["auto"] | Path = False,
    data: DataModule = StdlibCorpus(),
    train: TrainArgs = TrainArgs(
        save_interval=100, log_interval=10, global_batch_size=16, micro_batch_size=4, lr_warmup_steps=10,
        max_steps=100, max_seq_length=256, max_norm=1.0, min_lr=5e-6,
    ),
    eval: EvalArgs = EvalArgs(interval=50, max_iters=20, final_validation=True),
    optimizer: str | dict = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 5e-5, "weight_decay": 0.0}},
    devices: int | str = 1,
    num_nodes: int = 1,
    logger_name: Literal["tensorboard", "csv"] = "tensorboard",
    seed: int = 42,
    dar: DARConfig | None = FINETUNE_DAR,
    routing: RoutingArgs = RoutingArgs(lr=5e-3),
    strategy: StrategyName = "auto",
    activation_checkpointing: bool = False,
    compile: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fully fine-tune an existing LitGPT checkpoint converted to DAR with a zero gate (identity at init).

    Arguments:
        checkpoint_dir: A LitGPT or lit-dar checkpoint dir (``lit_model.pth``, ``model_config.yaml``, tokenizer
            files); also the first positional argument, as in ``litgpt finetune``.
        out_dir: Where checkpoints, logs and the final model go.
        precision: Lightning precision (the Qwen3 recipes use ``bf16-true``).
        resume: ``auto``, ``true`` or a checkpoint path (see ``pretrain``).
        data: A data module; default: the offline corpus tokenized with the checkpoint's tokenizer.
        train: LitGPT's training arguments.
        eval: LitGPT's evaluation arguments.
        optimizer: The base model's optimizer (the paper: AdamW at 5e-5).
        devices: Devices per node.
        num_nodes: Number of nodes.
        logger_name: ``tensorboard`` or ``csv``.
        seed: Random seed.
        dar: The routing to add; use ``gate: scalar`` so training starts from the pretrained model exactly.
            A lit-dar checkpoint brings its own ``dar_config.yaml``, used when this is left at its default. Its
            keys: ``--dar.mode``, ``--dar.num_blocks``, ``--dar.gate``, ``--dar.null_source``, ``--dar.eps`` (see
            ``lit_dar.DARConfig``).
        routing: Routing LR (the paper: 5e-3), weight decay, ``freeze_base``, monitoring.
        strategy: ``auto``, ``ddp``, ``fsdp`` or ``fsdp2``.
        activation_checkpointing: Checkpoint each ``Block`` (with ``fsdp``).
        compile: ``torch.compile`` the model, as ``litgpt pretrain`` does (the fastest path for Delta; the first
            steps pay the compilation).
        overwrite: Allow writing into a non-empty ``out_dir`` without resuming.
    """
    from lit_dar.run import RunSpec, fit

    checkpoint_dir = _checkpoint_dir(checkpoint_dir)
    _tokenizer(checkpoint_dir)
    config = Config.from_file(checkpoint_dir / "model_config.yaml")
    dar = _finetune_dar(checkpoint_dir, dar)
    spec = RunSpec(
        config=config, out_dir=Path(out_dir), precision=precision, initial_checkpoint_dir=checkpoint_dir,
        resume=resume, data=data, train=train, eval=eval, optimizer=optimizer,
        devices=devices, num_nodes=num_nodes, tokenizer_dir=checkpoint_dir, logger_name=logger_name, seed=seed,
        dar=dar, routing=routing, strategy=strategy, activation_checkpointing=activation_checkpointing,
        overwrite=overwrite, init_weights=False, compile=compile,
    )
    return fit(spec)


def _model_config(model_name: str | None, model_config: Config | None) -> Config:
    """The architecture: ``model_config`` alone, or ``model_name``'s config with the fields ``model_config``
    changes against the embedded default."""
    if model_config is None:
        model_config = TINY_MODEL
    if model_name is None:
        return model_config
    changed = {f.name: getattr(model_config, f.name) for f in fields(Config)
               if f.init and getattr(model_config, f.name) != getattr(TINY_MODEL, f.name)}
    name = changed.pop("name", None)
    try:
        config = Config.from_name(model_name, **changed)
    except ValueError:
        raise UsageError(f"model_name={model_name!r} is not a LitGPT model: see `litgpt download list`.") from None
    return config if name is None else replace(config, name=name)


def _finetune_dar(checkpoint_dir: Path, dar: DARConfig | None) -> DARConfig | None:
    """The routing of a fine-tune: a lit-dar checkpoint's own config unless another is asked for (then refused:
    its routing weights belong to the saved one)."""
    if not (checkpoint_dir / DAR_CONFIG_FILE).is_file():
        return dar
    saved = DARConfig.from_file(checkpoint_dir)
    if dar == FINETUNE_DAR or dar == saved:
        return saved
    flags = " ".join(f"--dar.{k} {v}" for k, v in saved.to_dict().items())
    raise UsageError(
        f"checkpoint_dir {str(checkpoint_dir)!r} is a lit-dar checkpoint whose routing weights belong to its "
        f"dar_config.yaml ({flags}): leave --dar unset to fine-tune with it."
    )


def _checkpoint_dir(checkpoint_dir: Path) -> Path:
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise UsageError(f"checkpoint_dir {str(checkpoint_dir)!r} does not exist: convert one with `lit-dar convert hf`.")
    for name in ("lit_model.pth", "model_config.yaml"):
        if not (checkpoint_dir / name).is_file():
            raise UsageError(
                f"checkpoint_dir {str(checkpoint_dir)!r} has no {name}: is it a LitGPT checkpoint? "
                "Convert an HF model with `lit-dar convert hf`."
            )
    return checkpoint_dir


# --------------------------------------------------------------------------------------------------
# generate / routing
# --------------------------------------------------------------------------------------------------


def generate(
    checkpoint_dir: Path,
    prompt: str = "def fibonacci(n):",
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 42,
) -> str:
    """Sample from a lit-dar (or plain LitGPT) checkpoint with the KV cache.

    Arguments:
        checkpoint_dir: A checkpoint dir with ``lit_model.pth``, ``model_config.yaml``, tokenizer files.
        prompt: The prompt.
        max_new_tokens: How many tokens to sample.
        temperature: Sampling temperature (0: greedy).
        top_k: Sample among the k most likely tokens.
        seed: Random seed.
    """
    from litgpt.generate.base import generate as litgpt_generate

    from lit_dar.patch import load_model

    if isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise UsageError(f"max_new_tokens={max_new_tokens} must be a positive integer.")
    if not temperature >= 0:
        raise UsageError(f"temperature={temperature} must be ≥ 0 (0: greedy).")
    if top_k is not None and top_k < 1:
        raise UsageError(f"top_k={top_k} must be a positive integer, or null to sample from every token.")
    checkpoint_dir = _checkpoint_dir(checkpoint_dir)
    torch.manual_seed(seed)
    tokenizer = _tokenizer(checkpoint_dir)
    model = load_model(checkpoint_dir).eval()
    encoded = tokenizer.encode(prompt)
    if len(encoded) >= model.max_seq_length:
        raise UsageError(f"The prompt has {len(encoded)} tokens, but the model's context is {model.max_seq_length}: "
                         "shorten the prompt.")
    total = min(len(encoded) + max_new_tokens, model.max_seq_length)
    model.set_kv_cache(batch_size=1)
    out = litgpt_generate(model, encoded, max_returned_tokens=total, temperature=temperature, top_k=top_k,
                          eos_id=tokenizer.eos_id)
    text = tokenizer.decode(out)
    print(text)
    return text


def evaluate(
    checkpoint_dir: Path,
    tasks: list[str],
    include_path: Path | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    out_file: Path | None = None,
) -> dict[str, Any]:
    """Run lm-eval-harness on a lit-dar (or plain LitGPT) checkpoint through a model adapter.

    LitGPT's own ``evaluate`` converts to HF format, which has no place for the routing weights; this
    adapter runs the patched model directly.

    Arguments:
        checkpoint_dir: A checkpoint dir with ``lit_model.pth``, ``model_config.yaml``, tokenizer files.
        tasks: lm-eval task names (built-in, or defined by YAMLs under ``include_path``).
        include_path: A dir of task YAMLs (local tasks with local data files run offline).
        limit: Evaluate only this many (or this fraction of) examples per task.
        num_fewshot: Few-shot examples per prompt.
        batch_size: Batch size of the adapter.
        out_file: Write the metrics as JSON here.
    """
    import json

    from lit_dar.evaluate import run_lm_eval
    from lit_dar.patch import load_model

    if not tasks:
        raise UsageError("tasks is empty: name at least one lm-eval task, e.g. --tasks '[hellaswag]'.")
    if isinstance(batch_size, bool) or batch_size < 1:
        raise UsageError(f"batch_size={batch_size} must be a positive integer.")
    if limit is not None and not limit > 0:
        raise UsageError(f"limit={limit} must be positive: a number of examples, or a fraction in (0, 1].")
    if num_fewshot is not None and num_fewshot < 0:
        raise UsageError(f"num_fewshot={num_fewshot} must be ≥ 0.")
    if include_path is not None and not Path(include_path).is_dir():
        raise UsageError(f"include_path {str(include_path)!r} is not a directory of task YAMLs.")
    checkpoint_dir = _checkpoint_dir(checkpoint_dir)
    model = load_model(checkpoint_dir).eval()
    results = run_lm_eval(
        model, _tokenizer(checkpoint_dir), tasks, include_path=include_path, include_defaults=include_path is None,
        limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
    )
    metrics = results["results"]
    for task, values in metrics.items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in values.items() if isinstance(v, float) and "stderr" not in k)
        print(f"{task}: {shown}")
    if out_file is not None:
        Path(out_file).write_text(json.dumps(metrics, indent=2, default=str))
    return metrics


def routing(checkpoint_dir: Path, text: str | None = None, out: Path | None = None) -> list[dict[str, float]]:
    """Write the routing heatmap PNG of a checkpoint on a text and print the per-sublayer table.

    Arguments:
        checkpoint_dir: A lit-dar checkpoint dir.
        text: The text to route; default: a paragraph of the offline corpus.
        out: The PNG path; default ``checkpoint_dir/routing.png``.
    """
    from lit_dar.patch import get_dar_config, load_model

    checkpoint_dir = _checkpoint_dir(checkpoint_dir)
    model = load_model(checkpoint_dir).eval()
    if get_dar_config(model) is None:
        raise UsageError(f"{str(checkpoint_dir)!r} is a plain LitGPT checkpoint (no dar_config.yaml): nothing routes.")
    tokenizer = _tokenizer(checkpoint_dir)
    if text is None:
        from lit_dar.data import load_corpus

        text = load_corpus(max_bytes=200_000)[0].text
    idx = tokenizer.encode(text)[: model.max_seq_length].unsqueeze(0)
    if idx.numel() == 0:
        raise UsageError("text is empty: give a text to route, or leave --text unset for a corpus paragraph.")
    out = Path(out) if out is not None else checkpoint_dir / "routing.png"
    if out.exists() and out.is_dir() or not os.access(next(p for p in out.parents if p.exists()), os.W_OK):
        raise UsageError(f"out {str(out)!r} cannot be written: choose a PNG path in a writable directory.")
    rows = routing_report(model, idx, out, title=f"{checkpoint_dir.name}: {get_dar_config(model).mode}")
    print(f"Routing heatmap: {out}")
    return rows


def routing_report(model: torch.nn.Module, idx: torch.Tensor, png: Path, title: str = "") -> list[dict[str, float]]:
    """Run ``idx`` through ``model`` with statistics on, save the heatmap, print and return the table."""
    from lit_dar.patch import enable_routing_stats, find_router, routing_statistics
    from lit_dar.plotting import routing_heatmap, routing_matrix

    enable_routing_stats(model)
    with torch.no_grad():
        model(idx)
    stats = routing_statistics(model)
    enable_routing_stats(model, False)
    png.parent.mkdir(parents=True, exist_ok=True)
    if "max_weight" not in stats[0]:  # Deep Delta Learning: no routing weights, its own per-sublayer scalars
        return _rule_report(stats, png, title)
    fig = routing_heatmap(routing_matrix(stats), null_source=find_router(model).null is not None, title=title)
    fig.savefig(png, dpi=120, bbox_inches="tight")
    rows = []
    print("sublayer  sources  max weight  uniform  entropy/log n")
    for j, s in enumerate(stats):
        n = int(s["n_sources"])
        row = {
            "sublayer": j, "sources": n, "max_weight": s["max_weight"].item(),
            "uniform_max_weight": s["uniform_max_weight"].item(),
            "normalized_entropy": s["entropy"].item() / math.log(n) if n > 1 else 0.0,
        }
        rows.append(row)
        print(f"{j:8d}  {n:7d}  {row['max_weight']:10.3f}  {row['uniform_max_weight']:7.3f}  {row['normalized_entropy']:13.3f}")
    return rows


def _rule_report(stats: list[dict[str, torch.Tensor]], png: Path, title: str) -> list[dict[str, float]]:
    """Per-sublayer scalars of a rule without routing weights (DDL: β and |v − kᵀs|): plot, print, return."""
    from matplotlib.figure import Figure

    keys = sorted(stats[0])
    rows = [{"sublayer": j, **{k: float(s[k]) for k in keys}} for j, s in enumerate(stats)]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    for k in keys:
        ax.plot([r[k] for r in rows], marker="o", ms=3, label=k)
    ax.set_xlabel("sublayer")
    ax.set_title(title)
    ax.legend()
    fig.savefig(png, dpi=120, bbox_inches="tight")
    print("sublayer  " + "  ".join(f"{k:>10}" for k in keys))
    for r in rows:
        print(f"{r['sublayer']:8d}  " + "  ".join(f"{r[k]:10.3f}" for k in keys))
    return rows


def _tokenizer(checkpoint_dir: Path) -> Any:
    from litgpt import Tokenizer

    if not ((checkpoint_dir / "tokenizer.json").is_file() or (checkpoint_dir / "tokenizer.model").is_file()):
        raise UsageError(f"{str(checkpoint_dir)!r} has no tokenizer.json or tokenizer.model: copy the tokenizer files there.")
    return Tokenizer(checkpoint_dir)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def bench() -> None:
    """Measure each routing mode's speed and memory against the unpatched model (``lit-dar bench --help``)."""
    from lit_dar.bench import main as bench_main

    bench_main([])


def commands() -> dict[str, Any]:
    from lit_dar.convert import convert_hf, convert_to_dar
    from lit_dar.export import export_hf
    from lit_dar.study import study

    return {
        "pretrain": pretrain,
        "finetune": finetune,
        "convert": {"hf": convert_hf, "dar": convert_to_dar},
        "export": {"hf": export_hf},
        "generate": generate,
        "evaluate": evaluate,
        "routing": routing,
        "study": study,
        "bench": bench,
    }


# The first argument of these commands may be given positionally, as LitGPT's own commands take it.
POSITIONAL = {"pretrain": "model_name", "finetune": "checkpoint_dir", "generate": "checkpoint_dir",
              "evaluate": "checkpoint_dir", "routing": "checkpoint_dir"}


def main(argv: list[str] | None = None) -> None:
    """The ``lit-dar`` console script (returns nothing: a console script's return value becomes its exit status)."""
    run(argv)


def run(argv: list[str] | None = None) -> Any:
    """Run one ``lit-dar`` command and return its result (what tests and notebooks use).

    Bad input ends with one line that names the fix and exit code 2, not a traceback; ``LIT_DAR_DEBUG=1``
    shows the traceback instead.
    """

    from jsonargparse import ArgumentError, CLI, set_docstring_parse_options

    set_docstring_parse_options(attribute_docstrings=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the benchmark keeps its own argparse interface (`lit-dar bench --help`)
        from lit_dar.bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] and argv[0] in POSITIONAL and len(argv) > 1 and not argv[1].startswith("-"):
        argv[1:2] = [f"--{POSITIONAL[argv[0]]}", argv[1]]
    try:
        _check_config_files(argv)
        return CLI(commands(), args=argv, as_positional=False, exit_on_error=False)
    except (ArgumentError, UsageError, FileNotFoundError, FileExistsError, ValueError, TypeError) as err:
        if os.environ.get("LIT_DAR_DEBUG"):
            raise
        message = " ".join(str(err).split())  # one line, whatever the source formatted
        if isinstance(err, ArgumentError) and argv:
            message = _explain(message, argv[0])
        print(f"lit-dar: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def _check_config_files(argv: list[str]) -> None:
    for flag, path in zip(argv, argv[1:]):
        if flag == "--config" and Path(path).is_file() and not Path(path).read_text().strip():
            raise UsageError(f"The config file {path!r} is empty: write a recipe there (see recipes/), or drop --config.")


def _explain(message: str, command: str) -> str:
    """jsonargparse's report, shortened to what was wrong and what is allowed."""
    own = re.search(r"(DARConfig\.\S+=.*?)(?: Given value type:|$)", message)
    if own:  # jsonargparse wraps our own validation message in its Union report: show just ours
        return own.group(1)
    key = re.search(r'Parser key "([^"]+)"', message)
    hint = f" (see `lit-dar {command} --help` for the accepted keys and values)"
    if key is None or command not in commands() or not callable(commands()[command]):
        return message + hint
    key = key.group(1)
    annotation = _annotation(commands()[command], key)
    unknown = re.search(r"Unrecognized arguments: --?([\w.]+)", message) or re.search(
        r"Key '([\w.]+)' is not expected", message)
    dataclass = next((t for t in _union(annotation) if hasattr(t, "__dataclass_fields__")), None)
    if unknown and dataclass is not None:
        allowed = [f.name for f in fields(dataclass) if f.init]
        return f"Unknown key '{key}.{unknown.group(1)}': the keys of {key} are {allowed}."
    choices = [c for t in _union(annotation) if get_origin(t) is Literal for c in get_args(t)]
    given = re.search(r"Given value: (.*?)$", message)
    if choices and given:
        null = " or null" if type(None) in _union(annotation) else ""
        return f"{key}={given.group(1).strip()!r} is not allowed: choose one of {choices}{null}."
    return message + hint


def _annotation(function: Any, key: str) -> Any:
    try:
        return get_type_hints(function).get(key.split(".")[0])
    except Exception:  # an annotation that cannot be resolved only costs the shorter message
        return None


def _union(annotation: Any) -> tuple[Any, ...]:
    return get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
