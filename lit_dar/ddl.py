"""Deep Delta Learning (DDL) as a residual rule: each sublayer rewrites the stream along one direction.

Zhang et al., *Deep Delta Learning* (arXiv 2601.00417), in its scalar-value limit (``d_v = 1``). Where a
transformer adds a sublayer's output, ``s ← s + o``, DDL treats ``o`` only as a *direction* and applies
the delta rule along it:

    k = o / max(‖o‖, ε)                                  the direction the sublayer chose
    β = 2·sigmoid(w_β · n + b_β) ∈ [0, 2]                n = norm(s), what the sublayer read
    v = c   |   w_v · s + b_v   |   sigmoid(w_v · s + b_v)    the target for the component along k
    s ← s + β · (v − kᵀs) · k  =  (I − β k kᵀ) s + β v k

β = 0 keeps the stream, β = 1 overwrites its component along ``k`` with ``v``, β = 2 reflects it.

Like :mod:`lit_dar.routing` this module is pure torch: :class:`DeepDeltaRule` is a
:class:`~lit_dar.rule.ResidualRule`, as :class:`~lit_dar.routing.DepthRouter` is, so the patched LitGPT
model runs either without knowing which. The update is a custom autograd function that
saves only references to its inputs (the stream, the sublayer output and its normed input, which the
model keeps alive anyway) and recomputes the fp32 intermediates in backward, so a bf16 model does not
pay for fp32 copies of ``s`` and ``k`` per sublayer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
from torch import Tensor

from lit_dar.rule import DeltaRuleStatistics, ResidualRule

DDL_MODE = "ddl"
# how the scalar target v is made -> its value at init when DARConfig.ddl_value_init is left unset
VALUE_DEFAULTS: dict[str, float] = {"constant": 2.0, "linear": 2.0, "sigmoid_linear": 0.5}
VALUE_KINDS = tuple(VALUE_DEFAULTS)


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


# --------------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------------


def _parts(
    stream: Tensor, output: Tensor, normed: Tensor, beta_weight: Tensor, beta_bias: Tensor,
    value_weight: Tensor | None, value_bias: Tensor | None, value: str, constant: float, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Everything the update needs, in the accumulation dtype (fp32, or fp64 for fp64 inputs).

    Returns ``s, n, ‖o‖, k, β, kᵀs, v, dv/du`` (the last ``None`` for a constant value).
    """
    dtype = torch.promote_types(stream.dtype, torch.float32)
    s, o, n = stream.to(dtype), output.to(dtype), normed.to(dtype)
    norm = torch.linalg.vector_norm(o, dim=-1, keepdim=True)
    k = o / norm.clamp_min(eps)
    beta = 2.0 * torch.sigmoid(n @ beta_weight.to(dtype) + beta_bias.to(dtype))
    proj = (k * s).sum(-1)
    if value == "constant":
        return s, n, norm, k, beta, proj, torch.full_like(proj, constant), None
    u = s @ value_weight.to(dtype) + value_bias.to(dtype)  # type: ignore[union-attr]
    if value == "linear":
        return s, n, norm, k, beta, proj, u, torch.ones_like(u)
    v = torch.sigmoid(u)
    return s, n, norm, k, beta, proj, v, v * (1.0 - v)


