import os
from pathlib import Path

import pytest
import torch
from litgpt import GPT
from litgpt.config import Config, name_to_config
from litgpt.tokenizer import Tokenizer
from litgpt.utils import save_config

from lit_dar.convert import convert_hf, derive_config
from lit_dar.data import load_corpus, train_tokenizer

transformers = pytest.importorskip("transformers")

VOCAB = 384


def tiny_litgpt_config() -> Config:
    """Qwen3-0.6B's architecture at test size; the name keeps the `Qwen3` prefix that picks the mapping."""
    return derive_config(
        "Qwen3-0.6B",
        name="Qwen3-tiny",
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_query_groups=2,
        head_size=16,
        intermediate_size=128,
        vocab_size=VOCAB,
        padded_vocab_size=VOCAB,
        block_size=128,
    )


def make_hf_qwen3(out: Path) -> Path:
    """A random tiny Qwen3 saved by transformers into ``out``, plus a tokenizer trained here (nothing downloaded)."""
    lit = tiny_litgpt_config()
    config = transformers.Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=lit.n_embd,
        intermediate_size=lit.intermediate_size,
        num_hidden_layers=lit.n_layer,
        num_attention_heads=lit.n_head,
        num_key_value_heads=lit.n_query_groups,
        head_dim=lit.head_size,
        max_position_embeddings=lit.block_size,
        rms_norm_eps=lit.norm_eps,
        rope_theta=float(lit.rope_base),  # legacy kwargs: transformers 5 still maps them to rope_parameters
        tie_word_embeddings=True,  # as Qwen3-0.6B
    )
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config)
    with torch.no_grad():  # q/k norm weights start at 1; randomize them so their mapping is tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out, safe_serialization=True)
    train_tokenizer((d.text for d in load_corpus(100_000)), VOCAB, out)
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return make_hf_qwen3(tmp_path_factory.mktemp("hf") / "Qwen3-tiny")


@pytest.fixture(scope="module")
def hf_logits(hf_dir) -> tuple[torch.Tensor, torch.Tensor]:
    model = transformers.Qwen3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    idx = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return idx, model(idx).logits


def _litgpt_logits(checkpoint_dir: Path, idx: torch.Tensor) -> torch.Tensor:
    config = Config.from_file(checkpoint_dir / "model_config.yaml")
    model = GPT(config).eval()
    model.load_state_dict(torch.load(checkpoint_dir / "lit_model.pth", weights_only=True))
    with torch.no_grad():
        return model(idx)


def test_convert_tiny_qwen3_matches_hf_logits(hf_dir, hf_logits, tmp_path):
    yaml_path = tmp_path / "tiny.yaml"
    save_config(tiny_litgpt_config(), tmp_path)
    (tmp_path / "model_config.yaml").rename(yaml_path)
    before = sorted(os.listdir(hf_dir))

    out = convert_hf(hf_dir, tmp_path / "lit", model_config=yaml_path)

    assert out == tmp_path / "lit"
    assert sorted(os.listdir(hf_dir)) == before  # the HF dir is left alone
    assert {"lit_model.pth", "model_config.yaml", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(
        os.listdir(out)
    )
    assert not [p for p in os.listdir(out) if p.startswith(".convert-")]
    assert "Qwen3-tiny" not in name_to_config  # the temporary registration is undone
    assert Config.from_file(out / "model_config.yaml").name == "Qwen3-tiny"
    idx, expected = hf_logits
    torch.testing.assert_close(_litgpt_logits(out, idx), expected, atol=1e-5, rtol=1e-5)
    tok = Tokenizer(out)
    assert tok.decode(tok.encode("import os\n")) == "import os\n"


def test_convert_in_place_with_config_object_and_dtype(hf_dir, hf_logits, tmp_path):
    # copy the HF files into a dir with an unrelated name: the config object decides, not the name
    src = tmp_path / "whatever"
    src.mkdir()
    for f in os.listdir(hf_dir):
        (src / f).write_bytes((hf_dir / f).read_bytes())
    assert convert_hf(src, model_config=tiny_litgpt_config()) == src
    idx, expected = hf_logits
    torch.testing.assert_close(_litgpt_logits(src, idx), expected, atol=1e-5, rtol=1e-5)

    with pytest.raises(FileExistsError, match="lit_model.pth, model_config.yaml; pass overwrite=True"):
        convert_hf(src, model_config=tiny_litgpt_config())
    convert_hf(src, model_config=tiny_litgpt_config(), dtype="bfloat16", overwrite=True)
    state = torch.load(src / "lit_model.pth", weights_only=True)
    assert state["transformer.wte.weight"].dtype == torch.bfloat16


def test_convert_errors(hf_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; download it first"):
        convert_hf(tmp_path / "missing")

    empty = tmp_path / "Qwen3-0.6B"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"No \*.safetensors or \*.bin weights"):
        convert_hf(empty)

    # the name comes from the dir name (LitGPT's rule) unless model_name is given
    with pytest.raises(ValueError, match=r"Unknown LitGPT model name 'Qwen3-tiny' from the checkpoint dir name"):
        convert_hf(hf_dir, tmp_path / "a")
    with pytest.raises(ValueError, match=r"'Qwen3-0.6b' from model_name \(close: 'Qwen3-0.6B'"):
        convert_hf(hf_dir, tmp_path / "a", model_name="Qwen3-0.6b")
    # a known name whose sizes do not match config.json fails before converting anything
    with pytest.raises(ValueError, match="n_layer=28 vs num_hidden_layers=2"):
        convert_hf(hf_dir, tmp_path / "a", model_name="Qwen/Qwen3-0.6B")
    with pytest.raises(ValueError, match="Unknown dtype 'float48'"):
        convert_hf(hf_dir, tmp_path / "a", model_config=tiny_litgpt_config(), dtype="float48")
    assert not (tmp_path / "a").exists()

    # an existing out dir keeps its files unless overwrite=True
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("keep me")
    with pytest.raises(FileExistsError, match="already has tokenizer.json"):
        convert_hf(hf_dir, out, model_config=tiny_litgpt_config())
    assert os.listdir(out) == ["tokenizer.json"] and (out / "tokenizer.json").read_text() == "keep me"
    convert_hf(hf_dir, out, model_config=tiny_litgpt_config(), overwrite=True)
    assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()


def test_convert_named_config_from_dir_name(tmp_path):
    """The LitGPT way: no config given, the dir name is a LitGPT config name (here GPT-NeoX pythia-14m)."""
    lit = Config.from_name("pythia-14m")
    config = transformers.GPTNeoXConfig(
        vocab_size=lit.padded_vocab_size,
        hidden_size=lit.n_embd,
        num_hidden_layers=lit.n_layer,
        num_attention_heads=lit.n_head,
        intermediate_size=lit.intermediate_size,
        max_position_embeddings=lit.block_size,
        rotary_pct=lit.rotary_percentage,
        rotary_emb_base=lit.rope_base,
        layer_norm_eps=lit.norm_eps,
        use_parallel_residual=lit.parallel_residual,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config).eval()
    src = tmp_path / "EleutherAI" / "pythia-14m"
    model.save_pretrained(src, safe_serialization=True)

    out = convert_hf(src, tmp_path / "lit")
    assert Config.from_file(out / "model_config.yaml").name == "pythia-14m"
    idx = torch.randint(0, lit.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(idx).logits
    torch.testing.assert_close(_litgpt_logits(out, idx), expected, atol=1e-5, rtol=1e-5)
