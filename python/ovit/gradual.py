"""The stateful pruner: persistent masks over a sequence of pruning steps (gradual pruning).

:class:`Pruner` owns the selected layers and their masks (True = kept). Each :meth:`Pruner.step`
is one pruning event run by :func:`ovit.one_shot_prune` on the current (already sparse) model —
masked gradient sampling, Fisher inverses, greedy elimination or the baselines' scores, global
selection, reconstruction, commit — so weights pruned earlier stay pruned (they are zero, hence
pre-pruned at zero loss, and their gradients are masked out of the Fisher), and a later step only
adds to the mask. :meth:`Pruner.hold` keeps the masks through training (:mod:`ovit.masks`).

Plugging it into your own loop::

    pruner = ovit.Pruner(model, method="ovit", block_size=192, num_grads=1024, damp=1e-8)
    schedule = ovit.SparsitySchedule(0.5, 0.9, steps=6, every=4, hold=8)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    lr = ovit.CyclicLinearLR(opt, schedule, steps_per_epoch=len(train_loader))
    pruner.hold(opt)                       # pruned weights stay zero after every opt.step()
    for epoch in range(schedule.epochs):
        k = schedule.step_at(epoch)
        if k is not None:
            pruner.step(calib_loader, schedule.target(k))
        for x, y in train_loader:
            loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad(); lr.step()
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .layers import select_layers
from .masks import MaskHolder
from .pruner import METHODS, PruneReport, one_shot_prune


class Pruner:
    """Persistent masks and pruning steps for the selected layers of ``model``.

    Args:
        model: the model; pruned in place by :meth:`step`.
        layers, method, block_size, pattern, damp, damp_mode, num_grads: as in
            :func:`ovit.one_shot_prune`; fixed for every step.
        **options: any other keyword of :func:`ovit.one_shot_prune` (``grad_batch_size``,
            ``grad_mode``, ``loss_fn``, ``fisher_dtype``, ``memory_budget``, ``backend``,
            ``progress`` …), given to every step.

    Attributes:
        masks: ``{layer name: bool tensor of the weight's shape}``, True = kept.
        step_count: pruning steps done (a step with ``recomputations=k`` counts once).
        history: one dict per step: target, achieved sparsity, recomputations, seconds.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: str | Iterable[nn.Module | str] | None = None,
        method: str = "ovit",
        block_size: int = 192,
        pattern: str = "unstructured",
        damp: float = 1e-8,
        damp_mode: str = "absolute",
        num_grads: int = 4096,
        **options: Any,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        for bad in ("sparsity", "fisher_cache", "layers"):
            if bad in options:
                raise TypeError(f"{bad!r} is not an option of Pruner")
        self.model = model
        chosen = select_layers(model, layers)
        names = [n for n, _ in chosen]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"layers names a module more than once: {dup}")
        self.names = names
        self.config = dict(method=method, block_size=int(block_size), pattern=pattern, damp=float(damp),
                           damp_mode=damp_mode, num_grads=int(num_grads))  # fmt: skip
        self.options = options
        self.masks: dict[str, torch.Tensor] = {
            n: torch.ones_like(m.weight, dtype=torch.bool, device=m.weight.device) for n, m in chosen
        }
        self.step_count = 0
        self.history: list[dict] = []
        self.reports: list[PruneReport] = []
        self._holder: MaskHolder | None = None

    # -- state --------------------------------------------------------------------------------

    def _modules(self) -> dict[str, nn.Module]:
        mods = dict(self.model.named_modules())
        missing = [n for n in self.names if n not in mods]
        if missing:
            raise ValueError(f"the model no longer has the pruned layers {missing}")
        for n in self.names:
            w, k = mods[n].weight, self.masks[n]
            if tuple(w.shape) != tuple(k.shape):
                raise ValueError(f"{n!r} changed shape between steps: weight {tuple(w.shape)}, mask {tuple(k.shape)}")
        return mods

    @property
    def sparsity(self) -> float:
        """Fraction of the selected weights that the masks prune."""
        total = sum(k.numel() for k in self.masks.values())
        return sum(int((~k).sum()) for k in self.masks.values()) / max(1, total)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every pruned weight of the model."""
        mods = self._modules()
        for n in self.names:
            mods[n].weight.masked_fill_(~self.masks[n].to(mods[n].weight.device), 0)

    def state_dict(self) -> dict:
        """Masks (on the CPU), the step counter, the configuration and the history."""
        return {
            "masks": {n: k.cpu() for n, k in self.masks.items()},
            "step_count": self.step_count,
            "config": dict(self.config),
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore masks and step counter (the layers and their shapes must match) and zero the
        pruned weights of the model."""
        masks = state["masks"]
        if sorted(masks) != sorted(self.names):
            raise ValueError(f"the state holds masks of {sorted(masks)}, this pruner has {sorted(self.names)}")
        mods = dict(self.model.named_modules())
        for n in self.names:
            w = mods[n].weight
            if tuple(masks[n].shape) != tuple(w.shape) or masks[n].dtype != torch.bool:
                raise ValueError(f"mask of {n!r} must be a bool tensor of shape {tuple(w.shape)}")
        self.masks = {n: masks[n].to(mods[n].weight.device).clone() for n in self.names}
        self.step_count = int(state["step_count"])
        self.history = [dict(h) for h in state.get("history", [])]
        self.apply_masks()
        if self._holder is not None:
            self._holder.update(self.masks)

    # -- training -----------------------------------------------------------------------------

    def hold(self, *optimizers: torch.optim.Optimizer) -> MaskHolder:
        """Keep the masks through training: gradients of pruned weights are zeroed as they are
        computed, and after every step of each optimizer the pruned weights and their optimizer
        state are zero again. Later steps of this pruner update the holder's masks."""
        if self._holder is None:
            self._holder = MaskHolder(self.model, self.masks)
        for opt in optimizers:
            self._holder.attach(opt)
        return self._holder

    # -- pruning ------------------------------------------------------------------------------

    def step(self, data: Iterable, sparsity: float | None = None, *, recomputations: int = 1) -> PruneReport:
        """One pruning step to ``sparsity`` (of the selected weights; implied by an n:m
        pattern), on the current model.

        With ``recomputations=k`` the step is split into k sub-steps with a fresh Fisher each,
        their targets interpolated linearly from the current sparsity. Either the whole step
        succeeds or the model and the masks are left as they were.

        Returns:
            the :class:`PruneReport` of the last sub-step (all of them are in ``reports``).

        Raises:
            ValueError: a target below the current sparsity, a bad ``recomputations``, layers
                that changed shape.
        """
        import time

        if int(recomputations) != recomputations or recomputations < 1:
            raise ValueError(f"recomputations must be a positive int, got {recomputations!r}")
        mods = self._modules()
        current = self.sparsity
        if sparsity is not None:
            sparsity = float(sparsity)
            if not 0.0 <= sparsity < 1.0:
                raise ValueError(f"sparsity must lie in [0, 1), got {sparsity!r}")
            if sparsity < current - 1e-12:
                raise ValueError(f"target sparsity {sparsity} is below the current {current:.6f}: steps only prune")
            targets = [current + (sparsity - current) * (i + 1) / recomputations for i in range(recomputations)]
        elif self.config["pattern"] != "unstructured":
            targets = [None] * int(recomputations)
        else:
            raise ValueError("sparsity is required for unstructured pruning")
        saved = {n: mods[n].weight.detach().clone() for n in self.names}  # nothing half-written on failure
        t0 = time.perf_counter()
        reports: list[PruneReport] = []
        try:
            self.apply_masks()
            for t in targets:
                reports.append(one_shot_prune(self.model, data, t, layers=self.names, **self.config, **self.options))
        except BaseException:
            with torch.no_grad():
                for n in self.names:
                    mods[n].weight.copy_(saved[n])
            raise
        new = {n: self.masks[n] & (mods[n].weight.detach() != 0).to(self.masks[n].device) for n in self.names}
        self.masks = new
        if self._holder is not None:
            self._holder.update(new)
        self.step_count += 1
        self.reports.extend(reports)
        self.history.append(
            {
                "step": self.step_count,
                "target": targets[-1] if targets[-1] is not None else reports[-1].sparsity,
                "sparsity": self.sparsity,
                "recomputations": int(recomputations),
                "seconds": time.perf_counter() - t0,
            }
        )
        return reports[-1]
