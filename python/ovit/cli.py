"""Command line: ``ovit demo`` and ``ovit prune``."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .pruner import METHODS


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, GradualConfig, run_demo, run_grad_modes_demo, run_gradual_demo

    if args.grad_modes:
        run_grad_modes_demo()
        return 0
    if args.quantize:
        from .demo import run_quant_demo

        run_quant_demo()
        return 0
    if args.gradual:
        gcfg = GradualConfig(out=args.out)
        if args.fast:
            gcfg = GradualConfig(seeds=(0,), initial=0.5, final=0.9, steps=3, every=1, hold=1, report=(0.9,),
                                 base=DemoConfig(num_grads=128), out=args.out)  # fmt: skip
        if args.seeds is not None:
            gcfg.seeds = tuple(range(args.seeds))
        run_gradual_demo(gcfg)
        return 0

    cfg = DemoConfig(out=args.out)
    if args.fast:
        cfg = DemoConfig(
            seeds=(0,),
            sparsities=(0.5, 0.9),
            epochs=20,
            num_grads=128,
            damps=(("absolute", 1e-6), ("relative", 1e-2)),
            out=args.out,
        )
    if args.seeds is not None:
        cfg.seeds = tuple(range(args.seeds))
    run_demo(cfg)
    return 0


def _load_state(model: torch.nn.Module, sd: dict, what: str) -> None:
    """load_state_dict with one line saying what does not match."""
    try:
        res = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # size mismatches
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise ValueError(f"{what} does not fit the model: {first}") from None
    if res.missing_keys or res.unexpected_keys:
        raise ValueError(
            f"{what} does not fit the model: {len(res.missing_keys)} missing key(s) "
            f"(e.g. {res.missing_keys[:2]}), {len(res.unexpected_keys)} unexpected (e.g. {res.unexpected_keys[:2]})"
        )


def _is_hf_folder(spec: str) -> bool:
    return os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "config.json"))


def _load_model(spec: str, checkpoint: str | None, kwargs: dict) -> torch.nn.Module:
    import timm

    if _is_hf_folder(spec) or (not os.path.exists(spec) and "/" in spec and not timm.is_model(spec)):
        try:  # a Hugging Face transformers image classifier: a save_pretrained folder or a hub id
            from transformers import AutoModelForImageClassification
        except ImportError:
            raise ValueError(f"{spec!r} looks like a Hugging Face model but transformers is not installed") from None
        try:
            model = AutoModelForImageClassification.from_pretrained(spec, **kwargs)
        except Exception as e:
            first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise ValueError(f"cannot load the transformers model {spec!r}: {first}") from None
        if checkpoint:
            _load_state(model, torch.load(checkpoint, map_location="cpu", weights_only=True), checkpoint)
        model.ovit_source = spec  # where its image preprocessing comes from
        return model

    if os.path.isfile(spec):
        ckpt = torch.load(spec, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "arch" not in ckpt or "state_dict" not in ckpt:
            raise SystemExit(f"{spec}: expected a checkpoint {{'arch': timm name, 'state_dict': ...}}")
        model = timm.create_model(ckpt["arch"], pretrained=False, **{**ckpt.get("kwargs", {}), **kwargs})
        _load_state(model, ckpt["state_dict"], spec)
        return model
    if not timm.is_model(spec):
        raise ValueError(f"unknown model {spec!r}: neither a timm model name nor a checkpoint file")
    model = timm.create_model(spec, pretrained=False, **kwargs)
    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise ValueError(f"--checkpoint {checkpoint!r} is not a file")
        sd = torch.load(checkpoint, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd.get("model", sd)) if isinstance(sd, dict) else sd
        _load_state(model, sd, checkpoint)
    return model


def _model_and_folder(args: argparse.Namespace, folder: str, training: bool = False):
    """The timm model of ``--model``/``--checkpoint`` on its device, and an ImageFolder with the
    model's transform (training augmentation with ``training``)."""

    if not os.path.isdir(folder):
        raise ValueError(f"{folder!r} is not a directory (an ImageFolder: one sub-folder per class)")
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    model = _load_model(args.model, args.checkpoint, kwargs)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    return model, device, _folder(model, folder, training)


