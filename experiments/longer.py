"""The longer study: does each rule's gain over the baseline grow with training?

``lit-dar study --longer true`` (or ``python experiments/study.py --longer true``). The study's model (12 layers
× 128) trains at two lengths with the same schedule shape (warmup for the first 12 % of steps, then cosine), an
LR check runs every rule at 250 steps at two learning rates, and the conversion experiment runs over seeds with a
third arm that trains only the routing. Runs are stored like the study's and reused.

The corpus is the whole standard library rather than the study's first 4 MB: at 4 MB, 1,000 steps would pass
over the training split more than twice, and the comparison would measure repetition as well as length.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from runs import MODES, Scale, _dar, corpus, prepare_data, run_all, stored, train_run, write_section

from lit_dar.config import DARConfig

LONG_MODES = ["baseline", "attnres_block", "delta_block", "delta"]
LENGTH = Scale(n_layer=12, n_embd=128, steps=1000, batch=16, warmup=120, eval_interval=100, eval_iters=12,
               num_blocks=4, max_bytes=None)


def lengths(scale: Scale, steps: list[int]) -> dict[int, Scale]:
    """The scale at each length, with warmup and evaluation interval in proportion to the steps."""
    return {n: replace(scale, steps=n, warmup=round(scale.warmup * n / scale.steps),
                       eval_interval=max(1, round(scale.eval_interval * n / scale.steps))) for n in steps}


def plan(
    out: Path, scale: Scale, steps: list[int], seeds: int, lrs: list[float], conversion_seeds: int,
) -> dict[str, list[dict[str, Any]]]:
    """Every run of the longer study, grouped by part; a group's chains run in order, each chain on one worker."""
    cache = out / "data"
    by_length = lengths(scale, steps)
    short = by_length[min(steps)]
    job = lambda name, s, mode, seed, **kw: dict(  # noqa: E731
        name=name, out=out, scale=s, dar=_dar(mode, s), seed=seed, cache=cache, **kw)
    parts: dict[str, list[list[dict[str, Any]]]] = {"length": [], "lr": [], "conversion": []}
    for seed in range(seeds):  # longest first, so that the pool's last runs are short
        for n in sorted(steps, reverse=True):
            parts["length"] += [[job(f"{mode}-{n}", by_length[n], mode, seed)] for mode in LONG_MODES]
    for lr in lrs:
        s = replace(short, lr=lr)
        parts["lr"] += [[job(f"{mode}-{short.steps}-lr{lr:g}", s, mode, 0)] for mode in MODES
                        if not (mode in LONG_MODES and lr == scale.lr)]  # those are the length part's seed 0
    half = short.steps // 2
    converted = DARConfig(mode="delta_block", num_blocks=scale.num_blocks, gate="scalar")
    for seed in range(conversion_seeds):
        start = out / "conv-pretrain" / f"seed{seed}" / "final"
        parts["conversion"].append([
            job("conv-pretrain", short, "baseline", seed, steps=half),
            job("conv-continued", short, "baseline", seed, steps=half, initial_checkpoint_dir=start),
            dict(job("conv-converted", short, "baseline", seed, steps=half, initial_checkpoint_dir=start), dar=converted),
            dict(job("conv-routing-only", short, "baseline", seed, steps=half, initial_checkpoint_dir=start,
                     freeze_base=True), dar=converted),
        ])
    return parts


