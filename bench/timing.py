"""Timing helpers shared by the GPU scripts. ``OVIT_BENCH_DEVICE=cpu`` runs them on the CPU
(wall clock instead of CUDA events) so a script can be dry-run before spending GPU time."""

from __future__ import annotations

import os
import statistics
import time

import torch

DEVICE = os.environ.get("OVIT_BENCH_DEVICE", "cuda")
_flush_buf: torch.Tensor | None = None


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"


def flush_l2() -> None:
    """Overwrite 256 MiB so nothing of interest stays in L2 (the H100/H200 L2 is 50 MiB)."""
    global _flush_buf
    if _flush_buf is None:
        _flush_buf = torch.empty(64 * 2**20 if DEVICE == "cuda" else 2**16, dtype=torch.float32, device=DEVICE)
    _flush_buf.zero_()


def timed(fn, reps: int = 3, warmup: int = 1, flushed: bool = False) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls: CUDA events around each call on a GPU
    (synchronised before and after), wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(reps):
        if flushed:
            flush_l2()
        if DEVICE == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return statistics.median(out)