def _folder(model: torch.nn.Module, folder: str, training: bool):
    import timm
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(folder):
        raise ValueError(f"{folder!r} is not a directory (an ImageFolder: one sub-folder per class)")
    if hasattr(model, "ovit_source"):  # transformers: its image size and its processor's normalisation
        from torchvision import transforms

        size = model.config.image_size
        mean, std = [0.5] * 3, [0.5] * 3
        try:
            from transformers import AutoImageProcessor

            proc = AutoImageProcessor.from_pretrained(model.ovit_source)
            mean, std = list(proc.image_mean), list(proc.image_std)
        except Exception:  # noqa: BLE001 - a folder saved without its processor: ViT's defaults
            pass
        tf = [transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(mean, std)]
        return ImageFolder(folder, transform=transforms.Compose(tf))
    cfg = timm.data.resolve_data_config({}, model=model)
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img is not None:  # a model created at another resolution than its pretrained config
        cfg["input_size"] = (cfg["input_size"][0], *img)
    return ImageFolder(folder, transform=timm.data.create_transform(**cfg, is_training=training))


def _distributed_env() -> bool:
    """Under torchrun (which sets RANK and WORLD_SIZE, also for one process): initialise the
    process group (NCCL with GPUs, gloo without) and pin this rank's GPU. Returns whether the run
    is distributed."""
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return True


def _prune(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from .pruner import one_shot_prune

    distributed = _distributed_env()
    if distributed and args.device is None and torch.cuda.is_available():
        args.device = f"cuda:{torch.cuda.current_device()}"
    try:
        rc = _prune_on(args, one_shot_prune, distributed)
        if distributed:  # rank 0 may still be writing: leave together (gloo aborts a rank that leaves early)
            dist.barrier()
        return rc
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _prune_on(args: argparse.Namespace, one_shot_prune, distributed: bool) -> int:
    import torch.distributed as dist

    model, device, ds = _model_and_folder(args, args.data)
    per_sample = args.grad_mode != "mini_batch"
    group = {"mini_batch": None, "per_sample": None, "micro_batch": args.grad_batch_size}[args.grad_mode]
    pass_size = args.pass_batch_size or (64 if group is None else -(-64 // group) * group)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=pass_size if per_sample else args.grad_batch_size,
        shuffle=True,
        drop_last=False,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0),  # the same order on every rank: ranks take every W-th batch
    )
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    if distributed:
        from .distributed import distributed_prune

        if amp is not None:
            raise ValueError("under torchrun, ovit prune runs without --amp for now")
        if not args.checkpoint and not os.path.isfile(args.model):
            from .distributed import broadcast_model

            broadcast_model(model)  # a randomly initialised model: rank 0's weights everywhere
        report = distributed_prune(model, loader, args.sparsity, method=args.method, block_size=args.block_size,
                                   num_grads=args.num_grads, damp=args.damp, damp_mode=args.damp_mode,
                                   grad_mode=args.grad_mode, grad_batch_size=group,
                                   pass_batch_size=pass_size if per_sample else None, pattern=args.pattern,
                                   layers=args.layers, backend=args.backend, debug=True)  # fmt: skip
        if dist.get_rank() != 0:  # every rank holds the same model (checked): rank 0 writes it
            return 0
    else:
        report = one_shot_prune(
            model,
            loader,
            args.sparsity,
            method=args.method,
            block_size=args.block_size,
            num_grads=args.num_grads,
            grad_mode=args.grad_mode,
            grad_batch_size=group,
            pass_batch_size=pass_size if per_sample else None,
            damp=args.damp,
            damp_mode=args.damp_mode,
            pattern=args.pattern,
            layers=args.layers,
            amp_dtype=amp,
            backend=args.backend,
        )
    out = args.out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if out.endswith(".safetensors"):  # weights, bit-packed masks, report and settings in one file
        from .checkpoint import save_pruned

        mods = dict(model.named_modules())
        masks = {lr.name: mods[lr.name].weight.detach() != 0 for lr in report.layers}
        save_pruned(model, out, masks, report=report, settings={k: v for k, v in vars(args).items() if k != "func"})
    else:
        tmp = out + ".tmp"
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, out)
    rep_path = os.path.splitext(out)[0] + ".json"
    with open(rep_path, "w") as f:
        f.write(report.to_json())
    print(
        f"pruned {report.total_pruned}/{report.total_params} weights ({report.achieved_sparsity:.2%}) "
        f"with {report.method}; state dict: {out}; report: {rep_path}"
    )
    return 0


