#!/usr/bin/env python
"""The CPU backend against the original code's approach, at one DeiT-Tiny transformer block.

Shapes: qkv 576×192, proj 192×192, fc1 768×192, fc2 192×768 (442 368 weights); B = 192,
m = 256 gradients, λ = 1e-8, sparsity 0.75 — the one-shot pipeline without the sampling:
Fisher inverses (float64 Gram + inverse, float32 result), greedy elimination (float32), global
selection and the final weights. The baseline is ``bench/baselines.py`` (the original code's
approach in torch ops: float32 rank-one Woodbury per gradient, elimination with weight traces,
a global threshold and a trace lookup per block), timed in the same process. Each phase is
the minimum of ``--reps`` runs; beside it, its floor: max(its flops over this CPU's measured GEMM
rate (float64 for the Fisher, float32 for the rest), its bytes over the measured copy rate),
with the threads the run uses. The ovit rows: the one-shot path (the elimination leaves its
factor in the inverses' memory, the final weights are read from it) and the path that keeps
the inverses intact (a Cholesky of H[S,S] per block for the final weights).

    python bench/bench_cpu.py                   # the table (Markdown) and bench/out/bench_cpu.json
    python bench/bench_cpu.py --under-load      # also idle/busy pairs (another process busy on one core),
                                                # ours and a perfectly parallel control job in each
    pytest bench/bench_cpu.py --benchmark-only  # pytest-benchmark: the pipeline, each op, the original
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from baselines import fisher_rank_one, greedy_with_traces, select_and_rebuild_loop  # noqa: E402

import ovit_kernels as ok  # noqa: E402

SHAPES = {"qkv": (576, 192), "proj": (192, 192), "fc1": (768, 192), "fc2": (192, 768)}
B, M, DAMP, SPARSITY = 192, 256, 1e-8, 0.75


def problem(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (m, N) float32 gradients and (N/B, B) float32 weights. The gradients are
    low-rank-plus-noise, as real ones are, so the Fisher is not a random matrix."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (o, i) in SHAPES.items():
        n = o * i
        basis = torch.randn(32, n, generator=gen)
        grads = torch.randn(M, 32, generator=gen) @ basis + 0.1 * torch.randn(M, n, generator=gen)
        out[name] = (grads / n**0.5, torch.randn(n // B, B, generator=gen))
    return out


def ovit_phases(prob: dict, backend: str, keep_inverses: bool = False) -> dict[str, float]:
    """Seconds per phase of ovit_kernels: Fisher (Gram in chunks of 128 + inverse), elimination,
    selection (the global K-th loss), final weights (the joint OBS solution per block).

    By default the one-shot path: the elimination leaves its factor in the inverses' storage
    (``obs_prune_order_``) and the final weights are read from it (``obs_reconstruct_factored``).
    With ``keep_inverses`` the inverses stay intact (``obs_prune_order``, then a Cholesky of
    H[S,S] per block in ``obs_reconstruct``), as a caller that reuses them needs."""
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    finvs = {}
    for name, (g, _) in prob.items():
        acc = ok.FisherInverse(g.shape[1], B, DAMP, method="gram", backend=backend, name=name)
        for chunk in g.split(128):
            acc.update(chunk)
        finvs[name] = acc.compute()
    t1 = time.perf_counter()
    orders, losses = {}, {}
    elim = ok.obs_prune_order if keep_inverses else ok.obs_prune_order_
    for name, (_, w) in prob.items():
        orders[name], losses[name] = elim(w, finvs[name], backend=backend)
    t2 = time.perf_counter()
    counts = ok.prune_counts([losses[n] for n in prob], SPARSITY, backend=backend)
    t3 = time.perf_counter()
    final = ok.obs_reconstruct if keep_inverses else ok.obs_reconstruct_factored
    for (name, (_, w)), c in zip(prob.items(), counts):
        final(w, finvs[name], orders[name], c, backend=backend)
    t4 = time.perf_counter()
    t.update(fisher=t1 - t0, elimination=t2 - t1, selection=t3 - t2, final_weights=t4 - t3)
    return t


def baseline_phases(prob: dict) -> dict[str, float]:
    """Seconds per phase of the original code's approach (bench/baselines.py)."""
    t0 = time.perf_counter()
    finvs = {name: fisher_rank_one(g, B, DAMP, M) for name, (g, _) in prob.items()}
    t1 = time.perf_counter()
    traces = {name: greedy_with_traces(w, finvs[name]) for name, (_, w) in prob.items()}
    t2 = time.perf_counter()
    # a global threshold over every layer's cumulative losses, then one trace row per block
    allloss = torch.cat([tr[0].flatten() for tr in traces.values()])
    k = int(SPARSITY * allloss.numel() + 0.5)
    thr = torch.kthvalue(allloss, max(k, 1)).values.item()
    t3 = time.perf_counter()
    for losses, _, trace in traces.values():
        counts = (losses <= thr).sum(1)
        out = torch.empty(losses.shape, dtype=trace.dtype)
        for i in range(losses.shape[0]):
            out[i] = trace[int(counts[i]), i]
    t4 = time.perf_counter()
    return {"fisher": t1 - t0, "elimination": t2 - t1, "selection": t3 - t2, "final_weights": t4 - t3}


