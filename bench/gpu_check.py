#!/usr/bin/env python
"""The GPU check: build, verify every kernel against float64, time it beside its baseline.

It runs as two calls of a 15-minute device session (``bench/RESULTS.md``, "How to measure"):

    python bench/gpu_check.py --plan 1 --out $OUT   # build, ViT-sized checks, tests, timings (≤ 7 min)
    python bench/gpu_check.py --plan 2 --out $OUT   # float32 accuracy table, the front-end (≤ 2.5 min)
    python bench/gpu_check.py --dry-run             # every section on the CPU at toy sizes (minutes)

Sections (``--sections`` picks any, in order): ``build`` (the extension, for this card only),
``checks`` (ViT-sized blocks, every GPU kernel against the float64 reference: worst error and
where — block, row, column —, the first NaN, the launch configuration), ``tests`` (the backend,
dispatch and sparse test files on the GPU, outputs poisoned), ``fisher`` / ``obs`` / ``spmm``
(timings beside the original code's approach and the floor max(flops / rate, bytes /
bandwidth), rates measured in the same run), ``accuracy`` (bench/fisher_accuracy.py on the
card) and ``frontend`` (one-shot oViT on DeiT-S/B against the card's training throughput).

It cannot fail quietly: each section runs in a child process with a deadline (its budget, and
what is left of the whole run's ``--deadline``), so a hang or a sticky CUDA error costs that
section only; every item is appended to ``gpu_check.jsonl`` as it lands (a ``start`` line first,
so a killed section names the item it hung in), ``gpu_check.json`` is rewritten after every
section, and the run ends with a one-line summary and a non-zero exit if anything failed,
raised, timed out or did not fit the deadline. The dry run runs the same code on the CPU
(Triton interpreter, toy sizes) and fails the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
N_VITB = 86_000_000

# (section, budget in seconds); each plan's sections run in this order within its deadline.
PLANS: dict[int, tuple[tuple[tuple[str, int], ...], int]] = {
    1: ((("build", 150), ("checks", 45), ("tests", 130), ("fisher", 50), ("obs", 40), ("spmm", 60)), 420),
    2: ((("accuracy", 25), ("frontend", 120)), 150),
}
BUDGETS = {name: budget for plan, _ in PLANS.values() for name, budget in plan}
SECTIONS = tuple(BUDGETS)
MIN_START = 10  # seconds a section needs at least, or it is reported as not run

# tolerances of the checks section, relative to the largest reference entry
TOL = {"fp64": 1e-9, "fp32_fisher": 1e-3, "fp32_obs": 1e-3}


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


# =============================================================================================
# child side: one section, items streamed to the JSONL file
# =============================================================================================


class Items:
    """Appends one JSON line per event to ``path`` (flushed and synced at once)."""

    def __init__(self, path: str, section: str) -> None:
        self.path, self.section, self.t0 = path, section, time.time()

    def write(self, rec: dict) -> None:
        rec = {"section": self.section, "t": round(time.time() - self.t0, 2), **rec}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def run(self, name: str, fn: Callable[[], dict]) -> dict:
        """Run one item: ``fn`` returns its record (``ok`` defaults to True); an exception makes
        a failed item with the traceback's tail."""
        self.write({"event": "start", "item": name})
        t = time.time()
        try:
            rec = fn()
            rec.setdefault("ok", True)
        except Exception as e:  # noqa: BLE001 - every failure becomes a recorded item
            rec = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:400]}", "trace": traceback.format_exc()[-1500:]}
        rec = {"event": "item", "item": name, "seconds": round(time.time() - t, 2), **rec}
        self.write(rec)
        flag = "ok  " if rec["ok"] else "FAIL"
        print(f"[{self.section}] {flag} {name}: {summarize(rec)}", flush=True)
        return rec


def summarize(rec: dict) -> str:
    if "error" in rec:
        return rec["error"][:300]
    if "text" in rec:
        return rec["text"][:300]
    keys = [k for k in rec if k not in ("event", "item", "section", "t", "ok", "seconds", "trace")]
    return ", ".join(f"{k}={_fmt(rec[k])}" for k in keys[:12])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)[:80]


