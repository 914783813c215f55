import math

import pytest
import torch
from routing_reference import depth_attention, reference_depth_attention

from lit_dar.backends import PlainBackend
from lit_dar.routing import DepthRouter, RoutingPlan, layers_per_block, summarize_weights


def _sources(n: int, shape=(2, 3, 8), dtype=torch.float64) -> list[torch.Tensor]:
    return [torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(n)]


@pytest.mark.parametrize("n", [1, 2, 5])
def test_depth_attention_gradcheck(n: int) -> None:
    sources = _sources(n)
    query = torch.randn(8, dtype=torch.float64, requires_grad=True)
    gain = (1 + 0.3 * torch.randn(8, dtype=torch.float64)).requires_grad_()
    # the op computes in fp32 by contract, so check it in float64 through its fp32-free core
    import routing_reference

    def op(q, g, *u):
        return routing_reference._DepthAttention.apply(q * g, 1e-6, None, 0, *u)

    torch.autograd.gradcheck(op, (query, gain, *sources), eps=1e-6, atol=1e-5)


def test_depth_attention_matches_plain_autograd() -> None:
    sources = _sources(4, dtype=torch.float32)
    query = torch.randn(8, requires_grad=True)
    gain = (1 + 0.3 * torch.randn(8)).requires_grad_()
    grad = torch.randn(2, 3, 8)

    out = depth_attention(sources, query, gain)
    grads = torch.autograd.grad(out, [query, gain, *sources], grad)
    ref = reference_depth_attention(sources, query, gain)
    ref_grads = torch.autograd.grad(ref, [query, gain, *sources], grad)

    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_depth_attention_bf16_computes_in_fp32() -> None:
    sources = [torch.randn(2, 3, 8).bfloat16() for _ in range(3)]
    query, gain = torch.randn(8), torch.ones(8)
    out = depth_attention(sources, query, gain)
    assert out.dtype == torch.bfloat16
    exact = reference_depth_attention([u.float() for u in sources], query, gain)
    # only the final rounding to bf16 differs from the fp32 result
    torch.testing.assert_close(out, exact.bfloat16(), rtol=0, atol=0)


def test_uniform_weights_at_zero_query_and_stats() -> None:
    sources = [torch.randn(2, 3, 8) for _ in range(4)]
    stats: dict = {}
    out = depth_attention(sources, torch.zeros(8), torch.ones(8), stats=stats, key=7)
    torch.testing.assert_close(out, torch.stack(sources).mean(0))
    summary = summarize_weights(stats[7])
    torch.testing.assert_close(summary["mean_weight"], torch.full((4,), 0.25))
    assert summary["max_weight"].item() == pytest.approx(0.25)
    assert summary["entropy"].item() == pytest.approx(math.log(4), rel=1e-5)
    assert summary["uniform_entropy"].item() == pytest.approx(math.log(4))


@pytest.mark.parametrize(
    ("mode", "n_layer", "num_blocks", "parallel", "expected"),
    [
        ("delta", 3, 1, False, [1, 2, 3, 4, 5, 6]),
        ("delta", 3, 1, True, [1, 1, 3, 3, 5, 5]),
        ("delta_block", 6, 3, False, [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]),
        ("delta_block", 4, 2, True, [1, 1, 1, 1, 2, 2, 2, 2]),
        ("attnres_full", 2, 1, False, [1, 2, 3, 4, 5]),
        ("attnres_block", 4, 2, False, [1, 2, 2, 2, 2, 3, 3, 3, 3]),
        ("attnres_block", 4, 2, True, [1, 1, 2, 2, 2, 2, 3, 3, 3]),
    ],
)
def test_plan_sources(mode, n_layer, num_blocks, parallel, expected) -> None:
    plan = RoutingPlan.for_mode(mode, n_layer, num_blocks, parallel)
    assert plan.n_sources() == expected
    assert plan.n_routes == len(expected)


