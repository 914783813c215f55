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

import csv
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jsonargparse import CLI, set_parsing_settings
from litgpt import Config
from litgpt.args import EvalArgs, TrainArgs
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's lit_dar when run as a script

from lit_dar.config import DARConfig  # noqa: E402
from lit_dar.data import StdlibCorpus  # noqa: E402
from lit_dar.checkpoint import load_model  # noqa: E402
from lit_dar.patch import enable_routing_stats, find_router  # noqa: E402
from lit_dar.recipe import RoutingArgs, RunSpec, small_config, valid_block_counts  # noqa: E402
from lit_dar.rule import RoutingStatistics  # noqa: E402
from lit_dar.run import fit  # noqa: E402

MODES = ["baseline", "attnres_block", "attnres_full", "delta_block", "delta", "ddl"]


@dataclass(frozen=True)
class Scale:
    """Model and training size of one study run (the same for every mode)."""

    n_layer: int
    n_embd: int
    steps: int
    batch: int = 16
    seq: int = 128
    vocab: int = 4096
    lr: float = 3e-3
    warmup: int = 30
    eval_interval: int = 50
    eval_iters: int = 16
    num_blocks: int = 4
    max_bytes: int = 4_000_000

    def config(self) -> Config:
        return small_config(name=f"study-L{self.n_layer}-d{self.n_embd}", n_layer=self.n_layer, n_embd=self.n_embd,
                            n_head=self.n_embd // 32, head_size=32, vocab_size=self.vocab, block_size=self.seq)


SCALES = {
    "full": Scale(n_layer=12, n_embd=128, steps=250, batch=16, eval_interval=50, eval_iters=12, num_blocks=4),
    "quick": Scale(n_layer=4, n_embd=64, steps=60, batch=8, seq=64, eval_interval=20, eval_iters=4, num_blocks=2,
                   max_bytes=1_000_000),
}


def _dar(mode: str, scale: Scale, **overrides: Any) -> DARConfig | None:
    if mode == "baseline":
        return None
    return DARConfig(mode=mode, num_blocks=overrides.pop("num_blocks", scale.num_blocks), **overrides)


def train_run(
    name: str, out: Path, scale: Scale, dar: DARConfig | None, seed: int, cache: Path,
    initial_checkpoint_dir: Path | None = None, steps: int | None = None,
) -> dict[str, Any]:
    """One pretraining (or continued-training) run, or its stored result if it already finished."""
    run_dir = out / name / f"seed{seed}"
    done = run_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    steps = steps or scale.steps
    spec = RunSpec(
        config=scale.config(), out_dir=run_dir, precision=None, initial_checkpoint_dir=initial_checkpoint_dir,
        resume=False, data=StdlibCorpus(cache_dir=cache, max_bytes=scale.max_bytes, seed=seed),
        train=TrainArgs(save_interval=steps, log_interval=10, global_batch_size=scale.batch,
                        micro_batch_size=scale.batch, lr_warmup_steps=scale.warmup, max_steps=steps,
                        max_seq_length=scale.seq, max_norm=1.0, min_lr=scale.lr / 10),
        eval=EvalArgs(interval=scale.eval_interval, max_iters=scale.eval_iters, final_validation=True),
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": scale.lr, "weight_decay": 0.1}},
        devices=1, num_nodes=1, tokenizer_dir=None, logger_name="csv", seed=seed, dar=dar,
        routing=RoutingArgs(image_interval=0, log_interval=50), strategy="auto", activation_checkpointing=False,
        overwrite=True, init_weights=initial_checkpoint_dir is None, enable_progress_bar=False,
    )
    started = time.perf_counter()
    result = fit(spec)
    record = {
        "name": name, "seed": seed, "mode": "baseline" if dar is None else dar.mode,
        "dar": None if dar is None else dar.to_dict(), "steps": steps,
        "val_loss": result["val_loss"], "val_ppl": result["val_ppl"], "seconds": time.perf_counter() - started,
        "curve": _val_curve(run_dir), "routing": _routing_rows(run_dir / "final", spec) if dar is not None else None,
    }
    done.write_text(json.dumps(record, indent=1))
    return record


def _val_curve(run_dir: Path) -> list[tuple[int, float]]:
    rows = csv.DictReader((run_dir / "logs" / "metrics.csv").open())
    return [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]


def _routing_rows(final: Path, spec: Any) -> list[dict[str, float]]:
    """Per routed point, over the first validation batches: mean max weight, entropy, and uniform references
    (for a rule without routing weights, its own per-sublayer scalars on the first batch)."""
    model = load_model(final).eval()
    rule = find_router(model)
    enable_routing_stats(model)
    recorded = []
    with torch.no_grad():
        for batch in spec.data.val_dataloader():
            model(batch[:, :-1])
            recorded.append(rule.statistics())
            if len(recorded) == 4 or not isinstance(recorded[0], RoutingStatistics):
                break
    if not isinstance(recorded[0], RoutingStatistics):
        return [{k: float(v) for k, v in point.items()} for point in recorded[0].per_point()]
    rows = []
    for k, n in enumerate(recorded[0].n_sources):  # the null source included, if any
        max_weight, entropy, mean_weight = 0.0, 0.0, torch.zeros(n)
        for stats in recorded:
            max_weight += stats.max_weight[k].item()
            entropy += stats.entropy[k].item()
            mean_weight += stats.mean_weight[k, :n]
        batches = len(recorded)
        rows.append({
            "n_sources": n, "max_weight": max_weight / batches, "uniform_max_weight": 1.0 / n,
            "normalized_entropy": (entropy / batches) / math.log(n) if n > 1 else 0.0,
            "mean_weight": (mean_weight / batches).tolist(),
        })
    return rows


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
    """
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


def write_section(report: Path, tag: str, text: str) -> None:
    """Replace the ``<!-- study:TAG -->`` section of ``report`` (created if missing); the rest stays as written."""
    begin, end = f"<!-- study:{tag} -->", f"<!-- /study:{tag} -->"
    block = f"{begin}\n{text}\n{end}"
    old = report.read_text() if report.is_file() else "# Results\n"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(new)


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
