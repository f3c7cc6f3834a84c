"""CUDA backend: the kernels of ``csrc/`` (module ``ovit_kernels._C``), registered as
``torch.library`` custom ops with fake kernels so they trace under ``torch.compile``.

Ops without a dedicated kernel here use device-side PyTorch: the Gram accumulation is a
batched float64 cuBLAS GEMM (``torch.baddbmm``), ``prune_counts`` a device sort, and the
cheap per-entry ``obs_scores`` / ``obs_update_independent`` batched element-wise ops; sparse
products other than 2:4 run the Triton kernels.
"""

from __future__ import annotations

import os
import warnings

import torch

from . import _alloc, reference
from ._backend import BackendStatus

try:
    from . import _C  # type: ignore[attr-defined]
except ImportError as e:  # the backend selector reports this as the reason cuda is unavailable
    raise ImportError(f"ovit_kernels._C is not built ({e}); build it with OVIT_BUILD_CUDA=1 pip install -e .") from e

MAX_BLOCK_FP32 = _C.max_block_size(False)
MAX_BLOCK_FP64 = _C.max_block_size(True)


def status() -> BackendStatus:
    if not torch.cuda.is_available():
        return BackendStatus(False, "ovit_kernels._C is built but no CUDA device is visible")
    return BackendStatus(True, f"ovit_kernels._C on {torch.cuda.get_device_name()}")


def supports(op: str, block: int | None) -> str | None:
    if block is not None and block > MAX_BLOCK_FP32 and op in _KERNEL_OPS:
        return (
            f"the CUDA kernels hold blocks up to {MAX_BLOCK_FP32} (float32) / {MAX_BLOCK_FP64} (float64), got {block}"
        )
    return None


def _fits(block: int, dtype: torch.dtype, op: str) -> bool:
    lim = MAX_BLOCK_FP64 if dtype == torch.float64 else MAX_BLOCK_FP32
    if block <= lim:
        return True
    warnings.warn(
        f"{op}: block size {block} in {dtype} exceeds the CUDA kernels' on-chip limit {lim}; "
        "running the reference implementation",
        stacklevel=3,
    )
    return False


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
    if not _fits(finv.shape[1], finv.dtype, "woodbury_update_"):
        return reference.woodbury_update_(finv, grads, num_grads)
    if finv.dtype == torch.float32 or grads.dtype not in (torch.float32, torch.float64):
        grads = grads.to(finv.dtype if finv.dtype == torch.float32 else torch.float32)
    _woodbury_op(finv, grads.contiguous(), num_grads)


def gram_inverse(
    gram: torch.Tensor, num_grads: float, damp: float, damp_mode: str, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    if not _fits(gram.shape[1], torch.float64, "gram_inverse"):
        return reference.gram_inverse(gram, num_grads, damp, damp_mode, out_dtype)
    out, ok = _damped_inverse_op(
        gram.contiguous(), 1.0 / num_grads, damp, damp_mode == "relative", out_dtype == torch.float64
    )
    return out, ok.bool()


def obs_prune_order(
    w: torch.Tensor, finv: torch.Tensor, mask: torch.Tensor | None, nm: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not _fits(w.shape[1], finv.dtype, "obs_prune_order"):
        return reference.obs_prune_order(w, finv, mask, nm)
    steps = reference.prune_steps(w.shape[1], nm)
    n, m = nm if nm is not None else (0, 0)
    m8 = None if mask is None else mask.contiguous().view(torch.uint8)
    order, loss, bad = _prune_order_op(w.to(finv.dtype).contiguous(), finv.contiguous(), m8, steps, n, m)
    return order, loss, bad.bool()


def obs_reconstruct(
    w: torch.Tensor, finv: torch.Tensor, order: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not _fits(w.shape[1], finv.dtype, "obs_reconstruct"):
        return reference.obs_reconstruct(w, finv, order, counts)
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


def _bitmap_on_cuda(x: torch.Tensor, p) -> bool:
    """The CUDA bitmap kernel takes the layer (fp16/bf16, in % 64 == 0, an aligned x, a weight
    tile that fits shared memory) unless ``OVIT_SPMM_BITMAP=triton``."""
    choice = os.environ.get("OVIT_SPMM_BITMAP", "cuda")
    if choice not in ("cuda", "triton"):
        raise ValueError(f"OVIT_SPMM_BITMAP must be 'cuda' or 'triton', got {choice!r}")
    return (
        choice == "cuda"
        and x.dtype in (torch.float16, torch.bfloat16)
        and p.in_features % 64 == 0
        and x.data_ptr() % 16 == 0
        and _C.spmm_bitmap_tile(p.in_features, x.device.index or 0) > 0
    )


def spmm(x: torch.Tensor, p, bias: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    """2:4 on sparse tensor cores (fp16/bf16, in % 32 == 0) and bitmap with the weight tile
    decompressed into shared memory (fp16/bf16, in % 64 == 0); everything else runs the
    Triton kernels (or the reference where Triton is missing)."""
    if p.format == "nm" and p.c.numel() and x.dtype in (torch.float16, torch.bfloat16):
        out = _alloc.empty(x.shape[0], p.out_features, dtype=x.dtype, device=x.device)
        _C.spmm_24(x, p.a, p.c, bias, out, activation == "gelu", spmm24_variant())
        return out
    if p.format == "bitmap" and _bitmap_on_cuda(x, p):
        out = _alloc.empty(x.shape[0], p.out_features, dtype=x.dtype, device=x.device)
        vals = p.c if p.c.numel() else torch.zeros(1, dtype=x.dtype, device=x.device)
        _C.spmm_bitmap(x, p.a, p.b, vals, bias, out, activation == "gelu")
        return out
    try:
        from . import triton_spmm
    except ImportError:
        return reference.spmm(x, p, bias, activation)
    return triton_spmm.spmm(x, p, bias, activation)


_KERNEL_OPS = ("woodbury_update_", "gram_inverse", "obs_prune_order", "obs_reconstruct")

OPS = {
    "spmm": spmm,
    "woodbury_update_": woodbury_update_,
    "gram_update_": reference.gram_update_,
    "gram_inverse": gram_inverse,
    "obs_scores": reference.obs_scores,
    "obs_update_independent": reference.obs_update_independent,
    "obs_prune_order": obs_prune_order,
    "prune_counts": reference.prune_counts,
    "obs_reconstruct": obs_reconstruct,
}
