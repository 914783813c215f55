"""`DARConfig`: what a user chooses, validated on construction and round-tripping through YAML."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from lit_dar.routing import ADDITIVE_MODES, MODES

DAR_CONFIG_FILE = "dar_config.yaml"
GATES = ("none", "scalar")


@dataclass
class DARConfig:
    """Delta Attention Residuals settings.

    Args:
        mode: ``delta`` (per-sublayer Delta AttnRes), ``delta_block`` (Delta over block deltas),
            ``attnres_full`` / ``attnres_block`` (Kimi's replacement-routing baselines).
        num_blocks: number of contiguous blocks of ⌈L/N⌉ layers for the block modes (ignored otherwise).
        gate: ``none`` (g = 1, training from scratch) or ``scalar`` (a learned scalar per sublayer, zero at
            init: a freshly patched model computes exactly the unpatched one — use it to convert a
            pretrained checkpoint). Only additive modes can be gated.
        null_source: add a learned value vector (zero at init) every routed point may attend to.
        eps: epsilon of the key RMSNorm.
    """

    mode: Literal["delta", "delta_block", "attnres_full", "attnres_block"] = "delta_block"
    num_blocks: int = 4
    gate: Literal["none", "scalar"] = "none"
    null_source: bool = False
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"DARConfig.mode={self.mode!r} is unknown: choose one of {sorted(MODES)}.")
        if isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int) or self.num_blocks < 1:
            raise ValueError(f"DARConfig.num_blocks={self.num_blocks!r} must be an integer ≥ 1 (and ≤ n_layer).")
        if self.gate not in GATES:
            raise ValueError(f"DARConfig.gate={self.gate!r} is unknown: choose one of {list(GATES)}.")
        if self.gate != "none" and self.mode not in ADDITIVE_MODES:
            raise ValueError(
                f"DARConfig.gate={self.gate!r} cannot be used with mode={self.mode!r}: replacement routing (h = r) "
                f"has no zero-gate identity. Use gate='none', or an additive mode {list(ADDITIVE_MODES)} to convert "
                "a pretrained checkpoint."
            )
        if not isinstance(self.null_source, bool):
            raise TypeError(f"DARConfig.null_source must be true or false, got {self.null_source!r}.")
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or not self.eps > 0:
            raise ValueError(f"DARConfig.eps={self.eps!r} must be a positive number.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DARConfig:
        if not isinstance(data, dict):
            raise TypeError(f"A DAR config must be a mapping of fields, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown DAR config key(s) {unknown}: allowed keys are {sorted(known)}.")
        return cls(**data)

    def save(self, checkpoint_dir: str | Path) -> Path:
        """Write ``dar_config.yaml`` beside LitGPT's ``model_config.yaml`` (which stays untouched)."""
        path = Path(checkpoint_dir) / DAR_CONFIG_FILE
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    @classmethod
    def from_file(cls, path: str | Path) -> DARConfig:
        """Read a ``dar_config.yaml`` file, or the one inside a checkpoint directory."""
        path = Path(path)
        if path.is_dir():
            path = path / DAR_CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"No DAR config at {str(path)!r}: is this a lit-dar checkpoint directory?")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{str(path)!r} is not valid YAML: {err}") from None
        return cls.from_dict(data)
