"""Gradient sampling (the paper's empirical Fisher): model in eval mode, gradients of
already-pruned weights masked, each gradient streamed into the layers' ``FisherInverse``
accumulators in chunks (never all m stored).

Two ways to get the same kind of gradient — the gradient of the mean loss over g samples
(``grad_batch_size`` = g; the paper uses mini-batches of 128, the empirical Fisher by its
definition g = 1):

- ``grad_mode="mini_batch"``: one forward/backward pass per gradient, on g samples.
- ``grad_mode="per_sample"`` (g = 1) and ``"micro_batch"`` (any g): forward/backward passes
  over ``pass_batch_size`` samples; each pruned layer's per-sample weight gradients are formed
  from its saved input and its output gradient (Σ over tokens of δ_t x_tᵀ; Conv2d through
  ``unfold``) and averaged over consecutive groups of g. One backward pass gives
  ``pass_batch_size / g`` gradients, so m gradients cost m·g samples of compute instead of m
  passes. ``loss_fn`` must average over the samples of a batch (PyTorch's default reduction):
  the per-sample gradient is the batch size times its share of the batch gradient.

Damping follows the estimator: mini-batch gradients of g samples have E[ḡḡᵀ] ≈ F/g near a
minimum, so an absolute λ tuned for one g means a different method at another. A relative λ
(``damp_mode="relative"``: λ times the mean of each block's Fisher diagonal) scales with the
Gram and is the recommended choice when switching modes or g.
"""

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
        samples: samples that went through a forward/backward pass.
        distinct_gradients: gradients one full pass over the data gives (None while no pass has
            ended).
    """

    gradients: int = 0
    distinct_batches: int | None = None
    passes: int = 0
    samples: int = 0
    distinct_gradients: int | None = None

    @property
    def repeats(self) -> bool:
        """True when some gradients came from data already used."""
        return self.distinct_gradients is not None and self.gradients > self.distinct_gradients


def batches(
    data: Iterable, grad_batch_size: int | None = None, stats: SampleStats | None = None, tail: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(inputs, targets)`` forever when ``data`` can be iterated again (a DataLoader,
    a list), or until it ends (a one-shot iterator). With ``grad_batch_size``, samples are
    re-cut into batches of that size (with ``tail``, the samples left at the end of a pass
    come as one smaller batch; otherwise they are dropped). ``stats`` counts the batches of a
    full pass."""
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
        if tail and have:
            count += 1
            yield torch.cat(buf_x), torch.cat(buf_y)
        if not got_any:
            raise ValueError("data yielded no batches")
        if count == 0:
            raise ValueError(f"data holds fewer samples than one batch of grad_batch_size={grad_batch_size}")
        stats.passes += 1
        if stats.distinct_batches is None:
            stats.distinct_batches = count
        if not reiterable:
            return


GRAD_MODES = ("mini_batch", "per_sample", "micro_batch")


