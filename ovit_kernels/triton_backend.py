"""Triton backend: one program per Fisher block, the block held on chip as a register tile.

Blocks of size B are padded to a power-of-two tile BP (masked), up to ``MAX_BLOCK`` = 128
(an fp32 128×128 tile is 64 KiB of registers spread over 8–16 warps). Larger blocks run on
the CUDA backend (shared memory) or the reference. Under ``TRITON_INTERPRET=1`` the same
kernels run on CPU tensors, which is how CI tests them.

The Gram accumulation is the shared batched float64 GEMM (``_backend.SHARED_OPS``); the
inverse of λI + G/m is one fused kernel per block (Gauss–Jordan sweep in float64, whose
pivots are positive exactly when the block is positive definite).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _alloc, reference, triton_spmm
from ._backend import BackendStatus, Case, triton_interpret

MAX_BLOCK = 128


def status() -> BackendStatus:
    if torch.cuda.is_available() or triton_interpret():
        where = "CPU interpreter" if triton_interpret() else "CUDA"
        return BackendStatus(True, f"triton {triton.__version__} ({where})")
    return BackendStatus(False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)")


def DEVICES() -> tuple[str, ...]:  # noqa: N802 - the backend interface's name
    """CUDA tensors; CPU tensors too under the interpreter."""
    return ("cuda", "cpu") if triton_interpret() else ("cuda",)


def supports(case: Case) -> str | None:
    """None if the Triton kernels run ``case``, else why not."""
    if case.block is not None and case.block > MAX_BLOCK:
        return f"triton tiles hold blocks up to {MAX_BLOCK}, got B = {case.block}"
    if case.spmm is not None:
        return triton_spmm.supports(case.spmm)
    return None


def launch_config(case: Case) -> str:
    """The tile and warps a Fisher/OBS kernel launches with (the spmm kernels autotune)."""
    if case.spmm is not None:
        return triton_spmm.launch_config(case.spmm)
    bp = _tile(case.block)
    return f"one program per block, {bp}x{bp} tile, {_warps(bp)} warps"


def _tile(b: int) -> int:
    return max(16, triton.next_power_of_2(b))


def _warps(bp: int) -> int:
    return 4 if bp <= 32 else 8 if bp <= 64 else 16


# ---------------------------------------------------------------------------------------------
# Fisher inverse
# ---------------------------------------------------------------------------------------------


@triton.jit
def _woodbury_kernel(h_ptr, g_ptr, k, n, b, m, BP: tl.constexpr):
    blk = tl.program_id(0)
    r = tl.arange(0, BP)
    valid = r < b
    tile = valid[:, None] & valid[None, :]
    hp = h_ptr + blk.to(tl.int64) * b * b + r[:, None] * b + r[None, :]
    h = tl.load(hp, mask=tile, other=0.0)
    gbase = g_ptr + blk.to(tl.int64) * b
    for i in range(k):
        g = tl.load(gbase + i * n + r, mask=valid, other=0.0).to(h.dtype)
        u = tl.sum(h * g[None, :], axis=1)
        denom = m + tl.sum(g * u, axis=0)
        v = u / tl.sqrt(denom)  # H -= v vᵀ: the same product on both sides, so H stays symmetric
        h = h - v[:, None] * v[None, :]
    tl.store(hp, h, mask=tile)


def woodbury_update_(finv: torch.Tensor, grads: torch.Tensor, num_grads: float) -> None:
    nb, b, _ = finv.shape
    bp = _tile(b)
    _woodbury_kernel[(nb,)](finv, grads, grads.shape[0], grads.shape[1], b, num_grads, BP=bp, num_warps=_warps(bp))


@triton.jit
def _damped_inverse_kernel(g_ptr, out_ptr, ok_ptr, par_ptr, b, RELATIVE: tl.constexpr, BP: tl.constexpr):
    """out = (λ'I + G/m)⁻¹ by a Gauss–Jordan sweep over all pivots, in float64.
    par_ptr holds (1/m, λ) in float64."""
    blk = tl.program_id(0)
    inv_m = tl.load(par_ptr)
    damp = tl.load(par_ptr + 1)
    r = tl.arange(0, BP)
    valid = r < b
    tile = valid[:, None] & valid[None, :]
    off = blk.to(tl.int64) * b * b + r[:, None] * b + r[None, :]
    a = tl.load(g_ptr + off, mask=tile, other=0.0).to(tl.float64) * inv_m
    eye = r[:, None] == r[None, :]
    diag = tl.sum(tl.where(eye, a, 0.0), axis=1)
    lam = damp
    if RELATIVE:
        mean = tl.sum(diag, axis=0) / b
        lam = tl.where(mean > 0, damp * mean, damp)
    # padded lanes get a unit diagonal so they sweep harmlessly
    a = a + tl.where(eye & valid[:, None], lam, 0.0) + tl.where(eye & ~valid[:, None], 1.0, 0.0)
    ok = tl.sum(tl.zeros([BP], dtype=tl.int32), axis=0) + 1
    for k in range(b):
        sel = r == k
        c = tl.sum(tl.where(sel[None, :], a, 0.0), axis=1)
        d = tl.sum(tl.where(sel, c, 0.0), axis=0)
        ok = ok & (d > 0).to(tl.int32)
        c_over = c / d
        a = a - c[:, None] * c_over[None, :]
        rowcol = sel[:, None] | sel[None, :]
        on_row = sel[:, None].to(tl.float64)
        on_col = sel[None, :].to(tl.float64)
        a = tl.where(rowcol, c_over[:, None] * on_col + c_over[None, :] * on_row, a)
        a = tl.where(sel[:, None] & sel[None, :], -1.0 / d, a)
    o = (-a).to(out_ptr.dtype.element_ty)  # checked as stored: float32 may not hold a float64 entry
    nonfinite = tile & ((o != o) | (tl.abs(o) == float("inf")))
    finite = tl.sum(tl.sum(nonfinite.to(tl.int32), axis=1), axis=0) == 0
    ok = ok & finite.to(tl.int32)
    tl.store(out_ptr + off, o, mask=tile)
    tl.store(ok_ptr + blk, ok)


def gram_inverse(
    gram: torch.Tensor, num_grads: float, damp: float, damp_mode: str, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    nb, b, _ = gram.shape
    bp = _tile(b)
    out = _alloc.empty(nb, b, b, dtype=out_dtype, device=gram.device)
    ok = torch.zeros(nb, dtype=torch.int32, device=gram.device)
    par = torch.tensor([1.0 / num_grads, damp], dtype=torch.float64, device=gram.device)
    _damped_inverse_kernel[(nb,)](gram, out, ok, par, b, RELATIVE=damp_mode == "relative", BP=bp, num_warps=_warps(bp))
    return out, ok.bool()


# ---------------------------------------------------------------------------------------------
# OBS
# ---------------------------------------------------------------------------------------------


@triton.jit
def _scores_kernel(w_ptr, h_ptr, out_ptr, update_ptr, mask_ptr, b, UPDATE: tl.constexpr, BP: tl.constexpr):
    """Saliencies (UPDATE=False) or the independent WoodFisher update (UPDATE=True)."""
    blk = tl.program_id(0)
    r = tl.arange(0, BP)
    valid = r < b
    tile = valid[:, None] & valid[None, :]
    h = tl.load(h_ptr + blk.to(tl.int64) * b * b + r[:, None] * b + r[None, :], mask=tile, other=0.0)
    eye = r[:, None] == r[None, :]
    d = tl.sum(tl.where(eye, h, 0.0), axis=1)
    d = tl.where(valid, d, 1.0)
    w = tl.load(w_ptr + blk * b + r, mask=valid, other=0.0).to(h.dtype)
    if UPDATE:
        pruned = tl.load(mask_ptr + blk * b + r, mask=valid, other=0) != 0
        x = tl.where(pruned, w / d, 0.0)
        new = w - tl.sum(h * x[None, :], axis=1)
        new = tl.where(pruned, 0.0, new)
        tl.store(update_ptr + blk * b + r, new.to(update_ptr.dtype.element_ty), mask=valid)
    else:
        tl.store(out_ptr + blk * b + r, w * w / (2.0 * d), mask=valid)


def obs_scores(w: torch.Tensor, finv: torch.Tensor) -> torch.Tensor:
    nb, b = w.shape
    out = _alloc.empty(nb, b, dtype=finv.dtype, device=w.device)
    bp = _tile(b)
    _scores_kernel[(nb,)](
        w.contiguous(), finv.contiguous(), out, out, out, b, UPDATE=False, BP=bp, num_warps=_warps(bp)
    )
    return out


def obs_update_independent(w: torch.Tensor, finv: torch.Tensor, prune_mask: torch.Tensor) -> torch.Tensor:
    nb, b = w.shape
    out = _alloc.empty(*w.shape, dtype=w.dtype, device=w.device)
    bp = _tile(b)
    mask = prune_mask.contiguous().view(torch.uint8)
    _scores_kernel[(nb,)](
        w.contiguous(), finv.contiguous(), out, out, mask, b, UPDATE=True, BP=bp, num_warps=_warps(bp)
    )
    return out


@triton.jit
def _eliminate_kernel(
    w_ptr,
    h_ptr,
    mask_ptr,
    order_ptr,
    loss_ptr,
    count_ptr,
    w_out_ptr,
    bad_ptr,
    b,
    steps,
    nm_n,
    nm_m,
    REPLAY: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_NM: tl.constexpr,
    BP: tl.constexpr,
):
    """Greedy OBS elimination of one block (REPLAY=False: writes order and cumulative loss),
    or replay of its first counts[blk] steps (REPLAY=True: writes the final weights, and the
    pruned flags into mask_ptr)."""
    blk = tl.program_id(0)
    r = tl.arange(0, BP)
    valid = r < b
    tile = valid[:, None] & valid[None, :]
    h = tl.load(h_ptr + blk.to(tl.int64) * b * b + r[:, None] * b + r[None, :], mask=tile, other=0.0)
    w = tl.load(w_ptr + blk * b + r, mask=valid, other=0.0).to(h.dtype)
    zero_f = tl.sum(tl.zeros([BP], dtype=h.dtype), axis=0)
    bad = tl.sum(tl.zeros([BP], dtype=tl.int32), axis=0)
    eye = r[:, None] == r[None, :]
    elim = r >= b  # padded lanes count as eliminated
    if REPLAY:
        n_steps = tl.load(count_ptr + blk).to(tl.int32)
    else:
        n_steps = steps
    if HAS_MASK:
        pend = tl.load(mask_ptr + blk * b + r, mask=valid, other=0) != 0
        w = tl.where(pend, 0.0, w)
    else:
        pend = r < 0
    if HAS_NM:
        same = (r[:, None] // nm_m) == (r[None, :] // nm_m)
    cum = zero_f
    for t in range(n_steps):
        if REPLAY:
            q = tl.load(order_ptr + blk.to(tl.int64) * steps + t).to(tl.int32)
            sq = zero_f
        else:
            d = tl.sum(tl.where(eye, h, 0.0), axis=1)
            s = tl.where(elim, float("inf"), w * w / tl.where(elim, 1.0, d))
            if HAS_NM:
                lost = tl.sum(tl.where(same & elim[None, :] & valid[None, :], 1, 0), axis=1)
                s = tl.where(lost >= nm_m - nm_n, float("inf"), s)
            q = tl.argmin(s, axis=0, tie_break_left=True).to(tl.int32)
            sq = tl.sum(tl.where(r == q, s, 0.0), axis=0)
            if HAS_MASK:
                first = tl.min(tl.where(pend, r, BP), axis=0)
                has = first < BP
                q = tl.where(has, first, q)
                sq = tl.where(has, zero_f, sq)
        sel = r == q
        hq = tl.sum(tl.where(sel[None, :], h, 0.0), axis=1)
        hqq = tl.sum(tl.where(sel, hq, 0.0), axis=0)
        wq = tl.sum(tl.where(sel, w, 0.0), axis=0)
        bad = bad | ((hqq <= 0) | (hqq != hqq) | (sq != sq) | (sq == float("inf"))).to(tl.int32)
        if not REPLAY:
            cum = cum + 0.5 * sq
            tl.store(order_ptr + blk.to(tl.int64) * steps + t, q.to(tl.int64))
            tl.store(loss_ptr + blk.to(tl.int64) * steps + t, cum)
        w = w - hq * (wq / hqq)
        elim = elim | sel
        pend = pend & ~sel
        w = tl.where(elim, 0.0, w)
        h = h - hq[:, None] * (hq / hqq)[None, :]
    if REPLAY:
        tl.store(w_out_ptr + blk * b + r, w, mask=valid)
        tl.store(mask_ptr + blk * b + r, elim.to(tl.uint8), mask=valid)
    tl.store(bad_ptr + blk, bad)


def obs_prune_order(
    w: torch.Tensor, finv: torch.Tensor, mask: torch.Tensor | None, nm: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nb, b = w.shape
    steps = reference.prune_steps(b, nm)
    order = _alloc.empty(nb, steps, dtype=torch.int64, device=w.device)
    loss = _alloc.empty(nb, steps, dtype=finv.dtype, device=w.device)
    bad = torch.zeros(nb, dtype=torch.int32, device=w.device)
    m8 = order if mask is None else mask.contiguous().view(torch.uint8)
    n_, m_ = nm if nm is not None else (0, 1)
    bp = _tile(b)
    _eliminate_kernel[(nb,)](
        w.contiguous(),
        finv.contiguous(),
        m8,
        order,
        loss,
        bad,
        loss,
        bad,
        b,
        steps,
        n_,
        m_,
        REPLAY=False,
        HAS_MASK=mask is not None,
        HAS_NM=nm is not None,
        BP=bp,
        num_warps=_warps(bp),
    )
    return order, loss, bad.bool()


def obs_reconstruct(
    w: torch.Tensor, finv: torch.Tensor, order: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nb, b = w.shape
    w_out = _alloc.empty(nb, b, dtype=finv.dtype, device=w.device)
    pruned = _alloc.empty(nb, b, dtype=torch.uint8, device=w.device)
    bad = torch.zeros(nb, dtype=torch.int32, device=w.device)
    bp = _tile(b)
    _eliminate_kernel[(nb,)](
        w.contiguous(),
        finv.contiguous(),
        pruned,
        order.contiguous(),
        w_out,
        counts.contiguous(),
        w_out,
        bad,
        b,
        order.shape[1],
        0,
        1,
        REPLAY=True,
        HAS_MASK=False,
        HAS_NM=False,
        BP=bp,
        num_warps=_warps(bp),
    )
    return w_out.to(w.dtype), pruned == 0, bad.bool()


OPS = {
    "spmm": triton_spmm.spmm,
    "woodbury_update_": woodbury_update_,
    "gram_inverse": gram_inverse,
    "obs_scores": obs_scores,
    "obs_update_independent": obs_update_independent,
    "obs_prune_order": obs_prune_order,
    "obs_reconstruct": obs_reconstruct,
}
