"""A lit-dar model leaves lit-dar: export to a Hugging Face ``transformers`` model directory, and back.

``export_hf(checkpoint_dir, out_dir)`` writes a directory that
``AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)`` loads: the base model's HF config
plus ``dar_config`` and an ``auto_map``, the modeling file :mod:`lit_dar.hf_modeling_dar` (self-contained:
transformers' own model of the family with routed sublayer inputs), safetensors weights under the family's
HF names (LitGPT's own ``convert_lit_checkpoint`` mapping) plus ``model.dar.*``, the tokenizer files and a
generated ``generation_config.json``. ``model_config.yaml`` and ``dar_config.yaml`` travel along, so
``lit-dar convert hf`` turns the directory back into the same lit-dar checkpoint (:func:`split_routing`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import torch
from litgpt import Config, Tokenizer
from litgpt.scripts import convert_lit_checkpoint as lit_to_hf
from safetensors.torch import load_file, save_file
from torch import Tensor

from lit_dar.config import DAR_CONFIG_FILE, DARConfig
from lit_dar.checkpoint import CHECKPOINT_FILE, load_model
from lit_dar.patch import DAR_PREFIX, dar_filter
from lit_dar.routing import MODES

HF_PREFIX = f"model.{DAR_PREFIX}."  # the routing tensors' prefix in the exported weights
SUPPORTED = "Llama 2/3 (Llama-2-*, Llama-3*, CodeLlama-*), Qwen2.5/QwQ, Qwen3 (dense) and Mistral/Mathstral"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
# LitGPT config name prefixes (lower case) -> transformers family; the same prefixes pick LitGPT's weight mapping
_NAME_PREFIXES = (
    (("qwen3",), "qwen3"),
    (("qwen2.5", "qwq"), "qwen2"),
    (("mistral", "mathstral"), "mistral"),
    (("llama-2", "llama-3", "codellama"), "llama"),
)
_LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len")


def hf_family(config: Any) -> str:
    """The transformers family (``llama``, ``qwen2``, ``qwen3``, ``mistral``) a LitGPT config is exported as.

    Raises:
        ValueError: for a model outside these families, or with a feature the family's HF model lacks.
    """
    name = config.name.lower()
    family = next((f for prefixes, f in _NAME_PREFIXES if name.startswith(prefixes)), None)
    if family is None:
        raise ValueError(f"Cannot export {config.name!r} to transformers: supported families are {SUPPORTED}.")
    expected = {
        "mlp_class_name": "LLaMAMLP", "norm_class_name": "RMSNorm", "parallel_residual": False,
        "shared_attention_norm": False, "post_attention_norm": False, "post_mlp_norm": False, "norm_1": True,
        "norm_2": True, "rotary_percentage": 1.0, "rope_condense_ratio": 1, "rope_interleave": False,
        "scale_embeddings": False, "lm_head_bias": False, "bias": False, "n_expert": 0,
        "final_logit_softcapping": None, "attention_logit_softcapping": None, "attention_scores_scalar": None,
        "latent_attention": None, "rope_local_base_freq": None, "rope_indices": None,
        "attn_bias": family == "qwen2", "norm_qk": family == "qwen3", "norm_qk_type": "default",
    }
    if family != "mistral":
        expected["sliding_window_size"] = None
    wrong = [f"{k}={getattr(config, k, None)!r}" for k, v in expected.items() if getattr(config, k, None) != v]
    adjustments = config.rope_adjustments
    if adjustments is not None and (family != "llama" or sorted(adjustments) != sorted(_LLAMA3_ROPE)):
        wrong.append(f"rope_adjustments={adjustments!r}")
    if family == "mistral" and config.sliding_window_size is not None and any(
        i != 1 for i in (config.sliding_window_indices or [1])[: config.n_layer]
    ):
        wrong.append("sliding_window_indices (sliding windows on some layers only)")
    if wrong:
        raise ValueError(
            f"Cannot export {config.name!r} as transformers' {family}: {', '.join(wrong)} has no counterpart there "
            f"(supported: {SUPPORTED} with their standard structure)."
        )
    return family


def hf_config(config: Any, dar: DARConfig, bos_id: int | None = None, eos_id: int | None = None) -> Any:
    """The exported model's transformers config: the family's HF config built from the LitGPT config's fields,
    plus ``dar_config``.

    Embeddings and LM head stay untied (LitGPT keeps two tensors, which fine-tuning may have made differ).
    """
    from lit_dar.hf_modeling_dar import FAMILIES

    family = hf_family(config)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(config.rope_base)}
    if config.rope_adjustments is not None:
        adj = config.rope_adjustments
        rope.update(
            rope_type="llama3", factor=adj["factor"], low_freq_factor=adj["low_freq_factor"],
            high_freq_factor=adj["high_freq_factor"], original_max_position_embeddings=adj["original_max_seq_len"],
        )
    fields: dict[str, Any] = dict(
        vocab_size=config.padded_vocab_size, hidden_size=config.n_embd, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, num_key_value_heads=config.n_query_groups,
        head_dim=config.head_size, max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps,
        hidden_act="silu", rope_parameters=rope, tie_word_embeddings=False, bos_token_id=bos_id, eos_token_id=eos_id,
        dar_config=dar.to_dict(),
    )
    if family in ("llama", "qwen3"):
        fields.update(attention_bias=False)
    if family == "llama":
        fields.update(mlp_bias=False)
    if family == "mistral":
        fields.update(sliding_window=config.sliding_window_size)
    return FAMILIES[family][0](**fields)


def hf_state_dict(config: Any, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A lit-dar state dict under the exported model's names: LitGPT's own LitGPT → HF mapping for the base
    weights, ``dar.*`` → ``model.dar.*`` for the routing parameters."""
    family = hf_family(config)
    copy = {
        "llama": lit_to_hf.copy_weights_llama, "mistral": lit_to_hf.copy_weights_llama,
        "qwen2": lit_to_hf.copy_weights_qwen_2_5, "qwen3": lit_to_hf.copy_weights_qwen_3,
    }[family]
    base = {k: v for k, v in state_dict.items() if not dar_filter(k)}
    lit_to_hf.check_conversion_supported(base)
    out: dict[str, Tensor] = {}
    partial(copy, config)(out, base)
    for key, value in state_dict.items():
        if dar_filter(key) and torch.is_tensor(value):
            out[HF_PREFIX + key[len(DAR_PREFIX) + 1 :]] = value
    return {k: v.contiguous() for k, v in out.items()}