def _gradual(args: argparse.Namespace) -> int:
    import copy

    from .gradual import Pruner, gradual_prune
    from .schedules import SparsitySchedule

    model, device, train_ds = _model_and_folder(args, args.data, training=True)
    sched = SparsitySchedule(args.initial, args.final, steps=args.steps, every=args.every, hold=args.hold,
                             kind=args.kind)  # fmt: skip
    loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, pin_memory=device.type == "cuda")  # fmt: skip
    if len(loader) == 0:
        raise ValueError(f"--data holds fewer images than one batch of --batch-size {args.batch_size}")
    calib = torch.utils.data.DataLoader(_folder(model, args.data, False), batch_size=args.grad_batch_size,
                                        shuffle=True, num_workers=args.workers)  # fmt: skip
    evals = None
    if args.eval_data:
        evals = torch.utils.data.DataLoader(_folder(model, args.eval_data, False), batch_size=args.batch_size,
                                            num_workers=args.workers)  # fmt: skip
    teacher = copy.deepcopy(model).eval() if args.distill else None
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    pruner = Pruner(model, method=args.method, block_size=args.block_size, num_grads=args.num_grads,
                    damp=args.damp, damp_mode=args.damp_mode, layers=args.layers, grad_batch_size=args.grad_batch_size,
                    amp_dtype=amp, backend=args.backend)  # fmt: skip
    hist = gradual_prune(model, loader, schedule=sched, pruner=pruner, calib_data=calib, eval_data=evals,
                         optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=args.weight_decay),
                         teacher=teacher, amp_dtype=amp, warmup=args.warmup, out_dir=args.out)  # fmt: skip
    last = hist[-1] if hist else {}
    print(f"gradual {args.method}: {len(hist)} epochs, sparsity {last.get('sparsity', 0):.4f}; "
          f"log, checkpoints per sparsity and last.pt in {args.out}")  # fmt: skip
    return 0


def _parse_bytes(text: str) -> float:
    """'80GB', '80GiB', '80e9' → bytes."""
    t = text.strip().upper()
    for suffix, mult in (("GIB", 2**30), ("GB", 1e9), ("MIB", 2**20), ("MB", 1e6), ("TB", 1e12)):
        if t.endswith(suffix):
            return float(t[: -len(suffix)]) * mult
    return float(t)


