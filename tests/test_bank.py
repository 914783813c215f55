"""The fast routing path (the source bank, ``BankBackend``) against the per-routed-point op and plain autograd."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import with_backend
from litgpt import GPT, Config
from routing_reference import OpBackend, reference_depth_attention

from lit_dar import DARConfig, patch_model
from lit_dar.backends import BankBackend, PlainBackend
from lit_dar.bank import SourceBank, bank_input, emit

MODES = ["delta", "delta_block", "attnres_full", "attnres_block"]
BACKENDS = {"bank": BankBackend, "op": OpBackend, "autograd": PlainBackend}
IMPLS = list(BACKENDS)


def tiny(n_layer: int = 4, parallel: bool = False, **kw) -> Config:
    kwargs = dict(
        name="tiny", block_size=32, vocab_size=64, padded_vocab_size=64, n_layer=n_layer, n_embd=16, n_head=4,
        n_query_groups=2, head_size=4, intermediate_size=24, mlp_class_name="LLaMAMLP", norm_class_name="RMSNorm",
        parallel_residual=parallel, shared_attention_norm=parallel, bias=False, rotary_percentage=1.0,
    )
    kwargs.update(kw)
    return Config(**kwargs)


def _randomize_routing(model: GPT, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.dar.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + (1.0 if p is model.dar.key_gain else 0.0))


def _grads(model: GPT, idx: torch.Tensor, impl: str | None = None) -> tuple[torch.Tensor, dict]:
    """Logits and gradients of ``model``, or of a copy of it whose router uses the backend named ``impl``."""
    if impl is not None:
        model = with_backend(model, BACKENDS[impl]())
    model.zero_grad(set_to_none=True)
    logits = model(idx)
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3), dtype=logits.dtype)
    (logits * w.to(logits.device)).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("null", [False, True])
def test_whole_model_gradients_equal_across_implementations(mode: str, parallel: bool, null: bool) -> None:
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=4, parallel=parallel)).double()
    gate = "scalar" if mode in ("delta", "delta_block") else "none"
    patch_model(model, DARConfig(mode=mode, num_blocks=2, null_source=null, gate=gate))
    _randomize_routing(model)
    idx = torch.randint(0, 64, (2, 7))
    ref_out, ref = _grads(model, idx, "autograd")
    for impl in ("bank", "op"):
        out, grads = _grads(model, idx, impl)
        torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-10)
        assert grads.keys() == ref.keys()
        for name in ref:
            torch.testing.assert_close(grads[name], ref[name], rtol=1e-8, atol=1e-10, msg=f"{impl} {name}")


def _windows_on(monkeypatch: pytest.MonkeyPatch, model: GPT, size: int = 2) -> tuple[GPT, dict[str, int]]:
    """A copy of ``model`` with lookahead windows at any token count (and their deferred dα from a prefix of 8
    sources, as these models are shallow), and the counts of how often windows are used."""
    model = with_backend(model, BankBackend(lookahead=size, lookahead_tokens=0, defer_from=8))
    used = {"forward": 0, "direct": 0, "backward": 0, "deferred": 0}
    window_input, value_ahead = SourceBank.window_input, SourceBank._value_ahead
    deferred_grads = SourceBank._deferred_grads

    def spy_input(self, *a):
        out = window_input(self, *a)
        used["forward" if out is not None else "direct"] += 1
        return out

    def spy_ahead(self, *a):
        out = value_ahead(self, *a)
        used["backward"] += out[0] is not None
        return out

    def spy_grads(self, k0, *a):
        used["deferred"] += k0 not in self.groups  # a window's deferred product, not a group's
        return deferred_grads(self, k0, *a)

    monkeypatch.setattr(SourceBank, "window_input", spy_input)
    monkeypatch.setattr(SourceBank, "_value_ahead", spy_ahead)
    monkeypatch.setattr(SourceBank, "_deferred_grads", spy_grads)
    return model, used


@pytest.mark.parametrize("mode", ["delta", "delta_block", "attnres_full"])
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("size", [2, 3, 8])  # 8: windows sized to their prefix, of 2 to 5 points here
def test_lookahead_windows_give_the_same_gradients(
    mode: str, parallel: bool, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Routed points that share one product over their common sources (forward), and sources whose value
    gradients come from one product over their readers (backward), give plain autograd's gradients."""
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=8, parallel=parallel)).double()
    gate = "scalar" if mode != "attnres_full" else "none"
    patch_model(model, DARConfig(mode=mode, num_blocks=2, gate=gate))
    _randomize_routing(model)
    idx = torch.randint(0, 64, (2, 7))
    ref_out, ref = _grads(model, idx, "autograd")
    model, used = _windows_on(monkeypatch, model, size)
    out, grads = _grads(model, idx)
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-10)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-8, atol=1e-10, msg=name)
    assert used["backward"] > 0
    # Delta Block's points share their sources block by block already (one product per block)
    windowed = mode != "delta_block" and not (parallel and mode == "delta")
    assert (used["forward"] > 0) == windowed
    # a window's backward defers its prefix's dα where that prefix has at least ``defer_from`` sources
    windows = {w for w in model.dar.backend.windows if w is not None}
    deferring = {w for w in windows if w[2] >= model.dar.backend.defer_from}
    if size == 8 and windowed:
        assert len({w[1] - w[0] for w in windows}) > 1  # windows of more than one size
    assert used["deferred"] == len(deferring) and (len(deferring) > 0) == windowed


