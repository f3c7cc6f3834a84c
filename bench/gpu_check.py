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

    python bench/gpu_check.py                      # full check
    python bench/gpu_check.py --quick              # smaller slices
    python bench/gpu_check.py --sections tests obs # a subset
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
N_VITB = 86_000_000
T0 = time.time()
# block sizes and (B, m) cases; --dry-run shrinks them to run on the CPU
BLOCKS = (64, 128, 192)
FISHER_CASES = ((64, 1024), (128, 1024), (192, 4096))
SPMM_SHAPES: list[tuple[int, int]] | None = None
SPMM_BATCHES = (1, 64)


def empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def build() -> dict:
    try:
        import ovit_kernels._C  # noqa: F401

        return {"built": "already importable"}
    except ImportError:
        pass
    env = dict(os.environ, OVIT_BUILD_CUDA="1", MAX_JOBS=str(os.cpu_count() or 8))
    import torch

    if torch.cuda.is_available() and "TORCH_CUDA_ARCH_LIST" not in os.environ:
        major, minor = torch.cuda.get_device_capability()
        env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # this card only: half the build time
    t = time.time()
    cmd = [sys.executable, "-m", "pip", "install", "-e", ROOT, "--no-build-isolation", "--no-deps", "-q"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:  # go on: the Triton and reference paths still get checked and timed
        print(r.stdout[-4000:], r.stderr[-8000:])
        return {"build_s": round(time.time() - t, 1), "build_error": (r.stdout + r.stderr)[-3000:]}
    return {"build_s": round(time.time() - t, 1)}


def machine_rates() -> dict:
    import torch
    from timing import DEVICE, timed

    torch.backends.cuda.matmul.allow_tf32 = False
    big = DEVICE == "cuda"
    x = torch.empty(2**29 if big else 2**20, dtype=torch.float32, device=DEVICE)  # 2 GiB on the GPU
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), reps=5)
    bw = 2 * x.numel() * 4 / t
    n = 8192 if big else 512
    a = torch.randn(n, n, device=DEVICE)
    t32 = timed(lambda: a @ a, reps=3)
    a64 = a.double()[: n // 2, : n // 2].contiguous()
    t64 = timed(lambda: a64 @ a64, reps=3)
    return {"copy_GBps": bw / 1e9, "fp32_TFLOPs": 2 * n**3 / t32 / 1e12, "fp64_TFLOPs": 2 * (n // 2) ** 3 / t64 / 1e12}


def run_tests() -> dict:
    interp = os.environ.get("OVIT_BENCH_DEVICE") == "cpu"  # a dry run keeps the interpreter
    # one fixed spmm tile in the tests (the timings autotune); Triton's JIT dominates this section
    env = dict(os.environ, TRITON_INTERPRET="1" if interp else "0", OVIT_POISON="1", OVIT_TRITON_AUTOTUNE="0")
    t = time.time()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            os.path.join(ROOT, "tests", "test_backends.py"),
            os.path.join(ROOT, "tests", "test_sparse.py"),
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
    from timing import DEVICE

    import ovit_kernels as ok

    rows = []
    for b in BLOCKS:
        m = 2 * b
        g = torch.randn(m, n_blocks * b, device=DEVICE, dtype=torch.float64)
        lam = 1e-3 * float((g.view(m, n_blocks, b) ** 2).sum(0).max() / m)  # λ/λ_max ~ 1e-4 or larger
        ref = ok.fisher_inverse(g, b, lam, method="gram", backend="reference")
        ref_d = ref.diagonal(dim1=1, dim2=2)
        w = torch.randn(n_blocks, b, device=DEVICE, dtype=torch.float64)
        o_ref, l_ref = ok.obs_prune_order(w, ref, backend="reference")
        cnt = torch.randint(0, b + 1, (n_blocks,), device=DEVICE)
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
    from timing import DEVICE, timed

    import ovit_kernels as ok

    rows = []
    scale_n = N_VITB / n_slice
    for b, m in FISHER_CASES:
        n = n_slice // b * b
        chunk = 256  # gradients per update: each update moves the whole state once (see FisherInverse)
        gs = torch.randn(chunk, n, device=DEVICE)
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
        empty_cache()
    return rows


def obs_timings(n_slice: int, rates: dict, quick: bool) -> list[dict]:
    import torch
    from baselines import greedy_with_traces, select_and_rebuild_loop
    from timing import DEVICE, timed

    import ovit_kernels as ok

    rows = []
    for b in BLOCKS:
        n = n_slice // b * b
        nb = n // b
        scale_n = N_VITB / n
        x = torch.randn(nb, b, 2 * b, device=DEVICE)
        h = torch.linalg.inv(x @ x.transpose(1, 2) / (2 * b) + 0.1 * torch.eye(b, device=DEVICE))
        w = torch.randn(nb, b, device=DEVICE)
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
        empty_cache()
    return rows


def spmm_timings(quick: bool) -> list[dict]:
    from bench_spmm import SHAPES, measure_case

    rows = []
    shapes = SPMM_SHAPES or ([SHAPES[2], SHAPES[3]] if quick else SHAPES)
    for out, inp in shapes:
        for batch in SPMM_BATCHES:
            for kind, s in (("nm", 0.5), ("unstructured", 0.8), ("bsr", 0.9)):
                try:
                    r = measure_case(out, inp, (8 if SPMM_SHAPES else 197) * batch, s, kind)
                except Exception as e:  # noqa: BLE001
                    r = {"out": out, "in": inp, "tokens": 197 * batch, "kind": kind, "error": str(e)[:200]}
                rows.append(r)
                log(f"spmm {r}")
    return rows


SECTIONS = ("tests", "checks", "fisher", "obs", "spmm", "frontend")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller slices and fewer repetitions")
    ap.add_argument(
        "--sections",
        nargs="+",
        default=list(SECTIONS),
        choices=SECTIONS,
        help="what to run, in this order (default: all)",
    )
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(ROOT, "bench", "out")))
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="run every section on the CPU at tiny sizes (Triton interpreter), to catch script errors",
    )
    args = ap.parse_args()
    global BLOCKS, FISHER_CASES, SPMM_SHAPES, SPMM_BATCHES
    if args.dry_run:
        os.environ["OVIT_BENCH_DEVICE"] = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"
        BLOCKS, FISHER_CASES, SPMM_SHAPES, SPMM_BATCHES = (16, 32), ((16, 64), (32, 64)), [(64, 64)], (1,)
    os.makedirs(args.out, exist_ok=True)
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}
    report["dry_run"] = args.dry_run
    if not args.dry_run:
        report.update(build())
    log(f"build: {report}")

    import torch
    import triton
    from timing import device_name

    import ovit_kernels as ok

    report["device"] = device_name()
    report["versions"] = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__}
    report["backends"] = {k: str(v) for k, v in ok.available_backends().items()}
    log(f"{report['device']} {report['versions']} {report['backends']}")
    path = os.path.join(args.out, "gpu_check.json")

    def save() -> None:  # after every section, so a run cut short still leaves its numbers
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)

    report["rates"] = machine_rates()
    log(f"rates: {report['rates']}")
    save()
    n_slice = 2**11 if args.dry_run else 2**21 if args.quick else 2**22
    report["n_slice"] = n_slice
    for section in args.sections:
        if section == "tests":
            report["tests"] = run_tests()
        elif section == "checks":
            report["big_blocks"] = big_block_checks(4 if args.dry_run else 256 if args.quick else 1024)
            for r in report["big_blocks"]:
                log(f"check {r}")
        elif section == "fisher":
            report["fisher"] = fisher_timings(n_slice, report["rates"], args.quick)
        elif section == "obs":
            report["obs"] = obs_timings(n_slice, report["rates"], args.quick)
        elif section == "spmm":
            report["spmm"] = spmm_timings(args.quick)
            if not args.dry_run:
                from bench_spmm import end_to_end

                try:
                    report["spmm_end_to_end"] = end_to_end(64)
                except Exception as e:  # noqa: BLE001
                    report["spmm_end_to_end"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                log(f"spmm end to end {report['spmm_end_to_end']}")
        elif section == "frontend":
            import torch as _torch
            from frontend_check import run as frontend_run

            if args.dry_run:  # a two-block DeiT on 32-pixel images, a few gradients, on the CPU
                kw = dict(img_size=32, depth=2)
                report["frontend"] = frontend_run(["deit_small_patch16_224"], 4, 2, None, "cpu", **kw)
            else:
                report["frontend"] = []
                for model_name in ("deit_small_patch16_224", "deit_base_patch16_224"):
                    try:
                        report["frontend"] += frontend_run([model_name], 256, 128, _torch.bfloat16)
                    except Exception as e:  # noqa: BLE001
                        err = f"{type(e).__name__}: {str(e)[:200]}"
                        report["frontend"].append({"model": model_name, "error": err})
                    save()
        log(f"{section} done")
        save()
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
