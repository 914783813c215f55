"""The study: the paper's claims at CPU scale — perplexity and routing sharpness across residual rules.

``python experiments/study.py [--quick true] [--report docs/results.md]`` (or ``lit-dar study`` from a source
checkout). The report goes to ``OUT_DIR/results.md`` unless ``--report`` names another file.

Every run is an ordinary ``lit-dar pretrain`` run (same Trainer, callback, data and recipe defaults) on the
offline standard-library corpus with a fixed train/validation split; modes differ only in ``dar``, so
each sees the same tokens in the same order with the same hyperparameters for a given seed. Finished runs
are kept (``result.json``), so an interrupted study continues where it stopped. The report is written
from the measured numbers only.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jsonargparse import CLI, set_parsing_settings
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent))  # runs.py and longer.py beside this script

from longer import study_longer  # noqa: E402
from runs import MODES, SCALES, Scale, _dar, train_run, write_section  # noqa: E402

from lit_dar.config import DARConfig  # noqa: E402
from lit_dar.recipe import valid_block_counts  # noqa: E402


# --------------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------------


def study(
    out_dir: Path = Path("out/lit-dar/study"),
    quick: bool = False,
    seeds: int = 3,
    report: Path | None = None,
    ablation: bool = True,
    conversion: bool = True,
    scale: Scale | None = None,
    ablation_seeds: int = 1,
    conversion_seeds: int = 1,
    longer: bool = False,
    workers: int = 1,
) -> dict[str, Any]:
    """Train the baseline and every residual rule with the same tokens over several seeds; write the report.

    Arguments:
        out_dir: Where the runs go (a finished run is reused, so an interrupted study resumes).
        quick: A ≤10-minute version (tiny model, few steps, one seed unless ``seeds`` says otherwise).
        seeds: Seeds per configuration.
        report: The markdown report to update (figures go beside it, under ``img/``); default
            ``OUT_DIR/{quick,full}/results.md``. ``docs/results.md`` is written only when named here.
        ablation: Run the Delta Block block-count ablation (num_blocks 1, 2, 4, 6, L).
        conversion: Run the conversion experiment (baseline continued as is vs converted to Delta Block).
        scale: Override the model/training size (tests use a micro scale).
        ablation_seeds: Seeds for the block-count ablation (the first ones of ``seeds``), to fit the time budget.
        conversion_seeds: Seeds for the conversion experiment (the first ones of ``seeds``).
        longer: Run the longer study instead (``experiments/longer.py``: each rule's gain at 250 and 1,000
            steps over ``seeds`` seeds, an LR check, the conversion over 3 seeds); its section is ``longer``.
        workers: Runs at a time, each on one thread (the longer study only).
    """
    if longer:
        if quick:
            raise ValueError("--longer runs the study's full model at two lengths; drop --quick (or --longer).")
        return study_longer(out_dir, report, workers, seeds, **({"scale": scale} if scale else {}))
    scale = scale or SCALES["quick" if quick else "full"]
    out_dir = Path(out_dir) / ("quick" if quick else "full")
    cache = out_dir / "data"
    seed_list = list(range(seeds if not quick or seeds != 3 else 1))
    runs: dict[str, list[dict[str, Any]]] = {}
    for seed in seed_list:  # seed-major: an early stop still leaves every mode with the same seeds
        for mode in MODES:
            runs.setdefault(mode, []).append(train_run(mode, out_dir, scale, _dar(mode, scale), seed, cache))
    blocks: dict[int, list[dict[str, Any]]] = {}
    if ablation:
        for seed in seed_list[:ablation_seeds]:
            for n in _ablation_blocks(scale.n_layer):
                run = runs["delta_block"][seed_list.index(seed)] if n == scale.num_blocks else train_run(
                    f"delta_block-N{n}", out_dir, scale, _dar("delta_block", scale, num_blocks=n), seed, cache)
                blocks.setdefault(n, []).append(run)
    convert: dict[str, list[dict[str, Any]]] = {}
    if conversion:
        half = scale.steps // 2
        for seed in seed_list[:conversion_seeds]:
            base = train_run("conv-pretrain", out_dir, scale, None, seed, cache, steps=half)
            start = out_dir / "conv-pretrain" / f"seed{seed}" / "final"
            convert.setdefault("pretrained (start)", []).append(base)
            for name, dar in (("continued unchanged", None),
                              ("converted to Delta Block", DARConfig(mode="delta_block", num_blocks=scale.num_blocks,
                                                                     gate="scalar"))):
                convert.setdefault(name, []).append(
                    train_run(f"conv-{name.split()[0]}", out_dir, scale, dar, seed, cache, start, steps=half))
    stored = [r for rs in (*runs.values(), *blocks.values(), *convert.values()) for r in rs]
    seconds = sum({(r["name"], r["seed"]): r["seconds"] for r in stored}.values())  # every run once, resumed or not
    report = out_dir / "results.md" if report is None else Path(report)
    text = render(scale, runs, blocks, convert, seconds, quick, report)
    write_section(report, "quick" if quick else "full", text)
    print(text)
    print(f"Wrote {report}")
    return {"runs": runs, "ablation": blocks, "conversion": convert, "seconds": seconds}


def _ablation_blocks(n_layer: int) -> list[int]:
    return [n for n in valid_block_counts(n_layer) if n in {1, 2, 4, 6, n_layer}]


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _ppl(runs: list[dict[str, Any]]) -> tuple[float, float]:
    values = [r["val_ppl"] for r in runs]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(mean: float, std: float, n: int) -> str:
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def _sharpness(rows: list[dict[str, float]], part: slice) -> dict[str, float]:
    """Mean over routed points with ≥2 sources: max weight, uniform 1/n, learned excess, normalized entropy."""
    rows = [r for r in rows[part] if r["n_sources"] > 1]
    if not rows:
        return {}
    excess = [(r["max_weight"] - r["uniform_max_weight"]) / (1 - r["uniform_max_weight"]) for r in rows]
    return {
        "max": statistics.fmean(r["max_weight"] for r in rows),
        "uniform": statistics.fmean(r["uniform_max_weight"] for r in rows),
        "excess": statistics.fmean(excess),
        "entropy": statistics.fmean(r["normalized_entropy"] for r in rows),
        "n": statistics.fmean(r["n_sources"] for r in rows),
    }


def render(scale: Scale, runs: dict, blocks: dict, convert: dict, seconds: float, quick: bool, report: Path) -> str:
    img = Path(report).parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    tag = "quick" if quick else "full"
    base_mean, base_std = _ppl(runs["baseline"])
    n_seeds = len(runs["baseline"])
    cfg = scale.config()
    tokens = scale.steps * scale.batch * scale.seq
    lines = [
        f"## Study results ({tag})",
        "",
        f"Command: `lit-dar study{' --quick true' if quick else ''}` — {seconds / 60:.1f} min of training runs on this machine "
        f"({torch.get_num_threads()} threads). Model: {cfg.n_layer} layers × {cfg.n_embd} (SwiGLU, RMSNorm, RoPE), "
        f"vocabulary {cfg.vocab_size} (BPE trained on the corpus), {scale.steps} steps × {scale.batch} × "
        f"{scale.seq} tokens = {tokens / 1e6:.2f} M tokens per run, AdamW {scale.lr:g} with warmup + cosine, "
        f"{n_seeds} seed(s). Data: the Python standard library's sources, fixed split; validation perplexity on "
        f"{scale.eval_iters} × {scale.batch} held-out windows.",
        "",
        "### Validation perplexity",
        "",
        "| rule | val ppl (mean ± std over seeds) | vs baseline | effect / seed std |",
        "|---|---|---|---|",
    ]
    for mode in MODES:
        mean, std = _ppl(runs[mode])
        delta = 100 * (mean - base_mean) / base_mean
        spread = max(std, base_std)
        ratio = f"{abs(mean - base_mean) / spread:.1f}" if mode != "baseline" and spread > 0 else "—"
        lines.append(f"| {mode} | {_fmt(mean, std, len(runs[mode]))} | {'—' if mode == 'baseline' else f'{delta:+.2f} %'} | {ratio} |")
    lines += ["", "### Routing sharpness (learned excess over uniform)", "",
              "Mean over routed points with ≥2 sources, first and second half of the depth. *excess* = (max weight − 1/n) / "
              "(1 − 1/n): 0 is uniform, 1 is one-hot; *entropy* is normalised by log n.", "",
              "| rule | depth | sources n | max weight | uniform 1/n | excess | entropy / log n |", "|---|---|---|---|---|---|---|"]
    for mode in ("attnres_block", "attnres_full", "delta_block", "delta"):
        rows = _mean_rows([r["routing"] for r in runs[mode]])
        half = len(rows) // 2
        for label, part in (("shallow", slice(0, half)), ("deep", slice(half, None)), ("all", slice(None))):
            s = _sharpness(rows, part)
            if s:
                lines.append(f"| {mode} | {label} | {s['n']:.1f} | {s['max']:.3f} | {s['uniform']:.3f} | {s['excess']:.3f} | {s['entropy']:.3f} |")
    ddl = runs.get("ddl")
    if ddl and ddl[0]["routing"]:
        betas = [statistics.fmean(row.get("beta", float("nan")) for row in r["routing"]) for r in ddl]
        lines += ["", f"Deep Delta Learning: mean β over sublayers after training {statistics.fmean(betas):.3f} "
                      "(1 at init; 0 leaves the stream, 2 reflects it)."]
    if blocks:
        k = len(next(iter(blocks.values())))
        base_k, _ = _ppl(runs["baseline"][:k])  # the baseline of the same seeds
        lines += ["", f"### Delta Block: number of blocks ({k} seed{'s' if k > 1 else ''}; compared with the baseline of the same seed{'s' if k > 1 else ''}, ppl {base_k:.2f})", "",
                  "| num_blocks | layers per block | val ppl | vs baseline |", "|---|---|---|---|"]
        for n in sorted(blocks):
            mean, std = _ppl(blocks[n])
            lines.append(f"| {n} | {math.ceil(cfg.n_layer / n)} | {_fmt(mean, std, len(blocks[n]))} | {100 * (mean - base_k) / base_k:+.2f} % |")
        mean, std = _ppl(runs["delta"][:k])
        lines.append(f"| (delta, per sublayer) | — | {_fmt(mean, std, k)} | {100 * (mean - base_k) / base_k:+.2f} % |")
    if convert:
        k = len(next(iter(convert.values())))
        lines += ["", f"### Converting a pretrained model ({k} seed{'s' if k > 1 else ''})", "",
                  f"A baseline pretrained for {scale.steps // 2} steps, then trained {scale.steps // 2} more steps on the same "
                  "tokens either unchanged or converted to Delta Block with the zero gate (identity at the start).", "",
                  "| arm | val ppl |", "|---|---|"]
        for name, rs in convert.items():
            mean, std = _ppl(rs)
            lines.append(f"| {name} | {_fmt(mean, std, len(rs))} |")
    curves = img / f"study-{tag}-curves.png"
    heat = img / f"study-{tag}-routing.png"
    _plot_curves(runs, curves)
    _plot_heatmaps(runs, heat)
    rel = lambda p: p.relative_to(img.parent).as_posix()  # noqa: E731
    lines += ["", f"![validation loss]({rel(curves)})", "", f"![routing: AttnRes vs Delta]({rel(heat)})", ""]
    return "\n".join(lines)


def _mean_rows(per_seed: list[list[dict[str, Any]]]) -> list[dict[str, float]]:
    out = []
    for rows in zip(*per_seed):
        out.append({k: statistics.fmean(r[k] for r in rows) for k in rows[0] if k != "mean_weight"})
    return out


def _plot_curves(runs: dict, path: Path) -> None:
    fig = Figure(figsize=(6.4, 4))
    ax = fig.add_subplot()
    for mode in MODES:
        curves = [dict(r["curve"]) for r in runs[mode]]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        ax.plot(steps, [statistics.fmean(c[s] for c in curves) for s in steps], marker="o", ms=3, label=mode)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (mean over seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _plot_heatmaps(runs: dict, path: Path) -> None:
    """Mean routing weights of seed 0 after training: AttnRes (full) beside Delta, sublayers × sources."""
    fig = Figure(figsize=(11, 4.5))
    for k, mode in enumerate(("attnres_full", "delta")):
        ax = fig.add_subplot(1, 2, k + 1)
        matrix = _weights_matrix(runs[mode][0])
        im = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_title(f"{mode} (seed 0, after training)")
        ax.set_xlabel("source (0: embedding x0)")
        ax.set_ylabel("routed point (sublayer; last row: final state)" if mode.startswith("attnres") else "sublayer")
    fig.colorbar(im, ax=fig.axes, shrink=0.8, label="weight")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _weights_matrix(run: dict) -> Any:
    """A (sublayer × source) matrix of mean weights, stored by the run's final routing pass."""
    rows = run["routing"]
    width = max(int(r["n_sources"]) for r in rows)
    matrix = np.full((len(rows), width), np.nan)
    for j, r in enumerate(rows):
        weights = r.get("mean_weight")
        if weights:
            matrix[j, : len(weights)] = weights
    return matrix


if __name__ == "__main__":
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    CLI(study, args=sys.argv[1:])
