"""`lit-dar export hf`: a lit-dar model as a transformers model (and back), checked against lit-dar itself."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

# huggingface_hub, datasets and transformers read these when first imported: set them before any test runs.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="lit-dar-hf-modules-"))

import pytest
import torch
from conftest import tiny_gpt
from test_evaluate import _write_tasks
from litgpt.generate.base import batched_generate_fn

from lit_dar import DARConfig, patch_model
from lit_dar import cli
from lit_dar.checkpoint import save_checkpoint
from lit_dar.export import export_hf

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {  # LitGPT config -> the DAR class transformers loads
    "Llama-3.2-1B": "DarLlamaForCausalLM",  # Llama 3 RoPE adjustments
    "Qwen2.5-0.5B": "DarQwen2ForCausalLM",  # qkv biases
    "Qwen3-0.6B": "DarQwen3ForCausalLM",  # q/k norms
    "Mistral-7B-v0.1": "DarMistralForCausalLM",  # sliding window
}
# (mode, gate, null_source): every mode, both gates where a mode has them, the null source on and off
VARIANTS = [
    ("delta", "none", False),
    ("delta", "scalar", True),
    ("delta_block", "none", True),
    ("delta_block", "scalar", False),
    ("attnres_full", "none", False),
    ("attnres_block", "none", True),
]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail loudly if anything tries to open a network connection."""
    real_connect = socket.socket.connect

    def refuse(self, address, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise RuntimeError(f"network access attempted: {address}")
        return real_connect(self, address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", refuse)


def dar_checkpoint(out: Path, name: str, mode: str, gate: str = "none", null_source: bool = False, seed: int = 0,
                   **overrides) -> tuple[Path, torch.nn.Module]:
    """A tiny lit-dar checkpoint of ``name`` with random (non-zero) routing parameters, and its model."""
    model = tiny_gpt(name, seed=seed, n_layer=4, **overrides)
    patch_model(model, DARConfig(mode=mode, num_blocks=2, gate=gate, null_source=null_source))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param_name, p in model.dar.named_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator) + (1.0 if param_name == "key_gain" else 0.0))
    save_checkpoint(model, out)
    return out, model.eval()


def load_hf(path: Path, **kwargs) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kwargs).eval()


