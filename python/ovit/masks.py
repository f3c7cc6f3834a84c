"""Masks held during training: pruned weights stay exactly zero and get zero gradients.

Two mechanisms together, because neither alone survives every optimizer:

- a gradient hook on each masked weight zeroes the gradients of pruned entries, so gradient
  clipping, AMP's ``GradScaler`` (which unscales and checks the masked gradients) and any
  gradient statistics never see them;
- after every ``optimizer.step()`` (a post-step hook on the optimizer) the pruned entries are set
  to zero again, and the optimizer's per-weight state (Adam's moments, momentum buffers) is
  zeroed there: AdamW's decoupled weight decay, momentum from before the pruning step or a
  moment estimate would otherwise move a pruned weight away from zero.

Both act on the parameters themselves (no reparametrisation), so a ``torch.compile``-d model,
``state_dict`` and checkpoints see ordinary weights.
"""

from __future__ import annotations

import torch
from torch import nn


class MaskHolder:
    """Keeps the masked weights of ``model`` at zero through training.

    Args:
        model: the model whose weights are masked.
        masks: ``{module name: bool tensor of the weight's shape}``, True = kept.
        optimizers: optimizers to hook (more with :meth:`attach`).

    Use :meth:`apply` after changing weights by hand, :meth:`remove` to stop holding.
    """

    def __init__(
        self, model: nn.Module, masks: dict[str, torch.Tensor], optimizers: tuple[torch.optim.Optimizer, ...] = ()
    ) -> None:
        mods = dict(model.named_modules())
        self.masks: dict[str, torch.Tensor] = {}
        self._weights: dict[str, nn.Parameter] = {}
        self._handles: list = []
        for name, keep in masks.items():
            if name not in mods or not isinstance(getattr(mods[name], "weight", None), torch.Tensor):
                raise ValueError(f"the model has no weighted module named {name!r}")
            w = mods[name].weight
            if tuple(keep.shape) != tuple(w.shape) or keep.dtype != torch.bool:
                raise ValueError(
                    f"mask of {name!r} must be a bool tensor of shape {tuple(w.shape)}, "
                    f"got {keep.dtype} {tuple(keep.shape)}"
                )
            self.masks[name] = keep.to(w.device)
            self._weights[name] = w
            self._handles.append(w.register_hook(lambda g, name=name: g.masked_fill(~self.masks[name], 0)))
        self.apply()
        for opt in optimizers:
            self.attach(opt)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Re-mask after every ``optimizer.step()`` (and zero its state for pruned entries)."""
        self._handles.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply(opt)))

    @torch.no_grad()
    def apply(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Set every pruned weight (and, given ``optimizer``, its per-weight state) to zero."""
        for name, keep in self.masks.items():
            w = self._weights[name]
            w.masked_fill_(~keep, 0)
            if optimizer is not None:
                for v in optimizer.state.get(w, {}).values():
                    if isinstance(v, torch.Tensor) and v.shape == w.shape:
                        v.masked_fill_(~keep, 0)

    def update(self, masks: dict[str, torch.Tensor]) -> None:
        """Take new masks for (some of) the held weights (e.g. after a pruning step) and apply them."""
        for name, keep in masks.items():
            if name not in self.masks or keep.shape != self.masks[name].shape:
                raise ValueError(f"no held weight {name!r} of shape {tuple(keep.shape)}")
            self.masks[name] = keep.to(self.masks[name].device)
        self.apply()

    def remove(self) -> None:
        """Stop holding: remove every hook."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def sparsity(self) -> float:
        """Fraction of the masked weights that are pruned."""
        total = sum(k.numel() for k in self.masks.values())
        return sum(int((~k).sum()) for k in self.masks.values()) / max(1, total)