def floors(threads: int) -> dict[str, float]:
    """Each phase's floor, max(flops / this CPU's GEMM rate, bytes / its copy bandwidth), float64
    rates for the Fisher, float32 after; the final weights' floor for both paths."""
    from ovit_kernels._precision import no_tf32

    rates = {}
    for dt in (torch.float64, torch.float32):
        a = torch.randn(1536, 1536, dtype=dt)
        with no_tf32():
            a @ a
            t0 = time.perf_counter()
            for _ in range(3):
                a @ a
        rates[dt] = 3 * 2 * 1536**3 / (time.perf_counter() - t0)
    src = torch.ones(64 << 20)  # 256 MB: far past the caches
    dst = torch.empty_like(src)
    dst.copy_(src)
    t0 = time.perf_counter()
    for _ in range(3):
        dst.copy_(src)
    bandwidth = 3 * 2 * src.numel() * 4 / (time.perf_counter() - t0)  # bytes read + written per second
    n = sum(o * i for o, i in SHAPES.values())
    k = SPARSITY * B
    flops = {
        "fisher": n * B * M + n * B * B,  # symmetric Gram (m rank-one terms), inverse (B³ per block)
        "elimination": n * B * B / 3,  # B³/6 multiply-adds per block (compact active set)
        "final_weights": 2 * n * (B - k) * k / B,  # from the factor: (B − k)·k multiply-adds per block
        "final_weights_kept": n * k**3 / (3 * B),  # a Cholesky of H[S,S]: k³/6 multiply-adds per block
    }
    nbytes = {
        "fisher": n * B * 4,  # the float32 inverses written
        "elimination": 2 * n * B * 4,  # the inverses read, the factor written
        "final_weights": n * (B - k) * k / B * 4,  # each survivor's row prefix of the factor
        "final_weights_kept": n * k * k / (2 * B) * 4,  # H[S,S]'s triangle
    }
    out = {
        p: max(f / rates[torch.float64 if p == "fisher" else torch.float32], nbytes[p] / bandwidth)
        for p, f in flops.items()
    }
    out["gemm_GFLOPs_fp64"] = rates[torch.float64] / 1e9
    out["gemm_GFLOPs_fp32"] = rates[torch.float32] / 1e9
    out["copy_GBs"] = bandwidth / 1e9
    out["threads"] = threads
    return out


def _min_phases(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: min(r[k] for r in runs) for k in runs[0]}


def busy_process() -> subprocess.Popen:
    """Another process keeping one core busy (pure Python arithmetic, no threads of its own)."""
    return subprocess.Popen([sys.executable, "-c", "x = 0\nwhile True:\n    x = (x * 31 + 7) % 1000003"])


