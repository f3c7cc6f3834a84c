"""Reference backend: plain PyTorch, vectorised over blocks, correct in float64.

This module is the executable specification (SPEC §2, §3) that the Triton and CUDA backends
are tested against. Functions here assume validated inputs (see ``ovit_kernels.ops``) and
never modify their inputs except those whose name ends in ``_``.
"""

from __future__ import annotations

import math

import torch

from ._precision import no_tf32
from .sparse_formats import PackedWeight, unpack

# ---------------------------------------------------------------------------------------------
# Fisher inverse (SPEC §2)
# ---------------------------------------------------------------------------------------------


WOODBURY_RANK = 64  # gradients folded into one rank-k Woodbury step
WOODBURY_PIECE_BYTES = 32 << 20  # float64 working set of one range of blocks


def woodbury_update_(finv: torch.Tensor, grads: torch.Tensor, num_grads: float) -> None:
    """Apply the Sherman–Morrison steps of ``grads`` (k, N) to ``finv`` (nb, B, B), in order.

    Up to ``WOODBURY_RANK`` gradients at a time are applied as one rank-k Woodbury step, which
    equals the sequence of rank-one steps in exact arithmetic: with G the (B, k) chunk of a
    block, U = H G, S = m I + Gᵀ U = L Lᵀ (Cholesky), V = U L⁻ᵀ and H ← H − V Vᵀ. Everything
    is computed in float64 and the state is rounded to its dtype once per call (a range of
    blocks at a time, at most ``WOODBURY_PIECE_BYTES`` of float64 copies), so a float32 state
    does not accumulate one rounding per gradient; H − V Vᵀ keeps it symmetric. A block whose
    S is not positive definite (an inverse that has lost definiteness) becomes NaN, which
    ``FisherInverse.compute`` reports."""
    nb, b, _ = finv.shape
    k_all = grads.shape[0]
    g_all = grads.reshape(k_all, nb, b)
    rank = min(WOODBURY_RANK, k_all)
    per_block = 8 * (b * b + 3 * b * rank + rank * rank)
    step = max(1, WOODBURY_PIECE_BYTES // per_block)
    eye = torch.eye(rank, dtype=torch.float64, device=finv.device) * num_grads
    with no_tf32():
        for s in range(0, nb, step):
            h = finv[s : s + step].to(torch.float64, copy=True)
            for i in range(0, k_all, rank):
                g = g_all[i : i + rank, s : s + step].to(torch.float64).permute(1, 2, 0)  # (blocks, B, k)
                u = torch.bmm(h, g)
                kk = g.shape[2]
                chol, info = torch.linalg.cholesky_ex(torch.baddbmm(eye[:kk, :kk], g.transpose(1, 2), u))
                v = torch.linalg.solve_triangular(chol, u.transpose(1, 2), upper=False).transpose(1, 2)
                h.baddbmm_(v, v.transpose(1, 2), alpha=-1.0)
                h.masked_fill_((info != 0).view(-1, 1, 1), float("nan"))
            finv[s : s + step].copy_((h + h.transpose(1, 2)) * 0.5)  # exactly symmetric, whatever the GEMM did


GRAM_PIECE_BYTES = 32 << 20  # largest float64 copy of a gradient chunk made at once
PIECE_BYTES = 32 << 20  # working set of the inverse, the elimination and the replay per range of blocks


def working_set_bytes(num_blocks: int, block_size: int, chunk: int = 0) -> int:
    """An upper bound of the temporary memory (bytes) any op of this package takes beyond its
    inputs and outputs, for (num_blocks, block_size) blocks and gradient chunks of ``chunk``
    rows: the float64 copy of a chunk in the Gram update, and the inverse, elimination,
    replay and Woodbury working sets, each bounded per range of blocks (the kernels of the
    other backends keep their blocks on chip). The largest of them, not their sum: they never
    overlap."""
    b = block_size
    gram_copy = min(GRAM_PIECE_BYTES, chunk * num_blocks * b * 8) if chunk else 0
    inverse = min(PIECE_BYTES, num_blocks * 3 * b * b * 8)  # F, its factor and its inverse in float64
    woodbury = min(WOODBURY_PIECE_BYTES, num_blocks * 8 * (b * b + 3 * b * min(chunk or b, WOODBURY_RANK)))
    return max(gram_copy, inverse, woodbury)


def _block_pieces(nb: int, per_block: int):
    """Ranges of blocks whose temporaries take at most ``PIECE_BYTES`` (at least one block each)."""
    step = max(1, PIECE_BYTES // max(1, per_block))
    for s in range(0, nb, step):
        yield slice(s, min(nb, s + step))


def gram_update_(gram: torch.Tensor, grads: torch.Tensor) -> None:
    """Accumulate ``gram[b] += Σ_i g_{i,b} g_{i,b}ᵀ`` for ``grads`` (k, N) into ``gram`` (nb, B, B).

    The chunk is converted to the Gram's dtype a range of blocks at a time (at most
    ``GRAM_PIECE_BYTES`` per copy); every block's state is still read and written once."""
    nb, b, _ = gram.shape
    k = grads.shape[0]
    g_all = grads.reshape(k, nb, b)
    step = nb if grads.dtype == gram.dtype else max(1, GRAM_PIECE_BYTES // max(1, k * b * gram.element_size()))
    with no_tf32():
        for s in range(0, nb, step):
            g = g_all[:, s : s + step].to(gram.dtype).permute(1, 2, 0)  # (blocks, B, k)
            gram[s : s + step].baddbmm_(g, g.transpose(1, 2))


def block_damping(gram: torch.Tensor, num_grads: float, damp: float, damp_mode: str) -> torch.Tensor | float:
    """λ' of every block: λ (absolute), or (nb, 1) λ · mean(diag(G/m)) (relative), falling back
    to λ for blocks whose Gram diagonal is all zero (fully masked blocks)."""
    if damp_mode != "relative":
        return damp
    mean = gram.diagonal(dim1=1, dim2=2).mean(-1, keepdim=True) / num_grads
    return torch.where(mean > 0, damp * mean, torch.full_like(mean, damp))


def damped_fisher(gram: torch.Tensor, num_grads: float, damp: float, damp_mode: str) -> torch.Tensor:
    """F = λ' I + G / m per block (a new tensor), λ' from :func:`block_damping`."""
    f = gram / num_grads
    f.diagonal(dim1=1, dim2=2).add_(block_damping(gram, num_grads, damp, damp_mode))
    return f


def fisher_quadratic(
    delta: torch.Tensor, gram: torch.Tensor, num_grads: float, damp: float, damp_mode: str
) -> torch.Tensor:
    """½ δᵀ F δ per block, (nb,) float64, with F = λ' I + G / m (never formed: G δ per block)."""
    d = delta.to(torch.float64)
    with no_tf32():
        gd = torch.bmm(gram.to(torch.float64), d.unsqueeze(-1)).squeeze(-1)
    lam = block_damping(gram, num_grads, damp, damp_mode)
    lam = lam.squeeze(-1).double() if isinstance(lam, torch.Tensor) else lam
    return 0.5 * ((gd * d).sum(-1) / num_grads + lam * (d * d).sum(-1))


def gram_inverse(
    gram: torch.Tensor, num_grads: float, damp: float, damp_mode: str, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert λ'I + G/m per block by Cholesky in the Gram's dtype, a range of blocks at a time
    (temporaries bounded by ``PIECE_BYTES``).

    Returns ``(finv, ok)``: (nb, B, B) in ``out_dtype`` and a (nb,) bool, False for blocks
    that were not positive definite or gave NaN/Inf (also past ``out_dtype``'s range).
    """
    nb, b, _ = gram.shape
    out = torch.empty(nb, b, b, dtype=out_dtype, device=gram.device)
    ok = torch.empty(nb, dtype=torch.bool, device=gram.device)
    for sl in _block_pieces(nb, 3 * b * b * gram.element_size()):  # F, its factor and its inverse
        f = damped_fisher(gram[sl], num_grads, damp, damp_mode)
        chol, info = torch.linalg.cholesky_ex(f)
        finv = torch.cholesky_inverse(chol)
        out[sl] = finv
        ok[sl] = (info == 0) & torch.isfinite(out[sl]).all(dim=(1, 2))
    return out, ok


# ---------------------------------------------------------------------------------------------
# OBS (SPEC §3)
# ---------------------------------------------------------------------------------------------


def obs_scores(w: torch.Tensor, finv: torch.Tensor) -> torch.Tensor:
    """ρ_j = w_j² / (2 H_jj), shape (nb, B), dtype of ``finv``."""
    w = w.to(finv.dtype)
    return w * w / (2.0 * finv.diagonal(dim1=1, dim2=2))


def obs_update_independent(w: torch.Tensor, finv: torch.Tensor, prune_mask: torch.Tensor) -> torch.Tensor:
    """WoodFisher/oBERT update: w − H (w ⊙ 1_S / diag H), then w_S = 0. Returns (nb, B) in w's dtype."""
    wd = w.to(finv.dtype)
    x = torch.where(prune_mask, wd / finv.diagonal(dim1=1, dim2=2), torch.zeros_like(wd))
    with no_tf32():
        out = wd - torch.bmm(finv, x.unsqueeze(-1)).squeeze(-1)
    return out.masked_fill(prune_mask, 0).to(w.dtype)


def _group_full(elim: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """(nb, B) bool: True where the entry's N:M group has already lost m − n entries."""
    nb, b = elim.shape
    lost = elim.view(nb, b // m, m).sum(-1, dtype=torch.int32)
    return (lost >= m - n).repeat_interleave(m, dim=1)


def prune_steps(block: int, nm: tuple[int, int] | None) -> int:
    """How many elimination steps a block of size ``block`` takes (SPEC §3)."""
    if nm is None:
        return block
    n, m = nm
    return block * (m - n) // m


def obs_prune_order(
    w: torch.Tensor,
    finv: torch.Tensor,
    mask: torch.Tensor | None,
    nm: tuple[int, int] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy correlation-aware elimination, vectorised over blocks, a range of blocks at a time
    (the working copy of the inverses bounded by ``PIECE_BYTES``).

    Returns ``(order, loss, bad)``: int64 (nb, steps), ``finv.dtype`` (nb, steps), and a (nb,)
    bool that is True for blocks that met a pivot H_qq <= 0 or a non-finite score.
    """
    return _prune_order(w, finv, mask, nm, in_place=False)


def obs_prune_order_(
    w: torch.Tensor,
    finv: torch.Tensor,
    mask: torch.Tensor | None,
    nm: tuple[int, int] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`obs_prune_order` that also overwrites each block of ``finv`` that succeeded with
    the elimination's factor (a failed block keeps its input):

    F[x, t] = H_t[x, q_t] / H_t[q_t, q_t] for a position x still present at step t (H_t the
    downdated inverse before step t, q_t = order[t]); F[q_t, t] = the weight at q_t just before
    step t (0 for a masked entry); 0 elsewhere. The weights after k steps are then
    w − Σ_{t<k} F[q_t, t] · F[:, t] (see :func:`obs_reconstruct_factored`).
    """
    return _prune_order(w, finv, mask, nm, in_place=True)


def _prune_order(
    w: torch.Tensor, finv: torch.Tensor, mask: torch.Tensor | None, nm: tuple[int, int] | None, in_place: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nb, b = w.shape
    steps = prune_steps(b, nm)
    order = torch.empty(nb, steps, dtype=torch.int64, device=w.device)
    loss = torch.empty(nb, steps, dtype=finv.dtype, device=w.device)
    bad = torch.empty(nb, dtype=torch.bool, device=w.device)
    per_block = (2 if in_place else 1) * b * b * finv.element_size()  # the factor is a second copy
    for sl in _block_pieces(nb, per_block):
        order[sl], loss[sl], bad[sl], fac = _eliminate(
            w[sl], finv[sl], None if mask is None else mask[sl], nm, factor=in_place
        )
        if fac is not None:
            good = ~bad[sl]
            finv[sl][good] = fac[good]
    return order, loss, bad


def _eliminate(
    w: torch.Tensor, finv: torch.Tensor, mask: torch.Tensor | None, nm: tuple[int, int] | None, factor: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    nb, b = w.shape
    dt = finv.dtype
    steps = prune_steps(b, nm)
    hmat = finv.clone()
    w = w.to(dt).clone()
    elim = torch.zeros(nb, b, dtype=torch.bool, device=w.device)
    pend = None if mask is None else mask.clone()
    if pend is not None:
        w.masked_fill_(pend, 0)
    rows = torch.arange(nb, device=w.device)
    cum = torch.zeros(nb, dtype=dt, device=w.device)
    bad = torch.zeros(nb, dtype=torch.bool, device=w.device)
    order = torch.empty(nb, steps, dtype=torch.int64, device=w.device)
    loss = torch.empty(nb, steps, dtype=dt, device=w.device)
    inf = torch.tensor(math.inf, dtype=dt, device=w.device)
    fac = torch.zeros(nb, b, b, dtype=dt, device=w.device) if factor else None
    with no_tf32():
        for t in range(steps):
            d = hmat.diagonal(dim1=1, dim2=2)
            s = torch.where(elim, inf, w * w / d)
            if nm is not None:
                s = torch.where(_group_full(elim, *nm), inf, s)
            q = s.argmin(1)
            sq = s[rows, q]
            if pend is not None:
                has = pend.any(1)
                first = pend.to(torch.uint8).argmax(1)
                q = torch.where(has, first, q)
                sq = torch.where(has, torch.zeros_like(sq), sq)
                pend[rows, q] = False
            hq = hmat[rows, :, q]
            hqq = hq[rows, q]
            bad |= ~(hqq > 0) | ~torch.isfinite(sq) | ~torch.isfinite(hqq)
            cum = cum + sq / 2
            order[:, t] = q
            loss[:, t] = cum
            wq = w[rows, q]
            if fac is not None:
                fac[:, :, t] = torch.where(elim, torch.zeros_like(hq), hq / hqq.unsqueeze(-1))
                fac[rows, q, t] = wq
            w = w - hq * (wq / hqq).unsqueeze(-1)
            elim[rows, q] = True
            w.masked_fill_(elim, 0)
            hmat.baddbmm_(hq.unsqueeze(-1), (hq / hqq.unsqueeze(-1)).unsqueeze(-2), alpha=-1.0)
    return order, loss, bad, fac


def prune_counts(losses: list[torch.Tensor], sparsity: float, exclude: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """Global selection: the K smallest cumulative losses over all layers; counts per block.

    ``exclude[l]`` (nb_l,) counts leading entries of each block's order that are pruned anyway
    (padding) and stand outside N_total and K. Ties are broken by (loss, layer, block, step).
    """
    device = losses[0].device
    keys, owners, sizes = [], [], []
    offset = 0
    for i, loss in enumerate(losses):
        nb, steps = loss.shape
        mono = loss.to(torch.float64).cummax(dim=1).values
        owner = (offset + torch.arange(nb, device=device, dtype=torch.int64)).unsqueeze(1).expand(nb, steps)
        if exclude is not None:
            valid = torch.arange(steps, device=device).unsqueeze(0) >= exclude[i].unsqueeze(1)
            mono, owner = mono[valid], owner[valid]
        keys.append(mono.reshape(-1))
        owners.append(owner.reshape(-1))
        sizes.append(nb)
        offset += nb
    key = torch.cat(keys)
    owner = torch.cat(owners)
    k = math.floor(sparsity * key.numel() + 0.5)
    counts = torch.zeros(offset, dtype=torch.int64, device=device)
    if k > 0:
        # the K smallest keys, ties taken in (layer, block, step) order — the array's order — as a
        # stable sort would: everything below the K-th value, then the first of the entries equal
        # to it. A selection (O(N)) instead of a sort.
        thr = torch.kthvalue(key, k).values
        below = key < thr
        tied = (key == thr).nonzero().flatten()
        need = k - int(below.sum())
        counts += torch.bincount(owner[below], minlength=offset)
        counts += torch.bincount(owner[tied[:need]], minlength=offset)
    out = list(torch.split(counts, sizes))
    if exclude is not None:
        out = [c + e.to(torch.int64) for c, e in zip(out, exclude)]
    return out


def obs_reconstruct(
    w: torch.Tensor, finv: torch.Tensor, order: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replay the first ``counts[b]`` eliminations of each block, a range of blocks at a time.

    Returns ``(w_new, keep, bad)``: (nb, B) in w's dtype, (nb, B) bool (True = kept), and a
    (nb,) bool flagging blocks that met a pivot H_qq <= 0.
    """
    nb, b = w.shape
    w_new = torch.empty(nb, b, dtype=w.dtype, device=w.device)
    keep = torch.empty(nb, b, dtype=torch.bool, device=w.device)
    bad = torch.empty(nb, dtype=torch.bool, device=w.device)
    for sl in _block_pieces(nb, b * b * finv.element_size()):
        w_new[sl], keep[sl], bad[sl] = _replay(w[sl], finv[sl], order[sl], counts[sl])
    return w_new, keep, bad


def obs_reconstruct_factored(
    w: torch.Tensor, factor: torch.Tensor, order: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weights after the first ``counts[b]`` steps from :func:`obs_prune_order_`'s factor:
    w − Σ_{t<k} a_t F[:, t], a_t = F[q_t, t], the pruned entries zero.

    Returns ``(w_new, keep, bad)``: (nb, B) in w's dtype, (nb, B) bool (True = kept), and a
    (nb,) bool flagging blocks where a weight, a multiplier read or a result is NaN/Inf.
    """
    nb, b = w.shape
    steps = order.shape[1]
    dt = factor.dtype
    o = order.to(torch.int64)
    t = torch.arange(steps, device=w.device)
    take = t.unsqueeze(0) < counts.to(torch.int64).unsqueeze(1)  # (nb, steps)
    rows = torch.arange(nb, device=w.device).unsqueeze(1)
    a = factor[rows, o, t.unsqueeze(0)]  # (nb, steps): F[q_t, t]
    a = torch.where(take, a, torch.zeros_like(a))
    with no_tf32():
        cols = torch.where(take.unsqueeze(1), factor[:, :, :steps], torch.zeros((), dtype=dt, device=w.device))
        delta = torch.bmm(cols, a.unsqueeze(-1)).squeeze(-1)  # only the columns t < k are read
    pruned = torch.zeros(nb, b, dtype=torch.bool, device=w.device).scatter_(1, o, take)
    w_new = torch.where(pruned, torch.zeros_like(delta), w.to(dt) - delta)
    bad = ~torch.isfinite(a).all(1) | ~torch.isfinite(w_new).all(1)  # a: zero past each block's count
    return w_new.to(w.dtype), ~pruned, bad


def _replay(
    w: torch.Tensor, finv: torch.Tensor, order: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nb, b = w.shape
    dt = finv.dtype
    hmat = finv.clone()
    wd = w.to(dt).clone()
    rows = torch.arange(nb, device=w.device)
    pruned = torch.zeros(nb, b, dtype=torch.bool, device=w.device)
    bad = torch.zeros(nb, dtype=torch.bool, device=w.device)
    kmax = int(counts.max()) if nb else 0
    with no_tf32():
        for t in range(kmax):
            active = counts > t
            q = order[:, t].to(torch.int64)
            hq = hmat[rows, :, q]
            hqq = hq[rows, q]
            bad |= active & (~(hqq > 0) | ~torch.isfinite(hqq))
            safe = torch.where(active, hqq, torch.ones_like(hqq))
            coef = torch.where(active, 1.0 / safe, torch.zeros_like(safe))
            wd = wd - hq * (wd[rows, q] * coef).unsqueeze(-1)
            pruned[rows, q] |= active
            wd.masked_fill_(pruned, 0)
            hmat.baddbmm_(hq.unsqueeze(-1), (hq * coef.unsqueeze(-1)).unsqueeze(-2), alpha=-1.0)
    return wd.to(w.dtype), ~pruned, bad


def spmm(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    """act(x @ Wᵀ + bias): unpack, multiply in fp32, add bias, activation; x's dtype out."""
    y = x.float() @ unpack(packed).float().T
    if bias is not None:
        y = y + bias.float()
    if activation == "gelu":
        y = torch.nn.functional.gelu(y)
    return y.to(x.dtype)


OPS = {
    "spmm": spmm,
    "woodbury_update_": woodbury_update_,
    "gram_update_": gram_update_,
    "gram_inverse": gram_inverse,
    "obs_scores": obs_scores,
    "obs_update_independent": obs_update_independent,
    "obs_prune_order": obs_prune_order,
    "obs_prune_order_": obs_prune_order_,
    "prune_counts": prune_counts,
    "obs_reconstruct": obs_reconstruct,
    "obs_reconstruct_factored": obs_reconstruct_factored,
}
