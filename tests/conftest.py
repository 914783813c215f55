"""Tiny LitGPT models that keep each architecture's structural flags (norms, MoE, parallel residual, …)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from litgpt import GPT, Config

from lit_dar.recipe import small_config

ARCHITECTURES = [
    "Llama-3.2-1B",
    "Qwen2.5-0.5B",
    "Qwen3-0.6B",
    "Qwen3-30B-A3B",
    "gemma-2-2b",
    "Gemma-3-1b-it",
    "pythia-14m",
    "falcon-7b",
    "phi-2",
    "Mixtral-8x7B-v0.1",
    "OLMo-2-1124-7B",
]
MODES = ["delta", "delta_block", "attnres_full", "attnres_block"]


def tiny_config(name: str = "Qwen3-0.6B", n_layer: int = 4, **overrides) -> Config:
    """A few-layer, narrow version of a named LitGPT config with its structure intact."""
    size = dict(n_layer=n_layer, n_embd=32, n_head=4, head_size=8, intermediate_size=48, vocab_size=96, block_size=64)
    return small_config(name, **{**size, **overrides})


def tiny_gpt(name: str = "Qwen3-0.6B", seed: int = 0, **overrides) -> GPT:
    """A tiny model with non-trivial weights (norm gains and biases perturbed too)."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(name, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def lab_script(path: str):
    """A script of the checkout's lab (``benchmarks/bench.py``, ``experiments/study.py``) as a module."""
    name = Path(path).stem
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / path)
    script = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up there
    spec.loader.exec_module(script)
    return script


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(1234)


def patched_copy(base: GPT, dar, backend=None) -> GPT:
    """A fresh model with ``base``'s weights, patched with ``dar`` (``base`` stays unpatched); depth routing
    computed by ``backend`` (``None``: the default)."""
    from lit_dar import patch_model

    model = GPT(base.config)
    model.load_state_dict(base.state_dict())
    return patch_model(model, dar, backend=backend)


def with_backend(model: GPT, backend) -> GPT:
    """A copy of the patched ``model`` (config, weights, dtype, device, train/eval) whose router is built with
    ``backend``. The global RNG is left as it was, so a test draws the same data with or without copies."""
    from lit_dar import get_dar_config, patch_model

    weight = model.transformer.wte.weight
    with torch.random.fork_rng(devices=[]):
        copy = GPT(model.config).to(device=weight.device, dtype=weight.dtype)
    patch_model(copy, get_dar_config(model), backend=backend)
    copy.load_state_dict(model.state_dict())
    return copy.train(model.training)


def assert_matches_reference(model: GPT, idx: torch.Tensor, reference) -> None:
    """Logits and every parameter's gradient equal ``reference(model, idx)``'s, a plain re-implementation (float64)."""
    out, ref = model(idx), reference(model, idx)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    grad = torch.randn_like(out)
    params = list(model.parameters())
    for g, g_ref in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad)):
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-9)


def decode(model: GPT, idx: torch.Tensor, prompt: int = 6) -> torch.Tensor:
    """Prefill ``prompt`` tokens, then decode the rest one at a time with the KV cache."""
    with torch.no_grad():
        model.set_kv_cache(batch_size=idx.shape[0])
        steps = [model(idx[:, :prompt], input_pos=torch.arange(prompt))]
        for t in range(prompt, idx.shape[1]):
            steps.append(model(idx[:, t : t + 1], input_pos=torch.tensor([t]), input_pos_maxp1=t + 1))
        model.clear_kv_cache()
    return torch.cat(steps, dim=1)


REENTRANT_WRAPPERS = ["torch.utils.checkpoint", "checkpoint_wrapper"]


def checkpoint_reentrant(model: GPT, wrapper: str) -> None:
    """Wrap every block in reentrant activation checkpointing: ``torch.utils.checkpoint`` with ``use_reentrant=True``
    (the block's keyword arguments bound, since that variant takes none), or ``checkpoint_wrapper`` with
    ``CheckpointImpl.REENTRANT``."""
    from functools import partial

    from litgpt.model import Block
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper,
    )
    from torch.utils.checkpoint import checkpoint

    if wrapper == "checkpoint_wrapper":
        wrap = partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.REENTRANT)
        apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrap, check_fn=lambda m: isinstance(m, Block))
        return
    for block in model.transformer.h:
        forward = block.forward
        block.forward = lambda *a, _f=forward, **k: checkpoint(partial(_f, **k), *a, use_reentrant=True)