def _bank_route(sources, q, pre=None, post=None, stream=None, gate=None, eps=1e-6):
    """One routed point over ``sources`` through the bank path (as the bank backend runs it)."""
    bank = SourceBank(sources[0], len(sources), q.unsqueeze(0), eps)
    tokens = tuple(emit(bank, i, u, q.unsqueeze(0)) for i, u in enumerate(sources))
    return bank_input(bank, 0, len(sources), q, pre, post, stream, gate, None, tokens)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("extras", [False, True])
@pytest.mark.parametrize("combine", ["replace", "add", "gate"])
def test_bank_route_gradcheck(n: int, extras: bool, combine: str) -> None:
    """The fused op: ``h = s + g·Σ α_i u_i`` (or ``s + Σ``, or the mixture alone), gradients of every input."""
    g = torch.Generator().manual_seed(n)
    sources = [torch.randn(2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(n)]
    q = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    pre = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True) if extras else None
    post = torch.randn(2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True) if extras else None
    stream = torch.randn(2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True) if combine != "replace" else None
    gate = torch.tensor(0.7, dtype=torch.float64, requires_grad=True) if combine == "gate" else None
    optional = [t for t in (pre, post, stream, gate) if t is not None]

    def op(q, *rest):
        srcs, it = rest[:n], iter(rest[n:])
        ex = [next(it) if t is not None else None for t in (pre, post, stream, gate)]
        return _bank_route(list(srcs), q, *ex)

    torch.autograd.gradcheck(op, (q, *sources, *optional), eps=1e-6, atol=1e-8)


def test_bank_route_matches_reference_and_op() -> None:
    sources = [torch.randn(2, 5, 16, requires_grad=True) for _ in range(6)]
    query = torch.randn(16, requires_grad=True)
    gain = (1 + 0.3 * torch.randn(16)).requires_grad_()
    grad = torch.randn(2, 5, 16)
    ref = reference_depth_attention(sources, query, gain)
    ref_grads = torch.autograd.grad(ref, [query, gain, *sources], grad)
    out = _bank_route(sources, query * gain)
    grads = torch.autograd.grad(out, [query, gain, *sources], grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _model(mode="delta", n_layer=4, dtype=torch.float32, **dar) -> GPT:
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=n_layer)).to(dtype)
    patch_model(model, DARConfig(mode=mode, num_blocks=2, **dar))
    return model


