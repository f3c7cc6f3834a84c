"""CUDA backend: the kernels of ``csrc/`` (module ``ovit_kernels._C``), registered as
``torch.library`` custom ops with fake kernels so they trace under ``torch.compile``.

It runs its own kernels only: the streaming Woodbury update, the damped inverse, the greedy
elimination and its replay (register tiles up to B = 192 in float32 / 128 in float64, packed
shared memory up to 256 / 192), the 2:4 product on sparse tensor cores (fp16/bf16,
in_features % 32 == 0) and the bitmap product (fp16/bf16, in_features % 64 == 0, a 16-byte
aligned x, a weight tile that fits shared memory, unless ``OVIT_SPMM_BITMAP=triton``).
``supports`` says why anything else is not for it; the dispatcher then raises (explicit
``backend="cuda"``) or moves on to the next backend (``"auto"``). The Gram accumulation and the
global selection are the shared device-side implementations (``_backend.SHARED_OPS``).
"""

from __future__ import annotations

import os

import torch

from . import _alloc, reference
from ._backend import BackendStatus, Case

try:
    from . import _C  # type: ignore[attr-defined]
except ImportError as e:  # the backend selector reports this as the reason cuda is unavailable
    raise ImportError(
        f"ovit_kernels._C is not built ({e}); build it where a CUDA torch and nvcc are present with "
        "OVIT_BUILD_CUDA=1 pip install -e . --no-build-isolation (pip's build isolation hides the installed torch)"
    ) from e

MAX_BLOCK_FP32 = _C.max_block_size(False)
MAX_BLOCK_FP64 = _C.max_block_size(True)
DEVICES = ("cuda",)
_FISHER_OPS = ("woodbury_update_", "gram_inverse", "obs_prune_order", "obs_reconstruct")


def status() -> BackendStatus:
    if not torch.cuda.is_available():
        return BackendStatus(False, "ovit_kernels._C is built but no CUDA device is visible")
    return BackendStatus(True, f"ovit_kernels._C on {torch.cuda.get_device_name()}")


def _fp64_arith(case: Case) -> bool:
    """The damped inverse computes in float64 whatever its output dtype."""
    return case.op == "gram_inverse" or case.dtype == torch.float64


def supports(case: Case) -> str | None:
    """None if the CUDA kernels run ``case``, else why not."""
    if case.op in _FISHER_OPS:
        if case.dtype not in (torch.float32, torch.float64):
            return f"the CUDA kernels take float32 or float64 states, got {case.dtype}"
        fp64 = _fp64_arith(case)
        lim = MAX_BLOCK_FP64 if fp64 else MAX_BLOCK_FP32
        if case.block is None or case.block > lim:
            what = "float64 (the damped inverse computes in float64)" if case.op == "gram_inverse" else str(case.dtype)
            return f"the CUDA kernels hold blocks up to {lim} in {what.replace('torch.', '')}, got B = {case.block}"
        return None
    if case.op == "spmm":
        return _spmm_supports(case)
    return None


def launch_config(case: Case) -> str:
    """The kernel instance ``case`` launches: register-tile width or packed, threads per block."""
    if case.op == "spmm":
        s = case.spmm
        assert s is not None
        if s.format == "nm":
            return f"2:4 mma.sp, {_spmm24_name(s)}"
        return f"bitmap, {_C.spmm_bitmap_tile(s.in_features, case.device.index or 0)}-row weight tile in shared memory"
    cols, threads = _C.block_layout(case.block, _fp64_arith(case))
    if cols > 0:
        return f"register tile, {cols} columns per lane, {threads} threads"
    return f"packed triangle in shared memory, {threads} threads"


# --- custom ops ------------------------------------------------------------------------------


@torch.library.custom_op("ovit::woodbury_update_", mutates_args=("finv",))
def _woodbury_op(finv: torch.Tensor, grads: torch.Tensor, num_grads: float) -> None:
    _C.woodbury_update_(finv, grads, num_grads)


@_woodbury_op.register_fake
def _(finv, grads, num_grads):
    return None


