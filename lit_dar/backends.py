"""How a :class:`~lit_dar.routing.DepthRouter` computes its routed points: backends, chosen when it is built.

Every backend computes the same function (``docs/method.md``); they differ in speed and in what they keep
for backward. A backend starts a forward (its own immutable per-forward state type), gives the input of
routed point ``k``, and takes a completed sublayer output:

* :class:`BankBackend` (the default): one source bank per forward, fused-pass routing and shared products
  (:mod:`lit_dar.bank`); eager mode only.
* :class:`PlainBackend`: the routing math in plain autograd, source by source; what ``torch.compile`` traces
  (inductor fuses it), whichever backend the router was built with.

A new backend (e.g. a fused kernel) is one subclass of :class:`RoutingBackend`. Pure torch.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from lit_dar.bank import BufferPool, SourceBank, bank_input, compute_dtype, emit, group_input, no_autocast, window_size

if TYPE_CHECKING:
    from lit_dar.routing import DepthRouter, RoutingPlan


class RoutingBackend(ABC):
    """The computation behind a router's routed points.

    A backend given to a router is bound to it (:meth:`bind`: a copy, so one backend object can configure
    several routers). Its per-forward state is an immutable named tuple whose first field is the backend
    that made it, with ``stats`` (where the weights go, or ``None``) and ``grad`` (whether the forward records
    a graph) among its fields: a block replayed by activation checkpointing sees exactly the state it saw.
    """

    # whether torch.compile can trace it; otherwise the router runs PlainBackend under compile
    traceable = False

    def bind(self, router: DepthRouter) -> RoutingBackend:
        """A copy of this backend for ``router`` (its plan, parameters and buffers)."""
        bound = copy.copy(self)
        bound._setup(router)
        return bound

    def _setup(self, router: DepthRouter) -> None:
        # per stored source, the first routed point that reads it: its logits are needed from there on
        self.first_readers = router.plan.first_readers()

    @abstractmethod
    def start(self, router: DepthRouter, x0: Tensor, queries: Tensor, stats: dict | None, grad: bool) -> NamedTuple:
        """The state of a new forward: its only source is the embedding ``x0``. ``queries`` ``(R, D)`` are the
        stacked ``query ∘ key_gain`` in the compute dtype."""

    @abstractmethod
    def input(self, router: DepthRouter, k: int, stream: Tensor, state: NamedTuple, final: bool = False) -> Tensor:
        """The input of routed point ``k``: its mixture over the sources ``state`` makes visible (all of them for
        the ``final`` route), combined with the ``stream``."""

    @abstractmethod
    def emit(self, router: DepthRouter, state: NamedTuple, j: int, output: Tensor) -> NamedTuple:
        """The state after sublayer ``j`` emitted ``output`` into the running partial sum (which becomes a
        completed source when ``j`` closes its group)."""

    def mixture(self, router: DepthRouter, k: int, sources: tuple[Tensor, ...], stats: dict | None,
                logits: tuple[Tensor | None, ...] = ()) -> Tensor:
        """``r_k`` over explicit ``sources`` (null source included) in plain autograd: see :meth:`DepthRouter.route`."""
        dtype = compute_dtype(sources[0].dtype)
        q = router.query[k].to(dtype) * router.key_gain[k].to(dtype)
        return plain_depth_attention(sources, q, router.eps, stats, k, logits)

    def free_buffers(self) -> None:
        """Drop buffers kept for the next forward (none unless the backend pools them)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# --------------------------------------------------------------------------------------------------
# Plain autograd
# --------------------------------------------------------------------------------------------------


