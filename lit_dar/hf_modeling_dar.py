"""Delta Attention Residuals on transformers' own Llama, Qwen2, Qwen3 and Mistral models.

This file is what ``lit-dar export hf`` copies into an exported model directory, where
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads it. It is self-contained: it
imports torch and transformers only, never lit-dar.

Each family's model is transformers' own class with its decoder layers subclassed: a layer runs its
attention and MLP sublayers (and so transformers' KV cache, masks and rotary embeddings) exactly as before,
but each sublayer reads a routed input. The routing is lit-dar's plain definition (docs/method.md):

* sources: the embedding ``x0``, then the completed groups (one sublayer, or one block of ⌈L/N⌉ layers) of
  sublayer outputs; ``attnres_block`` also sees the running partial sum of the current block;
* ``α_i = softmax_i(w · RMSNorm(u_i))`` and ``r = Σ_i α_i u_i``, in fp32 (fp64 stays fp64), cast back;
* ``h = s + g·r`` (additive modes; ``g = 1`` without a gate) or ``h = r`` (replacement modes); the stream
  still grows by the sublayer outputs, ``s ← v + s``; AttnRes also routes the final hidden state;
* an optional learned null source, prepended as source 0 of every routed point.

Routing is per token, so decoding with the KV cache needs no extra cache. The routing parameters are the
model's ``model.dar.*`` tensors, stacked by routed point as in lit-dar.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from transformers.models.llama.modeling_llama import LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from transformers.models.mistral.modeling_mistral import (
    MistralConfig, MistralDecoderLayer, MistralForCausalLM, MistralModel,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2Config, Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2Model
from transformers.models.qwen3.modeling_qwen3 import Qwen3Config, Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3Model

try:  # transformers 5: initialisers that leave weights loaded from a checkpoint alone
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    from torch.nn import init

# mode -> (one group per sublayer?, partial sum visible?, additive?, final hidden state routed?)
MODES: dict[str, tuple[bool, bool, bool, bool]] = {
    "delta": (True, False, True, False),
    "delta_block": (False, False, True, False),
    "attnres_full": (True, False, False, True),
    "attnres_block": (False, True, False, True),
}
DAR_DEFAULTS: dict[str, Any] = {
    "mode": "delta_block", "num_blocks": 4, "gate": "none", "null_source": False, "eps": 1e-6,
}


def closes_group(mode: str, n_layer: int, num_blocks: int) -> list[bool]:
    """Per sublayer ``j`` (attention ``2l``, MLP ``2l+1``): does its output complete a source?"""
    if MODES[mode][0]:
        return [True] * (2 * n_layer)
    size = math.ceil(n_layer / num_blocks)
    if not 1 <= num_blocks <= n_layer or math.ceil(n_layer / size) != num_blocks:
        raise ValueError(f"num_blocks={num_blocks} does not split {n_layer} layers into blocks of ⌈L/N⌉ layers.")
    return [bool(j % 2) and ((j // 2 + 1) % size == 0 or j // 2 == n_layer - 1) for j in range(2 * n_layer)]


def _dar_fields(config: Any) -> dict[str, Any]:
    fields = {**DAR_DEFAULTS, **(getattr(config, "dar_config", None) or {})}
    if fields["mode"] not in MODES:
        raise ValueError(f"dar_config.mode={fields['mode']!r} is not supported here: choose one of {sorted(MODES)}.")
    if fields["gate"] not in ("none", "scalar"):
        raise ValueError(f"dar_config.gate={fields['gate']!r} is unknown: use 'none' or 'scalar'.")
    return fields


class DarRouter(nn.Module):
    """The routing parameters of every routed point, stacked by point ``k`` (sublayers, then the final state).

    ``query`` and ``key_gain`` (R, D); ``gate`` (R,) with a scalar gate; ``null`` (R, D) with a null source.
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        fields = _dar_fields(config)
        n_layer, dim = config.num_hidden_layers, config.hidden_size
        _, self.see_partial, self.additive, self.route_final = MODES[fields["mode"]]
        self.closes_group = closes_group(fields["mode"], n_layer, fields["num_blocks"])
        self.eps = float(fields["eps"])
        n_routes = 2 * n_layer + int(self.route_final)
        self.query = nn.Parameter(torch.zeros(n_routes, dim))
        self.key_gain = nn.Parameter(torch.ones(n_routes, dim))
        self.gate = nn.Parameter(torch.zeros(n_routes)) if fields["gate"] == "scalar" else None
        self.null = nn.Parameter(torch.zeros(n_routes, dim)) if fields["null_source"] else None

    def reset_parameters(self) -> None:
        """Uniform weights, unit key gain, closed gate, zero null source (lit-dar's init)."""
        init.zeros_(self.query)
        init.ones_(self.key_gain)
        if self.gate is not None:
            init.zeros_(self.gate)
        if self.null is not None:
            init.zeros_(self.null)

    def mixture(self, k: int, sources: list[Tensor]) -> Tensor:
        """``r_k = Σ_i softmax_i(w_k · RMSNorm_k(u_i)) u_i`` in fp32 (fp64 kept), in the sources' dtype."""
        if self.null is not None:
            sources = [self.null[k].to(sources[0].dtype).expand_as(sources[0]), *sources]
        dtype = torch.float64 if sources[0].dtype == torch.float64 else torch.float32
        with torch.autocast(sources[0].device.type, enabled=False):
            q = self.query[k].to(dtype) * self.key_gain[k].to(dtype)
            xs = [u.to(dtype) for u in sources]
            logits = torch.stack([(x @ q) * torch.rsqrt(x.pow(2).mean(-1) + self.eps) for x in xs], dim=-1)
            alpha = torch.softmax(logits, dim=-1)
            mixture = alpha[..., 0, None] * xs[0]
            for i in range(1, len(xs)):
                mixture = mixture + alpha[..., i, None] * xs[i]
        return mixture.to(sources[0].dtype)

    def combine(self, k: int, stream: Tensor, mixture: Tensor) -> Tensor:
        """Sublayer input: ``s + g·r`` (additive) or ``r`` (replacement)."""
        if not self.additive:
            return mixture
        if self.gate is None:
            return stream + mixture
        return stream + self.gate[k].to(mixture.dtype) * mixture