def _timed(prob: dict, backend: str) -> dict:
    """One run of the one-shot path: its phases, wall seconds and CPU seconds (all threads)."""
    c0, t0 = _cpu_seconds(), time.perf_counter()
    phases = ovit_phases(prob, backend)
    wall = time.perf_counter() - t0
    return {"phases": phases, "wall": wall, "cpu": _cpu_seconds() - c0}


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def control_job(threads: int, items: int) -> dict:
    """A perfectly parallel job to compare with: ``threads`` threads hashing a 1 MB buffer per item
    (SHA-256 releases the GIL), items taken from a shared counter — all compute, a working set
    within a core's L2, one join at the end. Its slowdown under a busy process is this machine's
    own bound for a job of that many threads. Wall and CPU seconds."""
    buf = bytes(1 << 20)
    counter = itertools.count()

    def work() -> None:
        while next(counter) < items:
            hashlib.sha256(buf).digest()

    helpers = [threading.Thread(target=work) for _ in range(threads - 1)]
    c0, t0 = _cpu_seconds(), time.perf_counter()
    for h in helpers:
        h.start()
    work()
    for h in helpers:
        h.join()
    return {"wall": time.perf_counter() - t0, "cpu": _cpu_seconds() - c0}


def under_load(prob: dict, backend: str, pairs: int) -> dict:
    """The one-shot path idle and with a busy process, in adjacent pairs (idle run, then busy run,
    ``pairs`` times), so that the host's drift (neighbours, frequency) hits both halves of a ratio
    alike. Per pair: wall and CPU seconds of each run and their ratio; the median ratio, the
    median CPU seconds per run and the cores obtained (CPU seconds / wall seconds), beside the
    fair share a process of ``threads`` busy threads gets among ``threads + 1`` on this machine's
    cores. In the same pairs, :func:`control_job` sized to the idle run's wall time: the ratio a
    perfectly parallel job of the same threads gets on this machine under the same load."""
    threads = torch.get_num_threads()
    wall = _timed(prob, backend)["wall"]
    probe = control_job(threads, 100)["wall"] / 100
    items = max(100, round(wall / probe))
    out = []
    for _ in range(pairs):
        idle, cidle = _timed(prob, backend), control_job(threads, items)
        p = busy_process()
        try:
            time.sleep(0.3)
            load, cload = _timed(prob, backend), control_job(threads, items)
        finally:
            p.kill()
            p.wait()
        out.append({
            "idle": idle, "load": load, "ratio": load["wall"] / idle["wall"],
            "control_idle": cidle, "control_load": cload, "control_ratio": cload["wall"] / cidle["wall"],
        })  # fmt: skip
    cores = os.cpu_count() or 1
    return {
        "pairs": out,
        "median_ratio": statistics.median(p["ratio"] for p in out),
        "cpu_s_idle": statistics.median(p["idle"]["cpu"] for p in out),
        "cpu_s_load": statistics.median(p["load"]["cpu"] for p in out),
        "cores_idle": statistics.median(p["idle"]["cpu"] / p["idle"]["wall"] for p in out),
        "cores_load": statistics.median(p["load"]["cpu"] / p["load"]["wall"] for p in out),
        "fair_share": min(threads, cores * threads / (threads + 1)),
        "control_items": items,
        "control_median_ratio": statistics.median(p["control_ratio"] for p in out),
        "control_cores_idle": statistics.median(p["control_idle"]["cpu"] / p["control_idle"]["wall"] for p in out),
        "control_cores_load": statistics.median(p["control_load"]["cpu"] / p["control_load"]["wall"] for p in out),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--under-load", action="store_true", help="also time the ovit phases with a busy process")
    ap.add_argument("--load-pairs", type=int, default=9, help="idle/busy pairs of runs for --under-load")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prob = problem()
    backend = "cpu" if ok.available_backends()["cpu"].available else "reference"
    ovit_phases(prob, backend)  # first use: self-checks, allocations
    report: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}",
        "backend": backend,
        "threads": args.threads,
        "ovit": _min_phases([ovit_phases(prob, backend) for _ in range(args.reps)]),
        "ovit_inverses_kept": _min_phases([ovit_phases(prob, backend, True) for _ in range(args.reps)]),
        "reference": _min_phases([ovit_phases(prob, "reference") for _ in range(args.reps)]),
        "floor": floors(args.threads),
    }
    if not args.skip_baseline:
        report["original"] = _min_phases([baseline_phases(prob) for _ in range(args.reps)])
    if args.under_load:
        report["under_load"] = under_load(prob, backend, args.load_pairs)
        report["ovit_under_load"] = _min_phases([p["load"]["phases"] for p in report["under_load"]["pairs"]])
    phases = ["fisher", "elimination", "selection", "final_weights"]
    rows = [
        ("ovit " + backend, report["ovit"]),
        (f"ovit {backend}, inverses kept", report["ovit_inverses_kept"]),
        ("ovit reference", report["reference"]),
    ]
    if "original" in report:
        rows.insert(0, ("original approach", report["original"]))
    if "ovit_under_load" in report:
        rows.append((f"ovit {backend}, one core busy", report["ovit_under_load"]))
    print(f"DeiT-Tiny block, B = {B}, m = {M}, {args.threads} threads, min of {args.reps}; seconds")
    print("| | " + " | ".join(phases) + " | all |")
    print("|---|" + "---|" * (len(phases) + 1))
    for label, r in rows:
        print(f"| {label} | " + " | ".join(f"{r[p]:.3f}" for p in phases) + f" | {sum(r[p] for p in phases):.2f} |")
    fl = report["floor"]
    print("| floor (flops / GEMM rate, bytes / copy rate) | "
          + " | ".join(f"{fl[p]:.3f}" if p in fl else "-" for p in phases)
          + f" | | (final weights with the inverses kept: {fl['final_weights_kept']:.3f})")  # fmt: skip
    if "original" in report:
        o, v = report["original"], report["ovit"]
        ratio = {p: o[p] / v[p] for p in phases}
        ratio["all"] = sum(o.values()) / sum(v.values())
        report["speedup_vs_original"] = ratio
        print("speed-up vs the original approach: " + ", ".join(f"{k} {r:.1f}×" for k, r in ratio.items()))
        sel = ("selection", "final_weights")
        for key, label in (("ovit", "one-shot path"), ("ovit_inverses_kept", "inverses kept")):
            r = sum(report[key][p] for p in sel) / sum(o[p] for p in sel)
            report[f"selection_and_final_vs_lookup_{key}"] = r
            print(f"selection + final weights ({label}): {r:.2f}× the original's trace lookup")
    if "under_load" in report:
        u = report["under_load"]
        each = ", ".join(f"{p['ratio']:.2f}" for p in u["pairs"])
        report["load_slowdown"] = u["median_ratio"]
        print(
            f"with one core busy: {u['median_ratio']:.2f}× the idle time (median of {len(u['pairs'])} adjacent"
            f" idle/busy pairs: {each}); CPU-s per run"
            f" {u['cpu_s_idle']:.2f} idle, {u['cpu_s_load']:.2f} busy; cores obtained {u['cores_idle']:.2f} idle,"
            f" {u['cores_load']:.2f} busy (fair share {u['fair_share']:.2f})"
        )
        each = ", ".join(f"{p['control_ratio']:.2f}" for p in u["pairs"])
        print(
            f"a perfectly parallel job of the same threads in the same pairs (SHA-256 of 1 MB buffers,"
            f" {u['control_items']} items): {u['control_median_ratio']:.2f}× ({each}); cores obtained"
            f" {u['control_cores_idle']:.2f} idle, {u['control_cores_load']:.2f} busy"
        )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_cpu.json"), "w") as f:
        json.dump(report, f, indent=1)


