"""OBS scores, the two pruners, global selection and reconstruction (SPEC §3).

Every function validates its inputs here, once, then runs the implementation the backend
selector picks. Blocks are independent, so any of these may be called on a slice of blocks
(for example one shard per GPU) and the results concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _backend, _checks
from .errors import NotPositiveDefiniteError

_PIVOT_HINT = (
    "a pivot H_qq <= 0, a non-finite score or NaN/Inf among the inputs was met even in float64; "
    "the inverse is not positive definite or not finite: use a larger damp"
)


def _positive_diag(finv: torch.Tensor, whole: bool = True) -> None:
    """Raise unless every diagonal entry is positive and finite (and, with ``whole``, every entry
    finite): one pass over the diagonal, or over the whole of finv."""
    diag = finv.diagonal(dim1=1, dim2=2)
    ok = (diag > 0).all(dim=1) & torch.isfinite(diag).all(dim=1)
    if whole:
        ok &= torch.isfinite(finv).all(dim=(1, 2))
    bad = (~ok).nonzero().flatten().tolist()
    if bad:
        raise NotPositiveDefiniteError("finv has a non-positive or non-finite diagonal / entries", bad)


PD_PIECE_BYTES = 64 << 20  # float64 temporaries of the positive-definiteness check


def _positive_definite(finv: torch.Tensor) -> None:
    """Raise unless every block is positive definite: a float64 Cholesky, a range of blocks at
    a time (B³/3 per block: far more than the ops that call it, hence their ``check_pd``)."""
    nb, b, _ = finv.shape
    step = max(1, PD_PIECE_BYTES // (2 * b * b * 8))
    bad: list[int] = []
    for s in range(0, nb, step):
        piece = finv[s : s + step].double()
        tol = 1e-4 if finv.dtype == torch.float32 else 1e-9
        sym = (piece - piece.transpose(1, 2)).abs().amax(dim=(1, 2)) <= tol * piece.abs().amax(dim=(1, 2))
        info = torch.linalg.cholesky_ex(piece).info
        bad += (s + ((info != 0) | ~sym).nonzero().flatten()).tolist()
    if bad:
        raise NotPositiveDefiniteError("finv is not symmetric positive definite", bad, hint=_PIVOT_HINT)


def obs_scores(
    w_blocks: torch.Tensor, finv: torch.Tensor, *, check_pd: bool = True, backend: str | None = None
) -> torch.Tensor:
    """Saliencies ρ_j = w_j² / (2 [H_b]_jj).

    Args:
        w_blocks: (nb, B) weights, any floating dtype.
        finv: (nb, B, B) float32/float64 inverse Fisher blocks, same device.
        check_pd: refuse blocks that are not symmetric positive definite (a float64 Cholesky of
            each, B³/3; pass False for inverses known to be, e.g. from :class:`FisherInverse`).

    Returns:
        (nb, B) tensor of ``finv.dtype``.
    """
    _, b = _checks.blocks_and_finv(w_blocks, finv)
    _positive_diag(finv, whole=False)  # the saliencies read only the diagonal
    if check_pd:
        _positive_definite(finv)
    _, fn = _backend.implementation(_backend.Case("obs_scores", finv.device, finv.dtype, b), backend)
    return fn(w_blocks, finv)


def obs_update_independent(
    w_blocks: torch.Tensor,
    finv: torch.Tensor,
    prune_mask: torch.Tensor,
    *,
    check_pd: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """WoodFisher/oBERT update: w ← w − H_b (w ⊙ 1_S / diag H_b), then w_S = 0.

    Args:
        w_blocks: (nb, B) weights.
        finv: (nb, B, B) float32/float64 inverse Fisher blocks.
        prune_mask: (nb, B) bool, True for the set S to prune.
        check_pd: as in :func:`obs_scores`.

    Returns:
        (nb, B) new weights in ``w_blocks.dtype`` (the input is not modified).
    """
    nb, b = _checks.blocks_and_finv(w_blocks, finv)
    _checks.bool_mask("prune_mask", prune_mask, (nb, b), finv.device)
    if check_pd:
        _positive_definite(finv)
    case = _backend.Case("obs_update_independent", finv.device, finv.dtype, b)
    _, fn = _backend.implementation(case, backend)
    if not getattr(fn, "scans_inputs", False):
        _positive_diag(finv)
        return fn(w_blocks, finv, prune_mask)
    _positive_diag(finv, whole=False)  # the kernel flags blocks with NaN/Inf entries as it reads them
    out, bad = fn(w_blocks, finv, prune_mask)
    if bool(bad.any()):
        raise NotPositiveDefiniteError(
            "finv has a non-positive or non-finite diagonal / entries", bad.nonzero().flatten().tolist()
        )
    return out


def _retry_fp64(bad: torch.Tensor, finv: torch.Tensor, run) -> torch.Tensor:
    """Indices of float32 blocks that failed, after re-running them in float64 via ``run``."""
    idx = bad.nonzero().flatten()
    if idx.numel() and finv.dtype == torch.float32:
        ok = run(idx)
        idx = idx[~ok]
    return idx


def obs_prune_order(
    w_blocks: torch.Tensor,
    finv: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    nm: tuple[int, int] | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """oViT correlation-aware greedy elimination of every block (SPEC §3).

    At each step the surviving entry with the smallest w_j²/H_jj is eliminated (ties: lowest
    index), the survivors get the OBS update and H is downdated. Entries of ``mask`` (True =
    already pruned) are eliminated first, in index order, at zero loss. With ``nm=(n, m)``,
    groups of m consecutive entries that already lost m − n are skipped, and B·(m−n)/m steps
    are taken.

    Args:
        w_blocks: (nb, B) weights, any floating dtype.
        finv: (nb, B, B) float32/float64 inverse Fisher blocks (positive definite).
        mask: optional (nb, B) bool of already-pruned entries.
        nm: optional (n, m) N:M pattern; m must divide B.

    Returns:
        ``(order, loss)``: int64 (nb, steps) eliminated positions and ``finv.dtype`` (nb, steps)
        cumulative losses (non-decreasing along steps).

    Raises:
        NotPositiveDefiniteError: a block meets a pivot H_qq <= 0 even after a float64 retry.
    """
    return _prune_order(w_blocks, finv, mask, nm, backend, in_place=False)


def obs_prune_order_(
    w_blocks: torch.Tensor,
    finv: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    nm: tuple[int, int] | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`obs_prune_order` that leaves the elimination's factor in ``finv`` (in place).

    For when the inverses are not needed afterwards (one pruning step): the final weights of any
    prefix of the order then cost one dot product per surviving weight
    (:func:`obs_reconstruct_factored`) instead of a factorisation per block, and no weight trace
    is stored — the factor takes the inverses' own memory. Block b of ``finv`` ends holding

    F[x, t] = H_t[x, q_t] / H_t[q_t, q_t] for a position x still present at step t (H_t the
    downdated inverse before step t, q_t = order[b, t]); F[q_t, t] = the weight at q_t just
    before step t (0 for a masked entry); 0 elsewhere (every column t ≥ steps).

    Args and returns as :func:`obs_prune_order`; ``finv`` must be contiguous.

    Raises:
        NotPositiveDefiniteError: as :func:`obs_prune_order`; ``finv`` then holds the factor of
            the blocks that succeeded and the input of those that did not.
        ValueError: bad arguments (``finv`` untouched).
    """
    _checks.tensor("finv", finv)
    if not finv.is_contiguous():
        raise ValueError("finv must be contiguous to be overwritten with the elimination's factor")
    return _prune_order(w_blocks, finv, mask, nm, backend, in_place=True)