class RoutingRun:
    """The sources of one forward pass: the completed ones and the running partial sum of the current group."""

    def __init__(self, router: DarRouter) -> None:
        self.router = router
        self.sources: list[Tensor] = []
        self.partial: Tensor | None = None

    def start(self, x0: Tensor) -> None:
        self.sources, self.partial = [x0], None

    def input(self, k: int, stream: Tensor) -> Tensor:
        visible = self.sources
        if self.router.see_partial and self.partial is not None:
            visible = [*visible, self.partial]
        return self.router.combine(k, stream, self.router.mixture(k, visible))

    def emit(self, j: int, output: Tensor) -> None:
        self.partial = output if self.partial is None else self.partial + output
        if self.router.closes_group[j]:
            self.sources.append(self.partial)
            self.partial = None

    def finish(self, stream: Tensor) -> Tensor:
        """The hidden state fed to the final norm: the stream, or its own routed mixture (AttnRes)."""
        if self.router.route_final:
            final = self.sources if self.partial is None else [*self.sources, self.partial]
            stream = self.router.mixture(len(self.router.closes_group), final)
        self.sources, self.partial = [], None
        return stream


class DarDecoderLayerMixin:
    """A pre-norm decoder layer (``input_layernorm → self_attn``, ``post_attention_layernorm → mlp``) whose
    sublayers read routed inputs. Called with ``dar_run``; the first layer starts the run with its input
    ``x0``, the last one returns the final hidden state (routed in AttnRes modes)."""

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = False,
        cache_position: torch.LongTensor | None = None,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        dar_run: RoutingRun | None = None,
        **kwargs: Any,
    ) -> Tensor:
        if dar_run is None:
            raise RuntimeError("A DAR decoder layer runs inside its DAR model, which passes it the routing run.")
        layer = self.self_attn.layer_idx
        if layer == 0:
            dar_run.start(hidden_states)

        def attn(h: Tensor) -> Tensor:
            out, _ = self.self_attn(
                hidden_states=self.input_layernorm(h), attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, use_cache=use_cache, cache_position=cache_position,
                position_embeddings=position_embeddings, **kwargs,
            )
            return out

        def mlp(h: Tensor) -> Tensor:
            return self.mlp(self.post_attention_layernorm(h))

        stream = hidden_states
        for j, sublayer in ((2 * layer, attn), (2 * layer + 1, mlp)):
            v = sublayer(dar_run.input(j, stream))
            stream = v + stream  # the order lit-dar (and LitGPT) add in
            dar_run.emit(j, v)
        if layer == len(dar_run.router.closes_group) // 2 - 1:
            stream = dar_run.finish(stream)
        return stream