def test_only_sources_someone_reads_are_stored() -> None:
    """Without a final route no routed point reads the source the last sublayer completes."""
    assert RoutingPlan.for_mode("delta", 3, 1, False).n_stored == 6  # x0 and the first five outputs
    assert RoutingPlan.for_mode("delta_block", 6, 3, False).n_stored == 3  # x0 and two of three blocks
    assert RoutingPlan.for_mode("attnres_full", 2, 1, False).n_stored == 5  # the final route reads all
    # a source's logits are computed from its first reader on; nobody reads the last one of a parallel layer
    assert RoutingPlan.for_mode("delta", 3, 1, True).first_readers() == (0, 2, 2, 4, 4, 6)
    assert RoutingPlan.for_mode("attnres_block", 4, 2, False).first_readers() == (0, 4, 8)
    router = DepthRouter(RoutingPlan.for_mode("delta_block", 6, 3, False), 8, gate=False, null_source=False)
    assert router.start(torch.randn(2, 3, 8)).bank.values.shape == (6, 3, 8)


def test_lookahead_windows() -> None:
    """Runs of K ≈ √(2n) routed points (at most ``size``) share one product over their common n sources, where
    that prefix has at least 2K sources; grouped points (Delta Block) and plans with a visible partial sum
    get none."""
    from lit_dar.backends import lookahead_windows, shared_source_groups
    from lit_dar.bank import SourceBank, window_size

    assert [window_size(n, 8) for n in (3, 4, 6, 9, 13, 18, 32, 50, 100)] == [0, 2, 3, 4, 5, 6, 8, 8, 8]
    assert window_size(100, 1) == 0 and window_size(100, 4) == 4
    # a bank's scratch buffers hold the largest window of any prefix it can have (window_size is not monotone:
    # 4 sources take a window of 2, 5 none)
    for capacity in range(1, 60):
        bank = SourceBank(torch.zeros(2, 4), capacity, torch.zeros(3, 4), 1e-6, lookahead=8)
        assert max(window_size(n, 8) for n in range(capacity + 1)) <= bank.window_rows

    def windows(mode, n_layer, parallel=False, size=2):
        plan = RoutingPlan.for_mode(mode, n_layer, 2, parallel)
        return lookahead_windows(plan, shared_source_groups(plan), size)

    # Delta, L 3: routed point k reads k+1 sources; from 4 sources on, windows of two
    assert windows("delta", 3) == (None, None, None, (3, 5, 4), (3, 5, 4), None)
    assert windows("delta", 3, size=3) == windows("delta", 3)  # a prefix of 4 sources takes windows of two
    # deeper, the windows grow with their prefix: 2, 3, 4, 5, 6 points (the last point is a run of one)
    starts = {w for w in windows("delta", 12, size=8) if w is not None}
    assert sorted(starts) == [(3, 5, 4), (5, 8, 6), (8, 12, 9), (12, 17, 13), (17, 23, 18)]
    # parallel layers: both sublayers read the same sources (counts 1 1 3 3 5 5 7)
    assert windows("attnres_full", 3, parallel=True) == (None,) * 4 + ((4, 6, 5), (4, 6, 5), None)
    assert windows("delta_block", 4) == (None,) * 8
    assert windows("attnres_block", 4) == (None,) * 9
    assert windows("delta", 3, size=0) == (None,) * 6


def test_layers_per_block() -> None:
    assert layers_per_block(12, 4) == 3
    assert layers_per_block(36, 8) == 5  # 7 blocks of 5 and one of 1
    assert layers_per_block(12, 12) == 1
    with pytest.raises(ValueError, match="impossible.*1 … 12"):
        layers_per_block(12, 13)
    with pytest.raises(ValueError, match="impossible"):
        layers_per_block(12, 0)
    with pytest.raises(ValueError, match=r"only 4 blocks. Choose num_blocks from \[1, 2, 3, 4, 6, 12\]"):
        layers_per_block(12, 5)
    with pytest.raises(ValueError, match="Unknown routing mode"):
        RoutingPlan.for_mode("residual", 12, 4, False)


