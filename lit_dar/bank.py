"""The fast path of the routing: one token-major source bank per forward, and its autograd functions.

:mod:`lit_dar.routing` holds the plans and the router, :mod:`lit_dar.backends` the backends; this module
holds how :class:`~lit_dar.backends.BankBackend` computes the routing quickly in eager mode. Its public
surface is what that backend calls: :class:`SourceBank` (one per forward), :class:`BufferPool` (one per
router), :func:`emit`, :func:`bank_input` and :func:`group_input`. Pure torch, like the rest of the routing math.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The routing math runs in fp32, or in fp64 for fp64 inputs (gradient checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The routed points of one forward all read prefixes of the same growing list of sources. The bank stores
# that list once, token-major (``values[t, i]`` = source ``i`` at token ``t``), in fp32, together with each
# source's inverse RMS and its logit for every routed point, ``(u·q_k)·inv`` (computed once, when the source is
# completed). A routed point over the first ``n`` sources is then one batched pass over ``values[:, :n]``
# forward (the mixture, fused with the stream and the gate: ``h = s + Σ_i (g·α_i) u_i`` in one
# ``baddbmm``) and one backward (``dα = U·g``); nothing is stacked, and nothing per routed point is saved
# but its weights (``n`` numbers per token).
#
# A source's gradient is not accumulated routed point by routed point (``n`` read-modify-writes of a
# gradient buffer each). A routed point's backward only leaves its gradient ``g_k`` and, per source, its
# weight ``w_ki`` and ``dlogit_ki``; the source's own backward node (``_Emit``, run after every routed point
# that read it, because each of those takes the source's token as input) then reads them once:
# ``Σ_k w_ki g_k`` (one batched pass over the readers' ``g_k``) plus the terms through the source's key
# (``∂logit/∂u = q·inv − dot·inv³·u/D``): ``inv·(dlogit @ Q) − inv²/D·(dlogit·logit)·u``, and returns
# ``dlogitᵀ @ (inv·u)`` as the gradient of the stacked queries ``Q``. The buffers come from a per-router
# pool (:class:`BufferPool`), so steady-state training maps no new memory.
#
# Consecutive routed points read prefixes of the same sources, and consecutive sources are read by nested
# sets of routed points. Both let one product serve a *window* of up to K of them: forward, the first point
# of a window mixes the window's shared prefix for every point of it (each point then adds only its newer
# sources, rescaled by the weight its softmax gives the prefix; ``window_input``); backward, the first
# source of a window released sums the value gradients of the K sources over their common readers (each
# then adds only the readers whose backward ran since; ``_value_ahead``). The third read, ``dα = U·g``, needs
# every point's own gradient; where a window's shared prefix is long, its points defer it until all of
# their gradients are in and it is one product too (``window_backward``): the softmax's coupling term each
# point needs at once comes from its prefix mixture, recomputed for the window by one more product.
#
# Bank writes go through ``.data``: a source slot is written once (again, with the same values, when
# activation checkpointing replays a block), never changed after a routed point has read it, so the
# autograd version check that the writes would trip is not needed.


_NULL_CONTEXT = nullcontext()


def window_size(n: int, limit: int) -> int:
    """How many routed points (or sources) share one product over a common prefix of ``n`` sources (or
    readers); 0: none. A window of ``K`` costs each of its points ``n/K`` of the prefix plus about ``K/2`` newer
    sources of its own, which is least at ``K ≈ √(2n)``; below ``n = 2K`` the ``K`` rows written cost what is
    saved."""
    k = min(limit, math.isqrt(2 * n))
    return k if k >= 2 and n >= 2 * k else 0


def _autocast_on(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)


def no_autocast(device: torch.device):
    """Turn autocast off, only where it is on: the routing math is fp32 (entering a context is
    not free for a decoded token)."""
    return torch.autocast(device.type, enabled=False) if _autocast_on(device) else _NULL_CONTEXT


class BufferPool:
    """Spare bank buffers, reused by the next forward.

    A bank holds every source of a forward, and as much again for their gradients. Allocated fresh on every
    step, blocks that large are mapped and unmapped by the CPU allocator each time, and the first touch of
    every page faults. A bank gives its buffers back when it is deleted, i.e. when its autograd graph is
    freed; while a graph lives (``retain_graph``, several forwards before a backward) its buffers stay
    with it.
    """

    def __init__(self, spares: int = 2) -> None:
        self.spares = spares
        self._free: dict[tuple, list[tuple[Tensor, ...]]] = {}
        self._constants: dict[tuple, Tensor] = {}

    def take(self, *shapes: tuple[int, ...], dtype: torch.dtype, device: torch.device,
             tag: str = "") -> tuple[tuple, tuple[Tensor, ...]]:
        """Uninitialised tensors of these shapes, and the key to :meth:`give_back` them under (``tag`` keeps
        buffers of the same shapes but different uses apart, so each finds its own spare)."""
        key = (shapes, dtype, device, torch.is_inference_mode_enabled(), tag)  # inference tensors stay in inference mode
        free = self._free.get(key)
        return key, free.pop() if free else tuple(torch.empty(s, dtype=dtype, device=device) for s in shapes)

    def give_back(self, key: tuple, tensors: tuple[Tensor, ...]) -> None:
        free = self._free.setdefault(key, [])
        if len(free) < self.spares:
            free.append(tensors)

    def clear(self) -> None:
        """Drop the spare buffers; the next forward allocates its own again."""
        self._free.clear()

    def constant(self, value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A 0-dim tensor holding ``value``, made once: a decoded token cannot afford a ``torch.tensor`` per forward."""
        key = (value, dtype, device, torch.is_inference_mode_enabled())
        if key not in self._constants:
            self._constants[key] = torch.tensor(value, dtype=dtype, device=device)
        return self._constants[key]


