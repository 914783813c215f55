"""Deep Delta Learning (mode="ddl"): the op, the rule on every architecture, config, checkpoints, statistics."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import (
    ARCHITECTURES, REENTRANT_WRAPPERS, assert_matches_reference, checkpoint_reentrant, decode, patched_copy,
    tiny_config, tiny_gpt,
)
from litgpt import GPT, Config
from litgpt.model import Block

import lit_dar
from lit_dar import DARConfig, patch_model
from lit_dar.ddl import VALUE_KINDS, DeepDeltaRule, delta_update, reference_delta_update



def _randomize_rule(model: GPT, seed: int = 0) -> None:
    """Move β and v away from their uniform init so that every DDL weight matters in a test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.dar.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))


def _ddl(i: int = 0, **kwargs) -> DARConfig:
    """A DDL config; ``i`` cycles through the value kinds so that a loop over architectures covers all."""
    return DARConfig(mode="ddl", ddl_value=VALUE_KINDS[i % len(VALUE_KINDS)], **kwargs)


def _loss(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten())


# --------------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------------


def _op_inputs(value: str, dtype=torch.float64, shape=(2, 3, 6)):
    s, o, n = (torch.randn(*shape, dtype=dtype) for _ in range(3))
    tensors = [s, o, n, torch.randn(shape[-1], dtype=dtype), torch.randn((), dtype=dtype)]
    tensors += [torch.randn(shape[-1], dtype=dtype), torch.randn((), dtype=dtype)] if value != "constant" else [None, None]
    return [t.requires_grad_() if t is not None and dtype == torch.float64 else t for t in tensors]


@pytest.mark.parametrize("value", VALUE_KINDS)
@pytest.mark.parametrize("eps", [1e-6, 100.0])  # 100: ‖o‖ < ε, the clamped branch of k = o / max(‖o‖, ε)
def test_delta_update_gradcheck_and_reference(value: str, eps: float) -> None:
    inputs = _op_inputs(value)
    present = [i for i, t in enumerate(inputs) if t is not None]

    def op(*tensors):
        args = list(inputs)
        for i, t in zip(present, tensors):
            args[i] = t
        return delta_update(*args, value=value, constant=2.0, eps=eps)

    assert torch.autograd.gradcheck(op, [inputs[i] for i in present], eps=1e-6, atol=1e-5)
    out = op(*[inputs[i] for i in present])
    ref = reference_delta_update(*inputs, value=value, constant=2.0, eps=eps)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    tensors = [inputs[i] for i in present]
    for g, g_ref in zip(torch.autograd.grad(out, tensors, grad), torch.autograd.grad(ref, tensors, grad)):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_beta_zero_leaves_the_stream_bit_for_bit(dtype: torch.dtype) -> None:
    """β = 2·sigmoid(−∞) = 0: the sublayer leaves the stream exactly as it found it."""
    s, o, n, w, _, wv, bv = _op_inputs("linear", dtype=dtype)
    out = delta_update(s, o, n, w, torch.tensor(-math.inf), wv, bv, value="linear")
    assert out.dtype == dtype and torch.equal(out, s)


def test_delta_update_bf16_computes_in_fp32() -> None:
    s, o, n, w, b, _, _ = _op_inputs("constant", dtype=torch.bfloat16, shape=(4, 16, 64))
    s = s * 30  # a stream far larger than v: kᵀs in bf16 would cancel badly against v
    out = delta_update(s, o, n, w, b, value="constant", constant=2.0)
    exact = reference_delta_update(*(t.double() for t in (s, o, n, w, b)), value="constant", constant=2.0)
    assert out.dtype == torch.bfloat16
    # a single rounding of the fp64 result to bf16, up to fp32 noise
    torch.testing.assert_close(out.double(), exact.to(torch.bfloat16).double(), rtol=2**-8, atol=1e-6)


