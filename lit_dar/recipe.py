"""What a run is made of: the model size helpers, the routing options and :class:`RunSpec`, the one record of a
run's arguments that ``lit-dar pretrain``, ``lit-dar finetune``, the study and the tests fill and
:func:`lit_dar.run.fit` runs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from litgpt import Config
from litgpt.args import EvalArgs, TrainArgs
from litgpt.data import DataModule

from lit_dar.config import DARConfig
from lit_dar.routing import RoutingPlan


def small_config(
    base: str | None = None, *, n_layer: int, n_embd: int, n_head: int, vocab_size: int, block_size: int,
    n_query_groups: int | None = None, head_size: int | None = None, intermediate_size: int | None = None,
    **overrides: Any,
) -> Config:
    """A small model for offline runs, benchmarks and tests.

    With ``base`` (a ``litgpt.config`` name) it is that architecture at this size: its norms, MLP, residual
    layout, bias and MoE structure are kept (MoE models get 4 experts, 2 per token); attention keeps its kind
    (one KV group, one per head, or grouped: half the heads). Without ``base`` it is a Llama-style model
    (RMSNorm, SwiGLU, full RoPE, no biases, sequential residual). ``head_size`` defaults to
    ``n_embd // n_head``, ``intermediate_size`` to ``3 · n_embd``; ``overrides`` are any other
    ``Config`` fields (``name`` included).
    """
    head_size = head_size or n_embd // n_head
    intermediate_size = intermediate_size or 3 * n_embd
    size = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, head_size=head_size, intermediate_size=intermediate_size,
                vocab_size=vocab_size, padded_vocab_size=vocab_size, block_size=block_size)
    if base is None:
        kwargs = dict(name=f"small-L{n_layer}-d{n_embd}", n_query_groups=n_query_groups or max(1, n_head // 2),
                      rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="RMSNorm",
                      mlp_class_name="LLaMAMLP", **size)
        return Config(**{**kwargs, **overrides})
    arch = Config.from_name(base)
    if n_query_groups is None:  # the base's kind of attention: multi-query, multi-head or grouped
        mha = arch.n_query_groups == arch.n_head
        n_query_groups = 1 if arch.n_query_groups == 1 else (n_head if mha else n_head // 2)
    kwargs = dict(n_query_groups=n_query_groups, **size)
    if arch.n_expert:
        kwargs.update(n_expert=4, n_expert_per_token=2)
        if arch.moe_intermediate_size:
            kwargs.update(moe_intermediate_size=intermediate_size // 3)
    kwargs.update(overrides)
    name = kwargs.pop("name", None)  # `Config.from_name`'s first parameter is the base's name
    config = Config.from_name(base, **kwargs)
    return config if name is None else replace(config, name=name)


TINY_MODEL = small_config(name="lit-dar-tiny", n_layer=6, n_embd=128, n_head=4, vocab_size=4096, block_size=128)
"""The embedded default of ``lit-dar pretrain`` (the model of ``recipes/pretrain/tiny.yaml``)."""

FINETUNE_DAR = DARConfig(mode="delta_block", num_blocks=4, gate="scalar")
"""The default routing of ``lit-dar finetune``: the zero gate keeps the pretrained model exact at the start."""


def valid_block_counts(n_layer: int) -> list[int]:
    """The block counts ``N`` that split ``n_layer`` layers into exactly ``N`` blocks of ⌈L/N⌉ layers (the routing's
    own rule, :meth:`lit_dar.routing.RoutingPlan.for_mode`)."""
    valid = []
    for n in range(1, n_layer + 1):
        try:
            RoutingPlan.for_mode("delta_block", n_layer, n, parallel=False)
        except ValueError:
            continue
        valid.append(n)
    return valid


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


@dataclass
class RunSpec:
    """One training run: the arguments of ``lit-dar pretrain`` / ``finetune`` (see their help) after the model's
    config is resolved, plus what the command decides (``init_weights``: random weights, or a checkpoint's)."""

    config: Config
    out_dir: Path
    precision: str | None
    initial_checkpoint_dir: Path | None
    resume: Any
    data: DataModule
    train: TrainArgs
    eval: EvalArgs
    optimizer: str | dict
    devices: int | str
    num_nodes: int
    tokenizer_dir: Path | None
    logger_name: str
    seed: int
    dar: DARConfig | None
    routing: RoutingArgs
    strategy: str
    activation_checkpointing: bool
    overwrite: bool
    init_weights: bool
    compile: bool = False
    enable_progress_bar: bool = True

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)

    @classmethod
    def from_arguments(cls, arguments: dict[str, Any], **fixed: Any) -> RunSpec:
        """The run of a command: its arguments named like a field, and ``fixed`` for the fields it decides."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in arguments.items() if k in names and k not in fixed}, **fixed)