def export_hf(checkpoint_dir: Path | str, out_dir: Path | str, overwrite: bool = False) -> Path:
    """Export a lit-dar checkpoint dir as a transformers model dir (loads with ``trust_remote_code=True``).

    Args:
        checkpoint_dir: A lit-dar checkpoint dir: ``lit_model.pth``, ``model_config.yaml``, ``dar_config.yaml``,
            tokenizer files if any.
        out_dir: The transformers model dir to write. It is written beside itself first and renamed into place,
            so a failed export leaves nothing behind.
        overwrite: Replace an existing non-empty ``out_dir``.

    Raises:
        FileNotFoundError: ``checkpoint_dir`` is not a lit-dar checkpoint dir.
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is false.
        ValueError: an unsupported family or mode, or unreadable weights.
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    for name, hint in ((CHECKPOINT_FILE, "a LitGPT checkpoint"), ("model_config.yaml", "a LitGPT checkpoint"),
                       (DAR_CONFIG_FILE, "a lit-dar checkpoint (a plain LitGPT one exports with LitGPT's "
                                         "`litgpt convert_from_litgpt`)")):
        if not (checkpoint_dir / name).is_file():
            raise FileNotFoundError(f"{str(checkpoint_dir)!r} has no {name}: pass {hint} dir.")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"out_dir {str(out_dir)!r} is not empty: pass overwrite=True or choose another out_dir.")
    config = Config.from_file(checkpoint_dir / "model_config.yaml")
    dar = DARConfig.from_file(checkpoint_dir)
    if dar.mode not in MODES:
        raise ValueError(f"mode={dar.mode!r} cannot be exported to transformers: supported modes are {sorted(MODES)}.")
    hf_family(config)  # refuse an unsupported family before reading any weights
    model = load_model(checkpoint_dir)  # a truncated or corrupt file: one ValueError naming it
    bos_id, eos_id = _special_ids(checkpoint_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    try:
        _write(model, config, dar, bos_id, eos_id, staging)
        for name in (*TOKENIZER_FILES, "model_config.yaml", DAR_CONFIG_FILE):
            if (checkpoint_dir / name).is_file():
                shutil.copy2(checkpoint_dir / name, staging / name)
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"Wrote {out_dir}: transformers {hf_family(config)} with {dar.mode} routing (trust_remote_code=True).")
    return out_dir


def _write(model: Any, config: Any, dar: DARConfig, bos_id: int | None, eos_id: int | None, out: Path) -> None:
    """Build the transformers model around the converted weights (no copy) and ``save_pretrained`` it."""
    from lit_dar.hf_modeling_dar import FAMILIES

    hf = hf_config(config, dar, bos_id, eos_id)
    state_dict = hf_state_dict(config, model.state_dict())
    with torch.device("meta"):
        hf_model = FAMILIES[hf_family(config)][1](hf)
    hf_model.load_state_dict(state_dict, strict=True, assign=True)
    hf_model.config.dtype = model.transformer.wte.weight.dtype
    hf_model.save_pretrained(out)


def _special_ids(checkpoint_dir: Path) -> tuple[int | None, int | None]:
    """bos and eos ids as LitGPT's tokenizer reads them from the checkpoint's tokenizer files (none without)."""
    if not any((checkpoint_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        return None, None
    tokenizer = Tokenizer(checkpoint_dir)
    return tokenizer.bos_id, tokenizer.eos_id


# --------------------------------------------------------------------------------------------------
# Back: an exported directory -> lit-dar (used by `lit-dar convert hf`)
# --------------------------------------------------------------------------------------------------


def exported_dar_config(hf_dir: Path) -> DARConfig | None:
    """The DAR config of a directory ``export_hf`` wrote (``None`` for any other HF checkpoint)."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8")).get("dar_config")
    return None if data is None else DARConfig.from_dict(data)


def split_routing(weight_files: list[Path], base_file: Path) -> dict[str, Tensor]:
    """Write the base weights of an exported directory's safetensors to ``base_file`` (what LitGPT's HF
    converter reads) and return the routing tensors under their lit-dar names (``dar.*``)."""
    base, routing = {}, {}
    for path in weight_files:
        if path.suffix != ".safetensors":
            continue
        for key, value in load_file(path).items():
            if key.startswith(HF_PREFIX):
                routing[f"{DAR_PREFIX}.{key[len(HF_PREFIX):]}"] = value
            else:
                base[key] = value
    save_file(base, base_file, metadata={"format": "pt"})
    return routing


def add_routing(checkpoint_dir: Path, routing: dict[str, Tensor], dar: DARConfig) -> None:
    """Complete a converted LitGPT checkpoint with the routing tensors and ``dar_config.yaml``."""
    path = Path(checkpoint_dir) / CHECKPOINT_FILE
    state = torch.load(path, weights_only=True, map_location="cpu")
    state.update(routing)
    state[f"{DAR_PREFIX}._extra_state"] = {"config": dar.to_dict()}
    tmp = path.with_suffix(".pth.tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    dar.save(checkpoint_dir)
