"""First-use self-check of the kernel backends: a wrong kernel never silently reaches a user.

The first time a kernel backend (cuda, triton) is chosen for a case in this process — an op on
a device, in a dtype, with a kernel instance (``launch_config``: the register-tile width or the
packed kernel, the Triton tile, the sparse kernel variant) — the same function also runs on one
or two random blocks of that size (for ``spmm``: a small weight of the same format and
in_features), and the result is compared with the reference computed in float64 on the same
device. Within the tolerance (``TOLERANCE``, relative to the largest reference entry; element
orders must agree exactly) the case is marked good for the rest of the process; beyond it,
or if the kernel raises, the dispatcher (``_backend.implementation``) uses the next backend
for that case from then on (``"auto"``) or raises (an explicit backend), and warns once
naming the kernel, the device and the error. Results are cached per process; every decision
is listed in ``available_backends()[name].events``. ``OVIT_SELF_CHECK=0`` turns the check
off. It costs a few milliseconds per case on a GPU; a case first met during CUDA-graph
capture is not checked (nothing is cached, the next uncaptured call checks it).

:func:`mismatch` is also what ``bench/gpu_check.py`` prints per kernel: the worst error, where
(block, row, column), and the first NaN/Inf.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable

import torch

from . import _backend, reference
from ._backend import Case
from .sparse_formats import pack

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}
_results: dict[tuple, str | None] = {}
_lock = threading.Lock()


def enabled() -> bool:
    """False when ``OVIT_SELF_CHECK`` is ``0`` (or ``off``/``false``)."""
    return os.environ.get("OVIT_SELF_CHECK", "1").strip().lower() not in ("0", "off", "false", "no")


def mismatch(got: torch.Tensor, want: torch.Tensor, tol: float | None = None) -> dict:
    """Compare a kernel's output with its reference, entry by entry.

    Args:
        got: the kernel's output, any shape (e.g. (nb, B, B)).
        want: the reference, same shape (float64 preferably).
        tol: the largest acceptable error relative to max |want|; ``ok`` is False beyond it,
            on any NaN/Inf in ``got`` (where ``want`` is finite), or on a shape mismatch.

    Returns:
        ``{"ok", "max_rel_err", "where", "got", "want", "nonfinite", "first_nonfinite", "text"}``:
        ``where`` and ``first_nonfinite`` are index lists (block, row, column for a Fisher
        block), ``text`` says it all in one line.
    """
    if tuple(got.shape) != tuple(want.shape):
        text = f"shape {tuple(got.shape)} where {tuple(want.shape)} was expected"
        return {"ok": False, "max_rel_err": math.inf, "where": None, "got": None, "want": None,
                "nonfinite": 0, "first_nonfinite": None, "text": text}  # fmt: skip
    g = got.detach().to(torch.float64)
    w = want.detach().to(g.device, torch.float64)
    scale = float(w.abs().max()) if w.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    bad = ~torch.isfinite(g) & torch.isfinite(w)
    nonfinite = int(bad.sum())
    first = None
    if nonfinite:
        first = [int(i) for i in torch.unravel_index(bad.flatten().nonzero()[0, 0], g.shape)]
    err = ((g - w).abs() / scale).masked_fill(bad, math.inf).nan_to_num(nan=0.0)
    if err.numel():
        flat = int(err.flatten().argmax())
        where = [int(i) for i in torch.unravel_index(torch.tensor(flat), g.shape)]
        max_err = float(err.flatten()[flat])
        got_v, want_v = float(g.flatten()[flat]), float(w.flatten()[flat])
    else:
        where, max_err, got_v, want_v = [], 0.0, 0.0, 0.0
    ok = nonfinite == 0 and (tol is None or max_err <= tol)
    text = f"worst error {max_err:.2e} of max|ref| at {where} (got {got_v:.6g}, want {want_v:.6g})"
    if tol is not None:
        text += f", tolerance {tol:.0e}"
    if nonfinite:
        text += f"; {nonfinite} NaN/Inf, first at {first}"
    return {"ok": ok, "max_rel_err": max_err, "where": where, "got": got_v, "want": want_v,
            "nonfinite": nonfinite, "first_nonfinite": first, "text": text}  # fmt: skip


def _order_mismatch(got: torch.Tensor, want: torch.Tensor, steps: int) -> str | None:
    g, w = got[:, :steps].cpu(), want[:, :steps].cpu()
    diff = (g != w).nonzero()
    if not diff.numel():
        return None
    blk, t = (int(v) for v in diff[0])
    return f"elimination order differs at block {blk}, step {t} (got {int(g[blk, t])}, want {int(w[blk, t])})"


# --- probes: one per op; each returns (ok, text) -------------------------------------------


def _rand(*shape: int, dev: torch.device, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dev)


def _spd_inverse(nb: int, b: int, dev: torch.device, gen: torch.Generator, coupling: float = 1.0) -> torch.Tensor:
    """(nb, b, b) float64 inverse of a well-conditioned Fisher: I + coupling · X Xᵀ / (2b)."""
    x = _rand(nb, b, 2 * b, dev=dev, gen=gen)
    f = torch.eye(b, dtype=torch.float64, device=dev) + coupling * (x @ x.transpose(1, 2)) / (2 * b)
    return torch.cholesky_inverse(torch.linalg.cholesky(f))  # not LU: batched LU has stalled on CPUs


def _variant_nm(variant: str) -> tuple[int, int] | None:
    for part in variant.split("+"):
        if part.startswith("nm="):
            n, m = part[3:].split(":")
            return int(n), int(m)
    return None


def _probe_woodbury(fn: Callable, case: Case, gen: torch.Generator) -> tuple[bool, str]:
    b, dt, dev = case.block, case.dtype, case.device
    h0 = _spd_inverse(2, b, dev, gen)
    g = _rand(5, 2 * b, dev=dev, gen=gen)
    gdt = torch.float32 if "grads=float32" in case.variant else dt
    ref = h0.clone()
    reference.woodbury_update_(ref, g.to(gdt).double(), 5.0)
    out = h0.to(dt).contiguous()
    fn(out, g.to(gdt).contiguous(), 5.0)
    r = mismatch(out, ref, TOLERANCE[dt])
    return r["ok"], r["text"]


def _probe_gram_inverse(fn: Callable, case: Case, gen: torch.Generator) -> tuple[bool, str]:
    b, dt, dev = case.block, case.dtype, case.device
    g = _rand(2 * b + 1, 2, b, dev=dev, gen=gen).permute(1, 2, 0)
    gram = (g @ g.transpose(1, 2)).contiguous()
    mode = "relative" if "relative" in case.variant else "absolute"
    ref, ok_ref = reference.gram_inverse(gram, 2.0 * b + 1, 1e-2, mode, torch.float64)
    out, ok = fn(gram, 2.0 * b + 1, 1e-2, mode, dt)
    if not bool(ok.all()):
        return False, f"reported blocks {(~ok).nonzero().flatten().tolist()} as not positive definite"
    r = mismatch(out, ref, TOLERANCE[dt])
    return r["ok"], r["text"]


def _elimination_problem(case: Case, gen: torch.Generator):
    """Weights of well-separated magnitudes and weakly coupled inverses, so that float32 and
    float64 agree on the order; the case's mask / N:M variant."""
    b, dev = case.block, case.device
    h = _spd_inverse(2, b, dev, gen, coupling=0.05)
    mags = 1.0 + torch.arange(b, dtype=torch.float64) / b
    w = torch.stack([mags[torch.randperm(b, generator=gen)] for _ in range(2)])
    w = (w * torch.where(torch.rand(2, b, generator=gen) < 0.5, -1.0, 1.0)).to(dev)
    mask = None
    if "mask" in case.variant:
        mask = torch.zeros(2, b, dtype=torch.bool, device=dev)
        mask[0, 0] = True
        mask[1, b - 1] = True
    return w, h, mask, _variant_nm(case.variant)


