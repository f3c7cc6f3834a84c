#!/usr/bin/env python
"""Per-sample gradient sampling against plain forward + backward, same batch, same process.

For each model: images/s of (a) a plain forward + backward pass (every parameter requires grad,
``loss.backward()``; the training throughput without the optimizer), (b) ``sample_gradients``
in ``grad_mode="per_sample"`` over passes of the same batch, forming every pruned layer's
per-sample weight gradients and streaming them into sinks that drop them (the sampling cost
without the Fisher update), and (c) mini-batch sampling (one gradient per pass) for reference.
Ratios (b)/(a) are the number the target is about (≥ 0.5). Minimum of ``--reps`` runs.

    python bench/bench_sampling.py                      # table + bench/out/bench_sampling.json
    python bench/bench_sampling.py --models tiny        # the digits ViT only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from ovit.layers import PrunableLayer, block_layout, select_layers  # noqa: E402
from ovit.models import TinyViT  # noqa: E402
from ovit.sampling import sample_gradients  # noqa: E402


class Sink:
    """Takes gradient chunks and drops them."""

    def update(self, chunk: torch.Tensor) -> None:
        pass


def build(name: str) -> tuple[nn.Module, tuple[int, ...], int]:
    if name == "tiny":
        return TinyViT(dim=64, depth=4, heads=4, mlp_ratio=2.0), (1, 8, 8), 10
    import timm

    return timm.create_model(name, pretrained=False), (3, 224, 224), 1000


def measure(name: str, batch: int, passes: int, reps: int) -> dict:
    torch.manual_seed(0)
    model, shape, classes = build(name)
    model.eval()
    xs = [torch.randn(batch, *shape) for _ in range(passes)]
    ys = [torch.randint(0, classes, (batch,)) for _ in range(passes)]
    data = list(zip(xs, ys))
    layers = [PrunableLayer(n, m, block_layout(m.weight.numel(), 192)) for n, m in select_layers(model)]
    sinks = {ly.name: Sink() for ly in layers}
    dev = torch.device("cpu")

    def plain() -> None:
        for x, y in data:
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    def per_sample() -> None:
        sample_gradients(model, data, layers, sinks, batch * passes, loss_fn=nn.functional.cross_entropy, device=dev,
                         grad_mode="per_sample", pass_batch_size=batch, chunk=64, progress=False)  # fmt: skip

    def mini_batch() -> None:
        sample_gradients(model, data, layers, sinks, passes, loss_fn=nn.functional.cross_entropy, device=dev,
                         chunk=64, progress=False)  # fmt: skip

    out = {"model": name, "batch": batch, "passes": passes, "layers": len(layers),
           "pruned_params": sum(ly.layout.numel for ly in layers)}  # fmt: skip
    for key, fn in (("plain", plain), ("per_sample", per_sample), ("mini_batch", mini_batch)):
        fn()  # warm-up
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[f"{key}_images_per_s"] = batch * passes / best
    out["per_sample_vs_plain"] = out["per_sample_images_per_s"] / out["plain_images_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "deit_tiny_patch16_224"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = ap.parse_args()
    rows = [measure(m, args.batch, args.passes, args.reps) for m in args.models]
    print(f"CPU, {torch.get_num_threads()} threads, batch {args.batch}, images/s (min of {args.reps})")
    print("| model | plain fwd+bwd | per-sample sampling | ratio | mini-batch sampling |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['plain_images_per_s']:.1f} | {r['per_sample_images_per_s']:.1f} | "
              f"{r['per_sample_vs_plain']:.2f} | {r['mini_batch_images_per_s']:.1f} |")  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_sampling.json"), "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "threads": torch.get_num_threads(), "rows": rows}, f,
                  indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
