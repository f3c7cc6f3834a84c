"""Empirical Fisher inverses per block (SPEC §2): ``FisherInverse`` and ``fisher_inverse``.

Precision policy
----------------
* ``method="gram"`` accumulates G_b = Σ g_b g_bᵀ in float64 with batched GEMMs, forms
  F_b = λ'I + G_b/m and inverts it in float64, then casts to ``dtype``. Its float64 error on
  diag(F⁻¹) is about cond(F_b) × 1e-16 (cond of the *damped* block): 1e-14 when m ≥ 2B, up to
  ~1e-8 at λ/λ_max = 1e-8 with m < B; a float32 result is float32 rounding (6e-8) everywhere.
  It is the only method that supports ``damp_mode="relative"``.
* ``method="woodbury"`` streams Sherman–Morrison updates on a state of ``dtype`` (what the
  original code does, and what drop-in users expect). It needs ``num_grads`` up front and
  keeps one (nb, B, B) state, half the bytes of the float64 Gram. In float32 the rank-one
  updates start at 1/λ and cancel by many orders of magnitude, so the accuracy depends on how
  often the state is rounded:

  - the reference backend (the CPU path) applies each call's gradients as rank-k steps computed
    in float64 and rounds the state once per call: float32 rounding (1e-7) everywhere below;
  - the CUDA and Triton kernels do one float32 rank-one step per gradient with the original
    code's arithmetic (v = u/√(m + gᵀu), H −= v vᵀ, which keeps the block exactly symmetric):
    as accurate as the original's float32 path, which loses digits as λ/λ_max falls (and may
    return a finite but wrong block below 1e-7: use the Gram method or float64 there).

  Worst relative error of diag(F⁻¹), float32 state, B = 64, cond(F) = 1e2, 3 seeds, measured by
  ``bench/fisher_accuracy.py`` on a CPU (Triton under its interpreter, 2026-11-30):

  ============ ====== ============= ============= ============= =============
  λ/λ_max      m/B     0.5           1             2             8
  ============ ====== ============= ============= ============= =============
  1e-8         orig.   1e-6          6e-1          NaN           2e-1
               ref.    1e-7          2e-5          1e-7          2e-7
               kern.   7e-7          3e-1          5e+0          6e-2
  1e-6         orig.   2e-6          5e-3          3e-3          3e-4
               ref.    2e-7          4e-6          1e-7          1e-7
               kern.   6e-7          3e-3          2e-3          2e-4
  1e-4         orig.   1e-6          5e-5          3e-5          3e-6
               ref.    1e-7          3e-7          1e-7          1e-7
               kern.   6e-7          3e-5          2e-5          2e-6
  1e-2         all     ≤ 1e-6        ≤ 1e-6        ≤ 1e-6        ≤ 1e-6
  ============ ====== ============= ============= ============= =============

  (orig. = the original code's float32 rank-one path, ``bench/baselines.py``; ref. = this
  package's reference/CPU backend; kern. = the kernels.) In float64 the Woodbury method is
  exact to rounding (≤ 1e-8 at λ/λ_max = 1e-8, ≤ 1e-12 from 1e-4 up).
* ``method="auto"`` picks ``"gram"`` (most precise, fewest bytes moved), except that it picks
  ``"woodbury"`` when the state is float64 anyway and ``num_grads`` is known and smaller than
  B / 4 (then m rank-one passes cost less than B-sized GEMMs).
* TF32 is disabled inside every matmul here. A block that is not positive definite, or a
  result holding NaN/Inf, raises :class:`NotPositiveDefiniteError` naming the blocks (and the
  ``name`` given); nothing is returned silently. Gradients with NaN/Inf raise ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from . import _alloc, _backend, _checks, reference
from .errors import NotPositiveDefiniteError

METHODS = ("auto", "woodbury", "gram")


def _pick_method(method: str, damp_mode: str, num_grads: int | None, block: int, dtype: torch.dtype) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "woodbury" and damp_mode == "relative":
        raise ValueError(
            "damp_mode='relative' needs every gradient before the inverse starts; "
            "the streaming Woodbury method cannot do it: use method='gram'"
        )
    if method == "woodbury" and num_grads is None:
        raise ValueError("method='woodbury' needs num_grads (m) up front: it divides by m at every step")
    if method != "auto":
        return method
    if damp_mode == "absolute" and num_grads is not None and dtype == torch.float64 and num_grads * 4 < block:
        return "woodbury"
    return "gram"


def _woodbury_case(finv: torch.Tensor, grads: torch.Tensor) -> _backend.Case:
    """A float64 state updated with lower-precision gradients is a kernel instance of its own."""
    variant = "grads=float32" if finv.dtype == torch.float64 and grads.dtype != torch.float64 else ""
    return _backend.Case("woodbury_update_", finv.device, finv.dtype, finv.shape[1], variant)


class FisherInverse:
    """Streaming accumulator of the blockwise empirical Fisher inverse of one flat tensor.

    Args:
        num_params: N, the number of entries of the (flattened) weight.
        block_size: B; must divide N. There are nb = N / B independent blocks.
        damp: λ > 0. Absolute (added to the diagonal as is) or relative (λ · mean diag(G/m)).
        num_grads: m, the number of gradients that will be given. Required by the Woodbury
            method; for the Gram method it defaults to the number of rows seen.
        damp_mode: ``"absolute"`` (default) or ``"relative"`` (Gram method only).
        method: ``"auto" | "woodbury" | "gram"``; see the module docstring for the policy.
        dtype: float32 or float64, the dtype of the returned inverse (and of the Woodbury state).
        device: where the state lives (default: CPU, or the device of the first chunk).
        backend: ``"auto" | "cuda" | "triton" | "reference"``.
        name: a label (e.g. the layer's name) used in error messages.
        check_finite: check every chunk for NaN/Inf (one device sync per chunk).
        block_range: ``(start, stop)`` to hold only blocks ``start..stop-1`` of the tensor.
            ``update`` still takes whole (k, N) gradients and keeps its columns
            ``[start·B, stop·B)``; ``compute`` returns (stop − start, B, B). Blocks are
            independent, so ranks of a ``torch.distributed`` job can each hold one range and
            concatenating their results gives the whole inverse.
    """

    def __init__(
        self,
        num_params: int,
        block_size: int,
        damp: float = 1e-8,
        num_grads: int | None = None,
        *,
        damp_mode: str = "absolute",
        method: str = "auto",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        backend: str | None = None,
        name: str | None = None,
        check_finite: bool = True,
        block_range: tuple[int, int] | None = None,
    ) -> None:
        self.num_params = int(num_params)
        if self.num_params < 1:
            raise ValueError(f"num_params must be positive, got {num_params!r}")
        self.block_size = block_size
        total_blocks = _checks.block_size(self.num_params, block_size)
        start, stop = (0, total_blocks) if block_range is None else (int(block_range[0]), int(block_range[1]))
        if not 0 <= start < stop <= total_blocks:
            raise ValueError(f"block_range must satisfy 0 <= start < stop <= {total_blocks}, got {block_range!r}")
        self.block_range = (start, stop)
        self.num_blocks = stop - start
        self.damp = _checks.damp(damp, damp_mode)
        self.damp_mode = damp_mode
        if num_grads is not None and (int(num_grads) != num_grads or num_grads < 1):
            raise ValueError(f"num_grads must be a positive int, got {num_grads!r}")
        self.num_grads = None if num_grads is None else int(num_grads)
        if dtype not in _checks.FISHER_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        self.dtype = dtype
        self.method = _pick_method(method, damp_mode, self.num_grads, block_size, dtype)
        self.backend = backend
        self.name = name
        self.check_finite = check_finite
        self.device = None if device is None else torch.device(device)
        self.seen = 0
        self._rejected = False
        self._state: torch.Tensor | None = None
        self._result: torch.Tensor | None = None

    def _init_state(self, device: torch.device) -> torch.Tensor:
        nb, b = self.num_blocks, self.block_size
        if self.method == "woodbury":
            eye = torch.eye(b, dtype=self.dtype, device=device) / self.damp
            return eye.expand(nb, b, b).contiguous()
        return torch.zeros(nb, b, b, dtype=torch.float64, device=device)

    def update(self, chunk: torch.Tensor) -> None:
        """Add gradients. ``chunk`` is (k, N) or (N,), any floating dtype, on one device.

        Every call reads and writes the whole state once (N·B·8 bytes for the float64 Gram,
        N·B·4 for float32 Woodbury), so pass as many gradients per call as memory allows: the
        Gram update is memory-bound below about k = 128.
        """
        if self._result is not None:
            raise RuntimeError("compute() was already called; make a new FisherInverse to start again")
        _checks.floating("chunk", chunk)
        if chunk.dim() == 1:
            chunk = chunk.unsqueeze(0)
        if chunk.dim() != 2 or chunk.shape[1] != self.num_params:
            raise ValueError(
                f"chunk must have shape (k, {self.num_params}) or ({self.num_params},), got {tuple(chunk.shape)}"
            )
        if chunk.shape[0] == 0:
            return
        if self.num_grads is not None and self.seen + chunk.shape[0] > self.num_grads:
            raise ValueError(f"more gradients than num_grads={self.num_grads} for {self.name or 'this Fisher'}")
        if self._rejected:
            raise RuntimeError(f"{self.name or 'this Fisher'} took part of a chunk with NaN/Inf: make a new one")
        what = "gradient chunk" + (f" of {self.name!r}" if self.name else "")
        if self.device is None:
            self.device = chunk.device
        if chunk.device != self.device:
            raise ValueError(f"chunk is on {chunk.device} but the accumulator lives on {self.device}")
        start, stop = self.block_range
        if (start, stop) != (0, self.num_params // self.block_size):
            chunk = chunk[:, start * self.block_size : stop * self.block_size]
        chunk = chunk.contiguous()
        kwargs: dict = {}
        if self.method == "woodbury":
            if self._state is None:
                self._state = self._init_state(self.device)
            case = _woodbury_case(self._state, chunk)
            args: tuple = (self._state, chunk, float(self.num_grads))
            _, fn = _backend.implementation(case, self.backend)
        else:
            case = _backend.Case("gram_update_", self.device, torch.float64, self.block_size)
            _, fn = _backend.implementation(case, self.backend)
            if self._state is None:
                if getattr(fn, "overwrites_fresh", False):  # the kernel writes the first chunk's Gram itself
                    nb, b = self.num_blocks, self.block_size
                    self._state = _alloc.empty(nb, b, b, dtype=torch.float64, device=self.device)
                    kwargs["overwrite"] = True
                else:
                    self._state = self._init_state(self.device)
            args = (self._state, chunk)
        counts = getattr(fn, "counts_nonfinite", False)  # the kernel counts them as it reads them
        if self.check_finite and not counts:
            _checks.finite(what, chunk)
        try:
            bad = fn(*args, **kwargs)
        except BaseException:
            if kwargs.get("overwrite"):  # the fresh state may be half-written: start it again next time
                self._state = None
            raise
        if self.check_finite and counts and bad:
            self._rejected = True
            raise ValueError(
                f"{what} contains {bad} NaN/Inf value(s); the accumulator has taken part of it and cannot be used "
                "further"
            )
        self.seen += chunk.shape[0]

    def gram(self) -> torch.Tensor:
        """The accumulated Σ g gᵀ per block so far, (nb, B, B) float64 (Gram method only).

        It does not depend on the damping: :meth:`from_gram` turns it into an accumulator for
        any λ without the gradients again (e.g. a damping search). The tensor is the live state
        (not a copy) until :meth:`compute`, which does not modify it."""
        if self.method != "gram":
            raise ValueError("only the Gram method keeps a damping-free state (Woodbury folds λ in from the start)")
        if self._state is None:
            raise ValueError(f"no gradients were given to {self.name or 'this Fisher'}, or compute() already ran")
        return self._state

    @classmethod
    def from_gram(
        cls,
        gram: torch.Tensor,
        num_grads: int,
        damp: float = 1e-8,
        *,
        damp_mode: str = "absolute",
        dtype: torch.dtype = torch.float32,
        backend: str | None = None,
        name: str | None = None,
    ) -> FisherInverse:
        """An accumulator holding ``gram`` ((nb, B, B) float64, the Σ g gᵀ of ``num_grads``
        gradients, e.g. from :meth:`gram`), ready for :meth:`compute` with this damping."""
        _checks.floating("gram", gram, (torch.float64,))
        _checks.ndim("gram", gram, 3, "(nb, B, B)")
        nb, b, b2 = gram.shape
        if b != b2:
            raise ValueError(f"gram blocks must be square, got shape {tuple(gram.shape)}")
        acc = cls(nb * b, b, damp, int(num_grads), damp_mode=damp_mode, method="gram", dtype=dtype,
                  device=gram.device, backend=backend, name=name)  # fmt: skip
        acc._state = gram
        acc.seen = int(num_grads)
        return acc

    def compute(self, allow_fewer: bool = False) -> torch.Tensor:
        """Return H = F⁻¹ per block, shape (nb, B, B), dtype ``self.dtype``.

        Args:
            allow_fewer: accept fewer gradients than ``num_grads`` (e.g. the data ran out) and
                return the inverse for the m' actually seen. The Gram method divides by m' as
                it is; the Woodbury state, built with 1/m, is converted exactly (float64, B³ per
                block): with c = m/m', (λI + (c/m)G)⁻¹ = H (cI + (1 − c)λH)⁻¹ for H = (λI + G/m)⁻¹.

        Raises:
            ValueError: no gradients, or fewer than ``num_grads`` (without ``allow_fewer``).
            NotPositiveDefiniteError: a block is not positive definite or holds NaN/Inf, also an
                inverse past ``dtype``'s range (the state is kept: :meth:`gram` and
                :meth:`from_gram` can try again, e.g. in float64).
        """
        if self._result is not None:
            return self._result
        if self._rejected:
            raise RuntimeError(f"{self.name or 'this Fisher'} took part of a chunk with NaN/Inf: make a new one")
        if self.seen == 0:
            raise ValueError(f"no gradients were given to {self.name or 'this Fisher'}")
        short = self.num_grads is not None and self.seen != self.num_grads
        if short and not allow_fewer:
            who = self.name or "this Fisher"
            raise ValueError(f"{who} expected num_grads={self.num_grads} gradients, got {self.seen}")
        assert self._state is not None
        m = float(self.seen if short else (self.num_grads or self.seen))
        if self.method == "woodbury":
            if short:
                self._state = _woodbury_rescale(self._state, float(self.num_grads) / self.seen, self.damp)
            finv = self._state
            diag = finv.diagonal(dim1=1, dim2=2)
            ok = torch.isfinite(finv).all(dim=(1, 2)) & (diag > 0).all(dim=1)
            hint = "try method='gram', dtype=torch.float64 or a larger damp"
        else:
            variant = "relative" if self.damp_mode == "relative" else ""
            case = _backend.Case("gram_inverse", self.device, self.dtype, self.block_size, variant)
            _, fn = _backend.implementation(case, self.backend)
            finv, ok = fn(self._state, m, self.damp, self.damp_mode, self.dtype)
            narrow = self.dtype != torch.float64  # the float64 result is rounded: it may not fit
            fits = f", or its inverse does not fit {self.dtype}" if narrow else ""
            hint = f"the damped Fisher failed its float64 Cholesky factorisation{fits}; use a larger damp"
            if narrow and self.damp_mode == "relative":
                hint += (
                    "; with damp_mode='relative' a block whose gradients nearly vanish (a dead unit) gets a "
                    f"λ' as small as its Fisher and an inverse past {self.dtype}'s range: use dtype=torch.float64 "
                    "or damp_mode='absolute'"
                )
        bad = (~ok).nonzero().flatten().tolist()
        if bad:
            what = "Fisher inverse is not positive definite or not finite"
            raise NotPositiveDefiniteError(what, bad, self.name, hint)
        self._state = None
        self._result = finv
        return finv


def _woodbury_rescale(h: torch.Tensor, c: float, damp: float) -> torch.Tensor:
    """(λI + (c/m)G)⁻¹ from H = (λI + G/m)⁻¹: H (cI + (1 − c)λH)⁻¹ per block, in float64 by
    Cholesky (cI + (1 − c)λH has the eigenvalues (c·a + λ)/(a + λ) > 0 for the Fisher's a ≥ 0)."""
    out = torch.empty_like(h)
    b = h.shape[-1]
    step = max(1, (64 << 20) // (3 * b * b * 8))
    eye = torch.eye(b, dtype=torch.float64, device=h.device)
    for s0 in range(0, h.shape[0], step):
        hd = h[s0 : s0 + step].double()
        mat = c * eye + (1.0 - c) * damp * hd
        chol, info = torch.linalg.cholesky_ex(mat)
        res = torch.cholesky_solve(hd, chol)  # M⁻¹H = H M⁻¹ (M is a polynomial in H)
        res = 0.5 * (res + res.transpose(1, 2))
        res[info != 0] = float("nan")  # reported as not positive definite by compute()
        out[s0 : s0 + step] = res.to(h.dtype)
    return out


def fisher_quadratic(
    delta: torch.Tensor, gram: torch.Tensor, num_grads: int, damp: float = 1e-8, *, damp_mode: str = "absolute"
) -> torch.Tensor:
    """The quadratic model of the loss change, ½ δᵀ F δ per block, from the Gram (no inverse).

    F = λ'I + G/m is the damped Fisher whose inverse :class:`FisherInverse` returns for the same
    ``num_grads``, ``damp`` and ``damp_mode``, so this is the loss a weight change ``delta`` costs
    under the model the pruning used (B² work per block, never forming F).

    Args:
        delta: (nb, B) weight change per block, any floating dtype.
        gram: (nb, B, B) float64 Σ g gᵀ (e.g. :meth:`FisherInverse.gram`), same device.
        num_grads: m, the number of gradients in ``gram``.
        damp, damp_mode: as given to :class:`FisherInverse`.

    Returns:
        (nb,) float64.
    """
    _checks.floating("gram", gram, (torch.float64,))
    _checks.ndim("gram", gram, 3, "(nb, B, B)")
    nb, b, b2 = gram.shape
    if b != b2:
        raise ValueError(f"gram blocks must be square, got shape {tuple(gram.shape)}")
    _checks.floating("delta", delta)
    if tuple(delta.shape) != (nb, b):
        raise ValueError(f"delta must have shape ({nb}, {b}), got {tuple(delta.shape)}")
    _checks.same_device(delta=delta, gram=gram)
    if int(num_grads) != num_grads or num_grads < 1:
        raise ValueError(f"num_grads must be a positive int, got {num_grads!r}")
    return reference.fisher_quadratic(delta, gram, float(num_grads), _checks.damp(damp, damp_mode), damp_mode)


def fisher_inverse(
    grads: torch.Tensor | Iterable[torch.Tensor],
    block_size: int,
    damp: float = 1e-8,
    *,
    num_grads: int | None = None,
    damp_mode: str = "absolute",
    method: str = "auto",
    backend: str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Blockwise inverse empirical Fisher H_b = (λI + (1/m) Σ_i g_{i,b} g_{i,b}ᵀ)⁻¹ (SPEC §2).

    Args:
        grads: an (m, N) tensor, or an iterable of (k, N) chunks (never all stored).
        block_size: B, dividing N.
        damp: λ > 0 (see ``damp_mode``).
        num_grads: m; defaults to ``grads.shape[0]`` for a tensor. Needed by the Woodbury
            method when ``grads`` is an iterable.
        damp_mode, method, backend: see :class:`FisherInverse`.
        dtype: float32/float64 result; defaults to the gradients' dtype (float64 stays float64,
            anything else gives float32).

    Returns:
        (nb, B, B) tensor, nb = N / B, on the gradients' device.
    """
    if isinstance(grads, torch.Tensor):
        _checks.floating("grads", grads)
        _checks.ndim("grads", grads, 2, "(m, N)")
        if num_grads is None:
            num_grads = grads.shape[0]
        chunks: Iterable[torch.Tensor] = (grads,)
        first = grads
    else:
        it = iter(grads)
        try:
            first = next(it)
        except StopIteration:
            raise ValueError("grads is empty") from None
        _checks.floating("grads chunk", first)

        def _chain():
            yield first
            yield from it

        chunks = _chain()
    n = first.shape[-1]
    if dtype is None:
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    acc = FisherInverse(
        n,
        block_size,
        damp,
        num_grads,
        damp_mode=damp_mode,
        method=method,
        dtype=dtype,
        device=first.device,
        backend=backend,
    )
    for chunk in chunks:
        acc.update(chunk)
    return acc.compute()


def woodbury_update_(
    finv: torch.Tensor, grads: torch.Tensor, num_grads: int, *, backend: str | None = None
) -> torch.Tensor:
    """Apply H_b ← H_b − u uᵀ / (m + g_bᵀ u), u = H_b g_b, for each row g of ``grads`` in order.

    Args:
        finv: (nb, B, B) float32/float64, contiguous, modified in place.
        grads: (k, N) with N = nb·B (or (N,)), on the same device; NaN/Inf raise.
        num_grads: m, the total number of gradients of the Fisher.

    Returns:
        ``finv``.
    """
    _checks.floating("finv", finv, _checks.FISHER_DTYPES)
    _checks.ndim("finv", finv, 3, "(nb, B, B)")
    _checks.floating("grads", grads)
    if grads.dim() == 1:
        grads = grads.unsqueeze(0)
    _checks.ndim("grads", grads, 2, "(k, N)")
    nb, b, b2 = finv.shape
    if b != b2:
        raise ValueError(f"finv blocks must be square, got shape {tuple(finv.shape)}")
    if grads.shape[1] != nb * b:
        raise ValueError(f"grads must have N = nb·B = {nb * b} columns, got {grads.shape[1]}")
    if not finv.is_contiguous():
        raise ValueError("finv must be contiguous to be updated in place")
    if not num_grads > 0:
        raise ValueError(f"num_grads must be positive, got {num_grads!r}")
    _checks.same_device(finv=finv, grads=grads)
    _checks.finite("grads", grads)
    _, fn = _backend.implementation(_woodbury_case(finv, grads), backend)
    fn(finv, grads.contiguous(), float(num_grads))
    return finv
