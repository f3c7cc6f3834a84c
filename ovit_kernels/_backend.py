"""The one place that decides which implementation runs an op.

Precedence: an explicit ``backend=`` argument, then the ``OVIT_BACKEND`` environment
variable, then ``"auto"``.

* An explicit backend runs its own code for the case or raises
  :class:`BackendUnavailableError` saying why (not loaded, wrong device, no kernel for this
  op, a block or format its kernels do not hold, a failed first-use self-check). It never
  hands the work to another backend.
* ``"auto"`` tries, in order, cuda, triton and the reference for CUDA tensors, and cpu and the
  reference for CPU tensors (``AUTO_ORDER``), and takes the first that can run the case and
  passes its self-check. Every backend it skips for a reason other than not being loaded is
  recorded in :func:`available_backends` (``events``); skipping down to the reference a loaded
  kernel backend that has a kernel for the op but declined the case (a block size, a format),
  or one that failed its self-check, also warns, once per kind.
* Two steps have one device-generic implementation that every backend uses by design
  (``SHARED_OPS``): the Gram accumulation is a batched float64 GEMM (``torch.baddbmm``, cuBLAS
  on a GPU) and the global selection is one device sort. A backend may replace them with its
  own code; otherwise the shared one runs and the dispatch table says so.

A backend module provides ``OPS`` (op name → function, its own code only), ``DEVICES``
(device types it accepts), ``status()``, and optionally ``supports(case)`` (None, or why it
cannot run the case) and ``launch_config(case)`` (the kernel instance it would launch, for
diagnostics and for the self-check's cache).
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import NamedTuple

import torch

from .errors import BackendUnavailableError

BACKENDS = ("cuda", "triton", "cpu", "reference")
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
SHARED_OPS = {
    "gram_update_": "batched float64 GEMM (torch.baddbmm), shared by every backend",
    "prune_counts": "one device selection over all layers (torch.kthvalue), shared by the GPU backends",
}
_MODULES = {"reference": ".reference", "triton": ".triton_backend", "cuda": ".cuda_backend", "cpu": ".cpu_backend"}
_cache: dict[str, ModuleType | str] = {}
_events: dict[str, list[str]] = {}
_warned: set[str] = set()
_lock = threading.Lock()


class SpmmCase(NamedTuple):
    """What a sparse × dense product is asked to do (the parts that choose a kernel)."""

    format: str
    n: int
    m: int
    bm: int
    bn: int
    in_features: int
    out_features: int
    tokens: int
    has_meta: bool
    x_aligned: bool
    bias: bool
    activation: str | None


@dataclass(frozen=True)
class Case:
    """One op call, as far as choosing and checking an implementation goes.

    Attributes:
        op: the op name (a key of the backends' ``OPS``).
        device: where the tensors are.
        dtype: the Fisher/OBS state's dtype (finv, or the inverse's output dtype), or the
            activations' dtype for ``spmm``.
        block: the block size B, if the op has blocks.
        variant: what else selects a kernel instance: ``"mask"``, ``"nm"``, ``"mask+nm"`` for
            the elimination, ``"relative"`` for a relatively damped inverse, else ``""``.
        spmm: the product's description, for ``spmm``.
    """

    op: str
    device: torch.device
    dtype: torch.dtype | None = None
    block: int | None = None
    variant: str = ""
    spmm: SpmmCase | None = None

    def describe(self) -> str:
        parts = [self.op]
        if self.dtype is not None:
            parts.append(str(self.dtype).replace("torch.", ""))
        if self.block is not None:
            parts.append(f"B={self.block}")
        if self.variant:
            parts.append(self.variant)
        if self.spmm is not None:
            s = self.spmm
            fmt = {"nm": f"{s.n}:{s.m}", "bsr": f"bsr {s.bm}x{s.bn}"}.get(s.format, s.format)
            parts.append(f"{fmt} {s.out_features}x{s.in_features}, {s.tokens} tokens")
        return " ".join(parts) + f" on {self.device}"


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run in this process, and if not, why.

    Attributes:
        available: the backend is loaded and has a device to run on.
        reason: why (not), in words.
        ops: the ops it runs with its own code; :data:`SHARED_OPS` run for it as well.
        events: what happened in this process: cases ``"auto"`` did not give it (and why),
            and its first-use self-checks (passed or failed, with the error).
    """

    available: bool
    reason: str
    ops: tuple[str, ...] = ()
    events: tuple[str, ...] = field(default_factory=tuple)

    def __bool__(self) -> bool:
        return self.available


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load(name: str) -> ModuleType | str:
    """Import a backend module once; return it, or the reason it failed."""
    if name not in _cache:
        try:
            _cache[name] = importlib.import_module(_MODULES[name], __package__)
        except Exception as e:  # noqa: BLE001 - any import failure makes the backend unavailable
            _cache[name] = f"{type(e).__name__}: {e}"
    return _cache[name]


