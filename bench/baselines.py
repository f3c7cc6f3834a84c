"""Baselines: the original code's approach, re-implemented with torch ops, for side-by-side timing.

* Fisher inverse: one batched mat-vec and one ``baddbmm`` rank-one update per gradient over
  all blocks, fp32 (~12·m·N·B bytes of memory traffic).
* Greedy elimination: ~15 batched torch ops per step over all blocks, keeping the weights of
  every step as a trace ((B+1)·N floats, held in host memory as the original does).
* Selection + reconstruction: a Python loop over blocks reading the traces.
"""

from __future__ import annotations

import torch


def fisher_rank_one(grads: torch.Tensor, block: int, damp: float, num_grads: int) -> torch.Tensor:
    """(nb, B, B) fp32 inverse by m rank-one passes of torch ops, as the original code does them:
    u = H g, v = u / √(m + gᵀu), H -= v vᵀ (one batched mat-vec and one ``baddbmm`` per gradient)."""
    m, n = grads.shape
    nb = n // block
    finv = (torch.eye(block, device=grads.device) / damp).expand(nb, block, block).contiguous()
    for i in range(m):
        g = grads[i].view(nb, block, 1)
        u = torch.bmm(finv, g)
        v = u / (num_grads + torch.bmm(g.transpose(1, 2), u)).sqrt()
        finv.baddbmm_(v, v.transpose(1, 2), alpha=-1.0)
    return finv


def greedy_with_traces(w: torch.Tensor, finv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-step torch ops over all blocks, with a (B+1, nb, B) weight trace copied to host."""
    nb, b = w.shape
    h = finv.clone()
    w = w.clone()
    rows = torch.arange(nb, device=w.device)
    mask = torch.zeros(nb, b, dtype=torch.bool, device=w.device)
    trace = torch.empty(b + 1, nb, b, dtype=w.dtype, pin_memory=w.is_cuda)
    losses = torch.zeros(nb, b, dtype=w.dtype, device=w.device)
    trace[0].copy_(w, non_blocking=True)
    for t in range(b):
        diag = torch.diagonal(h, dim1=1, dim2=2)
        scores = w**2 / diag
        scores[mask] = float("inf")
        j = torch.argmin(scores, 1)
        losses[rows, t] = scores[rows, j]
        row = h[rows, j, :]
        d = diag[rows, j]
        w -= row * (w[rows, j] / d).unsqueeze(1)
        mask[rows, j] = True
        w[mask] = 0
        trace[t + 1].copy_(w, non_blocking=True)
        row /= torch.sqrt(d).unsqueeze(1)
        h -= torch.bmm(row.unsqueeze(2), row.unsqueeze(1))
    losses = torch.cumsum(losses, 1) / 2
    if w.is_cuda:
        torch.cuda.synchronize()
    return losses, mask, trace


def select_and_rebuild_loop(losses: torch.Tensor, trace: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Global threshold, then one Python iteration (and a device sync) per block."""
    nb, b = losses.shape
    k = int(sparsity * losses.numel() + 0.5)
    thr = torch.kthvalue(losses.flatten().cpu(), max(k, 1)).values.item()
    out = torch.empty(nb, b, dtype=trace.dtype, device=losses.device)
    counts = (losses <= thr).sum(1)
    for i in range(nb):
        out[i] = trace[int(counts[i]), i].to(losses.device)
    return out