@torch.library.custom_op("ovit::obs_prune_order", mutates_args=())
def _prune_order_op(
    w: torch.Tensor, finv: torch.Tensor, mask: torch.Tensor | None, steps: int, nm_n: int, nm_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nb = w.shape[0]
    order = _alloc.empty(nb, steps, dtype=torch.int64, device=w.device)
    loss = _alloc.empty(nb, steps, dtype=finv.dtype, device=w.device)
    bad = _alloc.empty(nb, dtype=torch.int32, device=w.device)
    _C.obs_prune_order(w, finv, mask, nm_n, nm_m, order, loss, bad)
    return order, loss, bad


@_prune_order_op.register_fake
def _(w, finv, mask, steps, nm_n, nm_m):
    nb = w.shape[0]
    return (w.new_empty(nb, steps, dtype=torch.int64), finv.new_empty(nb, steps), w.new_empty(nb, dtype=torch.int32))


@torch.library.custom_op("ovit::obs_reconstruct", mutates_args=())
def _reconstruct_op(
    w: torch.Tensor, finv: torch.Tensor, order: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nb, b = w.shape
    w_out = _alloc.empty(nb, b, dtype=finv.dtype, device=w.device)
    pruned = _alloc.empty(nb, b, dtype=torch.uint8, device=w.device)
    bad = _alloc.empty(nb, dtype=torch.int32, device=w.device)
    _C.obs_reconstruct(w, finv, order, counts, w_out, pruned, bad)
    return w_out, pruned, bad


@_reconstruct_op.register_fake
def _(w, finv, order, counts):
    nb, b = w.shape
    return finv.new_empty(nb, b), w.new_empty(nb, b, dtype=torch.uint8), w.new_empty(nb, dtype=torch.int32)


@torch.library.custom_op("ovit::damped_inverse", mutates_args=())
def _damped_inverse_op(
    gram: torch.Tensor, inv_m: float, damp: float, relative: bool, out_fp64: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    nb, b, _ = gram.shape
    out = _alloc.empty(nb, b, b, dtype=torch.float64 if out_fp64 else torch.float32, device=gram.device)
    ok = _alloc.empty(nb, dtype=torch.int32, device=gram.device)
    _C.damped_inverse(gram, inv_m, damp, relative, out, ok)
    return out, ok


@_damped_inverse_op.register_fake
def _(gram, inv_m, damp, relative, out_fp64):
    nb, b, _ = gram.shape
    return (
        gram.new_empty(nb, b, b, dtype=torch.float64 if out_fp64 else torch.float32),
        gram.new_empty(nb, dtype=torch.int32),
    )


# --- backend functions (validated inputs, see ovit_kernels.fisher / ovit_kernels.obs) ---------


def woodbury_update_(finv: torch.Tensor, grads: torch.Tensor, num_grads: float) -> None:
    if finv.dtype == torch.float32 or grads.dtype not in (torch.float32, torch.float64):
        grads = grads.to(finv.dtype if finv.dtype == torch.float32 else torch.float32)
    _woodbury_op(finv, grads.contiguous(), num_grads)


def gram_inverse(
    gram: torch.Tensor, num_grads: float, damp: float, damp_mode: str, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    out, ok = _damped_inverse_op(
        gram.contiguous(), 1.0 / num_grads, damp, damp_mode == "relative", out_dtype == torch.float64
    )
    return out, ok.bool()


def obs_prune_order(
    w: torch.Tensor, finv: torch.Tensor, mask: torch.Tensor | None, nm: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    steps = reference.prune_steps(w.shape[1], nm)
    n, m = nm if nm is not None else (0, 0)
    m8 = None if mask is None else mask.contiguous().view(torch.uint8)
    order, loss, bad = _prune_order_op(w.to(finv.dtype).contiguous(), finv.contiguous(), m8, steps, n, m)
    return order, loss, bad.bool()


def obs_reconstruct(
    w: torch.Tensor, finv: torch.Tensor, order: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w_out, pruned, bad = _reconstruct_op(
        w.to(finv.dtype).contiguous(),
        finv.contiguous(),
        order.to(torch.int64).contiguous(),
        counts.to(torch.int64).contiguous(),
    )
    return w_out.to(w.dtype), pruned == 0, bad.bool()


SPMM24_VARIANTS = {"auto": 0, "simple": 1, "pipelined": 2, "wide": 3}


def spmm24_variant() -> int:
    """Which 2:4 kernel runs: ``OVIT_SPMM24`` = ``auto`` (default: the pipelined kernel when
    in_features % 64 == 0 and there are at least 256 tokens), ``simple``, ``pipelined``
    (128-token tiles) or ``wide`` (the pipelined kernel with 256-token tiles)."""
    name = os.environ.get("OVIT_SPMM24", "auto")
    if name not in SPMM24_VARIANTS:
        raise ValueError(f"OVIT_SPMM24 must be one of {sorted(SPMM24_VARIANTS)}, got {name!r}")
    return SPMM24_VARIANTS[name]


def _spmm24_name(s) -> str:
    v = spmm24_variant()
    if v == 0:
        v = 2 if s.in_features % 64 == 0 and s.tokens >= 256 else 1
    return {1: "simple kernel", 2: "pipelined kernel, 128-token tiles", 3: "pipelined kernel, 256-token tiles"}[v]


def _bitmap_choice() -> str:
    choice = os.environ.get("OVIT_SPMM_BITMAP", "cuda")
    if choice not in ("cuda", "triton"):
        raise ValueError(f"OVIT_SPMM_BITMAP must be 'cuda' or 'triton', got {choice!r}")
    return choice


def _spmm_supports(case: Case) -> str | None:
    s = case.spmm
    assert s is not None
    if case.dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA sparse kernels take float16/bfloat16 activations, got {case.dtype}"
    if s.format == "nm":
        if (s.n, s.m) != (2, 4) or not s.has_meta:
            return f"the CUDA N:M kernel is 2:4 on sparse tensor cores with in_features % 32 == 0, got {s.n}:{s.m}"
        if spmm24_variant() in (2, 3) and (s.in_features % 64 or not s.x_aligned):
            return (
                "OVIT_SPMM24 asks for the pipelined 2:4 kernel, which needs in_features % 64 == 0 and a 16-byte "
                f"aligned x (got in_features = {s.in_features}, x {'' if s.x_aligned else 'not '}aligned)"
            )
        return None
    if s.format == "bitmap":
        if _bitmap_choice() == "triton":
            return "OVIT_SPMM_BITMAP=triton gives bitmap products to the Triton kernel"
        if s.in_features % 64:
            return f"the CUDA bitmap kernel needs in_features % 64 == 0, got {s.in_features}"
        if not s.x_aligned:
            return "the CUDA bitmap kernel needs a 16-byte aligned x"
        if _C.spmm_bitmap_tile(s.in_features, case.device.index or 0) <= 0:
            return f"a bitmap weight tile of in_features = {s.in_features} does not fit this card's shared memory"
        return None
    return f"the CUDA backend has no {s.format} kernel (the Triton backend has one)"


def spmm(x: torch.Tensor, p, bias: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    """2:4 on sparse tensor cores, or bitmap with the weight tile decompressed into shared
    memory (what ``supports`` admitted)."""
    out = _alloc.empty(x.shape[0], p.out_features, dtype=x.dtype, device=x.device)
    if p.format == "nm":
        _C.spmm_24(x, p.a, p.c, bias, out, activation == "gelu", spmm24_variant())
        return out
    vals = p.c if p.c.numel() else torch.zeros(1, dtype=x.dtype, device=x.device)
    _C.spmm_bitmap(x, p.a, p.b, vals, bias, out, activation == "gelu")
    return out


OPS = {
    "spmm": spmm,
    "woodbury_update_": woodbury_update_,
    "gram_inverse": gram_inverse,
    "obs_prune_order": obs_prune_order,
    "obs_reconstruct": obs_reconstruct,
}
