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

How the router computes the same function fast in eager mode (a source bank per forward, fused backward,
shared products) is :mod:`lit_dar.bank`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from lit_dar.bank import (
    BufferPool, SourceBank, bank_input, compute_dtype, emit, group_input, no_autocast, window_size,
)
from lit_dar.rule import ResidualRule, RoutingStatistics

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


class _DepthAttention(torch.autograd.Function):
    """``r = Σ_i softmax_i(q · u_i / rms(u_i)) u_i``, fp32 inside, with a recomputing backward.

    Saves only the sources (which the model keeps alive as sources anyway) and the pseudo-query; the
    stacked fp32 copy, the keys and the weights exist only transiently in forward and backward.
    """

    @staticmethod
    def forward(ctx, q: Tensor, eps: float, stats: dict | None, key: int, *sources: Tensor) -> Tensor:  # type: ignore[override]
        x = torch.stack([u.to(q.dtype) for u in sources], dim=-2)  # (..., n, D)
        _, _, alpha = _weights(x, q, eps)
        out = (alpha.unsqueeze(-2) @ x).squeeze(-2)
        if stats is not None:
            stats[key] = alpha.detach()
        ctx.save_for_backward(q, *sources)
        ctx.eps, ctx.q_dtype = eps, q.dtype
        return out.to(sources[0].dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        q, *sources = ctx.saved_tensors
        x = torch.stack([u.to(q.dtype) for u in sources], dim=-2)
        inv_rms, dots, alpha = _weights(x, q, ctx.eps)
        g = grad_out.to(q.dtype)
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
    dtype = compute_dtype(sources[0].dtype)
    q = query.to(dtype) * key_gain.to(dtype)
    return _DepthAttention.apply(q, eps, stats, key, *sources)


def reference_depth_attention(sources: list[Tensor], query: Tensor, key_gain: Tensor, eps: float = 1e-6) -> Tensor:
    """The same op in plain autograd, stacking the sources: the obvious definition, for tests."""
    x = torch.stack([u.float() for u in sources], dim=-2)
    keys = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * key_gain.float()
    alpha = torch.softmax(keys @ query.float(), dim=-1)
    return (alpha.unsqueeze(-1) * x).sum(-2).to(sources[0].dtype)


def _logits_of(x: Tensor, queries: Tensor, eps: float) -> Tensor:
    """``(q_k · u) / rms(u)`` of one fp32 source ``x`` ``(..., D)`` for every row ``q_k`` of ``queries``
    ``(R, D)``: ``(..., R)``, one product over the source."""
    return (x @ queries.t()) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _plain_depth_attention(sources: tuple[Tensor, ...], q: Tensor, eps: float, stats: dict | None, key: int,
                           logits: tuple[Tensor | None, ...] = ()) -> Tensor:
    """The routing math in plain autograd: what ``torch.compile`` traces (inductor fuses it).

    Source by source, never stacked: a stack is a new ``n×D`` tensor per routed point, which autograd (and
    a compiled graph) would keep for backward — O(L²) memory for Delta. Written this way only the ``n``
    logits per token are new; the mixture is one fused pass over the sources. ``logits`` gives those of
    the first sources where they are known already (the router computes a source's logits for every
    routed point once, when the source is completed), so a routed point reads its sources once, not twice.
    """
    xs = [u.to(q.dtype) for u in sources]
    known = logits + (None,) * (len(xs) - len(logits))
    logits = torch.stack([_logits_of(x, q[None], eps)[..., 0] if lg is None else lg for x, lg in zip(xs, known)], -1)
    alpha = torch.softmax(logits, dim=-1)
    if stats is not None:
        stats[key] = alpha.detach()
    mixture = alpha[..., 0, None] * xs[0]
    for i in range(1, len(xs)):
        mixture = mixture + alpha[..., i, None] * xs[i]
    return mixture.to(sources[0].dtype)


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


class RoutingState(NamedTuple):
    """The sources of one forward pass: completed sources and the running partial sum.

    Immutable: :meth:`emit` returns a new state, so a block replayed by activation checkpointing sees
    exactly the state it saw the first time. On the fast path the completed sources live in ``bank``
    (written once per slot, so a replay rewrites the same values) and ``tokens`` holds one autograd token
    per completed source instead of the source itself; ``sources`` is then empty. A named tuple: one is
    made per sublayer, and a decoded token cannot afford a dataclass constructor each time.
    """

    sources: tuple[Tensor, ...]
    partial: Tensor | None = None
    stats: dict | None = None
    bank: SourceBank | None = None
    tokens: tuple[Tensor, ...] = ()
    queries: Tensor | None = None
    # the plain path (torch.compile, ``implementation="autograd"``): per completed source, its logits for the
    # routed points from its first reader on ``(..., R - first)``, computed by the router when it completes
    logits: tuple[Tensor, ...] | None = None
    # whether the forward that made the state records a graph (see DepthRouter.layer)
    grad: bool = False

    @property
    def n_completed(self) -> int:
        return len(self.tokens) if self.bank is not None else len(self.sources)

    def visible(self, plan: RoutingPlan) -> tuple[Tensor, ...]:
        if plan.see_partial and self.partial is not None:
            return (*self.sources, self.partial)
        return self.sources

    def final(self) -> tuple[Tensor, ...]:
        """All sources after the last layer (the last group has always been closed by then)."""
        return self.sources if self.partial is None else (*self.sources, self.partial)

    def emit(self, plan: RoutingPlan, j: int, output: Tensor) -> RoutingState:
        if self.n_completed == plan.n_stored and not plan.see_partial:
            return self  # the last group of a plan without a final route: no routed point reads it
        partial = output if self.partial is None else self.partial + output
        sources, tokens = self.sources, self.tokens
        if not plan.closes_group[j]:
            return RoutingState(sources, partial, self.stats, self.bank, tokens, self.queries, self.logits, self.grad)
        if self.bank is not None:
            tokens = (*tokens, emit(self.bank, len(tokens), partial, self.queries))
        else:
            sources = (*sources, partial)
        return RoutingState(sources, None, self.stats, self.bank, tokens, self.queries, self.logits, self.grad)


def _shared_source_groups(plan: RoutingPlan) -> tuple[tuple[int, int] | None, ...]:
    """Per routed point, the run ``[k0, k1)`` of consecutive routed points that read the same sources (no
    source completes in between), or ``None`` for a run of one. Only additive plans without a visible
    partial sum qualify: there the run of a block shares its mixtures' sources exactly."""
    counts = plan.n_sources()
    if not plan.additive or plan.see_partial:
        return (None,) * len(counts)
    groups: list[tuple[int, int] | None] = []
    k0 = 0
    for k in range(1, len(counts) + 1):
        if k == len(counts) or counts[k] != counts[k0]:
            groups += [(k0, k) if k - k0 > 1 else None] * (k - k0)
            k0 = k
    return tuple(groups)


def _lookahead_windows(plan: RoutingPlan, groups: tuple[tuple[int, int] | None, ...],
                       size: int) -> tuple[tuple[int, int, int] | None, ...]:
    """Per routed point, its window ``(k0, k1, n0)`` — up to ``size`` consecutive routed points ``[k0, k1)``
    whose first ``n0`` sources (the first point's) go through one product each way
    (:meth:`SourceBank.window_input`, :meth:`SourceBank.window_backward`) — or ``None``. Points of a
    shared-source group have their own product; a visible partial sum is not a bank source, so such plans
    get no windows."""
    windows: list[tuple[int, int, int] | None] = [None] * len(groups)
    if size < 2 or plan.see_partial:
        return tuple(windows)
    counts = plan.n_sources()
    k = 0
    while k < len(groups):  # a window's size follows its shared prefix (window_size); it stops at a group
        end = k
        if groups[k] is None:
            end = min(k + window_size(counts[k], size), len(groups))
            end = next((j for j in range(k, end) if groups[j] is not None), end)
        if end - k > 1:
            windows[k:end] = [(k, end, counts[k])] * (end - k)
        k = max(end, k + 1)
    return tuple(windows)


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
        # "bank": the fast path (one source bank per forward, fused-pass routing); "op": one
        # depth_attention call per routed point; "autograd": the plain math, which is also what runs
        # under torch.compile (inductor fuses it). All three compute the same function.
        self.implementation = "bank"
        self._pool = BufferPool()
        self._groups = _shared_source_groups(plan) if not null_source else (None,) * n_routes
        self._first_readers = plan.first_readers()
        # windows of K ≈ √(2n) routed points (forward) or sources (backward), at most ``lookahead``, share one
        # pass over what they read (bank.window_size; SourceBank.window_input, _value_ahead), from
        # ``lookahead_tokens`` tokens on; a window whose shared prefix has at least ``defer_from`` sources
        # shares the backward's dα read too (SourceBank.window_backward). Tuning knobs of the same function
        # (lookahead 0 turns the sharing off)
        self.lookahead, self.lookahead_tokens, self.defer_from = 8, 256, 16
        self._window_cache: tuple[int, tuple] = (-1, ())
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
        """Drop the pooled bank buffers kept for the next forward (memory measurements count them that way)."""
        self._pool.clear()

    def route(self, k: int, sources: tuple[Tensor, ...], stats: dict | None = None,
              logits: tuple[Tensor, ...] = ()) -> Tensor:
        """The mixture ``r_k`` of routed point ``k`` over ``sources`` (plus its null source); ``logits``: those
        of the first sources, where the plain path knows them already (see :meth:`_completed`)."""
        if self.null is not None:
            sources = (self.null[k].to(sources[0].dtype).expand_as(sources[0]), *sources)
            logits = (None, *logits) if logits else ()
        with no_autocast(sources[0].device):  # the routing math is fp32 under bf16 autocast too
            if self._plain():
                dtype = compute_dtype(sources[0].dtype)
                q = self.query[k].to(dtype) * self.key_gain[k].to(dtype)
                return _plain_depth_attention(sources, q, self.eps, stats, k, logits)
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
        stats, grad = ({} if self.record_stats else None), torch.is_grad_enabled()
        if self._use_bank():
            queries = self._stacked_queries(compute_dtype(x0.dtype))
            # below ``lookahead_tokens`` tokens (decoding) a pass is cheaper than the ops a window adds
            lookahead = self.lookahead if x0.numel() >= self.lookahead_tokens * x0.shape[-1] else 0
            bank = SourceBank(x0, self.plan.n_stored, queries, self.eps, self._pool, self._first_readers, lookahead)
            if lookahead >= 2 and self.null is None:
                bank.windows, bank.defer_from = self._windows(), self.defer_from
                bank.window_gates = self.gate.detach() if self.gate is not None and self.plan.additive else None
            if self.gate is not None and any(self._groups):
                bank.gate = self.gate
            token = emit(bank, 0, x0, queries)
            return RoutingState((), None, stats, bank, (token,), queries, grad=grad)
        if self._plain():
            queries = self._stacked_queries(compute_dtype(x0.dtype))
            return self._completed(RoutingState((x0,), None, stats, queries=queries, logits=(), grad=grad))
        return RoutingState((x0,), None, stats, grad=grad)

    def _plain(self) -> bool:
        """Whether the plain math runs: under ``torch.compile``, or when asked for."""
        return self.implementation == "autograd" or torch.compiler.is_compiling()

    def _completed(self, state: RoutingState) -> RoutingState:
        """On the plain path, give a newly completed source its logits for every routed point that reads it
        (from its first reader on), in one product: a routed point then reads its sources once (the mixture),
        not twice (logits, mixture)."""
        if state.logits is None or len(state.logits) == len(state.sources):
            return state
        i = len(state.sources) - 1
        with no_autocast(state.queries.device):
            x = state.sources[i].to(state.queries.dtype)
            logits = _logits_of(x, state.queries[self._first_readers[i]:], self.eps)
            return state._replace(logits=(*state.logits, logits))

    def _windows(self) -> tuple[tuple[int, int, int] | None, ...]:
        if self._window_cache[0] != self.lookahead:
            self._window_cache = (self.lookahead, _lookahead_windows(self.plan, self._groups, self.lookahead))
        return self._window_cache[1]

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

    def _use_bank(self) -> bool:
        if self.implementation == "bank":
            return not torch.compiler.is_compiling()
        if self.implementation not in ("op", "autograd"):
            raise ValueError(f"Unknown routing implementation {self.implementation!r}: use 'bank', 'op' or 'autograd'.")
        return False

    def _input(self, k: int, stream: Tensor, state: RoutingState, final: bool = False) -> Tensor:
        """The input of routed point ``k``: its mixture over what ``state`` makes visible, combined with the stream."""
        if state.bank is None:
            logits = () if state.logits is None else tuple(
                x[..., k - first] for x, first in zip(state.logits, self._first_readers)
            )
            mixture = self.route(k, state.final() if final else state.visible(self.plan), state.stats, logits)
            return self.combine(k, stream, mixture)
        group = self._groups[k]
        if group is not None:  # a block of Delta Block: one product per block, not per routed point
            return group_input(state.bank, k, group, state.n_completed, stream, self.gate, state.stats, state.tokens)
        post = state.partial if (final or self.plan.see_partial) else None
        pre = self.null[k] if self.null is not None else None
        stream = stream if self.plan.additive else None
        gate = self.gate[k] if self.gate is not None and stream is not None else None
        # the bank holds the sources' logits; the query itself is only needed for a null or partial source
        q = state.queries[k] if pre is not None or post is not None else None
        return bank_input(state.bank, k, state.n_completed, q, pre, post, stream, gate, state.stats, state.tokens)

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

        The sources reach the block through ``state``, not as its tensor arguments. Reentrant activation
        checkpointing runs the block without grad and gives gradients only to its tensor arguments and
        outputs, so routed gradients would be lost: a block run without grad in a forward with grad is refused.
        """
        if state.grad and not torch.is_grad_enabled():
            raise RuntimeError(REENTRANT_CHECKPOINTING)
        plan, pair = self.plan, (2 * layer, 2 * layer + 1)
        if plan.parallel:  # both sublayers read the sources completed before this layer
            outputs = [f(self._input(j, stream, state)) for j, f in zip(pair, (attn, mlp))]
            for j, v in zip(pair, outputs):
                stream, state = v + stream, self._completed(state.emit(plan, j, v))
            return stream, state
        for j, f in zip(pair, (attn, mlp)):
            v = f(self._input(j, stream, state))
            stream, state = v + stream, self._completed(state.emit(plan, j, v))
        return stream, state

    def finish(self, stream: Tensor, state: RoutingState) -> Tensor:
        """The hidden state fed to the final norm: the stream, or its own routed mixture (AttnRes)."""
        if self.plan.route_final:
            stream = self._input(self.plan.n_routes - 1, stream, state, final=True)
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
    "RoutingState",
    "depth_attention",
    "layers_per_block",
    "reference_depth_attention",
    "routing_entropy",
    "summarize_weights",
]