def _elimination_matches(got: tuple, want: tuple, dtype: torch.dtype) -> tuple[bool, str, int]:
    """(ok, text, steps compared): a kernel's (order, loss, bad) against the reference's (order,
    loss); float32 is held to the first half of the steps, where it agrees with float64."""
    order, loss, bad = got
    o_ref, l_ref = want
    steps = o_ref.shape[1] if dtype == torch.float64 else max(1, o_ref.shape[1] // 2)
    if bool(bad.any()):
        return False, f"flagged blocks {bad.nonzero().flatten().tolist()} as failed on a positive definite input", 0
    text = _order_mismatch(order, o_ref, steps)
    if text is not None:
        return False, text, 0
    r = mismatch(loss[:, :steps], l_ref[:, :steps], TOLERANCE[dtype])
    return r["ok"], r["text"], steps


def _reconstruction_matches(got: tuple, want: tuple, dtype: torch.dtype) -> tuple[bool, str]:
    """A kernel's (w_new, keep, bad) against the reference's (w_new, keep)."""
    w_out, keep, bad = got
    w_ref, keep_ref = want
    if bool(bad.any()) or not torch.equal(keep.cpu(), keep_ref.cpu()):
        return False, "the kept/pruned mask differs from the reference"
    r = mismatch(w_out, w_ref, TOLERANCE[dtype])
    return r["ok"], r["text"]


def _probe_prune_order(fn: Callable, case: Case, gen: torch.Generator) -> tuple[bool, str]:
    w, h, mask, nm = _elimination_problem(case, gen)
    o_ref, l_ref, _ = reference.obs_prune_order(w, h, mask, nm)
    ok, text, _ = _elimination_matches(fn(w.to(case.dtype), h.to(case.dtype), mask, nm), (o_ref, l_ref), case.dtype)
    return ok, text


def _probe_reconstruct(fn: Callable, case: Case, gen: torch.Generator) -> tuple[bool, str]:
    w, h, _, _ = _elimination_problem(case, gen)
    order, _, _ = reference.obs_prune_order(w, h, None, None)
    counts = torch.tensor([case.block // 2, case.block], device=case.device)
    want = reference.obs_reconstruct(w, h, order, counts)[:2]
    return _reconstruction_matches(fn(w.to(case.dtype), h.to(case.dtype), order, counts), want, case.dtype)


def _probe_prune_order_(fn: Callable, case: Case, gen: torch.Generator) -> tuple[bool, str]:
    """The order, the losses and the factor left in the inverses' storage, against the reference."""
    w, h, mask, nm = _elimination_problem(case, gen)
    f_ref = h.clone(memory_format=torch.contiguous_format)
    o_ref, l_ref, _ = reference.obs_prune_order_(w, f_ref, mask, nm)
    fac = h.to(case.dtype).clone(memory_format=torch.contiguous_format)
    ok, text, steps = _elimination_matches(fn(w.to(case.dtype), fac, mask, nm), (o_ref, l_ref), case.dtype)
    if not ok:
        return ok, text
    r = mismatch(fac[:, :, :steps], f_ref[:, :, :steps], TOLERANCE[case.dtype])
    return r["ok"], "factor: " + r["text"]


def _probe_reconstruct_factored(fn: Callable, case: Case, gen: torch.Generator) -> tuple[bool, str]:
    """Final weights from the reference's factor against the reference's replay."""
    w, h, _, _ = _elimination_problem(case, gen)
    fac = h.clone(memory_format=torch.contiguous_format)
    order, _, _ = reference.obs_prune_order_(w, fac, None, None)
    counts = torch.tensor([case.block // 2, case.block], device=case.device)
    want = reference.obs_reconstruct(w, h, order, counts)[:2]
    return _reconstruction_matches(fn(w.to(case.dtype), fac.to(case.dtype), order, counts), want, case.dtype)


def _probe_scores(fn: Callable, case: Case, gen: torch.Generator) -> tuple[bool, str]:
    w, h, _, _ = _elimination_problem(case, gen)
    r = mismatch(fn(w.to(case.dtype), h.to(case.dtype)), reference.obs_scores(w, h), TOLERANCE[case.dtype])
    return r["ok"], r["text"]


def _probe_update_independent(fn: Callable, case: Case, gen: torch.Generator) -> tuple[bool, str]:
    w, h, _, _ = _elimination_problem(case, gen)
    prune = (torch.rand(w.shape, generator=gen) < 0.5).to(case.device)
    want = reference.obs_update_independent(w, h, prune)
    got = fn(w.to(case.dtype), h.to(case.dtype), prune)
    if getattr(fn, "scans_inputs", False):  # (w_new, bad): a clean problem flags no block
        got, bad = got
        if bool(bad.any()):
            return False, f"flagged {int(bad.sum())} clean block(s) as bad"
    r = mismatch(got, want, TOLERANCE[case.dtype])
    return r["ok"], r["text"]


def _probe_spmm(fn: Callable, case: Case, gen: torch.Generator) -> tuple[bool, str]:
    s, dt, dev = case.spmm, case.dtype, case.device
    assert s is not None
    out_f, k = min(s.out_features, 64), s.in_features
    if s.format == "bsr":
        out_f = max(s.bm, out_f // s.bm * s.bm)
    w = torch.randn(out_f, k, generator=gen)
    if s.format == "nm":
        g = w.abs().view(out_f, k // s.m, s.m)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.topk(s.n, dim=-1).indices, True).view(out_f, k)
        kw: dict = {"n": s.n, "m": s.m}
    elif s.format == "bsr":
        tiles = torch.rand(out_f // s.bm, k // s.bn, generator=gen) < 0.5
        keep = tiles.repeat_interleave(s.bm, 0).repeat_interleave(s.bn, 1)
        kw = {"block": (s.bm, s.bn)}
    else:
        keep = torch.rand(out_f, k, generator=gen) < 0.3
        kw = {}
    dense = torch.where(keep, w, torch.zeros_like(w)).to(dt)
    p = pack(dense.to(dev), s.format, keep.to(dev), **kw)
    x = torch.randn(min(s.tokens, 320), k, generator=gen).to(dt).to(dev)
    bias = torch.randn(out_f, generator=gen).to(dt).to(dev) if s.bias else None
    want = x.double() @ dense.double().to(dev).T
    if bias is not None:
        want = want + bias.double()
    if s.activation == "gelu":
        want = torch.nn.functional.gelu(want)
    r = mismatch(fn(x, p, bias, s.activation), want, TOLERANCE[dt])
    return r["ok"], r["text"]


def _probe_prune_counts(fn: Callable, case: Case, gen: torch.Generator) -> tuple[bool, str]:
    """Two layers of cumulative losses with ties across blocks and layers, one with padding."""
    steps = torch.randint(0, 4, (2, 5, 7), generator=gen).double().cumsum(-1).to(case.device)
    losses = [steps[0], steps[1, :3].float()]
    exclude = [torch.zeros(5, dtype=torch.int64, device=case.device), torch.tensor([0, 2, 7], device=case.device)]
    for s in (0.0, 0.3, 0.55, 0.99):
        for ex in (None, exclude):
            want = reference.prune_counts(losses, s, ex)
            got = fn(losses, s, ex)
            if any(not torch.equal(g.cpu(), w.cpu()) for g, w in zip(got, want)):
                return False, f"counts differ from the reference at sparsity {s}"
    return True, "counts equal to the reference's"


PROBES: dict[str, Callable[[Callable, Case, torch.Generator], tuple[bool, str]]] = {
    "prune_counts": _probe_prune_counts,
    "woodbury_update_": _probe_woodbury,
    "gram_inverse": _probe_gram_inverse,
    "obs_prune_order": _probe_prune_order,
    "obs_prune_order_": _probe_prune_order_,
    "obs_reconstruct": _probe_reconstruct,
    "obs_reconstruct_factored": _probe_reconstruct_factored,
    "obs_scores": _probe_scores,
    "obs_update_independent": _probe_update_independent,
    "spmm": _probe_spmm,
}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def verify(name: str, fn: Callable, case: Case) -> str | None:
    """None if backend ``name``'s ``fn`` may run ``case`` (checked now, earlier, or not
    applicable), else why not: the self-check's mismatch, or the exception it raised."""
    if name == "reference" or not enabled() or case.op not in PROBES or fn is reference.OPS.get(case.op):
        return None
    config = _backend.launch_config(name, case)
    spmm_key = None if case.spmm is None else case.spmm._replace(tokens=min(case.spmm.tokens, 320))
    key = (name, case.op, str(case.device), case.dtype, case.block, case.variant, config, spmm_key)
    with _lock:
        if key in _results:
            return _results[key]
    if _capturing(case.device):
        return None
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0x0517)
    try:
        with torch.no_grad():
            ok, text = PROBES[case.op](fn, case, gen)
    except Exception as e:  # noqa: BLE001 - a kernel that raises on a valid input fails its check
        ok, text = False, f"raised {type(e).__name__}: {str(e)[:300]}"
    ms = (time.perf_counter() - t0) * 1e3
    where = f"{case.describe()}" + (f" [{config}]" if config else "")
    if ok:
        _backend.record(name, f"self-check passed: {where}: {text} ({ms:.0f} ms)")
        result = None
    else:
        _backend.record(name, f"self-check FAILED: the {name} kernel for {where}: {text}", warn=True)
        result = text
    with _lock:
        _results[key] = result
    return result


def clear() -> None:
    """Forget every cached self-check result (tests use it)."""
    with _lock:
        _results.clear()
