"""ovit: Optimal ViT Surgeon pruning (one-shot and gradual) on top of the ``ovit_kernels`` backend."""

from . import distributed, stages
from .checkpoint import load_pruned, save_pruned
from .gradual import Pruner, gradual_prune
from .layers import DEFAULT_PATTERN, Layout, block_layout, select_layers
from .masks import MaskHolder
from .pruner import METHODS, LayerReport, PruneReport, one_shot_prune
from .schedules import CyclicLinearLR, SparsitySchedule

__all__ = [
    "DEFAULT_PATTERN",
    "METHODS",
    "CyclicLinearLR",
    "LayerReport",
    "Layout",
    "MaskHolder",
    "PruneReport",
    "Pruner",
    "SparsitySchedule",
    "block_layout",
    "distributed",
    "stages",
    "gradual_prune",
    "load_pruned",
    "one_shot_prune",
    "save_pruned",
    "select_layers",
]