@pytest.mark.parametrize("mode", ["delta", "delta_block"])
def test_zero_gate_is_bit_exact_identity(mode: str) -> None:
    model = _model(mode, gate="scalar")
    with torch.no_grad():  # any routing, closed gate
        model.dar.query.normal_()
        model.dar.key_gain.normal_()
    base = GPT(tiny())
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("dar.")})
    idx = torch.randint(0, 64, (2, 9))
    assert torch.equal(model(idx), base(idx))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("windows", [False, True])
def test_kv_cache_decode_matches_full_forward(mode: str, windows: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill and token-by-token decoding against one full forward: with a null source, or with lookahead
    windows (which a null source turns off) at every token count, decoded tokens included."""
    model = _model(mode, null_source=not windows, n_layer=6 if windows else 4).eval()
    _randomize_routing(model)
    model, used = _windows_on(monkeypatch, model) if windows else (model, {"forward": 0})
    idx = torch.randint(0, 64, (3, 10))
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(batch_size=3)
        steps = [model(idx[:, :6], input_pos=torch.arange(6))]
        for t in range(6, 10):
            steps.append(model(idx[:, t : t + 1], input_pos=torch.tensor([t])))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    assert (used["forward"] > 0) == (windows and mode in ("delta", "attnres_full"))


@pytest.mark.parametrize("mode", ["delta", "delta_block"])
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("windows", [False, True])
def test_forward_without_grad_matches_training_forward(
    mode: str, parallel: bool, windows: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without grad, the routed points of a block (which read the same sources) get their mixtures from one
    product per block; outputs and recorded weights equal the training forward's."""
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=4, parallel=parallel))
    patch_model(model, DARConfig(mode=mode, num_blocks=2, gate="scalar"))
    _randomize_routing(model)
    if windows:
        model, _ = _windows_on(monkeypatch, model)
    model.dar.record_stats = True
    idx = torch.randint(0, 64, (2, 7))
    out, weights = model(idx), model.dar.last_weights
    with torch.no_grad():
        torch.testing.assert_close(model(idx), out, rtol=1e-6, atol=1e-6)
    assert len(model.dar.last_weights) == len(weights) == model.dar.plan.n_routes
    for a, b in zip(model.dar.last_weights, weights):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_forward_without_grad_follows_parameter_updates() -> None:
    """Decoding keeps the stacked queries between forwards, but not past an update of the parameters."""
    model = _model("delta_block", gate="scalar").eval()
    _randomize_routing(model)
    idx = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        before = model(idx)
        model.dar.query.mul_(-2.0)  # in place, like an optimizer step
        after = model(idx)
        expected = with_backend(model, PlainBackend())(idx)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(after, before)


