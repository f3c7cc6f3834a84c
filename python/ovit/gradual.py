"""The stateful pruner: persistent masks over a sequence of pruning steps (gradual pruning).

:class:`Pruner` owns the selected layers and their masks (True = kept). Each :meth:`Pruner.step`
is one pruning event (the stage driver ``ovit.pruner.run_step``; :func:`ovit.one_shot_prune` is one
step of a fresh Pruner) on the current (already sparse) model —
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

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .layers import select_layers
from .masks import MaskHolder
from .pruner import METHODS, PruneReport, run_step
from .sampling import logits
from .schedules import CyclicLinearLR, SparsitySchedule

# the options of one_shot_prune that the distributed step takes too
_DISTRIBUTED_OPTIONS = {"grad_batch_size", "grad_mode", "pass_batch_size", "loss_fn", "fisher_method", "fisher_dtype",
                        "grad_chunk", "memory_budget", "backend", "progress", "debug"}  # fmt: skip


class Pruner:
    """Persistent masks and pruning steps for the selected layers of ``model``.

    Args:
        model: the model; pruned in place by :meth:`step`.
        layers, method, block_size, pattern, damp, damp_mode, num_grads: as in
            :func:`ovit.one_shot_prune`; fixed for every step.
        process_group: a ``torch.distributed`` process group (``dist.group.WORLD`` for all
            ranks): every step runs across its ranks (:func:`ovit.distributed.distributed_prune`),
            each rank calling :meth:`step` with the same arguments; the masks stay identical on
            every rank, also under DDP training with :meth:`hold`.
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
        process_group: Any = None,
        **options: Any,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        for bad in ("sparsity", "fisher_cache", "layers"):
            if bad in options:
                raise TypeError(f"{bad!r} is not an option of Pruner")
        for name, v in (("num_grads", num_grads), ("block_size", block_size)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.model = model
        chosen = select_layers(model, layers)
        self.names = [n for n, _ in chosen]
        self.config = dict(method=method, block_size=int(block_size), pattern=pattern, damp=float(damp),
                           damp_mode=damp_mode, num_grads=int(num_grads))  # fmt: skip
        self.options = options
        self.process_group = process_group
        if process_group is not None:
            unsupported = sorted(set(options) - _DISTRIBUTED_OPTIONS)
            if unsupported or method not in ("ovit", "woodfisher"):
                raise ValueError(f"across ranks a Pruner runs ovit or woodfisher without {unsupported or method}")
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

    def step(
        self,
        data: Iterable,
        sparsity: float | None = None,
        *,
        recomputations: int = 1,
        fisher_cache: dict[str, torch.Tensor] | None = None,
    ) -> PruneReport:
        """One pruning step to ``sparsity`` (of the selected weights; implied by an n:m
        pattern), on the current model: the stages of ``ovit.stages`` driven once per sub-step
        (masked sampling → Fisher → eliminate/score → select → reconstruct → commit).

        With ``recomputations=k`` the step is split into k sub-steps with a fresh Fisher each,
        their targets interpolated linearly from the current sparsity. Either the whole step
        succeeds or the model and the masks are left as they were. ``fisher_cache``: gradient
        statistics shared between steps on the same model, data and zeros (as in
        :func:`ovit.one_shot_prune`, e.g. a damping search); one sub-step only.

        Returns:
            the :class:`PruneReport` of the last sub-step (all of them are in ``reports``).

        Raises:
            ValueError: a target below the current sparsity, a bad ``recomputations``, layers
                that changed shape.
        """
        if int(recomputations) != recomputations or recomputations < 1:
            raise ValueError(f"recomputations must be a positive int, got {recomputations!r}")
        if fisher_cache is not None and (recomputations != 1 or self.process_group is not None):
            raise ValueError("fisher_cache serves one sub-step on one process: each recomputation needs a fresh Fisher")
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
        # nothing half-written on failure: one sub-step commits all or nothing by itself; a copy is kept when
        # there are several, or when re-applying the masks below changes weights (trained without hold)
        keep_copy = len(targets) > 1 or any(
            bool((mods[n].weight.detach() != 0).logical_and_(~self.masks[n].to(mods[n].weight.device)).any())
            for n in self.names
        )
        saved = {n: mods[n].weight.detach().clone() for n in self.names} if keep_copy else None
        t0 = time.perf_counter()
        reports: list[PruneReport] = []
        try:
            self.apply_masks()
            for t in targets:
                if self.process_group is not None:  # every rank runs the step; the shards split the work
                    from .distributed import distributed_prune

                    reports.append(distributed_prune(self.model, data, t, layers=self.names, group=self.process_group,
                                                     **self.config, **self.options))  # fmt: skip
                else:
                    reports.append(run_step(self.model, data, t, layers=self.names, fisher_cache=fisher_cache,
                                            **self.config, **self.options))  # fmt: skip
        except BaseException:
            if saved is not None:
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


def _accuracy(model: nn.Module, data: Iterable, device: torch.device) -> float:
    """Top-1 accuracy of ``model`` over ``(inputs, targets)`` batches."""
    was = model.training
    model.eval()
    right = total = 0
    with torch.no_grad():
        for x, y in data:
            x, y = x.to(device), y.to(device)
            right += int((logits(model(x)).argmax(-1) == y).sum())
            total += int(y.numel())
    model.train(was)
    return right / max(1, total)


def _kd_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, weight: float, temp: float,
             loss_fn) -> torch.Tensor:  # fmt: skip
    """(1 − weight)·task loss + weight·T²·KL(teacher_T ‖ student_T)."""
    kl = nn.functional.kl_div(
        nn.functional.log_softmax(student / temp, -1), nn.functional.log_softmax(teacher / temp, -1),
        log_target=True, reduction="batchmean",
    )  # fmt: skip
    return (1 - weight) * loss_fn(student, targets) + weight * temp * temp * kl