def logits(out) -> torch.Tensor:
    """A model's output as the tensor a loss takes: the tensor itself, the ``logits`` of a
    Hugging Face output, or the first element of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot take a loss of a model output of type {type(out).__name__}")


PIECE_BYTES = 32 << 20  # per-sample gradients of one layer are formed this many bytes at a time


def grad_group(grad_mode: str, grad_batch_size: int | None) -> int | None:
    """The number g of samples averaged into one gradient for a mode (None: the data's batches,
    mini-batch mode only); checks the pair."""
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    if grad_batch_size is not None and (int(grad_batch_size) != grad_batch_size or grad_batch_size < 1):
        raise ValueError(f"grad_batch_size must be a positive int, got {grad_batch_size!r}")
    if grad_mode == "per_sample":
        if grad_batch_size not in (None, 1):
            raise ValueError(
                f"grad_mode='per_sample' takes one sample per gradient, got grad_batch_size={grad_batch_size}; "
                "use grad_mode='micro_batch' to average groups of samples"
            )
        return 1
    if grad_mode == "micro_batch" and grad_batch_size is None:
        raise ValueError("grad_mode='micro_batch' needs grad_batch_size, the samples averaged into one gradient")
    return None if grad_batch_size is None else int(grad_batch_size)


def per_sample_weight_grads(module: nn.Module, x: torch.Tensor, delta: torch.Tensor, n: int) -> torch.Tensor:
    """Per-sample gradients of ``module.weight`` from one call's input and output gradient.

    Args:
        module: ``nn.Linear`` or ``nn.Conv2d`` (zero padding).
        x: the call's input, (n, ..., in) for Linear (leading dims may fold further axes of
            the sample after n, e.g. windows: (n·w, t, in)), (n, C, H, W) for Conv2d.
        delta: the gradient of the loss with respect to the call's output, same leading shape.
        n: the number of samples.

    Returns:
        (n, numel) float32 (float64 for float64 inputs): Σ over the sample's positions of δ xᵀ,
        flattened like the weight.
    """
    dt = torch.promote_types(x.dtype, torch.float32)
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str) and module.padding != "valid":
            raise ValueError(f"per-sample gradients need a Conv2d with explicit zero padding, got {module}")
        pad = (0, 0) if isinstance(module.padding, str) else module.padding
        cols = nn.functional.unfold(x.to(dt), module.kernel_size, module.dilation, pad, module.stride)  # (n, Ckk, L)
        g = module.groups
        o = delta.shape[1]
        cols = cols.view(n, g, cols.shape[1] // g, cols.shape[2])
        d = delta.to(dt).reshape(n, g, o // g, -1)
        return torch.einsum("ngol,ngkl->ngok", d, cols).reshape(n, -1)
    xin = x.to(dt).reshape(n, -1, x.shape[-1])
    d = delta.to(dt).reshape(n, -1, delta.shape[-1])
    return torch.einsum("nto,nti->noi", d, xin).reshape(n, -1)


class _Streams:
    """Per-layer buffers of ``chunk`` gradient rows, flushed into the accumulators when full."""

    def __init__(self, layers: list[PrunableLayer], accumulators: dict[str, FisherInverse], chunk: int, device):
        self.acc = accumulators
        self.buf = {ly.name: torch.zeros(chunk, ly.layout.num_blocks * ly.layout.block_size, device=device)
                    for ly in layers}  # fmt: skip
        self.fill = {ly.name: 0 for ly in layers}

    def push(self, ly: PrunableLayer, rows: torch.Tensor, mask: torch.Tensor) -> None:
        """Append (k, numel) gradients, masked, flushing as the buffer fills."""
        buf, numel, done = self.buf[ly.name], ly.layout.numel, 0
        while done < rows.shape[0]:
            f = self.fill[ly.name]
            take = min(buf.shape[0] - f, rows.shape[0] - done)
            buf[f : f + take, :numel] = rows[done : done + take].masked_fill(mask, 0.0)
            self.fill[ly.name] = f + take
            done += take
            if self.fill[ly.name] == buf.shape[0]:
                self.flush(ly.name)

    def flush(self, name: str | None = None) -> None:
        for key in [name] if name is not None else list(self.buf):
            if self.fill[key]:
                self.acc[key].update(self.buf[key][: self.fill[key]])
                self.fill[key] = 0


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
    grad_mode: str = "mini_batch",
    pass_batch_size: int | None = None,
    amp_dtype: torch.dtype | None = None,
    chunk: int = 16,
    progress: bool = True,
    desc: str = "gradients",
    warn_repeats: bool = True,
) -> SampleStats:
    """Stream ``num_grads`` gradients of the given layers into their accumulators.

    Each gradient is that of the mean loss over ``grad_batch_size`` samples (or over one batch
    of the data as it comes, in mini-batch mode without it); ``grad_mode`` says how they are
    computed (module docstring). Only the weights of ``layers`` require grad during sampling;
    in the per-sample modes no weight gradient is formed at all (the backward pass stops at the
    layers' outputs). The model's modes, flags and ``.grad`` are restored afterwards.

    Memory: ``chunk`` gradients per layer (chunk × numel × 4 bytes) between accumulator
    updates; in the per-sample modes also the saved inputs and output gradients of the pruned
    layers for one pass (activation-sized) and one layer's per-sample gradients at a time, at
    most ``PIECE_BYTES`` (or one group of g samples if that is larger).

    Args:
        grad_mode: ``"mini_batch"``, ``"per_sample"`` or ``"micro_batch"``.
        pass_batch_size: samples per forward/backward pass in the per-sample modes (a multiple
            of g); default: the data's batches as they come for g = 1, else 64 rounded up to a
            multiple of g.

    Returns:
        What was taken: the number of gradients (fewer than ``num_grads`` only when a one-shot
        iterator ran out), the samples processed and how much distinct data one pass holds.
    """
    group = grad_group(grad_mode, grad_batch_size)
    if grad_mode == "mini_batch":
        recut = group
    else:
        assert group is not None
        if pass_batch_size is not None and (int(pass_batch_size) != pass_batch_size or pass_batch_size < 1
                                            or pass_batch_size % group):  # fmt: skip
            raise ValueError(f"pass_batch_size must be a positive multiple of {group}, got {pass_batch_size!r}")
        recut = pass_batch_size if pass_batch_size is not None else (None if group == 1 else -(-64 // group) * group)
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    was_training = model.training
    masks = {ly.name: (ly.weight.detach() == 0).flatten() for ly in layers}
    streams = _Streams(layers, accumulators, chunk, device)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=num_grads, desc=desc, disable=not progress or tqdm is None, leave=False)
    stats = SampleStats()
    taken = 0
    warned = False
    handles: list = []
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {ly.name: [] for ly in layers}
    checked = False
    recording = [True]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        for ly in layers:
            ly.weight.requires_grad_(True)
        if grad_mode != "mini_batch":
            for ly in layers:

                def hook(mod, inputs, output, _name=ly.name):
                    if recording[0] and torch.is_grad_enabled() and output.requires_grad:
                        calls[_name].append((inputs[0].detach(), output))

                handles.append(ly.module.register_forward_hook(hook))
        autocast = (
            torch.autocast(device_type=device.type, dtype=amp_dtype)
            if amp_dtype is not None
            else contextlib.nullcontext()
        )
        for x, y in batches(data, recut, stats, tail=grad_mode != "mini_batch"):
            if taken >= num_grads:
                break
            if stats.passes >= 1 and stats.distinct_gradients is None:
                if taken == 0:
                    raise ValueError(f"a whole pass over the data gave no gradient of {group} samples")
                stats.distinct_gradients = taken
                if warn_repeats and not warned:
                    # the data went round before num_grads: say so now, not after the whole run
                    warned = True
                    warnings.warn(
                        f"ovit: the data gives only {taken} gradients for {num_grads}: they are being reused "
                        f"(about {num_grads / taken:.1f} uses each), which adds no information to the Fisher. "
                        "Give more data, or fewer num_grads",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            if grad_mode == "mini_batch":
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                for ly in layers:
                    ly.weight.grad = None
                with autocast:
                    out = logits(model(x))
                loss = loss_fn(out.float(), y)
                loss.backward()
                for ly in layers:
                    streams.push(ly, ly.weight.grad.detach().flatten().float().unsqueeze(0), masks[ly.name])
                stats.samples += int(x.shape[0]) if hasattr(x, "shape") else 1
                taken += 1
                bar.update(1)
                continue
            assert group is not None
            n = min(int(x.shape[0]) // group, num_grads - taken) * group  # whole groups, no more than needed
            if n == 0:
                continue
            x, y = x[:n].to(device, non_blocking=True), y[:n].to(device, non_blocking=True)
            for c in calls.values():
                c.clear()
            with autocast:
                out = logits(model(x))
            loss = loss_fn(out.float(), y)
            outs = [o for ly in layers for _, o in calls[ly.name]]
            if len(outs) == 0:
                raise RuntimeError("none of the pruned layers took part in the forward pass")
            deltas = iter(torch.autograd.grad(loss, outs, allow_unused=True))
            single = None
            if not checked:  # the first sample alone, for the check below
                recording[0] = False
                with autocast:
                    one = loss_fn(logits(model(x[:1])).float(), y[:1])
                single = torch.autograd.grad(one, [ly.weight for ly in layers], allow_unused=True)
                recording[0] = True
            for i, ly in enumerate(layers):
                pairs = [(xi, d) for (xi, _), d in zip(calls[ly.name], deltas) if d is not None]
                calls[ly.name].clear()
                per = max(group, (PIECE_BYTES // max(1, 4 * ly.layout.numel)) // group * group)
                for s0 in range(0, n, per):
                    s1 = min(n, s0 + per)
                    k = s1 - s0
                    ps = None
                    for xi, d in pairs:
                        if xi.shape[0] % n:
                            raise ValueError(f"{ly.name!r} was called on {xi.shape[0]} rows for {n} samples: "
                                             "per-sample gradients need the samples along the leading dimension; "
                                             "use grad_mode='mini_batch' for this model")  # fmt: skip
                        lead = xi.shape[0] // n  # a call may fold further axes of each sample into dim 0
                        part = per_sample_weight_grads(
                            ly.module, xi[s0 * lead : s1 * lead], d[s0 * lead : s1 * lead], k
                        )
                        ps = part if ps is None else ps + part
                    if ps is None:  # the layer took no part in this pass's loss
                        ps = torch.zeros(k, ly.layout.numel, device=device)
                    ps.mul_(n)  # the loss averages over n samples: each sample's share of the batch gradient × n
                    if single is not None and s0 == 0:
                        _check_first_sample(ly, ps[0], single[i], masks[ly.name], amp_dtype is not None)
                    streams.push(ly, ps.view(k // group, group, -1).mean(1), masks[ly.name])
            checked = True
            stats.samples += n
            taken += n // group
            bar.update(n // group)
        streams.flush()
    finally:
        for h in handles:
            h.remove()
        bar.close()
        for p, f, g in zip(params, saved_flags, saved_grads):
            p.requires_grad_(f)
            p.grad = g
        model.train(was_training)
    stats.gradients = taken
    if stats.distinct_gradients is None and stats.passes >= 1:
        stats.distinct_gradients = taken
    return stats


def _check_first_sample(
    ly: PrunableLayer, got: torch.Tensor, want: torch.Tensor | None, pruned: torch.Tensor, amp: bool
) -> None:
    """On the first pass: the first sample's gradient formed from the batch must equal a backward
    pass on that sample alone (it does not when a layer mixes the samples of a batch, or when
    ``loss_fn`` does not average over the batch), compared where weights are not pruned (the
    gradients of pruned weights are masked anyway, and hooks may mask them in ``want``)."""
    ref = torch.zeros_like(got) if want is None else want.detach().to(got.dtype).flatten()
    got, ref = got.masked_fill(pruned, 0), ref.masked_fill(pruned, 0)
    scale = float(ref.abs().max()) + 1e-12
    err = float((got - ref).abs().max()) / scale
    if err > (5e-2 if amp else 1e-3):
        raise ValueError(
            f"per-sample gradients of {ly.name!r} differ from a backward pass on one sample (relative error "
            f"{err:.1e}): the model mixes the samples of a batch there, or loss_fn does not average over the "
            "batch; use grad_mode='mini_batch'"
        )
