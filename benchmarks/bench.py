"""Side-by-side benchmark: the unpatched LitGPT model against each DAR mode, in one process.

For every depth ``L`` the unpatched model and one patched model per mode are built, warmed up, then
measured interleaved (A B C … A B C …) for several rounds; ratios are taken within a round and the
median over rounds is reported, so that drift of the machine (thermal, other load) cancels out.

Per model it reports

* training tokens/s: forward + backward + optimizer step (AdamW), loss = cross-entropy on random tokens;
* bytes saved for backward per step: every tensor packed by autograd during the forward
  (``torch.autograd.graph.saved_tensors_hooks``), counted once per storage, parameters and buffers
  excluded;
* peak memory of a training step: on GPU the CUDA allocator's peak of the model trained alone (less what
  the other models hold); on CPU the peak resident set size during the step above the resident size
  before it (sampled every 0.2 ms);
* parameter overhead of the routing;
* decode tokens/s with LitGPT's KV cache (batch of ``B`` sequences, one token per step, inference mode).

Run ``python benchmarks/bench.py --help`` or ``lit-dar bench --help`` from a source checkout
(``benchmarks/README.md`` has the commands behind ``docs/performance.md``). ``main(argv)`` is the entry point.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from litgpt import GPT, Config
from litgpt.config import name_to_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's lit_dar when run as a script

from lit_dar import DARConfig, patch_model, routing_overhead  # noqa: E402
from lit_dar.recipe import small_config, valid_block_counts  # noqa: E402
from lit_dar.routing import DepthRouter  # noqa: E402

BASELINE = "baseline"
ALL_MODES = ("attnres_block", "attnres_full", "delta", "delta_block", "ddl")
LABELS = {
    BASELINE: "LitGPT (unpatched)",
    "attnres_block": "AttnRes block",
    "attnres_full": "AttnRes full",
    "delta": "Delta",
    "delta_block": "Delta Block",
    "ddl": "Deep Delta Learning",
}


@dataclass
class BenchSettings:
    model: str | None = None  # a LitGPT config by name ("Qwen3-0.6B"), depth from ``layers``; else the shape below
    n_embd: int = 512
    n_head: int = 8
    n_query_groups: int = 4
    intermediate_size: int = 1536
    vocab_size: int = 8192
    batch_size: int = 4
    seq_len: int = 256
    num_blocks: int = 4
    layers: tuple[int, ...] = (12, 24)
    sweep: tuple[int, ...] = (6, 12, 24, 36)
    modes: tuple[str, ...] = ALL_MODES
    rounds: int = 5
    sweep_rounds: int = 3
    warmup: int = 1
    steps_per_round: int = 1
    decode_prompt: int = 16
    decode_tokens: int = 32
    threads: int = 2
    device: str = "cpu"
    precision: str = "32-true"  # or "bf16-mixed" (autocast, routing math in fp32)
    compile: bool = False
    seed: int = 0

    @classmethod
    def quick(cls, **overrides: Any) -> BenchSettings:
        """A smoke run: a tiny model, one round, no sweep beyond two depths."""
        kwargs = dict(
            n_embd=64, n_head=4, n_query_groups=2, intermediate_size=128, vocab_size=256, batch_size=2,
            seq_len=32, layers=(4,), sweep=(2, 4), rounds=1, sweep_rounds=1, warmup=0, decode_prompt=4,
            decode_tokens=4, num_blocks=2,
        )
        kwargs.update(overrides)
        return cls(**kwargs)


@dataclass
class ModelResult:
    name: str
    n_layer: int
    num_blocks: int | None
    params: int
    routing_params: int
    step_seconds: list[float] = field(default_factory=list)
    decode_seconds: list[float] = field(default_factory=list)
    saved_bytes: int = 0
    saved_tensors: int = 0
    peak_bytes: int = 0


def model_config(settings: BenchSettings, n_layer: int) -> Config:
    if settings.model is not None:  # offline: LitGPT's configs are code
        return Config.from_name(settings.model, n_layer=n_layer, block_size=settings.seq_len)
    return small_config(
        name=f"dar-bench-L{n_layer}", n_layer=n_layer, n_embd=settings.n_embd, n_head=settings.n_head,
        n_query_groups=settings.n_query_groups, intermediate_size=settings.intermediate_size,
        vocab_size=settings.vocab_size, block_size=settings.seq_len, norm_eps=1e-6,
    )


def valid_num_blocks(n_layer: int, wanted: int) -> int:
    """The largest block count ≤ ``wanted`` that ``L`` layers can be split into exactly."""
    return max(n for n in valid_block_counts(n_layer) if n <= max(wanted, 1))


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(settings: BenchSettings, device: torch.device):
    if settings.precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_returns_memory(enabled: bool) -> None:
    """glibc only: make freed tensors leave the resident set (for RSS peaks), or make the heap a pure cache
    (for timing).

    By default glibc raises its mmap threshold as large blocks are freed, so after a warm-up step every
    tensor lives in a heap that never shrinks and the RSS of a step shows nothing. For the memory phase
    large blocks are mmap-ed (and unmapped on free). For the timing phase nothing is mmap-ed and nothing
    given back, as with a caching allocator (CUDA's; jemalloc or tcmalloc on CPU): blocks above glibc's
    32 MB threshold limit (the logits and their gradient at B 4, T 256, vocab 8192) are otherwise mapped
    afresh, and their first touch faults, in whichever model's step finds no room for them in the heap
    (L 24, two steps per model and round: 25–33 K page faults for the baseline, 49–68 K for Delta,
    8–57 K for Delta Block before this; none after warm-up since).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4
    libc.mallopt(m_mmap_threshold, 64 * 1024 if enabled else 32 * 2**20)
    libc.mallopt(m_mmap_max, 65536 if enabled else 0)  # 65536: glibc's default
    # timing phase: never give memory back, or whichever model runs after a quiet phase pays page faults
    libc.mallopt(m_trim_threshold, 128 * 1024 if enabled else 2**31 - 1)
    libc.malloc_trim(0)


class PeakRSS:
    """Peak resident set size above the level at entry, sampled by a background thread."""

    def __init__(self, interval: float = 2e-4) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.start = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self.peak = max(self.peak, _rss_bytes())
        self._stop.set()
        self._thread.join()

    @property
    def increase(self) -> int:
        return self.peak - self.start


class Trainer:
    """One model, its optimizer and a fixed random batch."""

    def __init__(self, name: str, model: torch.nn.Module, settings: BenchSettings, device: torch.device) -> None:
        self.name, self.model, self.settings, self.device = name, model, settings, device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
        g = torch.Generator().manual_seed(settings.seed)
        shape, vocab = (settings.batch_size, settings.seq_len), model.config.vocab_size
        self.idx = torch.randint(0, vocab, shape, generator=g).to(device)
        self.targets = torch.randint(0, vocab, shape, generator=g).to(device)
        self.forward = torch.compile(model) if settings.compile else model

    def loss(self) -> torch.Tensor:
        with _autocast(self.settings, self.device):
            logits = self.forward(self.idx)
        return F.cross_entropy(logits.float().flatten(0, 1), self.targets.flatten())

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        self.optimizer.step()

    def timed_steps(self, n: int) -> float:
        """The fastest of ``n`` steps: on a shared machine other load only ever adds time."""
        times = []
        for _ in range(n):
            _sync(self.device)
            t0 = time.perf_counter()
            self.step()
            _sync(self.device)
            times.append(time.perf_counter() - t0)
        return min(times)

    def saved_for_backward(self) -> tuple[int, int]:
        """Bytes and tensors autograd keeps for backward in one forward (unique storages, no parameters)."""
        exclude = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        exclude |= {b.untyped_storage().data_ptr() for b in self.model.buffers()}
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            if s.data_ptr() not in exclude:
                storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
            return t

        self.optimizer.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.loss()
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return sum(storages.values()), len(storages)

    def _resident_bytes(self) -> int:
        """Parameters, buffers and optimizer state: what this model keeps on the device between steps."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        tensors += [t for st in self.optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())

    def peak_memory(self) -> int:
        """Peak memory of one training step (CUDA allocator peak, or RSS increase on CPU).

        The router's pooled bank buffers, which stay allocated between steps, are dropped first, so the
        step allocates them again and they count. On CUDA the peak is that of this model trained alone: the
        allocator's peak less what the other models of the comparison hold."""
        self.optimizer.zero_grad(set_to_none=True)
        for module in self.model.modules():
            if isinstance(module, DepthRouter):
                module.free_buffers()
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.synchronize(self.device)
            others = torch.cuda.memory_allocated(self.device) - self._resident_bytes()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - others
        with PeakRSS() as rss:
            self.step()
        return rss.increase

    @torch.inference_mode()
    def decode(self, forward: Callable[..., torch.Tensor] | None = None) -> float:
        """Seconds per decoding step (batch of B sequences, one token each) after a short prefill; in inference
        mode, as LitGPT's ``generate`` runs. ``forward`` (default: the model) decodes the tokens, e.g. the model
        compiled; the prefill always runs the model itself."""
        s, model = self.settings, self.model
        forward = model if forward is None else forward
        total = s.decode_prompt + s.decode_tokens
        if getattr(self, "_kv", None) is None:
            model.set_kv_cache(batch_size=s.batch_size, max_seq_length=total, device=self.device)
            self._kv = True
        was_training = model.training
        model.eval()
        prompt = self.idx[:, : s.decode_prompt]
        with _autocast(s, self.device):
            model(prompt, input_pos=torch.arange(s.decode_prompt, device=self.device))
            tok = self.idx[:, s.decode_prompt : s.decode_prompt + 1]
            _sync(self.device)
            t0 = time.perf_counter()
            for i in range(s.decode_tokens):
                pos = torch.tensor([s.decode_prompt + i], device=self.device)
                logits = forward(tok, input_pos=pos)
                tok = logits[:, -1:].argmax(-1)
            _sync(self.device)
        model.train(was_training)
        return (time.perf_counter() - t0) / s.decode_tokens

    def release(self) -> None:
        if getattr(self, "_kv", None):
            self.model.clear_kv_cache()
            self._kv = None


def build_trainers(settings: BenchSettings, n_layer: int, device: torch.device) -> list[tuple[Trainer, ModelResult]]:
    config = model_config(settings, n_layer)
    out = []
    for name in (BASELINE, *settings.modes):
        torch.manual_seed(settings.seed)
        with torch.device(device):
            model = GPT(config)
        num_blocks = None
        if name != BASELINE:
            num_blocks = valid_num_blocks(n_layer, settings.num_blocks)
            patch_model(model, DARConfig(mode=name, num_blocks=num_blocks))
        model.train()
        params = sum(p.numel() for p in model.parameters())
        routing = routing_overhead(model)["routing_params"] if name != BASELINE else 0
        out.append((Trainer(name, model, settings, device), ModelResult(name, n_layer, num_blocks, params, routing)))
    return out


def measure_memory(settings: BenchSettings, n_layer: int, device: torch.device) -> list[ModelResult]:
    """Saved bytes and peak step memory of every model at one depth.

    On CPU the peak is the RSS increase of a step, which only shows memory the step maps anew. A timing
    phase grows glibc's heap (large blocks are kept for reuse there) and a heap never shrinks its address
    range: a later memory phase would be served from it, its pages already mapped, and read too low (the
    baseline at L 24 measured after L 12's timing: 0.8–0.9× its true peak). So :func:`run` measures the
    memory of every depth before any timing, with large blocks mapped and unmapped one by one.
    """
    if device.type == "cpu":
        _malloc_returns_memory(True)
    pairs = build_trainers(settings, n_layer, device)
    for trainer, result in pairs:  # the first forward/backward also warms up (compiled kernels, allocator)
        result.saved_bytes, result.saved_tensors = trainer.saved_for_backward()
        trainer.step()  # optimizer state
        result.peak_bytes = trainer.peak_memory()  # a steady-state step
    results = [res for _, res in pairs]
    del pairs, trainer
    gc.collect()
    return results


def measure_speed(settings: BenchSettings, results: list[ModelResult], rounds: int, full: bool,
                  device: torch.device, log=print) -> None:
    """Training (and with ``full`` decoding) time of the models of ``results``, interleaved over ``rounds``."""
    n_layer = results[0].n_layer
    if device.type == "cpu":
        _malloc_returns_memory(False)
    pairs = [(trainer, result) for (trainer, _), result in zip(build_trainers(settings, n_layer, device), results)]
    for trainer, _ in pairs:  # warm-up: compiled kernels, optimizer state, the allocator's heap
        for _ in range(2 + settings.warmup):
            trainer.step()
    for r in range(rounds):  # the order rotates, so that no model is always first after a pause
        order = pairs[r % len(pairs):] + pairs[: r % len(pairs)]
        for trainer, result in order:
            result.step_seconds.append(trainer.timed_steps(settings.steps_per_round))
        log(f"  L={n_layer} round {r + 1}/{rounds}: " + ", ".join(
            f"{res.name} {res.step_seconds[-1]:.3f}s" for _, res in pairs))
    if full:  # decoding after all training rounds: its allocations do not disturb them
        for trainer, _ in pairs:
            trainer.decode()  # warm-up
        for r in range(rounds):
            for trainer, result in pairs[r % len(pairs):] + pairs[: r % len(pairs)]:
                result.decode_seconds.append(min(trainer.decode() for _ in range(settings.steps_per_round)))
    for trainer, _ in pairs:
        trainer.release()
    del pairs, trainer
    gc.collect()


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------


def summarize(results: list[ModelResult], settings: BenchSettings) -> dict[str, Any]:
    """Median ratios against the baseline of the same round, absolute figures of the median round."""
    tokens = settings.batch_size * settings.seq_len
    base = next(r for r in results if r.name == BASELINE)
    rows = {}
    for r in results:
        speed = [b / m for m, b in zip(r.step_seconds, base.step_seconds)]
        row = {
            "label": LABELS[r.name],
            "n_layer": r.n_layer,
            "num_blocks": r.num_blocks,
            "train_tokens_per_s": tokens / statistics.median(r.step_seconds),
            "train_speed_ratio": statistics.median(speed),
            "train_speed_ratio_per_round": speed,
            "saved_bytes": r.saved_bytes,
            "saved_tensors": r.saved_tensors,
            "saved_ratio": r.saved_bytes / base.saved_bytes,
            "peak_bytes": r.peak_bytes,
            "peak_ratio": r.peak_bytes / base.peak_bytes if base.peak_bytes else float("nan"),
            "params": r.params,
            "routing_params": r.routing_params,
            "param_overhead_percent": 100.0 * r.routing_params / (r.params - r.routing_params),
        }
        if r.decode_seconds:
            dspeed = [b / m for m, b in zip(r.decode_seconds, base.decode_seconds)]
            row["decode_tokens_per_s"] = settings.batch_size / statistics.median(r.decode_seconds)
            row["decode_speed_ratio"] = statistics.median(dspeed)
        rows[r.name] = row
    return rows


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    shape = (s["model"] if s.get("model") else
             f"d {s['n_embd']}, {s['n_head']} heads / {s['n_query_groups']} kv, ff {s['intermediate_size']}, "
             f"vocab {s['vocab_size']}")
    threads = f"threads {s['threads']}; " if report["device"].startswith("CPU") else ""
    lines = [
        f"Device: {report['device']}; precision {s['precision']}; {threads}"
        f"{shape}, B {s['batch_size']}, T {s['seq_len']}, {s['num_blocks']} blocks; "
        f"median of {s['rounds']} interleaved rounds (sweep: {s['sweep_rounds']}).",
        "",
    ]
    for L, rows in report["main"].items():
        lines += [
            f"### L = {L}",
            "",
            "| model | train tok/s | × baseline | saved for bwd | × baseline | peak step mem | × baseline "
            "| routing params | decode tok/s | × baseline |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in rows.items():
            lines.append(
                f"| {r['label']} | {r['train_tokens_per_s']:.0f} | {r['train_speed_ratio']:.3f} | "
                f"{_fmt_bytes(r['saved_bytes'])} | {r['saved_ratio']:.3f} | {_fmt_bytes(r['peak_bytes'])} | "
                f"{r['peak_ratio']:.3f} | {r['routing_params']} ({r['param_overhead_percent']:.4f} %) | "
                f"{r.get('decode_tokens_per_s', float('nan')):.0f} | {r.get('decode_speed_ratio', float('nan')):.3f} |"
            )
        lines.append("")
    if report["sweep"]:
        depths = sorted(report["sweep"], key=int)
        lines += ["### Depth sweep: training speed and saved bytes relative to the baseline", "",
                  "| mode | " + " | ".join(f"L {L}: tok/s ×, saved ×" for L in depths) + " |",
                  "|---|" + "---:|" * len(depths)]
        for name in report["settings"]["modes"]:
            cells = [f"{report['sweep'][L][name]['train_speed_ratio']:.3f}, "
                     f"{report['sweep'][L][name]['saved_ratio']:.3f}" for L in depths]
            lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted(report["sweep"], key=int)
    xs = [int(L) for L in depths]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in report["settings"]["modes"]:
        axes[0].plot(xs, [report["sweep"][L][name]["train_speed_ratio"] for L in depths], "o-", label=LABELS[name])
        axes[1].plot(xs, [report["sweep"][L][name]["saved_ratio"] for L in depths], "o-", label=LABELS[name])
    axes[0].set(xlabel="layers L", ylabel="training tokens/s ÷ baseline", title="speed")
    axes[1].set(xlabel="layers L", ylabel="saved for backward ÷ baseline", title="memory kept for backward")
    for ax in axes:
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.grid(alpha=0.3)
        ax.set_xticks(xs)
    axes[0].legend()
    fig.suptitle(f"DAR overhead vs depth ({report['device']}, {report['settings']['precision']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def run(settings: BenchSettings, log=print) -> dict[str, Any]:
    device = torch.device(settings.device)
    if device.type == "cpu":
        torch.set_num_threads(settings.threads)
    depths = sorted(set(settings.layers) | set(settings.sweep))
    report: dict[str, Any] = {
        "settings": asdict(settings),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {settings.threads} threads)",
        "torch": torch.__version__,
        "main": {},
        "sweep": {},
    }
    log(f"memory: L={', '.join(map(str, depths))}")
    memory = {L: measure_memory(settings, L, device) for L in depths}  # before any timing (see measure_memory)
    for L in depths:
        full = L in settings.layers
        rounds = settings.rounds if full else settings.sweep_rounds
        log(f"L={L}: {'full' if full else 'sweep'} measurement, {rounds} rounds")
        results = memory.pop(L)
        measure_speed(settings, results, rounds, full, device, log)
        rows = summarize(results, settings)
        if full:
            report["main"][str(L)] = rows
        if L in settings.sweep:
            report["sweep"][str(L)] = rows
    return report


def write_report(report: dict[str, Any], out_dir: Path, name: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md", "png": out_dir / f"{name}_depth.png"}
    paths["json"].write_text(json.dumps(report, indent=1))
    paths["md"].write_text(markdown(report))
    if report["sweep"]:
        plot(report, paths["png"])
    else:
        del paths["png"]
    return paths


def update_docs(doc: Path, results: dict[str, Path]) -> None:
    """Replace each ``<!-- bench:NAME -->`` … ``<!-- /bench:NAME -->`` section of ``doc`` by ``results[NAME]``."""
    text = doc.read_text()
    for name, md in results.items():
        pattern = re.compile(rf"(<!-- bench:{re.escape(name)} -->\n).*?(<!-- /bench:{re.escape(name)} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"{doc} has no <!-- bench:{name} --> section")
        body = Path(md).read_text().strip()
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    doc.write_text(text)


def parse_args(argv: list[str] | None) -> tuple[BenchSettings, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="lit-dar bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, one round: a smoke test")
    p.add_argument("--model", help="a LitGPT config by name (e.g. Qwen3-0.6B) instead of the issue's shape; "
                   "--layers sets its depth")
    p.add_argument("--layers", type=int, nargs="+", help="depths of the main table (default 12 24)")
    p.add_argument("--sweep", type=int, nargs="*", help="depths of the sweep (default 6 12 24 36; none: no sweep)")
    p.add_argument("--modes", nargs="+", choices=ALL_MODES)
    p.add_argument("--rounds", type=int)
    p.add_argument("--sweep-rounds", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--n-embd", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--warmup", type=int, help="extra warm-up steps per model before timing")
    p.add_argument("--steps-per-round", type=int,
                   help="training steps and decoding runs per model and round; the fastest counts (default 1)")
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--precision", choices=["32-true", "bf16-mixed"])
    p.add_argument("--compile", action="store_true", help="torch.compile every model (baseline included)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", help="file stem of the results (default: derived from device and precision)")
    p.add_argument("--update-docs", type=Path, metavar="DOC",
                   help="also copy the markdown into DOC's <!-- bench:NAME --> section (benchmarks/NOTES.md); "
                   "without it no document is touched")
    args = p.parse_args(argv)
    if args.model is not None:
        if args.model not in name_to_config:
            p.error(f"--model {args.model!r} is not a LitGPT config name; pick one of litgpt.config.name_to_config "
                    "(e.g. Qwen3-0.6B, pythia-160m)")
        if args.n_embd is not None:
            p.error("--n-embd sets the width of the issue's shape; with --model the config's own width is used")
    overrides = {
        k: (tuple(v) if isinstance(v, list) else v)
        for k, v in {
            "model": args.model, "layers": args.layers, "sweep": args.sweep, "modes": args.modes, "rounds": args.rounds,
            "sweep_rounds": args.sweep_rounds, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "n_embd": args.n_embd, "threads": args.threads, "warmup": args.warmup, "steps_per_round": args.steps_per_round, "device": args.device, "precision": args.precision,
        }.items()
        if v is not None
    }
    if args.compile:
        overrides["compile"] = True
    settings = BenchSettings.quick(**overrides) if args.quick else BenchSettings(**overrides)
    return settings, args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    settings, args = parse_args(argv)
    report = run(settings)
    name = args.name or ("quick" if args.quick else f"{settings.device}_{settings.precision}")
    paths = write_report(report, args.out, name)
    if args.update_docs is not None:
        update_docs(args.update_docs, {name: paths["md"]})
    print(markdown(report))
    for kind, path in paths.items():
        print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