class _Group:
    """What the routed points of a group (they read the same ``n`` sources) share in one forward."""

    __slots__ = ("n", "alpha", "gate", "mixtures", "uses")

    def __init__(self, n: int, alpha: Tensor | None, gate: Tensor | None, mixtures: tuple[Tensor, ...]) -> None:
        self.n, self.alpha, self.gate, self.mixtures, self.uses = n, alpha, gate, mixtures, 0


class SourceBank:
    """The completed sources of one forward, token-major, with their inverse RMS and gradient buffers."""

    def __init__(self, x0: Tensor, capacity: int, queries: Tensor, eps: float, pool: BufferPool | None = None,
                 first_readers: tuple[int, ...] | None = None, lookahead: int = 0,
                 windows: tuple[tuple[int, int, int] | None, ...] = (), defer_from: int = 0,
                 gate: Tensor | None = None, window_gates: Tensor | None = None) -> None:
        D = x0.shape[-1]
        dtype = compute_dtype(x0.dtype)
        self.shape, self.out_dtype, self.eps = x0.shape, x0.dtype, eps
        self.lead = math.prod(x0.shape[:-1])
        self.pool = pool or BufferPool(spares=0)
        opts = dict(dtype=dtype, device=x0.device)
        self.queries = queries.detach()  # (R, D), q_k = query_k ∘ key_gain_k
        # logits[t, i, k] = (u_i · q_k) · inv_rms_i for every routed point k, computed once per source by one
        # GEMM: a routed point's logits are then a slice, without a pass over its sources
        key, (self.values, self.inv_rms, self.logits) = self.pool.take(
            (self.lead, capacity, D), (self.lead, capacity), (self.lead, capacity, queries.shape[0]), **opts
        )
        self._borrowed = [(key, (self.values, self.inv_rms, self.logits))]  # given back to the pool by __del__
        # filled in backward, routed point by routed point (last first), and read by each source's backward
        self.grads: Tensor | None = None  # (lead, R, D): g_k, the gradient arriving at routed point k
        self.w: Tensor | None = None  # (lead, S, R): w_ki, the weight routed point k gave source i
        self.d_logit: Tensor | None = None  # (lead, S, R): dlogit_ki
        self.readers: dict[int, int] = {}  # routed points whose backward ran → how many sources they read
        # groups of routed points that read the same sources (see _GroupRoute), by their first point
        self.groups: dict[int, _Group] = {}
        # points of a group or a window whose dα over their ``n`` shared sources waits for one product (first
        # point k0 → (n, the points whose gradients are in)); run before the first of those sources is released
        self.deferred: dict[int, tuple[int, set[int]]] = {}
        self.gate = gate  # the router's gate parameter when groups route with it (see _Emit)
        # with grad, writes go through aliases: the saved ``values`` must not see its version bumped (see above)
        grad = torch.is_grad_enabled()
        self._values, self._inv_rms, self._logits = (
            (self.values.data, self.inv_rms.data, self.logits.data) if grad else (self.values, self.inv_rms, self.logits)
        )
        self._keys = self.queries.t()
        self._autocast = _autocast_on(x0.device)
        self._eps = self.pool.constant(eps, **opts)
        # logits are computed only for the routed points that can read a source (Delta: half of them)
        self.first_readers = first_readers or (0,) * capacity
        # windows of up to ``lookahead`` sources whose value gradients come from one product (_value_ahead),
        # and (``windows``) of routed points whose mixtures do (window_input); 0: none
        self.lookahead = lookahead
        # the largest window: window_size of at most this many sources or readers (a bound; it is not monotone)
        self.window_rows = max(1, min(lookahead, math.isqrt(2 * max(capacity, queries.shape[0]))))
        self._ahead: tuple[int, int, set[int], Tensor] | None = None
        self._ahead_buffer: Tensor | None = None
        # per routed point its window (k0, k1, n0): points [k0, k1) whose first n0 sources go through one
        # product forward (window_input) and two backward (window_backward, _deferred_grads)
        self.windows = windows
        self.window_gates = window_gates  # every routed point's gate (detached), for a window's product
        self._mix: tuple[int, int, Tensor] | None = None
        self._mix_buffer: Tensor | None = None
        self._prefix: tuple[int, Tensor] | None = None  # backward: the prefix mixtures of window k0
        self._prefix_buffer: Tensor | None = None
        self.defer_from = defer_from  # with ``windows``, the prefix length from which a window defers its dα
        self.e: Tensor | None = None  # (lead, R): e_k = g_k · Σ_i α_ki u_i, of windowed points

    def write(self, i: int, u: Tensor) -> None:
        """Store source ``i`` with its inverse RMS and logits. Runs without grad (in ``_Emit.forward`` or while
        decoding); few ops rather than few passes, since a decoded token's write is dispatch-bound."""
        x = u.reshape(self.lead, -1)
        with self.fp32():
            xf = self._values.select(1, i)
            xf.copy_(x)
            norm = torch.linalg.vector_norm(xf, dim=-1)
            inv = self._inv_rms.select(1, i)
            torch.addcmul(self._eps, norm, norm, value=1.0 / xf.shape[-1], out=inv).rsqrt_()  # (|u|²/D + eps)^-½
            k = self.first_readers[i]
            logits = self._logits[:, i, k:]
            torch.mm(xf, self._keys[:, k:], out=logits)
            logits.mul_(inv.unsqueeze(-1))

    def group_input(self, k: int, group: tuple[int, int], n: int, stream: Tensor, gate: Tensor | None,
                    stats: dict | None, for_backward: bool = False) -> Tensor:
        """``h_k = s_k + g_k·r_k`` for routed point ``k`` of a group ``[k0, k1)`` of routed points that all read
        the same ``n`` sources (the points of a Delta Block block), without autograd (decoding, or inside
        :class:`_GroupRoute`; ``for_backward`` keeps the weights for it).

        The first point to ask computes the mixtures of the whole group in one batched product; they are
        dropped once every point of the group has taken its own. A decoded token thus costs a few ops per
        group and one add per routed point.
        """
        k0, k1 = group
        entry = self.groups.get(k0)
        if entry is None or entry.mixtures is None:  # the group's first point (or a replay by checkpointing)
            gate = None if gate is None else gate[k0:k1].detach()
            entry = self.groups[k0] = self._group(k0, k1, n, gate, stats, for_backward)
        mixture = entry.mixtures[k - k0]
        entry.uses += 1
        if entry.uses == k1 - k0:
            entry.mixtures = None
        if stream.dtype == mixture.dtype:
            return stream + mixture
        return (stream.to(mixture.dtype) + mixture).to(self.out_dtype)

    def _group(self, k0: int, k1: int, n: int, gate: Tensor | None, stats: dict | None, for_backward: bool) -> _Group:
        lead_shape, K = self.shape[:-1], k1 - k0
        with self.fp32():
            if n == 1 and not for_backward:  # decoding, one source: every weight is exactly 1
                if stats is not None:
                    stats.update({k: self.values.new_ones(*lead_shape, 1) for k in range(k0, k1)})
                x0 = self.values[:, 0].view(*lead_shape, 1, -1)
                mixtures = (x0.squeeze(-2),) * K if gate is None else (x0 * gate[:, None]).unbind(-2)
                return _Group(n, None, gate, mixtures)
            alpha = torch.softmax(self.logits[:, :n, k0:k1], dim=1)  # (lead, n, K)
            if stats is not None:
                stats.update({k0 + j: alpha[:, :, j].reshape(*lead_shape, n) for j in range(K)})
            w = alpha if gate is None else alpha * gate.to(alpha.dtype)
            mixtures = torch.bmm(w.transpose(1, 2), self.values[:, :n])  # (lead, K, D)
            return _Group(n, alpha, gate, mixtures.view(*lead_shape, K, -1).unbind(-2))

    def keep(self, k: int, n: int, g: Tensor, group: tuple[int, int] | None = None) -> None:
        """Keep routed point ``k``'s gradient ``g`` (it read ``n`` sources). A point of a ``group`` leaves only
        this: the group's weight gradients are computed together, once all of its points' gradients are in
        (:meth:`_deferred_grads`)."""
        self._grad_buffers()
        self.grads[:, k].copy_(g.reshape(self.lead, -1))
        self.readers[k] = n
        if self._ahead is not None and k in self._ahead[2]:  # a new backward through a retained graph
            self._ahead = None
        if group is not None:
            self.deferred.setdefault(group[0], (self.groups[group[0]].n, set()))[1].add(k)

    def _deferred_grads(self, k0: int, d_gate: Tensor | None) -> None:
        """``dlogit_ki = w_ki (u_i·g_k − e_k)`` of the points of group or window ``k0`` over their ``n`` shared
        sources, from one product ``G·Uᵀ``: run by the backward of the first of those sources released, after
        every one of the points. A window's points kept their weights ``w`` and coupling terms ``e`` (see
        :meth:`window_backward`); a group's kept only their gradients, so ``w`` and ``e`` come from the group's
        weights here, and its gate's gradient is added to ``d_gate``."""
        n, ks = self.deferred.pop(k0)
        ks = sorted(ks)  # points whose input got no gradient are not among them: their g is 0
        idx = self._index(ks, self.values.device)
        dw = torch.bmm(self.grads[:, idx], self.values[:, :n].transpose(1, 2))  # (lead, K, n): u_i · g_k
        group = self.groups.get(k0)
        if group is None:
            w, e = self.w[:, :n, idx].transpose(1, 2), self.e[:, idx]
        else:
            j = self._index([k - k0 for k in ks], self.values.device)
            w = group.alpha[:, :, j].transpose(1, 2)  # (lead, K, n)
            e = (w * dw).sum(-1)
            if group.gate is not None:
                gate = group.gate[j].to(w.dtype)
                if d_gate is not None:
                    d_gate[idx] += e.sum(0).to(d_gate.dtype)
                w = w * gate.unsqueeze(-1)
            self.w[:, :n, idx] = w.transpose(1, 2)
        self.d_logit[:, :n, idx] = (w * dw.sub_(e.unsqueeze(-1))).transpose(1, 2)

    def window_input(self, k: int, n: int, base: Tensor | None, gate: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """``base + g_k·Σ_i α_ki u_i`` (``(lead, D)``) and the weights ``α_k`` of routed point ``k`` over the first
        ``n`` sources, through its window; ``None`` if the window's product is gone (a block replayed by
        activation checkpointing without its window's first point): the caller then mixes directly.

        The points ``k0 … k1−1`` of a window read prefixes of the same sources, ``n0`` of them for the first.
        The first computes, in one product, every point's mixture over those ``n0`` sources, each normalised
        over them (``P_j``); point ``k`` then needs only its own ``n − n0`` newer sources:
        ``Σ_i α_ki u_i = (Σ_{i<n0} α_ki)·P_j + Σ_{i≥n0} α_ki u_i``, since its full softmax restricted to the
        prefix is the prefix softmax times that sum. The ``n0`` shared sources are read once per window.
        """
        k0, k1, _ = self.windows[k]
        if k == k0:
            alpha_all = torch.softmax(self.logits[:, :n, k0:k1], dim=1)  # (lead, n0, K)
            w = alpha_all if self.window_gates is None else alpha_all * self.window_gates[k0:k1]
            mix = self._scratch("_mix_buffer", k1 - k0)
            torch.bmm(w.transpose(1, 2), self.values[:, :n], out=mix)
            self._mix = (k0, n, mix)
            part = mix[:, 0]  # the first point's own mixture: its prefix is all it reads
            return (part.clone() if base is None else base + part), alpha_all[:, :, 0].contiguous()
        if self._mix is None or self._mix[0] != k0:
            return None
        _, n0, mix = self._mix
        alpha = torch.softmax(self.logits[:, :n, k], -1)
        scale, part = alpha[:, :n0].sum(-1, keepdim=True), mix[:, k - k0]
        out = part * scale if base is None else torch.addcmul(base, scale, part)
        if n > n0:
            w_new = alpha[:, n0:] if gate is None else alpha[:, n0:] * gate
            out.unsqueeze(1).baddbmm_(w_new.unsqueeze(1), self.values[:, n0:n])
        return out, alpha

    def defers(self, k: int) -> bool:
        """Whether routed point ``k``'s backward goes through its window (:meth:`window_backward`): where the
        shared prefix is long (``n0 ≥ defer_from``, a setting of :class:`~lit_dar.backends.BankBackend`). A point
        then reads ``2/K`` of the prefix instead of all of it, but still makes a few small products of its own,
        which a short prefix does not repay."""
        window = self.windows[k] if k < len(self.windows) else None
        return window is not None and window[2] >= self.defer_from

    def window_backward(self, k: int, n: int, g: Tensor, alpha: Tensor, gate: Tensor | None) -> Tensor:
        """Routed point ``k``'s backward through its window: keeps ``g``, ``w`` and the ``dlogit`` of its newer
        sources, and returns ``e = Σ_i α_ki (u_i·g)`` (``(lead,)``; the gate's gradient is its sum).

        The direct backward reads all ``n`` sources for ``dα_i = u_i·g``. Only the newer ``n − n0`` are needed
        now: their ``dlogit_i = w_i (u_i·g − e)`` go to sources released soon. The prefix's ``dα`` waits until
        every point of the window has its gradient (:meth:`_deferred_grads`: one product for the window), and
        ``e`` — the softmax's coupling term, needed now — comes from the prefix mixtures instead:
        ``e = (Σ_{i<n0} α_ki)·(P_k·g) + Σ_{i≥n0} α_ki (u_i·g)``, with the ``P`` of the whole window recomputed
        by one product (:meth:`_prefix_mixture`). The ``n0`` shared sources are read twice per window
        instead of once per point.
        """
        k0, _, n0 = self.windows[k]
        e = torch.linalg.vecdot(g, self._prefix_mixture(k)).mul_(alpha[:, :n0].sum(-1))  # (Σ_{i<n0} α_ki)·(P_k·g)
        w = alpha if gate is None else alpha * gate
        self.keep(k, n, g)
        self.w[:, :n, k] = w
        if n > n0:
            dw = torch.bmm(g.unsqueeze(1), self.values[:, n0:n].transpose(1, 2)).squeeze(1)  # u_i · g
            e += (alpha[:, n0:] * dw).sum(-1)
            self.d_logit[:, n0:n, k] = w[:, n0:] * (dw - e.unsqueeze(-1))
        self.e[:, k] = e
        self.deferred.setdefault(k0, (n0, set()))[1].add(k)
        return e

    def _prefix_mixture(self, k: int) -> Tensor:
        """``P_k`` ``(lead, D)``: routed point ``k``'s mixture over its window's ``n0`` shared sources, normalised
        over them (no gate). The first of the window's points to run backward computes all of them in one
        product, as the forward's window did; a buffer of its own, since activation checkpointing replays
        forward windows in the middle of a backward one."""
        k0, k1, n0 = self.windows[k]
        if self._prefix is None or self._prefix[0] != k0:
            alpha = torch.softmax(self.logits[:, :n0, k0:k1], dim=1)  # (lead, n0, K)
            prefix = self._scratch("_prefix_buffer", k1 - k0)
            torch.bmm(alpha.transpose(1, 2), self.values[:, :n0], out=prefix)
            self._prefix = (k0, prefix)
        return self._prefix[1][:, k - k0]

    @staticmethod
    def _index(ks: list[int], device: torch.device) -> slice | Tensor:
        return slice(ks[0], ks[-1] + 1) if ks[-1] - ks[0] + 1 == len(ks) else torch.tensor(ks, device=device)

    def _value_ahead(self, i: int, ks: list[int]) -> tuple[Tensor | None, list[int]]:
        """The value-path sum ``Σ_k w_ki g_k`` of source ``i`` over the readers a window already covered, and
        the readers it still lacks; ``(None, ks)`` without a window (or with fewer than ``2K`` readers, where
        the ``K`` rows the product writes cost about what it saves).

        Sources are released last first, and the readers of source ``i`` are all readers of every earlier
        source. So when source ``i`` is released, one product over its readers' gradients gives the value
        sums of sources ``i−K+1 … i`` at once (``(K×r)·(r×D)`` per token: the ``g_k`` are read once, not
        ``K`` times); each of those sources then adds only the readers whose backward ran since.
        """
        window = self._ahead
        if window is not None and window[0] <= i <= window[1]:
            lo, _, covered, sums = window
            return sums[:, i - lo], [k for k in ks if k not in covered]
        size = window_size(len(ks), self.lookahead)
        if size == 0 or i == 0:
            return None, ks
        lo = max(0, i - size + 1)
        idx = self._index(ks, self.values.device)
        sums = self._scratch("_ahead_buffer", i - lo + 1)
        torch.bmm(self.w[:, lo : i + 1, idx], self.grads[:, idx], out=sums)
        self._ahead = (lo, i, set(ks), sums)
        return sums[:, i - lo], []

    def _scratch(self, name: str, rows: int) -> Tensor:
        """A pooled ``(lead, rows, D)`` buffer (``rows ≤ window_rows``) for the window products: one buffer per
        direction, since the windows of one direction never overlap in time (a replayed block recomputes)."""
        buf = getattr(self, name)
        if buf is None:
            lead, _, D = self.values.shape
            key, (buf,) = self.pool.take((lead * self.window_rows * D,), dtype=self.values.dtype,
                                         device=self.values.device, tag=name)
            self._borrowed.append((key, (buf,)))
            setattr(self, name, buf)
        return buf[: self.lead * rows * self.values.shape[-1]].view(self.lead, rows, -1)

    def __del__(self) -> None:
        for key, tensors in getattr(self, "_borrowed", ()):
            self.pool.give_back(key, tensors)

    def fp32(self):
        """Autocast off for the routing math; checked once per forward, since the check costs as much as an op."""
        return torch.autocast(self.values.device.type, enabled=False) if self._autocast else _NULL_CONTEXT

    def receive(self, n: int, k: int, w: Tensor, g: Tensor, d_logit: Tensor) -> None:
        """Keep routed point ``k``'s gradient ``g`` and, for each of its ``n`` sources, ``w_i`` and ``dlogit_i``.

        A source's gradient is applied once, by its own backward (:meth:`release`), from all of its readers:
        ``Σ_k w_ki g_k`` in one batched pass over their ``g_k``, rather than ``n`` read-modify-writes of a
        gradient per routed point.
        """
        self.keep(k, n, g)
        self.w[:, :n, k] = w
        self.d_logit[:, :n, k] = d_logit

    def _grad_buffers(self) -> None:
        if self.grads is None:
            lead, S, D = self.values.shape
            opts = dict(dtype=self.values.dtype, device=self.values.device)
            R = self.queries.shape[0]
            buffers = self.pool.take((lead, R, D), (lead, S, R), (lead, S, R), (lead, R), **opts)
            self._borrowed.append(buffers)
            self.grads, self.w, self.d_logit, self.e = buffers[1]

    def release(self, i: int, u: Tensor, queries_grad: bool,
                gate_grad: bool = False) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Source ``i``'s gradient (value and key paths of every routed point that read it), its part of
        the stacked queries' gradient, and the gradient of the gate of the groups that read it first (or
        ``None``s, if no routed point that read it received a gradient).

        With ``q_k`` the query of reader ``k``, ``inv`` the source's inverse RMS and ``logit_k = (u·q_k)·inv``:
        ``Σ_k w_k g_k + inv·Σ_k dlogit_k q_k − inv²/D·(Σ_k dlogit_k logit_k)·u``.
        """
        due = [k0 for k0, (n, _) in self.deferred.items() if n > i]
        d_gate = torch.zeros_like(self.gate) if gate_grad and any(k0 in self.groups for k0 in due) else None
        for k0 in due:
            self._deferred_grads(k0, d_gate)
        ks = sorted(k for k, n in self.readers.items() if n > i)
        if i == 0:  # the last source released: a second backward through a retained graph starts afresh
            self.readers, self._ahead = {}, None
        if not ks:
            return None, None, d_gate
        idx = self._index(ks, u.device)
        inv = self.inv_rms[:, i].unsqueeze(-1)
        d_logit = self.d_logit[:, i, idx]
        queries = self.queries[idx].to(u.dtype)
        c = d_logit * inv  # (lead, readers): coefficient of q_k
        head, new = self._value_ahead(i, ks)
        if head is None:
            grad = torch.bmm(self.w[:, i, idx].unsqueeze(1), self.grads[:, idx]).squeeze(1)
            grad.addmm_(c, queries)
        else:  # Σ_k w_ki g_k over the readers the window already summed, plus the new ones
            grad = torch.addmm(head, c, queries)
            if new:
                new = self._index(new, u.device)
                grad.unsqueeze(1).baddbmm_(self.w[:, i, new].unsqueeze(1), self.grads[:, new])
        c_u = (d_logit * self.logits[:, i, idx]).sum(-1, keepdim=True) * inv.square() / u.shape[-1]
        grad.addcmul_(c_u, u, value=-1.0)
        d_queries = None
        if queries_grad:
            d_queries = u.new_zeros(self.queries.shape)
            d_queries[idx] = c.t() @ u
        return grad, d_queries, d_gate


def _extra_terms(x: Tensor, q: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Inverse RMS and ``q``-dot of an extra (non-bank) source, ``(lead, D)`` or ``(D,)``."""
    return torch.rsqrt(x.pow(2).mean(-1) + eps), x @ q


