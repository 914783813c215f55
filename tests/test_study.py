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


def test_longer_refuses_quick(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="drop --quick"):
        study(tmp_path, quick=True, longer=True)
