"""Checkpoint conversion: Hugging Face -> LitGPT (and, below, LitGPT -> DAR).

`convert_hf` is a thin, safer front end to LitGPT's own converter
(`litgpt.scripts.convert_hf_checkpoint.convert_hf_checkpoint`), which does all the weight
mapping. What it adds: an output dir separate from the (often read-only or shared) HF
download, no silent overwrites, one-line errors that say how to fix the call, and
support for custom-size models (e.g. tiny test models) through an explicit LitGPT config.
A directory written by `lit-dar export hf` converts back to the lit-dar checkpoint it came
from (routing weights and ``dar_config.yaml`` included).
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from litgpt.config import Config, name_to_config
from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint

from lit_dar.config import DAR_CONFIG_FILE, DARConfig
from lit_dar.export import add_routing, exported_dar_config, split_routing
from lit_dar.checkpoint import load_checkpoint, save_checkpoint
from lit_dar.patch import build_model

# Files LitGPT's `copy_config_files` carries into a checkpoint dir (model_config.yaml is written here).
_CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_OUTPUTS = ("lit_model.pth", "model_config.yaml")
# config.json key -> LitGPT Config field; checked before converting so a size mismatch fails fast.
_HF_SIZE_KEYS = {
    "num_hidden_layers": "n_layer",
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "num_key_value_heads": "n_query_groups",
    "head_dim": "head_size",
    "vocab_size": "padded_vocab_size",
}


def derive_config(base: str, **overrides: Any) -> Config:
    """A named LitGPT config with some fields replaced, e.g. a tiny model of a known architecture.

    Like ``Config.from_name(base, **overrides)`` (derived fields such as ``head_size`` follow the
    overrides), but ``name`` can be overridden too, which ``from_name`` cannot do because its
    first parameter is called ``name``. Keep the family prefix (``"Qwen3-tiny"``): LitGPT's
    converter picks the weight mapping from it.
    """
    name = overrides.pop("name", None)
    config = Config.from_name(base, **overrides)
    return config if name is None else replace(config, name=name)


def _weight_files(checkpoint_dir: Path) -> list[Path]:
    """The files LitGPT's converter will read: shard indexes plus .bin/.safetensors weights."""
    files = [p for p in checkpoint_dir.iterdir() if p.suffix in (".bin", ".safetensors") and p.name != "training_args.bin"]
    indexes = [checkpoint_dir / n for n in ("pytorch_model.bin.index.json", "model.safetensors.index.json")]
    return sorted(files) + [p for p in indexes if p.is_file()]


def _resolve_config(model_name: str | None, model_config: Config | Path | str | None, checkpoint_dir: Path) -> tuple[str, Config]:
    """Pick the converter key (``model_name``) and the LitGPT config the converter must use."""
    if model_config is not None:
        config = model_config if isinstance(model_config, Config) else Config.from_file(model_config)
        return model_name or config.name, config
    name = model_name or checkpoint_dir.name
    try:
        config = Config.from_name(name)
    except ValueError:
        close = difflib.get_close_matches(name, list(name_to_config), n=3, cutoff=0.5)
        hint = f" (close: {', '.join(map(repr, close))})" if close else ""
        origin = "model_name" if model_name else "the checkpoint dir name"
        raise ValueError(
            f"Unknown LitGPT model name {name!r} from {origin}{hint}; pass model_name=<a litgpt.config name>,"
            " or model_config=<model_config.yaml or Config> for a custom-size model."
        ) from None
    # `Config.from_name` also accepts "org/name", but the converter picks its weight mapping
    # from the name's prefix (e.g. "qwen3"), so always hand it the canonical config name.
    return config.name, config


def _check_against_hf_config(config: Config, checkpoint_dir: Path) -> None:
    path = checkpoint_dir / "config.json"
    if not path.is_file():
        return
    hf = json.loads(path.read_text(encoding="utf-8"))
    hf = hf.get("text_config") or hf  # multimodal checkpoints nest the language model's config
    mismatches = [
        f"{field}={getattr(config, field)} vs {key}={hf[key]}"
        for key, field in _HF_SIZE_KEYS.items()
        if hf.get(key) is not None and getattr(config, field) != hf[key]
    ]
    if mismatches:
        raise ValueError(
            f"LitGPT config {config.name!r} does not match {str(path)!r} ({'; '.join(mismatches)});"
            " pass model_config=<a config with these sizes>, e.g. derive_config(base, name=..., n_layer=...)."
        )


@contextmanager
def _registered(name: str, config: Config) -> Iterator[None]:
    """Make ``Config.from_name(name)`` return ``config`` for the duration of the block.

    LitGPT's converter always looks its config up by name; registering the custom config under
    the converter key keeps its weight mapping and `save_config` in charge, unmodified.
    """
    registry = name_to_config
    missing = object()
    previous = registry.get(name, missing)
    registry[name] = asdict(config)
    try:
        yield
    finally:
        if previous is missing:
            del registry[name]
        else:
            registry[name] = previous


