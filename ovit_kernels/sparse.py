"""Sparse × dense products for pruned Linear layers: ``spmm``, ``SparseLinear``, ``sparsify``.

``SparseLinear`` runs through the custom op ``ovit::sparse_linear`` (with a fake kernel), so
it traces under ``torch.compile``. ``sparsify(model, format="auto")`` only replaces a Linear
when a measured table (``bench/bench_spmm.py`` writes it; ``OVIT_SPMM_TABLE`` or the packaged
``spmm_table.json``) says the format beats dense for that card, shape, batch and sparsity: it
never picks a format slower than dense, and keeps everything dense when nothing was measured.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable

import torch
from torch import nn

from . import _backend
from .sparse_formats import FORMATS, PackedWeight, is_nm, pack

ACTIVATIONS = (None, "gelu")


def _check_x(x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None, activation: str | None) -> None:
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.shape[-1] != p.in_features:
        raise ValueError(f"x must end in in_features = {p.in_features}, got shape {tuple(x.shape)}")
    if x.dtype != p.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the packed weight has {p.dtype}: convert one of them")
    if x.device != p.device:
        raise ValueError(f"x is on {x.device}, the packed weight on {p.device}")
    if bias is not None and (bias.shape != (p.out_features,) or bias.device != x.device):
        raise ValueError(f"bias must have shape ({p.out_features},) on {x.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def spmm(
    x: torch.Tensor,
    packed: PackedWeight,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``act(x @ Wᵀ + bias)`` with W given compressed.

    Args:
        x: (..., in_features) activations of the packed weight's dtype (fp16/bf16/fp32).
        packed: a :class:`PackedWeight` (``pack_nm``, ``pack_bitmap``, ``pack_bsr``).
        bias: optional (out_features,).
        activation: ``None`` or ``"gelu"`` (fused after the bias).

    Returns:
        (..., out_features) in x's dtype; accumulation is fp32.
    """
    _check_x(x, packed, bias, activation)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, packed.in_features).contiguous()
    p = packed
    info = _backend.SpmmCase(
        p.format, p.n, p.m, p.bm, p.bn, p.in_features, p.out_features, x2.shape[0],
        p.format == "nm" and p.c.numel() > 0, x2.data_ptr() % 16 == 0, bias is not None, activation,
    )  # fmt: skip
    _, fn = _backend.implementation(_backend.Case("spmm", x.device, x.dtype, spmm=info), backend)
    return fn(x2, packed, bias, activation).view(*lead, packed.out_features)


# --- the custom op behind SparseLinear ---------------------------------------------------------


@torch.library.custom_op("ovit::sparse_linear", mutates_args=())
def _sparse_linear_op(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    format: str,
    out_features: int,
    in_features: int,
    n: int,
    m: int,
    bm: int,
    bn: int,
    activation: str,
    backend: str,
) -> torch.Tensor:
    p = PackedWeight(format, out_features, in_features, a, b, c, n, m, bm, bn)
    return spmm(x, p, bias, activation or None, backend=backend or None)


@_sparse_linear_op.register_fake
def _(x, a, b, c, bias, format, out_features, in_features, n, m, bm, bn, activation, backend):
    return x.new_empty(*x.shape[:-1], out_features)


