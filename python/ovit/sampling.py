"""Gradient sampling (the paper's empirical Fisher): model in eval mode, one gradient per
mini-batch, gradients of already-pruned weights masked, each gradient streamed into the
layers' ``FisherInverse`` accumulators in chunks (never all m stored)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ovit_kernels import FisherInverse

from .layers import PrunableLayer


@dataclass
class SampleStats:
    """What a sampling pass took from the data.

    Attributes:
        gradients: gradients taken.
        distinct_batches: batches in one full pass over the data (None while no pass has ended:
            then no batch was used twice).
        passes: full passes over the data that ended.
    """

    gradients: int = 0
    distinct_batches: int | None = None
    passes: int = 0

    @property
    def repeats(self) -> bool:
        """True when some gradients came from batches already used."""
        return self.distinct_batches is not None and self.gradients > self.distinct_batches


def batches(
    data: Iterable, grad_batch_size: int | None = None, stats: SampleStats | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(inputs, targets)`` forever when ``data`` can be iterated again (a DataLoader,
    a list), or until it ends (a one-shot iterator). With ``grad_batch_size``, samples are
    re-cut into batches of that size. ``stats`` counts the batches of a full pass."""
    reiterable = iter(data) is not data
    stats = stats if stats is not None else SampleStats()
    while True:
        count = 0
        buf_x: list[torch.Tensor] = []
        buf_y: list[torch.Tensor] = []
        have = 0
        got_any = False
        for item in data:
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise TypeError("data must yield (inputs, targets) pairs")
            x, y = item[0], item[1]
            got_any = True
            if grad_batch_size is None:
                count += 1
                yield x, y
                continue
            buf_x.append(x)
            buf_y.append(y)
            have += x.shape[0]
            while have >= grad_batch_size:
                cx, cy = torch.cat(buf_x), torch.cat(buf_y)
                count += 1
                yield cx[:grad_batch_size], cy[:grad_batch_size]
                buf_x, buf_y = [cx[grad_batch_size:]], [cy[grad_batch_size:]]
                have -= grad_batch_size
        if not got_any:
            raise ValueError("data yielded no batches")
        if count == 0:
            raise ValueError(f"data holds fewer samples than one batch of grad_batch_size={grad_batch_size}")
        stats.passes += 1
        if stats.distinct_batches is None:
            stats.distinct_batches = count
        if not reiterable:
            return


def sample_gradients(
    model: nn.Module,
    data: Iterable,
    layers: list[PrunableLayer],
    accumulators: dict[str, FisherInverse],
    num_grads: int,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    grad_batch_size: int | None = None,
    amp_dtype: torch.dtype | None = None,
    chunk: int = 16,
    progress: bool = True,
    desc: str = "gradients",
    warn_repeats: bool = True,
) -> SampleStats:
    """Stream ``num_grads`` mini-batch gradients of the given layers into their accumulators.

    Only the weights of ``layers`` require grad during sampling (the other weight-gradient
    GEMMs are skipped); the model's modes, flags and ``.grad`` are restored afterwards. Holds
    ``chunk`` gradients per layer (chunk × numel × 4 bytes) between accumulator updates.

    Returns:
        What was taken: the number of gradients (fewer than ``num_grads`` only when a one-shot
        iterator ran out) and how many distinct batches one pass over the data holds.
    """
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    was_training = model.training
    masks = {ly.name: (ly.weight.detach() == 0).flatten() for ly in layers}
    buffers = {ly.name: torch.zeros(chunk, ly.layout.num_blocks * ly.layout.block_size, device=device) for ly in layers}
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=num_grads, desc=desc, disable=not progress or tqdm is None, leave=False)
    stats = SampleStats()
    taken = 0
    fill = 0
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        for ly in layers:
            ly.weight.requires_grad_(True)
        autocast = (
            torch.autocast(device_type=device.type, dtype=amp_dtype)
            if amp_dtype is not None
            else contextlib.nullcontext()
        )
        for x, y in batches(data, grad_batch_size, stats):
            if taken >= num_grads:
                break
            if stats.passes == 1 and taken == stats.distinct_batches and warn_repeats:
                # the data went round before num_grads: say so now, not after the whole run
                warnings.warn(
                    f"ovit: the data holds only {taken} batches for {num_grads} gradients: they are being "
                    f"reused (about {num_grads / taken:.1f} uses each), which adds no information to the "
                    "Fisher. Give more data, or fewer num_grads",
                    RuntimeWarning,
                    stacklevel=3,
                )
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for ly in layers:
                ly.weight.grad = None
            with autocast:
                out = model(x)
            loss = loss_fn(out.float(), y)
            loss.backward()
            for ly in layers:
                g = ly.weight.grad.detach().flatten().float()
                row = buffers[ly.name][fill]
                row[: ly.layout.numel] = g.masked_fill(masks[ly.name], 0.0)
            fill += 1
            taken += 1
            bar.update(1)
            if fill == chunk or taken == num_grads:
                for ly in layers:
                    accumulators[ly.name].update(buffers[ly.name][:fill])
                fill = 0
        if fill:
            for ly in layers:
                accumulators[ly.name].update(buffers[ly.name][:fill])
    finally:
        bar.close()
        for p, f, g in zip(params, saved_flags, saved_grads):
            p.requires_grad_(f)
            p.grad = g
        model.train(was_training)
    stats.gradients = taken
    return stats
