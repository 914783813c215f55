"""Exact, cheap validation loss and perplexity for causal LMs, token-weighted and synced across ranks.

``torchmetrics.text.Perplexity`` softmaxes the whole ``(B, T, V)`` logits (a second B·T·V tensor; V is
151,936 for Qwen3), overflows in fp16 and is about 0.5 % off in bf16. Here the per-token cross-entropy is
computed in fp32 a few rows at a time and summed in a float64 ``MeanMetric``: the mean over *tokens* (not
over batches, which would weight a short batch like a long one), gathered from every rank on ``compute``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.aggregation import MeanMetric


def token_losses(logits: Tensor, targets: Tensor, ignore_index: int = -100, chunk_rows: int = 4096) -> Tensor:
    """fp32 next-token cross-entropy of every counted token, as a 1-D tensor.

    Args:
        logits: ``(..., V)`` in any float dtype.
        targets: ``(...)`` token ids; ``ignore_index`` marks positions that do not count (prompt, padding).
        chunk_rows: rows upcast to fp32 at a time, so the fp32 copy of the logits stays small.
    """
    logits = logits.reshape(-1, logits.size(-1))
    targets = targets.reshape(-1)
    losses = [
        F.cross_entropy(lg.float(), tg, ignore_index=ignore_index, reduction="none")[tg != ignore_index]
        for lg, tg in zip(logits.split(chunk_rows), targets.split(chunk_rows))
    ]
    return torch.cat(losses) if losses else logits.new_zeros(0, dtype=torch.float32)


class TokenNLL(MeanMetric):
    """Mean negative log-likelihood per counted token over all updates and all ranks.

    ``compute()`` is the validation loss; ``compute().exp()`` the perplexity. States are float64 sums, so
    the result does not depend on how the tokens were split into batches or ranks.

    Example::

        nll = TokenNLL()
        nll.update(logits, targets)
        perplexity = nll.compute().exp()
    """

    def __init__(self, ignore_index: int = -100, chunk_rows: int = 4096, **kwargs: Any) -> None:
        super().__init__(nan_strategy="disable", **kwargs)  # a NaN loss shows up as a NaN perplexity
        self.ignore_index = ignore_index
        self.chunk_rows = chunk_rows
        self.set_dtype(torch.float64)

    def update(self, logits: Tensor, targets: Tensor) -> None:  # type: ignore[override]
        super().update(token_losses(logits, targets, self.ignore_index, self.chunk_rows))

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = "") -> "TokenNLL":
        """Keep the zero defaults through ``Module.to_empty``.

        Sharded strategies build the model on the meta device and materialise it with ``to_empty()`` on the
        whole LightningModule (``lightning.fabric.utilities.init._materialize_distributed_module``);
        torchmetrics applies that to the metric's states *and* defaults, which then hold uninitialised
        memory: usually zeros, sometimes not, so a validation now and then logged a perplexity of 1.0 or
        inf. The defaults are zeros by definition, and a metric without updates holds its defaults.
        """
        this = super()._apply(fn, exclude_state)
        for key, default in this._defaults.items():
            if key not in exclude_state:
                this._defaults[key] = torch.zeros_like(default)
        if this._update_count == 0:
            this.reset()
        return this


__all__ = ["TokenNLL", "token_losses"]