class _DeltaUpdate(torch.autograd.Function):
    """``s + β (v − kᵀs) k`` in fp32, cast back to the stream's dtype, with a recomputing backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, stream: Tensor, output: Tensor, normed: Tensor, beta_weight: Tensor, beta_bias: Tensor,
        value_weight: Tensor | None, value_bias: Tensor | None, value: str, constant: float, eps: float,
        stats: dict | None, key: int,
    ) -> Tensor:
        s, _, _, k, beta, proj, v, _ = _parts(
            stream, output, normed, beta_weight, beta_bias, value_weight, value_bias, value, constant, eps
        )
        residual = v - proj
        if stats is not None:
            stats[key] = {"beta": beta.detach(), "residual": residual.abs().detach()}
        ctx.save_for_backward(stream, output, normed, beta_weight, beta_bias, value_weight, value_bias)
        ctx.value, ctx.constant, ctx.eps = value, constant, eps
        # one rounding to the stream dtype; with β = 0 the added term is exactly zero, so s comes back bit for bit
        return (s + (beta * residual).unsqueeze(-1) * k).to(stream.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        stream, output, normed, beta_weight, beta_bias, value_weight, value_bias = ctx.saved_tensors
        s, n, norm, k, beta, proj, v, dv_du = _parts(
            stream, output, normed, beta_weight, beta_bias, value_weight, value_bias, ctx.value, ctx.constant,
            ctx.eps,
        )
        dtype = s.dtype
        g = grad_out.to(dtype)
        residual = v - proj
        g_delta = (g * k).sum(-1)  # d out / d δ = k, with δ = β (v − kᵀs)
        g_res = g_delta * beta  # gradient of v − kᵀs
        g_beta = g_delta * residual
        g_s = g - g_res.unsqueeze(-1) * k  # through kᵀs
        g_k = (beta * residual).unsqueeze(-1) * g - g_res.unsqueeze(-1) * s
        # k = o / max(‖o‖, ε): project out the radial part where the norm is not clamped
        radial = (k * g_k).sum(-1, keepdim=True) * (norm > ctx.eps)
        g_o = (g_k - radial * k) / norm.clamp_min(ctx.eps)
        g_z = g_beta * beta * (1.0 - 0.5 * beta)  # d(2σ(z))/dz = 2σ(1 − σ) = β (1 − β/2)
        g_n = g_z.unsqueeze(-1) * beta_weight.to(dtype)

        def total(coef: Tensor, x: Tensor) -> Tensor:
            return (coef.unsqueeze(-1) * x).flatten(0, -2).sum(0)

        g_wv = g_bv = None
        if dv_du is not None:
            g_u = g_res * dv_du
            g_s = g_s + g_u.unsqueeze(-1) * value_weight.to(dtype)
            g_wv, g_bv = total(g_u, s).to(value_weight.dtype), g_u.sum().to(value_bias.dtype)
        need = ctx.needs_input_grad
        return (
            g_s.to(stream.dtype),
            g_o.to(output.dtype) if need[1] else None,
            g_n.to(normed.dtype) if need[2] else None,
            total(g_z, n).to(beta_weight.dtype) if need[3] else None,
            g_z.sum().to(beta_bias.dtype) if need[4] else None,
            g_wv if need[5] else None,
            g_bv if need[6] else None,
            None, None, None, None, None,
        )


def delta_update(
    stream: Tensor,
    output: Tensor,
    normed: Tensor,
    beta_weight: Tensor,
    beta_bias: Tensor,
    value_weight: Tensor | None = None,
    value_bias: Tensor | None = None,
    value: str = "constant",
    constant: float = 2.0,
    eps: float = 1e-6,
    stats: dict | None = None,
    key: int = 0,
) -> Tensor:
    """One DDL stream update ``s + β (v − kᵀs) k`` for a sublayer.

    Args:
        stream: the stream ``s`` being updated, ``(..., D)``.
        output: the sublayer's output ``o`` (its direction ``k = o / max(‖o‖, ε)``), ``(..., D)``.
        normed: what the sublayer read, ``n = norm(s_in)``, from which β is computed, ``(..., D)``.
        beta_weight, beta_bias: ``w_β`` ``(D,)`` and ``b_β`` ``()``.
        value_weight, value_bias: ``w_v`` ``(D,)`` and ``b_v`` ``()`` for a learned value, else ``None``.
        value: ``constant`` (``v = constant``), ``linear`` (``v = w_v·s + b_v``) or ``sigmoid_linear``.
        eps: lower bound on ``‖o‖`` when normalising it.
        stats: if a dict is given, ``{"beta": β, "residual": |v − kᵀs|}`` (per token) is stored under ``key``.

    Returns:
        The updated stream in ``stream``'s dtype; β, ``kᵀs`` and the update are computed in fp32.
    """
    return _DeltaUpdate.apply(
        stream, output, normed, beta_weight, beta_bias, value_weight, value_bias, value, constant, eps, stats, key
    )


def reference_delta_update(
    stream: Tensor, output: Tensor, normed: Tensor, beta_weight: Tensor, beta_bias: Tensor,
    value_weight: Tensor | None = None, value_bias: Tensor | None = None, value: str = "constant",
    constant: float = 2.0, eps: float = 1e-6,
) -> Tensor:
    """The same update in plain autograd, written as the equations read: the obvious definition, for tests."""
    dtype = torch.promote_types(stream.dtype, torch.float32)
    s, o, n = stream.to(dtype), output.to(dtype), normed.to(dtype)
    k = o / torch.clamp_min(o.norm(dim=-1, keepdim=True), eps)
    beta = 2 * torch.sigmoid((n * beta_weight).sum(-1) + beta_bias)
    if value == "constant":
        v = constant
    else:
        v = (s * value_weight).sum(-1) + value_bias
        v = torch.sigmoid(v) if value == "sigmoid_linear" else v
    return (s + (beta * (v - (k * s).sum(-1))).unsqueeze(-1) * k).to(stream.dtype)


# --------------------------------------------------------------------------------------------------
# Parameters and the residual rule
# --------------------------------------------------------------------------------------------------


class DeepDeltaRule(ResidualRule):
    """DDL parameters of every sublayer, stacked (row ``j`` belongs to sublayer ``j``), and the rule itself.

    * ``beta_weight`` (2L, D), zero at init, and ``beta_bias`` (2L,), ``logit(β₀/2)`` at init: β starts at
      exactly ``β₀`` on every token (the paper's code draws ``w_β`` at random; zero keeps init free of RNG
      and β uniform, and ``w_β`` still gets gradient ``∝ n`` from the first step);
    * ``value_weight`` (2L, D), zero at init, and ``value_bias`` (2L,), ``v₀`` (``logit(v₀)`` under the
      sigmoid) at init — only for a learned value: ``v`` starts at the constant ``v₀`` either way.

    ``n_layer`` layers give ``2L`` sublayers, attention ``2l`` and MLP ``2l+1``.
    """

    def __init__(
        self,
        n_layer: int,
        n_embd: int,
        parallel: bool,
        value: str = "constant",
        value_init: float = 2.0,
        beta_init: float = 1.0,
        eps: float = 1e-6,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if value not in VALUE_DEFAULTS:
            raise ValueError(f"Unknown DDL value {value!r}: choose one of {list(VALUE_KINDS)}.")
        if not 0.0 < beta_init < 2.0:
            raise ValueError(f"beta_init={beta_init!r} must lie in (0, 2): β = 2·sigmoid(·) never reaches 0 or 2.")
        if value == "sigmoid_linear" and not 0.0 < value_init < 1.0:
            raise ValueError(f"value_init={value_init!r} must lie in (0, 1) for a sigmoid value.")
        self.parallel = parallel
        self.value, self.value_init, self.beta_init, self.eps = value, float(value_init), float(beta_init), eps
        n = 2 * n_layer
        self.beta_weight = nn.Parameter(torch.empty(n, n_embd, device=device))
        self.beta_bias = nn.Parameter(torch.empty(n, device=device))
        learned = value != "constant"
        self.value_weight = nn.Parameter(torch.empty(n, n_embd, device=device)) if learned else None
        self.value_bias = nn.Parameter(torch.empty(n, device=device)) if learned else None
        # last_weights: per sublayer, {"beta": β, "residual": |v − kᵀs|} per token of the last recorded forward
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """β = β₀ and v = v₀ on every token: zero weights, biases at the matching logits."""
        nn.init.zeros_(self.beta_weight)
        nn.init.constant_(self.beta_bias, _logit(self.beta_init / 2.0))
        if self.value_weight is not None and self.value_bias is not None:
            nn.init.zeros_(self.value_weight)
            sigmoid = self.value == "sigmoid_linear"
            nn.init.constant_(self.value_bias, _logit(self.value_init) if sigmoid else self.value_init)

    def update(self, j: int, stream: Tensor, output: Tensor, normed: Tensor, stats: dict | None = None) -> Tensor:
        """Sublayer ``j``'s rewrite of ``stream`` along its ``output``, β read from its input ``normed``."""
        value_weight = None if self.value_weight is None else self.value_weight[j]
        value_bias = None if self.value_bias is None else self.value_bias[j]
        return delta_update(
            stream, output, normed, self.beta_weight[j], self.beta_bias[j], value_weight, value_bias,
            self.value, self.value_init, self.eps, stats, j,
        )

    # The residual-rule interface the patched model calls: start → layer (per block) → finish.

    def start(self, x0: Tensor) -> dict | None:
        """The state of a forward is only where statistics go: DDL looks at no earlier layer."""
        return {} if self.record_stats else None

    def layer(
        self,
        layer: int,
        stream: Tensor,
        state: dict | None,
        attn: Callable[..., tuple[Tensor, Tensor]],
        mlp: Callable[..., tuple[Tensor, Tensor]],
    ) -> tuple[Tensor, dict | None]:
        """One transformer layer: each sublayer reads the stream and rewrites it along its output.

        ``attn(h, with_norm=True)`` and ``mlp(h, with_norm=True)`` return the sublayer output (norms
        included) and the normed input it read, from which β is computed. In a parallel-residual layer
        both sublayers read the layer's input, and their updates are applied one after the other
        (attention first), each to the stream the previous one left: two delta steps, each a bounded
        operator ``I − β k kᵀ`` plus ``β v k``, rather than a sum of two that can overshoot when the
        directions align.
        """
        pair = (2 * layer, 2 * layer + 1)
        if self.parallel:
            outputs = [f(stream, with_norm=True) for f in (attn, mlp)]
            for j, (o, n) in zip(pair, outputs):
                stream = self.update(j, stream, o, n, state)
            return stream, state
        for j, f in zip(pair, (attn, mlp)):
            o, n = f(stream, with_norm=True)
            stream = self.update(j, stream, o, n, state)
        return stream, state

    def finish(self, stream: Tensor, state: dict | None) -> Tensor:
        """The stream goes to the final norm unchanged; keep the recorded statistics, if any."""
        if state is not None:
            self.last_weights = [state[j] for j in sorted(state)]
        return stream

    def _summarize(self) -> DeltaRuleStatistics:
        """Per sublayer of the last recorded forward: mean β and mean ``|v − kᵀs|`` over tokens."""
        beta = torch.stack([r["beta"].float().mean() for r in self.last_weights])
        residual = torch.stack([r["residual"].float().mean() for r in self.last_weights])
        return DeltaRuleStatistics(beta, residual)


__all__ = [
    "DDL_MODE",
    "VALUE_DEFAULTS",
    "VALUE_KINDS",
    "DeepDeltaRule",
    "delta_update",
    "reference_delta_update",
]
