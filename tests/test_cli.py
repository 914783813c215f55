"""The `lit-dar` command: recipes, the embedded default, bad input, and the Qwen3 path end to end."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from litgpt import Config

import lit_dar
from lit_dar import cli

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
FINETUNE_MODELS = {"Qwen3-0.6B": "Qwen3-0.6B", "Qwen3-8B": "Qwen3-8B"}


def _parser(command) -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(command)
    return parser


def _run(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh process (what a user types)."""
    return subprocess.run([sys.executable, "-m", "lit_dar", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})


# --------------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------------


def test_every_recipe_is_checked() -> None:
    names = {p.relative_to(ROOT / "recipes").as_posix() for p in RECIPES}
    assert {"pretrain/tiny.yaml", "pretrain/220m.yaml", "pretrain/533m.yaml", "pretrain/1b.yaml", "pretrain/8b.yaml",
            "pretrain/qwen3-0.6b.yaml", "finetune/qwen3-0.6b-delta-block.yaml",
            "finetune/qwen3-8b-delta-block.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(ROOT / "recipes").as_posix())
def test_recipe_parses_and_builds_on_meta(path: Path) -> None:
    command = cli.pretrain if path.parent.name == "pretrain" else cli.finetune
    parser = _parser(command)
    init = parser.instantiate_classes(parser.parse_args(["--config", str(path)]))
    if command is cli.finetune:
        config = Config.from_name(Path(init.checkpoint_dir).name)  # the recipe's model, as `litgpt download` names it
    else:
        config = cli._model_config(init.model_name, init.model_config)
    dar = init.dar
    assert isinstance(dar, lit_dar.DARConfig)
    model = lit_dar.build_model(config, dar, device="meta")
    report = lit_dar.routing_overhead(model)
    per_sublayer = 2 * config.n_embd + (1 if dar.gate == "scalar" else 0)
    assert report["routing_params"] == 2 * config.n_layer * per_sublayer
    assert report["percent"] < 0.35  # a fraction of a percent at every scale
    if command is cli.finetune:
        assert dar.gate == "scalar" and init.routing.lr == 5e-3 and init.optimizer["init_args"]["lr"] == 5e-5
        assert init.precision == "bf16-true" and init.strategy == "fsdp"
    if path.name != "tiny.yaml":
        assert init.strategy == "fsdp" and init.devices >= 4
    assert init.compile is False  # opt-in, as the recipe's comment says
    assert parser.parse_args(["--config", str(path), "--compile", "true"]).compile is True


def test_qwen3_8b_recipe_reports_the_papers_589k() -> None:
    parser = _parser(cli.pretrain)
    init = parser.instantiate_classes(parser.parse_args(["--config", str(ROOT / "recipes/pretrain/8b.yaml")]))
    model = lit_dar.build_model(init.model_config, init.dar, device="meta")
    assert (init.model_config.n_embd, init.model_config.n_layer) == (4096, 36)
    assert lit_dar.routing_overhead(model)["routing_params"] == 589_824


def test_tiny_recipe_is_the_embedded_default() -> None:
    parser = _parser(cli.pretrain)
    defaults = parser.parse_args([])
    recipe = parser.parse_args(["--config", str(ROOT / "recipes/pretrain/tiny.yaml")])
    recipe_model = recipe.pop("model_config")
    assert Config(**recipe_model.as_dict()) == cli.TINY_MODEL
    defaults.pop("model_config")
    recipe.pop("config")
    defaults.pop("config")
    assert recipe == defaults


# --------------------------------------------------------------------------------------------------
# Bad input: one line naming the fix, exit code 2, nothing touched
# --------------------------------------------------------------------------------------------------


def _error_line(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lit-dar: error: "), err
    return err[0]


def test_bad_input_messages(capsys, tmp_path: Path) -> None:
    (tmp_path / "unknown.yaml").write_text("model_name: Qwen3-0.6B\ndar_mode: delta\n")
    assert "'dar_mode'" in _error_line(capsys, ["pretrain", "--config", str(tmp_path / "unknown.yaml")])
    (tmp_path / "malformed.yaml").write_text("train:\n  max_steps: [10\n")
    assert "Problems parsing config" in _error_line(capsys, ["pretrain", "--config", str(tmp_path / "malformed.yaml")])
    assert "choose one of" in _error_line(capsys, ["pretrain", "--dar.mode", "deltas"])
    assert "Choose num_blocks from [1, 2, 3, 6]" in _error_line(
        capsys, ["pretrain", "--dar.num_blocks", "5", "--out_dir", str(tmp_path / "nb")])
    assert "does not exist" in _error_line(capsys, ["finetune", "--checkpoint_dir", str(tmp_path / "missing")])
    assert "--devices" in _error_line(capsys, ["pretrain", "--devices", "64", "--out_dir", str(tmp_path / "d")])
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert "not writable" in _error_line(capsys, ["pretrain", "--out_dir", str(blocker / "run")])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No corpus files" in _error_line(
        capsys, ["pretrain", "--data.root", str(empty), "--data.cache_dir", str(tmp_path / "c"), "--out_dir", str(tmp_path / "e")])


def test_study_refuses_contradicting_options(capsys, tmp_path: Path) -> None:
    line = _error_line(capsys, ["study", "--longer", "true", "--quick", "true", "--out_dir", str(tmp_path / "s")])
    assert "drop --quick" in line and not (tmp_path / "s").exists()


def test_existing_run_is_not_overwritten(capsys, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "lit_model.pth").write_bytes(b"precious")
    line = _error_line(capsys, ["pretrain", "--out_dir", str(out)])
    assert "--resume auto" in line and "--overwrite true" in line
    assert (out / "lit_model.pth").read_bytes() == b"precious" and len(list(out.iterdir())) == 1


def test_finetune_refuses_checkpoints_it_cannot_use(capsys, tmp_path: Path) -> None:
    from conftest import tiny_config

    from lit_dar.checkpoint import save_checkpoint

    ckpt = tmp_path / "ckpt"
    save_checkpoint(lit_dar.build_model(tiny_config("Qwen3-0.6B")), ckpt)
    assert "no tokenizer.json" in _error_line(capsys, ["finetune", "--checkpoint_dir", str(ckpt), "--out_dir", str(tmp_path / "o1")])
    (ckpt / "tokenizer.json").write_text("{}")
    torch.save(lit_dar.build_model(tiny_config("pythia-14m")).state_dict(), ckpt / "lit_model.pth")  # other architecture
    (ckpt / "tokenizer.json").unlink()
    other = tmp_path / "other"
    line = _error_line(capsys, ["convert", "dar", "--checkpoint_dir", str(ckpt), "--out_dir", str(other)])
    assert "another architecture" in line
    assert not other.exists() or not any(other.iterdir())


def test_model_config_fields_override_the_embedded_default(capsys) -> None:
    parser = _parser(cli.pretrain)
    init = parser.instantiate_classes(parser.parse_args(["--model_config.n_layer", "4"]))
    assert cli._model_config(init.model_name, init.model_config) == replace(cli.TINY_MODEL, n_layer=4)
    init = parser.instantiate_classes(parser.parse_args(["--model_name", "pythia-14m", "--model_config.n_layer", "2"]))
    assert cli._model_config(init.model_name, init.model_config) == Config.from_name("pythia-14m", n_layer=2)
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--print_config"])
    shown = capsys.readouterr().out
    assert "n_embd: 128" in shown and "n_layer: 6" in shown and "model_config: null" not in shown


def test_first_argument_may_be_positional(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "pythia-14m", "--print_config"])
    assert "model_name: pythia-14m" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["finetune", "some/checkpoint", "--print_config"])
    assert "checkpoint_dir: some/checkpoint" in capsys.readouterr().out