def _error_line(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.run(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lit-dar: error: "), err
    return err[0]


# --------------------------------------------------------------------------------------------------
# Same function: logits and generation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS, ids=["-".join(map(str, v)) for v in VARIANTS])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_lit_dar_fp32(tmp_path, name, variant):
    mode, gate, null_source = variant
    checkpoint, model = dar_checkpoint(tmp_path / "lit", name, mode, gate, null_source)
    hf = load_hf(export_hf(checkpoint, tmp_path / "hf"))

    assert type(hf).__name__ == FAMILIES[name]
    assert hf.config.dar_config == DARConfig(mode=mode, num_blocks=2, gate=gate, null_source=null_source).to_dict()
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
        model.dar.reset_parameters()  # the routing matters: at its init the logits are others
        at_init = model(idx)
    assert (ours - at_init).abs().max() > 1e-3
    assert (ours - theirs).abs().max().item() < 1e-5


GENERATE_CASES = [  # every family and every mode once
    ("Llama-3.2-1B", ("delta_block", "scalar", True)),
    ("Qwen2.5-0.5B", ("attnres_full", "none", False)),
    ("Qwen3-0.6B", ("delta", "none", True)),
    ("Mistral-7B-v0.1", ("attnres_block", "none", False)),
]


@pytest.mark.parametrize(("name", "variant"), GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_greedy_generation_with_kv_cache_matches_lit_dar(tmp_path, name, variant):
    checkpoint, model = dar_checkpoint(tmp_path / "lit", name, *variant, seed=2)
    hf = load_hf(export_hf(checkpoint, tmp_path / "hf"))
    prompts = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(4))
    new = 16

    with torch.no_grad():
        model.set_kv_cache(batch_size=2)
        steps = batched_generate_fn(model, prompts, prompts.shape[1] + new, sample_args={"temperature": 0.0},
                                    include_prompt=False, include_eos=True)
        ours = torch.stack([torch.cat(step) for step in steps], dim=1)
        model.clear_kv_cache()
        theirs = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=0)[:, prompts.shape[1]:]

    assert ours.shape == theirs.shape == (2, new)
    assert torch.equal(ours, theirs)
    assert len(set(theirs[0].tolist())) > 1  # not a degenerate repetition of one token


def _bf16_difference(tmp_path: Path, mode: str, gate: str, null_source: bool, routed: bool) -> float:
    """Max |logit difference| of the export in bf16 against lit-dar under bf16 autocast."""
    checkpoint, model = dar_checkpoint(tmp_path / mode / "lit", "Qwen3-0.6B", mode, gate, null_source)
    if not routed:  # a zero gate at init: exactly the unrouted model, in lit-dar and in the export
        model.dar.reset_parameters()
        save_checkpoint(model, checkpoint)
    hf = load_hf(export_hf(checkpoint, tmp_path / mode / "hf"), dtype=torch.bfloat16)
    assert hf.model.dar.query.dtype == torch.bfloat16
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = model(idx)
        theirs = hf(idx).logits
    return (theirs.float() - ours.float()).abs().max().item()


def test_bf16_logits_match_lit_dar_autocast(tmp_path):
    """bf16 costs the routed model no more than it costs the unrouted one.

    LitGPT's own HF comparisons in half precision use ``assert_close``'s default tolerance and are marked as
    expected to fail (the two sides round differently); the plain model misses that tolerance here too, so the
    routed model's difference is measured against the plain model's, the same comparison on the same weights.
    """
    plain = _bf16_difference(tmp_path, "delta", "scalar", False, routed=False)
    for mode in ("delta_block", "attnres_block"):
        routed = _bf16_difference(tmp_path, mode, "none", True, routed=True)
        assert routed <= 2 * plain and routed < 0.1, (mode, routed, plain)


# --------------------------------------------------------------------------------------------------
# The directory: offline loading, self-contained code, save_pretrained, the CLI
# --------------------------------------------------------------------------------------------------


def test_cli_export_loads_offline_without_lit_dar(tmp_path):
    checkpoint, model = dar_checkpoint(tmp_path / "lit", "Qwen3-0.6B", "delta_block", "scalar", True)
    out = tmp_path / "hf"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "lit_dar", "export", "hf", "--checkpoint_dir", str(checkpoint),
                           "--out_dir", str(out)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    files = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "model.safetensors", "hf_modeling_dar.py"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "dar_qwen3" and config["dar_config"]["mode"] == "delta_block"
    assert config["auto_map"] == {"AutoConfig": "hf_modeling_dar.DarQwen3Config",
                                  "AutoModelForCausalLM": "hf_modeling_dar.DarQwen3ForCausalLM"}
    source = (out / "hf_modeling_dar.py").read_text()
    assert source == (ROOT / "lit_dar" / "hf_modeling_dar.py").read_text()
    assert "lit_dar" not in "".join(line for line in source.splitlines() if line.startswith(("import", "from")))

    # a fresh process, offline, that cannot import lit-dar at all
    code = (
        "import sys, torch\n"
        "sys.modules['lit_dar'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
        "idx = torch.arange(12).view(2, 6)\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(idx).logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**clean_env, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        expected = model(torch.arange(12).view(2, 6))
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=1e-5)


def test_save_pretrained_and_reload(tmp_path):
    checkpoint, _ = dar_checkpoint(tmp_path / "lit", "Llama-3.2-1B", "attnres_block", null_source=True)
    hf = load_hf(export_hf(checkpoint, tmp_path / "hf"))
    hf.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "hf_modeling_dar.py").is_file()
    again = load_hf(tmp_path / "copy")
    idx = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(hf(idx).logits, again(idx).logits)
    for (n, p), (m, q) in zip(hf.state_dict().items(), again.state_dict().items()):
        assert n == m and torch.equal(p, q)


# --------------------------------------------------------------------------------------------------
# Back to lit-dar
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "variant"), [("Qwen2.5-0.5B", ("delta", "scalar", True)),
                                              ("Llama-3.2-1B", ("attnres_block", "none", False))])