def test_update_rewrites_only_the_component_along_k() -> None:
    """β = 1 sets kᵀs to v and leaves the orthogonal complement; β = 2 reflects kᵀs about v."""
    s, o, n, w, _, _, _ = (t.detach() if t is not None else None for t in _op_inputs("constant"))
    k = o / o.norm(dim=-1, keepdim=True)
    for beta, expected in ((1.0, torch.full(s.shape[:-1], 3.0, dtype=s.dtype)), (2.0, 6.0 - (k * s).sum(-1))):
        # β = 2·sigmoid(b): b = 0 gives 1; b = +∞ gives 2 exactly
        out = delta_update(s, o, n, torch.zeros_like(w), torch.tensor(0.0 if beta == 1.0 else math.inf, dtype=s.dtype),
                           value="constant", constant=3.0)
        torch.testing.assert_close((k * out).sum(-1), expected)
        orth = out - (k * out).sum(-1, keepdim=True) * k
        torch.testing.assert_close(orth, s - (k * s).sum(-1, keepdim=True) * k)


# --------------------------------------------------------------------------------------------------
# Every architecture
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_forward_backward_every_value(name: str) -> None:
    base = tiny_gpt(name)
    idx = torch.randint(0, 96, (2, 12))
    for i in range(len(VALUE_KINDS)):
        model = patched_copy(base, _ddl(i))
        assert type(model.dar) is DeepDeltaRule and all(isinstance(b, Block) for b in model.transformer.h)
        _randomize_rule(model)
        loss = _loss(model, idx)
        loss.backward()
        assert torch.isfinite(loss)
        for pname, p in model.dar.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (VALUE_KINDS[i], pname)



@pytest.mark.parametrize("name", ARCHITECTURES)
def test_kv_cache_decoding_matches_full_forward(name: str) -> None:
    # LitGPT 0.5.x's own cached decoding of Gemma-2 is wrong with attention softcapping (see test_patch.py)
    overrides = {"attention_logit_softcapping": None} if name == "gemma-2-2b" else {}
    # float64: DDL mixes no positions, so cached decoding must agree to rounding, free of fp32 kernel noise
    base = tiny_gpt(name, **overrides).double()
    idx = torch.randint(0, 96, (2, 10))
    model = patched_copy(base, _ddl(ARCHITECTURES.index(name))).double().eval()
    _randomize_rule(model)
    with torch.no_grad():
        full = model(idx)
    cached = decode(model, idx)
    assert torch.equal(cached.argmax(-1), full.argmax(-1))
    assert (cached - full).abs().max().item() <= 1e-12


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_state_dict_round_trip(name: str, tmp_path: Path) -> None:
    dar = _ddl(ARCHITECTURES.index(name), ddl_beta_init=0.7)
    model = patched_copy(tiny_gpt(name), dar)
    _randomize_rule(model)
    lit_dar.save_checkpoint(model, tmp_path)
    loaded = lit_dar.load_model(tmp_path)
    assert lit_dar.get_dar_config(loaded) == dar
    idx = torch.randint(0, 96, (1, 8))
    assert torch.equal(loaded(idx), model(idx))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_beta_zero_makes_every_block_an_exact_identity(name: str) -> None:
    """β forced to 0 everywhere: every block returns its input bit for bit, so the model is ln_f(x0) → head.

    This is the identity of the *stream update*, not of the unpatched model: DDL with β = 0 drops every
    sublayer, whereas the unpatched model adds them (no DDL setting reproduces that; see docs/method.md).
    """
    base = tiny_gpt(name)
    model = patched_copy(base, _ddl(ARCHITECTURES.index(name)))
    _randomize_rule(model)
    with torch.no_grad():
        model.dar.beta_bias.fill_(-math.inf)
    pairs = []
    for block in model.transformer.h:
        block.register_forward_hook(lambda m, args, kwargs, out: pairs.append((args[0], out[0])), with_kwargs=True)
    idx = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        logits = model(idx)
        x0 = model.transformer.wte(idx) * (model.config.n_embd**0.5 if model.config.scale_embeddings else 1.0)
        assert not torch.equal(logits, base(idx))
    assert len(pairs) == model.config.n_layer
    assert all(torch.equal(x_in, x_out) for x_in, x_out in pairs)
    assert torch.equal(pairs[0][0], x0)


