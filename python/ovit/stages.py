"""The stages of a pruning step after the Fisher: eliminate or score, select, reconstruct, commit.

Every stage takes a list of :class:`~ovit.layers.PrunableLayer` (any slice of the model: a
layer group, the layers of one shard) and per-layer dicts keyed by layer name, and returns
per-layer results; only :func:`select` looks across layers (the global K), and it only needs the
per-block losses or scores, which are small. Blocks are independent in every other stage, so a
stage run on a subset of a layer's blocks gives those blocks' part of the result. The drivers —
``ovit.pruner.run_step`` (one step on one process, layer groups when memory is short; behind
:class:`ovit.Pruner` and :func:`ovit.one_shot_prune`, one step of a fresh Pruner) and
:func:`ovit.distributed.distributed_prune` (one step across ranks) — chain them:
sample → Fisher → :func:`eliminate` / :func:`score` → :func:`select` → :func:`reconstruct` →
:func:`commit`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

import ovit_kernels as ok

from .layers import PrunableLayer


@dataclass(frozen=True)
class StepSpec:
    """What one pruning step does (the fields the stages read).

    Attributes:
        method: ``"ovit" | "woodfisher" | "magnitude" | "global_magnitude"``.
        sparsity: target fraction of the selected weights, in [0, 1).
        nm: ``(n, m)`` for an N:M pattern, else None.
        fisher_dtype: float32/float64 of the inverses and the elimination.
        damp, damp_mode: the damping the inverses were computed with.
        backend: the ``ovit_kernels`` backend of every op.
        device: where the work runs.
    """

    method: str
    sparsity: float
    nm: tuple[int, int] | None
    fisher_dtype: torch.dtype
    damp: float
    damp_mode: str
    backend: str | None
    device: torch.device


def weight_blocks(ly: PrunableLayer, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weights as (num_blocks, B) in ``dtype``, padding zero."""
    return ly.blocks(ly.weight.detach().flatten().to(dtype))


def _premask(ly: PrunableLayer, wb: torch.Tensor, spec: StepSpec) -> torch.Tensor:
    """The elimination's input mask: already-zero weights, and the padding (unstructured)."""
    pad = ly.pad_mask(spec.device)
    return (wb == 0) | pad if spec.nm is None else (wb == 0) & ~pad


def factored_elimination(spec: StepSpec) -> bool:
    """Whether a step may let the elimination leave its factor in the inverses' storage (CPU:
    the kernels that do it run there, and the final weights then cost a dot product per weight
    instead of a factorisation per block). Only for inverses the step owns (not a cache's)."""
    if spec.method != "ovit" or spec.device.type != "cpu":
        return False
    req = (spec.backend or os.environ.get("OVIT_BACKEND") or "auto").strip().lower()
    if req == "auto":  # the cpu backend or the reference: both have the two ops
        return True
    st = ok.available_backends().get(req)
    return st is not None and {"obs_prune_order_", "obs_reconstruct_factored"} <= set(st.ops)


