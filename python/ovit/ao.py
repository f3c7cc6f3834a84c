"""oViT through PyTorch's sparsifier protocol (``torch.ao.pruning``).

:class:`OViTSparsifier` is a ``BaseSparsifier``: ``prepare(model, config)`` adds the usual
``FakeSparsity`` parametrizations, ``step()`` runs one oViT (or baseline) pruning step over all
configured tensors with gradients from the data iterable it was given, ``squash_mask()`` folds the
masks in. A step writes the OBS-updated weights into each parametrization's ``original`` (the
same Parameter object, so an optimizer built after ``prepare`` keeps working) and the new mask
into the sparsifier's state, so masks and weights agree. Already-pruned weights stay pruned.

Per-tensor config keys beside ``tensor_fqn``: ``sparsity_level`` (fraction of the tensor's
group), ``block_size`` and ``pattern`` (``"2:4"``…). Tensors with equal settings are pruned
together, with oViT's global selection across them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.ao.pruning import BaseSparsifier
from torch.ao.pruning.sparsifier.utils import FakeSparsity
from torch.nn.utils import parametrize

from .pruner import PruneReport, one_shot_prune


class OViTSparsifier(BaseSparsifier):
    """Args:
    data: re-iterable ``(inputs, targets)`` batches for the gradients of every step.
    sparsity_level: default fraction pruned per group of tensors.
    block_size, pattern: defaults of the per-tensor config.
    **options: keywords of :func:`ovit.one_shot_prune` (``method``, ``num_grads``, ``damp``,
        ``damp_mode``, ``grad_batch_size``, ``loss_fn``, ``backend`` …).
    """

    def __init__(
        self,
        data: Iterable,
        sparsity_level: float = 0.5,
        *,
        block_size: int = 192,
        pattern: str = "unstructured",
        **options: Any,
    ) -> None:
        for bad in ("layers", "sparsity", "fisher_cache"):
            if bad in options:
                raise TypeError(f"{bad!r} comes from the sparsifier's config, not its options")
        super().__init__(defaults={"sparsity_level": sparsity_level, "block_size": block_size, "pattern": pattern})
        self.data = data
        self.options = options
        self.reports: list[PruneReport] = []

    def update_mask(self, module, tensor_name, **kwargs) -> None:  # the step prunes all groups together
        raise NotImplementedError("OViTSparsifier prunes in step(), across the configured tensors")

    def step(self, use_path: bool = True) -> None:
        """One pruning step of every configured tensor (all or nothing)."""
        if not self.enable_mask_update:
            return
        by_setting: dict[tuple, list[dict]] = {}
        for cfg in self.groups:
            if cfg["tensor_name"] != "weight":
                raise ValueError(f"{cfg['tensor_fqn']}: only weights can be pruned")
            key = (float(cfg["sparsity_level"]), int(cfg["block_size"]), str(cfg["pattern"]))
            by_setting.setdefault(key, []).append(cfg)
        for (level, block, pattern), cfgs in by_setting.items():
            mods = [cfg["module"] for cfg in cfgs]
            # the plain weights (original · mask, in the same Parameter objects) while pruning
            for m in mods:
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            ok = False
            try:
                rep = one_shot_prune(self.model, self.data, None if pattern != "unstructured" else level,
                                     layers=mods, block_size=block, pattern=pattern, **self.options)  # fmt: skip
                ok = True
            finally:
                for cfg, m in zip(cfgs, mods):
                    mask = self.state[cfg["tensor_fqn"]]["mask"]
                    if ok:
                        mask.copy_(m.weight.detach() != 0)
                    parametrize.register_parametrization(m, "weight", FakeSparsity(mask))
            self.reports.append(rep)

    def masks(self) -> dict[str, torch.Tensor]:
        """``{tensor_fqn: bool mask}`` (True = kept) of every configured tensor (the sparsifier's
        own masks are float, as ``torch.ao.pruning`` makes them)."""
        return {cfg["tensor_fqn"]: self.state[cfg["tensor_fqn"]]["mask"] != 0 for cfg in self.groups}
