"""ovit: one-shot Optimal ViT Surgeon pruning on top of the ``ovit_kernels`` backend."""

from .layers import DEFAULT_PATTERN, Layout, block_layout, select_layers
from .pruner import METHODS, LayerReport, PruneReport, one_shot_prune

__all__ = [
    "DEFAULT_PATTERN",
    "METHODS",
    "LayerReport",
    "Layout",
    "PruneReport",
    "block_layout",
    "one_shot_prune",
    "select_layers",
]
