"""Delta Attention Residuals for LitGPT models and Lightning training."""

from lit_dar.config import DARConfig
from lit_dar.checkpoint import load_checkpoint, load_model, routing_state_dict, save_checkpoint
from lit_dar.patch import (
    build_model,
    dar_filter,
    enable_routing_stats,
    get_dar_config,
    mark_only_routing_as_trainable,
    patch_model,
    routing_overhead,
    routing_parameters,
    routing_statistics,
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
    # Lightning integration (imported on first use, so `import lit_dar` stays free of Lightning)
    "DeltaAttnResCallback",
    "LitGPTModule",
    "RoutingMonitor",
    "TokenNLL",
    "convert_lightning_checkpoint",
    "load_lightning_checkpoint",
    "routing_heatmap",
    "routing_param_groups",
]

_LAZY = {
    "DeltaAttnResCallback": "lit_dar.callback",
    "RoutingMonitor": "lit_dar.monitor",
    "routing_param_groups": "lit_dar.param_groups",
    "LitGPTModule": "lit_dar.module",
    "convert_lightning_checkpoint": "lit_dar.module",
    "load_lightning_checkpoint": "lit_dar.module",
    "TokenNLL": "lit_dar.metrics",
    "routing_heatmap": "lit_dar.plotting",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lit_dar' has no attribute {name!r}")