def _module_status(name: str) -> BackendStatus:
    if name == "reference":
        return BackendStatus(True, "plain PyTorch, always available")
    mod = _load(name)
    if isinstance(mod, str):
        return BackendStatus(False, f"could not be loaded ({mod})")
    return mod.status()


def record(backend: str, event: str, warn: bool = False) -> None:
    """Note ``event`` for ``backend`` in :func:`available_backends` (once); warn once if asked."""
    with _lock:
        log = _events.setdefault(backend, [])
        if event not in log:
            log.append(event)
        if not warn or event in _warned:
            return
        _warned.add(event)
    warnings.warn(f"ovit_kernels: {event}", RuntimeWarning, stacklevel=4)


def available_backends() -> dict[str, BackendStatus]:
    """Say which backends are usable in this process, what each runs, and what happened.

    Returns:
        ``{"cuda": ..., "triton": ..., "cpu": ..., "reference": BackendStatus}``; each
        carries the ops it runs with its own code and the dispatch events of this process
        (fallbacks taken by ``"auto"``, first-use self-check results).
    """
    out = {}
    for name in BACKENDS:
        st = _module_status(name)
        mod = _load(name)
        ops = tuple(sorted(mod.OPS)) if not isinstance(mod, str) else ()
        with _lock:
            ev = tuple(_events.get(name, ()))
        out[name] = BackendStatus(st.available, st.reason, ops, ev)
    return out


def _requested(backend: str | None) -> str:
    req = backend if backend is not None else os.environ.get("OVIT_BACKEND", "auto")
    req = (req or "auto").strip().lower()
    if req != "auto" and req not in BACKENDS:
        src = "backend=" if backend is not None else "OVIT_BACKEND="
        raise ValueError(f"{src}{req!r} is not one of 'auto', {', '.join(map(repr, BACKENDS))}")
    return req


def _devices(mod: ModuleType) -> tuple[str, ...]:
    devs = mod.DEVICES() if callable(mod.DEVICES) else mod.DEVICES
    return tuple(devs)


def candidate(name: str, case: Case) -> tuple[Callable | None, str]:
    """``(function, "")`` if backend ``name`` runs ``case`` with its own code (or the shared
    implementation of a shared op), else ``(None, why not)``. No self-check here."""
    st = _module_status(name)
    if not st.available:
        return None, st.reason
    mod = _load(name)
    assert not isinstance(mod, str)
    if name != "reference":
        devs = _devices(mod)
        if case.device.type not in devs:
            hint = " (or TRITON_INTERPRET=1 for CPU)" if name == "triton" else ""
            return None, f"the {name} backend needs {' or '.join(devs)} tensors{hint}, got tensors on {case.device}"
    fn = mod.OPS.get(case.op)
    if fn is None:
        if case.op in SHARED_OPS:
            return _load("reference").OPS[case.op], ""  # type: ignore[union-attr]
        return None, f"the {name} backend has no kernel for {case.op}"
    why = mod.supports(case) if hasattr(mod, "supports") else None
    return (None, why) if why is not None else (fn, "")


def launch_config(name: str, case: Case) -> str:
    """The kernel instance backend ``name`` launches for ``case`` (``""`` if it cannot say)."""
    mod = _load(name)
    if isinstance(mod, str) or not hasattr(mod, "launch_config") or case.op not in mod.OPS:
        return ""
    try:
        return mod.launch_config(case)
    except Exception as e:  # noqa: BLE001 - a description only
        return f"(launch configuration unknown: {e})"


def implementation(case: Case, backend: str | None = None) -> tuple[str, Callable]:
    """Return ``(backend_name, function)`` that runs ``case`` (see the module docstring)."""
    from . import _selfcheck

    req = _requested(backend)
    if req != "auto":
        fn, why = candidate(req, case)
        if fn is None:
            raise BackendUnavailableError(f"backend {req!r} cannot run {case.describe()}: {why}")
        bad = _selfcheck.verify(req, fn, case)
        if bad is not None:
            raise BackendUnavailableError(
                f"backend {req!r} failed its first-use self-check on {case.describe()}: {bad}"
            )
        return req, fn
    skipped: list[tuple[str, str, bool]] = []
    for name in AUTO_ORDER.get(case.device.type, ("reference",)):
        fn, why = candidate(name, case)
        if fn is not None:
            bad = _selfcheck.verify(name, fn, case)
            if bad is None:
                for other, reason, failed_check in skipped:  # a failed self-check has warned already
                    if _module_status(other).available:
                        # worth a warning: a kernel that exists but declined this case, down to the reference
                        mod = _load(other)
                        has_op = not isinstance(mod, str) and case.op in mod.OPS
                        warn = not failed_check and name == "reference" and has_op
                        record(other, f"auto ran {case.describe()} on {name}: {other} {reason}", warn)
                return name, fn
            skipped.append((name, f"failed its self-check ({bad})", True))
        else:
            skipped.append((name, why, False))
    ref = _load("reference")
    assert not isinstance(ref, str)
    return "reference", ref.OPS[case.op]