def test_help_lists_bench_and_the_dar_keys(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "bench" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--help"])
    shown = capsys.readouterr().out
    assert all(f"--dar.{f.name}" in shown for f in fields(lit_dar.DARConfig))


def test_impossible_arguments_are_one_line_and_write_nothing(capsys, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cases = {
        ("--train.max_steps", "-5"): "train.max_steps=-5",
        ("--train.micro_batch_size", "0"): "train.micro_batch_size=0",
        ("--train.global_batch_size", "10", "--train.micro_batch_size", "16"): "multiple of 16",
        ("--eval.interval", "0"): "eval.interval=0",
        ("--train.max_seq_length", "0"): "train.max_seq_length=0",
        ("--train.epochs", "2"): "train.epochs=2 is not supported",
        ("--eval.max_new_tokens", "5"): "lit-dar generate",
        ("--optimizer.lr", "-0.1"): "optimizer.lr=-0.1 must be a positive number",
        ("--dar.num_blocks", "99"): "num_blocks",
        ("--precision", "fp8"): "choose one of ['bf16-true', 'bf16-mixed', '16-mixed', '32-true'] or null",
        ("--dar.foo", "1"): "Unknown key 'dar.foo': the keys of dar are ['mode', 'num_blocks'",
    }
    for args, expected in cases.items():
        line = _error_line(capsys, ["pretrain", "--out_dir", str(out), "--data.cache_dir", str(tmp_path / "c"), *args])
        assert expected in line, (args, line)
        assert "min_lr" not in line
        assert not out.exists(), args
    (tmp_path / "dar.yaml").write_text("dar:\n  mode: delta\n  blocks: 2\n")
    assert "Unknown key 'dar.blocks'" in _error_line(capsys, ["pretrain", "--config", str(tmp_path / "dar.yaml")])
    (tmp_path / "empty.yaml").write_text("\n")
    assert "is empty" in _error_line(capsys, ["pretrain", "--config", str(tmp_path / "empty.yaml")])
    (tmp_path / "a-file").write_text("")
    assert "is a file" in _error_line(capsys, ["pretrain", "--out_dir", str(tmp_path / "a-file")])
    empty = tmp_path / "empty-root"
    empty.mkdir()
    line = _error_line(capsys, ["pretrain", "--data.root", str(empty), "--data.cache_dir", str(tmp_path / "c"),
                                "--out_dir", str(out)])
    assert "No corpus files" in line and "data.root" in line and "max_bytes" not in line


def test_data_that_needs_an_extra_or_a_download_is_one_line(capsys, tmp_path: Path) -> None:
    import importlib.util

    out = tmp_path / "out"
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("hello world\n" * 100)
    base = ["pretrain", "--out_dir", str(out), "--tokenizer_dir", str(_tokenizer_dir(tmp_path))]
    text_files = _error_line(capsys, [*base, "--data", "TextFiles", "--data.train_data_path", str(tmp_path / "texts")])
    stories = _error_line(capsys, [*base, "--data", "TinyStories", "--data.data_path", str(tmp_path / "ts")])
    if importlib.util.find_spec("litdata") is None:
        assert "pip install 'lit-dar[data]'" in text_files and "pip install 'lit-dar[data]'" in stories
    else:  # with the extra installed, the download fails offline
        assert "could not be prepared here" in stories and "network access" in stories
    assert not out.exists()


def _tokenizer_dir(tmp_path: Path) -> Path:
    from lit_dar.data import ensure_tokenizer

    path = tmp_path / "tok"
    ensure_tokenizer(path, vocab_size=512, max_bytes=200_000)
    return path


def test_impossible_generate_evaluate_routing_arguments(capsys, tmp_path: Path) -> None:
    from conftest import tiny_config

    from lit_dar.checkpoint import save_checkpoint

    ckpt = tmp_path / "ckpt"
    config = tiny_config("Qwen3-0.6B", n_layer=2, vocab_size=512, padded_vocab_size=512, block_size=16)
    save_checkpoint(lit_dar.build_model(config, lit_dar.DARConfig(num_blocks=2)), ckpt)
    (ckpt / "tokenizer.json").write_text((_tokenizer_dir(tmp_path) / "tokenizer.json").read_text())
    cases = {
        ("generate", "--max_new_tokens", "0"): "max_new_tokens=0 must be a positive integer",
        ("generate", "--temperature", "-1"): "temperature=-1.0 must be ≥ 0",
        ("generate", "--top_k", "0"): "top_k=0 must be a positive integer",
        ("generate", "--prompt", "import os\n" * 20): "shorten the prompt",
        ("evaluate", "--tasks", "[]"): "tasks is empty",
        ("evaluate", "--tasks", "[x]", "--batch_size", "0"): "batch_size=0",
        ("evaluate", "--tasks", "[x]", "--limit", "0"): "limit=0.0 must be positive",
        ("evaluate", "--tasks", "[x]", "--num_fewshot", "-1"): "num_fewshot=-1",
        ("evaluate", "--tasks", "[x]", "--include_path", str(tmp_path / "nowhere")): "not a directory of task YAMLs",
        ("routing", "--text", ""): "text is empty",
        ("routing", "--out", str(tmp_path)): "cannot be written",
    }
    for (command, *args), expected in cases.items():
        line = _error_line(capsys, [command, str(ckpt), *args])
        assert expected in line, (command, args, line)


def test_corrupt_checkpoints_are_one_line(capsys, tmp_path: Path) -> None:
    from conftest import tiny_config

    from lit_dar.checkpoint import save_checkpoint

    ckpt = tmp_path / "ckpt"
    save_checkpoint(lit_dar.build_model(tiny_config("Qwen3-0.6B", n_layer=2), lit_dar.DARConfig(num_blocks=2)), ckpt)
    (ckpt / "tokenizer.json").write_text((_tokenizer_dir(tmp_path) / "tokenizer.json").read_text())
    data = (ckpt / "lit_model.pth").read_bytes()
    (ckpt / "lit_model.pth").write_bytes(data[: len(data) // 2])
    for argv in (["generate", str(ckpt)], ["routing", str(ckpt)],
                 ["finetune", str(ckpt), "--out_dir", str(tmp_path / "ft")]):
        line = _error_line(capsys, argv)
        assert "not a readable PyTorch checkpoint" in line and "lit_model.pth" in line, (argv, line)
    assert not (tmp_path / "ft").exists()


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------

TINY_RUN = ["--model_config.n_layer", "2", "--model_config.n_embd", "32", "--model_config.n_head", "2",
            "--model_config.n_query_groups", "1", "--model_config.head_size", "16", "--model_config.intermediate_size",
            "64", "--model_config.vocab_size", "512", "--model_config.padded_vocab_size", "512",
            "--model_config.block_size", "32", "--train.max_seq_length", "32", "--train.micro_batch_size", "4",
            "--data.max_bytes", "300000", "--eval.max_iters", "2"]


def _tiny_args(tmp_path: Path, out: str, steps: int, extra: list[str] = (), every: int = 4) -> list[str]:
    return ["pretrain", "--config", str(ROOT / "recipes/pretrain/tiny.yaml"), *TINY_RUN,
            "--out_dir", str(tmp_path / out), "--data.cache_dir", str(tmp_path / "cache"),
            "--train.max_steps", str(steps), "--train.lr_warmup_steps", "2", "--train.save_interval", str(every),
            "--eval.interval", str(every), "--train.log_interval", "1", "--dar.num_blocks", "2", *extra]


@pytest.mark.slow
def test_tiny_pretrain_writes_checkpoint_logs_heatmap(tmp_path: Path) -> None:
    result = cli.run(_tiny_args(tmp_path, "run", steps=8, extra=["--train.global_batch_size", "4"]))
    run = tmp_path / "run"
    assert result["steps"] == 8 and result["val_ppl"] > 1
    assert {"lit_model.pth", "model_config.yaml", "dar_config.yaml", "tokenizer.json"} <= {p.name for p in (run / "final").iterdir()}
    assert (run / "routing.png").stat().st_size > 1000
    assert list((run / "logs").glob("events.out.tfevents.*"))
    model = lit_dar.load_model(run / "final")
    assert lit_dar.get_dar_config(model).mode == "delta_block"
    # the installed console script exits 0 (its return value would become the exit status)
    script = Path(sys.executable).parent / "lit-dar"
    routing = subprocess.run([str(script), "routing", "--checkpoint_dir", str(run / "final"), "--out", str(tmp_path / "r.png")],
                             capture_output=True, text=True, timeout=300)
    assert routing.returncode == 0 and routing.stderr.count("\n") < 20, routing.stderr[-2000:]
    assert "sublayer" in routing.stdout and (tmp_path / "r.png").is_file()


def _events(run: Path) -> list[Path]:
    return sorted((run / "logs").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_overwrite_starts_afresh_and_resume_finds_this_runs_checkpoint(capfd, tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = cli.run(_tiny_args(tmp_path, "run", steps=4, every=2, extra=["--optimizer.lr", "0.01"]))
    hparams = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["hyper_parameters"]
    assert first["steps"] == 4 and hparams["learning_rate"] == 0.01  # the command line's lr, not the default
    bar = capfd.readouterr().out
    assert "Epoch 0:" in bar and "/-2" not in bar  # the progress bar shows no epoch total
    old_events = _events(run)

    # refused requests leave the run as it was, and say why in one line
    for args, expected in (
        (["--resume", "auto", "--model_config.n_layer", "3", "--dar.num_blocks", "3"], "another architecture"),
        (["--resume", "auto", "--dar.mode", "delta"], "was trained with dar"),
        (["--overwrite", "true", "--dar.num_blocks", "99"], "num_blocks"),
    ):
        line = _error_line(capfd, _tiny_args(tmp_path, "run", steps=6, every=2, extra=args))
        assert expected in line, line
        assert _events(run) == old_events and not (run / "checkpoints" / "last-v1.ckpt").exists()

    second = cli.run(_tiny_args(tmp_path, "run", steps=2, every=2, extra=["--overwrite", "true"]))
    assert second["steps"] == 2
    new_events = _events(run)
    assert new_events and not set(new_events) & set(old_events)  # the old run's logs are gone
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["final.ckpt", "last.ckpt"]
    resumed = cli.run(_tiny_args(tmp_path, "run", steps=3, every=1, extra=["--resume", "auto"]))
    assert resumed["steps"] == 3  # continued the overwriting run (step 2), not the old one (step 4)

    events = _events(run)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    line = _error_line(capfd, _tiny_args(tmp_path, "run", steps=4, every=1, extra=["--resume", "auto"]))
    assert "not a readable PyTorch checkpoint" in line and _events(run) == events


@pytest.mark.slow
def test_max_time_initial_validation_and_the_natural_finetune(capsys, tmp_path: Path) -> None:
    timed = cli.run(_tiny_args(tmp_path, "timed", steps=100_000, every=100_000,
                               extra=["--train.max_time", "3", "--logger_name", "csv", "--eval.initial_validation", "true",
                                      "--eval.final_validation", "false"]))
    assert 0 < timed["steps"] < 100_000
    rows = list(csv.DictReader((tmp_path / "timed" / "logs" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows if r.get("val_loss")][:1] == [0]  # validated before the first step

    # a lit-dar checkpoint brings its own dar config; its directory may be given positionally
    final = timed["final"]
    tuned = cli.run(["finetune", str(final), "--out_dir", str(tmp_path / "ft"), "--data.cache_dir", str(tmp_path / "cache"),
                     "--data.max_bytes", "300000", "--train.max_steps", "2", "--train.global_batch_size", "4",
                     "--train.micro_batch_size", "4", "--train.max_seq_length", "32", "--eval.max_iters", "1",
                     "--routing.image_interval", "0"])
    assert tuned["steps"] == 2
    assert lit_dar.DARConfig.from_file(tuned["final"]) == lit_dar.DARConfig.from_file(final)
    line = _error_line(capsys, ["finetune", str(final), "--out_dir", str(tmp_path / "ft2"), "--dar.mode", "delta"])
    assert "--dar.mode delta_block --dar.num_blocks 2 --dar.gate none" in line and "leave --dar unset" in line
    assert not (tmp_path / "ft2").exists()


def _losses(run: Path) -> dict[int, float]:
    import csv

    rows = csv.DictReader((run / "logs" / "metrics.csv").open())
    return {int(r["step"]): float(r["train_loss"]) for r in rows if r.get("train_loss")}


STEPS = 80


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkill_and_resume_continues_exactly(tmp_path: Path) -> None:
    """Kill a 2-process DDP run mid-training; `--resume auto` then logs the uninterrupted run's losses."""
    common = ["--devices", "2", "--logger_name", "csv", "--train.global_batch_size", "8", "--routing.image_interval", "0",
              "--eval.final_validation", "false", "--model_config.n_layer", "4", "--model_config.n_embd", "128",
              "--model_config.intermediate_size", "256"]
    started = time.time()
    full = _run(*_tiny_args(tmp_path, "full", steps=STEPS, extra=common, every=10))
    assert full.returncode == 0, full.stderr[-3000:]
    print(f"uninterrupted run: {time.time() - started:.1f} s")

    argv = [sys.executable, "-m", "lit_dar", *_tiny_args(tmp_path, "killed", steps=STEPS, extra=common, every=10)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    size = -1
    while time.time() < deadline and proc.poll() is None and not (last.exists() and last.stat().st_size == size):
        size = last.stat().st_size if last.exists() else -1
        time.sleep(0.2)  # until the first checkpoint (step 10 of 80) is written completely
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.exists(), "the run never reached its first checkpoint"
    assert not (tmp_path / "killed" / "final").exists()

    resumed = _run(*_tiny_args(tmp_path, "killed", steps=STEPS, extra=common, every=10), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full_losses, resumed_losses = _losses(tmp_path / "full"), _losses(tmp_path / "killed")
    assert len(full_losses) == STEPS and 10 <= len(resumed_losses) <= STEPS - 10  # resumed from a later checkpoint
    for step, loss in resumed_losses.items():
        assert loss == pytest.approx(full_losses[step], rel=1e-5, abs=1e-6), step


@pytest.mark.slow
@pytest.mark.multiprocess
def test_qwen3_path_end_to_end(tmp_path: Path) -> None:
    """HF Qwen3 → LitGPT → DAR (exact) → 2-process fine-tune → perplexity, generation, lm-eval."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("lm_eval")
    from test_convert import make_hf_qwen3, tiny_litgpt_config
    from test_evaluate import _write_tasks

    hf = make_hf_qwen3(tmp_path / "hf" / "Qwen3-tiny")
    lit = tmp_path / "litgpt"
    lit_dar.convert.convert_hf(hf, lit, model_config=tiny_litgpt_config())
    dar_dir = tmp_path / "dar"
    assert cli.run(["convert", "dar", "--checkpoint_dir", str(lit), "--out_dir", str(dar_dir),
                     "--dar.mode", "delta_block", "--dar.num_blocks", "2", "--dar.gate", "scalar"]) == dar_dir

    idx = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = transformers.Qwen3ForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()(idx).logits
        got = lit_dar.load_model(dar_dir).eval()(idx)
    assert (got - expected).abs().max().item() < 1e-5

    ft = _run("finetune", "--checkpoint_dir", str(lit), "--out_dir", str(tmp_path / "ft"),
              "--devices", "2", "--strategy", "ddp", "--dar.num_blocks", "2", "--train.max_steps", "6",
              "--train.micro_batch_size", "2", "--train.global_batch_size", "4", "--train.max_seq_length", "64",
              "--train.lr_warmup_steps", "1", "--eval.interval", "3", "--eval.max_iters", "2",
              "--data.max_bytes", "300000", "--data.cache_dir", str(tmp_path / "cache"), "--routing.image_interval", "0")
    assert ft.returncode == 0, ft.stderr[-3000:]
    ppl = float(re.search(r"Validation perplexity: ([0-9.]+)", ft.stdout).group(1))
    assert 1 < ppl < 10 * 384
    final = tmp_path / "ft" / "final"
    assert lit_dar.DARConfig.from_file(final).gate == "scalar"

    gen = _run("generate", "--checkpoint_dir", str(final), "--prompt", "def main():", "--max_new_tokens", "8",
               "--temperature", "0")
    assert gen.returncode == 0 and gen.stdout.startswith("def main():"), gen.stderr[-2000:]

    tasks = _write_tasks(tmp_path)
    ev = _run("evaluate", "--checkpoint_dir", str(final), "--tasks", "[tiny_mc]", "--include_path", str(tasks),
              env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert re.search(r"tiny_mc: acc [0-9.]+", ev.stdout)


def test_bench_command_is_reachable(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0 and "--layers" in capsys.readouterr().out
