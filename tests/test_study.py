import json
import time
from pathlib import Path

import pytest
from conftest import lab_script

_study = lab_script("experiments/study.py")
MODES, Scale, _ablation_blocks, study, write_section = (
    _study.MODES, _study.Scale, _study._ablation_blocks, _study.study, _study.write_section)


def test_ablation_blocks_are_the_valid_ones() -> None:
    assert _ablation_blocks(12) == [1, 2, 4, 6, 12]
    assert _ablation_blocks(4) == [1, 2, 4]


def test_write_section_keeps_hand_written_text(tmp_path: Path) -> None:
    report = tmp_path / "results.md"
    report.write_text("# Results\n\nHand-written reading.\n")
    write_section(report, "full", "table v1")
    write_section(report, "quick", "quick table")
    write_section(report, "full", "table v2")
    text = report.read_text()
    assert "Hand-written reading." in text and "table v2" in text and "table v1" not in text and "quick table" in text


@pytest.mark.slow
def test_micro_study_end_to_end(tmp_path: Path) -> None:
    micro = Scale(n_layer=2, n_embd=32, steps=6, batch=4, seq=32, vocab=512, warmup=1, eval_interval=3,
                  eval_iters=2, num_blocks=2, max_bytes=600_000)
    report = tmp_path / "docs" / "results.md"
    out = study(tmp_path / "runs", quick=True, seeds=2, report=report, scale=micro, ablation_seeds=2)
    assert set(out["runs"]) == set(MODES) and all(len(r) == 2 for r in out["runs"].values())
    assert sorted(out["ablation"]) == [1, 2]
    text = report.read_text()
    for heading in ("Validation perplexity", "Routing sharpness", "number of blocks", "Converting a pretrained model"):
        assert heading in text
    assert (report.parent / "img" / "study-quick-curves.png").stat().st_size > 1000
    assert (report.parent / "img" / "study-quick-routing.png").stat().st_size > 1000
    # every number in the tables comes from a stored run
    stored = json.loads((tmp_path / "runs" / "quick" / "delta" / "seed1" / "result.json").read_text())
    assert stored["mode"] == "delta" and stored["val_ppl"] > 1 and len(stored["routing"]) == 4
    # an interrupted study resumes: a second call trains nothing and writes the same tables
    started = time.perf_counter()
    again = study(tmp_path / "runs", quick=True, seeds=2, report=report, scale=micro, ablation_seeds=2)
    assert time.perf_counter() - started < out["seconds"] / 3 and again["seconds"] == out["seconds"]


@pytest.mark.slow
def test_micro_longer_study_end_to_end(tmp_path: Path) -> None:
    """The longer study at a micro scale, two runs at a time: every part is stored, reported and reused."""
    micro = Scale(n_layer=2, n_embd=32, steps=16, batch=4, seq=32, vocab=512, warmup=2, eval_interval=4,
                  eval_iters=2, num_blocks=2, max_bytes=600_000)
    report = tmp_path / "docs" / "results.md"
    report.parent.mkdir()
    report.write_text("# Results\n\nHand-written reading.\n")
    out = study(tmp_path / "runs", seeds=2, report=report, scale=micro, longer=True, workers=2)
    runs = tmp_path / "runs" / "longer"
    for name in ("baseline-4", "delta-16", "delta_block-4", "attnres_block-16"):
        assert {p.parent.name for p in (runs / name).glob("seed*/result.json")} == {"seed0", "seed1"}
    for name in ("ddl-4-lr0.001", "attnres_full-4-lr0.003", "delta-4-lr0.001"):
        assert (runs / name / "seed0" / "result.json").is_file()
    assert not (runs / "delta-4-lr0.003").exists()  # the length part's seed 0 is that run
    conversion = {r["name"]: r for chain in out["conversion"] for r in chain if r["seed"] == 2}
    assert set(conversion) == {"conv-pretrain", "conv-continued", "conv-converted", "conv-routing-only"}
    assert conversion["conv-routing-only"]["freeze_base"] and conversion["conv-converted"]["steps"] == 2
    short = json.loads((runs / "delta-4" / "seed1" / "result.json").read_text())
    assert short["steps"] == 4 and short["tokens"] == 4 * 4 * 32 and short["val_ppl"] > 1
    text = report.read_text()
    assert "Hand-written reading." in text and "<!-- study:longer -->" in text
    for heading in ("Gain over the baseline by length (2 seeds)", "Learning rate (4 steps, seed 0)",
                    "Converting a pretrained model (3 seeds)"):
        assert heading in text
    ppl = {r["mode"]: r["val_ppl"] for r in (json.loads(p.read_text()) for p in runs.glob("*-16/seed1/result.json"))}
    assert f"{100 * (ppl['delta'] / ppl['baseline'] - 1):+.2f}" in text  # a paired gain, from the stored runs
    assert (report.parent / "img" / "study-longer-gain.png").stat().st_size > 1000
    started = time.perf_counter()
    study(tmp_path / "runs", seeds=2, report=report, scale=micro, longer=True, workers=2)
    assert time.perf_counter() - started < 60  # everything reused


def test_longer_refuses_quick(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="drop --quick"):
        study(tmp_path, quick=True, longer=True)