def convert_hf(
    checkpoint_dir: Path | str,
    out_dir: Path | str | None = None,
    model_name: str | None = None,
    dtype: str | None = None,
    model_config: Config | Path | str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a Hugging Face checkpoint dir into a LitGPT checkpoint dir and return the latter.

    Args:
        checkpoint_dir: HF checkpoint: ``config.json``, ``*.safetensors``/``*.bin`` (optionally
            sharded with an index), tokenizer files.
        out_dir: Where ``lit_model.pth``, ``model_config.yaml`` and the config/tokenizer files go.
            ``None`` converts in place, like LitGPT.
        model_name: LitGPT config name (e.g. ``"Qwen3-0.6B"``). It also selects the weight mapping
            by its prefix. Defaults to ``model_config.name``, else to the checkpoint dir's name,
            which is how LitGPT finds it.
        dtype: Convert the weights to this torch dtype name (e.g. ``"bfloat16"``); default keeps them.
        model_config: A LitGPT config (object or ``model_config.yaml`` path) for models whose sizes
            match no named config, e.g. ``derive_config("Qwen3-0.6B", name="Qwen3-tiny", n_layer=2, ...)``.
            Its name, or ``model_name``, must keep the family prefix that picks the weight mapping.
        overwrite: Replace output files that already exist in ``out_dir``.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"HF checkpoint dir {str(checkpoint_dir)!r} does not exist; download it first or fix the path.")
    weights = _weight_files(checkpoint_dir)
    if not weights:
        raise FileNotFoundError(
            f"No *.safetensors or *.bin weights in {str(checkpoint_dir)!r}; point checkpoint_dir at the dir with the HF weights."
        )
    if dtype is not None and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use a torch dtype name such as 'float32' or 'bfloat16'.")
    dar = exported_dar_config(checkpoint_dir)  # a directory `lit-dar export hf` wrote: back to lit-dar
    if dar is not None and model_config is None and model_name is None:
        model_config = checkpoint_dir / "model_config.yaml"
        if not model_config.is_file():
            raise FileNotFoundError(
                f"{str(checkpoint_dir)!r} is an exported DAR model without its model_config.yaml: copy it back from "
                "the lit-dar checkpoint, or pass model_config=."
            )
    name, config = _resolve_config(model_name, model_config, checkpoint_dir)
    _check_against_hf_config(config, checkpoint_dir)

    out_dir = checkpoint_dir if out_dir is None else Path(out_dir)
    in_place = out_dir.resolve() == checkpoint_dir.resolve()
    produced = [*_OUTPUTS, DAR_CONFIG_FILE] if dar is not None else list(_OUTPUTS)
    outputs = produced if in_place else [*produced, *(f for f in _CONFIG_FILES if (checkpoint_dir / f).is_file())]
    existing = [f for f in outputs if (out_dir / f).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{str(out_dir)!r} already has {', '.join(existing)}; pass overwrite=True or another out_dir.")

    out_dir.mkdir(parents=True, exist_ok=True)
    # LitGPT converts in place; run it in a staging dir that links to the weights, then move the
    # results over, so a failed conversion leaves out_dir untouched.
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir))
    try:
        if dar is not None:  # LitGPT's converter gets the base weights; the routing tensors are added after it
            routing = split_routing(weights, staging / "model.safetensors")
        else:
            for src in weights:
                try:
                    os.symlink(src.resolve(), staging / src.name)
                except OSError:
                    shutil.copy2(src, staging / src.name)
        with _registered(name, config):
            convert_hf_checkpoint(staging, model_name=name, dtype=dtype)
        if dar is not None:
            add_routing(staging, {k: v if dtype is None else v.to(getattr(torch, dtype)) for k, v in routing.items()},
                        dar)
        for f in produced:
            os.replace(staging / f, out_dir / f)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not in_place:
        for f in outputs[len(produced) :]:
            shutil.copy2(checkpoint_dir / f, out_dir / f)
    return out_dir


# -----------------------------------------------------------------------------------------
# LitGPT checkpoint -> lit-dar checkpoint
# -----------------------------------------------------------------------------------------


def convert_to_dar(
    checkpoint_dir: Path,
    out_dir: Path,
    dar: DARConfig = DARConfig(mode="delta_block", num_blocks=4, gate="scalar"),
    overwrite: bool = False,
) -> Path:
    """Convert a LitGPT checkpoint dir to a lit-dar one: the same weights plus routing at its init.

    With ``gate: scalar`` the converted model computes exactly what the original computes, so it can be
    fine-tuned from there. Tokenizer and other files are copied; the source dir is not modified.

    Arguments:
        checkpoint_dir: The LitGPT checkpoint dir (``lit_model.pth``, ``model_config.yaml``, tokenizer files).
        out_dir: Where to write the lit-dar checkpoint dir.
        dar: The routing to add.
        overwrite: Allow writing into a non-empty ``out_dir``.
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    for name in ("lit_model.pth", "model_config.yaml"):
        if not (checkpoint_dir / name).is_file():
            raise FileNotFoundError(
                f"{str(checkpoint_dir)!r} has no {name}: pass a LitGPT checkpoint dir (convert an HF one with "
                "`lit-dar convert hf`)."
            )
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"out_dir {str(out_dir)!r} is not empty: pass overwrite=True or choose another out_dir.")
    model = build_model(Config.from_file(checkpoint_dir / "model_config.yaml"), dar, device="meta").to_empty(device="cpu")
    model.reset_parameters()
    model.dar.reset_parameters()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the routing keys are expected to be missing from a LitGPT checkpoint
        missing = load_checkpoint(model, checkpoint_dir)
    save_checkpoint(model, out_dir)
    for item in checkpoint_dir.iterdir():  # tokenizer, generation config, …
        if item.is_file() and item.name not in ("lit_model.pth", "model_config.yaml") and not (out_dir / item.name).exists():
            shutil.copy2(item, out_dir / item.name)
    print(f"Wrote {out_dir}: {dar.mode}, {len(missing)} routing tensors at their init.")
    return out_dir