def test_round_trip_is_bit_identical(tmp_path, name, variant):
    checkpoint, _ = dar_checkpoint(tmp_path / "lit", name, *variant)
    hf_dir = export_hf(checkpoint, tmp_path / "hf")
    cli.run(["convert", "hf", "--checkpoint_dir", str(hf_dir), "--out_dir", str(tmp_path / "back")])

    back = tmp_path / "back"
    for f in ("model_config.yaml", "dar_config.yaml"):
        assert (back / f).read_bytes() == (checkpoint / f).read_bytes(), f
    before = torch.load(checkpoint / "lit_model.pth", weights_only=True)
    after = torch.load(back / "lit_model.pth", weights_only=True)
    assert set(before) == set(after)
    for key, value in before.items():
        if torch.is_tensor(value):
            assert value.dtype == after[key].dtype and torch.equal(value, after[key]), key
        else:
            assert value == after[key], key
    from lit_dar.checkpoint import load_model

    load_model(back)  # and lit-dar loads it


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_bad_input(capsys, tmp_path):
    out = tmp_path / "out" / "hf"
    run = ["export", "hf", "--out_dir", str(out), "--checkpoint_dir"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no lit_model.pth: pass a LitGPT checkpoint dir" in _error_line(capsys, [*run, str(empty)])

    plain = tmp_path / "plain"
    model = tiny_gpt("Qwen3-0.6B", n_layer=2)
    save_checkpoint(model, plain)
    assert "has no dar_config.yaml: pass a lit-dar checkpoint" in _error_line(capsys, [*run, str(plain)])

    pythia, _ = dar_checkpoint(tmp_path / "pythia", "pythia-14m", "delta")
    line = _error_line(capsys, [*run, str(pythia)])
    assert "Cannot export 'pythia-14m' to transformers: supported families are Llama 2/3" in line

    ddl = tmp_path / "ddl"
    save_checkpoint(patch_model(tiny_gpt("Qwen3-0.6B", n_layer=2), DARConfig(mode="ddl")), ddl)
    assert "mode='ddl' cannot be exported to transformers" in _error_line(capsys, [*run, str(ddl)])

    good, _ = dar_checkpoint(tmp_path / "good", "Qwen3-0.6B", "delta")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in good.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "lit_model.pth").write_bytes((good / "lit_model.pth").read_bytes()[:1000])
    line = _error_line(capsys, [*run, str(corrupt)])
    assert "lit_model.pth' is not a readable PyTorch checkpoint" in line and "write it again" in line
    assert not out.parent.exists()  # nothing written for any of them

    # an existing non-empty out_dir is kept unless --overwrite true
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("keep me")
    assert "is not empty: pass overwrite=True" in _error_line(capsys, [*run, str(good)])
    assert os.listdir(out) == ["keep.txt"]
    cli.run([*run, str(good), "--overwrite", "true"])
    assert "keep.txt" not in os.listdir(out) and (out / "model.safetensors").is_file()
    assert not [p for p in out.parent.iterdir() if ".export-" in p.name]


# --------------------------------------------------------------------------------------------------
# lm-eval's hf backend scores the export as `lit-dar evaluate` scores the checkpoint
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lm_eval_hf_backend_matches_lit_dar_evaluate(tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lit_dar.data import load_corpus, train_tokenizer

    checkpoint, _ = dar_checkpoint(tmp_path / "lit", "Qwen3-0.6B", "delta_block", "scalar", True, vocab_size=300,
                                   padded_vocab_size=320, block_size=128)
    train_tokenizer((d.text for d in load_corpus(100_000)), 300, checkpoint)
    hf_dir = export_hf(checkpoint, tmp_path / "hf")
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(hf_dir))
    tasks = _write_tasks(tmp_path)

    ours = cli.run(["evaluate", "--checkpoint_dir", str(checkpoint), "--tasks", "[tiny_mc, tiny_ppl]",
                    "--include_path", str(tasks), "--batch_size", "4"])
    theirs = simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},trust_remote_code=True,dtype=float32", tasks=["tiny_mc", "tiny_ppl"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False), batch_size=4, device="cpu",
        bootstrap_iters=0,
    )["results"]
    assert theirs["tiny_mc"]["acc,none"] == ours["tiny_mc"]["acc,none"]
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert theirs["tiny_ppl"][metric] == pytest.approx(ours["tiny_ppl"][metric], rel=1e-4), metric