def logits_of(x: Tensor, queries: Tensor, eps: float) -> Tensor:
    """``(q_k · u) / rms(u)`` of one fp32 source ``x`` ``(..., D)`` for every row ``q_k`` of ``queries``
    ``(R, D)``: ``(..., R)``, one product over the source."""
    return (x @ queries.t()) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def plain_depth_attention(sources: tuple[Tensor, ...], q: Tensor, eps: float, stats: dict | None, key: int,
                          logits: tuple[Tensor | None, ...] = ()) -> Tensor:
    """``r = Σ_i softmax_i(q · u_i / rms(u_i)) u_i`` in plain autograd: what ``torch.compile`` traces.

    Source by source, never stacked: a stack is a new ``n×D`` tensor per routed point, which autograd (and
    a compiled graph) would keep for backward — O(L²) memory for Delta. Written this way only the ``n``
    logits per token are new; the mixture is one fused pass over the sources. ``logits`` gives those of
    the first sources where they are known already (:class:`PlainBackend` computes a source's logits for
    every routed point once, when the source is completed), so a routed point reads its sources once, not twice.
    """
    xs = [u.to(q.dtype) for u in sources]
    known = logits + (None,) * (len(xs) - len(logits))
    logits = torch.stack([logits_of(x, q[None], eps)[..., 0] if lg is None else lg for x, lg in zip(xs, known)], -1)
    alpha = torch.softmax(logits, dim=-1)
    if stats is not None:
        stats[key] = alpha.detach()
    mixture = alpha[..., 0, None] * xs[0]
    for i in range(1, len(xs)):
        mixture = mixture + alpha[..., i, None] * xs[i]
    return mixture.to(sources[0].dtype)


class PlainState(NamedTuple):
    """The sources of one forward as tensors, the running partial sum, and per completed source its logits
    for the routed points from its first reader on, ``(..., R - first)``."""

    backend: PlainBackend
    sources: tuple[Tensor, ...]
    partial: Tensor | None
    stats: dict | None
    queries: Tensor
    logits: tuple[Tensor, ...]
    grad: bool


class PlainBackend(RoutingBackend):
    """The routing math in plain autograd, one routed point at a time (:func:`plain_depth_attention`)."""

    traceable = True

    def start(self, router: DepthRouter, x0: Tensor, queries: Tensor, stats: dict | None, grad: bool) -> PlainState:
        return self._completed(router, PlainState(self, (x0,), None, stats, queries, (), grad))

    def input(self, router: DepthRouter, k: int, stream: Tensor, state: PlainState, final: bool = False) -> Tensor:
        logits = tuple(x[..., k - first] for x, first in zip(state.logits, self.first_readers))
        sources = state.sources
        if state.partial is not None and (final or router.plan.see_partial):
            sources = (*sources, state.partial)
        # through router.route, the one place that takes a routed point's sources as a tuple
        return router.combine(k, stream, router.route(k, sources, state.stats, logits, self))

    def emit(self, router: DepthRouter, state: PlainState, j: int, output: Tensor) -> PlainState:
        plan, sources = router.plan, state.sources
        if len(sources) == plan.n_stored and not plan.see_partial:
            return state  # the last group of a plan without a final route: no routed point reads it
        partial = output if state.partial is None else state.partial + output
        if not plan.closes_group[j]:
            return PlainState(self, sources, partial, state.stats, state.queries, state.logits, state.grad)
        state = PlainState(self, (*sources, partial), None, state.stats, state.queries, state.logits, state.grad)
        return self._completed(router, state)

    def _completed(self, router: DepthRouter, state: PlainState) -> PlainState:
        """Give the newest completed source its logits for every routed point that reads it (from its first
        reader on), in one product: a routed point then reads its sources once (the mixture), not twice."""
        i = len(state.sources) - 1
        with no_autocast(state.queries.device):
            x = state.sources[i].to(state.queries.dtype)
            logits = logits_of(x, state.queries[self.first_readers[i]:], router.eps)
            return state._replace(logits=(*state.logits, logits))


# --------------------------------------------------------------------------------------------------
# The source bank
# --------------------------------------------------------------------------------------------------


def shared_source_groups(plan: RoutingPlan) -> tuple[tuple[int, int] | None, ...]:
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


