"""Cached decoding, eager against compiled (CUDA graphs on a GPU), for the unpatched model and Delta Block.

Eager decoding on a GPU is bound by the host's dispatch of ops (docs/performance.md, "Results on a GPU"),
so what a GPU user sees is the compiled step: ``torch.compile(model, mode="reduce-overhead")`` as LitGPT's
``generate --compile`` does. Prefill runs eager; every decoded token goes through the compiled model. The
four variants are timed interleaved for a few rounds (the fastest of two runs of ``--tokens`` tokens per
round), and each is compared with the baseline of its own kind.

    python benchmarks/compiled_decode.py --device cuda --layers 12   # the issue's shape, bf16 autocast
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench.py beside this script

from bench import BenchSettings, build_trainers  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--model", help="a LitGPT config by name (default: the issue's shape)")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--quick", action="store_true", help="the benchmark's tiny model: a smoke test")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    make = BenchSettings.quick if args.quick else BenchSettings
    settings = make(model=args.model, modes=("delta_block",), device=device.type, precision="bf16-mixed",
                    decode_prompt=args.prompt, decode_tokens=args.tokens)
    B = settings.batch_size
    runs: dict[str, tuple] = {}
    for trainer, _ in build_trainers(settings, args.layers, device):
        compiled = torch.compile(trainer.model, mode="reduce-overhead" if device.type == "cuda" else "default",
                                 dynamic=False)
        for label, forward in ((f"{trainer.name} eager", None), (trainer.name, compiled)):
            run = partial(trainer.decode, forward)  # seconds per decoded token step (B sequences)
            t0 = time.perf_counter()
            run(), run()  # compiling, recording the graphs
            print(f"{label}: ready in {time.perf_counter() - t0:.0f} s", flush=True)
            runs[label] = (run, [])
    for _ in range(args.rounds):
        for run, times in runs.values():
            times.append(min(run() for _ in range(2)))
    report = {}
    for label, (_, times) in runs.items():
        base = runs["baseline eager" if label.endswith("eager") else "baseline"][1]
        step = statistics.median(times)
        ratio = statistics.median(b / t for b, t in zip(base, times))
        report[label] = {"ms_per_step": step * 1e3, "tokens_per_s": B / step, "ratio": ratio}
        print(f"{label}: {step * 1e3:.2f} ms per step ({B} sequences), {B / step:.0f} tok/s, {ratio:.3f}x baseline")
    return report


if __name__ == "__main__":
    main()
