"""CPU backend: the C++ kernels of ``csrc/cpu`` (module ``ovit_kernels._cpu``).

Each kernel works on one Fisher block at a time in a per-thread scratch that stays in the core's
cache for all of that block's work — the B elimination steps with a compact active set (B³/6
multiply-adds per block instead of the B³ a fixed layout costs), the Gram of a chunk of
gradients in 4×8 register tiles, the damped inverse by a symmetric Gauss–Jordan sweep, the
Woodbury update as rank-k steps in float64 — and threads take blocks from a shared counter (no
barrier: a thread slowed by other work on the machine costs only the blocks it holds). The
number of threads is ``torch.get_num_threads()``. float32 and float64; blocks up to 4096. The
final weights are the joint OBS solution by a Cholesky of H[S,S] per block (k³/6 multiply-adds,
against ≈ (B³ − (B − k)³)/6 for a replay), or, after the in-place elimination that leaves its
factor in the inverse's storage, one dot product per surviving weight ((B − k)·k multiply-adds
per block); the global selection is an O(N) selection.

``ovit_kernels._cpu`` is built by ``setup.py`` whenever a C++ compiler is present, with or without
CUDA; without it the backend is unavailable and says why (``available_backends()``), and the
reference runs the CPU tensors.
"""

from __future__ import annotations

import torch

from . import _alloc, reference
from ._backend import BackendStatus, Case

try:
    from . import _cpu  # type: ignore[attr-defined]
except ImportError as e:  # the backend selector reports this as the reason cpu is unavailable
    raise ImportError(
        f"ovit_kernels._cpu is not built ({e}); reinstall with a C++ compiler present: pip install -e ."
    ) from e

DEVICES = ("cpu",)
MAX_BLOCK = int(_cpu.max_block_size)
WOODBURY_RANK = reference.WOODBURY_RANK
_FP = (torch.float32, torch.float64)


def status() -> BackendStatus:
    return BackendStatus(True, f"ovit_kernels._cpu, {torch.get_num_threads()} threads")


def supports(case: Case) -> str | None:
    """None if the CPU kernels run ``case``, else why not."""
    if case.dtype is not None and case.dtype not in _FP:  # no state dtype: the global selection
        return f"the CPU kernels take float32 or float64, got {case.dtype}"
    if case.block is not None and case.block > MAX_BLOCK:
        return f"the CPU kernels take blocks up to {MAX_BLOCK}, got B = {case.block}"
    return None


