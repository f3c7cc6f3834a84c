"""Sparse × dense benchmarks at ViT-B/L linear shapes (needs a GPU).

    pytest bench/bench_spmm.py --benchmark-only          # pytest-benchmark view (warm L2)
    python bench/bench_spmm.py --table spmm_table.json    # the measured table sparsify() reads

Timing: each call is captured in a CUDA graph and replayed 20 times between two CUDA events,
so host dispatch (Python, custom-op and cuSPARSE set-up) is not counted for anyone; where
capture fails the row says so and per-call events are used ("timing" field). "Flushed"
timings write a 256 MiB buffer before every call (inside the graph, then subtracted) so the
weight is not in L2 (the targets count flushed timings); "warm" timings do not. Peak memory:
the most one call allocates beyond what was live before it. Baselines in the same run: cuBLAS
dense (F.linear), torch.sparse CSR, to_sparse_semi_structured (cuSPARSELt, 2:4) and PyTorch's
BSR. Every format's output is checked against the dense product before it is timed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import pytest
import torch
import torch.nn.functional as F
from timing import DEVICE, device_name, sync, timed_graph

import ovit_kernels as ok

SHAPES = [(768, 768), (2304, 768), (3072, 768), (768, 3072), (4096, 1024), (1024, 4096)]  # (out, in)
BATCHES = [1, 8, 64]  # images of 197 tokens
SPARSITIES = [0.5, 0.75, 0.9]


def time_call(fn, flushed: bool, reps: int = 20, methods: set | None = None) -> float:
    """Seconds per call (CUDA-graph replays; see the module doc). ``methods`` collects how."""
    t, how = timed_graph(fn, reps=reps, flushed=flushed)
    if methods is not None:
        methods.add(how)
    return t


def peak_bytes(fn) -> int | None:
    """Peak device memory allocated by one call of ``fn`` beyond what was live before it."""
    if DEVICE != "cuda":
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() - base


@contextlib.contextmanager
def env_set(setting: tuple[str, str] | None):
    """Run the body with one environment variable set (None: change nothing)."""
    if setting is None:
        yield
        return
    key, value = setting
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def make_weight(out: int, inp: int, sparsity: float, kind: str) -> torch.Tensor:
    w = torch.randn(out, inp, device=DEVICE, dtype=torch.float16)
    if kind == "nm":
        g = w.abs().view(out, inp // 4, 4)
        idx = g.topk(2, -1).indices
        return w * torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True).view(out, inp)
    if kind == "bsr":
        occ = torch.rand(out // 64, inp // 64, device=DEVICE) >= sparsity
        return w * occ.repeat_interleave(64, 0).repeat_interleave(64, 1)
    return w * (torch.rand(out, inp, device=DEVICE) >= sparsity)


def measure_case(out: int, inp: int, tokens: int, sparsity: float, kind: str) -> dict:
    w = make_weight(out, inp, sparsity, kind)
    x = torch.randn(tokens, inp, device=DEVICE, dtype=torch.float16)
    bias = torch.randn(out, device=DEVICE, dtype=torch.float16)
    want = F.linear(x, w, bias)
    fmt = {"nm": "nm", "bsr": "bsr", "unstructured": "bitmap"}[kind]
    kw = {"block": (64, 64)} if fmt == "bsr" else {}
    sl = ok.SparseLinear(ok.pack(w, fmt, **kw), bias)
    row = {
        "out": out,
        "in": inp,
        "tokens": tokens,
        "sparsity": sparsity if kind != "nm" else 0.5,
        "kind": kind,
        "format": fmt,
        "ovit_max_err": float((sl(x).float() - want.float()).abs().max()),
        "ref_max_abs": float(want.float().abs().max()),
    }
    calls = {"dense": lambda: F.linear(x, w, bias), f"ovit_{fmt}": lambda: sl(x)}
    try:
        csr = w.to_sparse_csr()
        calls["torch_csr"] = lambda: torch.sparse.mm(csr, x.T)
    except Exception as e:  # noqa: BLE001
        row["torch_csr_error"] = str(e)[:100]
    if kind == "nm":
        try:
            from torch.sparse import to_sparse_semi_structured

            ss = to_sparse_semi_structured(w)
            calls["cusparselt"] = lambda: F.linear(x, ss, bias)
        except Exception as e:  # noqa: BLE001
            row["cusparselt_error"] = str(e)[:100]
    if kind == "bsr":
        try:
            bsr = w.to_sparse_bsr((64, 64))
            calls["torch_bsr"] = lambda: F.linear(x, bsr, bias)
        except Exception as e:  # noqa: BLE001
            row["torch_bsr_error"] = str(e)[:100]
    # the kernels behind one format, side by side: the two 2:4 tensor-core kernels, and the CUDA
    # and Triton bitmap kernels (the plain ovit_<format> entry is what auto picks)
    variants: dict[str, tuple[str, str]] = {}
    if DEVICE == "cuda" and kind == "nm":
        variants = {f"ovit_nm_{v}": ("OVIT_SPMM24", v) for v in ("simple", "pipelined", "wide")}
    if DEVICE == "cuda" and kind == "unstructured":
        variants = {f"ovit_bitmap_{v}": ("OVIT_SPMM_BITMAP", v) for v in ("cuda", "triton")}
    for name, setting in variants.items():
        calls[name] = lambda: sl(x)
        try:
            with env_set(setting):
                row[f"{name}_max_err"] = float((sl(x).float() - want.float()).abs().max())
        except Exception as e:  # noqa: BLE001
            row[f"{name}_error"] = str(e)[:100]
    methods: set = set()
    for flushed in (False, True):
        tag = "flushed" if flushed else "warm"
        for name, fn in calls.items():
            try:
                with env_set(variants.get(name)):
                    row[f"{name}_{tag}_s"] = time_call(fn, flushed, methods=methods)
                    if not flushed:
                        row[f"{name}_peak_bytes"] = peak_bytes(fn)
            except Exception as e:  # noqa: BLE001
                row[f"{name}_error"] = str(e)[:100]
    row["timing"] = "+".join(sorted(methods))
    row["speedup"] = row["dense_flushed_s"] / row[f"ovit_{row['format']}_flushed_s"]
    row["bytes_dense"] = w.numel() * 2
    row["bytes_packed"] = sl.packed.nbytes()
    return row


def end_to_end(batch: int = 64) -> dict:
    """ViT-B forward, dense vs 2:4 on MLP and attention projections through sparsify(format="nm")."""
    import timm

    model = timm.create_model("vit_base_patch16_224", pretrained=False).to(DEVICE).half().eval()
    x = torch.randn(batch, 3, 224, 224, device=DEVICE, dtype=torch.float16)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.endswith(("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")):
                g = mod.weight.abs().view(mod.weight.shape[0], -1, 4)
                idx = g.topk(2, -1).indices
                mod.weight.mul_(torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True).view_as(mod.weight))
        t_dense = time_call(lambda: model(x), flushed=False, reps=10)
        layers = [n for n, _ in model.named_modules() if n.endswith(("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))]
        ok.sparsify(model, format="nm", layers=layers)
        t_sparse = time_call(lambda: model(x), flushed=False, reps=10)
    return {"batch": batch, "dense_s": t_dense, "sparse_nm_s": t_sparse, "speedup": t_dense / t_sparse}


@pytest.mark.parametrize("kind", ["nm", "unstructured", "bsr"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("batch", BATCHES)
def test_spmm(benchmark, kind, shape, batch):
    out, inp = shape
    sparsity = 0.5 if kind == "nm" else 0.8 if kind == "unstructured" else 0.9
    w = make_weight(out, inp, sparsity, kind)
    fmt = {"nm": "nm", "bsr": "bsr", "unstructured": "bitmap"}[kind]
    kw = {"block": (64, 64)} if fmt == "bsr" else {}
    p = ok.pack(w, fmt, **kw)
    x = torch.randn(197 * batch, inp, device=DEVICE, dtype=torch.float16)
    benchmark.extra_info.update(format=fmt, sparsity=sparsity, tokens=197 * batch)
    benchmark(lambda: (ok.spmm(x, p), sync()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", default="spmm_table.json")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dev = device_name()
    rows = []
    t0 = time.time()
    shapes = SHAPES[:3] if args.quick else SHAPES
    for out, inp in shapes:
        for batch in BATCHES:
            for kind, sps in (("nm", [0.5]), ("unstructured", SPARSITIES), ("bsr", SPARSITIES)):
                for s in sps:
                    r = measure_case(out, inp, 197 * batch, s, kind)
                    r["device"] = dev
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    e2e = end_to_end()
    print(json.dumps(e2e))
    with open(args.table, "w") as f:
        json.dump(
            {
                "device": dev,
                "date": time.strftime("%Y-%m-%d"),
                "seconds": time.time() - t0,
                "rows": rows,
                "end_to_end": e2e,
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