@pytest.mark.parametrize(("mode", "gate", "every", "windows"), [
    ("delta", "none", 1, False), ("attnres_block", "none", 1, False), ("delta_block", "scalar", 1, False),
    ("delta_block", "scalar", 2, False), ("delta", "scalar", 1, True), ("delta", "scalar", 2, True),
])
def test_activation_checkpointing_gradients(
    mode: str, gate: str, every: int, windows: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks re-run during backward (non-reentrant checkpointing) give the same gradients, also when only
    some of the layers of a Delta Block block (whose routed points share their mixtures) are re-run, or a
    lookahead window starts in a layer that is not re-run (its points then mix directly)."""
    from torch.utils.checkpoint import checkpoint

    model = _model(mode, dtype=torch.float64, gate=gate, n_layer=6 if windows else 4)
    _randomize_routing(model)
    idx = torch.randint(0, 64, (2, 7))
    _, ref = _grads(model, idx, "autograd" if windows else None)
    if windows:
        model, used = _windows_on(monkeypatch, model)
    for block in model.transformer.h[::every]:
        forward = block.forward
        block.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)
    _, got = _grads(model, idx)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)
    if windows:  # both: points mixed through their window, and replayed points whose window was gone
        assert used["forward"] > 0 and used["direct"] > 0 and used["deferred"] > 0


@pytest.mark.parametrize(("mode", "windows"), [("delta_block", False), ("delta", True)])
def test_retain_graph_second_backward(mode: str, windows: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second backward through a retained graph starts afresh (bank gradients, window sums)."""
    model = _model(mode, dtype=torch.float64, n_layer=6 if windows else 4)
    _randomize_routing(model)
    model, used = _windows_on(monkeypatch, model) if windows else (model, {})
    out = model(torch.randint(0, 64, (2, 5))).sum()
    first = torch.autograd.grad(out, list(model.parameters()), retain_graph=True)
    second = torch.autograd.grad(out, list(model.parameters()), grad_outputs=torch.tensor(3.0, dtype=out.dtype))
    for a, b in zip(first, second):
        torch.testing.assert_close(b, 3 * a, rtol=1e-4, atol=1e-6)  # the rope cache is fp32
    assert not windows or (used["backward"] > 0 and used["deferred"] > 0)


@pytest.mark.parametrize("mode", ["delta", "delta_block"])
def test_loss_inside_a_block_leaves_later_points_without_gradient(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loss on the stream after layer 5 of 8 (inside Delta Block's second block): the routed points of
    layers 6 and 7 never run backward, while their group's (or window's) earlier points do; the deferred
    products then cover only the points whose gradients came in. Gradients equal plain autograd's."""
    model = _model(mode, dtype=torch.float64, gate="scalar", n_layer=8)
    _randomize_routing(model)
    model, used = _windows_on(monkeypatch, model)
    idx = torch.randint(0, 64, (2, 7))
    captured = []
    grads = {}
    for impl, m in (("autograd", with_backend(model, PlainBackend())), ("bank", model)):
        m.transformer.h[5].register_forward_hook(lambda m, args, out: captured.append(out[0]))  # (stream, state)
        captured.clear()
        m(idx)
        loss = captured[0].square().sum()
        grads[impl] = torch.autograd.grad(loss, list(m.parameters()), allow_unused=True, materialize_grads=True)
    for a, b in zip(grads["autograd"], grads["bank"]):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)
    assert mode == "delta_block" or used["deferred"] > 0


def test_second_backward_does_not_reuse_a_stale_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the embedding and the routing frozen, the embedding's bank node has nothing to give a gradient
    to and never runs backward, so nothing at source 0 clears the last window of the first backward. At
    L 3 (K 2) that window covers the first source the second backward windows: it must be recomputed."""
    model = _model("delta", dtype=torch.float64, gate="scalar", n_layer=3)
    _randomize_routing(model)
    model, used = _windows_on(monkeypatch, model)
    for p in (*model.dar.parameters(), *model.transformer.wte.parameters()):
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.randn(2, 5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = (model(torch.randint(0, 64, (2, 5))) * weights).sum()
    first = torch.autograd.grad(out, params, retain_graph=True)
    second = torch.autograd.grad(out, params, grad_outputs=torch.tensor(3.0, dtype=out.dtype))
    assert used["backward"] > 0
    for a, b in zip(first, second):
        torch.testing.assert_close(b, 3 * a, rtol=1e-4, atol=1e-6)  # the rope cache is fp32


def test_bank_buffers_are_reused_only_once_their_graph_is_freed() -> None:
    """The router's pool hands a freed bank's buffers to the next forward; two live graphs never share them."""
    model = _model("delta", dtype=torch.float64)
    _randomize_routing(model)
    a, b = torch.randint(0, 64, (2, 5)), torch.randint(0, 64, (2, 5))

    def grads(*batches):
        model.zero_grad(set_to_none=True)
        losses = [model(x).sum() for x in batches]  # all graphs alive at once (gradient accumulation)
        for loss in losses:
            loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    separately = [x + y for x, y in zip(grads(a), grads(b))]
    for x, y in zip(grads(a, b), separately):
        torch.testing.assert_close(x, y)

    pool = model.dar.backend.pool
    assert pool._free, "a freed bank's buffers wait in the pool"
    spare = {t.data_ptr() for groups in pool._free.values() for ts in groups for t in ts}
    state = model.dar.start(torch.randn(2, 5, model.config.n_embd, dtype=torch.float64))
    assert state.bank.values.data_ptr() in spare
    model.dar.free_buffers()  # what the benchmark does before it measures a step's peak memory
    assert not any(pool._free.values())


def test_bf16_autocast_routing_in_fp32() -> None:
    model = _model("delta", null_source=True)
    _randomize_routing(model)
    idx = torch.randint(0, 64, (2, 6))
    outs = {}
    for impl in IMPLS:
        m = with_backend(model, BACKENDS[impl]())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[impl] = m(idx).float()
        outs[impl].sum().backward()
    torch.testing.assert_close(outs["bank"], outs["autograd"], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("impl", ["op", "autograd"])
def test_every_implementation_routes_in_fp32_under_autocast(impl: str) -> None:
    """Under bf16 autocast the per-point paths (the plain math is what ``torch.compile`` traces) give exactly
    their fp32 result: their products are not cast down."""
    model = _model("delta", null_source=True)
    _randomize_routing(model)
    model = with_backend(model, BACKENDS[impl]())
    sources = tuple(torch.randn(2, 5, 16) for _ in range(3))
    ref = model.dar.route(3, sources)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.dar.route(3, sources)
    assert out.dtype == torch.float32 and torch.equal(out, ref)


@pytest.mark.parametrize("mode", ["delta", "delta_block"])
def test_routing_compiles_without_graph_breaks_under_autocast(mode: str) -> None:
    model = _model(mode, null_source=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(model)(torch.randint(0, 64, (2, 8)))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_meta_device_and_stats() -> None:
    with torch.device("meta"):
        model = GPT(tiny())
    patch_model(model, DARConfig(mode="delta"))
    out = model(torch.zeros(1, 4, dtype=torch.long, device="meta"))
    assert out.device.type == "meta"

    model = _model("attnres_block", null_source=True)
    _randomize_routing(model)
    idx = torch.randint(0, 64, (2, 5))
    weights = {}
    for impl in IMPLS:
        m = with_backend(model, BACKENDS[impl]())
        m.dar.record_stats = True
        m(idx)
        weights[impl] = m.dar.last_weights
    assert [w.shape for w in weights["bank"]] == [w.shape for w in weights["autograd"]]
    for a, b in zip(weights["bank"], weights["autograd"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["bank", "autograd"])
def test_saved_for_backward_is_the_sources(impl: str) -> None:
    """Delta keeps (2L+1) source vectors per token for backward, not O(L²) stacked copies: the bank, and the
    plain math that ``torch.compile`` traces (source by source, never stacked)."""
    from test_bench import bench

    BenchSettings, Trainer = bench.BenchSettings, bench.Trainer

    settings = BenchSettings.quick()
    L = 6
    sizes = {}
    for name in ("baseline", "delta"):
        torch.manual_seed(0)
        model = GPT(tiny(n_layer=L))
        if name == "delta":
            patch_model(model, DARConfig(mode="delta"), backend=BACKENDS[impl]())
        trainer = Trainer(name, model, settings, torch.device("cpu"))
        trainer.idx = torch.randint(0, 64, (2, 16))
        trainer.targets = torch.randint(0, 64, (2, 16))
        sizes[name], _ = trainer.saved_for_backward()
    extra = sizes["delta"] - sizes["baseline"]
    tokens, D, S, pairs = 2 * 16, 16, 2 * L + 1, L * (2 * L + 1)
    if impl == "bank":  # the sources, their inverse RMS and their dot products with the 2L pseudo-queries
        floor = tokens * 4 * (S * D + S + S * 2 * L)
        assert extra <= 1.05 * floor, (extra, floor)
    else:  # the sources and a few numbers per (point, source) pair — a stack would add pairs·D
        assert extra <= tokens * 4 * (S * D + 4 * pairs), (extra, tokens * 4 * (S * D + 4 * pairs))


@pytest.mark.parametrize("mode", MODES)
def test_routing_compiles_without_graph_breaks(mode: str) -> None:
    model = _model(mode, null_source=True)
    explanation = torch._dynamo.explain(model)(torch.randint(0, 64, (2, 8)))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("mode", MODES)
def test_cached_decoding_compiles_without_graph_breaks(mode: str) -> None:
    """A decoded token's forward (KV cache, inference mode) is one graph: what LitGPT's ``generate --compile``
    turns into CUDA graphs."""
    model = _model(mode).eval()
    model.set_kv_cache(batch_size=2)
    idx = torch.randint(0, 64, (2, 7))
    with torch.inference_mode():
        model(idx[:, :6], input_pos=torch.arange(6))
        explanation = torch._dynamo.explain(model)(idx[:, 6:], input_pos=torch.tensor([6]))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_compiled_decoding_matches_eager() -> None:
    torch._dynamo.reset()
    model = _model("delta_block").eval()
    _randomize_routing(model)
    idx = torch.randint(0, 64, (2, 9))
    outs = []
    for fwd in (model, torch.compile(model, dynamic=False)):
        model.set_kv_cache(batch_size=2)
        with torch.inference_mode():
            steps = [fwd(idx[:, :6], input_pos=torch.arange(6))]
            steps += [fwd(idx[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(6, 9)]
        outs.append(torch.cat(steps, 1))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["delta", "attnres_block"])
def test_compiled_training_step_matches_eager(mode: str) -> None:
    torch._dynamo.reset()
    model = _model(mode, null_source=True)
    _randomize_routing(model)
    compiled = copy.deepcopy(model)
    idx, targets = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    results = []
    for m, fwd in ((model, model), (compiled, torch.compile(compiled))):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        losses = []
        for _ in range(2):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(fwd(idx).flatten(0, 1), targets.flatten())
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        results.append((losses, {n: p.grad for n, p in m.named_parameters()}))
    (eager_losses, eager_grads), (comp_losses, comp_grads) = results
    torch.testing.assert_close(comp_losses, eager_losses, rtol=1e-5, atol=1e-5)
    for name in eager_grads:
        torch.testing.assert_close(comp_grads[name], eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", MODES)
def test_implementations_agree_on_gpu(mode: str) -> None:
    """The bank's slot writes, pooled buffers and deferred products on CUDA, in fp64 against plain autograd."""
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=6)).double().cuda()
    patch_model(model, DARConfig(mode=mode, num_blocks=3, gate="scalar" if mode.startswith("delta") else "none"))
    _randomize_routing(model)
    idx = torch.randint(0, 64, (2, 9), device="cuda")
    (ref_out, ref), (out, grads) = (_grads(model, idx, impl) for impl in ("autograd", "bank"))
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-10)
    assert grads.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["delta", "delta_block"])
def test_bf16_training_and_decoding_on_gpu(mode: str) -> None:
    """Under CUDA bf16 autocast the bank stays fp32 and matches plain autograd; cached decoding on the GPU
    matches a full forward."""
    model = _model(mode, null_source=True).cuda()
    _randomize_routing(model)
    idx = torch.randint(0, 64, (2, 10), device="cuda")
    outs, grads = {}, {}
    for impl in ("autograd", "bank"):
        m = with_backend(model, BACKENDS[impl]())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs[impl] = m(idx).float()
        outs[impl].square().mean().backward()
        grads[impl] = m.dar.query.grad.clone()
        assert m.dar.query.grad.dtype == torch.float32
    torch.testing.assert_close(outs["bank"], outs["autograd"], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grads["bank"], grads["autograd"], rtol=5e-2, atol=5e-3)

    model.eval()
    with torch.inference_mode():
        full = model(idx)
        model.set_kv_cache(batch_size=2, device=torch.device("cuda"))
        steps = [model(idx[:, :6], input_pos=torch.arange(6, device="cuda"))]
        for t in range(6, 10):
            steps.append(model(idx[:, t : t + 1], input_pos=torch.tensor([t], device="cuda")))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