def _bank_logits(bank_logits: Tensor, n: int, k: int, q: Tensor, pre: Tensor | None,
                 post: Tensor | None, eps: float) -> Tensor:
    """Logits ``(lead, [pre] + n + [post])`` of routed point ``k`` over the bank's first ``n`` sources."""
    logits = bank_logits[:, :n, k]
    if pre is None and post is None:
        return logits
    parts = [logits]
    if pre is not None:
        inv, dot = _extra_terms(pre, q, eps)
        parts.insert(0, (dot * inv).expand(logits.shape[0], 1))
    if post is not None:
        inv, dot = _extra_terms(post, q, eps)
        parts.append((dot * inv).unsqueeze(-1))
    return torch.cat(parts, -1)


def _bank_mix(values: Tensor, w: Tensor, n: int, pre: Tensor | None, post: Tensor | None,
              base: Tensor | None) -> Tensor:
    """``base + Σ_i w_i u_i`` ``(lead, D)``: one pass over the bank's first ``n`` sources."""
    o = int(pre is not None)
    if n == 1:  # one source (the first sublayers of Delta Block): no per-token matrix product
        out = values[:, 0] * w[:, o : o + 1] if base is None else torch.addcmul(base, w[:, o : o + 1], values[:, 0])
    elif base is None:
        out = torch.bmm(w[:, o : o + n].unsqueeze(1), values[:, :n]).squeeze(1)
    else:
        out = torch.baddbmm(base.unsqueeze(1), w[:, o : o + n].unsqueeze(1), values[:, :n]).squeeze(1)
    if pre is not None:
        out = out + w[:, :1] * pre
    if post is not None:
        out = out + w[:, -1:] * post
    return out