def eliminate(
    layers: list[PrunableLayer], finvs: dict[str, torch.Tensor], spec: StepSpec, *, consume: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """oViT's greedy elimination of every block: ``(orders, losses)`` per layer, each (nb, steps).

    Weights that are already zero are given as pre-pruned (eliminated first, at zero loss);
    unstructured padding too (and excluded from the count by :func:`select`); with N:M the
    padding fills whole groups of its own, which the greedy empties first at zero loss.
    With ``consume``, ``finvs[name]`` is replaced by the elimination's factor
    (``ok.obs_prune_order_``, in the inverse's memory when it is on ``spec.device``), for
    :func:`reconstruct` with ``factored=True``.
    """
    orders, losses = {}, {}
    for ly in layers:
        wb = weight_blocks(ly, spec.fisher_dtype)
        pre = _premask(ly, wb, spec)
        h = finvs[ly.name].to(spec.device)
        if consume:
            h = h.contiguous()
            orders[ly.name], losses[ly.name] = ok.obs_prune_order_(wb, h, mask=pre, nm=spec.nm, backend=spec.backend)
            finvs[ly.name] = h
        else:
            orders[ly.name], losses[ly.name] = ok.obs_prune_order(wb, h, mask=pre, nm=spec.nm, backend=spec.backend)
    return orders, losses


def score(layers: list[PrunableLayer], finvs: dict[str, torch.Tensor], spec: StepSpec) -> dict[str, torch.Tensor]:
    """WoodFisher's OBS saliencies w²/(2 H_jj) per layer, (nb, B) float32."""
    out = {}
    for ly in layers:
        h = finvs[ly.name].to(spec.device)
        w = weight_blocks(ly, spec.fisher_dtype)  # finvs come from FisherInverse: positive definite
        out[ly.name] = ok.obs_scores(w, h, check_pd=False, backend=spec.backend).float()
    return out


def _nm_select(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """(nb, B) scores → bool mask pruning the m − n smallest of every group of m (stable)."""
    nb, b = scores.shape
    g = scores.reshape(nb, b // m, m)
    idx = torch.sort(g, dim=-1, stable=True).indices[..., : m - n]
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.view(nb, b)


def global_select(
    keys: list[torch.Tensor], real: list[torch.Tensor], sparsity: float, backend: str | None = None
) -> list[torch.Tensor]:
    """The K = floor(s·N + 0.5) smallest keys over the real entries of every layer, chosen by
    ``ok.prune_counts`` on each block's sorted keys: the same K rule and tie-breaking (key, layer,
    block, position) as the oViT selection. Keys must be >= -1 (padding is set below them).
    Returns bool masks (True = prune) shaped like ``keys``, never on padding."""
    srt, idxs, excl = [], [], []
    for k, r in zip(keys, real):
        s, idx = torch.sort(torch.where(r, k, torch.full_like(k, -2.0)), dim=1, stable=True)
        srt.append(s)
        idxs.append(idx)
        excl.append((~r).sum(1))
    counts = ok.prune_counts(srt, sparsity, exclude=excl, backend=backend)
    out = []
    for s, idx, c, r in zip(srt, idxs, counts, real):
        take = torch.arange(s.shape[1], device=s.device).unsqueeze(0) < c.unsqueeze(1)
        out.append(torch.zeros_like(take).scatter_(1, idx, take) & r)
    return out


def select(
    layers: list[PrunableLayer],
    spec: StepSpec,
    *,
    losses: dict[str, torch.Tensor] | None = None,
    scores: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The global selection over ``layers``.

    oViT (``losses`` from :func:`eliminate`): (nb,) int64 counts per layer — how many entries of
    each block's order to prune, exactly K = ⌊s·N + ½⌋ real entries over all layers (padding
    stands outside N and K); with N:M, every step of the order.
    Other methods: (nb, B) bool masks per layer, True = prune (padding included): WoodFisher by
    ``scores``, magnitude per layer, global magnitude over all layers; already-zero weights first.
    """
    dev = spec.device
    if spec.method == "ovit":
        if losses is None:
            raise ValueError("the oViT selection needs the elimination's losses")
        if spec.nm is not None:
            return {ly.name: torch.full((ly.layout.num_blocks,), losses[ly.name].shape[1], device=dev) for ly in layers}
        excl = []
        for ly in layers:
            e = torch.zeros(ly.layout.num_blocks, dtype=torch.int64, device=dev)
            if ly.layout.pad:
                e[-1] = ly.layout.pad
            excl.append(e)
        counts = ok.prune_counts([losses[ly.name] for ly in layers], spec.sparsity, exclude=excl, backend=spec.backend)
        return {ly.name: c for ly, c in zip(layers, counts)}
    if spec.method == "woodfisher" and scores is None:
        raise ValueError("the WoodFisher selection needs the saliencies")
    wbs = {ly.name: weight_blocks(ly, torch.float32) for ly in layers}
    pads = {ly.name: ly.pad_mask(dev) for ly in layers}
    keys = [scores[ly.name] if spec.method == "woodfisher" else wbs[ly.name].abs() for ly in layers]  # type: ignore[index]
    # already-pruned real weights go first; padding stands outside the count
    keys = [torch.where(wbs[ly.name] == 0, torch.full_like(k, -1.0), k) for ly, k in zip(layers, keys)]
    if spec.nm is not None:
        prune = [_nm_select(torch.where(pads[ly.name], torch.full_like(k, -2.0), k), *spec.nm) | pads[ly.name]
                 for ly, k in zip(layers, keys)]  # fmt: skip
    elif spec.method == "magnitude":
        prune = [global_select([k], [~pads[ly.name]], spec.sparsity, spec.backend)[0] | pads[ly.name]
                 for ly, k in zip(layers, keys)]  # fmt: skip
    else:
        sel = global_select(keys, [~pads[ly.name] for ly in layers], spec.sparsity, spec.backend)
        prune = [s | pads[ly.name] for ly, s in zip(layers, sel)]
    return {ly.name: p for ly, p in zip(layers, prune)}


def quadratic_loss(delta: torch.Tensor, finv: torch.Tensor, piece_bytes: int = 32 << 20) -> float:
    """½ δᵀ F δ summed over blocks, with F = H⁻¹ (solved by Cholesky of H in float64), a range
    of blocks at a time so that the float64 temporaries stay within ``piece_bytes``."""
    nb, b, _ = finv.shape
    step = max(1, piece_bytes // (2 * b * b * 8))
    total = 0.0
    for s in range(0, nb, step):
        chol, info = torch.linalg.cholesky_ex(finv[s : s + step].double())
        d = delta[s : s + step].double().unsqueeze(-1)
        val = 0.5 * (d * torch.cholesky_solve(d, chol)).sum(dim=(1, 2))
        total += float(val[info == 0].sum())
    return total


def reconstruct(
    layers: list[PrunableLayer],
    spec: StepSpec,
    selection: dict[str, torch.Tensor],
    *,
    finvs: dict[str, torch.Tensor] | None = None,
    orders: dict[str, torch.Tensor] | None = None,
    losses: dict[str, torch.Tensor] | None = None,
    grams: dict[str, tuple[torch.Tensor, int]] | None = None,
    factored: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float | None]:
    """New weights for the selection: ``(new_w, keep, est_loss_increase)``.

    oViT: the joint OBS solution of each block's pruned prefix (``finvs``, ``orders``,
    ``selection`` = counts; with ``factored``, ``finvs`` holds the factors :func:`eliminate`
    left with ``consume``); the loss is the cumulative loss at each block's count. WoodFisher:
    the independent OBS update of the selected set, its loss ½ δᵀFδ from the Gram when
    ``grams`` holds ``(gram, m)`` for the layer, else by factorising the inverse. Magnitude:
    the selected weights zeroed (no loss estimate). Inverses are popped from ``finvs`` as they
    are used. ``new_w`` is (nb, B) per layer, ``keep`` (nb, B) bool, True = kept.
    """
    new_w, keep = {}, {}
    est: float | None = None
    dev = spec.device
    if spec.method == "ovit":
        assert finvs is not None and orders is not None and losses is not None
        est = 0.0
        for ly in layers:
            cnt = selection[ly.name]
            h = finvs.pop(ly.name).to(dev)
            wb = weight_blocks(ly, spec.fisher_dtype)
            if factored:
                w2, kp = ok.obs_reconstruct_factored(wb, h, orders[ly.name], cnt, mask=_premask(ly, wb, spec),
                                                     backend=spec.backend)  # fmt: skip
            else:
                w2, kp = ok.obs_reconstruct(wb, h, orders[ly.name], cnt, backend=spec.backend)
            loss = losses[ly.name]
            idx = (cnt - 1).clamp_min(0).unsqueeze(1)
            est += float(torch.where(cnt > 0, loss.gather(1, idx).squeeze(1), torch.zeros_like(loss[:, 0])).sum())
            new_w[ly.name], keep[ly.name] = w2, kp
        return new_w, keep, est
    if spec.method == "woodfisher":
        est = 0.0
    for ly in layers:
        pm = selection[ly.name]
        wb = weight_blocks(ly, torch.float32)
        if spec.method == "woodfisher":
            assert finvs is not None
            h = finvs.pop(ly.name).to(dev)
            w2 = ok.obs_update_independent(
                wb.to(spec.fisher_dtype), h, pm, check_pd=False, backend=spec.backend
            ).float()
            if grams is not None and ly.name in grams:  # ½ δᵀFδ from the Gram: B² per block, no factorisation
                gram, m = grams[ly.name]
                est += float(ok.fisher_quadratic(w2 - wb, gram.to(dev), m, spec.damp, damp_mode=spec.damp_mode).sum())
            else:
                est += quadratic_loss(w2 - wb, h)
        else:
            w2 = wb.masked_fill(pm, 0.0)
        new_w[ly.name], keep[ly.name] = w2, ~pm
    return new_w, keep, est


def commit(layers: list[PrunableLayer], new_w: dict[str, torch.Tensor], keep: dict[str, torch.Tensor]) -> None:
    """Write the new weights into the model, pruned entries exactly zero — all or nothing: if
    anything (even an interrupt) stops it half way, the layers written so far are restored."""
    written: list[tuple[PrunableLayer, torch.Tensor]] = []
    with torch.no_grad():
        try:
            for ly in layers:
                old = ly.weight.detach().clone()
                written.append((ly, old))
                ly.weight.copy_(ly.unblock(new_w[ly.name]).to(ly.weight.dtype))
                ly.weight.view(-1)[~keep[ly.name].reshape(-1)[: ly.layout.numel]] = 0
        except BaseException:
            for ly, old in written:
                ly.weight.copy_(old)
            raise