def gradual_prune(
    model: nn.Module,
    train_data: Iterable,
    *,
    schedule: SparsitySchedule,
    optimizer: torch.optim.Optimizer | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    pruner: Pruner | None = None,
    calib_data: Iterable | None = None,
    eval_data: Iterable | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    teacher: nn.Module | None = None,
    kd_weight: float = 0.5,
    kd_temperature: float = 2.0,
    amp_dtype: torch.dtype | None = None,
    min_lr: float = 0.0,
    warmup: float = 0.0,
    out_dir: str | None = None,
    resume: bool = True,
    log: Callable[[str], None] | None = print,
    **pruner_options: Any,
) -> list[dict]:
    """Gradual pruning with recovery: prune at the start of every pruning epoch of ``schedule``
    (Fisher re-estimated on the current sparse model), fine-tune with the masks held and the
    cyclic linear learning rate (restarted at every step), evaluate after every epoch.

    Args:
        model: trained dense (or partly pruned) model; changed in place.
        train_data: re-iterable ``(inputs, targets)`` batches (a DataLoader); one pass = one epoch.
        schedule: the :class:`~ovit.schedules.SparsitySchedule`.
        optimizer: an optimizer of ``model``'s parameters, or a factory ``f(params)``; default
            AdamW(lr=1e-3, weight_decay=0.05). Its ``lr`` is the peak of every cycle.
        pruner: a :class:`Pruner` of ``model`` (default: one built from ``pruner_options``).
        calib_data: batches for the gradient sampling (default: ``train_data``).
        eval_data: batches for top-1 accuracy after every epoch (the sweep needs it).
        loss_fn: task loss (default cross-entropy).
        teacher: optional model to distil from (e.g. the dense model): the loss becomes
            (1 − kd_weight)·task + kd_weight·T²·KL at temperature ``kd_temperature``.
        amp_dtype: autocast dtype for training (e.g. ``torch.bfloat16``).
        min_lr, warmup: of :class:`~ovit.schedules.CyclicLinearLR`.
        out_dir: where to write ``log.json`` (one record per epoch), ``last.pt`` (everything
            needed to resume) and the sparsity sweep: ``sparsity=<target>/best.pt``, the best model
            at every target sparsity the run passes through, with its pruner state.
        resume: continue from ``out_dir/last.pt`` when it exists.
        log: a function for one line per epoch (None: silent).
        **pruner_options: keywords of :class:`Pruner` when ``pruner`` is None.

    Returns:
        the log: one dict per epoch (epoch, target and achieved sparsity, train loss, accuracy,
        seconds of pruning and of training).
    """
    import json
    import os

    params = list(model.parameters())
    if not params:
        raise ValueError("the model has no parameters")
    device = params[0].device
    loss_fn = loss_fn or nn.functional.cross_entropy
    if pruner is None:
        pruner = Pruner(model, **pruner_options)
    elif pruner_options:
        raise TypeError("give either a pruner or pruner options, not both")
    if pruner.model is not model:
        raise ValueError("pruner belongs to another model")
    if not 0.0 <= kd_weight <= 1.0 or kd_temperature <= 0:
        raise ValueError("kd_weight must lie in [0, 1] and kd_temperature be positive")
    if schedule.initial < pruner.sparsity - 1e-9:
        raise ValueError(f"the schedule starts at {schedule.initial}, below the model's sparsity {pruner.sparsity:.4f}")
    if optimizer is None:
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    elif isinstance(optimizer, torch.optim.Optimizer):
        opt = optimizer
    else:
        opt = optimizer(params)
    try:
        steps_per_epoch = len(train_data)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError("train_data must have a length (a DataLoader or a list of batches)") from None
    if steps_per_epoch < 1:
        raise ValueError("train_data is empty")
    lr = CyclicLinearLR(opt, schedule, steps_per_epoch, min_lr=min_lr, warmup=warmup)
    pruner.hold(opt)
    if teacher is not None:
        teacher.eval()
    history: list[dict] = []
    best: dict[str, float] = {}
    start = 0
    last = os.path.join(out_dir, "last.pt") if out_dir else None
    if last and resume and os.path.exists(last):
        ck = torch.load(last, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        pruner.load_state_dict(ck["pruner"])
        opt.load_state_dict(ck["optimizer"])
        lr.load_state_dict(ck["lr"])
        history, best, start = ck["history"], ck["best"], ck["epoch"] + 1
        if log:
            log(f"resumed from {last} after epoch {ck['epoch']}")
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    for epoch in range(start, schedule.epochs):
        t0 = time.perf_counter()
        k = schedule.step_at(epoch)
        if k is not None:
            pruner.step(calib_data if calib_data is not None else train_data, schedule.target(k))
        t_prune = time.perf_counter() - t0
        model.train()
        total, n = 0.0, 0
        for x, y in train_data:
            x, y = x.to(device), y.to(device)
            with autocast():
                out = logits(model(x))
                if teacher is not None:
                    with torch.no_grad():
                        t_out = logits(teacher(x))
                    loss = _kd_loss(out.float(), t_out.float(), y, kd_weight, kd_temperature, loss_fn)
                else:
                    loss = loss_fn(out.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr.step()
            total += float(loss.detach())
            n += 1
        t_train = time.perf_counter() - t0 - t_prune
        acc = _accuracy(model, eval_data, device) if eval_data is not None else None
        rec = {"epoch": epoch, "target": schedule.sparsity_at(epoch), "sparsity": pruner.sparsity, "loss": total / n,
               "accuracy": acc,
               "prune_seconds": t_prune, "train_seconds": t_train}  # fmt: skip
        history.append(rec)
        if log:
            a = "" if acc is None else f", accuracy {acc:.4f}"
            log(f"epoch {epoch}: sparsity {rec['sparsity']:.4f}, loss {rec['loss']:.4f}{a} "
                f"(pruning {t_prune:.1f} s, training {t_train:.1f} s)")  # fmt: skip
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            key = f"{rec['target']:.4f}"  # the schedule's target: the achieved sparsity differs by rounding
            if acc is not None and acc > best.get(key, -1.0):
                best[key] = acc
                sub = os.path.join(out_dir, f"sparsity={key}")
                os.makedirs(sub, exist_ok=True)
                _save(os.path.join(sub, "best.pt"), {"model": model.state_dict(), "pruner": pruner.state_dict(),
                                                     "epoch": epoch, "accuracy": acc})  # fmt: skip
            _save(last, {"model": model.state_dict(), "pruner": pruner.state_dict(), "optimizer": opt.state_dict(),
                         "lr": lr.state_dict(), "history": history, "best": best, "epoch": epoch})  # fmt: skip
            with open(os.path.join(out_dir, "log.json"), "w") as f:
                json.dump(history, f, indent=1)
    return history


def _save(path: str, obj: dict) -> None:
    """torch.save through a temporary file, so an interrupted save never leaves a broken file."""
    import os

    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)