def sizes(dry: bool, quick: bool = True) -> dict:
    if dry:
        return {"dry": True, "blocks": (16, 40), "fisher": ((16, 64), (40, 128)), "n_blocks": 4, "n_slice": 2**9,
                "spmm_shapes": [(64, 64)], "spmm_batches": (1,), "spmm_tokens": 8}  # fmt: skip
    return {"dry": False, "blocks": (64, 128, 192), "fisher": ((64, 1024), (128, 1024), (192, 4096)), "n_blocks": 256,
            "n_slice": 2**21 if quick else 2**22, "spmm_shapes": None, "spmm_batches": (1, 64),
            "spmm_tokens": 197}  # fmt: skip


def machine_rates() -> dict:
    import torch
    from timing import DEVICE, timed

    from ovit_kernels._precision import no_tf32

    big = DEVICE == "cuda"
    x = torch.empty(2**29 if big else 2**20, dtype=torch.float32, device=DEVICE)  # 2 GiB on the GPU
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), reps=5)
    bw = 2 * x.numel() * 4 / t
    n = 8192 if big else 512
    a = torch.randn(n, n, device=DEVICE)
    with no_tf32():
        t32 = timed(lambda: a @ a, reps=3)
        a64 = a.double()[: n // 2, : n // 2].contiguous()
        t64 = timed(lambda: a64 @ a64, reps=3)
    return {"copy_GBps": bw / 1e9, "fp32_TFLOPs": 2 * n**3 / t32 / 1e12, "fp64_TFLOPs": 2 * (n // 2) ** 3 / t64 / 1e12}


def _dispatch_record() -> dict:
    import ovit_kernels as ok

    return {k: {"available": v.available, "reason": v.reason, "events": list(v.events)}
            for k, v in ok.available_backends().items()}  # fmt: skip


def kernel_backends(dry: bool) -> tuple[str, ...]:
    """The backends a section measures: both on a GPU; Triton alone (interpreted) in the dry run."""
    return ("triton",) if dry else ("cuda", "triton")


def _refused(p: dict, backend: str, op: str, dtype) -> str | None:
    """Why the backend declines the case (then it must raise BackendUnavailableError); on a GPU
    a backend that is not even loaded fails the item instead."""
    import ovit_kernels as ok
    from ovit_kernels import _backend

    st = ok.available_backends()[backend]
    if not st.available and not p["dry"]:
        raise RuntimeError(f"the {backend} backend is unavailable on this GPU: {st.reason}")
    fn, why = _backend.candidate(backend, _backend.Case(op, p["dev"], dtype, p["b"]))
    return None if fn is not None else why


def _launch(p: dict, backend: str, op: str, dtype) -> str:
    from ovit_kernels import _backend

    return _backend.launch_config(backend, _backend.Case(op, p["dev"], dtype, p["b"]))


def _check_fisher(p: dict, backend: str, method: str, op: str, dtype, tol: float) -> dict:
    import ovit_kernels as ok
    from ovit_kernels._selfcheck import mismatch

    g, b, lam, ref = p["g"].to(dtype), p["b"], p["lam"], p["ref"]
    why = _refused(p, backend, op, dtype)
    if why is not None:
        with _expect_refusal():
            ok.fisher_inverse(g, b, lam, method=method, backend=backend)
        return {"refused": why}
    h = ok.fisher_inverse(g, b, lam, method=method, backend=backend)
    r = mismatch(h, ref, tol)
    d = mismatch(h.diagonal(dim1=1, dim2=2), ref.diagonal(dim1=1, dim2=2), tol)
    return {"ok": r["ok"] and d["ok"], "text": f"{r['text']}; diagonal: {d['text']}",
            "launch": _launch(p, backend, op, dtype), "max_rel_err": r["max_rel_err"], "where": r["where"],
            "first_nonfinite": r["first_nonfinite"]}  # fmt: skip


def _check_elimination(p: dict, backend: str, dtype) -> dict:
    import torch

    import ovit_kernels as ok
    from ovit_kernels._selfcheck import mismatch

    w, h = p["w"].to(dtype), p["ref"].to(dtype)
    why = _refused(p, backend, "obs_prune_order", dtype)
    if why is not None:
        with _expect_refusal():
            ok.obs_prune_order(w, h, backend=backend)
        return {"refused": why}
    o, ls = ok.obs_prune_order(w, h, backend=backend)
    diff = (o != p["o_ref"]).nonzero()
    first = None if not diff.numel() else [int(v) for v in diff[0]]
    agree = float((o == p["o_ref"]).float().mean())
    if dtype == torch.float64:
        r = mismatch(ls, p["l_ref"], TOL["fp64"])
        good = r["ok"] and first is None
    else:  # near-ties may reorder late in float32: the final loss, and the agreement
        r = mismatch(ls[:, -1], p["l_ref"][:, -1], TOL["fp32_obs"])
        good = r["ok"] and agree > 0.9
    text = f"order agreement {agree:.4f}, first difference at (block, step) {first}; loss: {r['text']}"
    return {"ok": good, "text": text, "launch": _launch(p, backend, "obs_prune_order", dtype),
            "order_agreement": agree, "first_order_difference": first, "max_rel_err": r["max_rel_err"],
            "where": r["where"]}  # fmt: skip


def _check_reconstruction(p: dict, backend: str, dtype) -> dict:
    import torch

    import ovit_kernels as ok
    from ovit_kernels._selfcheck import mismatch

    w, h = p["w"].to(dtype), p["ref"].to(dtype)
    why = _refused(p, backend, "obs_reconstruct", dtype)
    if why is not None:
        with _expect_refusal():
            ok.obs_reconstruct(w, h, p["o_ref"], p["cnt"], backend=backend)
        return {"refused": why}
    wr, kp = ok.obs_reconstruct(w, h, p["o_ref"], p["cnt"], backend=backend)
    r = mismatch(wr, p["w_ref"], TOL["fp64"] if dtype == torch.float64 else TOL["fp32_obs"])
    same = bool(torch.equal(kp, p["keep_ref"]))
    return {"ok": r["ok"] and same, "text": f"keep-mask equal: {same}; {r['text']}",
            "launch": _launch(p, backend, "obs_reconstruct", dtype), "max_rel_err": r["max_rel_err"],
            "where": r["where"]}  # fmt: skip


def section_checks(items: Items, sz: dict, dry: bool) -> None:
    """ViT-sized blocks: every GPU kernel against the float64 reference on the same inputs."""
    import torch
    from timing import DEVICE

    import ovit_kernels as ok

    dev = torch.device(DEVICE)
    for b in sz["blocks"]:
        nb = sz["n_blocks"]
        gen = torch.Generator().manual_seed(b)
        m = 2 * b
        g = torch.randn(m, nb * b, generator=gen, dtype=torch.float64).to(dev)
        lam = 1e-3 * float((g.view(m, nb, b) ** 2).sum(0).max() / m)  # λ/λ_max ~ 1e-4 or larger
        ref = ok.fisher_inverse(g, b, lam, method="gram", backend="reference")
        w = torch.randn(nb, b, generator=gen, dtype=torch.float64).to(dev)
        o_ref, l_ref = ok.obs_prune_order(w, ref, backend="reference")
        cnt = torch.randint(0, b + 1, (nb,), generator=gen).to(dev)
        w_ref, keep_ref = ok.obs_reconstruct(w, ref, o_ref, cnt, backend="reference")
        p = {"dry": dry, "dev": dev, "b": b, "g": g, "lam": lam, "ref": ref, "w": w, "o_ref": o_ref,
             "l_ref": l_ref, "cnt": cnt, "w_ref": w_ref, "keep_ref": keep_ref}  # fmt: skip
        for backend in ("cuda", "triton"):
            for method, op in (("woodbury", "woodbury_update_"), ("gram", "gram_inverse")):
                for dtype, tol in ((torch.float32, TOL["fp32_fisher"]), (torch.float64, TOL["fp64"])):
                    name = f"B={b} {backend} fisher {method} {str(dtype)[6:]}"
                    items.run(name, partial(_check_fisher, p, backend, method, op, dtype, tol))
            for dtype in (torch.float64, torch.float32):
                kind = str(dtype)[6:]
                items.run(f"B={b} {backend} elimination {kind}", partial(_check_elimination, p, backend, dtype))
                items.run(f"B={b} {backend} reconstruction {kind}", partial(_check_reconstruction, p, backend, dtype))
        del p, g, ref, w
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    items.run("dispatch and self-checks", lambda: {"backends": _dispatch_record()})


class _expect_refusal:
    """The explicit backend must raise BackendUnavailableError (never run other code)."""

    def __enter__(self):
        return self

    def __exit__(self, tp, exc, tb):
        import ovit_kernels as ok

        if tp is None:
            raise AssertionError("the backend ran a case it declares unsupported")
        return issubclass(tp, ok.BackendUnavailableError)


def _fisher_base(b, m, n, gs, lam, kb, reps_m, chunk, scale_n, rates) -> dict:
    from baselines import fisher_rank_one
    from timing import timed

    t = timed(partial(fisher_rank_one, gs[:kb], b, lam, m), reps=2) * (m / kb) * scale_n
    flops_w = 4.0 * n * b * m * scale_n
    flops_g = 2.0 * n * b * m * scale_n + (n / b) * b**3 * scale_n
    bytes_state = n * b * 4 * scale_n
    floor_w = max(flops_w / (rates["fp32_TFLOPs"] * 1e12), bytes_state / (rates["copy_GBps"] * 1e9))
    floor_g = max(flops_g / (rates["fp64_TFLOPs"] * 1e12), 2 * bytes_state / (rates["copy_GBps"] * 1e9))
    return {"baseline_s": t, "floor_woodbury_s": floor_w, "floor_gram_s": floor_g, "scaled_to": "ViT-B"}


def _fisher_timing(base_rec, backend, method, b, m, n, gs, lam, kb, reps_m, chunk, scale_n, rates) -> dict:
    from timing import timed

    import ovit_kernels as ok

    def run():
        acc = ok.FisherInverse(n, b, lam, reps_m * chunk, method=method, backend=backend)
        for _ in range(reps_m):
            acc.update(gs)
        return acc.compute()

    t = timed(run, reps=1) * (m / (reps_m * chunk)) * scale_n
    rec = {"seconds_vitb": t}
    if base_rec.get("baseline_s"):
        rec["speedup_vs_baseline"] = base_rec["baseline_s"] / t
        rec["floor_s"] = base_rec[f"floor_{method}_s"]
    return rec


def section_fisher(items: Items, sz: dict, rates: dict) -> None:
    import torch
    from timing import DEVICE

    n_slice = sz["n_slice"]
    for b, m in sz["fisher"]:
        n = n_slice // b * b
        scale_n = N_VITB / n
        chunk = min(256, m)  # gradients per update: each update moves the whole state once
        reps_m = max(1, m // chunk // (4 if DEVICE == "cuda" else 1))
        gs = torch.randn(chunk, n, device=DEVICE)
        lam = 1e-4
        kb = min(8, chunk)

        kw = {"b": b, "m": m, "n": n, "gs": gs, "lam": lam, "kb": kb, "reps_m": reps_m, "chunk": chunk,
              "scale_n": scale_n, "rates": rates}  # fmt: skip
        base_rec = items.run(f"B={b} m={m} baseline (original rank-one, scaled)", partial(_fisher_base, **kw))
        for backend in kernel_backends(sz["dry"]):
            for method in ("woodbury", "gram"):
                timing = partial(_fisher_timing, base_rec, backend, method, **kw)
                items.run(f"B={b} m={m} {backend} {method}", timing)
        del gs
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def _obs_base(w, h, b, n, nb, nbb, scale_n, rates) -> dict:
    from baselines import greedy_with_traces, select_and_rebuild_loop
    from timing import timed

    t_b = timed(lambda: greedy_with_traces(w[:nbb], h[:nbb]), reps=1, warmup=0)
    losses, _, trace = greedy_with_traces(w[:nbb], h[:nbb])
    t_sel = timed(lambda: select_and_rebuild_loop(losses, trace, 0.5), reps=1, warmup=0)
    floor = _obs_floor(b, n, scale_n, rates)
    return {"baseline_elim_s": t_b * nb / nbb * scale_n, "baseline_select_rebuild_s": t_sel * nb / nbb * scale_n,
            "floor_s": floor, "scaled_to": "ViT-B"}  # fmt: skip


def _obs_timing(backend, w, h, b, n, nb, nbb, scale_n, rates) -> dict:
    from timing import timed

    import ovit_kernels as ok

    t_e = timed(lambda: ok.obs_prune_order(w, h, backend=backend), reps=2)
    order, loss = ok.obs_prune_order(w, h, backend=backend)
    t_c = timed(lambda: ok.prune_counts(loss, 0.5, backend=backend), reps=2)
    counts = ok.prune_counts(loss, 0.5, backend=backend)
    t_r = timed(lambda: ok.obs_reconstruct(w, h, order, counts, backend=backend), reps=2)
    return {"elim_s": t_e * scale_n, "select_s": t_c * scale_n, "reconstruct_s": t_r * scale_n,
            "total_s": (t_e + t_c + t_r) * scale_n, "floor_s": _obs_floor(b, n, scale_n, rates)}  # fmt: skip


def _obs_floor(b, n, scale_n, rates) -> float:
    return max(
        2.0 * n * b * b * scale_n / (rates["fp32_TFLOPs"] * 1e12), n * b * 4 * scale_n / (rates["copy_GBps"] * 1e9)
    )


def section_obs(items: Items, sz: dict, rates: dict) -> None:
    import torch
    from timing import DEVICE

    for b in sz["blocks"]:
        n = sz["n_slice"] // b * b
        nb = n // b
        scale_n = N_VITB / n
        x = torch.randn(nb, b, 2 * b, device=DEVICE)
        f = x @ x.transpose(1, 2) / (2 * b) + 0.1 * torch.eye(b, device=DEVICE)
        h = torch.cholesky_inverse(torch.linalg.cholesky(f))
        del f
        w = torch.randn(nb, b, device=DEVICE)
        del x
        nbb = max(1, nb // 16)

        kw = {"w": w, "h": h, "b": b, "n": n, "nb": nb, "nbb": nbb, "scale_n": scale_n, "rates": rates}
        items.run(f"B={b} baseline (greedy with traces, scaled)", partial(_obs_base, **kw))
        for backend in kernel_backends(sz["dry"]):
            if b > 128 and backend == "triton":
                continue  # Triton tiles hold blocks up to 128 (the checks section tests the refusal)
            items.run(f"B={b} {backend} elimination + selection + reconstruction", partial(_obs_timing, backend, **kw))
        del h, w
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def section_spmm(items: Items, sz: dict) -> None:
    from bench_spmm import SHAPES, end_to_end, measure_case
    from timing import DEVICE

    shapes = sz["spmm_shapes"] or [SHAPES[2], SHAPES[3]]
    for out, inp in shapes:
        for batch in sz["spmm_batches"]:
            for kind, s in (("nm", 0.5), ("unstructured", 0.8), ("bsr", 0.9)):

                def case(out=out, inp=inp, batch=batch, kind=kind, s=s) -> dict:
                    r = measure_case(out, inp, sz["spmm_tokens"] * batch, s, kind)
                    scale = max(1e-30, r["ref_max_abs"])
                    errs = {k: v for k, v in r.items() if k.startswith("ovit") and k.endswith("max_err")}
                    bad = [k for k in r if k.startswith("ovit") and k.endswith("_error")]
                    r["ok"] = not bad and all(v / scale <= 2e-2 for v in errs.values())
                    return r

                items.run(f"{out}x{inp} batch {batch} {kind}", case)
    if DEVICE == "cuda":
        items.run("ViT-B forward, dense vs 2:4", lambda: end_to_end(64))


def section_accuracy(items: Items, dry: bool) -> None:
    import fisher_accuracy

    dev = "cpu" if dry else "cuda"
    kernel = "triton" if dry else "cuda"
    b = 16 if dry else 64
    for ratio in fisher_accuracy.RATIOS:
        for mb in fisher_accuracy.M_OVER_B:
            items.run(
                f"λ/λ_max={ratio:g} m/B={mb:g} B={b}",
                lambda ratio=ratio, mb=mb: {"worst_diag_rel_err": fisher_accuracy.cell(b, mb, ratio, dev, kernel, 1)},
            )


def _torchrun_prune(device: str) -> dict:
    """`torchrun --nproc_per_node=1 -m ovit prune` on a one-block ViT-Tiny over a generated
    image folder: the distributed path end to end (NCCL on a GPU, gloo on the CPU)."""
    import json
    import subprocess
    import tempfile

    import torch
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        g = torch.Generator().manual_seed(0)
        for cls in ("a", "b"):
            os.makedirs(os.path.join(tmp, "data", cls))
            for i in range(8):
                arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(arr).save(os.path.join(tmp, "data", cls, f"{i}.png"))
        out = os.path.join(tmp, "pruned.pt")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "-m", "ovit", "prune",
               "--model", "vit_tiny_patch16_224", "--model-kwargs", '{"img_size": 32, "depth": 1, "num_classes": 2}',
               "--data", os.path.join(tmp, "data"), "--sparsity", "0.5", "--block-size", "32", "--num-grads", "8",
               "--grad-batch-size", "2", "--damp", "1e-3", "--damp-mode", "relative", "--workers", "0",
               "--device", device, "--out", out]  # fmt: skip
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        if res.returncode != 0:
            raise RuntimeError(f"torchrun exited {res.returncode}: {(res.stderr or res.stdout)[-800:]}")
        with open(os.path.join(tmp, "pruned.json")) as f:
            rep = json.load(f)
        return {"seconds": time.perf_counter() - t0, "achieved_sparsity": rep["achieved_sparsity"],
                "notes": rep["notes"]}  # fmt: skip


def section_frontend(items: Items, dry: bool) -> None:
    import torch
    from frontend_check import run as frontend_run

    items.run("torchrun --nproc_per_node=1 -m ovit prune", lambda: _torchrun_prune("cpu" if dry else "cuda"))

    if dry:  # a two-block DeiT on 32-pixel images, a few gradients, B = 16, on the CPU
        items.run("deit_small (toy, CPU)", lambda: frontend_run(["deit_small_patch16_224"], 4, 2, None, "cpu",
                                                                 block_size=16, img_size=32, depth=2)[0])  # fmt: skip
        items.run("deit_small per-sample (toy, CPU)", lambda: frontend_run(
            ["deit_small_patch16_224"], 8, 4, None, "cpu", block_size=16, grad_mode="per_sample", damp=1e-4,
            damp_mode="relative", img_size=32, depth=2)[0])  # fmt: skip
        return
    for model_name in ("deit_small_patch16_224", "deit_base_patch16_224"):
        items.run(model_name, lambda model_name=model_name: frontend_run([model_name], 256, 128, torch.bfloat16)[0])
    # per-sample gradients: images/s against the training throughput at the same batch
    items.run("deit_small_patch16_224 per-sample", lambda: frontend_run(
        ["deit_small_patch16_224"], 1024, 128, torch.bfloat16, grad_mode="per_sample", damp=1e-4,
        damp_mode="relative")[0])  # fmt: skip


def section_tests(items: Items, dry: bool, budget: float) -> None:
    env = dict(os.environ, OVIT_POISON="1", OVIT_TRITON_AUTOTUNE="0", TRITON_INTERPRET="1" if dry else "0")
    files = ["tests/test_backends.py", "tests/test_dispatch.py", "tests/test_sparse.py", "tests/test_factored.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *files]
    try:
        import pytest_timeout  # noqa: F401

        cmd.append("--timeout=90")  # one hanging test is reported, the rest still run
    except ImportError:
        pass

    def run() -> dict:
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=max(5.0, budget - 5))
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            return {"ok": False, "error": f"pytest did not finish within {budget - 5:.0f} s", "tail": out[-3000:]}
        lines = (r.stdout + r.stderr).strip().splitlines()
        failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
        return {"ok": r.returncode == 0, "rc": r.returncode, "summary": lines[-1] if lines else "",
                "failed": failed[:40], "tail": "\n".join(lines[-30:])}  # fmt: skip

    items.run("pytest " + " ".join(files), run)


def _inject_fault(items: Items, kind: str) -> None:
    """``OVIT_GPU_CHECK_FAULT=raise|hang|exit`` replaces a section by a fault of that kind (the
    tests check that each one fails the run, names the item and keeps the deadline)."""
    if kind == "raise":
        items.run("injected fault", lambda: 1 / 0)
    elif kind == "hang":
        items.run("injected hang", lambda: time.sleep(3600) or {})
    elif kind == "exit":
        items.write({"event": "start", "item": "injected exit"})
        os._exit(3)


def child(section: str, args: argparse.Namespace) -> None:
    items = Items(args.jsonl, section)
    fault = os.environ.get("OVIT_GPU_CHECK_FAULT")
    if fault:
        _inject_fault(items, fault)
        return
    if args.dry_run:
        os.environ["OVIT_BENCH_DEVICE"] = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, BENCH)
    os.environ.setdefault("OVIT_POISON", "1")
    sz = sizes(args.dry_run, args.quick)
    if section == "tests":
        section_tests(items, args.dry_run, args.budget)
        return
    if section == "accuracy":
        section_accuracy(items, args.dry_run)
        return
    if section == "frontend":
        section_frontend(items, args.dry_run)
        return
    rates = items.run("machine rates", machine_rates)
    if section == "checks":
        section_checks(items, sz, args.dry_run)
    elif section == "fisher":
        section_fisher(items, sz, rates)
    elif section == "obs":
        section_obs(items, sz, rates)
    elif section == "spmm":
        section_spmm(items, sz)


# =============================================================================================
# parent side: build, sections as children with deadlines, merge, summary, exit code
# =============================================================================================


def build(items: Items, budget: float, dry: bool) -> None:
    def run() -> dict:
        try:
            import ovit_kernels._C  # noqa: F401

            return {"built": "already importable"}
        except ImportError:
            pass
        if dry:
            return {"built": "skipped in the dry run (no GPU)"}
        env = dict(os.environ, OVIT_BUILD_CUDA="1", MAX_JOBS=str(os.cpu_count() or 8))
        import torch

        if torch.cuda.is_available() and "TORCH_CUDA_ARCH_LIST" not in os.environ:
            major, minor = torch.cuda.get_device_capability()
            env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # this card only: half the build time
        cmd = [sys.executable, "-m", "pip", "install", "-e", ROOT, "--no-build-isolation", "--no-deps", "-q"]
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=budget)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"the build did not finish within {budget:.0f} s"}
        if r.returncode != 0:
            return {"ok": False, "error": "the extension did not build", "log": (r.stdout + r.stderr)[-4000:]}
        check = subprocess.run([sys.executable, "-c", "import ovit_kernels._C"], capture_output=True, text=True)
        if check.returncode:
            return {"ok": False, "error": "built, but ovit_kernels._C does not import", "log": check.stderr[-2000:]}
        return {"built": env.get("TORCH_CUDA_ARCH_LIST", "default archs")}

    items.run("extension", run)


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    out.append({"event": "item", "item": "(unreadable line)", "ok": False, "error": line[:200]})
    return out


def run_section(section: str, budget: float, args: argparse.Namespace, log) -> dict:
    """Run one section in a child process; returns how it ended."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        section,
        "--jsonl",
        args.jsonl,
        "--budget",
        str(budget),
    ]
    cmd += (["--dry-run"] if args.dry_run else []) + ([] if args.quick else ["--full"])
    t = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            start_new_session=True)  # fmt: skip
    lines: list[str] = []
    timed_out = False
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while True:
        left = budget - (time.time() - t)
        if left <= 0:
            timed_out = True
            break
        if not sel.select(timeout=min(1.0, left)):
            if proc.poll() is not None:
                break
            continue
        line = proc.stdout.readline()
        if not line:
            break
        log.write(line)
        log.flush()
        if line.startswith(f"[{section}]"):
            print(line.rstrip()[:400], flush=True)
        lines.append(line)
    if timed_out:
        os.killpg(proc.pid, signal.SIGKILL)
    rc = proc.wait()
    rest = proc.stdout.read() if not timed_out else ""
    if rest:
        log.write(rest)
        lines.append(rest)
    return {"rc": rc, "timed_out": timed_out, "seconds": round(time.time() - t, 1), "tail": "".join(lines)[-2000:]}


def merge(args: argparse.Namespace, meta: dict, sections: dict) -> dict:
    recs = read_jsonl(args.jsonl)
    report = {**meta, "sections": {}}
    for name, how in sections.items():
        mine = [r for r in recs if r.get("section") == name]
        items = [r for r in mine if r.get("event") == "item"]
        started = [r["item"] for r in mine if r.get("event") == "start"]
        finished = {r["item"] for r in items}
        hung = [s for s in started if s not in finished]
        sec = {**how, "items": items}
        if hung:
            sec["unfinished_item"] = hung[-1]
        report["sections"][name] = sec
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    return report


def failures(report: dict) -> Iterator[str]:
    for name, sec in report["sections"].items():
        if sec.get("not_run"):
            yield f"{name}: not run ({sec['not_run']})"
            continue
        for it in sec["items"]:
            if not it.get("ok", False):
                yield f"{name}: {it['item']}: {summarize(it)[:160]}"
        if sec.get("timed_out"):
            yield f"{name}: killed at its deadline ({sec['seconds']} s) in {sec.get('unfinished_item', '?')!r}"
        elif sec.get("rc"):
            where = f" in {sec['unfinished_item']!r}" if sec.get("unfinished_item") else ""
            yield f"{name}: the section exited with {sec['rc']}{where}: {sec['tail'][-200:]!r}"
        elif not sec["items"] and name != "build":
            yield f"{name}: produced no items"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", type=int, choices=sorted(PLANS), help="a prepared call: its sections and deadline")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, help="what to run, in this order")
    ap.add_argument("--deadline", type=float, help="seconds for the whole run (default: the plan's, or 900)")
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(ROOT, "bench", "out")))
    ap.add_argument("--dry-run", action="store_true", help="every section on the CPU at toy sizes, same rules")
    ap.add_argument(
        "--full", dest="quick", action="store_false", help="larger timing slices (not for a 15-minute session)"
    )
    ap.add_argument("--child", choices=SECTIONS, help=argparse.SUPPRESS)
    ap.add_argument("--jsonl", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, default=60.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args)
        return
    t0 = time.time()
    if args.plan:
        plan, deadline = PLANS[args.plan]
        order = [(s, b) for s, b in plan if not args.sections or s in args.sections]
    else:
        names = args.sections or [s for s in SECTIONS if s != "build" or not args.dry_run]
        order, deadline = [(s, BUDGETS[s]) for s in names], 900
    deadline = args.deadline or deadline
    if args.dry_run:
        order = [(s, b * 2) for s, b in order]  # the CPU is slower; the budgets still bind
        deadline = args.deadline or deadline * 2
    os.makedirs(args.out, exist_ok=True)
    args.jsonl = os.path.join(args.out, "gpu_check.jsonl")
    meta = {"date": now(), "argv": sys.argv, "dry_run": args.dry_run, "deadline_s": deadline,
            "plan": args.plan, "host_cpus": os.cpu_count()}  # fmt: skip
    sections: dict[str, dict] = {}
    with open(os.path.join(args.out, "gpu_check.log"), "a") as log:
        log.write(f"\n===== {now()} {' '.join(sys.argv)}\n")
        for section, budget in order:
            left = deadline - (time.time() - t0)
            if left < MIN_START:
                sections[section] = {"not_run": f"{left:.0f} s left of the {deadline:.0f} s deadline"}
                merge(args, meta, sections)
                continue
            budget = min(budget, left)
            print(f"== {section} (budget {budget:.0f} s, {left:.0f} s left)", flush=True)
            if section == "build":
                tb = time.time()
                build(Items(args.jsonl, "build"), budget, args.dry_run)
                sections[section] = {"rc": 0, "timed_out": False, "seconds": round(time.time() - tb, 1), "tail": ""}
            else:
                sections[section] = run_section(section, budget, args, log)
            meta["elapsed_s"] = round(time.time() - t0, 1)
            merge(args, meta, sections)
    report = merge(args, meta, sections)
    _print_device(report)
    bad = list(failures(report))
    total = sum(len(s.get("items", [])) for s in report["sections"].values())
    took = time.time() - t0
    if bad:
        print("\nfailures:")
        for f in bad:
            print("  " + f)
        print(f"GPU CHECK FAILED: {len(bad)} problem(s) in {total} items, {took:.0f} s: {bad[0][:200]}")
        sys.exit(1)
    print(f"GPU CHECK OK: {total} items, {len(report['sections'])} sections, {took:.0f} s ({args.out}/gpu_check.json)")


def _print_device(report: dict) -> None:
    for sec in report["sections"].values():
        for it in sec.get("items", []):
            if it.get("item") == "machine rates" and it.get("ok"):
                rates = {k: round(v, 1) for k, v in it.items() if k.endswith(("GBps", "TFLOPs"))}
                print(f"rates: {rates}")
                return


if __name__ == "__main__":
    main()