def launch_config(case: Case) -> str:
    return f"one block per task, {torch.get_num_threads()} threads"


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _p(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _fp64(t: torch.Tensor) -> int:
    return int(t.dtype == torch.float64)


def gram_update_(gram: torch.Tensor, grads: torch.Tensor, overwrite: bool = False) -> int:
    """Returns the number of NaN/Inf gradient entries (counted while they are read). With
    ``overwrite``, ``gram`` is a fresh state whose contents are never read (no zeroing pass)."""
    nb, b, _ = gram.shape
    if grads.dtype not in _FP:
        grads = grads.float()
    g = grads.contiguous()
    return _cpu.gram_update(_p(gram), _p(g), _fp64(g), nb, b, g.shape[0], g.shape[1], _threads(), overwrite)


def gram_inverse(
    gram: torch.Tensor, num_grads: float, damp: float, damp_mode: str, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    nb, b, _ = gram.shape
    g = gram.contiguous()
    out = _alloc.empty(nb, b, b, dtype=out_dtype, device=gram.device)
    ok = _alloc.empty(nb, dtype=torch.uint8, device=gram.device)
    _cpu.damped_inverse(_p(g), nb, b, 1.0 / num_grads, damp, damp_mode == "relative", _p(out), _fp64(out), _p(ok),
                        _threads())  # fmt: skip
    return out, ok.bool()


def woodbury_update_(finv: torch.Tensor, grads: torch.Tensor, num_grads: float) -> int:
    """Returns the number of NaN/Inf gradient entries (counted while they are read)."""
    nb, b, _ = finv.shape
    if finv.dtype == torch.float32 or grads.dtype not in _FP:
        grads = grads.to(finv.dtype if finv.dtype == torch.float32 else torch.float32)
    g = grads.contiguous()
    return _cpu.woodbury_update(_p(finv), _fp64(finv), _p(g), _fp64(g), nb, b, g.shape[0], g.shape[1],
                                float(num_grads), WOODBURY_RANK, _threads())  # fmt: skip


def _prune_order(
    w: torch.Tensor, finv: torch.Tensor, mask: torch.Tensor | None, nm: tuple[int, int] | None, in_place: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nb, b = w.shape
    steps = reference.prune_steps(b, nm)
    order = _alloc.empty(nb, steps, dtype=torch.int64, device=w.device)
    loss = _alloc.empty(nb, steps, dtype=finv.dtype, device=w.device)
    bad = _alloc.empty(nb, dtype=torch.uint8, device=w.device)
    if in_place and not finv.is_contiguous():
        raise ValueError("finv must be contiguous to be overwritten with the elimination's factor")
    wd, h = w.to(finv.dtype).contiguous(), finv.contiguous()
    m8 = None if mask is None else mask.contiguous().view(torch.uint8)
    n, m = nm if nm is not None else (0, 0)
    _cpu.prune_order(_p(wd), _p(h), _fp64(h), _p(m8), nb, b, steps, n, m, _p(order), _p(loss), _p(bad),
                     _p(h) if in_place else 0, _threads())  # fmt: skip
    return order, loss, bad.bool()


def obs_prune_order(
    w: torch.Tensor, finv: torch.Tensor, mask: torch.Tensor | None, nm: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _prune_order(w, finv, mask, nm, in_place=False)


def obs_prune_order_(
    w: torch.Tensor, finv: torch.Tensor, mask: torch.Tensor | None, nm: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The elimination, leaving its factor in each block of ``finv`` that succeeded (one extra
    B² write per block, from the block's scratch; a failed block keeps its input)."""
    return _prune_order(w, finv, mask, nm, in_place=True)


def obs_reconstruct(
    w: torch.Tensor, finv: torch.Tensor, order: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The joint OBS solution by a Cholesky of H[S,S] per block (no replay). Returns the new
    weights, the keep-mask and (nb,) uint8 codes: 1 a pivot that was not positive or NaN/Inf
    among the inputs, 2 a position of ``order`` outside [0, B), 3 a repeated one (the kernel checks
    ``order``, the diagonal and the entries it reads, so the caller does not scan them)."""
    nb, b = w.shape
    wd, h = w.to(finv.dtype).contiguous(), finv.contiguous()
    o, c = order.to(torch.int64).contiguous(), counts.to(torch.int64).contiguous()
    w_out = _alloc.empty(nb, b, dtype=finv.dtype, device=w.device)
    pruned = _alloc.empty(nb, b, dtype=torch.uint8, device=w.device)
    bad = _alloc.empty(nb, dtype=torch.uint8, device=w.device)
    _cpu.reconstruct(_p(wd), _p(h), _fp64(h), _p(o), _p(c), nb, b, o.shape[1], _p(w_out), _p(pruned), _p(bad),
                     _threads())  # fmt: skip
    return w_out.to(w.dtype), pruned == 0, bad  # uint8 codes: 1 retry/fail, 2 and 3 a bad order


def obs_reconstruct_factored(
    w: torch.Tensor, factor: torch.Tensor, order: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Final weights from the elimination's factor: one dot product of a row prefix per
    survivor, (B − k)·k multiply-adds per block. Same outputs and codes as :func:`obs_reconstruct`
    (1 here: NaN/Inf among what a block reads or produces)."""
    nb, b = w.shape
    wd, f = w.to(factor.dtype).contiguous(), factor.contiguous()
    o, c = order.to(torch.int64).contiguous(), counts.to(torch.int64).contiguous()
    w_out = _alloc.empty(nb, b, dtype=factor.dtype, device=w.device)
    pruned = _alloc.empty(nb, b, dtype=torch.uint8, device=w.device)
    bad = _alloc.empty(nb, dtype=torch.uint8, device=w.device)
    _cpu.reconstruct_factored(_p(wd), _p(f), _fp64(f), _p(o), _p(c), nb, b, o.shape[1], _p(w_out), _p(pruned),
                              _p(bad), _threads())  # fmt: skip
    return w_out.to(w.dtype), pruned == 0, bad


def prune_counts(losses: list[torch.Tensor], sparsity: float, exclude: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """Global selection in one pass over the losses (running maximum, NaN/Inf check) and an O(N)
    selection of the K-th key; same counts and tie-breaking as the reference."""
    ls = [x if x.dtype in _FP else x.double() for x in losses]
    ls = [x.contiguous() for x in ls]
    ex = [None] * len(ls) if exclude is None else [e.to(torch.int64).contiguous() for e in exclude]
    total = sum(x.shape[0] for x in ls)
    counts = _alloc.empty(total, dtype=torch.int64, device=ls[0].device)
    bad = _cpu.prune_counts([_p(x) for x in ls], [_fp64(x) for x in ls], [x.shape[0] for x in ls],
                            [x.shape[1] for x in ls], [_p(e) for e in ex], float(sparsity), _p(counts))  # fmt: skip
    if bad >= 0:
        nonfinite = int((~torch.isfinite(losses[bad])).sum())
        raise ValueError(f"losses[{bad}] contains {nonfinite} NaN/Inf value(s)")
    return list(torch.split(counts, [x.shape[0] for x in ls]))


def obs_scores(w: torch.Tensor, finv: torch.Tensor) -> torch.Tensor:
    nb, b = w.shape
    wd, h = w.to(finv.dtype).contiguous(), finv.contiguous()
    out = _alloc.empty(nb, b, dtype=finv.dtype, device=w.device)
    _cpu.scores(_p(wd), _p(h), _fp64(h), nb, b, _p(out), _threads())
    return out


def obs_update_independent(
    w: torch.Tensor, finv: torch.Tensor, prune_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the new weights and the (nb,) bool of blocks with NaN/Inf inputs or a non-positive pivot."""
    nb, b = w.shape
    wd, h = w.to(finv.dtype).contiguous(), finv.contiguous()
    m8 = prune_mask.contiguous().view(torch.uint8)
    out = _alloc.empty(nb, b, dtype=finv.dtype, device=w.device)
    bad = _alloc.empty(nb, dtype=torch.uint8, device=w.device)
    _cpu.update_independent(_p(wd), _p(h), _fp64(h), _p(m8), nb, b, _p(out), _p(bad), _threads())
    return out.to(w.dtype), bad.bool()


# The kernels read every input once and report what is not finite themselves (gradient counts;
# blocks flagged bad), so the callers skip their own full scans of the inputs.
for _fn in (gram_update_, woodbury_update_):
    _fn.counts_nonfinite = True
gram_update_.overwrites_fresh = True  # takes overwrite=True for the first chunk of a fresh state
for _fn in (obs_prune_order, obs_prune_order_, obs_reconstruct, obs_reconstruct_factored, obs_update_independent):
    _fn.scans_inputs = True  # and return the blocks they flag
prune_counts.scans_inputs = True  # and names the layer with a NaN/Inf loss

OPS = {
    "gram_update_": gram_update_,
    "gram_inverse": gram_inverse,
    "woodbury_update_": woodbury_update_,
    "obs_prune_order": obs_prune_order,
    "obs_prune_order_": obs_prune_order_,
    "obs_reconstruct": obs_reconstruct,
    "obs_reconstruct_factored": obs_reconstruct_factored,
    "prune_counts": prune_counts,
    "obs_scores": obs_scores,
    "obs_update_independent": obs_update_independent,
}