def _prune_order(
    w_blocks: torch.Tensor,
    finv: torch.Tensor,
    mask: torch.Tensor | None,
    nm: tuple[int, int] | None,
    backend: str | None,
    in_place: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    nb, b = _checks.blocks_and_finv(w_blocks, finv)
    _checks.bool_mask("mask", mask, (nb, b), finv.device)
    nm = _checks.nm_pattern(nm, b)
    if nm is not None and mask is not None:
        n, m = nm
        lost = mask.view(nb, b // m, m).sum(-1)
        if bool((lost > m - n).any()):
            raise ValueError(f"mask already prunes more than {m - n} of {m} entries in some N:M group")
    variant = "+".join(v for v in ("mask" if mask is not None else "", f"nm={nm[0]}:{nm[1]}" if nm else "") if v)
    op = "obs_prune_order_" if in_place else "obs_prune_order"
    _, fn = _backend.implementation(_backend.Case(op, finv.device, finv.dtype, b, variant), backend)
    scans = getattr(fn, "scans_inputs", False)  # the kernel flags blocks with NaN/Inf inputs itself
    if not scans:
        _checks.finite("w_blocks", w_blocks)
    _positive_diag(finv, whole=not scans)
    order, loss, bad = fn(w_blocks, finv, mask, nm)

    def run64(idx: torch.Tensor) -> torch.Tensor:
        sub_mask = None if mask is None else mask[idx]
        case64 = _backend.Case(op, finv.device, torch.float64, b, variant)
        sub = finv[idx].double()  # a failed block still holds its input
        o, ls, bd = _backend.implementation(case64, backend)[1](w_blocks[idx], sub, sub_mask, nm)
        order[idx] = o.to(order.dtype)
        loss[idx] = ls.to(loss.dtype)
        if in_place:
            done = ~bd
            finv[idx[done]] = sub[done].to(finv.dtype)
        return ~bd

    still = _retry_fp64(bad, finv, run64)
    if still.numel():
        raise NotPositiveDefiniteError("greedy elimination failed", still.tolist(), hint=_PIVOT_HINT)
    return order, loss


def prune_counts(
    losses: torch.Tensor | Sequence[torch.Tensor],
    sparsity: float,
    *,
    exclude: torch.Tensor | Sequence[torch.Tensor] | None = None,
    backend: str | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """Global selection: how many entries of each block's order to prune (SPEC §3).

    Takes the K = floor(s · N_total + 0.5) smallest cumulative losses over every block of
    every layer (ties broken by loss, layer, block, step), which is a prefix of each block's
    order. Exactly K entries are pruned.

    Args:
        losses: one (nb, steps) tensor or a list of them (one per layer), same device.
        sparsity: s in [0, 1).
        exclude: optional, same structure with (nb,) ints: leading entries of each block's
            order that are pruned anyway (padding) and stand outside N_total and K.

    Returns:
        int64 counts k_b of the same structure as ``losses``: (nb,) or a list of (nb_l,).
    """
    s = _checks.sparsity(sparsity)
    single = isinstance(losses, torch.Tensor)
    layers = [losses] if single else list(losses)
    if not layers:
        raise ValueError("losses is empty")
    for i, loss in enumerate(layers):
        _checks.floating(f"losses[{i}]", loss)
        _checks.ndim(f"losses[{i}]", loss, 2, "(nb, steps)")
    dev = _checks.same_device(**{f"losses[{i}]": x for i, x in enumerate(layers)})
    excl = None
    if exclude is not None:
        excl = [exclude] if isinstance(exclude, torch.Tensor) else list(exclude)
        if len(excl) != len(layers):
            raise ValueError(f"exclude has {len(excl)} entries for {len(layers)} layers")
        for i, (e, loss) in enumerate(zip(excl, layers)):
            if e.shape != (loss.shape[0],) or e.dtype.is_floating_point or e.dtype == torch.bool:
                raise ValueError(f"exclude[{i}] must be an integer tensor of shape ({loss.shape[0]},)")
            if e.device != dev:
                raise ValueError(f"exclude[{i}] is on {e.device}, losses on {dev}")
            if bool(((e < 0) | (e > loss.shape[1])).any()):
                raise ValueError(f"exclude[{i}] must lie in [0, {loss.shape[1]}]")
    _, fn = _backend.implementation(_backend.Case("prune_counts", dev), backend)
    if not getattr(fn, "scans_inputs", False):
        for i, loss in enumerate(layers):
            _checks.finite(f"losses[{i}]", loss)
    out = fn(layers, s, excl)
    return out[0] if single else out


def _check_order(order: torch.Tensor, b: int) -> None:
    """Raise unless every row of ``order`` holds distinct positions in [0, b)."""
    if bool(((order < 0) | (order >= b)).any()):
        raise ValueError(f"order holds positions outside [0, {b})")
    if order.shape[1] > 1:
        srt = order.sort(dim=1).values
        if bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError("order repeats a position within a block")


def _order_codes(bad: torch.Tensor, b: int) -> torch.Tensor:
    """A scanning reconstruction kernel's (nb,) uint8 codes: raise for a bad ``order`` (2: a
    position outside [0, b), 3: a repeated one); return the bool of blocks to retry (1)."""
    if bool((bad == 2).any()):
        raise ValueError(f"order holds positions outside [0, {b})")
    if bool((bad == 3).any()):
        raise ValueError("order repeats a position within a block")
    return bad == 1


def _reconstruct_args(
    w_blocks: torch.Tensor, finv: torch.Tensor, order: torch.Tensor, counts: torch.Tensor, name: str
) -> tuple[int, int]:
    nb, b = _checks.blocks_and_finv(w_blocks, finv, finv_name=name)
    _checks.tensor("order", order)
    _checks.tensor("counts", counts)
    if order.dtype.is_floating_point or order.dtype == torch.bool or order.dim() != 2 or order.shape[0] != nb:
        got = f"{order.dtype} {tuple(order.shape)}"
        raise ValueError(f"order must be an integer tensor of shape ({nb}, steps), got {got}")
    if order.shape[1] > b:
        raise ValueError(f"order has {order.shape[1]} steps, more than the block size {b}")
    if counts.dtype.is_floating_point or counts.dtype == torch.bool or tuple(counts.shape) != (nb,):
        got = f"{counts.dtype} {tuple(counts.shape)}"
        raise ValueError(f"counts must be an integer tensor of shape ({nb},), got {got}")
    _checks.same_device(w_blocks=w_blocks, **{name: finv}, order=order, counts=counts)
    if bool(((counts < 0) | (counts > order.shape[1])).any()):
        raise ValueError(f"counts must lie in [0, {order.shape[1]}]")
    return nb, b


def obs_reconstruct(
    w_blocks: torch.Tensor,
    finv: torch.Tensor,
    order: torch.Tensor,
    counts: torch.Tensor,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final weights: the joint OBS solution for the first ``counts[b]`` entries of each order.

    Args:
        w_blocks: (nb, B) weights as given to :func:`obs_prune_order`.
        finv: (nb, B, B) float32/float64 inverse Fisher blocks.
        order: (nb, steps) integer positions from :func:`obs_prune_order`.
        counts: (nb,) integers in [0, steps] from :func:`prune_counts`.

    Returns:
        ``(w_new, keep)``: (nb, B) weights in ``w_blocks.dtype`` with the pruned entries zero,
        and a (nb, B) bool mask, True where a weight is kept.
    """
    nb, b = _reconstruct_args(w_blocks, finv, order, counts, "finv")
    _, fn = _backend.implementation(_backend.Case("obs_reconstruct", finv.device, finv.dtype, b), backend)
    scans = getattr(fn, "scans_inputs", False)
    if not scans:  # a scanning kernel checks the order, the diagonal and NaN/Inf as it reads them
        _check_order(order, b)
        _checks.finite("w_blocks", w_blocks)
        _positive_diag(finv)
    w_new, keep, bad = fn(w_blocks, finv, order, counts)
    if scans:
        bad = _order_codes(bad, b)

    def run64(idx: torch.Tensor) -> torch.Tensor:
        fn64 = _backend.implementation(_backend.Case("obs_reconstruct", finv.device, torch.float64, b), backend)[1]
        wn, kp, bd = fn64(w_blocks[idx], finv[idx].double(), order[idx], counts[idx])
        bd = bd.bool()
        w_new[idx] = wn.to(w_new.dtype)
        keep[idx] = kp
        return ~bd

    still = _retry_fp64(bad, finv, run64)
    if still.numel():
        raise NotPositiveDefiniteError("reconstruction failed", still.tolist(), hint=_PIVOT_HINT)
    return w_new, keep


def obs_reconstruct_factored(
    w_blocks: torch.Tensor,
    factor: torch.Tensor,
    order: torch.Tensor,
    counts: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final weights from the factor :func:`obs_prune_order_` left: the same joint OBS solution
    as :func:`obs_reconstruct` for the first ``counts[b]`` entries of each order, computed as
    w − Σ_{t<k} F[q_t, t] · F[:, t] ((B − k)·k multiply-adds per block, no factorisation).

    Args:
        w_blocks: (nb, B) weights as given to :func:`obs_prune_order_`.
        factor: (nb, B, B) float32/float64, ``finv`` after :func:`obs_prune_order_`.
        order: (nb, steps) integer positions from :func:`obs_prune_order_`.
        counts: (nb,) integers in [0, steps] from :func:`prune_counts`.
        mask: the ``mask`` given to :func:`obs_prune_order_`, if any (its entries count as 0,
            as the elimination took them).

    Returns:
        ``(w_new, keep)`` as :func:`obs_reconstruct`.

    Raises:
        ValueError: bad arguments, or a NaN/Inf among the weights, the multipliers read or the
            results (a factor that did not come from a successful elimination).
    """
    nb, b = _reconstruct_args(w_blocks, factor, order, counts, "factor")
    _checks.bool_mask("mask", mask, (nb, b), factor.device)
    if mask is not None:
        w_blocks = w_blocks.masked_fill(mask, 0)
    _, fn = _backend.implementation(_backend.Case("obs_reconstruct_factored", factor.device, factor.dtype, b), backend)
    scans = getattr(fn, "scans_inputs", False)
    if not scans:
        _check_order(order, b)
    w_new, keep, bad = fn(w_blocks, factor, order, counts)
    bad = _order_codes(bad, b) if scans else bad
    if bool(bad.any()):
        raise ValueError(
            f"NaN/Inf in the weights, the factor or the results of blocks {bad.nonzero().flatten().tolist()[:20]}: "
            "the factor must come from a successful obs_prune_order_ on these weights"
        )
    return w_new, keep
