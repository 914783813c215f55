"""Time spent in the routing per training step of a real LitGPT model, for router settings side by side.

On a shared machine whole-step ratios move by a few percent from run to run, more than a change of the
routing itself is worth. The profiler's time inside the routing's autograd functions (forward and
backward of the source bank) moves far less, so this script is what measures such a change: one patched
model per setting (the same weights), one after the other, interleaved for a few rounds, minimum and
median per setting.

    python benchmarks/routing_time.py --layers 24 --mode delta --knob lookahead --values 0 4 --rounds 3
    python benchmarks/routing_time.py --layers 24 --mode delta --knob defer_from --values 16 1000 --rounds 3

``--knob`` names a setting of :class:`lit_dar.backends.BankBackend` (``lookahead``, ``defer_from``,
``lookahead_tokens``); every value is one setting, the others keep their defaults.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench.py beside this script

from bench import BenchSettings, Trainer, _malloc_returns_memory, model_config, valid_num_blocks  # noqa: E402
from litgpt import GPT  # noqa: E402

from lit_dar import DARConfig, patch_model  # noqa: E402
from lit_dar.backends import BankBackend  # noqa: E402

# the autograd functions of the bank path; the time of their forward and backward is routing's own
ROUTING_FUNCTIONS = ("_BankRoute", "_GroupRoute", "_Emit")
KNOBS = ("lookahead", "defer_from", "lookahead_tokens")


def routing_ms(step) -> tuple[float, dict[str, float]]:
    """Milliseconds spent inside the routing functions during ``step()``, in total and per function."""
    with profile() as prof:
        step()
    per = Counter()
    for event in prof.events():
        if event.name.removesuffix("Backward") in ROUTING_FUNCTIONS:
            per[event.name] += event.cpu_time_total / 1e3
    return sum(per.values()), dict(per)


def main(argv: list[str] | None = None) -> dict[int, dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--mode", default="delta")
    p.add_argument("--knob", default="lookahead", choices=KNOBS, help="the router setting to compare")
    p.add_argument("--values", type=int, nargs="+", default=[0, 4], help="its values, one setting each")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny model: a smoke test")
    args = p.parse_args(argv)
    settings = BenchSettings.quick(modes=(args.mode,)) if args.quick else BenchSettings(modes=(args.mode,))
    torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    config = model_config(settings, args.layers)
    dar = DARConfig(mode=args.mode, num_blocks=valid_num_blocks(args.layers, settings.num_blocks))
    trainers = {}
    for v in args.values:
        knobs = {"lookahead_tokens": 0} if args.quick else {}  # tiny batches stay below the windows' token count
        knobs[args.knob] = v
        torch.manual_seed(settings.seed)  # the same weights for every setting
        with torch.device(device):
            model = GPT(config)
        patch_model(model, dar, backend=BankBackend(**knobs))
        trainers[v] = Trainer(args.mode, model.train(), settings, device)
    _malloc_returns_memory(False)  # reuse freed blocks, as in the benchmark's timing phase
    results: dict[int, list] = {v: [] for v in args.values}
    for _ in range(args.rounds):
        for v in args.values:
            trainers[v].step()  # warm-up with this setting
            results[v].append(routing_ms(trainers[v].step))
    report = {}
    for v, runs in results.items():
        totals = [t for t, _ in runs]
        best = min(runs, key=lambda r: r[0])[1]
        report[v] = {"min_ms": min(totals), "median_ms": statistics.median(totals), "per_function_ms": best}
        parts = ", ".join(f"{name} {ms:.1f}" for name, ms in sorted(best.items()))
        print(f"{args.knob} {v}: routing {min(totals):.1f} ms (median {statistics.median(totals):.1f}) per step; {parts}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