# --------------------------------------------------------------------------------------------------
# The model against a slow reference written from the equations
# --------------------------------------------------------------------------------------------------


def reference_forward(model: GPT, idx: torch.Tensor, dar: DARConfig) -> torch.Tensor:
    """A Python loop over sublayers, straight from the DDL section of docs/method.md."""
    cfg, rule = model.config, model.dar
    cos, sin = model.cos[: idx.shape[1]].unsqueeze(0), model.sin[: idx.shape[1]].unsqueeze(0)

    def update(j: int, s: torch.Tensor, o: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        k = o / torch.clamp_min(torch.sqrt((o * o).sum(-1, keepdim=True)), dar.eps)
        beta = 2 * torch.sigmoid((n * rule.beta_weight[j]).sum(-1) + rule.beta_bias[j])
        if dar.ddl_value == "constant":
            v = torch.full_like(beta, dar.ddl_value_init)
        else:
            v = (s * rule.value_weight[j]).sum(-1) + rule.value_bias[j]
            if dar.ddl_value == "sigmoid_linear":
                v = 1 / (1 + torch.exp(-v))
        return s + (beta * (v - (k * s).sum(-1))).unsqueeze(-1) * k

    s = model.transformer.wte(idx) * (cfg.n_embd**0.5 if cfg.scale_embeddings else 1.0)
    for l, block in enumerate(model.transformer.h):
        mlp_norm = block.norm_1 if cfg.shared_attention_norm else block.norm_2
        n_attn = block.norm_1(s)
        o_attn = block.post_attention_norm(block.attn(n_attn, cos, sin))
        if cfg.parallel_residual:  # both read the layer's input; attention's update first, then the MLP's
            n_mlp = mlp_norm(s)
            o_mlp = block.post_mlp_norm(block.mlp(n_mlp))
            s = update(2 * l + 1, update(2 * l, s, o_attn, n_attn), o_mlp, n_mlp)
        else:
            s = update(2 * l, s, o_attn, n_attn)
            n_mlp = mlp_norm(s)
            s = update(2 * l + 1, s, block.post_mlp_norm(block.mlp(n_mlp)), n_mlp)
    logits = model.lm_head(model.transformer.ln_f(s))
    if cfg.final_logit_softcapping is not None:
        logits = torch.tanh(logits / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
    return logits


@pytest.mark.parametrize("name", ["Qwen3-0.6B", "pythia-14m", "falcon-7b", "gemma-2-2b"])
@pytest.mark.parametrize("value", VALUE_KINDS)
def test_matches_reference_value_and_gradient(name: str, value: str) -> None:
    dar = DARConfig(mode="ddl", ddl_value=value)
    model = patched_copy(tiny_gpt(name, n_layer=3).double(), dar).double()
    _randomize_rule(model)
    assert_matches_reference(model, torch.randint(0, 96, (2, 7)), lambda m, idx: reference_forward(m, idx, dar))


def test_activation_checkpointing_replays_blocks_exactly() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    base = tiny_gpt("pythia-14m")
    plain, ckpt = patched_copy(base, _ddl(1)), patched_copy(base, _ddl(1))
    for model in (plain, ckpt):
        _randomize_rule(model)
        lit_dar.enable_routing_stats(model)
    apply_activation_checkpointing(ckpt, check_fn=lambda m: isinstance(m, Block))
    idx = torch.randint(0, 96, (2, 9))
    plain(idx).square().mean().backward()
    ckpt(idx).square().mean().backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
    for a, b in zip(lit_dar.routing_statistics(plain), lit_dar.routing_statistics(ckpt)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("wrapper", REENTRANT_WRAPPERS)
def test_reentrant_activation_checkpointing_gives_the_same_gradients(wrapper: str) -> None:
    """DDL's state carries no tensors from block to block (only the stream, a block argument), so reentrant
    checkpointing works as for an unpatched model."""
    base = tiny_gpt("pythia-14m")
    plain, ckpt = patched_copy(base, _ddl(1)), patched_copy(base, _ddl(1))
    for model in (plain, ckpt):
        _randomize_rule(model)
    checkpoint_reentrant(ckpt, wrapper)
    idx = torch.randint(0, 96, (2, 9))
    plain(idx).square().mean().backward()
    ckpt(idx).square().mean().backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


# --------------------------------------------------------------------------------------------------
# Init, parameters, statistics
# --------------------------------------------------------------------------------------------------


def test_init_and_parameters() -> None:
    for i, value_bias in enumerate((None, 2.0, 0.0)):  # constant, linear (v₀ = 2), sigmoid (logit(0.5) = 0)
        model = lit_dar.build_model(tiny_config(), _ddl(i, ddl_beta_init=0.5), device="meta")
        assert model.dar.beta_weight.is_meta
        model.to_empty(device="cpu")
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        model.apply(model._init_weights)  # what LitGPT's pretrain does after init: leaves the rule alone
        rule = model.dar
        assert rule.beta_weight.abs().sum() == 0
        torch.testing.assert_close(2 * torch.sigmoid(rule.beta_bias), torch.full((8,), 0.5))
        names = ["dar.beta_weight", "dar.beta_bias"] + (["dar.value_weight", "dar.value_bias"] if value_bias is not None else [])
        assert [n for n, _ in model.named_parameters() if lit_dar.dar_filter(n)] == names
        if value_bias is not None:
            assert rule.value_weight.abs().sum() == 0 and torch.equal(rule.value_bias, torch.full((8,), value_bias))
        # one D-vector and one scalar per sublayer for β, and as many again for a learned value
        assert lit_dar.routing_overhead(model)["routing_params"] == 8 * 33 * (1 if value_bias is None else 2)
    qwen3_8b = lit_dar.build_model(Config.from_name("Qwen3-8B"), DARConfig(mode="ddl"), device="meta")
    assert lit_dar.routing_overhead(qwen3_8b)["routing_params"] == 294_984  # 2L(D+1), as docs/method.md says


def test_routing_statistics_off_by_default_then_beta_and_residual_per_sublayer() -> None:
    model = patch_model(tiny_gpt(), DARConfig(mode="ddl", ddl_beta_init=0.25))
    idx = torch.randint(0, 96, (2, 6))
    model(idx)
    assert model.dar.last_weights == []
    with pytest.raises(ValueError, match="enable_routing_stats"):
        lit_dar.routing_statistics(model)
    lit_dar.enable_routing_stats(model)
    model(idx)
    stats = lit_dar.routing_statistics(model)
    assert len(stats) == 8 and all(set(s) == {"beta", "residual"} for s in stats)
    assert all(s["beta"].item() == pytest.approx(0.25) for s in stats)  # zero w_β: β = β₀ on every token
    # sublayer 0: |v − kᵀx0| with v = 2 and k the direction of the first attention output
    block, x0 = model.transformer.h[0], model.transformer.wte(idx)
    o = block.attn(block.norm_1(x0), model.cos[:6].unsqueeze(0), model.sin[:6].unsqueeze(0))
    expected = (2.0 - (o / o.norm(dim=-1, keepdim=True) * x0).sum(-1)).abs().mean()
    assert stats[0]["residual"].item() == pytest.approx(expected.item(), rel=1e-5)
    lit_dar.enable_routing_stats(model, False)
    assert model.dar.last_weights == []


# --------------------------------------------------------------------------------------------------
# Config and checkpoints
# --------------------------------------------------------------------------------------------------


def test_config_defaults_resolve_and_round_trip(tmp_path: Path) -> None:
    assert DARConfig(mode="ddl").ddl_value_init == 2.0
    assert DARConfig(mode="ddl", ddl_value="sigmoid_linear").ddl_value_init == 0.5
    cfg = DARConfig(mode="ddl", ddl_value="linear", ddl_value_init=-1.0, ddl_beta_init=1.5, eps=1e-5)
    assert DARConfig.from_file(cfg.save(tmp_path)) == cfg
    # the routing modes' configs (and the config inside their checkpoints) are exactly what they were before DDL
    assert set(DARConfig(mode="delta").to_dict()) == {"mode", "num_blocks", "gate", "null_source", "eps"}
    assert DARConfig.from_dict(DARConfig(mode="delta").to_dict()) == DARConfig(mode="delta")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "ddl", "ddl_value": "vector"}, r"ddl_value='vector' is unknown: choose one of \['constant'"),
        ({"mode": "ddl", "ddl_beta_init": 0.0}, r"ddl_beta_init=0.0 must lie in \(0, 2\)"),
        ({"mode": "ddl", "ddl_beta_init": 2}, r"ddl_beta_init=2 must lie in \(0, 2\)"),
        ({"mode": "ddl", "ddl_beta_init": True}, r"ddl_beta_init=True must lie in \(0, 2\)"),
        ({"mode": "ddl", "ddl_value_init": math.nan}, "ddl_value_init=nan must be a finite number"),
        ({"mode": "ddl", "ddl_value": "sigmoid_linear", "ddl_value_init": 2.0}, r"must lie in \(0, 1\) with ddl_value='sigmoid_linear'"),
        ({"mode": "ddl", "gate": "scalar"}, "gate='scalar' cannot be used with mode='ddl'.*no setting of it reproduces"),
        ({"mode": "ddl", "null_source": True}, "null_source=True cannot be used with mode='ddl'"),
        ({"mode": "delta", "ddl_value": "linear"}, "ddl_value='linear' is only used by mode='ddl', not mode='delta'"),
        ({"mode": "delta_block", "ddl_beta_init": 0.5}, "ddl_beta_init=0.5 is only used by mode='ddl'"),
    ],
)
def test_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DARConfig(**kwargs)