def run_chain(chain: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [train_run(**job) for job in chain]


def study_longer(
    out_dir: Path, report: Path | None, workers: int = 1, seeds: int = 3, steps: list[int] | None = None,
    lrs: list[float] | None = None, conversion_seeds: int = 3, scale: Scale = LENGTH,
) -> dict[str, Any]:
    """Run (or reuse) every run of the longer study and write its report section.

    Arguments:
        out_dir: The study's directory; runs go to ``OUT_DIR/longer``.
        report: The markdown file whose ``longer`` section is written (default ``OUT_DIR/longer/results.md``).
        workers: Runs at a time, one thread each.
        seeds: Seeds of the length part. The first two seeds' runs go first, then the conversion and the LR
            check, then the other seeds', so that a study stopped early still has every part.
        steps: The lengths (default a quarter of the scale's steps, and its steps).
        lrs: The learning rates of the LR check (at the shortest length, seed 0).
        conversion_seeds: Seeds of the conversion experiment.
        scale: The model and the longest run's schedule.
    """
    out = Path(out_dir) / "longer"
    steps = sorted(steps or [scale.steps // 4, scale.steps])
    lrs = lrs or [1e-3, scale.lr]
    prepare_data(scale, out / "data")
    parts = plan(out, scale, steps, seeds, lrs, conversion_seeds)
    first = [c for c in parts["length"] if c[0]["seed"] < 2]
    chains = first + parts["conversion"] + parts["lr"] + [c for c in parts["length"] if c[0]["seed"] >= 2]
    chains = [c for c in chains if not all(stored(j["out"], j["name"], j["seed"]).is_file() for j in c)]
    started = time.perf_counter()
    run_all(chains, workers, run=run_chain)
    wall = time.perf_counter() - started
    results = {part: [run_chain(c) for c in chains] for part, chains in parts.items()}  # all stored by now
    report = out / "results.md" if report is None else Path(report)
    text = render(scale, steps, lrs, results, workers, out / "data", report)
    write_section(report, "longer", text)
    print(text)
    print(f"Wrote {report} ({wall / 60:.1f} min)")
    return results


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _by(records: list[dict[str, Any]]) -> dict[tuple[str, int], dict[int, dict[str, Any]]]:
    """(mode, steps) → seed → record."""
    table: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
    for r in records:
        table.setdefault((r["mode"], r["steps"]), {})[r["seed"]] = r
    return table


def _gains(runs: dict[int, dict[str, Any]], base: dict[int, dict[str, Any]]) -> list[float]:
    """Per seed, the change of validation perplexity against the baseline of the same seed, in percent."""
    return [100 * (runs[k]["val_ppl"] / base[k]["val_ppl"] - 1) for k in sorted(runs) if k in base]


def _spread(values: list[float], fmt: str = "{:+.2f}") -> str:
    """Mean, then each seed's value: ``-5.12 (-4.80, -5.44)``."""
    mean = fmt.format(statistics.fmean(values))
    return mean if len(values) == 1 else f"{mean} ({', '.join(fmt.format(v) for v in values)})"


def _ppl(runs: dict[int, dict[str, Any]]) -> str:
    values = [r["val_ppl"] for r in runs.values()]
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def _minutes(records: Any) -> float:
    return sum(r["seconds"] for r in records) / 60


def render(scale: Scale, steps: list[int], lrs: list[float], results: dict[str, Any], workers: int, cache: Path,
           report: Path) -> str:
    """The report section: gains by length with their plot, the LR check and the conversion, from stored runs."""
    img = Path(report).parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    length = _by([r for chain in results["length"] for r in chain])
    seeds = min(len(length[("baseline", n)]) for n in steps)
    tokens = {n: n * scale.batch * scale.seq for n in steps}
    train_tokens = _train_tokens(scale, cache)
    all_runs = [r for part in results.values() for chain in part for r in chain]
    cfg = scale.config()
    lines = [
        "## The longer study",
        "",
        f"Command: `lit-dar study --longer true --seeds {seeds} --workers {workers}` — {_minutes(all_runs):.0f} min "
        f"of training runs, {workers} at a time on one thread each (about {_minutes(all_runs) / workers:.0f} min "
        f"of wall time). Model: the study's, {cfg.n_layer} layers × {cfg.n_embd}, "
        f"vocabulary {cfg.vocab_size}. Data: the whole standard library ({train_tokens / 1e6:.2f} M training "
        f"tokens), so the longest run sees each token at most {max(tokens.values()) / train_tokens:.2f} times. "
        f"Schedule: AdamW {scale.lr:g}, warmup for the first {100 * scale.warmup / scale.steps:.0f} % of steps, "
        f"then cosine to a tenth; batch {scale.batch} × {scale.seq} tokens. Validation perplexity on "
        f"{scale.eval_iters} × {scale.batch} held-out windows. Gains are paired: each seed's run against the "
        "baseline of the same seed (same initial weights for the shared parameters, same batches); negative is "
        "better. Brackets list the seeds.",
        "",
        f"### Gain over the baseline by length ({seeds} seeds)",
        "",
        "| rule | " + " | ".join(f"{n} steps ({tokens[n] / 1e6:.2f} M tokens)" for n in steps)
        + " | min per run (" + ", ".join(str(n) for n in steps) + ") |",
        "|---|" + "---|" * len(steps) + "---|",
    ]
    for mode in LONG_MODES:
        cells = []
        for n in steps:
            runs, base = length[(mode, n)], length[("baseline", n)]
            cells.append(f"ppl {_ppl(runs)}" if mode == "baseline" else f"{_spread(_gains(runs, base))} %")
        minutes = ", ".join(f"{_minutes(length[(mode, n)].values()) / len(length[(mode, n)]):.1f}" for n in steps)
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {minutes} |")
    plot = img / "study-longer-gain.png"
    _plot_gain(length, steps, tokens, plot)
    lines += ["", f"![gain against tokens]({plot.relative_to(img.parent).as_posix()})", ""]
    short = [r for chain in results["lr"] for r in chain]
    short += [r for chain in results["length"] for r in chain if r["seed"] == 0 and r["steps"] == steps[0]]
    lines += lr_table(short, steps[0], lrs)
    lines += conversion_table(results["conversion"], steps[0])
    return "\n".join(lines)


def _train_tokens(scale: Scale, cache: Path) -> int:
    """Tokens in the training split (whole windows)."""
    data = corpus(scale, cache)
    data.setup()
    return len(data.train_dataset) * (scale.seq + 1)


def lr_table(records: list[dict[str, Any]], n: int, lrs: list[float]) -> list[str]:
    """Every rule at each LR (one seed): perplexity, change against the baseline at that LR, and rank."""
    ppl = {lr: {r["mode"]: r["val_ppl"] for r in records if r["lr"] == lr} for lr in lrs}
    rank = {lr: {m: k + 1 for k, m in enumerate(sorted(ppl[lr], key=ppl[lr].get))} for lr in lrs}
    lines = ["", f"### Learning rate ({n} steps, seed 0)", "",
             "| rule | " + " | ".join(f"lr {lr:g}: ppl | vs baseline | rank" for lr in lrs) + " |",
             "|---|" + "---|---|---|" * len(lrs)]
    for mode in MODES:
        cells = []
        for lr in lrs:
            gain = "—" if mode == "baseline" else f"{100 * (ppl[lr][mode] / ppl[lr]['baseline'] - 1):+.2f} %"
            cells.append(f"{ppl[lr][mode]:.2f} | {gain} | {rank[lr][mode]}")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return lines


CONVERSION_ARMS = {"conv-pretrain": "pretrained (start)", "conv-continued": "continued unchanged",
                   "conv-converted": "converted to Delta Block", "conv-routing-only": "converted, routing only (freeze_base)"}


def conversion_table(chains: list[list[dict[str, Any]]], n: int) -> list[str]:
    seeds = len(chains)
    half = n // 2
    lines = ["", f"### Converting a pretrained model ({seeds} seeds)", "",
             f"A baseline pretrained for {half} steps, then trained {half} more steps on the same tokens: unchanged, "
             "converted to Delta Block with the zero gate (identity at the start), or converted with every "
             "pretrained weight frozen, so that only the routing trains.", "",
             "| arm | val ppl (mean ± std) | vs the pretrained start | vs continued unchanged | min per run |",
             "|---|---|---|---|---|"]
    arms = {name: {chain[0]["seed"]: r for chain in chains for r in chain if r["name"] == name} for name in CONVERSION_ARMS}
    for name, label in CONVERSION_ARMS.items():
        vs = ["—" if name in ("conv-pretrain", ref) else f"{_spread(_gains(arms[name], arms[ref]))} %"
              for ref in ("conv-pretrain", "conv-continued")]
        lines.append(f"| {label} | {_ppl(arms[name])} | {' | '.join(vs)} | {_minutes(arms[name].values()) / seeds:.1f} |")
    return lines


def _plot_gain(length: dict, steps: list[int], tokens: dict[int, int], path: Path) -> None:
    """Each rule's gain against tokens: the end of each schedule (markers, seed mean and range) and, dashed, the
    validation points inside the longest runs (mid-schedule, so at a higher LR than a run that ends there)."""
    fig = Figure(figsize=(6.4, 4))
    ax = fig.add_subplot()
    longest = steps[-1]
    for k, mode in enumerate(m for m in LONG_MODES if m != "baseline"):
        color = f"C{k + 1}"
        gains = [_gains(length[(mode, n)], length[("baseline", n)]) for n in steps]
        x = [tokens[n] / 1e6 for n in steps]
        mean = [statistics.fmean(g) for g in gains]
        err = [[m - min(g) for m, g in zip(mean, gains)], [max(g) - m for m, g in zip(mean, gains)]]
        ax.errorbar(x, mean, yerr=err, marker="o", color=color, capsize=3, label=f"{mode} (end of schedule)")
        runs, base = length[(mode, longest)], length[("baseline", longest)]
        curve = {}
        for seed in sorted(runs):
            if seed in base:
                mine, theirs = dict(runs[seed]["curve"]), dict(base[seed]["curve"])
                for step in sorted(set(mine) & set(theirs)):
                    curve.setdefault(step, []).append(100 * (math.exp(mine[step] - theirs[step]) - 1))
        steps_in = sorted(curve)
        ax.plot([(s + 1) * tokens[longest] / longest / 1e6 for s in steps_in],
                [statistics.fmean(curve[s]) for s in steps_in], ls="--", lw=1, color=color, alpha=0.7)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation perplexity vs baseline (%)")
    ax.set_title(f"dashed: inside the {longest}-step runs")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