def test_router_reset_and_extra_state() -> None:
    plan = RoutingPlan.for_mode("delta", 2, 1, False)
    router = DepthRouter(plan, 8, gate=True, null_source=True)
    assert router.query.shape == (4, 8) and router.null.shape == (4, 8) and router.gate.shape == (4,)
    with torch.no_grad():
        for p in router.parameters():
            p.normal_()
    router.reset_parameters()
    assert router.query.abs().sum() == 0 and router.gate.abs().sum() == 0 and router.null.abs().sum() == 0
    assert torch.equal(router.key_gain, torch.ones(4, 8))

    router.config_dict = {"mode": "delta"}
    other = DepthRouter(plan, 8, gate=True, null_source=True)
    other.config_dict = {"mode": "delta_block"}
    with pytest.raises(ValueError, match="routing config differs"):
        other.load_state_dict(router.state_dict())


def test_plain_path_reads_a_source_once_per_routed_point() -> None:
    """The plain math (what ``torch.compile`` traces) gets a source's logits for every routed point from one
    product when the source completes; a routed point then reads each source once, for its mixture. Computing
    the logits per routed point would read every source twice more per reader (its dot product, its norm)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.storages: list[set[int]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:  # views read nothing
                flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
                self.storages.append({t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)})
            return func(*args, **(kwargs or {}))

    n_layer = 3
    plan = RoutingPlan.for_mode("delta", n_layer, 1, False)
    router = DepthRouter(plan, 8, gate=False, null_source=False, backend=PlainBackend())
    torch.nn.init.normal_(router.query)
    outputs = []

    def sublayer(h: torch.Tensor) -> torch.Tensor:
        outputs.append(torch.tanh(h))
        return outputs[-1]

    x0 = torch.randn(2, 5, 8)
    with torch.no_grad(), Reads() as reads:
        stream, state = x0, router.start(x0)
        for layer in range(n_layer):
            stream, state = router.layer(layer, stream, state, sublayer, sublayer)
    first = plan.first_readers()  # a source's logits are computed for the points that read it
    assert [x.shape for x in state.logits] == [(2, 5, plan.n_routes - f) for f in first]
    readers = [sum(n > i for n in plan.n_sources()) for i in range(plan.n_stored)]
    for i, source in enumerate((x0, *outputs[: plan.n_stored - 1])):
        ptr = source.untyped_storage().data_ptr()
        ops = sum(ptr in op for op in reads.storages)
        # its logits (a product and a norm), the stream adds it enters, and one mixture term per reader
        assert ops <= 4 + readers[i], (i, ops, readers[i])


def test_backend_is_chosen_at_construction() -> None:
    """A router binds its own copy of the backend it is given (one backend object can configure several routers),
    and its settings reach each forward's bank through the bank's constructor."""
    from lit_dar.backends import BankBackend

    plan = RoutingPlan.for_mode("delta", 6, 1, False)
    assert isinstance(DepthRouter(plan, 8, gate=False, null_source=False).backend, BankBackend)
    backend = BankBackend(lookahead=3, lookahead_tokens=0, defer_from=8)
    a, b = (DepthRouter(plan, 8, gate=True, null_source=False, backend=backend) for _ in range(2))
    assert a.backend is not b.backend and a.backend.pool is not b.backend.pool
    assert (a.backend.lookahead, a.backend.lookahead_tokens, a.backend.defer_from) == (3, 0, 8)
    bank = a.start(torch.randn(2, 3, 8)).bank
    assert bank.lookahead == 3 and bank.defer_from == 8 and bank.windows == a.backend.windows
    assert any(w is not None for w in bank.windows) and bank.window_gates is not None
    # below lookahead_tokens (decoding) no windows
    bank = DepthRouter(plan, 8, gate=True, null_source=False).start(torch.randn(1, 1, 8)).bank
    assert bank.lookahead == 0 and bank.windows == () and bank.defer_from == 0
