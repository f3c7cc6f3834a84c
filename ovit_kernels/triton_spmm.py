"""Triton sparse × dense kernels: out = act(x @ Wᵀ + bias) with W in a compressed format.

Each program computes a (BM tokens × BN outputs) tile with fp32 accumulation; the weight tile
is decompressed on chip (N:M, bitmap) or read as stored blocks (BSR), and never materialised
in global memory. Triton has no sparse-tensor-core dot, so the N:M path here is a correctness
path (CPU interpreter, other cards), not a speed claim for 2:4.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import _alloc
from ._backend import triton_interpret
from .sparse_formats import CHUNK, PackedWeight


@triton.jit
def _popcount32(v):
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return (v * 0x01010101) >> 24


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def _dot_wt(acc, x, w, IEEE: tl.constexpr):
    """acc + x @ wᵀ; fp32 inputs use exact fp32 products (no TF32)."""
    if IEEE:
        return acc + tl.dot(x, tl.trans(w), input_precision="ieee")
    return acc + tl.dot(x, tl.trans(w))


@triton.jit
def _epilogue(acc, out_ptr, bias_ptr, rm, rn, M, N, stride_om, HAS_BIAS: tl.constexpr, GELU: tl.constexpr):
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = _gelu(acc)
    msk = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _spmm_dense_k_kernel(
    x_ptr,
    out_ptr,
    bias_ptr,
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    kc,
    FORMAT: tl.constexpr,
    NM_N: tl.constexpr,
    NM_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """N:M (FORMAT=0) and bitmap (FORMAT=1): loop over all of K, decompress each weight tile."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0
        )
        live = (rn[:, None] < N) & (rk[None, :] < K)
        if FORMAT == 0:
            kept_per_row = K // NM_M * NM_N
            grp = rk // NM_M
            pos = (rk % NM_M).to(tl.uint8)
            w = tl.zeros((BN, BK), dtype=x.dtype)
            for t in tl.static_range(NM_N):
                off = rn[:, None] * kept_per_row + grp[None, :] * NM_N + t
                v = tl.load(a_ptr + off, mask=live, other=0.0)
                ix = tl.load(b_ptr + off, mask=live, other=255)
                w = tl.where(ix == pos[None, :], v.to(x.dtype), w)
        else:
            # one bitmap word and one offset per (output row, 32-column chunk) of this k-step,
            # broadcast over the chunk's columns
            bit = (tl.arange(0, BK) % 32).to(tl.uint32)
            if BK == 32:
                row_ok = rn < N
                cell = rn * kc + k0 // 32
                bits = tl.load(a_ptr + cell, mask=row_ok, other=0).to(tl.uint32, bitcast=True)[:, None]
                start = tl.load(b_ptr + cell, mask=row_ok, other=0)[:, None]
            else:
                chs = k0 // 32 + tl.arange(0, BK // 32)
                cell = rn[:, None] * kc + chs[None, :]
                cmask = (rn[:, None] < N) & (chs[None, :] < kc)
                words = tl.load(a_ptr + cell, mask=cmask, other=0).to(tl.uint32, bitcast=True)
                starts = tl.load(b_ptr + cell, mask=cmask, other=0)
                bits = tl.reshape(tl.broadcast_to(words[:, :, None], (BN, BK // 32, 32)), (BN, BK))
                start = tl.reshape(tl.broadcast_to(starts[:, :, None], (BN, BK // 32, 32)), (BN, BK))
            is_set = ((bits >> bit[None, :]) & 1) != 0
            below = bits & ((tl.full((1, BK), 1, tl.uint32) << bit[None, :]) - 1)
            rank = _popcount32(below).to(tl.int32)
            w = tl.load(c_ptr + start + rank, mask=live & is_set, other=0.0).to(x.dtype)
        acc = _dot_wt(acc, x, w, IEEE)
    _epilogue(acc, out_ptr, bias_ptr, rm, rn, M, N, stride_om, HAS_BIAS, GELU)


@triton.jit
def _spmm_bsr_kernel(
    x_ptr,
    out_ptr,
    bias_ptr,
    val_ptr,
    col_ptr,
    rowptr_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BLK_M: tl.constexpr,
    BLK_N: tl.constexpr,
):
    """BSR: one program per (token tile, block row); only the stored blocks are visited."""
    pid_m = tl.program_id(0)
    brow = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = brow * BLK_M + tl.arange(0, BLK_M)
    ck = tl.arange(0, BLK_N)
    acc = tl.zeros((BM, BLK_M), dtype=tl.float32)
    lo = tl.load(rowptr_ptr + brow)
    hi = tl.load(rowptr_ptr + brow + 1)
    for j in range(lo, hi):
        col = tl.load(col_ptr + j)
        rk = col * BLK_N + ck
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=rm[:, None] < M, other=0.0)
        w = tl.load(val_ptr + j * (BLK_M * BLK_N) + tl.arange(0, BLK_M)[:, None] * BLK_N + ck[None, :])
        acc = _dot_wt(acc, x, w.to(x.dtype), IEEE)
    _epilogue(acc, out_ptr, bias_ptr, rm, rn, M, N, stride_om, HAS_BIAS, GELU)


# On a GPU the N:M / bitmap kernel picks its tile per (M, N, K) by measurement; the
# interpreter (CPU tests) runs one fixed tile, and so does a GPU with OVIT_TRITON_AUTOTUNE=0
# (correctness runs, where compiling six tiles per variant costs more than it tells).
_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [
        (32, 64, 32, 4, 4),
        (64, 64, 32, 4, 3),
        (64, 128, 32, 4, 4),
        (128, 64, 32, 4, 3),
        (128, 128, 32, 8, 3),
        (256, 64, 32, 8, 3),
        # fewer, longer k-steps: more loads in flight per step for the latency-bound small batches
        (32, 64, 128, 4, 3),
        (64, 64, 64, 4, 3),
        (64, 32, 128, 4, 3),
        (256, 64, 64, 8, 3),
    ]
]
_BSR_CONFIGS = [
    triton.Config({"BM": bm}, num_warps=w, num_stages=st)
    for bm, w, st in [(32, 4, 3), (64, 4, 3), (64, 4, 4), (128, 8, 3), (128, 8, 4), (32, 2, 4)]
]
_AUTOTUNE = not triton_interpret() and os.environ.get("OVIT_TRITON_AUTOTUNE", "1") != "0"
_dense_k = triton.autotune(_CONFIGS, key=["M", "N", "K"])(_spmm_dense_k_kernel) if _AUTOTUNE else _spmm_dense_k_kernel
_bsr = triton.autotune(_BSR_CONFIGS, key=["M", "N", "K"])(_spmm_bsr_kernel) if _AUTOTUNE else _spmm_bsr_kernel


def _tile(v: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(v)))


def supports(case) -> str | None:
    """None if these kernels run the product ``case`` (a ``_backend.SpmmCase``), else why not."""
    if case.format == "bsr" and (case.bm < 16 or case.bn < 16 or case.bm & (case.bm - 1) or case.bn & (case.bn - 1)):
        return f"the triton BSR kernel needs power-of-two blocks >= 16, got ({case.bm}, {case.bn})"
    return None


def launch_config(case) -> str:
    """Which kernel and tile a product runs with (autotuned tiles are chosen at the first call)."""
    kind = "block-sparse" if case.format == "bsr" else "decompress-on-chip"
    if _AUTOTUNE:
        return f"{kind} kernel, autotuned tiles"
    return f"{kind} kernel, {_tile(case.tokens)}-token tiles"


def spmm(x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    """x (M, K) → (M, N) in x's dtype."""
    m_tok, k = x.shape
    n = p.out_features
    out = _alloc.empty(m_tok, n, dtype=x.dtype, device=x.device)
    bias_t = bias if bias is not None else out
    ieee = x.dtype == torch.float32
    bm = _tile(m_tok)
    gelu = activation == "gelu"
    if p.format == "bsr":
        bsr_args = (x, out, bias_t, p.a, p.b, p.c, m_tok, n, k, x.stride(0), out.stride(0))
        bsr_flags = dict(HAS_BIAS=bias is not None, GELU=gelu, IEEE=ieee, BLK_M=p.bm, BLK_N=p.bn)
        if _AUTOTUNE:
            _bsr[lambda meta: (triton.cdiv(m_tok, meta["BM"]), n // p.bm)](*bsr_args, **bsr_flags)
        else:
            _bsr[(triton.cdiv(m_tok, bm), n // p.bm)](*bsr_args, BM=bm, **bsr_flags)
        return out
    bn = _tile(n)
    if p.format == "nm":
        bk = max(16, triton.next_power_of_2(p.m))
        bk = max(bk, 32)
        fmt, kc = 0, 0
    else:  # a multiple of the 32-column chunk; two chunks per step when there are two
        bk, fmt, kc = (2 * CHUNK if k > CHUNK else CHUNK), 1, p.a.shape[1]
    args = (x, out, bias_t, p.a, p.b, p.c, m_tok, n, k, x.stride(0), out.stride(0), kc)
    flags = dict(FORMAT=fmt, NM_N=max(p.n, 1), NM_M=max(p.m, 1), HAS_BIAS=bias is not None, GELU=gelu, IEEE=ieee)
    if _AUTOTUNE:
        _dense_k[lambda meta: (triton.cdiv(m_tok, meta["BM"]), triton.cdiv(n, meta["BN"]))](*args, **flags)
    else:
        _dense_k[(triton.cdiv(m_tok, bm), triton.cdiv(n, bn))](*args, BM=bm, BN=bn, BK=bk, **flags)
    return out