def lookahead_windows(plan: RoutingPlan, groups: tuple[tuple[int, int] | None, ...],
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


class BankState(NamedTuple):
    """The sources of one forward in a :class:`SourceBank`: ``tokens`` holds one autograd token per completed
    source (written once per slot, so a replayed block rewrites the same values), ``partial`` the running sum."""

    backend: BankBackend
    bank: SourceBank
    tokens: tuple[Tensor | None, ...]
    partial: Tensor | None
    stats: dict | None
    queries: Tensor
    grad: bool


class BankBackend(RoutingBackend):
    """One token-major source bank per forward, fused-pass routing and shared products (:mod:`lit_dar.bank`).

    Args:
        lookahead: the largest window of routed points (forward) or sources (backward) that share one pass
            over what they read, ``K ≈ √(2n)`` for a prefix of ``n`` (:func:`~lit_dar.bank.window_size`); below 2,
            no windows.
        lookahead_tokens: windows only from this many tokens per forward on (decoding is cheaper without).
        defer_from: a window whose shared prefix has at least this many sources shares its backward's ``dα``
            read too (:meth:`SourceBank.window_backward`).
    """

    def __init__(self, lookahead: int = 8, lookahead_tokens: int = 256, defer_from: int = 16) -> None:
        self.lookahead, self.lookahead_tokens, self.defer_from = lookahead, lookahead_tokens, defer_from

    def __repr__(self) -> str:
        return (f"BankBackend(lookahead={self.lookahead}, lookahead_tokens={self.lookahead_tokens}, "
                f"defer_from={self.defer_from})")

    def _setup(self, router: DepthRouter) -> None:
        super()._setup(router)
        plan, null = router.plan, router.null is not None
        self.pool = BufferPool()
        # routed points that read the same sources share one product (not with a null source: it differs by point)
        self.groups = shared_source_groups(plan) if not null else (None,) * plan.n_routes
        self.grouped = any(self.groups)
        self.windows = () if null else lookahead_windows(plan, self.groups, self.lookahead)

    def free_buffers(self) -> None:
        self.pool.clear()

    def start(self, router: DepthRouter, x0: Tensor, queries: Tensor, stats: dict | None, grad: bool) -> BankState:
        lookahead = self.lookahead if x0.numel() >= self.lookahead_tokens * x0.shape[-1] else 0
        windowed = lookahead >= 2 and bool(self.windows)
        gate = router.gate
        bank = SourceBank(
            x0, router.plan.n_stored, queries, router.eps, self.pool, self.first_readers, lookahead,
            windows=self.windows if windowed else (), defer_from=self.defer_from if windowed else 0,
            gate=gate if gate is not None and self.grouped else None,
            window_gates=gate.detach() if windowed and gate is not None and router.plan.additive else None,
        )
        token = emit(bank, 0, x0, queries)
        return BankState(self, bank, (token,), None, stats, queries, grad)

    def input(self, router: DepthRouter, k: int, stream: Tensor, state: BankState, final: bool = False) -> Tensor:
        group = self.groups[k]
        if group is not None:  # a block of Delta Block: one product per block, not per routed point
            return group_input(state.bank, k, group, len(state.tokens), stream, router.gate, state.stats, state.tokens)
        plan = router.plan
        post = state.partial if (final or plan.see_partial) else None
        pre = router.null[k] if router.null is not None else None
        stream = stream if plan.additive else None
        gate = router.gate[k] if router.gate is not None and stream is not None else None
        # the bank holds the sources' logits; the query itself is only needed for a null or partial source
        q = state.queries[k] if pre is not None or post is not None else None
        return bank_input(state.bank, k, len(state.tokens), q, pre, post, stream, gate, state.stats, state.tokens)

    def emit(self, router: DepthRouter, state: BankState, j: int, output: Tensor) -> BankState:
        plan, tokens = router.plan, state.tokens
        if len(tokens) == plan.n_stored and not plan.see_partial:
            return state  # the last group of a plan without a final route: no routed point reads it
        partial = output if state.partial is None else state.partial + output
        if not plan.closes_group[j]:
            return BankState(self, state.bank, tokens, partial, state.stats, state.queries, state.grad)
        tokens = (*tokens, emit(state.bank, len(tokens), partial, state.queries))
        return BankState(self, state.bank, tokens, None, state.stats, state.queries, state.grad)


__all__ = ["BankBackend", "BankState", "PlainBackend", "PlainState", "RoutingBackend", "plain_depth_attention"]
