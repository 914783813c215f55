"""Delta Attention Residuals for LitGPT models and Lightning training."""

from lit_dar.config import DARConfig
from lit_dar.patch import (
    build_model,
    dar_filter,
    enable_routing_stats,
    get_dar_config,
    load_checkpoint,
    load_model,
    mark_only_routing_as_trainable,
    patch_model,
    routing_overhead,
    routing_parameters,
    routing_state_dict,
    routing_statistics,
    save_checkpoint,
)

__all__ = [
    "DARConfig",
    "build_model",
    "dar_filter",
    "enable_routing_stats",
    "get_dar_config",
    "load_checkpoint",
    "load_model",
    "mark_only_routing_as_trainable",
    "patch_model",
    "routing_overhead",
    "routing_parameters",
    "routing_state_dict",
    "routing_statistics",
    "save_checkpoint",
]
