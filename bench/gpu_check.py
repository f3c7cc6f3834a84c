#!/usr/bin/env python
"""The GPU check: one command on a GPU machine (well under 6 minutes including the build).

1. builds ``ovit_kernels._C`` in place if it is not importable (offline, no build isolation);
2. runs the backend tests on the GPU (every kernel backend against the float64 reference,
   outputs poisoned) and checks larger ViT-sized blocks against float64;
3. times every GPU path side by side with the original code's approach (``bench/baselines.py``)
   in the same run, next to its floor max(flops / rate, bytes / bandwidth) with the rates and
   the bandwidth measured in this run. Timings use CUDA events around synchronised calls.

Slices: timings run on a slice of N_SLICE parameters and are scaled linearly to ViT-B
(N = 86M) — every op is linear in N because blocks are independent; the baselines run fewer
gradients / a smaller slice and are scaled the same way. Everything printed is also written
as JSON to ``$OUT/gpu_check.json`` (or ``bench/out/``).

    python bench/gpu_check.py            # full check
    python bench/gpu_check.py --quick    # smaller slices
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
N_VITB = 86_000_000
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def build() -> dict:
    try:
        import ovit_kernels._C  # noqa: F401

        return {"built": "already importable"}
    except ImportError:
        pass
    env = dict(os.environ, OVIT_BUILD_CUDA="1", MAX_JOBS=str(os.cpu_count() or 8))
    t = time.time()
    cmd = [sys.executable, "-m", "pip", "install", "-e", ROOT, "--no-build-isolation", "--no-deps", "-q"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout[-4000:], r.stderr[-8000:])
        raise SystemExit("extension build failed")
    return {"build_s": round(time.time() - t, 1)}


def timed(fn, reps: int = 3, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs, CUDA events around a synchronised call."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    return statistics.median(out)


def machine_rates() -> dict:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.empty(2**29, dtype=torch.float32, device="cuda")  # 2 GiB
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), reps=5)
    bw = 2 * x.numel() * 4 / t
    a = torch.randn(8192, 8192, device="cuda")
    t32 = timed(lambda: a @ a, reps=3)
    a64 = a.double()[:4096, :4096].contiguous()
    t64 = timed(lambda: a64 @ a64, reps=3)
    return {"copy_GBps": bw / 1e9, "fp32_TFLOPs": 2 * 8192**3 / t32 / 1e12, "fp64_TFLOPs": 2 * 4096**3 / t64 / 1e12}


def run_tests() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0", OVIT_POISON="1")
    t = time.time()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            os.path.join(ROOT, "tests", "test_backends.py"),
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
    print("\n".join(tail))
    return {"pytest_rc": r.returncode, "pytest_tail": tail[-1] if tail else "", "pytest_s": round(time.time() - t, 1)}


def big_block_checks(n_blocks: int) -> list[dict]:
    """ViT-sized blocks, fp32 kernels vs the float64 reference on the same inputs."""
    import torch

    import ovit_kernels as ok

    rows = []
    for b in (64, 128, 192):
        m = 2 * b
        g = torch.randn(m, n_blocks * b, device="cuda", dtype=torch.float64)
        lam = 1e-3 * float((g.view(m, n_blocks, b) ** 2).sum(0).max() / m)  # λ/λ_max ~ 1e-4 or larger
        ref = ok.fisher_inverse(g, b, lam, method="gram", backend="reference")
        ref_d = ref.diagonal(dim1=1, dim2=2)
        w = torch.randn(n_blocks, b, device="cuda", dtype=torch.float64)
        o_ref, l_ref = ok.obs_prune_order(w, ref, backend="reference")
        cnt = torch.randint(0, b + 1, (n_blocks,), device="cuda")
        w_ref, _ = ok.obs_reconstruct(w, ref, o_ref, cnt, backend="reference")
        for backend in ("cuda", "triton"):
            for method in ("woodbury", "gram"):
                row = {"B": b, "backend": backend, "method": method}
                try:
                    h = ok.fisher_inverse(g.float(), b, lam, method=method, backend=backend)
                    row["diag_rel_err"] = float(((h.double().diagonal(dim1=1, dim2=2) / ref_d) - 1).abs().max())
                    row["block_rel_err"] = float((h.double() - ref).norm() / ref.norm())
                except Exception as e:  # noqa: BLE001 - report, do not stop the check
                    row["error"] = f"{type(e).__name__}: {e}"[:200]
                rows.append(row)
            row = {"B": b, "backend": backend, "method": "obs"}
            try:
                o, ls = ok.obs_prune_order(w.float(), ref.float(), backend=backend)
                o64, l64 = ok.obs_prune_order(w, ref, backend=backend)
                row["order_equal_fp64"] = bool(torch.equal(o64, o_ref))
                row["loss_rel_err_fp64"] = float(((l64 - l_ref).abs() / l_ref.abs().clamp_min(1e-30)).max())
                row["order_agree_fp32"] = float((o == o_ref).float().mean())
                row["loss_rel_err_fp32_final"] = float(((ls[:, -1].double() - l_ref[:, -1]) / l_ref[:, -1]).abs().max())
                wr, _ = ok.obs_reconstruct(w, ref, o_ref, cnt, backend=backend)
                row["reconstruct_max_err_fp64"] = float((wr - w_ref).abs().max())
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            rows.append(row)
    return rows


def fisher_timings(n_slice: int, rates: dict, quick: bool) -> list[dict]:
    import torch
    from baselines import fisher_rank_one

    import ovit_kernels as ok

    rows = []
    scale_n = N_VITB / n_slice
    for b, m in ((64, 1024), (128, 1024), (192, 4096)):
        n = n_slice // b * b
        chunk = 64
        gs = torch.randn(chunk, n, device="cuda")
        lam = 1e-4
        # baseline: k gradients, scaled to m and to N
        kb = 8 if quick else 16
        base_fn = partial(fisher_rank_one, gs[:kb], b, lam, m)
        t_base = timed(base_fn, reps=2) * (m / kb) * scale_n
        row = {"B": b, "m": m, "baseline_s": t_base}
        flops_w = 4.0 * n * b * m * scale_n
        flops_g = 2.0 * n * b * m * scale_n + (n / b) * b**3 * scale_n
        bytes_state = n * b * 4 * scale_n
        row["floor_woodbury_s"] = max(flops_w / (rates["fp32_TFLOPs"] * 1e12), bytes_state / (rates["copy_GBps"] * 1e9))
        row["floor_gram_s"] = max(flops_g / (rates["fp64_TFLOPs"] * 1e12), 2 * bytes_state / (rates["copy_GBps"] * 1e9))
        reps_m = m // chunk if not quick else max(1, m // chunk // 4)
        for backend in ("cuda", "triton"):
            for method in ("woodbury", "gram"):
                key = f"{backend}_{method}_s"

                def run(n=n, b=b, reps_m=reps_m, method=method, backend=backend, gs=gs, lam=lam, chunk=chunk):
                    acc = ok.FisherInverse(n, b, lam, reps_m * chunk, method=method, backend=backend)
                    for _ in range(reps_m):
                        acc.update(gs)
                    return acc.compute()

                try:
                    row[key] = timed(run, reps=1) * (m / (reps_m * chunk)) * scale_n
                except Exception as e:  # noqa: BLE001
                    row[key] = f"{type(e).__name__}: {str(e)[:120]}"
        rows.append(row)
        log(f"fisher B={b}: {row}")
        gs = None
        torch.cuda.empty_cache()
    return rows


def obs_timings(n_slice: int, rates: dict, quick: bool) -> list[dict]:
    import torch
    from baselines import greedy_with_traces, select_and_rebuild_loop

    import ovit_kernels as ok

    rows = []
    for b in (64, 128, 192):
        n = n_slice // b * b
        nb = n // b
        scale_n = N_VITB / n
        x = torch.randn(nb, b, 2 * b, device="cuda")
        h = torch.linalg.inv(x @ x.transpose(1, 2) / (2 * b) + 0.1 * torch.eye(b, device="cuda"))
        w = torch.randn(nb, b, device="cuda")
        x = None
        row = {"B": b}
        nbb = max(1, nb // (16 if quick else 8))
        t_b = timed(lambda w=w, h=h, nbb=nbb: greedy_with_traces(w[:nbb], h[:nbb]), reps=1, warmup=0)
        losses, _, trace = greedy_with_traces(w[:nbb], h[:nbb])
        t_sel = timed(lambda losses=losses, trace=trace: select_and_rebuild_loop(losses, trace, 0.5), reps=1, warmup=0)
        row["baseline_elim_s"] = t_b * nb / nbb * scale_n
        row["baseline_select_rebuild_s"] = t_sel * nb / nbb * scale_n
        row["floor_s"] = max(
            2.0 * n * b * b * scale_n / (rates["fp32_TFLOPs"] * 1e12), n * b * 4 * scale_n / (rates["copy_GBps"] * 1e9)
        )
        for backend in ("cuda", "triton"):
            try:
                t_e = timed(lambda w=w, h=h, be=backend: ok.obs_prune_order(w, h, backend=be), reps=2)
                order, loss = ok.obs_prune_order(w, h, backend=backend)
                t_c = timed(lambda loss=loss, be=backend: ok.prune_counts(loss, 0.5, backend=be), reps=2)
                counts = ok.prune_counts(loss, 0.5, backend=backend)
                t_r = timed(
                    lambda w=w, h=h, o=order, c=counts, be=backend: ok.obs_reconstruct(w, h, o, c, backend=be), reps=2
                )
                row[f"{backend}_elim_s"] = t_e * scale_n
                row[f"{backend}_select_s"] = t_c * scale_n
                row[f"{backend}_reconstruct_s"] = t_r * scale_n
                row[f"{backend}_total_s"] = (t_e + t_c + t_r) * scale_n
            except Exception as e:  # noqa: BLE001
                row[f"{backend}_error"] = f"{type(e).__name__}: {str(e)[:160]}"
        rows.append(row)
        log(f"obs B={b}: {row}")
        h = w = None
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller slices and fewer repetitions")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(ROOT, "bench", "out")))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}
    report.update(build())
    log(f"build: {report}")

    import torch
    import triton

    import ovit_kernels as ok

    report["device"] = torch.cuda.get_device_name()
    report["versions"] = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__}
    report["backends"] = {k: str(v) for k, v in ok.available_backends().items()}
    log(f"{report['device']} {report['versions']} {report['backends']}")
    report["rates"] = machine_rates()
    log(f"rates: {report['rates']}")
    if not args.skip_tests:
        report["tests"] = run_tests()
        log(f"tests: {report['tests']}")
    report["big_blocks"] = big_block_checks(256 if args.quick else 1024)
    for r in report["big_blocks"]:
        log(f"check {r}")
    n_slice = 2**21 if args.quick else 2**22
    report["n_slice"] = n_slice
    report["fisher"] = fisher_timings(n_slice, report["rates"], args.quick)
    report["obs"] = obs_timings(n_slice, report["rates"], args.quick)
    path = os.path.join(args.out, "gpu_check.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