def test_a_routing_backend_is_refused() -> None:
    from lit_dar.backends import PlainBackend

    with pytest.raises(ValueError, match="only used by depth routing, not by mode='ddl'"):
        patch_model(tiny_gpt(), DARConfig(mode="ddl"), backend=PlainBackend())


def test_mismatched_and_plain_checkpoints(tmp_path: Path) -> None:
    source = patch_model(tiny_gpt(), DARConfig(mode="ddl"))
    lit_dar.save_checkpoint(source, tmp_path / "ddl")
    same_shapes = patch_model(GPT(source.config), DARConfig(mode="ddl", ddl_beta_init=0.5))
    with pytest.raises(ValueError, match=r"routing config differs.*'ddl_beta_init': \(1.0, 0.5\)"):
        lit_dar.load_checkpoint(same_shapes, tmp_path / "ddl")
    with pytest.raises(ValueError, match=r"routing config differs.*'ddl_value': \('constant', 'linear'\)"):
        lit_dar.load_checkpoint(patch_model(GPT(source.config), _ddl(1)), tmp_path / "ddl")
    with pytest.raises(ValueError, match=r"routing config differs.*'mode': \('ddl', 'delta'\)"):
        lit_dar.load_checkpoint(patch_model(GPT(source.config), DARConfig(mode="delta")), tmp_path / "ddl")
    # a plain LitGPT checkpoint: exactly the DDL weights keep their init
    torch.save(tiny_gpt().state_dict(), tmp_path / "lit_model.pth")
    with pytest.warns(UserWarning, match="2 routing keys keep their initialisation"):
        missing = lit_dar.load_checkpoint(patch_model(GPT(source.config), DARConfig(mode="ddl")), tmp_path)
    assert sorted(missing) == ["dar.beta_bias", "dar.beta_weight"]
