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
from .sparse_formats import FORMATS, PackedWeight, is_nm, pack, unpack

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


def _sparse_linear_setup(ctx, inputs, output) -> None:
    x, a, b, c, bias, *meta = inputs
    ctx.save_for_backward(x, a, b, c, bias)
    ctx.meta = meta


def _sparse_linear_backward(ctx, grad: torch.Tensor):
    """Gradients for the input (and a trainable bias): dx = (dy ⊙ act'(z)) W, with W unpacked
    and z recomputed; the compressed weight itself is frozen (its buffers take no gradient)."""
    x, a, b, c, bias = ctx.saved_tensors
    fmt, out_f, in_f, n, m, bm, bn, activation, backend = ctx.meta
    p = PackedWeight(fmt, out_f, in_f, a, b, c, n, m, bm, bn)
    g = grad.float()
    if activation == "gelu":
        z = _sparse_linear_op(x, a, b, c, bias, fmt, out_f, in_f, n, m, bm, bn, "", backend).float()
        g = g * (0.5 * (1.0 + torch.erf(z * 0.7071067811865476)) + z * torch.exp(-0.5 * z * z) * 0.3989422804014327)
    g2 = g.reshape(-1, out_f)
    grad_x = (g2 @ unpack(p).float()).reshape(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None
    grad_bias = g2.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[4] else None
    return (grad_x, None, None, None, grad_bias) + (None,) * 9


_sparse_linear_op.register_autograd(_sparse_linear_backward, setup_context=_sparse_linear_setup)


class SparseLinear(nn.Module):
    """A pruned ``nn.Linear`` stored compressed; ``forward`` equals the dense layer (within the
    accumulation order), optionally with GELU fused.

    The compressed weight is frozen (buffers ``a``, ``b``, ``c``); gradients flow to the input
    (and to the bias if it is made trainable), so layers before it can be fine-tuned and the
    module works under ``torch.compile`` with autograd on. To fine-tune the pruned weights
    themselves, fine-tune before :func:`sparsify`. Its ``state_dict`` carries the format
    (``_extra_state``), so it loads into a freshly sparsified copy of the same architecture
    whatever format or pattern that copy was packed with.

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

    def get_extra_state(self) -> dict:
        return {"format": self.format, "in_features": self.in_features, "out_features": self.out_features,
                "n": self.n, "m": self.m, "bm": self.bm, "bn": self.bn, "activation": self.activation}  # fmt: skip

    def set_extra_state(self, state: dict) -> None:
        if (state["in_features"], state["out_features"]) != (self.in_features, self.out_features):
            raise ValueError(
                f"a SparseLinear of {state['out_features']}x{state['in_features']} cannot load into one of "
                f"{self.out_features}x{self.in_features} (a checkpoint of another architecture?)"
            )
        if state["format"] not in FORMATS:
            raise ValueError(f"unknown sparse format {state['format']!r} in the checkpoint")
        self.format = state["format"]
        self.n, self.m, self.bm, self.bn = state["n"], state["m"], state["bm"], state["bn"]
        self.activation = state.get("activation")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # the compressed buffers' sizes follow the pattern (nnz, stored blocks): take the checkpoint's
        for name in ("a", "b", "c"):
            t = state_dict.get(prefix + name)
            if isinstance(t, torch.Tensor) and t.shape != self._buffers[name].shape:
                self._buffers[name] = torch.empty_like(t, device=self._buffers[name].device)
        bias = state_dict.get(prefix + "bias")
        if isinstance(bias, torch.Tensor) and self.bias is None:
            self.bias = nn.Parameter(torch.empty_like(bias, device=self.a.device), requires_grad=False)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

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


def _misfit(weight: torch.Tensor, fmt: str, bsr_block: tuple[int, int]) -> str | None:
    """Why a weight should not be stored in ``fmt`` (None if it fits)."""
    keep = weight != 0
    if bool(keep.all()):
        return "not pruned"
    out, k = keep.shape
    if fmt == "nm" and (k % 4 or not is_nm(keep, 2, 4)):
        return "its zeros are not 2:4"
    if fmt == "bsr" and (out % bsr_block[0] or k % bsr_block[1]):
        return f"its {out}x{k} shape is not tiled by {bsr_block[0]}x{bsr_block[1]} blocks"
    return None


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
            ``"bsr"`` (forced). A layer that is not pruned or whose zeros do not fit the format
            (an unpruned classifier head, say) stays dense, with the reason in the result,
            unless it was named in ``layers``: then it raises.
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
            why = _misfit(w, format, bsr_block)
            if why is not None:
                if names is not None:
                    raise ValueError(f"layer {name!r} cannot be stored as {format!r}: {why}")
                chosen[name] = f"dense ({why})"
                continue
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
