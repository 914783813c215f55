"""Depth attention over earlier representations: the routing math, free of LitGPT and Lightning.

Everything a routed sublayer needs lives here:

* :func:`depth_attention` — ``α_i = softmax_i(w · RMSNorm(u_i))``, ``r = Σ_i α_i u_i`` over a handful of
  source tensors, as a custom autograd function that keeps only references to the sources for backward
  and recomputes keys, logits and weights there. Stacking the sources and letting autograd save the
  stack would make saved activations grow as L² with depth.
* :class:`RoutingPlan` — which sources each sublayer sees and how its mixture is combined. The four
  modes are data in this plan, not branches in the forward.
* :class:`RoutingState` — the per-forward source bookkeeping (completed sources + the running partial
  sum of the current group), immutable so that activation checkpointing can replay a block.
* :class:`DepthRouter` — the learned parameters of all routed points in one module, so they sit under one
  prefix, are tiny, and can be initialised on the meta device through ``reset_parameters``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

# --------------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------------


def _weights(x: Tensor, q: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Keys, logits and softmax weights for stacked fp32 sources ``x`` of shape (..., n, D).

    ``q`` is the pseudo-query already multiplied by the key-norm gain, so that
    ``w · (γ ∘ u / rms(u)) = (w ∘ γ) · u / rms(u)`` needs one dot product per source.
    """
    inv_rms = torch.rsqrt(x.pow(2).mean(-1) + eps)  # (..., n)
    dots = x @ q  # (..., n)
    logits = dots * inv_rms
    return inv_rms, dots, torch.softmax(logits, dim=-1)


