"""Front-end timing on a GPU: DeiT-Small / DeiT-Base (random weights, random images), B = 192,
m gradients of batch 128, one-shot oViT at 50%.

Reports the pruner's phases (sampling vs everything else) and the card's plain training
throughput for the same model, batch and precision, measured in the same run (forward +
backward + AdamW step). Targets: everything except sampling <= 10% of the total; sampling
>= 50% of the training throughput (images/s).

    python bench/frontend_check.py --models deit_small_patch16_224 deit_base_patch16_224 --num-grads 256
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def training_throughput(
    model: torch.nn.Module, batch: int, steps: int, amp: torch.dtype | None, device: str = "cuda", size: int = 224
) -> float:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.autocast(device, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - t)


class RandomImages(torch.utils.data.IterableDataset):
    def __init__(self, batch: int, device: str = "cuda", size: int = 224) -> None:
        self.batch, self.device, self.size = batch, device, size

    def __iter__(self):
        g = torch.Generator(device=self.device).manual_seed(0)
        while True:
            yield (
                torch.randn(self.batch, 3, self.size, self.size, device=self.device, generator=g),
                torch.randint(0, 1000, (self.batch,), device=self.device, generator=g),
            )


def run(
    models: list[str],
    num_grads: int,
    batch: int,
    amp: torch.dtype | None,
    device: str = "cuda",
    block_size: int = 192,
    grad_mode: str = "mini_batch",
    damp: float = 1e-8,
    damp_mode: str = "absolute",
    seed: int = 0,
    **model_kw,
) -> list[dict]:
    """One-shot oViT at 50% on each timm model; one row per model (also printed as JSON).
    ``grad_mode="per_sample"``: ``num_grads`` single-image gradients from passes of ``batch``
    (give it ``damp_mode="relative"``: single-image gradients have a larger Fisher scale).
    The random weights come from ``torch.manual_seed(seed)``, so a run is repeatable.
    ``device="cpu"`` with a tiny ``model_kw`` (e.g. ``img_size=32, depth=2``) and a small
    ``block_size`` dry-runs the script in seconds."""
    import timm

    import ovit

    rows = []
    for name in models:
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, **model_kw).to(device)
        size = model_kw.get("img_size", 224)
        thr = training_throughput(model, batch, 10 if device == "cuda" else 1, amp, device, size)
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        data = RandomImages(batch, device, size)
        rep = ovit.one_shot_prune(
            model,
            iter(data),
            0.5,
            method="ovit",
            block_size=block_size,
            num_grads=num_grads,
            damp=damp,
            damp_mode=damp_mode,
            amp_dtype=amp,
            progress=False,
            grad_mode=grad_mode,
            pass_batch_size=batch if grad_mode != "mini_batch" else None,
        )
        samp = rep.times["sampling"]
        total = rep.times["total"]
        row = {
            "model": name,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "num_grads": rep.num_grads,
            "block_size": block_size,
            "batch": batch,
            "amp": str(amp),
            "passes": rep.passes,
            "times": rep.times,
            "non_sampling_fraction": (total - samp) / total,
            "grad_mode": grad_mode,
            "damp": f"{damp:g} {damp_mode}",
            "sampling_images_per_s": (rep.samples or rep.num_grads * batch) / samp * max(1, rep.passes),
            "training_images_per_s": thr,
            "peak_memory_GiB": (rep.peak_memory_bytes or 0) / 2**30,
            "achieved_sparsity": rep.achieved_sparsity,
            "notes": rep.notes,
        }
        row["sampling_vs_training"] = row["sampling_images_per_s"] / thr
        print(json.dumps(row), flush=True)
        rows.append(row)
        del model, rep
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "deit_base_patch16_224"])
    ap.add_argument("--num-grads", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--amp", choices=("none", "bf16"), default="bf16")
    ap.add_argument("--grad-mode", choices=("mini_batch", "per_sample"), default="mini_batch")
    ap.add_argument("--damp", type=float, default=1e-8)
    ap.add_argument("--damp-mode", choices=("absolute", "relative"), default="absolute")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = ap.parse_args()
    amp = torch.bfloat16 if args.amp == "bf16" else None
    os.makedirs(args.out, exist_ok=True)
    rows = run(args.models, args.num_grads, args.batch, amp, grad_mode=args.grad_mode, damp=args.damp,
               damp_mode=args.damp_mode, seed=args.seed)  # fmt: skip
    with open(os.path.join(args.out, "frontend_check.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