class DarModelMixin:
    """The family's decoder model with DAR layers and the routing parameters under ``dar``."""

    layer_class: type

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList([self.layer_class(config, i) for i in range(config.num_hidden_layers)])
        self.dar = DarRouter(config)
        self.post_init()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.gradient_checkpointing and self.training:
            raise ValueError("Gradient checkpointing would replay layers whose routing state has moved on: disable it.")
        return super().forward(*args, dar_run=RoutingRun(self.dar), **kwargs)


class DarPreTrainedMixin:
    """Initialise the routing parameters as lit-dar does (only those a checkpoint did not provide)."""

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, DarRouter):
            module.reset_parameters()
        else:
            super()._init_weights(module)


class DarConfigMixin:
    """The family's config plus ``dar_config``: lit-dar's ``DARConfig`` fields (mode, num_blocks, gate,
    null_source, eps)."""

    def __init__(self, dar_config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dar_config = dict(dar_config or {})
        _dar_fields(self)


class DarCausalLMMixin(DarPreTrainedMixin):
    model_class: type

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.model = self.model_class(config)
        self.post_init()


# ------------------------------------------------------------------------------------------------------------
# One set of classes per family: the auto_map of an exported config.json names those of its family.
# ------------------------------------------------------------------------------------------------------------


class DarLlamaConfig(DarConfigMixin, LlamaConfig):
    model_type = "dar_llama"


class DarLlamaDecoderLayer(DarDecoderLayerMixin, LlamaDecoderLayer):
    pass


class DarLlamaModel(DarPreTrainedMixin, DarModelMixin, LlamaModel):
    config_class = DarLlamaConfig
    layer_class = DarLlamaDecoderLayer


class DarLlamaForCausalLM(DarCausalLMMixin, LlamaForCausalLM):
    config_class = DarLlamaConfig
    model_class = DarLlamaModel


class DarQwen2Config(DarConfigMixin, Qwen2Config):
    model_type = "dar_qwen2"


class DarQwen2DecoderLayer(DarDecoderLayerMixin, Qwen2DecoderLayer):
    pass


class DarQwen2Model(DarPreTrainedMixin, DarModelMixin, Qwen2Model):
    config_class = DarQwen2Config
    layer_class = DarQwen2DecoderLayer


class DarQwen2ForCausalLM(DarCausalLMMixin, Qwen2ForCausalLM):
    config_class = DarQwen2Config
    model_class = DarQwen2Model


class DarQwen3Config(DarConfigMixin, Qwen3Config):
    model_type = "dar_qwen3"


class DarQwen3DecoderLayer(DarDecoderLayerMixin, Qwen3DecoderLayer):
    pass


class DarQwen3Model(DarPreTrainedMixin, DarModelMixin, Qwen3Model):
    config_class = DarQwen3Config
    layer_class = DarQwen3DecoderLayer


class DarQwen3ForCausalLM(DarCausalLMMixin, Qwen3ForCausalLM):
    config_class = DarQwen3Config
    model_class = DarQwen3Model


class DarMistralConfig(DarConfigMixin, MistralConfig):
    model_type = "dar_mistral"


class DarMistralDecoderLayer(DarDecoderLayerMixin, MistralDecoderLayer):
    pass


class DarMistralModel(DarPreTrainedMixin, DarModelMixin, MistralModel):
    config_class = DarMistralConfig
    layer_class = DarMistralDecoderLayer


class DarMistralForCausalLM(DarCausalLMMixin, MistralForCausalLM):
    config_class = DarMistralConfig
    model_class = DarMistralModel


# family (transformers' base model_type) -> (config class, causal LM class)
FAMILIES: dict[str, tuple[type, type]] = {
    "llama": (DarLlamaConfig, DarLlamaForCausalLM),
    "qwen2": (DarQwen2Config, DarQwen2ForCausalLM),
    "qwen3": (DarQwen3Config, DarQwen3ForCausalLM),
    "mistral": (DarMistralConfig, DarMistralForCausalLM),
}
for _config_class, _model_class in FAMILIES.values():
    # save_pretrained copies this file beside the weights and writes config.json's auto_map
    _config_class.register_for_auto_class()
    _model_class.register_for_auto_class("AutoModelForCausalLM")