def _stack(sources: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
    """Sources stacked on dim -2 in the accumulation dtype: fp32, or fp64 for float64 inputs."""
    dtype = torch.promote_types(sources[0].dtype, torch.float32)
    return torch.stack([u.to(dtype) for u in sources], dim=-2)


class _DepthAttention(torch.autograd.Function):
    """``r = Σ_i softmax_i(q · u_i / rms(u_i)) u_i``, fp32 inside, with a recomputing backward.

    Saves only the sources (which the model keeps alive as sources anyway) and the pseudo-query; the
    stacked fp32 copy, the keys and the weights exist only transiently in forward and backward.
    """

    @staticmethod
    def forward(ctx, q: Tensor, eps: float, stats: dict | None, key: int, *sources: Tensor) -> Tensor:  # type: ignore[override]
        x = _stack(sources)  # (..., n, D)
        _, _, alpha = _weights(x, q.to(x.dtype), eps)
        out = (alpha.unsqueeze(-2) @ x).squeeze(-2)
        if stats is not None:
            stats[key] = alpha.detach()
        ctx.save_for_backward(q, *sources)
        ctx.eps, ctx.q_dtype = eps, q.dtype
        return out.to(sources[0].dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        q, *sources = ctx.saved_tensors
        x = _stack(sources)
        q = q.to(x.dtype)
        inv_rms, dots, alpha = _weights(x, q, ctx.eps)
        g = grad_out.to(x.dtype)
        d_alpha = (x @ g.unsqueeze(-1)).squeeze(-1)  # (..., n): u_i · dr
        d_logit = alpha * (d_alpha - (alpha * d_alpha).sum(-1, keepdim=True))
        # logit_i = (q · u_i) · inv_rms_i, inv_rms_i = (mean(u_i²) + eps)^(-1/2)
        c = d_logit * inv_rms  # coefficient of q in d logit_i / d u_i
        c_u = -d_logit * dots * inv_rms.pow(3) / x.shape[-1]  # coefficient of u_i
        d_x = alpha.unsqueeze(-1) * g.unsqueeze(-2) + c.unsqueeze(-1) * q + c_u.unsqueeze(-1) * x
        d_q = (c.unsqueeze(-1) * x).flatten(0, -2).sum(0).to(ctx.q_dtype) if ctx.needs_input_grad[0] else None
        d_sources = [d_x[..., i, :].to(u.dtype) for i, u in enumerate(sources)]
        return (d_q, None, None, None, *d_sources)


def depth_attention(
    sources: list[Tensor] | tuple[Tensor, ...],
    query: Tensor,
    key_gain: Tensor,
    eps: float = 1e-6,
    stats: dict | None = None,
    key: int = 0,
) -> Tensor:
    """Softmax attention across depth for one sublayer.

    Args:
        sources: the ``n`` source tensors ``u_i``, each ``(..., D)``, any float dtype.
        query: the learned pseudo-query ``w`` of shape ``(D,)``.
        key_gain: the gain ``γ`` of the key RMSNorm, shape ``(D,)``.
        eps: RMSNorm epsilon.
        stats: if a dict is given, the weights ``α`` (shape ``(..., n)``) are stored in it under ``key``
            (a dict, not a list, so that a block replayed by activation checkpointing overwrites).
        key: see ``stats``.

    Returns:
        ``r = Σ_i α_i u_i`` in the sources' dtype; logits, softmax and mixture are computed in fp32.
    """
    q = query.to(torch.promote_types(query.dtype, torch.float32)) * key_gain
    return _DepthAttention.apply(q, eps, stats, key, *sources)


def reference_depth_attention(sources: list[Tensor], query: Tensor, key_gain: Tensor, eps: float = 1e-6) -> Tensor:
    """The same op in plain autograd, stacking the sources: the obvious definition, for tests."""
    x = torch.stack([u.float() for u in sources], dim=-2)
    keys = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * key_gain.float()
    alpha = torch.softmax(keys @ query.float(), dim=-1)
    return (alpha.unsqueeze(-1) * x).sum(-2).to(sources[0].dtype)


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
        counts, completed, partial = [], 1, False
        for layer in range(self.n_layer):
            pair = (2 * layer, 2 * layer + 1)
            if self.parallel:
                counts += [completed + int(self.see_partial and partial)] * 2
                for j in pair:
                    partial, completed = self._emit(j, partial, completed)
                continue
            for j in pair:
                counts.append(completed + int(self.see_partial and partial))
                partial, completed = self._emit(j, partial, completed)
        if self.route_final:
            counts.append(completed + int(partial))
        return counts

    def _emit(self, j: int, partial: bool, completed: int) -> tuple[bool, int]:
        return (False, completed + 1) if self.closes_group[j] else (True, completed)


@dataclass(frozen=True)
class RoutingState:
    """The sources of one forward pass: completed sources and the running partial sum.

    Immutable: :meth:`emit` returns a new state, so a block replayed by activation checkpointing sees
    exactly the state it saw the first time.
    """

    sources: tuple[Tensor, ...]
    partial: Tensor | None = None
    stats: dict | None = field(default=None, compare=False)

    def visible(self, plan: RoutingPlan) -> tuple[Tensor, ...]:
        if plan.see_partial and self.partial is not None:
            return (*self.sources, self.partial)
        return self.sources

    def final(self) -> tuple[Tensor, ...]:
        """All sources after the last layer (the last group has always been closed by then)."""
        return self.sources if self.partial is None else (*self.sources, self.partial)

    def emit(self, plan: RoutingPlan, j: int, output: Tensor) -> RoutingState:
        partial = output if self.partial is None else self.partial + output
        if plan.closes_group[j]:
            return RoutingState((*self.sources, partial), None, self.stats)
        return RoutingState(self.sources, partial, self.stats)


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


class DepthRouter(nn.Module):
    """Learned parameters of every routed point, stacked: row ``k`` belongs to routed point ``k``.

    * ``query`` (R, D), zero at init → uniform weights;
    * ``key_gain`` (R, D), one at init (the key RMSNorm's gain);
    * ``gate`` (R,), zero at init, only with a scalar gate (``h = s + g · r``);
    * ``null`` (R, D), zero at init, only with a null source: a learned extra value vector that
      every routed point can attend to (its key is RMSNorm(null), zero at init, so its logit starts at 0).
    """

    def __init__(
        self, plan: RoutingPlan, n_embd: int, gate: bool, null_source: bool, eps: float = 1e-6,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.plan = plan
        self.eps = eps
        n_routes = plan.n_routes
        self.query = nn.Parameter(torch.empty(n_routes, n_embd, device=device))
        self.key_gain = nn.Parameter(torch.empty(n_routes, n_embd, device=device))
        self.gate = nn.Parameter(torch.empty(n_routes, device=device)) if gate else None
        self.null = nn.Parameter(torch.empty(n_routes, n_embd, device=device)) if null_source else None
        self.record_stats = False
        self.last_weights: list[Tensor] = []
        self.config_dict: dict = {}  # what built this router; saved and checked with the weights
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity-friendly init: uniform weights, unit key gain, closed gate, zero null source."""
        nn.init.zeros_(self.query)
        nn.init.ones_(self.key_gain)
        if self.gate is not None:
            nn.init.zeros_(self.gate)
        if self.null is not None:
            nn.init.zeros_(self.null)

    def get_extra_state(self) -> dict:
        return {"config": dict(self.config_dict)}

    def set_extra_state(self, state: dict) -> None:
        """Refuse weights made for another routing config: same shapes can still mean other sources."""
        saved = dict(state.get("config", {}))
        if saved != self.config_dict:
            diff = {k: (saved.get(k), self.config_dict.get(k)) for k in set(saved) | set(self.config_dict)
                    if saved.get(k) != self.config_dict.get(k)}
            raise ValueError(
                f"The checkpoint's routing config differs from this model's (field: (checkpoint, model)): {diff}. "
                "Patch the model with the checkpoint's config (lit_dar.load_model reads it from dar_config.yaml)."
            )

    def route(self, k: int, sources: tuple[Tensor, ...], stats: dict | None = None) -> Tensor:
        """The mixture ``r_k`` of routed point ``k`` over ``sources`` (plus its null source)."""
        if self.null is not None:
            sources = (self.null[k].to(sources[0].dtype).expand_as(sources[0]), *sources)
        return depth_attention(sources, self.query[k], self.key_gain[k], self.eps, stats, k)

    def combine(self, k: int, stream: Tensor, mixture: Tensor) -> Tensor:
        """Sublayer input: ``s + g·r`` (additive; g = 1 without a gate) or ``r`` (replacement)."""
        if not self.plan.additive:
            return mixture
        if self.gate is None:
            return stream + mixture
        return stream + self.gate[k].to(mixture.dtype) * mixture

    # The residual-rule interface the patched model calls: start → layer (per block) → finish.

    def start(self, x0: Tensor) -> RoutingState:
        """The sources of a new forward: just the embedding ``x0``."""
        return RoutingState((x0,), None, {} if self.record_stats else None)

    def layer(
        self,
        layer: int,
        stream: Tensor,
        state: RoutingState,
        attn: Callable[[Tensor], Tensor],
        mlp: Callable[[Tensor], Tensor],
    ) -> tuple[Tensor, RoutingState]:
        """One transformer layer: route each sublayer's input, run it, grow the stream and the sources.

        ``attn`` and ``mlp`` map a sublayer input ``h`` to the sublayer output ``v`` (norms included). The
        stream update ``s ← v + s`` is written in the order LitGPT uses, so a closed gate is bit-exact.
        """
        plan, pair = self.plan, (2 * layer, 2 * layer + 1)
        if plan.parallel:  # both sublayers read the sources completed before this layer
            seen = state.visible(plan)
            outputs = [f(self.combine(j, stream, self.route(j, seen, state.stats))) for j, f in zip(pair, (attn, mlp))]
            for j, v in zip(pair, outputs):
                stream, state = v + stream, state.emit(plan, j, v)
            return stream, state
        for j, f in zip(pair, (attn, mlp)):
            v = f(self.combine(j, stream, self.route(j, state.visible(plan), state.stats)))
            stream, state = v + stream, state.emit(plan, j, v)
        return stream, state

    def finish(self, stream: Tensor, state: RoutingState) -> Tensor:
        """The hidden state fed to the final norm: the stream, or its own routed mixture (AttnRes)."""
        if self.plan.route_final:
            stream = self.route(self.plan.n_routes - 1, state.final(), state.stats)
        if state.stats is not None:
            self.last_weights = [state.stats[k] for k in sorted(state.stats)]
        return stream


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
    "RoutingState",
    "depth_attention",
    "layers_per_block",
    "reference_depth_attention",
    "routing_entropy",
    "summarize_weights",
]
