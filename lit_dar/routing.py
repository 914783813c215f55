"""Depth attention over earlier representations: the plans and the router, free of LitGPT and Lightning.

Routed point ``k`` mixes its sources ``u_i`` with ``α_i = softmax_i(w_k · RMSNorm(u_i))``, ``r = Σ_i α_i u_i``
(``docs/method.md``). This module holds:

* :class:`RoutingPlan` — which sources each sublayer sees and how its mixture is combined. The four
  modes are data in this plan, not branches in the forward.
* :class:`DepthRouter` — the residual rule of the routing modes: the learned parameters of all routed
  points in one module, so they sit under one prefix, are tiny, and can be initialised on the meta
  device through ``reset_parameters``.

How the routed points are computed (a source bank per forward, or the plain math that ``torch.compile``
traces) is the router's backend, chosen when it is built: :mod:`lit_dar.backends`, :mod:`lit_dar.bank`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from lit_dar.backends import BankBackend, PlainBackend, RoutingBackend
from lit_dar.bank import compute_dtype, no_autocast
from lit_dar.rule import ResidualRule, RoutingStatistics

# --------------------------------------------------------------------------------------------------
# Which sources each sublayer sees
# --------------------------------------------------------------------------------------------------


# mode -> (one group per sublayer?, partial sum visible?, additive?, final hidden state routed?)
MODES: dict[str, tuple[bool, bool, bool, bool]] = {
    "delta": (True, False, True, False),
    "delta_block": (False, False, True, False),
    "attnres_full": (True, False, False, True),
    "attnres_block": (False, True, False, True),
}
BLOCK_MODES = tuple(m for m, (per_sublayer, *_) in MODES.items() if not per_sublayer)
ADDITIVE_MODES = tuple(m for m, (_, _, additive, _) in MODES.items() if additive)


def layers_per_block(n_layer: int, num_blocks: int) -> int:
    """Contiguous blocks of ⌈L/N⌉ layers; raises if that does not give exactly N blocks."""
    if not 1 <= num_blocks <= n_layer:
        raise ValueError(f"num_blocks={num_blocks} is impossible for a model with {n_layer} layers: use 1 … {n_layer}.")
    size = math.ceil(n_layer / num_blocks)
    if math.ceil(n_layer / size) != num_blocks:
        valid = sorted({math.ceil(n_layer / math.ceil(n_layer / n)) for n in range(1, n_layer + 1)})
        raise ValueError(
            f"num_blocks={num_blocks} with {n_layer} layers gives blocks of {size} layers, i.e. only "
            f"{math.ceil(n_layer / size)} blocks. Choose num_blocks from {valid}."
        )
    return size


@dataclass(frozen=True)
class RoutingPlan:
    """Where sources come from and how a routed mixture enters a sublayer.

    Sublayers ``j = 0 … 2L−1`` (attention ``2l``, MLP ``2l+1``) emit their outputs into a running partial
    sum; when a sublayer closes its group, the partial sum becomes one completed source. The
    embedding ``x0`` is always source 0. Every mode of the package is one such plan:

    ==============  =================  ================  ==========  ===========
    mode            group              partial visible   combine     final route
    ==============  =================  ================  ==========  ===========
    delta           one sublayer       no                add         no
    delta_block     ⌈L/N⌉ layers       no                add         no
    attnres_full    one sublayer       (always empty)    replace     yes
    attnres_block   ⌈L/N⌉ layers       yes               replace     yes
    ==============  =================  ================  ==========  ===========

    In a parallel-residual model a layer's two sublayers read the same sources (those completed before
    the layer), so its two outputs are emitted only after both have been routed; both become sources.
    """

    n_layer: int
    closes_group: tuple[bool, ...]  # per sublayer: does its output complete a source?
    see_partial: bool
    additive: bool
    route_final: bool
    parallel: bool
    # completed sources some routed point reads: without a final route nothing reads the source the last
    # sublayer completes, so it is neither accumulated nor stored (a field, read on every emit)
    n_stored: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_stored", 1 + sum(self.closes_group) - int(not self.route_final))

    @classmethod
    def build(
        cls, n_layer: int, layers_per_group: int | None, see_partial: bool, additive: bool, route_final: bool,
        parallel: bool,
    ) -> RoutingPlan:
        """``layers_per_group=None`` makes every sublayer its own group."""
        closes = []
        for j in range(2 * n_layer):
            layer, is_mlp = divmod(j, 2)
            if layers_per_group is None:
                closes.append(True)
            else:
                closes.append(bool(is_mlp) and ((layer + 1) % layers_per_group == 0 or layer == n_layer - 1))
        return cls(n_layer, tuple(closes), see_partial, additive, route_final, parallel)

    @classmethod
    def for_mode(cls, mode: str, n_layer: int, num_blocks: int, parallel: bool) -> RoutingPlan:
        if mode not in MODES:
            raise ValueError(f"Unknown routing mode {mode!r}: choose one of {sorted(MODES)}.")
        per_sublayer, see_partial, additive, route_final = MODES[mode]
        group = None if per_sublayer else layers_per_block(n_layer, num_blocks)
        return cls.build(n_layer, group, see_partial, additive, route_final, parallel)

    @property
    def n_routes(self) -> int:
        """Routed points: one per sublayer, plus the final hidden state for replacement modes."""
        return 2 * self.n_layer + int(self.route_final)

    def n_sources(self) -> list[int]:
        """How many sources each routed point sees (null source excluded), for stats and reports."""
        return [completed + int(partial) for completed, partial in self._visible()]

    def first_readers(self) -> tuple[int, ...]:
        """For each stored source, the first routed point that reads it (its logits are needed from there on;
        ``n_routes`` if none does, as for the last sublayer of a parallel-residual Delta model)."""
        completed = [c for c, _ in self._visible()]
        return tuple(next((k for k, c in enumerate(completed) if c > i), len(completed)) for i in range(self.n_stored))

    def _visible(self) -> list[tuple[int, bool]]:
        """Per routed point: how many completed sources it reads, and whether it also reads a partial sum."""
        points, completed, partial = [], 1, False
        for layer in range(self.n_layer):
            pair = (2 * layer, 2 * layer + 1)
            if self.parallel:
                points += [(completed, self.see_partial and partial)] * 2
                for j in pair:
                    partial, completed = self._emit(j, partial, completed)
                continue
            for j in pair:
                points.append((completed, self.see_partial and partial))
                partial, completed = self._emit(j, partial, completed)
        if self.route_final:
            points.append((completed, partial))
        return points

    def _emit(self, j: int, partial: bool, completed: int) -> tuple[bool, int]:
        return (False, completed + 1) if self.closes_group[j] else (True, completed)


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


REENTRANT_CHECKPOINTING = (
    "Depth routing does not support reentrant activation checkpointing (use_reentrant=True, "
    "CheckpointImpl.REENTRANT): a block ran without grad inside a forward with grad, and the sources it routes over "
    "would get no gradient. Use non-reentrant checkpointing: torch.utils.checkpoint.checkpoint(..., "
    "use_reentrant=False), checkpoint_wrapper's default CheckpointImpl.NO_REENTRANT, or Lightning's "
    "activation_checkpointing_policy."
)


class DepthRouter(ResidualRule):
    """Learned parameters of every routed point, stacked: row ``k`` belongs to routed point ``k``.

    * ``query`` (R, D), zero at init → uniform weights;
    * ``key_gain`` (R, D), one at init (the key RMSNorm's gain);
    * ``gate`` (R,), zero at init, only with a scalar gate (``h = s + g · r``);
    * ``null`` (R, D), zero at init, only with a null source: a learned extra value vector that
      every routed point can attend to (its key is RMSNorm(null), zero at init, so its logit starts at 0).

    Args:
        plan: which sources each routed point reads and how its mixture enters the sublayer.
        n_embd: the model's width ``D``.
        gate: a scalar gate per routed point.
        null_source: a learned null source per routed point.
        eps: the key RMSNorm's epsilon.
        backend: how the routed points are computed (:mod:`lit_dar.backends`); default
            :class:`~lit_dar.backends.BankBackend`. Under ``torch.compile`` a backend that dynamo cannot trace
            gives way to :class:`~lit_dar.backends.PlainBackend`. All backends compute the same function.
        device: where the parameters go.
    """

    def __init__(
        self, plan: RoutingPlan, n_embd: int, gate: bool, null_source: bool, eps: float = 1e-6,
        backend: RoutingBackend | None = None, device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.plan = plan
        self.eps = eps
        n_routes = plan.n_routes
        self.query = nn.Parameter(torch.empty(n_routes, n_embd, device=device))
        self.key_gain = nn.Parameter(torch.empty(n_routes, n_embd, device=device))
        self.gate = nn.Parameter(torch.empty(n_routes, device=device)) if gate else None
        self.null = nn.Parameter(torch.empty(n_routes, n_embd, device=device)) if null_source else None
        self.backend = (backend if backend is not None else BankBackend()).bind(self)
        self._traced = self.backend if self.backend.traceable else PlainBackend().bind(self)
        self._frozen: tuple[tuple, Tensor] | None = None  # the stacked queries, kept between forwards without grad
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity-friendly init: uniform weights, unit key gain, closed gate, zero null source."""
        nn.init.zeros_(self.query)
        nn.init.ones_(self.key_gain)
        if self.gate is not None:
            nn.init.zeros_(self.gate)
        if self.null is not None:
            nn.init.zeros_(self.null)

    def free_buffers(self) -> None:
        """Drop the buffers the backend keeps for the next forward (memory measurements count them that way)."""
        self.backend.free_buffers()

    def route(self, k: int, sources: tuple[Tensor, ...], stats: dict | None = None,
              logits: tuple[Tensor, ...] = (), backend: RoutingBackend | None = None) -> Tensor:
        """The mixture ``r_k`` of routed point ``k`` over explicit ``sources`` (plus its null source), by
        ``backend``'s :meth:`~lit_dar.backends.RoutingBackend.mixture` (the router's own by default). ``logits``:
        those of the first sources, where they are known already. The per-point backends call this."""
        if self.null is not None:
            sources = (self.null[k].to(sources[0].dtype).expand_as(sources[0]), *sources)
            logits = (None, *logits) if logits else ()
        with no_autocast(sources[0].device):  # the routing math is fp32 under bf16 autocast too
            return (backend or self.backend).mixture(self, k, sources, stats, logits)

    def combine(self, k: int, stream: Tensor, mixture: Tensor) -> Tensor:
        """Sublayer input: ``s + g·r`` (additive; g = 1 without a gate) or ``r`` (replacement)."""
        if not self.plan.additive:
            return mixture
        if self.gate is None:
            return stream + mixture
        return stream + self.gate[k].to(mixture.dtype) * mixture

    def start(self, x0: Tensor) -> NamedTuple:
        """The sources of a new forward: just the embedding ``x0``; the state is the backend's."""
        backend = self._traced if torch.compiler.is_compiling() else self.backend
        stats = {} if self.record_stats else None
        queries = self._stacked_queries(compute_dtype(x0.dtype))
        return backend.start(self, x0, queries, stats, torch.is_grad_enabled())

    def _stacked_queries(self, dtype: torch.dtype) -> Tensor:
        """``query ∘ key_gain`` for every routed point; without grad (decoding) it is recomputed only when the
        parameters change (their version counters or storage), not for every token. A compiled graph computes
        them in the graph (dynamo cannot trace the storage check). Parameters made under ``torch.inference_mode``
        are inference tensors, which keep no version counter: theirs are recomputed every forward."""
        if (torch.is_grad_enabled() or torch.compiler.is_compiling()
                or self.query.is_inference() or self.key_gain.is_inference()):
            return self.query.to(dtype) * self.key_gain.to(dtype)
        key = (dtype, self.query._version, self.key_gain._version, self.query.data_ptr(), self.key_gain.data_ptr())
        if self._frozen is None or self._frozen[0] != key:
            self._frozen = (key, self.query.to(dtype) * self.key_gain.to(dtype))
        return self._frozen[1]

    def layer(
        self,
        layer: int,
        stream: Tensor,
        state: NamedTuple,
        attn: Callable[[Tensor], Tensor],
        mlp: Callable[[Tensor], Tensor],
    ) -> tuple[Tensor, NamedTuple]:
        """One transformer layer: route each sublayer's input, run it, grow the stream and the sources.

        ``attn`` and ``mlp`` map a sublayer input ``h`` to the sublayer output ``v`` (norms included). The
        stream update ``s ← v + s`` is written in the order LitGPT uses, so a closed gate is bit-exact.

        The sources reach the block through ``state``, not as its tensor arguments. Reentrant activation
        checkpointing runs the block without grad and gives gradients only to its tensor arguments and
        outputs, so routed gradients would be lost: a block run without grad in a forward with grad is refused.
        """
        if state.grad and not torch.is_grad_enabled():
            raise RuntimeError(REENTRANT_CHECKPOINTING)
        backend, plan, pair = state.backend, self.plan, (2 * layer, 2 * layer + 1)
        if plan.parallel:  # both sublayers read the sources completed before this layer
            outputs = [f(backend.input(self, j, stream, state)) for j, f in zip(pair, (attn, mlp))]
            for j, v in zip(pair, outputs):
                stream, state = v + stream, backend.emit(self, state, j, v)
            return stream, state
        for j, f in zip(pair, (attn, mlp)):
            v = f(backend.input(self, j, stream, state))
            stream, state = v + stream, backend.emit(self, state, j, v)
        return stream, state

    def finish(self, stream: Tensor, state: NamedTuple) -> Tensor:
        """The hidden state fed to the final norm: the stream, or its own routed mixture (AttnRes)."""
        if self.plan.route_final:
            stream = state.backend.input(self, self.plan.n_routes - 1, stream, state, final=True)
        if state.stats is not None:
            self.last_weights = [state.stats[k] for k in sorted(state.stats)]
        return stream

    def _summarize(self) -> RoutingStatistics:
        points = [summarize_weights(alpha) for alpha in self.last_weights]
        n_sources = tuple(int(p["n_sources"]) for p in points)
        matrix = points[0]["mean_weight"].new_full((len(points), max(n_sources)), math.nan)
        for k, p in enumerate(points):
            matrix[k, : n_sources[k]] = p["mean_weight"]
        max_weight = torch.stack([p["max_weight"] for p in points])
        entropy = torch.stack([p["entropy"] for p in points])
        return RoutingStatistics(matrix, max_weight, entropy, n_sources, self.null is not None)


def routing_entropy(alpha: Tensor) -> Tensor:
    """Entropy of weights along the last dim (nats), safe at zero weights."""
    return -(alpha * alpha.clamp_min(1e-30).log()).sum(-1)


def summarize_weights(alpha: Tensor) -> dict[str, Tensor]:
    """Mean weight per source, mean max weight, mean entropy and its uniform reference, over tokens."""
    flat = alpha.reshape(-1, alpha.shape[-1]).float()
    n = flat.shape[-1]
    return {
        "mean_weight": flat.mean(0),
        "max_weight": flat.max(-1).values.mean(),
        "entropy": routing_entropy(flat).mean(),
        "n_sources": torch.tensor(n),
        "uniform_max_weight": torch.tensor(1.0 / n),
        "uniform_entropy": torch.tensor(math.log(n)),
    }


__all__ = [
    "MODES",
    "DepthRouter",
    "RoutingPlan",
    "layers_per_block",
    "routing_entropy",
    "summarize_weights",
]
