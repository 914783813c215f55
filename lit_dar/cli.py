"""The ``lit-dar`` command: LitGPT-style recipes run through the Lightning Trainer.

``lit-dar pretrain --config recipe.yaml`` reads the keys of LitGPT's ``config_hub`` recipes plus a ``dar:``
block (``null`` trains the unpatched baseline) and a ``strategy``. With no arguments it trains the tiny
offline default of ``recipes/pretrain/tiny.yaml`` (its values are this file's defaults).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import CLI, ArgumentError, set_parsing_settings
from litgpt import Config, Tokenizer
from litgpt.args import EvalArgs, TrainArgs
from litgpt.data import DataModule
from litgpt.generate.base import generate as litgpt_generate

from lit_dar.config import DAR_CONFIG_FILE, DARConfig
from lit_dar.convert import convert_hf, convert_to_dar
from lit_dar.data import StdlibCorpus, load_corpus
from lit_dar.export import export_hf
from lit_dar.checkpoint import load_model
from lit_dar.patch import get_dar_config
from lit_dar.recipe import FINETUNE_DAR, TINY_MODEL, RoutingArgs, RunSpec
from lit_dar.report import routing_report
from lit_dar.run import fit
from lit_dar.training import StrategyName
from lit_dar.usage import UsageError, check_config_files, explain

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
    arguments = dict(locals())
    config = _model_config(model_name, model_config)
    return fit(RunSpec.from_arguments(arguments, config=config, init_weights=True))


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
    arguments = dict(locals())
    checkpoint_dir = _checkpoint_dir(checkpoint_dir)
    _tokenizer(checkpoint_dir)
    spec = RunSpec.from_arguments(
        arguments, config=Config.from_file(checkpoint_dir / "model_config.yaml"), dar=_finetune_dar(checkpoint_dir, dar),
        initial_checkpoint_dir=checkpoint_dir, tokenizer_dir=checkpoint_dir, init_weights=False,
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
    from lit_dar.evaluate import run_lm_eval  # needs lm-eval (the `eval` extra)

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
    checkpoint_dir = _checkpoint_dir(checkpoint_dir)
    model = load_model(checkpoint_dir).eval()
    if get_dar_config(model) is None:
        raise UsageError(f"{str(checkpoint_dir)!r} is a plain LitGPT checkpoint (no dar_config.yaml): nothing routes.")
    tokenizer = _tokenizer(checkpoint_dir)
    if text is None:
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


def _tokenizer(checkpoint_dir: Path) -> Any:
    if not ((checkpoint_dir / "tokenizer.json").is_file() or (checkpoint_dir / "tokenizer.model").is_file()):
        raise UsageError(f"{str(checkpoint_dir)!r} has no tokenizer.json or tokenizer.model: copy the tokenizer files there.")
    return Tokenizer(checkpoint_dir)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


# The benchmark and the study are lab scripts of the source checkout (benchmarks/, experiments/), not part of the
# installed library; these two commands run them from there and keep their own options.
CHECKOUT = Path(__file__).resolve().parents[1]
SCRIPTS = {"bench": CHECKOUT / "benchmarks" / "bench.py", "study": CHECKOUT / "experiments" / "study.py"}


def bench() -> None:
    """Measure each routing mode's speed and memory against the unpatched model (``lit-dar bench --help``).

    Runs ``benchmarks/bench.py`` of a source checkout.
    """


def study() -> None:
    """Train the baseline and every residual rule with the same tokens over several seeds; write the report.

    Runs ``experiments/study.py`` of a source checkout (``lit-dar study --help``).
    """


def lab_script(name: str) -> Any:
    """``benchmarks/bench.py`` or ``experiments/study.py`` of the checkout this package is imported from."""
    path = SCRIPTS[name]
    if not path.is_file():
        raise UsageError(f"`lit-dar {name}` runs {path.relative_to(CHECKOUT)} of a source checkout, which this install "
                         f"lacks: clone the lit-dar repository and run `python {path.relative_to(CHECKOUT)} --help`.")
    spec = importlib.util.spec_from_file_location(name, path)
    script = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up there
    spec.loader.exec_module(script)
    return script


def commands() -> dict[str, Any]:
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


def main(argv: list[str] | None = None) -> None:
    """The ``lit-dar`` console script (returns nothing: a console script's return value becomes its exit status)."""
    run(argv)


def run(argv: list[str] | None = None) -> Any:
    """Run one ``lit-dar`` command and return its result (what tests and notebooks use).

    Bad input ends with one line that names the fix and exit code 2, not a traceback; ``LIT_DAR_DEBUG=1``
    shows the traceback instead.
    """
    # attribute docstrings document the dataclass fields; a command's first argument may come without its flag,
    # as LitGPT's own commands take it (`lit-dar finetune checkpoints/…`)
    set_parsing_settings(docstring_parse_attribute_docstrings=True, parse_optionals_as_positionals=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in SCRIPTS:  # lab scripts with their own options; only a missing checkout is ours
        script = _report_usage_errors(argv, lambda: lab_script(argv[0]))
        if argv[0] == "bench":
            return script.main(argv[1:])
        return _report_usage_errors(argv, lambda: CLI(script.study, args=argv[1:], prog="lit-dar study"))
    return _report_usage_errors(argv, lambda: _parse_and_run(argv))


def _parse_and_run(argv: list[str]) -> Any:
    check_config_files(argv)
    return CLI(commands(), args=argv, as_positional=False, exit_on_error=False)


def _report_usage_errors(argv: list[str], command: Any) -> Any:
    try:
        return command()
    except (ArgumentError, UsageError, FileNotFoundError, FileExistsError, ValueError, TypeError) as err:
        if os.environ.get("LIT_DAR_DEBUG"):
            raise
        message = " ".join(str(err).split())  # one line, whatever the source formatted
        if isinstance(err, ArgumentError) and argv:
            message = explain(message, argv[0], commands().get(argv[0]))
        print(f"lit-dar: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
