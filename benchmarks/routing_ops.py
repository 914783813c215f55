"""Where routing's time goes, op by op: one training step of the unpatched model and of a patched one, every
aten op timed.

``routing_time.py`` says how long the routing takes; this says in which ops. Each op of a step runs under a
``TorchDispatchMode`` that times it (the wall time of the op itself, with its own threads), keyed by the
op and the shapes (and strides, where not contiguous) of its tensor arguments. Ops that only the patched
model runs are routing's; what the ops both run take longer in the patched one (more calls of the same
shapes: autograd's sums of the stream's gradients) is summed apart. Per key, the fastest of ``--rounds`` interleaved steps.

    python benchmarks/routing_ops.py --layers 24 --mode delta --rounds 2
    python benchmarks/routing_ops.py --layers 24 --mode delta --threads 1   # what scales with threads

The timing adds a Python call per op, so the totals run above a plain step's; compare ops, not steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench.py beside this script

from bench import BenchSettings, _malloc_returns_memory, build_trainers  # noqa: E402


def _signature(x: torch.Tensor) -> str:
    return f"{tuple(x.shape)}" + ("" if x.is_contiguous() else f"s{x.stride()}")


class OpTimer(TorchDispatchMode):
    """Seconds and calls per (op, argument shapes)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: dict[tuple[str, str], list] = defaultdict(lambda: [0.0, 0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        entry = self.times[(str(func), " ".join(_signature(a) for a in args if isinstance(a, torch.Tensor)))]
        entry[0] += time.perf_counter() - t0
        entry[1] += 1
        return out


def op_times(step) -> dict[tuple[str, str], list]:
    with OpTimer() as timer:
        step()
    return dict(timer.times)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--mode", default="delta")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, help="CPU threads (default: the benchmark's)")
    p.add_argument("--top", type=int, default=12, help="how many op kinds and shapes to list")
    p.add_argument("--quick", action="store_true", help="tiny model: a smoke test")
    args = p.parse_args(argv)
    settings = BenchSettings.quick(modes=(args.mode,)) if args.quick else BenchSettings(modes=(args.mode,))
    torch.set_num_threads(args.threads or settings.threads)
    _malloc_returns_memory(False)  # reuse freed blocks, as in the benchmark's timing phase
    (base, _), (dar, _) = build_trainers(settings, args.layers, torch.device(settings.device))
    best: dict[str, dict] = {"baseline": {}, args.mode: {}}
    for _ in range(args.rounds):
        for name, trainer in (("baseline", base), (args.mode, dar)):
            trainer.step()  # warm-up
            for key, (seconds, calls) in op_times(trainer.step).items():
                seen = best[name].get(key)
                best[name][key] = (min(seconds, seen[0]) if seen else seconds, calls)
    ms = {name: sum(s for s, _ in times.values()) * 1e3 for name, times in best.items()}
    own = {k: v for k, v in best[args.mode].items() if k not in best["baseline"]}
    grown = {k: (v[0] - best["baseline"][k][0], v[1]) for k, v in best[args.mode].items() if k in best["baseline"]}
    by_op: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for (op, _), (seconds, calls) in own.items():
        by_op[op][0] += seconds
        by_op[op][1] += calls
    report = {
        "op_ms": ms,
        "routing_ops_ms": sum(s for s, _ in own.values()) * 1e3,
        "routing_calls": sum(c for _, c in own.values()),
        "grown_ms": sum(s for s, _ in grown.values()) * 1e3,
        "by_op": {op: {"ms": s * 1e3, "calls": c} for op, (s, c) in sorted(by_op.items(), key=lambda kv: -kv[1][0])},
    }
    print(f"L {args.layers}, {args.mode}, {torch.get_num_threads()} threads: ops {ms['baseline']:.0f} ms (baseline), "
          f"{ms[args.mode]:.0f} ms ({args.mode}); routing's own ops {report['routing_ops_ms']:.0f} ms "
          f"in {report['routing_calls']} calls, "
          f"the shared ops {report['grown_ms']:+.0f} ms")
    print("| op | calls | ms |\n|---|---:|---:|")
    for op, row in list(report["by_op"].items())[: args.top]:
        print(f"| {op} | {row['calls']} | {row['ms']:.1f} |")
    print("\n| op | arguments | calls | ms |\n|---|---|---:|---:|")
    for (op, sig), (s, c) in sorted(own.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"| {op} | {sig} | {c} | {s * 1e3:.1f} |")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