class _Emit(torch.autograd.Function):
    """Write a completed source into the bank; its backward applies the deferred gradient.

    Returns an empty *token*: every routed point that reads the source takes the token as an input, so
    autograd runs this node's backward only after all of theirs. It also returns the gradients of the
    stacked queries and, for routed points in groups (:class:`_GroupRoute`), of the gate.
    """

    @staticmethod
    def forward(ctx, bank: SourceBank, i: int, u: Tensor, queries: Tensor, gate: Tensor | None) -> Tensor:  # type: ignore[override]
        bank.write(i, u)
        ctx.bank, ctx.i, ctx.u_dtype = bank, i, u.dtype
        ctx.save_for_backward(bank.values, bank.inv_rms)
        return u.new_empty(0)

    @staticmethod
    def backward(ctx, _token: Tensor):  # type: ignore[override]
        bank, i = ctx.bank, ctx.i
        values, _ = ctx.saved_tensors
        with no_autocast(values.device):
            grad, d_queries, d_gate = bank.release(i, values[:, i], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        d_queries = None if d_queries is None else d_queries.to(bank.queries.dtype)
        grad = None if grad is None else grad.view(bank.shape).to(ctx.u_dtype)
        return None, None, grad, d_queries, d_gate


class _BankRoute(torch.autograd.Function):
    """One routed point, fused with how its mixture enters the sublayer.

    ``h = stream + gate · Σ_i α_i u_i`` (additive modes; ``gate`` may be ``None``) or ``h = Σ_i α_i u_i``
    (``stream=None``, replacement modes) over the bank's first ``n`` sources plus an optional null
    (``pre``) and partial (``post``) source. The gate is folded into the weights (``w = g·α``), so the
    stream, the gate and the mixture cost no pass of their own, forward or backward.
    """

    @staticmethod
    def forward(ctx, q: Tensor, bank: SourceBank, n: int, k: int, pre: Tensor | None, post: Tensor | None,  # type: ignore[override]
                stream: Tensor | None, gate: Tensor | None, stats: dict | None, *tokens: Tensor) -> Tensor:
        out, alpha, pre_f, post_f = _bank_forward(q, bank, n, k, pre, post, stream, gate, stats)
        ctx.bank, ctx.n, ctx.k, ctx.additive = bank, n, k, stream is not None
        ctx.dtypes = (None if pre is None else pre.dtype, None if post is None else post.dtype)
        # the weights are n numbers per token: kept, not recomputed
        ctx.save_for_backward(q, bank.values, alpha, pre_f, post_f, gate)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        bank, n, k = ctx.bank, ctx.n, ctx.k
        q, values, alpha, pre, post, gate = ctx.saved_tensors
        with no_autocast(values.device):
            g = grad_out.reshape(bank.lead, -1).to(values.dtype)
            d_stream = grad_out if ctx.additive else None  # h = stream + …: the stream's gradient is h's
            if pre is None and post is None and bank.defers(k):
                e = bank.window_backward(k, n, g, alpha, None if gate is None else gate.to(alpha.dtype))
                d_gate = e.sum().to(gate.dtype) if gate is not None and ctx.needs_input_grad[7] else None
                return (None, None, None, None, None, None, d_stream, d_gate, None,
                        *([None] * (len(ctx.needs_input_grad) - 9)))
            o = int(pre is not None)
            dw = [torch.bmm(g.unsqueeze(1), values[:, :n].transpose(1, 2)).squeeze(1)]  # dw_i = u_i · g
            if pre is not None:
                dw.insert(0, (g @ pre).unsqueeze(-1))
            if post is not None:
                dw.append((g * post).sum(-1, keepdim=True))
            dw = torch.cat(dw, -1) if len(dw) > 1 else dw[0]
            d_gate = (alpha * dw).sum().to(gate.dtype) if gate is not None and ctx.needs_input_grad[7] else None
            g_ = 1.0 if gate is None else gate.to(alpha.dtype)
            d_alpha = dw * g_
            d_logit = alpha * (d_alpha - (alpha * d_alpha).sum(-1, keepdim=True))
            w = alpha * g_
            bank.receive(n, k, w[:, o : o + n], g, d_logit[:, o : o + n])
            # the bank sources' part of the query gradient comes from their own backward (_Emit)
            d_q = torch.zeros_like(q) if ctx.needs_input_grad[0] else None  # q is given only with pre or post
            d_pre = d_post = None
            D = values.shape[-1]
            for x, col, is_pre in ((pre, 0, True), (post, -1, False)):
                if x is None:
                    continue
                inv_e, dot_e = _extra_terms(x, q, bank.eps)
                a, d = w[:, col].unsqueeze(-1), d_logit[:, col].unsqueeze(-1)
                c = d * inv_e.unsqueeze(-1) if not is_pre else d * inv_e
                cu = d * dot_e.unsqueeze(-1) * inv_e.pow(3).unsqueeze(-1) / D if not is_pre else d * dot_e * inv_e.pow(3) / D
                if is_pre:
                    d_pre = (a * g + c * q - cu * x).sum(0).to(ctx.dtypes[0])
                    if d_q is not None:
                        d_q += c.sum() * x
                else:
                    d_post = (a * g + c * q - cu * x).view(bank.shape).to(ctx.dtypes[1])
                    if d_q is not None:
                        d_q += (c * x).sum(0)
        return (d_q, None, None, None, d_pre, d_post, d_stream, d_gate, None,
                *([None] * (len(ctx.needs_input_grad) - 9)))


class _GroupRoute(torch.autograd.Function):
    """Routed point ``k`` of a group ``[k0, k1)`` of routed points that read the same ``n`` bank sources (the
    points of a Delta Block block; the two sublayers of a parallel-residual layer): ``h = s + g_k·r_k``.

    Forward, the group's first point computes the mixtures of all ``K`` points in one product, so the
    sources are read once per group, not once per point. Backward, a point only keeps its gradient; the
    group's weight gradients (``dw = G·Uᵀ``, one product) are computed by the backward of the first source
    the group read (:meth:`SourceBank.release`), which runs after all of the group's points, and which also
    returns the gate's gradient (``_Emit`` takes the gate as an input for this).
    """

    @staticmethod
    def forward(ctx, bank: SourceBank, group: tuple[int, int], k: int, n: int, stream: Tensor,  # type: ignore[override]
                gate: Tensor | None, stats: dict | None, *tokens: Tensor) -> Tensor:
        h = bank.group_input(k, group, n, stream, gate, stats, for_backward=True)
        ctx.bank, ctx.group, ctx.k, ctx.n, ctx.n_tokens = bank, group, k, n, len(tokens)
        if k == group[0]:  # the group's weights, n numbers per token and point: kept for backward
            ctx.save_for_backward(bank.groups[k].alpha)
        return h

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        with no_autocast(grad_out.device):
            ctx.bank.keep(ctx.k, ctx.n, grad_out, ctx.group)
        return (None, None, None, None, grad_out, None, None, *([None] * ctx.n_tokens))


def emit(bank: SourceBank, i: int, u: Tensor, queries: Tensor) -> Tensor | None:
    """Store source ``i``; with grad, return the autograd token every routed point that reads it takes."""
    if torch.is_grad_enabled():
        return _Emit.apply(bank, i, u, queries, bank.gate)
    bank.write(i, u)
    return None


def bank_input(bank: SourceBank, k: int, n: int, q: Tensor | None, pre: Tensor | None, post: Tensor | None,
               stream: Tensor | None, gate: Tensor | None, stats: dict | None, tokens: tuple[Tensor, ...]) -> Tensor:
    """The input of routed point ``k`` over the bank's first ``n`` sources (see :class:`_BankRoute`); without
    grad (decoding) the same math runs without autograd nodes."""
    if not torch.is_grad_enabled():
        return _bank_forward(q, bank, n, k, pre, post, stream, gate, stats)[0]
    return _BankRoute.apply(q, bank, n, k, pre, post, stream, gate, stats, *tokens)


def group_input(bank: SourceBank, k: int, group: tuple[int, int], n: int, stream: Tensor, gate: Tensor | None,
                stats: dict | None, tokens: tuple[Tensor, ...]) -> Tensor:
    """The input of routed point ``k`` of a group that reads the same ``n`` sources (see :class:`_GroupRoute`)."""
    if not torch.is_grad_enabled():
        return bank.group_input(k, group, n, stream, gate, stats)
    return _GroupRoute.apply(bank, group, k, n, stream, gate, stats, *tokens)


def _bank_forward(q: Tensor, bank: SourceBank, n: int, k: int, pre: Tensor | None, post: Tensor | None,
                  stream: Tensor | None, gate: Tensor | None,
                  stats: dict | None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The sublayer input (in the stream's shape and dtype), the weights, and the extra sources in the
    compute dtype."""
    values = bank.values
    with bank.fp32():
        dtype = values.dtype
        post_f = None if post is None else _as(post.reshape(bank.lead, -1), dtype)
        pre_f = None if pre is None else _as(pre, dtype)
        base = None if stream is None else _as(stream.reshape(bank.lead, -1), dtype)
        windowed = None
        if k < len(bank.windows) and bank.windows[k] is not None and pre is None and post is None:
            windowed = bank.window_input(k, n, base, gate)
        if windowed is not None:
            out, alpha = windowed
        else:
            alpha = torch.softmax(_bank_logits(bank.logits, n, k, q, pre_f, post_f, bank.eps), -1)
            w = alpha if gate is None else alpha * gate
            out = _bank_mix(values, w, n, pre_f, post_f, base)
    if stats is not None:
        stats[k] = alpha.view(*bank.shape[:-1], -1).detach()
    return _as(out.view(bank.shape), bank.out_dtype), alpha, pre_f, post_f


def _as(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x if x.dtype == dtype else x.to(dtype)


__all__ = ["BufferPool", "SourceBank", "bank_input", "compute_dtype", "emit", "group_input"]
