"""benchmarks/: the benchmark's code path in quick mode (it runs and reports every field; no timing assertions)
and the other scripts on tiny models."""

import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import lab_script

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    """A script of ``benchmarks/`` as a module."""
    return lab_script(f"benchmarks/{name}.py")


bench = _script("bench")


def test_quick_benchmark_reports_all_fields(tmp_path) -> None:
    report = bench.main(["--quick", "--layers", "2", "--sweep", "2", "--out", str(tmp_path), "--name", "q"])
    for name in ("json", "md"):
        assert (tmp_path / f"q.{name}").is_file()
    assert (tmp_path / "q_depth.png").is_file()
    saved = json.loads((tmp_path / "q.json").read_text())
    assert saved["main"].keys() == saved["sweep"].keys() == {"2"}
    rows = report["main"]["2"]
    assert set(rows) == {"baseline", *bench.ALL_MODES}
    for name, row in rows.items():
        for key in ("train_tokens_per_s", "train_speed_ratio", "saved_bytes", "saved_ratio", "peak_bytes",
                    "params", "routing_params", "param_overhead_percent", "decode_tokens_per_s",
                    "decode_speed_ratio"):
            assert key in row, (name, key)
        assert row["train_tokens_per_s"] > 0 and row["saved_bytes"] > 0
        assert (row["routing_params"] > 0) == (name != "baseline")
    assert rows["baseline"]["train_speed_ratio"] == pytest.approx(1.0)
    assert "Delta Block" in (tmp_path / "q.md").read_text()


def test_benchmark_of_a_litgpt_config_by_name(tmp_path) -> None:
    """``--model`` takes LitGPT's own config (here Pythia: LayerNorm, parallel residual, GELU MLP) at the
    asked depth, and a name LitGPT does not know is refused before anything runs."""
    report = bench.main(["--quick", "--model", "pythia-14m", "--layers", "2", "--sweep", "--modes", "delta_block",
                         "--out", str(tmp_path), "--name", "p"])
    rows = report["main"]["2"]
    assert set(rows) == {"baseline", "delta_block"} and rows["delta_block"]["routing_params"] > 0
    assert rows["baseline"]["params"] == 2 * 50304 * 128 + 2 * (12 * 128 * 128 + 13 * 128) + 2 * 128
    assert (tmp_path / "p.md").read_text().startswith("Device: CPU") and "pythia-14m" in (tmp_path / "p.md").read_text()
    for wrong in (["--model", "no-such-model"], ["--model", "pythia-14m", "--n-embd", "256"]):
        with pytest.raises(SystemExit):
            bench.main(["--quick", *wrong, "--out", str(tmp_path)])


def test_resident_bytes_are_the_models_own() -> None:
    """What a GPU peak subtracts for the other models: parameters, buffers and optimizer state, each storage
    once."""
    import torch

    settings = bench.BenchSettings.quick()
    (trainer, _), *_ = bench.build_trainers(settings, 2, torch.device("cpu"))
    params = sum(p.numel() * 4 for p in trainer.model.parameters())
    buffers = sum({b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in trainer.model.buffers()}.values())
    assert trainer._resident_bytes() == params + buffers
    trainer.step()  # AdamW: two moments per parameter and a step counter per parameter
    n = len(list(trainer.model.parameters()))
    assert trainer._resident_bytes() == 3 * params + buffers + n * 4


