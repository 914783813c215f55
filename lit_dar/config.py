"""`DARConfig`: what a user chooses, validated on construction and round-tripping through YAML."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from lit_dar.ddl import DDL_MODE, VALUE_DEFAULTS, VALUE_KINDS
from lit_dar.routing import ADDITIVE_MODES, MODES

DAR_CONFIG_FILE = "dar_config.yaml"
GATES = ("none", "scalar")
ALL_MODES = (*MODES, DDL_MODE)
# fields only mode="ddl" reads, with their defaults: other modes leave them at the default and out of to_dict()
DDL_FIELDS: dict[str, Any] = {"ddl_value": "constant", "ddl_value_init": None, "ddl_beta_init": 1.0}


@dataclass
class DARConfig:
    """Delta Attention Residuals settings.

    Args:
        mode: ``delta`` (per-sublayer Delta AttnRes), ``delta_block`` (Delta over block deltas),
            ``attnres_full`` / ``attnres_block`` (Kimi's replacement-routing baselines), or ``ddl``
            (Deep Delta Learning: each sublayer rewrites the stream along its output's direction).
        num_blocks: number of contiguous blocks of ⌈L/N⌉ layers for the block modes (ignored otherwise).
        gate: ``none`` (g = 1, training from scratch) or ``scalar`` (a learned scalar per sublayer, zero at
            init: a freshly patched model computes exactly the unpatched one — use it to convert a
            pretrained checkpoint). Only additive modes can be gated.
        null_source: add a learned value vector (zero at init) every routed point may attend to.
        eps: epsilon of the key normalisation (the routing keys' RMSNorm; DDL's ``k = o / max(‖o‖, ε)``).
        ddl_value: (``ddl`` only) the scalar target ``v``: ``constant`` (the paper's default),
            ``linear`` (``w_v · s + b_v``) or ``sigmoid_linear`` (``sigmoid(w_v · s + b_v)``).
        ddl_value_init: (``ddl`` only) ``v`` at init; unset means 2.0 (0.5 for ``sigmoid_linear``).
        ddl_beta_init: (``ddl`` only) β at init, in (0, 2); 1.0 overwrites the component along ``k``.
    """

    # plain `str` (not Literal) so a wrong value from a recipe reaches __post_init__'s message listing the choices
    mode: str = "delta_block"
    num_blocks: int = 4
    gate: str = "none"
    null_source: bool = False
    eps: float = 1e-6
    ddl_value: str = "constant"
    ddl_value_init: float | None = None
    ddl_beta_init: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in ALL_MODES:
            raise ValueError(f"DARConfig.mode={self.mode!r} is unknown: choose one of {sorted(ALL_MODES)}.")
        if isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int) or self.num_blocks < 1:
            raise ValueError(f"DARConfig.num_blocks={self.num_blocks!r} must be an integer ≥ 1 (and ≤ n_layer).")
        if self.gate not in GATES:
            raise ValueError(f"DARConfig.gate={self.gate!r} is unknown: choose one of {list(GATES)}.")
        if self.gate != "none" and self.mode not in ADDITIVE_MODES:
            why = (
                "DDL rewrites the stream along o/‖o‖ instead of adding o, so no setting of it reproduces the "
                "unpatched model (a zero gate would only switch the sublayers off)"
                if self.mode == DDL_MODE
                else "replacement routing (h = r) has no zero-gate identity"
            )
            raise ValueError(
                f"DARConfig.gate={self.gate!r} cannot be used with mode={self.mode!r}: {why}. Use gate='none', or "
                f"an additive mode {list(ADDITIVE_MODES)} to convert a pretrained checkpoint."
            )
        if not isinstance(self.null_source, bool):
            raise TypeError(f"DARConfig.null_source must be true or false, got {self.null_source!r}.")
        if self.null_source and self.mode == DDL_MODE:
            raise ValueError("DARConfig.null_source=True cannot be used with mode='ddl': DDL routes over no sources.")
        if not _is_number(self.eps) or not self.eps > 0:
            raise ValueError(f"DARConfig.eps={self.eps!r} must be a positive number.")
        self._check_ddl_fields()

    def _check_ddl_fields(self) -> None:
        """Validate DDL's fields; other modes must leave them at their defaults (they would be silently unused)."""
        if self.mode != DDL_MODE:
            changed = [f"{k}={getattr(self, k)!r}" for k, default in DDL_FIELDS.items() if getattr(self, k) != default]
            if changed:
                raise ValueError(
                    f"DARConfig.{changed[0]} is only used by mode='ddl', not mode={self.mode!r}: leave it unset or "
                    "set mode='ddl'."
                )
            return
        if self.ddl_value not in VALUE_KINDS:
            raise ValueError(f"DARConfig.ddl_value={self.ddl_value!r} is unknown: choose one of {list(VALUE_KINDS)}.")
        if self.ddl_value_init is None:
            self.ddl_value_init = VALUE_DEFAULTS[self.ddl_value]  # saved resolved, so a checkpoint never depends on it
        if not _is_number(self.ddl_value_init) or not math.isfinite(self.ddl_value_init):
            raise ValueError(f"DARConfig.ddl_value_init={self.ddl_value_init!r} must be a finite number.")
        if self.ddl_value == "sigmoid_linear" and not 0 < self.ddl_value_init < 1:
            raise ValueError(
                f"DARConfig.ddl_value_init={self.ddl_value_init!r} must lie in (0, 1) with ddl_value='sigmoid_linear' "
                "(v = sigmoid(·)); leave it unset for 0.5."
            )
        if not _is_number(self.ddl_beta_init) or not 0 < self.ddl_beta_init < 2:
            raise ValueError(
                f"DARConfig.ddl_beta_init={self.ddl_beta_init!r} must lie in (0, 2): β = 2·sigmoid(·) never reaches "
                "0 or 2 (1.0 is the paper's default)."
            )

    def to_dict(self) -> dict[str, Any]:
        """All fields; DDL's only for mode='ddl' (elsewhere they are at their defaults), so a routing mode's
        config and checkpoints carry only the fields it uses."""
        data = asdict(self)
        if self.mode != DDL_MODE:
            for name in DDL_FIELDS:
                del data[name]
        return data

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


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
