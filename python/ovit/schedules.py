"""Schedules of gradual pruning: when to prune and to what sparsity, and the cyclic linear
learning rate of the paper (linear decay within each cycle, restarted at every pruning step).

Epochs count from 0. Pruning step k happens at the start of epoch ``start_epoch + k·every``;
after the last step the model recovers for ``every`` epochs and then ``hold`` more epochs at the
final sparsity.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparsitySchedule:
    """Sparsity targets of ``steps`` pruning steps from ``initial`` to ``final``.

    Args:
        initial: sparsity of the first step, in [0, 1).
        final: sparsity of the last step, in [initial, 1).
        steps: number of pruning steps (>= 1).
        every: epochs between steps (>= 1); each step is followed by ``every`` epochs of
            recovery.
        kind: ``"cubic"`` (s_k = s_f + (s_i − s_f)(1 − k/(n−1))³: large steps early, small near
            the end) or ``"linear"``.
        start_epoch: epoch of the first step.
        hold: extra epochs of training at the final sparsity after the last recovery.
    """

    initial: float
    final: float
    steps: int
    every: int = 1
    kind: str = "cubic"
    start_epoch: int = 0
    hold: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.initial < 1.0 or not 0.0 <= self.final < 1.0:
            raise ValueError(f"sparsities must lie in [0, 1), got initial={self.initial}, final={self.final}")
        if self.final < self.initial:
            raise ValueError(f"final sparsity {self.final} is below the initial {self.initial}: a schedule only prunes")
        for name in ("steps", "every"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("start_epoch", "hold"):
            v = getattr(self, name)
            if int(v) != v or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if self.kind not in ("cubic", "linear"):
            raise ValueError(f"kind must be 'cubic' or 'linear', got {self.kind!r}")

    @property
    def epochs(self) -> int:
        """Total epochs: up to the last step, its recovery, and the hold."""
        return self.start_epoch + self.steps * self.every + self.hold

    @property
    def prune_epochs(self) -> list[int]:
        """The epochs at whose start a pruning step happens."""
        return [self.start_epoch + k * self.every for k in range(self.steps)]

    def target(self, step: int) -> float:
        """Sparsity after pruning step ``step`` (0-based)."""
        if not 0 <= step < self.steps:
            raise ValueError(f"step must lie in [0, {self.steps}), got {step}")
        if self.steps == 1:
            return self.final
        t = step / (self.steps - 1)
        if self.kind == "linear":
            return self.initial + (self.final - self.initial) * t
        return self.final + (self.initial - self.final) * (1.0 - t) ** 3

    def step_at(self, epoch: int) -> int | None:
        """The pruning step at the start of ``epoch``, or None."""
        eps = self.prune_epochs
        return eps.index(epoch) if epoch in eps else None

    def sparsity_at(self, epoch: int) -> float:
        """Sparsity of the model during ``epoch`` (0 before the first step)."""
        k = bisect.bisect_right(self.prune_epochs, epoch) - 1
        return 0.0 if k < 0 else self.target(k)


class CyclicLinearLR(torch.optim.lr_scheduler.LRScheduler):
    """The paper's cyclic linear learning rate: in every cycle (one per pruning step, the first
    one also covering the epochs before it) the rate falls linearly from each group's initial
    ``lr`` to ``min_lr``; it restarts at the next step. Optional linear warm-up over the first
    ``warmup`` epochs of the run (from ``lr / 100``).

    Call ``step()`` once per optimizer step; ``steps_per_epoch`` converts to epochs (so the
    decay is smooth within an epoch). Works with any optimizer.

    Args:
        optimizer: the optimizer; its groups' ``lr`` are the peaks.
        schedule: a :class:`SparsitySchedule` (cycles start at its ``prune_epochs`` and the run
            ends at its ``epochs``), or an explicit list of cycle-start epochs with ``epochs``.
        steps_per_epoch: optimizer steps per epoch.
        min_lr: the rate at the end of each cycle.
        warmup: epochs of warm-up at the start.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: SparsitySchedule | list[int],
        steps_per_epoch: int,
        *,
        epochs: int | None = None,
        min_lr: float = 0.0,
        warmup: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if isinstance(schedule, SparsitySchedule):
            starts, total = schedule.prune_epochs, schedule.epochs
        else:
            if epochs is None:
                raise ValueError("an explicit list of cycle starts needs epochs")
            starts, total = sorted(int(e) for e in schedule), int(epochs)
        if int(steps_per_epoch) != steps_per_epoch or steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")
        if any(b <= a for a, b in zip(starts, starts[1:])) or (starts and (starts[0] < 0 or starts[-1] >= total)):
            raise ValueError(f"cycle starts must increase strictly within [0, {total}), got {starts}")
        if min_lr < 0 or warmup < 0:
            raise ValueError("min_lr and warmup must be >= 0")
        self.bounds = sorted({0, *starts, total})
        self.steps_per_epoch = int(steps_per_epoch)
        self.min_lr = float(min_lr)
        self.warmup = float(warmup)
        super().__init__(optimizer, last_epoch)

    def factor(self, epoch: float) -> tuple[float, float]:
        """(weight of the peak, weight of min_lr) at fractional ``epoch``."""
        i = max(0, bisect.bisect_right(self.bounds, epoch) - 1)
        i = min(i, len(self.bounds) - 2)
        a, b = self.bounds[i], self.bounds[i + 1]
        t = min(1.0, max(0.0, (epoch - a) / (b - a)))
        peak = 1.0 - t
        if self.warmup > 0 and epoch < self.warmup:
            peak *= 0.01 + 0.99 * epoch / self.warmup
        return peak, 1.0 - peak

    def get_lr(self) -> list[float]:
        epoch = max(0, self.last_epoch) / self.steps_per_epoch
        p, q = self.factor(epoch)
        return [p * base + q * min(self.min_lr, base) for base in self.base_lrs]
