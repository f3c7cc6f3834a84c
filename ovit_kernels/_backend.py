"""The one place that decides which implementation runs an op.

Precedence: an explicit ``backend=`` argument, then the ``OVIT_BACKEND`` environment
variable, then ``"auto"``. ``"auto"`` prefers cuda, then triton, then reference for CUDA
tensors, and the reference for CPU tensors. An explicit backend that cannot run raises
:class:`BackendUnavailableError` with the reason; ``"auto"`` falls back silently.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from .errors import BackendUnavailableError

BACKENDS = ("cuda", "triton", "reference")
_MODULES = {"reference": ".reference", "triton": ".triton_backend", "cuda": ".cuda_backend"}
_cache: dict[str, ModuleType | str] = {}


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run in this process, and if not, why."""

    available: bool
    reason: str

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


def _status(name: str) -> BackendStatus:
    if name == "reference":
        return BackendStatus(True, "plain PyTorch, always available")
    mod = _load(name)
    if isinstance(mod, str):
        return BackendStatus(False, f"could not be loaded ({mod})")
    return mod.status()


def available_backends() -> dict[str, BackendStatus]:
    """Say which backends are usable in this process, and why the others are not.

    Returns:
        ``{"cuda": BackendStatus, "triton": BackendStatus, "reference": BackendStatus}``.
    """
    return {name: _status(name) for name in BACKENDS}


def _requested(backend: str | None) -> str:
    req = backend if backend is not None else os.environ.get("OVIT_BACKEND", "auto")
    req = (req or "auto").strip().lower()
    if req != "auto" and req not in BACKENDS:
        src = "backend=" if backend is not None else "OVIT_BACKEND="
        raise ValueError(f"{src}{req!r} is not one of 'auto', {', '.join(map(repr, BACKENDS))}")
    return req


def _usable(name: str, op: str, device: torch.device, block: int | None) -> str | None:
    """None if backend ``name`` can run ``op`` on ``device`` (blocks of size ``block``), else why not."""
    st = _status(name)
    if not st.available:
        return st.reason
    if name == "reference":
        return None
    mod = _load(name)
    assert not isinstance(mod, str)
    if op not in mod.OPS:
        return f"the {name} backend does not implement {op}"
    if name == "cuda" and device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got tensors on {device}"
    if name == "triton" and device.type != "cuda" and not triton_interpret():
        return f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {device}"
    if hasattr(mod, "supports"):
        return mod.supports(op, block)
    return None


def resolve(op: str, device: torch.device, backend: str | None = None, block: int | None = None) -> str:
    """Pick the backend name that runs ``op`` on ``device`` for blocks of size ``block``."""
    req = _requested(backend)
    if req != "auto":
        why = _usable(req, op, device, block)
        if why is not None:
            raise BackendUnavailableError(f"backend {req!r} cannot run {op}: {why}")
        return req
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("reference",)
    for name in order:
        if _usable(name, op, device, block) is None:
            return name
    return "reference"


def implementation(
    op: str, device: torch.device, backend: str | None = None, block: int | None = None
) -> tuple[str, Callable]:
    """Return ``(backend_name, function)`` implementing ``op`` for tensors on ``device``."""
    name = resolve(op, device, backend, block)
    mod = _load(name)
    assert not isinstance(mod, str)
    return name, mod.OPS[op]
