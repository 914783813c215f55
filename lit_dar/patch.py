"""Wiring Delta Attention Residuals into a LitGPT ``GPT``: the patch, filters, statistics.

``patch_model(model, DARConfig(...))`` adds one ``dar`` module — the residual rule, a
:class:`~lit_dar.rule.ResidualRule`: a :class:`~lit_dar.routing.DepthRouter`, or a
:class:`~lit_dar.ddl.DeepDeltaRule` for ``mode="ddl"`` — to an existing model and swaps the classes
of the model and its blocks for thin subclasses whose forward threads the routing state through the
layers. The model stays a ``litgpt.GPT`` and its blocks
stay ``litgpt.model.Block`` instances, so FSDP wrap policies, activation checkpointing, generation
and LitGPT's utilities keep working; every block is still called as a module, so FSDP's hooks fire.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from litgpt.model import GPT, Block, batched_index_select, do_softcapping
from torch import Tensor

from lit_dar.backends import RoutingBackend
from lit_dar.config import DARConfig
from lit_dar.ddl import DDL_MODE, DeepDeltaRule
from lit_dar.routing import MODES, DepthRouter, RoutingPlan
from lit_dar.rule import NOT_RECORDED, ResidualRule

DAR_PREFIX = "dar"


# --------------------------------------------------------------------------------------------------
# Patched classes
# --------------------------------------------------------------------------------------------------


class DARBlockMixin:
    """A ``Block`` whose forward also accepts ``routing=(rule, state)`` and then returns ``(x, state)``.

    ``rule`` is the model's residual rule (``model.dar``): it decides what each sublayer reads and how the
    stream grows; the block only supplies its two sublayers, ``h → o``; called with ``with_norm=True`` they
    return ``(o, norm(h))``, the normed input too (DDL computes β from it). Without ``routing`` it is
    LitGPT's block.
    """

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None = None,
        input_pos: Tensor | None = None,
        input_pos_maxp1: int | None = None,
        routing: tuple[ResidualRule, Any] | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        if routing is None:
            return super().forward(x, cos, sin, mask, input_pos, input_pos_maxp1)  # type: ignore[misc]
        rule, state = routing

        def attn(h: Tensor, with_norm: bool = False) -> Tensor | tuple[Tensor, Tensor]:
            n = self.norm_1(h)
            out = self.post_attention_norm(self.attn(n, cos, sin, mask, input_pos, input_pos_maxp1))
            return (out, n) if with_norm else out

        mlp_norm = self.norm_1 if self.config.shared_attention_norm else self.norm_2

        def mlp(h: Tensor, with_norm: bool = False) -> Tensor | tuple[Tensor, Tensor]:
            n = mlp_norm(h)
            out = self.post_mlp_norm(self.mlp(n))
            return (out, n) if with_norm else out

        return rule.layer(self.dar_layer, x, state, attn, mlp)


class DARGPTMixin:
    """A ``GPT`` whose forward runs every layer through the residual rule ``self.dar``."""

    def forward(
        self,
        idx: Tensor,
        input_pos: Tensor | None = None,
        input_pos_maxp1: int | None = None,
        lm_head_chunk_size: int = 0,
    ) -> Tensor | list[Tensor]:
        cos, sin, mask, input_pos_maxp1 = _rope_and_mask(self, idx, input_pos, input_pos_maxp1)
        config = self.config
        x = self.transformer.wte(idx)
        if config.scale_embeddings:
            x = x * torch.tensor(config.n_embd**0.5, dtype=x.dtype)

        rule = self.dar
        state = rule.start(x)
        for block_idx, block in enumerate(self.transformer.h):
            c, s = cos, sin
            if config.rope_indices is not None:
                c, s = cos[..., config.rope_indices[block_idx]], sin[..., config.rope_indices[block_idx]]
            x, state = block(x, c, s, mask, input_pos, input_pos_maxp1, routing=(rule, state))
        x = rule.finish(x, state)

        x = self.transformer.ln_f(x)
        clamp_head = (
            partial(do_softcapping, thresh=config.final_logit_softcapping)
            if config.final_logit_softcapping is not None
            else nn.Identity()
        )
        if lm_head_chunk_size > 0:
            return [clamp_head(self.lm_head(x_i)) for x_i in x.split(lm_head_chunk_size, dim=1)]
        return clamp_head(self.lm_head(x))


def _rope_and_mask(
    model: GPT, idx: Tensor, input_pos: Tensor | None, input_pos_maxp1: int | None
) -> tuple[Tensor, Tensor, Tensor | None, int | None]:
    """RoPE tables and KV-cache mask for a forward, exactly as ``litgpt.model.GPT.forward`` builds them."""
    T = idx.size(1)
    if model.max_seq_length < T:
        raise ValueError(f"Cannot forward sequence of length {T}, max seq length is only {model.max_seq_length}.")
    if input_pos is None:
        return model.cos[:T].unsqueeze(0), model.sin[:T].unsqueeze(0), None, None
    if input_pos.dim() > 2:
        raise ValueError(f"input_pos must have 1 or 2 dimensions, input_pos.shape = {input_pos.shape}")
    if input_pos.shape[-1] != T:
        raise ValueError(f"input_pos.shape[-1] = {input_pos.shape[-1]} != {T} = idx.shape[1], must be the same")
    cos = batched_index_select(model.cos, 0, input_pos)
    sin = batched_index_select(model.sin, 0, input_pos)
    if input_pos.dim() == 1:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    if model.mask_cache is None:
        raise TypeError("You need to call `gpt.set_kv_cache()`")
    mask = batched_index_select(model.mask_cache, 2, input_pos)
    if mask.dim() > 4:
        mask = mask.view(*(mask.shape[0:1] + mask.shape[2:]))
    if input_pos_maxp1 is not None:
        if input_pos_maxp1 > model.max_seq_length:
            raise ValueError(f"Positions in 'input_pos' must be in [0,{model.max_seq_length})")
        mask = mask[..., :input_pos_maxp1]
    return cos, sin, mask, input_pos_maxp1


class DARGPT(DARGPTMixin, GPT):
    """``litgpt.GPT`` with Delta Attention Residuals (what ``patch_model`` turns a ``GPT`` into)."""


class DARBlock(DARBlockMixin, Block):
    """``litgpt.model.Block`` that can route its sublayer inputs."""


_PATCHED_CLASSES: dict[type, type] = {GPT: DARGPT, Block: DARBlock}


def _patched_class(cls: type, mixin: type) -> type:
    """The DAR subclass of ``cls``; subclasses of GPT/Block (e.g. LoRA's) get one made on first use."""
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(f"DAR{cls.__name__}", (mixin, cls), {"__module__": cls.__module__})
    return _PATCHED_CLASSES[cls]


# --------------------------------------------------------------------------------------------------
# The patch
# --------------------------------------------------------------------------------------------------


def _check_unwrapped(model: nn.Module) -> None:
    """Routing parameters added after DDP/FSDP wrapping would not be synced or sharded: refuse early."""
    fix = "Call lit_dar.patch_model on the plain litgpt.GPT before the strategy wraps or shards it."
    if isinstance(model, (DistributedDataParallel, FullyShardedDataParallel)):
        raise TypeError(f"The model is already wrapped by {type(model).__name__}. {fix}")
    for name, module in model.named_modules():
        if isinstance(module, (FSDPModule, FullyShardedDataParallel)):
            raise ValueError(f"The model is already sharded by FSDP (module {name or '<root>'!r}). {fix}")
    for name, param in model.named_parameters():
        if isinstance(param, DTensor) or type(param).__name__ == "FlatParameter":
            raise ValueError(f"Parameter {name!r} is already sharded ({type(param).__name__}). {fix}")


def is_patched(model: nn.Module) -> bool:
    return isinstance(model, DARGPTMixin)


def _depth_router(model: GPT, config: DARConfig, backend: RoutingBackend | None) -> DepthRouter:
    plan = RoutingPlan.for_mode(config.mode, model.config.n_layer, config.num_blocks, model.config.parallel_residual)
    return DepthRouter(
        plan, model.config.n_embd, gate=config.gate == "scalar", null_source=config.null_source, eps=config.eps,
        backend=backend, device=model.transformer.wte.weight.device,
    )


def _deep_delta_rule(model: GPT, config: DARConfig, backend: RoutingBackend | None) -> DeepDeltaRule:
    if backend is not None:
        raise ValueError(f"A routing backend ({backend!r}) is only used by depth routing, not by mode='ddl'.")
    return DeepDeltaRule(
        model.config.n_layer, model.config.n_embd, model.config.parallel_residual, value=config.ddl_value,
        value_init=config.ddl_value_init, beta_init=config.ddl_beta_init, eps=config.eps,
        device=model.transformer.wte.weight.device,
    )


# mode -> the residual rule `model.dar` it installs: modes are data, the patched forward has no branches
RULES: dict[str, Callable[[GPT, DARConfig, RoutingBackend | None], ResidualRule]] = {
    **dict.fromkeys(MODES, _depth_router),
    DDL_MODE: _deep_delta_rule,
}


def check_config(model_config: Any, config: DARConfig) -> None:
    """Raise what ``patch_model`` would raise for this architecture (e.g. a block count it cannot have)."""
    if config.mode in MODES:
        RoutingPlan.for_mode(config.mode, model_config.n_layer, config.num_blocks, model_config.parallel_residual)


def patch_model(model: GPT, config: DARConfig, backend: RoutingBackend | None = None) -> GPT:
    """Turn ``model`` into a Delta Attention Residuals (or Deep Delta Learning) model in place and return it.

    Adds ``model.dar`` (all routing parameters, initialised for uniform routing and a closed gate; for
    ``ddl``, β = ``ddl_beta_init`` and v = ``ddl_value_init``) on the model's device and dtype — the meta
    device included, where ``reset_parameters`` materialises them.

    Args:
        model: a plain ``litgpt.GPT`` (or a subclass, e.g. LoRA's), not yet wrapped or sharded.
        config: the DAR config; it travels in the state dict as ``dar._extra_state``.
        backend: how depth routing computes its routed points (:mod:`lit_dar.backends`); ``None``: the default
            :class:`~lit_dar.backends.BankBackend`. Not used by ``ddl``.

    Raises:
        TypeError, ValueError: naming the fix, for something that is not a LitGPT GPT, a model already
            patched, wrapped or sharded, a block count the model cannot have, and a backend for ``ddl``.
    """
    if not isinstance(config, DARConfig):
        raise TypeError(f"patch_model expects a lit_dar.DARConfig, got {type(config).__name__}.")
    if not isinstance(model, GPT):
        _check_unwrapped(model)
        raise TypeError(
            f"patch_model expects a litgpt.GPT, got {type(model).__name__}. Pass the LitGPT model itself "
            "(e.g. `lit_module.model`)."
        )
    if is_patched(model) or hasattr(model, DAR_PREFIX):
        raise ValueError(
            f"This model is already patched with {get_dar_config(model)}. Build or load a fresh litgpt.GPT to "
            "patch it with another config."
        )
    _check_unwrapped(model)
    router = RULES[config.mode](model, config, backend).to(model.transformer.wte.weight.dtype)
    router.config_dict = config.to_dict()  # travels in the state dict as `dar._extra_state`
    model.add_module(DAR_PREFIX, router)
    model.__class__ = _patched_class(type(model), DARGPTMixin)
    for layer, block in enumerate(model.transformer.h):
        block.dar_layer = layer
        block.__class__ = _patched_class(type(block), DARBlockMixin)
    return model


def get_dar_config(model: nn.Module) -> DARConfig | None:
    """The DAR config a model was patched with, or ``None`` for a plain model."""
    router = find_router(model)
    return None if router is None else DARConfig.from_dict(router.config_dict)


def find_router(model: nn.Module) -> ResidualRule | None:
    """The residual rule inside ``model`` (also when wrapped, e.g. by a LightningModule or DDP)."""
    return next((m for m in model.modules() if isinstance(m, ResidualRule)), None)


def build_model(config: Any, dar: DARConfig | None = None, device: torch.device | str | None = None,
                backend: RoutingBackend | None = None) -> GPT:
    """A fresh ``litgpt.GPT`` for ``config`` (a ``litgpt.Config``), patched when ``dar`` is given (depth routing
    with ``backend``, see :func:`patch_model`)."""
    with torch.device(device) if device is not None else nullcontext():
        model = GPT(config)
    return model if dar is None else patch_model(model, dar, backend)


# --------------------------------------------------------------------------------------------------
# Filters, trainables, overhead, statistics
# --------------------------------------------------------------------------------------------------


def dar_filter(key: str, value: Any = None) -> bool:
    """True for routing weights, in the manner of ``litgpt.lora.lora_filter`` (wrapper prefixes allowed)."""
    return key.startswith(f"{DAR_PREFIX}.") or f".{DAR_PREFIX}." in key


def routing_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if dar_filter(n)]