@pytest.fixture(scope="module")
def prob():
    return problem()


def _backend() -> str:
    return "cpu" if ok.available_backends()["cpu"].available else "reference"


def test_ovit_cpu_pipeline(benchmark, prob):
    """Fisher + elimination + selection + final weights at the DeiT-Tiny block."""
    backend = _backend()
    benchmark.extra_info.update(backend=backend, block=B, num_grads=M)
    benchmark.pedantic(lambda: ovit_phases(prob, backend), rounds=2, iterations=1)


@pytest.fixture(scope="module")
def stages_in(prob):
    """The inputs of each op after the Fisher: inverses, orders, losses, counts (cpu backend)."""
    backend = _backend()
    finvs = {name: ok.fisher_inverse(g, B, DAMP, method="gram", backend=backend) for name, (g, _) in prob.items()}
    out = {name: ok.obs_prune_order(w, finvs[name], backend=backend) for name, (_, w) in prob.items()}
    counts = ok.prune_counts([out[n][1] for n in prob], SPARSITY, backend=backend)
    return finvs, out, dict(zip(prob, counts))


OPS = ["fisher", "elimination", "elimination_in_place", "selection", "final_weights", "final_weights_cholesky",
       "original_fisher", "original_elimination_and_lookup"]  # fmt: skip


