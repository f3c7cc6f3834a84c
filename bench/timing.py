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


def timed_graph(fn, reps: int = 20, flushed: bool = False) -> tuple[float, str]:
    """Seconds per call of ``fn`` with the host out of the way: ``fn`` (after two warm-up
    calls, which also run any autotuning) is captured in a CUDA graph and replayed ``reps``
    times between two events. ``flushed`` captures an L2 flush before every call and
    subtracts the time of a graph holding the flushes alone. Returns ``(seconds, method)``;
    where capture fails (or on the CPU) it falls back to :func:`timed` and says ``"events"``.
    """
    if DEVICE != "cuda":
        return timed(fn, reps=reps, flushed=flushed), "wall"
    try:
        fn()
        fn()
        torch.cuda.synchronize()
        if flushed:
            flush_l2()

        def body():
            if flushed:
                flush_l2()
            fn()

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            body()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            body()
        t = _replay(g, reps)
        if flushed:
            gf = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gf):
                flush_l2()
            t -= _replay(gf, reps)
        return max(t, 0.0), "cuda-graph"
    except Exception:  # noqa: BLE001 - capture is an optimisation of the measurement only
        torch.cuda.synchronize()
        return timed(fn, reps=reps, flushed=flushed), "events"


def _replay(g, reps: int) -> float:
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / reps
