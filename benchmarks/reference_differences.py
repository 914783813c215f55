"""How far lit-dar's logits are from those of the public reference code's order, for the two places where
the two differ on purpose (docs/method.md, "Where lit-dar differs from the reference code").

Both are measured inside lit-dar, on the same weights, by changing what one routed point sees:

* ``sublayer0``: with ``gate="none"`` lit-dar's sublayer 0 routes over its only source ``x0``, so its input is
  ``s + x0 = 2·x0``; the reference routes over nothing there, so its input is ``x0``. Here routed point 0's
  mixture is replaced by zero (``h_0 = s_0 = x0``).
* ``block_order``: in ``delta_block`` the reference adds a completed block's delta only after the attention
  sublayer of the next block's first layer has routed; lit-dar's sees it. Here that routed point's newest
  source is dropped.

Float64 on the CPU, LitGPT's init (``GPT._init_weights``: every linear and the embedding N(0, 0.02²)) unless
``--perturbed``, which instead uses the tests' weights (PyTorch's default init plus N(0, 0.1²) on every
parameter, routing parameters randomised). Each row: max and mean ``|Δlogit|`` and how often the argmax agrees.

    python benchmarks/reference_differences.py
    python benchmarks/reference_differences.py --perturbed
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from litgpt import GPT, Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_dar import DARConfig, patch_model  # noqa: E402
from lit_dar.backends import PlainBackend  # noqa: E402


def build(name: str, n_layer: int, n_embd: int, eps: float, dar: DARConfig, perturbed: bool, seed: int) -> GPT:
    torch.manual_seed(seed)
    head_size = 64 if n_embd >= 256 else 8
    config = Config.from_name(
        name, n_layer=n_layer, n_embd=n_embd, n_head=n_embd // head_size, head_size=head_size,
        n_query_groups=max(1, n_embd // head_size // 2), intermediate_size=3 * n_embd, vocab_size=4096,
        padded_vocab_size=4096, block_size=64, norm_eps=eps,
    )
    model = GPT(config).double()
    if perturbed:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    else:
        model.apply(model._init_weights)
    # the plain backend hands each routed point its sources as a tuple (DepthRouter.route), so one can be changed
    patch_model(model, dar, backend=PlainBackend())
    model.double()
    if perturbed:
        with torch.no_grad():
            for pname, p in model.dar.named_parameters():
                p.copy_((1.0 if pname == "key_gain" else 0.0) + 0.5 * torch.randn_like(p))
    return model


def reference_order(model: GPT, change: str) -> None:
    """Make one routed point see what the reference code's does (see the module docstring)."""
    route, plan = model.dar.route, model.dar.plan
    if change == "sublayer0":
        points = {0}
    else:  # the attention sublayer of the first layer of every block after the first
        starts = [j + 1 for j, closes in enumerate(plan.closes_group) if closes][:-1]
        points = set(starts)

    def routed(k, sources, *args):
        if k not in points:
            return route(k, sources, *args)
        if change == "sublayer0":
            return torch.zeros_like(sources[0])
        return route(k, sources[:-1], *args)

    model.dar.route = routed


def compare(name: str, n_layer: int, n_embd: int, eps: float, mode: str, change: str, perturbed: bool,
            seed: int) -> str:
    dar = DARConfig(mode=mode, num_blocks=2, gate="none")
    ours, theirs = (build(name, n_layer, n_embd, eps, dar, perturbed, seed) for _ in range(2))
    reference_order(theirs, change)
    idx = torch.randint(0, 4096, (4, 32), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a, b = ours(idx), theirs(idx)
    diff = (a - b).abs()
    agree = (a.argmax(-1) == b.argmax(-1)).double().mean().item()
    return (f"| {change} | {mode} | {n_layer} | {n_embd} | {eps:g} | {diff.max().item():.3g} "
            f"| {diff.mean().item():.3g} | {a.abs().max().item():.3g} | {100 * agree:.1f} % |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--perturbed", action="store_true", help="the tests' weights instead of LitGPT's init")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"weights: {'perturbed (tests)' if args.perturbed else 'LitGPT init, N(0, 0.02²)'}, float64, 4×32 tokens")
    print("Qwen3-0.6B's structure (RMSNorm, QK norm), narrowed; num_blocks=2, gate='none'")
    print("| change | mode | layers | d | norm ε | max abs Δlogit | mean abs Δlogit | max abs logit "
          "| argmax agreement |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = [
        ("sublayer0", "delta", 4, 256, 1e-6),
        ("sublayer0", "delta", 4, 1024, 1e-6),
        ("sublayer0", "delta_block", 4, 1024, 1e-6),
        ("sublayer0", "delta", 4, 1024, 0.0),  # without ε, 2·x0 and x0 normalise to the same bits
        ("block_order", "delta_block", 4, 256, 1e-6),
        ("block_order", "delta_block", 4, 1024, 1e-6),
    ]
    for change, mode, n_layer, n_embd, eps in rows:
        print(compare("Qwen3-0.6B", n_layer, n_embd, eps, mode, change, args.perturbed, args.seed), flush=True)


if __name__ == "__main__":
    main()