def mark_only_routing_as_trainable(model: nn.Module) -> None:
    """Freeze the base model, train only the routing parameters (``freeze_base``)."""
    if not routing_parameters(model):
        raise ValueError("The model has no routing parameters: call lit_dar.patch_model first.")
    for name, param in model.named_parameters():
        param.requires_grad = dar_filter(name)


def routing_overhead(model: nn.Module) -> dict[str, float]:
    """Routing parameter count against the base model (works on the meta device)."""
    routing = sum(p.numel() for p in routing_parameters(model))
    base = sum(p.numel() for n, p in model.named_parameters() if not dar_filter(n))
    return {"routing_params": routing, "base_params": base, "percent": 100.0 * routing / max(base, 1)}


def enable_routing_stats(model: nn.Module, enabled: bool = True) -> None:
    """Record the routing weights of the next forwards (off by default: then nothing is kept)."""
    router = find_router(model)
    if router is None:
        raise ValueError("The model has no routing: call lit_dar.patch_model first.")
    router.record_stats = enabled
    if not enabled:
        router.last_weights = []


def routing_statistics(model: nn.Module) -> list[dict[str, Tensor]]:
    """Per routed point (sublayer) of the last recorded forward, as the model's residual rule summarises it.

    Depth routing: mean weight per source, mean max weight, entropy (+ uniform refs); source 0 is the
    null source when the config has one, then ``x0``, then the completed sources.
    DDL: ``beta`` (mean β) and ``residual`` (mean ``|v − kᵀs|``) of every sublayer.
    The typed summary is ``find_router(model).statistics()`` (a :class:`~lit_dar.rule.RuleStatistics`).

    Raises:
        ValueError: the model has no rule, or no forward was recorded.
    """
    rule = find_router(model)
    if rule is None:
        raise ValueError(NOT_RECORDED)
    return rule.statistics().per_point()
