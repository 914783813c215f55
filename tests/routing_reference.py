"""The routing math written for tests: the slow definition, and a per-routed-point autograd op as a backend.

``reference_depth_attention`` is the obvious definition (the sources stacked). ``depth_attention`` is the
same op as a custom autograd function that keeps only references to the sources and recomputes keys,
logits and weights in backward; :class:`OpBackend` routes every point through it, a third backend that the
bank and the plain math are checked against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_dar.backends import PlainBackend
from lit_dar.bank import compute_dtype


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


class OpBackend(PlainBackend):
    """Every routed point through :func:`depth_attention`, over its sources as a tuple."""

    def mixture(self, router, k, sources, stats, logits=()):
        return depth_attention(sources, router.query[k], router.key_gain[k], router.eps, stats, k)

    def _completed(self, router, state):
        return state  # the op computes its logits itself
