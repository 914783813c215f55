"""Achieved bandwidth of the source bank's batched products, against a plain copy of the same sources.

Exact routing is memory-bound (docs/performance.md, "The floor"): what Delta pays is reading its
(routed point, source) pairs. This measures how fast the products that do those reads run on a device,
for a bank of ``--tokens`` rows of ``--dim`` values, at a few source counts ``n``: one point's mixture
and ``dα`` (`bmm` with one row per token), a window's (``K`` rows), the same in bf16, a plain read and a
copy. ``--cold`` sweeps a buffer larger than the caches before every timed call, as the model's own passes
do between two routed points: on CPUs with a large L3 the hot and cold rates differ by 2×.

    python benchmarks/bank_products.py --device cuda --tokens 8192 --dim 1024   # Qwen3-0.6B, B 4, T 2048
    python benchmarks/bank_products.py --device cpu --tokens 1024 --dim 512 --slots 48 --n 37 --window 8 --cold 600
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch


def seconds(fn: Callable[[], object], device: torch.device, reps: int, sweep: torch.Tensor | None = None) -> float:
    """Mean seconds per call of ``fn``; with ``sweep`` (CPU), the fastest call, each after a pass over ``sweep``."""
    fn()
    if sweep is not None:
        best = float("inf")
        for _ in range(reps):
            sweep.mul_(1.0)  # evicts the sources from the caches
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3 / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def products(U: torch.Tensor, K: int) -> dict[str, Callable[[], object]]:
    """The bank's reads of ``U (tokens, n, D)`` (a prefix of its slots), by name."""
    tokens, n, D = U.shape
    a1, aK = torch.randn(tokens, 1, n, device=U.device), torch.randn(tokens, K, n, device=U.device)
    g1, gK = torch.randn(tokens, 1, D, device=U.device), torch.randn(tokens, K, D, device=U.device)
    Ub, g1b, aKb = U.bfloat16(), g1.bfloat16(), aK.bfloat16()
    copy = torch.empty_like(U)  # allocated once: a fresh block would time the allocator's page faults
    return {
        "mixture, 1 point: bmm(α, U)": lambda: torch.bmm(a1, U),
        f"mixture, {K} points: bmm(A, U)": lambda: torch.bmm(aK, U),
        "dα, 1 point: bmm(g, Uᵀ)": lambda: torch.bmm(g1, U.transpose(1, 2)),
        f"dα, {K} points: bmm(G, Uᵀ)": lambda: torch.bmm(gK, U.transpose(1, 2)),
        "mixture, 1 point, as (α·U).sum": lambda: (a1.transpose(1, 2) * U).sum(1),
        "dα, 1 point, bf16 sources": lambda: torch.bmm(g1b, Ub.transpose(1, 2)),
        f"mixture, {K} points, bf16 sources": lambda: torch.bmm(aKb, Ub),
        "read of U (sum)": lambda: U.sum(),
        "copy of U (reads and writes it)": lambda: copy.copy_(U),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=8192, help="B·T of the bank")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--slots", type=int, default=57, help="the bank's source slots (Delta at L 28: 2L + 1)")
    p.add_argument("--n", type=int, nargs="+", default=[8, 28, 56], help="source counts read")
    p.add_argument("--window", type=int, default=4, help="K, points of a lookahead window")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--cold", type=int, default=0, metavar="MB",
                   help="CPU: sweep a buffer of this many MB before each call (larger than the L3)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"{name}; bank of {args.tokens} tokens × {args.slots} slots × {args.dim} fp32; "
          f"{'cold caches (fastest call); ' if args.cold else ''}GB/s counts the fp32 bytes of U that a product reads")
    print("| n | product | ms | GB/s |\n|---:|---|---:|---:|")
    bank = torch.randn(args.tokens, args.slots, args.dim, device=device)
    sweep = torch.ones(args.cold * 2**18) if args.cold and device.type == "cpu" else None
    for n in args.n:
        U = bank[:, :n]  # a prefix of the slots, strided as the bank's reads are
        for label, fn in products(U, args.window).items():
            s = seconds(fn, device, args.reps, sweep)
            print(f"| {n} | {label} | {s * 1e3:.3f} | {U.numel() * 4 / s / 1e9:.0f} |")


if __name__ == "__main__":
    main()