def _plan(args: argparse.Namespace) -> int:
    import timm

    from .distributed import plan_job

    if not timm.is_model(args.model):
        raise ValueError(f"unknown model {args.model!r}: not a timm model name")
    with torch.device("meta"):  # no weights are allocated
        model = timm.create_model(args.model, pretrained=False)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    tokens = getattr(getattr(model, "patch_embed", None), "num_patches", 196) + 1
    p = plan_job(model, gpus=args.gpus, gpu_memory=_parse_bytes(args.gpu_memory), block_size=args.block_size,
                 num_grads=args.num_grads, grad_batch_size=args.grad_batch_size, fisher_dtype=dtype,
                 tokens=tokens)  # fmt: skip
    gib = 2.0**30
    print(f"{args.model}: {p['params'] / 1e6:.0f}M parameters, {p['layers']} pruned layers "
          f"({p['pruned_weights'] / 1e6:.0f}M weights), B = {args.block_size}, m = {args.num_grads}, "
          f"{args.gpus} GPUs, budget {p['budget_bytes'] / gib:.1f} GiB each")  # fmt: skip
    print(f"{'rank':>4} {'layers':>6} {'weights':>10} {'Gram state':>11} {'passes':>6} {'planned peak':>12}")
    for r in p["ranks"]:
        print(f"{r['rank']:>4} {r['layers']:>6} {r['weights'] / 1e6:>9.1f}M {r['state_bytes'] / gib:>8.1f} GiB "
              f"{r['passes']:>6} {r['peak_bytes'] / gib:>8.1f} GiB")  # fmt: skip
    print(
        f"exchanged per gradient: {p['bytes_per_gradient'] / 1e9:.2f} GB over the job (every entry once, to its owner)"
    )
    print("estimate: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in p["estimate"].items()))
    print(f"assumptions: {p['assumptions']}")
    most = max(r["passes"] for r in p["ranks"])
    if most > 1:
        print(f"note: up to {most} passes over the data per rank (layer groups): sampling repeats that many times; "
              "more GPUs or a smaller block size avoid it")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(p, f, indent=1)
    return 0


def _report(args: argparse.Namespace) -> int:
    from .checkpoint import report

    rows = report(args.checkpoint, args.png)
    mib = 2.0**20
    print(f"{'layer':<28} {'params':>10} {'sparsity':>9} {'pattern':>12} {'dense fp16':>11} {'bitmap':>9} {'2:4':>9}")
    for r in rows:
        nm = f"{r['nm_fp16_bytes'] / mib:.2f}M" if r["nm_fp16_bytes"] else "-"
        print(f"{r['layer']:<28} {r['params']:>10} {r['sparsity']:>9.2%} {r['pattern']:>12} "
              f"{r['dense_fp16_bytes'] / mib:>10.2f}M {r['bitmap_fp16_bytes'] / mib:>8.2f}M {nm:>9}")  # fmt: skip
    tot = sum(r["params"] for r in rows)
    pruned = sum(r["params"] * r["sparsity"] for r in rows)
    print(f"{len(rows)} pruned layers, {tot} weights, sparsity {pruned / max(1, tot):.2%}"
          + (f"; chart: {args.png}" if args.png else ""))  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ovit", description="Optimal ViT Surgeon: one-shot second-order pruning")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="train a small ViT on digits, prune it by every method, plot accuracy")
    d.add_argument("--fast", action="store_true", help="a quick run (1 seed, few epochs, few gradients)")
    d.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    d.add_argument("--grad-modes", action="store_true",
                   help="one-shot oViT: mini-batch vs per-sample gradients, equal gradients or images")  # fmt: skip
    d.add_argument("--quantize", action="store_true", help="one-shot oViT, then int8 (dynamic and weight-only)")
    d.add_argument("--gradual", action="store_true",
                   help="gradual oViT vs gradual global magnitude to 90%% and 95%%, and one-shot oViT")  # fmt: skip
    d.add_argument("--out", default="ovit_out", help="folder for the plot and the JSON results")
    d.set_defaults(func=_demo)
    p = sub.add_parser("prune", help="prune a timm model on an ImageFolder data set")
    p.add_argument("--model", required=True, help="timm model name, a checkpoint {'arch', 'state_dict'}, or a "
                   "transformers image classifier (a save_pretrained folder or a hub id)")  # fmt: skip
    p.add_argument("--checkpoint", help="state dict to load into a model given by name")
    p.add_argument("--model-kwargs", help="JSON keyword arguments for timm.create_model")
    p.add_argument("--data", required=True, help="ImageFolder directory (calibration images)")
    p.add_argument("--sparsity", type=float, default=None, help="fraction in [0, 1); implied by --pattern n:m")
    p.add_argument("--method", choices=METHODS, default="ovit")
    p.add_argument("--pattern", default="unstructured", help="'unstructured' or 'n:m' such as 2:4")
    p.add_argument("--block-size", type=int, default=192)
    p.add_argument("--num-grads", type=int, default=4096)
    p.add_argument("--grad-batch-size", type=int, default=128, help="images averaged into one gradient")
    p.add_argument("--grad-mode", choices=("mini_batch", "per_sample", "micro_batch"), default="mini_batch",
                   help="one backward pass per gradient, or gradients formed from per-sample gradients of "
                   "larger passes (per_sample: one image each; micro_batch: --grad-batch-size each)")  # fmt: skip
    p.add_argument("--pass-batch-size", type=int, default=None,
                   help="images per forward/backward pass in the per-sample modes (default 64)")  # fmt: skip
    p.add_argument("--damp", type=float, default=1e-8)
    p.add_argument("--damp-mode", choices=("absolute", "relative"), default="absolute")
    p.add_argument("--layers", default=None, help="regex of module names (default: timm attn/mlp linears)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--backend", default=None, choices=("auto", "cuda", "triton", "cpu", "reference"))
    p.add_argument("--device", default=None)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--out", required=True, help="the pruned model: a state dict (.pt), or a checkpoint with masks "
                   "and report (.safetensors); the report also goes beside it as .json")  # fmt: skip
    p.set_defaults(func=_prune)
    gr = sub.add_parser("gradual", help="gradual pruning with recovery of a timm model on an ImageFolder data set")
    gr.add_argument("--model", required=True, help="timm model name, or a checkpoint {'arch', 'state_dict'}")
    gr.add_argument("--checkpoint", help="state dict to load into a model given by name")
    gr.add_argument("--model-kwargs", help="JSON keyword arguments for timm.create_model")
    gr.add_argument("--data", required=True, help="ImageFolder of training images (also the calibration set)")
    gr.add_argument("--eval-data", help="ImageFolder for accuracy after every epoch (needed for the sweep)")
    gr.add_argument("--initial", type=float, required=True, help="sparsity of the first step")
    gr.add_argument("--final", type=float, required=True, help="sparsity of the last step")
    gr.add_argument("--steps", type=int, required=True, help="number of pruning steps")
    gr.add_argument("--every", type=int, default=1, help="epochs between steps")
    gr.add_argument("--hold", type=int, default=0, help="epochs at the final sparsity after the last recovery")
    gr.add_argument("--kind", choices=("cubic", "linear"), default="cubic")
    gr.add_argument("--method", choices=METHODS, default="ovit")
    gr.add_argument("--block-size", type=int, default=192)
    gr.add_argument("--num-grads", type=int, default=1024)
    gr.add_argument("--grad-batch-size", type=int, default=128)
    gr.add_argument("--damp", type=float, default=1e-8)
    gr.add_argument("--damp-mode", choices=("absolute", "relative"), default="absolute")
    gr.add_argument("--layers", default=None, help="regex of module names (default: timm attn/mlp linears)")
    gr.add_argument("--lr", type=float, default=5e-4, help="peak of every cycle of the cyclic linear rate")
    gr.add_argument("--weight-decay", type=float, default=0.05)
    gr.add_argument("--warmup", type=float, default=0.0, help="epochs of warm-up")
    gr.add_argument("--batch-size", type=int, default=128)
    gr.add_argument("--distill", action="store_true", help="distil from the dense model while recovering")
    gr.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    gr.add_argument("--backend", default=None, choices=("auto", "cuda", "triton", "cpu", "reference"))
    gr.add_argument("--device", default=None)
    gr.add_argument("--workers", type=int, default=4)
    gr.add_argument("--out", required=True, help="run folder: log.json, sparsity=<s>/best.pt, last.pt (resumed)")
    gr.set_defaults(func=_gradual)
    pl = sub.add_parser("plan", help="plan a distributed one-shot run (memory per rank, passes, traffic, time)")
    pl.add_argument("--model", required=True, help="timm model name (built on the meta device: no weights)")
    pl.add_argument("--block-size", type=int, default=192)
    pl.add_argument("--num-grads", type=int, default=4096)
    pl.add_argument("--grad-batch-size", type=int, default=128)
    pl.add_argument("--gpus", type=int, default=1)
    pl.add_argument("--gpu-memory", default="80GB", help="memory of each GPU, e.g. 80GB or 141GB")
    pl.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="of the inverses")
    pl.add_argument("--json", help="also write the plan as JSON here")
    pl.set_defaults(func=_plan)
    rp = sub.add_parser("report", help="per-layer sparsity and sizes of a pruned .safetensors checkpoint")
    rp.add_argument("checkpoint", help="a checkpoint written by ovit.save_pruned or ovit prune --out x.safetensors")
    rp.add_argument("--png", help="also write a bar chart of the per-layer sparsity here")
    rp.set_defaults(func=_report)
    args = ap.parse_args(argv)
    if args.cmd == "prune":
        if args.sparsity is not None and not 0 <= args.sparsity < 1:
            hint = f"; did you mean {args.sparsity / 100:g}?" if 1 <= args.sparsity < 100 else ""
            ap.error(f"--sparsity must be a fraction in [0, 1), got {args.sparsity:g}{hint}")
        if args.sparsity is None and args.pattern == "unstructured":
            ap.error("--sparsity is required for unstructured pruning (or give --pattern n:m)")
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError, OSError, MemoryError) as e:
        if os.environ.get("OVIT_DEBUG", "0") not in ("", "0"):
            raise
        msg = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        print(f"ovit: error: {msg} (OVIT_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