@pytest.mark.parametrize("op", OPS)
def test_cpu_op(benchmark, prob, stages_in, op):
    """Each op at the DeiT-Tiny block, all layers, the cpu backend; the original code's approach
    (bench/baselines.py) for the Fisher and for the elimination with its trace lookup."""
    backend = _backend()
    finvs, elim, counts = stages_in
    benchmark.extra_info.update(backend=backend, block=B, num_grads=M, op=op)
    factors = {}

    def fresh_factors():  # the in-place ops consume their inverses: a copy per round, not timed
        factors.clear()
        factors.update({n: f.clone() for n, f in finvs.items()})
        return (), {}

    def final_factored():
        for name, (_, w) in prob.items():
            ok.obs_reconstruct_factored(w, factors[name], elim[name][0], counts[name], backend=backend)

    def factors_of_elimination():
        fresh_factors()
        for name, (_, w) in prob.items():
            ok.obs_prune_order_(w, factors[name], backend=backend)
        return (), {}

    def original_elimination_and_lookup():
        for name, (_, w) in prob.items():
            losses, _, trace = greedy_with_traces(w, finvs[name])
            select_and_rebuild_loop(losses, trace, SPARSITY)

    runs = {
        "fisher": lambda: [ok.fisher_inverse(g, B, DAMP, method="gram", backend=backend) for g, _ in prob.values()],
        "elimination": lambda: [ok.obs_prune_order(w, finvs[n], backend=backend) for n, (_, w) in prob.items()],
        "elimination_in_place": lambda: [
            ok.obs_prune_order_(w, factors[n], backend=backend) for n, (_, w) in prob.items()
        ],  # fmt: skip
        "selection": lambda: ok.prune_counts([elim[n][1] for n in prob], SPARSITY, backend=backend),
        "final_weights": final_factored,
        "final_weights_cholesky": lambda: [
            ok.obs_reconstruct(w, finvs[n], elim[n][0], counts[n], backend=backend) for n, (_, w) in prob.items()
        ],  # fmt: skip
        "original_fisher": lambda: [fisher_rank_one(g, B, DAMP, M) for g, _ in prob.values()],
        "original_elimination_and_lookup": original_elimination_and_lookup,
    }
    setup = {"elimination_in_place": fresh_factors, "final_weights": factors_of_elimination}.get(op)
    rounds = 1 if op.startswith("original") else 3
    benchmark.pedantic(runs[op], setup=setup, rounds=rounds, iterations=1)


if __name__ == "__main__":
    main()