class SparseLinear(nn.Module):
    """A pruned ``nn.Linear`` stored compressed; ``forward`` equals the dense layer (within the
    accumulation order), optionally with GELU fused.

    Args:
        packed: the compressed weight.
        bias: optional (out_features,) bias.
        activation: ``None`` or ``"gelu"``.
        backend: backend for the product (default: selection rules of ``ovit_kernels``).
    """

    def __init__(
        self,
        packed: PackedWeight,
        bias: torch.Tensor | None = None,
        activation: str | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.format = packed.format
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.n, self.m, self.bm, self.bn = packed.n, packed.m, packed.bm, packed.bn
        self.register_buffer("a", packed.a)
        self.register_buffer("b", packed.b)
        self.register_buffer("c", packed.c)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.backend = backend

    @classmethod
    def from_linear(cls, linear: nn.Linear, format: str, mask: torch.Tensor | None = None, **kw) -> SparseLinear:
        """Pack ``linear.weight`` (mask defaults to its nonzeros) in ``format`` ("nm", "bitmap", "bsr")."""
        activation = kw.pop("activation", None)
        backend = kw.pop("backend", None)
        packed = pack(linear.weight.detach(), format, mask, **kw)
        return cls(packed, linear.bias, activation, backend)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(
            self.format, self.out_features, self.in_features, self.a, self.b, self.c, self.n, self.m, self.bm, self.bn
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _sparse_linear_op(
            x,
            self.a,
            self.b,
            self.c,
            self.bias,
            self.format,
            self.out_features,
            self.in_features,
            self.n,
            self.m,
            self.bm,
            self.bn,
            self.activation or "",
            self.backend or "",
        )

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, format={self.format!r}, activation={self.activation!r}"


# --- choosing a format -------------------------------------------------------------------------


def load_table(path: str | None = None) -> list[dict]:
    """The measured speed table: rows with device, out, in, tokens, format, sparsity, speedup
    (dense time / format time, L2-flushed). Empty when nothing was measured."""
    path = path or os.environ.get("OVIT_SPMM_TABLE") or os.path.join(os.path.dirname(__file__), "spmm_table.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f).get("rows", [])


def _lookup(table: list[dict], device: str, out: int, inp: int, tokens: int, fmt: str, sparsity: float) -> float | None:
    """The measured speedup of the nearest measured case (same device, shape and format;
    nearest tokens and sparsity not above the layer's), or None."""
    best, best_key = None, None
    for r in table:
        if r["device"] != device or r["out"] != out or r["in"] != inp or r["format"] != fmt:
            continue
        if r["sparsity"] > sparsity + 1e-6:
            continue
        key = (abs(math.log(max(r["tokens"], 1) / max(tokens, 1))), sparsity - r["sparsity"])
        if best_key is None or key < best_key:
            best, best_key = r["speedup"], key
    return best


def candidate_formats(weight: torch.Tensor, bsr_block: tuple[int, int] = (64, 64)) -> list[str]:
    """The formats a weight's zero pattern allows: 2:4 (if every group of 4 keeps <= 2), BSR
    (if the blocks are a tiling and at least half of them are empty), bitmap (always)."""
    keep = weight != 0
    out, k = keep.shape
    fmts = []
    if is_nm(keep, 2, 4):
        fmts.append("nm")
    bm, bn = bsr_block
    if out % bm == 0 and k % bn == 0:
        occ = keep.view(out // bm, bm, k // bn, bn).any(3).any(1)
        if occ.float().mean() <= 0.5:
            fmts.append("bsr")
    fmts.append("bitmap")
    return fmts


def sparsify(
    model: nn.Module,
    format: str = "auto",
    *,
    tokens: int = 197 * 64,
    layers: Iterable[str] | None = None,
    table: list[dict] | None = None,
    bsr_block: tuple[int, int] = (64, 64),
    backend: str | None = None,
) -> dict[str, str]:
    """Replace pruned ``nn.Linear`` modules of ``model`` by :class:`SparseLinear`, in place.

    Args:
        format: ``"auto"`` (per layer, the fastest of dense / nm / bitmap / bsr by the measured
            table, dense when none is measured faster), or one of ``"nm"``, ``"bitmap"``,
            ``"bsr"`` (forced; a layer whose mask does not fit raises).
        tokens: the expected number of rows of a forward (batch × sequence).
        layers: module names to consider (default: every Linear).
        table: rows as from :func:`load_table` (default: the measured table).

    Returns:
        ``{module name: chosen format or "dense (reason)"}``.
    """
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format must be 'auto' or one of {FORMATS}, got {format!r}")
    table = load_table() if table is None and format == "auto" else (table or [])
    names = set(layers) if layers is not None else None
    chosen: dict[str, str] = {}
    swaps = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or (names is not None and name not in names):
            continue
        w = mod.weight.detach()
        sparsity = float((w == 0).float().mean())
        if format != "auto":
            kw = {"block": bsr_block} if format == "bsr" else {}
            swaps.append((name, SparseLinear.from_linear(mod, format, backend=backend, **kw)))
            chosen[name] = format
            continue
        dev = torch.cuda.get_device_name(w.device) if w.is_cuda else "cpu"
        best, best_speed = None, 1.0
        for fmt in candidate_formats(w, bsr_block):
            sp = _lookup(table, dev, w.shape[0], w.shape[1], tokens, fmt, sparsity)
            if sp is not None and sp > best_speed:
                best, best_speed = fmt, sp
        if best is None:
            chosen[name] = "dense (no format measured faster on this device)"
            continue
        kw = {"block": bsr_block} if best == "bsr" else {}
        swaps.append((name, SparseLinear.from_linear(mod, best, backend=backend, **kw)))
        chosen[name] = best
    for name, new in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return chosen
