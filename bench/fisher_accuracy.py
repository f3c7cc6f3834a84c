#!/usr/bin/env python
"""Accuracy of the float32 Fisher inverses against float64, on a grid of λ/λ_max × m/B.

For each cell, gradients with a Fisher of condition number 10² (three seeds, four blocks each) are
turned into H = (λI + GᵀG/m)⁻¹ by: the original code's float32 rank-one path
(``bench/baselines.py``), this package's float32 Woodbury on the reference/CPU path (rank-k steps
in float64, one rounding per call) and on the kernels (the Triton kernel, whose arithmetic the
CUDA kernels share: one float32 rank-one step per gradient), and the float64 Gram path with a
float32 result. Printed: the worst relative error of diag(H) over the cell, a Markdown table.

    python bench/fisher_accuracy.py            # B = 64, Triton under its interpreter on a CPU
    python bench/fisher_accuracy.py --block 128 --device cuda
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from baselines import fisher_rank_one  # noqa: E402

import ovit_kernels as ok  # noqa: E402

RATIOS = (1e-8, 1e-6, 1e-4, 1e-2)
M_OVER_B = (0.5, 1, 2, 8)


def gradients(nb: int, b: int, m: int, cond: float, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(nb, b, b, generator=gen, dtype=torch.float64))
    ev = torch.logspace(0, -math.log10(cond), b, dtype=torch.float64)
    z = torch.randn(nb, m, b, generator=gen, dtype=torch.float64)
    return ((z * ev.sqrt()) @ q.transpose(1, 2)).permute(1, 0, 2).reshape(m, nb * b)


def diag_err(h: torch.Tensor, ref: torch.Tensor) -> float:
    e = (h.double().cpu().diagonal(dim1=1, dim2=2) / ref.diagonal(dim1=1, dim2=2) - 1).abs()
    return math.inf if bool(torch.isnan(e).any()) else float(e.max())


def woodbury(g: torch.Tensor, b: int, lam: float, backend: str, device: str) -> torch.Tensor:
    m = g.shape[0]
    h = (torch.eye(b, device=device) / lam).repeat(g.shape[1] // b, 1, 1)
    for chunk in g.float().to(device).split(128):  # the front-end's chunk at B = 192
        ok.woodbury_update_(h, chunk, m, backend=backend)
    return h


def cell(b: int, mb: float, ratio: float, device: str, kernel: str, seeds: int = 3) -> dict[str, float]:
    worst: dict[str, float] = {}
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(seed)
        m = max(1, int(mb * b))
        g = gradients(4, b, m, 1e2, gen)
        gb = g.view(m, 4, b)
        f = torch.einsum("kni,knj->nij", gb, gb) / m
        lam = ratio * float(torch.linalg.eigvalsh(f).max())
        ref = torch.cholesky_inverse(torch.linalg.cholesky(f + lam * torch.eye(b, dtype=torch.float64)))
        got = {
            "original rank-one fp32": fisher_rank_one(g.float().to(device), b, lam, m),
            "ovit Woodbury fp32, CPU/reference": woodbury(g, b, lam, "reference", device),
            f"ovit Woodbury fp32, kernels ({kernel})": woodbury(g, b, lam, kernel, device),
            "ovit Gram (fp64), fp32 result": ok.fisher_inverse(
                g.to(device), b, lam, method="gram", dtype=torch.float32
            ),
            "ovit Gram (fp64), fp64 result": ok.fisher_inverse(g.to(device), b, lam, method="gram"),
            "ovit Woodbury fp64": ok.fisher_inverse(g.to(device), b, lam, method="woodbury"),
        }
        for k, h in got.items():
            worst[k] = max(worst.get(k, 0.0), diag_err(h, ref))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kernel", default=None, help="the kernel backend (default: cuda on a GPU, else triton)")
    args = ap.parse_args()
    kernel = args.kernel or ("cuda" if args.device == "cuda" else "triton")
    rows = {}
    for ratio in RATIOS:
        for mb in M_OVER_B:
            for k, v in cell(args.block, mb, ratio, args.device, kernel).items():
                rows.setdefault(k, {})[(ratio, mb)] = v
    print(f"worst relative error of diag(F⁻¹), B = {args.block}, cond(F) = 1e2, 3 seeds, {args.device}")
    for ratio in RATIOS:
        print(f"\nλ/λ_max = {ratio:g}\n")
        print("| method | " + " | ".join(f"m/B = {mb:g}" for mb in M_OVER_B) + " |")
        print("|---|" + "---|" * len(M_OVER_B))
        keys = [(ratio, mb) for mb in M_OVER_B]
        for k, vals in rows.items():
            cells = [f"{v:.0e}".replace("e-0", "e-") if math.isfinite(v) else "NaN" for v in map(vals.get, keys)]
            print(f"| {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