def test_memory_of_every_depth_is_measured_before_any_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A timing phase leaves the heap mapped, and a memory phase after it reads too low: every depth's
    memory comes first, and every depth is then timed with the results of its own memory phase."""
    calls = []
    measure_memory, measure_speed = bench.measure_memory, bench.measure_speed

    def memory(settings, n_layer, device):
        calls.append(("memory", n_layer))
        return measure_memory(settings, n_layer, device)

    def speed(settings, results, *args, **kwargs):
        calls.append(("speed", results[0].n_layer))
        return measure_speed(settings, results, *args, **kwargs)

    monkeypatch.setattr(bench, "measure_memory", memory)
    monkeypatch.setattr(bench, "measure_speed", speed)
    settings = bench.BenchSettings.quick(layers=(2,), sweep=(1, 2), modes=("delta",), rounds=1, sweep_rounds=1)
    report = bench.run(settings, log=lambda *_: None)
    assert calls == [("memory", 1), ("memory", 2), ("speed", 1), ("speed", 2)]
    for rows in (report["main"]["2"], report["sweep"]["1"]):
        assert all(r["saved_bytes"] > 0 and len(r["train_speed_ratio_per_round"]) == 1 for r in rows.values())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator settings are glibc's")
def test_timing_phase_reuses_large_blocks_and_memory_phase_unmaps_them() -> None:
    """A block above glibc's 32 MB mmap limit (the logits) is mapped afresh on every allocation by default,
    and its first touch faults; the timing phase keeps it in the heap for reuse, the memory phase unmaps
    it on free so that a step's RSS shows it. In a fresh process: the settings are process-wide."""
    code = f"""
import resource, sys, torch
sys.path.insert(0, {str(BENCHMARKS)!r})
from bench import _malloc_returns_memory

def faults_of_later_blocks():  # the third and fourth of four: the heap's layout has settled
    for i in range(4):
        if i == 2:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.empty(48 * 2**20 // 4)
        x.fill_(1.0)
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

_malloc_returns_memory(True)
memory = faults_of_later_blocks()
_malloc_returns_memory(False)
timing = faults_of_later_blocks()
print(memory, timing)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    memory, timing = map(int, out.split())
    pages = 48 * 2**20 // resource.getpagesize()
    assert memory > pages, (memory, pages)  # mapped anew each time: every page faults on first touch
    assert timing < pages // 20, (timing, pages)  # reused from the heap


def test_routing_time_script_measures_each_setting() -> None:
    """benchmarks/routing_time.py (the low-noise measure of a routing change) on a tiny model."""
    script = _script("routing_time")
    report = script.main(["--quick", "--layers", "6", "--knob", "lookahead", "--values", "0", "2", "--rounds", "1"])
    assert set(report) == {0, 2}
    for row in report.values():
        assert row["min_ms"] > 0
        assert {"_BankRoute", "_BankRouteBackward", "_Emit", "_EmitBackward"} <= set(row["per_function_ms"])


def test_routing_ops_script_splits_the_step_by_op() -> None:
    """benchmarks/routing_ops.py on a tiny model: the bank's products are among the ops only the patched model
    runs, and the per-op rows add up to routing's own total."""
    report = _script("routing_ops").main(["--quick", "--layers", "4", "--mode", "delta", "--rounds", "1"])
    assert report["op_ms"]["delta"] > report["op_ms"]["baseline"] > 0
    assert "aten.bmm.default" in report["by_op"]  # the bank's products
    assert not any("attention" in op for op in report["by_op"])  # the model's own ops, same shapes: shared
    assert sum(row["ms"] for row in report["by_op"].values()) == pytest.approx(report["routing_ops_ms"])


def test_bank_products_script_times_the_banks_reads(capsys: pytest.CaptureFixture) -> None:
    """benchmarks/bank_products.py: its products are the bank's reads (the ways of writing one agree), and it
    prints one row per product and source count."""
    import torch

    script = _script("bank_products")
    U = torch.randn(16, 9, 8)[:, :5]
    prods = {name: fn() for name, fn in script.products(U, K=3).items()}
    one = prods["mixture, 1 point: bmm(α, U)"]
    torch.testing.assert_close(prods["mixture, 1 point, as (α·U).sum"], one.squeeze(1), rtol=1e-5, atol=1e-5)
    assert prods["dα, 3 points: bmm(G, Uᵀ)"].shape == (16, 3, 5)
    assert torch.equal(prods["copy of U (reads and writes it)"], U)
    torch.testing.assert_close(prods["read of U (sum)"], U.sum())
    for cold in ([], ["--cold", "1"]):  # cold: a 1 MB sweep before each call
        script.main(["--device", "cpu", "--tokens", "16", "--dim", "8", "--slots", "9", "--n", "2", "5", "--reps", "1", *cold])
        out = capsys.readouterr().out
        rows = [line for line in out.splitlines() if line.startswith("| 2 |") or line.startswith("| 5 |")]
        assert len(rows) == 2 * len(prods) and all(float(r.split("|")[-3]) > 0 for r in rows)  # ms
        assert ("cold caches" in out) == bool(cold)


@pytest.mark.slow
def test_compiled_decode_script_compares_each_kind_with_its_baseline() -> None:
    report = _script("compiled_decode").main(["--device", "cpu", "--quick", "--layers", "2", "--rounds", "1",
                                              "--tokens", "3"])
    assert set(report) == {"baseline eager", "baseline", "delta_block eager", "delta_block"}
    assert report["baseline"]["ratio"] == report["baseline eager"]["ratio"] == 1.0
    assert all(r["ms_per_step"] > 0 for r in report.values())


def test_num_blocks_fallback() -> None:
    assert bench.valid_num_blocks(12, 4) == 4
    assert bench.valid_num_blocks(6, 4) == 3
    assert bench.valid_num_blocks(2, 4) == 2


@pytest.mark.gpu
def test_quick_benchmark_on_gpu_bf16(tmp_path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    report = bench.main(["--quick", "--layers", "2", "--sweep", "--device", "cuda", "--precision", "bf16-mixed",
                         "--out", str(tmp_path), "--name", "gpu"])
    rows = report["main"]["2"]
    assert all(r["peak_bytes"] > 0 and r["train_tokens_per_s"] > 0 for r in rows.values())
